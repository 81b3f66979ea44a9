// sluice::Server through libsluice.so, as an embedding program uses it: only the public headers,
// a loop owned by the test, configurations built in code, real sockets on 127.0.0.1 port 0. A
// blocking OpenSSL client and a blocking echo backend run on threads; the loop runs on the test's
// thread. Every test ends by running the loop dry and closing it: nothing may be left open.

#include <algorithm>
#include <arpa/inet.h>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <functional>
#include <linux/sockios.h>
#include <memory>
#include <mutex>
#include <netinet/in.h>
#include <poll.h>
#include <random>
#include <span>
#include <string>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <thread>
#include <unistd.h>
#include <utility>
#include <vector>

#include <doctest/doctest.h>
#include <openssl/ssl.h>
#include <uv.h>

#include <sluice/server.hpp>

#include "descriptors.hpp"
#include "tls_client.hpp"
#include "tls_fixture.hpp"

namespace {

using namespace std::chrono_literals;
using sluice::test::DescriptorFiller;
using sluice::test::openDescriptors;

// --- Certificates on disk: a CA, leaf A ("server-a") and leaf B ("server-b") -------------------

struct Certificates {
    std::string dir;
    std::string ca, certA, keyA, certB, keyB;
};

/** Written once per test binary into a fresh folder under $TMPDIR (removed at exit). */
const Certificates &certificates() {
    static const Certificates instance = [] {
        Certificates c;
        const char *tmp = std::getenv("TMPDIR");
        std::string pattern = std::string(tmp != nullptr ? tmp : "/tmp") + "/sluice-server-XXXXXX";
        REQUIRE(::mkdtemp(pattern.data()) != nullptr);
        c.dir = pattern;
        const auto &pki = sluice::test::pki();
        auto leafKeyB = sluice::test::makeKey();
        auto leafA =
            sluice::test::makeCertificate(pki.leafKey.get(), "server-a", pki.caCert.get(),
                                          pki.caKey.get(), 10, false, "DNS:localhost,IP:127.0.0.1");
        auto leafB =
            sluice::test::makeCertificate(leafKeyB.get(), "server-b", pki.caCert.get(),
                                          pki.caKey.get(), 11, false, "DNS:localhost,IP:127.0.0.1");
        c.ca = c.dir + "/ca.crt";
        c.certA = c.dir + "/a.crt";
        c.keyA = c.dir + "/a.key";
        c.certB = c.dir + "/b.crt";
        c.keyB = c.dir + "/b.key";
        sluice::test::writePem(c.ca, pki.caCert.get(), nullptr);
        sluice::test::writePem(c.certA, leafA.get(), nullptr);
        sluice::test::writePem(c.keyA, nullptr, pki.leafKey.get());
        sluice::test::writePem(c.certB, leafB.get(), nullptr);
        sluice::test::writePem(c.keyB, nullptr, leafKeyB.get());
        static std::string removeAtExit;
        removeAtExit = c.dir;
        std::atexit([] {
            for (const char *name : {"ca.crt", "a.crt", "a.key", "b.crt", "b.key"}) {
                ::unlink((removeAtExit + "/" + name).c_str());
            }
            ::rmdir(removeAtExit.c_str());
        });
        return c;
    }();
    return instance;
}

// --- A blocking plain echo backend --------------------------------------------------------------

/** Echoes every connection until its EOF, then closes it; one thread per connection. */
class EchoBackend {
public:
    EchoBackend() {
        fd_ = sluice::test::listenLoopback(port_);
        acceptor_ = std::thread([this] {
            for (;;) {
                const int client = ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
                if (client < 0) {
                    return; // shutdown() in the destructor
                }
                std::lock_guard lock(mutex_);
                connections_.emplace_back([client] {
                    char buffer[16384];
                    for (;;) {
                        const ssize_t n = ::read(client, buffer, sizeof buffer);
                        if (n <= 0) {
                            break;
                        }
                        for (ssize_t done = 0; done < n;) {
                            const ssize_t w =
                                ::write(client, buffer + done, static_cast<std::size_t>(n - done));
                            if (w <= 0) {
                                ::close(client);
                                return;
                            }
                            done += w;
                        }
                    }
                    ::close(client);
                });
            }
        });
    }
    ~EchoBackend() {
        ::shutdown(fd_, SHUT_RDWR);
        acceptor_.join();
        ::close(fd_);
        std::lock_guard lock(mutex_);
        for (auto &thread : connections_) {
            thread.join();
        }
    }
    EchoBackend(const EchoBackend &) = delete;
    EchoBackend &operator=(const EchoBackend &) = delete;

    std::string address() const { return "127.0.0.1:" + std::to_string(port_); }

private:
    int fd_ = -1;
    int port_ = 0;
    std::thread acceptor_;
    std::mutex mutex_;
    std::vector<std::thread> connections_;
};

// --- A backend that answers with one burst ---------------------------------------------------

/**
 * Serves one connection: reads a 2-byte request, then writes `reply` in one go once the test
 * says go (with its loop still), and waits until the kernel has handed all of it to sluice's
 * socket, so sluice finds the whole reply waiting when its loop runs again. It keeps the
 * connection open until sluice closes it.
 */
class BurstBackend {
public:
    explicit BurstBackend(std::string reply)
        : reply_(std::move(reply)) {
        fd_ = sluice::test::listenLoopback(port_);
        thread_ = std::thread([this] { serve(); });
    }
    ~BurstBackend() {
        go.store(true);
        ::shutdown(fd_, SHUT_RDWR);
        thread_.join();
        ::close(fd_);
    }
    BurstBackend(const BurstBackend &) = delete;
    BurstBackend &operator=(const BurstBackend &) = delete;

