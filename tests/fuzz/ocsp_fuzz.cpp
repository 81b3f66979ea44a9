// OCSP responses are untrusted input: fetched over plain HTTP from the responder a certificate
// names, or read from files an operator's cron job writes. The checker is fed them three ways,
// chosen by the first byte: (0) the bytes as the DER response; (1) a response that passes every
// check, with (offset, byte) patches and a cut applied; (2) a response built and signed here from
// fields the input chooses (status, signer, cert-ID hash, other single responses, the raw
// thisUpdate and nextUpdate strings, the clock), so the checks after the signature see arbitrary
// values too. Every input must end in a Staple or a TlsError, and a Staple must satisfy what the
// checker promises. Keys are Ed25519 from fixed bytes, so every signature, and every input's
// outcome, is the same from run to run.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <span>
#include <string>
#include <vector>

#include <openssl/evp.h>
#include <openssl/ocsp.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "fuzz_target.hpp"
#include "tls/context.hpp"
#include "tls/ocsp.hpp"

namespace sluice::fuzz {

namespace {

void require(bool condition) {
    if (!condition) {
        std::abort();
    }
}

EVP_PKEY *fixedKey(unsigned char fill) {
    unsigned char raw[32];
    std::memset(raw, fill, sizeof raw);
    EVP_PKEY *key = EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, nullptr, raw, sizeof raw);
    require(key != nullptr);
    return key;
}

/** A certificate for `name` with `key`'s public half, signed by `issuerKey` as `issuer`. */
X509 *certificate(const char *name, EVP_PKEY *key, X509 *issuer, EVP_PKEY *issuerKey, long serial,
                  const char *extendedUsage, bool ca) {
    X509 *cert = X509_new();
    require(cert != nullptr);
    X509_set_version(cert, 2);
    ASN1_INTEGER_set(X509_get_serialNumber(cert), serial);
    X509_NAME *subject = X509_get_subject_name(cert);
    X509_NAME_add_entry_by_txt(subject, "CN", MBSTRING_ASC,
                               reinterpret_cast<const unsigned char *>(name), -1, -1, 0);
    X509_set_issuer_name(cert, issuer != nullptr ? X509_get_subject_name(issuer) : subject);
    ASN1_TIME_set_string(X509_getm_notBefore(cert), "20200101000000Z");
    ASN1_TIME_set_string(X509_getm_notAfter(cert), "20991231235959Z");
    X509_set_pubkey(cert, key);
    X509V3_CTX ctx;
    X509V3_set_ctx(&ctx, issuer != nullptr ? issuer : cert, cert, nullptr, nullptr, 0);
    auto add = [&](int nid, const char *value) {
        X509_EXTENSION *ext = X509V3_EXT_conf_nid(nullptr, &ctx, nid, value);
        require(ext != nullptr);
        X509_add_ext(cert, ext, -1);
        X509_EXTENSION_free(ext);
    };
    add(NID_basic_constraints, ca ? "critical,CA:TRUE" : "critical,CA:FALSE");
    add(NID_subject_key_identifier, "hash");
    if (extendedUsage != nullptr) {
        add(NID_ext_key_usage, extendedUsage);
    }
    require(X509_sign(cert, issuerKey, nullptr) > 0);
    return cert;
}

struct Fixture {
    EVP_PKEY *caKey = fixedKey(1);
    EVP_PKEY *leafKey = fixedKey(2);
    EVP_PKEY *responderKey = fixedKey(3);
    EVP_PKEY *strangerKey = fixedKey(4);
    X509 *ca = certificate("fuzz CA", caKey, nullptr, caKey, 1, nullptr, true);
    X509 *leaf = certificate("leaf.example", leafKey, ca, caKey, 1000, "serverAuth", false);
    X509 *responder = certificate("responder", responderKey, ca, caKey, 1001, "OCSPSigning", false);
    X509 *notResponder =
        certificate("not a responder", responderKey, ca, caKey, 1002, "serverAuth", false);
    X509 *stranger = certificate("stranger", strangerKey, nullptr, strangerKey, 7, nullptr, true);
    STACK_OF(X509) *chain = sk_X509_new_null();
    std::vector<unsigned char> valid;  // passes every check at validNow
    std::time_t validNow = 1893456000; // 2030-01-01

