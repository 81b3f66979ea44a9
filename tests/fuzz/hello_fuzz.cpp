// The daemon's own server context fed arbitrary ciphertext (feed_engine.hpp says what must hold):
// tls::makeServerContext() from a TOML listener with two certificates chosen by SNI (one with a
// wildcard name, one with its own required client_auth), ALPN with alpn_mismatch = "fail",
// optional client certificates, a TLS 1.2 session cache and tickets from a key file. So the
// ClientHello reaches sluice's callbacks: the SNI read from the raw extension and the
// certificate switch, the client_auth switch, ALPN selection, and the ticket key lookup with the
// key name the client sent (the seeds carry tickets named after the file's key).
#include <string>

#include <openssl/ssl.h>

#include <sluice/config.hpp>

#include "../unit/temp_dir.hpp"
#include "../unit/tls_fixture.hpp"
#include "feed_engine.hpp"
#include "fuzz_target.hpp"
#include "tls/context.hpp"

namespace sluice::fuzz {

namespace {

// 80 bytes: the name "sluice-fuzz-key!", then 32 of AES key and 32 of HMAC key.
constexpr const char *ticketKey = "c2x1aWNlLWZ1enota2V5IQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEB"
                                  "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=";

/** The context, built once from files in a temporary folder, removed once it is built. */
SSL_CTX *listenerContext() {
    static const tls::ContextPtr context = [] {
        const test::TempDir folder("sluice-hello-fuzz");
        const auto &pki = test::pki();
        auto otherKey = test::makeKey();
        auto other =
            test::makeCertificate(otherKey.get(), "other.test", pki.caCert.get(), pki.caKey.get(),
                                  20, false, "DNS:other.test,DNS:*.example.com");
        test::writePem(folder.file("ca.crt"), pki.caCert.get(), nullptr);
        test::writePem(folder.file("a.crt"), pki.leafCert.get(), nullptr);
        test::writePem(folder.file("a.key"), nullptr, pki.leafKey.get());
        test::writePem(folder.file("b.crt"), other.get(), nullptr);
        test::writePem(folder.file("b.key"), nullptr, otherKey.get());
        folder.write("tickets.keys", std::string(ticketKey) + "\n");
        const std::string toml = R"([tls]
ticket_keys = "tickets.keys"
session_cache = 64

[[listener]]
name = "fuzz"
listen = "127.0.0.1:0"
backend = "127.0.0.1:9"
alpn = ["h2", "http/1.1"]
alpn_mismatch = "fail"

  [[listener.certificate]]
  cert = "a.crt"
  key = "a.key"

  [[listener.certificate]]
  cert = "b.crt"
  key = "b.key"
    [listener.certificate.client_auth]
    mode = "required"
    ca = "ca.crt"

  [listener.client_auth]
  mode = "optional"
  ca = "ca.crt"
)";
        // The path only anchors the relative file names; the text is parsed as it is.
        const Config config = parseConfig(toml, folder.file("sluice.toml"));
        tls::ContextPtr built = tls::makeServerContext(config.listeners.at(0));
        return built;
    }();
    return context.get();
}

} // namespace

SLUICE_FUZZ_TARGET(listenerHello) {
    static const auto clientContext = test::clientContext();
    feedEngine(Role::server, listenerContext(), clientContext.get(), "localhost", data, size);
    return 0;
}

} // namespace sluice::fuzz
