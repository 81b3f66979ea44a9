// net/address: config addresses turned into socket addresses, and socket addresses into text.
#pragma once

#include <string>
#include <sys/socket.h>

#include <sluice/config.hpp>

namespace sluice::net {

/** A resolved endpoint: an IP socket address, or a UNIX socket path. */
struct SocketAddress {
    Address::Kind kind = Address::Kind::tcp;
    sockaddr_storage storage{};
    std::string path; ///< UNIX sockets only

    const sockaddr *raw() const { return reinterpret_cast<const sockaddr *>(&storage); }
};

/**
 * Resolves `address`: IP literals directly, host names through getaddrinfo (blocking: call it
 * on the control path only). Throws std::runtime_error naming the address.
 */
SocketAddress resolve(const Address &address);

/** "1.2.3.4:5" or "[::1]:5"; "?" for an address family it does not know. */
std::string format(const sockaddr *address);

/** The text of a stream's peer or local address, or "?" when the socket has none. */
std::string peerText(int fd);
std::string localText(int fd);

} // namespace sluice::net
