// sluice::Engine: a sans-I/O TLS engine. One OpenSSL SSL object runs over a BIO pair that is
// detached from any socket; the caller moves ciphertext between the pair and its transport and
// plaintext between the engine and its application. The engine never touches a socket, never
// blocks and never calls out: every "would block" is a queue that is full (drain it) or empty
// (feed it). It works with any transport and any event loop, or none.
//
// The contract, call by call (each declaration below says the rest):
//   - Ciphertext in: write into cipherInSpace(), then commitCipherIn(n) (the engine now owns those
//     n bytes), or cipherInEof() when the transport ended. An empty space means "drain first"
//     (or that the transport already ended).
//   - Ciphertext out: send from cipherOut(), then consumeCipherOut(n) with exactly what the
//     transport took. Always flush it before closing the transport, also after a fatal error (it
//     may carry the alert) and after shutdown() (it carries close_notify).
//   - Plaintext out: plainOut() is decrypted data in order; consumePlainOut(n) drops what the
//     application took. Until it is consumed the engine stops decrypting (plaintextBudget).
//   - Plaintext in: write(data) returns how many bytes it took; 0 is "not now" (the handshake is
//     not done or the ciphertext queue is full), never an error: flush, then offer the same bytes.
//   - Every call is valid in every state, runs OpenSSL as far as it can go and leaves the outcome
//     in status(); bytes already decrypted are delivered when the consumer resumes, with no new
//     ciphertext needed. Errors are sticky: after one, calls that would move data move nothing.
//     errorSource() tells the peer's fault (bad bytes, alerts) from the caller's (misuse,
//     resources); errorReason() says why in one line. No call throws.
//
// The three ends of a stream, as status() reports them:
//   - closeNotifyReceived: the peer closed cleanly; every byte before it was delivered.
//   - truncated:           the transport ended without close_notify (possible truncation).
//   - neither:             no end yet: an empty plainOut() only means no data has arrived yet.
//
// A driving loop over a blocking socket (examples/engine_socketpair.cpp is the whole program):
//
//     std::string error;
//     auto engine = sluice::Engine::create(ctx, sluice::Role::client, options, &error);
//     if (!engine) { /* `error` says why */ }
//     std::string outbox = request;                          // bytes not yet taken
//     while (!engine->finished()) {
//         // 1. Ciphertext out first, even after an error: it may carry the alert.
//         for (auto out = engine->cipherOut(); !out.empty(); out = engine->cipherOut())
//             engine->consumeCipherOut(send(fd, out.data(), out.size(), MSG_NOSIGNAL));
//         // 2. Plaintext to the application; decryption resumes once it is consumed.
//         if (auto plain = engine->plainOut(); !plain.empty()) {
//             engine->consumePlainOut(app.take(plain));
//             continue;
//         }
//         // 3. Plaintext in; what was not taken is offered again on a later turn.
//         if (!outbox.empty()) outbox.erase(0, engine->write(asBytes(outbox)));
//         else if (app.done() && !engine->status().closeNotifySent) engine->shutdown();
//         if (engine->status().ciphertextPending) continue;     // flush before blocking
//         // 4. Ciphertext in, read by the socket straight into the engine's buffer.
//         auto space = engine->cipherInSpace();
//         if (space.empty()) continue;                          // full, or after EOF
//         ssize_t n = recv(fd, space.data(), space.size(), 0);
//         n > 0 ? engine->commitCipherIn(n) : engine->cipherInEof(); // (check n < 0 too)
//     }
//
// Threads: an Engine is used by one thread at a time. The SSL_CTX it is built over may be shared
// by any number of engines on any threads (OpenSSL makes that safe); configure it before.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>

#include <sluice/export.hpp>

struct ssl_ctx_st;
struct ssl_st;
struct bio_st;

