#include "proxy/connection.hpp"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <sys/socket.h>

#include "net/address.hpp"
#include "proxy/server.hpp"
#include "proxy/stats.hpp"
#include "util/log.hpp"

namespace sluice::proxy {
namespace {

// Keep-alive probes find peers that vanished without a FIN or RST.
constexpr unsigned keepAliveDelaySeconds = 60;

std::string quoted(std::string_view text) {
    std::string out = "\"";
    for (char c : text) {
        out += (c == '"' || c == '\\') ? '\'' : c;
    }
    out += '"';
    return out;
}

} // namespace

void Connection::start(Server &server, std::shared_ptr<const ListenerSettings> settings,
                       uv_tcp_t *client, std::string ipKey) {
    auto *connection = new Connection(server, std::move(settings), client);
    connection->ipKey_ = std::move(ipKey);
    if (connection->closing_) {
        server.handshakeEnded(connection->ipKey_); // the constructor failed and closed it
    } else {
        connection->handshakeCounted_ = true;
    }
    server.connectionOpened(connection, *connection->settings_);
    connection->pump();
}

Connection::Connection(Server &server, std::shared_ptr<const ListenerSettings> settings,
                       uv_tcp_t *client)
    : server_(server)
    , settings_(std::move(settings))
    , client_(client) {
    uv_loop_t *loop = server_.loop();
    client_->data = this;
    timer_.data = this;
    connectReq_.data = this;
    clientWriteReq_.data = this;
    backendWriteReq_.data = this;
    clientShutdownReq_.data = this;
    backendShutdownReq_.data = this;
    openHandles_ = 1;
    uv_timer_init(loop, &timer_);
    ++openHandles_;
    uv_os_fd_t fd = -1;
    if (uv_fileno(reinterpret_cast<uv_handle_t *>(client_), &fd) == 0) {
        peer_ = net::peerText(fd);
    }
    uv_tcp_nodelay(client_, 1);
    uv_tcp_keepalive(client_, 1, keepAliveDelaySeconds);
    acceptedAt_ = lastActivity_ = uv_now(loop);
    acceptedHr_ = uv_hrtime();
    startUnixMicros_ = std::chrono::duration_cast<std::chrono::microseconds>(
                           std::chrono::system_clock::now().time_since_epoch())
                           .count();
    stats().connectionAccepted();

    EngineOptions options;
    options.pairSize = settings_->buffers.tls;
    options.plaintextBudget = settings_->buffers.plaintext;
    std::string error;
    engine_ = Engine::create(settings_->context.get(), Role::server, options, &error);
    if (!engine_) {
        log::error("engine-failed listener=" + settings_->name + " peer=" + peer_ +
                   " reason=" + quoted(error));
        noteClose(CloseReason::internal, error);
        closeAll();
        return;
    }
    armTimer();
}

Connection::~Connection() = default;

// --- The pump ----------------------------------------------------------------------------------

void Connection::pump() {
    if (closing_) {
        return;
    }
    if (inPump_) {
        pumpAgain_ = true;
        return;
    }
    inPump_ = true;
    do {
        pumpAgain_ = false;
        // Bounded: each round moves bytes or changes state; the loop ends when neither happens.
        for (int round = 0; round < 64 && !closing_; ++round) {
            bool progress = feedEngine();
            progress |= flushClient();
            progress |= flushBackend();
            if (closing_) {
                break;
            }
            const EngineStatus status = engine_->status();
            if (status.failed && !flushing_) {
                if (!status.handshakeDone) {
                    server_.counters().handshakeFailures++;
                    noteClose(CloseReason::handshakeFailed, engine_->errorReason());
                    // A flood of bad handshakes must not become a flood of log lines.
                    std::uint64_t suppressed = 0;
                    if (handshakeLogLimit().admit(uv_hrtime() / 1000000, suppressed)) {
                        if (suppressed > 0) {
                            log::warn("handshake-failed-suppressed count=" +
                                      std::to_string(suppressed));
                        }
                        log::warn("handshake-failed listener=" + settings_->name +
                                  " peer=" + peer_ + " reason=" + quoted(engine_->errorReason()));
                    }
                } else {
                    noteClose(CloseReason::tlsError, engine_->errorReason());
                    log::warn("tls-error listener=" + settings_->name + " peer=" + peer_ +
                              " reason=" + quoted(engine_->errorReason()));
                }
                flushing_ = true;
                phaseStart_ = uv_now(server_.loop());
                armTimer();
                progress = true;
            }
            if (status.handshakeDone && !backendStarted_ && !status.failed) {
                if (handshakeNanos_ < 0) {
                    endHandshakeCount();
                    const auto &info = engine_->handshake();
                    handshakeNanos_ = static_cast<std::int64_t>(uv_hrtime() - acceptedHr_);
                    stats().handshakeDone(tlsVersionFrom(info.protocol), info.resumed,
                                          static_cast<std::uint64_t>(handshakeNanos_));
                }
                if (!handshakeLogged_ && log::enabled(LogLevel::debug)) {
                    const auto &info = engine_->handshake();
                    log::debug(
                        "handshake listener=" + settings_->name + " peer=" + peer_ +
                        " protocol=" + info.protocol + " cipher=" + info.cipher +
                        " sni=" + quoted(info.serverName) + " alpn=" + quoted(info.alpn) +
                        " resumed=" + (info.resumed ? "yes" : "no") +
                        (info.clientSubject.empty()
                             ? std::string()
                             : " client=" + quoted(info.clientIdentity) +
                                   " client_subject=" + quoted(info.clientSubject) +
                                   " client_verified=" + (info.clientVerified ? "yes" : "no")));
                }
                handshakeLogged_ = true;
                startBackend();
                progress = true;
            }
            if (!flushing_) {
                progress |= feedEngine();
                progress |= propagateCloses();
            }
            if (!progress) {
                break;
            }
        }
        if (closing_) {
            break;
        }
        updateReading();
        maybeFinish();
    } while (pumpAgain_ && !closing_);
    inPump_ = false;
    if (!closing_) {
        // Between pumps no span into the pair is held (libuv asks for read space only when the
        // socket is readable), so an idle connection can give its pair back.
        engine_->releaseIdleBuffers();
    }
}

bool Connection::feedEngine() {
    if (flushing_ || replyTail_ == replyHead_) {
        return false;
    }
    bool progress = false;
    while (replyTail_ > replyHead_) {
        const std::size_t taken =
            engine_->write({reply_.get() + replyHead_, replyTail_ - replyHead_});
        if (taken == 0) {
            break;
        }
        replyHead_ += taken;
        bytesDown_ += taken;
        stats().bytesBackendToClient(taken);
        progress = true;
    }
    if (replyHead_ == replyTail_) {
        reply_.reset();
        replyHead_ = replyTail_ = 0;
    }
    return progress;
}

namespace {

/** The socket's pending error as a libuv code (SO_ERROR, cleared by reading it), or 0. */
int pendingSocketError(uv_stream_t *stream) {
    uv_os_fd_t fd = -1;
    if (uv_fileno(reinterpret_cast<uv_handle_t *>(stream), &fd) != 0) {
        return 0;
    }
    int error = 0;
    socklen_t length = sizeof error;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &length) != 0) {
        return 0;
    }
    return error == 0 ? 0 : uv_translate_sys_error(error);
}

