#include "ops/http.hpp"

#include <algorithm>

namespace sluice::ops {
namespace {

constexpr std::size_t maxTargetBytes = 2048;
constexpr std::size_t maxHeaders = 64;

bool isTokenChar(char c) {
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')) {
        return true;
    }
    return std::string_view("!#$%&'*+-.^_`|~").find(c) != std::string_view::npos;
}

bool isToken(std::string_view text) {
    return !text.empty() && std::all_of(text.begin(), text.end(), isTokenChar);
}

bool isTargetChar(char c) {
    const auto u = static_cast<unsigned char>(c);
    return u > 0x20 && u < 0x7f;
}

bool isFieldValueChar(char c) {
    const auto u = static_cast<unsigned char>(c);
    return u == '\t' || (u >= 0x20 && u != 0x7f);
}

bool equalsIgnoreCase(std::string_view a, std::string_view b) {
    return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
               auto lower = [](char c) { return c >= 'A' && c <= 'Z' ? char(c - 'A' + 'a') : c; };
               return lower(x) == lower(y);
           });
}

std::string_view trim(std::string_view text) {
    while (!text.empty() && (text.front() == ' ' || text.front() == '\t')) {
        text.remove_prefix(1);
    }
    while (!text.empty() && (text.back() == ' ' || text.back() == '\t')) {
        text.remove_suffix(1);
    }
    return text;
}

HttpRequest bad(int status) {
    HttpRequest request;
    request.state = HttpRequest::State::bad;
    request.status = status;
    return request;
}

/** Checks the request line; fills method and path. 0 when it is good, else the status. */
int parseRequestLine(std::string_view line, HttpRequest &request) {
    const std::size_t firstSpace = line.find(' ');
    if (firstSpace == std::string_view::npos) {
        return 400;
    }
    const std::string_view method = line.substr(0, firstSpace);
    const std::string_view rest = line.substr(firstSpace + 1);
    const std::size_t secondSpace = rest.find(' ');
    if (secondSpace == std::string_view::npos || !isToken(method)) {
        return 400;
    }
    const std::string_view target = rest.substr(0, secondSpace);
    const std::string_view version = rest.substr(secondSpace + 1);
    if (target.size() > maxTargetBytes) {
        return 414;
    }
    if (target.empty() || target.front() != '/' ||
        !std::all_of(target.begin(), target.end(), isTargetChar)) {
        return 400;
    }
    if (version.size() != 8 || !version.starts_with("HTTP/")) {
        return 400;
    }
    if (version != "HTTP/1.1" && version != "HTTP/1.0") {
        return 505;
    }
    request.method = method;
    request.path = target.substr(0, target.find('?'));
    return 0;
}

} // namespace

HttpRequest parseRequest(std::string_view data) {
    // Reject what can never become valid as soon as it is seen, without waiting for the end.
    const std::size_t scan = std::min(data.size(), maxRequestBytes);
    for (std::size_t i = 0; i < scan; ++i) {
        const char c = data[i];
        if (c == '\0') {
            return bad(400);
        }
        if (c == '\r' && i + 1 < data.size() && data[i + 1] != '\n') {
            return bad(400); // a bare CR
        }
        if (c == '\n' && (i == 0 || data[i - 1] != '\r')) {
            return bad(400); // a bare LF
        }
    }
    // The method comes first: a byte that cannot be in a token before the first space (a TLS
    // ClientHello, binary noise) is refused at once.
    const std::size_t methodEnd = std::min(data.find(' '), data.size());
    if (!std::all_of(data.begin(), data.begin() + static_cast<std::ptrdiff_t>(methodEnd),
                     isTokenChar)) {
        return bad(400);
    }
    const std::size_t end = data.find("\r\n\r\n");
    if (end == std::string_view::npos || end + 4 > maxRequestBytes) {
        if (data.size() >= maxRequestBytes) {
            const std::size_t lineEnd = data.find("\r\n");
            return bad(lineEnd == std::string_view::npos || lineEnd > maxTargetBytes + 64 ? 414
                                                                                          : 431);
        }
        // A malformed request line is known before the headers end.
        const std::size_t lineEnd = data.find("\r\n");
        if (lineEnd != std::string_view::npos) {
            HttpRequest probe;
            if (const int status = parseRequestLine(data.substr(0, lineEnd), probe)) {
                return bad(status);
            }
        }
        return {};
    }
    HttpRequest request;
    std::string_view head = data.substr(0, end + 2); // each line keeps its CRLF
    const std::size_t lineEnd = head.find("\r\n");
    if (const int status = parseRequestLine(head.substr(0, lineEnd), request)) {
        return bad(status);
    }
    head.remove_prefix(lineEnd + 2);
    std::size_t headers = 0;
    while (!head.empty()) {
        const std::size_t eol = head.find("\r\n");
        const std::string_view line = head.substr(0, eol);
        head.remove_prefix(eol + 2);
        if (++headers > maxHeaders) {
            return bad(431);
        }
        const std::size_t colon = line.find(':');
        // No name, whitespace before the colon, or a folded continuation line: all refused.
        if (colon == std::string_view::npos || !isToken(line.substr(0, colon))) {
            return bad(400);
        }
        const std::string_view name = line.substr(0, colon);
        const std::string_view value = trim(line.substr(colon + 1));
        if (!std::all_of(value.begin(), value.end(), isFieldValueChar)) {
            return bad(400);
        }
        // The admin listener takes no request bodies.
        if (equalsIgnoreCase(name, "transfer-encoding") ||
            (equalsIgnoreCase(name, "content-length") && value != "0")) {
            return bad(400);
        }
    }
    if (request.method != "GET" && request.method != "HEAD") {
        return bad(405);
    }
    request.state = HttpRequest::State::complete;
    return request;
}

std::string_view reasonPhrase(int status) {
    switch (status) {
    case 200:
        return "OK";
    case 400:
        return "Bad Request";
    case 404:
        return "Not Found";
    case 405:
        return "Method Not Allowed";
    case 408:
        return "Request Timeout";
    case 414:
        return "URI Too Long";
    case 431:
        return "Request Header Fields Too Large";
    case 503:
        return "Service Unavailable";
    case 505:
        return "HTTP Version Not Supported";
    default:
        return "Error";
    }
}

std::string httpResponse(int status, std::string_view contentType, std::string_view body,
                         bool head) {
    std::string out = "HTTP/1.1 " + std::to_string(status) + " " +
                      std::string(reasonPhrase(status)) + "\r\nContent-Type: ";
    out.append(contentType);
    out += "\r\nContent-Length: " + std::to_string(body.size()) +
           "\r\nConnection: close\r\nCache-Control: no-store\r\n";
    if (status == 405) {
        out += "Allow: GET, HEAD\r\n";
    }
    out += "\r\n";
    if (!head) {
        out.append(body);
    }
    return out;
}

} // namespace sluice::ops
