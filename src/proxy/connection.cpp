#include "proxy/connection.hpp"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include "net/address.hpp"
#include "net/close_notice.hpp"
#include "net/listen_socket.hpp"
#include "proxy/proxy_protocol.hpp"
#include "proxy/server.hpp"
#include "proxy/stats.hpp"
#include "util/log.hpp"

namespace sluice::proxy {
namespace {

// The longest PROXY header a listener accepts (v1 is at most 107 bytes; v2 carries TLVs).
constexpr std::size_t maxProxyHeader = 4096;

std::uint64_t monotonicMs() {
    return uv_hrtime() / 1000000;
}

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
template <typename Request>
int writeSome(uv_stream_t *stream, std::span<const std::uint8_t> bytes, Request request,
              uv_write_cb done, std::uint32_t &inFlight) {
    uv_buf_t buf = uv_buf_init(const_cast<char *>(reinterpret_cast<const char *>(bytes.data())),
                               static_cast<unsigned>(bytes.size()));
    const int sent = uv_try_write(stream, &buf, 1);
    if (sent != UV_EAGAIN && sent != 0) {
        return sent;
    }
    const int err = uv_write(request(), stream, &buf, 1, done);
    if (err != 0) {
        return err;
    }
    inFlight = static_cast<std::uint32_t>(bytes.size());
    return 0;
}

// How long TLS 1.3 session tickets wait for the first reply to share its write.
constexpr std::uint64_t ticketHoldMs = 50;

} // namespace

// An idle connection costs mostly this object. Beside libuv's two handles its fields take 264
// bytes, so on x86-64 Linux it is 776 bytes, a 784-byte heap chunk; one byte more would make
// it 784 bytes (alignment), an 800-byte chunk.
static_assert(sizeof(Connection) - sizeof(uv_tcp_t) - sizeof(uv_pipe_t) <= 264,
              "a field more moves each connection into a larger heap chunk");

Connection *Connection::adopt(Server &server, int fd) {
    auto *connection = new Connection(server);
    uv_tcp_init(server.loop(), &connection->client_);
    connection->client_.data = connection;
    if (uv_tcp_open(&connection->client_, fd) != 0) {
        ::close(fd); // not the handle's: nothing else would close it
        connection->refuse();
        return nullptr;
    }
    return connection;
}

int Connection::clientFd() const {
    uv_os_fd_t fd = -1;
    return uv_fileno(reinterpret_cast<const uv_handle_t *>(&client_), &fd) == 0 ? fd : -1;
}

void Connection::refuse() {
    net::closeSocket(reinterpret_cast<uv_handle_t *>(&client_),
                     [](uv_handle_t *handle) { delete static_cast<Connection *>(handle->data); });
}

void Connection::start(std::shared_ptr<const ListenerSettings> settings,
                       const sockaddr_storage &peer, std::string ipKey) {
    settings_ = std::move(settings);
    // The key is the client's address, or empty (nothing counted) before a PROXY header.
    if (begin(peer)) {
        handshakeCounted_ = !ipKey.empty();
    } else {
        server_.handshakeEnded(ipKey); // it failed and began closing
    }
    server_.connectionOpened(this, *settings_);
    pump();
}

Connection::Connection(Server &server)
    : server_(server) {}

bool Connection::begin(const sockaddr_storage &peer) {
    uv_loop_t *loop = server_.loop();
    clientAddress_ = ipAddress(peer);
    openHandles_ = 1;
    // The client socket has the listener's socket options already: it inherits them from the
    // listening socket, where the Listener set them.
    lastActivity_ = uv_now(loop);
    acceptedHr_ = uv_hrtime();
    server_.metrics().connectionAccepted();
    awaitingProxy_ = !settings_->acceptProxyFrom.empty();
    clientIn_.setCapacity(settings_->buffers.plaintext);
    reply_.setCapacity(settings_->buffers.backend);

    if (!settings_->plaintext) {
        EngineOptions options;
        options.pairSize = settings_->buffers.tls;
        options.bulkPairSize = settings_->buffers.tlsBulk;
        options.plaintextBudget = settings_->buffers.plaintext;
        options.holdTickets = true; // see holdingTickets()
        std::string error;
        engine_ = Engine::create(settings_->context.get(), Role::server, options, &error);
        if (!engine_) {
            log::error("engine-failed listener=" + settings_->name + " peer=" + peerText() +
                       " reason=" + log::quoted(error));
            noteClose(CloseReason::internal, error);
            closeAll();
            return false;
        }
    }
    armTimer();
    return true;
}

Connection::~Connection() = default;

Connection::IpAddress Connection::ipAddress(const sockaddr_storage &from) {
    IpAddress out{};
    if (from.ss_family == AF_INET) {
        std::memcpy(&out.v4, &from, sizeof out.v4);
    } else if (from.ss_family == AF_INET6) {
        std::memcpy(&out.v6, &from, sizeof out.v6);
    } else {
        out.any.sa_family = AF_UNSPEC;
    }
    return out;
}

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
            if (!pumpRound() || closing_) {
                break;
            }
            if (settled()) {
#ifndef NDEBUG
                // The test builds check settled() against the steps themselves: one more round
                // must move nothing, or a step gained a condition that settled() does not know.
                if (pumpRound()) {
                    log::error("pump-settled-early listener=" + settings_->name +
                               " peer=" + peerText() + " action=abort");
                    std::abort();
                }
#endif
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
        keepOrReleaseBuffers();
    }
}

bool Connection::pumpRound() {
    bool progress = feedLeftover();
    progress |= moveDown();
    progress |= flushClient();
    progress |= moveUp();
    progress |= flushBackend();
    if (closing_) {
        return progress;
    }
    progress |= checkEngines();
    if (closing_) {
        return progress;
    }
    if (!flushing_) {
        progress |= moveDown();
        progress |= propagateCloses();
    }
    return progress;
}

bool Connection::settled() {
    // Step by step, what would make each one act: feedLeftover() a PROXY remainder; moveDown()
    // reply bytes; flushClient() ciphertext (or held tickets, or a held tail); moveUp() a
    // backend engine or handler; flushBackend() a header or plaintext; checkEngines() a failure,
    // an unrecorded handshake or an unstarted backend; propagateCloses() an end either way.
    if (engine_ == nullptr || backendEngine_ || local_ || flushing_ || awaitingProxy_ ||
        !backendStarted_ || !backendConnected_ || !backendReady() || handshakeMicros_ < 0 ||
        proxyInPending() || !proxyOutDone() || backendReadFull_ || clientEof_ || backendEof_ ||
        clientGone_ || clientShutdown_ || backendShutdown_ || engine_->ticketsHeld()) {
        return false;
    }
    const EngineStatus status = engine_->status();
    if (!status.handshakeDone || status.failed || status.closeNotifyReceived || status.truncated ||
        status.closeNotifySent) {
        return false;
    }
    return reply_.data().empty() && (clientWriteInFlight_ > 0 || !status.ciphertextPending) &&
           (backendWriteInFlight_ > 0 || !status.plaintextReady);
}

void Connection::keepOrReleaseBuffers() {
    // A busy connection keeps its pairs, and OpenSSL's record buffers (a malloc and a free per
    // read and per write otherwise), for the next pump; the server's sweep releases them once
    // it is idle, or they go now when busy connections already hold all they may. One without
    // a pair (a plaintext listener to a plain pool) has nothing worth keeping.
    const std::size_t bytes =
        (engine_ ? engine_->warmBytes() : 0) + (backendEngine_ ? backendEngine_->warmBytes() : 0);
    if (bytes == 0 || !server_.keepBuffers(*this, bytes)) {
        releaseIdleBuffers();
        return;
    }
    // The record buffers only once the connection is busy past its first exchanges (a few
    // round trips): kept by every short connection of a burst, 33 KiB each for a quarter of a
    // second, they fragment the heap that the long-lived connections of the burst share.
    if (warmPumps_ < busyPumps) {
        if (!engine_ || engine_->status().handshakeDone) {
            ++warmPumps_;
        }
        return;
    }
    if (engine_) {
        engine_->keepRecordBuffers();
    }
    if (backendEngine_) {
        backendEngine_->keepRecordBuffers();
    }
}