/**
 * Sends `bytes` on `stream`: returns how many the socket took at once; when it took none
 * because it is full, starts one uv_write of all of them (their memory stays pinned until
 * `done` runs), records the count in `inFlight` and returns 0; returns a libuv error otherwise.
 */
int writeSome(uv_stream_t *stream, std::span<const std::uint8_t> bytes, uv_write_t *req,
              uv_write_cb done, std::size_t &inFlight) {
    uv_buf_t buf = uv_buf_init(const_cast<char *>(reinterpret_cast<const char *>(bytes.data())),
                               static_cast<unsigned>(bytes.size()));
    const int sent = uv_try_write(stream, &buf, 1);
    if (sent != UV_EAGAIN && sent != 0) {
        return sent;
    }
    const int err = uv_write(req, stream, &buf, 1, done);
    if (err != 0) {
        return err;
    }
    inFlight = bytes.size();
    return 0;
}

} // namespace

bool Connection::flushClient() {
    if (clientGone_ || clientWriteInFlight_ > 0 || closing_) {
        return false;
    }
    bool progress = false;
    // Straight from the pair: what the socket does not take now leaves in one pinned write.
    for (auto out = engine_->cipherOut(); !out.empty(); out = engine_->cipherOut()) {
        const int sent =
            writeSome(clientStream(), out, &clientWriteReq_, onClientWrite, clientWriteInFlight_);
        if (sent < 0) {
            clientGone_ = true;
            abort("client write failed");
        }
        if (sent <= 0) {
            break;
        }
        engine_->consumeCipherOut(static_cast<std::size_t>(sent));
        touch();
        progress = true;
    }
    return progress;
}

