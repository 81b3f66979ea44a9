// Test PKI and SSL_CTX builders for the engine tests. Keys and certificates are generated in
// memory once per test binary, so the tests read no files and start fast. A TlsObserver attached
// to a context records, through OpenSSL's message callback, which handshake messages and alerts
// its connections sent and received: the tests use it to see what the engine's API cannot show
// (a KeyUpdate on the wire, a refused renegotiation, the alert that carried an error). For the
// tests that run a real server: PEM files of the PKI and a listening socket on loopback.
#pragma once

#include <arpa/inet.h>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <netinet/in.h>
#include <span>
#include <stdexcept>
#include <string>
#include <sys/socket.h>
#include <unistd.h>
#include <utility>
#include <vector>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

namespace sluice::test {

struct SslCtxFree {
    void operator()(SSL_CTX *ctx) const { SSL_CTX_free(ctx); }
};
struct PkeyFree {
    void operator()(EVP_PKEY *key) const { EVP_PKEY_free(key); }
};
struct X509Free {
    void operator()(X509 *cert) const { X509_free(cert); }
};
using SslCtxPtr = std::unique_ptr<SSL_CTX, SslCtxFree>;
using PkeyPtr = std::unique_ptr<EVP_PKEY, PkeyFree>;
using X509Ptr = std::unique_ptr<X509, X509Free>;

/** Drains OpenSSL's error queue of this thread into one line. */
inline std::string opensslErrors() {
    std::string all;
    unsigned long code = 0;
    while ((code = ERR_get_error()) != 0) {
        char text[256];
        ERR_error_string_n(code, text, sizeof text);
        if (!all.empty())
            all += "; ";
        all += text;
    }
    return all;
}

/** The fixture itself could not be built: a broken test environment, not an engine failure. */
[[noreturn]] inline void fixtureFailure(const std::string &what) {
    throw std::runtime_error("tls fixture: " + what + ": " + opensslErrors());
}

inline void addExtension(X509 *cert, X509V3_CTX &v3, int nid, const char *value) {
    X509_EXTENSION *extension = X509V3_EXT_conf_nid(nullptr, &v3, nid, value);
    if (extension == nullptr)
        fixtureFailure(std::string("extension ") + value);
    const int added = X509_add_ext(cert, extension, -1);
    X509_EXTENSION_free(extension);
    if (added != 1)
        fixtureFailure(std::string("add extension ") + value);
}

/**
 * A v3 certificate for `subjectKey`, signed by `issuerKey`. A null `issuer` makes it
 * self-signed. `subjectAltName` is an OpenSSL SAN value such as "DNS:localhost", or null.
 */
inline X509Ptr makeCertificate(EVP_PKEY *subjectKey, const char *commonName, X509 *issuer,
                               EVP_PKEY *issuerKey, long serial, bool isCa,
                               const char *subjectAltName) {
    X509Ptr cert(X509_new());
    if (!cert)
        fixtureFailure("X509_new");
    X509_set_version(cert.get(), X509_VERSION_3);
    ASN1_INTEGER_set(X509_get_serialNumber(cert.get()), serial);
    // Backdated an hour so a clock skew between generation and verification cannot matter.
    X509_gmtime_adj(X509_getm_notBefore(cert.get()), -3600);
    X509_gmtime_adj(X509_getm_notAfter(cert.get()), 7L * 24 * 3600);
    if (X509_set_pubkey(cert.get(), subjectKey) != 1)
        fixtureFailure("X509_set_pubkey");
    X509_NAME *name = X509_get_subject_name(cert.get());
    X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                               reinterpret_cast<const unsigned char *>(commonName), -1, -1, 0);
    X509_set_issuer_name(cert.get(), issuer != nullptr ? X509_get_subject_name(issuer) : name);

