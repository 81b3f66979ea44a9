// sluice::Config: the validated, plain form of sluice.toml. Everything here is a value with a safe
// default; loadConfig() turns a TOML file into it or throws ConfigError naming file, line, column
// and key. The structs hold no OpenSSL or libuv state, so a program can also build one in code.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <sluice/error.hpp>
#include <sluice/export.hpp>

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
    SLUICE_API std::string text() const;
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
    int sessionTickets = 1;
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
    /// Each half of the pair once a connection moves bulk (a read fills it, or a write finds
    /// it full): made again at this size when next empty. No larger than tls: never grows.
    std::size_t tlsBulk = std::size_t{64} * 1024;
};

/** Socket options applied to accepted client sockets (listener) or backend sockets (backend). */
struct SocketOptions {
    bool noDelay = true;                           ///< TCP_NODELAY
    Duration keepAlive = std::chrono::seconds(60); ///< TCP keepalive idle time; 0: off
    std::size_t sendBuffer = 0;                    ///< SO_SNDBUF; 0: the kernel's default
    std::size_t receiveBuffer = 0;                 ///< SO_RCVBUF; 0: the kernel's default

    bool operator==(const SocketOptions &) const = default;
};

/** How a backend pool picks a server for a new connection. */
enum class Balance {
    roundRobin,       ///< each healthy server in turn
    leastConnections, ///< the healthy server with the fewest open connections (ties: in turn)
    first             ///< the first healthy server in configuration order
};

/** The PROXY protocol header sent to a backend before any other byte. */
enum class ProxyProtocol { off, v1, v2 };

/** When a connection's backend connect starts: once the client's handshake is done, or once
 * its ClientHello is accepted, so the connect overlaps the rest of the handshake. */
enum class ConnectAfter { handshake, hello };

/** TLS from a backend pool to its servers (re-encryption, or client mode). */
struct BackendTls {
    bool enabled = false;
    std::string ca;         ///< PEM bundle to verify servers with; empty: the system's store
    bool verify = true;     ///< verify the chain and the name; false only for testing
    std::string serverName; ///< SNI sent and name verified; empty: the server's host if a name
    std::vector<std::string> alpn; ///< protocols offered, in order; empty: no ALPN
    std::string cert;              ///< client certificate chain presented (PEM); empty: none
    std::string key;               ///< its private key
    std::string minVersion = "1.2";
    std::string maxVersion = "1.3";
};

/** One [backend.NAME] table: a pool of servers that connections are forwarded to. */
struct BackendConfig {
    std::string name;
    std::vector<Address> servers; ///< at least one: TCP host:port, [v6]:port or unix:/path
    /** Instead of servers: connections go to the in-process StreamHandler registered under
     * this name by the embedding program (see sluice/stream.hpp); the daemon has none. */
    std::string handler;
    Balance balance = Balance::roundRobin;
    /** Connect timeout per attempt; 0: the listener's timeouts.connect. */
    Duration connectTimeout{0};
    /** Servers tried for one connection before giving up; 0: every server once. */
    unsigned attempts = 0;
    /** Consecutive failures that mark a server down (passive health); 0: never marked down. */
    unsigned maxFails = 3;
    /** How long a server marked down is skipped before it is tried again. */
    Duration failTimeout = std::chrono::seconds(10);
    /** How often host names are resolved again; 0: at start and reload only. */
    Duration resolveInterval{0};
    /** hello: connect as soon as the ClientHello is accepted (SNI and ALPN known); a handshake
     * that fails after it closes that backend connection before any byte is sent. */
    ConnectAfter connectAfter = ConnectAfter::handshake;
    ProxyProtocol proxyProtocol = ProxyProtocol::off;
    /** v2: also send the client certificate (DER) in a TLV (type 0xE0), up to this many bytes;
     * 0: never. A larger certificate is left out (its flags and CN are still sent). */
    std::size_t proxyClientCertMax = 0;
    BackendTls tls;
    SocketOptions socket;
};

