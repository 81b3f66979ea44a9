#include "ops/render.hpp"

#include <set>
#include <tuple>

#include "ops/text.hpp"

namespace sluice::ops {
namespace {

using Labels = std::vector<std::pair<std::string_view, std::string_view>>;

class Exposition {
public:
    void family(std::string_view name, std::string_view type, std::string_view help) {
        out_ += "# HELP ";
        out_.append(name);
        out_ += ' ';
        out_.append(help);
        out_ += "\n# TYPE ";
        out_.append(name);
        out_ += ' ';
        out_.append(type);
        out_ += '\n';
    }

    void sample(std::string_view name, const Labels &labels, std::string_view value) {
        out_.append(name);
        if (!labels.empty()) {
            out_ += '{';
            bool first = true;
            for (const auto &[key, labelValue] : labels) {
                if (!first) {
                    out_ += ',';
                }
                first = false;
                out_.append(key);
                out_ += "=\"";
                appendLabelValue(out_, labelValue);
                out_ += '"';
            }
            out_ += '}';
        }
        out_ += ' ';
        out_.append(value);
        out_ += '\n';
    }

    void sample(std::string_view name, const Labels &labels, std::uint64_t value) {
        sample(name, labels, std::to_string(value));
    }

    void histogram(std::string_view name, std::string_view help,
                   const proxy::Histogram::Snapshot &h) {
        family(name, "histogram", help);
        const std::string bucket = std::string(name) + "_bucket";
        std::uint64_t cumulative = 0;
        for (std::size_t i = 0; i < proxy::durationBuckets.size(); ++i) {
            cumulative += h.buckets[i];
            const std::string le = number(proxy::durationBuckets[i]);
            sample(bucket, {{"le", le}}, cumulative);
        }
        cumulative += h.buckets.back();
        sample(bucket, {{"le", "+Inf"}}, cumulative);
        sample(std::string(name) + "_sum", {}, number(h.sumSeconds));
        // The count is the +Inf bucket, so the two always agree.
        sample(std::string(name) + "_count", {}, cumulative);
    }

