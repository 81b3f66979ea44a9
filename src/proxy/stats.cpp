#include "proxy/stats.hpp"

#include <chrono>
#if defined(__GLIBC__)
#include <malloc.h>
#endif
#include <memory>

namespace sluice::proxy {
namespace {

std::int64_t unixSecondsNow() {
    return std::chrono::duration_cast<std::chrono::seconds>(
               std::chrono::system_clock::now().time_since_epoch())
        .count();
}

} // namespace

std::string_view closeReasonName(CloseReason reason) {
    switch (reason) {
    case CloseReason::done:
        return "done";
    case CloseReason::clientReset:
        return "client_reset";
    case CloseReason::timeoutHandshake:
        return "timeout_handshake";
    case CloseReason::timeoutIdle:
        return "timeout_idle";
    case CloseReason::timeoutHalfClose:
        return "timeout_half_close";
    case CloseReason::timeoutConnect:
        return "timeout_connect";
    case CloseReason::timeoutFlush:
        return "timeout_flush";
    case CloseReason::handshakeFailed:
        return "handshake_failed";
    case CloseReason::tlsError:
        return "tls_error";
    case CloseReason::backendFailed:
        return "backend_failed";
    case CloseReason::proxyHeader:
        return "proxy_header";
    case CloseReason::handlerClose:
        return "handler_close";
    case CloseReason::backendReset:
        return "backend_reset";
    case CloseReason::drain:
        return "drain";
    case CloseReason::limit:
        return "limit";
    case CloseReason::internal:
        return "internal";
    }
    return "internal";
}

std::string_view handshakeResultName(HandshakeResult result) {
    switch (result) {
    case HandshakeResult::ok:
        return "ok";
    case HandshakeResult::failed:
        return "failed";
    case HandshakeResult::timeout:
        return "timeout";
    case HandshakeResult::aborted:
        return "aborted";
    }
    return "aborted";
}

std::string_view tlsVersionName(TlsVersion version) {
    switch (version) {
    case TlsVersion::tls12:
        return "1.2";
    case TlsVersion::tls13:
        return "1.3";
    case TlsVersion::other:
        return "other";
    }
    return "other";
}

TlsVersion tlsVersionFrom(std::string_view protocol) {
    if (protocol == "TLSv1.3") {
        return TlsVersion::tls13;
    }
    if (protocol == "TLSv1.2") {
        return TlsVersion::tls12;
    }
    return TlsVersion::other;
}

void Histogram::observe(std::uint64_t nanoseconds) {
    const double seconds = static_cast<double>(nanoseconds) / 1e9;
    std::size_t bucket = 0;
    while (bucket < durationBuckets.size() && seconds > durationBuckets[bucket]) {
        ++bucket;
    }
    buckets_[bucket].fetch_add(1, std::memory_order_relaxed);
    sumNanoseconds_.fetch_add(nanoseconds, std::memory_order_relaxed);
}

Histogram::Snapshot Histogram::snapshot() const {
    Snapshot out;
    for (std::size_t i = 0; i < buckets_.size(); ++i) {
        out.buckets[i] = buckets_[i].load(std::memory_order_relaxed);
        out.count += out.buckets[i];
    }
    out.sumSeconds = static_cast<double>(sumNanoseconds_.load(std::memory_order_relaxed)) / 1e9;
    return out;
}

void Histogram::reset() {
    for (auto &bucket : buckets_) {
        bucket = 0;
    }
    sumNanoseconds_ = 0;
}

Stats::Stats()
    : startUnixSeconds_(unixSecondsNow()) {}

void Stats::connectionAccepted() {
    accepted_.fetch_add(1, relaxed);
    active_.fetch_add(1, relaxed);
}

void Stats::connectionClosed(CloseReason reason) {
    closed_[static_cast<std::size_t>(reason)].fetch_add(1, relaxed);
    active_.fetch_sub(1, relaxed);
}

void Stats::handshakeDone(TlsVersion version, bool resumed, std::uint64_t nanoseconds) {
    handshakes_[static_cast<std::size_t>(HandshakeResult::ok)].fetch_add(1, relaxed);
    byVersion_[static_cast<std::size_t>(version)].fetch_add(1, relaxed);
    if (resumed) {
        resumed_.fetch_add(1, relaxed);
    }
    handshakeDuration_.observe(nanoseconds);
}

void Stats::handshakeNotDone(HandshakeResult result) {
    handshakes_[static_cast<std::size_t>(result)].fetch_add(1, relaxed);
}

void Stats::backendConnected(std::uint64_t nanoseconds) {
    connectDuration_.observe(nanoseconds);
}

void Stats::backendConnectFailed() {
    connectFailures_.fetch_add(1, relaxed);
}

void Stats::recordReload(bool ok, std::string message) {
    (ok ? reloadsOk_ : reloadsFailed_).fetch_add(1, relaxed);
    std::lock_guard lock(reloadMutex_);
    lastReloadUnixSeconds_ = unixSecondsNow();
    lastReloadOk_ = ok;
    lastReloadMessage_ = std::move(message);
}

StatsSnapshot Stats::snapshot() const {
    StatsSnapshot out;
    out.accepted = accepted_.load(relaxed);
    // A close counted before its accept (another thread, relaxed order) must not show as -1.
    const std::int64_t active = active_.load(relaxed);
    out.active = active > 0 ? static_cast<std::uint64_t>(active) : 0;
    for (std::size_t i = 0; i < closeReasonCount; ++i) {
        out.closed[i] = closed_[i].load(relaxed);
    }
    for (std::size_t i = 0; i < handshakeResultCount; ++i) {
        out.handshakes[i] = handshakes_[i].load(relaxed);
    }
    for (std::size_t i = 0; i < tlsVersionCount; ++i) {
        out.handshakesByVersion[i] = byVersion_[i].load(relaxed);
    }
    out.resumed = resumed_.load(relaxed);
    out.handshakeDuration = handshakeDuration_.snapshot();
    out.backendConnectFailures = connectFailures_.load(relaxed);
    out.backendConnectDuration = connectDuration_.snapshot();
    out.bytesClientToBackend = bytesUp_.load(relaxed);
    out.bytesBackendToClient = bytesDown_.load(relaxed);
    out.acceptErrors = acceptErrors_.load(relaxed);
    out.handshakeLimited = handshakeLimited_.load(relaxed);
    out.proxySourceRefused = proxySourceRefused_.load(relaxed);
    out.memoryReleases = memoryReleases_.load(relaxed);
#if defined(__GLIBC__)
    // Walks every arena's free lists under its lock: once per scrape, never on the data path.
    const struct mallinfo2 heap = mallinfo2();
    out.heapInUse = heap.uordblks + heap.hblkhd;
#endif
    out.backendUnused = backendUnused_.load(relaxed);
    out.reloadsOk = reloadsOk_.load(relaxed);
    out.reloadsFailed = reloadsFailed_.load(relaxed);
    out.startUnixSeconds = startUnixSeconds_;
    std::lock_guard lock(reloadMutex_);
    out.lastReloadUnixSeconds = lastReloadUnixSeconds_;
    out.lastReloadOk = lastReloadOk_;
    out.lastReloadMessage = lastReloadMessage_;
    return out;
}

void Stats::resetForTests() {
    accepted_ = 0;
    active_ = 0;
    for (auto &v : closed_) {
        v = 0;
    }
    for (auto &v : handshakes_) {
        v = 0;
    }
    for (auto &v : byVersion_) {
        v = 0;
    }
    resumed_ = 0;
    handshakeDuration_.reset();
    connectFailures_ = 0;
    connectDuration_.reset();
    bytesUp_ = 0;
    bytesDown_ = 0;
    acceptErrors_ = 0;
    handshakeLimited_ = 0;
    proxySourceRefused_ = 0;
    memoryReleases_ = 0;
    backendUnused_ = 0;
    reloadsOk_ = 0;
    reloadsFailed_ = 0;
    std::lock_guard lock(reloadMutex_);
    lastReloadUnixSeconds_ = 0;
    lastReloadOk_ = true;
    lastReloadMessage_.clear();
}

Stats &stats() {
    static Stats instance;
    return instance;
}

// --- The access-log sink -----------------------------------------------------------------------

namespace {

std::mutex sinkMutex;
std::shared_ptr<const AccessLogSink> sinkInstalled; // guarded by sinkMutex
std::atomic<bool> sinkPresent{false};

} // namespace

void setAccessLogSink(AccessLogSink sink) {
    std::shared_ptr<const AccessLogSink> next;
    if (sink) {
        next = std::make_shared<const AccessLogSink>(std::move(sink));
    }
    std::lock_guard lock(sinkMutex);
    sinkPresent.store(next != nullptr, std::memory_order_relaxed);
    sinkInstalled.swap(next);
    // The previous sink is released when `next` goes out of scope; a record being written
    // through it holds its own reference until that write ends.
}

bool accessLogEnabled() {
    return sinkPresent.load(std::memory_order_relaxed);
}

void emitConnectionRecord(const ConnectionRecord &record) {
    std::shared_ptr<const AccessLogSink> sink;
    {
        std::lock_guard lock(sinkMutex);
        sink = sinkInstalled;
    }
    if (sink) {
        (*sink)(record);
    }
}

// --- Rate limit --------------------------------------------------------------------------------

bool LogRateLimit::admit(std::uint64_t nowMillis, std::uint64_t &suppressed) {
    std::lock_guard lock(mutex_);
    suppressed = 0;
    if (nowMillis >= windowStart_ + 1000 || nowMillis < windowStart_) {
        windowStart_ = nowMillis;
        inWindow_ = 0;
    }
    if (inWindow_ >= perSecond_) {
        ++suppressed_;
        return false;
    }
    ++inWindow_;
    suppressed = suppressed_;
    suppressed_ = 0;
    return true;
}

LogRateLimit &handshakeLogLimit() {
    static LogRateLimit limit(10);
    return limit;
}

} // namespace sluice::proxy