bool Connection::flushBackend() {
    if (!backendConnected_ || backendGone_ || backendShutdown_ || backendWriteInFlight_ > 0 ||
        closing_) {
        return false;
    }
    bool progress = false;
    // Straight from the engine's plaintext buffer, the same way.
    for (auto plain = engine_->plainOut(); !plain.empty(); plain = engine_->plainOut()) {
        const int sent = writeSome(backendStream(), plain, &backendWriteReq_, onBackendWrite,
                                   backendWriteInFlight_);
        if (sent < 0) {
            backendFailed("write", sent);
        }
        if (sent <= 0) {
            break;
        }
        engine_->consumePlainOut(static_cast<std::size_t>(sent));
        bytesUp_ += static_cast<std::uint64_t>(sent);
        stats().bytesClientToBackend(static_cast<std::uint64_t>(sent));
        touch();
        progress = true;
    }
    return progress;
}

bool Connection::propagateCloses() {
    bool progress = false;
    const EngineStatus status = engine_->status();
    // Upstream: the client's close_notify or FIN becomes a FIN to the backend once every byte
    // before it has been written.
    const bool clientFinished = status.closeNotifyReceived || status.truncated;
    if (clientFinished && backendConnected_ && !backendGone_ && !backendShutdown_ &&
        !status.plaintextReady && backendWriteInFlight_ == 0) {
        backendShutdown_ = true;
        if (uv_shutdown(&backendShutdownReq_, backendStream(), onBackendShutdown) != 0) {
            backendShutdownDone_ = true;
        }
        armTimer();
        progress = true;
    }
    if (backendGone_ && status.plaintextReady) {
        // Nobody will take these bytes; dropping them lets the engine keep reading to the end.
        engine_->consumePlainOut(engine_->plainOut().size());
        progress = true;
    }
    // Downstream: the backend's FIN becomes close_notify once every reply byte is encrypted,
    // then a FIN once the close_notify has left. The close_notify is new ciphertext: reporting
    // progress makes the pump flush it in the same turn (the clean-close tests guard this).
    const bool backendFinished = backendEof_ || backendGone_;
    if (backendFinished && replyHead_ == replyTail_) {
        if (truncateClient_) {
            // The backend reset the stream: deliver what it sent, then end the TCP connection
            // without close_notify so the client can tell the reply is incomplete.
            if (engine_->cipherOutPending() == 0 && clientWriteInFlight_ == 0) {
                abort("backend reset");
            }
            return progress;
        }
        if (!shutdownRequested_) {
            shutdownRequested_ = true;
            engine_->shutdown();
            progress = true;
        }
    }
    if (engine_->status().closeNotifySent && !clientShutdown_ && !clientGone_ &&
        engine_->cipherOutPending() == 0 && clientWriteInFlight_ == 0) {
        clientShutdown_ = true;
        if (uv_shutdown(&clientShutdownReq_, clientStream(), onClientShutdown) != 0) {
            clientShutdownDone_ = true;
        }
        armTimer();
        progress = true;
    }
    return progress;
}

