// ops/access_log: one line per connection, written when the connection starts closing, in
// logfmt or JSON, to stderr or to a file that SIGUSR1 reopens. Worker threads share one
// AccessLog: each line leaves in one write(2) on an O_APPEND descriptor, so lines never
// interleave, and reopen() swaps the file under the same descriptor number (dup2), so a writer
// never sees a closed descriptor.
#pragma once

#include <memory>
#include <string>

#include <sluice/config.hpp>

#include "proxy/stats.hpp"

namespace sluice::ops {

/**
 * The logfmt line for `record`, without the newline. Without `eventField` the "event=access"
 * pair is left out (on stderr the line is "sluice info access ..." like every other event).
 */
std::string formatLogfmt(const proxy::ConnectionRecord &record, bool eventField = true);

/** The JSON object for `record`, on one line, without the newline. */
std::string formatJson(const proxy::ConnectionRecord &record);

class AccessLog {
public:
    /**
     * The access log `config` asks for: nullptr for "off", stderr, or the file (created with
     * mode 0640 if missing, appended to). Throws std::runtime_error naming the file. On stderr,
     * logfmt lines take the daemon's log form, "sluice info access ts=... listener=...", and
     * are written only when global.log_level lets info lines through.
     */
    static std::shared_ptr<AccessLog> open(const LogConfig &config);

    /**
     * Makes `log` the destination of every connection record (proxy's access-log sink), or,
     * with nullptr, turns the access log off. Safe while workers run; a record being written
     * keeps its log alive until the write ends.
     */
    static void install(std::shared_ptr<AccessLog> log);

    ~AccessLog();
    AccessLog(const AccessLog &) = delete;
    AccessLog &operator=(const AccessLog &) = delete;

    /** Formats and writes one line. Thread-safe; a failed write is dropped. */
    void write(const proxy::ConnectionRecord &record);

    /**
     * Opens the file again by name (after rotation moved it) and swaps it in. Does nothing for
     * stderr. On failure the old file stays in use and `error` says why.
     */
    bool reopen(std::string *error = nullptr);

    const std::string &path() const { return path_; }
    AccessLogFormat format() const { return format_; }

private:
    AccessLog(int fd, std::string path, AccessLogFormat format);

    int fd_;
    std::string path_; ///< empty for stderr
    AccessLogFormat format_;
};

} // namespace sluice::ops