    Fixture() {
        sk_X509_push(chain, ca);
        valid = build(V_OCSP_CERTSTATUS_GOOD, 0, 0, 0, "20260101000000Z", "20360101000000Z", true,
                      OCSP_RESPONSE_STATUS_SUCCESSFUL, false);
        // The fixture itself must be right, or the fuzzer explores nothing behind the checks.
        const tls::Staple staple =
            tls::checkOcspResponse(valid, leaf, chain, validNow); // throws if not
        require(!staple.revoked && staple.nextUpdate > validNow);
    }

    /**
     * A response about the leaf (or, with `aboutOther`, about a certificate of another serial)
     * with this status, signed by signer 0 (the CA), 1 (a delegated responder), 2 (a CA-issued
     * certificate without OCSPSigning) or 3 (an unrelated self-signed key), the cert ID hashed
     * with SHA-1 (0), SHA-256 (1) or SHA-384 (2), `others` more single responses about other
     * serials first, and the times as raw strings (not checked here: any bytes at all).
     */
    std::vector<unsigned char> build(int status, int signer, int hash, int others,
                                     const std::string &thisText, const std::string &nextText,
                                     bool withNext, int responseStatus, bool aboutOther) const {
        const EVP_MD *md = hash == 0 ? EVP_sha1() : hash == 1 ? EVP_sha256() : EVP_sha384();
        OCSP_BASICRESP *basic = OCSP_BASICRESP_new();
        require(basic != nullptr);
        // Added with well-formed times (OpenSSL converts them on the way in), then given the
        // raw strings, which the encoder writes as they are.
        ASN1_GENERALIZEDTIME *placeholder = ASN1_GENERALIZEDTIME_new();
        require(ASN1_GENERALIZEDTIME_set_string(placeholder, "20260101000000Z") == 1);
        for (int i = 0; i <= others; ++i) {
            X509 *subject = leaf;
            X509 *other = nullptr;
            if (i < others || aboutOther) {
                other = X509_dup(leaf);
                ASN1_INTEGER_set(X509_get_serialNumber(other), 2000 + i);
                subject = other;
            }
            OCSP_CERTID *id = OCSP_cert_to_id(md, subject, ca);
            require(id != nullptr);
            OCSP_SINGLERESP *single =
                OCSP_basic_add1_status(basic, id, status, OCSP_REVOKED_STATUS_KEYCOMPROMISE,
                                       status == V_OCSP_CERTSTATUS_REVOKED ? placeholder : nullptr,
                                       placeholder, withNext ? placeholder : nullptr);
            require(single != nullptr);
            int reason = 0;
            ASN1_GENERALIZEDTIME *revokedAt = nullptr;
            ASN1_GENERALIZEDTIME *thisUpdate = nullptr;
            ASN1_GENERALIZEDTIME *nextUpdate = nullptr;
            OCSP_single_get0_status(single, &reason, &revokedAt, &thisUpdate, &nextUpdate);
            ASN1_STRING_set(thisUpdate, thisText.data(), static_cast<int>(thisText.size()));
            if (nextUpdate != nullptr) {
                ASN1_STRING_set(nextUpdate, nextText.data(), static_cast<int>(nextText.size()));
            }
            OCSP_CERTID_free(id);
            X509_free(other);
        }
        ASN1_GENERALIZEDTIME_free(placeholder);
        X509 *signerCert = signer == 0   ? ca
                           : signer == 1 ? responder
                           : signer == 2 ? notResponder
                                         : stranger;
        EVP_PKEY *signerKey = signer == 0 ? caKey : signer == 3 ? strangerKey : responderKey;
        // Ed25519 takes no separate digest: sign through a context made for it.
        EVP_MD_CTX *sign = EVP_MD_CTX_new();
        require(EVP_DigestSignInit(sign, nullptr, nullptr, nullptr, signerKey) == 1);
        require(OCSP_basic_sign_ctx(basic, signerCert, sign, nullptr, 0) == 1);
        EVP_MD_CTX_free(sign);
        OCSP_RESPONSE *response = OCSP_response_create(responseStatus, basic);
        require(response != nullptr);
        unsigned char *der = nullptr;
        const int length = i2d_OCSP_RESPONSE(response, &der);
        require(length > 0);
        std::vector<unsigned char> out(der, der + length);
        OPENSSL_free(der);
        OCSP_RESPONSE_free(response);
        OCSP_BASICRESP_free(basic);
        return out;
    }
};

const Fixture &fixture() {
    static const Fixture instance;
    return instance;
}

/** Reads the input front to back; past its end every read gives zeros. */
struct Reader {
    const std::uint8_t *data;
    std::size_t size;
    std::size_t at = 0;