/** A [[listener.route]]: connections whose SNI and ALPN match go to `backend`. */
struct Route {
    std::string sni;     ///< exact name or "*.example.com"; empty: any
    std::string alpn;    ///< negotiated ALPN protocol; empty: any
    std::string backend; ///< a BackendConfig name
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
    /** The default route: a BackendConfig name (an address written here becomes a backend of
     * its own, named by the address). */
    std::string backend;
    /** Checked in order before the default; the first match wins. */
    std::vector<Route> routes;
    /** Sources that must send a PROXY v1/v2 header before TLS (CIDR or address); a connection
     * from any other source is closed. Empty: no PROXY header expected. */
    std::vector<std::string> acceptProxyFrom;
    /** No TLS from clients: plaintext in, for a backend that speaks TLS (client mode). */
    bool plaintext = false;
    SocketOptions socket;
    TlsPolicy tls;
    Timeouts timeouts;
    std::uint64_t maxConnections = 0; ///< 0: only the global limit applies
    int backlog = 511;
    /**
     * What identifies this listener's TLS context across reloads: its TOML table without the keys
     * that do not affect TLS (listen, backend, route, accept_proxy_from, socket, timeouts,
     * max_connections, backlog) and the [tls] table, as text. Set by loadConfig(); empty (never
     * reused) when built in code.
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
    /** TLS handshakes one client IP address may have in progress at once, counted across the
     * daemon's workers (a libsluice Server counts its own, unless Servers share a
     * HandshakeLimits); a connection beyond it is closed at accept. 0: no limit. */
    std::uint64_t maxHandshakesPerIp = 64;
    /** New TLS handshakes one client address may start per second, counted as the one above (a
     * bucket that holds one second's worth, so a burst of that many passes at once); a
     * connection beyond it is closed at accept. IPv6 addresses count by their /64. 0: no limit. */
    std::uint64_t maxHandshakeRatePerIp = 0;
    Duration drainTimeout = std::chrono::seconds(30);
    /** Once a worker has accepted and closed no connection for this long after some did (or a
     * busy worker's connections fell to half their peak), the heap's free memory goes back to
     * the operating system (glibc's malloc_trim), so RSS falls after a burst. 0: never. */
    Duration releaseMemoryAfter = std::chrono::seconds(1);
    /** After a stop signal, how long sluice keeps accepting while /ready answers 503, so a load
     * balancer's health check takes it out before it stops accepting; then the drain starts. */
    Duration drainDelay{0};
    LogLevel logLevel = LogLevel::info;
    Buffers buffers;
    /** Worker threads, each with its own loop and listening sockets; 0 means one per CPU. */
    unsigned workers = 1;
    /** Drop to this user (and group) after binding and loading keys; empty keeps root. */
    std::string user;
    std::string group;
    /** The daemon checks this often whether its configuration file, or a file that file names
     * for TLS, changed on disk, and reloads (as on SIGHUP) once a change has held for one check.
     * 0: only SIGHUP reloads. A Server ignores it: the program calls reload(). */
    Duration reloadOnChange{0};
    /** How long the daemon's upgrade (SIGUSR2) waits for the new process to report ready before
     * it sends it SIGTERM and goes on serving. A Server ignores it. */
    Duration upgradeTimeout{std::chrono::seconds(60)};
    /** TLS contexts derive their keys with sluice's TLS13-KDF and TLS1-PRF (tls_kdf =
     * "sluice"), or with OpenSSL's (tls_kdf = "openssl"). OpenSSL's in FIPS mode regardless. */
    bool builtinKdf = true;
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
    /** Every [backend.NAME] table in file order, used or not, then one backend per address
     * written as a listener's or route's `backend`, in the order they first appear. */
    std::vector<BackendConfig> backends;

    /** The backend named `name`, or null. */
    SLUICE_API const BackendConfig *findBackend(std::string_view name) const;
};

/** A configuration error: what() is "FILE:LINE:COLUMN: KEY: what was expected". */
class SLUICE_API ConfigError : public Error {
public:
    using Error::Error;
    ~ConfigError() override;
};

/** Reads and validates `path`. Relative paths inside it are taken from the file's folder. */
SLUICE_API Config loadConfig(const std::string &path);

/** Parses TOML text; `path` names it in errors and anchors relative paths. */
SLUICE_API Config parseConfig(std::string_view text, const std::string &path);

/** Parses "host:port", "[v6]:port" or "unix:/path"; throws std::invalid_argument. */
SLUICE_API Address parseAddress(std::string_view text);

/** An IP network: an address and a prefix length ("10.0.0.0/8", "::1/128", "192.0.2.7"). */
struct Network {
    int family = 0;              ///< AF_INET or AF_INET6
    std::uint8_t bytes[16] = {}; ///< the address, network byte order (4 used for AF_INET)
    unsigned prefix = 0;         ///< leading bits that must match
};

/** Parses "ADDRESS/PREFIX" or a bare address (a full-length prefix); host bits must be zero.
 * Throws std::invalid_argument. */
SLUICE_API Network parseNetwork(std::string_view text);

/** Parses "250ms", "10s", "5m", "1h" (or a bare integer of seconds); throws invalid_argument. */
SLUICE_API Duration parseDuration(std::string_view text);

/** Parses "64KiB", "1MiB", "512" (bytes); throws std::invalid_argument. */
SLUICE_API std::size_t parseSize(std::string_view text);

} // namespace sluice
