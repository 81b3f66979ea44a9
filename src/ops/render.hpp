// ops/render: the admin listener's documents, built from a statistics snapshot: /metrics in the
// Prometheus text exposition format 0.0.4 and /status as JSON. Pure functions, unit-tested.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "proxy/stats.hpp"
#include "tls/context.hpp"

namespace sluice::ops {

/** One listener as /status shows it. */
struct ListenerStatus {
    std::string name;
    std::vector<std::string> addresses; ///< bound addresses, with the port the kernel chose
    std::string backend;
};

/** One server of a backend pool as /status and /metrics show it. */
struct BackendServerStatus {
    std::string address;
    bool up = true;             ///< not marked down by passive health
    std::uint64_t active = 0;   ///< connections using it now
    std::uint32_t failures = 0; ///< consecutive failed connects
    std::uint64_t connects = 0; ///< successful connects (this configuration generation)
    std::uint64_t connectFailures = 0;
};

/** One backend pool. */
struct BackendStatus {
    std::string name;
    std::string balance; ///< "round-robin", "least-connections", "first"
    bool tls = false;
    std::string proxyProtocol; ///< "off", "v1", "v2"
    std::vector<BackendServerStatus> servers;
};

/** Everything a document shows besides the process-wide statistics. */
struct StatusView {
    std::string version;
    std::string openssl;
    bool draining = false;
    std::int64_t nowUnixSeconds = 0;
    std::vector<ListenerStatus> listeners;
    std::vector<BackendStatus> backends;
    std::vector<tls::CertificateSummary> certificates; ///< duplicates (same listener, name and
                                                       ///< file) are shown once
};

/** The Prometheus text format (version 0.0.4) document. */
std::string renderMetrics(const proxy::StatsSnapshot &stats, const StatusView &view);

/** The /status JSON document. */
std::string renderStatus(const proxy::StatsSnapshot &stats, const StatusView &view);

} // namespace sluice::ops
