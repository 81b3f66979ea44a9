// proxy/listener: one bound TCP socket that accepts connections while the server admits them.
#pragma once

#include <cstddef>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include <uv.h>

#include "net/address.hpp"

namespace sluice::proxy {

class Server;
struct ListenerSettings;

/**
 * A listening socket, accepted from by sluice itself (accept4 on a libuv poll handle) so that
 * every accept error is seen: out of descriptors, the waiting connections are shed through the
 * server's reserve descriptor, counted and logged (libuv's own listener sheds them silently).
 * Accepting pauses while the server is at its connection limit (connections wait in the
 * kernel's backlog) and resumes through retryAccept(). Handle memory is freed in the close
 * callback, never before.
 */
class Listener {
public:
    Listener(Server &server, std::string key, std::shared_ptr<const ListenerSettings> settings);
    ~Listener();
    Listener(const Listener &) = delete;
    Listener &operator=(const Listener &) = delete;

    /** Starts accepting on a bound, listening socket it now owns; throws std::runtime_error. */
    void adopt(int fd);

    /** New connections from now on use `settings`; live ones keep theirs. */
    void setSettings(std::shared_ptr<const ListenerSettings> settings);

    /** The listener name and configured address: what identifies this socket across reloads. */
    const std::string &key() const { return key_; }

    /** The bound address with the kernel's port, e.g. "127.0.0.1:40123". */
    std::string boundText() const;
    const std::string &name() const;

    /** Accepts again if accepting paused while the server was full. */
    void retryAccept();

    /**
     * Accepts the connections waiting in the kernel's queue, as far as the server's limits
     * allow, so that closing the socket next does not reset them: they completed their TCP
     * handshake while this listener was open. Returns how many it accepted.
     */
    std::size_t acceptQueued();

    /** Closes the socket; `closed` runs from the close callback. */
    void close(std::function<void()> closed);

private:
    static void onReadable(uv_poll_t *poll, int status, int events);
    /** Accepts what waits, up to a bound per readiness event; pauses while the server is full. */
    void acceptReady();
    /** Accepts up to `most`; false when it stopped because the server is full. */
    bool acceptUpTo(int most);
    void acceptOne(int fd, const sockaddr_storage &peer);
    /** accept() failed with `error` (an errno value): shed, count, log, and rest if needed. */
    void acceptFailed(int error);
    /** Stops polling for acceptsRetryMs, so an error that persists does not spin the loop. */
    void rest();
    /** Sets the settings' socket options on the listening socket, for accepted ones to inherit. */
    void applySocketOptions();

    Server &server_;
    std::string key_;
    std::shared_ptr<const ListenerSettings> settings_;
    int fd_ = -1;                          // the listening socket, owned
    uv_poll_t *poll_ = nullptr;            // freed in the close callback
    uv_timer_t *restTimer_ = nullptr;      // made on the first rest()
    std::optional<SocketOptions> applied_; // what the listening socket has now
    bool pending_ = false;                 // paused: the server is full (or draining)
    bool closing_ = false;
    std::function<void()> closed_;
    std::uint64_t lastAcceptErrorLog_ = 0;
    std::uint64_t shedSinceLog_ = 0; // connections shed since the last accept-failed line
    std::uint64_t lastProxyRefusedLog_ = 0;
};

} // namespace sluice::proxy
