// The sluice daemon: command line, configuration, signals, and the loop that runs the server.
// Everything else lives in libsluice.

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <future>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <sys/resource.h>
#include <thread>
#include <unistd.h>
#include <vector>

#include <uv.h>

#include <sluice/config.hpp>

#include "daemon/activation.hpp"
#include "daemon/file_watch.hpp"
#include "daemon/privileges.hpp"
#include "daemon/upgrade.hpp"
#include "daemon/worker.hpp"
#include "ops/access_log.hpp"
#include "ops/admin.hpp"
#include "ops/systemd.hpp"
#include "proxy/generation.hpp"
#include "proxy/resolver.hpp"
#include "proxy/server.hpp"
#include "proxy/stats.hpp"
#include "tls/context.hpp"
#include "tls/kdf.hpp"
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
global.drain_timeout; a second signal stops at once). HUP reloads the configuration:
everything is built first and swapped in only if all of it is valid (with
global.reload_on_change, a changed file reloads it too). USR1 reopens the logs. USR2
upgrades: starts the program again from the same path with the same arguments, hands
it every listening socket, and drains once the new process is ready (if it fails, this
one goes on serving).

Exit status: 0 after a clean drain, 1 if the drain deadline closed connections or a
runtime error occurred, 2 for a bad command line or configuration.
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
        const rlim_t before = limit.rlim_cur;
        limit.rlim_cur = limit.rlim_max;
        if (setrlimit(RLIMIT_NOFILE, &limit) == 0) {
            sluice::log::info("fd-limit-raised from=" + std::to_string(before) +
                              " to=" + std::to_string(limit.rlim_cur));
        }
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

unsigned workerCount(const sluice::Config &config) {
    if (config.global.workers != 0) {
        return config.global.workers;
    }
    const unsigned cpus = std::thread::hardware_concurrency();
    return cpus == 0 ? 1 : cpus;
}

/** The running daemon: the main loop's handles, the workers, reload and drain. */
class Daemon {
public:
    Daemon(uv_loop_t *loop, std::string configPath, sluice::Config config,
           sluice::proxy::ListenState listening,
           std::shared_ptr<const sluice::proxy::Runtime> runtime,
           std::vector<std::unique_ptr<sluice::daemon::Worker>> workers,
           std::shared_ptr<sluice::ops::AccessLog> accessLog)
        : loop_(loop)
        , configPath_(std::move(configPath))
        , config_(std::move(config))
        , runtime_(std::move(runtime))
        , listening_(std::move(listening))
        , workers_(std::move(workers))
        , accessLog_(std::move(accessLog))
        , watchdog_(loop)
        , resolver_(loop)
        , fileWatch_(loop,
                     [this](const std::vector<std::string> &changed) { filesChanged(changed); }) {
        resolver_.watch(runtime_);
        for (auto *handle : {&term_, &interrupt_, &hangup_, &user1_, &user2_}) {
            uv_signal_init(loop_, handle);
            handle->data = this;
        }
        uv_signal_start(&term_, onStop, SIGTERM);
        uv_signal_start(&interrupt_, onStop, SIGINT);
        uv_signal_start(&hangup_, onReload, SIGHUP);
        uv_signal_start(&user1_, onReopen, SIGUSR1);
        uv_signal_start(&user2_, onUpgrade, SIGUSR2);
        uv_async_init(loop_, &exited_, onWorkerExited);
        exited_.data = this;
        uv_timer_init(loop_, &drainDelay_);
        drainDelay_.data = this;
    }

    /** The sockets systemd passed; kept open for the daemon's life and matched on reload. */
    void keepActivated(std::vector<sluice::daemon::ActivatedSocket> activated) {
        activated_ = std::move(activated);
    }

    /** What SIGUSR2 starts: this program's path and its arguments (without --ready-fd). */
    void upgradeCommand(std::string program, std::vector<std::string> args) {
        program_ = std::move(program);
        programArgs_ = std::move(args);
    }

    /** The listening sockets sluice bound (not systemd's), by key, for an upgrade to hand on. */
    void recordSockets(const std::vector<std::vector<sluice::proxy::ListenSocket>> &byWorker) {
        for (const auto &sockets : byWorker) {
            for (const auto &socket : sockets) {
                if (socket.key.find(" systemd:") == std::string::npos) {
                    socketFds_[socket.key].push_back(socket.fd);
                }
            }
        }
    }

