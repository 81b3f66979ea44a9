#include "tls/context.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <map>
#include <mutex>

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include "tls/certificates.hpp"
#include "tls/client_auth.hpp"
#include "tls/errors.hpp"
#include "tls/kdf.hpp"
#include "tls/ocsp.hpp"
#include "tls/ticket_keys.hpp"
#include "util/file_stamp.hpp"
#include "util/log.hpp"

namespace sluice::tls {
namespace {

int parseVersion(const std::string &text) {
    if (text == "1.2") {
        return TLS1_2_VERSION;
    }
    if (text == "1.3") {
        return TLS1_3_VERSION;
    }
    throw TlsError("unsupported TLS version '" + text + "' (expected \"1.2\" or \"1.3\")");
}

[[noreturn]] void raise(const std::string &what) {
    auto queued = drainErrors();
    throw TlsError(queued.reason.empty() ? what : what + ": " + queued.reason);
}

void applyPolicy(SSL_CTX *ctx, const TlsPolicy &policy) {
    const int minimum = parseVersion(policy.minVersion);
    const int maximum = parseVersion(policy.maxVersion);
    if (minimum > maximum) {
        throw TlsError("min_version " + policy.minVersion + " is above max_version " +
                       policy.maxVersion);
    }
    if (SSL_CTX_set_min_proto_version(ctx, minimum) != 1 ||
        SSL_CTX_set_max_proto_version(ctx, maximum) != 1) {
        raise("cannot set the TLS version bounds");
    }
    if (maximum >= TLS1_3_VERSION &&
        SSL_CTX_set_ciphersuites(ctx, policy.ciphersuites.c_str()) != 1) {
        raise("ciphersuites '" + policy.ciphersuites + "' names no TLS 1.3 suite");
    }
    if (minimum <= TLS1_2_VERSION && SSL_CTX_set_cipher_list(ctx, policy.ciphers.c_str()) != 1) {
        raise("ciphers '" + policy.ciphers + "' names no TLS 1.2 cipher");
    }
    if (SSL_CTX_set1_groups_list(ctx, policy.groups.c_str()) != 1) {
        raise("groups '" + policy.groups + "' names an unknown group");
    }
    if (!policy.signatureAlgorithms.empty() &&
        SSL_CTX_set1_sigalgs_list(ctx, policy.signatureAlgorithms.c_str()) != 1) {
        raise("signature_algorithms '" + policy.signatureAlgorithms +
              "' names an unknown algorithm");
    }
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION |
                                 SSL_OP_CIPHER_SERVER_PREFERENCE);
    SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
    // Reading ahead lets one SSL_read take every record the pair holds in one BIO call.
    SSL_CTX_set_read_ahead(ctx, 1);
}

struct ContextDeleter {
    void operator()(SSL_CTX *ctx) const { SSL_CTX_free(ctx); }
};

/**
 * Everything a server context's callbacks need, owned by the SSL_CTX (freed with it through the
 * ex_data free callback, so it lives exactly as long as any connection can call back).
 */
struct ServerState {
    std::string listener;
    CertificateStore certificates;
    bool strictSni = false;
    std::vector<std::string> alpn;
    AlpnMismatch alpnMismatch = AlpnMismatch::proceed;
    ClientAuth clientAuth;
    /** Per-name client_auth policies, and which one (if any) each certificate carries. */
    std::vector<std::unique_ptr<ConnectionClientAuth>> nameAuth;
    std::vector<const ConnectionClientAuth *> authByCertificate;
    std::unique_ptr<TicketKeyRing> tickets;
    OcspStapler ocsp; // last: its watcher thread stops first
};

void freeServerState(void * /*parent*/, void *state, CRYPTO_EX_DATA * /*data*/, int /*index*/,
                     long /*argl*/, void * /*argp*/) {
    delete static_cast<ServerState *>(state);
}

int serverStateIndex() {
    static const int index =
        SSL_CTX_get_ex_new_index(0, nullptr, nullptr, nullptr, freeServerState);
    return index;
}

ServerState *serverState(SSL *ssl) {
    return static_cast<ServerState *>(
        SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), serverStateIndex()));
}

