// The built-in TLS13-KDF and TLS1-PRF (tls/kdf) against OpenSSL's own: the same bytes for every
// input shape libssl uses and many it does not, the same refusals, and real handshakes between a
// context that prefers them and a peer that does not.
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <doctest/doctest.h>
#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <openssl/params.h>
#include <openssl/provider.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>

#include "tls/kdf.hpp"
#include "tls_fixture.hpp"

using namespace sluice::test;

namespace {

using Bytes = std::vector<unsigned char>;

Bytes randomBytes(std::size_t n) {
    Bytes out(n);
    if (n > 0) {
        REQUIRE(RAND_bytes(out.data(), static_cast<int>(n)) == 1);
    }
    return out;
}

struct KdfCtxFree {
    void operator()(EVP_KDF_CTX *ctx) const { EVP_KDF_CTX_free(ctx); }
};
using KdfCtxPtr = std::unique_ptr<EVP_KDF_CTX, KdfCtxFree>;

/** A context of `name` from the provider that `properties` requires. */
KdfCtxPtr kdfFrom(const char *name, const char *properties) {
    EVP_KDF *kdf = EVP_KDF_fetch(nullptr, name, properties);
    REQUIRE(kdf != nullptr);
    KdfCtxPtr ctx(EVP_KDF_CTX_new(kdf));
    EVP_KDF_free(kdf);
    REQUIRE(ctx != nullptr);
    return ctx;
}

/** The bytes a derivation gives, or nothing when it fails. */
struct Outcome {
    bool ok = false;
    Bytes out;
    bool operator==(const Outcome &) const = default;
};

Outcome derive(const char *name, const char *properties, std::vector<OSSL_PARAM> params,
               std::size_t length) {
    KdfCtxPtr ctx = kdfFrom(name, properties);
    params.push_back(OSSL_PARAM_construct_end());
    Outcome outcome;
    outcome.out.assign(length, 0);
    outcome.ok = EVP_KDF_derive(ctx.get(), outcome.out.data(), length, params.data()) == 1;
    ERR_clear_error();
    if (!outcome.ok) {
        outcome.out.clear();
    }
    return outcome;
}

/** The same derivation by both providers: equal bytes, or both refuse. */
Outcome both(const char *name, const std::vector<OSSL_PARAM> &params, std::size_t length) {
    const Outcome ours = derive(name, "provider=sluice", params, length);
    const Outcome theirs = derive(name, "provider=default", params, length);
    CHECK(ours == theirs);
    return ours;
}

/** An octet-string parameter; an empty one still points somewhere, as libssl's do. */
OSSL_PARAM octets(const char *key, Bytes &bytes) {
    static unsigned char nothing = 0;
    return OSSL_PARAM_construct_octet_string(key, bytes.empty() ? &nothing : bytes.data(),
                                             bytes.size());
}

OSSL_PARAM text(const char *key, const char *value) {
    return OSSL_PARAM_construct_utf8_string(key, const_cast<char *>(value), 0);
}

struct Loaded {
    Loaded() { REQUIRE(sluice::tls::loadKdfProvider()); }
};

} // namespace

TEST_CASE("TLS13-KDF: the expand step gives OpenSSL's bytes for every label, context and length") {
    Loaded loaded;
    char prefix[] = "tls13 ";
    for (const char *digest : {"SHA2-256", "SHA2-384", "SHA256", "sha384"}) {
        const std::size_t hash = std::strstr(digest, "256") != nullptr ? 32 : 48;
        for (std::size_t labelLength : {0, 1, 3, 12, 100, 249}) {
            for (int contextKind = 0; contextKind < 4; ++contextKind) {
                for (std::size_t length : {std::size_t{1}, std::size_t{12}, std::size_t{16},
                                           hash - 1, hash, hash + 1, 3 * hash, std::size_t{700}}) {
                    Bytes key = randomBytes(hash);
                    Bytes label = randomBytes(labelLength);
                    Bytes context = randomBytes(contextKind == 0   ? 0
                                                : contextKind == 1 ? hash
                                                : contextKind == 2 ? 255
                                                                   : 17);
                    int mode = EVP_KDF_HKDF_MODE_EXPAND_ONLY;
                    std::vector<OSSL_PARAM> params = {
                        OSSL_PARAM_construct_int(OSSL_KDF_PARAM_MODE, &mode),
                        text(OSSL_KDF_PARAM_DIGEST, digest), octets(OSSL_KDF_PARAM_KEY, key),
                        OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_PREFIX, prefix, 6),
                        octets(OSSL_KDF_PARAM_LABEL, label)};
                    if (contextKind != 3) { // 3: no DATA parameter at all
                        params.push_back(octets(OSSL_KDF_PARAM_DATA, context));
                    }
                    CAPTURE(digest);
                    CAPTURE(labelLength);
                    CAPTURE(contextKind);
                    CAPTURE(length);
                    CHECK(both("TLS13-KDF", params, length).ok);
                }
            }
        }
    }
}

