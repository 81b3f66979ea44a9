// bench/ceiling: what sluice's Engine costs on its own, with no sockets and no event loop: the
// upper bound the daemon can approach. It loads the same configuration file as the daemon,
// builds the same SSL_CTX (tls::makeServerContext), and pairs a server Engine with a plain
// OpenSSL client over an in-memory BIO pair. Only the server's work is timed (thread CPU time
// around every server Engine call), so the figures compare with "per terminator CPU-second".
//
//   handshakes  per listener and TLS version: create, handshake, one 32-byte echo, close_notify,
//               destroy; full and resumed (the previous connection's ticket)
//   download    the server encrypts 16 KiB writes; the ciphertext is consumed unread
//   upload      the server decrypts ciphertext a client produced beforehand
//   idle        memory held per established, idle server Engine, after releaseIdleBuffers():
//               the floor for memory per idle connection, as heap bytes in use (mallinfo2)
//               and as RSS growth (what the daemon's figure is: the same heap plus what the
//               allocator cannot give back between the engines' long-lived pieces)
//
// Usage: ceiling --config sluice.toml [--seconds S] [--idle N]; prints one JSON object.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <malloc.h>
#include <string>
#include <unistd.h>
#include <vector>

#include <openssl/ssl.h>

#include <sluice/config.hpp>
#include <sluice/engine.hpp>

#include "tls/context.hpp"

namespace {

double threadCpuNs() {
    timespec ts{};
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return static_cast<double>(ts.tv_sec) * 1e9 + static_cast<double>(ts.tv_nsec);
}

double wallNs() {
    timespec ts{};
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return static_cast<double>(ts.tv_sec) * 1e9 + static_cast<double>(ts.tv_nsec);
}

/** Adds the thread CPU time of scoped sections; the clock's own cost is measured and removed. */
struct Meter {
    double ns = 0;
    static double overhead;
    template <typename F>
    auto time(F &&f) {
        const double t0 = threadCpuNs();
        struct Add {
            Meter &m;
            double t0;
            ~Add() { m.ns += std::max(0.0, threadCpuNs() - t0 - overhead); }
        } add{*this, t0};
        return f();
    }
};
double Meter::overhead = 0;

void calibrate() {
    constexpr int n = 20000;
    const double t0 = threadCpuNs();
    for (int i = 0; i < n; ++i) {
        threadCpuNs();
    }
    Meter::overhead = (threadCpuNs() - t0) / n;
}

/** A plain OpenSSL client over its own in-memory BIO pair. */
struct Client {
    SSL *ssl = nullptr;
    BIO *net = nullptr;

    Client(SSL_CTX *ctx, SSL_SESSION *session) {
        BIO *inner = nullptr;
        BIO_new_bio_pair(&inner, 256 * 1024, &net, 256 * 1024);
        ssl = SSL_new(ctx);
        SSL_set_bio(ssl, inner, inner);
        SSL_set_connect_state(ssl);
        if (session != nullptr) {
            SSL_set_session(ssl, session);
        }
    }
    ~Client() {
        SSL_free(ssl);
        BIO_free(net);
    }
    Client(const Client &) = delete;
    Client &operator=(const Client &) = delete;
};

/** Moves ciphertext both ways; server calls are timed. Returns whether anything moved. */
bool shuttle(sluice::Engine &server, Client &client, Meter &meter) {
    bool moved = false;
    for (;;) {
        auto out = server.cipherOut();
        if (out.empty()) {
            break;
        }
        const int n = BIO_write(client.net, out.data(), static_cast<int>(out.size()));
        if (n <= 0) {
            break;
        }
        meter.time([&] {
            server.consumeCipherOut(static_cast<std::size_t>(n));
            return 0;
        });
        moved = true;
    }
    for (;;) {
        char *data = nullptr;
        const int avail = BIO_nread0(client.net, &data);
        if (avail <= 0) {
            break;
        }
        auto space = server.cipherInSpace();
        if (space.empty()) {
            break;
        }
        const std::size_t n = std::min(space.size(), static_cast<std::size_t>(avail));
        std::memcpy(space.data(), data, n);
        BIO_nread(client.net, &data, static_cast<int>(n));
        meter.time([&] {
            server.commitCipherIn(n);
            return 0;
        });
        moved = true;
    }
    return moved;
}

struct Setup {
    SSL_CTX *server = nullptr;
    SSL_CTX *client12 = nullptr;
    SSL_CTX *client13 = nullptr;
    sluice::EngineOptions options;
};

SSL_CTX *makeClient(int version) {
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_min_proto_version(ctx, version);
    SSL_CTX_set_max_proto_version(ctx, version);
    SSL_CTX_set_ciphersuites(ctx, "TLS_AES_128_GCM_SHA256");
    SSL_CTX_set_cipher_list(ctx, "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256");
    SSL_CTX_set1_groups_list(ctx, "X25519:P-256"); // P-256: see loadgen.cpp
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, nullptr);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    return ctx;
}