/** The host_name entry of a raw server_name extension (RFC 6066 3), or empty. */
std::string_view sniFromExtension(const unsigned char *data, std::size_t length) {
    if (length < 2) {
        return {};
    }
    std::size_t listLength = (std::size_t{data[0]} << 8) | data[1];
    if (listLength + 2 != length) {
        return {};
    }
    std::size_t at = 2;
    while (at + 3 <= length) {
        const unsigned type = data[at];
        const std::size_t nameLength = (std::size_t{data[at + 1]} << 8) | data[at + 2];
        at += 3;
        if (at + nameLength > length) {
            return {};
        }
        if (type == TLSEXT_NAMETYPE_host_name) {
            return {reinterpret_cast<const char *>(data + at), nameLength};
        }
        at += nameLength;
    }
    return {};
}

/** The client_auth of the certificates in `set`, if one of them has its own. */
const ConnectionClientAuth *nameAuthOf(const ServerState &state,
                                       const std::vector<std::size_t> &set) {
    for (const std::size_t index : set) {
        if (index < state.authByCertificate.size() && state.authByCertificate[index] != nullptr) {
            return state.authByCertificate[index];
        }
    }
    return nullptr;
}

/** Puts the chosen certificates' own client_auth (if any) on the connection. */
int applyNameAuth(SSL *ssl, int *alert, const ServerState &state,
                  const std::vector<std::size_t> &set) {
    const ConnectionClientAuth *auth = nameAuthOf(state, set);
    if (auth != nullptr && !auth->apply(ssl)) {
        *alert = SSL_AD_INTERNAL_ERROR;
        return SSL_CLIENT_HELLO_ERROR;
    }
    return SSL_CLIENT_HELLO_SUCCESS;
}

/**
 * Picks the connection's certificates from its SNI, and with them the client_auth policy when
 * those certificates carry their own. Unknown names keep the defaults, or fail with
 * unrecognized_name under strict_sni.
 */
int clientHelloCallback(SSL *ssl, int *alert, void *arg) {
    const auto *state = static_cast<const ServerState *>(arg);
    const unsigned char *data = nullptr;
    std::size_t length = 0;
    if (SSL_client_hello_get0_ext(ssl, TLSEXT_TYPE_server_name, &data, &length) != 1) {
        // No SNI: the context's defaults.
        return applyNameAuth(ssl, alert, *state, state->certificates.defaultSet());
    }
    const std::string_view name = sniFromExtension(data, length);
    const std::vector<std::size_t> *set = name.empty() ? nullptr : state->certificates.find(name);
    if (set == nullptr) {
        if (state->strictSni) {
            *alert = SSL_AD_UNRECOGNIZED_NAME;
            ERR_raise_data(ERR_LIB_SSL, SSL_R_CALLBACK_FAILED, "no certificate for SNI \"%.*s\"",
                           static_cast<int>(std::min<std::size_t>(name.size(), 255)), name.data());
            return SSL_CLIENT_HELLO_ERROR;
        }
        return applyNameAuth(ssl, alert, *state, state->certificates.defaultSet());
    }
    if (set != &state->certificates.defaultSet() && !state->certificates.install(ssl, *set)) {
        *alert = SSL_AD_INTERNAL_ERROR;
        return SSL_CLIENT_HELLO_ERROR;
    }
    return applyNameAuth(ssl, alert, *state, *set);
}

