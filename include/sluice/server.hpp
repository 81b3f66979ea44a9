// sluice::Server: sluice's listeners and proxied connections, running on a libuv loop that the
// program owns. Built from a sluice::Config (made in code, or read by sluice::loadConfig), it
// binds every listener's addresses, terminates TLS and forwards the plaintext to the backends,
// as the daemon does; the program keeps running its own handles on the same loop.
//
//     uv_loop_t *loop = uv_default_loop();
//     sluice::Server server(loop, sluice::loadConfig("sluice.toml"));
//     server.start();                                     // throws sluice::Error
//     for (const auto &[name, address] : server.addresses()) {
//         std::printf("%s listens on %s\n", name.c_str(), address.c_str());
//     }
//     ...                                                 // later, from a handle's callback:
//     server.drain([](bool forced) { std::puts(forced ? "cut" : "drained"); });
//     uv_run(loop, UV_RUN_DEFAULT);                       // returns once everything closed
//
// Threads: every call is made on the thread that runs the loop (or, before the loop runs, on the
// thread that will run it). A Server is one worker: global.workers, global.user/group, [admin],
// [log] and socket activation are daemon features that a Server ignores; a program that wants
// several threads runs one loop and one Server per thread (their listeners share ports through
// SO_REUSEPORT when they bind the same addresses), and gives them one HandshakeLimits so that
// the per-address handshake limits count every thread's handshakes together.
//
// Callbacks: the `done` of drain() and stop() runs on the loop, once, after every handle the
// Server owns has closed, and never inside the call that passed it. A call that fails (returns
// false) never calls its callback.
//
// Errors: start() throws sluice::Error (configuration, certificates, binding); reload() reports
// through its result and keeps the running configuration; no other call throws. Misuse (start
// twice, reload before start, stop after stop) is reported the same way and never crashes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <sluice/config.hpp>
#include <sluice/error.hpp>
#include <sluice/export.hpp>
#include <sluice/stream.hpp>

// libuv's loop, declared here so this header does not need <uv.h>.
typedef struct uv_loop_s uv_loop_t;

namespace sluice {

/**
 * A snapshot of one Server's counters: what its listeners and connections did since it was made
 * (a reload() keeps them). Each Server counts its own, so a program with a Server per thread
 * adds them up for the process's totals.
 */
struct ServerStats {
    std::uint64_t accepted = 0;               ///< connections accepted
    std::uint64_t active = 0;                 ///< connections open now
    std::uint64_t handshakesOk = 0;           ///< TLS handshakes completed
    std::uint64_t handshakesResumed = 0;      ///< ... of which resumed a session
    std::uint64_t handshakesFailed = 0;       ///< failed (alert sent or received)
    std::uint64_t handshakesTimedOut = 0;     ///< cut by timeouts.handshake
    std::uint64_t handshakesAborted = 0;      ///< the client left before the handshake ended
    std::uint64_t bytesClientToBackend = 0;   ///< plaintext bytes forwarded to backends
    std::uint64_t bytesBackendToClient = 0;   ///< plaintext bytes sent back to clients
    std::uint64_t backendConnectFailures = 0; ///< backend connects that failed or timed out
    std::uint64_t acceptErrors = 0;           ///< accept() failures (descriptor limits)
    std::uint64_t handshakeLimited = 0;       ///< closed at accept by max_handshakes_per_ip
    std::uint64_t handshakeRateLimited = 0;   ///< closed at accept by max_handshake_rate_per_ip
    std::uint64_t proxySourceRefused = 0;     ///< closed at accept: not an accept_proxy_from source
    std::uint64_t reloadsOk = 0;              ///< reloads that were applied
    std::uint64_t reloadsFailed = 0;          ///< reloads that kept the running configuration
    bool lastReloadOk = true;                 ///< the last reload was applied (or none yet)
    std::string lastReloadMessage;            ///< why the last reload failed, or what it loaded
    /** Closed connections by reason ("done", "client_reset", "timeout_idle", ...). */
    std::vector<std::pair<std::string, std::uint64_t>> closed;
};

/**
 * The record that global.max_handshakes_per_ip and global.max_handshake_rate_per_ip are checked
 * against: the handshakes each client address has in progress, and the ones it started in the
 * last second. A Server made without one keeps a record of its own. Servers made with copies of
 * one HandshakeLimits count an address's handshakes together, whichever thread's loop each runs
 * on, as the daemon's workers do; each still applies its own configuration's figures to the
 * shared counts (a reload() that turns a Server's rate off empties the shared rate buckets:
 * every address may start a second's worth again). Copies share one record, which lives until
 * the last copy and the last Server using it are gone. Safe from any thread.
 */
class SLUICE_API HandshakeLimits {
public:
    HandshakeLimits();
    // Copies share the record; a move copies too, so no HandshakeLimits is ever empty.
    HandshakeLimits(const HandshakeLimits &) = default;
    HandshakeLimits &operator=(const HandshakeLimits &) = default;
    ~HandshakeLimits() = default;

