// Unit tests for config/: defaults, every key, [tls] inheritance, path resolution, the exact text
// and position of each class of error, the value parsers, and the shipped files in conf/.
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <sys/socket.h>

#include <doctest/doctest.h>

#include <sluice/config.hpp>

#include "temp_dir.hpp"

using namespace std::chrono_literals;
using sluice::Address;
using sluice::Config;
using sluice::ConfigError;
using sluice::parseAddress;
using sluice::parseConfig;
using sluice::parseDuration;
using sluice::parseSize;

namespace {

/** The message of the ConfigError that parsing `text` as "t.toml" throws, or "(no error)". */
std::string errorOf(std::string_view text, const std::string &path = "t.toml") {
    try {
        (void)parseConfig(text, path);
    } catch (const ConfigError &error) {
        return error.what();
    }
    return "(no error)";
}

/** The message of the ConfigError that loading `path` throws, or "(no error)". */
std::string loadErrorOf(const std::string &path) {
    try {
        (void)sluice::loadConfig(path);
    } catch (const ConfigError &error) {
        return error.what();
    }
    return "(no error)";
}

constexpr std::string_view minimal = R"([[listener]]
listen = "0.0.0.0:8443"
certificate = { cert = "site.crt", key = "site.key" }
backend = "127.0.0.1:8080"
)";

} // namespace

TEST_CASE("the smallest file gives the documented defaults") {
    Config config = parseConfig(minimal, "/etc/sluice/sluice.toml");
    CHECK(config.path == "/etc/sluice/sluice.toml");

    CHECK(config.global.maxConnections == 100000);
    CHECK(config.global.maxHandshakesPerIp == 64);
    CHECK(config.global.maxHandshakeRatePerIp == 0);
    CHECK(config.global.drainTimeout == 30s);
    CHECK(config.global.drainDelay == 0s);
    CHECK(config.global.releaseMemoryAfter == 1s);
    CHECK(config.global.reloadOnChange == 0s);
    CHECK(config.global.upgradeTimeout == 60s);
    CHECK(config.global.logLevel == sluice::LogLevel::info);
    CHECK(config.global.builtinKdf);
    CHECK(config.global.buffers.tls == 32 * 1024);
    CHECK(config.global.buffers.tlsBulk == 64 * 1024);
    CHECK(config.global.buffers.plaintext == 64 * 1024);
    CHECK(config.global.buffers.backend == 64 * 1024);

    CHECK(config.tls.minVersion == "1.2");
    CHECK(config.tls.maxVersion == "1.3");
    CHECK(config.tls.ciphers == "ECDHE+AESGCM:ECDHE+CHACHA20");
    CHECK(config.tls.ciphersuites ==
          "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256");
    CHECK(config.tls.groups == "X25519:P-256:P-384");

    REQUIRE(config.listeners.size() == 1);
    const sluice::ListenerConfig &listener = config.listeners[0];
    CHECK(listener.name == "0.0.0.0:8443");
    REQUIRE(listener.listen.size() == 1);
    CHECK(listener.listen[0].kind == Address::Kind::tcp);
    CHECK(listener.listen[0].host == "0.0.0.0");
    CHECK(listener.listen[0].port == 8443);
    REQUIRE(listener.certificates.size() == 1);
    CHECK(listener.certificates[0].cert == "/etc/sluice/site.crt");
    CHECK(listener.certificates[0].key == "/etc/sluice/site.key");
    // An address written as the backend becomes a backend of its own, named by the address.
    CHECK(listener.backend == "127.0.0.1:8080");
    REQUIRE(config.findBackend(listener.backend) != nullptr);
    CHECK(config.findBackend(listener.backend)->servers[0].text() == "127.0.0.1:8080");
    CHECK(listener.routes.empty());
    CHECK(listener.acceptProxyFrom.empty());
    CHECK_FALSE(listener.plaintext);
    CHECK(listener.socket.noDelay);
    CHECK(listener.socket.keepAlive == 60s);
    CHECK(listener.socket.sendBuffer == 0);
    CHECK(listener.socket.receiveBuffer == 0);
    CHECK(listener.tls.minVersion == "1.2");
    CHECK(listener.tls.maxVersion == "1.3");
    CHECK(listener.tls.groups == "X25519:P-256:P-384");
    CHECK(listener.timeouts.handshake == 10s);
    CHECK(listener.timeouts.idle == 5min);
    CHECK(listener.timeouts.connect == 5s);
    CHECK(listener.timeouts.halfClose == 30s);
    CHECK(listener.timeouts.flush == 5s);
    CHECK(listener.maxConnections == 0);
    CHECK(listener.backlog == 511);
}

TEST_CASE("every key round-trips") {
    Config config = parseConfig(R"(
[global]
max_connections = 12345
max_handshakes_per_ip = 7
max_handshake_rate_per_ip = 50
drain_timeout = "1500ms"
drain_delay = "2s"
release_memory_after = "0s"
reload_on_change = "10s"
upgrade_timeout = "2m"
log_level = "debug"
tls_kdf = "openssl"
buffers = { tls = "4KiB", tls_bulk = "1MiB", plaintext = 1000, backend = "2MB" }

[tls]
min_version = "1.3"
max_version = "1.3"
ciphers = "ECDHE+AESGCM"
ciphersuites = "TLS_AES_256_GCM_SHA384"
groups = "P-384"

[[listener]]
name = "web"
listen = ["127.0.0.1:0", "[::1]:8443", "localhost:9000"]
backend = "[::1]:8080"
min_version = "1.2"
max_version = "1.2"
ciphers = "ECDHE+CHACHA20"
ciphersuites = "TLS_CHACHA20_POLY1305_SHA256"
groups = "X25519"
timeouts = { handshake = "1s", idle = "2m", connect = 3, half_close = "0", flush = "1h" }
max_connections = 77
backlog = 64

  [[listener.certificate]]
  cert = "/abs/ecdsa.crt"
  key = "/abs/ecdsa.key"

  [[listener.certificate]]
  cert = "rsa.pem"
)",
                                "/srv/conf/s.toml");
    CHECK(config.global.maxConnections == 12345);
    CHECK(config.global.maxHandshakesPerIp == 7);
    CHECK(config.global.maxHandshakeRatePerIp == 50);
    CHECK(config.global.drainTimeout == 1500ms);
    CHECK(config.global.drainDelay == 2s);
    CHECK(config.global.releaseMemoryAfter == 0s);
    CHECK(config.global.reloadOnChange == 10s);
    CHECK(config.global.upgradeTimeout == 120s);
    CHECK(config.global.logLevel == sluice::LogLevel::debug);
    CHECK_FALSE(config.global.builtinKdf);
    CHECK(config.global.buffers.tls == 4096);
    CHECK(config.global.buffers.tlsBulk == 1024 * 1024);
    CHECK(config.global.buffers.plaintext == 1000);
    CHECK(config.global.buffers.backend == 2000000);

    CHECK(config.tls.minVersion == "1.3");
    CHECK(config.tls.maxVersion == "1.3");
    CHECK(config.tls.ciphers == "ECDHE+AESGCM");
    CHECK(config.tls.ciphersuites == "TLS_AES_256_GCM_SHA384");
    CHECK(config.tls.groups == "P-384");

    REQUIRE(config.listeners.size() == 1);
    const sluice::ListenerConfig &listener = config.listeners[0];
    CHECK(listener.name == "web");
    REQUIRE(listener.listen.size() == 3);
    CHECK(listener.listen[0].text() == "127.0.0.1:0");
    CHECK(listener.listen[1].host == "::1");
    CHECK(listener.listen[1].port == 8443);
    CHECK(listener.listen[2].host == "localhost");
    CHECK(listener.listen[2].port == 9000);
    REQUIRE(config.findBackend(listener.backend) != nullptr);
    CHECK(config.findBackend(listener.backend)->servers[0].host == "::1");
    CHECK(config.findBackend(listener.backend)->servers[0].port == 8080);
    CHECK(listener.tls.minVersion == "1.2");
    CHECK(listener.tls.maxVersion == "1.2");
    CHECK(listener.tls.ciphers == "ECDHE+CHACHA20");
    CHECK(listener.tls.ciphersuites == "TLS_CHACHA20_POLY1305_SHA256");
    CHECK(listener.tls.groups == "X25519");
    CHECK(listener.timeouts.handshake == 1s);
    CHECK(listener.timeouts.idle == 2min);
    CHECK(listener.timeouts.connect == 3s);
    CHECK(listener.timeouts.halfClose == 0s);
    CHECK(listener.timeouts.flush == 1h);
    CHECK(listener.maxConnections == 77);
    CHECK(listener.backlog == 64);
    REQUIRE(listener.certificates.size() == 2);
    CHECK(listener.certificates[0].cert == "/abs/ecdsa.crt");
    CHECK(listener.certificates[0].key == "/abs/ecdsa.key");
    CHECK(listener.certificates[1].cert == "/srv/conf/rsa.pem");
    CHECK(listener.certificates[1].key == "/srv/conf/rsa.pem");
}

TEST_CASE("listeners inherit [tls] and override what they name") {
    Config config = parseConfig(R"(
[tls]
min_version = "1.3"
ciphers = "AES"
groups = "P-256"

[[listener]]
name = "a"
listen = "127.0.0.1:1"
certificate = { cert = "a.crt" }
backend = "127.0.0.1:2"

[[listener]]
name = "b"
listen = "127.0.0.1:3"
certificate = { cert = "b.crt" }
backend = "127.0.0.1:4"
groups = "X448"
ciphers = "CHACHA"
)",
                                "/c/t.toml");
    // [tls] is kept as written; unnamed members keep their built-in defaults.
    CHECK(config.tls.minVersion == "1.3");
    CHECK(config.tls.maxVersion == "1.3");
    CHECK(config.tls.ciphers == "AES");
    CHECK(config.tls.groups == "P-256");
    CHECK(config.tls.ciphersuites == sluice::TlsPolicy{}.ciphersuites);

    REQUIRE(config.listeners.size() == 2);
    const sluice::TlsPolicy &a = config.listeners[0].tls;
    CHECK(a.minVersion == "1.3");
    CHECK(a.ciphers == "AES");
    CHECK(a.groups == "P-256");
    const sluice::TlsPolicy &b = config.listeners[1].tls;
    CHECK(b.minVersion == "1.3");
    CHECK(b.ciphers == "CHACHA");
    CHECK(b.groups == "X448");
    CHECK(b.ciphersuites == sluice::TlsPolicy{}.ciphersuites);
}