    std::string address() const { return "127.0.0.1:" + std::to_string(port_); }

    std::atomic<bool> requested{false}; // the request arrived
    std::atomic<bool> go{false};        // set by the test: write the reply now
    std::atomic<bool> written{false};   // the reply sits in sluice's socket, all of it

private:
    void serve() {
        const int client = ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
        if (client < 0) {
            return;
        }
        char request[2];
        std::size_t got = 0;
        while (got < sizeof request) {
            const ssize_t n = ::read(client, request + got, sizeof request - got);
            if (n <= 0) {
                ::close(client);
                return;
            }
            got += static_cast<std::size_t>(n);
        }
        requested.store(true);
        for (int i = 0; i < 10000 && !go.load(); ++i) {
            std::this_thread::sleep_for(1ms);
        }
        if (::write(client, reply_.data(), reply_.size()) == static_cast<ssize_t>(reply_.size())) {
            // Loopback delivers within the write; nothing unacknowledged means it has landed.
            for (int i = 0; i < 10000; ++i) {
                int unacknowledged = 0;
                if (::ioctl(client, SIOCOUTQ, &unacknowledged) != 0 || unacknowledged == 0) {
                    break;
                }
                std::this_thread::sleep_for(1ms);
            }
        }
        written.store(true);
        char byte = 0;
        while (::read(client, &byte, 1) > 0) {
        }
        ::close(client);
    }

    std::string reply_;
    int fd_ = -1;
    int port_ = 0;
    std::thread thread_;
};

// --- A blocking OpenSSL client ------------------------------------------------------------------

int portOf(const std::string &address) {
    return std::stoi(address.substr(address.rfind(':') + 1));
}

/** The examples' blocking client, verifying "localhost" against the test CA. */
class TlsClient : public example::TlsClient {
public:
    explicit TlsClient(const std::string &hostPort)
        : example::TlsClient(hostPort, certificates().ca) {}
};

std::string randomBytes(std::size_t n) {
    std::mt19937 random(20240601);
    std::string out(n, '\0');
    for (auto &c : out) {
        c = static_cast<char>(random());
    }
    return out;
}

// --- The loop ---------------------------------------------------------------------------------

/** A loop owned by the test; the destructor runs it dry and checks that nothing is left. */
class Loop {
public:
    Loop() {
        std::signal(SIGPIPE, SIG_IGN); // an embedding program's duty: writes report EPIPE
        uv_loop_init(&loop_);
    }
    ~Loop() {
        uv_run(&loop_, UV_RUN_DEFAULT);
        CHECK(uv_loop_close(&loop_) == 0);
    }
    Loop(const Loop &) = delete;
    Loop &operator=(const Loop &) = delete;

    uv_loop_t *get() { return &loop_; }

    /**
     * Runs `work` on a thread and the loop on this one until `work` returns. The loop's other
     * handles may keep running afterwards; this call's own handle is closed before it returns.
     */
    void runWhile(const std::function<void()> &work) {
        struct Wake {
            uv_async_t async{};
            std::atomic<bool> done{false};
        };
        auto *wake = new Wake;
        uv_async_init(&loop_, &wake->async, [](uv_async_t *) {});
        std::thread thread([&work, wake] {
            work();
            wake->done.store(true);
            uv_async_send(&wake->async);
        });
        while (!wake->done.load()) {
            uv_run(&loop_, UV_RUN_ONCE);
        }
        thread.join();
        uv_close(reinterpret_cast<uv_handle_t *>(&wake->async),
                 [](uv_handle_t *handle) { delete reinterpret_cast<Wake *>(handle); });
        uv_run(&loop_, UV_RUN_NOWAIT);
    }

private:
    uv_loop_t loop_{};
};

sluice::Config configFor(const std::string &backend, const std::string &cert,
                         const std::string &key, const std::string &listen = "127.0.0.1:0") {
    sluice::Config config;
    config.global.logLevel = sluice::LogLevel::error;
    config.global.drainTimeout = 5s;
    sluice::ListenerConfig listener;
    listener.name = "test";
    listener.listen.push_back(sluice::parseAddress(listen));
    sluice::CertificateFiles files;
    files.cert = cert;
    files.key = key;
    listener.certificates.push_back(files);
    listener.backend = backend; // an address: Server makes it a backend of its own
    config.listeners.push_back(listener);
    return config;
}

std::uint64_t closedBy(const sluice::ServerStats &stats, const std::string &reason) {
    for (const auto &[name, count] : stats.closed) {
        if (name == reason) {
            return count;
        }
    }
    return 0;
}

} // namespace

/**
 * A client on its own thread that connects, echoes once and holds the connection open while
 * the test works the loop; finish() then tries one more echo and says whether it was cut.
 */
