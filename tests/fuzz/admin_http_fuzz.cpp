// The admin listener's request parser and responder fed arbitrary bytes, whole and in every
// prefix a slow client could deliver: each input is incomplete, a request, or a 4xx/5xx answer,
// never a crash, and the answer is always a well-formed HTTP/1.1 response.
#include <cstdlib>
#include <string>
#include <string_view>

#include "fuzz_target.hpp"
#include "ops/http.hpp"

namespace sluice::fuzz {

SLUICE_FUZZ_TARGET(adminRequest) {
    const std::string_view bytes(reinterpret_cast<const char *>(data), size);
    for (std::size_t cut : {size / 3, size / 2, size}) {
        const ops::HttpRequest request = ops::parseRequest(bytes.substr(0, cut));
        if (request.state == ops::HttpRequest::State::bad &&
            (request.status < 400 || request.status > 505)) {
            std::abort();
        }
        if (request.state == ops::HttpRequest::State::complete &&
            (request.path.empty() || request.path.front() != '/')) {
            std::abort();
        }
        const std::string response =
            ops::httpResponse(request.status == 0 ? 200 : request.status, "text/plain", "x");
        if (!response.starts_with("HTTP/1.1 ")) {
            std::abort();
        }
    }
    return 0;
}

} // namespace sluice::fuzz
