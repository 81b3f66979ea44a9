// Unit tests for in-process stream handlers: a real libuv loop runs proxy::Server with a pool
// served by a StreamHandler, and a real TLS client (OpenSSL on a blocking socket, in a thread)
// talks to it over loopback. Byte-exact transfers both ways with the handler's write
// backpressure, read backpressure (a paused handler bounds what sluice takes), half-close in both
// directions, a handler that closes, a factory that refuses, and calls on a closed stream.

#include <arpa/inet.h>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <netinet/in.h>
#include <string>
#include <sys/socket.h>
#include <thread>
#include <unistd.h>
#include <vector>

#include <doctest/doctest.h>
#include <uv.h>

#include <sluice/config.hpp>
#include <sluice/stream.hpp>

#include "proxy/server.hpp"
#include "tls_fixture.hpp"

namespace {

using namespace sluice;
using Bytes = std::vector<std::uint8_t>;

Bytes pattern(std::size_t size, std::uint8_t seed) {
    Bytes out(size);
    for (std::size_t i = 0; i < size; ++i) {
        out[i] = static_cast<std::uint8_t>((i * 31 + seed + i / 4093) & 0xff);
    }
    return out;
}

/** The test PKI's leaf written as PEM files, once per binary. */
std::pair<std::string, std::string> certificateFiles() {
    static const auto files = [] {
        const auto dir = std::filesystem::temp_directory_path() /
                         ("sluice-handler-test-" + std::to_string(getpid()));
        std::filesystem::create_directories(dir);
        const std::string cert = (dir / "leaf.crt").string();
        const std::string key = (dir / "leaf.key").string();
        test::writePem(cert, test::pki().leafCert.get(), nullptr);
        test::writePem(key, nullptr, test::pki().leafKey.get());
        return std::make_pair(cert, key);
    }();
    return files;
}

/** A blocking TLS client on its own thread. */
struct Client {
    int fd = -1;
    SSL *ssl = nullptr;
    test::SslCtxPtr ctx = test::clientContext();

    explicit Client(std::uint16_t port) {
        fd = ::socket(AF_INET, SOCK_STREAM, 0);
        sockaddr_in address{};
        address.sin_family = AF_INET;
        address.sin_port = htons(port);
        address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        REQUIRE(::connect(fd, reinterpret_cast<sockaddr *>(&address), sizeof address) == 0);
        timeval timeout{10, 0};
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout);
        ssl = SSL_new(ctx.get());
        SSL_set_fd(ssl, fd);
        SSL_set_tlsext_host_name(ssl, "localhost");
        SSL_set1_host(ssl, "localhost");
        REQUIRE(SSL_connect(ssl) == 1);
    }
    ~Client() {
        SSL_free(ssl);
        ::close(fd);
    }
    void send(const Bytes &data) {
        std::size_t at = 0;
        while (at < data.size()) {
            std::size_t n = 0;
            REQUIRE(SSL_write_ex(ssl, data.data() + at,
                                 std::min<std::size_t>(data.size() - at, 16384), &n) == 1);
            at += n;
        }
    }
    /** Reads until `size` bytes arrived or the stream ended; `how` says how it ended. */
    Bytes receive(std::size_t size, std::string *how = nullptr) {
        Bytes out;
        std::uint8_t buffer[16384];
        while (out.size() < size) {
            std::size_t n = 0;
            if (SSL_read_ex(ssl, buffer, sizeof buffer, &n) == 1) {
                out.insert(out.end(), buffer, buffer + n);
                continue;
            }
            const int error = SSL_get_error(ssl, 0);
            if (how != nullptr) {
                *how = error == SSL_ERROR_ZERO_RETURN ? "close_notify" : "truncated";
            }
            break;
        }
        return out;
    }
};

/** One loop, one server with handler pool "h" on 127.0.0.1, and a client body run in a thread. */
struct Rig {
    uv_loop_t loop{};
    std::map<std::string, HandlerFactory> handlers;
    std::unique_ptr<proxy::Server> server;
    std::uint16_t port = 0;
    uv_async_t done{};
    Buffers buffers;

    Rig() { uv_loop_init(&loop); }
    ~Rig() {
        uv_run(&loop, UV_RUN_DEFAULT);
        uv_loop_close(&loop);
    }

