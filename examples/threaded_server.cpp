// threaded_server: sluice on several threads of one program, the way libsluice scales out. Each
// thread runs a libuv loop of its own with a sluice::Server on it; all of them listen on the same
// address (the kernel spreads the connections between their sockets through SO_REUSEPORT), and
// all of them were made with one sluice::HandshakeLimits, so global.max_handshakes_per_ip holds
// for the program rather than for each thread. An in-process echo handler answers every
// connection and counts it for its thread; each Server's stats() counts its own thread's too.
//
//   threaded_server [--threads N] CERT KEY    serve on 127.0.0.1 until SIGINT or SIGTERM, then
//                                             drain every thread and exit
//   threaded_server --self-test CERT KEY CA   check the spreading and the shared limit through
//                                             real TLS clients, stop, and exit 0 if all worked
//
// Output: "listening tls-echo ADDRESS", "threads N", then "ready"; at the end "served THREAD
// COUNT" for each thread.

#include <algorithm>
#include <arpa/inet.h>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <netinet/in.h>
#include <poll.h>
#include <span>
#include <string>
#include <sys/socket.h>
#include <thread>
#include <unistd.h>
#include <vector>

#include <uv.h>

#include <sluice/server.hpp>

#include "echo_handler.hpp"
#include "tls_client.hpp"

namespace {

using namespace std::chrono_literals;

/** One thread: its loop, its Server, and how it is told to stop. */
class Worker {
public:
    Worker(sluice::Config config, sluice::HandshakeLimits limits)
        : thread_([this, config = std::move(config), limits]() mutable {
            run(std::move(config), std::move(limits));
        }) {
        std::unique_lock lock(mutex_);
        started_.wait(lock, [this] { return state_ != State::starting; });
    }
    Worker(const Worker &) = delete;
    Worker &operator=(const Worker &) = delete;
    ~Worker() { finish(); }

    /** The listening address, or empty if start() failed (error() says why). */
    const std::string &address() const { return address_; }
    const std::string &error() const { return error_; }
    std::uint64_t served() const { return served_.load(); }
    /** The thread's Server's counters, read from the calling thread while the Server runs on
     * its own (stats() allows any thread). */
    sluice::ServerStats stats() const { return server_->stats(); }

    /** Starts the Server's drain; returns at once. */
    void drain() {
        if (state_ == State::running && !drainRequested_) {
            drainRequested_ = true;
            uv_async_send(&drain_);
        }
    }

    /** Drains the Server if nothing asked yet, and waits for the thread: true when its loop
     * closed with nothing left open and no connection was cut by the drain's deadline. */
    bool finish() {
        drain();
        if (thread_.joinable()) {
            thread_.join();
        }
        return clean_;
    }

private:
    enum class State { starting, running, failed };

    void run(sluice::Config config, sluice::HandshakeLimits limits) {
        uv_loop_t loop{};
        uv_loop_init(&loop);
        {
            sluice::Server server(&loop, std::move(config), std::move(limits));
            server.setHandler("echo", [this](const sluice::StreamInfo &) {
                served_.fetch_add(1);
                return std::make_unique<example::EchoHandler>();
            });
            State state = State::running;
            std::string address;
            try {
                server.start();
                address = server.addresses().at(0).second;
            } catch (const sluice::Error &e) {
                error_ = e.what();
                state = State::failed;
            }
            if (state == State::running) {
                drain_.data = this;
                uv_async_init(&loop, &drain_, [](uv_async_t *async) {
                    auto *self = static_cast<Worker *>(async->data);
                    self->server_->drain([self](bool cut) { self->forced_ = cut; });
                    uv_close(reinterpret_cast<uv_handle_t *>(async), nullptr);
                });
                server_ = &server;
            }
            {
                const std::lock_guard lock(mutex_);
                address_ = address;
                state_ = state;
            }
            started_.notify_all();
            uv_run(&loop, UV_RUN_DEFAULT);
        }
        clean_ = uv_loop_close(&loop) == 0 && !forced_;
    }