    X509V3_CTX v3;
    X509V3_set_ctx_nodb(&v3);
    X509V3_set_ctx(&v3, issuer != nullptr ? issuer : cert.get(), cert.get(), nullptr, nullptr, 0);
    addExtension(cert.get(), v3, NID_basic_constraints, isCa ? "critical,CA:TRUE" : "CA:FALSE");
    addExtension(cert.get(), v3, NID_key_usage,
                 isCa ? "critical,keyCertSign,cRLSign" : "critical,digitalSignature");
    addExtension(cert.get(), v3, NID_subject_key_identifier, "hash");
    if (!isCa)
        addExtension(cert.get(), v3, NID_ext_key_usage, "serverAuth");
    if (subjectAltName != nullptr)
        addExtension(cert.get(), v3, NID_subject_alt_name, subjectAltName);
    if (X509_sign(cert.get(), issuerKey, EVP_sha256()) == 0)
        fixtureFailure("X509_sign");
    return cert;
}

inline PkeyPtr makeKey() {
    PkeyPtr key(EVP_EC_gen("P-256"));
    if (!key)
        fixtureFailure("EVP_EC_gen");
    return key;
}

/** A CA, a leaf for "localhost" signed by it, and an unrelated CA that signed nothing here. */
struct TestPki {
    PkeyPtr caKey;
    X509Ptr caCert;
    PkeyPtr leafKey;
    X509Ptr leafCert;
    PkeyPtr otherCaKey;
    X509Ptr otherCaCert;
};

/** Generated on first use and shared by every test of the binary. */
inline const TestPki &pki() {
    static const TestPki instance = [] {
        TestPki p;
        p.caKey = makeKey();
        p.caCert = makeCertificate(p.caKey.get(), "sluice test CA", nullptr, p.caKey.get(), 1, true,
                                   nullptr);
        p.leafKey = makeKey();
        p.leafCert = makeCertificate(p.leafKey.get(), "localhost", p.caCert.get(), p.caKey.get(), 2,
                                     false, "DNS:localhost,IP:127.0.0.1");
        p.otherCaKey = makeKey();
        p.otherCaCert = makeCertificate(p.otherCaKey.get(), "sluice unrelated CA", nullptr,
                                        p.otherCaKey.get(), 3, true, nullptr);
        return p;
    }();
    return instance;
}

enum class TlsVersion { any, tls12, tls13 };

/** What one side of a test connection allows. Empty cipher strings keep OpenSSL's defaults. */
struct ContextOptions {
    TlsVersion version = TlsVersion::any;
    std::string cipherList;    ///< TLS 1.2 ciphers (SSL_CTX_set_cipher_list)
    std::string cipherSuites;  ///< TLS 1.3 suites (SSL_CTX_set_ciphersuites)
    bool trustOtherCa = false; ///< client: trust the unrelated CA instead of the one that signed
};

/** Handshake messages and alerts seen by every connection of one SSL_CTX. */
struct TlsObserver {
    std::array<int, 256> handshakeSent{};     ///< by handshake message type
    std::array<int, 256> handshakeReceived{}; ///< by handshake message type
    int keyUpdatesSent[2] = {0, 0};           ///< [request_update]: 0 not requested, 1 requested
    int keyUpdatesReceived[2] = {0, 0};
    std::vector<std::pair<int, int>> alertsSent; ///< (level, description)
    std::vector<std::pair<int, int>> alertsReceived;

    bool sentAlert(int level, int description) const {
        for (const auto &alert : alertsSent)
            if (alert.first == level && alert.second == description)
                return true;
        return false;
    }
};

/** OpenSSL message callback; it only records, as every callback in sluice must. */
inline void observeMessage(int writeP, int, int contentType, const void *buf, std::size_t len,
                           SSL *, void *arg) {
    auto *observer = static_cast<TlsObserver *>(arg);
    const auto *bytes = static_cast<const unsigned char *>(buf);
    if (observer == nullptr || len == 0)
        return;
    if (contentType == SSL3_RT_HANDSHAKE) {
        (writeP ? observer->handshakeSent : observer->handshakeReceived)[bytes[0]]++;
        if (bytes[0] == SSL3_MT_KEY_UPDATE && len >= 5 && bytes[4] <= 1)
            (writeP ? observer->keyUpdatesSent : observer->keyUpdatesReceived)[bytes[4]]++;
    } else if (contentType == SSL3_RT_ALERT && len >= 2) {
        (writeP ? observer->alertsSent : observer->alertsReceived).emplace_back(bytes[0], bytes[1]);
    }
}