    void run(HandlerFactory factory, const std::function<void(std::uint16_t port)> &client) {
        handlers["h"] = std::move(factory);
        Config config;
        config.global.buffers = buffers;
        BackendConfig backend;
        backend.name = "app";
        backend.handler = "h";
        config.backends.push_back(backend);
        ListenerConfig listener;
        listener.name = "web";
        const auto [cert, key] = certificateFiles();
        CertificateFiles files;
        files.cert = cert;
        files.key = key;
        listener.certificates.push_back(files);
        listener.backend = "app";
        listener.timeouts.idle = std::chrono::seconds(20);
        config.listeners.push_back(listener);
        server = std::make_unique<proxy::Server>(&loop, proxy::buildRuntime(config, 1, &handlers));

        int bound = 0;
        const int fd = test::listenLoopback(bound);
        port = static_cast<std::uint16_t>(bound);
        server->listen({{"web 127.0.0.1:0", "web", fd}});

        done.data = this;
        uv_async_init(&loop, &done, [](uv_async_t *handle) {
            auto *self = static_cast<Rig *>(handle->data);
            uv_close(reinterpret_cast<uv_handle_t *>(&self->done), nullptr);
            self->server->stop([](bool) {});
        });
        std::thread thread([&] {
            client(port);
            uv_async_send(&done);
        });
        uv_run(&loop, UV_RUN_DEFAULT);
        thread.join();
    }
};

} // namespace

TEST_CASE("a handler streams megabytes both ways with write backpressure and half-close") {
    constexpr std::size_t down = 8 * 1024 * 1024;
    constexpr std::size_t up = 6 * 1024 * 1024 + 7;
    const Bytes source = pattern(down, 1);
    const Bytes upload = pattern(up, 2);

    struct Handler : StreamHandler {
        const Bytes &source;
        const Bytes &expected;
        std::size_t sent = 0;
        std::size_t *maxQueued; // the test's: the handler is gone when the test reads it
        Bytes received;
        std::string *closeReason;
        Handler(const Bytes &s, const Bytes &e, std::size_t *most, std::string *reason)
            : source(s)
            , expected(e)
            , maxQueued(most)
            , closeReason(reason) {}
        void pushMore(Stream &stream) {
            // Write in 10 KiB pieces until the queue reaches its high-water mark.
            while (sent < source.size() && stream.writeQueued() < stream.writeHighWater()) {
                const std::size_t n = std::min<std::size_t>(10240, source.size() - sent);
                REQUIRE(stream.write({source.data() + sent, n}));
                sent += n;
                *maxQueued = std::max(*maxQueued, stream.writeQueued());
            }
        }
        void onOpen(Stream &stream) override { pushMore(stream); }
        void onWritable(Stream &stream) override { pushMore(stream); }
        void onData(Stream &, std::span<const std::uint8_t> data) override {
            received.insert(received.end(), data.begin(), data.end());
        }
        void onEnd(Stream &stream, bool truncated) override {
            // The client closed its direction; ours is still open for the verdict.
            const bool ok = !truncated && received == expected;
            const std::string verdict = ok ? "verdict:ok" : "verdict:bad";
            REQUIRE(stream.write(
                {reinterpret_cast<const std::uint8_t *>(verdict.data()), verdict.size()}));
            stream.shutdown();
            CHECK_FALSE(stream.write({reinterpret_cast<const std::uint8_t *>("x"), 1}));
        }
        void onClose(Stream &, std::string_view reason) override { *closeReason = reason; }
    };
    std::string closeReason;
    Rig rig;
    std::size_t maxQueued = 0; // the handler's figure, read once the loop has stopped
    rig.run(
        [&](const StreamInfo &info) {
            CHECK(info.listener == "web");
            CHECK(info.handler == "h");
            CHECK(info.serverName == "localhost");
            CHECK(info.protocol == "TLSv1.3");
            return std::make_unique<Handler>(source, upload, &maxQueued, &closeReason);
        },
        [&](std::uint16_t port) {
            Client client(port);
            const Bytes got = client.receive(down);
            CHECK(got == source);
            client.send(upload);
            REQUIRE(SSL_shutdown(client.ssl) == 0); // close_notify sent, the reply still comes
            std::string how;
            const Bytes verdict = client.receive(1 << 20, &how);
            CHECK(std::string(verdict.begin(), verdict.end()) == "verdict:ok");
            CHECK(how == "close_notify");
        });
    CHECK(closeReason == "done");
    // The handler never queued much beyond the high-water mark (one piece at most).
    CHECK(maxQueued >= rig.buffers.backend);
    CHECK(maxQueued < rig.buffers.backend + 10240);
}

