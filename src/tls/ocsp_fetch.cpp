#include "tls/ocsp_fetch.hpp"

#include <memory>
#include <mutex>

#include <openssl/err.h>
#include <openssl/ocsp.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#if SLUICE_HAVE_LIBCURL
#include <curl/curl.h>
#endif

#include "tls/context.hpp"
#include "tls/errors.hpp"

namespace sluice::tls {
namespace {

#if SLUICE_HAVE_LIBCURL
// A responder on the other side of the world answers in well under a second; these bound a
// responder that is down or stalls, so one certificate cannot hold up the others for long.
constexpr long connectTimeoutMs = 5000;
constexpr long totalTimeoutMs = 10000;
// Real responses are a few kilobytes; anything much larger is not an OCSP response.
constexpr std::size_t maxResponseBytes = 256 * 1024;

struct Body {
    std::vector<unsigned char> bytes;
    bool tooLarge = false;
};

std::size_t onData(char *data, std::size_t size, std::size_t count, void *user) {
    auto *body = static_cast<Body *>(user);
    const std::size_t n = size * count;
    if (body->bytes.size() + n > maxResponseBytes) {
        body->tooLarge = true;
        return 0; // makes curl fail with CURLE_WRITE_ERROR
    }
    body->bytes.insert(body->bytes.end(), data, data + n);
    return n;
}

int onProgress(void *user, curl_off_t, curl_off_t, curl_off_t, curl_off_t) {
    return static_cast<const std::atomic<bool> *>(user)->load() ? 1 : 0;
}

struct EasyFree {
    void operator()(CURL *curl) const { curl_easy_cleanup(curl); }
};
struct ListFree {
    void operator()(curl_slist *list) const { curl_slist_free_all(list); }
};
#endif

struct CertIdFree {
    void operator()(OCSP_CERTID *id) const { OCSP_CERTID_free(id); }
};
struct RequestFree {
    void operator()(OCSP_REQUEST *r) const { OCSP_REQUEST_free(r); }
};

} // namespace

bool ocspFetchAvailable() {
    return SLUICE_HAVE_LIBCURL != 0;
}

std::string ocspResponderUrl(X509 *leaf) {
    STACK_OF(OPENSSL_STRING) *urls = X509_get1_ocsp(leaf);
    std::string found;
    std::string other;
    for (int i = 0; i < sk_OPENSSL_STRING_num(urls); ++i) {
        const std::string url = sk_OPENSSL_STRING_value(urls, i);
        if (url.rfind("http://", 0) == 0) {
            found = url;
            break;
        }
        other = url;
    }
    X509_email_free(urls); // frees a STACK_OF(OPENSSL_STRING) and its strings
    if (found.empty()) {
        throw TlsError(other.empty()
                           ? "ocsp = \"auto\": the certificate names no OCSP responder (no "
                             "authorityInfoAccess OCSP URI)"
                           : "ocsp = \"auto\": the certificate's OCSP responder " + other +
                                 " is not an http:// URL");
    }
    return found;
}

std::vector<unsigned char> makeOcspRequest(X509 *leaf, STACK_OF(X509) * chain) {
    X509 *issuer = nullptr;
    for (int i = 0; chain != nullptr && i < sk_X509_num(chain) && issuer == nullptr; ++i) {
        if (X509_check_issued(sk_X509_value(chain, i), leaf) == X509_V_OK) {
            issuer = sk_X509_value(chain, i);
        }
    }
    if (issuer == nullptr) {
        throw TlsError("ocsp = \"auto\": the certificate's issuer is not in its chain file, and "
                       "an OCSP request names the issuer");
    }
    ERR_clear_error();
    std::unique_ptr<OCSP_CERTID, CertIdFree> id(OCSP_cert_to_id(EVP_sha1(), leaf, issuer));
    std::unique_ptr<OCSP_REQUEST, RequestFree> request(OCSP_REQUEST_new());
    if (!id || !request || OCSP_request_add0_id(request.get(), id.get()) == nullptr) {
        throw TlsError("cannot build an OCSP request: " + drainErrors().reason);
    }
    id.release(); // the request owns it now
    unsigned char *der = nullptr;
    const int length = i2d_OCSP_REQUEST(request.get(), &der);
    if (length <= 0) {
        throw TlsError("cannot encode an OCSP request: " + drainErrors().reason);
    }
    std::vector<unsigned char> out(der, der + length);
    OPENSSL_free(der);
    return out;
}

std::vector<unsigned char> fetchOcspResponse(const std::string &url,
                                             std::span<const unsigned char> request,
                                             const std::atomic<bool> &cancel) {
#if SLUICE_HAVE_LIBCURL
    // curl_global_init is not thread-safe in every libcurl; do it once, before the first handle.
    static std::once_flag initOnce;
    std::call_once(initOnce, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
    std::unique_ptr<CURL, EasyFree> curl(curl_easy_init());
    if (!curl) {
        throw TlsError("cannot create a libcurl handle");
    }
    std::unique_ptr<curl_slist, ListFree> headers(
        curl_slist_append(nullptr, "Content-Type: application/ocsp-request"));
    Body body;
    char error[CURL_ERROR_SIZE] = {};
    CURL *c = curl.get();
    curl_easy_setopt(c, CURLOPT_URL, url.c_str());
#if LIBCURL_VERSION_NUM >= 0x075500
    curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http");
#endif
    // Signals are the daemon's: libcurl must not install handlers or use alarm() for timeouts.
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_POST, 1L);
    curl_easy_setopt(c, CURLOPT_POSTFIELDS, request.data());
    curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE, static_cast<long>(request.size()));
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, headers.get());
    curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS, connectTimeoutMs);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, totalTimeoutMs);
    curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 0L);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, onData);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &body);
    curl_easy_setopt(c, CURLOPT_NOPROGRESS, 0L);
    curl_easy_setopt(c, CURLOPT_XFERINFOFUNCTION, onProgress);
    curl_easy_setopt(c, CURLOPT_XFERINFODATA, const_cast<std::atomic<bool> *>(&cancel));
    curl_easy_setopt(c, CURLOPT_ERRORBUFFER, error);
    const CURLcode result = curl_easy_perform(c);
    if (body.tooLarge) {
        throw TlsError("the response is larger than " + std::to_string(maxResponseBytes) +
                       " bytes");
    }
    if (result != CURLE_OK) {
        throw TlsError(std::string("HTTP request failed: ") +
                       (error[0] != '\0' ? error : curl_easy_strerror(result)));
    }
    long status = 0;
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
    if (status != 200) {
        throw TlsError("the responder answered HTTP " + std::to_string(status));
    }
    if (body.bytes.empty()) {
        throw TlsError("the responder sent an empty body");
    }
    return std::move(body.bytes);
#else
    (void)url;
    (void)request;
    (void)cancel;
    throw TlsError("ocsp = \"auto\" needs sluice built with libcurl");
#endif
}

} // namespace sluice::tls