/** Our first protocol (in our order) that the client also offers. */
int alpnSelectCallback(SSL * /*ssl*/, const unsigned char **out, unsigned char *outLength,
                       const unsigned char *in, unsigned int inLength, void *arg) {
    const auto *state = static_cast<const ServerState *>(arg);
    for (const std::string &ours : state->alpn) {
        unsigned int at = 0;
        while (at < inLength) {
            const unsigned int length = in[at];
            if (at + 1 + length > inLength) {
                break;
            }
            if (length == ours.size() && std::memcmp(in + at + 1, ours.data(), length) == 0) {
                *out = in + at + 1;
                *outLength = static_cast<unsigned char>(length);
                return SSL_TLSEXT_ERR_OK;
            }
            at += 1 + length;
        }
    }
    // No overlap: either no ALPN at all, or a no_application_protocol alert (RFC 7301 3.2).
    return state->alpnMismatch == AlpnMismatch::fail ? SSL_TLSEXT_ERR_ALERT_FATAL
                                                     : SSL_TLSEXT_ERR_NOACK;
}

int ticketCallback(SSL *ssl, unsigned char *keyName, unsigned char *iv, EVP_CIPHER_CTX *cipher,
                   EVP_MAC_CTX *mac, int encrypt) {
    ServerState *state = serverState(ssl);
    if (state == nullptr || !state->tickets) {
        return -1;
    }
    return ticketKeyCallback(*state->tickets, ssl, keyName, iv, cipher, mac, encrypt);
}

/** Staples the chosen certificate's OCSP response, if one is valid now. */
int statusCallback(SSL *ssl, void *arg) {
    const auto *state = static_cast<const ServerState *>(arg);
    X509 *cert = SSL_get_certificate(ssl); // the certificate OpenSSL chose for this handshake
    std::vector<unsigned char> der;
    if (cert == nullptr || !state->ocsp.staple(cert, der, std::time(nullptr))) {
        return SSL_TLSEXT_ERR_NOACK;
    }
    auto *copy = static_cast<unsigned char *>(OPENSSL_malloc(der.size()));
    if (copy == nullptr) {
        return SSL_TLSEXT_ERR_NOACK;
    }
    std::memcpy(copy, der.data(), der.size());
    // OpenSSL owns `copy` from here.
    SSL_set_tlsext_status_ocsp_resp(ssl, copy, static_cast<long>(der.size()));
    return SSL_TLSEXT_ERR_OK;
}

void applySessions(SSL_CTX *ctx, ServerState &state, const TlsPolicy &policy) {
    const auto lifetime = std::chrono::duration_cast<std::chrono::seconds>(policy.sessionLifetime);
    SSL_CTX_set_timeout(ctx, static_cast<long>(lifetime.count()));
    if (policy.sessionCache > 0) {
        SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_SERVER);
        SSL_CTX_sess_set_cache_size(ctx, static_cast<long>(policy.sessionCache));
    } else {
        SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    }
    if (policy.sessionTickets == 0) {
        // No tickets at all: TLS 1.2 resumes through the cache only, TLS 1.3 does not resume.
        SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
        SSL_CTX_set_num_tickets(ctx, 0);
        return;
    }
    SSL_CTX_set_num_tickets(ctx, static_cast<std::size_t>(policy.sessionTickets));
    if (!policy.ticketKeys.empty()) {
        state.tickets = std::make_unique<TicketKeyRing>(loadTicketKeys(policy.ticketKeys));
    } else {
        state.tickets = std::make_unique<TicketKeyRing>(policy.ticketKeyRotation);
    }
    if (SSL_CTX_set_tlsext_ticket_key_evp_cb(ctx, ticketCallback) != 1) {
        raise("cannot install the ticket key callback");
    }
}

} // namespace