    std::string take() { return std::move(out_); }

private:
    std::string out_;
};

std::vector<tls::CertificateSummary>
uniqueCertificates(const std::vector<tls::CertificateSummary> &all) {
    std::set<std::tuple<std::string, std::string, std::string>> seen;
    std::vector<tls::CertificateSummary> out;
    for (const auto &c : all) {
        if (seen.emplace(c.listener, c.name, c.file).second) {
            out.push_back(c);
        }
    }
    return out;
}

} // namespace

std::string renderMetrics(const proxy::StatsSnapshot &s, const StatusView &view) {
    Exposition e;
    e.family("sluice_build_info", "gauge", "Version of sluice and of the OpenSSL it runs on.");
    e.sample("sluice_build_info", {{"version", view.version}, {"openssl", view.openssl}}, "1");
    e.family("sluice_start_time_seconds", "gauge", "When the process started, in Unix seconds.");
    e.sample("sluice_start_time_seconds", {}, std::to_string(s.startUnixSeconds));
    e.family("sluice_draining", "gauge", "1 while the process drains (not accepting).");
    e.sample("sluice_draining", {}, view.draining ? "1" : "0");

    e.family("sluice_connections_accepted_total", "counter", "Client connections accepted.");
    e.sample("sluice_connections_accepted_total", {}, s.accepted);
    e.family("sluice_connections_active", "gauge", "Client connections open now.");
    e.sample("sluice_connections_active", {}, s.active);
    e.family("sluice_connections_closed_total", "counter",
             "Client connections closed, by the reason they ended.");
    for (std::size_t i = 0; i < proxy::closeReasonCount; ++i) {
        e.sample("sluice_connections_closed_total",
                 {{"reason", proxy::closeReasonName(static_cast<proxy::CloseReason>(i))}},
                 s.closed[i]);
    }
    e.family("sluice_accept_errors_total", "counter",
             "accept() failures; out of file descriptors, each connection closed unserved.");
    e.sample("sluice_accept_errors_total", {}, s.acceptErrors);
    e.family("sluice_handshake_limited_total", "counter",
             "Connections closed at accept because their IP address already had "
             "global.max_handshakes_per_ip handshakes in progress.");
    e.sample("sluice_handshake_limited_total", {}, s.handshakeLimited);
    e.family("sluice_handshake_rate_limited_total", "counter",
             "Connections closed at accept because their IP address had started "
             "global.max_handshake_rate_per_ip handshakes in the last second.");
    e.sample("sluice_handshake_rate_limited_total", {}, s.handshakeRateLimited);
    e.family("sluice_proxy_source_refused_total", "counter",
             "Connections closed at accept because their source is not in the listener's "
             "accept_proxy_from.");
    e.sample("sluice_proxy_source_refused_total", {}, s.proxySourceRefused);
    e.family("sluice_memory_releases_total", "counter",
             "Times the heap's free memory was handed back to the operating system after a "
             "burst (global.release_memory_after).");
    e.sample("sluice_memory_releases_total", {}, s.memoryReleases);
    if (s.heapInUse > 0) {
        e.family("sluice_heap_in_use_bytes", "gauge",
                 "Bytes the process's allocations hold now, every thread (glibc's mallinfo2: in "
                 "use plus mmapped). Resident memory above it is free memory the allocator keeps.");
        e.sample("sluice_heap_in_use_bytes", {}, s.heapInUse);
    }
    e.family("sluice_backend_unused_total", "counter",
             "Backend connections made once the ClientHello was accepted (connect_after = "
             "\"hello\") and closed before the client's handshake was done: the handshake "
             "failed, or the server closed it first and was connected again after.");
    e.sample("sluice_backend_unused_total", {}, s.backendUnused);

    e.family("sluice_handshakes_total", "counter",
             "TLS handshakes by result: ok, failed (alert), timeout, aborted (peer left).");
    for (std::size_t i = 0; i < proxy::handshakeResultCount; ++i) {
        e.sample("sluice_handshakes_total",
                 {{"result", proxy::handshakeResultName(static_cast<proxy::HandshakeResult>(i))}},
                 s.handshakes[i]);
    }
    e.family("sluice_handshakes_version_total", "counter",
             "Completed TLS handshakes by protocol version.");
    for (std::size_t i = 0; i < proxy::tlsVersionCount; ++i) {
        e.sample("sluice_handshakes_version_total",
                 {{"version", proxy::tlsVersionName(static_cast<proxy::TlsVersion>(i))}},
                 s.handshakesByVersion[i]);
    }
    e.family("sluice_handshakes_resumed_total", "counter",
             "Completed TLS handshakes that resumed a session.");
    e.sample("sluice_handshakes_resumed_total", {}, s.resumed);
    e.histogram("sluice_handshake_duration_seconds",
                "Time from accept until the TLS handshake completed.", s.handshakeDuration);

    e.family("sluice_backend_connect_failures_total", "counter",
             "Backend connections that failed or timed out.");
    e.sample("sluice_backend_connect_failures_total", {}, s.backendConnectFailures);
    e.histogram("sluice_backend_connect_duration_seconds",
                "Time to connect to the backend, for connections that succeeded.",
                s.backendConnectDuration);

    e.family("sluice_bytes_total", "counter",
             "Plaintext bytes moved, by direction (client_to_backend, backend_to_client).");
    e.sample("sluice_bytes_total", {{"direction", "client_to_backend"}}, s.bytesClientToBackend);
    e.sample("sluice_bytes_total", {{"direction", "backend_to_client"}}, s.bytesBackendToClient);

    e.family("sluice_reloads_total", "counter", "Configuration reloads by result.");
    e.sample("sluice_reloads_total", {{"result", "ok"}}, s.reloadsOk);
    e.sample("sluice_reloads_total", {{"result", "failed"}}, s.reloadsFailed);
    e.family("sluice_last_reload_timestamp_seconds", "gauge",
             "When the last reload ended, in Unix seconds; 0 before the first.");
    e.sample("sluice_last_reload_timestamp_seconds", {}, std::to_string(s.lastReloadUnixSeconds));
    e.family("sluice_last_reload_success", "gauge",
             "1 if the last reload succeeded (or none happened yet), else 0.");
    e.sample("sluice_last_reload_success", {}, s.lastReloadOk ? "1" : "0");

    // Labels are backend names and server addresses from the configuration: a bounded set.
    e.family("sluice_backend_server_up", "gauge",
             "1 unless passive health marked the server down (max_fails failed connects in a "
             "row; it is tried again after fail_timeout).");
    for (const auto &b : view.backends) {
        for (const auto &server : b.servers) {
            e.sample("sluice_backend_server_up", {{"backend", b.name}, {"server", server.address}},
                     server.up ? "1" : "0");
        }
    }
    e.family("sluice_backend_server_active_connections", "gauge",
             "Connections using (or connecting to) each backend server.");
    for (const auto &b : view.backends) {
        for (const auto &server : b.servers) {
            e.sample("sluice_backend_server_active_connections",
                     {{"backend", b.name}, {"server", server.address}}, server.active);
        }
    }
    e.family("sluice_backend_server_connects_total", "counter",
             "Connect attempts to each backend server by result (since the configuration was "
             "loaded: a reload starts them again).");
    for (const auto &b : view.backends) {
        for (const auto &server : b.servers) {
            e.sample("sluice_backend_server_connects_total",
                     {{"backend", b.name}, {"server", server.address}, {"result", "ok"}},
                     server.connects);
            e.sample("sluice_backend_server_connects_total",
                     {{"backend", b.name}, {"server", server.address}, {"result", "failed"}},
                     server.connectFailures);
        }
    }

    const auto certificates = uniqueCertificates(view.certificates);
    e.family("sluice_certificate_expiry_timestamp_seconds", "gauge",
             "notAfter of each loaded certificate, in Unix seconds.");
    for (const auto &c : certificates) {
        e.sample("sluice_certificate_expiry_timestamp_seconds",
                 {{"listener", c.listener}, {"name", c.name}, {"file", c.file}},
                 std::to_string(c.notAfter));
    }
    e.family("sluice_ocsp_staple_expiry_timestamp_seconds", "gauge",
             "nextUpdate of the OCSP response stapled for each certificate that has one, in Unix "
             "seconds (past it, nothing is stapled until a fresh response arrives).");
    for (const auto &c : certificates) {
        if (c.ocspNextUpdate != 0) {
            e.sample("sluice_ocsp_staple_expiry_timestamp_seconds",
                     {{"listener", c.listener}, {"name", c.name}, {"file", c.file}},
                     std::to_string(c.ocspNextUpdate));
        }
    }
    return e.take();
}

std::string renderStatus(const proxy::StatsSnapshot &s, const StatusView &view) {
    std::string out;
    out.reserve(1024);
    auto string = [&](std::string_view value) { appendJsonString(out, value); };
    // ok: serving the configuration on disk. Draining, or a failed last reload (the old
    // configuration still serves), makes it false.
    out += "{\"ok\":";
    out += view.draining || !s.lastReloadOk ? "false" : "true";
    out += ",\"status\":";
    string(view.draining ? "draining" : "serving");
    out += ",\"version\":";
    string(view.version);
    out += ",\"openssl\":";
    string(view.openssl);
    out += ",\"start_time\":" + std::to_string(s.startUnixSeconds);
    out += ",\"uptime_seconds\":" + std::to_string(view.nowUnixSeconds > s.startUnixSeconds
                                                       ? view.nowUnixSeconds - s.startUnixSeconds
                                                       : 0);
    out += ",\"connections\":{\"active\":" + std::to_string(s.active) +
           ",\"accepted\":" + std::to_string(s.accepted) + "}";
    out += ",\"listeners\":[";
    for (std::size_t i = 0; i < view.listeners.size(); ++i) {
        const auto &l = view.listeners[i];
        out += i > 0 ? ",{\"name\":" : "{\"name\":";
        string(l.name);
        out += ",\"addresses\":[";
        for (std::size_t j = 0; j < l.addresses.size(); ++j) {
            if (j > 0) {
                out += ',';
            }
            string(l.addresses[j]);
        }
        out += "],\"backend\":";
        string(l.backend);
        out += '}';
    }
    out += "],\"backends\":[";
    for (std::size_t i = 0; i < view.backends.size(); ++i) {
        const auto &b = view.backends[i];
        out += i > 0 ? ",{\"name\":" : "{\"name\":";
        string(b.name);
        out += ",\"balance\":";
        string(b.balance);
        out += ",\"tls\":";
        out += b.tls ? "true" : "false";
        out += ",\"proxy_protocol\":";
        string(b.proxyProtocol);
        out += ",\"servers\":[";
        for (std::size_t j = 0; j < b.servers.size(); ++j) {
            const auto &server = b.servers[j];
            out += j > 0 ? ",{\"address\":" : "{\"address\":";
            string(server.address);
            out += ",\"up\":";
            out += server.up ? "true" : "false";
            out += ",\"active\":" + std::to_string(server.active) +
                   ",\"failures\":" + std::to_string(server.failures) +
                   ",\"connects\":" + std::to_string(server.connects) +
                   ",\"connect_failures\":" + std::to_string(server.connectFailures) + "}";
        }
        out += "]}";
    }
    out += "],\"reload\":{\"count_ok\":" + std::to_string(s.reloadsOk) +
           ",\"count_failed\":" + std::to_string(s.reloadsFailed) + ",\"last\":";
    if (s.lastReloadUnixSeconds == 0) {
        out += "null";
    } else {
        out += "{\"ok\":";
        out += s.lastReloadOk ? "true" : "false";
        out += ",\"time\":" + std::to_string(s.lastReloadUnixSeconds) + ",\"time_text\":";
        string(rfc3339(s.lastReloadUnixSeconds * 1000000));
        out += ",\"message\":";
        string(s.lastReloadMessage);
        out += '}';
    }
    out += "},\"certificates\":[";
    bool first = true;
    for (const auto &c : uniqueCertificates(view.certificates)) {
        out += first ? "{\"listener\":" : ",{\"listener\":";
        first = false;
        string(c.listener);
        out += ",\"name\":";
        string(c.name);
        out += ",\"file\":";
        string(c.file);
        out += ",\"not_before\":" + std::to_string(c.notBefore) +
               ",\"not_after\":" + std::to_string(c.notAfter) + ",\"not_after_text\":";
        string(rfc3339(c.notAfter * 1000000));
        out += ",\"expires_in_seconds\":" + std::to_string(c.notAfter - view.nowUnixSeconds);
        out += ",\"expired\":";
        out += c.notAfter <= view.nowUnixSeconds ? "true" : "false";
        out += ",\"ocsp_next_update\":";
        out += c.ocspNextUpdate != 0 ? std::to_string(c.ocspNextUpdate) : "null";
        out += '}';
    }
    out += "]}";
    return out;
}

} // namespace sluice::ops
