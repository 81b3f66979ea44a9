// Unit tests for proxy/proxy_protocol: the PROXY v1 and v2 examples of the specification, round
// trips from the builders through the parser with every TLV, the same results when the bytes
// arrive one at a time, every class of invalid header rejected at the first byte that rules it
// out, the length limits, CRC32c, values too large for the header, the allow-list network
// match with IPv4-mapped addresses and odd prefixes, and the client-address key of the
// per-address limits.

#include <arpa/inet.h>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <netinet/in.h>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <sys/socket.h>
#include <sys/un.h>
#include <vector>

#include <doctest/doctest.h>

#include "net/address.hpp"
#include "proxy/proxy_protocol.hpp"
#include "proxy/server.hpp"

using namespace sluice;
using namespace sluice::proxy;

namespace {

std::span<const std::uint8_t> span(std::string_view s) {
    return {reinterpret_cast<const std::uint8_t *>(s.data()), s.size()};
}

ProxyParse parse(std::string_view s, std::size_t maxLength = maxProxyV2Length) {
    return parseProxyHeader(span(s), maxLength);
}

sockaddr_storage ip(const char *text, std::uint16_t port) {
    sockaddr_storage storage{};
    auto *in = reinterpret_cast<sockaddr_in *>(&storage);
    auto *in6 = reinterpret_cast<sockaddr_in6 *>(&storage);
    if (inet_pton(AF_INET, text, &in->sin_addr) == 1) {
        in->sin_family = AF_INET;
        in->sin_port = htons(port);
    } else {
        REQUIRE(inet_pton(AF_INET6, text, &in6->sin6_addr) == 1);
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons(port);
    }
    return storage;
}

const sockaddr *raw(const sockaddr_storage &storage) {
    return reinterpret_cast<const sockaddr *>(&storage);
}

std::string text(const sockaddr_storage &storage) {
    if (storage.ss_family == AF_UNSPEC) {
        return "-";
    }
    return net::format(raw(storage));
}

/** The v2 signature followed by `rest`. */
std::string v2(std::string_view rest) {
    return std::string("\r\n\r\n\0\r\nQUIT\n", 12) + std::string(rest);
}

std::string bytes(std::initializer_list<int> values) {
    std::string out;
    for (int v : values) {
        out += static_cast<char>(v);
    }
    return out;
}

/** Feeds `s` one byte more at a time: the first call that is not needMore, and its byte count. */
std::pair<ProxyParse, std::size_t> bytewise(std::string_view s,
                                            std::size_t maxLength = maxProxyV2Length) {
    for (std::size_t n = 0; n <= s.size(); ++n) {
        ProxyParse result = parse(s.substr(0, n), maxLength);
        if (result.status != ProxyParse::needMore) {
            return {std::move(result), n};
        }
    }
    return {parse(s, maxLength), s.size() + 1};
}

/** The parse of `s` is invalid with `error`, decided exactly when byte `at` (1-based) arrived. */
void checkInvalidAt(std::string_view s, std::size_t at, std::string_view error,
                    std::size_t maxLength = maxProxyV2Length) {
    INFO("header: " << std::string(s));
    auto [result, count] = bytewise(s, maxLength);
    CHECK(result.status == ProxyParse::invalid);
    CHECK(result.error == error);
    CHECK(count == at);
}

/** Whole and byte by byte, `s` gives the same done result; returns it. */
ProxyParse checkDone(std::string_view s, std::size_t maxLength = maxProxyV2Length) {
    const ProxyParse whole = parse(s, maxLength);
    INFO("error: " << whole.error);
    REQUIRE(whole.status == ProxyParse::done);
    auto [incremental, count] = bytewise(s, maxLength);
    REQUIRE(incremental.status == ProxyParse::done);
    CHECK(count == whole.length);
    CHECK(incremental.length == whole.length);
    CHECK(incremental.version == whole.version);
    CHECK(incremental.local == whole.local);
    CHECK(text(incremental.source) == text(whole.source));
    CHECK(text(incremental.destination) == text(whole.destination));
    CHECK(incremental.tlvs == whole.tlvs);
    return whole;
}

Network network(const char *address, unsigned prefix) {
    Network n;
    if (inet_pton(AF_INET, address, n.bytes) == 1) {
        n.family = AF_INET;
    } else {
        REQUIRE(inet_pton(AF_INET6, address, n.bytes) == 1);
        n.family = AF_INET6;
    }
    n.prefix = prefix;
    return n;
}

bool contains(const Network &n, const char *address) {
    const sockaddr_storage a = ip(address, 1);
    return networkContains(n, raw(a));
}

ProxyTlvFacts everyFact() {
    ProxyTlvFacts facts;
    facts.alpn = "h2";
    facts.authority = "www.example.com";
    facts.tls = true;
    facts.version = "TLSv1.3";
    facts.cipher = "TLS_AES_128_GCM_SHA256";
    facts.sigAlg = "SHA256-RSA";
    facts.keyAlg = "RSA2048";
    facts.clientCertConnection = true;
    facts.clientCertSession = true;
    facts.verifyResult = 0x01020304;
    facts.clientCn = "client.example.com";
    facts.clientCertDer = std::string("\x30\x82\x01\x00\x00\xff", 6);
    return facts;
}

/** A v2 header with `extra` appended as TLV bytes (the length field adjusted). */
std::string withTlvBytes(std::string header, std::string_view extra) {
    header += extra;
    const std::size_t length = header.size() - 16;
    header[14] = static_cast<char>(length >> 8);
    header[15] = static_cast<char>(length & 0xFF);
    return header;
}

/** `header` with a CRC32C TLV appended and filled in. */
std::string withCrc(std::string header) {
    header = withTlvBytes(std::move(header), bytes({0x03, 0x00, 0x04, 0, 0, 0, 0}));
    const std::uint32_t crc = crc32c(span(header));
    const std::size_t at = header.size() - 4;
    for (int i = 0; i < 4; ++i) {
        header[at + static_cast<std::size_t>(i)] = static_cast<char>((crc >> (24 - 8 * i)) & 0xFF);
    }
    return header;
}

} // namespace

