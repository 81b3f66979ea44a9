#include "tls/certificates.hpp"

#include <algorithm>
#include <filesystem>
#include <map>
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
#include "util/log.hpp"

namespace sluice::tls {
namespace {

struct BioFree {
    void operator()(BIO *bio) const { BIO_free_all(bio); }
};

[[noreturn]] void raise(const std::string &what) {
    auto queued = drainErrors();
    throw TlsError(queued.reason.empty() ? what : what + ": " + queued.reason);
}

std::string asn1Text(const ASN1_STRING *value) {
    return std::string(reinterpret_cast<const char *>(ASN1_STRING_get0_data(value)),
                       static_cast<std::size_t>(ASN1_STRING_length(value)));
}

/** DNS SANs, or the subject CN when the certificate has none (old practice, still seen). */
std::vector<std::string> hostNames(X509 *cert) {
    std::vector<std::string> names;
    auto *sans = static_cast<GENERAL_NAMES *>(
        X509_get_ext_d2i(cert, NID_subject_alt_name, nullptr, nullptr));
    if (sans != nullptr) {
        for (int i = 0; i < sk_GENERAL_NAME_num(sans); ++i) {
            const GENERAL_NAME *name = sk_GENERAL_NAME_value(sans, i);
            if (name->type == GEN_DNS) {
                names.push_back(asn1Text(name->d.dNSName));
            }
        }
        GENERAL_NAMES_free(sans);
    }
    if (names.empty()) {
        X509_NAME *subject = X509_get_subject_name(cert);
        const int at = X509_NAME_get_index_by_NID(subject, NID_commonName, -1);
        if (at >= 0) {
            names.push_back(asn1Text(X509_NAME_ENTRY_get_data(X509_NAME_get_entry(subject, at))));
        }
    }
    ERR_clear_error();
    return names;
}

void warnValidity(X509 *cert, const std::string &path) {
    if (X509_cmp_current_time(X509_get0_notAfter(cert)) < 0) {
        log::warn("certificate-expired file=" + path);
    } else if (X509_cmp_current_time(X509_get0_notBefore(cert)) > 0) {
        log::warn("certificate-not-yet-valid file=" + path);
    }
}

std::string der(X509 *cert) {
    unsigned char *out = nullptr;
    const int n = i2d_X509(cert, &out);
    std::string bytes =
        n > 0 ? std::string(reinterpret_cast<char *>(out), static_cast<std::size_t>(n))
              : std::string();
    OPENSSL_free(out);
    return bytes;
}

} // namespace

CertificateStore::~CertificateStore() {
    for (auto &c : certificates_) {
        X509_free(c.leaf);
        sk_X509_pop_free(c.chain, X509_free);
        EVP_PKEY_free(c.key);
    }
    for (auto &[bytes, cert] : intermediates_) {
        X509_free(cert);
    }
}

STACK_OF(X509) * CertificateStore::shareChain(STACK_OF(X509) * chain) {
    // Thousands of certificates usually share two or three intermediates: keep one parsed copy.
    for (int i = 0; i < sk_X509_num(chain); ++i) {
        X509 *cert = sk_X509_value(chain, i);
        auto [it, added] = intermediates_.emplace(der(cert), cert);
        if (added) {
            X509_up_ref(cert);
        } else {
            X509_up_ref(it->second);
            X509_free(cert);
            sk_X509_set(chain, i, it->second);
        }
    }
    return chain;
}

void CertificateStore::load(const CertificateFiles &files) {
    ERR_clear_error();
    std::unique_ptr<BIO, BioFree> bio(BIO_new_file(files.cert.c_str(), "r"));
    if (!bio) {
        raise("certificate " + files.cert + ": cannot load");
    }
    LoadedCertificate loaded;
    loaded.certFile = files.cert;
    loaded.ocspFile = files.ocsp;
    loaded.ocspFetch = files.ocspFetch;
    loaded.clientAuth = files.clientAuth;
    loaded.leaf = PEM_read_bio_X509_AUX(bio.get(), nullptr, nullptr, nullptr);
    if (loaded.leaf == nullptr) {
        raise("certificate " + files.cert + ": cannot load");
    }
    // From here `guard` frees what was parsed if anything below throws.
    struct Guard {
        LoadedCertificate *c;
        ~Guard() {
            if (c != nullptr) {
                X509_free(c->leaf);
                sk_X509_pop_free(c->chain, X509_free);
                EVP_PKEY_free(c->key);
            }
        }
    } guard{&loaded};
    loaded.chain = sk_X509_new_null();
    while (X509 *next = PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr)) {
        sk_X509_push(loaded.chain, next);
    }
    ERR_clear_error(); // the end of the file reads as "no start line"
    std::unique_ptr<BIO, BioFree> keyBio(BIO_new_file(files.key.c_str(), "r"));
    if (!keyBio) {
        raise("key " + files.key + ": cannot load");
    }
    loaded.key = PEM_read_bio_PrivateKey(keyBio.get(), nullptr, nullptr, nullptr);
    if (loaded.key == nullptr) {
        raise("key " + files.key + ": cannot load");
    }
    if (X509_check_private_key(loaded.leaf, loaded.key) != 1) {
        drainErrors();
        throw TlsError("key " + files.key + " does not match certificate " + files.cert);
    }
    loaded.keyType = EVP_PKEY_get_base_id(loaded.key);
    loaded.names = hostNames(loaded.leaf);
    warnValidity(loaded.leaf, files.cert);
    shareChain(loaded.chain);
    guard.c = nullptr;
    certificates_.push_back(std::move(loaded));
}