    /** Starts global.reload_on_change; `readAt`: the files' stamps before they were read. */
    void watchFiles(const sluice::daemon::FileWatch::Stamps &readAt) {
        fileWatch_.watch(sluice::daemon::watchedFiles(config_), config_.global.reloadOnChange,
                         readAt);
    }

    /** Called from a worker thread when its loop has ended. */
    void workerExited() { uv_async_send(&exited_); }

    /** The bound addresses announced at startup. */
    std::vector<std::pair<std::string, std::string>> bound() const { return listening_.bound(); }

    /** Opens the admin listener on the main loop (throws on a bind error), or takes over the
     * socket a previous process handed over. */
    void startAdmin(sluice::daemon::HandedOver &handedOver) {
        if (!config_.admin.enabled) {
            return;
        }
        sluice::ops::StatusSource source;
        // Both run on the main loop, where runtime_ and listening_ change (reload): no locking.
        source.listeners = [this] {
            return sluice::ops::listenersOf(*runtime_, listening_.bound());
        };
        source.certificates = [this] { return sluice::ops::certificatesOf(*runtime_); };
        source.backends = [this] { return sluice::ops::backendsOf(*runtime_); };
        admin_ = std::make_unique<sluice::ops::Admin>(loop_, config_.admin, std::move(source));
        admin_->start(handedOver.take(adminKey()));
    }

    /** Starts the workers. `upgraded`: started by SIGUSR2, whose sender tells systemd (the
     * main PID is still the sender's until then, and systemd takes word from it only). */
    void start(bool upgraded) {
        for (auto &worker : workers_) {
            worker->start();
        }
        watchdog_.start();
        if (!upgraded) {
            sluice::ops::systemd::notifyReady("serving");
        }
    }

    /** Closes the main loop's handles after a failed start. */
    void abandon() {
        closeAdmin();
        watchdog_.close();
        closeSignals();
    }

    int exitCode() const { return exitCode_; }

private:
    static void onStop(uv_signal_t *handle, int signum) {
        auto *self = static_cast<Daemon *>(handle->data);
        if (self->stopping_) {
            sluice::log::warn(std::string("stop signal=") + strsignal(signum));
            for (auto &worker : self->workers_) {
                worker->stop();
            }
            return;
        }
        self->stopping_ = true;
        self->fileWatch_.stop();
        sluice::log::info(std::string("drain signal=") + strsignal(signum));
        sluice::ops::systemd::notifyStopping("draining");
        if (self->admin_) {
            self->admin_->setDraining(true); // /ready answers 503 from now on
        }
        if (self->upgrade_) {
            // A new process that is not ready yet goes on by itself: it has every socket.
            self->upgrade_->close(nullptr);
        }
        const auto delay = static_cast<std::uint64_t>(self->config_.global.drainDelay.count());
        if (delay == 0) {
            self->drainWorkers();
            return;
        }
        // Still accepting: a balancer that checks /ready stops sending before the door closes.
        sluice::log::info("drain-delay ms=" + std::to_string(delay));
        uv_timer_start(&self->drainDelay_, onDrainDelay, delay, 0);
    }

    static void onDrainDelay(uv_timer_t *timer) {
        static_cast<Daemon *>(timer->data)->drainWorkers();
    }

    void drainWorkers() {
        uv_timer_stop(&drainDelay_);
        for (auto &worker : workers_) {
            worker->drain();
        }
    }

    std::string adminKey() const { return "admin " + config_.admin.listen.text(); }

    void closeAdmin() {
        if (admin_ && !adminClosed_) {
            adminClosed_ = true;
            admin_->close(nullptr);
        }
    }

    static void onUpgrade(uv_signal_t *handle, int) {
        static_cast<Daemon *>(handle->data)->upgrade();
    }

