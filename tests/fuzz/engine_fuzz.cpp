// The server Engine fed arbitrary ciphertext, either from the first byte or after a complete
// in-memory handshake with a client engine (feed_engine.hpp says what must hold), with the test
// fixture's plain server context: OpenSSL's own parsing and the Engine's driving of it.
#include "../unit/tls_fixture.hpp"
#include "feed_engine.hpp"
#include "fuzz_target.hpp"

namespace sluice::fuzz {

SLUICE_FUZZ_TARGET(engineServer) {
    static const auto serverContext = test::serverContext();
    static const auto clientContext = test::clientContext();
    feedEngine(Role::server, serverContext.get(), clientContext.get(), "localhost", data, size);
    return 0;
}

} // namespace sluice::fuzz