bool Connection::releaseBuffers(Warm &warm) {
    return static_cast<Connection &>(warm).releaseIdleBuffers();
}

bool Connection::releaseIdleBuffers() {
    // Between pumps no span into a pair is held (libuv asks for read space only when the
    // socket is readable), so an idle connection can give its pairs back.
    bool released = true;
    if (engine_ && !engine_->releaseIdleBuffers()) {
        released = false;
    }
    if (backendEngine_ && (backendWriteInFlight_ != 0 || !backendEngine_->releaseIdleBuffers())) {
        released = false;
    }
    if (requestsInFlight_ == 0) {
        requests_.reset();
    } else {
        released = false;
    }
    return released;
}

Connection::Requests &Connection::requests() {
    if (!requests_) {
        requests_ = std::make_unique<Requests>();
        requests_->connect.data = this;
        requests_->clientWrite.data = this;
        requests_->backendWrite.data = this;
        requests_->clientShutdown.data = this;
        requests_->backendShutdown.data = this;
    }
    return *requests_;
}

bool Connection::startShutdown(uv_shutdown_t Requests::*req, uv_stream_t *stream,
                               uv_shutdown_cb done) {
    // With nothing queued on the socket, the FIN goes now: uv_shutdown would only watch the
    // socket for writability to send it on the loop's next turn, one epoll_ctl() and one
    // callback more per half-close.
    uv_os_fd_t fd = -1;
    if (uv_stream_get_write_queue_size(stream) == 0 &&
        uv_fileno(reinterpret_cast<uv_handle_t *>(stream), &fd) == 0) {
        ::shutdown(fd, SHUT_WR); // a peer already gone (ENOTCONN) leaves nothing to end either
        return false;
    }
    if (uv_shutdown(&(requests().*req), stream, done) != 0) {
        return false;
    }
    ++requestsInFlight_;
    return true;
}

Connection::Proxy &Connection::proxy() {
    if (!proxy_) {
        proxy_ = std::make_unique<Proxy>();
    }
    return *proxy_;
}

bool Connection::batchable() const {
    return clientReady() && (!backendEngine_ || backendEngine_->status().handshakeDone);
}

bool Connection::clientReady() const {
    if (awaitingProxy_ || proxyInPending()) {
        return false;
    }
    if (!engine_) {
        return true;
    }
    const EngineStatus status = engine_->status();
    return status.handshakeDone && !status.failed;
}

bool Connection::backendReady() const {
    return backendReady_ && !backendGone_ && !backendClosing_;
}

std::span<const std::uint8_t> Connection::upSource() {
    if (awaitingProxy_) {
        return {};
    }
    return engine_ ? engine_->plainOut() : clientIn_.data();
}

void Connection::upConsume(std::size_t n) {
    if (engine_) {
        engine_->consumePlainOut(n);
    } else {
        clientIn_.consume(n);
    }
}

bool Connection::upEnded() const {
    if (engine_) {
        const EngineStatus status = engine_->status();
        return status.closeNotifyReceived || status.truncated;
    }
    return clientEof_ && !proxyInPending();
}

std::span<const std::uint8_t> Connection::downSource() {
    if (local_) {
        if (!local_->out || local_->out->empty()) {
            return {};
        }
        const std::string &front = local_->out->front();
        return {reinterpret_cast<const std::uint8_t *>(front.data()) + local_->head,
                front.size() - local_->head};
    }
    if (backendEngine_) {
        return backendReady_ ? backendEngine_->plainOut() : std::span<const std::uint8_t>();
    }
    return reply_.data();
}

void Connection::downConsume(std::size_t n) {
    if (local_) {
        local_->queued -= n;
        local_->head += n;
        if (local_->head == local_->out->front().size()) {
            local_->out->pop_front();
            local_->head = 0;
            if (local_->out->empty()) {
                local_->out.reset(); // an idle handler connection holds no queue
            }
        }
        return;
    }
    if (backendEngine_) {
        backendEngine_->consumePlainOut(n);
    } else {
        reply_.consume(n);
    }
}

bool Connection::downEnded() const {
    if (backendGone_) {
        return true;
    }
    if (local_) {
        return local_->shutdownCalled;
    }
    if (backendEngine_) {
        const EngineStatus status = backendEngine_->status();
        return backendReady_ && (status.closeNotifyReceived || status.truncated);
    }
    return backendEof_;
}

bool Connection::feedLeftover() {
    // Bytes that arrived behind the PROXY header go where the socket would have put them; the
    // socket is not read again until they are all in.
    if (!proxyInPending() || awaitingProxy_ || closing_) {
        return false;
    }
    Proxy &p = *proxy_;
    const std::size_t left = p.inLength - p.inHead;
    std::span<std::uint8_t> space =
        engine_ ? engine_->cipherInSpace() : clientIn_.space(backendPinned_ != Pinned::plain);
    const std::size_t n = std::min(left, space.size());
    if (n == 0 && left > 0) {
        return false;
    }
    std::memcpy(space.data(), p.in.get() + p.inHead, n);
    p.inHead += n;
    if (p.inHead == p.inLength) {
        p.in.reset();
        p.inHead = p.inLength = 0;
    }
    if (engine_) {
        engine_->commitCipherIn(n);
        if (!p.in && clientEof_) {
            engine_->cipherInEof();
        }
    } else {
        clientIn_.commit(n);
    }
    return true;
}

bool Connection::checkEngines() {
    bool progress = false;
    if (engine_ && !flushing_) {
        const EngineStatus status = engine_->status();
        if (status.failed) {
            if (!status.handshakeDone) {
                noteClose(CloseReason::handshakeFailed, engine_->errorReason());
                // A flood of bad handshakes must not become a flood of log lines.
                std::uint64_t suppressed = 0;
                if (handshakeLogLimit().admit(uv_hrtime() / 1000000, suppressed)) {
                    if (suppressed > 0) {
                        log::warn("handshake-failed-suppressed count=" +
                                  std::to_string(suppressed));
                    }
                    log::warn("handshake-failed listener=" + settings_->name + " peer=" +
                              peerText() + " reason=" + log::quoted(engine_->errorReason()));
                }
            } else {
                noteClose(CloseReason::tlsError, engine_->errorReason());
                log::warn("tls-error listener=" + settings_->name + " peer=" + peerText() +
                          " reason=" + log::quoted(engine_->errorReason()));
            }
            flushing_ = true;
            phaseStart_ = uv_now(server_.loop());
            armTimer();
            return true;
        }
        if (status.handshakeDone && handshakeMicros_ < 0) {
            endHandshakeCount();
            const auto &info = engine_->handshake();
            const std::uint64_t nanos = uv_hrtime() - acceptedHr_;
            handshakeMicros_ = micros(nanos);
            server_.metrics().handshakeDone(tlsVersionFrom(info.protocol), info.resumed, nanos);
            if (!handshakeLogged_ && log::enabled(LogLevel::debug)) {
                log::debug("handshake listener=" + settings_->name + " peer=" + peerText() +
                           " protocol=" + info.protocol + " cipher=" + info.cipher + " sni=" +
                           log::quoted(info.serverName) + " alpn=" + log::quoted(info.alpn) +
                           " resumed=" + (info.resumed ? "yes" : "no") +
                           (info.clientSubject.empty()
                                ? std::string()
                                : " client=" + log::quoted(info.clientIdentity) +
                                      " client_subject=" + log::quoted(info.clientSubject) +
                                      " client_verified=" + (info.clientVerified ? "yes" : "no")));
            }
            handshakeLogged_ = true;
            if (engine_->ticketsHeld()) {
                armTimer(); // bounds how long the tickets wait for a reply
            }
        }
    }
    if (!flushing_ && !backendStarted_) {
        if (clientReady()) {
            endHandshakeCount();
            startBackend(route());
            progress = true;
        } else if (engine_ && !helloRouted_ && !awaitingProxy_ && !proxyInPending() &&
                   engine_->status().helloAccepted) {
            // A pool that connects after the hello overlaps its connect with the rest of the
            // handshake; an in-process handler has nothing to connect. Asked once (a failed
            // engine turned the connection to flushing above).
            helloRouted_ = true;
            Pool *pool = route();
            if (pool->config().connectAfter == ConnectAfter::hello && pool->handler() == nullptr) {
                helloStarted_ = true;
                startBackend(pool);
                progress = true;
            }
        }
    }
    if (proxyHeaderDue_ && clientReady()) {
        proxyHeaderDue_ = false;
        buildProxyHeader();
        progress = true;
    }
    if (backendEngine_ && backendConnected_ && !backendGone_ && !backendClosing_) {
        const EngineStatus status = backendEngine_->status();
        if (status.failed) {
            backendFailed("tls", UV_EPROTO, backendEngine_->errorReason());
            return true;
        }
        if (status.handshakeDone && !backendReady_) {
            backendReady_ = true;
            backendConnected();
            progress = true;
        }
    }
    return progress;
}