    /** SIGUSR2: starts the new process with every listening socket; see daemon/upgrade. */
    void upgrade() {
        auto refuse = [](const std::string &reason) {
            sluice::log::warn("upgrade-refused reason=" + sluice::log::quoted(reason));
        };
        if (stopping_) {
            return refuse("draining");
        }
        if (upgrade_) {
            return refuse("an upgrade is in progress (pid " + std::to_string(upgrade_->pid()) +
                          ")");
        }
        if (program_.empty()) {
            return refuse("the path this program was started from is unknown");
        }
        std::vector<sluice::daemon::HandOver> sockets;
        for (const auto &[key, fds] : socketFds_) {
            for (const int fd : fds) {
                sockets.push_back({key, fd});
            }
        }
        if (admin_ && admin_->listenFd() >= 0) {
            sockets.push_back({adminKey(), admin_->listenFd()});
        }
        sluice::log::info("upgrade-start program=" + program_ +
                          " sockets=" + std::to_string(sockets.size()) +
                          " activated=" + std::to_string(activated_.size()));
        // Having dropped root (global.user), this thread passes its two capabilities on, so
        // that the new process, which starts as the same user, can read root-only keys too.
        const bool passing = !config_.global.user.empty();
        if (passing && !sluice::daemon::passCapabilitiesOn(true)) {
            sluice::log::warn("upgrade-capabilities reason=\"the kernel refused to pass them on; "
                              "the new process starts without them\"");
        }
        std::string error;
        upgrade_ = sluice::daemon::Upgrade::start(
            loop_, program_, programArgs_, sockets, activated_,
            static_cast<std::uint64_t>(config_.global.upgradeTimeout.count()),
            [this](int pid) { upgradeReady(pid); },
            [this](const std::string &reason) { upgradeFailed(reason); }, error);
        if (passing) {
            sluice::daemon::passCapabilitiesOn(false);
        }
        if (!upgrade_) {
            upgradeFailed(error);
        }
    }

    void upgradeReady(int pid) {
        // The new process serves every socket now; this one lets go of its copies and drains.
        sluice::log::info("upgrade-ready pid=" + std::to_string(pid));
        // Under systemd the new process becomes the service's main process; this one sends
        // nothing more (no STOPPING=1, no watchdog pings), which systemd would refuse now.
        sluice::ops::systemd::notify("MAINPID=" + std::to_string(pid) +
                                     "\nREADY=1\nSTATUS=upgraded: pid " + std::to_string(pid) +
                                     " serves\n");
        watchdog_.close();
        stopping_ = true;
        fileWatch_.stop();
        closeAdmin(); // the new process answers on the same socket
        drainWorkers();
    }

    void upgradeFailed(const std::string &reason) {
        sluice::log::error("upgrade-failed reason=" + sluice::log::quoted(reason) +
                           " action=\"this process goes on serving\"");
        if (upgrade_) {
            // A process still running (sent SIGTERM) is watched until it exits, and reaped.
            retired_.push_back(std::move(upgrade_));
        }
    }

    static void onReload(uv_signal_t *handle, int) {
        auto *self = static_cast<Daemon *>(handle->data);
        if (self->stopping_) {
            return;
        }
        self->reload();
    }

    static void onReopen(uv_signal_t *handle, int) {
        auto *self = static_cast<Daemon *>(handle->data);
        sluice::log::info("reopen-logs");
        std::string error;
        if (self->accessLog_ && !self->accessLog_->reopen(&error)) {
            sluice::log::error("reopen-failed reason=" + sluice::log::quoted(error));
        }
    }

    void filesChanged(const std::vector<std::string> &changed) {
        if (stopping_) {
            return;
        }
        std::string list;
        for (const auto &path : changed) {
            list += (list.empty() ? "" : ",") + path;
        }
        sluice::log::info("files-changed files=" + sluice::log::quoted(list));
        reload();
    }

    /** A reload on SIGHUP or a change on disk; then watches the files it read, as they were
     * when it read them (so a broken file is not tried again until it changes). */
    void reload() {
        const auto readAt = fileWatch_.now();
        auto files = loadAndSwitch();
        fileWatch_.watch(std::move(files), config_.global.reloadOnChange, readAt);
    }

