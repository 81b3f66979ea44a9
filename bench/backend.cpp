// bench/backend: the plain TCP service behind every terminator in the benchmark. One thread,
// epoll, non-blocking sockets, so the backend is never the bottleneck. The first byte a
// connection sends picks its role for the rest of its life:
//
//   'E'  echo: every byte read (the 'E' included) is written back;
//   'D'  source: the backend writes an endless stream until the peer closes;
//   'U'  sink: every byte read is discarded.
//
// Usage: backend [--host 127.0.0.1] [--port 0]. Prints "port N" once listening, then runs until
// SIGTERM or SIGINT.
#include <arpa/inet.h>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <string>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>
#include <vector>

#include "echo_queue.hpp"

namespace {

enum class Role { unknown, echo, source, sink };

struct Peer {
    int fd = -1;
    Role role = Role::unknown;
    EchoQueue echo; // echo bytes the socket did not take yet
    bool wantOut = false;
};

volatile std::sig_atomic_t stopRequested = 0;

void onSignal(int) {
    stopRequested = 1;
}

constexpr std::size_t chunk = 256 * 1024;

void setInterest(int epfd, Peer *peer, bool out) {
    if (peer->wantOut == out) {
        return;
    }
    epoll_event ev{};
    // An echo peer with bytes pending is not read (backpressure), so it waits for EPOLLOUT
    // alone; a level-triggered EPOLLIN would spin.
    ev.events = !out ? EPOLLIN : peer->role == Role::echo ? EPOLLOUT : (EPOLLIN | EPOLLOUT);
    ev.data.ptr = peer;
    epoll_ctl(epfd, EPOLL_CTL_MOD, peer->fd, &ev);
    peer->wantOut = out;
}

void closePeer(int epfd, Peer *peer) {
    epoll_ctl(epfd, EPOLL_CTL_DEL, peer->fd, nullptr);
    close(peer->fd);
    delete peer;
}

/** Writes pending echo bytes; returns false if the peer is gone. */
bool flushEcho(int epfd, Peer *peer) {
    if (!peer->echo.flush(peer->fd)) {
        return false;
    }
    setInterest(epfd, peer, !peer->echo.empty());
    return true;
}

/** Handles readable input; returns false when the peer is done. */
bool onReadable(int epfd, Peer *peer, char *buffer) {
    for (int round = 0; round < 16; ++round) {
        if (peer->role == Role::echo && !peer->echo.empty()) {
            return true; // backpressure: read more once the echo queue drained
        }
        const ssize_t n = recv(peer->fd, buffer, chunk, 0);
        if (n == 0) {
            return false;
        }
        if (n < 0) {
            return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR;
        }
        if (peer->role == Role::unknown) {
            peer->role = buffer[0] == 'D'   ? Role::source
                         : buffer[0] == 'U' ? Role::sink
                                            : Role::echo;
            if (peer->role == Role::source) {
                setInterest(epfd, peer, true);
            }
        }
        if (peer->role == Role::echo) {
            if (!peer->echo.echo(peer->fd, buffer, static_cast<std::size_t>(n))) {
                return false;
            }
            if (!peer->echo.empty()) {
                setInterest(epfd, peer, true);
            }
        }
        if (static_cast<std::size_t>(n) < chunk) {
            return true;
        }
    }
    return true;
}

bool onWritable(int epfd, Peer *peer, const char *source) {
    if (peer->role == Role::echo) {
        return flushEcho(epfd, peer);
    }
    if (peer->role == Role::source) {
        for (int round = 0; round < 8; ++round) {
            const ssize_t n = send(peer->fd, source, chunk, MSG_NOSIGNAL);
            if (n < 0) {
                return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR;
            }
            if (static_cast<std::size_t>(n) < chunk) {
                return true;
            }
        }
    }
    return true;
}

} // namespace

int main(int argc, char **argv) {
    std::string host = "127.0.0.1";
    int port = 0;
    for (int i = 1; i + 1 < argc; i += 2) {
        const std::string key = argv[i];
        if (key == "--host") {
            host = argv[i + 1];
        } else if (key == "--port") {
            port = std::atoi(argv[i + 1]);
        } else {
            std::fprintf(stderr, "backend: unknown option %s\n", key.c_str());
            return 2;
        }
    }
    rlimit limit{};
    if (getrlimit(RLIMIT_NOFILE, &limit) == 0) {
        limit.rlim_cur = limit.rlim_max;
        setrlimit(RLIMIT_NOFILE, &limit);
    }
    std::signal(SIGTERM, onSignal);
    std::signal(SIGINT, onSignal);
    std::signal(SIGPIPE, SIG_IGN);

    const int listener = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    const int one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<std::uint16_t>(port));
    if (inet_pton(AF_INET, host.c_str(), &addr.sin_addr) != 1 ||
        bind(listener, reinterpret_cast<sockaddr *>(&addr), sizeof addr) != 0 ||
        listen(listener, 4096) != 0) {
        std::fprintf(stderr, "backend: cannot listen on %s:%d: %s\n", host.c_str(), port,
                     std::strerror(errno));
        return 1;
    }
    socklen_t length = sizeof addr;
    getsockname(listener, reinterpret_cast<sockaddr *>(&addr), &length);
    std::printf("port %d\n", ntohs(addr.sin_port));
    std::fflush(stdout);

    const int epfd = epoll_create1(EPOLL_CLOEXEC);
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.ptr = nullptr; // the listener
    epoll_ctl(epfd, EPOLL_CTL_ADD, listener, &ev);

    std::vector<char> buffer(chunk);
    std::vector<char> source(chunk, 'x');
    std::vector<epoll_event> events(1024);
    while (stopRequested == 0) {
        const int n = epoll_wait(epfd, events.data(), static_cast<int>(events.size()), 200);
        for (int i = 0; i < n; ++i) {
            auto *peer = static_cast<Peer *>(events[i].data.ptr);
            if (peer == nullptr) {
                for (int accepted = 0; accepted < 256; ++accepted) {
                    const int fd =
                        accept4(listener, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (fd < 0) {
                        break;
                    }
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    auto *fresh = new Peer();
                    fresh->fd = fd;
                    epoll_event add{};
                    add.events = EPOLLIN;
                    add.data.ptr = fresh;
                    epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &add);
                }
                continue;
            }
            bool alive = true;
            if ((events[i].events & (EPOLLERR | EPOLLHUP)) != 0 &&
                (events[i].events & EPOLLIN) == 0) {
                alive = false;
            }
            if (alive && (events[i].events & EPOLLOUT) != 0) {
                alive = onWritable(epfd, peer, source.data());
            }
            if (alive && (events[i].events & EPOLLIN) != 0) {
                alive = onReadable(epfd, peer, buffer.data());
            }
            if (!alive) {
                closePeer(epfd, peer);
            }
        }
    }
    return 0;
}