/**
 * One connection: handshake, a 32-byte echo, close_notify both ways. Returns the server CPU
 * nanoseconds it took, or a negative value on failure. `session` is offered and replaced.
 */
double connection(const Setup &setup, SSL_CTX *clientCtx, SSL_SESSION **session, bool *resumed,
                  std::unique_ptr<sluice::Engine> *keep = nullptr) {
    Meter meter;
    auto server = meter.time(
        [&] { return sluice::Engine::create(setup.server, sluice::Role::server, setup.options); });
    if (!server) {
        return -1;
    }
    Client client(clientCtx, session != nullptr ? *session : nullptr);
    const char message[32] = {'E', 'c', 'e', 'i', 'l'};
    char reply[64];
    bool sent = false;
    std::size_t got = 0;
    for (int round = 0; round < 200 && got < sizeof message; ++round) {
        SSL_do_handshake(client.ssl);
        if (SSL_is_init_finished(client.ssl) && !sent) {
            sent = SSL_write(client.ssl, message, sizeof message) == sizeof message;
        }
        shuttle(*server, client, meter);
        if (!server->plainOut().empty()) {
            // The echo: what the backend would send back, encrypted by the server.
            meter.time([&] {
                auto plain = server->plainOut();
                std::size_t taken = 0;
                while (taken < plain.size()) {
                    const std::size_t n = server->write(plain.subspan(taken));
                    if (n == 0) {
                        break;
                    }
                    taken += n;
                }
                server->consumePlainOut(taken);
                return 0;
            });
            shuttle(*server, client, meter);
        }
        if (sent) {
            const int n = SSL_read(client.ssl, reply, sizeof reply);
            if (n > 0) {
                got += static_cast<std::size_t>(n);
            }
        }
        if (server->status().failed) {
            return -1;
        }
    }
    if (got < sizeof message) {
        return -1;
    }
    *resumed = SSL_session_reused(client.ssl) == 1;
    if (session != nullptr) {
        SSL_SESSION *latest = SSL_get1_session(client.ssl);
        SSL_SESSION_free(*session);
        *session = latest;
    }
    if (keep != nullptr) {
        // The idle floor: keep the established server engine, drop the client.
        meter.time([&] { return server->releaseIdleBuffers(); });
        *keep = std::move(server);
        return meter.ns;
    }
    SSL_shutdown(client.ssl);
    shuttle(*server, client, meter);
    meter.time([&] {
        server->shutdown();
        return 0;
    });
    shuttle(*server, client, meter);
    meter.time([&] {
        server.reset();
        return 0;
    });
    return meter.ns;
}

/** Handshakes per server CPU-second over `seconds` of wall time. */
double handshakes(const Setup &setup, int version, bool resume, double seconds,
                  double *resumedShare) {
    SSL_CTX *clientCtx = version == 12 ? setup.client12 : setup.client13;
    SSL_SESSION *session = nullptr;
    bool resumed = false;
    if (resume && connection(setup, clientCtx, &session, &resumed) < 0) {
        return 0;
    }
    double cpu = 0;
    std::uint64_t count = 0;
    std::uint64_t resumedCount = 0;
    const double until = wallNs() + seconds * 1e9;
    while (wallNs() < until) {
        const double ns = connection(setup, clientCtx, resume ? &session : nullptr, &resumed);
        if (ns < 0) {
            std::fprintf(stderr, "ceiling: a handshake failed\n");
            return 0;
        }
        cpu += ns;
        count++;
        resumedCount += resumed ? 1 : 0;
    }
    SSL_SESSION_free(session);
    *resumedShare = count > 0 ? static_cast<double>(resumedCount) / static_cast<double>(count) : 0;
    return cpu > 0 ? static_cast<double>(count) / (cpu / 1e9) : 0;
}

