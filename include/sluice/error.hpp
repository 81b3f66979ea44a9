// sluice::Error: the one exception type libsluice lets out. Exceptions are for the control path
// only (loading a configuration, building TLS contexts, binding listeners); the data path (Engine,
// running connections) reports through return values and status instead. Which calls throw is
// stated on each of them; what() is one line that names what failed (file, line and key for a
// configuration; the listener and address for a bind).
#pragma once

#include <stdexcept>

#include <sluice/export.hpp>

namespace sluice {

/** A failure of a control-path call. */
class SLUICE_API Error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
    ~Error() override;
};

} // namespace sluice