class HeldConnection {
public:
    HeldConnection(Loop &loop, const std::string &address)
        : thread_([this, address] {
            TlsClient client(address);
            connected_.store(client.ok() && client.echo("hold"));
            while (!release_.load()) {
                std::this_thread::sleep_for(1ms);
            }
            cut_ = !client.echo("after the end");
        }) {
        while (!connected_.load()) {
            uv_run(loop.get(), UV_RUN_NOWAIT);
            std::this_thread::sleep_for(1ms);
        }
    }
    HeldConnection(const HeldConnection &) = delete;
    HeldConnection &operator=(const HeldConnection &) = delete;
    ~HeldConnection() {
        if (thread_.joinable()) {
            release_.store(true);
            thread_.join();
        }
    }

    /** Lets the client try once more: true if the connection had been cut. */
    bool finishCut() {
        release_.store(true);
        thread_.join();
        return cut_;
    }

private:
    std::atomic<bool> connected_{false};
    std::atomic<bool> release_{false};
    bool cut_ = false;
    std::thread thread_;
};

TEST_CASE("a Server on the caller's loop terminates TLS and echoes bytes exactly") {
    const auto &certs = certificates();
    EchoBackend backend;
    Loop loop;
    sluice::Server server(loop.get(), configFor(backend.address(), certs.certA, certs.keyA));
    CHECK_FALSE(server.running());
    CHECK(server.addresses().empty());
    server.start();
    CHECK(server.running());
    const auto addresses = server.addresses();
    REQUIRE(addresses.size() == 1);
    CHECK(addresses[0].first == "test");
    CHECK(addresses[0].second.rfind("127.0.0.1:", 0) == 0);
    CHECK(portOf(addresses[0].second) > 0); // the kernel's port, not 0

    const auto before = server.stats();
    const std::string data = randomBytes(1024 * 1024 + 7);
    bool handshake = false, echoed = false, clean = false;
    std::string peer;
    loop.runWhile([&] {
        TlsClient client(addresses[0].second);
        handshake = client.ok();
        peer = client.peerName();
        echoed = handshake && client.echo(data);
        clean = echoed && client.closeCleanly();
    });
    CHECK(handshake);
    CHECK(peer == "server-a");
    CHECK(echoed);
    CHECK(clean);

    int calls = 0;
    bool forced = true;
    REQUIRE(server.drain([&](bool f) {
        ++calls;
        forced = f;
    }));
    CHECK(calls == 0); // never inside the call that started it
    CHECK_FALSE(server.running());
    CHECK(server.addresses().empty());
    uv_run(loop.get(), UV_RUN_DEFAULT);
    CHECK(calls == 1);
    CHECK_FALSE(forced);

    const auto after = server.stats();
    CHECK(after.accepted - before.accepted == 1);
    CHECK(after.handshakesOk - before.handshakesOk == 1);
    CHECK(after.bytesClientToBackend - before.bytesClientToBackend == data.size());
    CHECK(after.bytesBackendToClient - before.bytesBackendToClient == data.size());
    CHECK(closedBy(after, "done") - closedBy(before, "done") == 1);
}

TEST_CASE("each Server counts its own connections and reloads; a moved-from one reads zero") {
    const auto &certs = certificates();
    EchoBackend backend;
    Loop loop;
    sluice::Server a(loop.get(), configFor(backend.address(), certs.certA, certs.keyA));
    sluice::Server b(loop.get(), configFor(backend.address(), certs.certA, certs.keyA));
    a.start();
    b.start();
    const std::string toA = a.addresses().at(0).second;
    int served = 0;
    loop.runWhile([&] {
        for (int i = 0; i < 3; ++i) {
            TlsClient client(toA);
            served += client.ok() && client.echo("to a") && client.closeCleanly() ? 1 : 0;
        }
    });
    CHECK(served == 3);
    std::string error;
    REQUIRE(b.reload(configFor(backend.address(), certs.certB, certs.keyB), &error));
    REQUIRE(a.drain([](bool) {}));
    REQUIRE(b.drain([](bool) {}));
    uv_run(loop.get(), UV_RUN_DEFAULT);

    const auto countedA = a.stats();
    const auto countedB = b.stats();
    CHECK(countedA.accepted == 3);
    CHECK(countedA.handshakesOk == 3);
    CHECK(countedA.bytesClientToBackend == 12);
    CHECK(countedA.bytesBackendToClient == 12);
    CHECK(closedBy(countedA, "done") == 3);
    CHECK(countedA.reloadsOk == 0);
    CHECK(countedB.accepted == 0);
    CHECK(countedB.handshakesOk == 0);
    CHECK(countedB.bytesClientToBackend == 0);
    CHECK(closedBy(countedB, "done") == 0);
    CHECK(countedB.reloadsOk == 1);

    sluice::Server moved(std::move(a));
    CHECK(moved.stats().accepted == 3);
    const auto empty = a.stats(); // NOLINT(bugprone-use-after-move): the documented state
    CHECK(empty.accepted == 0);
    CHECK(empty.handshakesOk == 0);
    CHECK(empty.closed.size() == countedA.closed.size());
    CHECK(closedBy(empty, "done") == 0);
}

