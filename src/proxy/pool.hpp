// proxy/pool: one backend pool, shared by every worker of a configuration generation: its
// servers and their resolved addresses, the balancing choice, and the passive health record
// (consecutive failures mark a server down for a while). Counters are relaxed atomics, so
// workers on different threads pick and report without a lock; an address that is resolved again
// is swapped under a small mutex.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <sluice/config.hpp>
#include <sluice/stream.hpp>

#include "net/address.hpp"
#include "tls/context.hpp"

namespace sluice::proxy {

/**
 * The servers of a pool one connection has tried, a flag each: inline bits for pools of up to
 * 64 servers, so a connection allocates nothing for them; a larger pool gets a vector.
 */
class TriedServers {
public:
    explicit TriedServers(std::size_t count = 0) { reset(count); }
    ~TriedServers() { release(); }
    TriedServers(const TriedServers &) = delete;
    TriedServers &operator=(const TriedServers &) = delete;

    /** `count` servers, none tried. */
    void reset(std::size_t count) {
        release();
        if (count > 64) {
            more_ = new std::vector<bool>(count, false);
        }
        count_ = static_cast<std::uint32_t>(count); // after the vector: it says which is live
    }
    std::size_t size() const { return count_; }
    bool operator[](std::size_t i) const {
        return count_ > 64 ? static_cast<bool>((*more_)[i]) : ((bits_ >> i) & 1U) != 0;
    }
    void set(std::size_t i) {
        if (count_ > 64) {
            (*more_)[i] = true;
        } else {
            bits_ |= std::uint64_t{1} << i;
        }
    }
    /** True when every server has been tried. */
    bool all() const {
        for (std::size_t i = 0; i < count_; ++i) {
            if (!(*this)[i]) {
                return false;
            }
        }
        return true;
    }

private:
    void release() {
        if (count_ > 64) {
            delete more_;
        }
        bits_ = 0;
        count_ = 0;
    }

    // Every connection holds one: the bits and the vector share their 8 bytes.
    union {
        std::uint64_t bits_ = 0;  // up to 64 servers
        std::vector<bool> *more_; // more than 64 (owned)
    };
    std::uint32_t count_ = 0;
};

/** One server of a pool and what the pool knows about it. */
class PoolServer {
public:
    PoolServer(Address address, net::SocketAddress resolved);

    const Address &address() const { return address_; }
    const std::string &text() const { return text_; }

    /** Its current socket address (a copy: it may be replaced by re-resolution). */
    net::SocketAddress resolved() const;
    void setResolved(net::SocketAddress resolved);

    /** Connections using (or connecting to) it now. */
    std::atomic<std::uint64_t> active{0};
    /** Consecutive failed connects since the last success. */
    std::atomic<std::uint32_t> failures{0};
    /** Monotonic milliseconds until which it is skipped; 0: up. */
    std::atomic<std::uint64_t> downUntil{0};
    /** Totals since the generation started, for /status. */
    std::atomic<std::uint64_t> connects{0};
    std::atomic<std::uint64_t> connectFailures{0};

private:
    Address address_;
    std::string text_;
    mutable std::mutex mutex_;
    net::SocketAddress resolved_;
};

/** What a server's failed connect did to its health. */
enum class HealthChange { none, markedDown, recovered };

/** A pool of servers; see the file comment. */
class Pool {
public:
    /** Resolves every server and builds the TLS client context. Throws std::runtime_error
     * naming the backend and what failed. A backend served by a handler takes its factory
     * (null, or empty, is an error). */
    /** `builtinKdf`: a TLS backend's keys are derived by tls/kdf (global.tls_kdf). */
    explicit Pool(const BackendConfig &config, const HandlerFactory *handler = nullptr,
                  bool builtinKdf = true);

    const std::string &name() const { return config_.name; }
    const BackendConfig &config() const { return config_; }
    /** The client context for TLS to the servers; null when the pool speaks plain TCP. */
    ssl_ctx_st *tlsContext() const { return tls_.get(); }
    /** The in-process handler's factory; null for a pool of servers. */
    const HandlerFactory *handler() const { return handler_ ? &handler_ : nullptr; }
    std::size_t size() const { return servers_.size(); }
    PoolServer &server(std::size_t index) { return *servers_[index]; }
    const PoolServer &server(std::size_t index) const { return *servers_[index]; }

    /** Attempts one connection may make: config.attempts, or every server once. */
    std::size_t attemptLimit() const;

    /**
     * Picks a server for the next attempt among those not yet `tried` (one flag per server):
     * a healthy one by the balancing rule, or, when every untried server is marked down, the one
     * whose down time ends first. Returns -1 when every server has been tried. `nowMs` is
     * monotonic milliseconds.
     */
    int pick(const TriedServers &tried, std::uint64_t nowMs);

    /** Records a successful connect (health restored). */
    HealthChange succeeded(std::size_t index);
    /** Records a failed connect; may mark the server down for config.failTimeout. */
    HealthChange failed(std::size_t index, std::uint64_t nowMs);

    /** The name sent as SNI and verified for `index`: tls.server_name, else the server's host
     * when it is a name (not an IP literal), else empty. */
    const std::string &serverName(std::size_t index) const { return serverNames_[index]; }

    /** Resolves every host name again (blocking: call it off the event loops). Keeps the old
     * address of a name that fails; returns one line per failure. */
    std::vector<std::string> resolveAgain();

private:
    BackendConfig config_;
    tls::ContextPtr tls_;
    std::vector<std::unique_ptr<PoolServer>> servers_;
    std::vector<std::string> serverNames_;
    HandlerFactory handler_;
    std::atomic<std::uint64_t> next_{0};
};

using PoolPtr = std::shared_ptr<Pool>;

} // namespace sluice::proxy
