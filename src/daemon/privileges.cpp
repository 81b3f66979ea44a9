#include "daemon/privileges.hpp"

#include <cerrno>
#include <cstring>
#include <grp.h>
#include <linux/capability.h>
#include <pwd.h>
#include <stdexcept>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "util/log.hpp"

namespace sluice::daemon {
namespace {

/** Sets the calling thread's effective and permitted capabilities to `mask` (bits of the
 * first 32 capabilities), inheritable to `inheritable` (none by default, which also empties the
 * ambient set). The raw system call: no libcap needed. */
bool setCapabilities(std::uint32_t mask, std::uint32_t inheritable = 0) {
    __user_cap_header_struct header{};
    header.version = _LINUX_CAPABILITY_VERSION_3;
    header.pid = 0;
    __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3] = {};
    data[0].effective = mask;
    data[0].permitted = mask;
    data[0].inheritable = inheritable;
    return syscall(SYS_capset, &header, data) == 0;
}

constexpr std::uint32_t bit(int capability) {
    return std::uint32_t{1} << capability;
}

constexpr std::uint32_t kept = bit(CAP_NET_BIND_SERVICE) | bit(CAP_DAC_READ_SEARCH);

} // namespace

void dropPrivileges(const std::string &user, const std::string &group) {
    if (user.empty()) {
        return;
    }
    errno = 0;
    const passwd *pw = getpwnam(user.c_str());
    if (pw == nullptr) {
        throw std::runtime_error("global.user: no user named '" + user + "'");
    }
    gid_t gid = pw->pw_gid;
    if (!group.empty()) {
        const struct group *gr = getgrnam(group.c_str());
        if (gr == nullptr) {
            throw std::runtime_error("global.group: no group named '" + group + "'");
        }
        gid = gr->gr_gid;
    }
    if (::getuid() != 0 && ::geteuid() == pw->pw_uid && ::getuid() == pw->pw_uid &&
        ::getgid() == gid) {
        // Started by a process that had already dropped root (an upgrade), with the two
        // capabilities ambient: narrow to them, which also clears the ambient set.
        const bool narrowed = setCapabilities(kept);
        if (setuid(0) == 0) {
            throw std::runtime_error("privileges were not dropped: setuid(0) still works");
        }
        log::info("privileges-dropped user=" + user + " uid=" + std::to_string(pw->pw_uid) +
                  " gid=" + std::to_string(gid) + " already=yes" +
                  (narrowed ? " kept=cap_net_bind_service,cap_dac_read_search" : " kept=none"));
        return;
    }
    // Keep the permitted set across setuid() on this thread, then narrow it to the two kept.
    if (prctl(PR_SET_KEEPCAPS, 1L, 0L, 0L, 0L) != 0) {
        throw std::runtime_error(std::string("cannot keep capabilities: ") + std::strerror(errno));
    }
    if (setgroups(0, nullptr) != 0 || setgid(gid) != 0 || setuid(pw->pw_uid) != 0) {
        throw std::runtime_error("cannot drop privileges to " + user + ": " + std::strerror(errno));
    }
    prctl(PR_SET_KEEPCAPS, 0L, 0L, 0L, 0L);
    const bool narrowed = setCapabilities(kept);
    if (setuid(0) == 0) {
        throw std::runtime_error("privileges were not dropped: setuid(0) still works");
    }
    log::info("privileges-dropped user=" + user + " uid=" + std::to_string(pw->pw_uid) +
              " gid=" + std::to_string(gid) +
              (narrowed ? " kept=cap_net_bind_service,cap_dac_read_search" : " kept=none"));
}

bool passCapabilitiesOn(bool pass) {
    if (!pass) {
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0L, 0L, 0L);
        return setCapabilities(kept);
    }
    // A capability can be ambient only while it is both permitted and inheritable.
    if (!setCapabilities(kept, kept)) {
        return false;
    }
    for (const int capability : {CAP_NET_BIND_SERVICE, CAP_DAC_READ_SEARCH}) {
        if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, static_cast<unsigned long>(capability), 0L,
                  0L) != 0) {
            passCapabilitiesOn(false);
            return false;
        }
    }
    return true;
}

void dropThreadCapabilities() {
    setCapabilities(0);
}

} // namespace sluice::daemon