TEST_CASE("reload: a bad configuration is refused and reported, a good one swaps the "
          "certificate, and a connection opened before it keeps working") {
    const auto &certs = certificates();
    EchoBackend backend;
    Loop loop;
    sluice::Server server(loop.get(), configFor(backend.address(), certs.certA, certs.keyA));
    server.start();
    const std::string address = server.addresses().at(0).second;

    // A client that connects before the reloads and uses its connection after them.
    std::atomic<int> phase{0};
    std::atomic<bool> proceed{false};
    bool earlyOk = false, earlyLater = false;
    std::string earlyPeer;
    std::thread early;
    loop.runWhile([&] {
        early = std::thread([&] {
            TlsClient client(address);
            earlyOk = client.ok() && client.echo("before the reload");
            earlyPeer = client.peerName();
            phase.store(1);
            while (!proceed.load()) {
                std::this_thread::sleep_for(1ms); // pacing the wait for the test thread only
            }
            earlyLater = client.echo(randomBytes(200000)) && client.closeCleanly();
        });
        while (phase.load() == 0) {
            std::this_thread::sleep_for(1ms);
        }
    });
    CHECK(earlyOk);
    CHECK(earlyPeer == "server-a");

    const auto before = server.stats();
    std::string error;
    auto bad = configFor(backend.address(), certs.dir + "/missing.crt", certs.keyA);
    CHECK_FALSE(server.reload(bad, &error));
    CHECK(error.find("missing.crt") != std::string::npos);
    CHECK(server.running());
    CHECK(server.stats().reloadsFailed - before.reloadsFailed == 1);
    CHECK_FALSE(server.stats().lastReloadOk);
    CHECK(server.config().listeners.at(0).certificates.at(0).cert == certs.certA);

    // Still serving the old configuration.
    std::string peer;
    loop.runWhile([&] {
        TlsClient client(address);
        peer = client.ok() && client.echo("after the failed reload") ? client.peerName() : "";
    });
    CHECK(peer == "server-a");

    // The same listener and address with certificate B: the socket stays, B is served.
    REQUIRE(server.reload(configFor(backend.address(), certs.certB, certs.keyB), &error));
    CHECK(server.addresses().at(0).second == address);
    CHECK(server.stats().reloadsOk - before.reloadsOk == 1);
    CHECK(server.stats().lastReloadOk);
    loop.runWhile([&] {
        TlsClient client(address);
        peer = client.ok() && client.echo("after the good reload") ? client.peerName() : "";
    });
    CHECK(peer == "server-b");

    proceed.store(true);
    loop.runWhile([&] { early.join(); });
    CHECK(earlyLater);

    int calls = 0;
    REQUIRE(server.stop([&](bool) { ++calls; }));
    uv_run(loop.get(), UV_RUN_DEFAULT);
    CHECK(calls == 1);
}

TEST_CASE("reload can move a listener to a new address; the old one stops accepting") {
    const auto &certs = certificates();
    EchoBackend backend;
    Loop loop;
    sluice::Server server(loop.get(), configFor(backend.address(), certs.certA, certs.keyA));
    server.start();
    const std::string first = server.addresses().at(0).second;
    std::string error;
    // Another key ("test 127.0.0.2:0"): a socket is added and the old one removed.
    REQUIRE(server.reload(configFor(backend.address(), certs.certA, certs.keyA, "127.0.0.2:0"),
                          &error));
    REQUIRE(server.addresses().size() == 1);
    const std::string second = server.addresses()[0].second;
    CHECK(second.rfind("127.0.0.2:", 0) == 0);
    bool served = false, refused = false;
    loop.runWhile([&] {
        TlsClient client(second);
        served = client.ok() && client.echo("moved");
        refused = !TlsClient(first).ok(); // closing a listener closes its socket at once
    });
    CHECK(served);
    CHECK(refused);
    REQUIRE(server.stop(nullptr));
}

TEST_CASE("drain and stop: each callback runs once, never re-entrantly; misuse returns false") {
    const auto &certs = certificates();
    EchoBackend backend;
    Loop loop;
    sluice::Server server(loop.get(), configFor(backend.address(), certs.certA, certs.keyA));

    // Before start: nothing to drain, stop or reload; the callbacks are never called.
    int neverCalled = 0;
    std::string error;
    CHECK_FALSE(server.drain([&](bool) { ++neverCalled; }));
    CHECK_FALSE(server.stop([&](bool) { ++neverCalled; }));
    CHECK_FALSE(server.reload(server.config(), &error));
    CHECK(error.find("not started") != std::string::npos);

    server.start();
    CHECK_THROWS_AS(server.start(), sluice::Error); // start twice
    CHECK(server.running());

    int drained = 0, stopped = 0;
    REQUIRE(server.drain([&](bool) { ++drained; }));
    CHECK_FALSE(server.drain([&](bool) { ++neverCalled; })); // drain twice
    CHECK_FALSE(server.reload(server.config(), &error));     // reload while closing
    CHECK(error.find("stopping") != std::string::npos);
    REQUIRE(server.stop([&](bool) { ++stopped; }));         // a stop may end a drain early
    CHECK_FALSE(server.stop([&](bool) { ++neverCalled; })); // stop twice
    CHECK(drained == 0);
    CHECK(stopped == 0);
    uv_run(loop.get(), UV_RUN_DEFAULT);
    CHECK(drained == 1);
    CHECK(stopped == 1);

    // Closed: every call fails, start cannot bring it back.
    CHECK_FALSE(server.drain([&](bool) { ++neverCalled; }));
    CHECK_FALSE(server.stop([&](bool) { ++neverCalled; }));
    CHECK_THROWS_AS(server.start(), sluice::Error);
    uv_run(loop.get(), UV_RUN_DEFAULT);
    CHECK(neverCalled == 0);
}

