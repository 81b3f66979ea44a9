#include "tls/client_auth.hpp"

#include <memory>

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "tls/context.hpp"
#include "tls/errors.hpp"
#include "tls/names.hpp"

namespace sluice::tls {
namespace {

std::string asn1Text(const ASN1_STRING *value) {
    if (value == nullptr) {
        return {};
    }
    return std::string(reinterpret_cast<const char *>(ASN1_STRING_get0_data(value)),
                       static_cast<std::size_t>(ASN1_STRING_length(value)));
}

/** Printable form of a name for logs: quotes and control bytes would break the log line. */
std::string printable(std::string text) {
    for (char &c : text) {
        if (static_cast<unsigned char>(c) < 0x20 || c == '"' || c == 0x7f) {
            c = '?';
        }
    }
    return text;
}

std::string subjectText(X509 *cert) {
    std::unique_ptr<BIO, decltype(&BIO_free)> bio(BIO_new(BIO_s_mem()), BIO_free);
    if (!bio ||
        X509_NAME_print_ex(bio.get(), X509_get_subject_name(cert), 0, XN_FLAG_RFC2253) < 0) {
        return {};
    }
    char *data = nullptr;
    const long n = BIO_get_mem_data(bio.get(), &data);
    return n > 0 ? std::string(data, static_cast<std::size_t>(n)) : std::string();
}

std::string describe(const PeerNames &names) {
    std::string out = "subject \"" + printable(names.subject) + "\"";
    for (const auto &dns : names.dns) {
        out += " dns " + printable(dns);
    }
    for (const auto &uri : names.uri) {
        out += " uri " + printable(uri);
    }
    out += " spki_sha256 " + names.spkiSha256;
    return out;
}

/** The SSL ex_data slot holding a connection's per-name `const ClientAuth *`, if any. */
int connectionAuthIndex() {
    static const int index = SSL_get_ex_new_index(0, nullptr, nullptr, nullptr, nullptr);
    return index;
}

/** The verify callback: says why a chain failed, and applies the allow lists to the leaf. */
int verifyCallback(int ok, X509_STORE_CTX *store) {
    auto *ssl =
        static_cast<SSL *>(X509_STORE_CTX_get_ex_data(store, SSL_get_ex_data_X509_STORE_CTX_idx()));
    X509 *cert = X509_STORE_CTX_get_current_cert(store);
    const int depth = X509_STORE_CTX_get_error_depth(store);
    if (ok == 0) {
        const int error = X509_STORE_CTX_get_error(store);
        // The engine's error reason is built from the queue: this entry is the log's "why".
        ERR_raise_data(ERR_LIB_SSL, SSL_R_CERTIFICATE_VERIFY_FAILED,
                       "client certificate \"%s\" (depth %d): %s",
                       cert != nullptr ? printable(subjectText(cert)).c_str() : "?", depth,
                       X509_verify_cert_error_string(error));
        return 0;
    }
    if (depth != 0 || ssl == nullptr || cert == nullptr) {
        return 1;
    }
    // A per-name policy on the connection wins over the listener's.
    const auto *auth = static_cast<const ClientAuth *>(SSL_get_ex_data(ssl, connectionAuthIndex()));
    if (auth == nullptr) {
        auth = static_cast<const ClientAuth *>(
            SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), clientAuthIndex()));
    }
    if (auth == nullptr || !hasAllowLists(*auth)) {
        return 1;
    }
    std::string matched;
    if (allowedByLists(*auth, peerNames(cert), matched)) {
        return 1;
    }
    X509_STORE_CTX_set_error(store, X509_V_ERR_CERT_REJECTED);
    ERR_raise_data(ERR_LIB_SSL, SSL_R_CERTIFICATE_VERIFY_FAILED,
                   "client certificate not in the allow lists: %s", matched.c_str());
    return 0;
}

template <typename T, void (*Free)(T *)>
struct Deleter {
    void operator()(T *p) const { Free(p); }
};

} // namespace

int clientAuthIndex() {
    static const int index = SSL_CTX_get_ex_new_index(0, nullptr, nullptr, nullptr, nullptr);
    return index;
}

