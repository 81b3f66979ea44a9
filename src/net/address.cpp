#include "net/address.hpp"

#include <cstring>
#include <netdb.h>
#include <stdexcept>

#include <uv.h>

namespace sluice::net {

SocketAddress resolve(const Address &address) {
    SocketAddress out;
    out.kind = address.kind;
    if (address.kind == Address::Kind::unix) {
        out.path = address.path;
        return out;
    }
    auto *v4 = reinterpret_cast<sockaddr_in *>(&out.storage);
    auto *v6 = reinterpret_cast<sockaddr_in6 *>(&out.storage);
    if (uv_ip4_addr(address.host.c_str(), address.port, v4) == 0 ||
        uv_ip6_addr(address.host.c_str(), address.port, v6) == 0) {
        return out;
    }
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo *found = nullptr;
    const int err = getaddrinfo(address.host.c_str(), nullptr, &hints, &found);
    if (err != 0 || found == nullptr) {
        throw std::runtime_error(address.text() + ": cannot resolve: " + gai_strerror(err));
    }
    std::memcpy(&out.storage, found->ai_addr, found->ai_addrlen);
    freeaddrinfo(found);
    if (out.storage.ss_family == AF_INET) {
        v4->sin_port = htons(address.port);
    } else {
        v6->sin6_port = htons(address.port);
    }
    return out;
}

std::string format(const sockaddr *address) {
    char host[INET6_ADDRSTRLEN] = "?";
    if (address->sa_family == AF_INET) {
        const auto *v4 = reinterpret_cast<const sockaddr_in *>(address);
        uv_ip4_name(v4, host, sizeof host);
        return std::string(host) + ":" + std::to_string(ntohs(v4->sin_port));
    }
    if (address->sa_family == AF_INET6) {
        const auto *v6 = reinterpret_cast<const sockaddr_in6 *>(address);
        uv_ip6_name(v6, host, sizeof host);
        return "[" + std::string(host) + "]:" + std::to_string(ntohs(v6->sin6_port));
    }
    if (address->sa_family == AF_UNIX) {
        return "unix";
    }
    return "?";
}

std::string peerText(int fd) {
    sockaddr_storage storage{};
    socklen_t length = sizeof storage;
    if (getpeername(fd, reinterpret_cast<sockaddr *>(&storage), &length) != 0) {
        return "?";
    }
    return format(reinterpret_cast<const sockaddr *>(&storage));
}

std::string localText(int fd) {
    sockaddr_storage storage{};
    socklen_t length = sizeof storage;
    if (getsockname(fd, reinterpret_cast<sockaddr *>(&storage), &length) != 0) {
        return "?";
    }
    return format(reinterpret_cast<const sockaddr *>(&storage));
}

} // namespace sluice::net
