#include "ops/admin.hpp"

#include <cerrno>
#include <chrono>
#include <stdexcept>
#include <sys/socket.h>
#include <unistd.h>

#include "net/address.hpp"
#include "net/close_notice.hpp"
#include "net/listen_socket.hpp"
#include "net/timer.hpp"
#include "tls/context.hpp"
#include "util/log.hpp"

#ifndef SLUICE_VERSION
#define SLUICE_VERSION "unknown"
#endif

namespace sluice::ops {

std::vector<tls::CertificateSummary> certificatesOf(const proxy::Runtime &runtime) {
    std::vector<tls::CertificateSummary> out;
    for (const auto &listener : runtime.listeners) {
        auto summaries = tls::certificateSummaries(listener->context.get());
        out.insert(out.end(), summaries.begin(), summaries.end());
    }
    return out;
}

std::vector<ListenerStatus>
listenersOf(const proxy::Runtime &runtime,
            const std::vector<std::pair<std::string, std::string>> &bound) {
    std::vector<ListenerStatus> out;
    for (const auto &listener : runtime.listeners) {
        ListenerStatus status;
        status.name = listener->name;
        status.backend = listener->backendText;
        for (const auto &[name, address] : bound) {
            if (name == listener->name) {
                status.addresses.push_back(address);
            }
        }
        out.push_back(std::move(status));
    }
    return out;
}

std::vector<BackendStatus> backendsOf(const proxy::Runtime &runtime) {
    std::vector<BackendStatus> out;
    const std::uint64_t nowMs = uv_hrtime() / 1000000;
    for (const auto &pool : runtime.pools) {
        BackendStatus status;
        status.name = pool->name();
        const BackendConfig &config = pool->config();
        status.balance = config.balance == Balance::roundRobin         ? "round-robin"
                         : config.balance == Balance::leastConnections ? "least-connections"
                                                                       : "first";
        status.tls = config.tls.enabled;
        status.proxyProtocol = config.proxyProtocol == ProxyProtocol::v1   ? "v1"
                               : config.proxyProtocol == ProxyProtocol::v2 ? "v2"
                                                                           : "off";
        for (std::size_t i = 0; i < pool->size(); ++i) {
            const proxy::PoolServer &server = pool->server(i);
            constexpr auto relaxed = std::memory_order_relaxed;
            status.servers.push_back({server.text(), server.downUntil.load(relaxed) <= nowMs,
                                      server.active.load(relaxed), server.failures.load(relaxed),
                                      server.connects.load(relaxed),
                                      server.connectFailures.load(relaxed)});
        }
        out.push_back(std::move(status));
    }
    return out;
}

/** One admin connection: its socket, its timer, and the bytes of its request. */
struct Admin::Client {
    Admin *admin = nullptr;
    uv_tcp_t tcp{};
    uv_timer_t timer{};
    uv_write_t writeReq{};
    uv_shutdown_t shutdownReq{};
    char buffer[maxRequestBytes];
    std::size_t used = 0;
    std::string response; // pinned until the write callback
    int openHandles = 0;
    bool responded = false;
    bool closing = false;
    bool onReserve = false; // its socket took the reserve descriptor's place
};

namespace {

// Admin connections taken per readiness event; the rest wait for the next turn.
constexpr int acceptsPerWake = 16;
// Out of descriptors with the reserve already in use, the listener rests this long.
constexpr std::uint64_t acceptRestMs = 100;
constexpr std::uint64_t acceptErrorLogIntervalMs = 1000;

} // namespace

Admin::Admin(uv_loop_t *loop, const AdminConfig &config, StatusSource source)
    : loop_(loop)
    , address_(config.listen)
    , source_(std::move(source)) {}

Admin::~Admin() = default;

void Admin::start(int handedOver) {
    if (handedOver >= 0) {
        fd_ = handedOver;
    } else {
        try {
            // No SO_REUSEPORT: a second daemon on the same admin address is an error, not a
            // share.
            fd_ = net::openListenSocket(net::resolve(address_), address_.text(), 64, false);
        } catch (const std::exception &e) {
            throw std::runtime_error(std::string("admin ") + e.what());
        }
    }
    reserve_.take();
    poll_ = new uv_poll_t;
    if (const int err = uv_poll_init_socket(loop_, poll_, fd_); err != 0) {
        delete poll_;
        poll_ = nullptr;
        ::close(fd_);
        fd_ = -1;
        throw std::runtime_error("admin listen " + address_.text() + ": " + uv_strerror(err));
    }
    poll_->data = this;
    uv_poll_start(poll_, UV_READABLE, onReadable);
    sockaddr_storage storage{};
    socklen_t length = sizeof storage;
    if (::getsockname(fd_, reinterpret_cast<sockaddr *>(&storage), &length) == 0) {
        bound_ = net::format(reinterpret_cast<const sockaddr *>(&storage));
    }
    log::info("admin-listening address=" + bound_);
}

void Admin::onReadable(uv_poll_t *poll, int /*status*/, int /*events*/) {
    // A poll error shows again as accept()'s own error, which acceptReady() handles.
    auto *self = static_cast<Admin *>(poll->data);
    if (!self->closing_) {
        self->acceptReady();
    }
}

void Admin::acceptReady() {
    for (int taken = 0; taken < acceptsPerWake && !closing_; ++taken) {
        int fd = ::accept4(fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
        const bool onReserve = fd < 0;
        if (fd < 0) {
            const int error = errno;
            if (error == EAGAIN || error == EWOULDBLOCK) {
                return;
            }
            if (error == EINTR || error == ECONNABORTED || error == EPROTO) {
                continue; // that one connection failed; the next may not
            }
            fd = acceptOnReserve(error);
            if (fd < 0) {
                return;
            }
        }
        serve(fd, onReserve);
    }
}

int Admin::acceptOnReserve(int error) {
    // Out of descriptors the admin listener is what an operator looks at, so it answers: the
    // reserve descriptor makes room for one admin connection, and comes back when it closes.
    int fd = -1;
    if (error == EMFILE || error == ENFILE) {
        // Not held (a worker took its slot last time): the accept fails again, as it would.
        reserve_.give();
        fd = ::accept4(fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            reserve_.take();
        }
    }
    const bool onReserve = fd >= 0;
    const std::uint64_t now = uv_now(loop_);
    if (now - lastAcceptErrorLog_ >= acceptErrorLogIntervalMs || lastAcceptErrorLog_ == 0) {
        lastAcceptErrorLog_ = now;
        log::warn("accept-failed listener=admin error=" + net::errorName(error) +
                  (onReserve ? " detail=\"answered on the reserve descriptor\""
                             : " detail=\"no descriptor to spare; waiting connections stay "
                               "queued\""));
    }
    if (!onReserve) {
        rest();
    }
    return fd;
}

void Admin::rest() {
    if (restTimer_ == nullptr) {
        restTimer_ = net::newTimer(loop_, this);
    }
    uv_poll_stop(poll_);
    uv_timer_start(
        restTimer_,
        [](uv_timer_t *timer) {
            auto *self = static_cast<Admin *>(timer->data);
            if (!self->closing_) {
                uv_poll_start(self->poll_, UV_READABLE, onReadable);
            }
        },
        acceptRestMs, 0);
}

void Admin::serve(int fd, bool onReserve) {
    auto *client = new Client;
    client->admin = this;
    client->onReserve = onReserve;
    uv_tcp_init(loop_, &client->tcp);
    uv_timer_init(loop_, &client->timer);
    client->tcp.data = client;
    client->timer.data = client;
    client->writeReq.data = client;
    client->shutdownReq.data = client;
    client->openHandles = 2;
    clients_.insert(client);
    if (uv_tcp_open(&client->tcp, fd) != 0) {
        ::close(fd);
        closeClient(client);
        return;
    }
    if (clients_.size() > maxClients) {
        closeClient(client);
        return;
    }
    uv_timer_start(
        &client->timer,
        [](uv_timer_t *timer) {
            auto *c = static_cast<Client *>(timer->data);
            c->admin->closeClient(c);
        },
        requestTimeoutMs, 0);
    const auto alloc = [](uv_handle_t *handle, size_t, uv_buf_t *buf) {
        auto *c = static_cast<Client *>(handle->data);
        if (c->responded) {
            // Lingering after the response: read and discard until the client closes.
            *buf = uv_buf_init(c->buffer, sizeof c->buffer);
            return;
        }
        *buf = uv_buf_init(c->buffer + c->used, static_cast<unsigned>(sizeof c->buffer - c->used));
    };
    const auto read = [](uv_stream_t *stream, ssize_t nread, const uv_buf_t *) {
        auto *c = static_cast<Client *>(stream->data);
        if (c->closing) {
            return;
        }
        if (nread < 0) {
            c->admin->closeClient(c);
            return;
        }
        if (c->responded || nread == 0) {
            return;
        }
        c->used += static_cast<std::size_t>(nread);
        const HttpRequest request = parseRequest({c->buffer, c->used});
        if (request.state == HttpRequest::State::incomplete) {
            return;
        }
        c->responded = true;
        c->response = c->admin->respond(request);
        uv_buf_t out = uv_buf_init(c->response.data(), static_cast<unsigned>(c->response.size()));
        const auto written = [](uv_write_t *req, int writeStatus) {
            auto *w = static_cast<Client *>(req->data);
            if (w->closing) {
                return;
            }
            if (writeStatus < 0 ||
                uv_shutdown(&w->shutdownReq, reinterpret_cast<uv_stream_t *>(&w->tcp),
                            [](uv_shutdown_t *, int) {}) != 0) {
                w->admin->closeClient(w);
                return;
            }
            // The FIN is on its way; wait (briefly) for the client's, so that unread request
            // bytes do not turn our close into a reset that could destroy the response.
            uv_timer_start(
                &w->timer,
                [](uv_timer_t *timer) {
                    auto *t = static_cast<Client *>(timer->data);
                    t->admin->closeClient(t);
                },
                lingerMs, 0);
        };
        if (uv_write(&c->writeReq, stream, &out, 1, written) != 0) {
            c->admin->closeClient(c);
        }
    };
    if (uv_read_start(reinterpret_cast<uv_stream_t *>(&client->tcp), alloc, read) != 0) {
        closeClient(client);
    }
}

void Admin::closeClient(Client *client) {
    if (client->closing) {
        return;
    }
    client->closing = true;
    const auto closed = [](uv_handle_t *handle) {
        auto *c = static_cast<Client *>(handle->data);
        if (--c->openHandles == 0) {
            c->admin->clientClosed(c);
        }
    };
    net::closeSocket(reinterpret_cast<uv_handle_t *>(&client->tcp), closed);
    uv_close(reinterpret_cast<uv_handle_t *>(&client->timer), closed);
}

void Admin::clientClosed(Client *client) {
    if (client->onReserve && !closing_) {
        reserve_.take(); // its socket is closed: take the slot back
    }
    clients_.erase(client);
    delete client;
    maybeDone();
}

std::string Admin::respond(const HttpRequest &request) const {
    if (request.state != HttpRequest::State::complete) {
        const int status = request.status != 0 ? request.status : 400;
        return httpResponse(status, "text/plain; charset=utf-8",
                            std::string(reasonPhrase(status)) + "\n");
    }
    const bool head = request.method == "HEAD";
    if (request.path == "/ready") {
        return draining_ ? httpResponse(503, "text/plain; charset=utf-8", "draining\n", head)
                         : httpResponse(200, "text/plain; charset=utf-8", "ready\n", head);
    }
    if (request.path != "/metrics" && request.path != "/status") {
        return httpResponse(404, "text/plain; charset=utf-8",
                            "not found; try /metrics, /status or /ready\n", head);
    }
    StatusView view;
    view.version = SLUICE_VERSION;
    view.openssl = tls::openSslVersion();
    view.draining = draining_;
    view.nowUnixSeconds = std::chrono::duration_cast<std::chrono::seconds>(
                              std::chrono::system_clock::now().time_since_epoch())
                              .count();
    if (source_.certificates) {
        view.certificates = source_.certificates();
    }
    if (source_.backends) {
        view.backends = source_.backends();
    }
    const proxy::StatsSnapshot stats = proxy::stats().snapshot();
    if (request.path == "/metrics") {
        return httpResponse(200, "text/plain; version=0.0.4; charset=utf-8",
                            renderMetrics(stats, view), head);
    }
    if (source_.listeners) {
        view.listeners = source_.listeners();
    }
    return httpResponse(200, "application/json", renderStatus(stats, view) + "\n", head);
}

void Admin::close(std::function<void()> done) {
    if (closing_) {
        if (done) {
            done_ = std::move(done);
        }
        return;
    }
    closing_ = true;
    done_ = std::move(done);
    for (Client *client : std::vector<Client *>(clients_.begin(), clients_.end())) {
        closeClient(client);
    }
    if (restTimer_ != nullptr) {
        net::freeTimer(restTimer_);
        restTimer_ = nullptr;
    }
    reserve_.give();
    if (poll_ == nullptr) {
        // Never started: report completion from the loop all the same, never from this call.
        auto *idle = new uv_idle_t;
        uv_idle_init(loop_, idle);
        idle->data = this;
        uv_idle_start(idle, [](uv_idle_t *handle) {
            uv_idle_stop(handle);
            uv_close(reinterpret_cast<uv_handle_t *>(handle), [](uv_handle_t *h) {
                auto *self = static_cast<Admin *>(h->data);
                delete reinterpret_cast<uv_idle_t *>(h);
                self->listenerClosed_ = true;
                self->maybeDone();
            });
        });
        return;
    }
    uv_close(reinterpret_cast<uv_handle_t *>(poll_), [](uv_handle_t *handle) {
        auto *self = static_cast<Admin *>(handle->data);
        delete reinterpret_cast<uv_poll_t *>(handle);
        self->poll_ = nullptr;
        ::close(self->fd_); // after the poll handle, which watched it
        self->fd_ = -1;
        self->listenerClosed_ = true;
        self->maybeDone();
    });
}

void Admin::maybeDone() {
    if (!closing_ || !listenerClosed_ || !clients_.empty() || doneScheduled_) {
        return;
    }
    doneScheduled_ = true;
    if (auto done = std::move(done_)) {
        done();
    }
}

} // namespace sluice::ops
