#include "tls/ocsp.hpp"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <sys/stat.h>

#include <openssl/err.h>
#include <openssl/ocsp.h>
#include <openssl/x509.h>

#include "tls/context.hpp"
#include "tls/errors.hpp"
#include "tls/ocsp_fetch.hpp"
#include "util/log.hpp"

namespace sluice::tls {
namespace {

// How often the watcher looks at the files; a stat(2) each, so cheap.
constexpr auto pollInterval = std::chrono::seconds(1);
// Clock skew tolerated between us and the responder for thisUpdate.
constexpr long skewSeconds = 300;
// After a failed fetch: the first retry, and the longest wait between retries.
constexpr std::chrono::seconds firstRetry(1);
constexpr std::chrono::seconds longestRetry(300);

std::time_t toTime(const ASN1_GENERALIZEDTIME *time) {
    struct tm tm {};
    if (time == nullptr || ASN1_TIME_to_tm(time, &tm) != 1) {
        return 0;
    }
    return timegm(&tm);
}

struct ResponseFree {
    void operator()(OCSP_RESPONSE *r) const { OCSP_RESPONSE_free(r); }
};
struct BasicFree {
    void operator()(OCSP_BASICRESP *r) const { OCSP_BASICRESP_free(r); }
};
struct StoreFree {
    void operator()(X509_STORE *s) const { X509_STORE_free(s); }
};
struct StackFree {
    void operator()(STACK_OF(X509) * s) const { sk_X509_free(s); }
};
struct CertIdFree {
    void operator()(OCSP_CERTID *id) const { OCSP_CERTID_free(id); }
};

X509 *findIssuer(X509 *leaf, STACK_OF(X509) * candidates) {
    for (int i = 0; i < sk_X509_num(candidates); ++i) {
        X509 *candidate = sk_X509_value(candidates, i);
        if (X509_check_issued(candidate, leaf) == X509_V_OK) {
            return candidate;
        }
    }
    return nullptr;
}

std::string readFile(const std::string &path) {
    std::FILE *file = std::fopen(path.c_str(), "rb");
    if (file == nullptr) {
        throw TlsError("cannot read: " + std::string(std::strerror(errno)));
    }
    std::string bytes;
    char chunk[8192];
    std::size_t n = 0;
    while ((n = std::fread(chunk, 1, sizeof chunk, file)) > 0) {
        bytes.append(chunk, n);
    }
    std::fclose(file);
    return bytes;
}

std::string timeText(std::time_t t) {
    char text[32];
    struct tm tm {};
    gmtime_r(&t, &tm);
    std::strftime(text, sizeof text, "%Y-%m-%dT%H:%M:%SZ", &tm);
    return text;
}

} // namespace

Staple checkOcspResponse(std::span<const unsigned char> der, X509 *leaf, STACK_OF(X509) * chain,
                         std::time_t now) {
    ERR_clear_error();
    const unsigned char *p = der.data();
    std::unique_ptr<OCSP_RESPONSE, ResponseFree> response(
        d2i_OCSP_RESPONSE(nullptr, &p, static_cast<long>(der.size())));
    if (!response) {
        drainErrors();
        throw TlsError("not a DER OCSP response");
    }
    // The bytes are stapled as they are: anything after the response would reach every client.
    if (const auto used = static_cast<std::size_t>(p - der.data()); used != der.size()) {
        const std::size_t extra = der.size() - used;
        throw TlsError(std::to_string(extra) + (extra == 1 ? " byte" : " bytes") +
                       " after the end of the DER OCSP response");
    }
    const int status = OCSP_response_status(response.get());
    if (status != OCSP_RESPONSE_STATUS_SUCCESSFUL) {
        throw TlsError(std::string("the responder answered \"") + OCSP_response_status_str(status) +
                       "\"");
    }
    std::unique_ptr<OCSP_BASICRESP, BasicFree> basic(OCSP_response_get1_basic(response.get()));
    if (!basic) {
        drainErrors();
        throw TlsError("no basic OCSP response inside");
    }
    // The issuer is in the chain file, or (for a leaf signed by a root) among the response's
    // certificates when the CA signed the response itself.
    std::unique_ptr<STACK_OF(X509), StackFree> candidates(sk_X509_new_null());
    for (int i = 0; chain != nullptr && i < sk_X509_num(chain); ++i) {
        sk_X509_push(candidates.get(), sk_X509_value(chain, i));
    }
    const STACK_OF(X509) *carried = OCSP_resp_get0_certs(basic.get());
    for (int i = 0; i < sk_X509_num(carried); ++i) {
        sk_X509_push(candidates.get(), sk_X509_value(carried, i));
    }
    X509 *issuer = findIssuer(leaf, candidates.get());
    if (issuer == nullptr) {
        throw TlsError("the certificate's issuer is neither in its chain file nor in the response");
    }
    // Which single response is ours: compare cert IDs with the hash the responder used.
    int index = -1;
    for (int i = 0; i < OCSP_resp_count(basic.get()) && index < 0; ++i) {
        const OCSP_CERTID *id = OCSP_SINGLERESP_get0_id(OCSP_resp_get0(basic.get(), i));
        ASN1_OBJECT *hashOid = nullptr;
        if (OCSP_id_get0_info(nullptr, &hashOid, nullptr, nullptr, const_cast<OCSP_CERTID *>(id)) !=
            1) {
            continue;
        }
        const EVP_MD *md = EVP_get_digestbyobj(hashOid);
        std::unique_ptr<OCSP_CERTID, CertIdFree> ours(
            md != nullptr ? OCSP_cert_to_id(md, leaf, issuer) : nullptr);
        if (ours && OCSP_id_cmp(ours.get(), id) == 0) {
            index = i;
        }
    }
    if (index < 0) {
        drainErrors();
        throw TlsError("the response is about another certificate");
    }
    std::unique_ptr<X509_STORE, StoreFree> store(X509_STORE_new());
    X509_STORE_add_cert(store.get(), issuer);
    // The issuer may be an intermediate: trust it as an anchor for this check.
    X509_STORE_set_flags(store.get(), X509_V_FLAG_PARTIAL_CHAIN);
    if (OCSP_basic_verify(basic.get(), candidates.get(), store.get(), 0) != 1) {
        throw TlsError("the response's signature does not verify against the issuer: " +
                       drainErrors().reason);
    }
    int certStatus = 0;
    int reason = 0;
    ASN1_GENERALIZEDTIME *revokedAt = nullptr;
    ASN1_GENERALIZEDTIME *thisUpdate = nullptr;
    ASN1_GENERALIZEDTIME *nextUpdate = nullptr;
    certStatus = OCSP_single_get0_status(OCSP_resp_get0(basic.get(), index), &reason, &revokedAt,
                                         &thisUpdate, &nextUpdate);
    if (certStatus != V_OCSP_CERTSTATUS_GOOD && certStatus != V_OCSP_CERTSTATUS_REVOKED) {
        throw TlsError("the responder does not know the certificate (status unknown)");
    }
    if (nextUpdate == nullptr) {
        throw TlsError("the response has no nextUpdate, so its freshness cannot be told");
    }
    Staple staple;
    staple.der.assign(der.begin(), der.end());
    staple.thisUpdate = toTime(thisUpdate);
    staple.nextUpdate = toTime(nextUpdate);
    staple.revoked = certStatus == V_OCSP_CERTSTATUS_REVOKED;
    if (staple.thisUpdate > now + skewSeconds) {
        throw TlsError("the response is not valid yet (thisUpdate " + timeText(staple.thisUpdate) +
                       ")");
    }
    if (staple.nextUpdate <= now) {
        throw TlsError("the response expired at " + timeText(staple.nextUpdate));
    }
    ERR_clear_error();
    return staple;
}

struct OcspStapler::Slot {
    X509 *leaf = nullptr;
    STACK_OF(X509) *chain = nullptr;
    std::string path; // the DER file; for a fetched response, the certificate file (for logs)
    struct stat seen {};
    bool seenValid = false;
    // Fetching (ocsp = "auto"); only the watcher thread touches these after start().
    bool fetched = false;
    std::string url;
    std::vector<unsigned char> request;
    std::chrono::seconds maxRefresh{0};
    std::time_t due = 0;
    std::chrono::seconds backoff{0};
    std::shared_ptr<const Staple> current; // guarded by OcspStapler::mutex_