// 1. The specification's examples.

TEST_CASE("v1: the specification's TCP4 example, followed by HTTP") {
    const std::string line = "PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n";
    const ProxyParse r = checkDone(line + "GET / HTTP/1.1\r\nHost: 192.168.0.11\r\n\r\n");
    CHECK(r.version == 1);
    CHECK(r.length == line.size());
    CHECK_FALSE(r.local);
    CHECK(text(r.source) == "192.168.0.1:56324");
    CHECK(text(r.destination) == "192.168.0.11:443");
    CHECK(r.tlvs.empty());
}

TEST_CASE("v1: the longest lines the specification lists") {
    const std::string f = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
    const std::string tcp4 = "PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n";
    CHECK(tcp4.size() == 56);
    CHECK(checkDone(tcp4).length == 56);
    const std::string tcp6 = "PROXY TCP6 " + f + " " + f + " 65535 65535\r\n";
    CHECK(tcp6.size() == 104);
    const ProxyParse r6 = checkDone(tcp6);
    CHECK(text(r6.source) == "[" + f + "]:65535");
    const ProxyParse shortUnknown = checkDone("PROXY UNKNOWN\r\n");
    CHECK(shortUnknown.length == 15);
    CHECK(shortUnknown.local);
    CHECK(shortUnknown.source.ss_family == AF_UNSPEC);
    const std::string worst = "PROXY UNKNOWN " + f + " " + f + " 65535 65535\r\n";
    CHECK(worst.size() == maxProxyV1Length);
    const ProxyParse w = checkDone(worst);
    CHECK(w.local);
    CHECK(w.length == 107);
}

TEST_CASE("v2: a TCP over IPv4 header as the specification lays it out") {
    const std::string header = v2(
        bytes({0x21, 0x11, 0x00, 0x0C, 192, 168, 0, 1, 192, 168, 0, 11, 0xDC, 0x04, 0x01, 0xBB}));
    const ProxyParse r = checkDone(header + "\x16\x03\x01");
    CHECK(r.version == 2);
    CHECK(r.length == 28);
    CHECK_FALSE(r.local);
    CHECK(text(r.source) == "192.168.0.1:56324");
    CHECK(text(r.destination) == "192.168.0.11:443");
}

TEST_CASE("v2: TCP over IPv6") {
    std::string block(36, '\0');
    block[15] = 1;    // ::1
    block[16] = 0x20; // 2001:db8::2
    block[17] = 0x01;
    block[18] = 0x0d;
    block[19] = static_cast<char>(0xb8);
    block[31] = 2;
    block[32] = 0x30; // 12345
    block[33] = 0x39;
    block[34] = 0x00; // 80
    block[35] = 0x50;
    const ProxyParse r = checkDone(v2(bytes({0x21, 0x21, 0x00, 36}) + block));
    CHECK(r.length == 52);
    CHECK(text(r.source) == "[::1]:12345");
    CHECK(text(r.destination) == "[2001:db8::2]:80");
}

TEST_CASE("v2: LOCAL health checks, UNSPEC, UNIX and UDP are local") {
    const ProxyParse local = checkDone(v2(bytes({0x20, 0x00, 0x00, 0x00})));
    CHECK(local.local);
    CHECK(local.length == 16);
    CHECK(local.source.ss_family == AF_UNSPEC);
    CHECK(local.destination.ss_family == AF_UNSPEC);

    // LOCAL with an IPv4 block: the block is skipped, its addresses are not reported.
    const ProxyParse localV4 =
        checkDone(v2(bytes({0x20, 0x11, 0x00, 0x0C, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0, 2})));
    CHECK(localV4.local);
    CHECK(localV4.source.ss_family == AF_UNSPEC);

    // PROXY with UNSPEC: no address block; what follows is TLVs.
    const ProxyParse unspec =
        checkDone(v2(bytes({0x21, 0x00, 0x00, 0x05, 0x02, 0x00, 0x02, 'h', 'i'})));
    CHECK(unspec.local);
    REQUIRE(unspec.tlvs.size() == 1);
    CHECK(unspec.tlvs[0] == ProxyTlv{0x02, "hi"});

    // UDP over IPv4 and IPv6, UNIX stream and datagram: accepted, treated as local.
    const ProxyParse udp4 =
        checkDone(v2(bytes({0x21, 0x12, 0x00, 0x0C}) + std::string(12, '\x01')));
    CHECK(udp4.local);
    const ProxyParse udp6 = checkDone(v2(bytes({0x21, 0x22, 0x00, 36}) + std::string(36, '\x01')));
    CHECK(udp6.local);
    for (int family : {0x31, 0x32}) {
        const ProxyParse unix =
            checkDone(v2(bytes({0x21, family, 0x00, 216}) + std::string(216, 'u')));
        CHECK(unix.local);
        CHECK(unix.length == 16 + 216);
    }
}

// 2. Builders and round trips.

