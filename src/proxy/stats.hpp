// proxy/stats: counters, gauges and fixed-bucket histograms that a Server's threads update
// (relaxed atomics in per-thread shards, summed when read: each value is exact, a snapshot is not
// one instant, and workers never share a cache line on the data path): the process's one,
// stats(), shared by the daemon's workers, or a libsluice Server's own. Also the record of one
// connection that is handed to the access-log sink when it closes, and the rate limit on
// handshake-failure log lines. ops/ reads the snapshot and installs the sink; proxy/ never
// depends on ops/.
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <string_view>

namespace sluice::proxy {

/** Why a connection ended: a small fixed set, so it can be a metric label. */
enum class CloseReason : std::uint8_t {
    done,             ///< both directions finished cleanly
    clientReset,      ///< the client reset the connection or a write to it failed
    timeoutHandshake, ///< the handshake timeout fired
    timeoutIdle,      ///< no byte either way for the idle timeout
    timeoutHalfClose, ///< one side closed and the other stayed idle for the linger timeout
    timeoutConnect,   ///< the backend did not accept in time
    timeoutFlush,     ///< the last bytes (or an alert) could not be sent in time
    handshakeFailed,  ///< the TLS handshake failed (alert sent)
    tlsError,         ///< a TLS error after the handshake
    backendFailed,    ///< the backend refused or could not be reached
    backendReset,     ///< the backend failed after it was connected (reply cut short)
    drain,            ///< the drain deadline closed it
    limit,            ///< refused by a connection limit
    internal,         ///< a local failure (out of memory, engine creation)
    proxyHeader,      ///< a missing, malformed or refused PROXY protocol header
    handlerClose,     ///< an in-process handler closed the stream (Stream::close)
};
constexpr std::size_t closeReasonCount = 16;

/** The metric label of a close reason: "done", "client_reset", "timeout_handshake", ... */
std::string_view closeReasonName(CloseReason reason);

/** Handshake outcomes, as counted once per connection. */
enum class HandshakeResult : std::uint8_t { ok, failed, timeout, aborted };
constexpr std::size_t handshakeResultCount = 4;
std::string_view handshakeResultName(HandshakeResult result);

/** Negotiated protocol versions that get their own label. */
enum class TlsVersion : std::uint8_t { tls12, tls13, other };
constexpr std::size_t tlsVersionCount = 3;
std::string_view tlsVersionName(TlsVersion version);  ///< "1.2", "1.3", "other"
TlsVersion tlsVersionFrom(std::string_view protocol); ///< from "TLSv1.3" etc.

/** Upper bounds (seconds) of the duration histograms' buckets; +Inf is implicit. */
inline constexpr std::array<double, 13> durationBuckets = {
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0};

/** A fixed-bucket histogram of durations, safe to observe from any thread. */
class Histogram {
public:
    /** Records one duration in nanoseconds. */
    void observe(std::uint64_t nanoseconds);

