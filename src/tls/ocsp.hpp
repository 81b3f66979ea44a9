// tls/ocsp: OCSP stapling from DER files or fetched from the certificate's responder. A response
// is checked before it is ever stapled: it must be a successful, signed answer (by the issuer or
// its delegated responder) about this very certificate, and inside its thisUpdate..nextUpdate
// window. One watcher thread re-reads files that change and fetches responses when they are due
// (at half the remaining validity, at most `ocsp_refresh` apart, sooner with backoff after a
// failure); the status callback only copies the current response, and staples nothing once it
// has expired.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <ctime>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

struct x509_st;
struct stack_st_X509;

namespace sluice::tls {

/** A checked OCSP response. */
struct Staple {
    std::vector<unsigned char> der;
    std::time_t thisUpdate = 0;
    std::time_t nextUpdate = 0;
    bool revoked = false; ///< the responder says the certificate is revoked (stapled anyway)
};

/**
 * Checks `der` as the OCSP response for `leaf`, whose issuer is looked up in `chain` and in the
 * certificates the response carries. Throws TlsError saying what is wrong (mismatch, bad
 * signature, expired at `now`, no nextUpdate, not successful, status unknown).
 */
Staple checkOcspResponse(std::span<const unsigned char> der, x509_st *leaf, stack_st_X509 *chain,
                         std::time_t now);

/** Per-certificate staples of one context, and the thread that keeps them current. */
class OcspStapler {
public:
    OcspStapler();
    ~OcspStapler();
    OcspStapler(const OcspStapler &) = delete;
    OcspStapler &operator=(const OcspStapler &) = delete;

    /**
     * Registers `path` for `leaf`. A file that cannot be read or answers for another certificate
     * throws TlsError; an expired one is logged and stapled only once a fresh one replaces it.
     */
    void add(x509_st *leaf, stack_st_X509 *chain, const std::string &path);

    /**
     * Registers `leaf` for fetching from its OCSP responder; `label` names it in logs (its
     * certificate file). Throws TlsError when it names no http:// responder or its issuer is not
     * in `chain`. Nothing is fetched before start(); until the first good answer, nothing is
     * stapled.
     */
    void addFetched(x509_st *leaf, stack_st_X509 *chain, const std::string &label,
                    std::chrono::seconds maxRefresh);

    /** When a fetched response is next due: at half its remaining validity, within maxRefresh. */
    static std::chrono::seconds refreshDelay(std::time_t nextUpdate, std::time_t now,
                                             std::chrono::seconds maxRefresh);

    /** Starts the watcher (once every file is added); does nothing without files. */
    void start();

    /** Copies the response to staple for `cert` into `out`; false when there is none valid. */
    bool staple(x509_st *cert, std::vector<unsigned char> &out, std::time_t now) const;

    /** The nextUpdate of the response held for `cert` (valid or not), or 0 when none is held. */
    std::time_t nextUpdate(x509_st *cert) const;

    bool empty() const { return slots_.empty(); }

private:
    struct Slot;
    void watch();
    void refresh(Slot &slot, bool startup);
    void fetch(Slot &slot);

    std::vector<std::unique_ptr<Slot>> slots_;
    std::unordered_map<const x509_st *, Slot *> byCert_;
    mutable std::mutex mutex_; // guards every Slot::current and stop_
    std::condition_variable wake_;
    bool stop_ = false;
    std::atomic<bool> cancel_{false}; // stop_, readable by a fetch in progress without the mutex
    std::thread thread_;
};

} // namespace sluice::tls
