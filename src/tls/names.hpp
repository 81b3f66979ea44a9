// tls/names: the string rules behind certificate selection and client allow lists, kept free of
// OpenSSL so unit tests can check them in memory. Host names compare case-insensitively and
// without a trailing dot; a certificate wildcard ("*.example.com") covers exactly one label.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace sluice::tls {

/** ASCII-lowercases `name` and drops one trailing dot: the form names are compared in. */
std::string canonicalHostName(std::string_view name);

/**
 * Certificate-style match of a DNS name against `pattern`: exact (case-insensitive), or a
 * pattern "*.rest" that matches "label.rest" for exactly one non-empty label.
 */
bool matchDnsName(std::string_view pattern, std::string_view name);

/** Glob match where '*' matches any run of characters (also '/'), case-sensitive. */
bool matchGlob(std::string_view pattern, std::string_view text);

/**
 * Host name -> slot table for SNI. Exact names win over wildcards; a wildcard "*.example.com"
 * answers "a.example.com" but neither "example.com" nor "a.b.example.com". Slots are the
 * caller's indices (a set of certificates for that name).
 */
class NameTable {
public:
    /** Adds `name` (exact or "*.suffix") for `slot`; the first slot added for a name wins. */
    void add(std::string_view name, std::size_t slot);

    /** The slot serving `hostName` (as sent in SNI), or nullptr. */
    const std::size_t *find(std::string_view hostName) const;

    /** The slot registered under `name` exactly as it was added (canonicalised), or nullptr. */
    const std::size_t *findExact(std::string_view name) const;

    std::size_t size() const { return exact_.size() + wildcard_.size(); }

private:
    std::unordered_map<std::string, std::size_t> exact_;
    std::unordered_map<std::string, std::size_t> wildcard_; // keyed by the part after "*."
};

} // namespace sluice::tls