TEST_CASE("relative paths are taken from the config file's folder") {
    constexpr std::string_view text = R"([[listener]]
listen = "unix:sockets/in.sock"
certificate = [{ cert = "certs/./site.crt", key = "../keys/site.key" }, { cert = "/abs/b.pem" }]
backend = "unix:run/app.sock"
)";
    SUBCASE("absolute config path") {
        Config config = parseConfig(text, "/etc/sluice/sluice.toml");
        const sluice::ListenerConfig &listener = config.listeners.at(0);
        CHECK(listener.listen.at(0).kind == Address::Kind::unix);
        CHECK(listener.listen.at(0).path == "/etc/sluice/sockets/in.sock");
        CHECK(listener.name == "unix:/etc/sluice/sockets/in.sock");
        CHECK(listener.certificates.at(0).cert == "/etc/sluice/certs/site.crt");
        // ".." stays: folding it away would name another file when the folder is a symlink.
        CHECK(listener.certificates.at(0).key == "/etc/sluice/../keys/site.key");
        CHECK(listener.certificates.at(1).cert == "/abs/b.pem");
        CHECK(listener.certificates.at(1).key == "/abs/b.pem");
        const Address &backend = config.findBackend(listener.backend)->servers.at(0);
        CHECK(backend.kind == Address::Kind::unix);
        CHECK(backend.path == "/etc/sluice/run/app.sock");
        CHECK(backend.text() == "unix:/etc/sluice/run/app.sock");
        CHECK(listener.backend == "unix:/etc/sluice/run/app.sock");
    }
    SUBCASE("relative config path is made absolute against the working folder") {
        Config config = parseConfig(text, "./conf/x.toml");
        std::filesystem::path cwd = std::filesystem::current_path();
        CHECK(config.path == "./conf/x.toml");
        CHECK(config.listeners.at(0).certificates.at(0).cert ==
              (cwd / "conf/certs/site.crt").string());
        CHECK(config.findBackend(config.listeners.at(0).backend)->servers.at(0).path ==
              (cwd / "conf/run/app.sock").string());
    }
    SUBCASE("loadConfig anchors on the file it read") {
        sluice::test::TempDir dir("sluice-config");
        std::string file = dir.write("sub/sluice.toml", text);
        Config config = sluice::loadConfig(file);
        CHECK(config.path == file);
        CHECK(config.listeners.at(0).certificates.at(0).cert ==
              (dir.path() / "sub/certs/site.crt").string());
    }
}

TEST_CASE("syntax errors carry the toml++ position") {
    CHECK(errorOf("[[listener]]\nlisten = \"a:1\"\nbackend = = 1\n") ==
          "t.toml:3:11: syntax error while parsing value: could not determine value type");
    CHECK(errorOf("a = 1\n[a]\n") == "t.toml:2:1: syntax error while parsing table header: "
                                     "cannot redefine existing integer 'a' as table");
}

TEST_CASE("workers, user and group") {
    const sluice::Config defaults = sluice::parseConfig(std::string(minimal), "/etc/sluice/t.toml");
    CHECK(defaults.global.workers == 1);
    CHECK(defaults.global.user.empty());
    const sluice::Config set = sluice::parseConfig(
        std::string("[global]\nworkers = 3\nuser = \"sluice\"\ngroup = \"ssl-cert\"\n") +
            std::string(minimal),
        "/etc/sluice/t.toml");
    CHECK(set.global.workers == 3);
    CHECK(set.global.user == "sluice");
    CHECK(set.global.group == "ssl-cert");
    CHECK(sluice::parseConfig(std::string("[global]\nworkers = \"auto\"\n") + std::string(minimal),
                              "/etc/sluice/t.toml")
              .global.workers == 0);
    CHECK(errorOf(std::string("[global]\nworkers = \"many\"\n") + std::string(minimal)) ==
          "t.toml:2:11: global.workers: expected \"auto\" or an integer from 1 to 256");
    CHECK(errorOf(std::string("[global]\nworkers = 0\n") + std::string(minimal))
              .find("global.workers") != std::string::npos);
}

TEST_CASE("unknown keys are named, with a suggestion when one is close") {
    CHECK(errorOf(std::string(minimal) + "\n[globl]\n") ==
          "t.toml:6:2: globl: unknown key 'globl' (did you mean 'global'?)");
    CHECK(errorOf(std::string(minimal) + "timeouts = { handshake = \"10s\", idel = \"5m\" }\n") ==
          "t.toml:5:33: listener[0].timeouts.idel: unknown key 'idel' (did you mean 'idle'?)");
    CHECK(errorOf(std::string(minimal) + "routes = [\"h2\"]\n") ==
          "t.toml:5:1: listener[0].routes: unknown key 'routes' (did you mean 'route'?)");
    CHECK(errorOf(std::string(minimal) + "[global]\nthreads = 4\n") ==
          "t.toml:6:1: global.threads: unknown key 'threads'");
    CHECK(errorOf(std::string(minimal) + "[global]\nbuffers = { tsl = 1024 }\n") ==
          "t.toml:6:13: global.buffers.tsl: unknown key 'tsl' (did you mean 'tls'?)");
    CHECK(errorOf(std::string(minimal) + "[tls]\nmin_versoin = \"1.2\"\n") ==
          "t.toml:6:1: tls.min_versoin: unknown key 'min_versoin' (did you mean 'min_version'?)");
    CHECK(errorOf(std::string(minimal) + "certificates = []\n") ==
          "t.toml:5:1: listener[0].certificates: unknown key 'certificates' (did you mean "
          "'certificate'?)");
    CHECK(
        errorOf("[[listener]]\nlisten = \"a:1\"\ncertificate = { cert = \"a\", kye = \"b\" }\n") ==
        "t.toml:3:29: listener[0].certificate.kye: unknown key 'kye' (did you mean 'key'?)");
}

TEST_CASE("[admin] and [log]: defaults, every key, and their errors") {
    const Config defaults = parseConfig(minimal, "/etc/sluice/t.toml");
    CHECK_FALSE(defaults.admin.enabled);
    CHECK(defaults.log.access == "stderr");
    CHECK(defaults.log.format == sluice::AccessLogFormat::logfmt);

    const Config set = parseConfig(std::string(minimal) + R"(
[admin]
listen = "127.0.0.1:9901"

[log]
access = "logs/access.log"
format = "json"
)",
                                   "/etc/sluice/t.toml");
    CHECK(set.admin.enabled);
    CHECK(set.admin.listen.text() == "127.0.0.1:9901");
    CHECK(set.log.access == "/etc/sluice/logs/access.log");
    CHECK(set.log.format == sluice::AccessLogFormat::json);
    CHECK(parseConfig(std::string(minimal) + "[log]\naccess = \"off\"\n", "/x/t.toml").log.access ==
          "off");
    CHECK(parseConfig(std::string(minimal) + "[admin]\nlisten = \"[::1]:0\"\n", "/x/t.toml")
              .admin.listen.port == 0);

    CHECK(errorOf(std::string(minimal) + "[admin]\nlisten = \"unix:/run/a.sock\"\n") ==
          "t.toml:6:10: admin.listen: expected a TCP address (\"host:port\")");
    CHECK(errorOf(std::string(minimal) + "[admin]\nlisten = 9901\n") ==
          "t.toml:6:10: admin.listen: expected a string, got an integer");
    CHECK(errorOf(std::string(minimal) + "[admin]\nlisten = \"127.0.0.1\"\n")
              .starts_with("t.toml:6:10: admin.listen: bad address"));
    CHECK(errorOf(std::string(minimal) + "[admin]\nlisen = \"127.0.0.1:1\"\n") ==
          "t.toml:6:1: admin.lisen: unknown key 'lisen' (did you mean 'listen'?)");
    CHECK(errorOf(std::string(minimal) + "[log]\nformat = \"xml\"\n") ==
          "t.toml:6:10: log.format: expected \"logfmt\" or \"json\", got \"xml\"");
    CHECK(errorOf(std::string(minimal) + "[log]\naccess = \"\"\n") ==
          "t.toml:6:10: log.access: must not be empty");
    CHECK(errorOf(std::string(minimal) + "[log]\nacess = \"off\"\n") ==
          "t.toml:6:1: log.acess: unknown key 'acess' (did you mean 'access'?)");
    CHECK(errorOf(std::string(minimal) + "admin = \"127.0.0.1:1\"\n") ==
          "t.toml:5:1: listener[0].admin: unknown key 'admin'");
    CHECK(errorOf("admin = 1\n" + std::string(minimal)) ==
          "t.toml:1:9: admin: expected a table, got an integer");
}

TEST_CASE("the first unknown key in file order is reported, not the first alphabetically") {
    CHECK(errorOf("[[listener]]\nzzz = 1\naaa = 2\n") ==
          "t.toml:2:1: listener[0].zzz: unknown key 'zzz'");
}

TEST_CASE("wrong types name what was expected and what was found") {
    CHECK(errorOf("global = 1\n") == "t.toml:1:10: global: expected a table, got an integer");
    CHECK(errorOf("[global]\nmax_connections = \"lots\"\n") ==
          "t.toml:2:19: global.max_connections: expected an integer, got a string");
    CHECK(errorOf("[global]\ndrain_timeout = true\n") ==
          "t.toml:2:17: global.drain_timeout: expected a duration such as \"10s\" or an integer "
          "of seconds, got a boolean");
    CHECK(errorOf("[global]\nbuffers = { tls = 1.5 }\n") ==
          "t.toml:2:19: global.buffers.tls: expected a size such as \"64KiB\" or an integer of "
          "bytes, got a floating-point number");
    CHECK(errorOf("[listener]\nlisten = \"a:1\"\n") ==
          "t.toml:1:1: listener: expected an array of tables ([[listener]]), got a table");
    CHECK(errorOf("[[listener]]\nlisten = 5\n") ==
          "t.toml:2:10: listener[0].listen: expected a string or an array of strings, got an "
          "integer");
    CHECK(errorOf("[[listener]]\nlisten = [\"a:1\", 2]\n") ==
          "t.toml:2:18: listener[0].listen[1]: expected a string, got an integer");
    CHECK(errorOf("[[listener]]\nlisten = \"a:1\"\ncertificate = \"a.crt\"\n") ==
          "t.toml:3:15: listener[0].certificate: expected a table or an array of tables, got a "
          "string");
    CHECK(errorOf(std::string(minimal) + "timeouts = \"5s\"\n") ==
          "t.toml:5:12: listener[0].timeouts: expected a table, got a string");
    CHECK(errorOf(std::string(minimal) + "name = 1979-05-27\n") ==
          "t.toml:5:8: listener[0].name: expected a string, got a date");
}