namespace sluice {

/** Which side of the handshake an Engine plays. */
enum class Role { server, client };

/** Sizes and per-connection choices for one Engine. */
struct EngineOptions {
    /** Bytes buffered by each half of the BIO pair (ciphertext in and out); at least 1. */
    std::size_t pairSize = 16 * 1024;
    /**
     * What each half grows to once the connection moves bulk: a read that fills the empty
     * pair, or a write the full pair refuses. The pair is made again at this size when both
     * halves are next empty (and no cipherInSpace() span is out), so fewer, larger transport
     * reads and writes carry a transfer. At most pairSize (0 included): it keeps pairSize.
     */
    std::size_t bulkPairSize = 0;
    /** Most decrypted bytes held for the consumer before SSL_read stops; at least 1. */
    std::size_t plaintextBudget = 64 * 1024;
    /** Client role: the SNI name to send and verify against; empty sends none. */
    std::string serverName;
    /**
     * The first this many plaintext bytes written go out in small records (smallRecordSize),
     * each fitting one TCP segment, so the peer can decrypt the start of a response without
     * waiting for a 16 KiB record; later bytes use full records. 0 disables.
     */
    std::size_t smallRecordBytes = 64 * 1024;
    /** Plaintext bytes per small record. */
    std::size_t smallRecordSize = 1400;
    /**
     * Server role, TLS 1.3: report the session tickets OpenSSL sends right after the handshake
     * as held (ticketsHeld()), so a driver can keep them in the pair until the first
     * application data joins them in one transport write instead of costing one of their own.
     */
    bool holdTickets = false;
};

/** Facts about a completed handshake. */
struct HandshakeInfo {
    std::string protocol;   ///< "TLSv1.3", "TLSv1.2", ...
    std::string cipher;     ///< OpenSSL name of the negotiated cipher
    std::string serverName; ///< SNI the client sent (server role) or requested (client role)
    std::string alpn;       ///< negotiated ALPN protocol, empty if none
    bool resumed = false;   ///< a session was resumed
    // Server role, when the client presented a certificate (client_auth); empty otherwise.
    std::string clientSubject;    ///< its subject, RFC 2253
    std::string clientIdentity;   ///< its first URI SAN, else first DNS SAN, else subject CN
    std::string clientSpkiSha256; ///< hex SHA-256 of its SubjectPublicKeyInfo (the pin)
    bool clientVerified = false;  ///< it verified: CA, CRLs, depth and allow lists
};

/** Facts about a completed handshake that are computed only when asked for (PROXY protocol). */
struct ConnectionFacts {
    bool peerCertificate = false;   ///< the peer's certificate is known (this handshake or session)
    long verifyResult = 0;          ///< OpenSSL's verify result for it; 0 (X509_V_OK) verified
    std::string peerCommonName;     ///< its subject CN, empty if none
    std::string peerCertificateDer; ///< DER, only when asked for and at most the size asked
    std::string signatureAlgorithm; ///< our certificate's signature algorithm ("ecdsa-with-SHA256")
    std::string keyAlgorithm;       ///< our certificate's key ("EC256", "RSA2048")
};

/** Who caused a fatal error: the peer's bytes, or the local side (config, misuse, resources). */
enum class ErrorSource { none, peer, local };

/** What the engine knows after the last call. Cheap to copy. */
struct EngineStatus {
    bool handshakeDone = false; ///< the handshake completed (HandshakeInfo is valid)
    /** Server role: the ClientHello was accepted and answered (HandshakeInfo's serverName and
     * alpn are set); the rest of the handshake may still fail. */
    bool helloAccepted = false;
    bool plaintextReady = false;      ///< plainOut() is not empty
    bool ciphertextPending = false;   ///< cipherOut() is not empty: send it
    bool closeNotifyReceived = false; ///< the peer sent close_notify
    bool truncated = false;           ///< transport EOF arrived without close_notify
    bool closeNotifySent = false;     ///< our close_notify is in the ciphertext queue (or sent)
    bool failed = false;              ///< a fatal error happened; it is sticky
};

/**
 * One TLS connection over an in-memory BIO pair. Not thread-safe; movable only as a pointer.
 *
 * Ownership: spans returned by cipherInSpace(), cipherOut() and plainOut() point into memory the
 * Engine owns. They stay valid and their bytes unmoved until the matching commit/consume call, or
 * until the Engine is destroyed, so a caller may hand them to an asynchronous write and consume
 * only when the write completes. No other call invalidates them.
 */
class SLUICE_API Engine {
public:
    /**
     * Builds an engine over `ctx` (its reference count is taken; the caller keeps its own).
     * Returns null and fills `error` if OpenSSL cannot allocate the connection. A client's
     * ClientHello is ready in cipherOut() on return; a server allocates its pair and handshake
     * state only when the first ciphertext arrives, so a peer that never sends costs little.
     */
    static std::unique_ptr<Engine> create(ssl_ctx_st *ctx, Role role, const EngineOptions &options,
                                          std::string *error = nullptr);

    ~Engine();
    Engine(const Engine &) = delete;
    Engine &operator=(const Engine &) = delete;

    // --- Ciphertext in (from the transport) ------------------------------------------------

    /**
     * Writable space in the network half of the pair, contiguous; empty when the pair is full
     * (the engine must consume first: drain plainOut() and cipherOut()) or after cipherInEof().
     * After a fatal error or the peer's close_notify, committed bytes are discarded unread.
     */
    std::span<std::uint8_t> cipherInSpace();

    /** Free bytes in the network half of the pair, across its wrap point. */
    std::size_t cipherInCapacity() const;