/** An established pair for the bulk tests. */
struct Established {
    std::unique_ptr<sluice::Engine> server;
    std::unique_ptr<Client> client;
};

Established establish(const Setup &setup) {
    Established e;
    Meter meter;
    e.server = sluice::Engine::create(setup.server, sluice::Role::server, setup.options);
    e.client = std::make_unique<Client>(setup.client13, nullptr);
    for (int round = 0;
         round < 100 && !(e.server->status().handshakeDone && SSL_is_init_finished(e.client->ssl));
         ++round) {
        SSL_do_handshake(e.client->ssl);
        shuttle(*e.server, *e.client, meter);
    }
    return e;
}

/** MB the server encrypts per CPU-second: 16 KiB writes, ciphertext consumed unread. */
double download(const Setup &setup, double seconds) {
    Established e = establish(setup);
    std::vector<std::uint8_t> chunk(16 * 1024, 'd');
    std::uint64_t bytes = 0;
    const double until = wallNs() + seconds * 1e9;
    const double t0 = threadCpuNs();
    while (wallNs() < until) {
        for (int i = 0; i < 64; ++i) {
            std::size_t n = 0;
            while ((n = e.server->write(chunk)) == 0) {
                auto out = e.server->cipherOut();
                if (out.empty()) {
                    return 0; // refused with nothing to drain: stuck
                }
                e.server->consumeCipherOut(out.size());
            }
            bytes += n;
            for (auto out = e.server->cipherOut(); !out.empty(); out = e.server->cipherOut()) {
                e.server->consumeCipherOut(out.size());
            }
        }
    }
    const double cpu = threadCpuNs() - t0;
    return static_cast<double>(bytes) / 1e6 / (cpu / 1e9);
}

/** MB the server decrypts per CPU-second, from ciphertext a client produced beforehand. */
double upload(const Setup &setup, std::size_t total) {
    Established e = establish(setup);
    std::vector<char> cipher;
    cipher.reserve(total + total / 64);
    std::vector<char> chunk(16 * 1024, 'u');
    std::vector<char> drain(256 * 1024);
    std::size_t plain = 0;
    while (plain < total) {
        if (SSL_write(e.client->ssl, chunk.data(), static_cast<int>(chunk.size())) <= 0) {
            return 0;
        }
        plain += chunk.size();
        for (int n;
             (n = BIO_read(e.client->net, drain.data(), static_cast<int>(drain.size()))) > 0;) {
            cipher.insert(cipher.end(), drain.data(), drain.data() + n);
        }
    }
    std::size_t at = 0;
    std::size_t decrypted = 0;
    const double t0 = threadCpuNs();
    while (at < cipher.size()) {
        auto space = e.server->cipherInSpace();
        if (space.empty()) {
            auto out = e.server->plainOut();
            if (out.empty()) {
                return 0;
            }
            decrypted += out.size();
            e.server->consumePlainOut(out.size());
            continue;
        }
        const std::size_t n = std::min(space.size(), cipher.size() - at);
        std::memcpy(space.data(), cipher.data() + at, n);
        at += n;
        e.server->commitCipherIn(n);
        auto out = e.server->plainOut();
        decrypted += out.size();
        e.server->consumePlainOut(out.size());
    }
    const double cpu = threadCpuNs() - t0;
    if (decrypted != plain) {
        std::fprintf(stderr, "ceiling: upload decrypted %zu of %zu bytes\n", decrypted, plain);
        return 0;
    }
    return static_cast<double>(decrypted) / 1e6 / (cpu / 1e9);
}

/** Resident bytes of this process (/proc/self/statm), or 0. */
double residentBytes() {
    long pages = 0;
    long resident = 0;
    FILE *file = std::fopen("/proc/self/statm", "r");
    if (file == nullptr) {
        return 0;
    }
    const int read = std::fscanf(file, "%ld %ld", &pages, &resident);
    std::fclose(file);
    return read == 2 ? static_cast<double>(resident) * static_cast<double>(sysconf(_SC_PAGESIZE))
                     : 0;
}

struct Floor {
    double heap = 0; // heap bytes in use per engine
    double rss = 0;  // resident bytes per engine
};

