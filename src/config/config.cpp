// config: sluice.toml to sluice::Config. The loader walks the parsed TOML tree once, checks every
// key against the ones it knows and throws ConfigError at the first problem, naming the position
// toml++ recorded for the offending node. Nothing here touches the files the config names.
#include <sluice/config.hpp>

#if __has_include(<toml++/toml.hpp>)
#include <toml++/toml.hpp>
#else
// Debian's libtomlplusplus-dev 3.3 ships the single header only under its older name.
#include <toml++/toml.h>
#endif

#include <algorithm>
#include <arpa/inet.h>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <initializer_list>
#include <limits>
#include <map>
#include <memory>
#include <sstream>
#include <string_view>
#include <vector>

namespace sluice {

namespace {

/** The longest path a sockaddr_un can hold, leaving room for the terminating NUL. */
constexpr std::size_t maxUnixPath = 107;

bool isDigit(char c) {
    return c >= '0' && c <= '9';
}

std::string inQuotes(std::string_view s) {
    return "\"" + std::string(s) + "\"";
}

std::invalid_argument badValue(std::string_view what, std::string_view text,
                               std::string_view problem) {
    return std::invalid_argument("bad " + std::string(what) + " " + inQuotes(text) + ": " +
                                 std::string(problem));
}

/**
 * Reads the leading decimal digits of `text` into `value` and leaves the rest in `rest`. Returns
 * false when `text` does not start with a digit; throws std::out_of_range when the number does
 * not fit in 64 bits.
 */
bool leadingNumber(std::string_view text, std::uint64_t &value, std::string_view &rest) {
    std::size_t digits = 0;
    while (digits < text.size() && isDigit(text[digits])) {
        ++digits;
    }
    if (digits == 0) {
        return false;
    }
    if (std::from_chars(text.data(), text.data() + digits, value).ec != std::errc()) {
        throw std::out_of_range("too large");
    }
    rest = text.substr(digits);
    return true;
}

bool isHostName(std::string_view host) {
    if (host.size() > 253) {
        return false;
    }
    std::size_t start = 0;
    while (true) {
        std::size_t dot = host.find('.', start);
        std::string_view label =
            host.substr(start, dot == std::string_view::npos ? dot : dot - start);
        if (label.empty() || label.size() > 63 || label.front() == '-' || label.back() == '-') {
            return false;
        }
        for (char c : label) {
            bool alnum = isDigit(c) || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
            if (!alnum && c != '-' && c != '_') {
                return false;
            }
        }
        if (dot == std::string_view::npos) {
            return true;
        }
        start = dot + 1;
    }
}

bool isIpLiteral(int family, std::string_view host) {
    unsigned char out[16];
    return inet_pton(family, std::string(host).c_str(), out) == 1;
}

} // namespace

std::string Address::text() const {
    if (kind == Kind::unix) {
        return "unix:" + path;
    }
    if (host.find(':') != std::string::npos) {
        return "[" + host + "]:" + std::to_string(port);
    }
    return host + ":" + std::to_string(port);
}

Address parseAddress(std::string_view text) {
    constexpr std::string_view unixPrefix = "unix:";
    Address address;
    if (text.starts_with(unixPrefix)) {
        address.kind = Address::Kind::unix;
        address.path = std::string(text.substr(unixPrefix.size()));
        if (address.path.empty()) {
            throw badValue("address", text, "the socket path is empty");
        }
        if (address.path.find('\0') != std::string::npos) {
            throw badValue("address", text, "the socket path contains a NUL byte");
        }
        return address;
    }
    if (text.empty()) {
        throw badValue("address", text, "expected host:port, [ipv6]:port or unix:/path");
    }

    std::string_view host;
    std::string_view port;
    if (text.front() == '[') {
        std::size_t close = text.find(']');
        if (close == std::string_view::npos) {
            throw badValue("address", text, "missing ']' after the IPv6 address");
        }
        host = text.substr(1, close - 1);
        if (host.empty()) {
            throw badValue("address", text, "empty host");
        }
        // A zone ("fe80::1%eth0") is kept in the host; only the address part is checked here.
        if (!isIpLiteral(AF_INET6, host.substr(0, host.find('%')))) {
            throw badValue("address", text, inQuotes(host) + " is not an IPv6 address");
        }
        std::string_view rest = text.substr(close + 1);
        if (rest.empty()) {
            throw badValue("address", text, "missing port");
        }
        if (rest.front() != ':') {
            throw badValue("address", text, "expected ':' and a port after ']'");
        }
        port = rest.substr(1);
    } else {
        std::size_t colon = text.rfind(':');
        if (colon == std::string_view::npos) {
            throw badValue("address", text, "missing port (expected host:port)");
        }
        host = text.substr(0, colon);
        port = text.substr(colon + 1);
        if (host.empty()) {
            throw badValue("address", text, "empty host");
        }
        if (host.find(':') != std::string_view::npos) {
            throw badValue("address", text, "an IPv6 address needs brackets, as in [::1]:443");
        }
        bool numeric =
            std::all_of(host.begin(), host.end(), [](char c) { return isDigit(c) || c == '.'; });
        if (numeric && !isIpLiteral(AF_INET, host)) {
            throw badValue("address", text, inQuotes(host) + " is not an IPv4 address");
        }
        if (!numeric && !isHostName(host)) {
            throw badValue("address", text, inQuotes(host) + " is not a valid host name");
        }
    }

    std::uint64_t number = 0;
    std::string_view rest;
    if (port.empty()) {
        throw badValue("address", text, "missing port");
    }
    bool ok = port.size() <= 5 && leadingNumber(port, number, rest) && rest.empty();
    if (!ok || number > 65535) {
        throw badValue("address", text, "the port must be a number from 0 to 65535");
    }
    address.host = std::string(host);
    address.port = static_cast<std::uint16_t>(number);
    return address;
}

Network parseNetwork(std::string_view text) {
    std::size_t slash = text.find('/');
    std::string_view host = text.substr(0, slash);
    if (host.empty()) {
        throw badValue("network", text, "expected an IP address or ADDRESS/PREFIX");
    }
    Network network;
    network.family = host.find(':') != std::string_view::npos ? AF_INET6 : AF_INET;
    const bool v4 = network.family == AF_INET;
    const unsigned bits = v4 ? 32 : 128;
    if (inet_pton(network.family, std::string(host).c_str(), network.bytes) != 1) {
        throw badValue("network", text,
                       inQuotes(host) + " is not an " + (v4 ? "IPv4" : "IPv6") + " address");
    }
    network.prefix = bits;
    if (slash != std::string_view::npos) {
        std::string_view digits = text.substr(slash + 1);
        std::uint64_t prefix = 0;
        std::string_view rest;
        // One canonical spelling: no sign, no leading zero, no suffix.
        bool ok = digits.size() <= 3 && (digits.size() == 1 || digits.front() != '0') &&
                  leadingNumber(digits, prefix, rest) && rest.empty() && prefix <= bits;
        if (!ok) {
            throw badValue("network", text,
                           "the prefix must be a number from 0 to " + std::to_string(bits));
        }
        network.prefix = static_cast<unsigned>(prefix);
    }
    Network masked = network;
    for (unsigned bit = network.prefix; bit < bits; ++bit) {
        masked.bytes[bit / 8] &= static_cast<std::uint8_t>(~(0x80U >> (bit % 8)));
    }
    if (!std::equal(std::begin(masked.bytes), std::end(masked.bytes), std::begin(network.bytes))) {
        char shown[INET6_ADDRSTRLEN] = {};
        inet_ntop(network.family, masked.bytes, shown, sizeof shown);
        throw badValue("network", text,
                       "host bits set beyond the prefix (the network is " + std::string(shown) +
                           "/" + std::to_string(network.prefix) + ")");
    }
    return network;
}

Duration parseDuration(std::string_view text) {
    constexpr std::string_view expected = "expected a number followed by ms, s, m or h";
    std::uint64_t value = 0;
    std::string_view unit;
    try {
        if (!leadingNumber(text, value, unit)) {
            throw badValue("duration", text, expected);
        }
    } catch (const std::out_of_range &) {
        throw badValue("duration", text, "too large");
    }
    std::uint64_t factor = 0;
    if (unit.empty() || unit == "s") {
        factor = 1000;
    } else if (unit == "ms") {
        factor = 1;
    } else if (unit == "m") {
        factor = std::uint64_t{60} * 1000;
    } else if (unit == "h") {
        factor = std::uint64_t{60} * 60 * 1000;
    } else {
        throw badValue("duration", text, expected);
    }
    constexpr auto max = static_cast<std::uint64_t>(std::numeric_limits<Duration::rep>::max());
    if (value > max / factor) {
        throw badValue("duration", text, "too large");
    }
    return Duration(static_cast<Duration::rep>(value * factor));
}

std::size_t parseSize(std::string_view text) {
    constexpr std::string_view expected =
        "expected a number of bytes, optionally followed by B, KiB, MiB, GiB, KB, MB or GB";
    std::uint64_t value = 0;
    std::string_view unit;
    try {
        if (!leadingNumber(text, value, unit)) {
            throw badValue("size", text, expected);
        }
    } catch (const std::out_of_range &) {
        throw badValue("size", text, "too large");
    }
    static const std::map<std::string_view, std::uint64_t> units = {
        {"", 1},
        {"B", 1},
        {"K", 1ULL << 10},
        {"KiB", 1ULL << 10},
        {"KB", 1000},
        {"M", 1ULL << 20},
        {"MiB", 1ULL << 20},
        {"MB", 1000 * 1000},
        {"G", 1ULL << 30},
        {"GiB", 1ULL << 30},
        {"GB", 1000 * 1000 * 1000},
    };
    auto found = units.find(unit);
    if (found == units.end()) {
        throw badValue("size", text, expected);
    }
    if (value > std::numeric_limits<std::size_t>::max() / found->second) {
        throw badValue("size", text, "too large");
    }
    return static_cast<std::size_t>(value * found->second);
}

namespace config {
namespace {

using Keys = std::initializer_list<std::string_view>;

constexpr std::int64_t maxInt = std::numeric_limits<std::int64_t>::max();
constexpr std::int64_t maxBuffer = std::int64_t{64} * 1024 * 1024;

std::size_t editDistance(std::string_view a, std::string_view b) {
    std::vector<std::size_t> row(b.size() + 1);
    for (std::size_t j = 0; j <= b.size(); ++j) {
        row[j] = j;
    }
    for (std::size_t i = 1; i <= a.size(); ++i) {
        std::size_t diagonal = row[0];
        row[0] = i;
        for (std::size_t j = 1; j <= b.size(); ++j) {
            std::size_t above = row[j];
            std::size_t substitute = diagonal + (a[i - 1] == b[j - 1] ? 0 : 1);
            row[j] = std::min({row[j] + 1, row[j - 1] + 1, substitute});
            diagonal = above;
        }
    }
    return row[b.size()];
}

std::string_view typeName(toml::node_type type) {
    switch (type) {
    case toml::node_type::none:
        return "nothing";
    case toml::node_type::table:
        return "a table";
    case toml::node_type::array:
        return "an array";
    case toml::node_type::string:
        return "a string";
    case toml::node_type::integer:
        return "an integer";
    case toml::node_type::floating_point:
        return "a floating-point number";
    case toml::node_type::boolean:
        return "a boolean";
    case toml::node_type::date:
        return "a date";
    case toml::node_type::time:
        return "a time";
    case toml::node_type::date_time:
        return "a date-time";
    }
    return "an unknown type";
}

bool before(const toml::source_position &a, const toml::source_position &b) {
    return a.line < b.line || (a.line == b.line && a.column < b.column);
}

std::string child(const std::string &path, std::string_view key) {
    return path.empty() ? std::string(key) : path + "." + std::string(key);
}

std::string element(const std::string &path, std::size_t index) {
    return path + "[" + std::to_string(index) + "]";
}

/** "FILE:LINE:COLUMN: ", the prefix of every error that has a position. */
std::string located(const std::string &file, const toml::source_position &position) {
    // A node built without a source (never the case for parsed input) points at the top.
    auto line = position.line == 0 ? 1 : position.line;
    auto column = position.line == 0 ? 1 : position.column;
    return file + ":" + std::to_string(line) + ":" + std::to_string(column) + ": ";
}

/** The absolute folder that relative paths in the file at `path` are taken from. */
std::filesystem::path baseDirectory(const std::string &path) {
    std::filesystem::path file =
        path.empty() ? std::filesystem::path("config") : std::filesystem::path(path);
    return std::filesystem::absolute(file).parent_path();
}

/**
 * Joins `base` and `path` and drops "." and empty parts. ".." is kept on purpose: removing it
 * lexically would give a different file than the kernel's lookup when the folder is a symlink.
 */
std::string resolve(const std::filesystem::path &base, const std::string &path) {
    std::filesystem::path joined =
        std::filesystem::path(path).is_absolute() ? std::filesystem::path(path) : base / path;
    std::filesystem::path clean;
    for (const auto &part : joined) {
        if (part != "." && !part.empty()) {
            clean /= part;
        }
    }
    return clean.string();
}

class Loader {
public:
    Loader(std::string file, std::filesystem::path base)
        : file_(std::move(file))
        , base_(std::move(base)) {}

