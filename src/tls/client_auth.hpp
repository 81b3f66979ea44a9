// tls/client_auth: client-certificate (mTLS) policy. The CA bundle, CRLs and depth go into the
// context's verify store; the allow lists are checked in OpenSSL's verify callback on the leaf,
// so a client that is not allowed fails the handshake with a bad_certificate alert and an error
// whose text says why (the engine turns it into the handshake-failed log line).
#pragma once

#include <string>
#include <vector>

#include <sluice/config.hpp>

struct ssl_ctx_st;
struct ssl_st;
struct x509_st;
struct x509_store_st;
struct stack_st_X509_NAME;

namespace sluice::tls {

/** The names of a certificate that allow lists and logs look at. */
struct PeerNames {
    std::string subject; ///< RFC 2253 subject
    std::string cn;      ///< last subject CN, empty if none
    std::vector<std::string> dns;
    std::vector<std::string> uri;
    std::string spkiSha256; ///< lowercase hex of SHA-256(SubjectPublicKeyInfo)
};

/** Reads the names of `cert`. */
PeerNames peerNames(x509_st *cert);

/** The identity a log or PROXY header should carry: first URI SAN, else first DNS SAN, else CN. */
std::string identityOf(const PeerNames &names);

/** True when `auth` has at least one non-empty allow list. */
bool hasAllowLists(const ClientAuth &auth);

/**
 * True when `names` matches an entry of any allow list of `auth` (or no list is set). On success
 * `matched` says which entry (for example "uri spiffe://x/ns"); on failure it says what the
 * certificate had.
 */
bool allowedByLists(const ClientAuth &auth, const PeerNames &names, std::string &matched);

/** The SSL_CTX ex_data slot holding the context's `const ClientAuth *` (for the callback). */
int clientAuthIndex();

/** Applies `auth` to a server context: store, CRLs, CA names, depth, verify mode. Throws. */
void applyClientAuth(ssl_ctx_st *ctx, const ClientAuth &auth);

/**
 * A certificate's own client_auth (per SNI name), loaded once with the context and applied to
 * each connection that selects that certificate, from the client-hello callback. It replaces
 * the listener's policy for the connection: verify mode, depth, trust store with its CRLs, the
 * CA names sent in the CertificateRequest, the allow lists and the session-ID context (so a
 * session from one policy never resumes under another).
 */
class ConnectionClientAuth {
public:
    /** Loads the CA bundle and CRLs of `auth`; `sessionContext` tells policies apart. Throws. */
    ConnectionClientAuth(const ClientAuth &auth, const std::string &sessionContext);
    ~ConnectionClientAuth();
    ConnectionClientAuth(const ConnectionClientAuth &) = delete;
    ConnectionClientAuth &operator=(const ConnectionClientAuth &) = delete;

    /** Puts the policy on `ssl` (before its ClientHello is processed); false on failure. */
    bool apply(ssl_st *ssl) const;

private:
    ClientAuth auth_;
    x509_store_st *store_ = nullptr;        // owned; null for mode none
    stack_st_X509_NAME *caNames_ = nullptr; // owned; copied onto each connection
    unsigned char sessionContext_[32] = {}; // SHA-256 of the listener and policy
};

} // namespace sluice::tls
