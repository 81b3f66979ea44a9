#include "util/log.hpp"

#include <atomic>
#include <string>
#include <unistd.h>

namespace sluice::log {
namespace {

std::atomic<int> threshold{static_cast<int>(LogLevel::info)};

const char *levelName(LogLevel level) {
    switch (level) {
    case LogLevel::error:
        return "error";
    case LogLevel::warn:
        return "warn";
    case LogLevel::info:
        return "info";
    case LogLevel::debug:
        return "debug";
    }
    return "?";
}

} // namespace

std::string quoted(std::string_view text) {
    std::string out;
    out.reserve(text.size() + 2);
    out += '"';
    for (const char c : text) {
        out += (c == '"' || c == '\\') ? '\'' : c;
    }
    out += '"';
    return out;
}

void setLevel(LogLevel level) {
    threshold.store(static_cast<int>(level));
}

bool enabled(LogLevel level) {
    return static_cast<int>(level) <= threshold.load();
}

void write(LogLevel level, std::string_view line) {
    if (!enabled(level)) {
        return;
    }
    std::string out;
    out.reserve(line.size() + 16);
    out += "sluice ";
    out += levelName(level);
    out += ' ';
    out += line;
    out += '\n';
    // A short write to stderr is not worth retrying for a log line; the result is ignored on
    // purpose.
    [[maybe_unused]] auto written = ::write(STDERR_FILENO, out.data(), out.size());
}

} // namespace sluice::log