TEST_CASE("v1 builder: TCP4 and TCP6 round trips") {
    const sockaddr_storage a4 = ip("203.0.113.7", 40000);
    const sockaddr_storage b4 = ip("192.0.2.1", 443);
    const std::string line4 = buildProxyV1(raw(a4), raw(b4));
    CHECK(line4 == "PROXY TCP4 203.0.113.7 192.0.2.1 40000 443\r\n");
    const ProxyParse r4 = checkDone(line4);
    CHECK(text(r4.source) == "203.0.113.7:40000");
    CHECK(text(r4.destination) == "192.0.2.1:443");

    const sockaddr_storage a6 = ip("2001:db8::1", 0);
    const sockaddr_storage b6 = ip("2001:db8:0:1:1:1:1:1", 65535);
    const std::string line6 = buildProxyV1(raw(a6), raw(b6));
    CHECK(line6 == "PROXY TCP6 2001:db8::1 2001:db8:0:1:1:1:1:1 0 65535\r\n");
    const ProxyParse r6 = checkDone(line6);
    CHECK(text(r6.source) == "[2001:db8::1]:0");
    CHECK(text(r6.destination) == "[2001:db8:0:1:1:1:1:1]:65535");
}

TEST_CASE("v1 builder: IPv6 is written as hex groups with the longest zero run compressed") {
    const sockaddr_storage other = ip("::1", 1);
    auto written = [&](const char *address) {
        const sockaddr_storage a = ip(address, 1);
        const std::string line = buildProxyV1(raw(a), raw(other));
        const std::string prefix = "PROXY TCP6 ";
        REQUIRE(line.starts_with(prefix));
        checkDone(line);
        return line.substr(prefix.size(), line.find(' ', prefix.size()) - prefix.size());
    };
    CHECK(written("::") == "::");
    CHECK(written("::1") == "::1");
    CHECK(written("1::") == "1::");
    CHECK(written("1:0:0:2:0:0:0:3") == "1:0:0:2::3");
    CHECK(written("1:0:0:2:3:0:0:4") == "1::2:3:0:0:4");
    CHECK(written("fe80::abcd:1") == "fe80::abcd:1");
    CHECK(written("ABCD:EF01:2345:6789:ABCD:EF01:2345:6789") ==
          "abcd:ef01:2345:6789:abcd:ef01:2345:6789");
    // Not the dotted form inet_ntop would choose.
    CHECK(written("::102:304") == "::102:304");
}

TEST_CASE("v1 builder: UNKNOWN, and IPv4-mapped addresses written as IPv4") {
    const sockaddr_storage v4 = ip("192.0.2.1", 443);
    const sockaddr_storage v6 = ip("2001:db8::1", 443);
    const sockaddr_storage mapped = ip("::ffff:198.51.100.9", 5555);
    sockaddr_un unixAddress{};
    unixAddress.sun_family = AF_UNIX;
    const auto *unixRaw = reinterpret_cast<const sockaddr *>(&unixAddress);

    CHECK(buildProxyV1(nullptr, raw(v4)) == "PROXY UNKNOWN\r\n");
    CHECK(buildProxyV1(raw(v4), nullptr) == "PROXY UNKNOWN\r\n");
    CHECK(buildProxyV1(raw(v4), raw(v6)) == "PROXY UNKNOWN\r\n");
    CHECK(buildProxyV1(unixRaw, unixRaw) == "PROXY UNKNOWN\r\n");
    CHECK(buildProxyV1(raw(mapped), raw(v4)) == "PROXY TCP4 198.51.100.9 192.0.2.1 5555 443\r\n");
    CHECK(buildProxyV1(raw(v4), raw(mapped)) == "PROXY TCP4 192.0.2.1 198.51.100.9 443 5555\r\n");
    CHECK(buildProxyV1(raw(mapped), raw(mapped)) ==
          "PROXY TCP4 198.51.100.9 198.51.100.9 5555 5555\r\n");
    // Next to a real IPv6 address the mapped one stays IPv6.
    CHECK(buildProxyV1(raw(mapped), raw(v6)) ==
          "PROXY TCP6 ::ffff:c633:6409 2001:db8::1 5555 443\r\n");
    checkDone(buildProxyV1(raw(mapped), raw(v6)));
}

TEST_CASE("v2 builder: addresses, families and the PROXY command") {
    const sockaddr_storage v4 = ip("192.0.2.1", 443);
    const sockaddr_storage v4b = ip("203.0.113.7", 40000);
    const sockaddr_storage v6 = ip("2001:db8::1", 8443);
    const sockaddr_storage mapped = ip("::ffff:198.51.100.9", 5555);

    const std::string h4 = buildProxyV2(raw(v4b), raw(v4), nullptr);
    CHECK(h4 == v2(bytes({0x21, 0x11, 0x00, 0x0C, 203, 0, 113, 7, 192, 0, 2, 1, 0x9C, 0x40, 0x01,
                          0xBB})));
    const ProxyParse r4 = checkDone(h4);
    CHECK(text(r4.source) == "203.0.113.7:40000");
    CHECK(text(r4.destination) == "192.0.2.1:443");

    const ProxyParse r6 = checkDone(buildProxyV2(raw(v6), raw(v6), nullptr));
    CHECK(r6.length == 52);
    CHECK(text(r6.source) == "[2001:db8::1]:8443");

    const ProxyParse rm = checkDone(buildProxyV2(raw(mapped), raw(v4), nullptr));
    CHECK(rm.length == 28);
    CHECK(text(rm.source) == "198.51.100.9:5555");

    const ProxyParse rm6 = checkDone(buildProxyV2(raw(mapped), raw(v6), nullptr));
    CHECK(text(rm6.source) == "[::ffff:198.51.100.9]:5555");

    const std::string unspec = buildProxyV2(raw(v4), raw(v6), nullptr);
    CHECK(unspec == v2(bytes({0x21, 0x00, 0x00, 0x00})));
    CHECK(checkDone(unspec).local);
    CHECK(buildProxyV2(nullptr, nullptr, nullptr) == unspec);
}

