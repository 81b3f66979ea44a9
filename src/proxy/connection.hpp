// proxy/connection: one client socket, its TLS engine and its backend socket, with bounded
// queues in both directions, half-close, timeouts, and a lifetime that ends only after every
// libuv handle it owns has run its close callback.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <netinet/in.h>
#include <optional>
#include <string>
#include <sys/socket.h>
#include <vector>

#include <uv.h>

#include <sluice/engine.hpp>
#include <sluice/stream.hpp>

#include "net/address.hpp"
#include "proxy/byte_queue.hpp"
#include "proxy/pool.hpp"
#include "proxy/stats.hpp"
#include "proxy/timer_heap.hpp"
#include "proxy/warm_list.hpp"

namespace sluice::proxy {

class Server;
struct ListenerSettings;

/**
 * The data path of one accepted connection. Each side is a socket, with a TLS engine in front of
 * it when that side speaks TLS:
 *
 *   client socket -> [client engine] -> plaintext -> [backend engine] -> backend socket  (up)
 *   client socket <- [client engine] <- plaintext <- [backend engine] <- backend socket  (down)
 *
 * A listener is TLS unless it is plaintext (client mode); a backend pool is plain unless it
 * speaks TLS (re-encryption). Ciphertext is read straight into an engine's pair and written
 * straight from it. Plaintext is written to a plain socket straight from where it waits (the
 * engine's buffer or the queue a plain socket was read into); an engine takes plaintext by
 * copying it as it encrypts. Each queue is bounded, and a full queue stops reading the socket that
 * fills it.
 *
 * Before TLS, a listener with accept_proxy_from reads a PROXY header; before anything else, a
 * pool with proxy_protocol writes one. The backend is chosen once the client handshake is done
 * (routes match its SNI and ALPN); a failed connect (or backend TLS handshake) moves to the next
 * server of the pool while no client byte has been sent.
 *
 * A pool served by an in-process handler takes the backend socket's place: the handler gets the
 * client's plaintext in onData() and its write()s are queued for encryption (through the
 * connection's Local, the handler's Stream).
 *
 * Ownership: a Listener accepts into it (accept(), then start() or refuse()); once started, the
 * Server is told in connectionClosed() when every handle has been closed, and the object deletes
 * itself after that call. Callbacks that arrive after closing began only release what they own.
 */
class Connection final : private Timed, private Warm {
public:
    /**
     * Takes `fd`, a client socket the listener just accepted, into a new connection's own handle
     * (one allocation holds both). Null when libuv refuses the descriptor (it is closed, and so
     * is that connection). The caller then calls start() or refuse().
     */
    static Connection *adopt(Server &server, int fd);
    /** The accepted client socket's descriptor (-1 if libuv has none). */
    int clientFd() const;
    /** Closes the accepted client at once; the object deletes itself when the handle closed.
     * Nothing was counted for it. */
    void refuse();
    /**
     * Starts the accepted connection. `ipKey` is the client address the caller counted with
     * Server::handshakeStarting() (empty: none); the connection calls handshakeEnded() once,
     * when its handshake completes or it closes, whichever is first.
     */
    void start(std::shared_ptr<const ListenerSettings> settings, const sockaddr_storage &peer,
               std::string ipKey = {});

    Connection(const Connection &) = delete;
    Connection &operator=(const Connection &) = delete;

    /** Begins a graceful end: nothing more is accepted from either side. */
    void abort(const char *reason);

    /** The Server's TimerHeap calls this when the connection's deadline is reached. */
    static void fireDeadline(Timed &timed);
    /** The Server's WarmList calls this when the connection was idle for a sweep: frees its
     * pairs and request blocks; true when nothing is held any more. */
    static bool releaseBuffers(Warm &warm);
    /** The Server calls this in the loop's check phase for a connection that put off its pump
     * or held its writes in this turn (pumpAtCheck(), holdingTail()): it pumps, and what
     * waited goes now. */
    void releaseWrites();

private:
    explicit Connection(Server &server);
    ~Connection();
    /** The rest of start(): false when it failed and began closing. */
    bool begin(const sockaddr_storage &peer);