    /** Commits `n` bytes written into the last cipherInSpace() span and runs the engine. */
    void commitCipherIn(std::size_t n);

    /** Reports that the transport delivered its last byte (FIN) and runs the engine. */
    void cipherInEof();

    // --- Ciphertext out (to the transport) -------------------------------------------------

    /**
     * Ciphertext ready to send, contiguous (call again after consuming for the rest). Must be
     * sent even after a fatal error: it may carry the alert.
     */
    std::span<const std::uint8_t> cipherOut();

    /** Consumes exactly `n` bytes from the front of cipherOut() and runs the engine. */
    void consumeCipherOut(std::size_t n);

    // --- Plaintext out (to the application) ------------------------------------------------

    /** Decrypted bytes waiting for the application, in order. */
    std::span<const std::uint8_t> plainOut();

    /** Consumes `n` bytes from the front of plainOut() and runs the engine (resume). */
    void consumePlainOut(std::size_t n);

    // --- Plaintext in (from the application) -----------------------------------------------

    /**
     * Encrypts a prefix of `data` (at most one record, 16 KiB) and returns how many bytes were
     * taken. Zero is not an error: the ciphertext queue is full or the handshake is not done;
     * drain cipherOut() and offer the same bytes again. After a refusal the next offer must
     * begin with the refused bytes and be at least as long as the refused offer (at most 16 KiB,
     * which the caller still holds), from any address; a shorter one is a caller error that
     * fails the engine with ErrorSource::local. Returns 0 forever after a fatal error or after
     * shutdown().
     */
    std::size_t write(std::span<const std::uint8_t> data);

    /** Queues close_notify once every accepted byte is encrypted; retried until it fits. */
    void shutdown();

    /**
     * Client role: asks the peer for a TLS 1.2 renegotiation. Only for tests of the refusal;
     * a server never starts one. Returns false if OpenSSL refused to start it, or once either
     * side has begun to close.
     */
    bool requestRenegotiation();

    /**
     * TLS 1.3: sends a KeyUpdate; `requestPeer` also asks the peer to update its keys. Returns
     * false before the handshake, after an error, or once either side has begun to close.
     */
    bool requestKeyUpdate(bool requestPeer);

    // --- State ------------------------------------------------------------------------------

    /**
     * Flags describing the current state; see EngineStatus. Inline: a driver asks after every
     * step, and each caller reads one or two of the flags.
     */
    EngineStatus status() const {
        EngineStatus s;
        s.handshakeDone = handshakeDone_;
        s.helloAccepted = helloAccepted_;
        s.plaintextReady = plainTail_ > plainHead_;
        s.ciphertextPending = outPending_ > 0;
        s.closeNotifyReceived = closeNotifyReceived_;
        s.truncated = truncated_;
        s.closeNotifySent = closeNotifySent_;
        s.failed = failed();
        return s;
    }

    /** The handshake's facts; empty fields until status().handshakeDone, except serverName and
     * alpn, which a server has from status().helloAccepted on. */
    const HandshakeInfo &handshake() const { return info_; }

    /**
     * The facts above; empty before the handshake. `maxDer` > 0 also fills peerCertificateDer
     * when the DER fits in that many bytes.
     */
    ConnectionFacts facts(std::size_t maxDer = 0) const;

    /** Who caused the fatal error, or ErrorSource::none. */
    ErrorSource errorSource() const { return errorSource_; }

    /** One readable reason for the fatal error, built from OpenSSL's error queue. */
    const std::string &errorReason() const { return errorReason_; }

    /**
     * True when nothing more can happen: (both directions closed, or failed) and no ciphertext
     * is left to send. The caller closes the transport.
     */
    bool finished() const;

    /**
     * Frees the BIO pair's buffers (and OpenSSL's record buffers) when nothing is queued in
     * either direction, so an idle connection holds only the SSL object; the next call that
     * needs the pair re-creates it. The transport's EOF does not count as queued: it is kept
     * and given to the new pair, so a half-closed connection holds nothing while it waits.
     * Call it only while holding no span from cipherInSpace(). Returns true if nothing is held.
     */
    bool releaseIdleBuffers();

    /** Bytes of ciphertext queued for the transport, across the pair's wrap point. */
    std::size_t cipherOutPending() const;

    /** Bytes the BIO pair's two halves take while it exists (0 once released). */
    std::size_t pairBytes() const { return network_ != nullptr ? 2 * pairSize_ : 0; }

    /**
     * Keeps OpenSSL's two record buffers from one call to the next, where by default each
     * complete read and write frees its buffer and the next one allocates it again (a malloc
     * and a free each time). For a busy connection between pumps; releaseIdleBuffers() gives
     * them back and turns the freeing on again. Does nothing with an OpenSSL older than 3.0.14,
     * where releasing them later is unsafe (CVE-2024-4741). Cheap to call again.
     */
    void keepRecordBuffers();