void Connection::updateReading() {
    if (closing_) {
        return;
    }
    // Client: read while the pair has room. A full pair means the engine's plaintext budget is
    // full because the backend is slow; reading resumes once a quarter of the pair is free.
    const std::size_t capacity = engine_->cipherInCapacity();
    const std::size_t resumeAt = std::max<std::size_t>(1, settings_->buffers.tls / 4);
    bool wantClient = !clientEof_ && !clientGone_ && capacity > 0;
    if (!clientReading_ && capacity < resumeAt) {
        wantClient = false;
    }
    if (wantClient != clientReading_) {
        if (wantClient) {
            if (uv_read_start(clientStream(), onClientAlloc, onClientRead) != 0) {
                wantClient = false;
            }
        } else {
            uv_read_stop(clientStream());
        }
        clientReading_ = wantClient;
    }
    // Backend: read while the reply queue has room; resume once it is half empty.
    const std::size_t capacityBytes = settings_->buffers.backend;
    const std::size_t queued = replyTail_ - replyHead_;
    bool wantBackend = backendConnected_ && !backendEof_ && !backendGone_ && !flushing_ &&
                       !clientGone_ && queued < capacityBytes;
    if (!backendReading_ && queued > capacityBytes / 2) {
        wantBackend = false;
    }
    if (wantBackend != backendReading_) {
        if (wantBackend) {
            if (uv_read_start(backendStream(), onBackendAlloc, onBackendRead) != 0) {
                wantBackend = false;
            }
        } else {
            uv_read_stop(backendStream());
        }
        backendReading_ = wantBackend;
    }
}

bool Connection::upstreamDone() const {
    return backendGone_ || backendShutdownDone_;
}

bool Connection::downstreamDone() const {
    return clientGone_ || clientShutdownDone_;
}

void Connection::maybeFinish() {
    if (closing_) {
        return;
    }
    if (flushing_) {
        if (engine_->cipherOutPending() > 0 || clientWriteInFlight_ > 0) {
            return;
        }
        // The alert is out. A FIN follows it, and the connection closes when the client's FIN
        // arrives (or the flush timeout fires): closing with unread input would send a reset
        // that can destroy the alert before the client reads it.
        if (clientEof_ || clientGone_) {
            closeAll();
        } else if (!clientShutdown_) {
            clientShutdown_ = true;
            if (uv_shutdown(&clientShutdownReq_, clientStream(), onClientShutdown) != 0) {
                closeAll();
            }
        }
        return;
    }
    if (upstreamDone() && downstreamDone()) {
        closeAll();
    }
}

// --- Backend -----------------------------------------------------------------------------------

void Connection::startBackend() {
    backendStarted_ = true;
    uv_loop_t *loop = server_.loop();
    phaseStart_ = uv_now(loop);
    connectStartHr_ = uv_hrtime();
    const auto &target = settings_->backend;
    if (target.kind == Address::Kind::unix) {
        uv_pipe_init(loop, &backend_.pipe, 0);
        backend_.pipe.data = this;
        backendInitialised_ = true;
        ++openHandles_;
        // uv_pipe_connect reports every outcome, failures included, through the callback.
        uv_pipe_connect(&connectReq_, &backend_.pipe, target.path.c_str(), onBackendConnect);
    } else {
        uv_tcp_init(loop, &backend_.tcp);
        backend_.tcp.data = this;
        backendInitialised_ = true;
        ++openHandles_;
        const int err = uv_tcp_connect(&connectReq_, &backend_.tcp, target.raw(), onBackendConnect);
        if (err != 0) {
            backendFailed("connect", err);
            return;
        }
    }
    armTimer();
}

void Connection::backendFailed(const char *what, int status) {
    if (backendGone_) {
        return;
    }
    server_.counters().backendFailures++;
    noteClose(backendConnected_ ? CloseReason::backendReset : CloseReason::backendFailed,
              std::string(what) + ": " + uv_err_name(status));
    if (!backendConnected_) {
        stats().backendConnectFailed();
    }
    log::warn(std::string("backend-failed listener=") + settings_->name + " peer=" + peer_ +
              " backend=" + settings_->backendText + " during=" + what +
              " error=" + uv_err_name(status));
    // A backend that fails after it was connected cut its reply short: the client must be able
    // to tell. One that never connected sent nothing: a clean close_notify says so.
    truncateClient_ = backendConnected_;
    backendGone_ = true;
    if (backendReading_) {
        uv_read_stop(backendStream());
        backendReading_ = false;
    }
    pump();
}

// --- Timeouts ----------------------------------------------------------------------------------