    /** What an in-flight write pinned: its bytes stay put until the write completes. */
    enum class Pinned : std::uint8_t { none, cipher, plain, header };

    /**
     * libuv's requests, 640 bytes that an idle connection does not need: allocated when one is
     * started (a connect, a write the socket could not take at once, a shutdown) and freed
     * after a pump once none is in flight. A request's memory must live until its callback.
     */
    struct Requests {
        uv_connect_t connect{};
        uv_write_t clientWrite{};
        uv_write_t backendWrite{};
        uv_shutdown_t clientShutdown{};
        uv_shutdown_t backendShutdown{};
    };
    Requests &requests();
    /**
     * Half-closes `stream` (sends its FIN): at once when nothing is queued on it, else with one
     * of the requests once the queued writes are out. False when no callback will come: done
     * at once, or refused by libuv.
     */
    bool startShutdown(uv_shutdown_t Requests::*req, uv_stream_t *stream, uv_shutdown_cb done);
    /** Ends the connection's side toward the client (its FIN) once everything for it is out. */
    void endClientSide();

    // The one place that moves bytes and decides what happens next.
    void pump();
    /** Frees the pairs and request blocks where nothing is queued; true when none is left. */
    bool releaseIdleBuffers();
    bool feedLeftover();
    bool checkEngines();
    /** One round of pump()'s steps, in order; true if any moved bytes or changed state. */
    bool pumpRound();
    /**
     * True when another round of pump()'s steps is sure to move nothing: a TLS client and a
     * plain backend, both open, in their data phase, with nothing left for any step. A round
     * that made progress is then the last, where the loop would run one more to find out.
     * Conservative: false whenever any step's condition is not plainly idle. The test builds
     * (no NDEBUG) run that round anyway and abort if it moves anything.
     */
    bool settled();
    /** True while the client engine's session tickets wait to share the first reply's write. */
    bool holdingTickets();
    /** When held tickets go out on their own (uv_now ms), or 0 when none are held. */
    std::uint64_t ticketsDue() const;
    /** After a read that did not fill its buffer (`shortRead`), once the handshakes are done:
     * true when the pump waits for the loop's check phase, after every other read of this
     * turn (the caller then does not pump). */
    bool pumpAtCheck(bool shortRead);
    /** After a pump: the pairs stay for the next one (the Server's warm list) or go now. */
    void keepOrReleaseBuffers();
    /** True while a short TLS tail waits for the backend read that libuv makes next. */
    bool holdingTail();
    /** Has the Server's check call releaseWrites() in this turn of the loop. */
    void holdWrites();
    /** A held tail shorter than this (one full record's plaintext) waits for the next read. */
    static constexpr std::size_t tailBytes = 16 * 1024;
    /** Warm pumps after the handshake before OpenSSL's record buffers are kept too (about
     * three round trips; a connection that makes one exchange and idles never keeps them). */
    static constexpr std::uint8_t busyPumps = 7;
    /** The client's address as logged ("203.0.113.7:51234"): the PROXY header's, once read. */
    std::string peerText() const { return net::format(&clientAddress_.any); }
    bool flushClient();
    /**
     * Writes to `stream` the spans `next()` returns until it returns none or the socket is full;
     * `consume(n)` takes what left. A write the socket did not take at once pins its bytes
     * (recorded in `inFlight`, and as `what` in that socket's clientPinned_ or backendPinned_).
     * Returns 1 if bytes left, 0 if none did, or the libuv error.
     */
    template <typename Next, typename Consume>
    int writeFrom(uv_stream_t *stream, uv_write_t Requests::*req, uv_write_cb done,
                  std::uint32_t &inFlight, Pinned what, Next next, Consume consume);
    bool flushBackend();
    bool moveDown();
    bool moveUp();
    void updateReading();
    bool propagateCloses();
    bool upstreamDone() const;
    bool downstreamDone() const;
    void maybeFinish();