TEST_CASE("TLS13-KDF: the extract step gives OpenSSL's bytes with and without each secret") {
    Loaded loaded;
    char prefix[] = "tls13 ";
    char label[] = "derived";
    for (const char *digest : {"SHA2-256", "SHA2-384"}) {
        const std::size_t hash = std::strstr(digest, "256") != nullptr ? 32 : 48;
        for (int shape = 0; shape < 8; ++shape) {
            Bytes key = randomBytes(shape & 1 ? hash : (shape & 4 ? 7 : 0));
            Bytes salt = randomBytes(hash);
            int mode = EVP_KDF_HKDF_MODE_EXTRACT_ONLY;
            std::vector<OSSL_PARAM> params = {
                OSSL_PARAM_construct_int(OSSL_KDF_PARAM_MODE, &mode),
                text(OSSL_KDF_PARAM_DIGEST, digest),
                OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_PREFIX, prefix, 6),
                OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_LABEL, label, 7)};
            if ((shape & 1) != 0 || (shape & 4) != 0) {
                params.push_back(octets(OSSL_KDF_PARAM_KEY, key)); // else: Hash.length zeros
            }
            if ((shape & 2) != 0) {
                params.push_back(octets(OSSL_KDF_PARAM_SALT, salt)); // else: no previous secret
            }
            CAPTURE(digest);
            CAPTURE(shape);
            CHECK(both("TLS13-KDF", params, hash).ok);
            // An extract gives exactly Hash.length bytes; both refuse any other length.
            CHECK_FALSE(both("TLS13-KDF", params, hash + 1).ok);
            CHECK_FALSE(both("TLS13-KDF", params, hash - 1).ok);
        }
    }
}

TEST_CASE(
    "TLS13-KDF: both refuse a missing mode or digest, extract-and-expand and too long an output") {
    Loaded loaded;
    Bytes key = randomBytes(32);
    int expand = EVP_KDF_HKDF_MODE_EXPAND_ONLY;
    int both_ = EVP_KDF_HKDF_MODE_EXTRACT_AND_EXPAND;
    CHECK_FALSE(both("TLS13-KDF",
                     {text(OSSL_KDF_PARAM_DIGEST, "SHA2-256"), octets(OSSL_KDF_PARAM_KEY, key)}, 32)
                    .ok);
    CHECK_FALSE(both("TLS13-KDF",
                     {OSSL_PARAM_construct_int(OSSL_KDF_PARAM_MODE, &expand),
                      octets(OSSL_KDF_PARAM_KEY, key)},
                     32)
                    .ok);
    CHECK_FALSE(both("TLS13-KDF",
                     {OSSL_PARAM_construct_int(OSSL_KDF_PARAM_MODE, &both_),
                      text(OSSL_KDF_PARAM_DIGEST, "SHA2-256"), octets(OSSL_KDF_PARAM_KEY, key)},
                     32)
                    .ok);
    CHECK_FALSE(both("TLS13-KDF",
                     {OSSL_PARAM_construct_int(OSSL_KDF_PARAM_MODE, &expand),
                      text(OSSL_KDF_PARAM_DIGEST, "SHA2-256"), octets(OSSL_KDF_PARAM_KEY, key)},
                     255 * 32 + 1)
                    .ok);
    // The longest output HKDF allows still works, and matches.
    CHECK(both("TLS13-KDF",
               {OSSL_PARAM_construct_int(OSSL_KDF_PARAM_MODE, &expand),
                text(OSSL_KDF_PARAM_DIGEST, "SHA2-256"), octets(OSSL_KDF_PARAM_KEY, key)},
               255 * 32)
              .ok);
    // A parameter without a data pointer is refused, even for no bytes.
    CHECK_FALSE(both("TLS13-KDF",
                     {OSSL_PARAM_construct_int(OSSL_KDF_PARAM_MODE, &expand),
                      text(OSSL_KDF_PARAM_DIGEST, "SHA2-256"), octets(OSSL_KDF_PARAM_KEY, key),
                      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_LABEL, nullptr, 0)},
                     32)
                    .ok);
    // The mode by name, as the openssl command line gives it.
    CHECK(both("TLS13-KDF",
               {text(OSSL_KDF_PARAM_MODE, "EXPAND_ONLY"), text(OSSL_KDF_PARAM_DIGEST, "SHA2-256"),
                octets(OSSL_KDF_PARAM_KEY, key)},
               32)
              .ok);
}

