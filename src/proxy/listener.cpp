#include "proxy/listener.hpp"

#include <stdexcept>
#include <unistd.h>

#include "net/listen_socket.hpp"
#include "proxy/connection.hpp"
#include "proxy/server.hpp"
#include "proxy/stats.hpp"
#include "util/log.hpp"

namespace sluice::proxy {
namespace {

// An accept error (EMFILE, ENFILE, ENOMEM) repeats for every pending connection: say it at most
// once a second.
constexpr std::uint64_t acceptErrorLogIntervalMs = 1000;

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
    uv_os_fd_t fd = -1;
    if (handle_ == nullptr || uv_fileno(reinterpret_cast<uv_handle_t *>(handle_), &fd) != 0 ||
        (applied_ && *applied_ == settings_->socket)) {
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
    net::setSocketOptions(fd, want, false);
    applied_ = want;
}

void Listener::adopt(int fd) {
    handle_ = new uv_tcp_t;
    uv_tcp_init(server_.loop(), handle_);
    handle_->data = this;
    int err = uv_tcp_open(handle_, fd);
    if (err != 0) {
        ::close(fd); // not owned by the handle: nothing else would close it
    } else {
        applySocketOptions();
        err = uv_listen(reinterpret_cast<uv_stream_t *>(handle_), settings_->backlog, onConnection);
    }
    if (err != 0) {
        throw std::runtime_error("listen " + key_ + ": " + uv_strerror(err));
    }
}

std::string Listener::boundText() const {
    sockaddr_storage storage{};
    int length = sizeof storage;
    if (handle_ == nullptr ||
        uv_tcp_getsockname(handle_, reinterpret_cast<sockaddr *>(&storage), &length) != 0) {
        return "?";
    }
    return net::format(reinterpret_cast<const sockaddr *>(&storage));
}

void Listener::onConnection(uv_stream_t *stream, int status) {
    auto *self = static_cast<Listener *>(stream->data);
    if (self->closing_) {
        return;
    }
    if (status < 0) {
        // libuv has already accepted and closed what it could (its reserve-descriptor trick for
        // EMFILE), so the listener neither spins nor dies; it accepts again on the next event.
        self->server_.counters().acceptErrors++;
        stats().acceptError();
        const std::uint64_t now = uv_now(self->server_.loop());
        if (now - self->lastAcceptErrorLog_ >= acceptErrorLogIntervalMs ||
            self->lastAcceptErrorLog_ == 0) {
            self->lastAcceptErrorLog_ = now;
            log::warn("accept-failed listener=" + self->settings_->name +
                      " error=" + uv_err_name(status));
        }
        return;
    }
    if (!self->server_.admits(*self->settings_)) {
        // Leaving the connection unaccepted makes libuv stop polling this socket until
        // retryAccept() takes it: back-pressure into the kernel's backlog.
        self->pending_ = true;
        return;
    }
    self->acceptOne();
}

void Listener::acceptOne() {
    Connection *connection = Connection::accept(server_, reinterpret_cast<uv_stream_t *>(handle_));
    if (connection == nullptr) {
        return;
    }
    server_.counters().accepted++;
    // One getpeername() serves the allow list, the handshake limit and the connection's logs.
    const int fd = connection->clientFd();
    sockaddr_storage peer{};
    socklen_t length = sizeof peer;
    if (fd < 0 || getpeername(fd, reinterpret_cast<sockaddr *>(&peer), &length) != 0) {
        peer.ss_family = AF_UNSPEC;
    }
    std::string ipKey;
    const bool expectProxy = !settings_->acceptProxyFrom.empty();
    if (expectProxy) {
        // Only a trusted balancer may speak for its clients; the handshake limit then applies
        // to the client the header names, counted by the connection once it has read it.
        if (!settings_->proxySourceAllowed(reinterpret_cast<const sockaddr *>(&peer))) {
            stats().proxySourceRefused();
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
    if (!server_.handshakeStarting(ipKey)) {
        // This address already has its limit of handshakes in progress: close at once, before
        // any TLS work, so one source cannot hold every slot with silent connections.
        server_.counters().handshakeLimited++;
        stats().handshakeLimited();
        connection->refuse();
        return;
    }
    connection->start(settings_, peer, std::move(ipKey));
}

void Listener::retryAccept() {
    if (pending_ && !closing_ && server_.admits(*settings_)) {
        pending_ = false;
        acceptOne();
    }
}

void Listener::close(std::function<void()> closed) {
    closing_ = true;
    closed_ = std::move(closed);
    if (handle_ == nullptr) {
        if (auto done = std::move(closed_)) {
            done(); // may delete this listener
        }
        return;
    }
    uv_close(reinterpret_cast<uv_handle_t *>(handle_), [](uv_handle_t *handle) {
        auto *self = static_cast<Listener *>(handle->data);
        delete reinterpret_cast<uv_tcp_t *>(handle);
        self->handle_ = nullptr;
        // Moved out first: the callback may delete this listener and with it closed_.
        if (auto done = std::move(self->closed_)) {
            done();
        }
    });
}

} // namespace sluice::proxy