TEST_CASE("bad values are rejected at their position") {
    const std::string global = std::string(minimal) + "[global]\n"; // the key goes on line 6
    CHECK(errorOf(global + "drain_timeout = \"10 s\"\n") ==
          "t.toml:6:17: global.drain_timeout: bad duration \"10 s\": expected a number followed "
          "by ms, s, m or h");
    CHECK(errorOf(global + "release_memory_after = \"soon\"\n") ==
          "t.toml:6:24: global.release_memory_after: bad duration \"soon\": expected a number "
          "followed by ms, s, m or h");
    CHECK(errorOf(global + "drain_timeout = -5\n") ==
          "t.toml:6:17: global.drain_timeout: must not be negative, got -5");
    CHECK(errorOf(global + "max_connections = 0\n") ==
          "t.toml:6:19: global.max_connections: must be at least 1, got 0");
    CHECK(errorOf(global + "max_handshakes_per_ip = -1\n") ==
          "t.toml:6:25: global.max_handshakes_per_ip: must be at least 0, got -1");
    CHECK(parseConfig(global + "max_handshakes_per_ip = 0\n", "t.toml").global.maxHandshakesPerIp ==
          0);
    CHECK(errorOf(global + "max_handshake_rate_per_ip = -5\n") ==
          "t.toml:6:29: global.max_handshake_rate_per_ip: must be at least 0, got -5");
    CHECK(errorOf(global + "reload_on_change = \"50ms\"\n") ==
          "t.toml:6:20: global.reload_on_change: must be 0 (reload on SIGHUP only) or at least "
          "100ms");
    CHECK(parseConfig(global + "reload_on_change = \"100ms\"\n", "t.toml").global.reloadOnChange ==
          100ms);
    CHECK(errorOf(global + "upgrade_timeout = \"50ms\"\n") ==
          "t.toml:6:19: global.upgrade_timeout: must be at least 100ms");
    CHECK(errorOf(global + "tls_kdf = \"fast\"\n") ==
          "t.toml:6:11: global.tls_kdf: expected \"sluice\" or \"openssl\", got \"fast\"");
    CHECK(errorOf(global + "log_level = \"verbose\"\n") ==
          "t.toml:6:13: global.log_level: expected \"error\", \"warn\", \"info\" or \"debug\", got "
          "\"verbose\"");
    CHECK(errorOf(global + "buffers = { tls = \"100B\" }\n") ==
          "t.toml:6:19: global.buffers.tls: must be between 512 and 67108864 bytes, got \"100B\" "
          "(100 bytes)");
    CHECK(errorOf(global + "buffers = { plaintext = 0 }\n") ==
          "t.toml:6:25: global.buffers.plaintext: must be between 1 and 67108864 bytes, got 0");
    CHECK(errorOf(global + "buffers = { backend = \"65MiB\" }\n") ==
          "t.toml:6:23: global.buffers.backend: must be between 1 and 67108864 bytes, got "
          "\"65MiB\" (68157440 bytes)");
    CHECK(errorOf(global + "buffers = { backend = \"12XB\" }\n") ==
          "t.toml:6:23: global.buffers.backend: bad size \"12XB\": expected a number of bytes, "
          "optionally followed by B, KiB, MiB, GiB, KB, MB or GB");

    const std::string listener = std::string(minimal); // the key goes on line 5
    CHECK(errorOf(listener + "min_version = \"1.1\"\n") ==
          "t.toml:5:15: listener[0].min_version: expected \"1.2\" or \"1.3\", got \"1.1\"");
    CHECK(errorOf(listener + "ciphers = \"\"\n") ==
          "t.toml:5:11: listener[0].ciphers: must not be empty");
    CHECK(errorOf(listener + "backlog = 0\n") ==
          "t.toml:5:11: listener[0].backlog: must be between 1 and 65535, got 0");
    CHECK(errorOf(listener + "max_connections = -1\n") ==
          "t.toml:5:19: listener[0].max_connections: must be at least 0, got -1");
    CHECK(errorOf(listener + "timeouts = { idle = \"5 minutes\" }\n") ==
          "t.toml:5:21: listener[0].timeouts.idle: bad duration \"5 minutes\": expected a number "
          "followed by ms, s, m or h");
    CHECK(errorOf(listener + "name = \"\"\n") == "t.toml:5:8: listener[0].name: must not be empty");

    // Backends need a real port; a listener may ask for port 0 (tests bind and read it back).
    CHECK(errorOf("[[listener]]\nlisten = \"127.0.0.1:0\"\ncertificate = { cert = \"a\" }\n"
                  "backend = \"127.0.0.1:0\"\n") ==
          "t.toml:4:11: listener[0].backend: bad address \"127.0.0.1:0\": a backend needs a port "
          "from 1 to 65535");
    CHECK(errorOf("[[listener]]\nlisten = \"127.0.0.1:0\"\ncertificate = { cert = \"a\" }\n"
                  "backend = \"127.0.0.1:70000\"\n") ==
          "t.toml:4:11: listener[0].backend: bad address \"127.0.0.1:70000\": the port must be a "
          "number from 0 to 65535");
    CHECK(errorOf("[[listener]]\nlisten = [\"127.0.0.1:1\", \"::1:443\"]\n") ==
          "t.toml:2:26: listener[0].listen[1]: bad address \"::1:443\": an IPv6 address needs "
          "brackets, as in [::1]:443");
    CHECK(errorOf("[[listener]]\nlisten = []\n") ==
          "t.toml:2:10: listener[0].listen: must name at least one address");
    CHECK(errorOf("[[listener]]\nlisten = \"a:1\"\ncertificate = []\n") ==
          "t.toml:3:15: listener[0].certificate: must name at least one certificate");
    CHECK(errorOf("[[listener]]\nlisten = \"a:1\"\ncertificate = { cert = \"\" }\n") ==
          "t.toml:3:24: listener[0].certificate.cert: must not be empty");
    std::string longPath(120, 'x');
    CHECK(errorOf("[[listener]]\nlisten = \"a:1\"\ncertificate = { cert = \"a\" }\n"
                  "backend = \"unix:/" +
                  longPath + "\"\n") == "t.toml:4:11: listener[0].backend: the socket path \"/" +
                                            longPath + "\" is too long (121 bytes, at most 107)");
}

TEST_CASE("missing listeners and missing required keys point at the enclosing table") {
    CHECK(errorOf("") == "t.toml:1:1: listener: at least one [[listener]] table is required");
    CHECK(errorOf("[global]\nlog_level = \"info\"\n") ==
          "t.toml:1:1: listener: at least one [[listener]] table is required");
    CHECK(errorOf("listener = []\n") ==
          "t.toml:1:12: listener: at least one [[listener]] table is required");
    CHECK(errorOf("listener = [1]\n") ==
          "t.toml:1:13: listener[0]: expected a table, got an integer");

    CHECK(errorOf("[global]\nlog_level = \"info\"\n\n[[listener]]\nlisten = \"a:1\"\n"
                  "certificate = { cert = \"a\" }\n") ==
          "t.toml:4:1: listener[0].backend: required key is missing");
    CHECK(errorOf(std::string(minimal) + "\n[[listener]]\nlisten = \"b:1\"\nbackend = \"c:1\"\n") ==
          "t.toml:6:1: listener[1].certificate: required key is missing");
    CHECK(errorOf(std::string(minimal) + "\n  [[listener]]\nbackend = \"c:1\"\n") ==
          "t.toml:6:3: listener[1].listen: required key is missing");
    CHECK(errorOf("[[listener]]\nlisten = \"a:1\"\ncertificate = { key = \"a.key\" }\n") ==
          "t.toml:3:15: listener[0].certificate.cert: required key is missing");
    CHECK(errorOf("[[listener]]\nlisten = \"a:1\"\nbackend = \"b:1\"\n[[listener.certificate]]\n"
                  "cert = \"a\"\n[[listener.certificate]]\nkey = \"b\"\n") ==
          "t.toml:6:1: listener[0].certificate[1].cert: required key is missing");
}

TEST_CASE("listener names must be unique, whether written or defaulted") {
    const std::string named = R"([[listener]]
name = "web"
listen = "127.0.0.1:1"
certificate = { cert = "a" }
backend = "127.0.0.1:2"
[[listener]]
name = "web"
listen = "127.0.0.1:3"
certificate = { cert = "a" }
backend = "127.0.0.1:2"
)";
    CHECK(errorOf(named) == "t.toml:7:8: listener[1].name: duplicate listener name \"web\" "
                            "(listener[0] has the same name)");

    // The default name is the first listen address, so the position is that of `listen`.
    const std::string defaulted = R"([[listener]]
listen = "127.0.0.1:0"
certificate = { cert = "a" }
backend = "127.0.0.1:2"
[[listener]]
listen = ["127.0.0.1:0", "[::1]:0"]
certificate = { cert = "a" }
backend = "127.0.0.1:2"
)";
    CHECK(errorOf(defaulted) == "t.toml:6:10: listener[1].name: duplicate listener name "
                                "\"127.0.0.1:0\" (listener[0] has the same name)");

    // Different names on the same port-0 address are fine.
    CHECK(errorOf(defaulted + "name = \"other\"\n") == "(no error)");
}

TEST_CASE("min_version may not exceed max_version") {
    CHECK(errorOf(std::string(minimal) + "[tls]\nmin_version = \"1.3\"\nmax_version = \"1.2\"\n") ==
          "t.toml:6:15: tls.min_version: min_version \"1.3\" is greater than max_version \"1.2\"");
    CHECK(errorOf(std::string(minimal) + "[tls]\nmax_version = \"1.2\"\n") == "(no error)");
    // The listener names only one half; the error goes to the half it names.
    CHECK(errorOf("[tls]\nmax_version = \"1.2\"\n" + std::string(minimal) +
                  "min_version = \"1.3\"\n") ==
          "t.toml:7:15: listener[0].min_version: min_version \"1.3\" is greater than max_version "
          "\"1.2\"");
    CHECK(errorOf("[tls]\nmin_version = \"1.3\"\n" + std::string(minimal) +
                  "max_version = \"1.2\"\n") ==
          "t.toml:7:15: listener[0].max_version: min_version \"1.3\" is greater than max_version "
          "\"1.2\"");
}

TEST_CASE("files that cannot be read") {
    CHECK(loadErrorOf("/nonexistent/sluice.toml") ==
          "/nonexistent/sluice.toml: cannot read: No such file or directory");
    CHECK(loadErrorOf(SLUICE_SOURCE_ROOT "/conf") == SLUICE_SOURCE_ROOT
          "/conf: cannot read: Is a directory");

    sluice::test::TempDir dir("sluice-config");
    std::string file = dir.write("bad.toml", "[[listener]]\nlisten = \"a:1\"\n");
    CHECK(loadErrorOf(file) == file + ":1:1: listener[0].certificate: required key is missing");
}

TEST_CASE("parseDuration") {
    CHECK(parseDuration("250ms") == 250ms);
    CHECK(parseDuration("10s") == 10s);
    CHECK(parseDuration("5m") == 5min);
    CHECK(parseDuration("1h") == 1h);
    CHECK(parseDuration("0") == 0ms);
    CHECK(parseDuration("0s") == 0ms);
    CHECK(parseDuration("10") == 10s);
    CHECK(parseDuration("9223372036854775807ms").count() == INT64_MAX);

    for (std::string_view bad : {"", "-1s", "s", "ms", "10x", "1.5s", " 10s", "10s ", "10S",
                                 "1m30s", "10 s", "+5s", "0x10s"}) {
        CAPTURE(bad);
        CHECK_THROWS_AS(parseDuration(bad), std::invalid_argument);
    }
    CHECK_THROWS_WITH_AS(parseDuration("99999999999999999999s"),
                         "bad duration \"99999999999999999999s\": too large",
                         std::invalid_argument);
    CHECK_THROWS_WITH_AS(parseDuration("9223372036854775807s"),
                         "bad duration \"9223372036854775807s\": too large", std::invalid_argument);
    CHECK_THROWS_WITH_AS(parseDuration("5d"),
                         "bad duration \"5d\": expected a number followed by ms, s, m or h",
                         std::invalid_argument);
}

