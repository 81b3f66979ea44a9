#include "ops/text.hpp"

#include <charconv>
#include <cmath>
#include <cstdio>
#include <ctime>

namespace sluice::ops {
namespace {

constexpr char hexDigits[] = "0123456789abcdef";

/** Length of the valid UTF-8 sequence at the start of `text`, or 0 when it is not valid. */
std::size_t utf8Length(std::string_view text) {
    const auto byte = [&](std::size_t i) { return static_cast<unsigned char>(text[i]); };
    const unsigned char lead = byte(0);
    std::size_t length = 0;
    std::uint32_t code = 0;
    if (lead >= 0xc2 && lead <= 0xdf) {
        length = 2;
        code = lead & 0x1fu;
    } else if (lead >= 0xe0 && lead <= 0xef) {
        length = 3;
        code = lead & 0x0fu;
    } else if (lead >= 0xf0 && lead <= 0xf4) {
        length = 4;
        code = lead & 0x07u;
    } else {
        return 0;
    }
    if (text.size() < length) {
        return 0;
    }
    for (std::size_t i = 1; i < length; ++i) {
        if ((byte(i) & 0xc0u) != 0x80u) {
            return 0;
        }
        code = (code << 6) | (byte(i) & 0x3fu);
    }
    // Overlong forms, surrogates and values past U+10FFFF are not UTF-8.
    if ((length == 3 && code < 0x800) || (length == 4 && code < 0x10000) || code > 0x10ffff ||
        (code >= 0xd800 && code <= 0xdfff)) {
        return 0;
    }
    return length;
}

/**
 * Appends the backslash escape JSON and logfmt share for `c` (quote, backslash, newline,
 * carriage return, tab); returns false when `c` has none.
 */
bool appendShortEscape(std::string &out, unsigned char c) {
    switch (c) {
    case '"':
        out += "\\\"";
        return true;
    case '\\':
        out += "\\\\";
        return true;
    case '\n':
        out += "\\n";
        return true;
    case '\r':
        out += "\\r";
        return true;
    case '\t':
        out += "\\t";
        return true;
    default:
        return false;
    }
}

} // namespace

void appendJsonString(std::string &out, std::string_view text) {
    out += '"';
    for (std::size_t i = 0; i < text.size();) {
        const auto c = static_cast<unsigned char>(text[i]);
        if (c >= 0x80) {
            const std::size_t length = utf8Length(text.substr(i));
            if (length == 0) {
                out += "\\ufffd";
                ++i;
            } else {
                out.append(text.substr(i, length));
                i += length;
            }
            continue;
        }
        if (!appendShortEscape(out, c)) {
            if (c < 0x20 || c == 0x7f) {
                out += "\\u00";
                out += hexDigits[c >> 4];
                out += hexDigits[c & 0xf];
            } else {
                out += static_cast<char>(c);
            }
        }
        ++i;
    }
    out += '"';
}

void appendLogfmtValue(std::string &out, std::string_view text) {
    bool bare = !text.empty();
    for (char ch : text) {
        const auto c = static_cast<unsigned char>(ch);
        if (c <= 0x20 || c >= 0x7f || c == '=' || c == '"' || c == '\\') {
            bare = false;
            break;
        }
    }
    if (bare) {
        out.append(text);
        return;
    }
    out += '"';
    for (char ch : text) {
        const auto c = static_cast<unsigned char>(ch);
        if (!appendShortEscape(out, c)) {
            if (c < 0x20 || c >= 0x7f) {
                out += "\\x";
                out += hexDigits[c >> 4];
                out += hexDigits[c & 0xf];
            } else {
                out += static_cast<char>(c);
            }
        }
    }
    out += '"';
}

void appendLabelValue(std::string &out, std::string_view text) {
    for (char c : text) {
        if (c == '\\') {
            out += "\\\\";
        } else if (c == '"') {
            out += "\\\"";
        } else if (c == '\n') {
            out += "\\n";
        } else {
            out += c;
        }
    }
}

std::string rfc3339(std::int64_t unixMicros) {
    const std::time_t seconds = static_cast<std::time_t>(unixMicros / 1000000);
    const auto millis = static_cast<int>((unixMicros % 1000000) / 1000);
    std::tm tm{};
    gmtime_r(&seconds, &tm);
    char buf[96];
    std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900,
                  tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, millis);
    return buf;
}

std::string milliseconds(std::uint64_t nanos) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%llu.%03llu", static_cast<unsigned long long>(nanos / 1000000),
                  static_cast<unsigned long long>((nanos / 1000) % 1000));
    return buf;
}

std::string number(double value) {
    if (std::isnan(value)) {
        return "NaN";
    }
    if (std::isinf(value)) {
        return value > 0 ? "+Inf" : "-Inf";
    }
    char buf[64];
    auto [end, ec] = std::to_chars(buf, buf + sizeof buf, value);
    if (ec != std::errc()) {
        return "0";
    }
    return std::string(buf, end);
}

} // namespace sluice::ops