    // The plaintext each direction carries, wherever it waits.
    std::span<const std::uint8_t> upSource();
    void upConsume(std::size_t n);
    bool upEnded() const;
    std::span<const std::uint8_t> downSource();
    void downConsume(std::size_t n);
    bool downEnded() const;
    bool clientReady() const; // the client handshake (and PROXY header) is done
    /** Every handshake is done: the pump of a read that did not fill its buffer may wait for
     * the turn's other reads (pumpAtCheck()). */
    bool batchable() const;
    bool backendReady() const; // plaintext may flow to the backend

    bool takeProxyHeader();
    /** The pool the handshake's SNI and ALPN (or the listener) pick. */
    Pool *route() const;
    void startBackend(Pool *pool);
    void buildProxyHeader();
    /** A backend connect is started and not yet ready (its TLS included). */
    bool connecting() const;
    /** When the current connect attempt times out; 0: never. */
    std::uint64_t connectDeadline() const;
    void connectNext();
    void backendConnected();
    void backendFailed(const char *what, int status, std::string detail = {});
    void releaseServer();
    /** The backend connected at the hello has ended before the client's handshake, unheard. */
    bool endedQuietlyEarly() const;
    void reconnectAfterHandshake();
    void armTimer();
    std::uint64_t deadline() const;
    /** What the connection waits for, which picks the timeout that applies. */
    enum class Phase : std::uint8_t { flush, handshake, connect, halfClose, idle };
    Phase phase() const;
    static const char *phaseName(Phase phase);
    /** Another server of the pool may still take the connection. */
    bool canRetry() const;
    void touch();
    void closeAll();
    void handleClosed();
    /** Records why the connection ends; the first cause noted wins. */
    void noteClose(CloseReason reason, std::string_view error = {});
    /** Counts the close and hands the connection's record to the access log. */
    void recordClose();
    void endHandshakeCount();

    static void onClientAlloc(uv_handle_t *handle, size_t suggested, uv_buf_t *buf);
    static void onClientRead(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf);
    static void onClientWrite(uv_write_t *req, int status);
    static void onClientShutdown(uv_shutdown_t *req, int status);
    static void onBackendConnect(uv_connect_t *req, int status);
    static void onBackendAlloc(uv_handle_t *handle, size_t suggested, uv_buf_t *buf);
    static void onBackendRead(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf);
    static void onBackendWrite(uv_write_t *req, int status);
    static void onBackendShutdown(uv_shutdown_t *req, int status);
    static void onBackendClosed(uv_handle_t *handle);
    static void onIdle(uv_idle_t *idle);

    // The in-process handler (a pool with a handler instead of servers).
    void startHandler(const HandlerFactory &factory);
    bool moveToHandler();
    void schedulePump();
    // What the handler's Stream (local_, set whenever these are called) does.
    bool handlerWrite(std::span<const std::uint8_t> data);
    std::size_t writeHighWater() const;
    void handlerShutdown();
    void handlerClose();
    void handlerPauseReading(bool paused);
    static void onClose(uv_handle_t *handle);

    uv_stream_t *clientStream() { return reinterpret_cast<uv_stream_t *>(&client_); }
    uv_stream_t *backendStream() { return reinterpret_cast<uv_stream_t *>(&backend_); }

    friend class Server; // links its list of live connections through prev/nextInServer_
    Connection *prevInServer_ = nullptr;
    Connection *nextInServer_ = nullptr;

    Server &server_;
    std::shared_ptr<const ListenerSettings> settings_;
    std::unique_ptr<Engine> engine_;        // client TLS; null on a plaintext listener
    std::unique_ptr<Engine> backendEngine_; // backend TLS; null for a plain pool

    // The client's and the listener's addresses: from the socket, or from a PROXY header. The
    // local one (Proxy::local) is read from the socket only when a PROXY header to the backend
    // needs it.
    union IpAddress {
        sockaddr any;
        sockaddr_in v4;
        sockaddr_in6 v6;
    };
    /** Copies the IP address in `from` (AF_UNSPEC when it is not IPv4 or IPv6). */
    static IpAddress ipAddress(const sockaddr_storage &from);
    IpAddress clientAddress_{};
    int serverIndex_ = -1; // the server of the current (or last) attempt