TEST_CASE("v2 builder: every TLV, in order, and back through tlvFacts") {
    const sockaddr_storage a = ip("192.0.2.1", 1);
    const sockaddr_storage b = ip("192.0.2.2", 2);
    const ProxyTlvFacts facts = everyFact();
    const ProxyParse r = checkDone(buildProxyV2(raw(a), raw(b), &facts));
    REQUIRE(r.tlvs.size() == 4);
    CHECK(r.tlvs[0] == ProxyTlv{0x01, "h2"});
    CHECK(r.tlvs[1] == ProxyTlv{0x02, "www.example.com"});
    CHECK(r.tlvs[2].type == 0x20);
    CHECK(r.tlvs[3] == ProxyTlv{0xE0, facts.clientCertDer});
    const std::string expectedSsl = bytes({0x07, 0x01, 0x02, 0x03, 0x04}) + bytes({0x21, 0, 7}) +
                                    "TLSv1.3" + bytes({0x22, 0, 18}) + "client.example.com" +
                                    bytes({0x23, 0, 22}) + "TLS_AES_128_GCM_SHA256" +
                                    bytes({0x24, 0, 10}) + "SHA256-RSA" + bytes({0x25, 0, 7}) +
                                    "RSA2048";
    CHECK(r.tlvs[2].value == expectedSsl);
    CHECK(tlvFacts(r.tlvs) == facts);
}

TEST_CASE("v2 builder: empty facts send no TLV; tls alone sends the SSL TLV's fixed part") {
    const sockaddr_storage a = ip("::1", 1);
    ProxyTlvFacts none;
    const ProxyParse empty = checkDone(buildProxyV2(raw(a), raw(a), &none));
    CHECK(empty.tlvs.empty());
    CHECK(empty.length == 52);

    ProxyTlvFacts tlsOnly;
    tlsOnly.tls = true;
    tlsOnly.verifyResult = 1;
    const ProxyParse r = checkDone(buildProxyV2(raw(a), raw(a), &tlsOnly));
    REQUIRE(r.tlvs.size() == 1);
    CHECK(r.tlvs[0] == ProxyTlv{0x20, bytes({0x01, 0, 0, 0, 1})});
    CHECK(tlvFacts(r.tlvs) == tlsOnly);

    ProxyTlvFacts sessionOnly = tlsOnly;
    sessionOnly.clientCertSession = true;
    const ProxyParse s = checkDone(buildProxyV2(raw(a), raw(a), &sessionOnly));
    CHECK(static_cast<std::uint8_t>(s.tlvs.at(0).value[0]) == 0x05);
    CHECK(tlvFacts(s.tlvs) == sessionOnly);
}

TEST_CASE("v2 builder: values too large for the header are dropped whole") {
    const sockaddr_storage a = ip("192.0.2.1", 1);
    const sockaddr_storage b = ip("192.0.2.2", 2);

    SUBCASE("a value over 65535 bytes") {
        ProxyTlvFacts facts;
        facts.alpn = std::string(65536, 'a');
        facts.authority = "kept.example";
        const std::string header = buildProxyV2(raw(a), raw(b), &facts);
        const ProxyParse r = checkDone(header);
        REQUIRE(r.tlvs.size() == 1);
        CHECK(r.tlvs[0].type == 0x02);
    }
    SUBCASE("a value that fits exactly is kept") {
        ProxyTlvFacts facts;
        facts.authority = std::string(65535 - 12 - 3, 'x');
        const std::string header = buildProxyV2(raw(a), raw(b), &facts);
        CHECK(header.size() == maxProxyV2Length);
        const ProxyParse r = checkDone(header);
        CHECK(tlvFacts(r.tlvs).authority == facts.authority);
    }
    SUBCASE("one byte more is dropped") {
        ProxyTlvFacts facts;
        facts.authority = std::string(65535 - 12 - 2, 'x');
        facts.alpn = "h2";
        const std::string header = buildProxyV2(raw(a), raw(b), &facts);
        const ProxyParse r = checkDone(header);
        CHECK(tlvFacts(r.tlvs).authority.empty());
        CHECK(tlvFacts(r.tlvs).alpn == "h2");
    }
    SUBCASE("the certificate does not fit after the other TLVs") {
        ProxyTlvFacts facts = everyFact();
        facts.clientCertDer = std::string(65400, 'c');
        facts.authority = std::string(1000, 'n');
        const std::string header = buildProxyV2(raw(a), raw(b), &facts);
        CHECK(header.size() <= maxProxyV2Length);
        const ProxyParse r = checkDone(header);
        const ProxyTlvFacts got = tlvFacts(r.tlvs);
        CHECK(got.clientCertDer.empty());
        CHECK(got.authority == facts.authority);
        CHECK(got.clientCn == facts.clientCn);
    }
    SUBCASE("an SSL sub-TLV that would overflow the SSL TLV") {
        ProxyTlvFacts facts = everyFact();
        facts.clientCertDer.clear();
        facts.clientCn = std::string(65530, 'c');
        const ProxyParse r = checkDone(buildProxyV2(raw(a), raw(b), &facts));
        const ProxyTlvFacts got = tlvFacts(r.tlvs);
        CHECK(got.tls);
        CHECK(got.clientCn.empty());
        CHECK(got.version == "TLSv1.3");
        CHECK(got.cipher == facts.cipher);
    }
}

// 3. Invalid headers, each detected at the first byte that rules it out.

TEST_CASE("not a PROXY header: invalid at the first byte") {
    checkInvalidAt("GET / HTTP/1.1\r\n", 1, "not a PROXY header");
    checkInvalidAt(bytes({0x16, 0x03, 0x01, 0x02, 0x00}), 1, "not a PROXY header");
    checkInvalidAt(bytes({0x80, 0x2b, 0x01}), 1, "not a PROXY header");
    checkInvalidAt("proxy TCP4", 1, "not a PROXY header");
    checkInvalidAt(std::string(1, '\0'), 1, "not a PROXY header");
    CHECK(parse("").status == ProxyParse::needMore);
}