    std::mutex mutex_;
    std::condition_variable started_;
    State state_ = State::starting;
    std::string address_;
    std::string error_;
    std::atomic<std::uint64_t> served_{0};
    sluice::Server *server_ = nullptr;
    uv_async_t drain_{};
    bool drainRequested_ = false;
    bool forced_ = false;
    bool clean_ = false;
    std::thread thread_;
};

sluice::Config configFor(const std::string &listen, const std::string &cert,
                         const std::string &key) {
    sluice::Config config;
    config.global.logLevel = sluice::LogLevel::warn;
    config.global.drainTimeout = std::chrono::seconds(5);
    config.global.maxHandshakesPerIp = 4; // for the whole program: the Workers share the count
    sluice::ListenerConfig listener;
    listener.name = "tls-echo";
    listener.listen.push_back(sluice::parseAddress(listen));
    sluice::CertificateFiles files;
    files.cert = cert;
    files.key = key;
    listener.certificates.push_back(files);
    sluice::BackendConfig inProcess;
    inProcess.name = "in-process";
    inProcess.handler = "echo"; // registered by each Worker with Server::setHandler
    listener.backend = inProcess.name;
    config.backends.push_back(inProcess);
    config.listeners.push_back(listener);
    return config;
}

/** A TCP connection that says nothing: a handshake that stays in progress. -1 on failure. */
int connectSilent(const std::string &address) {
    const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in to{};
    to.sin_family = AF_INET;
    to.sin_port =
        htons(static_cast<std::uint16_t>(std::stoi(address.substr(address.rfind(':') + 1))));
    to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd < 0 || ::connect(fd, reinterpret_cast<sockaddr *>(&to), sizeof to) != 0) {
        if (fd >= 0) {
            ::close(fd);
        }
        return -1;
    }
    return fd;
}

/** How many of `fds` the server has closed (readable: an EOF or a reset). */
std::size_t closedOf(const std::vector<int> &fds) {
    std::size_t closed = 0;
    for (const int fd : fds) {
        pollfd p{fd, POLLIN, 0};
        closed += ::poll(&p, 1, 0) == 1 ? 1 : 0;
    }
    return closed;
}

/** Connections spread over every thread; the handshake limit counts them all together. */
bool selfTest(const std::vector<std::unique_ptr<Worker>> &workers,
              const sluice::HandshakeLimits &limits, const std::string &address,
              const std::string &ca) {
    bool ok = true;
    auto fail = [&ok](const char *what) {
        std::fprintf(stderr, "threaded_server: %s\n", what);
        ok = false;
    };
    for (int i = 0; i < 40 && ok; ++i) {
        example::TlsClient client(address, ca);
        const std::string message = "connection " + std::to_string(i) + " through sluice\n";
        if (!client.ok() || !client.echo(message) || !client.closeCleanly()) {
            fail("a TLS echo failed");
        }
    }
    // Each Server counts its own: a thread's completed handshakes are the connections its
    // handler served, and the threads' add up to the program's.
    std::uint64_t handshakes = 0;
    for (const auto &worker : workers) {
        if (worker->served() == 0) {
            fail("a thread served no connection: SO_REUSEPORT did not spread them");
        }
        const std::uint64_t own = worker->stats().handshakesOk;
        if (own != worker->served()) {
            fail("a thread's stats() counted handshakes that other threads served");
        }
        handshakes += own;
    }
    if (handshakes != 40) {
        fail("the threads' stats() do not add up to the 40 handshakes");
    }
    // Twelve silent connections from 127.0.0.1, spread over the threads as above: with the count
    // shared, 4 stay (global.max_handshakes_per_ip) and 8 are closed at accept. With a count per
    // thread, each thread would keep 4.
    std::vector<int> silent;
    for (int i = 0; i < 12; ++i) {
        const int fd = connectSilent(address);
        if (fd < 0) {
            fail("a silent connection was refused by the kernel");
            break;
        }
        silent.push_back(fd);
    }
    const auto deadline = std::chrono::steady_clock::now() + 5s;
    while (closedOf(silent) < 8 && std::chrono::steady_clock::now() < deadline) {
        std::this_thread::sleep_for(10ms);
    }
    std::this_thread::sleep_for(300ms); // and no more than 8
    const std::size_t closed = closedOf(silent);
    std::printf("silent connections: %zu held, %zu closed at accept\n", silent.size() - closed,
                closed);
    if (closed != 8 || limits.addressesInProgress() != 1) {
        fail("the shared handshake limit did not hold 4 of the 12 silent connections");
    }
    std::uint64_t refused = 0;
    for (const auto &worker : workers) {
        refused += worker->stats().handshakeLimited;
    }
    if (refused != 8) {
        fail("the threads' stats() do not count the 8 connections closed at accept");
    }
    for (const int fd : silent) {
        ::close(fd);
    }
    const auto ended = std::chrono::steady_clock::now() + 5s;
    while (limits.addressesInProgress() != 0 && std::chrono::steady_clock::now() < ended) {
        std::this_thread::sleep_for(10ms);
    }
    if (limits.addressesInProgress() != 0) {
        fail("handshakes stayed counted after their clients left");
    }
    return ok;
}

} // namespace

