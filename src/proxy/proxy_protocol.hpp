// proxy/proxy_protocol: the HAProxy PROXY protocol, versions 1 (text) and 2 (binary). A strict,
// bounded, incremental parser for the header a trusted load balancer sends before TLS, builders
// for the header sluice sends to a backend before any other byte, and the network match that
// decides which sources may send one. Pure functions over bytes and socket addresses: no I/O,
// no libuv, no state between calls; a peer's bad bytes are a result, never an exception.
//
// Choices the specification leaves open:
//  - v2 family/transport bytes 0x12, 0x22 (UDP), 0x31 and 0x32 (UNIX) are accepted and treated
//    as local (the spec's "fall back to UNSPEC"): their address block must still fit in the
//    length, their TLVs are still checked, and the socket's own addresses are used.
//  - v2 AF_UNSPEC has an empty address block: every byte after the 16-byte fixed part is a TLV.
//  - v2 LOCAL: the addresses are not reported whatever the family, but the family must be one of
//    the spec's values and the address block and TLVs must be well-formed.
//  - v1 UNKNOWN: anything but CR and LF may follow "PROXY UNKNOWN " up to the CRLF.
//  - v1 IPv6 addresses are whatever inet_pton accepts (including a dotted IPv4 tail).
//  - The builders write an IPv4-mapped IPv6 address (::ffff:a.b.c.d) as IPv4 when the other
//    side is IPv4 or mapped too (a dual-stack listener sees IPv4 clients that way), so such a
//    pair becomes TCP4 / AF_INET. Next to a real IPv6 address it stays IPv6.
#pragma once

#include <cstddef>
#include <cstdint>
#include <netinet/in.h>
#include <span>
#include <string>
#include <sys/socket.h>
#include <vector>

#include <sluice/config.hpp>

namespace sluice::proxy {

/** The longest v1 line, CRLF included ("PROXY UNKNOWN" with two full IPv6 addresses). */
constexpr std::size_t maxProxyV1Length = 107;
/** The v2 fixed part: signature, version/command, family/transport, length. */
constexpr std::size_t proxyV2FixedLength = 16;
/** The longest v2 header: the fixed part and a 16-bit length. */
constexpr std::size_t maxProxyV2Length = proxyV2FixedLength + 65535;

/** v2 TLV types sluice reads or writes. */
enum ProxyTlvType : std::uint8_t {
    pp2TypeAlpn = 0x01,
    pp2TypeAuthority = 0x02, ///< the SNI
    pp2TypeCrc32c = 0x03,
    pp2TypeNoop = 0x04,
    pp2TypeUniqueId = 0x05,
    pp2TypeSsl = 0x20,
    pp2SubtypeSslVersion = 0x21,
    pp2SubtypeSslCn = 0x22,
    pp2SubtypeSslCipher = 0x23,
    pp2SubtypeSslSigAlg = 0x24,
    pp2SubtypeSslKeyAlg = 0x25,
    pp2TypeNetns = 0x30,
    pp2TypeClientCert = 0xE0, ///< PP2_TYPE_MIN_CUSTOM: sluice's client certificate (DER)
};

/** Bits of the PP2_TYPE_SSL `client` byte. */
enum ProxySslClient : std::uint8_t {
    pp2ClientSsl = 0x01,
    pp2ClientCertConn = 0x02,
    pp2ClientCertSess = 0x04,
};

/** One v2 TLV as received: its type and its value bytes. */
struct ProxyTlv {
    std::uint8_t type = 0;
    std::string value;

