#include "net/listen_socket.hpp"

#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdexcept>
#include <sys/socket.h>
#include <unistd.h>

namespace sluice::net {

int openListenSocket(const SocketAddress &address, const std::string &text, int backlog) {
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
        ::setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &on, sizeof on) != 0) {
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