TEST_CASE("parseSize") {
    CHECK(parseSize("512") == 512);
    CHECK(parseSize("0") == 0);
    CHECK(parseSize("10B") == 10);
    CHECK(parseSize("64KiB") == 65536);
    CHECK(parseSize("64K") == 65536);
    CHECK(parseSize("64KB") == 64000);
    CHECK(parseSize("1MiB") == 1048576);
    CHECK(parseSize("2M") == 2097152);
    CHECK(parseSize("1MB") == 1000000);
    CHECK(parseSize("1GiB") == 1073741824);
    CHECK(parseSize("1G") == 1073741824);
    CHECK(parseSize("1GB") == 1000000000);

    for (std::string_view bad :
         {"", "KiB", "-1", "1.5KiB", "64kb", "64kib", "64 KiB", "64KiB ", "1TiB", "0x10"}) {
        CAPTURE(bad);
        CHECK_THROWS_AS(parseSize(bad), std::invalid_argument);
    }
    CHECK_THROWS_WITH_AS(parseSize("18446744073709551616"),
                         "bad size \"18446744073709551616\": too large", std::invalid_argument);
    CHECK_THROWS_WITH_AS(parseSize("17179869184GiB"), "bad size \"17179869184GiB\": too large",
                         std::invalid_argument);
}

TEST_CASE("parseAddress and Address::text") {
    Address v4 = parseAddress("1.2.3.4:5");
    CHECK(v4.kind == Address::Kind::tcp);
    CHECK(v4.host == "1.2.3.4");
    CHECK(v4.port == 5);

    Address v6 = parseAddress("[::1]:65535");
    CHECK(v6.host == "::1");
    CHECK(v6.port == 65535);

    Address name = parseAddress("localhost:8080");
    CHECK(name.host == "localhost");
    CHECK(name.port == 8080);

    Address local = parseAddress("unix:/run/x.sock");
    CHECK(local.kind == Address::Kind::unix);
    CHECK(local.path == "/run/x.sock");
    CHECK(local.host.empty());

    CHECK(parseAddress("unix:relative/x.sock").path == "relative/x.sock");
    CHECK(parseAddress("0.0.0.0:0").port == 0);
    CHECK(parseAddress("[fe80::1%eth0]:443").host == "fe80::1%eth0");
    CHECK(parseAddress("my-host.example_1.com:1").host == "my-host.example_1.com");

    for (std::string_view text :
         {"1.2.3.4:5", "[::1]:5", "[2001:db8::1]:443", "localhost:8080", "unix:/run/x.sock"}) {
        CAPTURE(text);
        CHECK(parseAddress(text).text() == text);
    }
    Address built;
    built.host = "::";
    built.port = 80;
    CHECK(built.text() == "[::]:80");

    for (std::string_view bad :
         {"",         "1.2.3.4",      "::1:80",       "[::1:80",      "[::1]80",
          "[::1]",    "[]:80",        "[1.2.3.4]:80", "[::1]:",       ":80",
          "host:",    "host:65536",   "host:-1",      "host:8o",      "host:000080",
          "host: 80", "1.2.3.256:80", "1.2.3:80",     "bad_host!:80", "-bad:80",
          "a..b:80",  "unix:",        "host:80:90"}) {
        CAPTURE(bad);
        CHECK_THROWS_AS(parseAddress(bad), std::invalid_argument);
    }
    CHECK_THROWS_WITH_AS(parseAddress("1.2.3.4"),
                         "bad address \"1.2.3.4\": missing port (expected host:port)",
                         std::invalid_argument);
    CHECK_THROWS_WITH_AS(parseAddress("[::1:80"),
                         "bad address \"[::1:80\": missing ']' after the IPv6 address",
                         std::invalid_argument);
    CHECK_THROWS_WITH_AS(parseAddress(":80"), "bad address \":80\": empty host",
                         std::invalid_argument);
    CHECK_THROWS_WITH_AS(parseAddress("host:65536"),
                         "bad address \"host:65536\": the port must be a number from 0 to 65535",
                         std::invalid_argument);
}

TEST_CASE("every file in conf/ loads") {
    std::size_t loaded = 0;
    for (const auto &entry : std::filesystem::directory_iterator(SLUICE_SOURCE_ROOT "/conf")) {
        if (entry.path().extension() != ".toml") {
            continue;
        }
        CAPTURE(entry.path().string());
        Config config;
        CHECK_NOTHROW(config = sluice::loadConfig(entry.path().string()));
        CHECK(!config.listeners.empty());
        ++loaded;
    }
    // Both the reference file and the minimal one must be there.
    CHECK(loaded >= 2);
}

TEST_CASE("TLS feature keys: SNI, ALPN, sessions, OCSP, client certificates") {
    Config config = parseConfig(R"([tls]
signature_algorithms = "ECDSA+SHA256"
session_tickets = 3
ticket_keys = "keys/tickets.keys"
ticket_key_rotation = "30m"
session_cache = 500
session_lifetime = "2h"
ocsp_refresh = "10m"

[[listener]]
listen = "127.0.0.1:0"
backend = "127.0.0.1:80"
certificates_dir = "certs.d"
strict_sni = true
alpn = ["h2", "http/1.1"]
alpn_mismatch = "fail"
session_tickets = 0
client_auth = { mode = "required", ca = "ca.pem", crl = ["a.crl", "/b.crl"], verify_depth = 2, allow_cn = ["c*"], allow_dns = ["*.x.test"], allow_uri = ["spiffe://x/*"], allow_spki_sha256 = ["AB:CD:ef0123456789abcdef0123456789abcdef0123456789abcdef0123456789"] }
  [[listener.certificate]]
  cert = "a.crt"
  ocsp = "a.ocsp"
  [[listener.certificate]]
  cert = "b.crt"
  client_auth = { mode = "optional", ca = "b-clients.pem", allow_uri = ["spiffe://b/*"] }
)",
                                "/srv/s.toml");
    CHECK(config.tls.signatureAlgorithms == "ECDSA+SHA256");
    CHECK(config.tls.sessionTickets == 3);
    CHECK(config.tls.ticketKeys == "/srv/keys/tickets.keys");
    CHECK(config.tls.ticketKeyRotation == 30min);
    CHECK(config.tls.sessionCache == 500);
    CHECK(config.tls.sessionLifetime == 2h);
    const sluice::ListenerConfig &l = config.listeners.at(0);
    CHECK(l.tls.sessionTickets == 0);                    // overridden
    CHECK(l.tls.ticketKeys == "/srv/keys/tickets.keys"); // inherited
    CHECK(l.certificatesDir == "/srv/certs.d");
    CHECK(l.strictSni);
    CHECK(l.alpn == std::vector<std::string>{"h2", "http/1.1"});
    CHECK(l.alpnMismatch == sluice::AlpnMismatch::fail);
    CHECK(l.certificates.at(0).ocsp == "/srv/a.ocsp");
    CHECK_FALSE(l.certificates.at(0).ocspFetch);
    CHECK(config.tls.ocspRefresh == 10min);
    CHECK(l.tls.ocspRefresh == 10min); // inherited
    CHECK(l.certificates.at(0).clientAuth == nullptr);
    REQUIRE(l.certificates.at(1).clientAuth != nullptr);
    CHECK(l.certificates.at(1).clientAuth->mode == sluice::ClientAuthMode::optional);
    CHECK(l.certificates.at(1).clientAuth->ca == "/srv/b-clients.pem");
    CHECK(l.certificates.at(1).clientAuth->allowUri == std::vector<std::string>{"spiffe://b/*"});
    CHECK(l.clientAuth.mode == sluice::ClientAuthMode::required);
    CHECK(l.clientAuth.ca == "/srv/ca.pem");
    CHECK(l.clientAuth.crl == std::vector<std::string>{"/srv/a.crl", "/b.crl"});
    CHECK(l.clientAuth.verifyDepth == 2);
    CHECK(l.clientAuth.allowCn == std::vector<std::string>{"c*"});
    CHECK(l.clientAuth.allowSpkiSha256 ==
          std::vector<std::string>{
              "abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789"});

    // certificates_dir alone is enough; the defaults when nothing is named.
    Config dirOnly = parseConfig(
        "[[listener]]\nlisten = \"a:1\"\nbackend = \"b:2\"\ncertificates_dir = \"d\"\n", "t.toml");
    CHECK(dirOnly.listeners.at(0).certificates.empty());
    CHECK(dirOnly.listeners.at(0).alpn.empty());
    CHECK(dirOnly.listeners.at(0).clientAuth.mode == sluice::ClientAuthMode::none);
    CHECK(dirOnly.tls.sessionTickets == 1);
    CHECK(dirOnly.tls.sessionCache == 20000);
    CHECK(dirOnly.tls.ocspRefresh == 1h);
}

TEST_CASE("TLS feature keys: bad values are named") {
    const std::string head = "[[listener]]\nlisten = \"a:1\"\nbackend = \"b:2\"\n"
                             "certificate = { cert = \"c\" }\n";
    CHECK(errorOf(head + "alpn_mismatch = \"drop\"\n") ==
          "t.toml:5:17: listener[0].alpn_mismatch: expected \"proceed\" or \"fail\", got \"drop\"");
    CHECK(errorOf(head + "strict_sni = \"yes\"\n") ==
          "t.toml:5:14: listener[0].strict_sni: expected a boolean (true or false), got a string");
    CHECK(errorOf(head + "client_auth = { mode = \"required\" }\n") ==
          "t.toml:5:15: listener[0].client_auth.ca: required key is missing (mode is not "
          "\"none\")");
    CHECK(errorOf(head + "client_auth = { mode = \"maybe\" }\n") ==
          "t.toml:5:24: listener[0].client_auth.mode: expected \"none\", \"optional\" or "
          "\"required\", got \"maybe\"");
    CHECK(errorOf(head + "client_auth = { allow_spki_sha256 = [\"abc\"] }\n") ==
          "t.toml:5:38: listener[0].client_auth.allow_spki_sha256[0]: expected a SHA-256 digest "
          "as 64 hex digits (colons allowed), got \"abc\"");
    CHECK(errorOf(head + "client_auth = { alow_cn = [] }\n") ==
          "t.toml:5:17: listener[0].client_auth.alow_cn: unknown key 'alow_cn' (did you mean "
          "'allow_cn'?)");
    CHECK(errorOf("[tls]\nsession_tickets = 17\n" + head) ==
          "t.toml:2:19: tls.session_tickets: must be between 0 and 16, got 17");
    CHECK(errorOf("[tls]\nsession_lifetime = \"8d\"\n" + head) ==
          "t.toml:2:20: tls.session_lifetime: bad duration \"8d\": expected a number followed "
          "by ms, s, m or h");
    CHECK(errorOf("[tls]\nsession_lifetime = \"169h\"\n" + head) ==
          "t.toml:2:20: tls.session_lifetime: must be between 1s and 7 days (\"168h\")");
    CHECK(errorOf("[tls]\nticket_key_rotation = \"0s\"\n" + head) ==
          "t.toml:2:23: tls.ticket_key_rotation: must be at least 1s");
    const std::string autoOcsp = "[[listener]]\nlisten = \"a:1\"\nbackend = \"b:2\"\n"
                                 "certificate = { cert = \"c\", ocsp = \"auto\" }\n";
#if SLUICE_HAVE_LIBCURL
    const Config fetched = parseConfig(autoOcsp, "/srv/t.toml");
    CHECK(fetched.listeners.at(0).certificates.at(0).ocspFetch);
    CHECK(fetched.listeners.at(0).certificates.at(0).ocsp.empty());
#else
    CHECK(errorOf(autoOcsp) ==
          "t.toml:4:36: listener[0].certificate.ocsp: \"auto\" needs sluice built with libcurl "
          "(libcurl4-openssl-dev), which this build is not; name a DER file instead");
#endif
    CHECK(errorOf("[tls]\nocsp_refresh = \"0s\"\n" + head) ==
          "t.toml:2:16: tls.ocsp_refresh: must be at least 1s");
    CHECK(errorOf("[[listener]]\nlisten = \"a:1\"\nbackend = \"b:2\"\n"
                  "certificate = { cert = \"c\", client_auth = { mode = \"required\" } }\n") ==
          "t.toml:4:43: listener[0].certificate.client_auth.ca: required key is missing (mode is "
          "not \"none\")");
}