bool Connection::moveDown() {
    // Backend plaintext into the client engine (it copies as it encrypts). A plaintext client
    // is written straight from where the bytes wait, by flushClient().
    if (!engine_ || flushing_ || !clientReady()) {
        return false;
    }
    bool progress = false;
    for (auto down = downSource(); !down.empty(); down = downSource()) {
        const std::size_t taken = engine_->write(down);
        if (taken == 0) {
            break;
        }
        downConsume(taken);
        bytesDown_ += taken;
        server_.metrics().bytesBackendToClient(taken);
        progress = true;
    }
    return progress;
}

bool Connection::moveUp() {
    if (local_) {
        return moveToHandler();
    }
    // Client plaintext into the backend engine; a plain backend is written straight from where
    // the bytes wait, by flushBackend().
    if (!backendEngine_ || !backendReady() || backendTlsShutdown_) {
        return false;
    }
    bool progress = false;
    for (auto up = upSource(); !up.empty(); up = upSource()) {
        const std::size_t taken = backendEngine_->write(up);
        if (taken == 0) {
            break;
        }
        upConsume(taken);
        bytesUp_ += taken;
        server_.metrics().bytesClientToBackend(taken);
        progress = true;
    }
    return progress;
}

template <typename Next, typename Consume>
int Connection::writeFrom(uv_stream_t *stream, uv_write_t Requests::*req, uv_write_cb done,
                          std::uint32_t &inFlight, Pinned what, Next next, Consume consume) {
    // Straight from where the bytes wait: what the socket does not take now leaves in one
    // write that pins them until its callback consumes them.
    int result = 0;
    for (auto bytes = next(); !bytes.empty(); bytes = next()) {
        const int sent = writeSome(
            stream, bytes, [this, req] { return &(requests().*req); }, done, inFlight);
        if (sent < 0) {
            return sent;
        }
        if (sent == 0) {
            ++requestsInFlight_;
            if (stream == clientStream()) {
                clientPinned_ = what;
            } else {
                backendPinned_ = what;
            }
            break;
        }
        consume(static_cast<std::size_t>(sent));
        touch();
        result = 1;
    }
    return result;
}

bool Connection::holdingTickets() {
    if (!engine_ || !engine_->ticketsHeld()) {
        return false;
    }
    // The first reply takes the TLS 1.3 tickets along in its write, saving the client a TCP
    // segment and sluice a write. Not for long: a backend that is silent for ticketHoldMs, or
    // any end, sends them on their own.
    const std::uint64_t due = ticketsDue();
    if (downEnded() || clientEof_ || flushing_ || due == 0 || uv_now(server_.loop()) >= due) {
        engine_->releaseTickets();
        return false;
    }
    return true;
}

std::int32_t Connection::micros(std::uint64_t nanos) {
    return static_cast<std::int32_t>(std::min<std::uint64_t>(nanos / 1000, INT32_MAX));
}

std::uint64_t Connection::ticketsDue() const {
    if (!engine_ || !engine_->ticketsHeld()) {
        return 0;
    }
    if (handshakeMicros_ < 0) {
        // The handshake ended in this pump, in the read that precedes flushClient(), and
        // checkEngines() has yet to record when: the hold starts now.
        return uv_now(server_.loop()) + ticketHoldMs;
    }
    return acceptedMs() + static_cast<std::uint64_t>(handshakeMicros_) / 1000 + ticketHoldMs;
}

bool Connection::holdingTail() {
    // Bulk from the backend arrives in reads of buffers.backend, and their TLS rarely fills
    // whole pairs: a 64 KiB read becomes 65,624 bytes of records, written as full pairs and an
    // 88-byte tail, one write and TCP segment in three (in two, once the pair grew to 64 KiB)
    // for 0.1% of the bytes. When a read filled its buffer, libuv reads again before anything
    // else runs, so a tail shorter than a record waits for that read's records and leaves in
    // their write. Only the pump of that read holds (backendReadFull_), and never past this
    // turn of the loop: the next read's callback (bytes, EAGAIN, EOF or an error) or, should
    // libuv have stopped reading (it caps the reads one readiness makes), the Server's check,
    // which follows the poll phase that reads, ends it.
    if (!backendReadFull_ || !engine_ || flushing_ || !downSource().empty() ||
        engine_->cipherOutPending() >= tailBytes) {
        return false;
    }
    holdWrites();
    return true;
}

bool Connection::pumpAtCheck(bool shortRead) {
    // A read that did not fill its buffer is this socket's last in this turn of the loop, and
    // other sockets' reads may follow it in the same poll. Its pump, and so its writes, wait
    // for the check phase that follows them all: a peer on this host (a backend, or a client
    // on loopback) asleep in epoll_wait() is then woken once for the turn's writes rather than
    // after each read, and wakes to all of them, where a write after every read woke it for
    // one at a time. One pump there does what a pump here and another to write would do.
    // A read that filled its buffer (bulk) pumps and writes at once: libuv reads that socket
    // again first, and holdingTail() keeps back only what is too short to leave alone. So does
    // a read during a handshake (batchable()): its flight can cost a signature (an RSA-2048
    // one takes a millisecond), and holding every flight of the turn until its last was signed
    // kept clients waiting and left the worker idle between turns (RSA TLS 1.3 handshakes
    // fell from a full core to 0.81 of one).
    if (!shortRead || !batchable()) {
        return false;
    }
    holdWrites();
    return true;
}

void Connection::holdWrites() {
    if (!writesHeld_) {
        writesHeld_ = true;
        server_.holdWrites(*this);
    }
}

void Connection::releaseWrites() {
    writesHeld_ = false;
    pump();
}

bool Connection::flushClient() {
    if (clientGone_ || clientWriteInFlight_ > 0 || closing_ || clientShutdown_ ||
        holdingTickets() || holdingTail()) {
        return false;
    }
    // TLS from the client engine's pair; to a plaintext client, the backend's plaintext.
    const int sent =
        engine_ ? writeFrom(
                      clientStream(), &Requests::clientWrite, onClientWrite, clientWriteInFlight_,
                      Pinned::cipher, [this] { return engine_->cipherOut(); },
                      [this](std::size_t n) { engine_->consumeCipherOut(n); })
                : writeFrom(
                      clientStream(), &Requests::clientWrite, onClientWrite, clientWriteInFlight_,
                      Pinned::plain, [this] { return downSource(); },
                      [this](std::size_t n) {
                          downConsume(n);
                          bytesDown_ += n;
                          server_.metrics().bytesBackendToClient(n);
                      });
    if (sent < 0) {
        clientGone_ = true;
        abort("client write failed");
    }
    return sent != 0;
}

bool Connection::flushBackend() {
    if (local_ || !backendConnected_ || backendGone_ || backendClosing_ ||
        backendWriteInFlight_ > 0 || closing_ || backendShutdown_) {
        return false;
    }
    auto write = [this](Pinned what, auto next, auto consume) {
        return writeFrom(backendStream(), &Requests::backendWrite, onBackendWrite,
                         backendWriteInFlight_, what, next, consume);
    };
    // The PROXY header goes before any other byte, TLS included.
    int sent = write(
        Pinned::header,
        [this] {
            if (!proxy_) {
                return std::span<const std::uint8_t>();
            }
            const auto *header = reinterpret_cast<const std::uint8_t *>(proxy_->out.data());
            return std::span<const std::uint8_t>(header + proxy_->outSent,
                                                 proxy_->out.size() - proxy_->outSent);
        },
        [this](std::size_t n) { proxy_->outSent += n; });
    const bool headerMoved = sent > 0;
    if (sent >= 0 && proxyOutDone()) {
        if (backendEngine_) {
            sent = write(
                Pinned::cipher, [this] { return backendEngine_->cipherOut(); },
                [this](std::size_t n) { backendEngine_->consumeCipherOut(n); });
        } else if (backendReady()) {
            sent = write(
                Pinned::plain, [this] { return upSource(); },
                [this](std::size_t n) {
                    upConsume(n);
                    bytesUp_ += n;
                    server_.metrics().bytesClientToBackend(n);
                });
        }
    }
    if (sent < 0) {
        backendFailed("write", sent);
        return true;
    }
    return headerMoved || sent > 0;
}

