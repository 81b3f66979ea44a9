#include "net/listen_socket.hpp"

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdexcept>
#include <sys/socket.h>
#include <unistd.h>

#include <uv.h>

namespace sluice::net {

std::string errorName(int error) {
    std::array<char, 64> name{};
    uv_err_name_r(-error, name.data(), name.size());
    return name.data();
}

int openListenSocket(const SocketAddress &address, const std::string &text, int backlog,
                     bool sharePort) {
    if (address.kind != Address::Kind::tcp) {
        throw std::runtime_error("listen " + text + ": only TCP addresses can be listened on");
    }
    const int family = address.storage.ss_family;
    const int fd = ::socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        throw std::runtime_error("listen " + text + ": socket: " + std::strerror(errno));
    }
    auto failWith = [&](const char *what) {
        const int err = errno;
        ::close(fd);
        throw std::runtime_error("listen " + text + ": " + what + ": " + std::strerror(err));
    };
    const int on = 1;
    if (::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on) != 0 ||
        (sharePort && ::setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &on, sizeof on) != 0)) {
        failWith("setsockopt");
    }
    if (family == AF_INET6 && ::setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &on, sizeof on) != 0) {
        failWith("setsockopt IPV6_V6ONLY");
    }
    const socklen_t length =
        family == AF_INET6 ? sizeof(sockaddr_in6) : static_cast<socklen_t>(sizeof(sockaddr_in));
    if (::bind(fd, address.raw(), length) != 0) {
        failWith("bind");
    }
    if (::listen(fd, backlog) != 0) {
        failWith("listen");
    }
    return fd;
}

void setSocketOptions(int fd, const SocketOptions &options, bool fresh) {
    auto set = [fd](int level, int name, int value) {
        ::setsockopt(fd, level, name, &value, sizeof value);
    };
    if (options.noDelay || !fresh) {
        set(IPPROTO_TCP, TCP_NODELAY, options.noDelay ? 1 : 0);
    }
    const auto idle = std::chrono::duration_cast<std::chrono::seconds>(options.keepAlive).count();
    if (idle > 0) {
        set(SOL_SOCKET, SO_KEEPALIVE, 1);
        set(IPPROTO_TCP, TCP_KEEPIDLE, static_cast<int>(std::min<std::int64_t>(idle, 32767)));
        set(IPPROTO_TCP, TCP_KEEPINTVL, 1);
        set(IPPROTO_TCP, TCP_KEEPCNT, 10);
    } else if (!fresh) {
        set(SOL_SOCKET, SO_KEEPALIVE, 0);
    }
    if (options.sendBuffer > 0) {
        set(SOL_SOCKET, SO_SNDBUF,
            static_cast<int>(std::min<std::size_t>(options.sendBuffer, 1U << 30)));
    }
    if (options.receiveBuffer > 0) {
        set(SOL_SOCKET, SO_RCVBUF,
            static_cast<int>(std::min<std::size_t>(options.receiveBuffer, 1U << 30)));
    }
}

bool isListeningTcp(int fd) {
    int type = 0;
    int listening = 0;
    socklen_t length = sizeof type;
    if (::getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &length) != 0 || type != SOCK_STREAM) {
        return false;
    }
    length = sizeof listening;
    if (::getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &length) != 0 || !listening) {
        return false;
    }
    sockaddr_storage storage{};
    length = sizeof storage;
    if (::getsockname(fd, reinterpret_cast<sockaddr *>(&storage), &length) != 0) {
        return false;
    }
    return storage.ss_family == AF_INET || storage.ss_family == AF_INET6;
}

int boundPort(int fd) {
    sockaddr_storage storage{};
    socklen_t length = sizeof storage;
    if (::getsockname(fd, reinterpret_cast<sockaddr *>(&storage), &length) != 0) {
        return 0;
    }
    if (storage.ss_family == AF_INET6) {
        return ntohs(reinterpret_cast<const sockaddr_in6 *>(&storage)->sin6_port);
    }
    return ntohs(reinterpret_cast<const sockaddr_in *>(&storage)->sin_port);
}

SocketAddress withPort(const SocketAddress &address, int port) {
    SocketAddress out = address;
    if (out.storage.ss_family == AF_INET6) {
        reinterpret_cast<sockaddr_in6 *>(&out.storage)->sin6_port =
            htons(static_cast<uint16_t>(port));
    } else {
        reinterpret_cast<sockaddr_in *>(&out.storage)->sin_port =
            htons(static_cast<uint16_t>(port));
    }
    return out;
}

} // namespace sluice::net