TEST_CASE("[backend.NAME]: defaults, every key, and file order") {
    const Config config = parseConfig(R"([backend.zeta]
servers = ["127.0.0.1:8080", "[::1]:8081", "unix:run/app.sock", "app.internal:443"]
balance = "least-connections"
connect_timeout = "2s"
connect_after = "hello"
attempts = 2
max_fails = 0
fail_timeout = "30s"
resolve_interval = "1m"
proxy_protocol = "v2"
proxy_client_cert_max = "16KiB"
socket = { no_delay = false, keep_alive = "0s", send_buffer = "1MiB", receive_buffer = 4096 }
  [backend.zeta.tls]
  ca = "internal-ca.pem"
  verify = false
  server_name = "app.internal"
  alpn = ["h2", "http/1.1"]
  cert = "client.crt"
  key = "/keys/client.key"
  min_version = "1.3"
  max_version = "1.3"

[backend.alpha]
servers = "127.0.0.1:9000"

[backend.tls-defaults]
servers = "10.0.0.1:443"
tls = {}

[[listener]]
listen = "127.0.0.1:0"
certificate = { cert = "a.crt" }
backend = "zeta"
)",
                                      "/srv/s.toml");
    // File order, not the alphabetical order toml++ keeps keys in.
    REQUIRE(config.backends.size() == 3);
    CHECK(config.backends[0].name == "zeta");
    CHECK(config.backends[1].name == "alpha");
    CHECK(config.backends[2].name == "tls-defaults");
    CHECK(config.listeners.at(0).backend == "zeta");
    CHECK(config.findBackend("zeta") == &config.backends[0]);
    CHECK(config.findBackend("nope") == nullptr);

    const sluice::BackendConfig &zeta = config.backends[0];
    REQUIRE(zeta.servers.size() == 4);
    CHECK(zeta.servers[0].text() == "127.0.0.1:8080");
    CHECK(zeta.servers[1].text() == "[::1]:8081");
    CHECK(zeta.servers[2].kind == Address::Kind::unix);
    CHECK(zeta.servers[2].path == "/srv/run/app.sock");
    CHECK(zeta.servers[3].host == "app.internal");
    CHECK(zeta.balance == sluice::Balance::leastConnections);
    CHECK(zeta.connectTimeout == 2s);
    CHECK(zeta.connectAfter == sluice::ConnectAfter::hello);
    CHECK(zeta.attempts == 2);
    CHECK(zeta.maxFails == 0);
    CHECK(zeta.failTimeout == 30s);
    CHECK(zeta.resolveInterval == 1min);
    CHECK(zeta.proxyProtocol == sluice::ProxyProtocol::v2);
    CHECK(zeta.proxyClientCertMax == 16384);
    CHECK_FALSE(zeta.socket.noDelay);
    CHECK(zeta.socket.keepAlive == 0s);
    CHECK(zeta.socket.sendBuffer == 1048576);
    CHECK(zeta.socket.receiveBuffer == 4096);
    CHECK(zeta.tls.enabled);
    CHECK(zeta.tls.ca == "/srv/internal-ca.pem");
    CHECK_FALSE(zeta.tls.verify);
    CHECK(zeta.tls.serverName == "app.internal");
    CHECK(zeta.tls.alpn == std::vector<std::string>{"h2", "http/1.1"});
    CHECK(zeta.tls.cert == "/srv/client.crt");
    CHECK(zeta.tls.key == "/keys/client.key");
    CHECK(zeta.tls.minVersion == "1.3");
    CHECK(zeta.tls.maxVersion == "1.3");

    // Defaults: every optional key left out.
    const sluice::BackendConfig &alpha = config.backends[1];
    REQUIRE(alpha.servers.size() == 1);
    CHECK(alpha.servers[0].text() == "127.0.0.1:9000");
    CHECK(alpha.balance == sluice::Balance::roundRobin);
    CHECK(alpha.connectTimeout == 0s);
    CHECK(alpha.connectAfter == sluice::ConnectAfter::handshake);
    CHECK(alpha.attempts == 0);
    CHECK(alpha.maxFails == 3);
    CHECK(alpha.failTimeout == 10s);
    CHECK(alpha.resolveInterval == 0s);
    CHECK(alpha.proxyProtocol == sluice::ProxyProtocol::off);
    CHECK(alpha.proxyClientCertMax == 0);
    CHECK_FALSE(alpha.tls.enabled);
    CHECK(alpha.socket.noDelay);
    CHECK(alpha.socket.keepAlive == 60s);
    CHECK(alpha.socket.sendBuffer == 0);
    CHECK(alpha.socket.receiveBuffer == 0);

    // An empty tls table turns TLS on with its defaults.
    const sluice::BackendTls &tls = config.backends[2].tls;
    CHECK(tls.enabled);
    CHECK(tls.ca.empty());
    CHECK(tls.verify);
    CHECK(tls.serverName.empty());
    CHECK(tls.alpn.empty());
    CHECK(tls.cert.empty());
    CHECK(tls.key.empty());
    CHECK(tls.minVersion == "1.2");
    CHECK(tls.maxVersion == "1.3");
}

TEST_CASE("[backend.NAME]: each accepted value of balance, proxy_protocol and the tls keys") {
    auto backend = [](const std::string &keys) {
        return parseConfig("[backend.b]\nservers = \"127.0.0.1:1\"\n" + keys +
                               "[[listener]]\nlisten = \"a:1\"\ncertificate = { cert = \"c\" }\n"
                               "backend = \"b\"\n",
                           "/srv/t.toml")
            .backends.at(0);
    };
    CHECK(backend("balance = \"round-robin\"\n").balance == sluice::Balance::roundRobin);
    CHECK(backend("balance = \"least-connections\"\n").balance ==
          sluice::Balance::leastConnections);
    CHECK(backend("balance = \"first\"\n").balance == sluice::Balance::first);
    CHECK(backend("connect_after = \"handshake\"\n").connectAfter ==
          sluice::ConnectAfter::handshake);
    CHECK(backend("connect_after = \"hello\"\n").connectAfter == sluice::ConnectAfter::hello);
    CHECK(backend("proxy_protocol = \"off\"\n").proxyProtocol == sluice::ProxyProtocol::off);
    CHECK(backend("proxy_protocol = \"v1\"\n").proxyProtocol == sluice::ProxyProtocol::v1);
    CHECK(backend("proxy_protocol = \"v2\"\n").proxyProtocol == sluice::ProxyProtocol::v2);
    CHECK(backend("proxy_protocol = \"v2\"\nproxy_client_cert_max = 65000\n").proxyClientCertMax ==
          65000);
    CHECK(backend("proxy_protocol = \"v2\"\nproxy_client_cert_max = 0\n").proxyClientCertMax == 0);
    CHECK(backend("attempts = 1000\nmax_fails = 1000\n").attempts == 1000);
    CHECK(backend("fail_timeout = 0\nresolve_interval = \"1s\"\n").resolveInterval == 1s);
    CHECK(backend("tls = { alpn = \"h2\" }\n").tls.alpn == std::vector<std::string>{"h2"});
    CHECK(backend("tls = { alpn = [] }\n").tls.alpn.empty());
    CHECK(backend("tls = { verify = true, min_version = \"1.2\", max_version = \"1.2\" }\n")
              .tls.maxVersion == "1.2");
    CHECK(backend("tls = { alpn = \"" + std::string(255, 'p') + "\" }\n").tls.alpn.at(0).size() ==
          255);
}

