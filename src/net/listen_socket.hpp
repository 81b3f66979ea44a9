// net/listen_socket: listening TCP sockets made by sluice itself, so that several workers can
// share a port through SO_REUSEPORT (libuv 1.44 has no flag for it) and a reload can keep the
// sockets it already has.
#pragma once

#include <string>

#include "net/address.hpp"

namespace sluice::net {

/**
 * Creates a non-blocking, close-on-exec TCP socket, binds it to `address` with SO_REUSEADDR and
 * SO_REUSEPORT (IPv6 sockets take IPv6 only) and listens. Returns the descriptor; throws
 * std::runtime_error naming `text` on failure (nothing is left open).
 */
int openListenSocket(const SocketAddress &address, const std::string &text, int backlog);

/** The port a bound socket got from the kernel (for "port 0" addresses). */
int boundPort(int fd);

/** `address` with its port replaced. */
SocketAddress withPort(const SocketAddress &address, int port);

} // namespace sluice::net
