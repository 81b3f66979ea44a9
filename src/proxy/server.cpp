#include "proxy/server.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <netinet/in.h>
#include <stdexcept>
#include <sys/socket.h>
#include <unistd.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include "net/timer.hpp"
#include "proxy/connection.hpp"
#include "proxy/listener.hpp"
#include "proxy/proxy_protocol.hpp"
#include "proxy/stats.hpp"
#include "tls/names.hpp"
#include "util/log.hpp"

namespace sluice::proxy {

std::shared_ptr<const ListenerSettings> Runtime::find(const std::string &name) const {
    for (const auto &settings : listeners) {
        if (settings->name == name) {
            return settings;
        }
    }
    return nullptr;
}

const PoolPtr &ListenerSettings::route(std::string_view sni, std::string_view alpn) const {
    for (const auto &entry : routes) {
        if ((entry.sni.empty() || tls::matchDnsName(entry.sni, sni)) &&
            (entry.alpn.empty() || entry.alpn == alpn)) {
            return entry.pool;
        }
    }
    return pool;
}

bool ListenerSettings::proxySourceAllowed(const sockaddr *address) const {
    for (const auto &network : acceptProxyFrom) {
        if (networkContains(network, address)) {
            return true;
        }
    }
    return false;
}

std::shared_ptr<const Runtime> buildRuntime(const Config &config, unsigned workers,
                                            const std::map<std::string, HandlerFactory> *handlers) {
    workers = std::max(1U, workers);
    auto runtime = std::make_shared<Runtime>();
    // Each worker admits its share of the limits; rounding up never admits fewer in total.
    auto share = [workers](std::uint64_t limit) -> std::uint64_t {
        return limit == 0 ? 0 : (limit + workers - 1) / workers;
    };
    runtime->maxConnections = share(config.global.maxConnections);
    runtime->drainTimeout = config.global.drainTimeout;
    runtime->releaseMemoryAfter = config.global.releaseMemoryAfter;
    runtime->maxHandshakesPerIp = config.global.maxHandshakesPerIp;
    runtime->maxHandshakeRatePerIp = config.global.maxHandshakeRatePerIp;
    for (const auto &backend : config.backends) {
        const HandlerFactory *handler = nullptr;
        if (!backend.handler.empty() && handlers != nullptr) {
            if (auto found = handlers->find(backend.handler); found != handlers->end()) {
                handler = &found->second;
            }
        }
        runtime->pools.push_back(
            std::make_shared<Pool>(backend, handler, config.global.builtinKdf));
    }
    auto poolNamed = [&](const std::string &listener, const std::string &name) -> PoolPtr {
        for (const auto &pool : runtime->pools) {
            if (pool->name() == name) {
                return pool;
            }
        }
        throw std::runtime_error("listener " + listener + ": no backend named " + name);
    };
    for (const auto &listener : config.listeners) {
        auto settings = std::make_shared<ListenerSettings>();
        settings->name = listener.name;
        if (!listener.plaintext) {
            settings->context = tls::serverContextFor(listener, config.global.builtinKdf);
        }
        settings->plaintext = listener.plaintext;
        settings->pool = poolNamed(listener.name, listener.backend);
        settings->backendText = listener.backend;
        for (const auto &route : listener.routes) {
            settings->routes.push_back(
                RouteEntry{route.sni, route.alpn, poolNamed(listener.name, route.backend)});
        }
        for (const auto &network : listener.acceptProxyFrom) {
            try {
                settings->acceptProxyFrom.push_back(parseNetwork(network));
            } catch (const std::exception &e) {
                throw std::runtime_error("listener " + listener.name +
                                         ": accept_proxy_from: " + e.what());
            }
        }
        settings->socket = listener.socket;
        settings->timeouts = listener.timeouts;
        settings->buffers = config.global.buffers;
        settings->maxConnections = share(listener.maxConnections);
        settings->backlog = listener.backlog;
        runtime->listeners.push_back(std::move(settings));
    }
    return runtime;
}

Server::Server(uv_loop_t *loop, std::shared_ptr<const Runtime> runtime,
               std::shared_ptr<ClientLimits> limits, std::shared_ptr<Stats> metrics)
    : loop_(loop)
    , runtime_(std::move(runtime))
    , limits_(limits ? std::move(limits) : std::make_shared<ClientLimits>())
    // The process's Stats lives as long as the process: held without an owner.
    , metrics_(metrics ? std::move(metrics)
                       : std::shared_ptr<Stats>(std::shared_ptr<Stats>(), &proxy::stats()))
    , deadlines_(loop, &Connection::fireDeadline)
    , warm_(warmBudget, &Connection::releaseBuffers) {
    reserve_.take();
}

Server::~Server() {
    closeBackgroundTimers(); // a Server destroyed without its drain
}

std::size_t Server::shedWaiting(int listenFd) {
    // The spare's slot makes room for the accepts. When it is not held (another worker took
    // its slot last time), the first accept fails with EMFILE and nothing is shed.
    reserve_.give();
    // The backlog bounds what waits; the cap bounds a flood that keeps arriving meanwhile.
    constexpr std::size_t shedCap = 4096;
    std::size_t shed = 0;
    while (shed < shedCap) {
        const int fd = ::accept4(listenFd, nullptr, nullptr, SOCK_CLOEXEC);
        if (fd >= 0) {
            ::close(fd);
            ++shed;
        } else if (errno != EINTR && errno != ECONNABORTED) {
            break; // EAGAIN: none left; anything else: the next readiness event retries
        }
    }
    reserve_.take();
    return shed;
}

uv_timer_t *Server::backgroundTimer(uv_timer_t *&timer) {
    if (timer == nullptr) {
        timer = net::newTimer(loop_, this);
        // Releasing memory is no reason to keep the loop running.
        uv_unref(reinterpret_cast<uv_handle_t *>(timer));
    }
    return timer;
}

void Server::closeBackgroundTimers() {
    for (uv_timer_t **timer : {&quietTimer_, &sweepTimer_}) {
        if (*timer != nullptr) {
            net::freeTimer(*timer);
            *timer = nullptr;
        }
    }
    if (writeCheck_ != nullptr) {
        net::freeHandle(writeCheck_);
        writeCheck_ = nullptr;
    }
}

void Server::adopt(ListenSocket socket) {
    auto settings = runtime_->find(socket.name);
    if (!settings) {
        ::close(socket.fd);
        throw std::runtime_error("listen " + socket.key + ": no listener named " + socket.name);
    }
    auto listener = std::make_unique<Listener>(*this, socket.key, std::move(settings));
    Listener &added = *listener;
    // Owned before adopting, so a failure still closes its handle with the others.
    listeners_.push_back(std::move(listener));
    added.adopt(socket.fd);
}

void Server::listen(std::vector<ListenSocket> sockets) {
    for (auto &socket : sockets) {
        adopt(std::move(socket));
    }
}

void Server::update(std::shared_ptr<const Runtime> runtime, std::vector<ListenSocket> added,
                    const std::vector<std::string> &removed) {
    runtime_ = std::move(runtime);
    if (runtime_->maxHandshakeRatePerIp == 0) {
        limits_->forgetRates(); // nothing takes a token, so nothing would prune them
    }
    for (auto it = listeners_.begin(); it != listeners_.end();) {
        if (std::find(removed.begin(), removed.end(), (*it)->key()) != removed.end()) {
            auto listener = std::move(*it);
            it = listeners_.erase(it);
            listener->acceptQueued(); // as a drain does: what waits is served, not reset
            closeListener(std::move(listener));
            continue;
        }
        if (auto settings = runtime_->find((*it)->name())) {
            (*it)->setSettings(std::move(settings));
        }
        ++it;
    }
    for (auto &socket : added) {
        try {
            adopt(std::move(socket));
        } catch (const std::exception &e) {
            log::error("reload-listen-failed reason=" + log::quoted(e.what()));
        }
    }
}

std::vector<std::pair<std::string, std::string>> Server::boundAddresses() const {
    std::vector<std::pair<std::string, std::string>> out;
    for (const auto &listener : listeners_) {
        out.emplace_back(listener->name(), listener->boundText());
    }
    return out;
}

bool Server::admits(const ListenerSettings &settings) const {
    if (draining_ || stats_.active >= runtime_->maxConnections) {
        return false;
    }
    if (settings.maxConnections == 0) {
        return true;
    }
    auto found = perListener_.find(settings.name);
    return found == perListener_.end() || found->second < settings.maxConnections;
}

std::string clientIpKey(int fd) {
    sockaddr_storage storage{};
    socklen_t length = sizeof storage;
    if (::getpeername(fd, reinterpret_cast<sockaddr *>(&storage), &length) != 0) {
        return {};
    }
    return clientIpKey(reinterpret_cast<const sockaddr *>(&storage));
}

std::string clientIpKey(const sockaddr *address) {
    // Only sa_family is read through the generic type; the address is copied out of its own
    // type (the caller's storage may be a smaller, less aligned union).
    if (address->sa_family == AF_INET) {
        sockaddr_in in{};
        std::memcpy(&in, address, sizeof in);
        return std::string("4") +
               std::string(reinterpret_cast<const char *>(&in.sin_addr), sizeof in.sin_addr);
    }
    if (address->sa_family == AF_INET6) {
        sockaddr_in6 in6{};
        std::memcpy(&in6, address, sizeof in6);
        const auto *bytes = reinterpret_cast<const char *>(&in6.sin6_addr);
        if (IN6_IS_ADDR_V4MAPPED(&in6.sin6_addr)) {
            return std::string("4") + std::string(bytes + 12, 4);
        }
        return std::string("6") + std::string(bytes, 8); // the /64
    }
    return {};
}

Server::HandshakeAdmission Server::handshakeStarting(const std::string &ipKey) {
    if (ipKey.empty()) {
        return HandshakeAdmission::admitted;
    }
    // Counted with the limits off too, so that a reload turning them on finds the handshakes
    // already in progress.
    const auto admission =
        limits_->starting(ipKey, runtime_->maxHandshakesPerIp, runtime_->maxHandshakeRatePerIp);
    if (admission == HandshakeAdmission::tooMany) {
        metrics().handshakeLimited();
    } else if (admission == HandshakeAdmission::tooFast) {
        metrics().handshakeRateLimited();
    }
    return admission;
}

void Server::handshakeEnded(const std::string &ipKey) {
    limits_->ended(ipKey);
}

void Server::connectionOpened(Connection *connection, const ListenerSettings &settings) {
    connection->prevInServer_ = nullptr;
    connection->nextInServer_ = connections_;
    if (connections_ != nullptr) {
        connections_->prevInServer_ = connection;
    }
    connections_ = connection;
    perListener_[settings.name]++;
    stats_.active++;
    peakConnections_ = std::max(peakConnections_, stats_.active);
    noteActivity();
}

void Server::connectionClosed(Connection *connection, const ListenerSettings &settings) {
    if (connection->prevInServer_ != nullptr) {
        connection->prevInServer_->nextInServer_ = connection->nextInServer_;
    } else {
        connections_ = connection->nextInServer_;
    }
    if (connection->nextInServer_ != nullptr) {
        connection->nextInServer_->prevInServer_ = connection->prevInServer_;
    }
    connection->prevInServer_ = connection->nextInServer_ = nullptr;
    if (--perListener_[settings.name] == 0) {
        perListener_.erase(settings.name);
    }
    stats_.active--;
    noteActivity();
    if (!draining_) {
        for (auto &listener : listeners_) {
            listener->retryAccept();
        }
    }
    checkDrained();
}

void Server::closeListener(std::unique_ptr<Listener> listener) {
    ++closingHandles_;
    Listener *raw = listener.release();
    // The listener owns its handle until the close callback; it deletes itself there.
    raw->close([this, raw] {
        delete raw;
        --closingHandles_;
        checkDrained();
    });
}

void Server::drain(std::function<void(bool forced)> done) {
    if (!draining_) {
        beginDrain(std::move(done), true);
    }
}

void Server::beginDrain(std::function<void(bool forced)> done, bool serveQueued) {
    // Connections in a listener's queue completed their TCP handshake while sluice listened,
    // and closing the socket would reset them. A drain serves them like the live ones, each
    // listener's just before it closes (while admits() still counts them against the limits); a
    // stop does not accept what it would only cut.
    std::size_t queued = 0;
    auto listeners = std::move(listeners_);
    listeners_.clear();
    for (auto &listener : listeners) {
        if (serveQueued) {
            queued += listener->acceptQueued();
        }
        closeListener(std::move(listener));
    }
    draining_ = true;
    drained_ = std::move(done);
    log::info("drain-start connections=" + std::to_string(stats_.active) +
              " queued=" + std::to_string(queued) +
              " timeout_ms=" + std::to_string(runtime_->drainTimeout.count()));
    drainTimer_ = net::newTimer(loop_, this);
    if (runtime_->drainTimeout.count() > 0) {
        uv_timer_start(drainTimer_, onDrainTimer,
                       static_cast<std::uint64_t>(runtime_->drainTimeout.count()), 0);
    }
    checkDrained();
}

void Server::stop(std::function<void(bool forced)> done) {
    if (!draining_) {
        beginDrain(std::move(done), false);
    } else if (done) {
        drained_ = std::move(done);
    }
    if (connections_ != nullptr) {
        onDrainTimer(drainTimer_);
    }
}

void Server::onDrainTimer(uv_timer_t *timer) {
    auto *self = static_cast<Server *>(timer->data);
    if (self->connections_ == nullptr) {
        return;
    }
    self->forced_ = true;
    log::warn("drain-deadline connections=" + std::to_string(self->stats_.active));
    // abort() only starts closing; connections leave the set from their close callbacks.
    std::vector<Connection *> live;
    live.reserve(self->stats_.active);
    for (Connection *c = self->connections_; c != nullptr; c = c->nextInServer_) {
        live.push_back(c);
    }
    for (Connection *connection : live) {
        connection->abort("drain deadline");
    }
}

void Server::checkDrained() {
    if (!draining_ || doneScheduled_ || connections_ != nullptr || closingHandles_ > 0 ||
        drainTimer_ == nullptr) {
        return;
    }
    doneScheduled_ = true;
    deadlines_.close();
    closeBackgroundTimers(); // no connection is left, so none is on the warm list
    // Completion is reported from the timer's close callback: after every handle is closed and
    // never inside the call that started the drain.
    uv_close(reinterpret_cast<uv_handle_t *>(drainTimer_), [](uv_handle_t *handle) {
        auto *self = static_cast<Server *>(handle->data);
        delete reinterpret_cast<uv_timer_t *>(handle);
        self->drainTimer_ = nullptr;
        log::info(std::string("drain-done forced=") + (self->forced_ ? "yes" : "no"));
        if (auto done = std::move(self->drained_)) {
            done(self->forced_);
        }
    });
}

// --- Buffers of busy connections ---------------------------------------------------------------

bool Server::keepBuffers(Connection &connection, std::size_t bytes) {
    if (doneScheduled_ || !warm_.keep(connection, bytes)) {
        return false;
    }
    uv_timer_t *timer = backgroundTimer(sweepTimer_);
    if (uv_is_active(reinterpret_cast<uv_handle_t *>(timer)) == 0) {
        uv_timer_start(timer, onSweep, sweepInterval, sweepInterval);
    }
    return true;
}

void Server::forgetBuffers(Connection &connection) {
    warm_.remove(connection);
}

void Server::holdWrites(Connection &connection) {
    if (writeCheck_ == nullptr) {
        writeCheck_ = net::newCheck(loop_, this);
        uv_unref(reinterpret_cast<uv_handle_t *>(writeCheck_)); // the connection keeps the loop
    }
    heldWrites_.push_back(&connection);
    if (uv_is_active(reinterpret_cast<uv_handle_t *>(writeCheck_)) == 0) {
        uv_check_start(writeCheck_, onWriteCheck);
    }
}

void Server::forgetHeldWrites(Connection &connection) {
    std::replace(heldWrites_.begin(), heldWrites_.end(), &connection,
                 static_cast<Connection *>(nullptr));
}

void Server::onWriteCheck(uv_check_t *check) {
    auto *self = static_cast<Server *>(check->data);
    // By index: a release that closes a connection turns its entry null (forgetHeldWrites()).
    // Writes are held only in read callbacks, in the poll phase, so none is added here.
    for (std::size_t i = 0; i < self->heldWrites_.size(); ++i) {
        if (Connection *connection = self->heldWrites_[i]) {
            connection->releaseWrites();
        }
    }
    self->heldWrites_.clear();
    uv_check_stop(check);
}

void Server::onSweep(uv_timer_t *timer) {
    auto *self = static_cast<Server *>(timer->data);
    if (self->warm_.sweep() > 0) {
        self->noteActivity(); // memory went back to the heap: to the system once quiet
    }
    if (self->warm_.empty()) {
        uv_timer_stop(timer);
    }
}

// --- Memory after a burst ----------------------------------------------------------------------
//
// A burst of handshakes leaves the heap with free memory between the chunks still in use (the
// engines' buffers and OpenSSL's handshake state, freed when the handshakes end): resident,
// but used by nobody. Once the burst is over, malloc_trim() hands its free pages back. The
// timer starts at the first activity after a quiet spell and fires at most once per interval
// while connections keep coming; under steady load it never trims. (The daemon turns glibc's
// own trimming of the heap top off when this is on: see applyMemoryPolicy().)

namespace {

/** Hands the heap's free pages back to the operating system; true if any went. */
bool releaseFreeMemory() {
#if defined(__GLIBC__)
    return malloc_trim(0) == 1;
#else
    return false;
#endif
}

} // namespace

void applyMemoryPolicy(Duration releaseAfter) {
#if defined(__GLIBC__)
    constexpr int glibcDefault = 128 * 1024; // M_TRIM_THRESHOLD and M_MMAP_THRESHOLD
    const bool on = releaseAfter.count() > 0;
    mallopt(M_TRIM_THRESHOLD, on ? std::numeric_limits<int>::max() : glibcDefault);
    mallopt(M_MMAP_THRESHOLD, on ? 4 * 1024 * 1024 : glibcDefault);
#else
    (void)releaseAfter;
#endif
}

void Server::noteActivity() {
    if (runtime_->releaseMemoryAfter.count() <= 0 || doneScheduled_) {
        return;
    }
    lastActivity_ = uv_now(loop_);
    if (quietArmed_) {
        return;
    }
    quietArmed_ = true;
    uv_timer_start(backgroundTimer(quietTimer_), onQuiet,
                   static_cast<std::uint64_t>(runtime_->releaseMemoryAfter.count()), 0);
}

void Server::onQuiet(uv_timer_t *timer) {
    auto *self = static_cast<Server *>(timer->data);
    const auto after = static_cast<std::uint64_t>(self->runtime_->releaseMemoryAfter.count());
    if (after == 0) {
        self->quietArmed_ = false; // turned off by a reload since the timer started
        return;
    }
    const std::uint64_t now = uv_now(self->loop_);
    const bool quiet = now - self->lastActivity_ >= after;
    // A busy worker is never quiet: it releases once its connections have fallen to half their
    // peak since the last release (a spike is over), checked once per interval.
    const std::uint64_t count = self->stats_.active;
    const std::uint64_t peak = self->peakConnections_;
    const bool fell = peak >= count + minimumFall && count <= peak / 2;
    if (!quiet && !fell) {
        uv_timer_start(timer, onQuiet, self->lastActivity_ + after - now, 0);
        return;
    }
    self->quietArmed_ = false;
    self->peakConnections_ = count;
    const std::uint64_t start = uv_hrtime();
    const bool released = releaseFreeMemory();
    self->metrics().memoryReleased();
    if (log::enabled(LogLevel::debug)) {
        log::debug(std::string("memory-released released=") + (released ? "yes" : "no") +
                   " connections=" + std::to_string(count) + " peak=" + std::to_string(peak) +
                   " us=" + std::to_string((uv_hrtime() - start) / 1000));
    }
}

} // namespace sluice::proxy