    bool operator==(const ProxyTlv &) const = default;
};

/** What the parser made of the bytes received so far. */
struct ProxyParse {
    enum Status {
        needMore, ///< a valid header so far: call again with these bytes and more
        done,     ///< a whole valid header of `length` bytes; the fields below are set
        invalid   ///< not a valid header (`error` says why): close the connection
    };
    Status status = needMore;
    std::size_t length = 0; ///< done: the header's bytes; the next byte is the client's first
    std::string error;      ///< invalid: a short reason for the log, e.g. "bad v1 address"
    int version = 0;        ///< done: 1 or 2
    /** done: no addresses were relayed (v2 LOCAL, v2 UNSPEC/UNIX/UDP, v1 UNKNOWN): use the
     * socket's own. Then source and destination have ss_family AF_UNSPEC. */
    bool local = false;
    sockaddr_storage source{};      ///< the client: AF_INET or AF_INET6 with its port
    sockaddr_storage destination{}; ///< the address the client connected to
    /** v2: every TLV in order except PP2_TYPE_NOOP; the PP2_TYPE_SSL value is kept whole (its
     * sub-TLVs were checked). A PP2_TYPE_CRC32C present was verified. */
    std::vector<ProxyTlv> tlvs;
};

/**
 * Parses the PROXY header at the start of `bytes`, which holds every byte of the connection
 * received so far (call again with the longer span when more arrive; nothing is kept between
 * calls). Reads no byte past the header's end, so the bytes after `length` belong to TLS.
 *
 * Decides as early as it can: `invalid` as soon as a byte cannot begin or continue a valid header
 * (a TLS record or "GET" is invalid at its first byte), and `needMore` only while the bytes are a
 * valid prefix. A header longer than `maxLength` (v1: also longer than 107 bytes) is invalid, and
 * a v2 length field above `maxLength - 16` is invalid as soon as it is read.
 */
ProxyParse parseProxyHeader(std::span<const std::uint8_t> bytes,
                            std::size_t maxLength = maxProxyV2Length);

/** The facts sluice reports to a backend in a v2 header (TLVs). Empty strings are not sent. */
struct ProxyTlvFacts {
    std::string alpn;      ///< the negotiated protocol: PP2_TYPE_ALPN
    std::string authority; ///< the SNI: PP2_TYPE_AUTHORITY
    /** The client spoke TLS: PP2_TYPE_SSL with the fields below (tlvFacts: the TLV is present). */
    bool tls = false;
    std::string version; ///< "TLSv1.3"
    std::string cipher;  ///< "TLS_AES_128_GCM_SHA256"
    std::string sigAlg;  ///< the algorithm that signed our certificate, e.g. "SHA256-RSA"
    std::string keyAlg;  ///< our certificate's key, e.g. "RSA2048", "EC256"
    bool clientCertConnection = false; ///< the client presented a certificate on this connection
    bool clientCertSession = false;    ///< the session had one (also set on resumption)
    /** 0: a certificate was presented and verified; non-zero otherwise (also when none was). */
    std::uint32_t verifyResult = 0;
    std::string clientCn;      ///< the client certificate's subject CN
    std::string clientCertDer; ///< type 0xE0; empty: not sent

    bool operator==(const ProxyTlvFacts &) const = default;
};

/**
 * "PROXY TCP4 src dst sport dport\r\n" (or TCP6); "PROXY UNKNOWN\r\n" when either address is
 * null, not IP, or the two are of different families (after the IPv4-mapped rule above). IPv6 is
 * written as lowercase hex groups with the longest zero run as "::" (no dotted tail). Borrowed
 * pointers: read during the call only.
 */
std::string buildProxyV1(const sockaddr *source, const sockaddr *destination);

/**
 * A v2 header with the PROXY command: AF_INET or AF_INET6 over STREAM when both addresses are IP
 * of one family (after the IPv4-mapped rule), else AF_UNSPEC with no addresses. TLVs from `facts`
 * (null: none) in this order: ALPN, AUTHORITY, SSL (with VERSION, CN, CIPHER, SIG_ALG, KEY_ALG
 * sub-TLVs), client certificate (0xE0). The header never exceeds 16 + 65535 bytes: a TLV or
 * sub-TLV that would not fit is left out whole, never truncated.
 */
std::string buildProxyV2(const sockaddr *source, const sockaddr *destination,
                         const ProxyTlvFacts *facts);

/** The facts in a parse's TLVs (the inverse of buildProxyV2's TLVs), for logs and tests. */
ProxyTlvFacts tlvFacts(const std::vector<ProxyTlv> &tlvs);

/** CRC32c (Castagnoli, RFC 4960 appendix B) of `bytes`: the PP2_TYPE_CRC32C checksum. */
std::uint32_t crc32c(std::span<const std::uint8_t> bytes);

/**
 * Whether `address` (AF_INET or AF_INET6; null or another family: false) lies in `network`. An
 * IPv4-mapped IPv6 address (::ffff:a.b.c.d, as a dual-stack socket reports IPv4 peers) matches
 * IPv4 networks as a.b.c.d, and an IPv4 address matches IPv6 networks as ::ffff:a.b.c.d. A
 * prefix longer than the family's bits matches nothing.
 */
bool networkContains(const Network &network, const sockaddr *address);

} // namespace sluice::proxy
