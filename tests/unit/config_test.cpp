// Unit tests for config/: defaults, every key, [tls] inheritance, path resolution, the exact text
// and position of each class of error, the value parsers, and the shipped files in conf/.
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>

#include <doctest/doctest.h>

#include <sluice/config.hpp>

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

/** A fresh folder under the system's temporary folder, removed when the test ends. */
class TempDir {
public:
    TempDir() {
        std::string pattern = (std::filesystem::temp_directory_path() / "sluice-config-XXXXXX");
        REQUIRE(mkdtemp(pattern.data()) != nullptr);
        path_ = pattern;
    }
    ~TempDir() {
        std::error_code ignored;
        std::filesystem::remove_all(path_, ignored);
    }
    TempDir(const TempDir &) = delete;
    TempDir &operator=(const TempDir &) = delete;

    const std::filesystem::path &path() const { return path_; }

    std::string write(const std::string &name, std::string_view text) const {
        std::filesystem::path file = path_ / name;
        std::filesystem::create_directories(file.parent_path());
        std::ofstream(file) << text;
        return file.string();
    }

private:
    std::filesystem::path path_;
};

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
    CHECK(config.global.drainTimeout == 30s);
    CHECK(config.global.logLevel == sluice::LogLevel::info);
    CHECK(config.global.buffers.tls == 32 * 1024);
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
    CHECK(listener.backend.text() == "127.0.0.1:8080");
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
drain_timeout = "1500ms"
log_level = "debug"
buffers = { tls = "4KiB", plaintext = 1000, backend = "2MB" }

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
    CHECK(config.global.drainTimeout == 1500ms);
    CHECK(config.global.logLevel == sluice::LogLevel::debug);
    CHECK(config.global.buffers.tls == 4096);
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
    CHECK(listener.backend.host == "::1");
    CHECK(listener.backend.port == 8080);
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
        CHECK(listener.backend.kind == Address::Kind::unix);
        CHECK(listener.backend.path == "/etc/sluice/run/app.sock");
        CHECK(listener.backend.text() == "unix:/etc/sluice/run/app.sock");
    }
    SUBCASE("relative config path is made absolute against the working folder") {
        Config config = parseConfig(text, "./conf/x.toml");
        std::filesystem::path cwd = std::filesystem::current_path();
        CHECK(config.path == "./conf/x.toml");
        CHECK(config.listeners.at(0).certificates.at(0).cert ==
              (cwd / "conf/certs/site.crt").string());
        CHECK(config.listeners.at(0).backend.path == (cwd / "conf/run/app.sock").string());
    }
    SUBCASE("loadConfig anchors on the file it read") {
        TempDir dir;
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
          "t.toml:5:1: listener[0].routes: unknown key 'routes'");
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
    CHECK(errorOf(global + "drain_timeout = -5\n") ==
          "t.toml:6:17: global.drain_timeout: must not be negative, got -5");
    CHECK(errorOf(global + "max_connections = 0\n") ==
          "t.toml:6:19: global.max_connections: must be at least 1, got 0");
    CHECK(errorOf(global + "max_handshakes_per_ip = -1\n") ==
          "t.toml:6:25: global.max_handshakes_per_ip: must be at least 0, got -1");
    CHECK(parseConfig(global + "max_handshakes_per_ip = 0\n", "t.toml").global.maxHandshakesPerIp ==
          0);
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

    TempDir dir;
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
    CHECK(dirOnly.tls.sessionTickets == 2);
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