bool Connection::propagateCloses() {
    bool progress = false;
    if (local_ && local_->handler && upEnded() && upSource().empty() && !local_->endDelivered) {
        // The handler hears the client's end after its last byte.
        local_->endDelivered = true;
        backendShutdown_ = backendShutdownDone_ = true;
        const bool truncated = engine_ ? !engine_->status().closeNotifyReceived : false;
        local_->handler->onEnd(*local_, truncated);
        return true;
    }
    // Upstream: the client's end (close_notify, or FIN) becomes the backend's end once every
    // byte before it has been written: close_notify first for a TLS backend, then a FIN.
    if (!local_ && upEnded() && backendReady() && !backendShutdown_ && upSource().empty() &&
        backendWriteInFlight_ == 0 && proxyOutDone()) {
        bool finNow = true;
        if (backendEngine_) {
            if (!backendTlsShutdown_) {
                backendTlsShutdown_ = true;
                backendEngine_->shutdown();
                progress = true;
            }
            finNow =
                backendEngine_->status().closeNotifySent && backendEngine_->cipherOutPending() == 0;
        }
        if (finNow) {
            backendShutdown_ = true;
            if (!startShutdown(&Requests::backendShutdown, backendStream(), onBackendShutdown)) {
                backendShutdownDone_ = true;
            }
            armTimer();
            progress = true;
        }
    }
    if (backendGone_ && !upSource().empty()) {
        // Nobody will take these bytes; dropping them lets the client side read to its end.
        upConsume(upSource().size());
        progress = true;
    }
    // Downstream: the backend's end becomes close_notify once every reply byte is encrypted,
    // then a FIN once the close_notify has left (a plaintext client gets the FIN alone). The
    // close_notify is new ciphertext: reporting progress makes the pump flush it in the same
    // turn (the clean-close tests guard this).
    if (backendEngine_ && backendReady_ && !backendGone_) {
        const EngineStatus status = backendEngine_->status();
        if (status.truncated && !status.closeNotifyReceived) {
            truncateClient_ = true; // the backend's TLS stream may be cut short: say so
        }
    }
    // The backend's end reaches a client whose handshake is done, like its bytes (a connect
    // started at the hello can fail or end before that).
    if (downEnded() && downSource().empty() && clientReady()) {
        const bool clientFlushed =
            clientWriteInFlight_ == 0 && (!engine_ || engine_->cipherOutPending() == 0);
        if (truncateClient_) {
            // Deliver what the backend sent, then end the client's TCP connection without
            // close_notify (a plaintext client gets a reset) so it can tell the reply is cut.
            if (clientFlushed) {
                abort("backend reset");
            }
            return progress;
        }
        if (engine_) {
            if (!shutdownRequested_) {
                shutdownRequested_ = true;
                engine_->shutdown();
                progress = true;
            }
        } else if (!clientShutdown_ && !clientGone_ && clientFlushed) {
            endClientSide();
            progress = true;
        }
    }
    if (engine_ && engine_->status().closeNotifySent && !clientShutdown_ && !clientGone_ &&
        engine_->cipherOutPending() == 0 && clientWriteInFlight_ == 0) {
        endClientSide();
        progress = true;
    }
    return progress;
}

void Connection::endClientSide() {
    clientShutdown_ = true;
    // With the client's FIN in and the backend's side done, the connection closes in this
    // pump (maybeFinish), and close() sends the FIN: there is no unread input to turn it into
    // a reset. A shutdown() first would be a system call more, often failing with ENOTCONN
    // against a client that closed at once.
    if ((clientEof_ && upstreamDone()) ||
        !startShutdown(&Requests::clientShutdown, clientStream(), onClientShutdown)) {
        clientShutdownDone_ = true;
    }
    armTimer();
}

void Connection::updateReading() {
    if (closing_) {
        return;
    }
    // Client: while the PROXY header is incomplete, into its buffer; then, while bytes from
    // behind the header wait, not at all; then into the pair (TLS) or the plaintext queue. A
    // full pair or queue means the backend is slow; reading resumes once a quarter of the pair
    // (half of the queue) is free.
    bool wantClient = !clientEof_ && !clientGone_;
    if (awaitingProxy_) {
        wantClient = wantClient && (!proxy_ || proxy_->inLength < maxProxyHeader);
    } else if (proxyInPending()) {
        wantClient = false;
    } else if (engine_) {
        const std::size_t capacity = engine_->cipherInCapacity();
        const std::size_t resumeAt = std::max<std::size_t>(1, settings_->buffers.tls / 4);
        wantClient = wantClient && capacity > 0 && (clientReading_ || capacity >= resumeAt);
    } else {
        const std::size_t queued = clientIn_.size();
        wantClient = wantClient && queued < clientIn_.capacity() &&
                     clientIn_.hasSpace(backendPinned_ != Pinned::plain) &&
                     (clientReading_ || queued <= clientIn_.capacity() / 2);
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
    // Backend: into its engine's pair, or into the reply queue, the same way.
    if (local_) {
        return;
    }
    // A TCP backend is read from while it connects: nothing arrives before the connect is done,
    // and one epoll registration for both then serves the connect and the reads (reading only
    // after it, libuv registers the socket again, and the kernel refuses that first).
    bool wantBackend = (backendConnected_ || backendConnecting_) && !backendClosing_ &&
                       !backendEof_ && !backendGone_ && !flushing_ && !clientGone_;
    if (backendEngine_) {
        const std::size_t capacity = backendEngine_->cipherInCapacity();
        const std::size_t resumeAt = std::max<std::size_t>(1, settings_->buffers.tls / 4);
        wantBackend = wantBackend && capacity > 0 && (backendReading_ || capacity >= resumeAt);
    } else {
        const std::size_t queued = reply_.size();
        wantBackend = wantBackend && queued < reply_.capacity() &&
                      reply_.hasSpace(clientPinned_ != Pinned::plain) &&
                      (backendReading_ || queued <= reply_.capacity() / 2);
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
            if (!startShutdown(&Requests::clientShutdown, clientStream(), onClientShutdown)) {
                closeAll();
            }
        }
        return;
    }
    if (upstreamDone() && downstreamDone()) {
        closeAll();
    }
}

// --- PROXY header from a load balancer -----------------------------------------------------------

bool Connection::takeProxyHeader() {
    Proxy &p = *proxy_;
    const ProxyParse parsed = parseProxyHeader({p.in.get(), p.inLength}, maxProxyHeader);
    if (parsed.status == ProxyParse::needMore && p.inLength < maxProxyHeader) {
        return true;
    }
    if (parsed.status != ProxyParse::done) {
        const std::string error =
            parsed.status == ProxyParse::needMore ? "header too long" : parsed.error;
        std::uint64_t suppressed = 0;
        if (handshakeLogLimit().admit(monotonicMs(), suppressed)) {
            log::warn("proxy-header-invalid listener=" + settings_->name + " peer=" + peerText() +
                      " reason=" + log::quoted(error));
        }
        noteClose(CloseReason::proxyHeader, error);
        closeAll();
        return false;
    }
    awaitingProxy_ = false;
    if (!parsed.local && parsed.source.ss_family != AF_UNSPEC) {
        clientAddress_ = ipAddress(parsed.source);
        p.local = ipAddress(parsed.destination);
        p.localKnown = true;
    }
    p.inHead = parsed.length;
    if (p.inHead == p.inLength) {
        p.in.reset();
        p.inHead = p.inLength = 0;
    }
    // The handshake limit per client address applies to the address the header names.
    endHandshakeCount();
    const std::string ipKey = clientIpKey(&clientAddress_.any);
    if (const auto admission = server_.handshakeStarting(ipKey);
        admission != Server::HandshakeAdmission::admitted) {
        noteClose(CloseReason::limit, admission == Server::HandshakeAdmission::tooMany
                                          ? "handshakes per IP"
                                          : "handshake rate per IP");
        closeAll();
        return false;
    }
    handshakeCounted_ = !ipKey.empty();
    return true;
}