TEST_CASE("v1: bad signature and protocol") {
    checkInvalidAt("PROXX TCP4", 5, "bad v1 signature");
    checkInvalidAt("PROXY\tTCP4", 6, "bad v1 signature");
    checkInvalidAt("PROXY  TCP4", 7, "bad v1 protocol");
    checkInvalidAt("PROXY TCP5 ", 10, "bad v1 protocol");
    checkInvalidAt("PROXY UDP4 ", 8, "bad v1 protocol");
    checkInvalidAt("PROXY TCP4\r\n", 11, "bad v1 protocol");
    checkInvalidAt("PROXY tcp4 ", 7, "bad v1 protocol");
    checkInvalidAt("PROXY UNKNOWNX\r\n", 14, "bad v1 protocol");
    checkInvalidAt("PROXY UNKNOW\r\n", 13, "bad v1 protocol");
}

TEST_CASE("v1: addresses are validated as they arrive") {
    const std::string p4 = "PROXY TCP4 ";
    const std::string p6 = "PROXY TCP6 ";
    const std::size_t at = p4.size();
    checkInvalidAt(p4 + "01.2.3.4 5.6.7.8 1 2\r\n", at + 2, "bad v1 address");
    checkInvalidAt(p4 + "256.1.1.1 5.6.7.8 1 2\r\n", at + 3, "bad v1 address");
    checkInvalidAt(p4 + "1.2.3 5.6.7.8 1 2\r\n", at + 6, "bad v1 address");
    checkInvalidAt(p4 + "1.2.3.4.5 5.6.7.8 1 2\r\n", at + 8, "bad v1 address");
    checkInvalidAt(p4 + "1..3.4 5.6.7.8 1 2\r\n", at + 3, "bad v1 address");
    checkInvalidAt(p4 + " 1.2.3.4 5.6.7.8 1 2\r\n", at + 1, "bad v1 address");
    checkInvalidAt(p4 + "1.2.3.4  5.6.7.8 1 2\r\n", at + 9, "bad v1 address");
    checkInvalidAt(p4 + "::1 ::1 1 2\r\n", at + 1, "bad v1 address");
    checkInvalidAt(p4 + "1.2.3.4 ::1 1 2\r\n", at + 9, "bad v1 address");
    checkInvalidAt(p4 + "1.2.3.4\r\n", at + 8, "bad v1 address");
    checkInvalidAt(p4 + "1.2.3.4 5.6.7.8\r\n", at + 16, "bad v1 address");
    checkInvalidAt(p6 + "1.2.3.4 ::1 1 2\r\n", at + 2, "bad v1 address");
    checkInvalidAt(p6 + ":1 ::1 1 2\r\n", at + 2, "bad v1 address");
    checkInvalidAt(p6 + "1:::2 ::1 1 2\r\n", at + 4, "bad v1 address");
    checkInvalidAt(p6 + "1::2::3 ::1 1 2\r\n", at + 6, "bad v1 address");
    checkInvalidAt(p6 + "12345:: ::1 1 2\r\n", at + 5, "bad v1 address");
    checkInvalidAt(p6 + "1:2:3:4:5:6:7:8:9 ::1 1 2\r\n", at + 16, "bad v1 address");
    checkInvalidAt(p6 + "1:2:3:4:5:6:7 ::1 1 2\r\n", at + 14, "bad v1 address");
    checkInvalidAt(p6 + "1:2:3:4:5:6:7::8 ::1 1 2\r\n", at + 16, "bad v1 address");
    checkInvalidAt(p6 + "g::1 ::1 1 2\r\n", at + 1, "bad v1 address");
    checkInvalidAt(p6 + "::1: ::1 1 2\r\n", at + 5, "bad v1 address");
    checkInvalidAt(p6 + "::ffff:1.2.3.04 ::1 1 2\r\n", at + 15, "bad v1 address");
    checkInvalidAt(p6 + "1:2:3:4:5:1.2.3.4 ::1 1 2\r\n", at + 12, "bad v1 address");
    checkInvalidAt(p6 + "::1 1.2.3.4 1 2\r\n", at + 6, "bad v1 address");
    // What inet_pton accepts is accepted, including a dotted IPv4 tail.
    const ProxyParse tail = checkDone(p6 + "::ffff:1.2.3.4 1:2:3:4:5:6:7.8.9.10 1 2\r\n");
    CHECK(text(tail.source) == "[::ffff:1.2.3.4]:1");
    CHECK(text(tail.destination) == "[1:2:3:4:5:6:708:90a]:2");
    checkDone(p6 + ":: 1:2:3:4:5:6:7:8 1 2\r\n");
    checkDone(p6 + "1:: ::8 1 2\r\n");
    checkDone(p6 + "1:2:3:4:5:6:7:: ::1 1 2\r\n");
    checkDone(p6 + "1:2:3:4:5:6::8 A:B:c:d:E:f:0:0 1 2\r\n");
    checkDone(p4 + "0.0.0.0 10.0.100.200 1 2\r\n");
}

TEST_CASE("v1: ports are decimal 0..65535 without leading zeros or signs") {
    const std::string p = "PROXY TCP4 1.2.3.4 5.6.7.8 ";
    const std::size_t at = p.size();
    checkInvalidAt(p + "01 2\r\n", at + 2, "bad v1 port");
    checkInvalidAt(p + "+1 2\r\n", at + 1, "bad v1 port");
    checkInvalidAt(p + "-1 2\r\n", at + 1, "bad v1 port");
    checkInvalidAt(p + "65536 2\r\n", at + 5, "bad v1 port");
    checkInvalidAt(p + "655350 2\r\n", at + 6, "bad v1 port");
    checkInvalidAt(p + " 1 2\r\n", at + 1, "bad v1 port");
    checkInvalidAt(p + "1  2\r\n", at + 3, "bad v1 port");
    checkInvalidAt(p + "1 2 \r\n", at + 4, "bad v1 port");
    checkInvalidAt(p + "1 00\r\n", at + 4, "bad v1 port");
    checkInvalidAt(p + "1 0x1\r\n", at + 4, "bad v1 port");
    checkInvalidAt(p + "1 \r\n", at + 3, "bad v1 port");
    const ProxyParse edges = checkDone(p + "0 65535\r\n");
    CHECK(text(edges.source) == "1.2.3.4:0");
    CHECK(text(edges.destination) == "5.6.7.8:65535");
}

