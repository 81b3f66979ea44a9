// daemon/activation: listening sockets handed over by systemd socket activation ($LISTEN_FDS,
// $LISTEN_PID, $LISTEN_FDNAMES), and how they are matched to the configured listeners.
//
// Ownership: the daemon keeps every activated descriptor open for its whole life (systemd keeps
// its own copy too) and gives each worker a dup() of it. The dups share one socket and so one
// accept queue: with several workers the kernel wakes whichever worker is waiting, and there is
// no SO_REUSEPORT spreading for activated sockets. Nothing here ever unlinks a path or closes a
// socket that systemd passed, so a reload that removes a listener and a later one that adds it
// back find the same socket.
#pragma once

#include <string>
#include <vector>

#include "proxy/generation.hpp"

namespace sluice::daemon {

/** One descriptor passed by systemd; proxy::planSockets() matches them to the listeners. */
using ActivatedSocket = proxy::InheritedSocket;

/**
 * Takes the sockets systemd passed to this process: when $LISTEN_PID is this process and
 * $LISTEN_FDS is N > 0, descriptors 3 .. 3+N-1, marked close-on-exec. Unsets LISTEN_PID,
 * LISTEN_FDS and LISTEN_FDNAMES either way (call before any thread starts: unsetenv is not
 * thread-safe). Returns nothing when the variables are absent or are not for this process.
 * Throws std::runtime_error when they are malformed.
 */
std::vector<ActivatedSocket> takeActivatedSockets();

/**
 * Takes `count` (the text of `variable`, a number) descriptors from `firstFd` on as activated
 * sockets named by `names` in order, marked close-on-exec and logged, each line ending in
 * `note`. Throws std::runtime_error when the count is malformed or a descriptor is not open.
 */
std::vector<ActivatedSocket> adoptActivated(int firstFd, const std::string &count,
                                            const std::vector<std::string> &names,
                                            const char *variable, const std::string &note);

/** The names of a ':'-separated list ($LISTEN_FDNAMES); none when `text` is null. */
std::vector<std::string> splitNames(const char *text);

/** Logs the activated sockets that no listener takes (they stay open, unused). */
void reportUnused(const std::vector<ActivatedSocket> &activated, const std::vector<int> &used);

} // namespace sluice::daemon
