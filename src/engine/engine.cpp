#include <algorithm>
#include <cassert>
#include <climits>
#include <cstring>

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include <sluice/engine.hpp>

#include "tls/client_auth.hpp"
#include "tls/errors.hpp"
#include "util/block_cache.hpp"

namespace sluice {
namespace {

// OpenSSL takes int lengths; no single call moves more than this.
constexpr std::size_t maxCall = INT_MAX / 2;

// Before 3.0.14 SSL_free_buffers could free a buffer holding a partly read record
// (CVE-2024-4741): older libraries keep OpenSSL's own release after each call, and nothing
// calls it.
bool freeBuffersSafe() {
    static const bool safe = OpenSSL_version_num() >= 0x300000e0L;
    return safe;
}

// The most plaintext one TLS record carries.
constexpr std::size_t maxRecordPlaintext = 16384;
// The plaintext block for a read whose ciphertext is this short (a request, a reply, a
// keep-alive exchange's usual message); see takePlain().
constexpr std::size_t smallPlaintext = util::smallBlock;

bool isLocalError(unsigned long code) {
    const int reason = ERR_GET_REASON(code);
    if (ERR_GET_LIB(code) == ERR_LIB_SSL) {
        return reason == SSL_R_BAD_LENGTH || reason == SSL_R_BAD_WRITE_RETRY ||
               reason == SSL_R_PROTOCOL_IS_SHUTDOWN || reason == ERR_R_INTERNAL_ERROR ||
               reason == ERR_R_MALLOC_FAILURE;
    }
    return reason == ERR_R_MALLOC_FAILURE || reason == ERR_R_INTERNAL_ERROR;
}

/**
 * Empties this thread's OpenSSL error queue, as SSL_get_error() requires before each SSL call.
 * Seeing that it is already empty (the usual case) costs far less than clearing its slots.
 */
void clearErrors() {
    if (ERR_peek_error() != 0) {
        ERR_clear_error();
    }
}

bool isUnexpectedEof(unsigned long code) {
    return ERR_GET_LIB(code) == ERR_LIB_SSL &&
           ERR_GET_REASON(code) == SSL_R_UNEXPECTED_EOF_WHILE_READING;
}

} // namespace

std::unique_ptr<Engine> Engine::create(ssl_ctx_st *ctx, Role role, const EngineOptions &options,
                                       std::string *error) {
    auto report = [error](std::string reason) {
        if (error != nullptr) {
            *error = std::move(reason);
        }
        return nullptr;
    };
    clearErrors();
    std::unique_ptr<Engine> engine(new Engine());
    engine->role_ = role;
    engine->plaintextBudget_ = std::max<std::size_t>(1, std::min(options.plaintextBudget, maxCall));
    engine->smallRecordBytes_ = options.smallRecordBytes;
    engine->smallRecordSize_ =
        std::clamp<std::size_t>(options.smallRecordSize, 1, maxRecordPlaintext);
    engine->holdTickets_ = options.holdTickets && role == Role::server;
    engine->ssl_ = SSL_new(ctx);
    if (engine->ssl_ == nullptr) {
        return report("SSL_new: " + tls::drainErrors().reason);
    }
    engine->pairSize_ = std::max<std::size_t>(1, std::min(options.pairSize, maxCall));
    if (options.bulkPairSize > engine->pairSize_) {
        engine->bulkPairSize_ = std::min(options.bulkPairSize, maxCall);
    }
    // Partial writes let write() report exactly what was taken; a moving buffer lets the caller
    // re-offer the same bytes from a different address; idle connections give back OpenSSL's
    // record buffers.
    SSL_set_mode(engine->ssl_, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER |
                                   SSL_MODE_RELEASE_BUFFERS);
    // Without this option OpenSSL 3 treats a FIN without close_notify as a fatal decode_error
    // and the connection can send nothing more; with it the stream stays writable, so a client
    // that half-closes TCP still gets its reply. The info callback tells a real close_notify
    // from a bare EOF (the half-close tests guard this).
    SSL_set_options(engine->ssl_, SSL_OP_IGNORE_UNEXPECTED_EOF);
    SSL_set_app_data(engine->ssl_, engine.get());
    SSL_set_info_callback(engine->ssl_, onInfo);
    if (role == Role::server) {
        // A server never renegotiates, and refuses a client's request (CVE-2011-1473 class).
        SSL_set_options(engine->ssl_, SSL_OP_NO_RENEGOTIATION);
        SSL_set_accept_state(engine->ssl_);
    } else {
        SSL_set_connect_state(engine->ssl_);
        if (!options.serverName.empty()) {
            X509_VERIFY_PARAM *param = SSL_get0_param(engine->ssl_);
            // An IP literal is verified against the certificate's IP SANs and is never sent
            // as SNI (RFC 6066); a name is both sent and verified.
            if (X509_VERIFY_PARAM_set1_ip_asc(param, options.serverName.c_str()) != 1) {
                clearErrors();
                if (SSL_set_tlsext_host_name(engine->ssl_, options.serverName.c_str()) != 1 ||
                    SSL_set1_host(engine->ssl_, options.serverName.c_str()) != 1) {
                    return report("server name: " + tls::drainErrors().reason);
                }
            }
            engine->info_.serverName = options.serverName;
        }
        // The client speaks first: its ClientHello is ready before the call returns.
        if (!engine->ensurePair()) {
            return report(engine->errorReason_);
        }
        engine->run();
    }
    // A server waits for the client's first byte before it makes its pair or starts the
    // handshake: OpenSSL's first handshake step allocates about 30 KiB (the handshake message
    // buffer, the output buffering BIO) that a connection which never sends anything (a
    // browser's preconnect, a port check, a silent client) would hold until its timeout.
    return engine;
}

bool Engine::ensurePair() {
    if (network_ != nullptr) {
        return true;
    }
    BIO *inner = nullptr;
    if (BIO_new_bio_pair(&inner, pairSize_, &network_, pairSize_) != 1) {
        network_ = nullptr;
        fail(ErrorSource::local, "BIO_new_bio_pair: " + tls::drainErrors().reason);
        return false;
    }
    // The SSL owns the inner half; the destructor or releaseIdleBuffers() frees the network half.
    SSL_set_bio(ssl_, inner, inner);
    if (transportEof_) {
        // A pair made again after the transport's EOF (to send the rest of the other
        // direction) says EOF to OpenSSL's reads, as the released one did.
        BIO_shutdown_wr(network_);
    }
    return true;
}

void Engine::growPair() {
    if (!bulkSeen_ || spaceLent_ || network_ == nullptr || queryOutPending() > 0 ||
        cipherInWaiting() > 0) {
        return;
    }
    // Nothing is queued in the pair (OpenSSL may still hold part of a record in its own
    // buffers; that reaches the new pair): swapping it loses no byte.
    bulkSeen_ = false;
    SSL_set_bio(ssl_, nullptr, nullptr);
    BIO_free(network_);
    network_ = nullptr;
    pairSize_ = bulkPairSize_;
    bulkPairSize_ = 0;
    (void)ensurePair(); // a failure is recorded; the next call that needs the pair sees it
}

bool Engine::releaseIdleBuffers() {
    if (network_ == nullptr) {
        return true;
    }
    // The transport's EOF is no reason to hold on: it is remembered (transportEof_) and given
    // to a pair made again. Holding the pair then would keep 2 x pairSize per half-closed
    // connection, and a thousand clients leaving at once would each hold one.
    if (queryOutPending() > 0 || cipherInWaiting() > 0 || plainTail_ > plainHead_ ||
        SSL_has_pending(ssl_) == 1 || readWantsWrite_ || postHandshakePending_ ||
        refusedLength_ > 0) {
        return false;
    }
    SSL_set_bio(ssl_, nullptr, nullptr); // frees the inner half
    BIO_free(network_);
    network_ = nullptr;
    // SSL_MODE_RELEASE_BUFFERS frees OpenSSL's record buffers after each complete read and
    // write, but a read that ended in the transport's EOF or an alert keeps its ~16 KiB buffer
    // until SSL_free, and keepRecordBuffers() keeps both: give them back too.
    if (recordBuffersKept_) {
        SSL_set_mode(ssl_, SSL_MODE_RELEASE_BUFFERS);
        recordBuffersKept_ = false;
    }
    if (freeBuffersSafe()) {
        (void)SSL_free_buffers(ssl_);
    }
    return true;
}

void Engine::keepRecordBuffers() {
    if (!recordBuffersKept_ && freeBuffersSafe()) {
        SSL_clear_mode(ssl_, SSL_MODE_RELEASE_BUFFERS);
        recordBuffersKept_ = true;
    }
}

std::size_t Engine::warmBytes() const {
    const std::size_t pair = pairBytes();
    return pair == 0 ? 0 : pair + (freeBuffersSafe() ? recordBufferBytes : 0);
}

void Engine::GiveBlock::operator()(std::uint8_t *block) const noexcept {
    util::giveBlock(block);
}

void Engine::onInfo(const ssl_st *ssl, int where, int value) {
    // Records one fact and returns: the engine acts on it after the SSL_* call (DESIGN.md).
    if ((where & SSL_CB_READ_ALERT) != 0 && (value & 0xff) == SSL_AD_CLOSE_NOTIFY) {
        static_cast<Engine *>(SSL_get_app_data(ssl))->closeNotifyAlertSeen_ = true;
    }
}

Engine::~Engine() {
    if (ssl_ != nullptr && handshakeDone_ && !failed()) {
        // A healthy session ended without our close_notify (an abort, a timeout) is still a
        // good session: keep it resumable, as OpenSSL would drop it from the cache otherwise.
        SSL_set_shutdown(ssl_, SSL_get_shutdown(ssl_) | SSL_SENT_SHUTDOWN);
    }
    SSL_free(ssl_);
    BIO_free(network_);
}

std::span<std::uint8_t> Engine::cipherInSpace() {
    // After a failure the space is still offered: what arrives is discarded, so the transport
    // can be drained until the peer's FIN. cipherInCapacity() agrees, so a driver that reads
    // while capacity is non-zero never spins on an empty span.
    growPair();
    if (transportEof_ || !ensurePair()) {
        return {};
    }
    char *space = nullptr;
    const int n = BIO_nwrite0(network_, &space);
    if (n <= 0) {
        return {};
    }
    spaceLent_ = true;
    return {reinterpret_cast<std::uint8_t *>(space), static_cast<std::size_t>(n)};
}

std::size_t Engine::cipherInCapacity() const {
    if (transportEof_) {
        return 0;
    }
    if (network_ == nullptr) {
        return pairSize_;
    }
    // Each half of the pair holds pairSize_ bytes; what OpenSSL has not read still takes room.
    const std::size_t capacity = pairSize_ - cipherInWaiting();
    assert(capacity == BIO_ctrl_get_write_guarantee(network_));
    return capacity;
}

void Engine::commitCipherIn(std::size_t n) {
    spaceLent_ = false;
    if (n == 0 || transportEof_ || network_ == nullptr) {
        return;
    }
    // BIO_nwrite() takes at most the space BIO_nwrite0() lent, so it needs no question first.
    char *space = nullptr;
    if (BIO_nwrite(network_, &space, static_cast<int>(std::min(n, maxCall))) <= 0) {
        return;
    }
    if (bulkPairSize_ > 0 && n >= pairSize_) {
        bulkSeen_ = true; // one read filled the whole pair
    }
    run();
}

void Engine::cipherInEof() {
    spaceLent_ = false;
    if (transportEof_) {
        return;
    }
    if (!ensurePair()) {
        return;
    }
    transportEof_ = true;
    BIO_shutdown_wr(network_);
    run();
}

std::span<const std::uint8_t> Engine::cipherOut() {
    if (network_ == nullptr || cipherOutPending() == 0) {
        return {}; // without asking the pair: a driver asks after every step
    }
    char *data = nullptr;
    const int n = BIO_nread0(network_, &data);
    if (n <= 0) {
        return {};
    }
    return {reinterpret_cast<const std::uint8_t *>(data), static_cast<std::size_t>(n)};
}

void Engine::consumeCipherOut(std::size_t n) {
    ticketsHeld_ = 0; // once any of it is sent, nothing is held
    while (n > 0 && network_ != nullptr) {
        char *data = nullptr;
        const int taken =
            BIO_nread(network_, &data, static_cast<int>(std::min<std::size_t>(n, maxCall)));
        if (taken <= 0) {
            break;
        }
        n -= static_cast<std::size_t>(taken);
    }
    run();
}

std::size_t Engine::cipherOutPending() const {
    assert(outPending_ == queryOutPending());
    return outPending_;
}

// Both questions are answered from the byte counters every BIO keeps (BIO_read, BIO_write and
// the pair's BIO_nread and BIO_nwrite add to them): two calls that return a field, where asking
// the pair takes a BIO_ctrl each, about 80 instructions, several times a round trip. The two
// halves of one pair count from zero together, and the pair is the only way bytes move between
// them; debug builds check every answer against the pair's own.
std::size_t Engine::queryOutPending() const {
    if (network_ == nullptr) {
        return 0;
    }
    const auto pending = static_cast<std::size_t>(BIO_number_written(SSL_get_rbio(ssl_)) -
                                                  BIO_number_read(network_));
    assert(pending == BIO_ctrl_pending(network_));
    return pending;
}

std::size_t Engine::cipherInWaiting() const {
    if (network_ == nullptr) {
        return 0;
    }
    BIO *inner = SSL_get_rbio(ssl_);
    const auto waiting =
        static_cast<std::size_t>(BIO_number_written(network_) - BIO_number_read(inner));
    assert(waiting == BIO_ctrl_pending(inner));
    return waiting;
}

std::span<const std::uint8_t> Engine::plainOut() {
    return {plain_.get() + plainHead_, plainTail_ - plainHead_};
}

void Engine::consumePlainOut(std::size_t n) {
    plainHead_ += std::min(n, plainTail_ - plainHead_);
    if (plainHead_ == plainTail_) {
        releasePlain();
    }
    run();
}

std::size_t Engine::write(std::span<const std::uint8_t> data) {
    if (failed() || !handshakeDone_ || shutdownWanted_ || data.empty()) {
        return 0;
    }
    if (data.size() < refusedLength_) {
        // OpenSSL may hold part of the refused offer in a record; a shorter retry would make it
        // send bytes the caller no longer offers.
        fail(ErrorSource::local, "write: a retry offered " + std::to_string(data.size()) +
                                     " bytes, fewer than the " + std::to_string(refusedLength_) +
                                     " refused");
        return 0;
    }
    growPair();
    if (!ensurePair()) {
        return 0;
    }
    // One record per call: partial-write mode returns after a record anyway, and the cap keeps
    // the bytes a caller must re-offer after a refusal small. The cap only grows (small records
    // first, LESSONS #19), so a retry can always offer at least the refused length.
    const std::size_t cap =
        plainWritten_ < smallRecordBytes_ ? smallRecordSize_ : maxRecordPlaintext;
    const std::size_t offer = std::min(data.size(), cap);
    clearErrors();
    std::size_t written = 0;
    const int ret = SSL_write_ex(ssl_, data.data(), offer, &written);
    outPending_ = queryOutPending();
    if (ret == 1) {
        ticketsHeld_ = 0;
        refusedLength_ = 0;
        plainWritten_ += written;
        return written;
    }
    // The rule is stated on what the caller offered (up to one full record), not on the part
    // the engine tried, so a caller can follow it without knowing the record size in use.
    refusedLength_ = std::min(data.size(), maxRecordPlaintext);
    if (bulkPairSize_ > 0 && SSL_get_error(ssl_, ret) == SSL_ERROR_WANT_WRITE) {
        bulkSeen_ = true; // more to send than the pair holds
    }
    // WANT_WRITE: the pair is full and OpenSSL may hold part of a record; the caller drains and
    // offers the same bytes again, which completes it. WANT_READ: a post-handshake exchange
    // must finish first. Anything else is fatal.
    handleResult(ret, "write");
    return 0;
}

void Engine::shutdown() {
    if (shutdownWanted_) {
        return;
    }
    shutdownWanted_ = true;
    ticketsHeld_ = 0;
    run();
}

bool Engine::streamOpen() const {
    return !failed() && handshakeDone_ && !shutdownWanted_ && !closeNotifySent_ &&
           !closeNotifyReceived_ && !truncated_;
}

bool Engine::requestRenegotiation() {
    if (!streamOpen() || role_ != Role::client) {
        return false;
    }
    clearErrors();
    if (SSL_renegotiate(ssl_) != 1) {
        tls::drainErrors();
        return false;
    }
    postHandshakePending_ = true;
    run();
    return true;
}

bool Engine::requestKeyUpdate(bool requestPeer) {
    if (!streamOpen()) {
        return false;
    }
    clearErrors();
    if (SSL_key_update(ssl_, requestPeer ? SSL_KEY_UPDATE_REQUESTED
                                         : SSL_KEY_UPDATE_NOT_REQUESTED) != 1) {
        tls::drainErrors();
        return false;
    }
    postHandshakePending_ = true;
    run();
    return true;
}

bool Engine::finished() const {
    if (cipherOutPending() > 0) {
        return false;
    }
    if (failed()) {
        return true;
    }
    return (closeNotifyReceived_ || truncated_) && closeNotifySent_ && plainTail_ == plainHead_;
}

void Engine::fail(ErrorSource source, std::string reason) {
    if (failed()) {
        return;
    }
    errorSource_ = source;
    errorReason_ = reason.empty() ? "unknown TLS error" : std::move(reason);
    ticketsHeld_ = 0;
    releasePlain();
}

bool Engine::handleResult(int ret, const char *operation) {
    const int err = SSL_get_error(ssl_, ret);
    switch (err) {
    case SSL_ERROR_NONE:
        return true;
    case SSL_ERROR_WANT_READ:
    case SSL_ERROR_WANT_WRITE:
        clearErrors();
        return false;
    case SSL_ERROR_ZERO_RETURN:
        clearErrors();
        if (!handshakeDone_) {
            fail(ErrorSource::peer, std::string(operation) + ": connection closed by peer");
        } else if (closeNotifyAlertSeen_) {
            closeNotifyReceived_ = true;
        } else {
            truncated_ = true; // EOF without close_notify
        }
        return false;
    default:
        break;
    }
    auto queued = tls::drainErrors();
    if (isUnexpectedEof(queued.first) || (err == SSL_ERROR_SYSCALL && queued.first == 0)) {
        // The transport ended without close_notify. After the handshake this is a possible
        // truncation the caller must be told about; during it, the handshake failed.
        if (handshakeDone_) {
            truncated_ = true;
            return false;
        }
        fail(ErrorSource::peer, std::string(operation) + ": connection closed by peer");
        return false;
    }
    const ErrorSource source = isLocalError(queued.first) ? ErrorSource::local : ErrorSource::peer;
    fail(source, std::string(operation) + ": " + queued.reason);
    return false;
}

void Engine::discardInput() {
    BIO *inner = SSL_get_rbio(ssl_);
    if (inner == nullptr) {
        return;
    }
    char *data = nullptr;
    while (BIO_nread(inner, &data, INT_MAX) > 0) {
    }
}

void Engine::run() {
    runSteps();
    outPending_ = queryOutPending();
}

void Engine::runSteps() {
    if (failed()) {
        // Nothing after a fatal error is plaintext; draining it keeps the transport readable so
        // the caller can wait for the peer's FIN instead of closing into a reset.
        discardInput();
        return;
    }
    if (network_ == nullptr) {
        // The pair was released while idle: nothing came in, and only a close or a KeyUpdate
        // has something to send.
        if (!shutdownWanted_ && !postHandshakePending_) {
            return;
        }
        if (!ensurePair()) {
            return;
        }
    }
    if (!handshakeDone_) {
        runHandshake();
        if (!handshakeDone_ || failed()) {
            return;
        }
    }
    if (postHandshakePending_) {
        // A KeyUpdate or a renegotiation request waits in OpenSSL until the state machine runs.
        clearErrors();
        const int ret = SSL_do_handshake(ssl_);
        if (ret == 1) {
            postHandshakePending_ = false;
        } else {
            const int err = SSL_get_error(ssl_, ret);
            if (err == SSL_ERROR_WANT_READ) {
                // Sent; the rest (if any) arrives through SSL_read.
                postHandshakePending_ = false;
                clearErrors();
            } else if (!handleResult(ret, "handshake") && failed()) {
                return;
            }
        }
    }
    runRead();
    if (shutdownWanted_ && !closeNotifySent_ && !failed()) {
        runShutdown();
    }
}

void Engine::runHandshake() {
    clearErrors();
    const std::size_t pendingBefore = queryOutPending();
    const int ret = SSL_do_handshake(ssl_);
    if (ret == 1) {
        handshakeDone_ = true;
        // A TLS 1.3 server's handshake ends on the client's Finished, and OpenSSL answers it
        // with the session tickets alone: with the earlier flight already sent, they are all
        // that is queued.
        if (holdTickets_ && pendingBefore == 0 && SSL_version(ssl_) == TLS1_3_VERSION) {
            ticketsHeld_ = queryOutPending();
        }
        recordHandshake();
        return;
    }
    handleResult(ret, "handshake");
    // A server that answered without failing has parsed the ClientHello and chosen its
    // certificate and ALPN protocol (a HelloRetryRequest included): the hello is accepted.
    if (role_ == Role::server && !helloAccepted_ && !failed() &&
        queryOutPending() > pendingBefore) {
        recordHello();
    }
}

void Engine::recordHello() {
    if (role_ == Role::server) {
        helloAccepted_ = true;
        if (const char *name = SSL_get_servername(ssl_, TLSEXT_NAMETYPE_host_name)) {
            info_.serverName = name;
        }
    }
    const unsigned char *alpn = nullptr;
    unsigned int alpnLength = 0;
    SSL_get0_alpn_selected(ssl_, &alpn, &alpnLength);
    if (alpn != nullptr) {
        info_.alpn.assign(reinterpret_cast<const char *>(alpn), alpnLength);
    }
}

void Engine::recordHandshake() {
    info_.protocol = SSL_get_version(ssl_);
    if (const char *cipher = SSL_get_cipher_name(ssl_)) {
        info_.cipher = cipher;
    }
    recordHello();
    info_.resumed = SSL_session_reused(ssl_) == 1;
    if (role_ == Role::server) {
        // On a resumed session this is the certificate verified by the original handshake.
        if (X509 *peer = SSL_get0_peer_certificate(ssl_)) {
            const tls::PeerNames names = tls::peerNames(peer);
            info_.clientSubject = names.subject;
            info_.clientIdentity = tls::identityOf(names);
            info_.clientSpkiSha256 = names.spkiSha256;
            info_.clientVerified = SSL_get_verify_result(ssl_) == X509_V_OK;
        }
    }
}

void Engine::runRead() {
    if (closeNotifyReceived_ || truncated_) {
        // Bytes after the end of the stream are never plaintext: discard them so the transport
        // keeps draining and a close does not turn into a reset.
        discardInput();
        return;
    }
    for (;;) {
        // Nothing to decrypt and nothing buffered: skip the call (and the buffer allocation).
        const std::size_t cipherWaiting = cipherInWaiting();
        if (cipherWaiting == 0 && SSL_has_pending(ssl_) == 0 && !transportEof_ &&
            !readWantsWrite_) {
            break;
        }
        if (plainTail_ == plainCapacity_) {
            if (plainTail_ == plaintextBudget_) {
                break; // the consumer has to take some first; consumePlainOut() resumes
            }
            if (!takePlain(cipherWaiting)) {
                fail(ErrorSource::local, "read: out of memory");
                break;
            }
        }
        clearErrors();
        std::size_t got = 0;
        const int ret =
            SSL_read_ex(ssl_, plain_.get() + plainTail_, plainCapacity_ - plainTail_, &got);
        readWantsWrite_ = false;
        if (ret == 1) {
            plainTail_ += got;
            continue;
        }
        if (SSL_get_error(ssl_, ret) == SSL_ERROR_WANT_WRITE) {
            // A KeyUpdate response or an alert needs room in the full pair; consumeCipherOut()
            // runs the read again even if no new ciphertext arrives.
            readWantsWrite_ = true;
        }
        handleResult(ret, "read");
        break;
    }
    if (closeNotifyReceived_ || truncated_ || failed()) {
        discardInput();
    }
    if (plainHead_ == plainTail_) {
        releasePlain();
    }
}

bool Engine::takePlain(std::size_t cipherWaiting) {
    // A block of the whole budget, unless nothing is buffered and the ciphertext waiting is
    // short: its plaintext, never longer, then takes a small block (util/block_cache keeps a
    // poll's worth of them). A driver may hold decrypted bytes for a while (sluice's waits for
    // the loop's check phase to write a poll's worth together), and a budget-sized block for
    // each of them went to the heap's bins and back on every small read.
    std::size_t size = plaintextBudget_;
    if (!plain_ && cipherWaiting <= smallPlaintext && SSL_has_pending(ssl_) == 0) {
        size = std::min(size, smallPlaintext);
    }
    auto *block = static_cast<std::uint8_t *>(util::takeBlock(size));
    if (block == nullptr) {
        return false;
    }
    if (plain_) {
        // More arrived than the small block holds: what waits moves to a full one.
        std::memcpy(block, plain_.get() + plainHead_, plainTail_ - plainHead_);
        plainTail_ -= plainHead_;
        plainHead_ = 0;
    }
    plain_.reset(block);
    plainCapacity_ = static_cast<std::uint32_t>(size);
    return true;
}

void Engine::releasePlain() {
    plain_.reset();
    plainHead_ = plainTail_ = 0;
    plainCapacity_ = 0;
}

void Engine::runShutdown() {
    if (!handshakeDone_) {
        return; // close_notify is sent once the handshake completes, or never
    }
    clearErrors();
    const int ret = SSL_shutdown(ssl_);
    if (ret >= 0) {
        closeNotifySent_ = true;
        clearErrors();
        return;
    }
    const int err = SSL_get_error(ssl_, ret);
    if (err == SSL_ERROR_WANT_WRITE || err == SSL_ERROR_WANT_READ) {
        clearErrors();
        return; // retried after the pair drains
    }
    // The peer already closed the transport: there is no one to tell.
    tls::drainErrors();
    closeNotifySent_ = true;
}

ConnectionFacts Engine::facts(std::size_t maxDer) const {
    ConnectionFacts out;
    if (!handshakeDone_ || ssl_ == nullptr) {
        return out;
    }
    if (X509 *peer = SSL_get0_peer_certificate(ssl_)) {
        out.peerCertificate = true;
        out.verifyResult = SSL_get_verify_result(ssl_);
        char cn[256];
        const int length =
            X509_NAME_get_text_by_NID(X509_get_subject_name(peer), NID_commonName, cn, sizeof cn);
        if (length > 0) {
            out.peerCommonName.assign(cn, static_cast<std::size_t>(length));
        }
        if (maxDer > 0) {
            const int size = i2d_X509(peer, nullptr);
            if (size > 0 && static_cast<std::size_t>(size) <= maxDer) {
                out.peerCertificateDer.resize(static_cast<std::size_t>(size));
                auto *cursor = reinterpret_cast<unsigned char *>(out.peerCertificateDer.data());
                i2d_X509(peer, &cursor);
            }
        }
    }
    if (X509 *own = SSL_get_certificate(ssl_)) {
        if (const char *name = OBJ_nid2sn(X509_get_signature_nid(own))) {
            out.signatureAlgorithm = name;
        }
        if (EVP_PKEY *key = X509_get0_pubkey(own)) {
            const int id = EVP_PKEY_get_base_id(key);
            const char *kind = id == EVP_PKEY_RSA       ? "RSA"
                               : id == EVP_PKEY_EC      ? "EC"
                               : id == EVP_PKEY_ED25519 ? "ED"
                               : id == EVP_PKEY_ED448   ? "ED"
                                                        : "KEY";
            out.keyAlgorithm = kind + std::to_string(EVP_PKEY_get_bits(key));
        }
    }
    return out;
}

} // namespace sluice