PeerNames peerNames(X509 *cert) {
    PeerNames names;
    names.subject = subjectText(cert);
    X509_NAME *subject = X509_get_subject_name(cert);
    int last = -1;
    for (int i = X509_NAME_get_index_by_NID(subject, NID_commonName, -1); i >= 0;
         i = X509_NAME_get_index_by_NID(subject, NID_commonName, i)) {
        last = i;
    }
    if (last >= 0) {
        names.cn = asn1Text(X509_NAME_ENTRY_get_data(X509_NAME_get_entry(subject, last)));
    }
    auto *sans = static_cast<GENERAL_NAMES *>(
        X509_get_ext_d2i(cert, NID_subject_alt_name, nullptr, nullptr));
    if (sans != nullptr) {
        for (int i = 0; i < sk_GENERAL_NAME_num(sans); ++i) {
            const GENERAL_NAME *name = sk_GENERAL_NAME_value(sans, i);
            if (name->type == GEN_DNS) {
                names.dns.push_back(asn1Text(name->d.dNSName));
            } else if (name->type == GEN_URI) {
                names.uri.push_back(asn1Text(name->d.uniformResourceIdentifier));
            }
        }
        GENERAL_NAMES_free(sans);
    }
    unsigned char *der = nullptr;
    const int length = i2d_PUBKEY(X509_get0_pubkey(cert), &der);
    if (length > 0) {
        unsigned char digest[EVP_MAX_MD_SIZE];
        unsigned int digestLength = 0;
        if (EVP_Digest(der, static_cast<std::size_t>(length), digest, &digestLength, EVP_sha256(),
                       nullptr) == 1) {
            static const char hex[] = "0123456789abcdef";
            for (unsigned int i = 0; i < digestLength; ++i) {
                names.spkiSha256 += hex[digest[i] >> 4];
                names.spkiSha256 += hex[digest[i] & 15];
            }
        }
        OPENSSL_free(der);
    }
    ERR_clear_error();
    return names;
}

std::string identityOf(const PeerNames &names) {
    if (!names.uri.empty()) {
        return names.uri.front();
    }
    if (!names.dns.empty()) {
        return names.dns.front();
    }
    return names.cn;
}

bool hasAllowLists(const ClientAuth &auth) {
    return !auth.allowCn.empty() || !auth.allowDns.empty() || !auth.allowUri.empty() ||
           !auth.allowSpkiSha256.empty();
}

bool allowedByLists(const ClientAuth &auth, const PeerNames &names, std::string &matched) {
    if (!hasAllowLists(auth)) {
        matched = "no allow list";
        return true;
    }
    for (const auto &pin : auth.allowSpkiSha256) {
        if (pin == names.spkiSha256) {
            matched = "spki_sha256 " + pin;
            return true;
        }
    }
    for (const auto &pattern : auth.allowUri) {
        for (const auto &uri : names.uri) {
            if (matchGlob(pattern, uri)) {
                matched = "uri " + pattern;
                return true;
            }
        }
    }
    for (const auto &pattern : auth.allowDns) {
        for (const auto &dns : names.dns) {
            if (matchDnsName(pattern, dns)) {
                matched = "dns " + pattern;
                return true;
            }
        }
    }
    if (!names.cn.empty()) {
        for (const auto &pattern : auth.allowCn) {
            if (matchGlob(pattern, names.cn)) {
                matched = "cn " + pattern;
                return true;
            }
        }
    }
    matched = describe(names);
    return false;
}

namespace {

/** Adds the CRLs of `auth` to `store` and turns CRL checking on. Throws. */
void loadCrls(X509_STORE *store, const ClientAuth &auth);

/** Loads the CA bundle and CRLs of `auth` into `store`; returns the CA names. Throws. */
STACK_OF(X509_NAME) * loadTrust(X509_STORE *store, const ClientAuth &auth) {
    ERR_clear_error();
    if (X509_STORE_load_file(store, auth.ca.c_str()) != 1) {
        throw TlsError("client_auth.ca " + auth.ca + ": cannot load: " + drainErrors().reason);
    }
    // The CA names go into the CertificateRequest so clients with several certificates pick the
    // right one.
    STACK_OF(X509_NAME) *names = SSL_load_client_CA_file(auth.ca.c_str());
    if (names == nullptr) {
        throw TlsError("client_auth.ca " + auth.ca +
                       ": no CA certificate in it: " + drainErrors().reason);
    }
    try {
        loadCrls(store, auth);
    } catch (...) {
        sk_X509_NAME_pop_free(names, X509_NAME_free);
        throw;
    }
    return names;
}

int verifyMode(const ClientAuth &auth) {
    switch (auth.mode) {
    case ClientAuthMode::none:
        return SSL_VERIFY_NONE;
    case ClientAuthMode::optional:
        return SSL_VERIFY_PEER;
    case ClientAuthMode::required:
        return SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT;
    }
    return SSL_VERIFY_NONE;
}

} // namespace

