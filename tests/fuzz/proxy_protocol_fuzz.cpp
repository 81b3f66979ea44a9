// The PROXY protocol parser fed arbitrary bytes, whole and in every prefix a slow load balancer
// could deliver. Every prefix before the decision is needMore and the decision is the whole
// input's; a header is done exactly when its last byte arrives and never reaches past the input
// or its limit; a done header is consistent (local exactly when no addresses), rebuilt by both
// builders it parses again to the same facts, and its source lies in its own networks.
#include <cstdlib>
#include <cstring>
#include <netinet/in.h>
#include <span>
#include <string>
#include <sys/socket.h>

#include "fuzz_target.hpp"
#include "proxy/proxy_protocol.hpp"

namespace sluice::fuzz {

namespace {

void require(bool condition) {
    if (!condition) {
        std::abort();
    }
}

std::span<const std::uint8_t> span(const std::string &s) {
    return {reinterpret_cast<const std::uint8_t *>(s.data()), s.size()};
}

bool sameResult(const proxy::ProxyParse &a, const proxy::ProxyParse &b) {
    return a.status == b.status && a.length == b.length && a.error == b.error &&
           a.version == b.version && a.local == b.local &&
           std::memcmp(&a.source, &b.source, sizeof a.source) == 0 &&
           std::memcmp(&a.destination, &b.destination, sizeof a.destination) == 0 &&
           a.tlvs == b.tlvs;
}

std::uint16_t port(const sockaddr_storage &address) {
    if (address.ss_family == AF_INET) {
        return reinterpret_cast<const sockaddr_in *>(&address)->sin_port;
    }
    return reinterpret_cast<const sockaddr_in6 *>(&address)->sin6_port;
}

void checkDone(const proxy::ProxyParse &result, std::size_t size, std::size_t maxLength) {
    require(result.length <= size && result.length <= maxLength);
    require(result.error.empty());
    if (result.version == 1) {
        require(result.length <= proxy::maxProxyV1Length && result.tlvs.empty());
    } else {
        require(result.version == 2 && result.length >= proxy::proxyV2FixedLength);
    }
    const int family = result.source.ss_family;
    require(result.destination.ss_family == family);
    require(result.local ? family == AF_UNSPEC : (family == AF_INET || family == AF_INET6));

    // Rebuilt by both builders, the header parses again with the same facts.
    const auto *source =
        result.local ? nullptr : reinterpret_cast<const sockaddr *>(&result.source);
    const auto *destination =
        result.local ? nullptr : reinterpret_cast<const sockaddr *>(&result.destination);
    const proxy::ProxyTlvFacts facts = proxy::tlvFacts(result.tlvs);
    const std::string v1 = proxy::buildProxyV1(source, destination);
    const std::string v2 = proxy::buildProxyV2(source, destination, &facts);
    for (const std::string *rebuilt : {&v1, &v2}) {
        const proxy::ProxyParse again = proxy::parseProxyHeader(span(*rebuilt));
        require(again.status == proxy::ProxyParse::done && again.length == rebuilt->size());
        require(again.local == result.local);
        if (!result.local) {
            require(port(again.source) == port(result.source));
            require(port(again.destination) == port(result.destination));
        }
        if (rebuilt == &v2) {
            require(proxy::tlvFacts(again.tlvs) == facts);
        }
    }

    // The source is inside every network made of its own address, whatever the prefix.
    if (!result.local) {
        Network network;
        network.family = family;
        const bool v4 = family == AF_INET;
        std::memcpy(network.bytes,
                    v4 ? static_cast<const void *>(
                             &reinterpret_cast<const sockaddr_in *>(&result.source)->sin_addr)
                       : static_cast<const void *>(
                             &reinterpret_cast<const sockaddr_in6 *>(&result.source)->sin6_addr),
                    v4 ? 4 : 16);
        network.prefix = static_cast<unsigned>(result.length % (v4 ? 33 : 129));
        require(
            proxy::networkContains(network, reinterpret_cast<const sockaddr *>(&result.source)));
    }
}

/** Every prefix of `bytes` against the whole, under one length limit. */
proxy::ProxyParse checkPrefixes(std::span<const std::uint8_t> bytes, std::size_t maxLength) {
    const proxy::ProxyParse whole = proxy::parseProxyHeader(bytes, maxLength);
    for (std::size_t n = 0; n <= bytes.size(); ++n) {
        const proxy::ProxyParse prefix = proxy::parseProxyHeader(bytes.first(n), maxLength);
        if (prefix.status == proxy::ProxyParse::needMore) {
            require(prefix.error.empty());
            continue;
        }
        // The first decision is final: the whole input says the same.
        require(sameResult(prefix, whole));
        if (prefix.status == proxy::ProxyParse::done) {
            require(prefix.length == n);
            checkDone(prefix, n, maxLength);
        } else {
            require(!prefix.error.empty());
        }
        return whole;
    }
    require(whole.status == proxy::ProxyParse::needMore);
    return whole;
}

} // namespace

SLUICE_FUZZ_TARGET(proxyProtocol) {
    const std::span<const std::uint8_t> bytes(data, size);
    const proxy::ProxyParse unlimited = checkPrefixes(bytes, proxy::maxProxyV2Length);
    // A tighter limit only turns headers longer than it into invalid ones.
    constexpr std::size_t tight = 64;
    const proxy::ProxyParse limited = checkPrefixes(bytes, tight);
    if (unlimited.status == proxy::ProxyParse::done) {
        if (unlimited.length <= tight) {
            require(sameResult(limited, unlimited));
        } else {
            require(limited.status == proxy::ProxyParse::invalid);
        }
    }
    if (unlimited.status == proxy::ProxyParse::invalid) {
        require(limited.status == proxy::ProxyParse::invalid);
    }
    return 0;
}

} // namespace sluice::fuzz
