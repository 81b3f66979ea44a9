#include "tls/errors.hpp"

#include <openssl/err.h>

namespace sluice::tls {

OpenSslError drainErrors() {
    OpenSslError out;
    const char *data = nullptr;
    int flags = 0;
    while (unsigned long code = ERR_get_error_all(nullptr, nullptr, nullptr, &data, &flags)) {
        if (out.first == 0) {
            out.first = code;
        }
        std::string entry;
        if (const char *reason = ERR_reason_error_string(code)) {
            entry = reason;
        } else {
            char buffer[256];
            ERR_error_string_n(code, buffer, sizeof buffer);
            entry = buffer;
        }
        if ((flags & ERR_TXT_STRING) != 0 && data != nullptr && *data != '\0') {
            entry += " (";
            entry += data;
            entry += ')';
        }
        // The same reason is often pushed by several layers; say it once.
        if (out.reason.find(entry) != std::string::npos) {
            continue;
        }
        if (!out.reason.empty()) {
            out.reason += "; ";
        }
        out.reason += entry;
    }
    return out;
}

} // namespace sluice::tls
