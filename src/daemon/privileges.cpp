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
 * first 32 capabilities), inheritable to none. The raw system call: no libcap needed. */
bool setCapabilities(std::uint32_t mask) {
    __user_cap_header_struct header{};
    header.version = _LINUX_CAPABILITY_VERSION_3;
    header.pid = 0;
    __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3] = {};
    data[0].effective = mask;
    data[0].permitted = mask;
    return syscall(SYS_capset, &header, data) == 0;
}

constexpr std::uint32_t bit(int capability) {
    return std::uint32_t{1} << capability;
}

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
    // Keep the permitted set across setuid() on this thread, then narrow it to the two kept.
    if (prctl(PR_SET_KEEPCAPS, 1L, 0L, 0L, 0L) != 0) {
        throw std::runtime_error(std::string("cannot keep capabilities: ") + std::strerror(errno));
    }
    if (setgroups(0, nullptr) != 0 || setgid(gid) != 0 || setuid(pw->pw_uid) != 0) {
        throw std::runtime_error("cannot drop privileges to " + user + ": " + std::strerror(errno));
    }
    prctl(PR_SET_KEEPCAPS, 0L, 0L, 0L, 0L);
    const bool kept = setCapabilities(bit(CAP_NET_BIND_SERVICE) | bit(CAP_DAC_READ_SEARCH));
    if (setuid(0) == 0) {
        throw std::runtime_error("privileges were not dropped: setuid(0) still works");
    }
    log::info("privileges-dropped user=" + user + " uid=" + std::to_string(pw->pw_uid) +
              " gid=" + std::to_string(gid) +
              (kept ? " kept=cap_net_bind_service,cap_dac_read_search" : " kept=none"));
}

void dropThreadCapabilities() {
    setCapabilities(0);
}

} // namespace sluice::daemon
