// proxy/server: every listener of one configuration on one libuv loop, the connections they
// accepted, the connection limits, and the drain that ends them.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include <uv.h>

#include <sluice/config.hpp>

#include "net/address.hpp"
#include "net/spare_descriptor.hpp"
#include "proxy/client_limits.hpp"
#include "proxy/pool.hpp"
#include "proxy/stats.hpp"
#include "proxy/timer_heap.hpp"
#include "proxy/warm_list.hpp"
#include "tls/context.hpp"

namespace sluice::proxy {

class Connection;
class Listener;

/** A route of a listener, resolved to its pool. */
struct RouteEntry {
    std::string sni;  ///< lowercase exact name or "*.suffix"; empty: any
    std::string alpn; ///< empty: any
    PoolPtr pool;
};

/** What every connection of one listener shares; immutable once built (the pools it points to
 * keep their own atomic health record). */
struct ListenerSettings {
    std::string name;
    tls::ContextPtr context; ///< null on a plaintext listener
    PoolPtr pool;            ///< the default route
    std::string backendText; ///< the default pool's name
    std::vector<RouteEntry> routes;
    std::vector<Network> acceptProxyFrom; ///< non-empty: a PROXY header is required
    bool plaintext = false;
    SocketOptions socket;
    Timeouts timeouts;
    Buffers buffers;
    std::uint64_t maxConnections = 0;
    int backlog = 511;

    /** The pool for a connection that negotiated `sni` and `alpn`: the first matching route,
     * else the default. */
    const PoolPtr &route(std::string_view sni, std::string_view alpn) const;
    /** True when `address` may send a PROXY header here. */
    bool proxySourceAllowed(const sockaddr *address) const;
};

/** One generation of configuration: what every connection accepted under it shares. */
struct Runtime {
    std::vector<std::shared_ptr<const ListenerSettings>> listeners;
    std::vector<PoolPtr> pools;              ///< every backend of the configuration, in its order
    std::uint64_t maxConnections = 0;        ///< this worker's share of global.max_connections
    std::uint64_t maxHandshakesPerIp = 0;    ///< across Servers sharing ClientLimits; 0: none
    std::uint64_t maxHandshakeRatePerIp = 0; ///< per second, the same way; 0: no limit
    Duration drainTimeout{};
    Duration releaseMemoryAfter{}; ///< 0: never

    /** The listener named `name`, or null. */
    std::shared_ptr<const ListenerSettings> find(const std::string &name) const;
};

/**
 * Builds every listener's TLS context and resolves every backend (control path: throws with one
 * message naming the listener and what failed). `workers` divides the connection limits.
 */
std::shared_ptr<const Runtime>
buildRuntime(const Config &config, unsigned workers,
             const std::map<std::string, HandlerFactory> *handlers = nullptr);

/** A listening socket made for one worker, tagged with the listener it belongs to. */
struct ListenSocket {
    std::string key;  ///< listener name and configured address: stable across reloads
    std::string name; ///< the listener's name
    int fd = -1;      ///< owned by the Server once passed to it
};

/** What the connection limits and the drain read, on the loop's thread (the counters the
 * metrics show are in the Server's Stats, metrics()). */
struct ServerStats {
    std::uint64_t accepted = 0; ///< since start
    std::uint64_t active = 0;   ///< open now
};

/**
 * The daemon's allocator settings for global.release_memory_after (glibc only; elsewhere
 * nothing). On: glibc's own trimming of the heap top is turned off, since under load it hands
 * pages back that the next connections fault in again, and blocks up to 4 MiB stay on the heap
 * rather than in mmap()s of their own; the Servers release free memory once things are quiet.
 * Off (0): glibc's defaults. Process-wide and not thread-safe: the daemon calls it once at
 * start, before any thread (a reload changes when Servers release, not this); the library
 * leaves it to the embedding program.
 */
void applyMemoryPolicy(Duration releaseAfter);

/**
 * The client IP address of an accepted socket as a map key for the per-address limits: family
 * and address bytes, no port. An IPv6 address counts by its /64, the smallest block a network
 * hands one customer (taking another address in it costs nothing), and an IPv4-mapped IPv6
 * address as the IPv4 address. Empty when it has none (a UNIX socket): no limit applies then.
 */
std::string clientIpKey(int fd);
/** The same key for an address (from a PROXY header). */
std::string clientIpKey(const sockaddr *address);

/**
 * Runs listeners on a caller's loop. All calls happen on the loop's thread. Each connection
 * keeps the ListenerSettings it was accepted with, so update() never changes a live connection.
 */
class Server {
public:
    /** `limits`: the per-address handshake record this Server shares with the process's other
     * Servers (the daemon's workers); null: one of its own. `metrics`: the counters its
     * listeners and connections add to; null: the process's (stats(), what the daemon's
     * /metrics shows). */
    Server(uv_loop_t *loop, std::shared_ptr<const Runtime> runtime,
           std::shared_ptr<ClientLimits> limits = nullptr,
           std::shared_ptr<Stats> metrics = nullptr);
    ~Server();
    Server(const Server &) = delete;
    Server &operator=(const Server &) = delete;

