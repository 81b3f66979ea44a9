#include "ops/access_log.hpp"

#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <stdexcept>
#include <unistd.h>

#include "ops/text.hpp"
#include "util/log.hpp"

namespace sluice::ops {
namespace {

int openAppend(const std::string &path) {
    return ::open(path.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NOCTTY, 0640);
}

} // namespace

std::string formatLogfmt(const proxy::ConnectionRecord &r, bool eventField) {
    std::string out;
    out.reserve(384);
    auto field = [&](std::string_view key, std::string_view value) {
        if (!out.empty()) {
            out += ' ';
        }
        out.append(key);
        out += '=';
        appendLogfmtValue(out, value);
    };
    auto nanos = [&](std::string_view key, std::int64_t value) {
        if (value >= 0) {
            field(key, milliseconds(static_cast<std::uint64_t>(value)));
        }
    };
    field("ts", rfc3339(r.startUnixMicros));
    if (eventField) {
        field("event", "access");
    }
    field("listener", r.listener);
    field("client", r.client);
    if (r.handshakeDone) {
        field("tls", r.protocol);
        field("cipher", r.cipher);
        field("sni", r.sni);
        field("alpn", r.alpn);
        field("resumed", r.resumed ? "true" : "false");
        if (!r.clientIdentity.empty()) {
            field("client_id", r.clientIdentity);
        }
    }
    field("backend", r.backend);
    nanos("handshake_ms", r.handshakeNanos);
    nanos("connect_ms", r.connectNanos);
    field("bytes_in", std::to_string(r.bytesClientToBackend));
    field("bytes_out", std::to_string(r.bytesBackendToClient));
    field("duration_ms", milliseconds(r.durationNanos));
    field("reason", proxy::closeReasonName(r.reason));
    if (!r.error.empty()) {
        field("error", r.error);
    }
    return out;
}

std::string formatJson(const proxy::ConnectionRecord &r) {
    std::string out;
    out.reserve(448);
    out += '{';
    bool first = true;
    auto key = [&](std::string_view name) {
        if (!first) {
            out += ',';
        }
        first = false;
        appendJsonString(out, name);
        out += ':';
    };
    auto string = [&](std::string_view name, std::string_view value) {
        key(name);
        appendJsonString(out, value);
    };
    auto raw = [&](std::string_view name, std::string_view value) {
        key(name);
        out.append(value);
    };
    auto nanos = [&](std::string_view name, std::int64_t value) {
        raw(name, value >= 0 ? milliseconds(static_cast<std::uint64_t>(value)) : "null");
    };
    string("ts", rfc3339(r.startUnixMicros));
    string("event", "access");
    string("listener", r.listener);
    string("client", r.client);
    if (r.handshakeDone) {
        string("tls", r.protocol);
        string("cipher", r.cipher);
        string("sni", r.sni);
        string("alpn", r.alpn);
        raw("resumed", r.resumed ? "true" : "false");
        string("client_id", r.clientIdentity);
    } else {
        raw("tls", "null");
    }
    string("backend", r.backend);
    nanos("handshake_ms", r.handshakeNanos);
    nanos("connect_ms", r.connectNanos);
    raw("bytes_in", std::to_string(r.bytesClientToBackend));
    raw("bytes_out", std::to_string(r.bytesBackendToClient));
    raw("duration_ms", milliseconds(r.durationNanos));
    string("reason", proxy::closeReasonName(r.reason));
    if (!r.error.empty()) {
        string("error", r.error);
    }
    out += '}';
    return out;
}

std::shared_ptr<AccessLog> AccessLog::open(const LogConfig &config) {
    if (config.access == "off") {
        return nullptr;
    }
    if (config.access == "stderr") {
        return std::shared_ptr<AccessLog>(new AccessLog(STDERR_FILENO, "", config.format));
    }
    const int fd = openAppend(config.access);
    if (fd < 0) {
        throw std::runtime_error("access log " + config.access + ": " + std::strerror(errno));
    }
    return std::shared_ptr<AccessLog>(new AccessLog(fd, config.access, config.format));
}

void AccessLog::install(std::shared_ptr<AccessLog> log) {
    if (!log) {
        proxy::setAccessLogSink(nullptr);
        return;
    }
    const bool toEventLog = log->path_.empty();
    proxy::setAccessLogSink(
        [log = std::move(log)](const proxy::ConnectionRecord &record) { log->write(record); },
        toEventLog);
}

AccessLog::AccessLog(int fd, std::string path, AccessLogFormat format)
    : fd_(fd)
    , path_(std::move(path))
    , format_(format) {}

AccessLog::~AccessLog() {
    if (!path_.empty()) {
        ::close(fd_);
    }
}

void AccessLog::write(const proxy::ConnectionRecord &record) {
    // On stderr the access log is part of the event log, and global.log_level filters it.
    if (path_.empty() && !log::enabled(LogLevel::info)) {
        return;
    }
    std::string line;
    if (format_ == AccessLogFormat::json) {
        line = formatJson(record);
    } else if (path_.empty()) {
        line = "sluice info access " + formatLogfmt(record, false);
    } else {
        line = formatLogfmt(record);
    }
    line += '\n';
    // One write(2) per line on an O_APPEND descriptor: concurrent lines never interleave. A
    // short or failed write loses (part of) a line rather than blocking a worker.
    [[maybe_unused]] auto written = ::write(fd_, line.data(), line.size());
}

bool AccessLog::reopen(std::string *error) {
    if (path_.empty()) {
        return true;
    }
    const int fd = openAppend(path_);
    if (fd < 0 || ::dup3(fd, fd_, O_CLOEXEC) < 0) {
        if (error != nullptr) {
            *error = "access log " + path_ + ": " + std::strerror(errno);
        }
        if (fd >= 0) {
            ::close(fd);
        }
        return false;
    }
    ::close(fd);
    return true;
}

} // namespace sluice::ops
