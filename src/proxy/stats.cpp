#include "proxy/stats.hpp"

#include <chrono>
#if defined(__GLIBC__)
#include <malloc.h>
#endif
#include <memory>

#include "util/log.hpp"

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

void Histogram::Snapshot::add(const Snapshot &other) {
    for (std::size_t i = 0; i < buckets.size(); ++i) {
        buckets[i] += other.buckets[i];
    }
    count += other.count;
    sumSeconds += other.sumSeconds;
}

void Histogram::reset() {
    for (auto &bucket : buckets_) {
        bucket = 0;
    }
    sumNanoseconds_ = 0;
}

Stats::Stats()
    : startUnixSeconds_(unixSecondsNow()) {}

Stats::Shard &Stats::shard() {
    static std::atomic<unsigned> threads{0};
    thread_local const unsigned thread = threads.fetch_add(1, relaxed);
    return shards_[thread % shardCount];
}

void Stats::connectionAccepted() {
    Shard &own = shard();
    own.accepted.fetch_add(1, relaxed);
    own.active.fetch_add(1, relaxed);
}

void Stats::connectionClosed(CloseReason reason) {
    Shard &own = shard();
    own.closed[static_cast<std::size_t>(reason)].fetch_add(1, relaxed);
    own.active.fetch_sub(1, relaxed);
}

void Stats::handshakeDone(TlsVersion version, bool resumed, std::uint64_t nanoseconds) {
    Shard &own = shard();
    own.handshakes[static_cast<std::size_t>(HandshakeResult::ok)].fetch_add(1, relaxed);
    own.byVersion[static_cast<std::size_t>(version)].fetch_add(1, relaxed);
    if (resumed) {
        own.resumed.fetch_add(1, relaxed);
    }
    own.handshakeDuration.observe(nanoseconds);
}

void Stats::handshakeNotDone(HandshakeResult result) {
    shard().handshakes[static_cast<std::size_t>(result)].fetch_add(1, relaxed);
}

void Stats::backendConnected(std::uint64_t nanoseconds) {
    shard().connectDuration.observe(nanoseconds);
}

void Stats::backendConnectFailed() {
    shard().connectFailures.fetch_add(1, relaxed);
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
    std::int64_t active = 0;
    for (const Shard &own : shards_) {
        out.accepted += own.accepted.load(relaxed);
        active += own.active.load(relaxed);
        for (std::size_t i = 0; i < closeReasonCount; ++i) {
            out.closed[i] += own.closed[i].load(relaxed);
        }
        for (std::size_t i = 0; i < handshakeResultCount; ++i) {
            out.handshakes[i] += own.handshakes[i].load(relaxed);
        }
        for (std::size_t i = 0; i < tlsVersionCount; ++i) {
            out.handshakesByVersion[i] += own.byVersion[i].load(relaxed);
        }
        out.resumed += own.resumed.load(relaxed);
        out.handshakeDuration.add(own.handshakeDuration.snapshot());
        out.backendConnectFailures += own.connectFailures.load(relaxed);
        out.backendConnectDuration.add(own.connectDuration.snapshot());
        out.bytesClientToBackend += own.bytesUp.load(relaxed);
        out.bytesBackendToClient += own.bytesDown.load(relaxed);
        out.acceptErrors += own.acceptErrors.load(relaxed);
        out.handshakeLimited += own.handshakeLimited.load(relaxed);
        out.handshakeRateLimited += own.handshakeRateLimited.load(relaxed);
        out.proxySourceRefused += own.proxySourceRefused.load(relaxed);
        out.memoryReleases += own.memoryReleases.load(relaxed);
        out.backendUnused += own.backendUnused.load(relaxed);
    }
    // A close counted before its accept (another thread, relaxed order) must not show as -1.
    out.active = active > 0 ? static_cast<std::uint64_t>(active) : 0;
#if defined(__GLIBC__)
    // Walks every arena's free lists under its lock: once per scrape, never on the data path.
    const struct mallinfo2 heap = mallinfo2();
    out.heapInUse = heap.uordblks + heap.hblkhd;
#endif
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
    for (Shard &own : shards_) {
        own.accepted = 0;
        own.active = 0;
        for (auto &v : own.closed) {
            v = 0;
        }
        for (auto &v : own.handshakes) {
            v = 0;
        }
        for (auto &v : own.byVersion) {
            v = 0;
        }
        own.resumed = 0;
        own.handshakeDuration.reset();
        own.connectFailures = 0;
        own.connectDuration.reset();
        own.bytesUp = 0;
        own.bytesDown = 0;
        own.acceptErrors = 0;
        own.handshakeLimited = 0;
        own.handshakeRateLimited = 0;
        own.proxySourceRefused = 0;
        own.memoryReleases = 0;
        own.backendUnused = 0;
    }
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
std::atomic<bool> sinkAtInfo{false};

} // namespace

void setAccessLogSink(AccessLogSink sink, bool atInfo) {
    std::shared_ptr<const AccessLogSink> next;
    if (sink) {
        next = std::make_shared<const AccessLogSink>(std::move(sink));
    }
    std::lock_guard lock(sinkMutex);
    sinkAtInfo.store(atInfo, std::memory_order_relaxed);
    sinkPresent.store(next != nullptr, std::memory_order_relaxed);
    sinkInstalled.swap(next);
    // The previous sink is released when `next` goes out of scope; a record being written
    // through it holds its own reference until that write ends.
}

bool accessLogEnabled() {
    return sinkPresent.load(std::memory_order_relaxed) &&
           (!sinkAtInfo.load(std::memory_order_relaxed) || log::enabled(LogLevel::info));
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