int main(int argc, char **argv) {
    std::vector<std::string> args(argv + 1, argv + argc);
    const bool testing = !args.empty() && args[0] == "--self-test";
    unsigned threads = std::max(2u, std::thread::hardware_concurrency());
    if (testing) {
        args.erase(args.begin());
    } else if (args.size() >= 2 && args[0] == "--threads") {
        threads = static_cast<unsigned>(std::max(1, std::atoi(args[1].c_str())));
        args.erase(args.begin(), args.begin() + 2);
    }
    if (args.size() != (testing ? 3u : 2u)) {
        std::fprintf(stderr,
                     "usage: %s [--threads N] CERT KEY\n       %s --self-test CERT KEY CA\n",
                     argv[0], argv[0]);
        return 2;
    }
    // The signals are waited for on this thread; the Workers inherit the mask and never see them.
    std::signal(SIGPIPE, SIG_IGN);
    sigset_t stopSignals;
    sigemptyset(&stopSignals);
    sigaddset(&stopSignals, SIGINT);
    sigaddset(&stopSignals, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &stopSignals, nullptr);

    // The first Worker takes a port from the kernel; the others listen on the same one.
    const sluice::HandshakeLimits limits;
    std::vector<std::unique_ptr<Worker>> workers;
    std::string address = "127.0.0.1:0";
    for (unsigned i = 0; i < threads; ++i) {
        workers.push_back(std::make_unique<Worker>(configFor(address, args[0], args[1]), limits));
        if (workers.back()->address().empty()) {
            std::fprintf(stderr, "threaded_server: %s\n", workers.back()->error().c_str());
            return 1;
        }
        address = workers.back()->address();
    }
    std::printf("listening tls-echo %s\nthreads %u\nready\n", address.c_str(), threads);
    std::fflush(stdout);

    bool ok = true;
    if (testing) {
        ok = selfTest(workers, limits, address, args[2]);
    } else {
        int signal = 0;
        sigwait(&stopSignals, &signal);
    }
    // Every thread drains at once: their listeners close together, and each lets its own
    // connections finish.
    for (const auto &worker : workers) {
        worker->drain();
    }
    for (std::size_t i = 0; i < workers.size(); ++i) {
        if (!workers[i]->finish()) {
            std::fprintf(stderr, "threaded_server: thread %zu did not close cleanly\n", i);
            ok = false;
        }
        std::printf("served %zu %llu\n", i, static_cast<unsigned long long>(workers[i]->served()));
    }
    if (testing) {
        std::printf("self-test %s\n", ok ? "ok" : "FAILED");
    }
    return ok ? 0 : 1;
}