    Config load(const toml::table &root) {
        checkKeys(root, "", {"global", "tls", "listener", "backend", "admin", "log"});
        Config config;
        if (const toml::node *node = root.get("global")) {
            loadGlobal(asTable(*node, "global"), config.global);
        }
        if (const toml::node *node = root.get("admin")) {
            loadAdmin(asTable(*node, "admin"), config.admin);
        }
        if (const toml::node *node = root.get("log")) {
            loadLog(asTable(*node, "log"), config.log);
        }
        if (const toml::node *node = root.get("tls")) {
            const toml::table &tls = asTable(*node, "tls");
            checkKeys(tls, "tls",
                      {"min_version", "max_version", "ciphers", "ciphersuites", "groups",
                       "signature_algorithms", "session_tickets", "ticket_keys",
                       "ticket_key_rotation", "session_cache", "session_lifetime", "ocsp_refresh"});
            loadTls(tls, "tls", config.tls);
        }
        // Backends first, so that listeners and routes can name them whatever the file order.
        if (const toml::node *node = root.get("backend")) {
            loadBackends(asTable(*node, "backend"), config.backends);
        }
        const toml::node *node = root.get("listener");
        if (node == nullptr) {
            fail(root.source(), "listener", "at least one [[listener]] table is required");
        }
        const toml::array *listeners = node->as_array();
        if (listeners == nullptr) {
            wrongType(*node, "listener", "an array of tables ([[listener]])");
        }
        if (listeners->empty()) {
            fail(node->source(), "listener", "at least one [[listener]] table is required");
        }
        std::map<std::string, std::size_t> names;
        for (std::size_t i = 0; i < listeners->size(); ++i) {
            const std::string key = element("listener", i);
            const toml::table &table = asTable((*listeners)[i], key);
            ListenerConfig listener = loadListener(table, key, config.tls, config.backends);
            identifyTls(table, root.get("tls"), listener);
            auto [previous, added] = names.emplace(listener.name, i);
            if (!added) {
                const toml::node *where = table.get("name");
                fail(where != nullptr ? where->source() : table.get("listen")->source(),
                     child(key, "name"),
                     "duplicate listener name " + inQuotes(listener.name) + " (listener[" +
                         std::to_string(previous->second) + "] has the same name)");
            }
            config.listeners.push_back(std::move(listener));
        }
        return config;
    }

private:
    std::string file_;
    std::filesystem::path base_;

