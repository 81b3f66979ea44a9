// tls/certificates: every certificate of a listener, parsed once and kept as (leaf, chain, key)
// triples, plus the SNI table that maps host names to a set of them. One SSL_CTX per listener
// holds the default set; the client-hello callback switches a connection to another set with
// SSL_use_cert_and_key, so thousands of names cost one parsed certificate each and no SSL_CTX.
// A set holds at most one certificate per key type (for example ECDSA and RSA for one name), and
// OpenSSL picks among them by the client's signature algorithms and cipher suites.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <sluice/config.hpp>

#include "tls/names.hpp"

struct x509_st;
struct evp_pkey_st;
struct stack_st_X509;
struct ssl_st;
struct ssl_ctx_st;

namespace sluice::tls {

/** One loaded certificate. The store owns the references. */
struct LoadedCertificate {
    x509_st *leaf = nullptr;
    stack_st_X509 *chain = nullptr; ///< intermediates (may be empty), shared where identical
    evp_pkey_st *key = nullptr;
    int keyType = 0; ///< EVP_PKEY_get_base_id(key)
    std::string certFile;
    std::string ocspFile;   ///< empty: no staple
    bool ocspFetch = false; ///< fetch the staple from the responder (ocsp = "auto")
    std::shared_ptr<const ClientAuth> clientAuth; ///< overrides the listener's; null: none
    std::vector<std::string> names;               ///< DNS SANs (or the CN without SANs), as written
};

/** The certificates of one listener and the name -> set table. */
class CertificateStore {
public:
    CertificateStore() = default;
    ~CertificateStore();
    CertificateStore(const CertificateStore &) = delete;
    CertificateStore &operator=(const CertificateStore &) = delete;

    /** Loads `files` (key checked against certificate). Throws TlsError naming the file. */
    void load(const CertificateFiles &files);

    /**
     * Loads every certificate in `dir`, in name order: NAME.crt with NAME.key (and NAME.ocsp
     * if present), NAME.pem holding chain and key, or a folder holding fullchain.pem and
     * privkey.pem (a Let's Encrypt live/ tree; ocsp.der if present). Throws TlsError.
     */
    void loadDirectory(const std::string &dir);

    /** Builds the name table; the first certificate's set is the default. Call once, last. */
    void index();

    /** The set serving `hostName`, or nullptr (unknown name). */
    const std::vector<std::size_t> *find(std::string_view hostName) const;

    /** The default set (for no SNI or an unknown name). */
    const std::vector<std::size_t> &defaultSet() const { return sets_.at(defaultSet_); }

    /** Puts the certificates of `set` on the context (the defaults). Throws TlsError. */
    void install(ssl_ctx_st *ctx, const std::vector<std::size_t> &set) const;

    /** Replaces the connection's certificates with `set`; false on failure (OpenSSL error). */
    bool install(ssl_st *ssl, const std::vector<std::size_t> &set) const;

    const std::vector<LoadedCertificate> &certificates() const { return certificates_; }
    std::size_t nameCount() const { return names_.size(); }

private:
    stack_st_X509 *shareChain(stack_st_X509 *chain);

    std::vector<LoadedCertificate> certificates_;
    std::vector<std::vector<std::size_t>> sets_; // indices into certificates_
    NameTable names_;                            // host name -> index into sets_
    std::size_t defaultSet_ = 0;
    std::unordered_map<std::string, x509_st *> intermediates_; // DER -> the one parsed copy
};

} // namespace sluice::tls
