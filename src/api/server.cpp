// api/server: sluice::Server, the embeddable face of proxy::Server. It adds what the daemon's main
// loop adds around its workers: a state machine that turns misuse into errors, the building and
// swapping of generations (proxy/generation, shared with the daemon's SIGHUP reload), the backend
// re-resolver, and completion callbacks that run once and never re-entrantly.

#include "proxy/server.hpp"

#include <algorithm>
#include <exception>
#include <map>
#include <unistd.h>

#include <uv.h>

#include <sluice/server.hpp>

#include "proxy/client_limits.hpp"
#include "proxy/generation.hpp"
#include "proxy/resolver.hpp"
#include "proxy/stats.hpp"
#include "util/log.hpp"

namespace sluice {
namespace {

/** `what` and the reason, as one line. */
/**
 * Completes and checks a configuration that may have been built in code, where loadConfig()'s
 * checks never ran: a listener without a name takes its first address's text, as in a file, and
 * a `backend` that names no [backend] but holds an address becomes a backend of its own named by
 * the address. Throws sluice::Error naming the listener.
 */
void complete(Config &config) {
    if (config.listeners.empty()) {
        throw Error("the configuration has no listener");
    }
    auto backendFor = [&config](const std::string &listener, const std::string &text) {
        if (text.empty()) {
            throw Error("listener " + listener + ": no backend");
        }
        if (config.findBackend(text) != nullptr || text.find(':') == std::string::npos) {
            return text; // a name: buildRuntime() reports one that does not exist
        }
        Address address;
        try {
            address = parseAddress(text);
        } catch (const std::exception &e) {
            throw Error("listener " + listener + ": backend: " + e.what());
        }
        const std::string name = address.text();
        if (config.findBackend(name) == nullptr) {
            BackendConfig implicit;
            implicit.name = name;
            implicit.servers.push_back(std::move(address));
            config.backends.push_back(std::move(implicit));
        }
        return name;
    };
    std::vector<std::string> names;
    for (auto &listener : config.listeners) {
        if (listener.listen.empty()) {
            throw Error("listener " +
                        (listener.name.empty() ? std::string("(unnamed)") : listener.name) +
                        ": no listen address");
        }
        if (listener.name.empty()) {
            listener.name = listener.listen.front().text();
        }
        if (std::find(names.begin(), names.end(), listener.name) != names.end()) {
            throw Error("duplicate listener name " + listener.name);
        }
        names.push_back(listener.name);
        if (!listener.plaintext && listener.certificates.empty() &&
            listener.certificatesDir.empty()) {
            throw Error("listener " + listener.name + ": no certificate");
        }
        listener.backend = backendFor(listener.name, listener.backend);
        for (auto &route : listener.routes) {
            route.backend = backendFor(listener.name, route.backend);
        }
    }
}

/** Runs `work`, turning any exception into sluice::Error (which passes through unchanged). */
template <typename Work>
auto asError(Work &&work) -> decltype(work()) {
    try {
        return work();
    } catch (const Error &) {
        throw;
    } catch (const std::exception &e) {
        throw Error(e.what());
    }
}

} // namespace

// Hidden, although nested in an exported class: the Impl is no part of the ABI.
struct __attribute__((visibility("hidden"))) Server::Impl {
    enum class State { idle, running, closing, closed };

    uv_loop_t *loop;
    Config config;
    State state = State::idle;
    bool stopRequested = false;
    // Set by ~Server when it gives up the Impl before closing completed: finish() deletes it.
    bool orphaned = false;
    // The per-address handshake record, shared with other Servers through a HandshakeLimits.
    std::shared_ptr<proxy::ClientLimits> limits;
    // This Server's counters (stats()), shared with its proxy::Server, which may outlive the
    // Impl when start() abandons it.
    std::shared_ptr<proxy::Stats> metrics = std::make_shared<proxy::Stats>();
    std::unique_ptr<proxy::Server> server;
    std::unique_ptr<proxy::Resolver> resolver;
    proxy::ListenState listening;
    std::vector<std::function<void(bool)>> done; // drain()'s and stop()'s, in call order

    Impl(uv_loop_t *l, Config c, std::shared_ptr<proxy::ClientLimits> shared)
        : loop(l)
        , config(std::move(c))
        , limits(std::move(shared)) {}

    // In-process stream handlers by name (setHandler), for backends with a `handler`; every
    // generation is built with them.
    std::map<std::string, HandlerFactory> handlerFactories;
    const std::map<std::string, HandlerFactory> *handlers() const { return &handlerFactories; }

