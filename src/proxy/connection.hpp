// proxy/connection: one client socket, its TLS engine and its backend socket, with bounded
// queues in both directions, half-close, timeouts, and a lifetime that ends only after every
// libuv handle it owns has run its close callback.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include <uv.h>

#include <sluice/engine.hpp>

#include "proxy/stats.hpp"

namespace sluice::proxy {

class Server;
struct ListenerSettings;

/**
 * The data path of one accepted connection:
 *
 *   client socket --ciphertext--> engine pair --plaintext--> backend socket   (upstream)
 *   client socket <--ciphertext-- engine pair <--plaintext-- reply queue <-- backend socket
 *
 * Ciphertext is read straight into the engine's pair and written straight from it; decrypted
 * bytes are written to the backend straight from the engine's plaintext buffer. Only backend
 * replies are copied once, into the reply queue, before encryption. Each queue is bounded, and a
 * full queue stops reading the socket that fills it.
 *
 * Ownership: the Server creates it and is told in connectionClosed() once every handle has been
 * closed; the object deletes itself after that call. Callbacks that arrive after closing began
 * only release what they own.
 */
class Connection {
public:
    /**
     * Takes a freshly initialised, accepted client handle (allocated by the caller). `ipKey` is
     * the client address the caller counted with Server::handshakeStarting(); the connection
     * calls handshakeEnded() once, when its handshake completes or it closes, whichever is first.
     */
    static void start(Server &server, std::shared_ptr<const ListenerSettings> settings,
                      uv_tcp_t *client, std::string ipKey = {});

    Connection(const Connection &) = delete;
    Connection &operator=(const Connection &) = delete;

    /** Begins a graceful end: nothing more is accepted from either side. */
    void abort(const char *reason);

private:
    Connection(Server &server, std::shared_ptr<const ListenerSettings> settings, uv_tcp_t *client);
    ~Connection();

    // The one place that moves bytes and decides what happens next.
    void pump();
    bool flushClient();
    bool flushBackend();
    bool feedEngine();
    void updateReading();
    bool propagateCloses();
    bool upstreamDone() const;
    bool downstreamDone() const;
    void maybeFinish();

    void startBackend();
    void backendFailed(const char *what, int status);
    void armTimer();
    std::uint64_t deadline() const;
    void touch();
    void closeAll();
    void handleClosed();
    /** Records why the connection ends; the first cause noted wins. */
    void noteClose(CloseReason reason, std::string_view error = {});
    /** Counts the close and hands the connection's record to the access log. */
    void recordClose();

    static void onClientAlloc(uv_handle_t *handle, size_t suggested, uv_buf_t *buf);
    static void onClientRead(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf);
    static void onClientWrite(uv_write_t *req, int status);
    static void onClientShutdown(uv_shutdown_t *req, int status);
    static void onBackendConnect(uv_connect_t *req, int status);
    static void onBackendAlloc(uv_handle_t *handle, size_t suggested, uv_buf_t *buf);
    static void onBackendRead(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf);
    static void onBackendWrite(uv_write_t *req, int status);
    static void onBackendShutdown(uv_shutdown_t *req, int status);
    static void onTimer(uv_timer_t *timer);
    static void onClose(uv_handle_t *handle);

    uv_stream_t *clientStream() { return reinterpret_cast<uv_stream_t *>(client_); }
    uv_stream_t *backendStream() { return reinterpret_cast<uv_stream_t *>(&backend_); }

    Server &server_;
    std::shared_ptr<const ListenerSettings> settings_;
    std::unique_ptr<Engine> engine_;
    std::string peer_;
    std::string ipKey_;             // counted in the server's handshakes-by-IP until ...
    bool handshakeCounted_ = false; // ... this turns false: handshake done or closing
    void endHandshakeCount();

    uv_tcp_t *client_; // owned; freed after its close callback
    union {
        uv_tcp_t tcp;
        uv_pipe_t pipe;
    } backend_{};
    uv_timer_t timer_{};
    uv_connect_t connectReq_{};
    uv_write_t clientWriteReq_{};
    uv_write_t backendWriteReq_{};
    uv_shutdown_t clientShutdownReq_{};
    uv_shutdown_t backendShutdownReq_{};

    // Backend replies waiting for encryption: [replyHead_, replyTail_) of reply_, allocated
    // while bytes wait.
    std::unique_ptr<std::uint8_t[]> reply_;
    std::size_t replyHead_ = 0;
    std::size_t replyTail_ = 0;

    std::size_t clientWriteInFlight_ = 0;  // ciphertext bytes pinned in the pair
    std::size_t backendWriteInFlight_ = 0; // plaintext bytes pinned in the engine

    std::uint64_t acceptedAt_ = 0;
    std::uint64_t lastActivity_ = 0;
    std::uint64_t phaseStart_ = 0; // backend connect or final flush start
    std::uint64_t bytesUp_ = 0;
    std::uint64_t bytesDown_ = 0;
    int openHandles_ = 0;

    // For metrics and the access log (uv_hrtime() nanoseconds; -1: not reached).
    std::int64_t startUnixMicros_ = 0;
    std::uint64_t acceptedHr_ = 0;
    std::uint64_t connectStartHr_ = 0;
    std::int64_t handshakeNanos_ = -1;
    std::int64_t connectNanos_ = -1;
    CloseReason closeReason_ = CloseReason::done;
    bool closeReasonSet_ = false;
    std::string closeError_;

    bool clientReading_ = false;
    bool clientEof_ = false;      // the client's FIN (or a read error) arrived
    bool clientGone_ = false;     // the client socket failed: nothing more can be sent
    bool clientShutdown_ = false; // our FIN to the client was requested
    bool clientShutdownDone_ = false;
    bool backendInitialised_ = false;
    bool backendStarted_ = false;
    bool backendConnected_ = false;
    bool backendReading_ = false;
    bool backendEof_ = false;  // the backend's FIN arrived
    bool backendGone_ = false; // refused, reset or failed: nothing more to or from it
    bool backendShutdown_ = false;
    bool backendShutdownDone_ = false;
    bool truncateClient_ = false;    // end the client without close_notify (backend reset)
    bool shutdownRequested_ = false; // engine_->shutdown() was called
    bool handshakeLogged_ = false;
    bool flushing_ = false; // only the last bytes to the client remain
    bool closing_ = false;
    bool inPump_ = false;
    bool pumpAgain_ = false;
};

} // namespace sluice::proxy