TEST_CASE("[backend.NAME]: bad values are named") {
    // The backend's keys start on line 2; its table header is line 1.
    const std::string tail =
        "[[listener]]\nlisten = \"a:1\"\ncertificate = { cert = \"c\" }\nbackend = \"b\"\n";
    auto error = [&](const std::string &keys) { return errorOf("[backend.b]\n" + keys + tail); };
    const std::string servers = "servers = \"127.0.0.1:1\"\n";

    CHECK(error("") == "t.toml:1:1: backend.b.servers: required key is missing");
    CHECK(error("servers = []\n") ==
          "t.toml:2:11: backend.b.servers: must name at least one server");
    CHECK(error("servers = 1\n") ==
          "t.toml:2:11: backend.b.servers: expected a string or an array of strings, got an "
          "integer");
    CHECK(error("servers = [\"127.0.0.1:1\", \"127.0.0.1:0\"]\n") ==
          "t.toml:2:27: backend.b.servers[1]: bad address \"127.0.0.1:0\": a backend needs a port "
          "from 1 to 65535");
    CHECK(error("servers = [\"127.0.0.1:1\", \"::1:80\"]\n") ==
          "t.toml:2:27: backend.b.servers[1]: bad address \"::1:80\": an IPv6 address needs "
          "brackets, as in [::1]:443");
    CHECK(
        error("servers = [\"127.0.0.1:1\", \"127.0.0.1:1\"]\n") ==
        "t.toml:2:27: backend.b.servers[1]: \"127.0.0.1:1\" is listed twice (backend.b.servers[0] "
        "is the same)");
    CHECK(error("server = \"127.0.0.1:1\"\n") ==
          "t.toml:2:1: backend.b.server: unknown key 'server' (did you mean 'servers'?)");
    CHECK(error(servers + "balance = \"random\"\n") ==
          "t.toml:3:11: backend.b.balance: expected \"round-robin\", \"least-connections\" or "
          "\"first\", got \"random\"");
    CHECK(error(servers + "connect_timeout = \"3 s\"\n") ==
          "t.toml:3:19: backend.b.connect_timeout: bad duration \"3 s\": expected a number "
          "followed by ms, s, m or h");
    CHECK(error(servers + "connect_after = \"accept\"\n") ==
          "t.toml:3:17: backend.b.connect_after: expected \"handshake\" or \"hello\", got "
          "\"accept\"");
    CHECK(error(servers + "attempts = 1001\n") ==
          "t.toml:3:12: backend.b.attempts: must be between 0 and 1000, got 1001");
    CHECK(error(servers + "max_fails = -1\n") ==
          "t.toml:3:13: backend.b.max_fails: must be between 0 and 1000, got -1");
    CHECK(error(servers + "fail_timeout = true\n") ==
          "t.toml:3:16: backend.b.fail_timeout: expected a duration such as \"10s\" or an integer "
          "of seconds, got a boolean");
    CHECK(error(servers + "resolve_interval = \"500ms\"\n") ==
          "t.toml:3:20: backend.b.resolve_interval: must be 0 (at start and reload only) or at "
          "least 1s");
    CHECK(error(servers + "proxy_protocol = \"v3\"\n") ==
          "t.toml:3:18: backend.b.proxy_protocol: expected \"off\", \"v1\" or \"v2\", got \"v3\"");
    CHECK(error(servers + "proxy_protocol = \"v1\"\nproxy_client_cert_max = 100\n") ==
          "t.toml:4:25: backend.b.proxy_client_cert_max: only used with proxy_protocol = \"v2\" "
          "(the certificate travels in a v2 TLV)");
    CHECK(error(servers + "proxy_client_cert_max = 0\n") ==
          "t.toml:3:25: backend.b.proxy_client_cert_max: only used with proxy_protocol = \"v2\" "
          "(the certificate travels in a v2 TLV)");
    CHECK(error(servers + "proxy_protocol = \"v2\"\nproxy_client_cert_max = \"64KiB\"\n") ==
          "t.toml:4:25: backend.b.proxy_client_cert_max: must be between 0 and 65000 bytes, got "
          "\"64KiB\" (65536 bytes)");
    CHECK(error(servers + "tls = true\n") ==
          "t.toml:3:7: backend.b.tls: expected a table, got a boolean");
    CHECK(error(servers + "tls = { sni = \"x\" }\n") ==
          "t.toml:3:9: backend.b.tls.sni: unknown key 'sni'");
    CHECK(error(servers + "tls = { servername = \"x\" }\n") ==
          "t.toml:3:9: backend.b.tls.servername: unknown key 'servername' (did you mean "
          "'server_name'?)");
    CHECK(error(servers + "tls = { verify = \"no\" }\n") ==
          "t.toml:3:18: backend.b.tls.verify: expected a boolean (true or false), got a string");
    CHECK(error(servers + "tls = { server_name = \"\" }\n") ==
          "t.toml:3:23: backend.b.tls.server_name: must not be empty");
    CHECK(error(servers + "tls = { cert = \"c.crt\" }\n") ==
          "t.toml:3:7: backend.b.tls.key: required key is missing (cert is set)");
    CHECK(error(servers + "tls = { key = \"c.key\" }\n") ==
          "t.toml:3:7: backend.b.tls.cert: required key is missing (key is set)");
    CHECK(error(servers + "tls = { alpn = [\"h2\", \"" + std::string(256, 'p') + "\"] }\n") ==
          "t.toml:3:23: backend.b.tls.alpn[1]: an ALPN protocol name is at most 255 bytes");
    CHECK(error(servers + "tls = { alpn = [\"\"] }\n") ==
          "t.toml:3:17: backend.b.tls.alpn[0]: must not be empty");
    CHECK(error(servers + "tls = { min_version = \"1.1\" }\n") ==
          "t.toml:3:23: backend.b.tls.min_version: expected \"1.2\" or \"1.3\", got \"1.1\"");
    CHECK(error(servers + "tls = { min_version = \"1.3\", max_version = \"1.2\" }\n") ==
          "t.toml:3:23: backend.b.tls.min_version: min_version \"1.3\" is greater than "
          "max_version \"1.2\"");
    CHECK(error(servers + "tls = { max_version = \"1.2\", min_version = \"1.3\" }\n") ==
          "t.toml:3:44: backend.b.tls.min_version: min_version \"1.3\" is greater than "
          "max_version \"1.2\"");
    CHECK(error(servers + "[backend.b.tls]\nmin_version = \"1.3\"\nmax_version = \"1.2\"\n") ==
          "t.toml:4:15: backend.b.tls.min_version: min_version \"1.3\" is greater than "
          "max_version \"1.2\"");

    // Names and the [backend] table itself.
    CHECK(errorOf("[backend.\"a b\"]\nservers = \"127.0.0.1:1\"\n" + tail) ==
          "t.toml:1:10: backend.a b: bad backend name \"a b\": use only letters, digits, '-', '_' "
          "and '.'");
    CHECK(errorOf("[backend.\"\"]\nservers = \"127.0.0.1:1\"\n" + tail) ==
          "t.toml:1:10: backend.: a backend name must not be empty");
    CHECK(errorOf("backend = \"127.0.0.1:1\"\n" + tail) ==
          "t.toml:1:11: backend: expected a table, got a string");
    CHECK(errorOf("[backend]\nb = \"127.0.0.1:1\"\n" + tail) ==
          "t.toml:2:5: backend.b: expected a table, got a string");
    CHECK(errorOf("[backends.b]\nservers = \"127.0.0.1:1\"\n" + tail) ==
          "t.toml:1:2: backends: unknown key 'backends' (did you mean 'backend'?)");
    // Every character a name may hold.
    CHECK(parseConfig("[backend.\"A-z_0.9\"]\nservers = \"127.0.0.1:1\"\n[[listener]]\nlisten = "
                      "\"a:1\"\ncertificate = { cert = \"c\" }\nbackend = \"A-z_0.9\"\n",
                      "t.toml")
              .listeners.at(0)
              .backend == "A-z_0.9");
}

TEST_CASE("a backend written as an address becomes a backend of its own, shared by its users") {
    const Config config = parseConfig(R"([backend.unused]
servers = "10.0.0.1:80"

[[listener]]
name = "a"
listen = "127.0.0.1:1"
certificate = { cert = "c" }
backend = "unix:run/app.sock"
alpn = ["h2"]
  [[listener.route]]
  alpn = "h2"
  backend = "[::1]:8080"

[[listener]]
name = "b"
listen = "127.0.0.1:2"
certificate = { cert = "c" }
backend = "unix:/srv/./run/app.sock"
  [[listener.route]]
  sni = "x.test"
  backend = "[::1]:8080"

[[listener]]
name = "c"
listen = "127.0.0.1:3"
certificate = { cert = "c" }
backend = "127.0.0.1:8080"
)",
                                      "/srv/t.toml");
    // The named one is kept though nothing uses it; then each address once, in first-use order.
    REQUIRE(config.backends.size() == 4);
    CHECK(config.backends[0].name == "unused");
    CHECK(config.backends[1].name == "unix:/srv/run/app.sock");
    CHECK(config.backends[2].name == "[::1]:8080");
    CHECK(config.backends[3].name == "127.0.0.1:8080");
    for (const sluice::BackendConfig &backend : config.backends) {
        CAPTURE(backend.name);
        REQUIRE(backend.servers.size() == 1);
        if (backend.name != "unused") {
            CHECK(backend.servers[0].text() == backend.name);
            // An implicit backend has every default.
            CHECK(backend.balance == sluice::Balance::roundRobin);
            CHECK(backend.maxFails == 3);
            CHECK(backend.proxyProtocol == sluice::ProxyProtocol::off);
            CHECK_FALSE(backend.tls.enabled);
        }
    }
    CHECK(config.listeners[0].backend == "unix:/srv/run/app.sock");
    CHECK(config.listeners[1].backend == "unix:/srv/run/app.sock");
    CHECK(config.listeners[0].routes.at(0).backend == "[::1]:8080");
    CHECK(config.listeners[1].routes.at(0).backend == "[::1]:8080");
    CHECK(config.listeners[2].backend == "127.0.0.1:8080");
}

TEST_CASE("a backend name that is not defined is an error, with a suggestion when one is close") {
    const std::string app = "[backend.app]\nservers = \"127.0.0.1:1\"\n";
    const std::string head = "[[listener]]\nlisten = \"a:1\"\ncertificate = { cert = \"c\" }\n";
    CHECK(errorOf(app + head + "backend = \"ap\"\n") ==
          "t.toml:6:11: listener[0].backend: no backend named \"ap\" (did you mean \"app\"?)");
    CHECK(errorOf(app + head + "backend = \"App\"\n") ==
          "t.toml:6:11: listener[0].backend: no backend named \"App\" (did you mean \"app\"?)");
    CHECK(errorOf(app + head + "backend = \"web\"\n") ==
          "t.toml:6:11: listener[0].backend: no backend named \"web\"; define [backend.web] or "
          "write an address: \"host:port\", \"[ipv6]:port\" or \"unix:/path\"");
    // A host without a port reads as a name.
    CHECK(errorOf(head + "backend = \"127.0.0.1\"\n") ==
          "t.toml:4:11: listener[0].backend: no backend named \"127.0.0.1\"; define "
          "[backend.\"127.0.0.1\"] or write an address: \"host:port\", \"[ipv6]:port\" or "
          "\"unix:/path\"");
    CHECK(errorOf(head + "backend = \"\"\n") ==
          "t.toml:4:11: listener[0].backend: must not be empty");
    CHECK(errorOf(head + "backend = [\"127.0.0.1:1\"]\n") ==
          "t.toml:4:11: listener[0].backend: expected a string, got an array");
    // Addresses made into backends are never suggested.
    CHECK(errorOf(head + "backend = \"a:1\"\n[[listener]]\nlisten = \"a:2\"\n"
                         "certificate = { cert = \"c\" }\nbackend = \"a\"\n") ==
          "t.toml:8:11: listener[1].backend: no backend named \"a\"; define [backend.a] or write "
          "an address: \"host:port\", \"[ipv6]:port\" or \"unix:/path\"");
    // A route's backend follows the same rules, at its own key.
    CHECK(errorOf(app + head +
                  "backend = \"app\"\nalpn = \"h2\"\n[[listener.route]]\nsni = "
                  "\"a.test\"\nbackend = \"app\"\n[[listener.route]]\nalpn = "
                  "\"h2\"\nbackend = \"apps\"\n") ==
          "t.toml:13:11: listener[0].route[1].backend: no backend named \"apps\" (did you mean "
          "\"app\"?)");
    CHECK(errorOf(head + "backend = \"b:1\"\n[[listener.route]]\nsni = \"a.test\"\n"
                         "backend = \"127.0.0.1:0\"\n") ==
          "t.toml:7:11: listener[0].route[0].backend: bad address \"127.0.0.1:0\": a backend needs "
          "a port from 1 to 65535");
}