    [[noreturn]] void fail(const toml::source_region &where, const std::string &key,
                           const std::string &message) const {
        throw ConfigError(located(file_, where.begin) + key + ": " + message);
    }

    [[noreturn]] void wrongType(const toml::node &node, const std::string &key,
                                std::string_view expected) const {
        fail(node.source(), key,
             "expected " + std::string(expected) + ", got " + std::string(typeName(node.type())));
    }

    /** Rejects the first key (in file order) of `table` that is not in `known`. */
    void checkKeys(const toml::table &table, const std::string &path, Keys known) const {
        const toml::key *unknown = nullptr;
        for (auto &&[key, value] : table) {
            bool isKnown = std::find(known.begin(), known.end(), key.str()) != known.end();
            if (!isKnown &&
                (unknown == nullptr || before(key.source().begin, unknown->source().begin))) {
                unknown = &key;
            }
        }
        if (unknown == nullptr) {
            return;
        }
        std::string message = "unknown key '" + std::string(unknown->str()) + "'";
        std::string_view best;
        std::size_t bestDistance = 3;
        for (std::string_view candidate : known) {
            std::size_t distance = editDistance(unknown->str(), candidate);
            if (distance < bestDistance) {
                best = candidate;
                bestDistance = distance;
            }
        }
        if (!best.empty()) {
            message += " (did you mean '" + std::string(best) + "'?)";
        }
        fail(unknown->source(), child(path, unknown->str()), message);
    }

    const toml::table &asTable(const toml::node &node, const std::string &key) const {
        const toml::table *table = node.as_table();
        if (table == nullptr) {
            wrongType(node, key, "a table");
        }
        return *table;
    }

    const toml::node &required(const toml::table &table, const std::string &path,
                               std::string_view key) const {
        const toml::node *node = table.get(key);
        if (node == nullptr) {
            fail(table.source(), child(path, key), "required key is missing");
        }
        return *node;
    }

    /** A non-empty string. */
    std::string string(const toml::node &node, const std::string &key) const {
        const toml::value<std::string> *value = node.as_string();
        if (value == nullptr) {
            wrongType(node, key, "a string");
        }
        if (value->get().empty()) {
            fail(node.source(), key, "must not be empty");
        }
        return value->get();
    }

    bool boolean(const toml::node &node, const std::string &key) const {
        const toml::value<bool> *value = node.as_boolean();
        if (value == nullptr) {
            wrongType(node, key, "a boolean (true or false)");
        }
        return value->get();
    }

    /** A non-empty string, or an array of them (an empty array is allowed). */
    std::vector<std::string> strings(const toml::node &node, const std::string &key) const {
        std::vector<std::string> out;
        if (node.is_string()) {
            out.push_back(string(node, key));
            return out;
        }
        const toml::array *array = node.as_array();
        if (array == nullptr) {
            wrongType(node, key, "a string or an array of strings");
        }
        for (std::size_t i = 0; i < array->size(); ++i) {
            out.push_back(string((*array)[i], element(key, i)));
        }
        return out;
    }

    /** "must be between MIN and MAX UNIT" or, without an upper bound, "must be at least MIN". */
    static std::string range(std::int64_t min, std::int64_t max, std::string_view unit) {
        std::string suffix = unit.empty() ? "" : " " + std::string(unit);
        if (max == maxInt) {
            return "must be at least " + std::to_string(min) + suffix;
        }
        return "must be between " + std::to_string(min) + " and " + std::to_string(max) + suffix;
    }

    std::int64_t integer(const toml::node &node, const std::string &key, std::int64_t min,
                         std::int64_t max) const {
        const toml::value<std::int64_t> *value = node.as_integer();
        if (value == nullptr) {
            wrongType(node, key, "an integer");
        }
        if (value->get() < min || value->get() > max) {
            fail(node.source(), key, range(min, max, "") + ", got " + std::to_string(value->get()));
        }
        return value->get();
    }

    Duration duration(const toml::node &node, const std::string &key) const {
        if (const toml::value<std::int64_t> *seconds = node.as_integer()) {
            if (seconds->get() < 0) {
                fail(node.source(), key,
                     "must not be negative, got " + std::to_string(seconds->get()));
            }
            if (seconds->get() > std::numeric_limits<Duration::rep>::max() / 1000) {
                fail(node.source(), key, "too large, got " + std::to_string(seconds->get()));
            }
            return std::chrono::seconds(seconds->get());
        }
        if (const toml::value<std::string> *text = node.as_string()) {
            try {
                return parseDuration(text->get());
            } catch (const std::invalid_argument &error) {
                fail(node.source(), key, error.what());
            }
        }
        wrongType(node, key, "a duration such as \"10s\" or an integer of seconds");
    }

    /** How a size was written, for "got ..." in errors: 100, or "1KiB" (1024 bytes). */
    static std::string sizeAsWritten(const toml::node &node, std::uint64_t bytes) {
        if (const toml::value<std::string> *text = node.as_string()) {
            return inQuotes(text->get()) + " (" + std::to_string(bytes) + " bytes)";
        }
        return std::to_string(bytes);
    }

    std::size_t size(const toml::node &node, const std::string &key, std::int64_t min,
                     std::int64_t max) const {
        std::uint64_t bytes = 0;
        if (const toml::value<std::int64_t> *number = node.as_integer()) {
            if (number->get() < min || number->get() > max) {
                fail(node.source(), key,
                     range(min, max, "bytes") + ", got " + std::to_string(number->get()));
            }
            bytes = static_cast<std::uint64_t>(number->get());
        } else if (const toml::value<std::string> *text = node.as_string()) {
            try {
                bytes = parseSize(text->get());
            } catch (const std::invalid_argument &error) {
                fail(node.source(), key, error.what());
            }
            if (bytes < static_cast<std::uint64_t>(min) ||
                bytes > static_cast<std::uint64_t>(max)) {
                fail(node.source(), key,
                     range(min, max, "bytes") + ", got " + sizeAsWritten(node, bytes));
            }
        } else {
            wrongType(node, key, "a size such as \"64KiB\" or an integer of bytes");
        }
        return static_cast<std::size_t>(bytes);
    }

    std::string version(const toml::node &node, const std::string &key) const {
        std::string text = string(node, key);
        if (text != "1.2" && text != "1.3") {
            fail(node.source(), key, "expected \"1.2\" or \"1.3\", got " + inQuotes(text));
        }
        return text;
    }

    /** The value of the one of `options` that the string at `node` names; anything else fails
     * with "expected "a", "b" or "c", got "x"". */
    template <typename T>
    T choice(const toml::node &node, const std::string &key,
             std::initializer_list<std::pair<std::string_view, T>> options) const {
        const std::string text = string(node, key);
        std::string expected;
        std::size_t i = 0;
        for (const auto &[name, value] : options) {
            if (text == name) {
                return value;
            }
            expected += (i == 0 ? "" : i + 1 == options.size() ? " or " : ", ") + inQuotes(name);
            ++i;
        }
        fail(node.source(), key, "expected " + expected + ", got " + inQuotes(text));
    }

    std::string path(const toml::node &node, const std::string &key) const {
        std::string text = string(node, key);
        if (text.find('\0') != std::string::npos) {
            fail(node.source(), key, "a path must not contain a NUL byte");
        }
        return resolve(base_, text);
    }

    /** One ALPN protocol name: 1 to 255 bytes on the wire (RFC 7301). */
    std::string alpnName(const toml::node &node, const std::string &key) const {
        std::string name = string(node, key);
        if (name.size() > 255) {
            fail(node.source(), key, "an ALPN protocol name is at most 255 bytes");
        }
        return name;
    }