ContextPtr makeServerContext(const ListenerConfig &listener, bool builtinKdf) {
    ERR_clear_error();
    ContextPtr ctx(SSL_CTX_new_ex(nullptr, contextProperties(builtinKdf), TLS_server_method()),
                   ContextDeleter());
    if (!ctx) {
        raise("listener " + listener.name + ": cannot create a TLS context");
    }
    // The context owns the state from here: SSL_CTX_free runs freeServerState.
    auto *state = new ServerState();
    if (SSL_CTX_set_ex_data(ctx.get(), serverStateIndex(), state) != 1) {
        delete state;
        raise("listener " + listener.name + ": cannot attach the TLS state");
    }
    state->listener = listener.name;
    state->strictSni = listener.strictSni;
    state->alpn = listener.alpn;
    state->alpnMismatch = listener.alpnMismatch;
    state->clientAuth = listener.clientAuth;
    try {
        applyPolicy(ctx.get(), listener.tls);
        const auto started = std::chrono::steady_clock::now();
        for (const auto &files : listener.certificates) {
            state->certificates.load(files);
        }
        if (!listener.certificatesDir.empty()) {
            state->certificates.loadDirectory(listener.certificatesDir);
        }
        state->certificates.index();
        state->certificates.install(ctx.get(), state->certificates.defaultSet());
        const auto elapsed = std::chrono::duration_cast<std::chrono::milliseconds>(
            std::chrono::steady_clock::now() - started);
        log::info("certificates-loaded listener=" + listener.name +
                  " count=" + std::to_string(state->certificates.certificates().size()) +
                  " names=" + std::to_string(state->certificates.nameCount()) +
                  " ms=" + std::to_string(elapsed.count()));
        for (const auto &c : state->certificates.certificates()) {
            if (!c.ocspFile.empty()) {
                state->ocsp.add(c.leaf, c.chain, c.ocspFile);
            } else if (c.ocspFetch) {
                state->ocsp.addFetched(
                    c.leaf, c.chain, c.certFile,
                    std::chrono::duration_cast<std::chrono::seconds>(listener.tls.ocspRefresh));
            }
        }
        const auto &loaded = state->certificates.certificates();
        state->authByCertificate.assign(loaded.size(), nullptr);
        for (std::size_t i = 0; i < loaded.size(); ++i) {
            if (loaded[i].clientAuth) {
                try {
                    state->nameAuth.push_back(std::make_unique<ConnectionClientAuth>(
                        *loaded[i].clientAuth,
                        listener.name + '\0' + std::to_string(state->nameAuth.size())));
                } catch (const TlsError &e) {
                    throw TlsError("certificate " + loaded[i].certFile + ": " + e.what());
                }
                state->authByCertificate[i] = state->nameAuth.back().get();
            }
        }
        SSL_CTX_set_client_hello_cb(ctx.get(), clientHelloCallback, state);
        if (!state->alpn.empty()) {
            SSL_CTX_set_alpn_select_cb(ctx.get(), alpnSelectCallback, state);
        }
        if (!state->ocsp.empty()) {
            SSL_CTX_set_tlsext_status_cb(ctx.get(), statusCallback);
            SSL_CTX_set_tlsext_status_arg(ctx.get(), state);
        }
        applySessions(ctx.get(), *state, listener.tls);
        if (SSL_CTX_set_ex_data(ctx.get(), clientAuthIndex(), &state->clientAuth) != 1) {
            raise("cannot attach the client_auth policy");
        }
        applyClientAuth(ctx.get(), state->clientAuth);
    } catch (const TlsError &e) {
        throw TlsError("listener " + listener.name + ": " + e.what());
    }
    // Sessions resumed through the cache must come from this listener (and, with client
    // certificates, from this listener's verification policy).
    const auto *id = reinterpret_cast<const unsigned char *>(listener.name.data());
    SSL_CTX_set_session_id_context(
        ctx.get(), id,
        static_cast<unsigned>(std::min<std::size_t>(listener.name.size(), SSL_MAX_SID_CTX_LENGTH)));
    state->ocsp.start();
    return ctx;
}

