// tls/ocsp_fetch: asks a certificate's OCSP responder (the URL in its Authority Information
// Access extension) for the certificate's status, over plain HTTP with libcurl. Blocking calls,
// made only by the OCSP watcher thread, never on an event loop. What comes back is untrusted
// bytes: the caller checks it with checkOcspResponse before it can be stapled.
#pragma once

#include <atomic>
#include <span>
#include <string>
#include <vector>

struct x509_st;
struct stack_st_X509;

namespace sluice::tls {

/** True when this build has libcurl, so ocsp = "auto" can work. */
bool ocspFetchAvailable();

/**
 * The first http:// OCSP responder URL of `leaf`. Throws TlsError when it names none (or only
 * other schemes).
 */
std::string ocspResponderUrl(x509_st *leaf);

/**
 * A DER OCSPRequest for `leaf` (SHA-1 certificate ID, no nonce, so the answer can be cached and
 * stapled), its issuer looked up in `chain`. Throws TlsError when the issuer is not there.
 */
std::vector<unsigned char> makeOcspRequest(x509_st *leaf, stack_st_X509 *chain);

/**
 * POSTs `request` to `url` and returns the response body. Connect and total timeouts bound the
 * call; it also returns early, with a TlsError, once `cancel` becomes true. Throws TlsError
 * saying what went wrong (no connection, timeout, an HTTP status other than 200, a body that is
 * empty or too large, no libcurl in this build).
 */
std::vector<unsigned char> fetchOcspResponse(const std::string &url,
                                             std::span<const unsigned char> request,
                                             const std::atomic<bool> &cancel);

} // namespace sluice::tls
