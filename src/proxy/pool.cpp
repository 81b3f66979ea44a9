#include "proxy/pool.hpp"

#include <arpa/inet.h>
#include <limits>
#include <stdexcept>

namespace sluice::proxy {
namespace {

constexpr auto relaxed = std::memory_order_relaxed;

bool isIpLiteral(const std::string &host) {
    unsigned char buffer[16];
    return inet_pton(AF_INET, host.c_str(), buffer) == 1 ||
           inet_pton(AF_INET6, host.c_str(), buffer) == 1;
}

} // namespace

PoolServer::PoolServer(Address address, net::SocketAddress resolved)
    : address_(std::move(address))
    , text_(address_.text())
    , resolved_(std::move(resolved)) {}

net::SocketAddress PoolServer::resolved() const {
    std::lock_guard lock(mutex_);
    return resolved_;
}

void PoolServer::setResolved(net::SocketAddress resolved) {
    std::lock_guard lock(mutex_);
    resolved_ = std::move(resolved);
}

Pool::Pool(const BackendConfig &config, const HandlerFactory *handler, bool builtinKdf)
    : config_(config) {
    if (!config_.handler.empty()) {
        if (handler == nullptr || !*handler) {
            throw std::runtime_error("backend " + config_.name + ": no handler registered as " +
                                     config_.handler);
        }
        handler_ = *handler;
        return;
    }
    if (config_.servers.empty()) {
        throw std::runtime_error("backend " + config_.name + ": no servers");
    }
    for (const auto &address : config_.servers) {
        net::SocketAddress resolved;
        try {
            resolved = net::resolve(address);
        } catch (const std::exception &e) {
            throw std::runtime_error("backend " + config_.name + ": " + e.what());
        }
        servers_.push_back(std::make_unique<PoolServer>(address, std::move(resolved)));
        std::string name = config_.tls.serverName;
        if (name.empty() && address.kind == Address::Kind::tcp && !isIpLiteral(address.host)) {
            name = address.host;
        }
        serverNames_.push_back(std::move(name));
    }
    if (config_.tls.enabled) {
        tls::ClientContextOptions options;
        options.caFile = config_.tls.ca;
        options.verify = config_.tls.verify;
        options.policy.minVersion = config_.tls.minVersion;
        options.policy.maxVersion = config_.tls.maxVersion;
        options.certFile = config_.tls.cert;
        options.keyFile = config_.tls.key;
        options.alpn = config_.tls.alpn;
        options.builtinKdf = builtinKdf;
        try {
            tls_ = tls::makeClientContext(options);
        } catch (const std::exception &e) {
            throw std::runtime_error("backend " + config_.name + ": tls: " + e.what());
        }
    }
}

std::size_t Pool::attemptLimit() const {
    return config_.attempts == 0 ? servers_.size()
                                 : std::min<std::size_t>(config_.attempts, servers_.size());
}

int Pool::pick(const TriedServers &tried, std::uint64_t nowMs) {
    const std::size_t count = servers_.size();
    if (count == 0) {
        return -1;
    }
    const std::size_t start =
        config_.balance == Balance::first ? 0 : next_.fetch_add(1, relaxed) % count;
    int best = -1;
    std::uint64_t bestActive = std::numeric_limits<std::uint64_t>::max();
    for (std::size_t step = 0; step < count; ++step) {
        const std::size_t i = (start + step) % count;
        if (tried[i] || servers_[i]->downUntil.load(relaxed) > nowMs) {
            continue;
        }
        if (config_.balance != Balance::leastConnections) {
            return static_cast<int>(i);
        }
        const std::uint64_t active = servers_[i]->active.load(relaxed);
        if (active < bestActive) {
            best = static_cast<int>(i);
            bestActive = active;
        }
    }
    if (best >= 0) {
        return best;
    }
    // Every untried server is down: trying the one that comes back first beats failing outright.
    std::uint64_t soonest = std::numeric_limits<std::uint64_t>::max();
    for (std::size_t i = 0; i < count; ++i) {
        const std::uint64_t until = servers_[i]->downUntil.load(relaxed);
        if (!tried[i] && until < soonest) {
            best = static_cast<int>(i);
            soonest = until;
        }
    }
    return best;
}

HealthChange Pool::succeeded(std::size_t index) {
    PoolServer &server = *servers_[index];
    server.connects.fetch_add(1, relaxed);
    server.failures.store(0, relaxed);
    return server.downUntil.exchange(0, relaxed) != 0 ? HealthChange::recovered
                                                      : HealthChange::none;
}

HealthChange Pool::failed(std::size_t index, std::uint64_t nowMs) {
    PoolServer &server = *servers_[index];
    server.connectFailures.fetch_add(1, relaxed);
    const std::uint32_t failures = server.failures.fetch_add(1, relaxed) + 1;
    if (config_.maxFails == 0 || failures < config_.maxFails) {
        return HealthChange::none;
    }
    const auto until = nowMs + static_cast<std::uint64_t>(config_.failTimeout.count());
    const std::uint64_t previous = server.downUntil.exchange(until, relaxed);
    return previous <= nowMs ? HealthChange::markedDown : HealthChange::none;
}

std::vector<std::string> Pool::resolveAgain() {
    std::vector<std::string> failures;
    for (auto &server : servers_) {
        const Address &address = server->address();
        if (address.kind != Address::Kind::tcp || isIpLiteral(address.host)) {
            continue;
        }
        try {
            server->setResolved(net::resolve(address));
        } catch (const std::exception &e) {
            failures.push_back("backend " + config_.name + ": " + e.what());
        }
    }
    return failures;
}

} // namespace sluice::proxy
