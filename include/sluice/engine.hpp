// sluice::Engine: a sans-I/O TLS engine. One OpenSSL SSL object runs over a BIO pair that is
// detached from any socket; the caller moves ciphertext between the pair and its transport and
// plaintext between the engine and its application. The engine never touches a socket, never
// blocks and never calls out: every "would block" is a queue that is full (drain it) or empty
// (feed it).
//
// A driving loop, for any transport:
//
//     auto engine = sluice::Engine::create(ctx, sluice::Role::server).value();
//     for (;;) {
//         // 1. Feed ciphertext the transport delivered (zero copy: read straight into it).
//         auto space = engine->cipherInSpace();
//         size_t n = transport.read(space.data(), space.size());   // 0 -> EOF
//         n ? engine->commitCipherIn(n) : engine->cipherInEof();
//         // 2. Hand plaintext to the application; consume what it took.
//         auto plain = engine->plainOut();
//         engine->consumePlainOut(app.take(plain));
//         // 3. Offer application bytes; whatever was not accepted is offered again later.
//         pending.erase(0, engine->write(pending));
//         // 4. Send ciphertext, even after an error (it may hold an alert).
//         auto out = engine->cipherOut();
//         engine->consumeCipherOut(transport.write(out.data(), out.size()));
//         if (engine->finished()) break;
//     }
//
// Every call is valid in every state: after a fatal error, calls that would move data return
// nothing and the error stays readable. The engine runs OpenSSL again after any call that frees
// or fills a queue, so bytes already decrypted are delivered when a consumer resumes even if no
// new ciphertext arrives.
//
// The three ends of a stream, as reported by status():
//   - closeNotifyReceived: the peer closed cleanly; every byte before it was delivered.
//   - truncated:           the transport ended without close_notify (possible truncation).
//   - neither:             no end yet; more data may come.
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
    bool handshakeDone = false;       ///< the handshake completed (HandshakeInfo is valid)
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
     * Returns null and fills `error` if OpenSSL cannot allocate the connection.
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

    /** Flags describing the current state; see EngineStatus. */
    EngineStatus status() const;

    /** The handshake's facts; empty fields until status().handshakeDone. */
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
     * Frees the BIO pair's buffers when nothing is queued in either direction, so an idle
     * connection holds only the SSL object; the next call that needs the pair re-creates it.
     * Call it only while holding no span from cipherInSpace(). Returns true if nothing is held.
     */
    bool releaseIdleBuffers();

    /** Bytes of ciphertext queued for the transport, across the pair's wrap point. */
    std::size_t cipherOutPending() const;

private:
    Engine() = default;
    void run();
    void runHandshake();
    void runRead();
    void runShutdown();
    void discardInput();
    bool ensurePair();
    bool streamOpen() const;
    static void onInfo(const ssl_st *ssl, int where, int value);
    void fail(ErrorSource source, std::string reason);
    bool handleResult(int ret, const char *operation);
    void recordHandshake();
    bool failed() const { return errorSource_ != ErrorSource::none; }

    ssl_st *ssl_ = nullptr;
    bio_st *network_ = nullptr; // our half of the pair; the SSL owns the other half
    Role role_ = Role::server;
    std::size_t plaintextBudget_ = 0;
    std::size_t pairSize_ = 0;
    std::size_t refusedLength_ = 0; // length of the last offer write() refused
    std::size_t plainWritten_ = 0;  // plaintext bytes encrypted so far
    std::size_t smallRecordBytes_ = 0;
    std::size_t smallRecordSize_ = 0;

    // Decrypted bytes: [plainHead_, plainTail_) of plain_. The buffer is allocated while bytes
    // are waiting and released when it empties, so an idle connection holds none.
    std::unique_ptr<std::uint8_t[]> plain_;
    std::size_t plainHead_ = 0;
    std::size_t plainTail_ = 0;

    HandshakeInfo info_;
    ErrorSource errorSource_ = ErrorSource::none;
    std::string errorReason_;
    bool handshakeDone_ = false;
    bool closeNotifyReceived_ = false;
    bool truncated_ = false;
    bool transportEof_ = false;
    bool shutdownWanted_ = false;
    bool closeNotifySent_ = false;
    bool closeNotifyAlertSeen_ = false; // recorded by onInfo
    bool readWantsWrite_ = false;       // SSL_read stopped on a full pair
    bool postHandshakePending_ = false; // a KeyUpdate or renegotiation waits to be sent
};

} // namespace sluice