    /** An ALPN protocol name or an array of them (an empty array is allowed). */
    std::vector<std::string> alpnNames(const toml::node &node, const std::string &key) const {
        std::vector<std::string> names;
        if (node.is_string()) {
            names.push_back(alpnName(node, key));
        } else if (const toml::array *array = node.as_array()) {
            for (std::size_t i = 0; i < array->size(); ++i) {
                names.push_back(alpnName((*array)[i], element(key, i)));
            }
        } else {
            wrongType(node, key, "a string or an array of strings");
        }
        return names;
    }

    enum class Role { listener, backend };

    Address address(const toml::node &node, const std::string &key, Role role) const {
        std::string text = string(node, key);
        Address address;
        try {
            address = parseAddress(text);
        } catch (const std::invalid_argument &error) {
            fail(node.source(), key, error.what());
        }
        if (address.kind == Address::Kind::unix) {
            address.path = resolve(base_, address.path);
            if (address.path.size() > maxUnixPath) {
                fail(node.source(), key,
                     "the socket path " + inQuotes(address.path) + " is too long (" +
                         std::to_string(address.path.size()) + " bytes, at most " +
                         std::to_string(maxUnixPath) + ")");
            }
        } else if (role == Role::backend && address.port == 0) {
            fail(node.source(), key,
                 "bad address " + inQuotes(text) + ": a backend needs a port from 1 to 65535");
        }
        return address;
    }

    void loadAdmin(const toml::table &table, AdminConfig &admin) const {
        checkKeys(table, "admin", {"listen"});
        if (const toml::node *node = table.get("listen")) {
            admin.listen = address(*node, "admin.listen", Role::listener);
            if (admin.listen.kind != Address::Kind::tcp) {
                fail(node->source(), "admin.listen", "expected a TCP address (\"host:port\")");
            }
            admin.enabled = true;
        }
    }

    void loadLog(const toml::table &table, LogConfig &log) const {
        checkKeys(table, "log", {"access", "format"});
        if (const toml::node *node = table.get("access")) {
            const std::string access = string(*node, "log.access");
            log.access = access == "stderr" || access == "off" ? access : path(*node, "log.access");
        }
        if (const toml::node *node = table.get("format")) {
            log.format = choice<AccessLogFormat>(
                *node, "log.format",
                {{"logfmt", AccessLogFormat::logfmt}, {"json", AccessLogFormat::json}});
        }
    }

    void loadGlobal(const toml::table &table, GlobalConfig &global) const {
        checkKeys(table, "global",
                  {"max_connections", "drain_timeout", "drain_delay", "log_level", "buffers",
                   "workers", "user", "group", "max_handshakes_per_ip", "max_handshake_rate_per_ip",
                   "release_memory_after", "tls_kdf", "reload_on_change", "upgrade_timeout"});
        if (const toml::node *node = table.get("workers")) {
            if (node->is_string()) {
                if (string(*node, "global.workers") != "auto") {
                    fail(node->source(), "global.workers",
                         "expected \"auto\" or an integer from 1 to 256");
                }
                global.workers = 0;
            } else {
                global.workers = static_cast<unsigned>(integer(*node, "global.workers", 1, 256));
            }
        }
        if (const toml::node *node = table.get("user")) {
            global.user = string(*node, "global.user");
        }
        if (const toml::node *node = table.get("group")) {
            global.group = string(*node, "global.group");
        }
        if (const toml::node *node = table.get("max_connections")) {
            global.maxConnections =
                static_cast<std::uint64_t>(integer(*node, "global.max_connections", 1, maxInt));
        }
        if (const toml::node *node = table.get("max_handshakes_per_ip")) {
            global.maxHandshakesPerIp = static_cast<std::uint64_t>(
                integer(*node, "global.max_handshakes_per_ip", 0, maxInt));
        }
        if (const toml::node *node = table.get("max_handshake_rate_per_ip")) {
            global.maxHandshakeRatePerIp = static_cast<std::uint64_t>(
                integer(*node, "global.max_handshake_rate_per_ip", 0, maxInt));
        }
        if (const toml::node *node = table.get("drain_timeout")) {
            global.drainTimeout = duration(*node, "global.drain_timeout");
        }
        if (const toml::node *node = table.get("drain_delay")) {
            global.drainDelay = duration(*node, "global.drain_delay");
        }
        if (const toml::node *node = table.get("release_memory_after")) {
            global.releaseMemoryAfter = duration(*node, "global.release_memory_after");
        }
        if (const toml::node *node = table.get("reload_on_change")) {
            const std::string key = "global.reload_on_change";
            global.reloadOnChange = duration(*node, key);
            if (global.reloadOnChange != Duration::zero() &&
                global.reloadOnChange < std::chrono::milliseconds(100)) {
                fail(node->source(), key, "must be 0 (reload on SIGHUP only) or at least 100ms");
            }
        }
        if (const toml::node *node = table.get("upgrade_timeout")) {
            const std::string key = "global.upgrade_timeout";
            global.upgradeTimeout = duration(*node, key);
            if (global.upgradeTimeout < std::chrono::milliseconds(100)) {
                fail(node->source(), key, "must be at least 100ms");
            }
        }
        if (const toml::node *node = table.get("tls_kdf")) {
            global.builtinKdf =
                choice<bool>(*node, "global.tls_kdf", {{"sluice", true}, {"openssl", false}});
        }
        if (const toml::node *node = table.get("log_level")) {
            global.logLevel = choice<LogLevel>(*node, "global.log_level",
                                               {{"error", LogLevel::error},
                                                {"warn", LogLevel::warn},
                                                {"info", LogLevel::info},
                                                {"debug", LogLevel::debug}});
        }
        if (const toml::node *node = table.get("buffers")) {
            const toml::table &buffers = asTable(*node, "global.buffers");
            checkKeys(buffers, "global.buffers", {"tls", "tls_bulk", "plaintext", "backend"});
            // The TLS engine must hold at least one record header plus a useful fragment.
            if (const toml::node *value = buffers.get("tls")) {
                global.buffers.tls = size(*value, "global.buffers.tls", 512, maxBuffer);
            }
            if (const toml::node *value = buffers.get("tls_bulk")) {
                global.buffers.tlsBulk = size(*value, "global.buffers.tls_bulk", 512, maxBuffer);
            }
            if (const toml::node *value = buffers.get("plaintext")) {
                global.buffers.plaintext = size(*value, "global.buffers.plaintext", 1, maxBuffer);
            }
            if (const toml::node *value = buffers.get("backend")) {
                global.buffers.backend = size(*value, "global.buffers.backend", 1, maxBuffer);
            }
        }
    }