TEST_CASE("a drain with an open connection waits for it; its deadline cuts it (forced)") {
    const auto &certs = certificates();
    EchoBackend backend;
    Loop loop;
    auto config = configFor(backend.address(), certs.certA, certs.keyA);
    config.global.drainTimeout = 300ms;
    sluice::Server server(loop.get(), config);
    server.start();
    const std::string address = server.addresses().at(0).second;

    HeldConnection held(loop, address);
    int calls = 0;
    bool forced = false;
    REQUIRE(server.drain([&](bool f) {
        ++calls;
        forced = f;
    }));
    uv_run(loop.get(), UV_RUN_DEFAULT); // returns when the deadline has cut the connection
    CHECK(calls == 1);
    CHECK(forced);
    CHECK(held.finishCut());
}

TEST_CASE("start reports what failed and leaves nothing open; it may be tried again") {
    const auto &certs = certificates();
    EchoBackend backend;
    Loop loop;

    SUBCASE("a missing certificate names the file") {
        sluice::Server server(loop.get(),
                              configFor(backend.address(), certs.dir + "/nope.crt", certs.keyA));
        try {
            server.start();
            FAIL("start() did not throw");
        } catch (const sluice::Error &e) {
            CHECK(std::string(e.what()).find("nope.crt") != std::string::npos);
        }
        CHECK_FALSE(server.running());
    }

    SUBCASE("an address in use names the listener, and a retry succeeds once it is free") {
        int port = 0;
        const int taken =
            sluice::test::listenLoopback(port); // no SO_REUSEPORT: sluice cannot share it
        sluice::Server server(loop.get(), configFor(backend.address(), certs.certA, certs.keyA,
                                                    "127.0.0.1:" + std::to_string(port)));
        try {
            server.start();
            FAIL("start() did not throw");
        } catch (const sluice::Error &e) {
            const std::string what = e.what();
            CHECK(what.find("listener test") != std::string::npos);
            CHECK(what.find(std::to_string(port)) != std::string::npos);
        }
        CHECK_FALSE(server.running());
        ::close(taken);
        server.start();
        CHECK(server.running());
        CHECK(server.stop(nullptr));
    }

    SUBCASE("a configuration built in code without a listener, address or certificate") {
        sluice::Config empty;
        CHECK_THROWS_AS(sluice::Server(loop.get(), empty).start(), sluice::Error);
        auto noCert = configFor(backend.address(), certs.certA, certs.keyA);
        noCert.listeners[0].certificates.clear();
        try {
            sluice::Server(loop.get(), noCert).start();
            FAIL("start() did not throw");
        } catch (const sluice::Error &e) {
            CHECK(std::string(e.what()) == "listener test: no certificate");
        }
        auto noBackend = configFor("nonesuch", certs.certA, certs.keyA);
        CHECK_THROWS_AS(sluice::Server(loop.get(), noBackend).start(), sluice::Error);
    }
}

TEST_CASE("destroying a running Server cuts its connections and closes its handles") {
    const auto &certs = certificates();
    EchoBackend backend;
    Loop loop;
    auto server = std::make_unique<sluice::Server>(
        loop.get(), configFor(backend.address(), certs.certA, certs.keyA));
    server->start();
    HeldConnection held(loop, server->addresses().at(0).second);
    // A pending drain's callback is dropped with the Server.
    REQUIRE(server->drain([](bool) { FAIL("a destroyed Server's callback ran"); }));
    server.reset();
    uv_run(loop.get(), UV_RUN_DEFAULT); // the Loop destructor checks that nothing is left
    CHECK(held.finishCut());
}

namespace {

/** A plain TCP connection to `address`; -1 if connect() failed. */
int connectPlain(const std::string &address) {
    const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        return -1;
    }
    sockaddr_in to{};
    to.sin_family = AF_INET;
    to.sin_port = htons(static_cast<std::uint16_t>(portOf(address)));
    to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    timeval timeout{5, 0}; // a listener that never sheds fails the test instead of hanging it
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    if (::connect(fd, reinterpret_cast<sockaddr *>(&to), sizeof to) != 0) {
        ::close(fd);
        return -1;
    }
    return fd;
}

/** A TLS client on a socket that connectPlain() connected: handshakes, verifying "localhost"
 * against the test CA, and echoes `message` once. Closes nothing. */
bool echoOver(int fd, const std::string &message) {
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_load_verify_locations(ctx, certificates().ca.c_str(), nullptr);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, nullptr);
    SSL *ssl = SSL_new(ctx);
    SSL_set_fd(ssl, fd);
    SSL_set_tlsext_host_name(ssl, "localhost");
    SSL_set1_host(ssl, "localhost");
    const int length = static_cast<int>(message.size());
    bool ok = SSL_connect(ssl) == 1 && SSL_write(ssl, message.data(), length) == length;
    std::string got;
    while (ok && got.size() < message.size()) {
        char buffer[256];
        const int n = SSL_read(ssl, buffer, static_cast<int>(sizeof buffer));
        ok = n > 0;
        got.append(buffer, static_cast<std::size_t>(std::max(n, 0)));
    }
    SSL_free(ssl);
    SSL_CTX_free(ctx);
    return ok && got == message;
}