void applyClientAuth(SSL_CTX *ctx, const ClientAuth &auth) {
    if (auth.mode == ClientAuthMode::none) {
        return;
    }
    SSL_CTX_set_client_CA_list(ctx, loadTrust(SSL_CTX_get_cert_store(ctx), auth));
    SSL_CTX_set_verify_depth(ctx, auth.verifyDepth);
    SSL_CTX_set_verify(ctx, verifyMode(auth), verifyCallback);
}

ConnectionClientAuth::ConnectionClientAuth(const ClientAuth &auth,
                                           const std::string &sessionContext)
    : auth_(auth) {
    unsigned int length = 0;
    EVP_Digest(sessionContext.data(), sessionContext.size(), sessionContext_, &length, EVP_sha256(),
               nullptr);
    if (auth_.mode == ClientAuthMode::none) {
        return;
    }
    store_ = X509_STORE_new();
    if (store_ == nullptr) {
        throw TlsError("client_auth: cannot create a trust store: " + drainErrors().reason);
    }
    try {
        caNames_ = loadTrust(store_, auth_);
    } catch (...) {
        X509_STORE_free(store_);
        throw;
    }
}

ConnectionClientAuth::~ConnectionClientAuth() {
    X509_STORE_free(store_);
    sk_X509_NAME_pop_free(caNames_, X509_NAME_free);
}

bool ConnectionClientAuth::apply(SSL *ssl) const {
    // Without its own session-ID context, a TLS 1.3 ticket from a name without client
    // certificates would resume under this policy and skip it (test_client_auth_per_sni_name).
    if (SSL_set_session_id_context(ssl, sessionContext_, sizeof sessionContext_) != 1 ||
        SSL_set_ex_data(ssl, connectionAuthIndex(), const_cast<ClientAuth *>(&auth_)) != 1) {
        return false;
    }
    if (auth_.mode == ClientAuthMode::none) {
        SSL_set_verify(ssl, SSL_VERIFY_NONE, nullptr);
        SSL_set_client_CA_list(ssl, sk_X509_NAME_new_null());
        return true;
    }
    STACK_OF(X509_NAME) *names = SSL_dup_CA_list(caNames_);
    if (names == nullptr || SSL_set1_verify_cert_store(ssl, store_) != 1) {
        sk_X509_NAME_pop_free(names, X509_NAME_free);
        return false;
    }
    SSL_set_client_CA_list(ssl, names); // the connection owns the copy
    SSL_set_verify_depth(ssl, auth_.verifyDepth);
    SSL_set_verify(ssl, verifyMode(auth_), verifyCallback);
    return true;
}

namespace {

void loadCrls(X509_STORE *store, const ClientAuth &auth) {
    for (const auto &file : auth.crl) {
        std::unique_ptr<BIO, Deleter<BIO, BIO_free_all>> bio(BIO_new_file(file.c_str(), "r"));
        if (!bio) {
            throw TlsError("client_auth.crl " + file + ": cannot read: " + drainErrors().reason);
        }
        int count = 0;
        while (X509_CRL *crl = PEM_read_bio_X509_CRL(bio.get(), nullptr, nullptr, nullptr)) {
            const int added = X509_STORE_add_crl(store, crl);
            X509_CRL_free(crl);
            if (added != 1) {
                throw TlsError("client_auth.crl " + file + ": " + drainErrors().reason);
            }
            ++count;
        }
        ERR_clear_error(); // the end of the file reads as "no start line"
        if (count == 0) {
            throw TlsError("client_auth.crl " + file + ": no PEM CRL in it");
        }
    }
    if (!auth.crl.empty()) {
        // The leaf is checked; intermediates would need a CRL each (X509_V_FLAG_CRL_CHECK_ALL).
        X509_STORE_set_flags(store, X509_V_FLAG_CRL_CHECK);
    }
}

} // namespace

} // namespace sluice::tls
