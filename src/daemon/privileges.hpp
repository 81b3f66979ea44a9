// daemon/privileges: dropping root after binding and loading keys. The main thread keeps two
// capabilities, CAP_NET_BIND_SERVICE (a reload may bind a new port below 1024) and
// CAP_DAC_READ_SEARCH (a reload re-reads root-only keys and certificates); worker threads keep
// none. Everything else, setuid back to root included, is gone.
#pragma once

#include <string>

namespace sluice::daemon {

/**
 * Switches the process to `user` (and `group`, else the user's primary group), keeping the two
 * capabilities above on the calling thread. Does nothing when `user` is empty. A process that
 * already runs as them (an upgrade started by one that dropped root, with the two capabilities
 * passed on) only narrows its capabilities to the two. Throws std::runtime_error naming what
 * failed; checks that setuid(0) no longer works.
 */
void dropPrivileges(const std::string &user, const std::string &group);

/**
 * With `pass`, makes the calling thread's two capabilities ambient, so that a program it starts
 * (the upgrade's new process, which runs as the same user) has them from the start; without,
 * takes them back to this thread alone. False when the kernel refused.
 */
bool passCapabilitiesOn(bool pass);

/** Clears every capability of the calling thread (a worker serves without any). */
void dropThreadCapabilities();

} // namespace sluice::daemon