/** Clients connected (TCP only) to `address` while the loop does not run: they wait in the
 * listening socket's accept queue. */
std::vector<int> waitingClients(const std::string &address, int count) {
    std::vector<int> fds;
    for (int i = 0; i < count; ++i) {
        const int fd = connectPlain(address);
        REQUIRE(fd >= 0);
        fds.push_back(fd);
    }
    return fds;
}

/** Each client handshakes and echoes once, then closes; how many were served. */
int serveAll(Loop &loop, const std::vector<int> &fds) {
    int served = 0;
    loop.runWhile([&] {
        for (const int fd : fds) {
            served += echoOver(fd, "waited in the queue") ? 1 : 0;
            ::close(fd);
        }
    });
    return served;
}

} // namespace

TEST_CASE("a drain, and a reload that removes a listener, serve the connections waiting in the "
          "listening socket's queue instead of resetting them") {
    const auto &certs = certificates();
    EchoBackend backend;
    Loop loop;
    SUBCASE("drain") {
        sluice::Server server(loop.get(), configFor(backend.address(), certs.certA, certs.keyA));
        server.start();
        const auto before = server.stats().accepted;
        const auto fds = waitingClients(server.addresses().at(0).second, 3);
        int calls = 0;
        bool forced = true;
        REQUIRE(server.drain([&](bool f) {
            ++calls;
            forced = f;
        }));
        CHECK(serveAll(loop, fds) == 3);
        uv_run(loop.get(), UV_RUN_DEFAULT);
        CHECK(calls == 1);
        CHECK_FALSE(forced);
        CHECK(server.stats().accepted - before == 3);
    }
    SUBCASE("reload") {
        sluice::Server server(loop.get(), configFor(backend.address(), certs.certA, certs.keyA));
        server.start();
        const auto before = server.stats().accepted;
        const auto fds = waitingClients(server.addresses().at(0).second, 3);
        std::string error;
        REQUIRE(server.reload(configFor(backend.address(), certs.certA, certs.keyA, "127.0.0.2:0"),
                              &error));
        CHECK(serveAll(loop, fds) == 3);
        CHECK(server.stats().accepted - before == 3);
        REQUIRE(server.stop(nullptr));
    }
}

TEST_CASE("out of descriptors, a waiting client is closed at once and counted; the Server then "
          "serves again, and gives its reserve descriptor back when destroyed") {
    const auto &certs = certificates();
    EchoBackend backend;
    {
        // What the first Server in a process leaves open for the process's life (libuv's
        // signal pipe among them) is not this test's business.
        Loop loop;
        sluice::Server first(loop.get(), configFor(backend.address(), certs.certA, certs.keyA));
        first.start();
        first.stop([](bool) {});
    }
    const int before = openDescriptors();
    {
        Loop loop;
        loop.runWhile([] {}); // the loop's wake-up descriptor, made now and kept
        sluice::Server server(loop.get(), configFor(backend.address(), certs.certA, certs.keyA));
        server.start();
        const std::string address = server.addresses().at(0).second;
        const auto start = server.stats();

        bool connected = false;
        ssize_t got = 1;
        int readError = 0;
        std::chrono::steady_clock::duration waited{};
        {
            // The descriptor table full but for one slot, which the client's socket takes: the
            // Server's accept() then fails with EMFILE while the client waits.
            const DescriptorFiller full(1);
            loop.runWhile([&] {
                const int fd = connectPlain(address);
                connected = fd >= 0;
                if (!connected) {
                    return;
                }
                const auto t0 = std::chrono::steady_clock::now();
                char byte = 0;
                got = ::read(fd, &byte, 1); // the shed connection: EOF at once, not a 5 s timeout
                readError = got < 0 ? errno : 0;
                waited = std::chrono::steady_clock::now() - t0;
                ::close(fd);
            });
        }
        CHECK(connected);
        CHECK(got <= 0);
        CHECK((got == 0 || readError == ECONNRESET)); // closed, not timed out (EAGAIN)
        CHECK(waited < 2s);
        const auto shed = server.stats();
        CHECK(shed.acceptErrors - start.acceptErrors >= 1);
        CHECK(shed.accepted == start.accepted); // nothing was served meanwhile

        // Descriptors free again: the same listener serves.
        bool echoed = false;
        loop.runWhile([&] {
            TlsClient client(address);
            echoed = client.ok() && client.echo("after the shortage") && client.closeCleanly();
        });
        CHECK(echoed);
        CHECK(server.stats().accepted == start.accepted + 1);
        server.stop([](bool) {});
    }
    // The reserve, the listening socket and every connection are closed with the Server.
    CHECK(openDescriptors() == before);
}

