// embed_server: an existing libuv program (a plain TCP echo service and a heartbeat timer) that
// adds TLS by embedding sluice::Server on its own loop. The configuration is built in code, with
// two listeners on 127.0.0.1 (ports the kernel picks): "tls-echo", whose backend is the
// program's echo service over TCP, and "tls-handler", whose connections never leave the process:
// an in-process echo handler (sluice::StreamHandler) answers them, with backpressure.
//
//   embed_server CERT KEY                  serve until SIGINT or SIGTERM, then drain and exit
//   embed_server --self-test CERT KEY CA   connect a TLS client through it, check the echo,
//                                          drain, and exit 0 when everything worked
//
// Output: "listening NAME ADDRESS" for each sluice listener, then "ready".

#include <atomic>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <memory>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include <uv.h>

#include <sluice/server.hpp>

#include "echo_backend.hpp"
#include "echo_handler.hpp"
#include "tls_client.hpp"

namespace {

/** What the program adds to its loop: the TLS server, its stop signals, a self-test hook. */
struct Program {
    uv_loop_t *loop = nullptr;
    example::EchoBackend *echo = nullptr;
    sluice::Server *server = nullptr;
    uv_timer_t heartbeat{};
    uv_signal_t interrupt{};
    uv_signal_t terminate{};
    uv_async_t selfTestDone{};
    bool selfTestOk = false;
    bool drainForced = false;

    /** Drains sluice, then closes the program's own handles: uv_run() returns after that. */
    void shutdown() {
        // drain() returns false if a drain is already under way; its callback closes the rest.
        server->drain([this](bool forced) {
            drainForced = forced;
            echo->close();
            for (auto *handle : {reinterpret_cast<uv_handle_t *>(&heartbeat),
                                 reinterpret_cast<uv_handle_t *>(&interrupt),
                                 reinterpret_cast<uv_handle_t *>(&terminate),
                                 reinterpret_cast<uv_handle_t *>(&selfTestDone)}) {
                uv_close(handle, nullptr);
            }
        });
    }
};

sluice::Config tlsInFrontOf(const std::string &backend, const std::string &cert,
                            const std::string &key) {
    sluice::Config config;
    config.global.logLevel = sluice::LogLevel::warn;
    config.global.drainTimeout = std::chrono::seconds(5);
    sluice::ListenerConfig listener;
    listener.name = "tls-echo";
    listener.listen.push_back(sluice::parseAddress("127.0.0.1:0"));
    sluice::CertificateFiles files;
    files.cert = cert;
    files.key = key;
    listener.certificates.push_back(files);
    listener.backend = backend; // an address: it becomes a backend of its own
    config.listeners.push_back(listener);

    sluice::BackendConfig inProcess;
    inProcess.name = "in-process";
    inProcess.handler = "echo"; // registered with Server::setHandler
    config.backends.push_back(inProcess);
    listener.name = "tls-handler";
    listener.backend = inProcess.name;
    config.listeners.push_back(listener);
    return config;
}

} // namespace

int main(int argc, char **argv) {
    const bool selfTest = argc == 5 && std::strcmp(argv[1], "--self-test") == 0;
    if (!selfTest && argc != 3) {
        std::fprintf(stderr, "usage: %s CERT KEY\n       %s --self-test CERT KEY CA\n", argv[0],
                     argv[0]);
        return 2;
    }
    const std::string cert = argv[selfTest ? 2 : 1];
    const std::string key = argv[selfTest ? 3 : 2];
    const std::string ca = selfTest ? argv[4] : "";

    // libuv reports a write to a closed socket as EPIPE only when SIGPIPE does not kill us first.
    std::signal(SIGPIPE, SIG_IGN);
    uv_loop_t *loop = uv_default_loop();

    // The program as it was before sluice: an echo service and a timer of its own.
    example::EchoBackend echo(loop);
    const std::string backend = echo.start();
    if (backend.empty()) {
        std::fprintf(stderr, "embed_server: the echo service cannot listen\n");
        return 1;
    }
    Program program;
    program.loop = loop;
    program.echo = &echo;
    uv_timer_init(loop, &program.heartbeat);
    uv_timer_start(
        &program.heartbeat, [](uv_timer_t *) {}, 1000, 1000);

    // The addition: TLS in front of the echo service, on the same loop.
    sluice::Server server(loop, tlsInFrontOf(backend, cert, key));
    server.setHandler("echo", [](const sluice::StreamInfo &) {
        return std::make_unique<example::EchoHandler>();
    });
    program.server = &server;
    try {
        server.start();
    } catch (const sluice::Error &e) {
        std::fprintf(stderr, "embed_server: %s\n", e.what());
        echo.close();
        uv_close(reinterpret_cast<uv_handle_t *>(&program.heartbeat), nullptr);
        uv_run(loop, UV_RUN_DEFAULT);
        uv_loop_close(loop);
        return 1;
    }
    for (const auto &[name, address] : server.addresses()) {
        std::printf("listening %s %s\n", name.c_str(), address.c_str());
    }
    std::printf("backend echo %s\nready\n", backend.c_str());
    std::fflush(stdout);

    for (auto *signal : {&program.interrupt, &program.terminate}) {
        uv_signal_init(loop, signal);
        signal->data = &program;
    }
    auto onSignal = [](uv_signal_t *signal, int) {
        static_cast<Program *>(signal->data)->shutdown();
    };
    uv_signal_start(&program.interrupt, onSignal, SIGINT);
    uv_signal_start(&program.terminate, onSignal, SIGTERM);
    uv_async_init(loop, &program.selfTestDone,
                  [](uv_async_t *async) { static_cast<Program *>(async->data)->shutdown(); });
    program.selfTestDone.data = &program;

    // The self-test plays a remote client on a thread; the loop stays on this one.
    std::thread client;
    if (selfTest) {
        std::vector<std::string> addresses;
        for (const auto &[name, address] : server.addresses()) {
            addresses.push_back(address);
        }
        client = std::thread([&program, addresses, ca] {
            std::string message;
            for (int i = 0; i < 20000; ++i) {
                message += "line " + std::to_string(i) + " through sluice\n";
            }
            bool ok = addresses.size() == 2;
            for (const auto &address : addresses) { // the TCP echo, then the in-process one
                example::TlsClient tls(address, ca);
                ok = ok && tls.ok() && tls.echo(message) && tls.closeCleanly();
            }
            program.selfTestOk = ok;
            uv_async_send(&program.selfTestDone);
        });
    }

    uv_run(loop, UV_RUN_DEFAULT);
    if (client.joinable()) {
        client.join();
    }
    const int closed = uv_loop_close(loop);
    const sluice::ServerStats stats = server.stats();
    std::printf("done accepted=%llu bytes_up=%llu bytes_down=%llu forced=%s\n",
                static_cast<unsigned long long>(stats.accepted),
                static_cast<unsigned long long>(stats.bytesClientToBackend),
                static_cast<unsigned long long>(stats.bytesBackendToClient),
                program.drainForced ? "yes" : "no");
    if (closed != 0) {
        std::fprintf(stderr, "embed_server: handles left open\n");
        return 1;
    }
    if (selfTest) {
        std::printf("self-test %s\n", program.selfTestOk ? "ok" : "FAILED");
        return program.selfTestOk && !program.drainForced ? 0 : 1;
    }
    return program.drainForced ? 1 : 0;
}
