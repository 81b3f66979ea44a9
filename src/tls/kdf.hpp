// tls/kdf: sluice's own TLS key derivation, offered to libssl as a built-in OpenSSL provider.
//
// OpenSSL 3.0's TLS13-KDF and TLS1-PRF spend much of their time outside the hashing: every call
// fetches the HMAC implementation and the digest again by name and allocates a context for each
// HMAC step. A TLS 1.3 handshake runs the key schedule about twenty times, a TLS 1.2 resumption
// runs the PRF three times; measured with callgrind, they were 18% of a full TLS 1.3 handshake's
// user-space instructions and 30% of a TLS 1.2 resumption's. The "sluice" provider implements
// both algorithms (RFC 8446 section 7.1, RFC 5246 section 5) on OpenSSL's own digests, fetched
// once, with digest contexts kept per thread, and the contexts sluice builds prefer it through
// their property query. Its output is checked against OpenSSL's implementations byte for byte
// (tests/unit/kdf_test.cpp).
#pragma once

namespace sluice::tls {

/**
 * Loads the provider into OpenSSL's default library context, once per process (thread-safe);
 * OpenSSL's default provider stays loaded beside it. Returns false, and leaves OpenSSL's own
 * algorithms in use, when OpenSSL runs in FIPS mode or the provider cannot be loaded.
 */
bool loadKdfProvider();

/**
 * The property query SSL_CTX_new_ex() takes for a context: "?provider=sluice" when `builtin`
 * (global.tls_kdf = "sluice") and the provider is loaded (by the first such call), else nullptr
 * (OpenSSL's own). A preference, not a requirement: every other algorithm still comes from
 * OpenSSL.
 */
const char *contextProperties(bool builtin);

/** Who derives the keys of a context made with contextProperties(builtin): "sluice" or "openssl".
 */
const char *kdfName(bool builtin);

} // namespace sluice::tls
