// net/spare_descriptor: one descriptor held open on /dev/null, so that a process out of
// descriptors (accept() failing with EMFILE or ENFILE) can still accept a connection: give the
// spare up, accept, take it back.
#pragma once

#include <fcntl.h>
#include <unistd.h>

namespace sluice::net {

class SpareDescriptor {
public:
    SpareDescriptor() = default;
    ~SpareDescriptor() { give(); }
    SpareDescriptor(const SpareDescriptor &) = delete;
    SpareDescriptor &operator=(const SpareDescriptor &) = delete;

    /** Holds the spare unless it already does; false when no descriptor is free for it
     * (another thread took the slot it gave up). */
    bool take() {
        if (fd_ < 0) {
            fd_ = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
        }
        return fd_ >= 0;
    }

    /** Closes the spare, freeing one slot for the caller; false when none was held. */
    bool give() {
        if (fd_ < 0) {
            return false;
        }
        ::close(fd_);
        fd_ = -1;
        return true;
    }

private:
    int fd_ = -1;
};

} // namespace sluice::net
