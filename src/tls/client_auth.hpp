// tls/client_auth: client-certificate (mTLS) policy. The CA bundle, CRLs and depth go into the
// context's verify store; the allow lists are checked in OpenSSL's verify callback on the leaf,
// so a client that is not allowed fails the handshake with a bad_certificate alert and an error
// whose text says why (the engine turns it into the handshake-failed log line).
#pragma once

#include <string>
#include <vector>

#include <sluice/config.hpp>

struct ssl_ctx_st;
struct x509_st;

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

} // namespace sluice::tls
