// proxy/client_limits: the per-client-address handshake limits (global.max_handshakes_per_ip
// and global.max_handshake_rate_per_ip), one record for every worker of a process, so that N
// workers do not let an address start N times its share.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>
#include <unordered_map>

namespace sluice::proxy {

/**
 * Handshakes in progress and a token bucket of handshakes that may start, by client address key
 * (clientIpKey()). Safe from any thread: the records are split into shards by the key's hash,
 * each behind its own mutex and on its own cache lines, so workers admitting different
 * addresses rarely meet. Each map holds only what is live: an address with no handshake in
 * progress has no count, and a bucket untouched for a second (full again) is pruned.
 */
class ClientLimits {
public:
    enum class Admission { admitted, tooMany, tooFast };

    /**
     * Counts a handshake starting from `key`, or refuses it (nothing counted) when that address
     * already has `maxInProgress` in progress (`tooMany`) or has started `ratePerSecond` in the
     * last second (`tooFast`; the bucket holds one second's worth). A limit of 0 is off. Every
     * `admitted` must be matched by one ended() with the same key.
     */
    Admission starting(const std::string &key, std::uint64_t maxInProgress,
                       std::uint64_t ratePerSecond);
    void ended(const std::string &key);

    /** Drops every rate bucket: the rate is off (a reload), and nothing prunes them then. */
    void forgetRates();

    /** Addresses with a handshake in progress, and rate buckets held (for the tests). */
    std::size_t addressesInProgress();
    std::size_t bucketsHeld();

private:
    using Clock = std::chrono::steady_clock;
    struct Bucket {
        double tokens = 0;
        Clock::time_point refilled;
    };
    struct alignas(64) Shard {
        std::mutex mutex;
        std::unordered_map<std::string, std::uint64_t> inProgress;
        std::unordered_map<std::string, Bucket> buckets;
        std::size_t pruneAt = 1024; // the buckets' size that makes the next take prune them
    };
    static constexpr std::size_t shardCount = 16;

    Shard &shardOf(const std::string &key);
    /** The entries of one of the shards' maps, summed. */
    template <typename Map>
    std::size_t entries(Map Shard::*map);
    /** Takes one of `key`'s tokens; false when it has none. Called with the shard locked. */
    static bool takeToken(Shard &shard, const std::string &key, std::uint64_t ratePerSecond);

    std::array<Shard, shardCount> shards_;
};

} // namespace sluice::proxy
