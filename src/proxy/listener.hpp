// proxy/listener: one bound TCP socket that accepts connections while the server admits them.
#pragma once

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
 * A listening socket. Accepting pauses while the server is at its connection limit (the pending
 * connection waits in the kernel's backlog) and resumes through retryAccept(). Handle memory is
 * freed in the close callback, never before.
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

    /** Accepts the connection that waited while the server was full, if any. */
    void retryAccept();

    /** Closes the socket; `closed` runs from the close callback. */
    void close(std::function<void()> closed);

private:
    static void onConnection(uv_stream_t *stream, int status);
    void acceptOne();
    /** Sets the settings' socket options on the listening socket, for accepted ones to inherit. */
    void applySocketOptions();

    Server &server_;
    std::string key_;
    std::shared_ptr<const ListenerSettings> settings_;
    uv_tcp_t *handle_ = nullptr;           // freed in the close callback
    std::optional<SocketOptions> applied_; // what the listening socket has now
    bool pending_ = false;                 // a connection waits for a free slot
    bool closing_ = false;
    std::function<void()> closed_;
    std::uint64_t lastAcceptErrorLog_ = 0;
    std::uint64_t lastProxyRefusedLog_ = 0;
};

} // namespace sluice::proxy
