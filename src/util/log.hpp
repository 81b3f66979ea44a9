// util/log: one line per event on stderr, "LEVEL event key=value ...", filtered by a global
// threshold. Lines are written with one write(2) so concurrent writers never interleave.
#pragma once

#include <string>
#include <string_view>

#include <sluice/config.hpp>

namespace sluice::log {

/** Sets the lowest level that is printed; the default is info. */
void setLevel(LogLevel level);

/** True when a line at `level` would be printed (skip building it otherwise). */
bool enabled(LogLevel level);

/**
 * `text` as a quoted field value: in double quotes, with its own double quotes and backslashes
 * turned into single quotes, so that a reason or a path cannot end the field early.
 */
std::string quoted(std::string_view text);

/** Prints one line at `level`. `line` should not end in a newline. */
void write(LogLevel level, std::string_view line);

inline void error(std::string_view line) {
    write(LogLevel::error, line);
}
inline void warn(std::string_view line) {
    write(LogLevel::warn, line);
}
inline void info(std::string_view line) {
    write(LogLevel::info, line);
}
inline void debug(std::string_view line) {
    write(LogLevel::debug, line);
}

} // namespace sluice::log