std::uint64_t Connection::deadline() const {
    const Timeouts &t = settings_->timeouts;
    auto at = [](std::uint64_t from, Duration limit) -> std::uint64_t {
        return limit.count() > 0 ? from + static_cast<std::uint64_t>(limit.count()) : 0;
    };
    if (flushing_) {
        return at(phaseStart_, t.flush);
    }
    const EngineStatus status = engine_->status();
    if (!status.handshakeDone) {
        return at(acceptedAt_, t.handshake);
    }
    if (backendStarted_ && !backendConnected_ && !backendGone_) {
        return at(phaseStart_, t.connect);
    }
    const bool halfClosed = status.closeNotifyReceived || status.truncated || backendEof_ ||
                            backendGone_ || clientShutdown_ || backendShutdown_;
    if (halfClosed) {
        return at(lastActivity_, t.halfClose);
    }
    return at(lastActivity_, t.idle);
}

void Connection::armTimer() {
    if (closing_ || !engine_) {
        return;
    }
    const std::uint64_t due = deadline();
    if (due == 0) {
        uv_timer_stop(&timer_);
        return;
    }
    const std::uint64_t now = uv_now(server_.loop());
    uv_timer_start(&timer_, onTimer, due > now ? due - now : 0, 0);
}

void Connection::touch() {
    lastActivity_ = uv_now(server_.loop());
}

void Connection::onTimer(uv_timer_t *timer) {
    auto *self = static_cast<Connection *>(timer->data);
    if (self->closing_) {
        return;
    }
    const std::uint64_t due = self->deadline();
    if (due == 0 || uv_now(self->server_.loop()) < due) {
        self->armTimer(); // activity moved the deadline; wait for the new one
        return;
    }
    const EngineStatus status = self->engine_->status();
    const char *phase = self->flushing_                                   ? "flush"
                        : !status.handshakeDone                           ? "handshake"
                        : !self->backendConnected_ && !self->backendGone_ ? "connect"
                        : (status.closeNotifyReceived || status.truncated || self->backendEof_ ||
                           self->backendGone_ || self->clientShutdown_ || self->backendShutdown_)
                            ? "half-close"
                            : "idle";
    self->server_.counters().timeouts++;
    self->noteClose(std::strcmp(phase, "flush") == 0       ? CloseReason::timeoutFlush
                    : std::strcmp(phase, "handshake") == 0 ? CloseReason::timeoutHandshake
                    : std::strcmp(phase, "connect") == 0   ? CloseReason::timeoutConnect
                    : std::strcmp(phase, "idle") == 0      ? CloseReason::timeoutIdle
                                                           : CloseReason::timeoutHalfClose);
    log::info(std::string("timeout listener=") + self->settings_->name + " peer=" + self->peer_ +
              " phase=" + phase);
    if (std::strcmp(phase, "connect") == 0) {
        self->backendFailed("connect", UV_ETIMEDOUT);
        return;
    }
    self->abort(phase);
}

// --- Closing -----------------------------------------------------------------------------------

void Connection::abort(const char *reason) {
    if (closing_) {
        return;
    }
    if (log::enabled(LogLevel::debug)) {
        log::debug(std::string("connection-aborted listener=") + settings_->name +
                   " peer=" + peer_ + " reason=" + reason);
    }
    // Timeouts and backend failures noted their own reason before getting here.
    if (std::strcmp(reason, "client reset") == 0 ||
        std::strcmp(reason, "client write failed") == 0) {
        noteClose(CloseReason::clientReset, reason);
    } else if (std::strcmp(reason, "drain deadline") == 0) {
        noteClose(CloseReason::drain);
    } else if (std::strcmp(reason, "backend reset") == 0) {
        noteClose(CloseReason::backendReset);
    }
    closeAll();
}

void Connection::noteClose(CloseReason reason, std::string_view error) {
    if (closeReasonSet_) {
        return;
    }
    closeReasonSet_ = true;
    closeReason_ = reason;
    closeError_ = error;
}

