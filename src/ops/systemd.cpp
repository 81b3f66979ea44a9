#include "ops/systemd.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

namespace sluice::ops::systemd {
namespace {

std::string oneLine(std::string_view text) {
    std::string out(text);
    for (char &c : out) {
        if (c == '\n' || c == '\r') {
            c = ' ';
        }
    }
    return out;
}

std::string withStatus(std::string message, std::string_view status) {
    if (!status.empty()) {
        message += "STATUS=" + oneLine(status) + "\n";
    }
    return message;
}

std::uint64_t parseUnsigned(const char *text) {
    if (text == nullptr || *text == '\0') {
        return 0;
    }
    char *end = nullptr;
    const unsigned long long value = std::strtoull(text, &end, 10);
    return *end == '\0' ? value : 0;
}

} // namespace

bool notify(std::string_view state) {
    const char *name = std::getenv("NOTIFY_SOCKET");
    if (name == nullptr || (name[0] != '/' && name[0] != '@') || name[1] == '\0') {
        return false;
    }
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    const std::size_t length = std::strlen(name);
    if (length >= sizeof address.sun_path) {
        return false;
    }
    std::memcpy(address.sun_path, name, length);
    if (name[0] == '@') {
        address.sun_path[0] = '\0'; // an abstract socket: the name is not NUL-terminated
    }
    const auto addressLength =
        static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + length + (name[0] == '/' ? 1 : 0));
    const int fd = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        return false;
    }
    const ssize_t sent = ::sendto(fd, state.data(), state.size(), MSG_NOSIGNAL,
                                  reinterpret_cast<const sockaddr *>(&address), addressLength);
    ::close(fd);
    return sent == static_cast<ssize_t>(state.size());
}

bool notifyReady(std::string_view status) {
    return notify(withStatus("READY=1\n", status));
}

std::string reloadingMessage(std::uint64_t monotonicMicros, std::string_view status) {
    return withStatus("RELOADING=1\nMONOTONIC_USEC=" + std::to_string(monotonicMicros) + "\n",
                      status);
}

bool notifyReloading(std::string_view status) {
    timespec now{};
    clock_gettime(CLOCK_MONOTONIC, &now);
    const std::uint64_t micros = static_cast<std::uint64_t>(now.tv_sec) * 1000000u +
                                 static_cast<std::uint64_t>(now.tv_nsec) / 1000u;
    return notify(reloadingMessage(micros, status));
}

bool notifyStopping(std::string_view status) {
    return notify(withStatus("STOPPING=1\n", status));
}

bool notifyStatus(std::string_view text) {
    return notify("STATUS=" + oneLine(text) + "\n");
}

std::uint64_t watchdogMicros() {
    const std::uint64_t micros = parseUnsigned(std::getenv("WATCHDOG_USEC"));
    if (micros == 0) {
        return 0;
    }
    const char *pid = std::getenv("WATCHDOG_PID");
    if (pid != nullptr && *pid != '\0' &&
        parseUnsigned(pid) != static_cast<std::uint64_t>(getpid())) {
        return 0;
    }
    return micros;
}

Watchdog::Watchdog(uv_loop_t *loop)
    : loop_(loop) {}

Watchdog::~Watchdog() {
    close();
}

bool Watchdog::start() {
    if (timer_ != nullptr) {
        return true;
    }
    intervalMicros_ = watchdogMicros();
    if (intervalMicros_ == 0) {
        return false;
    }
    timer_ = new uv_timer_t;
    uv_timer_init(loop_, timer_);
    // Half the interval, as systemd recommends; at least 1 ms.
    const std::uint64_t periodMillis = std::max<std::uint64_t>(1, intervalMicros_ / 2000);
    uv_timer_start(
        timer_, [](uv_timer_t *) { notify("WATCHDOG=1\n"); }, periodMillis, periodMillis);
    uv_unref(reinterpret_cast<uv_handle_t *>(timer_));
    notify("WATCHDOG=1\n");
    return true;
}

void Watchdog::close() {
    if (timer_ == nullptr) {
        return;
    }
    uv_close(reinterpret_cast<uv_handle_t *>(timer_),
             [](uv_handle_t *handle) { delete reinterpret_cast<uv_timer_t *>(handle); });
    timer_ = nullptr;
}

} // namespace sluice::ops::systemd