    /** Overrides the members of `policy` that `table` names; used for [tls] and each listener. */
    void loadTls(const toml::table &table, const std::string &path, TlsPolicy &policy) const {
        const toml::node *minVersion = table.get("min_version");
        const toml::node *maxVersion = table.get("max_version");
        if (minVersion != nullptr) {
            policy.minVersion = version(*minVersion, child(path, "min_version"));
        }
        if (maxVersion != nullptr) {
            policy.maxVersion = version(*maxVersion, child(path, "max_version"));
        }
        if (const toml::node *node = table.get("ciphers")) {
            policy.ciphers = string(*node, child(path, "ciphers"));
        }
        if (const toml::node *node = table.get("ciphersuites")) {
            policy.ciphersuites = string(*node, child(path, "ciphersuites"));
        }
        if (const toml::node *node = table.get("groups")) {
            policy.groups = string(*node, child(path, "groups"));
        }
        if (const toml::node *node = table.get("signature_algorithms")) {
            policy.signatureAlgorithms = string(*node, child(path, "signature_algorithms"));
        }
        if (const toml::node *node = table.get("session_tickets")) {
            policy.sessionTickets =
                static_cast<int>(integer(*node, child(path, "session_tickets"), 0, 16));
        }
        if (const toml::node *node = table.get("ticket_keys")) {
            policy.ticketKeys = this->path(*node, child(path, "ticket_keys"));
        }
        if (const toml::node *node = table.get("ticket_key_rotation")) {
            const std::string key = child(path, "ticket_key_rotation");
            policy.ticketKeyRotation = duration(*node, key);
            if (policy.ticketKeyRotation < std::chrono::seconds(1)) {
                fail(node->source(), key, "must be at least 1s");
            }
        }
        if (const toml::node *node = table.get("session_cache")) {
            policy.sessionCache = static_cast<std::uint64_t>(
                integer(*node, child(path, "session_cache"), 0, 10'000'000));
        }
        if (const toml::node *node = table.get("ocsp_refresh")) {
            const std::string key = child(path, "ocsp_refresh");
            policy.ocspRefresh = duration(*node, key);
            if (policy.ocspRefresh < std::chrono::seconds(1)) {
                fail(node->source(), key, "must be at least 1s");
            }
        }
        if (const toml::node *node = table.get("session_lifetime")) {
            const std::string key = child(path, "session_lifetime");
            policy.sessionLifetime = duration(*node, key);
            // TLS 1.3 caps a ticket's lifetime at seven days (RFC 8446, 4.6.1).
            if (policy.sessionLifetime < std::chrono::seconds(1) ||
                policy.sessionLifetime > std::chrono::hours(24 * 7)) {
                fail(node->source(), key, "must be between 1s and 7 days (\"168h\")");
            }
        }
        // Versions are "1.2" or "1.3", so comparing the strings compares the versions. The
        // inherited half was checked where it was written, so blame the one named here.
        if (policy.minVersion > policy.maxVersion) {
            bool blameMin = minVersion != nullptr;
            fail((blameMin ? minVersion : maxVersion)->source(),
                 child(path, blameMin ? "min_version" : "max_version"),
                 "min_version " + inQuotes(policy.minVersion) + " is greater than max_version " +
                     inQuotes(policy.maxVersion));
        }
    }

    CertificateFiles loadCertificate(const toml::node &node, const std::string &key) const {
        const toml::table &table = asTable(node, key);
        checkKeys(table, key, {"cert", "key", "ocsp", "client_auth"});
        CertificateFiles files;
        files.cert = path(required(table, key, "cert"), child(key, "cert"));
        if (const toml::node *keyNode = table.get("key")) {
            files.key = path(*keyNode, child(key, "key"));
        } else {
            files.key = files.cert; // the key follows the chain in the same PEM file
        }
        if (const toml::node *ocsp = table.get("ocsp")) {
            if (ocsp->value_or(std::string_view()) == "auto") {
#if SLUICE_HAVE_LIBCURL
                files.ocspFetch = true;
#else
                fail(ocsp->source(), child(key, "ocsp"),
                     "\"auto\" needs sluice built with libcurl (libcurl4-openssl-dev), which "
                     "this build is not; name a DER file instead");
#endif
            } else {
                files.ocsp = path(*ocsp, child(key, "ocsp"));
            }
        }
        if (const toml::node *authNode = table.get("client_auth")) {
            const std::string authKey = child(key, "client_auth");
            auto auth = std::make_shared<ClientAuth>();
            loadClientAuth(asTable(*authNode, authKey), authKey, *auth);
            files.clientAuth = std::move(auth);
        }
        return files;
    }

    static bool isHex(char c) {
        return isDigit(c) || (c >= 'a' && c <= 'f');
    }

    /** 64 hex digits, optionally separated by ':', to lowercase hex. */
    std::string spkiPin(const toml::node &node, const std::string &key) const {
        std::string text = string(node, key);
        std::string hex;
        for (char c : text) {
            if (c == ':') {
                continue;
            }
            hex += static_cast<char>((c >= 'A' && c <= 'F') ? c - 'A' + 'a' : c);
        }
        if (hex.size() != 64 || !std::all_of(hex.begin(), hex.end(), isHex)) {
            fail(node.source(), key,
                 "expected a SHA-256 digest as 64 hex digits (colons allowed), got " +
                     inQuotes(text));
        }
        return hex;
    }

    void loadClientAuth(const toml::table &table, const std::string &path, ClientAuth &auth) const {
        checkKeys(table, path,
                  {"mode", "ca", "crl", "verify_depth", "allow_cn", "allow_dns", "allow_uri",
                   "allow_spki_sha256"});
        if (const toml::node *node = table.get("mode")) {
            auth.mode = choice<ClientAuthMode>(*node, child(path, "mode"),
                                               {{"none", ClientAuthMode::none},
                                                {"optional", ClientAuthMode::optional},
                                                {"required", ClientAuthMode::required}});
        }
        if (const toml::node *node = table.get("ca")) {
            auth.ca = this->path(*node, child(path, "ca"));
        } else if (auth.mode != ClientAuthMode::none) {
            fail(table.source(), child(path, "ca"),
                 "required key is missing (mode is not \"none\")");
        }
        if (const toml::node *node = table.get("crl")) {
            const std::string key = child(path, "crl");
            for (const std::string &file : strings(*node, key)) {
                auth.crl.push_back(resolve(base_, file));
            }
        }
        if (const toml::node *node = table.get("verify_depth")) {
            auth.verifyDepth =
                static_cast<int>(integer(*node, child(path, "verify_depth"), 1, 100));
        }
        if (const toml::node *node = table.get("allow_cn")) {
            auth.allowCn = strings(*node, child(path, "allow_cn"));
        }
        if (const toml::node *node = table.get("allow_dns")) {
            auth.allowDns = strings(*node, child(path, "allow_dns"));
        }
        if (const toml::node *node = table.get("allow_uri")) {
            auth.allowUri = strings(*node, child(path, "allow_uri"));
        }
        if (const toml::node *node = table.get("allow_spki_sha256")) {
            const std::string key = child(path, "allow_spki_sha256");
            if (node->is_string()) {
                auth.allowSpkiSha256.push_back(spkiPin(*node, key));
            } else if (const toml::array *pins = node->as_array()) {
                for (std::size_t i = 0; i < pins->size(); ++i) {
                    auth.allowSpkiSha256.push_back(spkiPin((*pins)[i], element(key, i)));
                }
            } else {
                wrongType(*node, key, "a string or an array of strings");
            }
        }
    }

    void loadTimeouts(const toml::table &table, const std::string &path, Timeouts &timeouts) const {
        checkKeys(table, path, {"handshake", "idle", "connect", "half_close", "flush"});
        struct Field {
            std::string_view key;
            Duration Timeouts::*member;
        };
        for (const Field &field :
             {Field{"handshake", &Timeouts::handshake}, Field{"idle", &Timeouts::idle},
              Field{"connect", &Timeouts::connect}, Field{"half_close", &Timeouts::halfClose},
              Field{"flush", &Timeouts::flush}}) {
            if (const toml::node *node = table.get(field.key)) {
                timeouts.*field.member = duration(*node, child(path, field.key));
            }
        }
    }

    /** A socket buffer size: 0 (the kernel's default) or 4 KiB to 64 MiB. */
    std::size_t socketBuffer(const toml::node &node, const std::string &key) const {
        constexpr std::size_t minSocketBuffer = 4096;
        std::size_t bytes = size(node, key, 0, maxInt);
        if (bytes != 0 &&
            (bytes < minSocketBuffer || bytes > static_cast<std::size_t>(maxBuffer))) {
            fail(node.source(), key,
                 "must be 0 (the kernel's default) or between 4096 and 67108864 bytes, got " +
                     sizeAsWritten(node, bytes));
        }
        return bytes;
    }