    /** Starts accepting on `sockets` (their descriptors are owned from here). Throws. */
    void listen(std::vector<ListenSocket> sockets);

    /**
     * Swaps in a new generation: listeners still configured take its settings for new
     * connections, `added` sockets start accepting, listeners whose key is in `removed` close
     * (their connections finish). Never throws; a socket that cannot be adopted is logged.
     */
    void update(std::shared_ptr<const Runtime> runtime, std::vector<ListenSocket> added,
                const std::vector<std::string> &removed);

    /** "NAME ADDRESS" of every listening socket, with the port the kernel chose. */
    std::vector<std::pair<std::string, std::string>> boundAddresses() const;

    /**
     * Accepts what already waits in the listeners' queues (within the connection limits), then
     * stops accepting, lets live connections finish for up to the drain timeout, then closes
     * what is left. `done(forced)` runs once on the loop, after every handle is closed;
     * `forced` is true when the deadline cut connections. Never called re-entrantly. `done` may
     * destroy the Server: nothing touches it after `done` returns (sluice::Server relies on it).
     */
    void drain(std::function<void(bool forced)> done);

    /** Closes every listener and connection now; `done` as for drain(). */
    void stop(std::function<void(bool forced)> done);

    uv_loop_t *loop() const { return loop_; }

    // --- For listeners and connections --------------------------------------------------------