    struct Snapshot {
        std::array<std::uint64_t, durationBuckets.size() + 1> buckets{}; ///< not cumulative
        std::uint64_t count = 0;
        double sumSeconds = 0;
        /** Adds another histogram's counts (shards summed into one). */
        void add(const Snapshot &other);
    };
    Snapshot snapshot() const;
    void reset();

private:
    std::array<std::atomic<std::uint64_t>, durationBuckets.size() + 1> buckets_{};
    std::atomic<std::uint64_t> sumNanoseconds_{0};
};

/** A copy of every value at (about) one moment, for rendering. */
struct StatsSnapshot {
    std::uint64_t accepted = 0;
    std::uint64_t active = 0;
    std::array<std::uint64_t, closeReasonCount> closed{};
    std::array<std::uint64_t, handshakeResultCount> handshakes{};
    std::array<std::uint64_t, tlsVersionCount> handshakesByVersion{}; ///< completed ones
    std::uint64_t resumed = 0;
    Histogram::Snapshot handshakeDuration;
    std::uint64_t backendConnectFailures = 0;
    Histogram::Snapshot backendConnectDuration;
    std::uint64_t bytesClientToBackend = 0;
    std::uint64_t bytesBackendToClient = 0;
    std::uint64_t acceptErrors = 0;
    std::uint64_t handshakeLimited = 0; ///< closed at accept: their IP had too many handshakes
    std::uint64_t handshakeRateLimited =
        0;                                ///< closed at accept: their IP started too many a second
    std::uint64_t proxySourceRefused = 0; ///< closed at accept: not an accept_proxy_from source
    std::uint64_t memoryReleases = 0;     ///< times free heap memory was handed back after a burst
    /** Bytes the process's allocations hold now, all threads (glibc's mallinfo2: in use plus
     * mmapped), read when the snapshot is taken; 0 where the C library cannot tell. */
    std::uint64_t heapInUse = 0;
    std::uint64_t backendUnused = 0; ///< connected at the hello, closed before the handshake
    std::uint64_t reloadsOk = 0;
    std::uint64_t reloadsFailed = 0;
    std::int64_t lastReloadUnixSeconds = 0; ///< 0: no reload yet
    bool lastReloadOk = true;
    std::string lastReloadMessage;
    std::int64_t startUnixSeconds = 0;
};

/** A set of statistics. Every member function may be called from any thread. */
class Stats {
public:
    Stats();

    void connectionAccepted();
    /** Counts the close and lowers the active gauge; once per accepted connection. */
    void connectionClosed(CloseReason reason);
    /** A handshake that completed, with its duration from accept. */
    void handshakeDone(TlsVersion version, bool resumed, std::uint64_t nanoseconds);
    /** A connection that ended before its handshake completed. */
    void handshakeNotDone(HandshakeResult result);
    void backendConnected(std::uint64_t nanoseconds);
    void backendConnectFailed();
    void bytesClientToBackend(std::uint64_t n) { shard().bytesUp.fetch_add(n, relaxed); }
    void bytesBackendToClient(std::uint64_t n) { shard().bytesDown.fetch_add(n, relaxed); }
    /** `n` accept() failures, or connections closed unserved for want of a descriptor. */
    void acceptErrors(std::uint64_t n) { shard().acceptErrors.fetch_add(n, relaxed); }
    /** A connection closed at accept by global.max_handshakes_per_ip. */
    void handshakeLimited() { shard().handshakeLimited.fetch_add(1, relaxed); }
    /** A connection closed at accept by global.max_handshake_rate_per_ip. */
    void handshakeRateLimited() { shard().handshakeRateLimited.fetch_add(1, relaxed); }
    /** A connection from a source not in the listener's accept_proxy_from, closed at accept. */
    void proxySourceRefused() { shard().proxySourceRefused.fetch_add(1, relaxed); }
    /** Free heap memory was handed back to the operating system (global.release_memory_after). */
    void memoryReleased() { shard().memoryReleases.fetch_add(1, relaxed); }
    /** A backend connection made at the hello (connect_after) closed before the handshake. */
    void backendUnused() { shard().backendUnused.fetch_add(1, relaxed); }
    /** Records the outcome of a reload (SIGHUP or API): counted, and shown by /status. */
    void recordReload(bool ok, std::string message);

    StatsSnapshot snapshot() const;

    /** Zeroes everything (unit tests only; not atomic as a whole). */
    void resetForTests();

private:
    static constexpr auto relaxed = std::memory_order_relaxed;