TEST_CASE("v1: the line ends in CRLF and nothing else, within 107 bytes") {
    const std::string p = "PROXY TCP4 1.2.3.4 5.6.7.8 1 2";
    checkInvalidAt(p + "\n", p.size() + 1, "bad v1 port");
    checkInvalidAt(p + "\rX", p.size() + 2, "bad v1 line end");
    checkInvalidAt(p + "\r\r\n", p.size() + 2, "bad v1 line end");
    checkInvalidAt("PROXY UNKNOWN\n", 14, "bad v1 line end");
    checkInvalidAt("PROXY UNKNOWN\rX", 15, "bad v1 line end");
    checkInvalidAt("PROXY UNKNOWN junk\nmore\r\n", 19, "bad v1 line end");
    checkInvalidAt("PROXY UNKNOWN junk\rmore\r\n", 20, "bad v1 line end");
    // UNKNOWN ignores whatever precedes the CRLF, up to the 107-byte limit.
    const ProxyParse junk = checkDone("PROXY UNKNOWN anything \x01\xff goes\r\nrest");
    CHECK(junk.local);
    CHECK(junk.length == 32);
    const std::string longest = "PROXY UNKNOWN " + std::string(91, 'x') + "\r\n";
    CHECK(longest.size() == 107);
    checkDone(longest);
    const std::string tooLong = "PROXY UNKNOWN " + std::string(92, 'x') + "\r\n";
    checkInvalidAt(tooLong, 107, "v1 line too long");
    checkInvalidAt("PROXY UNKNOWN " + std::string(200, 'x'), 107, "v1 line too long");
}

TEST_CASE("v1: maxLength below 107 is enforced") {
    const std::string line = "PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n";
    checkDone(line, line.size());
    checkInvalidAt(line, line.size() - 1, "header exceeds limit", line.size() - 1);
    checkInvalidAt("PROXY UNKNOWN\r\n", 10, "header exceeds limit", 10);
    CHECK(parse("P", 0).status == ProxyParse::invalid);
}

TEST_CASE("v2: signature, version, command and family") {
    const std::string sig = v2("");
    for (std::size_t i = 1; i < 12; ++i) {
        std::string bad = sig;
        bad[i] = static_cast<char>(bad[i] ^ 0x20);
        checkInvalidAt(bad, i + 1, "bad v2 signature");
    }
    checkInvalidAt(v2(bytes({0x11, 0x11, 0, 12})), 13, "bad v2 version");
    checkInvalidAt(v2(bytes({0x31, 0x11, 0, 12})), 13, "bad v2 version");
    checkInvalidAt(v2(bytes({0x01, 0x11, 0, 12})), 13, "bad v2 version");
    checkInvalidAt(v2(bytes({0x22, 0x11, 0, 12})), 13, "bad v2 command");
    checkInvalidAt(v2(bytes({0x2F, 0x11, 0, 12})), 13, "bad v2 command");
    for (int family : {0x01, 0x10, 0x13, 0x20, 0x23, 0x30, 0x41, 0xFF}) {
        checkInvalidAt(v2(bytes({0x21, family, 0, 12})), 14, "bad v2 family");
    }
}

TEST_CASE("v2: the length is bounded and covers the address block") {
    const std::string header =
        v2(bytes({0x21, 0x11, 0x00, 0x0C, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0, 2}));
    checkDone(header, 28);
    checkInvalidAt(header, 16, "v2 length exceeds limit", 27);
    checkInvalidAt(v2(bytes({0x21, 0x00, 0xFF, 0xFF})), 16, "v2 length exceeds limit", 1024);
    CHECK(parse(v2(bytes({0x21, 0x00, 0xFF, 0xFF}))).status == ProxyParse::needMore);
    checkInvalidAt(v2(""), 1, "header exceeds limit", 15);
    checkInvalidAt(v2(bytes({0x21, 0x11, 0x00, 0x0B})), 16, "v2 address block exceeds length");
    checkInvalidAt(v2(bytes({0x21, 0x21, 0x00, 0x23})), 16, "v2 address block exceeds length");
    checkInvalidAt(v2(bytes({0x21, 0x31, 0x00, 0xD7})), 16, "v2 address block exceeds length");
    checkInvalidAt(v2(bytes({0x20, 0x11, 0x00, 0x00})), 16, "v2 address block exceeds length");
}

