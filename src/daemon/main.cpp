// The sluice daemon: command line, configuration, signals, and the loop that runs the server.
// Everything else lives in libsluice.

#include <csignal>
#include <cstdio>
#include <cstring>
#include <exception>
#include <memory>
#include <optional>
#include <string>
#include <sys/resource.h>
#include <unistd.h>

#include <uv.h>

#include <sluice/config.hpp>

#include "proxy/server.hpp"
#include "tls/context.hpp"
#include "util/log.hpp"

#ifndef SLUICE_VERSION
#define SLUICE_VERSION "unknown"
#endif

namespace {

constexpr int exitOk = 0;
constexpr int exitForced = 1; // the drain deadline cut connections, or a runtime failure
constexpr int exitConfig = 2; // bad command line or configuration

const char *usage = R"(usage: sluice --config FILE [--check] [--ready-fd N]
       sluice --version | --help

Terminates TLS and forwards plaintext to a TCP or UNIX-socket backend.

  -c, --config FILE   the configuration (TOML); relative paths in it are taken from its folder
      --check         validate the configuration, load every certificate and key, and exit
      --ready-fd N    once every listener is bound, write "listen NAME ADDRESS" lines and
                      "ready" to file descriptor N, then close it
  -V, --version       print the version of sluice and of OpenSSL
  -h, --help          print this help

Signals: TERM or INT drain (stop accepting, let connections finish up to
global.drain_timeout; a second signal stops at once). Exit status: 0 after a clean drain,
1 if the drain deadline closed connections or a runtime error occurred, 2 for a bad
command line or configuration.
)";

struct Options {
    std::string config;
    bool check = false;
    int readyFd = -1;
};

std::optional<Options> parseArguments(int argc, char **argv, int &exitCode) {
    Options options;
    for (int i = 1; i < argc; ++i) {
        const std::string arg = argv[i];
        auto value = [&](const char *name) -> const char * {
            if (i + 1 >= argc) {
                std::fprintf(stderr, "sluice: %s needs a value\n%s", name, usage);
                return nullptr;
            }
            return argv[++i];
        };
        if (arg == "-h" || arg == "--help") {
            std::fputs(usage, stdout);
            exitCode = exitOk;
            return std::nullopt;
        }
        if (arg == "-V" || arg == "--version") {
            std::printf("sluice %s (%s, libuv %s)\n", SLUICE_VERSION,
                        sluice::tls::openSslVersion().c_str(), uv_version_string());
            exitCode = exitOk;
            return std::nullopt;
        }
        if (arg == "-c" || arg == "--config") {
            const char *v = value("--config");
            if (v == nullptr) {
                exitCode = exitConfig;
                return std::nullopt;
            }
            options.config = v;
        } else if (arg.starts_with("--config=")) {
            options.config = arg.substr(std::strlen("--config="));
        } else if (arg == "--check") {
            options.check = true;
        } else if (arg == "--ready-fd") {
            const char *v = value("--ready-fd");
            char *end = nullptr;
            const long fd = v != nullptr ? std::strtol(v, &end, 10) : -1;
            if (v == nullptr || *end != '\0' || fd < 0 || fd > 65535) {
                std::fprintf(stderr, "sluice: --ready-fd needs a file descriptor number\n");
                exitCode = exitConfig;
                return std::nullopt;
            }
            options.readyFd = static_cast<int>(fd);
        } else {
            std::fprintf(stderr, "sluice: unknown argument '%s'\n%s", arg.c_str(), usage);
            exitCode = exitConfig;
            return std::nullopt;
        }
    }
    if (options.config.empty()) {
        std::fprintf(stderr, "sluice: --config FILE is required\n%s", usage);
        exitCode = exitConfig;
        return std::nullopt;
    }
    return options;
}

/** Raises the soft descriptor limit to the hard one: every connection needs two. */
void raiseDescriptorLimit() {
    rlimit limit{};
    if (getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur < limit.rlim_max) {
        limit.rlim_cur = limit.rlim_max;
        setrlimit(RLIMIT_NOFILE, &limit);
    }
}

void writeAll(int fd, const std::string &text) {
    std::size_t done = 0;
    while (done < text.size()) {
        const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
        if (n <= 0) {
            return; // the reader went away; readiness is best effort
        }
        done += static_cast<std::size_t>(n);
    }
}