    /** One thread's share of the counters, a cache line apart from the others'. */
    struct alignas(64) Shard {
        std::atomic<std::uint64_t> accepted{0};
        std::atomic<std::int64_t> active{0};
        std::array<std::atomic<std::uint64_t>, closeReasonCount> closed{};
        std::array<std::atomic<std::uint64_t>, handshakeResultCount> handshakes{};
        std::array<std::atomic<std::uint64_t>, tlsVersionCount> byVersion{};
        std::atomic<std::uint64_t> resumed{0};
        Histogram handshakeDuration;
        std::atomic<std::uint64_t> connectFailures{0};
        Histogram connectDuration;
        std::atomic<std::uint64_t> bytesUp{0};
        std::atomic<std::uint64_t> bytesDown{0};
        std::atomic<std::uint64_t> acceptErrors{0};
        std::atomic<std::uint64_t> handshakeLimited{0};
        std::atomic<std::uint64_t> handshakeRateLimited{0};
        std::atomic<std::uint64_t> proxySourceRefused{0};
        std::atomic<std::uint64_t> memoryReleases{0};
        std::atomic<std::uint64_t> backendUnused{0};
    };
    /** Threads take shards in the order they first count something; past this many, two
     * threads share one (still exact, since every update is atomic). */
    static constexpr std::size_t shardCount = 32;

    /** The calling thread's shard. */
    Shard &shard();

    std::array<Shard, shardCount> shards_;
    std::atomic<std::uint64_t> reloadsOk_{0};
    std::atomic<std::uint64_t> reloadsFailed_{0};
    std::int64_t startUnixSeconds_ = 0;
    mutable std::mutex reloadMutex_; // guards the three below
    std::int64_t lastReloadUnixSeconds_ = 0;
    bool lastReloadOk_ = true;
    std::string lastReloadMessage_;
};

/** The process's Stats: the daemon's workers count into it and /metrics shows it. */
Stats &stats();

/** What one connection did, handed to the access-log sink once, when it starts closing. */
struct ConnectionRecord {
    std::int64_t startUnixMicros = 0; ///< wall clock at accept
    std::uint64_t durationNanos = 0;  ///< accept until close began
    std::string listener;
    std::string client; ///< the peer address, "ip:port"
    std::string backend;
    bool handshakeDone = false;
    std::string protocol; ///< "TLSv1.3", ...; empty without a handshake
    std::string cipher;
    std::string sni;  ///< as the client sent it (hostile bytes possible: escape when writing)
    std::string alpn; ///< negotiated protocol, empty if none
    bool resumed = false;
    std::string clientIdentity;       ///< from a client certificate, empty if none
    std::int64_t handshakeNanos = -1; ///< accept until handshake done; -1: not reached
    std::int64_t connectNanos = -1;   ///< backend connect; -1: not reached
    std::uint64_t bytesClientToBackend = 0;
    std::uint64_t bytesBackendToClient = 0;
    CloseReason reason = CloseReason::done;
    std::string error; ///< OpenSSL's or libuv's reason when one ended it, else empty
};

/** Where connection records go. Called on a worker's thread; must be thread-safe. */
using AccessLogSink = std::function<void(const ConnectionRecord &)>;

/**
 * Installs (or, with an empty function, removes) the sink. Safe while workers run. A sink that
 * writes into the event log (`atInfo`) takes records only while the log level lets info lines
 * out: at "warn" or "error" no connection builds one.
 */
void setAccessLogSink(AccessLogSink sink, bool atInfo = false);

/** True when the sink would write a record (skip building the record otherwise). */
bool accessLogEnabled();

/** Hands `record` to the sink, if any. */
void emitConnectionRecord(const ConnectionRecord &record);

/**
 * At most `perSecond` lines a second, process-wide; the rest are counted and reported by one
 * summary line ("EVENT-suppressed count=K") before the next line that is let through.
 */
class LogRateLimit {
public:
    explicit LogRateLimit(unsigned perSecond)
        : perSecond_(perSecond) {}

    /**
     * True when a line may be written now (at `nowMillis`, any monotonic clock). `suppressed` is
     * set to how many lines were held back since the last one let through (0 usually).
     */
    bool admit(std::uint64_t nowMillis, std::uint64_t &suppressed);

private:
    std::mutex mutex_;
    unsigned perSecond_;
    std::uint64_t windowStart_ = 0;
    unsigned inWindow_ = 0;
    std::uint64_t suppressed_ = 0;
};

/** The limiter of handshake-failure log lines (10 a second). */
LogRateLimit &handshakeLogLimit();

} // namespace sluice::proxy
