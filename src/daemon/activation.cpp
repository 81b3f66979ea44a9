#include "daemon/activation.hpp"

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdexcept>
#include <sys/socket.h>
#include <unistd.h>

#include "net/listen_socket.hpp"
#include "util/log.hpp"

namespace sluice::daemon {
namespace {

constexpr int firstListenFd = 3; // SD_LISTEN_FDS_START

long parseNumber(const char *text, const char *what) {
    char *end = nullptr;
    errno = 0;
    const long value = std::strtol(text, &end, 10);
    if (*text == '\0' || *end != '\0' || errno != 0 || value < 0) {
        throw std::runtime_error(std::string("socket activation: ") + what + "=\"" + text +
                                 "\" is not a number");
    }
    return value;
}

} // namespace

std::vector<std::string> splitNames(const char *text) {
    std::vector<std::string> names;
    if (text == nullptr) {
        return names;
    }
    std::string current;
    for (const char *p = text;; ++p) {
        if (*p == ':' || *p == '\0') {
            names.push_back(current);
            current.clear();
            if (*p == '\0') {
                break;
            }
        } else {
            current += *p;
        }
    }
    return names;
}

std::vector<ActivatedSocket> takeActivatedSockets() {
    const char *pidText = std::getenv("LISTEN_PID");
    const char *countText = std::getenv("LISTEN_FDS");
    const std::string pid = pidText != nullptr ? pidText : "";
    const std::string count = countText != nullptr ? countText : "";
    const std::vector<std::string> names = splitNames(std::getenv("LISTEN_FDNAMES"));
    // Unset first, so that nothing this process starts later inherits them by mistake.
    ::unsetenv("LISTEN_PID");
    ::unsetenv("LISTEN_FDS");
    ::unsetenv("LISTEN_FDNAMES");
    if (count.empty()) {
        return {};
    }
    if (pid.empty() || parseNumber(pid.c_str(), "LISTEN_PID") != static_cast<long>(::getpid())) {
        log::info("socket-activation-ignored reason=\"LISTEN_PID is not this process\"");
        return {};
    }
    return adoptActivated(firstListenFd, count, names, "LISTEN_FDS", "");
}

std::vector<ActivatedSocket> adoptActivated(int firstFd, const std::string &count,
                                            const std::vector<std::string> &names,
                                            const char *variable, const std::string &note) {
    const long n = parseNumber(count.c_str(), variable);
    if (n > 65536) {
        throw std::runtime_error(std::string("socket activation: ") + variable + "=" + count +
                                 " is too large");
    }
    std::vector<ActivatedSocket> out;
    for (long i = 0; i < n; ++i) {
        ActivatedSocket socket;
        socket.fd = firstFd + static_cast<int>(i);
        if (::fcntl(socket.fd, F_SETFD, FD_CLOEXEC) != 0) {
            throw std::runtime_error("socket activation: descriptor " + std::to_string(socket.fd) +
                                     ": " + std::strerror(errno));
        }
        if (static_cast<std::size_t>(i) < names.size()) {
            socket.name = names[static_cast<std::size_t>(i)];
        }
        socket.usable = net::isListeningTcp(socket.fd);
        socket.localText = net::localText(socket.fd);
        log::info("socket-activated fd=" + std::to_string(socket.fd) +
                  " name=" + log::quoted(socket.name) + " address=" + socket.localText +
                  (socket.usable ? "" : " usable=no") + note);
        out.push_back(std::move(socket));
    }
    return out;
}

void reportUnused(const std::vector<ActivatedSocket> &activated, const std::vector<int> &used) {
    for (const auto &socket : activated) {
        if (std::find(used.begin(), used.end(), socket.fd) == used.end()) {
            log::warn("socket-activated-unused fd=" + std::to_string(socket.fd) +
                      " name=" + log::quoted(socket.name) + " address=" + socket.localText +
                      " reason=\"no listener has this name or address; it stays open, unused\"");
        }
    }
}

} // namespace sluice::daemon