TEST_CASE("TLS1-PRF: the same bytes as OpenSSL for SHA-256, SHA-384 and MD5-SHA1, any seed split") {
    Loaded loaded;
    for (const char *digest : {"SHA2-256", "SHA2-384", "MD5-SHA1", "SHA256"}) {
        for (std::size_t secretLength : {0, 1, 47, 48, 49, 200}) {
            for (int seeds = 1; seeds <= 5; ++seeds) {
                for (std::size_t length : {1, 12, 40, 48, 104, 200}) {
                    Bytes secret = randomBytes(secretLength);
                    std::vector<Bytes> parts;
                    for (int i = 0; i < seeds; ++i) {
                        // libssl passes unused seeds as empty ones; mix them in.
                        parts.push_back(randomBytes(i == 1 ? 0 : 13 + 19 * i));
                    }
                    std::vector<OSSL_PARAM> params = {text(OSSL_KDF_PARAM_DIGEST, digest),
                                                      octets(OSSL_KDF_PARAM_SECRET, secret)};
                    for (auto &part : parts) {
                        params.push_back(octets(OSSL_KDF_PARAM_SEED, part));
                    }
                    CAPTURE(digest);
                    CAPTURE(secretLength);
                    CAPTURE(seeds);
                    CAPTURE(length);
                    CHECK(both("TLS1-PRF", params, length).ok);
                }
            }
        }
    }
}

TEST_CASE("digests TLS does not use are fetched by name and give OpenSSL's bytes too") {
    Loaded loaded;
    char prefix[] = "tls13 ";
    char label[] = "c hs traffic";
    for (const char *digest : {"SHA2-512", "SHA2-224", "SHA3-256", "SHA512-256"}) {
        for (std::size_t length : {1, 32, 100}) {
            Bytes key = randomBytes(40);
            Bytes context = randomBytes(64);
            int mode = EVP_KDF_HKDF_MODE_EXPAND_ONLY;
            CAPTURE(digest);
            CAPTURE(length);
            CHECK(both("TLS13-KDF",
                       {OSSL_PARAM_construct_int(OSSL_KDF_PARAM_MODE, &mode),
                        text(OSSL_KDF_PARAM_DIGEST, digest), octets(OSSL_KDF_PARAM_KEY, key),
                        OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_PREFIX, prefix, 6),
                        OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_LABEL, label, 12),
                        octets(OSSL_KDF_PARAM_DATA, context)},
                       length)
                      .ok);
            CHECK(both("TLS1-PRF",
                       {text(OSSL_KDF_PARAM_DIGEST, digest), octets(OSSL_KDF_PARAM_SECRET, key),
                        octets(OSSL_KDF_PARAM_SEED, context)},
                       length)
                      .ok);
        }
    }
    // An extendable-output digest has no HMAC: both refuse it.
    Bytes key = randomBytes(32);
    CHECK_FALSE(both("TLS1-PRF",
                     {text(OSSL_KDF_PARAM_DIGEST, "SHAKE-256"), octets(OSSL_KDF_PARAM_SECRET, key),
                      octets(OSSL_KDF_PARAM_SEED, key)},
                     32)
                    .ok);
}