TEST_CASE("routes: sni, alpn, their order, and their errors") {
    const Config config = parseConfig(R"([backend.api]
servers = "127.0.0.1:81"

[[listener]]
listen = "127.0.0.1:0"
certificate = { cert = "c" }
backend = "127.0.0.1:80"
alpn = ["h2", "http/1.1"]
  [[listener.route]]
  sni = "API.Example.COM"
  alpn = "h2"
  backend = "api"
  [[listener.route]]
  sni = "*.example.com"
  backend = "127.0.0.1:82"
  [[listener.route]]
  alpn = "http/1.1"
  backend = "api"
  [[listener.route]]
  sni = "xn--bcher-kva.example_1.test"
  backend = "api"
)",
                                      "/srv/t.toml");
    const std::vector<sluice::Route> &routes = config.listeners.at(0).routes;
    REQUIRE(routes.size() == 4);
    CHECK(routes[0].sni == "api.example.com");
    CHECK(routes[0].alpn == "h2");
    CHECK(routes[0].backend == "api");
    CHECK(routes[1].sni == "*.example.com");
    CHECK(routes[1].alpn.empty());
    CHECK(routes[1].backend == "127.0.0.1:82");
    CHECK(routes[2].sni.empty());
    CHECK(routes[2].alpn == "http/1.1");
    CHECK(routes[3].sni == "xn--bcher-kva.example_1.test");
    CHECK(config.listeners.at(0).backend == "127.0.0.1:80");
    CHECK(config.findBackend("127.0.0.1:82") != nullptr);
    // Inline tables in an array are the same thing.
    CHECK(parseConfig("[[listener]]\nlisten = \"a:1\"\ncertificate = { cert = \"c\" }\n"
                      "backend = \"b:1\"\nroute = [{ sni = \"a.test\", backend = \"c:1\" }]\n",
                      "t.toml")
              .listeners.at(0)
              .routes.at(0)
              .backend == "c:1");

    const std::string head = "[[listener]]\nlisten = \"a:1\"\ncertificate = { cert = \"c\" }\n"
                             "backend = \"b:1\"\nalpn = \"h2\"\n[[listener.route]]\n";
    auto route = [&](const std::string &keys) { return errorOf(head + keys); };
    CHECK(route("backend = \"b:1\"\n") ==
          "t.toml:6:1: listener[0].route[0]: a route needs sni, alpn or both");
    CHECK(route("sni = \"a.test\"\n") ==
          "t.toml:6:1: listener[0].route[0].backend: required key is missing");
    CHECK(route("host = \"a.test\"\n") == "t.toml:7:1: listener[0].route[0].host: unknown key "
                                          "'host'");
    CHECK(route("sni = \"a.test\"\nbackends = \"b:1\"\n") ==
          "t.toml:8:1: listener[0].route[0].backends: unknown key 'backends' (did you mean "
          "'backend'?)");
    CHECK(route("alpn = \"h3\"\nbackend = \"b:1\"\n") ==
          "t.toml:7:8: listener[0].route[0].alpn: \"h3\" is not in listener[0].alpn, so no "
          "connection can negotiate it");
    CHECK(route("alpn = [\"h2\"]\nbackend = \"b:1\"\n") ==
          "t.toml:7:8: listener[0].route[0].alpn: expected a string, got an array");
    CHECK(route("sni = 1\nbackend = \"b:1\"\n") ==
          "t.toml:7:7: listener[0].route[0].sni: expected a string, got an integer");
    CHECK(errorOf("[[listener]]\nlisten = \"a:1\"\ncertificate = { cert = \"c\" }\n"
                  "backend = \"b:1\"\nroute = { sni = \"a.test\", backend = \"c:1\" }\n") ==
          "t.toml:5:9: listener[0].route: expected an array of tables ([[listener.route]]), got a "
          "table");
    CHECK(errorOf("[[listener]]\nlisten = \"a:1\"\ncertificate = { cert = \"c\" }\n"
                  "backend = \"b:1\"\n[[listener.route]]\nalpn = \"h2\"\nbackend = \"b:1\"\n") ==
          "t.toml:6:8: listener[0].route[0].alpn: \"h2\" is not in listener[0].alpn, so no "
          "connection can negotiate it");

    struct Bad {
        std::string sni;
        std::string problem;
    };
    const std::string label64(64, 'a');
    const std::string long254 = std::string(63, 'a') + "." + std::string(63, 'b') + "." +
                                std::string(63, 'c') + "." + std::string(62, 'd');
    for (const Bad &bad : {
             Bad{"a..test", "empty label"},
             Bad{".a.test", "empty label"},
             Bad{"a.test.", "empty label"},
             Bad{"*.", "empty label"},
             Bad{"*", "a wildcard needs a domain after it, as in \"*.example.com\""},
             Bad{"a.*.test", "'*' may only be the whole first label, as in \"*.example.com\""},
             Bad{"*.*.test", "'*' may only be the whole first label, as in \"*.example.com\""},
             Bad{"a*.test", "'*' may only be the whole first label, as in \"*.example.com\""},
             Bad{"**.test", "'*' may only be the whole first label, as in \"*.example.com\""},
             Bad{"a b.test", "only letters, digits, '-' and '_' may appear in a label"},
             Bad{"a:443", "only letters, digits, '-' and '_' may appear in a label"},
             Bad{label64 + ".test", "a label is longer than 63 bytes"},
             Bad{long254, "longer than 253 bytes"},
         }) {
        CAPTURE(bad.sni);
        CHECK(route("sni = \"" + bad.sni + "\"\nbackend = \"b:1\"\n") ==
              "t.toml:7:7: listener[0].route[0].sni: bad SNI name \"" + bad.sni +
                  "\": " + bad.problem);
    }
    CHECK(route("sni = \"" + long254.substr(1) + "\"\nbackend = \"b:1\"\n") == "(no error)");
}

TEST_CASE("accept_proxy_from: networks or addresses, checked where written") {
    const std::string head = std::string(minimal);
    CHECK(parseConfig(head + "accept_proxy_from = \"10.0.0.0/8\"\n", "t.toml")
              .listeners.at(0)
              .acceptProxyFrom == std::vector<std::string>{"10.0.0.0/8"});
    CHECK(parseConfig(head + "accept_proxy_from = [\"10.0.0.0/8\", \"192.0.2.7\", \"::1\", "
                             "\"2001:db8::/32\"]\n",
                      "t.toml")
              .listeners.at(0)
              .acceptProxyFrom ==
          std::vector<std::string>{"10.0.0.0/8", "192.0.2.7", "::1", "2001:db8::/32"});
    CHECK(parseConfig(head + "accept_proxy_from = []\n", "t.toml")
              .listeners.at(0)
              .acceptProxyFrom.empty());
    CHECK(errorOf(head + "accept_proxy_from = [\"10.0.0.0/8\", \"10.0.0.1/8\"]\n") ==
          "t.toml:5:36: listener[0].accept_proxy_from[1]: bad network \"10.0.0.1/8\": host bits "
          "set beyond the prefix (the network is 10.0.0.0/8)");
    CHECK(errorOf(head + "accept_proxy_from = \"lb.internal\"\n") ==
          "t.toml:5:21: listener[0].accept_proxy_from: bad network \"lb.internal\": "
          "\"lb.internal\" is not an IPv4 address");
    CHECK(errorOf(head + "accept_proxy_from = [\"\"]\n") ==
          "t.toml:5:22: listener[0].accept_proxy_from[0]: must not be empty");
    CHECK(errorOf(head + "accept_proxy_from = 10\n") ==
          "t.toml:5:21: listener[0].accept_proxy_from: expected a string or an array of strings, "
          "got an integer");
}

TEST_CASE("parseNetwork") {
    sluice::Network v4 = sluice::parseNetwork("10.0.0.0/8");
    CHECK(v4.family == AF_INET);
    CHECK(v4.prefix == 8);
    CHECK(v4.bytes[0] == 10);
    CHECK(v4.bytes[1] == 0);

    sluice::Network v6 = sluice::parseNetwork("2001:db8::/32");
    CHECK(v6.family == AF_INET6);
    CHECK(v6.prefix == 32);
    CHECK(v6.bytes[0] == 0x20);
    CHECK(v6.bytes[1] == 0x01);
    CHECK(v6.bytes[2] == 0x0d);
    CHECK(v6.bytes[3] == 0xb8);
    CHECK(v6.bytes[15] == 0);

    sluice::Network bare4 = sluice::parseNetwork("192.0.2.7");
    CHECK(bare4.family == AF_INET);
    CHECK(bare4.prefix == 32);
    CHECK(bare4.bytes[3] == 7);
    sluice::Network bare6 = sluice::parseNetwork("::1");
    CHECK(bare6.family == AF_INET6);
    CHECK(bare6.prefix == 128);
    CHECK(bare6.bytes[15] == 1);

    CHECK(sluice::parseNetwork("0.0.0.0/0").prefix == 0);
    CHECK(sluice::parseNetwork("::/0").prefix == 0);
    CHECK(sluice::parseNetwork("192.0.2.7/32").prefix == 32);
    CHECK(sluice::parseNetwork("192.0.2.6/31").prefix == 31);
    CHECK(sluice::parseNetwork("::1/128").prefix == 128);
    CHECK(sluice::parseNetwork("fe80::/10").prefix == 10);
    CHECK(sluice::parseNetwork("::ffff:10.0.0.0/104").family == AF_INET6);

    CHECK_THROWS_WITH_AS(
        sluice::parseNetwork("10.0.0.1/8"),
        "bad network \"10.0.0.1/8\": host bits set beyond the prefix (the network is 10.0.0.0/8)",
        std::invalid_argument);
    CHECK_THROWS_WITH_AS(sluice::parseNetwork("192.0.2.7/31"),
                         "bad network \"192.0.2.7/31\": host bits set beyond the prefix (the "
                         "network is 192.0.2.6/31)",
                         std::invalid_argument);
    CHECK_THROWS_WITH_AS(sluice::parseNetwork("2001:db8::1/64"),
                         "bad network \"2001:db8::1/64\": host bits set beyond the prefix (the "
                         "network is 2001:db8::/64)",
                         std::invalid_argument);
    CHECK_THROWS_WITH_AS(sluice::parseNetwork("fe80::/8"),
                         "bad network \"fe80::/8\": host bits set beyond the prefix (the network "
                         "is fe00::/8)",
                         std::invalid_argument);
    CHECK_THROWS_WITH_AS(sluice::parseNetwork("10.0.0.0/33"),
                         "bad network \"10.0.0.0/33\": the prefix must be a number from 0 to 32",
                         std::invalid_argument);
    CHECK_THROWS_WITH_AS(sluice::parseNetwork("::/129"),
                         "bad network \"::/129\": the prefix must be a number from 0 to 128",
                         std::invalid_argument);
    CHECK_THROWS_WITH_AS(sluice::parseNetwork("10.0.0/8"),
                         "bad network \"10.0.0/8\": \"10.0.0\" is not an IPv4 address",
                         std::invalid_argument);
    CHECK_THROWS_WITH_AS(sluice::parseNetwork("[::1]/128"),
                         "bad network \"[::1]/128\": \"[::1]\" is not an IPv6 address",
                         std::invalid_argument);
    CHECK_THROWS_WITH_AS(sluice::parseNetwork(""),
                         "bad network \"\": expected an IP address or ADDRESS/PREFIX",
                         std::invalid_argument);
    CHECK_THROWS_WITH_AS(sluice::parseNetwork("/8"),
                         "bad network \"/8\": expected an IP address or ADDRESS/PREFIX",
                         std::invalid_argument);
    for (std::string_view bad :
         {"10.0.0.0/", "10.0.0.0/-1", "10.0.0.0/+8", "10.0.0.0/08", "10.0.0.0/8x", "10.0.0.0/ 8",
          "10.0.0.0/8/8", "10.0.0.0/1000", "garbage", "10.0.0.0 /8", "fe80::1%eth0", "1.2.3.4:80",
          "10.0.0.256", "::1::2/128"}) {
        CAPTURE(bad);
        CHECK_THROWS_AS(sluice::parseNetwork(bad), std::invalid_argument);
    }
}