    void loadSocket(const toml::table &table, const std::string &path,
                    SocketOptions &socket) const {
        checkKeys(table, path, {"no_delay", "keep_alive", "send_buffer", "receive_buffer"});
        if (const toml::node *node = table.get("no_delay")) {
            socket.noDelay = boolean(*node, child(path, "no_delay"));
        }
        if (const toml::node *node = table.get("keep_alive")) {
            const std::string key = child(path, "keep_alive");
            socket.keepAlive = duration(*node, key);
            // TCP_KEEPIDLE takes whole seconds, at most 32767 on Linux.
            bool whole = socket.keepAlive % std::chrono::seconds(1) == Duration::zero();
            if (socket.keepAlive != Duration::zero() &&
                (!whole || socket.keepAlive > std::chrono::seconds(32767))) {
                fail(node->source(), key, "must be 0 (off) or whole seconds from 1s to 32767s");
            }
        }
        if (const toml::node *node = table.get("send_buffer")) {
            socket.sendBuffer = socketBuffer(*node, child(path, "send_buffer"));
        }
        if (const toml::node *node = table.get("receive_buffer")) {
            socket.receiveBuffer = socketBuffer(*node, child(path, "receive_buffer"));
        }
    }

    static bool isBackendName(std::string_view name) {
        return std::all_of(name.begin(), name.end(), [](char c) {
            return isDigit(c) || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '-' ||
                   c == '_' || c == '.';
        });
    }

    /** Every [backend.NAME] table, in file order. */
    void loadBackends(const toml::table &table, std::vector<BackendConfig> &backends) const {
        // toml++ keeps a table's keys sorted; file order makes config.backends read like the file.
        std::vector<std::pair<const toml::key *, const toml::node *>> entries;
        for (auto &&[key, value] : table) {
            entries.emplace_back(&key, &value);
        }
        std::sort(entries.begin(), entries.end(), [](const auto &a, const auto &b) {
            return before(a.first->source().begin, b.first->source().begin);
        });
        for (const auto &[key, value] : entries) {
            const std::string name(key->str());
            const std::string path = child("backend", name);
            if (name.empty()) {
                fail(key->source(), path, "a backend name must not be empty");
            }
            if (!isBackendName(name)) {
                fail(key->source(), path,
                     "bad backend name " + inQuotes(name) +
                         ": use only letters, digits, '-', '_' and '.'");
            }
            backends.push_back(loadBackend(asTable(*value, path), path, name));
        }
    }

    BackendConfig loadBackend(const toml::table &table, const std::string &path,
                              const std::string &name) const {
        checkKeys(table, path,
                  {"servers", "handler", "balance", "connect_timeout", "connect_after", "attempts",
                   "max_fails", "fail_timeout", "resolve_interval", "proxy_protocol",
                   "proxy_client_cert_max", "tls", "socket"});
        BackendConfig backend;
        backend.name = name;

        if (const toml::node *node = table.get("handler")) {
            // Served in-process by the embedding program: nothing else of a pool applies.
            const std::string key = child(path, "handler");
            backend.handler = string(*node, key);
            if (backend.handler.empty()) {
                fail(node->source(), key, "must not be empty");
            }
            for (const auto &[other, value] : table) {
                if (other.str() != "handler") {
                    fail(value.source(), child(path, other.str()),
                         "a backend served by a handler has no " + std::string(other.str()));
                }
            }
            return backend;
        }

        const std::string serversKey = child(path, "servers");
        const toml::node &servers = required(table, path, "servers");
        if (servers.is_string()) {
            backend.servers.push_back(address(servers, serversKey, Role::backend));
        } else if (const toml::array *list = servers.as_array()) {
            if (list->empty()) {
                fail(servers.source(), serversKey, "must name at least one server");
            }
            for (std::size_t i = 0; i < list->size(); ++i) {
                const std::string key = element(serversKey, i);
                Address server = address((*list)[i], key, Role::backend);
                // One address twice would count its failures and connections twice.
                for (std::size_t j = 0; j < backend.servers.size(); ++j) {
                    if (backend.servers[j].text() == server.text()) {
                        fail((*list)[i].source(), key,
                             inQuotes(server.text()) + " is listed twice (" +
                                 element(serversKey, j) + " is the same)");
                    }
                }
                backend.servers.push_back(std::move(server));
            }
        } else {
            wrongType(servers, serversKey, "a string or an array of strings");
        }

        if (const toml::node *node = table.get("balance")) {
            backend.balance = choice<Balance>(*node, child(path, "balance"),
                                              {{"round-robin", Balance::roundRobin},
                                               {"least-connections", Balance::leastConnections},
                                               {"first", Balance::first}});
        }
        if (const toml::node *node = table.get("connect_timeout")) {
            backend.connectTimeout = duration(*node, child(path, "connect_timeout"));
        }
        if (const toml::node *node = table.get("connect_after")) {
            backend.connectAfter = choice<ConnectAfter>(
                *node, child(path, "connect_after"),
                {{"handshake", ConnectAfter::handshake}, {"hello", ConnectAfter::hello}});
        }
        if (const toml::node *node = table.get("attempts")) {
            backend.attempts =
                static_cast<unsigned>(integer(*node, child(path, "attempts"), 0, 1000));
        }
        if (const toml::node *node = table.get("max_fails")) {
            backend.maxFails =
                static_cast<unsigned>(integer(*node, child(path, "max_fails"), 0, 1000));
        }
        if (const toml::node *node = table.get("fail_timeout")) {
            backend.failTimeout = duration(*node, child(path, "fail_timeout"));
        }
        if (const toml::node *node = table.get("resolve_interval")) {
            const std::string key = child(path, "resolve_interval");
            backend.resolveInterval = duration(*node, key);
            // A sub-second interval would turn the resolver into a load generator.
            if (backend.resolveInterval != Duration::zero() &&
                backend.resolveInterval < std::chrono::seconds(1)) {
                fail(node->source(), key, "must be 0 (at start and reload only) or at least 1s");
            }
        }
        if (const toml::node *node = table.get("proxy_protocol")) {
            backend.proxyProtocol = choice<ProxyProtocol>(*node, child(path, "proxy_protocol"),
                                                          {{"off", ProxyProtocol::off},
                                                           {"v1", ProxyProtocol::v1},
                                                           {"v2", ProxyProtocol::v2}});
        }
        if (const toml::node *node = table.get("proxy_client_cert_max")) {
            const std::string key = child(path, "proxy_client_cert_max");
            // The whole v2 header, TLVs included, has a 16-bit length; leave room for the rest.
            backend.proxyClientCertMax = size(*node, key, 0, 65000);
            if (backend.proxyProtocol != ProxyProtocol::v2) {
                fail(node->source(), key,
                     "only used with proxy_protocol = \"v2\" (the certificate travels in a v2 "
                     "TLV)");
            }
        }
        if (const toml::node *node = table.get("tls")) {
            const std::string key = child(path, "tls");
            loadBackendTls(asTable(*node, key), key, backend.tls);
        }
        if (const toml::node *node = table.get("socket")) {
            const std::string key = child(path, "socket");
            loadSocket(asTable(*node, key), key, backend.socket);
        }
        return backend;
    }

    void loadBackendTls(const toml::table &table, const std::string &path, BackendTls &tls) const {
        checkKeys(
            table, path,
            {"ca", "verify", "server_name", "alpn", "cert", "key", "min_version", "max_version"});
        tls.enabled = true;
        if (const toml::node *node = table.get("ca")) {
            tls.ca = this->path(*node, child(path, "ca"));
        }
        if (const toml::node *node = table.get("verify")) {
            tls.verify = boolean(*node, child(path, "verify"));
        }
        if (const toml::node *node = table.get("server_name")) {
            tls.serverName = string(*node, child(path, "server_name"));
        }
        if (const toml::node *node = table.get("alpn")) {
            tls.alpn = alpnNames(*node, child(path, "alpn"));
        }
        const toml::node *cert = table.get("cert");
        const toml::node *key = table.get("key");
        if (cert != nullptr && key == nullptr) {
            fail(table.source(), child(path, "key"), "required key is missing (cert is set)");
        }
        if (key != nullptr && cert == nullptr) {
            fail(table.source(), child(path, "cert"), "required key is missing (key is set)");
        }
        if (cert != nullptr) {
            tls.cert = this->path(*cert, child(path, "cert"));
            tls.key = this->path(*key, child(path, "key"));
        }
        const toml::node *minVersion = table.get("min_version");
        const toml::node *maxVersion = table.get("max_version");
        if (minVersion != nullptr) {
            tls.minVersion = version(*minVersion, child(path, "min_version"));
        }
        if (maxVersion != nullptr) {
            tls.maxVersion = version(*maxVersion, child(path, "max_version"));
        }
        if (tls.minVersion > tls.maxVersion) {
            bool blameMin = minVersion != nullptr;
            fail((blameMin ? minVersion : maxVersion)->source(),
                 child(path, blameMin ? "min_version" : "max_version"),
                 "min_version " + inQuotes(tls.minVersion) + " is greater than max_version " +
                     inQuotes(tls.maxVersion));
        }
    }