    /** The PROXY protocol's side, allocated only where a header is read or written. */
    struct Proxy {
        std::unique_ptr<std::uint8_t[]> in; // the header being read, and bytes behind it
        std::size_t inLength = 0;
        std::size_t inHead = 0; // bytes of `in` already handed on (the header, then data)
        std::string out;        // the header for the backend
        std::size_t outSent = 0;
        IpAddress local{};       // the listener's address, once localKnown
        bool localKnown = false; // from the header read, or from the socket
    };
    std::unique_ptr<Proxy> proxy_;
    Proxy &proxy();
    /** Bytes read with the PROXY header wait to be handed on. */
    bool proxyInPending() const { return proxy_ && proxy_->in; }
    /** Every byte of the PROXY header for the backend (if any) has been written. */
    bool proxyOutDone() const {
        return !proxyHeaderDue_ && (!proxy_ || proxy_->outSent == proxy_->out.size());
    }

    // The backend: its pool, the server in use, and the servers already tried.
    Pool *pool_ = nullptr; // one of settings_'s pools, which settings_ keeps alive
    TriedServers tried_;
    std::uint32_t attempts_ = 0;
    std::uint32_t connectStartMicros_ = 0; // uv_hrtime() microseconds modulo 2^32

    uv_tcp_t client_{};
    union {
        uv_tcp_t tcp;
        uv_pipe_t pipe;
    } backend_{};

    std::unique_ptr<Requests> requests_;

    /**
     * The in-process handler's side, allocated only for a connection routed to one: the
     * handler's Stream (a connection to a socket backend carries no vtable for it).
     */
    struct Local final : Stream {
        explicit Local(Connection &connection)
            : owner(connection) {}
        bool write(std::span<const std::uint8_t> data) override { return owner.handlerWrite(data); }
        std::size_t writeQueued() const override { return queued; }
        std::size_t writeHighWater() const override { return owner.writeHighWater(); }
        void shutdown() override { owner.handlerShutdown(); }
        void close() override { owner.handlerClose(); }
        void pauseReading(bool pause) override { owner.handlerPauseReading(pause); }
        const StreamInfo &info() const override { return streamInfo; }

        Connection &owner;
        std::unique_ptr<StreamHandler> handler;
        StreamInfo streamInfo;
        // The handler's bytes for the client, in chunks (a deque never moves them, so a write
        // may pin the first); made when the handler writes, dropped when it drains: an empty
        // std::deque already holds over 500 bytes.
        std::optional<std::deque<std::string>> out;
        std::size_t head = 0; // bytes of the first chunk already taken
        std::size_t queued = 0;
        uv_idle_t idle{}; // runs the pump soon after a Stream call made outside it
        bool idleInitialised = false;
        bool shutdownCalled = false; // the handler called shutdown()
        bool readingPaused = false;
        bool endDelivered = false;
        bool aboveHigh = false;
    };
    std::unique_ptr<Local> local_; // non-null: the backend is an in-process handler

    // The bytes pinned by each socket's write in flight (one span of a queue: under 4 GiB) sit
    // in the queues' tail padding.
    [[no_unique_address]] ByteQueue clientIn_; // plaintext listener: client bytes for the backend
    std::uint32_t backendWriteInFlight_ = 0;
    [[no_unique_address]] ByteQueue reply_; // plain pool: backend bytes waiting for the client
    std::uint32_t clientWriteInFlight_ = 0;

    // uv_now() milliseconds.
    std::uint64_t lastActivity_ = 0;
    std::uint64_t phaseStart_ = 0; // backend connect or final flush start
    std::uint64_t bytesUp_ = 0;
    std::uint64_t bytesDown_ = 0;
    std::unique_ptr<std::string> closeError_; // with the reason, when it has one