    /**
     * Builds the whole new configuration first (config, TLS contexts, backends, new sockets);
     * only if all of it succeeds do the workers switch. Live connections keep the settings
     * they started with; sockets whose listener and address are unchanged stay open. Returns
     * the files to watch from now on (global.reload_on_change).
     */
    std::vector<std::string> loadAndSwitch() {
        sluice::log::info("reload-start config=" + configPath_);
        sluice::ops::systemd::notifyReloading();
        sluice::Config config;
        sluice::proxy::Generation next;
        std::shared_ptr<sluice::ops::AccessLog> accessLog;
        const unsigned workers = static_cast<unsigned>(workers_.size());
        try {
            config = sluice::loadConfig(configPath_);
            if (workerCount(config) != workers) {
                sluice::log::warn(
                    "reload-workers-unchanged configured=" + std::to_string(workerCount(config)) +
                    " running=" + std::to_string(workers) +
                    " reason=\"the worker count changes on restart only\"");
            }
            accessLog = sluice::ops::AccessLog::open(config.log);
            next = sluice::proxy::buildGeneration(config, workers, listening_, activated_);
        } catch (const std::exception &e) {
            reloadFailed(e.what());
            // The running configuration's files, and those of the new file if it parsed: a
            // certificate it names that is missing now is tried again once it appears.
            auto files = sluice::daemon::watchedFiles(config_);
            if (!config.path.empty()) {
                const auto named = sluice::daemon::watchedFiles(config);
                files.insert(files.end(), named.begin(), named.end());
            }
            return files;
        }
        for (const auto &key : next.removed) {
            socketFds_.erase(key);
        }
        recordSockets(next.added);
        for (const auto &socket : next.added.front()) {
            sluice::log::info("listening listener=" + socket.name +
                              " address=" + sluice::net::localText(socket.fd) +
                              " workers=" + std::to_string(workers));
        }
        // reload-done (and systemd's READY) promise that the next connection meets the new
        // configuration, so they wait until every worker has switched. A command a drained
        // worker drops breaks its promise, which ends the wait for it as well.
        std::vector<std::future<void>> switched;
        for (unsigned w = 0; w < workers; ++w) {
            auto done = std::make_shared<std::promise<void>>();
            std::future<void> switchedHere = done->get_future();
            if (workers_[w]->post(
                    [runtime = next.runtime, socketsForWorker = std::move(next.added[w]),
                     removed = next.removed, done](sluice::daemon::Worker &worker) mutable {
                        worker.server().update(runtime, std::move(socketsForWorker), removed);
                        done->set_value();
                    })) {
                switched.push_back(std::move(switchedHere));
            }
        }
        const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
        if (!std::all_of(switched.begin(), switched.end(), [&](const std::future<void> &f) {
                return f.wait_until(deadline) == std::future_status::ready;
            })) {
            sluice::log::warn("reload-slow detail=\"a worker has not switched to the new "
                              "configuration after 10 s; it will when its loop turns\"");
        }
        const sluice::AdminConfig admin = config_.admin;
        config_ = std::move(config);
        config_.admin = admin; // the admin listener keeps its socket until a restart
        runtime_ = std::move(next.runtime);
        resolver_.watch(runtime_);
        listening_ = std::move(next.state);
        accessLog_ = std::move(accessLog);
        sluice::ops::AccessLog::install(accessLog_);
        sluice::log::setLevel(config_.global.logLevel);
        sluice::proxy::stats().recordReload(true, "listeners=" +
                                                      std::to_string(config_.listeners.size()));
        sluice::ops::systemd::notifyReady("serving");
        sluice::log::info("reload-done listeners=" + std::to_string(config_.listeners.size()) +
                          " sockets_added=" + std::to_string(next.addedCount) +
                          " sockets_removed=" + std::to_string(next.removed.size()) +
                          " tls_kdf=" + sluice::tls::kdfName(config_.global.builtinKdf));
        return sluice::daemon::watchedFiles(config_);
    }

    void reloadFailed(const std::string &reason) {
        sluice::proxy::stats().recordReload(false, reason);
        sluice::ops::systemd::notifyReady("reload failed; serving the previous configuration");
        sluice::log::error("reload-failed reason=" + sluice::log::quoted(reason) +
                           " action=\"kept the running configuration\"");
    }