    /** What the two record buffers take, about, while keepRecordBuffers() holds them. */
    static constexpr std::size_t recordBufferBytes = 2 * (16 * 1024 + 512);

    /** Bytes held between calls by a connection kept busy: the pair and, when
     * keepRecordBuffers() can hold them, the record buffers; 0 with no pair. */
    std::size_t warmBytes() const;

    /**
     * With EngineOptions::holdTickets: true while the ciphertext queued is exactly the TLS 1.3
     * session tickets that ended the handshake. A driver may leave them in cipherOut() until
     * write() adds application data (which ends the hold), or until it gives up waiting and
     * calls releaseTickets(); anything else queued, shutdown() or an error also ends it.
     */
    bool ticketsHeld() const { return ticketsHeld_ > 0 && cipherOutPending() == ticketsHeld_; }

    /** Ends the hold: the tickets are ordinary ciphertext to send. */
    void releaseTickets() { ticketsHeld_ = 0; }

private:
    Engine() = default;
    /** Runs the state machine, then notes the ciphertext it left for the transport. */
    void run();
    void runSteps();
    void runHandshake();
    /** Ciphertext OpenSSL wrote that the transport has not taken (cipherOutPending() answers
     * from outPending_, noted from this). */
    std::size_t queryOutPending() const;
    /** Ciphertext the transport committed that OpenSSL has not read. */
    std::size_t cipherInWaiting() const;
    void runRead();
    void runShutdown();
    /** Takes plain_, or a larger one with what waits in it moved over (runRead()). */
    bool takePlain(std::size_t cipherWaiting);
    void releasePlain();
    void discardInput();
    bool ensurePair();
    /** Makes the pair again at bulkPairSize_ once bulk was seen and both halves are empty. */
    void growPair();
    bool streamOpen() const;
    static void onInfo(const ssl_st *ssl, int where, int value);
    void fail(ErrorSource source, std::string reason);
    bool handleResult(int ret, const char *operation);
    void recordHello();
    void recordHandshake();
    bool failed() const { return errorSource_ != ErrorSource::none; }

    ssl_st *ssl_ = nullptr;
    bio_st *network_ = nullptr; // our half of the pair; the SSL owns the other half
    Role role_ = Role::server;
    std::size_t plaintextBudget_ = 0;
    std::size_t pairSize_ = 0;
    std::size_t bulkPairSize_ = 0;  // 0: the pair never grows
    std::size_t refusedLength_ = 0; // length of the last offer write() refused
    std::size_t plainWritten_ = 0;  // plaintext bytes encrypted so far
    std::size_t smallRecordBytes_ = 0;
    std::size_t smallRecordSize_ = 0;

    /** Gives plain_ back to the thread's block stack (util/block_cache). */
    struct GiveBlock {
        void operator()(std::uint8_t *block) const noexcept;
    };
    // Decrypted bytes: [plainHead_, plainTail_) of plain_. The buffer is taken while bytes are
    // waiting and given back when it empties, so an idle connection holds none.
    std::unique_ptr<std::uint8_t[], GiveBlock> plain_;
    std::size_t plainHead_ = 0;
    std::size_t plainTail_ = 0;

    HandshakeInfo info_;
    ErrorSource errorSource_ = ErrorSource::none;
    std::string errorReason_;
    bool handshakeDone_ = false;
    bool helloAccepted_ = false;
    bool closeNotifyReceived_ = false;
    bool truncated_ = false;
    bool transportEof_ = false;
    bool shutdownWanted_ = false;
    bool closeNotifySent_ = false;
    bool closeNotifyAlertSeen_ = false; // recorded by onInfo
    bool readWantsWrite_ = false;       // SSL_read stopped on a full pair
    bool postHandshakePending_ = false; // a KeyUpdate or renegotiation waits to be sent
    bool recordBuffersKept_ = false;    // SSL_MODE_RELEASE_BUFFERS cleared by keepRecordBuffers()
    bool holdTickets_ = false;
    bool bulkSeen_ = false;           // the pair filled: grow it when next empty
    bool spaceLent_ = false;          // a cipherInSpace() span is out: the pair must stay
    std::uint32_t plainCapacity_ = 0; // of plain_: small for a short read, else the budget
    std::size_t ticketsHeld_ = 0;     // bytes of held tickets at the front of the pair; 0: none
    // Ciphertext in the pair for the transport, noted after every call that can change it
    // (asking the pair costs a BIO_ctrl, and a pump asks a dozen times).
    std::size_t outPending_ = 0;
};

} // namespace sluice
