// ops/http: the admin listener's HTTP/1.1 request parser and response builder. Strict and
// bounded: request line and headers must fit in `maxRequestBytes`, lines end in CRLF, no body,
// no obsolete line folding; anything else is a 4xx answer, never a crash. Pure functions over
// bytes so unit tests and fuzzers can drive them.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace sluice::ops {

/** The most bytes a request (request line and headers) may take. */
constexpr std::size_t maxRequestBytes = 8192;

/** What the parser made of the bytes received so far. */
struct HttpRequest {
    enum class State {
        incomplete, ///< valid so far; wait for more bytes
        complete,   ///< a whole request: method and path are set
        bad         ///< answer with `status` and close
    };
    State state = State::incomplete;
    int status = 0;     ///< for bad: 400, 405, 414, 431 or 505
    std::string method; ///< "GET" or "HEAD"
    std::string path;   ///< the target without its query string, e.g. "/metrics"
};

/** Parses the start of a connection's bytes. Never reads past `data`. */
HttpRequest parseRequest(std::string_view data);

/**
 * A whole response with `Content-Length` and `Connection: close`. With `head`, the headers are
 * those of the GET response and the body is left out.
 */
std::string httpResponse(int status, std::string_view contentType, std::string_view body,
                         bool head = false);

/** "OK", "Not Found", ... for the status codes the admin listener uses. */
std::string_view reasonPhrase(int status);

} // namespace sluice::ops