    /**
     * A listener's or a route's `backend`: the name of a [backend.NAME] table or, when it holds a
     * ':', an address, which becomes a backend of its own named by Address::text() (shared by
     * every place that writes the same address). Returns the backend's name.
     */
    std::string backendReference(const toml::node &node, const std::string &key,
                                 std::vector<BackendConfig> &backends) const {
        std::string text = string(node, key);
        auto named = [&](const std::string &name) {
            return std::any_of(backends.begin(), backends.end(),
                               [&](const BackendConfig &backend) { return backend.name == name; });
        };
        if (text.find(':') != std::string::npos) {
            Address server = address(node, key, Role::backend);
            std::string name = server.text();
            if (!named(name)) {
                BackendConfig implicit;
                implicit.name = name;
                implicit.servers.push_back(std::move(server));
                backends.push_back(std::move(implicit));
            }
            return name;
        }
        if (named(text)) {
            return text;
        }
        // Backends made from addresses have a ':' in their name and are never suggested.
        std::string_view best;
        std::size_t bestDistance = 3;
        for (const BackendConfig &backend : backends) {
            std::size_t distance = editDistance(text, backend.name);
            if (backend.name.find(':') == std::string::npos && distance < bestDistance) {
                best = backend.name;
                bestDistance = distance;
            }
        }
        std::string message = "no backend named " + inQuotes(text);
        if (!best.empty()) {
            message += " (did you mean " + inQuotes(best) + "?)";
        } else {
            bool plain = isBackendName(text) && text.find('.') == std::string::npos;
            message += "; define [backend." + (plain ? text : inQuotes(text)) +
                       "] or write an address: \"host:port\", \"[ipv6]:port\" or \"unix:/path\"";
        }
        fail(node.source(), key, message);
    }

    /** A route's SNI: an exact host name or "*.example.com", returned in lowercase. */
    std::string sniPattern(const toml::node &node, const std::string &key) const {
        const std::string text = string(node, key);
        auto bad = [&](std::string_view problem) {
            fail(node.source(), key,
                 "bad SNI name " + inQuotes(text) + ": " + std::string(problem));
        };
        std::string name;
        for (char c : text) {
            name += static_cast<char>((c >= 'A' && c <= 'Z') ? c - 'A' + 'a' : c);
        }
        if (name.size() > 253) {
            bad("longer than 253 bytes");
        }
        for (std::size_t start = 0, index = 0;; ++index) {
            std::size_t dot = name.find('.', start);
            std::string_view label = std::string_view(name).substr(
                start, dot == std::string::npos ? std::string::npos : dot - start);
            if (label.empty()) {
                bad("empty label");
            }
            if (label == "*" && index == 0 && dot == std::string::npos) {
                bad("a wildcard needs a domain after it, as in \"*.example.com\"");
            }
            if (label != "*" || index != 0) {
                if (label.find('*') != std::string_view::npos) {
                    bad("'*' may only be the whole first label, as in \"*.example.com\"");
                }
                if (label.size() > 63) {
                    bad("a label is longer than 63 bytes");
                }
                for (char c : label) {
                    if (!isDigit(c) && !(c >= 'a' && c <= 'z') && c != '-' && c != '_') {
                        bad("only letters, digits, '-' and '_' may appear in a label");
                    }
                }
            }
            if (dot == std::string::npos) {
                break;
            }
            start = dot + 1;
        }
        return name;
    }

    Route loadRoute(const toml::node &node, const std::string &path, const ListenerConfig &listener,
                    const std::string &listenerPath, std::vector<BackendConfig> &backends) const {
        const toml::table &table = asTable(node, path);
        checkKeys(table, path, {"sni", "alpn", "backend"});
        Route route;
        if (const toml::node *sni = table.get("sni")) {
            route.sni = sniPattern(*sni, child(path, "sni"));
        }
        if (const toml::node *alpn = table.get("alpn")) {
            const std::string key = child(path, "alpn");
            route.alpn = alpnName(*alpn, key);
            // Only the listener's own protocols can be negotiated, so any other never matches.
            if (std::find(listener.alpn.begin(), listener.alpn.end(), route.alpn) ==
                listener.alpn.end()) {
                fail(alpn->source(), key,
                     inQuotes(route.alpn) + " is not in " + child(listenerPath, "alpn") +
                         ", so no connection can negotiate it");
            }
        }
        if (route.sni.empty() && route.alpn.empty()) {
            fail(table.source(), path, "a route needs sni, alpn or both");
        }
        route.backend =
            backendReference(required(table, path, "backend"), child(path, "backend"), backends);
        return route;
    }

    /** Sets listener.tlsIdentity and listener.tlsFiles (see config.hpp). */
    void identifyTls(const toml::table &table, const toml::node *tls,
                     ListenerConfig &listener) const {
        toml::table relevant = table;
        for (const char *key : {"listen", "backend", "route", "accept_proxy_from", "socket",
                                "timeouts", "max_connections", "backlog"}) {
            relevant.erase(key);
        }
        std::ostringstream text;
        text << "base " << base_.string() << "\n" << relevant << "\n[tls]\n";
        if (tls != nullptr && tls->is_table()) {
            text << *tls->as_table();
        }
        listener.tlsIdentity = text.str();
        auto collect = [&](auto &self, const toml::node &node) -> void {
            if (const auto *value = node.as_string()) {
                if (!value->get().empty()) {
                    listener.tlsFiles.push_back(resolve(base_, value->get()));
                }
            } else if (const auto *inner = node.as_table()) {
                for (auto &&[key, child] : *inner) {
                    self(self, child);
                }
            } else if (const auto *array = node.as_array()) {
                for (const auto &child : *array) {
                    self(self, child);
                }
            }
        };
        collect(collect, relevant);
        if (tls != nullptr) {
            collect(collect, *tls);
        }
    }

    /** The keys a plaintext listener may not have: everything that configures TLS. */
    static constexpr std::string_view tlsOnlyKeys[] = {"certificate",
                                                       "certificates_dir",
                                                       "strict_sni",
                                                       "alpn",
                                                       "alpn_mismatch",
                                                       "client_auth",
                                                       "min_version",
                                                       "max_version",
                                                       "ciphers",
                                                       "ciphersuites",
                                                       "groups",
                                                       "signature_algorithms",
                                                       "session_tickets",
                                                       "ticket_keys",
                                                       "ticket_key_rotation",
                                                       "session_cache",
                                                       "session_lifetime",
                                                       "ocsp_refresh"};

    /** Rejects the first key (in file order) that configures TLS on a plaintext listener. */
    void checkPlaintext(const toml::table &table, const std::string &path) const {
        const toml::key *first = nullptr;
        for (auto &&[key, value] : table) {
            bool tlsOnly = std::find(std::begin(tlsOnlyKeys), std::end(tlsOnlyKeys), key.str()) !=
                           std::end(tlsOnlyKeys);
            if (tlsOnly &&
                (first == nullptr || before(key.source().begin, first->source().begin))) {
                first = &key;
            }
        }
        if (first != nullptr) {
            fail(first->source(), child(path, first->str()),
                 "not allowed on a plaintext listener (it does not terminate TLS)");
        }
        if (const toml::node *route = table.get("route")) {
            fail(route->source(), child(path, "route"),
                 "a plaintext listener has no SNI or ALPN to route on");
        }
    }