TEST_CASE("a burst that libuv reads to the last byte without a final read arrives whole") {
    // libuv reads a readable socket until a read comes back short, 32 reads at most; sluice
    // holds a TLS tail shorter than a record while that next read may bring more. Here the
    // backend's reply is exactly 32 buffers: the 32nd read empties the socket, libuv stops
    // without the read that would have found it empty, and the tail must still leave (the
    // loop's check phase sends it), not wait for bytes that never come.
    constexpr std::size_t bufferBytes = 1000;
    const std::string reply = randomBytes(32 * bufferBytes);
    const auto &certs = certificates();
    BurstBackend backend(reply);
    Loop loop;
    auto config = configFor(backend.address(), certs.certA, certs.keyA);
    config.global.buffers.backend = bufferBytes;
    sluice::Server server(loop.get(), config);
    server.start();
    const std::string address = server.addresses().at(0).second;

    std::string received;
    std::atomic<bool> done{false};
    std::thread client([&] {
        TlsClient tls(address);
        if (tls.ok()) {
            received = tls.request("go", reply.size());
        }
        done.store(true);
    });
    // Bounded waits: each ends by itself when something is broken.
    for (int i = 0; i < 10000 && !backend.requested.load() && !done.load(); ++i) {
        uv_run(loop.get(), UV_RUN_NOWAIT);
        std::this_thread::sleep_for(1ms);
    }
    CHECK(backend.requested.load());
    backend.go.store(true); // the loop stands still while the reply is written
    for (int i = 0; i < 10000 && !backend.written.load(); ++i) {
        std::this_thread::sleep_for(1ms);
    }
    CHECK(backend.written.load());
    for (int i = 0; i < 20000 && !done.load(); ++i) {
        uv_run(loop.get(), UV_RUN_NOWAIT);
        std::this_thread::sleep_for(1ms);
    }
    client.join();
    CHECK(received.size() == reply.size());
    CHECK((received == reply)); // in order, byte for byte (not printed: binary)
    REQUIRE(server.stop(nullptr));
    uv_run(loop.get(), UV_RUN_DEFAULT);
}

TEST_CASE("a moved Server keeps running; the moved-from one is empty") {
    const auto &certs = certificates();
    EchoBackend backend;
    Loop loop;
    sluice::Server first(loop.get(), configFor(backend.address(), certs.certA, certs.keyA));
    first.start();
    sluice::Server second(std::move(first));
    CHECK(second.running());
    CHECK_FALSE(first.running()); // NOLINT(bugprone-use-after-move): the documented state
    CHECK(first.addresses().empty());
    CHECK(first.loop() == nullptr);
    CHECK_FALSE(first.stop(nullptr));
    CHECK_THROWS_AS(first.start(), sluice::Error);
    bool served = false;
    const std::string address = second.addresses().at(0).second;
    loop.runWhile([&] {
        TlsClient client(address);
        served = client.ok() && client.echo("moved");
    });
    CHECK(served);
    // Assigning over a running Server stops the one it held.
    second = sluice::Server(loop.get(), configFor(backend.address(), certs.certA, certs.keyA));
    CHECK_FALSE(second.running());
}

TEST_CASE("a callback may destroy the Server that called it") {
    const auto &certs = certificates();
    EchoBackend backend;
    Loop loop;
    auto server = std::make_unique<sluice::Server>(
        loop.get(), configFor(backend.address(), certs.certA, certs.keyA));
    server->start();
    int calls = 0;
    REQUIRE(server->stop([&](bool) {
        ++calls;
        server.reset();
    }));
    uv_run(loop.get(), UV_RUN_DEFAULT);
    CHECK(calls == 1);
    CHECK(server == nullptr);
}

TEST_CASE("setHandler: connections to a handler backend stay in the process; an unknown one "
          "fails start") {
    const auto &certs = certificates();
    Loop loop;
    sluice::Config config = configFor("in-process", certs.certA, certs.keyA);
    sluice::BackendConfig backend;
    backend.name = "in-process";
    backend.handler = "reverse";
    config.backends.push_back(backend);

    struct Reverse : sluice::StreamHandler {
        std::string received;
        void onData(sluice::Stream &, std::span<const std::uint8_t> data) override {
            received.append(reinterpret_cast<const char *>(data.data()), data.size());
        }
        void onEnd(sluice::Stream &stream, bool truncated) override {
            std::string reply = truncated ? "truncated" : received;
            std::reverse(reply.begin(), reply.end());
            stream.write({reinterpret_cast<const std::uint8_t *>(reply.data()), reply.size()});
            stream.shutdown();
        }
    };

    {
        sluice::Server unknown(loop.get(), config);
        CHECK_THROWS_WITH_AS(unknown.start(), doctest::Contains("no handler registered as reverse"),
                             sluice::Error);
    }

    sluice::Server server(loop.get(), config);
    std::string seenListener;
    server.setHandler("reverse", [&](const sluice::StreamInfo &info) {
        seenListener = info.listener;
        return std::make_unique<Reverse>();
    });
    server.start();
    const std::string address = server.addresses().at(0).second;
    std::string reply;
    bool clean = false;
    loop.runWhile([&] {
        TlsClient client(address);
        REQUIRE(client.ok());
        reply = client.sendThenClose("stressed", clean);
    });
    CHECK(reply == "desserts");
    CHECK(clean);
    CHECK(seenListener == "test");
    REQUIRE(server.stop([](bool) {}));
    uv_run(loop.get(), UV_RUN_DEFAULT);
}

/** A Server on a loop of its own, run by a thread of its own, as a program with several threads
 * runs one per thread. */
class ServerThread {
public:
    ServerThread(sluice::Config config, sluice::HandshakeLimits limits)
        : thread_([this, config = std::move(config), limits] { run(config, limits); }) {
        std::unique_lock lock(mutex_);
        changed_.wait(lock, [this] { return started_; });
    }
    ServerThread(const ServerThread &) = delete;
    ServerThread &operator=(const ServerThread &) = delete;
    ~ServerThread() { stop(); }