TEST_CASE("TLS1-PRF: both refuse a missing digest, secret or seed, and an empty output") {
    Loaded loaded;
    Bytes secret = randomBytes(48);
    Bytes seed = randomBytes(64);
    Bytes none;
    CHECK_FALSE(both("TLS1-PRF",
                     {octets(OSSL_KDF_PARAM_SECRET, secret), octets(OSSL_KDF_PARAM_SEED, seed)}, 48)
                    .ok);
    CHECK_FALSE(both("TLS1-PRF",
                     {text(OSSL_KDF_PARAM_DIGEST, "SHA2-256"), octets(OSSL_KDF_PARAM_SEED, seed)},
                     48)
                    .ok);
    CHECK_FALSE(both("TLS1-PRF",
                     {text(OSSL_KDF_PARAM_DIGEST, "SHA2-256"),
                      octets(OSSL_KDF_PARAM_SECRET, secret), octets(OSSL_KDF_PARAM_SEED, none)},
                     48)
                    .ok);
    CHECK_FALSE(both("TLS1-PRF",
                     {text(OSSL_KDF_PARAM_DIGEST, "SHA2-256"),
                      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_SECRET, nullptr, 0),
                      octets(OSSL_KDF_PARAM_SEED, seed)},
                     48)
                    .ok);
    CHECK_FALSE(derive("TLS1-PRF", "provider=sluice",
                       {text(OSSL_KDF_PARAM_DIGEST, "SHA2-256"),
                        octets(OSSL_KDF_PARAM_SECRET, secret), octets(OSSL_KDF_PARAM_SEED, seed)},
                       0)
                    .ok);
}

TEST_CASE("the KDFs keep parameters set apart from the derivation, and seeds add up as OpenSSL's") {
    Loaded loaded;
    Bytes secret = randomBytes(48);
    Bytes first = randomBytes(30);
    Bytes second = randomBytes(40);
    Bytes results[2];
    int i = 0;
    for (const char *properties : {"provider=sluice", "provider=default"}) {
        KdfCtxPtr ctx = kdfFrom("TLS1-PRF", properties);
        OSSL_PARAM one[] = {text(OSSL_KDF_PARAM_DIGEST, "SHA2-384"),
                            octets(OSSL_KDF_PARAM_SECRET, secret),
                            octets(OSSL_KDF_PARAM_SEED, first), OSSL_PARAM_construct_end()};
        OSSL_PARAM two[] = {octets(OSSL_KDF_PARAM_SEED, second), OSSL_PARAM_construct_end()};
        REQUIRE(EVP_KDF_CTX_set_params(ctx.get(), one) == 1);
        REQUIRE(EVP_KDF_CTX_set_params(ctx.get(), two) == 1);
        results[i].assign(72, 0);
        REQUIRE(EVP_KDF_derive(ctx.get(), results[i].data(), 72, nullptr) == 1);
        ++i;
    }
    CHECK(results[0] == results[1]);
}

namespace {

/** Moves every byte waiting in one memory BIO into another. */
void shuttle(BIO *from, BIO *to) {
    char buffer[16384];
    int n = 0;
    while ((n = BIO_read(from, buffer, sizeof buffer)) > 0) {
        REQUIRE(BIO_write(to, buffer, n) == n);
    }
}

struct Connection {
    SSL *client = nullptr;
    SSL *server = nullptr;
    BIO *toServer = BIO_new(BIO_s_mem());
    BIO *toClient = BIO_new(BIO_s_mem());
    Connection(SSL_CTX *clientCtx, SSL_CTX *serverCtx, SSL_SESSION *resume) {
        client = SSL_new(clientCtx);
        server = SSL_new(serverCtx);
        REQUIRE(
            (client != nullptr && server != nullptr && toServer != nullptr && toClient != nullptr));
        // Each SSL reads one memory BIO and writes the other; the test moves the bytes.
        BIO *clientOut = BIO_new(BIO_s_mem());
        BIO *serverOut = BIO_new(BIO_s_mem());
        SSL_set_bio(client, toClient, clientOut);
        SSL_set_bio(server, toServer, serverOut);
        SSL_set_tlsext_host_name(client, "localhost");
        if (resume != nullptr) {
            SSL_set_session(client, resume);
        }
        SSL_set_connect_state(client);
        SSL_set_accept_state(server);
    }
    ~Connection() {
        // A session whose connection ends without close_notify may not be resumed.
        SSL_shutdown(client);
        SSL_shutdown(server);
        SSL_free(client);
        SSL_free(server);
    }
    void pump() {
        shuttle(SSL_get_wbio(client), toServer);
        shuttle(SSL_get_wbio(server), toClient);
    }
    /** Handshakes, then each side sends the other a message and reads the other's. */
    void exchange() {
        for (int i = 0; i < 20 && (!SSL_is_init_finished(client) || !SSL_is_init_finished(server));
             ++i) {
            SSL_do_handshake(client);
            SSL_do_handshake(server);
            pump();
        }
        REQUIRE(SSL_is_init_finished(client));
        REQUIRE(SSL_is_init_finished(server));
        const std::string up = "from the client", down = "from the server";
        REQUIRE(SSL_write(client, up.data(), static_cast<int>(up.size())) > 0);
        REQUIRE(SSL_write(server, down.data(), static_cast<int>(down.size())) > 0);
        pump();
        char buffer[64] = {};
        CHECK(SSL_read(server, buffer, sizeof buffer) == static_cast<int>(up.size()));
        CHECK(std::string(buffer, up.size()) == up);
        CHECK(SSL_read(client, buffer, sizeof buffer) == static_cast<int>(down.size()));
        CHECK(std::string(buffer, down.size()) == down);
        pump(); // TLS 1.3 tickets reach the client with the data
        SSL_read(client, buffer, sizeof buffer);
    }
};

} // namespace

