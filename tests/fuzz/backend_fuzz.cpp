// The client side: what a TLS backend sends to sluice (feed_engine.hpp says what must hold). A
// client Engine with the daemon's own client context (tls::makeClientContext, as for a backend
// with a tls table: the backend's certificate verified against a CA file and the name, ALPN
// offered) is fed arbitrary ciphertext, from its ClientHello on or after a completed handshake
// with the test fixture's server, whose certificate that CA issued. The client's ServerHello
// checks need a predictable session id, so the context sends none (see below).
#include <string>

#include "../unit/temp_dir.hpp"
#include "../unit/tls_fixture.hpp"
#include "feed_engine.hpp"
#include "fuzz_target.hpp"
#include "tls/context.hpp"

namespace sluice::fuzz {

namespace {

SSL_CTX *backendClientContext() {
    static const tls::ContextPtr context = [] {
        const test::TempDir folder("sluice-backend-fuzz"); // gone once the context is built
        const std::string ca = folder.file("ca.crt");
        test::writePem(ca, test::pki().caCert.get(), nullptr);
        tls::ClientContextOptions options;
        options.caFile = ca;
        options.alpn = {"h2", "http/1.1"};
        tls::ContextPtr built = tls::makeClientContext(options);
        // An empty legacy session id (no middlebox compatibility), so that a ServerHello in the
        // corpus can echo it: a random one would stop every fuzzed ServerHello at that check.
        SSL_CTX_clear_options(built.get(), SSL_OP_ENABLE_MIDDLEBOX_COMPAT);
        return built;
    }();
    return context.get();
}

} // namespace

SLUICE_FUZZ_TARGET(backendReply) {
    static const auto serverContext = test::serverContext();
    feedEngine(Role::client, backendClientContext(), serverContext.get(), "localhost", data, size);
    return 0;
}

} // namespace sluice::fuzz