ContextPtr serverContextFor(const ListenerConfig &listener, bool builtinKdf) {
    if (listener.tlsIdentity.empty()) {
        return makeServerContext(listener, builtinKdf);
    }
    // The name is part of the context (its certificate summaries say which listener).
    std::string key =
        listener.name + '\0' + listener.tlsIdentity + '\0' + kdfName(builtinKdf) + '\0';
    for (const auto &file : listener.tlsFiles) {
        util::appendFileStamp(file, key);
    }
    static std::mutex mutex;
    static std::map<std::string, std::weak_ptr<ssl_ctx_st>> cache;
    {
        std::lock_guard lock(mutex);
        for (auto it = cache.begin(); it != cache.end();) {
            it = it->second.expired() ? cache.erase(it) : std::next(it);
        }
        auto found = cache.find(key);
        if (found != cache.end()) {
            if (ContextPtr context = found->second.lock()) {
                log::info("tls-context-reused listener=" + listener.name);
                return context;
            }
        }
    }
    ContextPtr context = makeServerContext(listener, builtinKdf);
    std::lock_guard lock(mutex);
    cache[key] = context;
    return context;
}

ContextPtr makeClientContext(const ClientContextOptions &options) {
    ERR_clear_error();
    ContextPtr ctx(
        SSL_CTX_new_ex(nullptr, contextProperties(options.builtinKdf), TLS_client_method()),
        ContextDeleter());
    if (!ctx) {
        raise("cannot create a TLS client context");
    }
    applyPolicy(ctx.get(), options.policy);
    if (options.verify) {
        SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_PEER, nullptr);
        const int loaded =
            options.caFile.empty()
                ? SSL_CTX_set_default_verify_paths(ctx.get())
                : SSL_CTX_load_verify_locations(ctx.get(), options.caFile.c_str(), nullptr);
        if (loaded != 1) {
            raise("CA " + options.caFile + ": cannot load");
        }
    }
    if (!options.certFile.empty()) {
        if (SSL_CTX_use_certificate_chain_file(ctx.get(), options.certFile.c_str()) != 1) {
            raise("certificate " + options.certFile + ": cannot load");
        }
        if (SSL_CTX_use_PrivateKey_file(ctx.get(), options.keyFile.c_str(), SSL_FILETYPE_PEM) !=
            1) {
            raise("key " + options.keyFile + ": cannot load");
        }
        if (SSL_CTX_check_private_key(ctx.get()) != 1) {
            raise("key " + options.keyFile + ": does not match certificate " + options.certFile);
        }
    }
    if (!options.alpn.empty()) {
        std::string wire;
        for (const auto &protocol : options.alpn) {
            wire += static_cast<char>(protocol.size());
            wire += protocol;
        }
        // Unlike most of OpenSSL, this one returns 0 on success.
        if (SSL_CTX_set_alpn_protos(ctx.get(), reinterpret_cast<const unsigned char *>(wire.data()),
                                    static_cast<unsigned>(wire.size())) != 0) {
            raise("cannot set the ALPN protocols");
        }
    }
    return ctx;
}

namespace {

std::int64_t unixSeconds(const ASN1_TIME *time) {
    std::tm tm{};
    if (time == nullptr || ASN1_TIME_to_tm(time, &tm) != 1) {
        return 0;
    }
    return static_cast<std::int64_t>(timegm(&tm));
}

} // namespace

std::vector<CertificateSummary> certificateSummaries(const ssl_ctx_st *ctx) {
    std::vector<CertificateSummary> out;
    const auto *state =
        ctx == nullptr
            ? nullptr
            : static_cast<const ServerState *>(SSL_CTX_get_ex_data(ctx, serverStateIndex()));
    if (state == nullptr) {
        return out;
    }
    for (const auto &c : state->certificates.certificates()) {
        CertificateSummary summary;
        summary.listener = state->listener;
        summary.name = c.names.empty() ? std::string() : c.names.front();
        summary.file = c.certFile;
        summary.notBefore = unixSeconds(X509_get0_notBefore(c.leaf));
        summary.notAfter = unixSeconds(X509_get0_notAfter(c.leaf));
        summary.ocspNextUpdate = static_cast<std::int64_t>(state->ocsp.nextUpdate(c.leaf));
        out.push_back(std::move(summary));
    }
    return out;
}

std::string openSslVersion() {
    return OpenSSL_version(OPENSSL_VERSION);
}

} // namespace sluice::tls
