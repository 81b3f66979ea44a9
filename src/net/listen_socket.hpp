// net/listen_socket: listening TCP sockets made by sluice itself, so that several workers can
// share a port through SO_REUSEPORT (libuv 1.44 has no flag for it) and a reload can keep the
// sockets it already has.
#pragma once

#include <string>

#include "net/address.hpp"
#include "sluice/config.hpp"

namespace sluice::net {

/**
 * Creates a non-blocking, close-on-exec TCP socket, binds it to `address` with SO_REUSEADDR and
 * SO_REUSEPORT (IPv6 sockets take IPv6 only) and listens. Returns the descriptor; throws
 * std::runtime_error naming `text` on failure (nothing is left open). `sharePort` false leaves
 * out SO_REUSEPORT, so that an address another socket listens on is an error.
 */
int openListenSocket(const SocketAddress &address, const std::string &text, int backlog,
                     bool sharePort = true);

/**
 * Sets TCP_NODELAY, keepalive (SO_KEEPALIVE; TCP_KEEPIDLE from `options`, probes every second,
 * ten of them) and the buffer sizes on a TCP socket, best effort (the kernel clamps sizes).
 * `fresh`: the socket is new, so options that are off by default are not set again. A socket
 * accepted from a listening socket inherits all of these from it, which is how sluice applies a
 * listener's options: once, on the listening socket, instead of on every accepted one (and
 * SO_RCVBUF set before the handshake also sizes the window scale the client is offered).
 * A size once set cannot be taken back to the kernel's automatic sizing.
 */
void setSocketOptions(int fd, const SocketOptions &options, bool fresh);

/** The symbolic name of an errno value, as logs show it: "EMFILE". */
std::string errorName(int error);

/** `fd` is a listening TCP socket (IPv4 or IPv6), as a handed-over descriptor must be. */
bool isListeningTcp(int fd);

/** The port a bound socket got from the kernel (for "port 0" addresses). */
int boundPort(int fd);

/** `address` with its port replaced. */
SocketAddress withPort(const SocketAddress &address, int port);

} // namespace sluice::net
