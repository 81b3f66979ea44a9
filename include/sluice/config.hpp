// sluice::Config: the validated, plain form of sluice.toml. Everything here is a value with a safe
// default; loadConfig() turns a TOML file into it or throws ConfigError naming file, line, column
// and key. The structs hold no OpenSSL or libuv state, so a program can also build one in code.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace sluice {

using Duration = std::chrono::milliseconds;

/** Severity threshold for the daemon's log. */
enum class LogLevel { error, warn, info, debug };

/** Where a listener binds or a backend lives. */
struct Address {
    enum class Kind { tcp, unix };
    Kind kind = Kind::tcp;
    std::string host; ///< tcp: an IPv4 or IPv6 literal, or a name resolved at startup
    std::uint16_t port = 0;
    std::string path; ///< unix: the socket path (absolute after loading)

    /** The address as written in a config file: "1.2.3.4:5", "[::1]:5" or "unix:/p". */
    std::string text() const;
};

struct ClientAuth;

/** A certificate chain and its private key (PEM files). */
struct CertificateFiles {
    std::string cert; ///< leaf first, then intermediates; absolute after loading
    std::string key;  ///< absolute after loading
    std::string ocsp; ///< a DER OCSP response to staple, re-read when it changes; empty: none
    /** ocsp = "auto": fetch the response from the certificate's OCSP responder (AIA URL). */
    bool ocspFetch = false;
    /** This certificate's own client_auth, replacing the listener's when its name is chosen. */
    std::shared_ptr<const ClientAuth> clientAuth;
};

/** Protocol policy; a listener inherits [tls] and overrides what it names. */
struct TlsPolicy {
    std::string minVersion = "1.2"; ///< "1.2" or "1.3"
    std::string maxVersion = "1.3";
    /** TLS 1.2 cipher list (OpenSSL syntax). */
    std::string ciphers = "ECDHE+AESGCM:ECDHE+CHACHA20";
    /** TLS 1.3 suites (OpenSSL syntax). */
    std::string ciphersuites =
        "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256";
    /** Key-exchange groups, preferred first. */
    std::string groups = "X25519:P-256:P-384";
    /** Signature algorithms we sign with and accept (OpenSSL syntax), preferred first. */
    std::string signatureAlgorithms = "ECDSA+SHA256:ECDSA+SHA384:ECDSA+SHA512:ed25519:ed448:"
                                      "rsa_pss_rsae_sha256:rsa_pss_rsae_sha384:rsa_pss_rsae_sha512:"
                                      "rsa_pss_pss_sha256:rsa_pss_pss_sha384:rsa_pss_pss_sha512:"
                                      "RSA+SHA256:RSA+SHA384:RSA+SHA512";
    /** TLS 1.3 tickets sent after each full handshake; 0 disables tickets (1.2 and 1.3). */
    int sessionTickets = 2;
    /** Ticket-key file (first key encrypts, all decrypt); empty: random keys per process. */
    std::string ticketKeys;
    /** Without a key file: how often the random ticket key is replaced. */
    Duration ticketKeyRotation = std::chrono::hours(1);
    /** TLS 1.2 session-ID cache entries; 0 disables the cache. */
    std::uint64_t sessionCache = 20000;
    /** How long a session (cached or in a ticket) may be resumed. */
    Duration sessionLifetime = std::chrono::hours(1);
    /** With ocsp = "auto": the longest time between two fetches of a certificate's response (it
     * is also refreshed at half of the current response's remaining validity, if sooner). */
    Duration ocspRefresh = std::chrono::hours(1);
};

/** What a listener does when the client offers ALPN protocols and none is configured. */
enum class AlpnMismatch {
    proceed, ///< finish the handshake without ALPN
    fail     ///< fail it with a no_application_protocol alert
};

/** Whether a listener asks for a client certificate. */
enum class ClientAuthMode { none, optional, required };

/**
 * Client-certificate (mTLS) policy of a listener. A certificate that is presented must verify
 * against `ca` (and `crl`) and, when any allow list is non-empty, match at least one entry of
 * one of them.
 */
struct ClientAuth {
    ClientAuthMode mode = ClientAuthMode::none;
    std::string ca;                    ///< PEM bundle of trusted client CAs (required unless none)
    std::vector<std::string> crl;      ///< PEM CRL files; the leaf is checked against them
    int verifyDepth = 4;               ///< most intermediate CAs between the leaf and `ca`
    std::vector<std::string> allowCn;  ///< subject CN patterns, '*' matches any run
    std::vector<std::string> allowDns; ///< DNS SAN patterns, "*.x" matches one label
    std::vector<std::string> allowUri; ///< URI SAN patterns (SPIFFE IDs), '*' matches any run
    /** SHA-256 of the leaf's SubjectPublicKeyInfo, 64 lowercase hex digits each. */
    std::vector<std::string> allowSpkiSha256;
};