    std::uint8_t byte() { return at < size ? data[at++] : 0; }
    std::string text(std::size_t most) {
        const std::size_t n = std::min<std::size_t>(byte() % (most + 1), size - std::min(at, size));
        std::string out(reinterpret_cast<const char *>(data + at), n);
        at += n;
        return out;
    }
    std::time_t time() {
        std::int64_t value = 0;
        for (int i = 0; i < 5; ++i) {
            value = (value << 8) | byte(); // 40 bits: years 1970 to about 36812
        }
        return static_cast<std::time_t>(value);
    }
};

void check(std::span<const unsigned char> der, std::time_t now) {
    const Fixture &f = fixture();
    try {
        const tls::Staple staple = tls::checkOcspResponse(der, f.leaf, f.chain, now);
        // What a caller relies on: only a current response is stapled, and exactly its bytes.
        require(staple.nextUpdate > now);
        require(staple.der.size() == der.size() &&
                std::equal(staple.der.begin(), staple.der.end(), der.begin()));
        // And what the stapled bytes are: one whole DER response, nothing after it.
        const unsigned char *p = staple.der.data();
        OCSP_RESPONSE *parsed =
            d2i_OCSP_RESPONSE(nullptr, &p, static_cast<long>(staple.der.size()));
        require(parsed != nullptr && p == staple.der.data() + staple.der.size());
        OCSP_RESPONSE_free(parsed);
    } catch (const tls::TlsError &e) {
        require(e.what()[0] != '\0'); // refused, with a reason
    }
}

} // namespace

SLUICE_FUZZ_TARGET(ocspResponse) {
    const Fixture &f = fixture();
    Reader in{data, size};
    const std::uint8_t mode = in.byte();
    switch (mode % 3) {
    case 0: {
        const std::time_t now = (mode & 0x80) != 0 ? in.time() : f.validNow;
        check({data + in.at, size - std::min(in.at, size)}, now);
        break;
    }
    case 1: {
        std::vector<unsigned char> der = f.valid;
        // 0: whole; 1..127: cut to that many 128ths; 128 + n: n bytes (up to 63) appended.
        const std::uint8_t cut = in.byte();
        while (in.at + 3 <= size) {
            const std::size_t offset = (in.byte() | (in.byte() << 8)) % der.size();
            der[offset] = in.byte();
        }
        if ((cut & 0x80) != 0) {
            der.insert(der.end(), cut & 0x3f, 0x30);
        } else if (cut != 0) {
            der.resize(der.size() * cut / 128);
        }
        check(der, f.validNow);
        break;
    }
    default: {
        const std::uint8_t shape = in.byte();
        const int status = (shape & 3) % 3; // good, revoked, unknown
        const int signer = (shape >> 2) % 4;
        const int hash = (shape >> 4) % 3;
        const bool withNext = (shape & 0x40) == 0;
        const bool aboutOther = (shape & 0x80) != 0;
        const std::uint8_t more = in.byte();
        const int others = more % 4;
        const int responseStatus = (more & 0x10) != 0 ? (more >> 5) : 0;
        const std::string thisText = in.text(24);
        const std::string nextText = in.text(24);
        const std::time_t now = in.time();
        const std::vector<unsigned char> der = f.build(
            status, signer, hash, others, thisText, nextText, withNext, responseStatus, aboutOther);
        check(der, now);
        break;
    }
    }
    return 0;
}

} // namespace sluice::fuzz