// --- Backend -----------------------------------------------------------------------------------

Pool *Connection::route() const {
    if (engine_) {
        const auto &info = engine_->handshake();
        return settings_->route(info.serverName, info.alpn).get();
    }
    return settings_->pool.get();
}

void Connection::startBackend(Pool *pool) {
    backendStarted_ = true;
    pool_ = pool;
    if (const HandlerFactory *factory = pool_->handler()) {
        startHandler(*factory);
        return;
    }
    tried_.reset(pool_->size());
    if (pool_->config().proxyProtocol != ProxyProtocol::off) {
        // Its TLS facts are known once the handshake is done; until then nothing is sent.
        if (clientReady()) {
            buildProxyHeader();
        } else {
            proxyHeaderDue_ = true;
        }
    }
    connectNext();
}

void Connection::buildProxyHeader() {
    const BackendConfig &config = pool_->config();
    Proxy &p = proxy();
    if (!p.localKnown) {
        const int fd = clientFd();
        socklen_t length = sizeof p.local;
        if (fd < 0 || getsockname(fd, &p.local.any, &length) != 0) {
            p.local.any.sa_family = AF_UNSPEC;
        }
        p.localKnown = true;
    }
    const auto *source = clientAddress_.any.sa_family == AF_UNSPEC ? nullptr : &clientAddress_.any;
    const auto *destination = p.local.any.sa_family == AF_UNSPEC ? nullptr : &p.local.any;
    if (config.proxyProtocol == ProxyProtocol::v1) {
        p.out = buildProxyV1(source, destination);
    } else {
        ProxyTlvFacts facts;
        if (engine_) {
            const auto &info = engine_->handshake();
            const ConnectionFacts more = engine_->facts(config.proxyClientCertMax);
            facts.tls = true;
            facts.alpn = info.alpn;
            facts.authority = info.serverName;
            facts.version = info.protocol;
            facts.cipher = info.cipher;
            facts.sigAlg = more.signatureAlgorithm;
            facts.keyAlg = more.keyAlgorithm;
            facts.clientCertSession = more.peerCertificate;
            facts.clientCertConnection = more.peerCertificate && !info.resumed;
            // Zero only for a certificate that was presented and verified (with the
            // listener's allow lists); X509_V_ERR_UNSPECIFIED (1) when there was none.
            facts.verifyResult = more.peerCertificate && info.clientVerified ? 0
                                 : more.verifyResult != 0
                                     ? static_cast<std::uint32_t>(more.verifyResult)
                                     : 1;
            facts.clientCn = more.peerCommonName;
            facts.clientCertDer = more.peerCertificateDer;
        }
        p.out = buildProxyV2(source, destination, &facts);
    }
}

void Connection::connectNext() {
    const int index = pool_->pick(tried_, monotonicMs());
    if (index < 0) {
        serverIndex_ = -1;
        backendFailed("connect", UV_ECONNREFUSED, "no server left to try");
        return;
    }
    uv_loop_t *loop = server_.loop();
    tried_.set(static_cast<std::size_t>(index));
    ++attempts_;
    serverIndex_ = index;
    serverCounted_ = true;
    PoolServer &server = pool_->server(static_cast<std::size_t>(index));
    server.active.fetch_add(1, std::memory_order_relaxed);
    backendConnected_ = backendConnecting_ = backendReady_ = backendEof_ = backendReading_ = false;
    backendTlsShutdown_ = backendShutdown_ = backendShutdownDone_ = false;
    if (proxy_) {
        proxy_->outSent = 0;
    }
    phaseStart_ = uv_now(loop);
    connectStartMicros_ = static_cast<std::uint32_t>(uv_hrtime() / 1000);
    const net::SocketAddress target = server.resolved();
    if (target.kind == Address::Kind::unix) {
        uv_pipe_init(loop, &backend_.pipe, 0);
        backend_.pipe.data = this;
        backendInitialised_ = true;
        ++openHandles_;
        // uv_pipe_connect reports every outcome, failures included, through the callback.
        uv_pipe_connect(&requests().connect, &backend_.pipe, target.path.c_str(), onBackendConnect);
        ++requestsInFlight_;
    } else {
        uv_tcp_init_ex(loop, &backend_.tcp, target.storage.ss_family);
        backend_.tcp.data = this;
        backendInitialised_ = true;
        ++openHandles_;
        uv_os_fd_t fd = -1;
        if (uv_fileno(reinterpret_cast<uv_handle_t *>(&backend_.tcp), &fd) == 0) {
            net::setSocketOptions(fd, pool_->config().socket, true);
        }
        const int err =
            uv_tcp_connect(&requests().connect, &backend_.tcp, target.raw(), onBackendConnect);
        if (err != 0) {
            backendFailed("connect", err);
            return;
        }
        ++requestsInFlight_;
        backendConnecting_ = true;
    }
    armTimer();
}

void Connection::backendConnected() {
    // Modulo 2^32 microseconds (71 minutes), longer than any connect timeout.
    const std::uint64_t nanos =
        std::uint64_t{static_cast<std::uint32_t>(uv_hrtime() / 1000) - connectStartMicros_} * 1000;
    connectMicros_ = micros(nanos);
    server_.metrics().backendConnected(nanos);
    const auto index = static_cast<std::size_t>(serverIndex_);
    if (pool_->succeeded(index) == HealthChange::recovered) {
        log::info("backend-up backend=" + pool_->name() + " server=" + pool_->server(index).text());
    }
    touch();
    armTimer();
}

void Connection::backendFailed(const char *what, int status, std::string detail) {
    if (backendGone_ || backendClosing_ || closing_) {
        return;
    }
    const std::string serverText =
        serverIndex_ >= 0 ? pool_->server(static_cast<std::size_t>(serverIndex_)).text() : "-";
    const std::string error =
        std::string(what) + ": " + (detail.empty() ? std::string(uv_err_name(status)) : detail);
    // Until the backend is ready no client byte has been sent to it, so the next server of the
    // pool can take the connection.
    const bool ready = backendReady_;
    bool retry = false;
    if (!ready && serverIndex_ >= 0) {
        server_.metrics().backendConnectFailed();
        const auto index = static_cast<std::size_t>(serverIndex_);
        if (pool_->failed(index, monotonicMs()) == HealthChange::markedDown) {
            log::warn("backend-down backend=" + pool_->name() + " server=" + serverText +
                      " failures=" + std::to_string(pool_->server(index).failures.load()) +
                      " for=" + std::to_string(pool_->config().failTimeout.count()) + "ms");
        }
        retry = canRetry();
    }
    log::warn(std::string("backend-failed listener=") + settings_->name + " peer=" + peerText() +
              " backend=" + (pool_ ? pool_->name() : settings_->backendText) +
              " server=" + serverText + " during=" + what + " error=" + log::quoted(error) +
              (retry ? " next=retry" : ""));
    if (retry) {
        releaseServer();
        if (backendReading_) {
            uv_read_stop(backendStream());
            backendReading_ = false;
        }
        backendClosing_ = true;
        net::closeSocket(reinterpret_cast<uv_handle_t *>(&backend_), onBackendClosed);
        return;
    }
    noteClose(ready ? CloseReason::backendReset : CloseReason::backendFailed, error);
    // A backend that fails after it was ready cut its reply short: the client must be able to
    // tell. One that never became ready sent nothing: a clean close_notify says so.
    truncateClient_ = ready;
    backendGone_ = true;
    if (backendReading_) {
        uv_read_stop(backendStream());
        backendReading_ = false;
    }
    pump();
}

bool Connection::canRetry() const {
    return attempts_ < pool_->attemptLimit() && !tried_.all();
}

