// ops/admin: the admin HTTP listener on a libuv loop: GET /metrics (Prometheus text format),
// GET /status (JSON) and GET /ready (200 while serving, 503 while draining). One request per
// connection (Connection: close), a strict bounded parser (ops/http), a request timeout and a
// cap on open admin connections, so garbage or a slow client costs a few KiB and then nothing.
// It accepts by itself and holds one spare descriptor, so that a process out of descriptors
// (EMFILE) still answers its monitoring, one admin connection at a time.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_set>
#include <vector>

#include <uv.h>

#include <sluice/config.hpp>

#include "net/spare_descriptor.hpp"
#include "ops/http.hpp"
#include "ops/render.hpp"
#include "proxy/server.hpp"

namespace sluice::ops {

/**
 * Where the admin listener learns what the proxy is serving. Both functions are called on the
 * admin loop's thread, once per /status or /metrics request; either may be empty.
 */
struct StatusSource {
    std::function<std::vector<ListenerStatus>()> listeners;
    std::function<std::vector<tls::CertificateSummary>()> certificates;
    std::function<std::vector<BackendStatus>()> backends;
};

/** Every backend pool of `runtime` with its servers' health, for StatusSource::backends. */
std::vector<BackendStatus> backendsOf(const proxy::Runtime &runtime);

/** Every certificate of every listener of `runtime`, for StatusSource::certificates. */
std::vector<tls::CertificateSummary> certificatesOf(const proxy::Runtime &runtime);

/**
 * The listeners of `runtime` with their bound addresses, taken from `bound` ("NAME", "ADDRESS")
 * pairs, for StatusSource::listeners.
 */
std::vector<ListenerStatus>
listenersOf(const proxy::Runtime &runtime,
            const std::vector<std::pair<std::string, std::string>> &bound);

class Admin {
public:
    /** How long a client has to send its request, and to go away after the response. */
    static constexpr std::uint64_t requestTimeoutMs = 5000;
    static constexpr std::uint64_t lingerMs = 1000;
    /** Admin connections open at once; more are accepted and closed at once. */
    static constexpr std::size_t maxClients = 64;

    /** Nothing is bound until start(). `config.enabled` must be true. */
    Admin(uv_loop_t *loop, const AdminConfig &config, StatusSource source);
    /** The Admin must be closed (close() and its callback) or never started. */
    ~Admin();
    Admin(const Admin &) = delete;
    Admin &operator=(const Admin &) = delete;

    /**
     * Binds and listens, or listens on `handedOver` (a listening socket a previous process passed
     * on, which the Admin then owns) when it is not -1. Throws std::runtime_error naming the
     * address; then call close().
     */
    void start(int handedOver = -1);

    /** The listening socket (-1 before start() and once closed), to hand to a new process. */
    int listenFd() const { return closing_ ? -1 : fd_; }

    /** "127.0.0.1:9901", with the port the kernel chose for port 0; empty before start(). */
    const std::string &boundAddress() const { return bound_; }

    /** While draining, /ready answers 503 and /status says so. */
    void setDraining(bool draining) { draining_ = draining; }
    bool draining() const { return draining_; }

    /**
     * Closes the listener and every admin connection. `done` runs once on the loop after every
     * handle is closed, never inside this call.
     */
    void close(std::function<void()> done);

    /** The response to a parsed request (any state), as sent on the wire. */
    std::string respond(const HttpRequest &request) const;

private:
    struct Client;

    static void onReadable(uv_poll_t *poll, int status, int events);
    void acceptReady();
    /** accept(2) failed with `error`. Out of descriptors, spends the reserve descriptor on
     * the waiting connection and returns its socket; otherwise logs, rests and returns -1. */
    int acceptOnReserve(int error);
    void rest();
    void serve(int fd, bool onReserve);
    void closeClient(Client *client);
    void clientClosed(Client *client);
    void maybeDone();

    uv_loop_t *loop_;
    Address address_;
    StatusSource source_;
    std::string bound_;
    int fd_ = -1;               // the listening socket, closed with poll_
    uv_poll_t *poll_ = nullptr; // freed in its close callback
    uv_timer_t *restTimer_ = nullptr;
    net::SpareDescriptor reserve_; // given up to answer while out of descriptors
    std::uint64_t lastAcceptErrorLog_ = 0;
    std::unordered_set<Client *> clients_;
    std::function<void()> done_;
    bool draining_ = false;
    bool closing_ = false;
    bool listenerClosed_ = false;
    bool doneScheduled_ = false;
};

} // namespace sluice::ops
