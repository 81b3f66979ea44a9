// Unit tests for ops/ and proxy/stats: the statistics and their Prometheus and JSON documents,
// the admin listener's request parser (good, bad and random input) and the listener itself on a
// real loop, access-log escaping of hostile values and file reopening, and the sd_notify
// datagrams as a real AF_UNIX socket receives them.

#include <arpa/inet.h>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <netinet/in.h>
#include <poll.h>
#include <random>
#include <set>
#include <string>
#include <sys/socket.h>
#include <sys/un.h>
#include <thread>
#include <unistd.h>
#include <vector>

#include <doctest/doctest.h>
#include <uv.h>

#include "descriptors.hpp"
#include "ops/access_log.hpp"
#include "ops/admin.hpp"
#include "ops/http.hpp"
#include "ops/render.hpp"
#include "ops/systemd.hpp"
#include "ops/text.hpp"
#include "proxy/stats.hpp"
#include "temp_dir.hpp"
#include "util/log.hpp"

using namespace sluice;
using sluice::ops::HttpRequest;

namespace {

std::vector<std::string> lines(const std::string &text) {
    std::vector<std::string> out;
    std::size_t start = 0;
    while (start < text.size()) {
        const std::size_t end = text.find('\n', start);
        out.push_back(text.substr(start, end == std::string::npos ? end : end - start));
        start = end == std::string::npos ? text.size() : end + 1;
    }
    return out;
}

std::string readFile(const std::filesystem::path &path) {
    std::string out;
    std::FILE *file = std::fopen(path.c_str(), "rb");
    if (file == nullptr) {
        return out;
    }
    char buf[4096];
    for (std::size_t n; (n = std::fread(buf, 1, sizeof buf, file)) > 0;) {
        out.append(buf, n);
    }
    std::fclose(file);
    return out;
}

bool hasLine(const std::string &text, const std::string &line) {
    for (const auto &l : lines(text)) {
        if (l == line) {
            return true;
        }
    }
    return false;
}

/** Splits a logfmt line into (key, raw value) pairs, honouring quotes and backslashes. */
std::vector<std::pair<std::string, std::string>> logfmtFields(std::string_view line) {
    std::vector<std::pair<std::string, std::string>> out;
    std::size_t i = 0;
    while (i < line.size()) {
        const std::size_t eq = line.find('=', i);
        REQUIRE(eq != std::string_view::npos);
        std::string key(line.substr(i, eq - i));
        i = eq + 1;
        std::string value;
        if (i < line.size() && line[i] == '"') {
            for (++i; i < line.size() && line[i] != '"'; ++i) {
                if (line[i] == '\\') {
                    value += line[i++];
                }
                value += line[i];
            }
            ++i; // the closing quote
        } else {
            while (i < line.size() && line[i] != ' ') {
                value += line[i++];
            }
        }
        out.emplace_back(std::move(key), std::move(value));
        if (i < line.size()) {
            REQUIRE(line[i] == ' ');
            ++i;
        }
    }
    return out;
}

proxy::ConnectionRecord sampleRecord() {
    proxy::ConnectionRecord r;
    r.startUnixMicros = 1717243200123456; // 2024-06-01T12:00:00.123Z
    r.durationNanos = 12345678;
    r.listener = "web";
    r.client = "127.0.0.1:50000";
    r.backend = "127.0.0.1:8080";
    r.handshakeDone = true;
    r.protocol = "TLSv1.3";
    r.cipher = "TLS_AES_128_GCM_SHA256";
    r.sni = "example.com";
    r.alpn = "h2";
    r.resumed = true;
    r.handshakeNanos = 1500000;
    r.connectNanos = 250000;
    r.bytesClientToBackend = 100;
    r.bytesBackendToClient = 2000;
    r.reason = proxy::CloseReason::done;
    return r;
}

/** Reads one datagram (waiting up to a second). */
std::string receive(int fd) {
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, 1000) != 1) {
        return "(nothing)";
    }
    char buf[4096];
    const ssize_t n = recv(fd, buf, sizeof buf, 0);
    return n < 0 ? "(error)" : std::string(buf, static_cast<std::size_t>(n));
}

/** An AF_UNIX datagram socket bound in a temp folder (or abstract), set as NOTIFY_SOCKET. */
class NotifySocket {
public:
    explicit NotifySocket(const std::string &name) {
        fd_ = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
        REQUIRE(fd_ >= 0);
        sockaddr_un address{};
        address.sun_family = AF_UNIX;
        REQUIRE(name.size() < sizeof address.sun_path);
        std::memcpy(address.sun_path, name.data(), name.size());
        socklen_t length = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + name.size());
        if (name[0] == '@') {
            address.sun_path[0] = '\0';
        } else {
            length += 1;
        }
        REQUIRE(bind(fd_, reinterpret_cast<sockaddr *>(&address), length) == 0);
        setenv("NOTIFY_SOCKET", name.c_str(), 1);
    }
    ~NotifySocket() {
        unsetenv("NOTIFY_SOCKET");
        close(fd_);
    }
    NotifySocket(const NotifySocket &) = delete;
    NotifySocket &operator=(const NotifySocket &) = delete;
    int fd() const { return fd_; }

private:
    int fd_ = -1;
};

std::uint64_t monotonicMicros() {
    timespec now{};
    clock_gettime(CLOCK_MONOTONIC, &now);
    return static_cast<std::uint64_t>(now.tv_sec) * 1000000u +
           static_cast<std::uint64_t>(now.tv_nsec) / 1000u;
}

