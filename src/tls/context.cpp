#include "tls/context.hpp"

#include <algorithm>
#include <cstdio>
#include <ctime>

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include "tls/errors.hpp"
#include "util/log.hpp"

namespace sluice::tls {
namespace {

int parseVersion(const std::string &text) {
    if (text == "1.2") {
        return TLS1_2_VERSION;
    }
    if (text == "1.3") {
        return TLS1_3_VERSION;
    }
    throw TlsError("unsupported TLS version '" + text + "' (expected \"1.2\" or \"1.3\")");
}

[[noreturn]] void raise(const std::string &what) {
    auto queued = drainErrors();
    throw TlsError(queued.reason.empty() ? what : what + ": " + queued.reason);
}

void applyPolicy(SSL_CTX *ctx, const TlsPolicy &policy) {
    const int minimum = parseVersion(policy.minVersion);
    const int maximum = parseVersion(policy.maxVersion);
    if (minimum > maximum) {
        throw TlsError("min_version " + policy.minVersion + " is above max_version " +
                       policy.maxVersion);
    }
    if (SSL_CTX_set_min_proto_version(ctx, minimum) != 1 ||
        SSL_CTX_set_max_proto_version(ctx, maximum) != 1) {
        raise("cannot set the TLS version bounds");
    }
    if (maximum >= TLS1_3_VERSION &&
        SSL_CTX_set_ciphersuites(ctx, policy.ciphersuites.c_str()) != 1) {
        raise("ciphersuites '" + policy.ciphersuites + "' names no TLS 1.3 suite");
    }
    if (minimum <= TLS1_2_VERSION && SSL_CTX_set_cipher_list(ctx, policy.ciphers.c_str()) != 1) {
        raise("ciphers '" + policy.ciphers + "' names no TLS 1.2 cipher");
    }
    if (SSL_CTX_set1_groups_list(ctx, policy.groups.c_str()) != 1) {
        raise("groups '" + policy.groups + "' names an unknown group");
    }
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION |
                                 SSL_OP_CIPHER_SERVER_PREFERENCE);
    SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
    // Reading ahead lets one SSL_read take every record the pair holds in one BIO call.
    SSL_CTX_set_read_ahead(ctx, 1);
}

void warnValidity(X509 *cert, const std::string &path) {
    if (X509_cmp_current_time(X509_get0_notAfter(cert)) < 0) {
        log::warn("certificate-expired file=" + path);
    } else if (X509_cmp_current_time(X509_get0_notBefore(cert)) > 0) {
        log::warn("certificate-not-yet-valid file=" + path);
    }
}

void loadCertificate(SSL_CTX *ctx, const CertificateFiles &files) {
    ERR_clear_error();
    if (SSL_CTX_use_certificate_chain_file(ctx, files.cert.c_str()) != 1) {
        raise("certificate " + files.cert + ": cannot load");
    }
    if (SSL_CTX_use_PrivateKey_file(ctx, files.key.c_str(), SSL_FILETYPE_PEM) != 1) {
        raise("key " + files.key + ": cannot load");
    }
    // SSL_CTX_check_private_key checks the key just loaded against the certificate of the same
    // type, so a second certificate (RSA next to ECDSA) is checked too.
    if (SSL_CTX_check_private_key(ctx) != 1) {
        drainErrors();
        throw TlsError("key " + files.key + " does not match certificate " + files.cert);
    }
    if (X509 *leaf = SSL_CTX_get0_certificate(ctx)) {
        warnValidity(leaf, files.cert);
    }
}

struct ContextDeleter {
    void operator()(SSL_CTX *ctx) const { SSL_CTX_free(ctx); }
};

} // namespace

ContextPtr makeServerContext(const ListenerConfig &listener) {
    ERR_clear_error();
    ContextPtr ctx(SSL_CTX_new(TLS_server_method()), ContextDeleter());
    if (!ctx) {
        raise("listener " + listener.name + ": cannot create a TLS context");
    }
    try {
        applyPolicy(ctx.get(), listener.tls);
        if (listener.certificates.empty()) {
            throw TlsError("no certificate");
        }
        for (const auto &files : listener.certificates) {
            loadCertificate(ctx.get(), files);
        }
    } catch (const TlsError &e) {
        throw TlsError("listener " + listener.name + ": " + e.what());
    }
    // Sessions resumed through the cache must come from this listener.
    const auto *id = reinterpret_cast<const unsigned char *>(listener.name.data());
    SSL_CTX_set_session_id_context(
        ctx.get(), id,
        static_cast<unsigned>(std::min<std::size_t>(listener.name.size(), SSL_MAX_SID_CTX_LENGTH)));
    return ctx;
}

ContextPtr makeClientContext(const ClientContextOptions &options) {
    ERR_clear_error();
    ContextPtr ctx(SSL_CTX_new(TLS_client_method()), ContextDeleter());
    if (!ctx) {
        raise("cannot create a TLS client context");
    }
    applyPolicy(ctx.get(), options.policy);
    if (options.verify) {
        SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_PEER, nullptr);
        const int loaded =
            options.caFile.empty()
                ? SSL_CTX_set_default_verify_paths(ctx.get())
                : SSL_CTX_load_verify_locations(ctx.get(), options.caFile.c_str(), nullptr);
        if (loaded != 1) {
            raise("CA " + options.caFile + ": cannot load");
        }
    }
    return ctx;
}

std::string openSslVersion() {
    return OpenSSL_version(OPENSSL_VERSION);
}

} // namespace sluice::tls