void Connection::recordClose() {
    const CloseReason reason = closeReason_;
    if (handshakeNanos_ < 0) {
        stats().handshakeNotDone(
            reason == CloseReason::handshakeFailed || reason == CloseReason::tlsError
                ? HandshakeResult::failed
            : reason == CloseReason::timeoutHandshake ? HandshakeResult::timeout
                                                      : HandshakeResult::aborted);
    }
    stats().connectionClosed(reason);
    if (!accessLogEnabled()) {
        return;
    }
    ConnectionRecord record;
    record.startUnixMicros = startUnixMicros_;
    record.durationNanos = uv_hrtime() - acceptedHr_;
    record.listener = settings_->name;
    record.client = peer_;
    record.backend = settings_->backendText;
    if (engine_ && handshakeNanos_ >= 0) {
        const auto &info = engine_->handshake();
        record.handshakeDone = true;
        record.protocol = info.protocol;
        record.cipher = info.cipher;
        record.sni = info.serverName;
        record.alpn = info.alpn;
        record.resumed = info.resumed;
        record.clientIdentity = info.clientIdentity;
    }
    record.handshakeNanos = handshakeNanos_;
    record.connectNanos = connectNanos_;
    record.bytesClientToBackend = bytesUp_;
    record.bytesBackendToClient = bytesDown_;
    record.reason = reason;
    record.error = closeError_;
    emitConnectionRecord(record);
}

void Connection::endHandshakeCount() {
    if (handshakeCounted_) {
        handshakeCounted_ = false;
        server_.handshakeEnded(ipKey_);
    }
}

void Connection::closeAll() {
    if (closing_) {
        return;
    }
    closing_ = true;
    endHandshakeCount();
    recordClose();
    if (log::enabled(LogLevel::debug)) {
        log::debug("connection-closed listener=" + settings_->name + " peer=" + peer_ +
                   " up=" + std::to_string(bytesUp_) + " down=" + std::to_string(bytesDown_));
    }
    uv_close(reinterpret_cast<uv_handle_t *>(client_), onClose);
    uv_close(reinterpret_cast<uv_handle_t *>(&timer_), onClose);
    if (backendInitialised_) {
        uv_close(reinterpret_cast<uv_handle_t *>(&backend_), onClose);
    }
}

void Connection::onClose(uv_handle_t *handle) {
    auto *self = static_cast<Connection *>(handle->data);
    if (handle == reinterpret_cast<uv_handle_t *>(self->client_)) {
        delete self->client_;
        self->client_ = nullptr;
    }
    self->handleClosed();
}

void Connection::handleClosed() {
    if (--openHandles_ > 0) {
        return;
    }
    // Keep the settings alive past the call: the server may drop its own reference in it.
    auto settings = settings_;
    server_.connectionClosed(this, *settings);
    delete this;
}

// --- libuv callbacks ---------------------------------------------------------------------------

void Connection::onClientAlloc(uv_handle_t *handle, size_t, uv_buf_t *buf) {
    auto *self = static_cast<Connection *>(handle->data);
    // Zero copy: the socket reads straight into the engine's pair.
    auto space = self->closing_ ? std::span<std::uint8_t>() : self->engine_->cipherInSpace();
    *buf = uv_buf_init(reinterpret_cast<char *>(space.data()), static_cast<unsigned>(space.size()));
}

void Connection::onClientRead(uv_stream_t *stream, ssize_t nread, const uv_buf_t *) {
    auto *self = static_cast<Connection *>(stream->data);
    if (self->closing_) {
        return;
    }
    if (nread > 0) {
        self->engine_->commitCipherIn(static_cast<std::size_t>(nread));
        self->touch();
    } else if (nread == UV_ENOBUFS) {
        uv_read_stop(stream);
        self->clientReading_ = false;
    } else if (nread == UV_EOF) {
        uv_read_stop(stream);
        self->clientReading_ = false;
        self->clientEof_ = true;
        self->touch();
        self->engine_->cipherInEof();
    } else if (nread < 0) {
        self->clientGone_ = true;
        self->abort("client reset");
        return;
    }
    self->pump();
}

void Connection::onClientWrite(uv_write_t *req, int status) {
    auto *self = static_cast<Connection *>(req->data);
    const std::size_t written = self->clientWriteInFlight_;
    self->clientWriteInFlight_ = 0;
    if (self->closing_) {
        return; // the pinned bytes are released with the engine
    }
    if (status < 0) {
        self->clientGone_ = true;
        self->abort("client write failed");
        return;
    }
    self->engine_->consumeCipherOut(written);
    self->touch();
    self->pump();
}