void Connection::onBackendClosed(uv_handle_t *handle) {
    auto *self = static_cast<Connection *>(handle->data);
    self->backendInitialised_ = false;
    self->backendClosing_ = false;
    if (self->closing_) {
        self->handleClosed();
        return;
    }
    --self->openHandles_;
    // Nothing points into the failed attempt's engine any more.
    self->backendEngine_.reset();
    self->reply_.releaseIfEmpty();
    if (self->reconnectPending_) {
        // The pump starts the backend again once the client's handshake is done.
        self->reconnectPending_ = false;
        self->backendStarted_ = self->proxyHeaderDue_ = false;
        self->backendConnected_ = self->backendReady_ = self->backendEof_ = false;
    } else {
        self->connectNext();
    }
    self->pump();
}

bool Connection::endedQuietlyEarly() const {
    // Connected at the hello, then closed (an idle timeout, a reset) before the client's
    // handshake was done and without one byte for the client: as if never made.
    return helloStarted_ && !clientReady() && !flushing_ && backendReady_ &&
           (backendEngine_ ? backendEngine_->plainOut().empty() : reply_.empty());
}

void Connection::reconnectAfterHandshake() {
    if (log::enabled(LogLevel::debug)) {
        log::debug("backend-closed-early listener=" + settings_->name + " peer=" + peerText() +
                   " backend=" + pool_->name() + " next=after-handshake");
    }
    server_.metrics().backendUnused();
    releaseServer();
    if (backendReading_) {
        uv_read_stop(backendStream());
        backendReading_ = false;
    }
    helloStarted_ = false;
    reconnectPending_ = true;
    backendClosing_ = true;
    net::closeSocket(reinterpret_cast<uv_handle_t *>(&backend_), onBackendClosed);
}

void Connection::releaseServer() {
    if (serverCounted_) {
        serverCounted_ = false;
        pool_->server(static_cast<std::size_t>(serverIndex_))
            .active.fetch_sub(1, std::memory_order_relaxed);
    }
}

// --- In-process handler ------------------------------------------------------------------------

void Connection::startHandler(const HandlerFactory &factory) {
    local_ = std::make_unique<Local>(*this);
    StreamInfo &streamInfo = local_->streamInfo;
    streamInfo.listener = settings_->name;
    streamInfo.handler = pool_->config().handler;
    streamInfo.client = peerText();
    if (engine_) {
        const auto &info = engine_->handshake();
        streamInfo.serverName = info.serverName;
        streamInfo.alpn = info.alpn;
        streamInfo.protocol = info.protocol;
        streamInfo.cipher = info.cipher;
        streamInfo.resumed = info.resumed;
        streamInfo.clientIdentity = info.clientIdentity;
        streamInfo.clientVerified = info.clientVerified;
    }
    std::string error;
    try {
        local_->handler = factory(streamInfo);
    } catch (const std::exception &e) {
        error = e.what();
    } catch (...) {
        error = "unknown exception";
    }
    if (!local_->handler) {
        // Refused: like a backend that could not be reached, the client gets a clean close.
        const std::string reason = error.empty() ? "the handler refused the connection"
                                                 : "the handler factory threw: " + error;
        log::warn("handler-refused listener=" + settings_->name + " peer=" + peerText() +
                  " handler=" + streamInfo.handler + " reason=" + log::quoted(reason));
        noteClose(CloseReason::backendFailed, reason);
        backendGone_ = true;
        return;
    }
    uv_idle_init(server_.loop(), &local_->idle);
    local_->idle.data = this;
    local_->idleInitialised = true;
    ++openHandles_;
    backendConnected_ = backendReady_ = true;
    connectMicros_ = 0;
    local_->handler->onOpen(*local_);
}

bool Connection::moveToHandler() {
    if (!local_->handler || closing_) {
        return false;
    }
    bool progress = false;
    if (local_->aboveHigh && local_->queued <= writeHighWater() / 2) {
        local_->aboveHigh = false;
        local_->handler->onWritable(*local_);
        progress = true;
        if (closing_ || !local_->handler) {
            return true;
        }
    }
    if (local_->readingPaused || local_->endDelivered) {
        return progress;
    }
    const auto up = upSource();
    if (up.empty()) {
        return progress;
    }
    local_->handler->onData(*local_, up);
    if (closing_) {
        return true;
    }
    // The span was the handler's for the call: it is consumed whatever the handler did with it.
    upConsume(up.size());
    bytesUp_ += up.size();
    server_.metrics().bytesClientToBackend(up.size());
    touch();
    return true;
}

void Connection::schedulePump() {
    if (closing_) {
        return;
    }
    if (inPump_) {
        pumpAgain_ = true;
    } else if (local_ && local_->idleInitialised) {
        // Never from inside the handler's own call: the pump may call the handler back.
        uv_idle_start(&local_->idle, onIdle);
    }
}

void Connection::onIdle(uv_idle_t *idle) {
    auto *self = static_cast<Connection *>(idle->data);
    uv_idle_stop(idle);
    self->pump();
}

std::size_t Connection::writeHighWater() const {
    return settings_->buffers.backend;
}

bool Connection::handlerWrite(std::span<const std::uint8_t> data) {
    if (closing_ || local_->shutdownCalled || backendGone_ || clientGone_ || flushing_) {
        return false;
    }
    if (data.empty()) {
        return true;
    }
    // Appended to the last chunk unless a write to a plaintext client pins that chunk.
    constexpr std::size_t chunkLimit = 64 * 1024;
    auto &out = local_->out ? *local_->out : local_->out.emplace();
    const bool pinnedBack = out.size() == 1 && clientPinned_ == Pinned::plain;
    if (out.empty() || pinnedBack || out.back().size() + data.size() > chunkLimit) {
        out.emplace_back();
    }
    out.back().append(reinterpret_cast<const char *>(data.data()), data.size());
    local_->queued += data.size();
    if (local_->queued >= writeHighWater()) {
        local_->aboveHigh = true;
    }
    schedulePump();
    return true;
}

void Connection::handlerShutdown() {
    if (closing_ || local_->shutdownCalled) {
        return;
    }
    local_->shutdownCalled = true;
    schedulePump();
}

void Connection::handlerClose() {
    if (closing_) {
        return;
    }
    noteClose(CloseReason::handlerClose);
    // A plaintext client has no close_notify to miss: a reset tells it the stream was cut.
    resetClient_ = !engine_;
    closeAll();
}

void Connection::handlerPauseReading(bool paused) {
    if (closing_ || local_->readingPaused == paused) {
        return;
    }
    local_->readingPaused = paused;
    if (!paused) {
        schedulePump();
    }
}

// --- Timeouts ----------------------------------------------------------------------------------

Connection::Phase Connection::phase() const {
    if (flushing_) {
        return Phase::flush;
    }
    if (!clientReady()) {
        return Phase::handshake;
    }
    if (connecting()) {
        return Phase::connect;
    }
    const EngineStatus status = engine_ ? engine_->status() : EngineStatus{};
    const bool clientEnded = engine_ ? status.closeNotifyReceived || status.truncated : clientEof_;
    if (clientEnded || backendEof_ || backendGone_ || clientShutdown_ || backendShutdown_) {
        return Phase::halfClose;
    }
    return Phase::idle;
}

const char *Connection::phaseName(Phase phase) {
    switch (phase) {
    case Phase::flush:
        return "flush";
    case Phase::handshake:
        return "handshake";
    case Phase::connect:
        return "connect";
    case Phase::halfClose:
        return "half-close";
    case Phase::idle:
        break;
    }
    return "idle";
}

std::uint64_t Connection::deadline() const {
    const Timeouts &t = settings_->timeouts;
    auto at = [](std::uint64_t from, Duration limit) -> std::uint64_t {
        return limit.count() > 0 ? from + static_cast<std::uint64_t>(limit.count()) : 0;
    };
    switch (phase()) {
    case Phase::flush:
        return at(phaseStart_, t.flush);
    case Phase::handshake: {
        // A connect started at the hello keeps its own limit while the handshake goes on.
        const std::uint64_t handshake = at(acceptedMs(), t.handshake);
        const std::uint64_t connect = connecting() ? connectDeadline() : 0;
        return connect != 0 && (handshake == 0 || connect < handshake) ? connect : handshake;
    }
    case Phase::connect:
        return connectDeadline();
    case Phase::halfClose:
        return at(lastActivity_, t.halfClose);
    case Phase::idle:
        break;
    }
    return at(lastActivity_, t.idle);
}

bool Connection::connecting() const {
    return backendStarted_ && !backendReady_ && !backendGone_;
}

