// tls/errors: turns OpenSSL's thread-local error queue into one readable reason.
#pragma once

#include <string>

namespace sluice::tls {

/** The first error code in the queue (for classification) and every entry joined into text. */
struct OpenSslError {
    unsigned long first = 0;
    std::string reason;
};

/** Empties the calling thread's OpenSSL error queue into one reason string. */
OpenSslError drainErrors();

} // namespace sluice::tls