/** A blocking TCP connection to 127.0.0.1:`port` with a 5 s receive timeout; -1 on failure. */
int connectLoopback(int port) {
    const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        return -1;
    }
    timeval timeout{5, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_port = htons(static_cast<std::uint16_t>(port));
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, reinterpret_cast<sockaddr *>(&address), sizeof address) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/** Everything `fd` receives until EOF or the timeout; closes it. */
std::string readAll(int fd) {
    std::string out;
    char buf[4096];
    for (ssize_t n; (n = recv(fd, buf, sizeof buf, 0)) > 0;) {
        out.append(buf, static_cast<std::size_t>(n));
    }
    close(fd);
    return out;
}

/** Connects to 127.0.0.1:port, sends `request`, and reads until the server closes. */
std::string exchange(int port, const std::string &request, bool halfClose = true) {
    const int fd = connectLoopback(port);
    if (fd < 0) {
        return "(connect)";
    }
    send(fd, request.data(), request.size(), MSG_NOSIGNAL);
    if (halfClose) {
        shutdown(fd, SHUT_WR);
    }
    return readAll(fd);
}

/** An admin listener's configuration on a port the kernel chooses. */
AdminConfig loopbackAdmin() {
    AdminConfig config;
    config.enabled = true;
    config.listen = parseAddress("127.0.0.1:0");
    return config;
}

int boundPort(const ops::Admin &admin) {
    const std::string &bound = admin.boundAddress();
    return std::stoi(bound.substr(bound.rfind(':') + 1));
}

} // namespace

// --- proxy/stats
// ----------------------------------------------------------------------------------