std::uint64_t Connection::connectDeadline() const {
    const Duration limit = pool_ && pool_->config().connectTimeout.count() > 0
                               ? pool_->config().connectTimeout
                               : settings_->timeouts.connect;
    return limit.count() > 0 ? phaseStart_ + static_cast<std::uint64_t>(limit.count()) : 0;
}

void Connection::armTimer() {
    if (closing_) {
        return;
    }
    std::uint64_t due = deadline();
    if (const std::uint64_t tickets = ticketsDue(); tickets != 0 && (due == 0 || tickets < due)) {
        due = tickets;
    }
    if (due == 0) {
        server_.deadlines().cancel(*this);
        return;
    }
    server_.deadlines().set(*this, due);
}

void Connection::touch() {
    lastActivity_ = uv_now(server_.loop());
}

void Connection::fireDeadline(Timed &timed) {
    auto *self = static_cast<Connection *>(&timed);
    if (self->closing_) {
        return;
    }
    if (const std::uint64_t tickets = self->ticketsDue();
        tickets != 0 && uv_now(self->server_.loop()) >= tickets) {
        self->pump(); // flushClient() sends the held tickets now
        self->armTimer();
        return;
    }
    const std::uint64_t due = self->deadline();
    if (due == 0 || uv_now(self->server_.loop()) < due) {
        self->armTimer(); // activity moved the deadline; wait for the new one
        return;
    }
    const Phase phase = self->phase();
    const std::uint64_t connectDue = self->connecting() ? self->connectDeadline() : 0;
    if (phase == Phase::connect || (phase == Phase::handshake && connectDue != 0 &&
                                    uv_now(self->server_.loop()) >= connectDue)) {
        // A server that does not answer counts against it, and the next one may take over.
        if (self->backendClosing_) {
            self->armTimer();
            return;
        }
        log::info("timeout listener=" + self->settings_->name + " peer=" + self->peerText() +
                  " phase=connect");
        if (!self->canRetry()) {
            self->noteClose(CloseReason::timeoutConnect);
        }
        self->backendFailed("connect", UV_ETIMEDOUT);
        return;
    }
    const bool noHeader = phase == Phase::handshake && self->awaitingProxy_;
    self->noteClose(phase == Phase::flush       ? CloseReason::timeoutFlush
                    : noHeader                  ? CloseReason::proxyHeader
                    : phase == Phase::handshake ? CloseReason::timeoutHandshake
                    : phase == Phase::idle      ? CloseReason::timeoutIdle
                                                : CloseReason::timeoutHalfClose,
                    noHeader ? "no PROXY header in time" : "");
    log::info("timeout listener=" + self->settings_->name + " peer=" + self->peerText() +
              " phase=" + phaseName(phase));
    self->abort(phaseName(phase));
}

// --- Closing -----------------------------------------------------------------------------------

void Connection::abort(const char *reason) {
    if (closing_) {
        return;
    }
    if (log::enabled(LogLevel::debug)) {
        log::debug(std::string("connection-aborted listener=") + settings_->name +
                   " peer=" + peerText() + " reason=" + reason);
    }
    // Timeouts and backend failures noted their own reason before getting here.
    if (std::strcmp(reason, "client reset") == 0 ||
        std::strcmp(reason, "client write failed") == 0) {
        noteClose(CloseReason::clientReset, reason);
    } else if (std::strcmp(reason, "drain deadline") == 0) {
        noteClose(CloseReason::drain);
    } else if (std::strcmp(reason, "backend reset") == 0) {
        noteClose(CloseReason::backendReset);
        // A plaintext client has no close_notify to miss: a reset tells it the reply is cut.
        resetClient_ = !engine_;
    }
    closeAll();
}

void Connection::noteClose(CloseReason reason, std::string_view error) {
    if (closeReasonSet_) {
        return;
    }
    closeReasonSet_ = true;
    closeReason_ = reason;
    if (!error.empty()) {
        closeError_ = std::make_unique<std::string>(error);
    }
}

void Connection::recordClose() {
    const CloseReason reason = closeReason_;
    if (engine_ && handshakeMicros_ < 0) {
        server_.metrics().handshakeNotDone(
            reason == CloseReason::handshakeFailed || reason == CloseReason::tlsError
                ? HandshakeResult::failed
            : reason == CloseReason::timeoutHandshake ? HandshakeResult::timeout
                                                      : HandshakeResult::aborted);
    }
    server_.metrics().connectionClosed(reason);
    if (!accessLogEnabled()) {
        return;
    }
    ConnectionRecord record;
    record.durationNanos = uv_hrtime() - acceptedHr_;
    record.startUnixMicros = std::chrono::duration_cast<std::chrono::microseconds>(
                                 std::chrono::system_clock::now().time_since_epoch())
                                 .count() -
                             static_cast<std::int64_t>(record.durationNanos / 1000);
    record.listener = settings_->name;
    record.client = peerText();
    record.backend = local_ ? "handler:" + pool_->config().handler
                     : pool_ && serverIndex_ >= 0
                         ? pool_->server(static_cast<std::size_t>(serverIndex_)).text()
                         : settings_->backendText;
    if (engine_ && handshakeMicros_ >= 0) {
        const auto &info = engine_->handshake();
        record.handshakeDone = true;
        record.protocol = info.protocol;
        record.cipher = info.cipher;
        record.sni = info.serverName;
        record.alpn = info.alpn;
        record.resumed = info.resumed;
        record.clientIdentity = info.clientIdentity;
    }
    auto nanos = [](std::int32_t micros) -> std::int64_t {
        return micros < 0 ? -1 : std::int64_t{micros} * 1000;
    };
    record.handshakeNanos = nanos(handshakeMicros_);
    record.connectNanos = nanos(connectMicros_);
    record.bytesClientToBackend = bytesUp_;
    record.bytesBackendToClient = bytesDown_;
    record.reason = reason;
    if (closeError_) {
        record.error = *closeError_;
    }
    emitConnectionRecord(record);
}

void Connection::endHandshakeCount() {
    if (handshakeCounted_) {
        handshakeCounted_ = false;
        server_.handshakeEnded(clientIpKey(&clientAddress_.any));
    }
}

void Connection::closeAll() {
    if (closing_) {
        return;
    }
    closing_ = true;
    if (helloStarted_ && !clientReady() && (backendConnected_ || backendConnecting_)) {
        server_.metrics().backendUnused(); // its client's handshake never finished
    }
    endHandshakeCount();
    releaseServer();
    recordClose();
    if (log::enabled(LogLevel::debug)) {
        log::debug("connection-closed listener=" + settings_->name + " peer=" + peerText() +
                   " up=" + std::to_string(bytesUp_) + " down=" + std::to_string(bytesDown_));
    }
    if (!resetClient_ || net::closeSocketReset(&client_, onClose) != 0) {
        net::closeSocket(reinterpret_cast<uv_handle_t *>(&client_), onClose);
    }
    server_.deadlines().cancel(*this);
    server_.forgetBuffers(*this);
    if (writesHeld_) {
        writesHeld_ = false;
        server_.forgetHeldWrites(*this);
    }
    if (local_ && local_->idleInitialised) {
        uv_close(reinterpret_cast<uv_handle_t *>(&local_->idle), onClose);
    }
    if (local_ && local_->handler) {
        // Last words, then the handler goes: nothing of this connection reaches it again.
        auto handler = std::move(local_->handler);
        handler->onClose(*local_, closeReasonName(closeReason_));
    }
    if (backendInitialised_ && !backendClosing_) {
        net::closeSocket(reinterpret_cast<uv_handle_t *>(&backend_), onClose);
    }
    // The handles close on the loop's next turn and the connection goes with them. Its pairs
    // go now: when many clients vanish at once, one turn reads a thousand resets, and each
    // read made a pair to land in (64 KiB at the default buffers.tls) that would otherwise
    // all be held together until that next turn.
    (void)releaseIdleBuffers();
}