    /** The listener's address; empty if start() failed (the thread has ended then). */
    const std::string &address() const { return address_; }
    /** The Server's counters, read from this thread while the Server runs on its own. */
    sluice::ServerStats stats() const { return server_->stats(); }

    /** Stops the Server and waits for its thread: true when the loop then closed with nothing
     * left open. */
    bool stop() {
        if (thread_.joinable()) {
            if (!address_.empty()) {
                uv_async_send(&stop_);
            }
            thread_.join();
        }
        return closedCleanly_;
    }

private:
    void run(const sluice::Config &config, const sluice::HandshakeLimits &limits) {
        uv_loop_t loop{};
        uv_loop_init(&loop);
        {
            sluice::Server server(&loop, config, limits);
            std::string address;
            try {
                server.start();
                address = server.addresses().at(0).second;
            } catch (const std::exception &) {
            }
            if (!address.empty()) {
                server_ = &server;
                stop_.data = &server;
                uv_async_init(&loop, &stop_, [](uv_async_t *async) {
                    static_cast<sluice::Server *>(async->data)->stop([](bool) {});
                    uv_close(reinterpret_cast<uv_handle_t *>(async), nullptr);
                });
            }
            {
                const std::lock_guard lock(mutex_);
                address_ = address;
                started_ = true;
            }
            changed_.notify_all();
            uv_run(&loop, UV_RUN_DEFAULT);
        }
        closedCleanly_ = uv_loop_close(&loop) == 0;
    }

    std::mutex mutex_;
    std::condition_variable changed_;
    bool started_ = false;
    std::string address_;
    sluice::Server *server_ = nullptr; // while it runs: until stop()
    uv_async_t stop_{};
    bool closedCleanly_ = false;
    std::thread thread_;
};

/** Waits (up to 5 s) until `count` of `fds` have been closed by the Server, then 300 ms more for
 * any further one, and returns how many were closed. A held connection stays silent and open. */
std::size_t closedByServer(const std::vector<int> &fds, std::size_t count) {
    auto closed = [&fds] {
        std::size_t n = 0;
        for (const int fd : fds) {
            pollfd p{fd, POLLIN, 0};
            n += ::poll(&p, 1, 0) == 1 ? 1 : 0; // EOF or reset: readable
        }
        return n;
    };
    const auto deadline = std::chrono::steady_clock::now() + 5s;
    while (closed() < count && std::chrono::steady_clock::now() < deadline) {
        std::this_thread::sleep_for(10ms);
    }
    std::this_thread::sleep_for(300ms);
    return closed();
}

TEST_CASE("Servers on two threads that share a HandshakeLimits count an address's handshakes "
          "together; Servers that do not, each count their own") {
    const auto &certs = certificates();
    EchoBackend backend;
    sluice::Config config = configFor(backend.address(), certs.certA, certs.keyA);
    config.global.maxHandshakesPerIp = 3;

    // Four silent connections from 127.0.0.1 to each of two Servers, on two threads.
    auto connectSilent = [](const ServerThread &a, const ServerThread &b) {
        std::vector<int> fds;
        for (const ServerThread *server : {&a, &b}) {
            for (int i = 0; i < 4; ++i) {
                const int fd = connectPlain(server->address());
                REQUIRE(fd >= 0);
                fds.push_back(fd);
            }
        }
        return fds;
    };
    auto waitUntil = [](const std::function<bool()> &done) {
        const auto deadline = std::chrono::steady_clock::now() + 5s;
        while (!done() && std::chrono::steady_clock::now() < deadline) {
            std::this_thread::sleep_for(10ms);
        }
        return done();
    };

    // Both Servers on their threads, the silent connections, and `refused` of them closed at
    // accept; each record holds the one address until the clients leave. Returns how many each
    // Server counted as refused.
    auto exercise = [&](const sluice::HandshakeLimits &limitsA,
                        const sluice::HandshakeLimits &limitsB, std::size_t refused) {
        ServerThread a(config, limitsA), b(config, limitsB);
        REQUIRE_FALSE(a.address().empty());
        REQUIRE_FALSE(b.address().empty());
        const std::vector<int> fds = connectSilent(a, b);
        CHECK(closedByServer(fds, refused) == refused);
        const auto counted = std::pair(a.stats().handshakeLimited, b.stats().handshakeLimited);
        CHECK(counted.first + counted.second == refused);
        CHECK(limitsA.addressesInProgress() == 1);
        CHECK(limitsB.addressesInProgress() == 1);
        for (const int fd : fds) {
            ::close(fd);
        }
        // Every handshake counted ends once its client has gone.
        CHECK(waitUntil([&] {
            return limitsA.addressesInProgress() == 0 && limitsB.addressesInProgress() == 0;
        }));
        CHECK(a.stop());
        CHECK(b.stop());
        return counted;
    };

    SUBCASE("shared: three handshakes in progress in all, five connections refused") {
        const sluice::HandshakeLimits limits;
        exercise(limits, limits, 5);
    }

    SUBCASE("not shared: each Server holds three and refuses one") {
        const sluice::HandshakeLimits limitsA, limitsB;
        CHECK(exercise(limitsA, limitsB, 2) == std::pair<std::uint64_t, std::uint64_t>(1, 1));
    }
}