TEST_CASE("v2: TLVs must fit the block, detected as soon as their header arrives") {
    const std::string base =
        v2(bytes({0x21, 0x11, 0x00, 0x0C, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0, 2}));
    // A TLV claiming 10 bytes in a block with room for 5.
    const std::string over = withTlvBytes(base, bytes({0x02, 0x00, 0x0A, 'a', 'b', 'c', 'd', 'e'}));
    checkInvalidAt(over, 28 + 3, "v2 TLV exceeds length");
    // Two bytes left over: not even a TLV header.
    const std::string cutHeader = withTlvBytes(base, bytes({0x04, 0x00}));
    checkInvalidAt(cutHeader, 16, "v2 TLV exceeds length");
    const std::string cutAfterOne = withTlvBytes(base, bytes({0x02, 0x00, 0x01, 'x', 0x04, 0x00}));
    // Known once the TLV before it has arrived.
    checkInvalidAt(cutAfterOne, 32, "v2 TLV exceeds length");
    // SSL: at least the client byte and verify; sub-TLVs within it.
    checkInvalidAt(withTlvBytes(base, bytes({0x20, 0x00, 0x04, 1, 0, 0, 0})), 31, "bad v2 SSL TLV");
    checkInvalidAt(
        withTlvBytes(base, bytes({0x20, 0x00, 0x09, 1, 0, 0, 0, 0, 0x21, 0x00, 0x02, 'x'})), 39,
        "bad v2 SSL TLV");
    checkInvalidAt(withTlvBytes(base, bytes({0x20, 0x00, 0x07, 1, 0, 0, 0, 0, 0x21, 0x00})), 31,
                   "bad v2 SSL TLV");
    // CRC32C is exactly 4 bytes.
    checkInvalidAt(withTlvBytes(base, bytes({0x03, 0x00, 0x03, 0, 0, 0})), 31, "bad v2 CRC32C TLV");
    // Unknown, custom and NOOP TLVs are fine; NOOP is not reported.
    const ProxyParse r =
        checkDone(withTlvBytes(base, bytes({0x04, 0x00, 0x02, 0, 0, 0xEF, 0x00, 0x01, 'z', 0x30,
                                            0x00, 0x00, 0x05, 0x00, 0x01, 'u', 0x04, 0x00, 0x00})));
    REQUIRE(r.tlvs.size() == 3);
    CHECK(r.tlvs[0] == ProxyTlv{0xEF, "z"});
    CHECK(r.tlvs[1] == ProxyTlv{0x30, ""});
    CHECK(r.tlvs[2] == ProxyTlv{0x05, "u"});
}

TEST_CASE("CRC32c: the check value, a good header and a bad one") {
    CHECK(crc32c(span("123456789")) == 0xE3069283U);
    CHECK(crc32c(span("")) == 0);

    const sockaddr_storage a = ip("192.0.2.1", 1);
    const sockaddr_storage b = ip("192.0.2.2", 2);
    const ProxyTlvFacts facts = everyFact();
    const std::string good = withCrc(buildProxyV2(raw(a), raw(b), &facts));
    const ProxyParse r = checkDone(good);
    CHECK(r.tlvs.back().type == 0x03);
    CHECK(tlvFacts(r.tlvs) == facts);

    // A fixed header: LOCAL, UNSPEC, only the CRC TLV (its value from an independent CRC32c).
    const std::string fixed = v2(bytes({0x20, 0x00, 0x00, 0x07, 0x03, 0x00, 0x04}));
    CHECK(withCrc(v2(bytes({0x20, 0x00, 0x00, 0x00}))) == fixed + bytes({0xA9, 0xB8, 0x7E, 0x8F}));

    for (std::size_t i : {std::size_t{16}, good.size() / 2, good.size() - 1, good.size() - 8}) {
        std::string bad = good;
        bad[i] = static_cast<char>(bad[i] ^ 0x01);
        INFO("flipped byte " << i);
        const ProxyParse result = parse(bad);
        CHECK(result.status == ProxyParse::invalid);
        CHECK(result.error == "v2 CRC32C mismatch");
    }
    // The whole header is covered, including the fixed part's address family.
    std::string badFamily = good;
    badFamily[13] = 0x12;
    CHECK(parse(badFamily).error == "v2 CRC32C mismatch");
}

TEST_CASE("done reads nothing past the header") {
    const sockaddr_storage a = ip("192.0.2.1", 1);
    const ProxyTlvFacts facts = everyFact();
    for (const std::string &header :
         {buildProxyV1(raw(a), raw(a)), buildProxyV2(raw(a), raw(a), &facts)}) {
        const ProxyParse alone = parse(header);
        const ProxyParse followed = parse(header + "\x16\x03\x01\x00\x05hello");
        REQUIRE(alone.status == ProxyParse::done);
        REQUIRE(followed.status == ProxyParse::done);
        CHECK(followed.length == header.size());
        CHECK(followed.tlvs == alone.tlvs);
    }
}

TEST_CASE("the seed corpus, judged by the Python codec, parses as its names say") {
    // tests/fuzz/make-seeds names each seed by what tests/integration/proxyproto.py made of it.
    const auto folder =
        std::filesystem::path(SLUICE_SOURCE_ROOT) / "tests/fuzz/corpus/proxy_protocol";
    std::size_t count = 0;
    for (const auto &entry : std::filesystem::directory_iterator(folder)) {
        const std::string name = entry.path().filename().string();
        std::ifstream in(entry.path(), std::ios::binary);
        std::ostringstream contents;
        contents << in.rdbuf();
        const std::string data = contents.str();
        INFO("seed " << name);
        const ProxyParse result = parse(data);
        INFO("error: " << result.error);
        if (name.starts_with("valid-")) {
            CHECK(result.status == ProxyParse::done);
            CHECK(result.length == data.size());
        } else if (name.starts_with("truncated-")) {
            CHECK(result.status == ProxyParse::needMore);
        } else {
            REQUIRE(name.starts_with("invalid-"));
            CHECK(result.status == ProxyParse::invalid);
        }
        ++count;
    }
    CHECK(count >= 30);
}

// 4. The allow list.