    /** Client addresses with a handshake in progress now, in every Server sharing the record. */
    std::size_t addressesInProgress() const;

private:
    friend class Server;
    struct Impl;
    std::shared_ptr<Impl> impl_;
};

/**
 * Listeners and their connections on a caller's loop. Not copyable; movable (the moved-from
 * Server is empty: every call on it fails as before start(), and destroying it does nothing).
 */
class SLUICE_API Server {
public:
    /**
     * Takes the configuration; nothing is built or bound until start(). `loop` is borrowed and
     * must outlive the Server's closing (see ~Server). Never throws for a bad configuration.
     */
    Server(uv_loop_t *loop, Config config);

    /** As above, counting the per-address handshake limits in `limits` (see HandshakeLimits). */
    Server(uv_loop_t *loop, Config config, HandshakeLimits limits);

    /**
     * A Server that never started, or whose drain()/stop() has completed, goes at once. One that
     * is still running or closing is stopped: its connections are cut and its handles close
     * during the loop's next turns (keep running the loop until uv_run() returns before
     * uv_loop_close()); the callbacks of a pending drain() or stop() are then never called.
     */
    ~Server();

    Server(Server &&other) noexcept;
    /** Destroys what this Server held (as ~Server), then takes `other`'s. */
    Server &operator=(Server &&other) noexcept;
    Server(const Server &) = delete;
    Server &operator=(const Server &) = delete;

    /**
     * Builds everything the configuration needs (TLS contexts from the certificate files,
     * backend pools, resolved addresses), binds every listen address and starts accepting.
     * Throws sluice::Error whose message names the listener and what failed; nothing is left
     * open then and start() may be called again. Also throws when called a second time.
     */
    void start();

    /**
     * ("LISTENER NAME", "ADDRESS") of every listening socket, with the port the kernel chose for
     * port 0, e.g. ("web", "127.0.0.1:40123"). Empty before start() and once closing began.
     */
    std::vector<std::pair<std::string, std::string>> addresses() const;

    /**
     * Swaps in `config`, as the daemon's SIGHUP does: the whole new configuration is built
     * first (certificates, backends, new sockets) and applied only if all of it succeeded.
     * Listeners whose name and address are unchanged keep their sockets (no connection is
     * refused); connections that are open keep the settings they started with. Returns false
     * and keeps serving the running configuration when anything fails, or when the Server is
     * not running (before start(), after drain()/stop()); `error`, if given, receives why.
     * Blocking: certificate files are read on the calling thread. Never throws.
     */
    bool reload(Config config, std::string *error = nullptr);

    /**
     * Stops accepting (the listening sockets close, after the connections already waiting in
     * their queues are accepted, within the connection limits) and lets open connections
     * finish, for up to global.drain_timeout; then cuts what is left. `done(forced)` runs once
     * every handle is closed; `forced` is true when the deadline cut connections. Returns false
     * when the Server is not running (never started, or drain() or stop() was called already).
     */
    bool drain(std::function<void(bool forced)> done);

    /**
     * Closes the listeners and cuts every connection now. Also valid during a drain, to end it
     * early: both callbacks then run. `done(forced)` as for drain(). Returns false before
     * start(), after an earlier stop(), or once closing has completed.
     */
    bool stop(std::function<void(bool forced)> done);

    /** True from a successful start() until drain() or stop(). */
    bool running() const;

    /** The configuration in use: the one given, or the last one reload() applied. */
    const Config &config() const;

    /** The loop the Server runs on. */
    uv_loop_t *loop() const;

    /** A snapshot of this Server's counters (see ServerStats). Any state, and from any thread
     * while the Server exists; a moved-from Server reads all zero. */
    ServerStats stats() const;

    /**
     * Registers an in-process stream handler (<sluice/stream.hpp>) under `name`: a backend whose
     * `handler` is `name` hands each connection routed to it to a handler made by `factory`,
     * instead of a backend socket. Register before start() (or before the reload() that first
     * names it): a configuration naming an unregistered handler fails to start or to reload.
     * A null `factory` removes the name. Connections already open keep their handler.
     */
    void setHandler(const std::string &name, HandlerFactory factory);

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

} // namespace sluice
