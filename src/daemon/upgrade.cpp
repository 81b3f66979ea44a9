#include "daemon/upgrade.hpp"

#include <cerrno>
#include <climits>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <stdexcept>
#include <string_view>
#include <unistd.h>

#include "net/listen_socket.hpp"
#include "util/log.hpp"

extern char **environ; // NOLINT: POSIX declares it nowhere else

namespace sluice::daemon {
namespace {

constexpr int firstHandedFd = 3;
constexpr const char *pidVariable = "SLUICE_UPGRADE_PID";
constexpr const char *socketsVariable = "SLUICE_UPGRADE_SOCKETS";
constexpr const char *activatedVariable = "SLUICE_UPGRADE_ACTIVATED";
constexpr const char *activatedNamesVariable = "SLUICE_UPGRADE_ACTIVATED_NAMES";

std::string variable(const char *name) {
    const char *text = std::getenv(name);
    return text != nullptr ? text : "";
}

std::string currentFolder() {
    char buffer[PATH_MAX];
    return ::getcwd(buffer, sizeof buffer) != nullptr ? std::string(buffer) : std::string();
}

std::string absolute(const std::string &path) {
    if (path.empty() || path.front() == '/') {
        return path;
    }
    const std::string cwd = currentFolder();
    return cwd.empty() ? std::string() : cwd + "/" + path;
}

} // namespace

HandedOver HandedOver::fromEnvironment() {
    const std::string pid = variable(pidVariable);
    const std::string keys = variable(socketsVariable);
    const std::string activatedCount = variable(activatedVariable);
    const std::string activatedNames = variable(activatedNamesVariable);
    // Unset first, so that nothing this process starts later inherits them by mistake.
    for (const char *name :
         {pidVariable, socketsVariable, activatedVariable, activatedNamesVariable}) {
        ::unsetenv(name);
    }
    HandedOver out;
    if (pid.empty() && keys.empty() && activatedCount.empty()) {
        return out;
    }
    if (pid != std::to_string(::getppid())) {
        log::info("upgrade-sockets-ignored reason=\"SLUICE_UPGRADE_PID is not this process's "
                  "parent\"");
        return out;
    }
    out.fromParent_ = true;
    int fd = firstHandedFd;
    std::size_t start = 0;
    while (start < keys.size()) {
        std::size_t end = keys.find('\n', start);
        if (end == std::string::npos) {
            end = keys.size();
        }
        const std::string key = keys.substr(start, end - start);
        start = end + 1;
        if (::fcntl(fd, F_SETFD, FD_CLOEXEC) != 0 || !net::isListeningTcp(fd)) {
            throw std::runtime_error("upgrade: descriptor " + std::to_string(fd) + " (" + key +
                                     ") is not a listening TCP socket");
        }
        out.byKey_[key].push_back(fd);
        ++fd;
    }
    const int keyed = fd - firstHandedFd;
    if (!activatedCount.empty()) {
        out.activated_ = adoptActivated(fd, activatedCount, splitNames(activatedNames.c_str()),
                                        activatedVariable, " from_pid=" + pid);
    }
    log::info("upgrade-sockets count=" + std::to_string(keyed) +
              " activated=" + std::to_string(out.activated_.size()) + " from_pid=" + pid);
    return out;
}

int HandedOver::take(const std::string &key) {
    auto found = byKey_.find(key);
    if (found == byKey_.end() || found->second.empty()) {
        return -1;
    }
    const int fd = found->second.front();
    found->second.erase(found->second.begin());
    return fd;
}

void HandedOver::closeUnused() {
    for (auto &[key, fds] : byKey_) {
        for (const int fd : fds) {
            log::info("upgrade-socket-closed key=" + log::quoted(key) + " address=" +
                      net::localText(fd) + " reason=\"this configuration does not use it\"");
            ::close(fd);
        }
        fds.clear();
    }
}

Upgrade::Upgrade(Ready ready, Failed failed)
    : ready_(std::move(ready))
    , failed_(std::move(failed)) {}

Upgrade::~Upgrade() = default;

std::unique_ptr<Upgrade> Upgrade::start(uv_loop_t *loop, const std::string &program,
                                        const std::vector<std::string> &args,
                                        const std::vector<HandOver> &handedOver,
                                        const std::vector<ActivatedSocket> &activated,
                                        std::uint64_t timeoutMs, Ready ready, Failed failed,
                                        std::string &error) {
    std::unique_ptr<Upgrade> upgrade(new Upgrade(std::move(ready), std::move(failed)));
    uv_file pipeFds[2] = {-1, -1};
    if (const int err = uv_pipe(pipeFds, 0, 0); err != 0) {
        error = std::string("pipe: ") + uv_strerror(err);
        return nullptr;
    }
    // The new process's descriptors: 0-2 as ours, then the keyed sockets, the activated ones
    // and the ready pipe.
    std::vector<int> fds{0, 1, 2};
    std::string keys;
    for (const auto &socket : handedOver) {
        fds.push_back(socket.fd);
        keys += (keys.empty() ? "" : "\n") + socket.key;
    }
    std::string names; // as $LISTEN_FDNAMES: a name may be empty, so joined by position
    for (std::size_t i = 0; i < activated.size(); ++i) {
        fds.push_back(activated[i].fd);
        names += (i == 0 ? "" : ":") + activated[i].name;
    }
    fds.push_back(pipeFds[1]);
    std::vector<uv_stdio_container_t> stdio(fds.size());
    for (std::size_t i = 0; i < stdio.size(); ++i) {
        stdio[i].flags = UV_INHERIT_FD;
        stdio[i].data.fd = fds[i];
    }
    const std::string readyFd = std::to_string(stdio.size() - 1);
    std::vector<std::string> argStrings{program};
    argStrings.insert(argStrings.end(), args.begin(), args.end());
    argStrings.insert(argStrings.end(), {"--ready-fd", readyFd});
    // WATCHDOG_PID names this process: without it the new one pings systemd's watchdog itself
    // (once it is the main process; daemon/main.cpp tells systemd).
    std::vector<std::string> envStrings;
    for (char **entry = environ; entry != nullptr && *entry != nullptr; ++entry) {
        const std::string_view text(*entry);
        const bool ours = text.starts_with("SLUICE_UPGRADE_");
        if (!ours && !text.starts_with("WATCHDOG_PID=")) {
            envStrings.emplace_back(text);
        }
    }
    envStrings.push_back(std::string(pidVariable) + "=" + std::to_string(::getpid()));
    envStrings.push_back(std::string(socketsVariable) + "=" + keys);
    if (!activated.empty()) {
        envStrings.push_back(std::string(activatedVariable) + "=" +
                             std::to_string(activated.size()));
        envStrings.push_back(std::string(activatedNamesVariable) + "=" + names);
    }
    auto pointers = [](std::vector<std::string> &strings) {
        std::vector<char *> out;
        for (auto &s : strings) {
            out.push_back(s.data());
        }
        out.push_back(nullptr);
        return out;
    };
    std::vector<char *> argv = pointers(argStrings);
    std::vector<char *> envp = pointers(envStrings);

    uv_process_options_t options{};
    options.exit_cb = onExit;
    options.file = program.c_str();
    options.args = argv.data();
    options.env = envp.data();
    options.stdio_count = static_cast<int>(stdio.size());
    options.stdio = stdio.data();
    upgrade->process_ = new uv_process_t{};
    upgrade->process_->data = upgrade.get();
    const int spawned = uv_spawn(loop, upgrade->process_, &options);
    ::close(pipeFds[1]); // the new process has its own copy
    if (spawned != 0) {
        error = std::string("cannot start ") + program + ": " + uv_strerror(spawned);
        ::close(pipeFds[0]);
        // The handle was initialized all the same and must be closed; nothing else is open.
        uv_close(reinterpret_cast<uv_handle_t *>(upgrade->process_),
                 [](uv_handle_t *handle) { delete reinterpret_cast<uv_process_t *>(handle); });
        upgrade->process_ = nullptr;
        return nullptr;
    }
    upgrade->open_ = 1;
    upgrade->pid_ = upgrade->process_->pid;
    upgrade->pipe_ = new uv_pipe_t{};
    uv_pipe_init(loop, upgrade->pipe_, 0);
    upgrade->pipe_->data = upgrade.get();
    ++upgrade->open_;
    if (uv_pipe_open(upgrade->pipe_, pipeFds[0]) != 0 ||
        uv_read_start(reinterpret_cast<uv_stream_t *>(upgrade->pipe_), onAlloc, onRead) != 0) {
        ::close(pipeFds[0]); // the timeout below decides then
    }
    upgrade->timer_ = new uv_timer_t{};
    uv_timer_init(loop, upgrade->timer_);
    upgrade->timer_->data = upgrade.get();
    ++upgrade->open_;
    uv_timer_start(upgrade->timer_, onTimeout, timeoutMs, 0);
    return upgrade;
}

void Upgrade::onAlloc(uv_handle_t *handle, std::size_t, uv_buf_t *buf) {
    auto *self = static_cast<Upgrade *>(handle->data);
    *buf = uv_buf_init(self->buffer_, sizeof self->buffer_);
}

void Upgrade::onRead(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf) {
    auto *self = static_cast<Upgrade *>(stream->data);
    if (nread > 0 && !self->decided_) {
        self->received_.append(buf->base, static_cast<std::size_t>(nread));
        // "listen NAME ADDRESS" lines, then "ready" (daemon/main.cpp writes them).
        if (self->received_.starts_with("ready\n") ||
            self->received_.find("\nready\n") != std::string::npos) {
            self->decided_ = true;
            self->closeHandle(self->pipe_);
            self->closeHandle(self->timer_);
            self->ready_(self->pid_);
        }
        return;
    }
    if (nread < 0) {
        // Closed without "ready": the exit (or the deadline) says why.
        self->closeHandle(self->pipe_);
    }
}

void Upgrade::onExit(uv_process_t *process, std::int64_t status, int signal) {
    auto *self = static_cast<Upgrade *>(process->data);
    const std::string how = signal != 0 ? std::string("was killed by signal ") + strsignal(signal)
                                        : "exited with code " + std::to_string(status);
    self->closeHandle(self->process_); // reaped: nothing more to watch
    if (!self->decided_) {
        self->fail("the new process " + how + " before it was ready");
    } else {
        log::warn("upgrade-process-exited pid=" + std::to_string(self->pid_) + " reason=\"it " +
                  how + "\"");
    }
}

void Upgrade::onTimeout(uv_timer_t *timer) {
    auto *self = static_cast<Upgrade *>(timer->data);
    if (self->decided_) {
        return;
    }
    // The process handle stays open until it exits, so that it is reaped, not left a zombie.
    uv_process_kill(self->process_, SIGTERM);
    self->fail("the new process was not ready in time; sent it SIGTERM");
}

void Upgrade::fail(const std::string &reason) {
    decided_ = true;
    closeHandle(pipe_);
    closeHandle(timer_);
    failed_(reason);
}

template <typename Handle>
void Upgrade::closeHandle(Handle *&handle) {
    if (handle == nullptr) {
        return;
    }
    auto *closing = reinterpret_cast<uv_handle_t *>(handle);
    handle = nullptr;
    uv_close(closing, [](uv_handle_t *closed) {
        auto *self = static_cast<Upgrade *>(closed->data);
        delete reinterpret_cast<Handle *>(closed);
        self->closed();
    });
}

void Upgrade::close(std::function<void()> done) {
    if (closeRequested_) {
        return;
    }
    closeRequested_ = true;
    done_ = std::move(done);
    closeHandle(process_);
    closeHandle(pipe_);
    closeHandle(timer_);
    if (open_ == 0 && done_) {
        done_();
    }
}

void Upgrade::closed() {
    if (--open_ == 0 && closeRequested_ && done_) {
        done_();
    }
}

std::vector<std::string> upgradeArguments(int argc, char **argv,
                                          const std::string &absoluteConfig) {
    std::vector<std::string> out;
    for (int i = 1; i < argc; ++i) {
        const std::string_view arg = argv[i];
        if (arg == "--ready-fd") {
            ++i; // the new process reports on a pipe of the old one's
        } else if (arg == "-c" || arg == "--config") {
            out.emplace_back(arg);
            out.push_back(absoluteConfig);
            ++i;
        } else if (arg.starts_with("--config=")) {
            out.push_back("--config=" + absoluteConfig);
        } else {
            out.emplace_back(arg);
        }
    }
    return out;
}

std::string programPath(const char *argv0) {
    const std::string name = argv0 != nullptr ? argv0 : "";
    if (name.empty()) {
        return {};
    }
    // Not resolved through symbolic links: a link that now points at a newer binary is how an
    // upgrade is often installed.
    if (name.find('/') != std::string::npos) {
        return absolute(name);
    }
    const char *path = std::getenv("PATH");
    const std::string folders = path != nullptr ? path : "";
    std::size_t start = 0;
    while (start <= folders.size()) {
        std::size_t end = folders.find(':', start);
        if (end == std::string::npos) {
            end = folders.size();
        }
        const std::string folder = folders.substr(start, end - start);
        const std::string candidate = (folder.empty() ? "." : folder) + "/" + name;
        if (::access(candidate.c_str(), X_OK) == 0) {
            return absolute(candidate);
        }
        start = end + 1;
    }
    return {};
}

std::string absoluteConfigPath(const std::string &path) {
    return absolute(path);
}

} // namespace sluice::daemon