    ListenerConfig loadListener(const toml::table &table, const std::string &path,
                                const TlsPolicy &defaults,
                                std::vector<BackendConfig> &backends) const {
        checkKeys(table, path,
                  {"name",
                   "listen",
                   "certificate",
                   "certificates_dir",
                   "strict_sni",
                   "alpn",
                   "alpn_mismatch",
                   "client_auth",
                   "backend",
                   "min_version",
                   "max_version",
                   "ciphers",
                   "ciphersuites",
                   "groups",
                   "signature_algorithms",
                   "session_tickets",
                   "ticket_keys",
                   "ticket_key_rotation",
                   "session_cache",
                   "session_lifetime",
                   "ocsp_refresh",
                   "timeouts",
                   "max_connections",
                   "backlog",
                   "plaintext",
                   "route",
                   "accept_proxy_from",
                   "socket"});
        ListenerConfig listener;
        if (const toml::node *node = table.get("plaintext")) {
            listener.plaintext = boolean(*node, child(path, "plaintext"));
        }
        if (listener.plaintext) {
            checkPlaintext(table, path);
        }

        const std::string listenKey = child(path, "listen");
        const toml::node &listen = required(table, path, "listen");
        if (listen.is_string()) {
            listener.listen.push_back(address(listen, listenKey, Role::listener));
        } else if (const toml::array *addresses = listen.as_array()) {
            if (addresses->empty()) {
                fail(listen.source(), listenKey, "must name at least one address");
            }
            for (std::size_t i = 0; i < addresses->size(); ++i) {
                listener.listen.push_back(
                    address((*addresses)[i], element(listenKey, i), Role::listener));
            }
        } else {
            wrongType(listen, listenKey, "a string or an array of strings");
        }

        if (const toml::node *node = table.get("certificates_dir")) {
            listener.certificatesDir = this->path(*node, child(path, "certificates_dir"));
        }
        const std::string certificateKey = child(path, "certificate");
        // With a certificates_dir, every certificate may come from the folder.
        const toml::node *certificate = table.get("certificate");
        if (certificate == nullptr && listener.certificatesDir.empty() && !listener.plaintext) {
            fail(table.source(), certificateKey, "required key is missing");
        }
        if (certificate == nullptr) {
            // Nothing more to read here.
        } else if (certificate->is_table()) {
            listener.certificates.push_back(loadCertificate(*certificate, certificateKey));
        } else if (const toml::array *certificates = certificate->as_array()) {
            if (certificates->empty()) {
                fail(certificate->source(), certificateKey, "must name at least one certificate");
            }
            for (std::size_t i = 0; i < certificates->size(); ++i) {
                listener.certificates.push_back(
                    loadCertificate((*certificates)[i], element(certificateKey, i)));
            }
        } else {
            wrongType(*certificate, certificateKey, "a table or an array of tables");
        }

        listener.backend =
            backendReference(required(table, path, "backend"), child(path, "backend"), backends);

        if (const toml::node *node = table.get("name")) {
            listener.name = string(*node, child(path, "name"));
        } else {
            listener.name = listener.listen.front().text();
        }

        listener.tls = defaults;
        loadTls(table, path, listener.tls);

        if (const toml::node *node = table.get("strict_sni")) {
            listener.strictSni = boolean(*node, child(path, "strict_sni"));
        }
        if (const toml::node *node = table.get("alpn")) {
            listener.alpn = alpnNames(*node, child(path, "alpn"));
        }
        if (const toml::node *node = table.get("alpn_mismatch")) {
            listener.alpnMismatch = choice<AlpnMismatch>(
                *node, child(path, "alpn_mismatch"),
                {{"proceed", AlpnMismatch::proceed}, {"fail", AlpnMismatch::fail}});
        }
        if (const toml::node *node = table.get("client_auth")) {
            const std::string key = child(path, "client_auth");
            loadClientAuth(asTable(*node, key), key, listener.clientAuth);
        }

        // After alpn: a route's protocol must be one of the listener's.
        if (const toml::node *node = table.get("route")) {
            const std::string key = child(path, "route");
            const toml::array *routes = node->as_array();
            if (routes == nullptr) {
                wrongType(*node, key, "an array of tables ([[listener.route]])");
            }
            for (std::size_t i = 0; i < routes->size(); ++i) {
                listener.routes.push_back(
                    loadRoute((*routes)[i], element(key, i), listener, path, backends));
            }
        }
        if (const toml::node *node = table.get("accept_proxy_from")) {
            const std::string key = child(path, "accept_proxy_from");
            auto network = [&](const toml::node &item, const std::string &itemKey) {
                std::string text = string(item, itemKey);
                try {
                    (void)parseNetwork(text);
                } catch (const std::invalid_argument &error) {
                    fail(item.source(), itemKey, error.what());
                }
                listener.acceptProxyFrom.push_back(std::move(text));
            };
            if (node->is_string()) {
                network(*node, key);
            } else if (const toml::array *sources = node->as_array()) {
                for (std::size_t i = 0; i < sources->size(); ++i) {
                    network((*sources)[i], element(key, i));
                }
            } else {
                wrongType(*node, key, "a string or an array of strings");
            }
        }
        if (const toml::node *node = table.get("socket")) {
            const std::string key = child(path, "socket");
            loadSocket(asTable(*node, key), key, listener.socket);
        }
        if (const toml::node *node = table.get("timeouts")) {
            const std::string key = child(path, "timeouts");
            loadTimeouts(asTable(*node, key), key, listener.timeouts);
        }
        if (const toml::node *node = table.get("max_connections")) {
            listener.maxConnections = static_cast<std::uint64_t>(
                integer(*node, child(path, "max_connections"), 0, maxInt));
        }
        if (const toml::node *node = table.get("backlog")) {
            listener.backlog = static_cast<int>(integer(*node, child(path, "backlog"), 1, 65535));
        }
        return listener;
    }
};

/** toml++ says "Error while parsing X: Y"; this makes it read as the rest of our messages. */
std::string syntaxMessage(std::string_view description) {
    constexpr std::string_view prefix = "Error while ";
    if (description.starts_with(prefix)) {
        return "syntax error while " + std::string(description.substr(prefix.size()));
    }
    return "syntax error: " + std::string(description);
}

struct FileCloser {
    void operator()(std::FILE *file) const { std::fclose(file); }
};

} // namespace
} // namespace config

ConfigError::~ConfigError() = default;

const BackendConfig *Config::findBackend(std::string_view name) const {
    for (const BackendConfig &backend : backends) {
        if (backend.name == name) {
            return &backend;
        }
    }
    return nullptr;
}

Config parseConfig(std::string_view text, const std::string &path) {
    const std::string name = path.empty() ? "<string>" : path;
    toml::table root;
    try {
        root = toml::parse(text, std::string_view(name));
    } catch (const toml::parse_error &error) {
        throw ConfigError(config::located(name, error.source().begin) +
                          config::syntaxMessage(error.description()));
    }
    Config config = config::Loader(name, config::baseDirectory(path)).load(root);
    config.path = path;
    return config;
}

Config loadConfig(const std::string &path) {
    std::unique_ptr<std::FILE, config::FileCloser> file(std::fopen(path.c_str(), "rb"));
    if (!file) {
        throw ConfigError(path + ": cannot read: " + std::strerror(errno));
    }
    std::string text;
    char chunk[16384];
    std::size_t count = 0;
    while ((count = std::fread(chunk, 1, sizeof chunk, file.get())) > 0) {
        text.append(chunk, count);
    }
    if (std::ferror(file.get())) {
        // A folder opens fine and fails here with EISDIR.
        throw ConfigError(path + ": cannot read: " + std::strerror(errno));
    }
    return parseConfig(text, path);
}

} // namespace sluice