TEST_CASE("a paused handler bounds what sluice takes from the client, then catches up") {
    struct Handler : StreamHandler {
        std::size_t received = 0;
        Stream **self = nullptr;
        void onOpen(Stream &stream) override {
            *self = &stream;
            stream.pauseReading(true);
        }
        void onData(Stream &, std::span<const std::uint8_t> data) override {
            received += data.size();
        }
        void onEnd(Stream &stream, bool) override {
            const std::string total = std::to_string(received);
            stream.write({reinterpret_cast<const std::uint8_t *>(total.data()), total.size()});
            stream.shutdown();
        }
    };
    Handler *handler = nullptr;
    Stream *stream = nullptr;
    std::atomic<std::size_t> pushed{0};
    std::atomic<std::size_t> receivedWhilePaused{1};
    Rig rig;
    uv_async_t resume{};
    struct Resume {
        Handler **handler;
        Stream **stream;
        std::atomic<std::size_t> *receivedWhilePaused;
    } context{&handler, &stream, &receivedWhilePaused};
    resume.data = &context;
    uv_async_init(&rig.loop, &resume, [](uv_async_t *async) {
        auto *c = static_cast<Resume *>(async->data);
        *c->receivedWhilePaused = (*c->handler)->received;
        (*c->stream)->pauseReading(false);
        uv_close(reinterpret_cast<uv_handle_t *>(async), nullptr);
    });
    rig.run(
        [&](const StreamInfo &) {
            auto made = std::make_unique<Handler>();
            made->self = &stream;
            handler = made.get();
            return made;
        },
        [&](std::uint16_t port) {
            Client client(port);
            // Push until the client is stopped: sluice's buffers and the kernel's fill, then
            // writes block (time out) instead of memory growing.
            timeval shortWait{0, 300000};
            setsockopt(client.fd, SOL_SOCKET, SO_SNDTIMEO, &shortWait, sizeof shortWait);
            const Bytes chunk = pattern(16384, 3);
            for (int i = 0; i < 4096; ++i) {
                std::size_t n = 0;
                if (SSL_write_ex(client.ssl, chunk.data(), chunk.size(), &n) != 1) {
                    break;
                }
                pushed += n;
            }
            // Stopped well short of 64 MiB.
            CHECK(pushed < std::size_t{48} * 1024 * 1024);
            uv_async_send(&resume);
            // The write that timed out left its record half-written; retrying it is OpenSSL's
            // rule, with the socket blocking again.
            timeval longWait{10, 0};
            setsockopt(client.fd, SOL_SOCKET, SO_SNDTIMEO, &longWait, sizeof longWait);
            std::size_t n = 0;
            REQUIRE(SSL_write_ex(client.ssl, chunk.data(), chunk.size(), &n) == 1);
            pushed += n;
            REQUIRE(SSL_shutdown(client.ssl) == 0);
            const Bytes reply = client.receive(64);
            CHECK(std::string(reply.begin(), reply.end()) == std::to_string(pushed.load()));
        });
    CHECK(receivedWhilePaused == 0);
}

TEST_CASE("a handler that closes cuts the stream without close_notify") {
    std::string closeReason;
    bool writeAfterClose = true;
    struct Handler : StreamHandler {
        std::string *reason;
        bool *writeAfterClose;
        void onData(Stream &stream, std::span<const std::uint8_t>) override {
            stream.write({reinterpret_cast<const std::uint8_t *>("partial"), 7});
            stream.close();
        }
        void onClose(Stream &stream, std::string_view why) override {
            *reason = why;
            *writeAfterClose = stream.write({reinterpret_cast<const std::uint8_t *>("x"), 1});
        }
    };
    Rig rig;
    rig.run(
        [&](const StreamInfo &) {
            auto handler = std::make_unique<Handler>();
            handler->reason = &closeReason;
            handler->writeAfterClose = &writeAfterClose;
            return handler;
        },
        [&](std::uint16_t port) {
            Client client(port);
            client.send(pattern(100, 4));
            std::string how;
            client.receive(1 << 20, &how);
            CHECK(how == "truncated");
        });
    CHECK(closeReason == "handler_close");
    CHECK_FALSE(writeAfterClose);
}

TEST_CASE("a factory that refuses (or throws) gets the client a clean close") {
    for (bool throws : {false, true}) {
        CAPTURE(throws);
        Rig rig;
        rig.run(
            [&](const StreamInfo &) -> std::unique_ptr<StreamHandler> {
                if (throws) {
                    throw std::runtime_error("no capacity");
                }
                return nullptr;
            },
            [&](std::uint16_t port) {
                Client client(port);
                std::string how;
                const Bytes got = client.receive(1 << 20, &how);
                CHECK(got.empty());
                CHECK(how == "close_notify");
            });
    }
}

TEST_CASE("the client's FIN without close_notify reaches the handler as truncated") {
    bool truncated = false;
    bool ended = false;
    struct Handler : StreamHandler {
        bool *truncated;
        bool *ended;
        void onData(Stream &, std::span<const std::uint8_t>) override {}
        void onEnd(Stream &stream, bool t) override {
            *truncated = t;
            *ended = true;
            stream.shutdown();
        }
    };
    Rig rig;
    rig.run(
        [&](const StreamInfo &) {
            auto handler = std::make_unique<Handler>();
            handler->truncated = &truncated;
            handler->ended = &ended;
            return handler;
        },
        [&](std::uint16_t port) {
            Client client(port);
            client.send(pattern(1000, 5));
            ::shutdown(client.fd, SHUT_WR);
            std::string how;
            client.receive(1 << 20, &how);
            CHECK(how == "close_notify");
        });
    CHECK(ended);
    CHECK(truncated);
}