/** Memory per established idle server Engine (TLS 1.3), after releasing its buffers. */
Floor idleFloor(const Setup &setup, int count) {
    std::vector<std::unique_ptr<sluice::Engine>> kept(static_cast<std::size_t>(count));
    // One connection first, so lazily built OpenSSL state is not charged to the engines.
    bool resumed = false;
    std::unique_ptr<sluice::Engine> warm;
    connection(setup, setup.client13, nullptr, &resumed, &warm);
    warm.reset();
    malloc_trim(0);
    const struct mallinfo2 before = mallinfo2();
    const double residentBefore = residentBytes();
    for (auto &engine : kept) {
        if (connection(setup, setup.client13, nullptr, &resumed, &engine) < 0) {
            return {};
        }
    }
    const struct mallinfo2 after = mallinfo2();
    const double used =
        static_cast<double>((after.uordblks + after.hblkhd) - (before.uordblks + before.hblkhd));
    return {used / count, (residentBytes() - residentBefore) / count};
}

double median(std::vector<double> values) {
    std::sort(values.begin(), values.end());
    return values.empty() ? 0 : values[values.size() / 2];
}

} // namespace

int main(int argc, char **argv) {
    std::string path;
    double seconds = 1.0;
    int idle = 2000;
    int rounds = 3;
    for (int i = 1; i + 1 < argc; i += 2) {
        const std::string key = argv[i];
        if (key == "--config") {
            path = argv[i + 1];
        } else if (key == "--seconds") {
            seconds = std::atof(argv[i + 1]);
        } else if (key == "--idle") {
            idle = std::max(1, std::atoi(argv[i + 1]));
        } else if (key == "--rounds") {
            rounds = std::max(1, std::atoi(argv[i + 1]));
        } else {
            std::fprintf(stderr, "ceiling: unknown option %s\n", key.c_str());
            return 2;
        }
    }
    if (path.empty()) {
        std::fprintf(stderr, "usage: ceiling --config sluice.toml [--seconds S] [--idle N] "
                             "[--rounds R]\n");
        return 2;
    }
    calibrate();
    sluice::Config config;
    std::vector<sluice::tls::ContextPtr> contexts;
    try {
        config = sluice::loadConfig(path);
        for (const auto &listener : config.listeners) {
            contexts.push_back(sluice::tls::makeServerContext(listener));
        }
    } catch (const std::exception &e) {
        std::fprintf(stderr, "ceiling: %s\n", e.what());
        return 1;
    }
    Setup setup;
    setup.client12 = makeClient(TLS1_2_VERSION);
    setup.client13 = makeClient(TLS1_3_VERSION);
    setup.options.pairSize = config.global.buffers.tls;
    setup.options.plaintextBudget = config.global.buffers.plaintext;

    std::printf("{\"clock_overhead_ns\":%.0f", Meter::overhead);
    for (std::size_t i = 0; i < config.listeners.size(); ++i) {
        setup.server = contexts[i].get();
        const std::string &name = config.listeners[i].name;
        for (int version : {13, 12}) {
            for (bool resume : {false, true}) {
                std::vector<double> rates;
                double share = 0;
                for (int r = 0; r < rounds; ++r) {
                    rates.push_back(handshakes(setup, version, resume, seconds, &share));
                }
                std::printf(",\"%s_tls%d_%s\":%.1f,\"%s_tls%d_%s_resumed_share\":%.3f",
                            name.c_str(), version, resume ? "resumed" : "full", median(rates),
                            name.c_str(), version, resume ? "resumed" : "full", share);
                std::fflush(stdout);
            }
        }
    }
    setup.server = contexts[0].get();
    std::vector<double> down;
    std::vector<double> up;
    for (int r = 0; r < rounds; ++r) {
        down.push_back(download(setup, seconds));
        up.push_back(upload(setup, static_cast<std::size_t>(256) << 20));
    }
    std::printf(",\"download_mb_per_cpu_s\":%.1f,\"upload_mb_per_cpu_s\":%.1f", median(down),
                median(up));
    const Floor floor = idleFloor(setup, idle);
    std::printf(
        ",\"idle_engines\":%d,\"idle_bytes_per_engine\":%.0f,\"idle_rss_per_engine\":%.0f}\n", idle,
        floor.heap, floor.rss);
    SSL_CTX_free(setup.client12);
    SSL_CTX_free(setup.client13);
    return 0;
}
