#include "proxy/client_limits.hpp"

#include <algorithm>
#include <functional>

namespace sluice::proxy {

ClientLimits::Shard &ClientLimits::shardOf(const std::string &key) {
    return shards_[std::hash<std::string>{}(key) % shardCount];
}

ClientLimits::Admission ClientLimits::starting(const std::string &key, std::uint64_t maxInProgress,
                                               std::uint64_t ratePerSecond) {
    Shard &shard = shardOf(key);
    const std::lock_guard lock(shard.mutex);
    if (maxInProgress != 0) {
        auto found = shard.inProgress.find(key);
        if (found != shard.inProgress.end() && found->second >= maxInProgress) {
            return Admission::tooMany;
        }
    }
    if (ratePerSecond != 0 && !takeToken(shard, key, ratePerSecond)) {
        return Admission::tooFast;
    }
    ++shard.inProgress[key];
    return Admission::admitted;
}

void ClientLimits::ended(const std::string &key) {
    Shard &shard = shardOf(key);
    const std::lock_guard lock(shard.mutex);
    auto found = shard.inProgress.find(key);
    if (found != shard.inProgress.end() && --found->second == 0) {
        shard.inProgress.erase(found);
    }
}

template <typename Map>
std::size_t ClientLimits::entries(Map Shard::*map) {
    std::size_t count = 0;
    for (auto &shard : shards_) {
        const std::lock_guard lock(shard.mutex);
        count += (shard.*map).size();
    }
    return count;
}

std::size_t ClientLimits::addressesInProgress() {
    return entries(&Shard::inProgress);
}

std::size_t ClientLimits::bucketsHeld() {
    return entries(&Shard::buckets);
}

void ClientLimits::forgetRates() {
    for (auto &shard : shards_) {
        const std::lock_guard lock(shard.mutex);
        shard.buckets.clear();
        shard.pruneAt = 1024;
    }
}

bool ClientLimits::takeToken(Shard &shard, const std::string &key, std::uint64_t ratePerSecond) {
    using Seconds = std::chrono::duration<double>;
    const auto rate = static_cast<double>(ratePerSecond);
    const auto now = Clock::now();
    if (shard.buckets.size() >= shard.pruneAt) {
        // A bucket untouched for a second is full again, as good as none: dropping those keeps
        // the map to the addresses seen in the last second, at O(1) a call over time.
        std::erase_if(shard.buckets, [now](const auto &entry) {
            return now - entry.second.refilled >= std::chrono::seconds(1);
        });
        shard.pruneAt = std::max<std::size_t>(1024, 2 * shard.buckets.size());
    }
    auto [found, added] = shard.buckets.try_emplace(key, Bucket{rate, now});
    Bucket &bucket = found->second;
    if (!added) {
        const double elapsed = Seconds(now - bucket.refilled).count();
        bucket.tokens = std::min(rate, bucket.tokens + elapsed * rate);
        bucket.refilled = now;
    }
    if (bucket.tokens < 1.0) {
        return false;
    }
    bucket.tokens -= 1.0;
    return true;
}

} // namespace sluice::proxy