/** The running daemon: the loop's handles and what ends it. */
class Daemon {
public:
    Daemon(uv_loop_t *loop, std::unique_ptr<sluice::proxy::Server> server)
        : loop_(loop)
        , server_(std::move(server)) {
        for (auto *handle : {&term_, &interrupt_}) {
            uv_signal_init(loop_, handle);
            handle->data = this;
        }
        uv_signal_start(&term_, onSignal, SIGTERM);
        uv_signal_start(&interrupt_, onSignal, SIGINT);
    }

    int exitCode() const { return exitCode_; }

private:
    static void onSignal(uv_signal_t *handle, int signum) {
        auto *self = static_cast<Daemon *>(handle->data);
        if (self->signalled_) {
            sluice::log::warn(std::string("stop signal=") + strsignal(signum));
            self->server_->stop(nullptr);
            return;
        }
        self->signalled_ = true;
        sluice::log::info(std::string("drain signal=") + strsignal(signum));
        self->server_->drain([self](bool forced) {
            self->exitCode_ = forced ? exitForced : exitOk;
            uv_close(reinterpret_cast<uv_handle_t *>(&self->term_), nullptr);
            uv_close(reinterpret_cast<uv_handle_t *>(&self->interrupt_), nullptr);
        });
    }

    uv_loop_t *loop_;
    std::unique_ptr<sluice::proxy::Server> server_;
    uv_signal_t term_{};
    uv_signal_t interrupt_{};
    bool signalled_ = false;
    int exitCode_ = exitOk;
};

int run(const Options &options) {
    sluice::Config config;
    try {
        config = sluice::loadConfig(options.config);
    } catch (const std::exception &e) {
        std::fprintf(stderr, "sluice: %s\n", e.what());
        return exitConfig;
    }
    sluice::log::setLevel(config.global.logLevel);

    uv_loop_t loop;
    uv_loop_init(&loop);
    std::unique_ptr<sluice::proxy::Server> server;
    try {
        server = std::make_unique<sluice::proxy::Server>(&loop, config);
    } catch (const std::exception &e) {
        std::fprintf(stderr, "sluice: %s: %s\n", options.config.c_str(), e.what());
        uv_loop_close(&loop);
        return exitConfig;
    }
    if (options.check) {
        std::printf("sluice: %s: configuration ok (%zu listener%s)\n", options.config.c_str(),
                    config.listeners.size(), config.listeners.size() == 1 ? "" : "s");
        server.reset();
        uv_loop_close(&loop);
        return exitOk;
    }

    raiseDescriptorLimit();
    try {
        server->start();
    } catch (const std::exception &e) {
        std::fprintf(stderr, "sluice: %s\n", e.what());
        // Close what was bound so the loop can be closed cleanly.
        server->stop(nullptr);
        uv_run(&loop, UV_RUN_DEFAULT);
        server.reset();
        uv_loop_close(&loop);
        return exitConfig;
    }
    if (options.readyFd >= 0) {
        std::string ready;
        for (const auto &[name, address] : server->boundAddresses()) {
            ready += "listen " + name + " " + address + "\n";
        }
        ready += "ready\n";
        writeAll(options.readyFd, ready);
        ::close(options.readyFd);
    }
    sluice::log::info(std::string("ready version=") + SLUICE_VERSION +
                      " listeners=" + std::to_string(server->boundAddresses().size()));

    int code = exitOk;
    {
        Daemon daemon(&loop, std::move(server));
        uv_run(&loop, UV_RUN_DEFAULT);
        code = daemon.exitCode();
    }
    if (uv_loop_close(&loop) != 0) {
        sluice::log::error("exit reason=\"handles left open\"");
        return exitForced;
    }
    sluice::log::info("exit code=" + std::to_string(code));
    return code;
}

} // namespace

int main(int argc, char **argv) {
    // A peer that closes while we write must not kill the process; writes report EPIPE.
    std::signal(SIGPIPE, SIG_IGN);
    int exitCode = exitOk;
    auto options = parseArguments(argc, argv, exitCode);
    if (!options) {
        return exitCode;
    }
    return run(*options);
}