    static void onWorkerExited(uv_async_t *handle) {
        auto *self = static_cast<Daemon *>(handle->data);
        // uv_async_send coalesces: count the workers whose threads have finished.
        std::size_t running = 0;
        for (auto &worker : self->workers_) {
            running += worker->exitedFlag() ? 0 : 1;
        }
        if (running > 0 || self->closing_) {
            return;
        }
        self->closing_ = true;
        for (auto &worker : self->workers_) {
            worker->join();
            if (worker->forced()) {
                self->exitCode_ = exitForced;
            }
        }
        self->closeAdmin();
        if (self->upgrade_) {
            self->upgrade_->close(nullptr);
        }
        for (auto &retired : self->retired_) {
            retired->close(nullptr);
        }
        self->watchdog_.close();
        self->closeSignals();
    }

    void closeSignals() {
        for (auto *signal : {&term_, &interrupt_, &hangup_, &user1_, &user2_}) {
            uv_close(reinterpret_cast<uv_handle_t *>(signal), nullptr);
        }
        uv_close(reinterpret_cast<uv_handle_t *>(&exited_), nullptr);
        uv_close(reinterpret_cast<uv_handle_t *>(&drainDelay_), nullptr);
        resolver_.close();
        fileWatch_.close();
    }

    uv_loop_t *loop_;
    std::string configPath_;
    sluice::Config config_;
    std::shared_ptr<const sluice::proxy::Runtime> runtime_;
    sluice::proxy::ListenState listening_; // the sockets open now: what the admin reports
    std::vector<std::unique_ptr<sluice::daemon::Worker>> workers_;
    std::shared_ptr<sluice::ops::AccessLog> accessLog_;
    std::unique_ptr<sluice::ops::Admin> admin_;
    sluice::ops::systemd::Watchdog watchdog_;
    sluice::proxy::Resolver resolver_;
    sluice::daemon::FileWatch fileWatch_;
    std::vector<sluice::daemon::ActivatedSocket> activated_;
    std::map<std::string, std::vector<int>> socketFds_; // by key: each worker's socket
    std::string program_;
    std::vector<std::string> programArgs_;
    std::unique_ptr<sluice::daemon::Upgrade> upgrade_;
    std::vector<std::unique_ptr<sluice::daemon::Upgrade>> retired_; // failed ones
    uv_signal_t term_{};
    uv_signal_t interrupt_{};
    uv_signal_t hangup_{};
    uv_signal_t user1_{};
    uv_signal_t user2_{};
    uv_async_t exited_{};
    uv_timer_t drainDelay_{};
    bool stopping_ = false;
    bool closing_ = false;
    bool adminClosed_ = false;
    int exitCode_ = exitOk;
};

