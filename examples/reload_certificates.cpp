// reload_certificates: a program that embeds sluice::Server and rotates its certificate itself,
// with Server::reload(): the new configuration is built whole (the new certificate and key are
// loaded and checked) before it replaces the running one. The listening socket stays open, new
// connections get the new certificate, connections already open carry on undisturbed.
//
//   reload_certificates CERT_A KEY_A CERT_B KEY_B
//       serve with A; each SIGHUP switches to the other pair; SIGINT or SIGTERM drains and exits
//   reload_certificates --self-test CERT_A KEY_A CERT_B KEY_B CA
//       open a connection (it must see A), reload to B, open another (it must see B), check that
//       the first one still echoes, drain, and exit 0 when everything held
//
// The backend is the program's own plain echo service on the same loop.

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>

#include <uv.h>

#include <sluice/server.hpp>

#include "echo_backend.hpp"
#include "tls_client.hpp"

namespace {

struct Pair {
    std::string cert;
    std::string key;
};

sluice::Config serving(const Pair &pair, const std::string &listen, const std::string &backend) {
    sluice::Config config;
    config.global.logLevel = sluice::LogLevel::warn;
    config.global.drainTimeout = std::chrono::seconds(5);
    sluice::ListenerConfig listener;
    listener.name = "rotating";
    listener.listen.push_back(sluice::parseAddress(listen));
    sluice::CertificateFiles files;
    files.cert = pair.cert;
    files.key = pair.key;
    listener.certificates.push_back(files);
    listener.backend = backend;
    config.listeners.push_back(listener);
    return config;
}

struct Program {
    uv_loop_t *loop = nullptr;
    example::EchoBackend *echo = nullptr;
    sluice::Server *server = nullptr;
    Pair pairs[2];
    int current = 0;
    std::string backend;
    uv_signal_t hangup{};
    uv_signal_t interrupt{};
    uv_signal_t terminate{};
    uv_async_t wake{}; // the self-test's client thread asks the loop for the next step
    std::atomic<int> step{0};
    bool drainForced = false;
    bool reloadOk = false;

    /** Switches to the other certificate; the running one stays if the new one is bad. */
    bool rotate() {
        const int next = 1 - current;
        // Only the certificate changes: same listener name and address, so the socket is kept.
        sluice::Config config = serving(pairs[next], "127.0.0.1:0", backend);
        std::string error;
        if (!server->reload(config, &error)) {
            std::fprintf(stderr, "reload_certificates: reload refused: %s\n", error.c_str());
            return false;
        }
        current = next;
        std::printf("serving %s\n", pairs[current].cert.c_str());
        std::fflush(stdout);
        return true;
    }

    void shutdown() {
        server->drain([this](bool forced) {
            drainForced = forced;
            echo->close();
            for (auto *handle : {reinterpret_cast<uv_handle_t *>(&hangup),
                                 reinterpret_cast<uv_handle_t *>(&interrupt),
                                 reinterpret_cast<uv_handle_t *>(&terminate),
                                 reinterpret_cast<uv_handle_t *>(&wake)}) {
                uv_close(handle, nullptr);
            }
        });
    }
};

/** Waits (on the client thread) until the loop has done step `n`. */
void waitForStep(const Program &program, int n) {
    while (program.step.load() < n) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
}

} // namespace

int main(int argc, char **argv) {
    const bool selfTest = argc == 7 && std::strcmp(argv[1], "--self-test") == 0;
    if (!selfTest && argc != 5) {
        std::fprintf(stderr,
                     "usage: %s CERT_A KEY_A CERT_B KEY_B\n"
                     "       %s --self-test CERT_A KEY_A CERT_B KEY_B CA\n",
                     argv[0], argv[0]);
        return 2;
    }
    char **files = argv + (selfTest ? 2 : 1);
    std::signal(SIGPIPE, SIG_IGN);
    uv_loop_t *loop = uv_default_loop();

    example::EchoBackend echo(loop);
    Program program;
    program.loop = loop;
    program.echo = &echo;
    program.pairs[0] = {files[0], files[1]};
    program.pairs[1] = {files[2], files[3]};
    program.backend = echo.start();
    if (program.backend.empty()) {
        std::fprintf(stderr, "reload_certificates: the echo service cannot listen\n");
        return 1;
    }

    sluice::Server server(loop, serving(program.pairs[0], "127.0.0.1:0", program.backend));
    program.server = &server;
    try {
        server.start();
    } catch (const sluice::Error &e) {
        std::fprintf(stderr, "reload_certificates: %s\n", e.what());
        echo.close();
        uv_run(loop, UV_RUN_DEFAULT);
        uv_loop_close(loop);
        return 1;
    }
    const std::string address = server.addresses().at(0).second;
    std::printf("listening %s %s\nserving %s\nready\n", server.addresses().at(0).first.c_str(),
                address.c_str(), program.pairs[0].cert.c_str());
    std::fflush(stdout);

    for (auto *signal : {&program.hangup, &program.interrupt, &program.terminate}) {
        uv_signal_init(loop, signal);
        signal->data = &program;
    }
    uv_signal_start(
        &program.hangup, [](uv_signal_t *s, int) { static_cast<Program *>(s->data)->rotate(); },
        SIGHUP);
    auto onStop = [](uv_signal_t *s, int) { static_cast<Program *>(s->data)->shutdown(); };
    uv_signal_start(&program.interrupt, onStop, SIGINT);
    uv_signal_start(&program.terminate, onStop, SIGTERM);
    // Self-test steps, run on the loop when the client thread asks: 1 reload to B, 2 drain.
    uv_async_init(loop, &program.wake, [](uv_async_t *async) {
        auto *self = static_cast<Program *>(async->data);
        if (self->step.load() == 0) {
            self->reloadOk = self->rotate();
            self->step.store(1);
        } else if (self->step.load() == 2) {
            self->shutdown();
        }
    });
    program.wake.data = &program;

    bool selfTestOk = false;
    std::thread client;
    if (selfTest) {
        const std::string ca = argv[6];
        client = std::thread([&program, &selfTestOk, address, ca] {
            const std::string certA = program.pairs[0].cert;
            const std::string certB = program.pairs[1].cert;
            // Opened before the reload: it must see A, and keep working after it.
            example::TlsClient before(address, ca);
            const bool beforeOk = before.ok() && before.servedCertificate(certA) &&
                                  !before.servedCertificate(certB) && before.echo("first\n");
            uv_async_send(&program.wake); // reload to B
            waitForStep(program, 1);
            example::TlsClient after(address, ca);
            const bool afterOk = after.ok() && after.servedCertificate(certB) &&
                                 after.echo("second\n") && after.closeCleanly();
            const bool kept = before.echo(std::string(100000, 'x')) && before.closeCleanly();
            std::printf("before-reload %s, after-reload %s, first-connection-kept %s\n",
                        beforeOk ? "ok" : "FAILED", afterOk ? "ok" : "FAILED",
                        kept ? "ok" : "FAILED");
            selfTestOk = beforeOk && afterOk && kept;
            program.step.store(2);
            uv_async_send(&program.wake); // drain
        });
    }

    uv_run(loop, UV_RUN_DEFAULT);
    if (client.joinable()) {
        client.join();
    }
    if (uv_loop_close(loop) != 0) {
        std::fprintf(stderr, "reload_certificates: handles left open\n");
        return 1;
    }
    if (selfTest) {
        const bool ok = selfTestOk && program.reloadOk && !program.drainForced;
        std::printf("self-test %s\n", ok ? "ok" : "FAILED");
        return ok ? 0 : 1;
    }
    return program.drainForced ? 1 : 0;
}
