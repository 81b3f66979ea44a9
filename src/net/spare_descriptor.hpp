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

    /** Holds the spare unless it already does; when no descriptor is free for it (another
     * thread took the slot it gave up), it stays unheld until a later call. */
    void take() {
        if (fd_ < 0) {
            fd_ = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
        }
    }

    /** Closes the spare, if held, freeing its slot for the caller. */
    void give() {
        if (fd_ >= 0) {
            ::close(fd_);
            fd_ = -1;
        }
    }

private:
    int fd_ = -1;
};

} // namespace sluice::net