    /** True when one more connection fits the global and the listener's limit. */
    bool admits(const ListenerSettings &settings) const;
    void connectionOpened(Connection *connection, const ListenerSettings &settings);
    void connectionClosed(Connection *connection, const ListenerSettings &settings);
    /** What handshakeStarting() decided for a client address. */
    using HandshakeAdmission = ClientLimits::Admission;
    /**
     * Counts a handshake starting from `ipKey`, or refuses it (nothing counted) when that
     * address already has max_handshakes_per_ip in progress (`tooMany`) or has started
     * max_handshake_rate_per_ip in the last second (`tooFast`), counting the handshakes of
     * every Server sharing its ClientLimits; refusals are counted in this Server's metrics().
     * Every `admitted` is matched by one handshakeEnded().
     */
    HandshakeAdmission handshakeStarting(const std::string &ipKey);
    void handshakeEnded(const std::string &ipKey);
    ServerStats &counters() { return stats_; }
    /** The counters, histograms and reload record this Server's connections add to. */
    Stats &metrics() const { return *metrics_; }
    /**
     * Out of descriptors (EMFILE or ENFILE from accept): spends this server's reserve
     * descriptor to accept and close every connection waiting on the listening socket
     * `listenFd`, then opens the reserve again. Returns how many were closed unserved; 0 when
     * there was no reserve to spend (the caller then rests instead of spinning).
     */
    std::size_t shedWaiting(int listenFd);
    /** The deadlines (timeouts) of this server's connections. */
    TimerHeap &deadlines() { return deadlines_; }
    /**
     * `connection`, whose buffers take `bytes`, has just pumped: it keeps them until a sweep
     * finds it idle. False when they do not fit what busy connections may keep (the caller
     * releases them now).
     */
    bool keepBuffers(Connection &connection, std::size_t bytes);
    /** `connection` is closing: the sweep leaves it alone. */
    void forgetBuffers(Connection &connection);
    /** `connection` put off its pump (or held a TLS tail) in a read callback: the loop's check
     * phase (after this turn's I/O) calls its releaseWrites(), which pumps, unless
     * forgetHeldWrites() came first. */
    void holdWrites(Connection &connection);
    void forgetHeldWrites(Connection &connection);

private:
    void adopt(ListenSocket socket);
    void closeListener(std::unique_ptr<Listener> listener);
    /** Closes the listeners (first accepting what waits in their queues when `serveQueued`)
     * and starts the deadline. */
    void beginDrain(std::function<void(bool forced)> done, bool serveQueued);
    void checkDrained();
    /** `timer` (the quiet or the sweep timer), made on first use; it keeps no loop alive. */
    uv_timer_t *backgroundTimer(uv_timer_t *&timer);
    void closeBackgroundTimers();
    static void onDrainTimer(uv_timer_t *timer);
    /** A connection opened or closed, or buffers were freed: memory may go back to the system
     * once things are quiet. */
    void noteActivity();
    static void onQuiet(uv_timer_t *timer);
    static void onSweep(uv_timer_t *timer);
    static void onWriteCheck(uv_check_t *check);

    uv_loop_t *loop_;
    std::shared_ptr<const Runtime> runtime_;
    // Held so that a worker out of descriptors can still accept, and close, the connections
    // waiting for one: they get a prompt close instead of a timeout.
    net::SpareDescriptor reserve_;
    std::vector<std::unique_ptr<Listener>> listeners_;
    // The live connections (stats_.active of them), linked through their own
    // prevInServer_/nextInServer_: no allocation or hashing per connection.
    Connection *connections_ = nullptr;
    std::unordered_map<std::string, std::uint64_t> perListener_; // active, by listener name
    std::shared_ptr<ClientLimits> limits_;
    std::shared_ptr<Stats> metrics_;
    ServerStats stats_;
    TimerHeap deadlines_;
    // Busy connections keeping their TLS pairs and OpenSSL's record buffers between pumps: at
    // most warmBudget bytes of them a worker (126 connections with the default buffers.tls),
    // each released one to two sweepInterval after its last pump.
    static constexpr std::size_t warmBudget = 12 * 1024 * 1024;
    static constexpr std::uint64_t sweepInterval = 250; // milliseconds
    WarmList warm_;
    uv_timer_t *sweepTimer_ = nullptr; // made by the first keepBuffers(); closed by the drain
    uv_timer_t *drainTimer_ = nullptr;
    uv_timer_t *quietTimer_ = nullptr;  // made by the first noteActivity(); closed by the drain
    std::uint64_t lastActivity_ = 0;    // uv_now() of the last open, close or sweep that freed
    std::uint64_t peakConnections_ = 0; // the most open at once since the last release
    /** How far the connections must fall below their peak (and at least to half of it) for a
     * busy worker to release memory. */
    static constexpr std::uint64_t minimumFall = 32;
    bool quietArmed_ = false;
    // Connections waiting for their pump in this turn of the loop, and the check that runs it
    // (made by the first holdWrites(); closed by the drain).
    std::vector<Connection *> heldWrites_;
    uv_check_t *writeCheck_ = nullptr;
    std::function<void(bool)> drained_;
    bool draining_ = false;
    bool forced_ = false;
    bool doneScheduled_ = false;
    std::size_t closingHandles_ = 0;
};

} // namespace sluice::proxy