TEST_CASE(
    "handshakes and resumptions between a context preferring the built-in KDFs and OpenSSL's") {
    Loaded loaded;
    for (int version : {TLS1_2_VERSION, TLS1_3_VERSION}) {
        for (const char *suite : {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384"}) {
            for (bool serverBuiltin : {true, false}) {
                const char *properties = sluice::tls::contextProperties(true);
                REQUIRE(properties != nullptr);
                SslCtxPtr server(SSL_CTX_new_ex(nullptr, serverBuiltin ? properties : nullptr,
                                                TLS_server_method()));
                SslCtxPtr client(SSL_CTX_new_ex(nullptr, serverBuiltin ? nullptr : properties,
                                                TLS_client_method()));
                REQUIRE((server && client));
                REQUIRE(SSL_CTX_use_certificate(server.get(), pki().leafCert.get()) == 1);
                REQUIRE(SSL_CTX_use_PrivateKey(server.get(), pki().leafKey.get()) == 1);
                for (SSL_CTX *ctx : {server.get(), client.get()}) {
                    SSL_CTX_set_min_proto_version(ctx, version);
                    SSL_CTX_set_max_proto_version(ctx, version);
                    SSL_CTX_set_ciphersuites(ctx, suite);
                    // TLS 1.2 with the suite's hash: SHA-384 for the AES-256 one.
                    SSL_CTX_set_cipher_list(ctx, std::strstr(suite, "384") != nullptr
                                                     ? "ECDHE-ECDSA-AES256-GCM-SHA384"
                                                     : "ECDHE-ECDSA-AES128-GCM-SHA256");
                }
                SSL_CTX_set_session_cache_mode(client.get(), SSL_SESS_CACHE_CLIENT);
                CAPTURE(version);
                CAPTURE(suite);
                CAPTURE(serverBuiltin);
                SSL_SESSION *session = nullptr;
                {
                    Connection first(client.get(), server.get(), nullptr);
                    first.exchange();
                    CHECK_FALSE(SSL_session_reused(first.client));
                    session = SSL_get1_session(first.client);
                }
                REQUIRE(session != nullptr);
                Connection second(client.get(), server.get(), session);
                second.exchange();
                CHECK(SSL_session_reused(second.client));
                CHECK(SSL_version(second.client) == version);
                SSL_SESSION_free(session);
            }
        }
    }
}

TEST_CASE("contexts prefer the built-in KDFs unless told not to") {
    Loaded loaded;
    auto providerOf = [](const char *properties) {
        EVP_KDF *kdf = EVP_KDF_fetch(nullptr, "TLS13-KDF", properties);
        REQUIRE(kdf != nullptr);
        std::string name = OSSL_PROVIDER_get0_name(EVP_KDF_get0_provider(kdf));
        EVP_KDF_free(kdf);
        return name;
    };
    CHECK(providerOf(sluice::tls::contextProperties(true)) == "sluice");
    CHECK(std::string(sluice::tls::kdfName(true)) == "sluice");
    CHECK(sluice::tls::contextProperties(false) == nullptr);
    CHECK(providerOf(sluice::tls::contextProperties(false)) == "default");
    CHECK(std::string(sluice::tls::kdfName(false)) == "openssl");
    // Everything else still comes from OpenSSL's default provider.
    EVP_MD *md = EVP_MD_fetch(nullptr, "SHA2-256", sluice::tls::contextProperties(true));
    REQUIRE(md != nullptr);
    CHECK(std::string(OSSL_PROVIDER_get0_name(EVP_MD_get0_provider(md))) == "default");
    EVP_MD_free(md);
}