void Connection::onClose(uv_handle_t *handle) {
    static_cast<Connection *>(handle->data)->handleClosed();
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
    std::span<std::uint8_t> space;
    if (self->closing_) {
        // Nothing: libuv reports UV_ENOBUFS, which is ignored while closing.
    } else if (self->awaitingProxy_) {
        Proxy &p = self->proxy();
        if (!p.in) {
            p.in = std::make_unique_for_overwrite<std::uint8_t[]>(maxProxyHeader);
        }
        space = {p.in.get() + p.inLength, maxProxyHeader - p.inLength};
    } else if (self->engine_) {
        // Zero copy: the socket reads straight into the engine's pair.
        space = self->engine_->cipherInSpace();
    } else {
        space = self->clientIn_.space(self->backendPinned_ != Pinned::plain);
    }
    *buf = uv_buf_init(reinterpret_cast<char *>(space.data()), static_cast<unsigned>(space.size()));
}

void Connection::onClientRead(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf) {
    auto *self = static_cast<Connection *>(stream->data);
    if (self->closing_) {
        return;
    }
    if (nread > 0) {
        const auto n = static_cast<std::size_t>(nread);
        self->touch();
        if (self->awaitingProxy_) {
            self->proxy_->inLength += n;
            if (!self->takeProxyHeader()) {
                return;
            }
        } else if (self->engine_) {
            self->engine_->commitCipherIn(n);
        } else {
            self->clientIn_.commit(n);
        }
    } else if (nread == UV_ENOBUFS) {
        uv_read_stop(stream);
        self->clientReading_ = false;
    } else if (nread == UV_EOF) {
        uv_read_stop(stream);
        self->clientReading_ = false;
        self->clientEof_ = true;
        self->touch();
        if (self->awaitingProxy_) {
            self->noteClose(CloseReason::proxyHeader, "EOF before the PROXY header");
            self->closeAll();
            return;
        }
        if (self->engine_ && !self->proxyInPending()) {
            self->engine_->cipherInEof();
        }
    } else if (nread < 0) {
        self->clientGone_ = true;
        self->abort("client reset");
        return;
    }
    if (!self->engine_ && nread <= 0) {
        self->clientIn_.releaseIfEmpty();
    }
    if (self->pumpAtCheck(nread > 0 && static_cast<std::size_t>(nread) < buf->len)) {
        return; // the check's pump keeps the pairs (or releases them), as this one would have
    }
    self->pump(); // the connection outlives the call (its memory goes in a close callback)
}

void Connection::onClientWrite(uv_write_t *req, int status) {
    auto *self = static_cast<Connection *>(req->data);
    --self->requestsInFlight_;
    const std::size_t written = self->clientWriteInFlight_;
    const Pinned pinned = self->clientPinned_;
    self->clientWriteInFlight_ = 0;
    self->clientPinned_ = Pinned::none;
    if (self->closing_) {
        return; // the pinned bytes are released with their owner
    }
    if (status < 0) {
        self->clientGone_ = true;
        self->abort("client write failed");
        return;
    }
    if (pinned == Pinned::cipher) {
        self->engine_->consumeCipherOut(written);
    } else if (pinned == Pinned::plain) {
        self->downConsume(written);
        self->bytesDown_ += written;
        self->server_.metrics().bytesBackendToClient(written);
    }
    self->touch();
    self->pump();
}

void Connection::onClientShutdown(uv_shutdown_t *req, int) {
    auto *self = static_cast<Connection *>(req->data);
    --self->requestsInFlight_;
    if (self->closing_) {
        return;
    }
    self->clientShutdownDone_ = true;
    self->pump();
}

void Connection::onBackendConnect(uv_connect_t *req, int status) {
    auto *self = static_cast<Connection *>(req->data);
    --self->requestsInFlight_;
    self->backendConnecting_ = false;
    if (self->closing_ || self->backendClosing_) {
        return;
    }
    if (status < 0) {
        self->backendFailed("connect", status);
        return;
    }
    self->backendConnected_ = true;
    if (ssl_ctx_st *context = self->pool_->tlsContext()) {
        EngineOptions options;
        options.pairSize = self->settings_->buffers.tls;
        options.bulkPairSize = self->settings_->buffers.tlsBulk;
        options.plaintextBudget = self->settings_->buffers.backend;
        options.serverName = self->pool_->serverName(static_cast<std::size_t>(self->serverIndex_));
        options.smallRecordBytes = 0; // a backend reads whole records as well as small ones
        std::string error;
        self->backendEngine_ = Engine::create(context, Role::client, options, &error);
        if (!self->backendEngine_) {
            self->backendFailed("tls", UV_ENOMEM, error);
            return;
        }
    } else {
        self->backendReady_ = true;
        self->backendConnected();
    }
    self->touch();
    self->armTimer();
    self->pump();
}

void Connection::onBackendAlloc(uv_handle_t *handle, size_t, uv_buf_t *buf) {
    auto *self = static_cast<Connection *>(handle->data);
    std::span<std::uint8_t> space;
    if (self->closing_ || self->backendClosing_) {
        // Nothing.
    } else if (self->backendEngine_) {
        space = self->backendEngine_->cipherInSpace();
    } else {
        // The unsent tail moves to the front only while no write to the client pins it.
        space = self->reply_.space(self->clientPinned_ != Pinned::plain);
    }
    *buf = uv_buf_init(reinterpret_cast<char *>(space.data()), static_cast<unsigned>(space.size()));
}

void Connection::onBackendRead(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf) {
    auto *self = static_cast<Connection *>(stream->data);
    if (self->closing_ || self->backendClosing_) {
        return;
    }
    if (nread > 0) {
        if (self->backendEngine_) {
            self->backendEngine_->commitCipherIn(static_cast<std::size_t>(nread));
        } else {
            self->reply_.commit(static_cast<std::size_t>(nread));
        }
        self->touch();
    } else if (nread == UV_ENOBUFS) {
        uv_read_stop(stream);
        self->backendReading_ = false;
    } else if (nread < 0 && self->endedQuietlyEarly()) {
        self->reconnectAfterHandshake();
        return;
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
        if (self->backendEngine_) {
            self->backendEngine_->cipherInEof();
        }
        self->touch();
        self->armTimer();
    } else if (nread < 0) {
        self->backendFailed("read", static_cast<int>(nread));
        return;
    }
    if (!self->backendEngine_ && nread <= 0) {
        self->reply_.releaseIfEmpty();
    }
    // libuv reads again at once after a read that filled the buffer: only this pump may hold
    // a TLS tail back for it (holdingTail()); after a shorter read the pump waits for the
    // check phase (pumpAtCheck()). The connection outlives the call (its memory goes in a
    // close callback).
    if (self->pumpAtCheck(nread > 0 && static_cast<std::size_t>(nread) < buf->len)) {
        // The reply goes into the client's TLS now, which frees the reply buffer before the
        // next connection's read: waiting for the check, a poll's replies would each hold one
        // (up to buffers.backend) at the same time, and the heap they leave behind fragments
        // (faults.idle_connections_give_their_buffers_back).
        self->inPump_ = true; // a pump this asks for waits for the check's
        self->moveDown();
        self->inPump_ = false;
        return; // the check's pump keeps the pairs (or releases them)
    }
    self->backendReadFull_ = nread > 0 && static_cast<std::size_t>(nread) == buf->len;
    self->pump();
    self->backendReadFull_ = false;
}

void Connection::onBackendWrite(uv_write_t *req, int status) {
    auto *self = static_cast<Connection *>(req->data);
    --self->requestsInFlight_;
    const std::size_t written = self->backendWriteInFlight_;
    const Pinned pinned = self->backendPinned_;
    self->backendWriteInFlight_ = 0;
    self->backendPinned_ = Pinned::none;
    if (self->closing_ || self->backendClosing_) {
        return;
    }
    if (status < 0) {
        self->backendFailed("write", status);
        return;
    }
    if (pinned == Pinned::header) {
        self->proxy_->outSent += written;
    } else if (pinned == Pinned::cipher) {
        self->backendEngine_->consumeCipherOut(written);
    } else if (pinned == Pinned::plain) {
        self->upConsume(written);
        self->bytesUp_ += written;
        self->server_.metrics().bytesClientToBackend(written);
    }
    self->touch();
    self->pump();
}

void Connection::onBackendShutdown(uv_shutdown_t *req, int) {
    auto *self = static_cast<Connection *>(req->data);
    --self->requestsInFlight_;
    if (self->closing_ || self->backendClosing_) {
        return;
    }
    self->backendShutdownDone_ = true;
    self->pump();
}

} // namespace sluice::proxy
