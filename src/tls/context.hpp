// tls/context: builds the shared, immutable SSL_CTX objects that every connection of a listener
// uses. Built on the control path (startup, reload, --check): failures throw TlsError with one
// message naming the file or setting at fault.
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <sluice/config.hpp>

struct ssl_ctx_st;

namespace sluice::tls {

/** A failure to build a context: what() names the listener, the file or the key, and why. */
class TlsError : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

/** Shared ownership of an SSL_CTX; the last owner frees it. */
using ContextPtr = std::shared_ptr<ssl_ctx_st>;

/**
 * Builds a server context for `listener`: its certificates and keys (each key checked against
 * its certificate), version bounds, ciphers, suites and groups, renegotiation refused.
 * Logs a warning for a certificate that is expired or not yet valid. `builtinKdf`: its keys are
 * derived by tls/kdf (global.tls_kdf = "sluice"), else by OpenSSL. Throws TlsError.
 */
ContextPtr makeServerContext(const ListenerConfig &listener, bool builtinKdf = true);

/**
 * makeServerContext(), or the context already built for this listener when it is still in use
 * (by the running configuration, during a reload) and nothing it was built from changed: the same
 * `tlsIdentity`, the same `builtinKdf` and, for each of `tlsFiles`, the same size, modification and
 * change times and inode (a folder: the same for each entry, two levels deep). So a reload costs
 * what changed, not a second copy of every certificate. Listeners without a tlsIdentity are always
 * built. The cache holds weak references only; thread-safe. Throws TlsError.
 */
ContextPtr serverContextFor(const ListenerConfig &listener, bool builtinKdf = true);

/** Client-side options for makeClientContext. */
struct ClientContextOptions {
    std::string caFile;            ///< PEM bundle to verify the server; empty: system default paths
    bool verify = true;            ///< verify the server's certificate chain and name
    TlsPolicy policy;              ///< versions, ciphers, groups
    std::string certFile;          ///< client certificate chain (PEM) to present; empty: none
    std::string keyFile;           ///< its private key
    std::vector<std::string> alpn; ///< protocols offered, in order; empty: no ALPN
    bool builtinKdf = true;        ///< keys derived by tls/kdf (global.tls_kdf), else by OpenSSL
};

/** Builds a client context (outbound TLS). Throws TlsError. */
ContextPtr makeClientContext(const ClientContextOptions &options);

/** One certificate of a server context, for the status page and the expiry metrics. */
struct CertificateSummary {
    std::string listener;
    std::string name;           ///< its first DNS name (or subject CN); empty if it has none
    std::string file;           ///< the certificate file it was loaded from
    std::int64_t notBefore = 0; ///< Unix seconds
    std::int64_t notAfter = 0;  ///< Unix seconds
    /** The nextUpdate of its OCSP staple (Unix seconds); 0 when it has no staple. */
    std::int64_t ocspNextUpdate = 0;
};

/** The certificates of a context made by makeServerContext, in load order; empty otherwise. */
std::vector<CertificateSummary> certificateSummaries(const ssl_ctx_st *ctx);

/** OpenSSL's version string, for --version. */
std::string openSslVersion();

} // namespace sluice::tls