void Connection::onClientShutdown(uv_shutdown_t *req, int) {
    auto *self = static_cast<Connection *>(req->data);
    if (self->closing_) {
        return;
    }
    self->clientShutdownDone_ = true;
    self->pump();
}

void Connection::onBackendConnect(uv_connect_t *req, int status) {
    auto *self = static_cast<Connection *>(req->data);
    if (self->closing_) {
        return;
    }
    if (status < 0) {
        self->backendFailed("connect", status);
        return;
    }
    self->backendConnected_ = true;
    self->connectNanos_ = static_cast<std::int64_t>(uv_hrtime() - self->connectStartHr_);
    stats().backendConnected(static_cast<std::uint64_t>(self->connectNanos_));
    if (self->settings_->backend.kind == Address::Kind::tcp) {
        uv_tcp_nodelay(&self->backend_.tcp, 1);
        uv_tcp_keepalive(&self->backend_.tcp, 1, keepAliveDelaySeconds);
    }
    self->touch();
    self->armTimer();
    self->pump();
}

void Connection::onBackendAlloc(uv_handle_t *handle, size_t, uv_buf_t *buf) {
    auto *self = static_cast<Connection *>(handle->data);
    const std::size_t capacity = self->settings_->buffers.backend;
    if (self->closing_) {
        *buf = uv_buf_init(nullptr, 0);
        return;
    }
    if (!self->reply_) {
        self->reply_ = std::make_unique_for_overwrite<std::uint8_t[]>(capacity);
        self->replyHead_ = self->replyTail_ = 0;
    } else if (self->replyTail_ == capacity && self->replyHead_ > 0) {
        // The engine holds no pointer into this queue (it copies on write), so the unsent tail
        // can move to the front.
        std::memmove(self->reply_.get(), self->reply_.get() + self->replyHead_,
                     self->replyTail_ - self->replyHead_);
        self->replyTail_ -= self->replyHead_;
        self->replyHead_ = 0;
    }
    *buf = uv_buf_init(reinterpret_cast<char *>(self->reply_.get() + self->replyTail_),
                       static_cast<unsigned>(capacity - self->replyTail_));
}

void Connection::onBackendRead(uv_stream_t *stream, ssize_t nread, const uv_buf_t *) {
    auto *self = static_cast<Connection *>(stream->data);
    if (self->closing_) {
        return;
    }
    if (nread > 0) {
        self->replyTail_ += static_cast<std::size_t>(nread);
        self->touch();
    } else if (nread == UV_ENOBUFS) {
        uv_read_stop(stream);
        self->backendReading_ = false;
    } else if (nread == UV_EOF) {
        uv_read_stop(stream);
        self->backendReading_ = false;
        // Linux reports a reset that arrives behind queued data as a plain EOF (read returns 0
        // once the socket is done); the pending socket error tells the two apart, and a reset
        // must not become a clean close_notify (faults.backend_resets_mid_stream_others_...).
        if (const int reset = pendingSocketError(stream); reset != 0) {
            self->backendFailed("read", reset);
            return;
        }
        self->backendEof_ = true;
        self->touch();
        self->armTimer();
    } else if (nread < 0) {
        self->backendFailed("read", static_cast<int>(nread));
        return;
    }
    if (self->replyHead_ == self->replyTail_ && self->reply_ && nread <= 0) {
        self->reply_.reset();
        self->replyHead_ = self->replyTail_ = 0;
    }
    self->pump();
}

void Connection::onBackendWrite(uv_write_t *req, int status) {
    auto *self = static_cast<Connection *>(req->data);
    const std::size_t written = self->backendWriteInFlight_;
    self->backendWriteInFlight_ = 0;
    if (self->closing_) {
        return;
    }
    if (status < 0) {
        self->backendFailed("write", status);
        return;
    }
    self->engine_->consumePlainOut(written);
    self->bytesUp_ += written;
    stats().bytesClientToBackend(written);
    self->touch();
    self->pump();
}

void Connection::onBackendShutdown(uv_shutdown_t *req, int) {
    auto *self = static_cast<Connection *>(req->data);
    if (self->closing_) {
        return;
    }
    self->backendShutdownDone_ = true;
    self->pump();
}

} // namespace sluice::proxy