int run(const Options &options, const std::string &program,
        const std::vector<std::string> &programArgs) {
    sluice::Config config;
    try {
        config = sluice::loadConfig(options.config);
    } catch (const std::exception &e) {
        std::fprintf(stderr, "sluice: %s\n", e.what());
        return exitConfig;
    }
    sluice::log::setLevel(config.global.logLevel);
    // Stamped before the certificates and keys are read, so that a file that changes while they
    // are read still differs from its stamp afterwards.
    const auto readAt =
        config.global.reloadOnChange == sluice::Duration::zero()
            ? sluice::daemon::FileWatch::Stamps{}
            : sluice::daemon::FileWatch::stamp(sluice::daemon::watchedFiles(config));
    // Once, before any thread: mallopt() is not safe while other threads allocate.
    sluice::proxy::applyMemoryPolicy(config.global.releaseMemoryAfter);
    const unsigned workers = workerCount(config);

    // Taken before any thread starts (building TLS contexts may start some): taking them unsets
    // the LISTEN_* variables, and unsetenv() is not thread-safe. --check leaves them alone.
    std::vector<sluice::daemon::ActivatedSocket> activated;
    sluice::daemon::HandedOver handedOver;
    std::shared_ptr<const sluice::proxy::Runtime> runtime;
    std::vector<sluice::proxy::PlannedSocket> plan;
    try {
        if (!options.check) {
            activated = sluice::daemon::takeActivatedSockets();
            handedOver = sluice::daemon::HandedOver::fromEnvironment();
            if (activated.empty()) {
                // Started by an upgrade of a socket-activated process: systemd's sockets came
                // from it, and are matched to the listeners as if systemd had passed them.
                activated = handedOver.takeActivated();
            }
        }
        runtime = sluice::proxy::buildRuntime(config, workers);
        plan = sluice::proxy::planSockets(config, activated);
        if (!activated.empty()) {
            std::vector<int> used;
            for (const auto &planned : plan) {
                used.push_back(planned.inheritedFd);
            }
            sluice::daemon::reportUnused(activated, used);
        }
    } catch (const std::exception &e) {
        std::fprintf(stderr, "sluice: %s: %s\n", options.config.c_str(), e.what());
        return exitConfig;
    }
    if (options.check) {
        std::printf("sluice: %s: configuration ok (%zu listener%s)\n", options.config.c_str(),
                    config.listeners.size(), config.listeners.size() == 1 ? "" : "s");
        return exitOk;
    }

    std::shared_ptr<sluice::ops::AccessLog> accessLog;
    try {
        accessLog = sluice::ops::AccessLog::open(config.log);
    } catch (const std::exception &e) {
        std::fprintf(stderr, "sluice: %s: %s\n", options.config.c_str(), e.what());
        return exitConfig;
    }
    sluice::ops::AccessLog::install(accessLog);

    raiseDescriptorLimit();
    uv_loop_t loop;
    uv_loop_init(&loop);
    std::unique_ptr<Daemon> daemon;
    // Workers report their exit from their own threads through this pointer; it outlives them
    // (the daemon joins every worker before run() returns).
    Daemon *owner = nullptr;
    const std::string kdf = sluice::tls::kdfName(config.global.builtinKdf); // config moves below
    try {
        auto sockets = sluice::proxy::openSockets(
            plan, workers, [&handedOver](const std::string &key) { return handedOver.take(key); });
        sluice::proxy::ListenState listening = sluice::proxy::listenStateOf(sockets.front());
        std::vector<std::vector<sluice::proxy::ListenSocket>> opened = sockets; // keys and fds
        std::vector<std::unique_ptr<sluice::daemon::Worker>> pool;
        // The per-address handshake limits count every worker's handshakes together.
        auto limits = std::make_shared<sluice::proxy::ClientLimits>();
        for (unsigned w = 0; w < workers; ++w) {
            pool.push_back(std::make_unique<sluice::daemon::Worker>(
                w, runtime, limits, std::move(sockets[w]), [&owner] { owner->workerExited(); }));
        }
        // Keys and certificates are loaded and every socket is bound: root is no longer needed.
        sluice::daemon::dropPrivileges(config.global.user, config.global.group);
        daemon =
            std::make_unique<Daemon>(&loop, options.config, std::move(config), std::move(listening),
                                     runtime, std::move(pool), accessLog);
        owner = daemon.get();
        daemon->keepActivated(std::move(activated));
        daemon->recordSockets(opened);
        daemon->upgradeCommand(program, programArgs);
        daemon->startAdmin(handedOver);
        handedOver.closeUnused();
    } catch (const std::exception &e) {
        std::fprintf(stderr, "sluice: %s\n", e.what());
        if (daemon) {
            daemon->abandon();
            uv_run(&loop, UV_RUN_DEFAULT);
        }
        daemon.reset(); // workers that never ran close their own loops
        uv_loop_close(&loop);
        return exitConfig;
    }
    // Workers run before anyone is told the daemon is ready.
    daemon->start(handedOver.fromParent());
    daemon->watchFiles(readAt);
    if (options.readyFd >= 0) {
        std::string ready;
        for (const auto &[name, address] : daemon->bound()) {
            ready += "listen " + name + " " + address + "\n";
        }
        ready += "ready\n";
        writeAll(options.readyFd, ready);
        ::close(options.readyFd);
    }
    for (const auto &[name, address] : daemon->bound()) {
        sluice::log::info("listening listener=" + name + " address=" + address +
                          " workers=" + std::to_string(workers));
    }
    // Who derives the TLS keys: sluice's provider, or OpenSSL (tls_kdf = "openssl", FIPS mode).
    sluice::log::info(std::string("ready version=") + SLUICE_VERSION +
                      " workers=" + std::to_string(workers) + " tls_kdf=" + kdf);
    uv_run(&loop, UV_RUN_DEFAULT);
    const int code = daemon->exitCode();
    daemon.reset();
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
    // Both taken now, before anything could change the working folder.
    const std::string config = sluice::daemon::absoluteConfigPath(options->config);
    return run(*options, sluice::daemon::programPath(argv[0]),
               sluice::daemon::upgradeArguments(argc, argv, config));
}