    ~Slot() {
        X509_free(leaf);
        sk_X509_pop_free(chain, X509_free);
    }
};

OcspStapler::OcspStapler() = default;

OcspStapler::~OcspStapler() {
    cancel_ = true; // ends a fetch in progress early
    {
        std::lock_guard lock(mutex_);
        stop_ = true;
    }
    wake_.notify_all();
    if (thread_.joinable()) {
        thread_.join();
    }
}

void OcspStapler::add(X509 *leaf, STACK_OF(X509) * chain, const std::string &path) {
    auto slot = std::make_unique<Slot>();
    X509_up_ref(leaf);
    slot->leaf = leaf;
    slot->chain = chain != nullptr ? X509_chain_up_ref(chain) : nullptr;
    slot->path = path;
    refresh(*slot, true);
    byCert_.emplace(leaf, slot.get());
    slots_.push_back(std::move(slot));
}

void OcspStapler::addFetched(X509 *leaf, STACK_OF(X509) * chain, const std::string &label,
                             std::chrono::seconds maxRefresh) {
    if (!ocspFetchAvailable()) {
        throw TlsError("certificate " + label +
                       ": ocsp = \"auto\" needs sluice built with libcurl");
    }
    auto slot = std::make_unique<Slot>();
    X509_up_ref(leaf);
    slot->leaf = leaf;
    slot->chain = chain != nullptr ? X509_chain_up_ref(chain) : nullptr;
    slot->path = label;
    slot->fetched = true;
    slot->maxRefresh = std::max(maxRefresh, std::chrono::seconds(1));
    try {
        slot->url = ocspResponderUrl(leaf);
        slot->request = makeOcspRequest(leaf, slot->chain);
    } catch (const TlsError &e) {
        throw TlsError("certificate " + label + ": " + e.what());
    }
    byCert_.emplace(leaf, slot.get());
    slots_.push_back(std::move(slot));
}

std::chrono::seconds OcspStapler::refreshDelay(std::time_t nextUpdate, std::time_t now,
                                               std::chrono::seconds maxRefresh) {
    const std::chrono::seconds half((nextUpdate - now) / 2);
    return std::clamp(half, std::chrono::seconds(1), std::max(maxRefresh, std::chrono::seconds(1)));
}

void OcspStapler::fetch(Slot &slot) {
    const std::time_t started = std::time(nullptr);
    if (started < slot.due) {
        return;
    }
    std::shared_ptr<const Staple> fresh;
    try {
        const std::vector<unsigned char> der = fetchOcspResponse(slot.url, slot.request, cancel_);
        fresh = std::make_shared<const Staple>(
            checkOcspResponse(der, slot.leaf, slot.chain, std::time(nullptr)));
    } catch (const TlsError &e) {
        if (cancel_) {
            return;
        }
        // Keep the current staple (the status callback drops it once it expires) and retry
        // sooner than a refresh would, doubling the wait each time.
        slot.backoff = slot.backoff.count() == 0
                           ? firstRetry
                           : std::min({slot.backoff * 2, longestRetry, slot.maxRefresh});
        slot.due = std::time(nullptr) + slot.backoff.count();
        log::warn("ocsp-fetch-failed cert=" + slot.path + " url=" + slot.url +
                  " reason=" + log::quoted(e.what()) +
                  " retry_in=" + std::to_string(slot.backoff.count()) + "s");
        return;
    }
    const std::time_t now = std::time(nullptr);
    const auto delay = refreshDelay(fresh->nextUpdate, now, slot.maxRefresh);
    slot.backoff = std::chrono::seconds(0);
    slot.due = now + delay.count();
    log::info("ocsp-fetched cert=" + slot.path + " url=" + slot.url +
              " status=" + (fresh->revoked ? "revoked" : "good") + " next_update=" +
              timeText(fresh->nextUpdate) + " refresh_in=" + std::to_string(delay.count()) + "s");
    if (fresh->revoked) {
        log::warn("ocsp-revoked cert=" + slot.path);
    }
    std::lock_guard lock(mutex_);
    slot.current = std::move(fresh);
}

void OcspStapler::refresh(Slot &slot, bool startup) {
    if (slot.fetched) {
        fetch(slot);
        return;
    }
    struct stat now {};
    if (::stat(slot.path.c_str(), &now) != 0) {
        if (startup) {
            throw TlsError("ocsp " + slot.path + ": cannot read: " + std::strerror(errno));
        }
        return; // a file being replaced may be missing for a moment; keep the current staple
    }
    if (slot.seenValid && now.st_mtim.tv_sec == slot.seen.st_mtim.tv_sec &&
        now.st_mtim.tv_nsec == slot.seen.st_mtim.tv_nsec && now.st_size == slot.seen.st_size &&
        now.st_ino == slot.seen.st_ino) {
        return;
    }
    slot.seen = now;
    slot.seenValid = true;
    std::shared_ptr<const Staple> fresh;
    try {
        const std::string der = readFile(slot.path);
        fresh = std::make_shared<const Staple>(checkOcspResponse(
            std::span(reinterpret_cast<const unsigned char *>(der.data()), der.size()), slot.leaf,
            slot.chain, std::time(nullptr)));
    } catch (const TlsError &e) {
        const std::string what = e.what();
        // A response for another certificate is a configuration mistake; refuse to start. An
        // expired one may be refreshed by a cron job later.
        if (startup && what.find("expired") == std::string::npos) {
            throw TlsError("ocsp " + slot.path + ": " + what);
        }
        log::warn("ocsp-rejected file=" + slot.path + " reason=" + log::quoted(what));
        return;
    }
    if (fresh->revoked) {
        log::warn("ocsp-revoked file=" + slot.path);
    }
    if (!startup) {
        log::info("ocsp-reloaded file=" + slot.path);
    }
    std::lock_guard lock(mutex_);
    slot.current = std::move(fresh);
}

void OcspStapler::start() {
    if (slots_.empty() || thread_.joinable()) {
        return;
    }
    thread_ = std::thread([this] { watch(); });
}

void OcspStapler::watch() {
    std::unique_lock lock(mutex_);
    // The first pass runs at once, so fetched responses are there as soon as the responder
    // answers; files were read by add() and are only re-read when they change.
    while (!stop_) {
        lock.unlock();
        for (auto &slot : slots_) {
            if (cancel_) {
                break;
            }
            refresh(*slot, false);
        }
        lock.lock();
        wake_.wait_for(lock, pollInterval, [this] { return stop_; });
    }
}

bool OcspStapler::staple(X509 *cert, std::vector<unsigned char> &out, std::time_t now) const {
    auto it = byCert_.find(cert);
    if (it == byCert_.end()) {
        return false;
    }
    std::shared_ptr<const Staple> current;
    {
        std::lock_guard lock(mutex_);
        current = it->second->current;
    }
    // Never staple a response past its nextUpdate: a client would reject it (or worse, trust it).
    if (!current || current->nextUpdate <= now) {
        return false;
    }
    out = current->der;
    return true;
}

std::time_t OcspStapler::nextUpdate(X509 *cert) const {
    auto it = byCert_.find(cert);
    if (it == byCert_.end()) {
        return 0;
    }
    std::lock_guard lock(mutex_);
    return it->second->current ? it->second->current->nextUpdate : 0;
}

} // namespace sluice::tls
