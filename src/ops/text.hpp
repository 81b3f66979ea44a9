// ops/text: escaping for the formats ops/ writes (JSON, logfmt, Prometheus label values) and
// timestamps. Values can come from the wire (SNI, client certificates): every function here
// turns any byte string into output that cannot break the line or the document it goes into.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace sluice::ops {

/**
 * Appends `text` as a JSON string, quotes included. Valid UTF-8 is kept; quote, backslash and
 * control characters are escaped; each byte of an invalid UTF-8 sequence becomes U+FFFD.
 */
void appendJsonString(std::string &out, std::string_view text);

/**
 * Appends `text` as a logfmt value: bare when it is non-empty printable ASCII without space,
 * '=', '"' or '\\'; otherwise quoted, with \" \\ \n \r \t and \xNN (other control bytes and
 * every byte >= 0x7f) escaped. The result never contains a raw newline or a raw non-ASCII byte.
 */
void appendLogfmtValue(std::string &out, std::string_view text);

/** Appends `text` escaped as a Prometheus label value (\\, \" and \n), without quotes. */
void appendLabelValue(std::string &out, std::string_view text);

/** "2024-06-01T12:00:00.123Z" (UTC, milliseconds) for Unix microseconds. */
std::string rfc3339(std::int64_t unixMicros);

/** `nanos` as milliseconds with three decimals: "12.345". */
std::string milliseconds(std::uint64_t nanos);

/** A double as Prometheus and JSON accept it (shortest round-trip form; integers without ".0"). */
std::string number(double value);

} // namespace sluice::ops
