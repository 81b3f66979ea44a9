// engine_socketpair: two sluice::Engines, a client and a server, talking TLS over a plain
// blocking socketpair, one thread each. No event loop: the engine is sans-I/O, so the same
// driving loop works over any transport. The client sends a message in chunks, each echoed back
// before the next; then both sides close with close_notify.
//
//   engine_socketpair                   with a self-signed certificate made in memory
//   engine_socketpair CERT KEY CA       with these PEM files (the server's chain and key, and
//                                       the CA the client verifies it with)
//
// Exits 0 when every byte came back and both sides saw the other's close_notify.

#include <cstdio>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <sys/socket.h>
#include <thread>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <sluice/engine.hpp>

namespace {

/** What one side's application does with the stream. */
struct Application {
    /** Takes decrypted bytes; may append bytes to send to `outbox`. */
    std::function<void(std::span<const std::uint8_t>, std::string &outbox)> received;
    /** True once it has nothing more to say (it then closes its half). */
    std::function<bool()> done;
};

/**
 * The driving loop: moves ciphertext between `engine` and the blocking socket `fd`, plaintext
 * between `engine` and `app` (starting with the bytes in `outbox`), until both halves of the TLS
 * stream have ended, or it failed and its alert was sent. Returns true for a clean end: the
 * peer's close_notify and ours.
 */
bool drive(sluice::Engine &engine, int fd, Application &app, const char *side,
           std::string outbox = {}) {
    bool closing = false;
    while (!engine.finished()) {
        // 1. Ciphertext out first, even after an error: it may carry the alert.
        for (auto out = engine.cipherOut(); !out.empty(); out = engine.cipherOut()) {
            const ssize_t n = ::send(fd, out.data(), out.size(), MSG_NOSIGNAL);
            if (n < 0) {
                std::perror(side);
                return false;
            }
            engine.consumeCipherOut(static_cast<std::size_t>(n)); // exactly what the socket took
        }
        if (engine.finished()) {
            break;
        }
        // 2. Plaintext to the application, all of it: the engine decrypts more once consumed.
        const auto plain = engine.plainOut();
        if (!plain.empty()) {
            app.received(plain, outbox);
            engine.consumePlainOut(plain.size());
            continue;
        }
        // 3. Plaintext from the application. Zero taken is "not now" (handshake not done, or the
        //    ciphertext queue is full): the same bytes are offered again on the next turn.
        const auto status = engine.status();
        if (!outbox.empty()) {
            const std::size_t taken = engine.write(
                {reinterpret_cast<const std::uint8_t *>(outbox.data()), outbox.size()});
            outbox.erase(0, taken);
            if (taken > 0) {
                continue;
            }
        } else if (!closing && (app.done() || status.closeNotifyReceived || status.truncated)) {
            engine.shutdown(); // close_notify, after every byte written before it
            closing = true;
            continue;
        }
        if (engine.status().ciphertextPending) {
            continue; // flush before blocking in recv (a refused write may have left some)
        }
        // 4. Ciphertext in, read by the socket straight into the engine's buffer.
        const auto space = engine.cipherInSpace();
        if (space.empty()) {
            continue; // after EOF: nothing more to read, the steps above end the stream
        }
        const ssize_t n = ::recv(fd, space.data(), space.size(), 0);
        if (n > 0) {
            engine.commitCipherIn(static_cast<std::size_t>(n));
        } else if (n == 0) {
            engine.cipherInEof();
        } else {
            std::perror(side);
            return false;
        }
    }
    const auto status = engine.status();
    if (status.failed) {
        std::fprintf(stderr, "%s: TLS failed (%s): %s\n", side,
                     engine.errorSource() == sluice::ErrorSource::peer ? "the peer's fault"
                                                                       : "our fault",
                     engine.errorReason().c_str());
        return false;
    }
    return status.closeNotifyReceived && status.closeNotifySent;
}

/** Drains OpenSSL's error queue into one line. */
std::string opensslError() {
    char text[256] = "unknown error";
    if (const unsigned long code = ERR_get_error(); code != 0) {
        ERR_error_string_n(code, text, sizeof text);
    }
    ERR_clear_error();
    return text;
}

/** A self-signed certificate for "localhost" and its key, made in memory. */
bool makeCertificate(EVP_PKEY *&key, X509 *&cert) {
    key = EVP_EC_gen("P-256");
    cert = X509_new();
    if (key == nullptr || cert == nullptr) {
        return false;
    }
    X509_set_version(cert, X509_VERSION_3);
    ASN1_INTEGER_set(X509_get_serialNumber(cert), 1);
    X509_gmtime_adj(X509_getm_notBefore(cert), -3600);
    X509_gmtime_adj(X509_getm_notAfter(cert), 24 * 3600);
    X509_set_pubkey(cert, key);
    X509_NAME *name = X509_get_subject_name(cert);
    X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                               reinterpret_cast<const unsigned char *>("localhost"), -1, -1, 0);
    X509_set_issuer_name(cert, name);
    X509V3_CTX v3;
    X509V3_set_ctx_nodb(&v3);
    X509V3_set_ctx(&v3, cert, cert, nullptr, nullptr, 0);
    X509_EXTENSION *san = X509V3_EXT_conf_nid(nullptr, &v3, NID_subject_alt_name, "DNS:localhost");
    const bool ok = san != nullptr && X509_add_ext(cert, san, -1) == 1 &&
                    X509_sign(cert, key, EVP_sha256()) != 0;
    X509_EXTENSION_free(san);
    return ok;
}