TEST_CASE("networkContains: IPv4 prefixes") {
    const Network ten = network("10.0.0.0", 8);
    CHECK(contains(ten, "10.0.0.0"));
    CHECK(contains(ten, "10.255.255.255"));
    CHECK_FALSE(contains(ten, "11.0.0.0"));
    CHECK_FALSE(contains(ten, "9.255.255.255"));

    const Network all = network("0.0.0.0", 0);
    CHECK(contains(all, "0.0.0.0"));
    CHECK(contains(all, "255.255.255.255"));
    CHECK(contains(all, "::ffff:1.2.3.4"));
    CHECK_FALSE(contains(all, "::1"));
    CHECK_FALSE(contains(all, "2001:db8::1"));

    const Network host = network("192.0.2.7", 32);
    CHECK(contains(host, "192.0.2.7"));
    CHECK_FALSE(contains(host, "192.0.2.6"));
    CHECK_FALSE(contains(host, "192.0.2.8"));

    const Network odd = network("2.0.0.0", 7); // 2.0.0.0 - 3.255.255.255
    CHECK(contains(odd, "2.0.0.0"));
    CHECK(contains(odd, "3.255.255.255"));
    CHECK_FALSE(contains(odd, "1.255.255.255"));
    CHECK_FALSE(contains(odd, "4.0.0.0"));

    const Network twentyThree = network("198.51.100.0", 23); // .100.0 - .101.255
    CHECK(contains(twentyThree, "198.51.101.255"));
    CHECK_FALSE(contains(twentyThree, "198.51.102.0"));
    CHECK_FALSE(contains(twentyThree, "198.51.99.255"));

    Network tooLong = network("10.0.0.0", 8);
    tooLong.prefix = 33;
    CHECK_FALSE(contains(tooLong, "10.0.0.0"));
}

TEST_CASE("networkContains: IPv6 prefixes") {
    const Network loopback = network("::1", 128);
    CHECK(contains(loopback, "::1"));
    CHECK_FALSE(contains(loopback, "::2"));
    CHECK_FALSE(contains(loopback, "::"));
    CHECK_FALSE(contains(loopback, "127.0.0.1"));

    const Network all = network("::", 0);
    CHECK(contains(all, "2001:db8::1"));
    CHECK(contains(all, "::"));
    CHECK(contains(all, "192.0.2.1")); // as ::ffff:192.0.2.1

    const Network odd = network("2001:db8::80", 121); // ::80 - ::ff
    CHECK(contains(odd, "2001:db8::80"));
    CHECK(contains(odd, "2001:db8::ff"));
    CHECK_FALSE(contains(odd, "2001:db8::7f"));
    CHECK_FALSE(contains(odd, "2001:db8::100"));

    const Network doc = network("2001:db8::", 32);
    CHECK(contains(doc, "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff"));
    CHECK_FALSE(contains(doc, "2001:db9::"));

    const Network seven = network("fe00::", 7); // fe00:: - ffff:...
    CHECK(contains(seven, "ff02::1"));
    CHECK_FALSE(contains(seven, "fdff::1"));

    Network tooLong = network("::1", 128);
    tooLong.prefix = 129;
    CHECK_FALSE(contains(tooLong, "::1"));
}

TEST_CASE("networkContains: IPv4-mapped clients match IPv4 networks") {
    const Network ten = network("10.0.0.0", 8);
    CHECK(contains(ten, "::ffff:10.1.2.3"));
    CHECK_FALSE(contains(ten, "::ffff:11.1.2.3"));
    // Not mapped: the IPv4-compatible form and NAT64 are other addresses.
    CHECK_FALSE(contains(ten, "::10.1.2.3"));
    CHECK_FALSE(contains(ten, "64:ff9b::10.1.2.3"));

    const Network host = network("192.0.2.7", 32);
    CHECK(contains(host, "::ffff:192.0.2.7"));
    CHECK_FALSE(contains(host, "::ffff:192.0.2.8"));

    // A network written in the mapped form matches both forms of the client.
    const Network mappedNet = network("::ffff:10.0.0.0", 104);
    CHECK(contains(mappedNet, "::ffff:10.9.9.9"));
    CHECK(contains(mappedNet, "10.9.9.9"));
    CHECK_FALSE(contains(mappedNet, "11.0.0.0"));
}

TEST_CASE("networkContains: null and non-IP addresses match nothing") {
    const Network all = network("0.0.0.0", 0);
    CHECK_FALSE(networkContains(all, nullptr));
    sockaddr_un unixAddress{};
    unixAddress.sun_family = AF_UNIX;
    CHECK_FALSE(networkContains(all, reinterpret_cast<const sockaddr *>(&unixAddress)));
    Network none;
    const sockaddr_storage a = ip("10.0.0.1", 1);
    CHECK_FALSE(networkContains(none, raw(a)));
}

TEST_CASE("clientIpKey: IPv4 by address, IPv6 by its /64, IPv4-mapped IPv6 as IPv4") {
    auto key = [](const char *address, std::uint16_t port) {
        const sockaddr_storage storage = ip(address, port);
        return proxy::clientIpKey(raw(storage));
    };
    CHECK(key("192.0.2.1", 1) == key("192.0.2.1", 2)); // the port is not part of it
    CHECK(key("192.0.2.1", 1) != key("192.0.2.2", 1));
    // One customer's /64 is one client: another address in it takes no new slot.
    CHECK(key("2001:db8:1:2::1", 1) == key("2001:db8:1:2:ffff:ffff:ffff:9", 2));
    CHECK(key("2001:db8:1:2::1", 1) != key("2001:db8:1:3::1", 1));
    // A dual-stack socket's IPv4 clients are their IPv4 addresses, not one shared /64.
    CHECK(key("::ffff:192.0.2.1", 1) == key("192.0.2.1", 1));
    CHECK(key("::ffff:192.0.2.1", 1) != key("::ffff:192.0.2.2", 1));
    // An IPv6 address whose first 64 bits look like an IPv4 key's bytes is still IPv6.
    CHECK(key("::1", 1) != key("0.0.0.0", 1));
    sockaddr_un unixAddress{};
    unixAddress.sun_family = AF_UNIX;
    CHECK(proxy::clientIpKey(reinterpret_cast<const sockaddr *>(&unixAddress)).empty());
}
