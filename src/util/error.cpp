#include <sluice/error.hpp>

namespace sluice {

// Out of line, so the vtable and type information live in libsluice once and a program catches
// sluice::Error by type across the shared library's boundary.
Error::~Error() = default;

} // namespace sluice
