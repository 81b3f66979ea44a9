// proxy/server: every listener of one configuration on one libuv loop, the connections they
// accepted, the connection limits, and the drain that ends them.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include <uv.h>

#include <sluice/config.hpp>

#include "net/address.hpp"
#include "tls/context.hpp"

namespace sluice::proxy {

class Connection;
class Listener;

/** What every connection of one listener shares; immutable once built. */
struct ListenerSettings {
    std::string name;
    tls::ContextPtr context;
    net::SocketAddress backend;
    std::string backendText;
    Timeouts timeouts;
    Buffers buffers;
    std::uint64_t maxConnections = 0;
    int backlog = 511;
};

/** Counters since start. Read on the loop's thread. */
struct ServerStats {
    std::uint64_t accepted = 0;
    std::uint64_t active = 0;
    std::uint64_t handshakeFailures = 0;
    std::uint64_t backendFailures = 0;
    std::uint64_t timeouts = 0;
    std::uint64_t acceptErrors = 0;
};

/**
 * Runs the listeners of one Config on a caller's loop. Construction builds every TLS context and
 * resolves every address (throws on any error, binding nothing); start() binds. All other calls
 * happen on the loop's thread. The Server must outlive the loop's run unless stop() completed.
 */
class Server {
public:
    Server(uv_loop_t *loop, const Config &config);
    ~Server();
    Server(const Server &) = delete;
    Server &operator=(const Server &) = delete;

    /** Binds and listens on every address. Throws std::runtime_error naming the address. */
    void start();

    /** "NAME ADDRESS" of every bound socket, with the port the kernel chose. */
    std::vector<std::pair<std::string, std::string>> boundAddresses() const;

    /**
     * Stops accepting, lets live connections finish for up to the drain timeout, then closes
     * what is left. `done(forced)` runs once on the loop, after every handle is closed;
     * `forced` is true when the deadline cut connections. Never called re-entrantly.
     */
    void drain(std::function<void(bool forced)> done);

    /** Closes every listener and connection now; `done` as for drain(). */
    void stop(std::function<void(bool forced)> done);

    const ServerStats &stats() const { return stats_; }
    uv_loop_t *loop() const { return loop_; }

    // --- For listeners and connections --------------------------------------------------------

    /** True when one more connection fits the global and the listener's limit. */
    bool admits(const ListenerSettings &settings) const;
    void connectionOpened(Connection *connection, const ListenerSettings &settings);
    void connectionClosed(Connection *connection, const ListenerSettings &settings);
    ServerStats &counters() { return stats_; }

private:
    void closeListeners();
    void checkDrained();
    static void onDrainTimer(uv_timer_t *timer);

    uv_loop_t *loop_;
    std::uint64_t maxConnections_;
    Duration drainTimeout_;
    std::vector<std::shared_ptr<const ListenerSettings>> settings_;
    struct Bind {
        std::shared_ptr<const ListenerSettings> settings;
        net::SocketAddress address;
        std::string text;
    };
    std::vector<Bind> binds_;
    std::vector<std::unique_ptr<Listener>> listeners_;
    std::unordered_set<Connection *> connections_;
    std::unordered_map<const ListenerSettings *, std::uint64_t> perListener_;
    ServerStats stats_;
    uv_timer_t *drainTimer_ = nullptr;
    std::function<void(bool)> drained_;
    bool draining_ = false;
    bool forced_ = false;
    bool doneScheduled_ = false;
    std::size_t closingHandles_ = 0;
};

} // namespace sluice::proxy