TEST_CASE("plaintext listeners take no TLS keys and no routes") {
    const Config config = parseConfig(R"([backend.secure]
servers = "10.0.0.1:443"
tls = { server_name = "app.internal" }

[[listener]]
listen = "127.0.0.1:0"
plaintext = true
backend = "secure"
accept_proxy_from = "127.0.0.1"
timeouts = { idle = "1m" }
)",
                                      "/srv/t.toml");
    const sluice::ListenerConfig &listener = config.listeners.at(0);
    CHECK(listener.plaintext);
    CHECK(listener.certificates.empty());
    CHECK(listener.certificatesDir.empty());
    CHECK(listener.backend == "secure");
    CHECK(listener.timeouts.idle == 1min);
    CHECK(parseConfig(std::string(minimal) + "plaintext = false\n", "t.toml")
              .listeners.at(0)
              .plaintext == false);

    const std::string head =
        "[[listener]]\nlisten = \"a:1\"\nbackend = \"b:1\"\nplaintext = true\n";
    for (std::string_view key :
         {"certificate = { cert = \"c\" }", "certificates_dir = \"d\"", "strict_sni = false",
          "alpn = \"h2\"", "alpn_mismatch = \"fail\"", "client_auth = { mode = \"none\" }",
          "min_version = \"1.3\"", "max_version = \"1.3\"", "ciphers = \"x\"",
          "ciphersuites = \"x\"", "groups = \"x\"", "signature_algorithms = \"x\"",
          "session_tickets = 0", "ticket_keys = \"k\"", "ticket_key_rotation = \"1h\"",
          "session_cache = 0", "session_lifetime = \"1h\"", "ocsp_refresh = \"1h\""}) {
        CAPTURE(key);
        const std::string name(key.substr(0, key.find(' ')));
        CHECK(errorOf(head + std::string(key) + "\n") ==
              "t.toml:5:1: listener[0]." + name +
                  ": not allowed on a plaintext listener (it does not terminate TLS)");
    }
    // The first one in the file is named, wherever `plaintext` is written.
    CHECK(errorOf("[[listener]]\nlisten = \"a:1\"\nbackend = \"b:1\"\ngroups = \"x\"\n"
                  "alpn = \"h2\"\nplaintext = true\n") ==
          "t.toml:4:1: listener[0].groups: not allowed on a plaintext listener (it does not "
          "terminate TLS)");
    CHECK(errorOf(head + "[[listener.route]]\nsni = \"a.test\"\nbackend = \"b:1\"\n") ==
          "t.toml:5:1: listener[0].route: a plaintext listener has no SNI or ALPN to route on");
    CHECK(errorOf(head + "route = []\n") ==
          "t.toml:5:9: listener[0].route: a plaintext listener has no SNI or ALPN to route on");
    CHECK(errorOf("[[listener]]\nlisten = \"a:1\"\nbackend = \"b:1\"\nplaintext = 1\n") ==
          "t.toml:4:13: listener[0].plaintext: expected a boolean (true or false), got an integer");
    // Without plaintext = true a certificate is still required.
    CHECK(errorOf("[[listener]]\nlisten = \"a:1\"\nbackend = \"b:1\"\nplaintext = false\n") ==
          "t.toml:1:1: listener[0].certificate: required key is missing");
}

TEST_CASE("socket options on listeners and backends") {
    const Config config =
        parseConfig(std::string(minimal) + "socket = { no_delay = false, keep_alive = \"2h\", "
                                           "send_buffer = \"64MiB\", receive_buffer = \"4KiB\" }\n",
                    "t.toml");
    const sluice::SocketOptions &socket = config.listeners.at(0).socket;
    CHECK_FALSE(socket.noDelay);
    CHECK(socket.keepAlive == 2h);
    CHECK(socket.sendBuffer == 64 * 1024 * 1024);
    CHECK(socket.receiveBuffer == 4096);
    auto keepAlive = [](const std::string &value) {
        return parseConfig(std::string(minimal) + "socket = { keep_alive = " + value + " }\n",
                           "t.toml")
            .listeners.at(0)
            .socket.keepAlive;
    };
    CHECK(keepAlive("\"0s\"") == 0s);
    CHECK(keepAlive("0") == 0s);
    CHECK(keepAlive("\"1s\"") == 1s);
    CHECK(keepAlive("\"32767s\"") == 32767s);
    CHECK(keepAlive("\"2000ms\"") == 2s);
    CHECK(
        parseConfig(std::string(minimal) + "socket = { send_buffer = 0, receive_buffer = \"0\" }\n",
                    "t.toml")
            .listeners.at(0)
            .socket.sendBuffer == 0);

    const std::string head = std::string(minimal) + "socket = { "; // values start at 5:12
    CHECK(errorOf(head + "nodelay = true }\n") ==
          "t.toml:5:12: listener[0].socket.nodelay: unknown key 'nodelay' (did you mean "
          "'no_delay'?)");
    CHECK(errorOf(head + "no_delay = 1 }\n") ==
          "t.toml:5:23: listener[0].socket.no_delay: expected a boolean (true or false), got an "
          "integer");
    CHECK(errorOf(head + "keep_alive = \"1500ms\" }\n") ==
          "t.toml:5:25: listener[0].socket.keep_alive: must be 0 (off) or whole seconds from 1s "
          "to 32767s");
    CHECK(errorOf(head + "keep_alive = \"500ms\" }\n") ==
          "t.toml:5:25: listener[0].socket.keep_alive: must be 0 (off) or whole seconds from 1s "
          "to 32767s");
    CHECK(errorOf(head + "keep_alive = \"32768s\" }\n") ==
          "t.toml:5:25: listener[0].socket.keep_alive: must be 0 (off) or whole seconds from 1s "
          "to 32767s");
    CHECK(errorOf(head + "send_buffer = 1024 }\n") ==
          "t.toml:5:26: listener[0].socket.send_buffer: must be 0 (the kernel's default) or "
          "between 4096 and 67108864 bytes, got 1024");
    CHECK(errorOf(head + "receive_buffer = \"65MiB\" }\n") ==
          "t.toml:5:29: listener[0].socket.receive_buffer: must be 0 (the kernel's default) or "
          "between 4096 and 67108864 bytes, got \"65MiB\" (68157440 bytes)");
    CHECK(errorOf(head + "receive_buffer = -1 }\n") ==
          "t.toml:5:29: listener[0].socket.receive_buffer: must be at least 0 bytes, got -1");
    CHECK(errorOf(std::string(minimal) + "socket = true\n") ==
          "t.toml:5:10: listener[0].socket: expected a table, got a boolean");
    CHECK(errorOf("[backend.b]\nservers = \"127.0.0.1:1\"\nsocket = { send_buffer = \"1KiB\" }\n"
                  "[[listener]]\nlisten = \"a:1\"\ncertificate = { cert = \"c\" }\n"
                  "backend = \"b\"\n") ==
          "t.toml:3:26: backend.b.socket.send_buffer: must be 0 (the kernel's default) or between "
          "4096 and 67108864 bytes, got \"1KiB\" (1024 bytes)");
}

TEST_CASE("routes, PROXY sources and socket options do not change a listener's TLS identity") {
    auto identity = [](const std::string &extra) {
        return parseConfig("[backend.b]\nservers = \"127.0.0.1:1\"\n[[listener]]\nname = \"l\"\n"
                           "listen = \"a:1\"\ncertificate = { cert = \"c\" }\nalpn = \"h2\"\n" +
                               extra,
                           "/srv/t.toml")
            .listeners.at(0)
            .tlsIdentity;
    };
    const std::string base = identity("backend = \"b:1\"\n");
    CHECK_FALSE(base.empty());
    CHECK(identity("backend = \"b\"\n") == base);
    CHECK(identity("backend = \"b:1\"\naccept_proxy_from = \"10.0.0.0/8\"\n") == base);
    CHECK(identity("backend = \"b:1\"\nsocket = { no_delay = false }\n") == base);
    CHECK(identity("backend = \"b:1\"\n[[listener.route]]\nalpn = \"h2\"\nbackend = \"b\"\n") ==
          base);
    CHECK(identity("backend = \"b:1\"\nstrict_sni = true\n") != base);
}

TEST_CASE("the reference file shows backends, routes, PROXY sources and a plaintext listener") {
    const Config config = sluice::loadConfig(SLUICE_SOURCE_ROOT "/conf/sluice.toml");
    REQUIRE(config.listeners.size() == 3);
    const sluice::ListenerConfig &web = config.listeners[0];
    CHECK(web.backend == "app");
    CHECK(web.routes.size() == 2);
    CHECK(web.acceptProxyFrom.size() == 3);
    CHECK(config.listeners[2].plaintext);
    CHECK(config.listeners[2].backend == "api");
    const sluice::BackendConfig *app = config.findBackend("app");
    REQUIRE(app != nullptr);
    CHECK(app->servers.size() == 2);
    CHECK(app->proxyProtocol == sluice::ProxyProtocol::v2);
    const sluice::BackendConfig *api = config.findBackend("api");
    REQUIRE(api != nullptr);
    CHECK(api->tls.enabled);
    CHECK_FALSE(api->tls.cert.empty());
    // The defaults the file writes out are the built-in ones.
    const sluice::SocketOptions defaults;
    for (const sluice::SocketOptions &socket : {web.socket, app->socket}) {
        CHECK(socket.noDelay == defaults.noDelay);
        CHECK(socket.keepAlive == defaults.keepAlive);
        CHECK(socket.sendBuffer == defaults.sendBuffer);
        CHECK(socket.receiveBuffer == defaults.receiveBuffer);
    }
    CHECK(app->maxFails == sluice::BackendConfig{}.maxFails);
    CHECK(app->failTimeout == sluice::BackendConfig{}.failTimeout);
}

TEST_CASE("a backend served by an in-process handler") {
    const Config config = parseConfig(R"([backend.echo]
handler = "echo"

[[listener]]
listen = "127.0.0.1:0"
plaintext = true
backend = "echo"
)",
                                      "/srv/t.toml");
    const sluice::BackendConfig *backend = config.findBackend("echo");
    REQUIRE(backend != nullptr);
    CHECK(backend->handler == "echo");
    CHECK(backend->servers.empty());
    CHECK(errorOf("[backend.echo]\nhandler = \"\"\n") ==
          "t.toml:2:11: backend.echo.handler: must not be empty");
    CHECK(errorOf("[backend.echo]\nhandler = \"echo\"\nservers = \"127.0.0.1:1\"\n") ==
          "t.toml:3:11: backend.echo.servers: a backend served by a handler has no servers");
    CHECK(errorOf("[backend.echo]\nhandler = \"echo\"\nproxy_protocol = \"v2\"\n") ==
          "t.toml:3:18: backend.echo.proxy_protocol: a backend served by a handler has no "
          "proxy_protocol");
}
