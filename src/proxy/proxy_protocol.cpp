#include "proxy/proxy_protocol.hpp"

#include <algorithm>
#include <arpa/inet.h>
#include <array>
#include <cstring>
#include <string_view>

namespace sluice::proxy {

namespace {

constexpr std::array<std::uint8_t, 12> v2Signature = {0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D,
                                                      0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A};
constexpr std::string_view v1Signature = "PROXY ";
constexpr std::size_t maxTlvValue = 65535;
/** PP2_TYPE_SSL's fixed part: the client byte and the 32-bit verify result. */
constexpr std::size_t sslFixedLength = 5;

ProxyParse invalid(std::string error) {
    ProxyParse result;
    result.status = ProxyParse::invalid;
    result.error = std::move(error);
    return result;
}

ProxyParse needMore() {
    return ProxyParse{};
}

bool isDigit(std::uint8_t c) {
    return c >= '0' && c <= '9';
}

bool isHexDigit(std::uint8_t c) {
    return isDigit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

// The address and port checkers below answer, for `complete`, whether the text is a whole valid
// field and, for a partial field, whether some continuation could still make it one. The second
// form is what lets the parser reject a header at the first byte that rules it out.

/** Dotted-quad IPv4: four decimal numbers 0..255 without leading zeros. */
bool ipv4Text(std::string_view s, bool complete) {
    std::size_t i = 0;
    int parts = 0;
    while (true) {
        const std::size_t start = i;
        unsigned value = 0;
        while (i < s.size() && isDigit(static_cast<std::uint8_t>(s[i]))) {
            if (i > start && s[start] == '0') {
                return false;
            }
            value = value * 10 + static_cast<unsigned>(s[i] - '0');
            if (value > 255) {
                return false;
            }
            ++i;
        }
        ++parts;
        if (i == s.size()) {
            return complete ? (i > start && parts == 4) : true;
        }
        if (s[i] != '.' || i == start || parts == 4) {
            return false;
        }
        ++i;
    }
}

/** IPv6 as inet_pton reads it: 1-4 hex digits per group, one "::" standing for at least one
 * group, an optional dotted IPv4 tail worth two groups, eight groups in all. */
bool ipv6Text(std::string_view s, bool complete) {
    if (s.empty()) {
        return !complete;
    }
    int groups = 0;
    bool compressed = false;
    std::size_t i = 0;
    if (s[0] == ':') {
        if (s.size() == 1) {
            return !complete;
        }
        if (s[1] != ':') {
            return false;
        }
        compressed = true;
        i = 2;
    }
    while (i < s.size()) {
        const std::size_t start = i;
        while (i < s.size() && isHexDigit(static_cast<std::uint8_t>(s[i]))) {
            ++i;
        }
        const std::size_t length = i - start;
        if (i < s.size() && s[i] == '.') {
            // A dotted IPv4 tail ends the address; without "::" it must make exactly 8 groups.
            const bool room = compressed ? groups + 2 <= 7 : groups + 2 == 8;
            return room && ipv4Text(s.substr(start), complete);
        }
        if (length > 4) {
            return false;
        }
        if (i == s.size()) {
            // The last group, possibly still growing (or becoming an IPv4 tail).
            if (length == 0) {
                return false;
            }
            const int total = groups + 1;
            if (compressed) {
                return total <= 7;
            }
            return complete ? total == 8 : total <= 8;
        }
        if (s[i] != ':' || length == 0) {
            return false;
        }
        // A ':' after a group promises another group or "::": at most 7 groups so far.
        if (++groups > 7) {
            return false;
        }
        ++i;
        if (i == s.size()) {
            return !complete;
        }
        if (s[i] == ':') {
            if (compressed) {
                return false;
            }
            compressed = true;
            ++i;
        }
    }
    // Ended just after "::".
    return true;
}

/** A port: decimal 0..65535 without leading zeros or a sign. */
bool portText(std::string_view s, bool complete, std::uint16_t &port) {
    unsigned value = 0;
    for (std::size_t i = 0; i < s.size(); ++i) {
        if (!isDigit(static_cast<std::uint8_t>(s[i])) || (i > 0 && s[0] == '0')) {
            return false;
        }
        value = value * 10 + static_cast<unsigned>(s[i] - '0');
        if (value > 65535) {
            return false;
        }
    }
    port = static_cast<std::uint16_t>(value);
    return complete ? !s.empty() : true;
}

/** Reads the v1 line in `bytes` (already cut to the length limit) field by field. */
class V1Reader {
public:
    V1Reader(std::span<const std::uint8_t> bytes, std::size_t limit, bool atLimit)
        : text_(reinterpret_cast<const char *>(bytes.data()), bytes.size())
        , limit_(limit)
        , atLimit_(atLimit) {}

    ProxyParse parse() {
        const std::size_t signature = std::min(text_.size(), v1Signature.size());
        if (text_.substr(0, signature) != v1Signature.substr(0, signature)) {
            return invalid(text_[0] == 'P' ? "bad v1 signature" : "not a PROXY header");
        }
        pos_ = signature;
        if (pos_ < v1Signature.size()) {
            return more();
        }

        const std::string_view rest = text_.substr(pos_);
        for (std::string_view protocol : {"TCP4 ", "TCP6 ", "UNKNOWN"}) {
            const std::size_t n = std::min(rest.size(), protocol.size());
            if (rest.substr(0, n) != protocol.substr(0, n)) {
                continue;
            }
            if (n < protocol.size()) {
                return more();
            }
            pos_ += n;
            if (protocol == "UNKNOWN") {
                return unknown();
            }
            return addresses(protocol == "TCP4 " ? AF_INET : AF_INET6);
        }
        return invalid("bad v1 protocol");
    }

private:
    std::string_view text_;
    std::size_t pos_ = 0;
    std::size_t limit_;
    bool atLimit_; ///< the caller's bytes reached the limit: no more may come

    /** Out of bytes with everything valid so far. */
    ProxyParse more() const {
        return atLimit_ ? invalid(limit_ < maxProxyV1Length ? "header exceeds limit"
                                                            : "v1 line too long")
                        : needMore();
    }

    /** "\r\n" at pos_: the header ends after it. */
    ProxyParse lineEnd(ProxyParse result) {
        if (pos_ == text_.size()) {
            return more();
        }
        if (text_[pos_] != '\r') {
            return invalid("bad v1 line end");
        }
        if (pos_ + 1 == text_.size()) {
            return more();
        }
        if (text_[pos_ + 1] != '\n') {
            return invalid("bad v1 line end");
        }
        result.status = ProxyParse::done;
        result.length = pos_ + 2;
        result.version = 1;
        return result;
    }

    ProxyParse unknown() {
        ProxyParse result;
        result.local = true;
        if (pos_ == text_.size()) {
            return more();
        }
        if (text_[pos_] == '\n') {
            return invalid("bad v1 line end");
        }
        if (text_[pos_] != ' ' && text_[pos_] != '\r') {
            return invalid("bad v1 protocol");
        }
        if (text_[pos_] == ' ') {
            // The receiver must ignore anything before the CRLF; a lone CR or LF is not an end.
            ++pos_;
            while (pos_ < text_.size() && text_[pos_] != '\r') {
                if (text_[pos_] == '\n') {
                    return invalid("bad v1 line end");
                }
                ++pos_;
            }
        }
        return lineEnd(std::move(result));
    }

    /** The field from pos_ up to `delimiter`: `found` when the delimiter was seen. */
    std::string_view field(char delimiter, bool &found) const {
        const std::size_t end = text_.find(delimiter, pos_);
        found = end != std::string_view::npos;
        return text_.substr(pos_, found ? end - pos_ : std::string_view::npos);
    }

    ProxyParse addresses(int family) {
        ProxyParse result;
        sockaddr_storage *targets[2] = {&result.source, &result.destination};
        for (sockaddr_storage *target : targets) {
            bool found = false;
            const std::string_view text = field(' ', found);
            const bool valid = family == AF_INET ? ipv4Text(text, found) : ipv6Text(text, found);
            if (!valid) {
                return invalid("bad v1 address");
            }
            if (!found) {
                return more();
            }
            const std::string copy(text);
            target->ss_family = static_cast<sa_family_t>(family);
            void *bytes =
                family == AF_INET
                    ? static_cast<void *>(&reinterpret_cast<sockaddr_in *>(target)->sin_addr)
                    : static_cast<void *>(&reinterpret_cast<sockaddr_in6 *>(target)->sin6_addr);
            if (inet_pton(family, copy.c_str(), bytes) != 1) {
                return invalid("bad v1 address");
            }
            pos_ += text.size() + 1;
        }
        std::uint16_t ports[2] = {};
        for (int i = 0; i < 2; ++i) {
            bool found = false;
            const std::string_view text = field(i == 0 ? ' ' : '\r', found);
            if (!portText(text, found, ports[i])) {
                return invalid("bad v1 port");
            }
            if (!found) {
                return more();
            }
            pos_ += text.size() + (i == 0 ? 1 : 0);
        }
        if (family == AF_INET) {
            reinterpret_cast<sockaddr_in *>(&result.source)->sin_port = htons(ports[0]);
            reinterpret_cast<sockaddr_in *>(&result.destination)->sin_port = htons(ports[1]);
        } else {
            reinterpret_cast<sockaddr_in6 *>(&result.source)->sin6_port = htons(ports[0]);
            reinterpret_cast<sockaddr_in6 *>(&result.destination)->sin6_port = htons(ports[1]);
        }
        return lineEnd(std::move(result));
    }
};

ProxyParse parseV1(std::span<const std::uint8_t> bytes, std::size_t maxLength) {
    const std::size_t limit = std::min(maxProxyV1Length, maxLength);
    const bool atLimit = bytes.size() >= limit;
    return V1Reader(bytes.first(std::min(bytes.size(), limit)), limit, atLimit).parse();
}

std::uint16_t load16(const std::uint8_t *p) {
    return static_cast<std::uint16_t>((p[0] << 8) | p[1]);
}

std::uint32_t load32(const std::uint8_t *p) {
    return (std::uint32_t{p[0]} << 24) | (std::uint32_t{p[1]} << 16) | (std::uint32_t{p[2]} << 8) |
           std::uint32_t{p[3]};
}

enum class Scan { ok, more, bad };

/**
 * Checks the TLVs of a block of `blockLength` bytes of which `known` (a prefix) has arrived, so
 * that a TLV running past the block is rejected as soon as its header is in. `nested`: the
 * sub-TLVs of PP2_TYPE_SSL, where no further nesting is read. `crcOffsets` collects where each
 * CRC32C value starts (relative to the block).
 */
Scan scanTlvs(std::span<const std::uint8_t> known, std::size_t blockLength, bool nested,
              std::string &error, std::vector<std::size_t> *crcOffsets) {
    std::size_t pos = 0;
    while (pos < blockLength) {
        if (blockLength - pos < 3) {
            error = nested ? "bad v2 SSL TLV" : "v2 TLV exceeds length";
            return Scan::bad;
        }
        if (known.size() - pos < 3) {
            return Scan::more;
        }
        const std::uint8_t type = known[pos];
        const std::size_t length = load16(&known[pos + 1]);
        const std::size_t value = pos + 3;
        if (length > blockLength - value) {
            error = nested ? "bad v2 SSL TLV" : "v2 TLV exceeds length";
            return Scan::bad;
        }
        if (!nested && type == pp2TypeSsl) {
            if (length < sslFixedLength) {
                error = "bad v2 SSL TLV";
                return Scan::bad;
            }
            const std::size_t subStart = value + sslFixedLength;
            const std::size_t subKnown =
                known.size() > subStart ? std::min(known.size(), value + length) - subStart : 0;
            const Scan sub = scanTlvs(known.subspan(std::min(subStart, known.size()), subKnown),
                                      length - sslFixedLength, true, error, nullptr);
            if (sub == Scan::bad) {
                return Scan::bad;
            }
        }
        if (!nested && type == pp2TypeCrc32c) {
            if (length != 4) {
                error = "bad v2 CRC32C TLV";
                return Scan::bad;
            }
            crcOffsets->push_back(value);
        }
        if (known.size() < value + length) {
            return Scan::more;
        }
        pos = value + length;
    }
    return Scan::ok;
}

/** Bytes of the v2 address block for a family/transport byte; -1: not a value the spec has. */
int addressBlockLength(std::uint8_t familyTransport) {
    switch (familyTransport) {
    case 0x00:
        return 0;
    case 0x11:
    case 0x12:
        return 12;
    case 0x21:
    case 0x22:
        return 36;
    case 0x31:
    case 0x32:
        return 216;
    default:
        return -1;
    }
}

ProxyParse parseV2(std::span<const std::uint8_t> bytes, std::size_t maxLength) {
    const std::size_t signature = std::min(bytes.size(), v2Signature.size());
    if (!std::equal(bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(signature),
                    v2Signature.begin())) {
        return invalid("bad v2 signature");
    }
    if (maxLength < proxyV2FixedLength) {
        return invalid("header exceeds limit");
    }
    if (bytes.size() > 12) {
        if ((bytes[12] >> 4) != 2) {
            return invalid("bad v2 version");
        }
        if ((bytes[12] & 0x0F) > 1) {
            return invalid("bad v2 command");
        }
    }
    if (bytes.size() > 13 && addressBlockLength(bytes[13]) < 0) {
        return invalid("bad v2 family");
    }
    if (bytes.size() < proxyV2FixedLength) {
        return needMore();
    }
    const std::size_t length = load16(&bytes[14]);
    if (length > maxLength - proxyV2FixedLength) {
        return invalid("v2 length exceeds limit");
    }
    const auto addressLength = static_cast<std::size_t>(addressBlockLength(bytes[13]));
    if (addressLength > length) {
        return invalid("v2 address block exceeds length");
    }
    const std::size_t total = proxyV2FixedLength + length;
    const std::size_t tlvStart = proxyV2FixedLength + addressLength;
    const std::span<const std::uint8_t> header = bytes.first(std::min(bytes.size(), total));

    std::string error;
    std::vector<std::size_t> crcOffsets;
    const Scan scan =
        scanTlvs(header.size() > tlvStart ? header.subspan(tlvStart) : header.subspan(0, 0),
                 total - tlvStart, false, error, &crcOffsets);
    if (scan == Scan::bad) {
        return invalid(error);
    }
    if (scan == Scan::more || header.size() < total) {
        return needMore();
    }

    for (std::size_t offset : crcOffsets) {
        const std::size_t at = tlvStart + offset;
        std::vector<std::uint8_t> zeroed(header.begin(), header.end());
        std::fill_n(zeroed.begin() + static_cast<std::ptrdiff_t>(at), 4, std::uint8_t{0});
        if (crc32c(zeroed) != load32(&header[at])) {
            return invalid("v2 CRC32C mismatch");
        }
    }

    ProxyParse result;
    result.status = ProxyParse::done;
    result.length = total;
    result.version = 2;
    const bool proxyCommand = (header[12] & 0x0F) == 1;
    const std::uint8_t family = header[13];
    result.local = !(proxyCommand && (family == 0x11 || family == 0x21));
    if (!result.local && family == 0x11) {
        auto *source = reinterpret_cast<sockaddr_in *>(&result.source);
        auto *destination = reinterpret_cast<sockaddr_in *>(&result.destination);
        source->sin_family = destination->sin_family = AF_INET;
        std::memcpy(&source->sin_addr, &header[16], 4);
        std::memcpy(&destination->sin_addr, &header[20], 4);
        std::memcpy(&source->sin_port, &header[24], 2);
        std::memcpy(&destination->sin_port, &header[26], 2);
    } else if (!result.local) {
        auto *source = reinterpret_cast<sockaddr_in6 *>(&result.source);
        auto *destination = reinterpret_cast<sockaddr_in6 *>(&result.destination);
        source->sin6_family = destination->sin6_family = AF_INET6;
        std::memcpy(&source->sin6_addr, &header[16], 16);
        std::memcpy(&destination->sin6_addr, &header[32], 16);
        std::memcpy(&source->sin6_port, &header[48], 2);
        std::memcpy(&destination->sin6_port, &header[50], 2);
    }
    for (std::size_t pos = tlvStart; pos < total;) {
        const std::uint8_t type = header[pos];
        const std::size_t valueLength = load16(&header[pos + 1]);
        if (type != pp2TypeNoop) {
            result.tlvs.push_back(
                {type, std::string(reinterpret_cast<const char *>(&header[pos + 3]), valueLength)});
        }
        pos += 3 + valueLength;
    }
    return result;
}

/** An IP endpoint taken apart: the family, its address bytes (4 or 16) and the port. */
struct Endpoint {
    int family = AF_UNSPEC;
    std::array<std::uint8_t, 16> bytes{};
    std::uint16_t port = 0; ///< host order

    std::size_t size() const { return family == AF_INET ? 4 : 16; }

    bool mapped() const {
        static constexpr std::uint8_t prefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF};
        return family == AF_INET6 && std::memcmp(bytes.data(), prefix, sizeof prefix) == 0;
    }

    /** ::ffff:a.b.c.d as a.b.c.d. */
    Endpoint unmapped() const {
        Endpoint v4 = *this;
        v4.family = AF_INET;
        v4.bytes = {};
        std::memcpy(v4.bytes.data(), bytes.data() + 12, 4);
        return v4;
    }
};

Endpoint endpoint(const sockaddr *address) {
    Endpoint result;
    if (address == nullptr) {
        return result;
    }
    if (address->sa_family == AF_INET) {
        const auto *in = reinterpret_cast<const sockaddr_in *>(address);
        result.family = AF_INET;
        std::memcpy(result.bytes.data(), &in->sin_addr, 4);
        result.port = ntohs(in->sin_port);
    } else if (address->sa_family == AF_INET6) {
        const auto *in6 = reinterpret_cast<const sockaddr_in6 *>(address);
        result.family = AF_INET6;
        std::memcpy(result.bytes.data(), &in6->sin6_addr, 16);
        result.port = ntohs(in6->sin6_port);
    }
    return result;
}

/** Both endpoints with the IPv4-mapped rule applied; false when they are not one IP family. */
bool endpointPair(const sockaddr *source, const sockaddr *destination, Endpoint &from,
                  Endpoint &to) {
    from = endpoint(source);
    to = endpoint(destination);
    const bool fromV4 = from.family == AF_INET || from.mapped();
    const bool toV4 = to.family == AF_INET || to.mapped();
    if (fromV4 && toV4) {
        from = from.mapped() ? from.unmapped() : from;
        to = to.mapped() ? to.unmapped() : to;
    }
    return from.family != AF_UNSPEC && from.family == to.family;
}

/** Lowercase hex groups, the first longest run of two or more zero groups as "::". */
std::string ipv6Hex(const std::array<std::uint8_t, 16> &bytes) {
    std::array<unsigned, 8> groups{};
    for (std::size_t i = 0; i < 8; ++i) {
        groups[i] = (unsigned{bytes[2 * i]} << 8) | bytes[2 * i + 1];
    }
    std::size_t bestStart = 8;
    std::size_t bestLength = 1;
    for (std::size_t i = 0; i < 8;) {
        std::size_t j = i;
        while (j < 8 && groups[j] == 0) {
            ++j;
        }
        if (j - i > bestLength) {
            bestStart = i;
            bestLength = j - i;
        }
        i = j == i ? i + 1 : j;
    }
    static constexpr char digits[] = "0123456789abcdef";
    std::string out;
    for (std::size_t i = 0; i < 8; ++i) {
        if (i == bestStart) {
            out += "::";
            i += bestLength - 1;
            continue;
        }
        if (!out.empty() && out.back() != ':') {
            out += ':';
        }
        bool started = false;
        for (int shift = 12; shift >= 0; shift -= 4) {
            const unsigned digit = (groups[i] >> shift) & 0xF;
            if (digit != 0 || started || shift == 0) {
                out += digits[digit];
                started = true;
            }
        }
    }
    return out;
}

std::string addressText(const Endpoint &e) {
    if (e.family == AF_INET6) {
        return ipv6Hex(e.bytes);
    }
    return std::to_string(e.bytes[0]) + "." + std::to_string(e.bytes[1]) + "." +
           std::to_string(e.bytes[2]) + "." + std::to_string(e.bytes[3]);
}

void append16(std::string &out, std::size_t value) {
    out += static_cast<char>((value >> 8) & 0xFF);
    out += static_cast<char>(value & 0xFF);
}

void append32(std::string &out, std::uint32_t value) {
    append16(out, value >> 16);
    append16(out, value & 0xFFFF);
}

void appendTlv(std::string &out, std::uint8_t type, std::string_view value) {
    out += static_cast<char>(type);
    append16(out, value.size());
    out += value;
}

constexpr std::array<std::uint32_t, 256> crc32cTable = [] {
    std::array<std::uint32_t, 256> table{};
    for (std::uint32_t i = 0; i < 256; ++i) {
        std::uint32_t crc = i;
        for (int bit = 0; bit < 8; ++bit) {
            crc = (crc & 1) != 0 ? (crc >> 1) ^ 0x82F63B78U : crc >> 1;
        }
        table[i] = crc;
    }
    return table;
}();

} // namespace

ProxyParse parseProxyHeader(std::span<const std::uint8_t> bytes, std::size_t maxLength) {
    if (bytes.empty()) {
        return needMore();
    }
    if (bytes[0] == v2Signature[0]) {
        return parseV2(bytes, maxLength);
    }
    return parseV1(bytes, maxLength);
}

std::string buildProxyV1(const sockaddr *source, const sockaddr *destination) {
    Endpoint from;
    Endpoint to;
    if (!endpointPair(source, destination, from, to)) {
        return "PROXY UNKNOWN\r\n";
    }
    return std::string("PROXY ") + (from.family == AF_INET ? "TCP4 " : "TCP6 ") +
           addressText(from) + " " + addressText(to) + " " + std::to_string(from.port) + " " +
           std::to_string(to.port) + "\r\n";
}

std::string buildProxyV2(const sockaddr *source, const sockaddr *destination,
                         const ProxyTlvFacts *facts) {
    std::string out(reinterpret_cast<const char *>(v2Signature.data()), v2Signature.size());
    out += static_cast<char>(0x21); // version 2, PROXY
    Endpoint from;
    Endpoint to;
    const bool ip = endpointPair(source, destination, from, to);
    out += static_cast<char>(!ip ? 0x00 : from.family == AF_INET ? 0x11 : 0x21);
    append16(out, 0); // the length, set at the end
    if (ip) {
        out.append(reinterpret_cast<const char *>(from.bytes.data()), from.size());
        out.append(reinterpret_cast<const char *>(to.bytes.data()), to.size());
        append16(out, from.port);
        append16(out, to.port);
    }

    if (facts != nullptr) {
        // Every TLV checks the room left under the 16-bit length before it is written.
        auto room = [&out] { return maxProxyV2Length - out.size(); };
        auto add = [&](std::uint8_t type, std::string_view value) {
            if (!value.empty() && value.size() <= maxTlvValue && 3 + value.size() <= room()) {
                appendTlv(out, type, value);
            }
        };
        add(pp2TypeAlpn, facts->alpn);
        add(pp2TypeAuthority, facts->authority);
        if (facts->tls && 3 + sslFixedLength <= room()) {
            std::string ssl;
            ssl += static_cast<char>(pp2ClientSsl |
                                     (facts->clientCertConnection ? pp2ClientCertConn : 0) |
                                     (facts->clientCertSession ? pp2ClientCertSess : 0));
            append32(ssl, facts->verifyResult);
            const std::pair<std::uint8_t, const std::string *> subs[] = {
                {pp2SubtypeSslVersion, &facts->version}, {pp2SubtypeSslCn, &facts->clientCn},
                {pp2SubtypeSslCipher, &facts->cipher},   {pp2SubtypeSslSigAlg, &facts->sigAlg},
                {pp2SubtypeSslKeyAlg, &facts->keyAlg},
            };
            for (const auto &[type, value] : subs) {
                const std::size_t grown = ssl.size() + 3 + value->size();
                if (!value->empty() && grown <= maxTlvValue && 3 + grown <= room()) {
                    appendTlv(ssl, type, *value);
                }
            }
            appendTlv(out, pp2TypeSsl, ssl);
        }
        add(pp2TypeClientCert, facts->clientCertDer);
    }

    const std::size_t length = out.size() - proxyV2FixedLength;
    out[14] = static_cast<char>((length >> 8) & 0xFF);
    out[15] = static_cast<char>(length & 0xFF);
    return out;
}

ProxyTlvFacts tlvFacts(const std::vector<ProxyTlv> &tlvs) {
    ProxyTlvFacts facts;
    for (const ProxyTlv &tlv : tlvs) {
        switch (tlv.type) {
        case pp2TypeAlpn:
            facts.alpn = tlv.value;
            break;
        case pp2TypeAuthority:
            facts.authority = tlv.value;
            break;
        case pp2TypeClientCert:
            facts.clientCertDer = tlv.value;
            break;
        case pp2TypeSsl: {
            if (tlv.value.size() < sslFixedLength) {
                break;
            }
            const auto *value = reinterpret_cast<const std::uint8_t *>(tlv.value.data());
            facts.tls = true;
            facts.clientCertConnection = (value[0] & pp2ClientCertConn) != 0;
            facts.clientCertSession = (value[0] & pp2ClientCertSess) != 0;
            facts.verifyResult = load32(value + 1);
            for (std::size_t pos = sslFixedLength; pos + 3 <= tlv.value.size();) {
                const std::size_t length = load16(value + pos + 1);
                if (length > tlv.value.size() - pos - 3) {
                    break;
                }
                std::string text = tlv.value.substr(pos + 3, length);
                switch (value[pos]) {
                case pp2SubtypeSslVersion:
                    facts.version = std::move(text);
                    break;
                case pp2SubtypeSslCn:
                    facts.clientCn = std::move(text);
                    break;
                case pp2SubtypeSslCipher:
                    facts.cipher = std::move(text);
                    break;
                case pp2SubtypeSslSigAlg:
                    facts.sigAlg = std::move(text);
                    break;
                case pp2SubtypeSslKeyAlg:
                    facts.keyAlg = std::move(text);
                    break;
                default:
                    break;
                }
                pos += 3 + length;
            }
            break;
        }
        default:
            break;
        }
    }
    return facts;
}

std::uint32_t crc32c(std::span<const std::uint8_t> bytes) {
    std::uint32_t crc = 0xFFFFFFFFU;
    for (std::uint8_t byte : bytes) {
        crc = crc32cTable[(crc ^ byte) & 0xFF] ^ (crc >> 8);
    }
    return crc ^ 0xFFFFFFFFU;
}

bool networkContains(const Network &network, const sockaddr *address) {
    Endpoint e = endpoint(address);
    if (e.family == AF_UNSPEC) {
        return false;
    }
    if (network.family == AF_INET && e.mapped()) {
        e = e.unmapped();
    } else if (network.family == AF_INET6 && e.family == AF_INET) {
        Endpoint mapped;
        mapped.family = AF_INET6;
        mapped.bytes[10] = mapped.bytes[11] = 0xFF;
        std::memcpy(mapped.bytes.data() + 12, e.bytes.data(), 4);
        e = mapped;
    }
    if (e.family != network.family || network.prefix > 8 * e.size()) {
        return false;
    }
    const unsigned whole = network.prefix / 8;
    if (std::memcmp(e.bytes.data(), network.bytes, whole) != 0) {
        return false;
    }
    const unsigned rest = network.prefix % 8;
    if (rest == 0) {
        return true;
    }
    const auto mask = static_cast<std::uint8_t>(0xFF << (8 - rest));
    return (e.bytes[whole] & mask) == (network.bytes[whole] & mask);
}

} // namespace sluice::proxy