/** Per-connection timeouts. Zero disables one. */
struct Timeouts {
    Duration handshake = std::chrono::seconds(10); ///< accept to handshake done
    Duration idle = std::chrono::minutes(5);       ///< no byte either way
    Duration connect = std::chrono::seconds(5);    ///< backend connect
    Duration halfClose = std::chrono::seconds(30); ///< idleness once one side has closed
    Duration flush = std::chrono::seconds(5);      ///< sending the last bytes before close
};

/** Per-connection buffer sizes: the memory bound of one connection, per direction. */
struct Buffers {
    std::size_t tls =
        std::size_t{32} * 1024; ///< each half of the TLS engine's BIO pair: two full records
    std::size_t plaintext = std::size_t{64} * 1024; ///< decrypted bytes waiting for the backend
    std::size_t backend = std::size_t{64} * 1024;   ///< backend bytes waiting for encryption
};

/** One [[listener]] table. */
struct ListenerConfig {
    std::string name;                           ///< defaults to the first listen address
    std::vector<Address> listen;                ///< at least one
    std::vector<CertificateFiles> certificates; ///< the first is the default for no/unknown SNI
    /** A folder of more certificates (NAME.crt + NAME.key, NAME.pem, or DIR/fullchain.pem +
     * DIR/privkey.pem); empty: none. With no `certificates`, its first one is the default. */
    std::string certificatesDir;
    bool strictSni = false;        ///< reject an unknown SNI name (unrecognized_name alert)
    std::vector<std::string> alpn; ///< protocols in our order of preference; empty: no ALPN
    AlpnMismatch alpnMismatch = AlpnMismatch::proceed;
    ClientAuth clientAuth;
    Address backend;
    TlsPolicy tls;
    Timeouts timeouts;
    std::uint64_t maxConnections = 0; ///< 0: only the global limit applies
    int backlog = 511;
    /**
     * What identifies this listener's TLS context across reloads: its TOML table without the keys
     * that do not affect TLS (listen, backend, timeouts, max_connections, backlog) and the [tls]
     * table, as text. Set by loadConfig(); empty (never reused) when built in code.
     */
    std::string tlsIdentity;
    /** Every string value of those tables taken as a path (absolute): the files whose changes
     * make a reload rebuild the context. Strings that are not paths name no file and are harmless.
     */
    std::vector<std::string> tlsFiles;
};

/** The [global] table. */
struct GlobalConfig {
    std::uint64_t maxConnections = 100000;
    /** TLS handshakes one client IP address may have in progress at once, per worker; a
     * connection beyond it is closed at accept. 0: no limit. */
    std::uint64_t maxHandshakesPerIp = 64;
    Duration drainTimeout = std::chrono::seconds(30);
    LogLevel logLevel = LogLevel::info;
    Buffers buffers;
    /** Worker threads, each with its own loop and listening sockets; 0 means one per CPU. */
    unsigned workers = 1;
    /** Drop to this user (and group) after binding and loading keys; empty keeps root. */
    std::string user;
    std::string group;
};

/** The [admin] table: the HTTP listener for /metrics, /status and /ready. */
struct AdminConfig {
    bool enabled = false; ///< true when `listen` is set; absent means no admin listener
    Address listen;       ///< a TCP address (loopback is the safe choice)
};

/** How access-log lines are written. */
enum class AccessLogFormat { logfmt, json };

/** The [log] table: the per-connection access log. */
struct LogConfig {
    /** "stderr", "off", or a file path (absolute after loading), appended to and reopened on
     * SIGUSR1. */
    std::string access = "stderr";
    AccessLogFormat format = AccessLogFormat::logfmt;
};

/** A whole configuration. */
struct Config {
    std::string path; ///< the file it came from, empty when built in code
    GlobalConfig global;
    TlsPolicy tls; ///< the [tls] defaults, as written
    AdminConfig admin;
    LogConfig log;
    std::vector<ListenerConfig> listeners;
};

/** A configuration error: what() is "FILE:LINE:COLUMN: KEY: what was expected". */
class ConfigError : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

/** Reads and validates `path`. Relative paths inside it are taken from the file's folder. */
Config loadConfig(const std::string &path);

/** Parses TOML text; `path` names it in errors and anchors relative paths. */
Config parseConfig(std::string_view text, const std::string &path);

/** Parses "host:port", "[v6]:port" or "unix:/path"; throws std::invalid_argument. */
Address parseAddress(std::string_view text);

/** Parses "250ms", "10s", "5m", "1h" (or a bare integer of seconds); throws invalid_argument. */
Duration parseDuration(std::string_view text);

/** Parses "64KiB", "1MiB", "512" (bytes); throws std::invalid_argument. */
std::size_t parseSize(std::string_view text);

} // namespace sluice