void CertificateStore::loadDirectory(const std::string &dir) {
    namespace fs = std::filesystem;
    std::error_code error;
    std::vector<fs::path> entries;
    for (fs::directory_iterator it(dir, error), end; !error && it != end; it.increment(error)) {
        entries.push_back(it->path());
    }
    if (error) {
        throw TlsError("certificates_dir " + dir + ": cannot read: " + error.message());
    }
    std::sort(entries.begin(), entries.end());
    const std::size_t before = certificates_.size();
    for (const fs::path &entry : entries) {
        CertificateFiles files;
        const auto sibling = [&](const char *extension) {
            fs::path other = entry;
            other.replace_extension(extension);
            return other;
        };
        if (fs::is_directory(entry, error)) {
            if (!fs::exists(entry / "fullchain.pem", error)) {
                continue;
            }
            files.cert = (entry / "fullchain.pem").string();
            files.key = (entry / "privkey.pem").string();
            if (fs::exists(entry / "ocsp.der", error)) {
                files.ocsp = (entry / "ocsp.der").string();
            }
        } else if (entry.extension() == ".crt") {
            files.cert = entry.string();
            files.key = sibling(".key").string();
            if (!fs::exists(files.key, error)) {
                throw TlsError("certificates_dir: " + files.cert + " has no " + files.key);
            }
            if (fs::exists(sibling(".ocsp"), error)) {
                files.ocsp = sibling(".ocsp").string();
            }
        } else if (entry.extension() == ".pem") {
            files.cert = files.key = entry.string();
            if (fs::exists(sibling(".ocsp"), error)) {
                files.ocsp = sibling(".ocsp").string();
            }
        } else {
            continue; // keys, staples and anything else are read with their certificate
        }
        load(files);
    }
    if (certificates_.size() == before) {
        throw TlsError("certificates_dir " + dir +
                       ": no certificate in it (NAME.crt + NAME.key, "
                       "NAME.pem, or DIR/fullchain.pem + DIR/privkey.pem)");
    }
}

void CertificateStore::index() {
    // Each name gets one set; a certificate joins the set of each of its names unless the set
    // already has one of its key type (the first configured wins).
    std::map<std::string, std::size_t> setOf;
    for (std::size_t i = 0; i < certificates_.size(); ++i) {
        for (const std::string &name : certificates_[i].names) {
            const std::string canonical = canonicalHostName(name);
            auto [it, added] = setOf.emplace(canonical, sets_.size());
            if (added) {
                sets_.push_back({});
                names_.add(canonical, it->second);
            }
            auto &set = sets_[it->second];
            const bool sameType = std::any_of(set.begin(), set.end(), [&](std::size_t other) {
                return certificates_[other].keyType == certificates_[i].keyType;
            });
            if (!sameType) {
                set.push_back(i);
            } else if (std::find(set.begin(), set.end(), i) == set.end()) {
                log::debug("certificate-shadowed name=" + canonical +
                           " file=" + certificates_[i].certFile);
            }
        }
    }
    if (certificates_.empty()) {
        throw TlsError("no certificate");
    }
    // The default: the set of the first certificate's first name, so an RSA twin of the first
    // certificate also serves clients without SNI; a nameless first certificate stands alone.
    const auto &first = certificates_.front();
    if (!first.names.empty()) {
        // The first certificate is indexed first, so it is always in its own names' sets.
        defaultSet_ = setOf.at(canonicalHostName(first.names.front()));
    } else {
        defaultSet_ = sets_.size();
        sets_.push_back({0});
    }
}

const std::vector<std::size_t> *CertificateStore::find(std::string_view hostName) const {
    const std::size_t *set = names_.find(hostName);
    return set == nullptr ? nullptr : &sets_[*set];
}

void CertificateStore::install(SSL_CTX *ctx, const std::vector<std::size_t> &set) const {
    for (std::size_t i : set) {
        const auto &c = certificates_[i];
        if (SSL_CTX_use_cert_and_key(ctx, c.leaf, c.key, c.chain, 1) != 1) {
            raise("certificate " + c.certFile + ": cannot use");
        }
    }
}

bool CertificateStore::install(SSL *ssl, const std::vector<std::size_t> &set) const {
    SSL_certs_clear(ssl);
    for (std::size_t i : set) {
        const auto &c = certificates_[i];
        if (SSL_use_cert_and_key(ssl, c.leaf, c.key, c.chain, 1) != 1) {
            return false;
        }
    }
    return true;
}

} // namespace sluice::tls
