// The process's descriptor table, for tests of what sluice does when it runs out (EMFILE).
#pragma once

#include <cerrno>
#include <dirent.h>
#include <fcntl.h>
#include <stdexcept>
#include <sys/resource.h>
#include <unistd.h>
#include <vector>

namespace sluice::test {

/** Descriptors this process has open (the entries of /proc/self/fd, less the one reading it). */
inline int openDescriptors() {
    DIR *dir = ::opendir("/proc/self/fd");
    if (dir == nullptr) {
        throw std::runtime_error("cannot read /proc/self/fd");
    }
    int count = 0;
    while (const dirent *entry = ::readdir(dir)) {
        count += entry->d_name[0] != '.' ? 1 : 0;
    }
    ::closedir(dir);
    return count - 1;
}

/**
 * Fills the process's descriptor table but for `spare` slots while it lives: lowers the soft
 * RLIMIT_NOFILE to a little above what is open and opens /dev/null until open() fails with
 * EMFILE. The next `spare` descriptors anyone in the process makes succeed; after them, EMFILE.
 * The limit and the table are as before once it goes.
 */
class DescriptorFiller {
public:
    explicit DescriptorFiller(int spare) {
        if (::getrlimit(RLIMIT_NOFILE, &saved_) != 0) {
            throw std::runtime_error("getrlimit failed");
        }
        rlimit low = saved_;
        low.rlim_cur = static_cast<rlim_t>(openDescriptors() + 64);
        if (::setrlimit(RLIMIT_NOFILE, &low) != 0) {
            throw std::runtime_error("setrlimit failed");
        }
        for (int fd; (fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC)) >= 0;) {
            filler_.push_back(fd);
        }
        if (errno != EMFILE || static_cast<int>(filler_.size()) < spare) {
            release();
            throw std::runtime_error("could not fill the descriptor table");
        }
        for (int i = 0; i < spare; ++i) {
            ::close(filler_.back());
            filler_.pop_back();
        }
    }
    ~DescriptorFiller() { release(); }
    DescriptorFiller(const DescriptorFiller &) = delete;
    DescriptorFiller &operator=(const DescriptorFiller &) = delete;

private:
    void release() {
        for (const int fd : filler_) {
            ::close(fd);
        }
        filler_.clear();
        ::setrlimit(RLIMIT_NOFILE, &saved_);
    }

    rlimit saved_{};
    std::vector<int> filler_;
};

} // namespace sluice::test