    // When it was accepted (uv_hrtime() nanoseconds): the handshake timeout counts from it, and
    // the access log's start time is the wall clock less the time since.
    std::uint64_t acceptedHr_ = 0;
    std::uint64_t acceptedMs() const { return acceptedHr_ / 1000000; }
    // For metrics and the access log, in microseconds (saturated at 35 minutes; -1: not
    // reached): the handshake's end since acceptedHr_, and the backend connect's duration,
    // timed from connectStartMicros_.
    std::int32_t handshakeMicros_ = -1;
    std::int32_t connectMicros_ = -1;
    /** Nanoseconds as saturated microseconds. */
    static std::int32_t micros(std::uint64_t nanos);

    // Bits: a connection is mostly waiting, and its size is what idle costs. They take 53 of
    // the object's last 64 bits; past those it would need a 16-byte larger heap chunk (the
    // static_assert in connection.cpp).
    Pinned clientPinned_ : 2 = Pinned::none;
    Pinned backendPinned_ : 2 = Pinned::none;
    CloseReason closeReason_ : 4 = CloseReason::done;
    static_assert(closeReasonCount <= 16, "closeReason_ has 4 bits");
    std::uint8_t openHandles_ : 3 = 0;      // client, backend, the handler's idle
    std::uint8_t requestsInFlight_ : 4 = 0; // started and not yet called back (at most 5)
    // Pumps kept warm since the handshake, counted up to busyPumps; from then on OpenSSL's
    // record buffers are kept as well (keepOrReleaseBuffers()).
    std::uint8_t warmPumps_ : 3 = 0;
    bool awaitingProxy_ : 1 = false; // the PROXY header has not arrived yet
    bool clientReading_ : 1 = false;
    bool clientEof_ : 1 = false;      // the client's FIN (or a read error) arrived
    bool clientGone_ : 1 = false;     // the client socket failed: nothing more can be sent
    bool clientShutdown_ : 1 = false; // our FIN to the client was requested
    bool clientShutdownDone_ : 1 = false;
    bool backendInitialised_ : 1 = false; // the backend handle is open (not yet closing)
    bool backendClosing_ : 1 = false;     // closing the handle of a failed attempt
    bool backendStarted_ : 1 = false;
    bool helloRouted_ : 1 = false;      // the accepted hello's pool was asked for connect_after
    bool helloStarted_ : 1 = false;     // the backend attempt in use began at the hello
    bool reconnectPending_ : 1 = false; // closing that attempt: connect after the handshake
    bool proxyHeaderDue_ : 1 = false; // connected at the hello: the header waits for the handshake
    bool backendConnected_ : 1 = false;  // the socket connected
    bool backendConnecting_ : 1 = false; // a TCP connect is in flight
    bool backendReady_ : 1 = false;      // ... and its TLS handshake is done (or it has none)
    bool backendReading_ : 1 = false;
    bool backendEof_ : 1 = false;         // the backend's FIN arrived
    bool backendReadFull_ : 1 = false;    // in onBackendRead's pump: that read filled its buffer
    bool writesHeld_ : 1 = false;         // the Server's check will pump (releaseWrites())
    bool backendGone_ : 1 = false;        // refused, reset or failed: nothing more to or from it
    bool backendTlsShutdown_ : 1 = false; // close_notify requested from the backend engine
    bool backendShutdown_ : 1 = false;
    bool backendShutdownDone_ : 1 = false;
    bool truncateClient_ : 1 = false;    // end the client without close_notify (backend reset)
    bool resetClient_ : 1 = false;       // close a plaintext client with a reset
    bool shutdownRequested_ : 1 = false; // the client engine's shutdown() was called
    bool handshakeLogged_ : 1 = false;
    bool flushing_ : 1 = false; // only the last bytes to the client remain
    bool closing_ : 1 = false;
    bool inPump_ : 1 = false;
    bool pumpAgain_ : 1 = false;
    bool closeReasonSet_ : 1 = false;
    bool serverCounted_ : 1 = false; // counted in its server's `active`
    // Counted in the server's handshakes by client address (clientIpKey(clientAddress_)) until
    // this turns false: handshake done or closing.
    bool handshakeCounted_ : 1 = false;
};

} // namespace sluice::proxy
