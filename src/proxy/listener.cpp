#include "proxy/listener.hpp"

#include <algorithm>
#include <cerrno>
#include <stdexcept>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "net/listen_socket.hpp"
#include "net/timer.hpp"
#include "proxy/connection.hpp"
#include "proxy/server.hpp"
#include "proxy/stats.hpp"
#include "util/log.hpp"

namespace sluice::proxy {
namespace {

// An accept error (EMFILE, ENFILE, ENOMEM) repeats for every pending connection: say it at most
// once a second.
constexpr std::uint64_t acceptErrorLogIntervalMs = 1000;
// Connections accepted per readiness event before the loop serves the others; the rest are
// taken on the next turn (the socket stays readable).
constexpr int acceptsPerWake = 64;
// After an accept error that shedding cannot clear (no descriptor to spare, ENOBUFS, ENOMEM),
// the listener rests this long instead of spinning on a socket that stays readable.
constexpr std::uint64_t acceptRestMs = 100;

// Failures of one connection that accept(2) reports on Linux, where the next may succeed.
bool connectionOnly(int error) {
    switch (error) {
    case EINTR:
    case ECONNABORTED:
    case EPERM: // a firewall rule refused this one
    case EPROTO:
    case ENOPROTOOPT:
    case ENETDOWN:
    case ENETUNREACH:
    case EHOSTDOWN:
    case EHOSTUNREACH:
    case ENONET:
    case EOPNOTSUPP:
        return true;
    default:
        return false;
    }
}

} // namespace

Listener::Listener(Server &server, std::string key,
                   std::shared_ptr<const ListenerSettings> settings)
    : server_(server)
    , key_(std::move(key))
    , settings_(std::move(settings)) {}

Listener::~Listener() = default;

const std::string &Listener::name() const {
    return settings_->name;
}

void Listener::setSettings(std::shared_ptr<const ListenerSettings> settings) {
    settings_ = std::move(settings);
    applySocketOptions();
}

void Listener::applySocketOptions() {
    if (poll_ == nullptr || (applied_ && *applied_ == settings_->socket)) {
        return;
    }
    const SocketOptions &want = settings_->socket;
    if (applied_ && ((applied_->sendBuffer > 0 && want.sendBuffer == 0) ||
                     (applied_->receiveBuffer > 0 && want.receiveBuffer == 0))) {
        log::warn("socket-buffer-kept listener=" + settings_->name +
                  " detail=\"a buffer size set on a listening socket stays until it is reopened "
                  "(restart)\"");
    }
    // Accepted sockets inherit these from the listening socket (Linux copies TCP_NODELAY,
    // keepalive and buffer sizes to the child), so no accepted socket needs a call of its own.
    net::setSocketOptions(fd_, want, false);
    applied_ = want;
}

void Listener::adopt(int fd) {
    fd_ = fd; // closed by close() whatever happens below
    int on = 1;
    // Non-blocking (an inherited socket may not be), and listening with this listener's backlog
    // (a reload may have changed it).
    if (::ioctl(fd, FIONBIO, &on) != 0 || ::listen(fd, settings_->backlog) != 0) {
        const int error = errno;
        throw std::runtime_error("listen " + key_ + ": " + net::errorName(error));
    }
    auto *poll = new uv_poll_t;
    if (const int err = uv_poll_init_socket(server_.loop(), poll, fd); err != 0) {
        delete poll;
        throw std::runtime_error("listen " + key_ + ": " + uv_strerror(err));
    }
    poll_ = poll;
    poll_->data = this;
    applySocketOptions();
    uv_poll_start(poll_, UV_READABLE, onReadable);
}

std::string Listener::boundText() const {
    sockaddr_storage storage{};
    socklen_t length = sizeof storage;
    if (fd_ < 0 || getsockname(fd_, reinterpret_cast<sockaddr *>(&storage), &length) != 0) {
        return "?";
    }
    return net::format(reinterpret_cast<const sockaddr *>(&storage));
}

void Listener::onReadable(uv_poll_t *poll, int status, int /*events*/) {
    auto *self = static_cast<Listener *>(poll->data);
    if (self->closing_) {
        return;
    }
    if (status < 0) {
        self->acceptFailed(-status); // libuv's error codes are negated errno values here
        return;
    }
    self->acceptReady();
}

void Listener::acceptReady() {
    if (!acceptUpTo(acceptsPerWake)) {
        // Back-pressure into the kernel's backlog until retryAccept().
        pending_ = true;
        uv_poll_stop(poll_);
    }
}

std::size_t Listener::acceptQueued() {
    if (closing_ || fd_ < 0) {
        return 0;
    }
    // The queue holds at most backlog + 1; the bound also ends the loop if clients keep
    // arriving while it runs.
    const std::uint64_t before = server_.counters().accepted;
    acceptUpTo(settings_->backlog + 1);
    return static_cast<std::size_t>(server_.counters().accepted - before);
}

bool Listener::acceptUpTo(int most) {
    for (int taken = 0; taken < most && !closing_; ++taken) {
        if (!server_.admits(*settings_)) {
            return false;
        }
        sockaddr_storage peer{};
        socklen_t length = sizeof peer;
        const int fd = ::accept4(fd_, reinterpret_cast<sockaddr *>(&peer), &length,
                                 SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd >= 0) {
            acceptOne(fd, peer);
            continue;
        }
        const int error = errno;
        if (error == EAGAIN || error == EWOULDBLOCK) {
            return true;
        }
        if (!connectionOnly(error)) {
            acceptFailed(error);
            return true;
        }
    }
    return true;
}

void Listener::acceptFailed(int error) {
    // Out of descriptors, the connections waiting would otherwise sit in the backlog until
    // their clients give up: close them now, each a client this listener could not serve.
    const std::size_t shed = error == EMFILE || error == ENFILE ? server_.shedWaiting(fd_) : 0;
    const std::uint64_t failures = std::max<std::uint64_t>(shed, 1);
    server_.metrics().acceptErrors(failures);
    shedSinceLog_ += shed;
    const std::uint64_t now = uv_now(server_.loop());
    if (now - lastAcceptErrorLog_ >= acceptErrorLogIntervalMs || lastAcceptErrorLog_ == 0) {
        lastAcceptErrorLog_ = now;
        log::warn("accept-failed listener=" + settings_->name + " error=" + net::errorName(error) +
                  " shed=" + std::to_string(shedSinceLog_));
        shedSinceLog_ = 0;
    }
    if (shed == 0) {
        rest();
    }
}

void Listener::rest() {
    if (restTimer_ == nullptr) {
        restTimer_ = net::newTimer(server_.loop(), this);
    }
    uv_poll_stop(poll_);
    uv_timer_start(
        restTimer_,
        [](uv_timer_t *timer) {
            auto *self = static_cast<Listener *>(timer->data);
            if (!self->closing_ && !self->pending_) {
                uv_poll_start(self->poll_, UV_READABLE, onReadable);
            }
        },
        acceptRestMs, 0);
}

void Listener::acceptOne(int fd, const sockaddr_storage &peer) {
    Connection *connection = Connection::adopt(server_, fd);
    if (connection == nullptr) {
        return;
    }
    server_.counters().accepted++;
    // The address accept() gave serves the allow list, the handshake limit and the logs.
    std::string ipKey;
    const bool expectProxy = !settings_->acceptProxyFrom.empty();
    if (expectProxy) {
        // Only a trusted balancer may speak for its clients; the handshake limit then applies
        // to the client the header names, counted by the connection once it has read it.
        if (!settings_->proxySourceAllowed(reinterpret_cast<const sockaddr *>(&peer))) {
            server_.metrics().proxySourceRefused();
            const std::uint64_t now = uv_now(server_.loop());
            if (now - lastProxyRefusedLog_ >= acceptErrorLogIntervalMs ||
                lastProxyRefusedLog_ == 0) {
                lastProxyRefusedLog_ = now;
                log::warn("proxy-source-refused listener=" + settings_->name +
                          " peer=" + net::format(reinterpret_cast<const sockaddr *>(&peer)));
            }
            connection->refuse();
            return;
        }
    } else {
        ipKey = clientIpKey(reinterpret_cast<const sockaddr *>(&peer));
    }
    if (server_.handshakeStarting(ipKey) != Server::HandshakeAdmission::admitted) {
        // This address already has its limit of handshakes in progress, or started its rate's
        // worth in the last second: close at once, before any TLS work, so that one source can
        // neither hold every slot with silent connections nor keep the CPU busy with handshakes.
        connection->refuse();
        return;
    }
    connection->start(settings_, peer, std::move(ipKey));
}

void Listener::retryAccept() {
    if (pending_ && !closing_ && poll_ != nullptr && server_.admits(*settings_)) {
        pending_ = false;
        // Unless resting after an error: the rest timer starts polling again.
        if (restTimer_ == nullptr ||
            uv_is_active(reinterpret_cast<uv_handle_t *>(restTimer_)) == 0) {
            uv_poll_start(poll_, UV_READABLE, onReadable);
        }
    }
}

void Listener::close(std::function<void()> closed) {
    closing_ = true;
    closed_ = std::move(closed);
    if (restTimer_ != nullptr) {
        net::freeTimer(restTimer_);
        restTimer_ = nullptr;
    }
    if (poll_ == nullptr) {
        if (fd_ >= 0) {
            ::close(fd_);
            fd_ = -1;
        }
        if (auto done = std::move(closed_)) {
            done(); // may delete this listener
        }
        return;
    }
    // uv_close() stops the poll at once (the descriptor leaves epoll), so the socket can close
    // now rather than a loop turn later: what the kernel queues between acceptQueued() and the
    // close is reset by it, and that window is now only the time between the two calls.
    uv_close(reinterpret_cast<uv_handle_t *>(poll_), [](uv_handle_t *handle) {
        auto *self = static_cast<Listener *>(handle->data);
        delete reinterpret_cast<uv_poll_t *>(handle);
        self->poll_ = nullptr;
        // Moved out first: the callback may delete this listener and with it closed_.
        if (auto done = std::move(self->closed_)) {
            done();
        }
    });
    ::close(fd_);
    fd_ = -1;
}

} // namespace sluice::proxy
