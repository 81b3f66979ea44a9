#include "tls/names.hpp"

#include <algorithm>

namespace sluice::tls {
namespace {

char lower(char c) {
    return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c;
}

bool equalsIgnoringCase(std::string_view a, std::string_view b) {
    return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(),
                                              [](char x, char y) { return lower(x) == lower(y); });
}

} // namespace

std::string canonicalHostName(std::string_view name) {
    if (!name.empty() && name.back() == '.') {
        name.remove_suffix(1);
    }
    std::string out(name);
    std::transform(out.begin(), out.end(), out.begin(), lower);
    return out;
}

bool matchDnsName(std::string_view pattern, std::string_view name) {
    if (!pattern.empty() && pattern.back() == '.') {
        pattern.remove_suffix(1);
    }
    if (!name.empty() && name.back() == '.') {
        name.remove_suffix(1);
    }
    if (pattern.starts_with("*.")) {
        const std::size_t dot = name.find('.');
        // The wildcard stands for one whole, non-empty label.
        if (dot == 0 || dot == std::string_view::npos) {
            return false;
        }
        return equalsIgnoringCase(pattern.substr(2), name.substr(dot + 1));
    }
    return equalsIgnoringCase(pattern, name);
}

bool matchGlob(std::string_view pattern, std::string_view text) {
    // Iterative matching with one backtrack point: linear in practice, never exponential.
    std::size_t p = 0;
    std::size_t t = 0;
    std::size_t star = std::string_view::npos;
    std::size_t resume = 0;
    while (t < text.size()) {
        if (p < pattern.size() && pattern[p] == '*') {
            star = p++;
            resume = t;
        } else if (p < pattern.size() && pattern[p] == text[t]) {
            ++p;
            ++t;
        } else if (star != std::string_view::npos) {
            p = star + 1;
            t = ++resume;
        } else {
            return false;
        }
    }
    while (p < pattern.size() && pattern[p] == '*') {
        ++p;
    }
    return p == pattern.size();
}

void NameTable::add(std::string_view name, std::size_t slot) {
    std::string canonical = canonicalHostName(name);
    if (canonical.starts_with("*.") && canonical.size() > 2) {
        wildcard_.emplace(canonical.substr(2), slot);
    } else if (!canonical.empty()) {
        exact_.emplace(std::move(canonical), slot);
    }
}

const std::size_t *NameTable::find(std::string_view hostName) const {
    const std::string canonical = canonicalHostName(hostName);
    if (auto it = exact_.find(canonical); it != exact_.end()) {
        return &it->second;
    }
    const std::size_t dot = canonical.find('.');
    if (dot == 0 || dot == std::string::npos || wildcard_.empty()) {
        return nullptr;
    }
    if (auto it = wildcard_.find(canonical.substr(dot + 1)); it != wildcard_.end()) {
        return &it->second;
    }
    return nullptr;
}

const std::size_t *NameTable::findExact(std::string_view name) const {
    const std::string canonical = canonicalHostName(name);
    if (canonical.starts_with("*.") && canonical.size() > 2) {
        auto it = wildcard_.find(canonical.substr(2));
        return it == wildcard_.end() ? nullptr : &it->second;
    }
    auto it = exact_.find(canonical);
    return it == exact_.end() ? nullptr : &it->second;
}

} // namespace sluice::tls