TEST_CASE("histogram buckets are upper bounds, and the sum is in seconds") {
    proxy::Histogram h;
    h.observe(500'000);        // 0.5 ms -> le 0.001
    h.observe(1'000'000);      // exactly 1 ms -> le 0.001 (bounds are inclusive)
    h.observe(30'000'000);     // 30 ms -> le 0.05
    h.observe(60'000'000'000); // 60 s -> +Inf
    const auto s = h.snapshot();
    CHECK(s.count == 4);
    CHECK(s.buckets[0] == 2);
    CHECK(s.buckets[5] == 1);
    CHECK(s.buckets.back() == 1);
    CHECK(s.sumSeconds == doctest::Approx(60.0315));
}

TEST_CASE("counters are exact when several threads update them, more threads than shards") {
    // Each thread counts into its own shard; past the shard count, threads share one.
    proxy::Stats stats;
    std::vector<std::thread> threads;
    constexpr int threadCount = 40;
    constexpr int rounds = 2000;
    for (int t = 0; t < threadCount; ++t) {
        threads.emplace_back([&] {
            for (int i = 0; i < rounds; ++i) {
                stats.connectionAccepted();
                stats.bytesClientToBackend(3);
                stats.handshakeDone(proxy::TlsVersion::tls13, i % 2 == 0, 1'000'000);
                stats.connectionClosed(proxy::CloseReason::done);
            }
        });
    }
    for (auto &t : threads) {
        t.join();
    }
    const auto s = stats.snapshot();
    constexpr std::uint64_t total = std::uint64_t{threadCount} * rounds;
    CHECK(s.accepted == total);
    CHECK(s.active == 0);
    CHECK(s.closed[static_cast<std::size_t>(proxy::CloseReason::done)] == total);
    CHECK(s.bytesClientToBackend == 3 * total);
    CHECK(s.handshakes[static_cast<std::size_t>(proxy::HandshakeResult::ok)] == total);
    CHECK(s.handshakesByVersion[static_cast<std::size_t>(proxy::TlsVersion::tls13)] == total);
    CHECK(s.resumed == total / 2);
    CHECK(s.handshakeDuration.count == total);
    CHECK(s.handshakeDuration.buckets[0] == total); // 1 ms: the le="0.001" bucket
    CHECK(s.handshakeDuration.sumSeconds == doctest::Approx(total * 0.001));
    stats.resetForTests();
    CHECK(stats.snapshot().accepted == 0);
}

TEST_CASE("reloads are counted and the last one is remembered") {
    proxy::Stats stats;
    stats.recordReload(true, "ok");
    stats.recordReload(false, "listener web: cert.pem: no such file");
    const auto s = stats.snapshot();
    CHECK(s.reloadsOk == 1);
    CHECK(s.reloadsFailed == 1);
    CHECK_FALSE(s.lastReloadOk);
    CHECK(s.lastReloadMessage == "listener web: cert.pem: no such file");
    CHECK(s.lastReloadUnixSeconds > 1700000000);
}

TEST_CASE("every close reason has a distinct label") {
    std::vector<std::string> names;
    for (std::size_t i = 0; i < proxy::closeReasonCount; ++i) {
        names.emplace_back(proxy::closeReasonName(static_cast<proxy::CloseReason>(i)));
    }
    for (std::size_t i = 0; i < names.size(); ++i) {
        for (std::size_t j = i + 1; j < names.size(); ++j) {
            CHECK(names[i] != names[j]);
        }
    }
    CHECK(names.front() == "done");
    CHECK(names.back() == "handler_close");
}

TEST_CASE("the log rate limit lets N a second through and reports the rest once") {
    proxy::LogRateLimit limit(3);
    std::uint64_t suppressed = 99;
    for (int i = 0; i < 3; ++i) {
        CHECK(limit.admit(1000, suppressed));
        CHECK(suppressed == 0);
    }
    CHECK_FALSE(limit.admit(1500, suppressed));
    CHECK_FALSE(limit.admit(1999, suppressed));
    CHECK(limit.admit(2000, suppressed));
    CHECK(suppressed == 2);
    CHECK(limit.admit(2001, suppressed));
    CHECK(suppressed == 0);
}

TEST_CASE("a quoted log value cannot end its field early") {
    CHECK(log::quoted("plain reason") == "\"plain reason\"");
    CHECK(log::quoted("") == "\"\"");
    CHECK(log::quoted("file \"a.pem\": no such file") == "\"file 'a.pem': no such file\"");
    CHECK(log::quoted("C:\\keys\\\"x") == "\"C:'keys''x\"");
}

TEST_CASE("the access-log sink receives records and can be removed") {
    int calls = 0;
    proxy::setAccessLogSink([&](const proxy::ConnectionRecord &r) { calls += r.listener == "x"; });
    CHECK(proxy::accessLogEnabled());
    proxy::ConnectionRecord record;
    record.listener = "x";
    proxy::emitConnectionRecord(record);
    proxy::setAccessLogSink(nullptr);
    CHECK_FALSE(proxy::accessLogEnabled());
    proxy::emitConnectionRecord(record);
    CHECK(calls == 1);
}

TEST_CASE("an access log in the event log builds no record while info lines are filtered") {
    // The daemon's access log on stderr is part of the event log: at log_level "warn" its lines
    // are dropped, so connections must not format records for it either.
    proxy::setAccessLogSink([](const proxy::ConnectionRecord &) {}, true);
    log::setLevel(LogLevel::warn);
    CHECK_FALSE(proxy::accessLogEnabled());
    log::setLevel(LogLevel::info);
    CHECK(proxy::accessLogEnabled());
    // A sink of its own (a file) takes records at every level.
    proxy::setAccessLogSink([](const proxy::ConnectionRecord &) {});
    log::setLevel(LogLevel::error);
    CHECK(proxy::accessLogEnabled());
    log::setLevel(LogLevel::info);
    proxy::setAccessLogSink(nullptr);
    CHECK_FALSE(proxy::accessLogEnabled());
}

// --- Prometheus and /status
// -----------------------------------------------------------------------

TEST_CASE("metrics are typed, named per Prometheus practice, and histograms are cumulative") {
    proxy::Stats stats;
    for (int i = 0; i < 3; ++i) {
        stats.connectionAccepted();
    }
    stats.connectionClosed(proxy::CloseReason::handshakeFailed);
    stats.handshakeNotDone(proxy::HandshakeResult::failed);
    stats.handshakeDone(proxy::TlsVersion::tls13, true, 2'000'000); // 2 ms
    stats.handshakeDone(proxy::TlsVersion::tls12, false, 20'000'000);
    stats.bytesClientToBackend(1234);
    stats.bytesBackendToClient(5678);
    stats.backendConnectFailed();
    ops::StatusView view;
    view.version = "9.9.9";
    view.openssl = "OpenSSL 3.0.x";
    tls::CertificateSummary cert;
    cert.listener = "we\"b\\";
    cert.name = "line\nbreak";
    cert.file = "/etc/site.crt";
    cert.notAfter = 1800000000;
    view.certificates = {cert, cert}; // the same certificate twice is shown once
    const std::string text = ops::renderMetrics(stats.snapshot(), view);
    CAPTURE(text);

    CHECK(hasLine(text, "# TYPE sluice_connections_accepted_total counter"));
    CHECK(hasLine(text, "sluice_connections_accepted_total 3"));
    CHECK(hasLine(text, "# TYPE sluice_connections_active gauge"));
    CHECK(hasLine(text, "sluice_connections_active 2"));
    CHECK(hasLine(text, "sluice_connections_closed_total{reason=\"handshake_failed\"} 1"));
    CHECK(hasLine(text, "sluice_connections_closed_total{reason=\"done\"} 0"));
    CHECK(hasLine(text, "sluice_handshakes_total{result=\"ok\"} 2"));
    CHECK(hasLine(text, "sluice_handshakes_total{result=\"failed\"} 1"));
    CHECK(hasLine(text, "sluice_handshakes_version_total{version=\"1.3\"} 1"));
    CHECK(hasLine(text, "sluice_handshakes_resumed_total 1"));
    CHECK(hasLine(text, "# TYPE sluice_handshake_duration_seconds histogram"));
    CHECK(hasLine(text, "sluice_handshake_duration_seconds_bucket{le=\"0.001\"} 0"));
    CHECK(hasLine(text, "sluice_handshake_duration_seconds_bucket{le=\"0.0025\"} 1"));
    CHECK(hasLine(text, "sluice_handshake_duration_seconds_bucket{le=\"0.025\"} 2"));
    CHECK(hasLine(text, "sluice_handshake_duration_seconds_bucket{le=\"+Inf\"} 2"));
    CHECK(hasLine(text, "sluice_handshake_duration_seconds_sum 0.022"));
    CHECK(hasLine(text, "sluice_handshake_duration_seconds_count 2"));
    CHECK(hasLine(text, "sluice_bytes_total{direction=\"client_to_backend\"} 1234"));
    CHECK(hasLine(text, "sluice_bytes_total{direction=\"backend_to_client\"} 5678"));
    CHECK(hasLine(text, "sluice_backend_connect_failures_total 1"));
    CHECK(hasLine(text, "sluice_build_info{version=\"9.9.9\",openssl=\"OpenSSL 3.0.x\"} 1"));
    CHECK(hasLine(text, "sluice_certificate_expiry_timestamp_seconds{listener=\"we\\\"b\\\\\","
                        "name=\"line\\nbreak\",file=\"/etc/site.crt\"} 1800000000"));

    // The exposition format's grammar: each family has one HELP and one TYPE before its samples;
    // every sample line is NAME[{LABELS}] VALUE with a known family prefix.
    std::vector<std::string> families;
    std::size_t samples = 0;
    std::size_t expirySamples = 0;
    for (const auto &line : lines(text)) {
        REQUIRE_FALSE(line.empty());
        if (line.starts_with("# HELP ")) {
            continue;
        }
        if (line.starts_with("# TYPE ")) {
            const std::string name = line.substr(7, line.find(' ', 7) - 7);
            for (const auto &f : families) {
                CHECK(f != name);
            }
            families.push_back(name);
            continue;
        }
        ++samples;
        REQUIRE_FALSE(families.empty());
        CHECK(line.starts_with(families.back()));
        const std::size_t space = line.rfind(' ');
        REQUIRE(space != std::string::npos);
        const std::string value = line.substr(space + 1);
        CHECK((value == "+Inf" || value.find_first_not_of("0123456789.e+-") == std::string::npos));
        expirySamples += line.starts_with("sluice_certificate_expiry_timestamp_seconds{");
    }
    CHECK(samples > 40);
    CHECK(expirySamples == 1);
    CHECK(text.back() == '\n');
}

TEST_CASE("/status is JSON with the documented fields") {
    proxy::Stats stats;
    stats.connectionAccepted();
    stats.recordReload(false, "bad \"cert\"");
    ops::StatusView view;
    view.version = "1.2.3";
    view.nowUnixSeconds = stats.snapshot().startUnixSeconds + 42;
    view.listeners = {{"web", {"127.0.0.1:8443", "[::1]:8443"}, "127.0.0.1:8080"}};
    tls::CertificateSummary cert;
    cert.listener = "web";
    cert.name = "example.com";
    cert.file = "/c.pem";
    cert.notAfter = view.nowUnixSeconds + 100;
    view.certificates = {cert};
    const std::string json = ops::renderStatus(stats.snapshot(), view);
    CAPTURE(json);
    CHECK(json.starts_with("{\"ok\":false,")); // the last reload failed
    CHECK(json.find("\"status\":\"serving\"") != std::string::npos);
    CHECK(json.find("\"version\":\"1.2.3\"") != std::string::npos);
    CHECK(json.find("\"uptime_seconds\":42") != std::string::npos);
    CHECK(json.find("\"listeners\":[{\"name\":\"web\",\"addresses\":[\"127.0.0.1:8443\","
                    "\"[::1]:8443\"],\"backend\":\"127.0.0.1:8080\"}]") != std::string::npos);
    CHECK(json.find("\"message\":\"bad \\\"cert\\\"\"") != std::string::npos);
    CHECK(json.find("\"expires_in_seconds\":100") != std::string::npos);
    CHECK(json.find("\"connections\":{\"active\":1,\"accepted\":1}") != std::string::npos);
}

TEST_CASE("backend pools and their servers' health in /status and /metrics") {
    proxy::Stats stats;
    ops::StatusView view;
    ops::BackendStatus pool;
    pool.name = "app";
    pool.balance = "round-robin";
    pool.tls = true;
    pool.proxyProtocol = "v2";
    pool.servers.push_back({"127.0.0.1:9001", true, 3, 0, 10, 1});
    pool.servers.push_back({"unix:/run/app.sock", false, 0, 4, 2, 7});
    view.backends = {pool};
    const std::string json = ops::renderStatus(stats.snapshot(), view);
    CAPTURE(json);
    CHECK(json.find("\"backends\":[{\"name\":\"app\",\"balance\":\"round-robin\",\"tls\":true,"
                    "\"proxy_protocol\":\"v2\",\"servers\":[{\"address\":\"127.0.0.1:9001\","
                    "\"up\":true,\"active\":3,\"failures\":0,\"connects\":10,"
                    "\"connect_failures\":1},{\"address\":\"unix:/run/app.sock\",\"up\":false,"
                    "\"active\":0,\"failures\":4,\"connects\":2,\"connect_failures\":7}]}]") !=
          std::string::npos);
    const std::string metrics = ops::renderMetrics(stats.snapshot(), view);
    CAPTURE(metrics);
    CHECK(metrics.find("# TYPE sluice_backend_server_up gauge") != std::string::npos);
    CHECK(metrics.find("sluice_backend_server_up{backend=\"app\",server=\"127.0.0.1:9001\"} 1\n") !=
          std::string::npos);
    CHECK(metrics.find("sluice_backend_server_up{backend=\"app\",server=\"unix:/run/app.sock\"} "
                       "0\n") != std::string::npos);
    CHECK(metrics.find("sluice_backend_server_active_connections{backend=\"app\",server=\"127.0.0."
                       "1:9001\"} 3\n") != std::string::npos);
    CHECK(metrics.find("sluice_backend_server_connects_total{backend=\"app\",server=\"unix:/run/"
                       "app.sock\",result=\"failed\"} 7\n") != std::string::npos);
}

// --- The request parser
// ---------------------------------------------------------------------------

TEST_CASE("the parser accepts well-formed GET and HEAD requests") {
    auto r = ops::parseRequest("GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n");
    CHECK(r.state == HttpRequest::State::complete);
    CHECK(r.method == "GET");
    CHECK(r.path == "/metrics");
    r = ops::parseRequest("HEAD /status?pretty=1 HTTP/1.0\r\n\r\n");
    CHECK(r.state == HttpRequest::State::complete);
    CHECK(r.method == "HEAD");
    CHECK(r.path == "/status");
    r = ops::parseRequest("GET /ready HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    CHECK(r.state == HttpRequest::State::complete);
}

TEST_CASE("the parser waits for the end of the headers, byte by byte") {
    const std::string request = "GET /ready HTTP/1.1\r\nHost: localhost:9901\r\n\r\n";
    for (std::size_t n = 0; n < request.size(); ++n) {
        CAPTURE(n);
        CHECK(ops::parseRequest(std::string_view(request).substr(0, n)).state ==
              HttpRequest::State::incomplete);
    }
    CHECK(ops::parseRequest(request).state == HttpRequest::State::complete);
}

TEST_CASE("the parser refuses bad requests with the right status") {
    auto status = [](std::string_view text) {
        const auto r = ops::parseRequest(text);
        return r.state == HttpRequest::State::bad ? r.status : 0;
    };
    CHECK(status("POST /metrics HTTP/1.1\r\n\r\n") == 405);
    CHECK(status("GET /metrics HTTP/2.0\r\n\r\n") == 505);
    CHECK(status("GET /metrics HTTP/1.1\n\n") == 400);      // bare LF
    CHECK(status("GET /metrics HTTP/1.1\r\r\n") == 400);    // bare CR
    CHECK(status("GET metrics HTTP/1.1\r\n\r\n") == 400);   // not origin-form
    CHECK(status("GET  /metrics HTTP/1.1\r\n\r\n") == 400); // double space
    CHECK(status("GET /m\x01 HTTP/1.1\r\n\r\n") == 400);    // control byte in the target
    CHECK(status(std::string_view("GET /\0 HTTP/1.1\r\n", 17)) == 400); // NUL, before the end
    CHECK(status("GET / HTTP/1.1\r\nNoColon\r\n\r\n") == 400);
    CHECK(status("GET / HTTP/1.1\r\nBad Name: x\r\n\r\n") == 400);
    CHECK(status("GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n") == 400);
    CHECK(status("GET / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello") == 400);
    CHECK(status("GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n") == 400);
    CHECK(status(std::string_view("\x16\x03\x01\x02\x00\x01", 6)) == 400); // a TLS ClientHello
    CHECK(status("\x16") == 400);
    CHECK(status("GET / HTTP/1.1\r\n" + std::string(9000, 'a')) == 431);
    CHECK(status("GET /" + std::string(9000, 'a')) == 414);
    CHECK(status("GET /" + std::string(3000, 'a') + " HTTP/1.1\r\n") == 414);
    std::string many = "GET / HTTP/1.1\r\n";
    for (int i = 0; i < 100; ++i) {
        many += "X: y\r\n";
    }
    CHECK(status(many + "\r\n") == 431);
}

TEST_CASE("the parser survives random bytes and random mutations") {
    std::mt19937 random(20240601);
    const std::string good = "GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n";
    for (int round = 0; round < 20000; ++round) {
        std::string input;
        if (round % 2 == 0) {
            input.resize(random() % 64);
            for (char &c : input) {
                c = static_cast<char>(random());
            }
        } else {
            input = good;
            for (int k = 0; k < 3; ++k) {
                input[random() % input.size()] = static_cast<char>(random());
            }
        }
        const auto r = ops::parseRequest(input);
        if (r.state == HttpRequest::State::bad) {
            CHECK(r.status >= 400);
        } else if (r.state == HttpRequest::State::complete) {
            CHECK((r.method == "GET" || r.method == "HEAD"));
            CHECK(r.path.starts_with("/"));
        }
    }
}

// --- The admin listener
// ---------------------------------------------------------------------------

TEST_CASE("admin responses: /ready follows draining, unknown paths are 404, HEAD has no body") {
    uv_loop_t loop;
    uv_loop_init(&loop);
    {
        ops::Admin admin(&loop, loopbackAdmin(), {});
        auto get = [&](const char *text) { return admin.respond(ops::parseRequest(text)); };
        CHECK(get("GET /ready HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 200 OK\r\n"));
        admin.setDraining(true);
        const std::string draining = get("GET /ready HTTP/1.1\r\n\r\n");
        CHECK(draining.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
        CHECK(draining.ends_with("\r\n\r\ndraining\n"));
        CHECK(get("GET /nope HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404 "));
        const std::string head = get("HEAD /metrics HTTP/1.1\r\n\r\n");
        CHECK(head.starts_with("HTTP/1.1 200 OK\r\n"));
        CHECK(head.ends_with("\r\n\r\n"));
        CHECK(head.find("Content-Type: text/plain; version=0.0.4") != std::string::npos);
        CHECK(get("DELETE / HTTP/1.1\r\n\r\n").find("Allow: GET, HEAD\r\n") != std::string::npos);
        bool closed = false;
        admin.close([&] { closed = true; });
        CHECK_FALSE(closed); // never inside the call
        uv_run(&loop, UV_RUN_DEFAULT);
        CHECK(closed);
    }
    CHECK(uv_loop_close(&loop) == 0);
}

TEST_CASE("the admin listener serves real sockets, shrugs off garbage, and closes cleanly") {
    uv_loop_t loop;
    uv_loop_init(&loop);
    {
        ops::StatusSource source;
        source.listeners = [] {
            return std::vector<ops::ListenerStatus>{{"web", {"127.0.0.1:1"}, "127.0.0.1:2"}};
        };
        ops::Admin admin(&loop, loopbackAdmin(), source);
        admin.start();
        REQUIRE(admin.boundAddress().starts_with("127.0.0.1:"));
        const int port = boundPort(admin);
        CHECK(port > 0);

        std::vector<std::string> answers(6);
        uv_async_t finished;
        uv_async_init(&loop, &finished, [](uv_async_t *async) {
            auto *a = static_cast<ops::Admin *>(async->data);
            a->close(nullptr);
            uv_close(reinterpret_cast<uv_handle_t *>(async), nullptr);
        });
        finished.data = &admin;
        std::thread client([&] {
            answers[0] = exchange(port, "GET /status HTTP/1.1\r\nHost: x\r\n\r\n");
            answers[1] = exchange(port, std::string(20000, 'x'));
            answers[2] = exchange(port, std::string("\x16\x03\x01\x00\x05hello", 10));
            answers[3] = exchange(port, "GET /metrics HTTP/1.1\r\n\r\n", false);
            answers[4] = exchange(port, "GET /ready HTTP/1.1\r\n\r\nGET /ready HTTP/1.1\r\n\r\n");
            // A client that sends half a request and waits: the request timeout ends it.
            answers[5] = exchange(port, "GET /ready HTTP/1.1\r\n", false);
            uv_async_send(&finished);
        });
        uv_run(&loop, UV_RUN_DEFAULT);
        client.join();
        CHECK(answers[0].starts_with("HTTP/1.1 200 OK\r\n"));
        CHECK(answers[0].find("Connection: close\r\n") != std::string::npos);
        CHECK(answers[0].find("\"listeners\":[{\"name\":\"web\"") != std::string::npos);
        CHECK(answers[1].starts_with("HTTP/1.1 4"));
        CHECK(answers[2].starts_with("HTTP/1.1 400 "));
        CHECK(answers[3].find("# TYPE sluice_connections_accepted_total counter") !=
              std::string::npos);
        CHECK(answers[4].starts_with("HTTP/1.1 200 OK\r\n"));
        CHECK(answers[4].find("HTTP/1.1", 8) == std::string::npos); // one response per connection
        CHECK(answers[5].empty());
    }
    CHECK(uv_loop_close(&loop) == 0);
}

TEST_CASE("the admin listener reports a bind failure") {
    uv_loop_t loop;
    uv_loop_init(&loop);
    {
        AdminConfig config = loopbackAdmin();
        ops::Admin first(&loop, config, {});
        first.start();
        config.listen = parseAddress(first.boundAddress());
        ops::Admin second(&loop, config, {});
        CHECK_THROWS_WITH_AS(second.start(), doctest::Contains("admin listen 127.0.0.1:"),
                             std::runtime_error);
        first.close(nullptr);
        second.close(nullptr);
        uv_run(&loop, UV_RUN_DEFAULT);
    }
    CHECK(uv_loop_close(&loop) == 0);
}

TEST_CASE("out of descriptors, the admin listener answers on its reserve descriptor, keeps the "
          "next client waiting until that is free, and gives the reserve back when closed") {
    using test::DescriptorFiller;
    using test::openDescriptors;
    uv_loop_t loop;
    // What the first loop in a process leaves open for the process's life (libuv's signal
    // pipe) is not this test's business.
    uv_loop_init(&loop);
    uv_loop_close(&loop);
    const int before = openDescriptors();
    uv_loop_init(&loop);
    {
        ops::Admin admin(&loop, loopbackAdmin(), {});
        admin.start();
        const int port = boundPort(admin);
        uv_async_t finished;
        uv_async_init(&loop, &finished, [](uv_async_t *async) {
            static_cast<ops::Admin *>(async->data)->close(nullptr);
            uv_close(reinterpret_cast<uv_handle_t *>(async), nullptr);
        });
        finished.data = &admin;
        const int serving = openDescriptors(); // the listening socket and the reserve among them

        const auto send = [](int fd, std::string_view text) {
            ::send(fd, text.data(), text.size(), MSG_NOSIGNAL);
        };

        std::string alone, holder, waiter;
        bool waiterAnsweredEarly = true;
        bool reserveBack = false;
        std::thread client([&] {
            {
                // One slot free, which the client's socket takes: accept() fails with EMFILE.
                const DescriptorFiller full(1);
                alone = exchange(port, "GET /ready HTTP/1.1\r\n\r\n");
            }
            // The reserve comes back once that connection is closed on the admin's side.
            for (int i = 0; i < 200 && !reserveBack; ++i) {
                reserveBack = openDescriptors() == serving;
                std::this_thread::sleep_for(std::chrono::milliseconds(10));
            }
            {
                // Two clients, no descriptor to spare: the first takes the reserve and holds it
                // with half a request; the second must wait in the backlog, not be shed.
                const DescriptorFiller full(2);
                const int first = connectLoopback(port); // -1 fails the checks below
                send(first, "GET /ready HTTP/1.1\r\n");
                const int second = connectLoopback(port);
                send(second, "GET /metrics HTTP/1.1\r\n\r\n");
                shutdown(second, SHUT_WR);
                pollfd waiting{second, POLLIN, 0};
                waiterAnsweredEarly = poll(&waiting, 1, 300) != 0;
                send(first, "\r\n");
                holder = readAll(first);
                waiter = readAll(second);
            }
            uv_async_send(&finished);
        });
        uv_run(&loop, UV_RUN_DEFAULT);
        client.join();
        CHECK(alone.starts_with("HTTP/1.1 200 OK\r\n"));
        CHECK(alone.ends_with("ready\n"));
        CHECK(reserveBack);
        CHECK_FALSE(waiterAnsweredEarly);
        CHECK(holder.starts_with("HTTP/1.1 200 OK\r\n"));
        CHECK(waiter.starts_with("HTTP/1.1 200 OK\r\n"));
        CHECK(waiter.find("# TYPE sluice_connections_accepted_total counter") != std::string::npos);
    }
    CHECK(uv_loop_close(&loop) == 0);
    CHECK(openDescriptors() == before); // the listening socket and the reserve closed with it
}

// --- Access log
// -----------------------------------------------------------------------------------

TEST_CASE("logfmt access lines carry every field") {
    const std::string line = ops::formatLogfmt(sampleRecord());
    CHECK(line == "ts=2024-06-01T12:00:00.123Z event=access listener=web client=127.0.0.1:50000 "
                  "tls=TLSv1.3 cipher=TLS_AES_128_GCM_SHA256 sni=example.com alpn=h2 "
                  "resumed=true backend=127.0.0.1:8080 handshake_ms=1.500 connect_ms=0.250 "
                  "bytes_in=100 bytes_out=2000 duration_ms=12.345 reason=done");
}

TEST_CASE("JSON access lines carry every field") {
    auto record = sampleRecord();
    record.connectNanos = -1;
    record.reason = proxy::CloseReason::backendFailed;
    record.error = "connect: ECONNREFUSED";
    const std::string line = ops::formatJson(record);
    CHECK(line == "{\"ts\":\"2024-06-01T12:00:00.123Z\",\"event\":\"access\",\"listener\":\"web\","
                  "\"client\":\"127.0.0.1:50000\",\"tls\":\"TLSv1.3\","
                  "\"cipher\":\"TLS_AES_128_GCM_SHA256\",\"sni\":\"example.com\","
                  "\"alpn\":\"h2\",\"resumed\":true,\"client_id\":\"\","
                  "\"backend\":\"127.0.0.1:8080\",\"handshake_ms\":1.500,\"connect_ms\":null,"
                  "\"bytes_in\":100,\"bytes_out\":2000,\"duration_ms\":12.345,"
                  "\"reason\":\"backend_failed\",\"error\":\"connect: ECONNREFUSED\"}");
}

TEST_CASE("hostile SNI values cannot forge fields or lines") {
    auto record = sampleRecord();
    record.sni = "evil\" reason=done x=\"\n{\"a\":1}\\\x01\x7f\xff\xc3\xa9";
    record.clientIdentity = "spiffe://x/\xe2\x82\xac"; // valid UTF-8 (the euro sign)

    const std::string logfmt = ops::formatLogfmt(record);
    CAPTURE(logfmt);
    CHECK(logfmt.find('\n') == std::string::npos);
    for (char c : logfmt) {
        const auto u = static_cast<unsigned char>(c);
        CHECK((u >= 0x20 && u < 0x7f));
    }
    CHECK(logfmt.find(" sni=\"evil\\\" reason=done x=\\\"\\n{\\\"a\\\":1}\\\\\\x01\\x7f\\xff"
                      "\\xc3\\xa9\" ") != std::string::npos);
    // A logfmt reader sees each key once: the forged ones stay inside the quoted value.
    const auto fields = logfmtFields(logfmt);
    std::set<std::string> keys;
    for (const auto &[key, value] : fields) {
        CHECK(keys.insert(key).second);
    }
    CHECK(keys.count("x") == 0);
    CHECK(fields.size() == 17);

    const std::string json = ops::formatJson(record);
    CAPTURE(json);
    CHECK(json.find('\n') == std::string::npos);
    CHECK(json.find("\"sni\":\"evil\\\" reason=done x=\\\"\\n{\\\"a\\\":1}\\\\\\u0001\\u007f"
                    "\\ufffd\xc3\xa9\"") != std::string::npos);
    CHECK(json.find("\"client_id\":\"spiffe://x/\xe2\x82\xac\"") != std::string::npos);
}

TEST_CASE("JSON strings: overlong forms and surrogates are not UTF-8") {
    std::string out;
    ops::appendJsonString(out, "\xc0\xaf|\xed\xa0\x80|\xf4\x90\x80\x80|\xf0\x9f\x98\x80");
    CHECK(out == "\"\\ufffd\\ufffd|\\ufffd\\ufffd\\ufffd|\\ufffd\\ufffd\\ufffd\\ufffd|"
                 "\xf0\x9f\x98\x80\"");
}

TEST_CASE("the access log appends to a file and reopens it after rotation") {
    sluice::test::TempDir dir("sluice-ops");
    LogConfig config;
    config.access = (dir.path() / "access.log").string();
    config.format = AccessLogFormat::json;
    auto log = ops::AccessLog::open(config);
    REQUIRE(log);
    ops::AccessLog::install(log);
    proxy::emitConnectionRecord(sampleRecord());
    std::filesystem::rename(dir.path() / "access.log", dir.path() / "access.log.1");
    proxy::emitConnectionRecord(sampleRecord()); // still the old file, as logrotate expects
    std::string error;
    CHECK(log->reopen(&error));
    proxy::emitConnectionRecord(sampleRecord());
    ops::AccessLog::install(nullptr);
    CHECK(lines(readFile(dir.path() / "access.log.1")).size() == 2);
    const auto now = lines(readFile(dir.path() / "access.log"));
    REQUIRE(now.size() == 1);
    CHECK(now[0] == ops::formatJson(sampleRecord()));

    config.access = "off";
    CHECK_FALSE(ops::AccessLog::open(config));
    config.access = (dir.path() / "missing" / "access.log").string();
    CHECK_THROWS_WITH_AS(ops::AccessLog::open(config), doctest::Contains("missing/access.log"),
                         std::runtime_error);
}

// --- systemd notify
// -------------------------------------------------------------------------------

TEST_CASE("notify datagrams reach a path socket in the documented format") {
    sluice::test::TempDir dir("sluice-ops");
    NotifySocket socket((dir.path() / "notify").string());
    CHECK(ops::systemd::notifyReady("serving 2 listeners"));
    CHECK(receive(socket.fd()) == "READY=1\nSTATUS=serving 2 listeners\n");
    const std::uint64_t before = monotonicMicros();
    CHECK(ops::systemd::notifyReloading());
    const std::uint64_t after = monotonicMicros();
    const std::string reloading = receive(socket.fd());
    REQUIRE(reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="));
    const std::uint64_t stamp =
        std::stoull(reloading.substr(std::strlen("RELOADING=1\nMONOTONIC_USEC=")));
    CHECK(stamp >= before);
    CHECK(stamp <= after);
    CHECK(reloading.ends_with("\n"));
    CHECK(ops::systemd::notifyStopping());
    CHECK(receive(socket.fd()) == "STOPPING=1\n");
    CHECK(ops::systemd::notifyStatus("two\nlines"));
    CHECK(receive(socket.fd()) == "STATUS=two lines\n");
    CHECK(ops::systemd::reloadingMessage(5, "x") == "RELOADING=1\nMONOTONIC_USEC=5\nSTATUS=x\n");
}

TEST_CASE("notify reaches an abstract socket ('@' names)") {
    const std::string name = "@sluice-ops-test-" + std::to_string(getpid());
    NotifySocket socket(name);
    CHECK(ops::systemd::notifyReady());
    CHECK(receive(socket.fd()) == "READY=1\n");
}

TEST_CASE("without NOTIFY_SOCKET notifications do nothing") {
    unsetenv("NOTIFY_SOCKET");
    CHECK_FALSE(ops::systemd::notifyReady());
    setenv("NOTIFY_SOCKET", "relative/path", 1);
    CHECK_FALSE(ops::systemd::notifyReady());
    unsetenv("NOTIFY_SOCKET");
}

TEST_CASE("the watchdog pings from the loop at half the interval, for this process only") {
    sluice::test::TempDir dir("sluice-ops");
    NotifySocket socket((dir.path() / "notify").string());
    setenv("WATCHDOG_USEC", "40000", 1); // 40 ms: a ping every 20 ms
    setenv("WATCHDOG_PID", std::to_string(getpid() + 1).c_str(), 1);
    CHECK(ops::systemd::watchdogMicros() == 0);
    setenv("WATCHDOG_PID", std::to_string(getpid()).c_str(), 1);
    CHECK(ops::systemd::watchdogMicros() == 40000);

    uv_loop_t loop;
    uv_loop_init(&loop);
    {
        ops::systemd::Watchdog watchdog(&loop);
        REQUIRE(watchdog.start());
        CHECK(watchdog.intervalMicros() == 40000);
        uv_timer_t stop;
        uv_timer_init(&loop, &stop);
        stop.data = &watchdog;
        uv_timer_start(
            &stop,
            [](uv_timer_t *timer) {
                static_cast<ops::systemd::Watchdog *>(timer->data)->close();
                uv_close(reinterpret_cast<uv_handle_t *>(timer), nullptr);
            },
            110, 0);
        uv_run(&loop, UV_RUN_DEFAULT);
    }
    CHECK(uv_loop_close(&loop) == 0);
    int pings = 0;
    for (std::string m = receive(socket.fd()); m == "WATCHDOG=1\n"; m = receive(socket.fd())) {
        ++pings;
    }
    // One at start, then one every 20 ms for 110 ms; a loaded machine may lose a few.
    CHECK(pings >= 3);
    CHECK(pings <= 7);
    unsetenv("WATCHDOG_USEC");
    unsetenv("WATCHDOG_PID");
}

TEST_CASE("OCSP staple expiry: a gauge and a /status field for certificates that have one") {
    proxy::Stats stats;
    ops::StatusView view;
    view.nowUnixSeconds = 1000;
    tls::CertificateSummary stapled;
    stapled.listener = "web";
    stapled.name = "a.example";
    stapled.file = "/a.pem";
    stapled.notAfter = 9000;
    stapled.ocspNextUpdate = 5000;
    tls::CertificateSummary bare = stapled;
    bare.name = "b.example";
    bare.file = "/b.pem";
    bare.ocspNextUpdate = 0;
    view.certificates = {stapled, bare};
    const std::string metrics = ops::renderMetrics(stats.snapshot(), view);
    CAPTURE(metrics);
    CHECK(metrics.find("# TYPE sluice_ocsp_staple_expiry_timestamp_seconds gauge") !=
          std::string::npos);
    CHECK(metrics.find("sluice_ocsp_staple_expiry_timestamp_seconds{listener=\"web\",name=\"a."
                       "example\",file=\"/a.pem\"} 5000\n") != std::string::npos);
    CHECK(metrics.find("sluice_ocsp_staple_expiry_timestamp_seconds{listener=\"web\",name=\"b.") ==
          std::string::npos);
    const std::string json = ops::renderStatus(stats.snapshot(), view);
    CAPTURE(json);
    CHECK(json.find("\"ocsp_next_update\":5000") != std::string::npos);
    CHECK(json.find("\"ocsp_next_update\":null") != std::string::npos);
}