struct CtxFree {
    void operator()(SSL_CTX *ctx) const { SSL_CTX_free(ctx); }
};
using CtxPtr = std::unique_ptr<SSL_CTX, CtxFree>;

} // namespace

int main(int argc, char **argv) {
    if (argc != 1 && argc != 4) {
        std::fprintf(stderr, "usage: %s [CERT KEY CA]\n", argv[0]);
        return 2;
    }
    // The caller owns the SSL_CTX and configures it; an Engine only takes a reference.
    CtxPtr serverCtx(SSL_CTX_new(TLS_server_method()));
    CtxPtr clientCtx(SSL_CTX_new(TLS_client_method()));
    if (!serverCtx || !clientCtx) {
        std::fprintf(stderr, "SSL_CTX_new: %s\n", opensslError().c_str());
        return 1;
    }
    bool loaded = false;
    if (argc == 4) {
        loaded = SSL_CTX_use_certificate_chain_file(serverCtx.get(), argv[1]) == 1 &&
                 SSL_CTX_use_PrivateKey_file(serverCtx.get(), argv[2], SSL_FILETYPE_PEM) == 1 &&
                 SSL_CTX_load_verify_locations(clientCtx.get(), argv[3], nullptr) == 1;
    } else {
        EVP_PKEY *key = nullptr;
        X509 *cert = nullptr;
        loaded = makeCertificate(key, cert) &&
                 SSL_CTX_use_certificate(serverCtx.get(), cert) == 1 &&
                 SSL_CTX_use_PrivateKey(serverCtx.get(), key) == 1 &&
                 X509_STORE_add_cert(SSL_CTX_get_cert_store(clientCtx.get()), cert) == 1;
        X509_free(cert);
        EVP_PKEY_free(key);
    }
    if (!loaded || SSL_CTX_check_private_key(serverCtx.get()) != 1) {
        std::fprintf(stderr, "certificate: %s\n", opensslError().c_str());
        return 1;
    }
    SSL_CTX_set_verify(clientCtx.get(), SSL_VERIFY_PEER, nullptr);

    int fds[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) {
        std::perror("socketpair");
        return 1;
    }

    std::string error;
    sluice::EngineOptions clientOptions;
    clientOptions.serverName = "localhost"; // sent as SNI and verified against the certificate
    auto client =
        sluice::Engine::create(clientCtx.get(), sluice::Role::client, clientOptions, &error);
    auto server = sluice::Engine::create(serverCtx.get(), sluice::Role::server, {}, &error);
    if (!client || !server) {
        std::fprintf(stderr, "Engine::create: %s\n", error.c_str());
        return 1;
    }

    // The client sends 64 chunks of 16 KiB (+ an odd tail), each after the previous came back.
    std::string message;
    for (std::size_t i = 0; message.size() < 64 * 16384 + 123; ++i) {
        message += static_cast<char>('a' + i % 26);
    }
    constexpr std::size_t chunk = 16384;
    std::size_t sent = 0;
    std::string echoed;
    Application clientApp;
    clientApp.received = [&](std::span<const std::uint8_t> bytes, std::string &outbox) {
        echoed.append(reinterpret_cast<const char *>(bytes.data()), bytes.size());
        if (echoed.size() == sent && sent < message.size()) {
            const std::size_t n = std::min(chunk, message.size() - sent);
            outbox.append(message, sent, n);
            sent += n;
        }
    };
    clientApp.done = [&] { return echoed.size() == message.size(); };

    // The server echoes everything; it closes when the client has (closeNotifyReceived).
    Application serverApp;
    serverApp.received = [](std::span<const std::uint8_t> bytes, std::string &outbox) {
        outbox.append(reinterpret_cast<const char *>(bytes.data()), bytes.size());
    };
    serverApp.done = [] { return false; };

    bool serverClean = false;
    std::thread serverThread([&] {
        serverClean = drive(*server, fds[1], serverApp, "server");
        ::close(fds[1]);
    });
    sent = chunk;
    const bool clientClean = drive(*client, fds[0], clientApp, "client", message.substr(0, chunk));
    ::close(fds[0]);
    serverThread.join();

    const bool same = echoed == message;
    std::printf("client: %zu bytes sent, %zu echoed, %s; %s, %s\n", message.size(), echoed.size(),
                same ? "identical" : "DIFFERENT", client->handshake().protocol.c_str(),
                client->handshake().cipher.c_str());
    std::printf("client %s, server %s\n", clientClean ? "closed cleanly" : "did NOT close cleanly",
                serverClean ? "closed cleanly" : "did NOT close cleanly");
    return same && clientClean && serverClean ? 0 : 1;
}
