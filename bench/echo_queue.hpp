// bench/echo_queue.hpp: what an echoing peer still owes its socket, for bench/backend's echo role
// and loadgen --serve. The peer sends what it reads at once; what the socket does not take waits
// here, and the peer reads nothing more until it has gone (back-pressure, no growth).
#pragma once

#include <cerrno>
#include <cstddef>
#include <sys/socket.h>
#include <sys/types.h>
#include <vector>

struct EchoQueue {
    std::vector<char> pending;
    std::size_t head = 0; // bytes of `pending` already sent

    bool empty() const { return head == pending.size(); }

    /** Sends what is owed, as far as the socket takes it; false if the peer is gone. */
    bool flush(int fd) {
        while (head < pending.size()) {
            const ssize_t n = send(fd, pending.data() + head, pending.size() - head, MSG_NOSIGNAL);
            if (n > 0) {
                head += static_cast<std::size_t>(n);
                continue;
            }
            return n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
        }
        pending.clear();
        head = 0;
        return true;
    }

    /** Echoes `n` bytes just read (with nothing owed): what the socket does not take is owed. */
    bool echo(int fd, const char *data, std::size_t n) {
        const ssize_t sent = send(fd, data, n, MSG_NOSIGNAL);
        if (sent < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
            return false;
        }
        const std::size_t done = sent > 0 ? static_cast<std::size_t>(sent) : 0;
        pending.assign(data + done, data + n);
        head = 0;
        return true;
    }
};