inline void restrictContext(SSL_CTX *ctx, const ContextOptions &options, TlsObserver *observer) {
    switch (options.version) {
    case TlsVersion::any:
        break;
    case TlsVersion::tls12:
        SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
        SSL_CTX_set_max_proto_version(ctx, TLS1_2_VERSION);
        break;
    case TlsVersion::tls13:
        SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
        SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION);
        break;
    }
    if (!options.cipherList.empty() &&
        SSL_CTX_set_cipher_list(ctx, options.cipherList.c_str()) != 1)
        fixtureFailure("cipher list " + options.cipherList);
    if (!options.cipherSuites.empty() &&
        SSL_CTX_set_ciphersuites(ctx, options.cipherSuites.c_str()) != 1)
        fixtureFailure("cipher suites " + options.cipherSuites);
    if (observer != nullptr) {
        SSL_CTX_set_msg_callback(ctx, observeMessage);
        SSL_CTX_set_msg_callback_arg(ctx, observer);
    }
}

/** A server context with the "localhost" leaf. `observer`, if any, must outlive its SSLs. */
inline SslCtxPtr serverContext(const ContextOptions &options = {},
                               TlsObserver *observer = nullptr) {
    const TestPki &p = pki();
    SslCtxPtr ctx(SSL_CTX_new(TLS_server_method()));
    if (!ctx)
        fixtureFailure("SSL_CTX_new server");
    if (SSL_CTX_use_certificate(ctx.get(), p.leafCert.get()) != 1 ||
        SSL_CTX_use_PrivateKey(ctx.get(), p.leafKey.get()) != 1 ||
        SSL_CTX_check_private_key(ctx.get()) != 1)
        fixtureFailure("server certificate");
    restrictContext(ctx.get(), options, observer);
    return ctx;
}

/** A client context that verifies the server against the test CA. */
inline SslCtxPtr clientContext(const ContextOptions &options = {},
                               TlsObserver *observer = nullptr) {
    const TestPki &p = pki();
    SslCtxPtr ctx(SSL_CTX_new(TLS_client_method()));
    if (!ctx)
        fixtureFailure("SSL_CTX_new client");
    X509 *trusted = options.trustOtherCa ? p.otherCaCert.get() : p.caCert.get();
    if (X509_STORE_add_cert(SSL_CTX_get_cert_store(ctx.get()), trusted) != 1)
        fixtureFailure("trust store");
    SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_PEER, nullptr);
    restrictContext(ctx.get(), options, observer);
    return ctx;
}

using Digest = std::array<unsigned char, 32>;

inline Digest sha256(std::span<const std::uint8_t> data) {
    Digest digest{};
    unsigned int size = 0;
    if (EVP_Digest(data.data(), data.size(), digest.data(), &size, EVP_sha256(), nullptr) != 1 ||
        size != digest.size())
        fixtureFailure("EVP_Digest");
    return digest;
}

/** Writes `cert` or, when it is null, `key` to `path` as PEM; throws on failure. */
inline void writePem(const std::string &path, X509 *cert, EVP_PKEY *key) {
    std::FILE *file = std::fopen(path.c_str(), "w");
    if (file == nullptr) {
        throw std::runtime_error("cannot write " + path);
    }
    const int ok = cert != nullptr
                       ? PEM_write_X509(file, cert)
                       : PEM_write_PrivateKey(file, key, nullptr, nullptr, 0, nullptr, nullptr);
    std::fclose(file);
    if (ok != 1) {
        throw std::runtime_error("cannot write " + path + ": " + opensslErrors());
    }
}

/** A TCP socket listening on 127.0.0.1 at a port the kernel picks (stored in `port`). */
inline int listenLoopback(int &port) {
    const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t length = sizeof address;
    if (fd < 0 || ::bind(fd, reinterpret_cast<sockaddr *>(&address), sizeof address) != 0 ||
        ::listen(fd, 64) != 0 ||
        ::getsockname(fd, reinterpret_cast<sockaddr *>(&address), &length) != 0) {
        if (fd >= 0) {
            ::close(fd);
        }
        throw std::runtime_error("cannot listen on 127.0.0.1");
    }
    port = ntohs(address.sin_port);
    return fd;
}

} // namespace sluice::test