    void start();
    bool reload(Config next, std::string *error);
    bool close(bool now, std::function<void(bool)> callback);
    void finish(bool forced);
};

void Server::Impl::start() {
    if (state != State::idle) {
        throw Error(state == State::running ? "start: the server is already running"
                                            : "start: the server has been stopped");
    }
    Config completed = config;
    complete(completed);
    log::setLevel(completed.global.logLevel);
    proxy::Generation generation = asError(
        [&] { return proxy::buildGeneration(completed, 1, proxy::ListenState{}, {}, handlers()); });
    auto built = std::make_unique<proxy::Server>(loop, generation.runtime, limits, metrics);
    std::vector<proxy::ListenSocket> &sockets = generation.added.front();
    for (std::size_t i = 0; i < sockets.size(); ++i) {
        try {
            built->listen({sockets[i]});
        } catch (const std::exception &e) {
            // The listener that failed closed its own descriptor; close the ones not reached,
            // and let the server close the listeners it has (their handles close on the loop).
            for (std::size_t j = i + 1; j < sockets.size(); ++j) {
                ::close(sockets[j].fd);
            }
            proxy::Server *abandoned = built.release();
            abandoned->stop([abandoned](bool) { delete abandoned; });
            throw Error("listener " + sockets[i].name + ": " + e.what());
        }
    }
    server = std::move(built);
    resolver = std::make_unique<proxy::Resolver>(loop);
    resolver->watch(generation.runtime);
    listening = std::move(generation.state);
    config = std::move(completed);
    state = State::running;
    for (const auto &[name, address] : listening.bound()) {
        log::info("listening listener=" + name + " address=" + address);
    }
}

bool Server::Impl::reload(Config next, std::string *error) {
    auto fail = [error](const std::string &reason) {
        if (error != nullptr) {
            *error = reason;
        }
        return false;
    };
    if (state != State::running) {
        return fail(state == State::idle ? "reload: the server is not started"
                                         : "reload: the server is stopping or stopped");
    }
    proxy::Generation generation;
    try {
        complete(next);
        generation = proxy::buildGeneration(next, 1, listening, {}, handlers());
    } catch (const std::exception &e) {
        metrics->recordReload(false, e.what());
        log::error("reload-failed reason=" + log::quoted(e.what()) +
                   " action=\"kept the running configuration\"");
        return fail(e.what());
    }
    for (const auto &socket : generation.added.front()) {
        log::info("listening listener=" + socket.name + " address=" + net::localText(socket.fd));
    }
    server->update(generation.runtime, std::move(generation.added.front()), generation.removed);
    resolver->watch(generation.runtime);
    listening = std::move(generation.state);
    config = std::move(next);
    log::setLevel(config.global.logLevel);
    metrics->recordReload(true, "listeners=" + std::to_string(config.listeners.size()));
    log::info("reload-done listeners=" + std::to_string(config.listeners.size()) +
              " sockets_added=" + std::to_string(generation.addedCount) +
              " sockets_removed=" + std::to_string(generation.removed.size()));
    return true;
}

bool Server::Impl::close(bool now, std::function<void(bool)> callback) {
    if (state == State::running) {
        state = State::closing;
        stopRequested = now;
        if (callback) {
            done.push_back(std::move(callback));
        }
        // Nothing resolves while closing; the resolver's timer closes before the drain ends.
        resolver->close();
        auto finished = [this](bool forced) { finish(forced); };
        if (now) {
            server->stop(finished);
        } else {
            server->drain(finished);
        }
        return true;
    }
    if (state == State::closing && now && !stopRequested) {
        // A stop during a drain cuts the connections now; the drain's callback stays in place.
        stopRequested = true;
        if (callback) {
            done.push_back(std::move(callback));
        }
        server->stop(nullptr);
        return true;
    }
    return false;
}

void Server::Impl::finish(bool forced) {
    state = State::closed;
    listening = {};
    // Called from proxy::Server's last close callback, which touches nothing after it returns:
    // a callback may destroy the sluice::Server (and with it this Impl), so nothing here uses
    // `this` once the callbacks start.
    auto callbacks = std::move(done);
    done.clear();
    if (orphaned) {
        delete this;
        return;
    }
    for (auto &callback : callbacks) {
        callback(forced);
    }
}

// Hidden, as Server::Impl: a HandshakeLimits is a shared pointer to one record.
struct __attribute__((visibility("hidden"))) HandshakeLimits::Impl {
    proxy::ClientLimits record;
};

HandshakeLimits::HandshakeLimits()
    : impl_(std::make_shared<Impl>()) {}

std::size_t HandshakeLimits::addressesInProgress() const {
    return impl_->record.addressesInProgress();
}

Server::Server(uv_loop_t *loop, Config config)
    : Server(loop, std::move(config), HandshakeLimits()) {}

Server::Server(uv_loop_t *loop, Config config, HandshakeLimits limits)
    : impl_(std::make_unique<Impl>(
          loop, std::move(config),
          // The record, kept alive by the HandshakeLimits' own shared pointer.
          std::shared_ptr<proxy::ClientLimits>(limits.impl_, &limits.impl_->record))) {}

Server::~Server() {
    if (!impl_) {
        return;
    }
    if (impl_->state == Impl::State::running || impl_->state == Impl::State::closing) {
        // The loop still owns handles that point into the Impl: it lives until they are closed,
        // and finish() deletes it.
        Impl *impl = impl_.release();
        impl->done.clear();
        impl->orphaned = true;
        if (!impl->stopRequested) {
            impl->close(true, nullptr);
        }
    }
}

Server::Server(Server &&other) noexcept = default;

Server &Server::operator=(Server &&other) noexcept {
    if (this != &other) {
        Server gone(std::move(*this));
        impl_ = std::move(other.impl_);
    }
    return *this;
}

void Server::start() {
    if (!impl_) {
        throw Error("start: the server was moved from");
    }
    impl_->start();
}

std::vector<std::pair<std::string, std::string>> Server::addresses() const {
    if (!impl_ || impl_->state != Impl::State::running) {
        return {};
    }
    return impl_->server->boundAddresses();
}

bool Server::reload(Config config, std::string *error) {
    if (!impl_) {
        if (error != nullptr) {
            *error = "reload: the server was moved from";
        }
        return false;
    }
    return impl_->reload(std::move(config), error);
}

bool Server::drain(std::function<void(bool forced)> done) {
    return impl_ && impl_->close(false, std::move(done));
}

bool Server::stop(std::function<void(bool forced)> done) {
    return impl_ && impl_->close(true, std::move(done));
}

void Server::setHandler(const std::string &name, HandlerFactory factory) {
    if (!impl_) {
        return;
    }
    if (factory) {
        impl_->handlerFactories[name] = std::move(factory);
    } else {
        impl_->handlerFactories.erase(name);
    }
}

bool Server::running() const {
    return impl_ && impl_->state == Impl::State::running;
}

const Config &Server::config() const {
    static const Config empty;
    return impl_ ? impl_->config : empty;
}

uv_loop_t *Server::loop() const {
    return impl_ ? impl_->loop : nullptr;
}

ServerStats Server::stats() const {
    // A moved-from Server has counted nothing.
    const proxy::StatsSnapshot snapshot =
        impl_ ? impl_->metrics->snapshot() : proxy::StatsSnapshot{};
    auto handshakes = [&snapshot](proxy::HandshakeResult result) {
        return snapshot.handshakes[static_cast<std::size_t>(result)];
    };
    ServerStats out;
    out.accepted = snapshot.accepted;
    out.active = snapshot.active;
    out.handshakesOk = handshakes(proxy::HandshakeResult::ok);
    out.handshakesResumed = snapshot.resumed;
    out.handshakesFailed = handshakes(proxy::HandshakeResult::failed);
    out.handshakesTimedOut = handshakes(proxy::HandshakeResult::timeout);
    out.handshakesAborted = handshakes(proxy::HandshakeResult::aborted);
    out.bytesClientToBackend = snapshot.bytesClientToBackend;
    out.bytesBackendToClient = snapshot.bytesBackendToClient;
    out.backendConnectFailures = snapshot.backendConnectFailures;
    out.acceptErrors = snapshot.acceptErrors;
    out.handshakeLimited = snapshot.handshakeLimited;
    out.handshakeRateLimited = snapshot.handshakeRateLimited;
    out.proxySourceRefused = snapshot.proxySourceRefused;
    out.reloadsOk = snapshot.reloadsOk;
    out.reloadsFailed = snapshot.reloadsFailed;
    out.lastReloadOk = snapshot.lastReloadOk;
    out.lastReloadMessage = snapshot.lastReloadMessage;
    for (std::size_t i = 0; i < proxy::closeReasonCount; ++i) {
        out.closed.emplace_back(
            std::string(proxy::closeReasonName(static_cast<proxy::CloseReason>(i))),
            snapshot.closed[i]);
    }
    return out;
}

} // namespace sluice
