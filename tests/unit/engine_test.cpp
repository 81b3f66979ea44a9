// Engine unit tests: a server Engine and a client Engine (or a stock OpenSSL SSL) exchange
// ciphertext in memory, through the public API only, with tiny pair sizes and random chunking so
// that every would-block path of the engine is taken. Random choices come from a seeded
// std::mt19937; the seed is printed on failure and SLUICE_TEST_SEED replays it.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <malloc.h>
#include <memory>
#include <optional>
#include <random>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include <doctest/doctest.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

#include <sluice/engine.hpp>

#include "tls_fixture.hpp"

namespace {

using sluice::Engine;
using sluice::EngineOptions;
using sluice::EngineStatus;
using sluice::ErrorSource;
using sluice::Role;
using sluice::test::ContextOptions;
using sluice::test::SslCtxPtr;
using sluice::test::TlsObserver;
using sluice::test::TlsVersion;
using Bytes = std::vector<std::uint8_t>;

constexpr std::size_t KiB = 1024;
constexpr std::size_t MiB = 1024 * KiB;

std::uint32_t testSeed() {
    if (const char *fixed = std::getenv("SLUICE_TEST_SEED"))
        return static_cast<std::uint32_t>(std::strtoul(fixed, nullptr, 10));
    return std::random_device{}();
}

Bytes randomBytes(std::size_t size, std::mt19937 &rng) {
    Bytes bytes(size);
    std::size_t i = 0;
    for (; i + 4 <= size; i += 4) {
        const std::uint32_t word = rng();
        std::memcpy(bytes.data() + i, &word, 4);
    }
    for (; i < size; ++i)
        bytes[i] = static_cast<std::uint8_t>(rng());
    return bytes;
}

Bytes toBytes(std::string_view text) {
    return Bytes(text.begin(), text.end());
}

std::span<const std::uint8_t> asSpan(std::string_view text) {
    return {reinterpret_cast<const std::uint8_t *>(text.data()), text.size()};
}

/** Empty when equal; otherwise where the two streams first differ. */
std::string difference(const Bytes &sent, const Bytes &received) {
    if (sent == received)
        return {};
    const auto mismatch = std::mismatch(sent.begin(), sent.end(), received.begin(), received.end());
    std::ostringstream out;
    out << "sent " << sent.size() << " bytes, received " << received.size()
        << ", first difference at offset " << (mismatch.first - sent.begin());
    return out.str();
}

#define CHECK_SAME_BYTES(sent, received)                                                           \
    do {                                                                                           \
        const std::string diff_ = difference((sent), (received));                                  \
        CHECK_MESSAGE(diff_.empty(), diff_);                                                       \
    } while (false)

// --- Endpoints and the pump ----------------------------------------------------------------------

/** One engine plus what the test wants it to send and what it delivered. */
struct Endpoint {
    const char *name = "";
    EngineOptions options;
    std::unique_ptr<Engine> engine;

    Bytes outgoing;                // offered through write(), front first
    std::size_t accepted = 0;      // bytes of `outgoing` that write() took
    bool shutdownWhenSent = false; // call shutdown() once every outgoing byte was taken
    bool shutdownCalled = false;
    Bytes received; // plaintext consumed from plainOut()
    bool readPaused = false;

    // What the pump observed after every call.
    EngineStatus last;
    int failedTransitions = 0;
    std::string firstReason;
    ErrorSource firstSource = ErrorSource::none;
    std::size_t zeroWrites = 0;
    std::size_t refusedLength = 0; // length of the last offer write() refused, 0 after a take
    bool transportClosed = false;  // this side finished and its transport was closed
    bool eofDelivered = false;

    bool allSent() const { return accepted == outgoing.size(); }
};

Endpoint makeEndpoint(const char *name, SSL_CTX *ctx, Role role, const EngineOptions &options) {
    Endpoint endpoint;
    endpoint.name = name;
    endpoint.options = options;
    std::string error;
    endpoint.engine = Engine::create(ctx, role, options, &error);
    REQUIRE_MESSAGE(endpoint.engine != nullptr, "Engine::create failed: " << error);
    return endpoint;
}

struct PumpOptions {
    std::size_t maxCipherChunk = std::numeric_limits<std::size_t>::max();
    std::size_t maxPlainChunk = std::numeric_limits<std::size_t>::max();
    std::size_t maxOffer = 256 * KiB;
    bool randomChunks = false; // each move and read takes a random size in [1, max]
    bool randomOffers = false; // offers vary in length; only their front is fixed by the contract
    bool copyOffers = false;   // every offer comes from a different buffer
    bool keepRefusedLength = false; // with randomOffers: never offer less than a refused offer
    bool pinned = false;         // spans are held across a whole step, like an in-flight uv_write
    bool closeTransports = true; // a finished side closes its transport: the peer gets EOF
    bool dirtyErrors = false;    // leave a stale error on OpenSSL's queue before every step
    std::size_t maxIterations = 2'000'000;
};

enum class Outcome { done, stalled, exhausted };

const char *outcomeName(Outcome outcome) {
    switch (outcome) {
    case Outcome::done:
        return "done";
    case Outcome::stalled:
        return "stalled";
    case Outcome::exhausted:
        return "exhausted";
    }
    return "?";
}

/**
 * Moves ciphertext between two engines and plaintext in and out of them, using only the public
 * API, and checks the engine's invariants after every call. A step that moves nothing ends a run
 * as stalled; a bounded iteration count turns a livelock into a failure instead of a hang.
 */
class Pump {
public:
    Pump(Endpoint &client, Endpoint &server, PumpOptions options, std::uint32_t seed)
        : client_(client)
        , server_(server)
        , options_(options)
        , rng_(seed) {
        observe(client_);
        observe(server_);
    }

    /** Steps until `done` holds, nothing moves any more, or the iteration budget is spent. */
    Outcome run(const std::function<bool()> &done) {
        for (std::size_t i = 0; i < options_.maxIterations; ++i, ++iterations_) {
            if (done())
                return Outcome::done;
            if (!step())
                return done() ? Outcome::done : Outcome::stalled;
        }
        return done() ? Outcome::done : Outcome::exhausted;
    }

    /** Steps until nothing moves; false if that never happens. */
    bool settle() {
        return run([] { return false; }) == Outcome::stalled;
    }

    /** One round: offers, ciphertext both ways, plaintext reads, transport closes. */
    bool step() {
        bool progress = false;
        if (options_.dirtyErrors)
            ERR_raise(ERR_LIB_SSL, SSL_R_BAD_LENGTH);
        if (options_.pinned) {
            auto toServer = holdCipher(client_, server_);
            auto toClient = holdCipher(server_, client_);
            auto serverPlain = holdPlain(server_);
            auto clientPlain = holdPlain(client_);
            progress |= offer(client_);
            progress |= offer(server_);
            progress |= completeCipher(toServer);
            progress |= completeCipher(toClient);
            progress |= completePlain(serverPlain);
            progress |= completePlain(clientPlain);
        } else {
            progress |= offer(client_);
            progress |= offer(server_);
            auto toServer = holdCipher(client_, server_);
            progress |= completeCipher(toServer);
            auto toClient = holdCipher(server_, client_);
            progress |= completeCipher(toClient);
            auto serverPlain = holdPlain(server_);
            progress |= completePlain(serverPlain);
            auto clientPlain = holdPlain(client_);
            progress |= completePlain(clientPlain);
        }
        progress |= dropToClosed(client_, server_);
        progress |= dropToClosed(server_, client_);
        if (options_.closeTransports) {
            progress |= closeIfFinished(client_, server_);
            progress |= closeIfFinished(server_, client_);
        }
        return progress;
    }

    /** Checks the engine's invariants; call after every call the test makes on an engine. */
    void observe(Endpoint &e) {
        Engine &engine = *e.engine;
        const EngineStatus st = engine.status();
        const EngineStatus &was = e.last;
        if (st.failed && !was.failed) {
            ++e.failedTransitions;
            e.firstReason = engine.errorReason();
            e.firstSource = engine.errorSource();
        }
        if (was.failed && !st.failed)
            violation(e, "failed went back to false");
        if (was.handshakeDone && !st.handshakeDone)
            violation(e, "handshakeDone went back to false");
        if (was.closeNotifyReceived && !st.closeNotifyReceived)
            violation(e, "closeNotifyReceived went back to false");
        if (was.truncated && !st.truncated)
            violation(e, "truncated went back to false");
        if (was.closeNotifySent && !st.closeNotifySent)
            violation(e, "closeNotifySent went back to false");
        if (st.failed) {
            if (engine.errorReason().empty())
                violation(e, "failed with an empty errorReason");
            if (engine.errorReason() != e.firstReason)
                violation(e, "errorReason changed from '" + e.firstReason + "' to '" +
                                 engine.errorReason() + "'");
            if (engine.errorSource() == ErrorSource::none)
                violation(e, "failed with ErrorSource::none");
            if (engine.errorSource() != e.firstSource)
                violation(e, "errorSource changed");
            if (!engine.plainOut().empty())
                violation(e, "plainOut not empty after a fatal error");
        } else if (engine.errorSource() != ErrorSource::none || !engine.errorReason().empty()) {
            violation(e, "an error source or reason without status().failed");
        }
        const auto plain = engine.plainOut();
        if (st.plaintextReady != !plain.empty())
            violation(e, "plaintextReady disagrees with plainOut()");
        if (plain.size() > e.options.plaintextBudget)
            violation(e, "plainOut() holds more than plaintextBudget: " +
                             std::to_string(plain.size()));
        const std::size_t pending = engine.cipherOutPending();
        const auto out = engine.cipherOut();
        if (st.ciphertextPending != (pending > 0))
            violation(e, "ciphertextPending disagrees with cipherOutPending()");
        if (out.empty() != (pending == 0))
            violation(e, "cipherOut() empty disagrees with cipherOutPending()");
        if (out.size() > pending)
            violation(e, "cipherOut() larger than cipherOutPending()");
        // A grown pair (bulkPairSize) holds more, and says so in pairBytes().
        if (pending > e.options.pairSize && pending > engine.pairBytes() / 2)
            violation(e, "cipherOutPending() above the pair's size: " + std::to_string(pending));
        if (engine.pairBytes() != 0 && engine.pairBytes() != 2 * e.options.pairSize &&
            engine.pairBytes() != 2 * e.options.bulkPairSize)
            violation(e, "pairBytes() neither pairSize nor bulkPairSize: " +
                             std::to_string(engine.pairBytes()));
        if (engine.finished() && pending > 0)
            violation(e, "finished() with ciphertext still to send");
        if (st.handshakeDone && engine.handshake().protocol.empty())
            violation(e, "handshakeDone with an empty HandshakeInfo::protocol");
        e.last = st;
    }

    const std::vector<std::string> &violations() const { return violations_; }
    std::size_t violationCount() const { return violationCount_; }
    std::size_t iterations() const { return iterations_; }

private:
    struct CipherHold {
        Endpoint *from = nullptr;
        Endpoint *to = nullptr;
        std::span<const std::uint8_t> out;
        std::span<std::uint8_t> space;
        std::size_t size = 0;
        Bytes snapshot;
    };
    struct PlainHold {
        Endpoint *endpoint = nullptr;
        std::span<const std::uint8_t> plain;
        std::size_t size = 0;
        Bytes snapshot;
    };

    std::size_t pick(std::size_t max) {
        if (max <= 1 || !options_.randomChunks)
            return max;
        // A quarter of the moves are tiny: records split in their header are the rare paths.
        std::size_t top = max;
        if (rng_() % 4 == 0)
            top = std::min<std::size_t>(max, 16);
        return std::uniform_int_distribution<std::size_t>(1, top)(rng_);
    }

    bool offer(Endpoint &e) {
        Engine &engine = *e.engine;
        if (e.allSent()) {
            if (!e.shutdownWhenSent || e.shutdownCalled)
                return false;
            e.shutdownCalled = true;
            engine.shutdown();
            observe(e);
            return true;
        }
        const bool failedBefore = engine.status().failed;
        const std::size_t pendingBefore = engine.cipherOutPending();
        const std::size_t remaining = e.outgoing.size() - e.accepted;
        std::size_t length = std::min(remaining, options_.maxOffer);
        if (options_.randomOffers) {
            const std::size_t shortest = options_.keepRefusedLength
                                             ? std::clamp<std::size_t>(e.refusedLength, 1, length)
                                             : 1;
            length = std::uniform_int_distribution<std::size_t>(shortest, length)(rng_);
        }
        std::span<const std::uint8_t> data(e.outgoing.data() + e.accepted, length);
        Bytes copy;
        if (options_.copyOffers) {
            copy.assign(data.begin(), data.end());
            data = copy;
        }
        const std::size_t taken = engine.write(data);
        if (taken > length)
            violation(e, "write() took more than offered");
        if (taken > 0 && failedBefore)
            violation(e, "write() took bytes after a fatal error");
        if (taken == 0)
            ++e.zeroWrites;
        e.refusedLength = taken == 0 ? length : 0;
        e.accepted += std::min(taken, length);
        if (options_.copyOffers) // the engine must not keep pointing into a buffer it was lent
            std::fill(copy.begin(), copy.end(), std::uint8_t{0xEE});
        observe(e);
        return taken > 0 || engine.cipherOutPending() != pendingBefore;
    }

    std::optional<CipherHold> holdCipher(Endpoint &from, Endpoint &to) {
        if (to.transportClosed)
            return std::nullopt;
        const auto out = from.engine->cipherOut();
        if (out.empty())
            return std::nullopt;
        const auto space = to.engine->cipherInSpace();
        if (space.empty())
            return std::nullopt;
        CipherHold hold;
        hold.from = &from;
        hold.to = &to;
        hold.out = out;
        hold.space = space;
        hold.size = pick(std::min({out.size(), space.size(), options_.maxCipherChunk}));
        if (options_.pinned)
            hold.snapshot.assign(out.begin(), out.begin() + static_cast<std::ptrdiff_t>(hold.size));
        return hold;
    }

    bool completeCipher(std::optional<CipherHold> &hold) {
        if (!hold)
            return false;
        Endpoint &from = *hold->from;
        Endpoint &to = *hold->to;
        if (options_.pinned) {
            if (from.engine->cipherOut().data() != hold->out.data())
                violation(from, "cipherOut() front moved while its bytes were held");
            if (std::memcmp(hold->out.data(), hold->snapshot.data(), hold->size) != 0)
                violation(from, "held cipherOut() bytes changed before consumeCipherOut()");
        }
        std::memcpy(hold->space.data(), hold->out.data(), hold->size);
        to.engine->commitCipherIn(hold->size);
        observe(to);
        from.engine->consumeCipherOut(hold->size);
        observe(from);
        return true;
    }

    std::optional<PlainHold> holdPlain(Endpoint &e) {
        if (e.readPaused)
            return std::nullopt;
        const auto plain = e.engine->plainOut();
        if (plain.empty())
            return std::nullopt;
        PlainHold hold;
        hold.endpoint = &e;
        hold.plain = plain;
        hold.size = pick(std::min(plain.size(), options_.maxPlainChunk));
        if (options_.pinned)
            hold.snapshot.assign(plain.begin(),
                                 plain.begin() + static_cast<std::ptrdiff_t>(hold.size));
        return hold;
    }

    bool completePlain(std::optional<PlainHold> &hold) {
        if (!hold)
            return false;
        Endpoint &e = *hold->endpoint;
        if (options_.pinned) {
            if (e.engine->status().failed)
                return false; // a fatal error in between voids what was not consumed
            if (e.engine->plainOut().data() != hold->plain.data())
                violation(e, "plainOut() front moved while its bytes were held");
            if (std::memcmp(hold->plain.data(), hold->snapshot.data(), hold->size) != 0)
                violation(e, "held plainOut() bytes changed before consumePlainOut()");
        }
        e.received.insert(e.received.end(), hold->plain.begin(),
                          hold->plain.begin() + static_cast<std::ptrdiff_t>(hold->size));
        e.engine->consumePlainOut(hold->size);
        observe(e);
        return true;
    }

    /** Ciphertext toward a closed transport goes nowhere, as on a reset socket. */
    bool dropToClosed(Endpoint &from, Endpoint &to) {
        if (!to.transportClosed)
            return false;
        const auto out = from.engine->cipherOut();
        if (out.empty())
            return false;
        from.engine->consumeCipherOut(out.size());
        observe(from);
        return true;
    }

    bool closeIfFinished(Endpoint &e, Endpoint &peer) {
        if (e.transportClosed || !e.engine->finished())
            return false;
        e.transportClosed = true;
        if (!peer.eofDelivered && !peer.transportClosed) {
            peer.eofDelivered = true;
            peer.engine->cipherInEof();
            observe(peer);
        }
        return true;
    }

    void violation(const Endpoint &e, const std::string &what) {
        ++violationCount_;
        if (violations_.size() < 20)
            violations_.push_back(std::string(e.name) + " (step " + std::to_string(iterations_) +
                                  "): " + what);
    }

    Endpoint &client_;
    Endpoint &server_;
    PumpOptions options_;
    std::mt19937 rng_;
    std::size_t iterations_ = 0;
    std::vector<std::string> violations_;
    std::size_t violationCount_ = 0;
};

void checkClean(const Pump &pump) {
    std::string all;
    for (const auto &v : pump.violations())
        all += "\n  " + v;
    CHECK_MESSAGE(pump.violationCount() == 0, pump.violationCount()
                                                  << " engine invariant violations:" << all);
}

// --- A connected pair ----------------------------------------------------------------------------

/** Contexts, observers and engines of one test connection. Heap-held: observers must not move. */
struct Connection {
    TlsObserver serverSeen;
    TlsObserver clientSeen;
    SslCtxPtr serverCtx;
    SslCtxPtr clientCtx;
    Endpoint server;
    Endpoint client;
};

EngineOptions clientOptions(std::size_t pairSize = 16 * KiB, std::string serverName = "localhost") {
    EngineOptions options;
    options.pairSize = pairSize;
    options.serverName = std::move(serverName);
    return options;
}

EngineOptions serverOptions(std::size_t pairSize = 16 * KiB) {
    EngineOptions options;
    options.pairSize = pairSize;
    return options;
}

std::unique_ptr<Connection> connect(const ContextOptions &serverCtx,
                                    const ContextOptions &clientCtx,
                                    const EngineOptions &server = serverOptions(),
                                    const EngineOptions &client = clientOptions()) {
    auto c = std::make_unique<Connection>();
    c->serverCtx = sluice::test::serverContext(serverCtx, &c->serverSeen);
    c->clientCtx = sluice::test::clientContext(clientCtx, &c->clientSeen);
    c->server = makeEndpoint("server", c->serverCtx.get(), Role::server, server);
    c->client = makeEndpoint("client", c->clientCtx.get(), Role::client, client);
    return c;
}

std::string versionName(TlsVersion v) {
    return v == TlsVersion::tls13 ? "TLSv1.3" : v == TlsVersion::tls12 ? "TLSv1.2" : "any";
}

ContextOptions version(TlsVersion v) {
    ContextOptions options;
    options.version = v;
    return options;
}

bool bothHandshaken(const Connection &c) {
    return c.server.engine->status().handshakeDone && c.client.engine->status().handshakeDone;
}

/** Handshakes and lets post-handshake messages (TLS 1.3 tickets) settle. */
void handshake(Connection &c, Pump &pump) {
    const Outcome outcome = pump.run([&] { return bothHandshaken(c); });
    REQUIRE_MESSAGE(outcome == Outcome::done,
                    "handshake " << std::string(outcomeName(outcome)) << "; server: '"
                                 << c.server.engine->errorReason() << "', client: '"
                                 << c.client.engine->errorReason() << "'");
    REQUIRE(pump.settle());
}

bool transferDone(const Connection &c) {
    return c.client.allSent() && c.server.allSent() &&
           c.server.received.size() >= c.client.outgoing.size() &&
           c.client.received.size() >= c.server.outgoing.size();
}

/** Sends `toServer` and `toClient` at the same time and checks both arrive byte-exact. */
void transfer(Connection &c, Pump &pump, Bytes toServer, Bytes toClient, bool byDigest = false) {
    c.client.outgoing = std::move(toServer);
    c.client.accepted = 0;
    c.server.outgoing = std::move(toClient);
    c.server.accepted = 0;
    c.server.received.clear();
    c.client.received.clear();
    const Outcome outcome = pump.run([&] { return transferDone(c); });
    CHECK_MESSAGE(outcome == Outcome::done,
                  "transfer " << std::string(outcomeName(outcome)) << " after " << pump.iterations()
                              << " steps; server got " << c.server.received.size() << "/"
                              << c.client.outgoing.size() << ", client got "
                              << c.client.received.size() << "/" << c.server.outgoing.size()
                              << "; errors: '" << c.server.engine->errorReason() << "' / '"
                              << c.client.engine->errorReason() << "'");
    if (byDigest) {
        CHECK(c.server.received.size() == c.client.outgoing.size());
        CHECK(c.client.received.size() == c.server.outgoing.size());
        CHECK(sluice::test::sha256(c.server.received) == sluice::test::sha256(c.client.outgoing));
        CHECK(sluice::test::sha256(c.client.received) == sluice::test::sha256(c.server.outgoing));
    } else {
        CHECK_SAME_BYTES(c.client.outgoing, c.server.received);
        CHECK_SAME_BYTES(c.server.outgoing, c.client.received);
    }
    CHECK_FALSE(c.server.engine->status().failed);
    CHECK_FALSE(c.client.engine->status().failed);
}

/** Moves all of `from`'s pending ciphertext into `to`, as much per commit as fits. */
std::size_t moveAll(Endpoint &from, Endpoint &to, Pump &pump) {
    std::size_t moved = 0;
    for (int guard = 0; guard < 100000; ++guard) {
        const auto out = from.engine->cipherOut();
        const auto space = to.engine->cipherInSpace();
        const std::size_t n = std::min(out.size(), space.size());
        if (n == 0)
            break;
        std::memcpy(space.data(), out.data(), n);
        to.engine->commitCipherIn(n);
        pump.observe(to);
        from.engine->consumeCipherOut(n);
        pump.observe(from);
        moved += n;
    }
    return moved;
}

/** Takes every ciphertext byte `e` has queued, in order. */
Bytes takeCipherOut(Endpoint &e, Pump &pump) {
    Bytes all;
    for (int guard = 0; guard < 100000; ++guard) {
        const auto out = e.engine->cipherOut();
        if (out.empty())
            break;
        all.insert(all.end(), out.begin(), out.end());
        e.engine->consumeCipherOut(out.size());
        pump.observe(e);
    }
    return all;
}

/** Feeds `bytes` to `e` as ciphertext; returns how many fit. */
std::size_t feed(Endpoint &e, std::span<const std::uint8_t> bytes, Pump &pump) {
    std::size_t fed = 0;
    for (int guard = 0; guard < 100000 && fed < bytes.size(); ++guard) {
        const auto space = e.engine->cipherInSpace();
        const std::size_t n = std::min(space.size(), bytes.size() - fed);
        if (n == 0)
            break;
        std::memcpy(space.data(), bytes.data() + fed, n);
        e.engine->commitCipherIn(n);
        pump.observe(e);
        fed += n;
    }
    return fed;
}

/** Consumes everything `e` has decrypted into e.received. */
void drainPlain(Endpoint &e, Pump &pump) {
    for (int guard = 0; guard < 100000; ++guard) {
        const auto plain = e.engine->plainOut();
        if (plain.empty())
            break;
        e.received.insert(e.received.end(), plain.begin(), plain.end());
        e.engine->consumePlainOut(plain.size());
        pump.observe(e);
    }
}

/** Offers `data` until all is taken or write() returns 0; returns the bytes taken. */
std::size_t writeSome(Endpoint &e, std::span<const std::uint8_t> data, Pump &pump) {
    std::size_t taken = 0;
    while (taken < data.size()) {
        const std::size_t n = e.engine->write(data.subspan(taken));
        pump.observe(e);
        if (n == 0)
            break;
        taken += n;
    }
    return taken;
}

/**
 * After a fatal error every call is valid, moves no data and leaves the error as it was
 * (LESSONS #6, #7). The alert, if any, may still be flushed.
 */
void exerciseAfterFailure(Endpoint &e, Pump &pump) {
    Engine &engine = *e.engine;
    REQUIRE(engine.status().failed);
    const std::string reason = engine.errorReason();
    const ErrorSource source = engine.errorSource();
    CHECK_FALSE(reason.empty());
    CHECK(source != ErrorSource::none);

    CHECK(engine.write(asSpan("after the error")) == 0);
    CHECK(engine.plainOut().empty());
    engine.consumePlainOut(0);
    engine.consumeCipherOut(0);
    engine.commitCipherIn(0);
    const auto space = engine.cipherInSpace();
    if (!space.empty()) {
        const std::size_t n = std::min<std::size_t>(space.size(), 5);
        std::memset(space.data(), 0x17, n);
        engine.commitCipherIn(n);
    }
    CHECK(engine.plainOut().empty());
    engine.shutdown();
    CHECK_FALSE(engine.requestKeyUpdate(true));
    CHECK(engine.write(asSpan("x")) == 0);
    engine.cipherInEof();
    takeCipherOut(e, pump); // the alert, if one is still queued
    CHECK(engine.finished());
    CHECK(engine.status().failed);
    CHECK(engine.errorReason() == reason);
    CHECK(engine.errorSource() == source);
    CHECK(engine.plainOut().empty());
    CHECK(engine.cipherOutPending() == 0);
    pump.observe(e);
    CHECK(e.failedTransitions == 1);
}

// --- Handshake -----------------------------------------------------------------------------------

TEST_CASE("handshake completes and reports its facts") {
    const std::uint32_t seed = testSeed();
    INFO("seed " << seed);

    struct Case {
        TlsVersion version;
        const char *protocol;
        const char *cipherList;
        const char *cipherSuites;
        const char *cipher;
    };
    const Case cases[] = {
        {TlsVersion::tls13, "TLSv1.3", "", "TLS_CHACHA20_POLY1305_SHA256",
         "TLS_CHACHA20_POLY1305_SHA256"},
        {TlsVersion::tls13, "TLSv1.3", "", "", ""},
        {TlsVersion::tls12, "TLSv1.2", "ECDHE-ECDSA-AES256-GCM-SHA384", "",
         "ECDHE-ECDSA-AES256-GCM-SHA384"},
        {TlsVersion::tls12, "TLSv1.2", "", "", ""},
    };
    for (const Case &k : cases) {
        INFO("protocol " << std::string(k.protocol) << ", cipher " << std::string(k.cipher));
        ContextOptions serverCtx = version(k.version);
        serverCtx.cipherList = k.cipherList;
        serverCtx.cipherSuites = k.cipherSuites;
        auto c = connect(serverCtx, version(TlsVersion::any));

        // The client speaks first: its ClientHello is queued by create(), with no other call.
        CHECK(c->client.engine->status().ciphertextPending);
        CHECK_FALSE(c->server.engine->status().ciphertextPending);
        CHECK_FALSE(c->server.engine->status().handshakeDone);
        CHECK(c->server.engine->handshake().protocol.empty());

        Pump pump(c->client, c->server, PumpOptions{}, seed);
        handshake(*c, pump);

        for (Endpoint *e : {&c->server, &c->client}) {
            INFO("endpoint " << std::string(e->name));
            const auto &info = e->engine->handshake();
            CHECK(info.protocol == k.protocol);
            CHECK_FALSE(info.cipher.empty());
            if (*k.cipher != '\0')
                CHECK(info.cipher == k.cipher);
            CHECK(info.serverName == "localhost");
            CHECK(info.alpn.empty());
            CHECK_FALSE(info.resumed);
            const EngineStatus st = e->engine->status();
            CHECK(st.handshakeDone);
            CHECK_FALSE(st.failed);
            CHECK_FALSE(st.closeNotifyReceived);
            CHECK_FALSE(st.truncated);
            CHECK_FALSE(st.closeNotifySent);
            CHECK_FALSE(e->engine->finished());
        }
        CHECK(c->server.engine->handshake().cipher == c->client.engine->handshake().cipher);
        CHECK(c->serverSeen.handshakeSent[SSL3_MT_SERVER_HELLO] == 1);
        checkClean(pump);
    }
}

TEST_CASE("a client without a server name sends no SNI") {
    auto c = connect({}, {}, serverOptions(), clientOptions(16 * KiB, ""));
    Pump pump(c->client, c->server, PumpOptions{}, 1);
    handshake(*c, pump);
    CHECK(c->server.engine->handshake().serverName.empty());
    CHECK(c->client.engine->handshake().serverName.empty());
    checkClean(pump);
}

TEST_CASE("the client refuses a certificate for another name or from an unknown CA") {
    for (const bool wrongName : {true, false}) {
        CAPTURE(wrongName);
        ContextOptions clientCtx;
        clientCtx.trustOtherCa = !wrongName;
        auto c = connect({}, clientCtx, serverOptions(),
                         clientOptions(16 * KiB, wrongName ? "wrong.example" : "localhost"));
        Pump pump(c->client, c->server, PumpOptions{}, 1);
        CHECK(pump.settle());
        CHECK(c->client.engine->status().failed);
        CHECK_FALSE(c->client.engine->status().handshakeDone);
        CHECK_FALSE(c->server.engine->status().handshakeDone);
        CHECK(c->client.failedTransitions == 1);
        CHECK(c->server.failedTransitions <= 1);
        CHECK_FALSE(c->client.engine->errorReason().empty());
        // The refusal is told to the server in an alert, not by silence.
        CHECK_FALSE(c->clientSeen.alertsSent.empty());
        checkClean(pump);
    }
}

// --- Data transfer -------------------------------------------------------------------------------

TEST_CASE("data arrives byte-exact for every pair size with random chunking") {
    const std::uint32_t seed = testSeed();
    INFO("seed " << seed);
    std::mt19937 rng(seed);
    for (const TlsVersion v : {TlsVersion::tls13, TlsVersion::tls12}) {
        for (const std::size_t pairSize : {1UL, 7UL, 64UL, 1 * KiB, 16 * KiB, 64 * KiB}) {
            CAPTURE(pairSize);
            INFO("version " << versionName(v));
            auto c = connect(version(v), {}, serverOptions(pairSize), clientOptions(pairSize));
            PumpOptions options;
            options.randomChunks = true;
            options.maxOffer = 20 * KiB;
            Pump pump(c->client, c->server, options, seed + static_cast<std::uint32_t>(pairSize));
            handshake(*c, pump);
            const std::size_t volume = pairSize < 1 * KiB ? 256 * KiB : 1 * MiB;
            transfer(*c, pump, randomBytes(volume, rng), randomBytes(volume / 2, rng));
            checkClean(pump);
        }
    }
}

TEST_CASE("one-byte delivery both ways") {
    const std::uint32_t seed = testSeed();
    INFO("seed " << seed);
    std::mt19937 rng(seed);
    for (const std::size_t pairSize : {1UL, 16 * KiB}) {
        CAPTURE(pairSize);
        auto c = connect({}, {}, serverOptions(pairSize), clientOptions(pairSize));
        PumpOptions options;
        options.maxCipherChunk = 1;
        options.maxPlainChunk = 1;
        Pump pump(c->client, c->server, options, seed);
        handshake(*c, pump);
        transfer(*c, pump, randomBytes(256 * KiB, rng), randomBytes(256 * KiB, rng));
        checkClean(pump);
    }
}

TEST_CASE("16 MiB each way at the same time, byte-exact by SHA-256") {
    const std::uint32_t seed = testSeed();
    INFO("seed " << seed);
    std::mt19937 rng(seed);
    auto c = connect({}, {}, serverOptions(16 * KiB), clientOptions(16 * KiB));
    PumpOptions options;
    options.randomChunks = true;
    options.maxOffer = 64 * KiB;
    options.maxIterations = 200'000;
    Pump pump(c->client, c->server, options, seed);
    handshake(*c, pump);
    transfer(*c, pump, randomBytes(16 * MiB, rng), randomBytes(16 * MiB, rng), true);
    checkClean(pump);
}

TEST_CASE("spans stay valid and unmoved while held until their commit or consume") {
    const std::uint32_t seed = testSeed();
    INFO("seed " << seed);
    std::mt19937 rng(seed);
    for (const std::size_t pairSize : {7UL, 1 * KiB, 16 * KiB}) {
        CAPTURE(pairSize);
        // Pairs that may grow (bulkPairSize) must never move under a held span either.
        EngineOptions server = serverOptions(pairSize);
        EngineOptions client = clientOptions(pairSize);
        server.bulkPairSize = client.bulkPairSize = 4 * pairSize;
        auto c = connect({}, {}, server, client);
        PumpOptions options;
        options.randomChunks = true;
        options.pinned = true;
        Pump pump(c->client, c->server, options, seed);
        handshake(*c, pump);
        transfer(*c, pump, randomBytes(512 * KiB, rng), randomBytes(512 * KiB, rng));
        checkClean(pump);
    }
}

TEST_CASE("re-offered bytes may come from another buffer and in another length") {
    const std::uint32_t seed = testSeed();
    INFO("seed " << seed);
    std::mt19937 rng(seed);
    PumpOptions options;
    options.randomChunks = true;
    SUBCASE("moved buffer and same length") {
        options.copyOffers = true;
    }
    SUBCASE("same buffer and lengths never below a refused offer") {
        options.randomOffers = true;
        options.keepRefusedLength = true;
    }
    SUBCASE("moved buffer and lengths never below a refused offer") {
        // The header's rule (OpenSSL's, for SSL_write retries): at least the refused length.
        options.copyOffers = true;
        options.randomOffers = true;
        options.keepRefusedLength = true;
    }
    for (const std::size_t pairSize : {64UL, 4 * KiB}) {
        CAPTURE(pairSize);
        auto c = connect({}, {}, serverOptions(pairSize), clientOptions(pairSize));
        options.maxOffer = 40 * KiB;
        Pump pump(c->client, c->server, options, seed);
        handshake(*c, pump);
        transfer(*c, pump, randomBytes(512 * KiB, rng), randomBytes(512 * KiB, rng));
        CHECK(c->client.zeroWrites > 0); // the re-offer path was taken
        checkClean(pump);
    }
}

TEST_CASE("a re-offer shorter than the refused one is a caller error, reported as local") {
    const std::uint32_t seed = testSeed();
    INFO("seed " << seed);
    std::mt19937 rng(seed);
    auto c = connect({}, {}, serverOptions(16 * KiB), clientOptions(512));
    Pump pump(c->client, c->server, PumpOptions{}, seed);
    handshake(*c, pump);
    const Bytes data = randomBytes(64 * KiB, rng);
    // Fill the 512-byte pair until an offer is refused.
    std::size_t taken = 0;
    std::size_t refused = 0;
    for (int round = 0; round < 1000 && refused == 0; ++round) {
        const std::size_t offer = std::min<std::size_t>(data.size() - taken, 4 * KiB);
        const std::size_t n = c->client.engine->write(std::span(data).subspan(taken, offer));
        taken += n;
        if (n == 0) {
            refused = offer;
        }
    }
    REQUIRE(refused > 1);
    REQUIRE_FALSE(c->client.engine->status().failed);
    moveAll(c->client, c->server, pump);
    CHECK(c->client.engine->write(std::span(data).subspan(taken, refused - 1)) == 0);
    CHECK(c->client.engine->status().failed);
    CHECK(c->client.engine->errorSource() == sluice::ErrorSource::local);
    CHECK(c->client.engine->errorReason().find("fewer than") != std::string::npos);
    // The error is sticky and the engine stays safe to call.
    CHECK(c->client.engine->write(std::span(data).subspan(taken, refused)) == 0);
    CHECK(c->client.engine->plainOut().empty());
}

TEST_CASE("idle engines release their pair and re-create it on the next byte") {
    const std::uint32_t seed = testSeed();
    INFO("seed " << seed);
    std::mt19937 rng(seed);
    for (const auto version : {TlsVersion::tls12, TlsVersion::tls13}) {
        ContextOptions only;
        only.version = version;
        auto c = connect(only, only, serverOptions(4 * KiB), clientOptions(4 * KiB));
        Pump pump(c->client, c->server, PumpOptions{}, seed);
        handshake(*c, pump);
        for (int round = 0; round < 4; ++round) {
            transfer(*c, pump, randomBytes(64 * KiB, rng), randomBytes(64 * KiB, rng));
            CHECK(c->client.engine->releaseIdleBuffers());
            CHECK(c->server.engine->releaseIdleBuffers());
            CHECK(c->server.engine->cipherOut().empty());
            CHECK(c->server.engine->cipherInCapacity() == 4 * KiB);
        }
        // With ciphertext queued, nothing is released.
        const Bytes data = randomBytes(1000, rng);
        REQUIRE(c->client.engine->write(data) == data.size());
        CHECK_FALSE(c->client.engine->releaseIdleBuffers());
        CHECK(c->client.engine->cipherOutPending() > 0);
        transfer(*c, pump, {}, {});
        checkClean(pump);
    }
}

TEST_CASE("kept record buffers stay from one call to the next and go with the idle release") {
    const std::uint32_t seed = testSeed();
    INFO("seed " << seed);
    std::mt19937 rng(seed);
    auto c = connect({}, {}, serverOptions(16 * KiB), clientOptions(16 * KiB));
    Pump pump(c->client, c->server, PumpOptions{}, seed);
    handshake(*c, pump);
    Engine &server = *c->server.engine;
    transfer(*c, pump, randomBytes(1000, rng), randomBytes(1000, rng));
    if (OpenSSL_version_num() < 0x300000e0L) {
        // Releasing them later is unsafe there: nothing is kept, and nothing is counted.
        server.keepRecordBuffers();
        CHECK(server.warmBytes() == server.pairBytes());
        return;
    }
    CHECK(server.warmBytes() == server.pairBytes() + Engine::recordBufferBytes);
    auto heap = [] {
        const struct mallinfo2 info = mallinfo2();
        return static_cast<double>(info.uordblks + info.hblkhd);
    };
    // The same small exchange three ways; after each the heap is read with both pairs there.
    auto exchange = [&](bool keep) {
        REQUIRE(server.releaseIdleBuffers());
        REQUIRE(c->client.engine->releaseIdleBuffers());
        if (keep) {
            server.keepRecordBuffers();
        }
        transfer(*c, pump, randomBytes(1000, rng), randomBytes(1000, rng));
        return heap();
    };
    const double plain = exchange(false);
    const double kept = exchange(true);
    const double again = exchange(false); // the release turned OpenSSL's freeing on again
    INFO("heap after an exchange: " << plain << " bytes, " << kept << " with the record buffers "
                                    << "kept, " << again << " after they were released");
#if !defined(__SANITIZE_ADDRESS__) // ASan's allocator is not glibc's: mallinfo2 does not see it
    CHECK(kept - plain > 30 * 1024);
    CHECK(kept - plain < Engine::recordBufferBytes + 4 * 1024);
    CHECK(std::abs(again - plain) < 4 * 1024);
#endif
    // Kept for many exchanges, in both engines, nothing is lost or reordered.
    server.keepRecordBuffers();
    c->client.engine->keepRecordBuffers();
    for (int round = 0; round < 8; ++round) {
        transfer(*c, pump, randomBytes(20 * KiB, rng), randomBytes(300, rng));
    }
    CHECK(server.releaseIdleBuffers());
    CHECK(c->client.engine->releaseIdleBuffers());
    checkClean(pump);
}

TEST_CASE("a pair that fills grows to bulkPairSize once empty; small exchanges keep it small") {
    const std::uint32_t seed = testSeed();
    INFO("seed " << seed);
    std::mt19937 rng(seed);
    EngineOptions server = serverOptions(16 * KiB);
    EngineOptions client = clientOptions(16 * KiB);
    server.bulkPairSize = client.bulkPairSize = 64 * KiB;
    {
        auto c = connect({}, {}, server, client);
        Pump pump(c->client, c->server, PumpOptions{}, seed);
        handshake(*c, pump);
        transfer(*c, pump, randomBytes(1000, rng), randomBytes(1000, rng));
        CHECK(c->server.engine->pairBytes() == 2 * 16 * KiB);
        CHECK(c->client.engine->pairBytes() == 2 * 16 * KiB);
        // Bulk both ways: the pairs grow mid-stream and not a byte is lost or reordered.
        transfer(*c, pump, randomBytes(2 * MiB, rng), randomBytes(2 * MiB, rng));
        CHECK(c->server.engine->pairBytes() == 2 * 64 * KiB);
        CHECK(c->client.engine->pairBytes() == 2 * 64 * KiB);
        // Released when idle, and made again at the grown size.
        CHECK(c->server.engine->releaseIdleBuffers());
        CHECK(c->server.engine->pairBytes() == 0);
        CHECK(c->server.engine->cipherInCapacity() == 64 * KiB);
        transfer(*c, pump, randomBytes(100 * KiB, rng), randomBytes(100 * KiB, rng));
        checkClean(pump);
    }
    {
        // A lent span pins the pair: growth waits until the span is committed.
        auto c = connect({}, {}, server, client);
        Pump pump(c->client, c->server, PumpOptions{}, seed);
        handshake(*c, pump);
        Engine &engine = *c->server.engine;
        const auto lent = engine.cipherInSpace();
        REQUIRE(lent.size() == 16 * KiB);
        const Bytes down = randomBytes(256 * KiB, rng);
        std::size_t taken = writeSome(c->server, down, pump); // refused once the pair is full
        REQUIRE(taken < down.size());
        const Bytes flight = takeCipherOut(c->server, pump); // the pair is empty again
        REQUIRE(feed(c->client, flight, pump) == flight.size());
        taken += writeSome(c->server, std::span(down).subspan(taken), pump);
        CHECK(engine.pairBytes() == 2 * 16 * KiB); // `lent` still points into this pair
        engine.commitCipherIn(0);                  // ... up to here
        const Bytes more = takeCipherOut(c->server, pump);
        REQUIRE(feed(c->client, more, pump) == more.size());
        taken += writeSome(c->server, std::span(down).subspan(taken), pump);
        CHECK(engine.pairBytes() == 2 * 64 * KiB); // grown at the first chance after
        c->server.outgoing = down;
        c->server.accepted = taken;
        const Outcome outcome = pump.run(
            [&] { return c->server.allSent() && c->client.received.size() == down.size(); });
        CHECK(outcome == Outcome::done);
        CHECK_SAME_BYTES(down, c->client.received);
        checkClean(pump);
    }
    // Without bulkPairSize the same volume leaves the pair as it was made.
    auto c = connect({}, {}, serverOptions(16 * KiB), clientOptions(16 * KiB));
    Pump pump(c->client, c->server, PumpOptions{}, seed);
    handshake(*c, pump);
    transfer(*c, pump, randomBytes(1 * MiB, rng), randomBytes(1 * MiB, rng));
    CHECK(c->server.engine->pairBytes() == 2 * 16 * KiB);
    checkClean(pump);
}

TEST_CASE("held TLS 1.3 tickets leave with the first reply or on release; TLS 1.2 holds none") {
    for (const auto v : {TlsVersion::tls12, TlsVersion::tls13}) {
        for (const bool reply : {true, false}) {
            INFO(versionName(v) << (reply ? ", with a reply" : ", released"));
            EngineOptions held = serverOptions();
            held.holdTickets = true;
            auto c = connect(version(v), version(v), held);
            Pump pump(c->client, c->server, PumpOptions{}, 1);
            Engine &server = *c->server.engine;
            // By hand, so nothing flushes the server's last output: ClientHello, the server's
            // flight, the client's Finished.
            for (int step = 0; step < 10 && !server.status().handshakeDone; ++step) {
                moveAll(c->client, c->server, pump);
                if (!server.status().handshakeDone) {
                    moveAll(c->server, c->client, pump);
                }
            }
            REQUIRE(server.status().handshakeDone);
            const int ticketsSeen = c->clientSeen.handshakeReceived[SSL3_MT_NEWSESSION_TICKET];
            if (v == TlsVersion::tls12) {
                // TLS 1.2 sends its ticket inside the handshake, before the Finished.
                CHECK_FALSE(server.ticketsHeld());
                continue;
            }
            CHECK(ticketsSeen == 0);
            REQUIRE(server.ticketsHeld());
            const std::size_t ticketBytes = server.cipherOutPending();
            CHECK(ticketBytes > 0);
            if (reply) {
                const Bytes data = toBytes("the first reply");
                REQUIRE(server.write(data) == data.size());
                CHECK_FALSE(server.ticketsHeld());
                CHECK(server.cipherOutPending() > ticketBytes); // tickets, then the record
                moveAll(c->server, c->client, pump);
                drainPlain(c->client, pump);
                CHECK_SAME_BYTES(data, c->client.received);
            } else {
                server.releaseTickets();
                CHECK_FALSE(server.ticketsHeld());
                moveAll(c->server, c->client, pump);
            }
            CHECK(c->clientSeen.handshakeReceived[SSL3_MT_NEWSESSION_TICKET] >= 1);
            CHECK_FALSE(c->client.engine->status().failed);
        }
    }
    // Without the option nothing is held; with it, the client role never holds.
    auto plain = connect(version(TlsVersion::tls13), version(TlsVersion::tls13));
    Pump pump(plain->client, plain->server, PumpOptions{}, 1);
    handshake(*plain, pump);
    CHECK_FALSE(plain->server.engine->ticketsHeld());
    CHECK_FALSE(plain->client.engine->ticketsHeld());
}

TEST_CASE("the first 64 KiB leave in small records, the rest in full ones") {
    // LESSONS #19: small records while the connection starts, full records for throughput.
    const std::uint32_t seed = testSeed();
    INFO("seed " << seed);
    std::mt19937 rng(seed);
    for (const auto version : {TlsVersion::tls12, TlsVersion::tls13}) {
        ContextOptions only;
        only.version = version;
        auto c = connect(only, only, serverOptions(256 * KiB), clientOptions(256 * KiB));
        Pump pump(c->client, c->server, PumpOptions{}, seed);
        handshake(*c, pump);
        moveAll(c->client, c->server, pump);
        moveAll(c->server, c->client, pump);
        REQUIRE(c->server.engine->cipherOutPending() == 0);
        const Bytes data = randomBytes(192 * KiB, rng);
        std::size_t taken = 0;
        for (int round = 0; round < 10000 && taken < data.size(); ++round) {
            const std::size_t n = c->server.engine->write(std::span(data).subspan(taken));
            REQUIRE(n > 0);
            taken += n;
        }
        // Read the record lengths back from the ciphertext (5-byte headers).
        Bytes wire;
        while (!c->server.engine->cipherOut().empty()) {
            auto out = c->server.engine->cipherOut();
            wire.insert(wire.end(), out.begin(), out.end());
            c->server.engine->consumeCipherOut(out.size());
        }
        std::vector<std::size_t> lengths;
        for (std::size_t at = 0; at + 5 <= wire.size();) {
            const std::size_t length = (std::size_t{wire[at + 3]} << 8) | wire[at + 4];
            lengths.push_back(length);
            at += 5 + length;
        }
        REQUIRE(lengths.size() > 47);
        // 64 KiB in records of at most 1,400 bytes plus the cipher's overhead: 47 of them.
        for (std::size_t i = 0; i < 47; ++i) {
            CHECK(lengths[i] <= 1400 + 64);
        }
        CHECK(*std::max_element(lengths.begin(), lengths.end()) >= 16384);
        CHECK(lengths.size() < 47 + 16); // the remaining 128 KiB in full records
        // And the bytes still arrive intact.
        Bytes delivered;
        for (std::size_t at = 0; at < wire.size();) {
            auto space = c->client.engine->cipherInSpace();
            const std::size_t n = std::min(space.size(), wire.size() - at);
            std::copy_n(wire.begin() + static_cast<std::ptrdiff_t>(at), n, space.begin());
            c->client.engine->commitCipherIn(n);
            at += n;
            auto plain = c->client.engine->plainOut();
            delivered.insert(delivered.end(), plain.begin(), plain.end());
            c->client.engine->consumePlainOut(plain.size());
        }
        for (auto plain = c->client.engine->plainOut(); !plain.empty();
             plain = c->client.engine->plainOut()) {
            delivered.insert(delivered.end(), plain.begin(), plain.end());
            c->client.engine->consumePlainOut(plain.size());
        }
        CHECK(delivered == data);
    }
}

TEST_CASE("many records in one feed are all delivered without further input") {
    // LESSONS #1: one SSL_read per feed would leave all but the first record stuck.
    for (const TlsVersion v : {TlsVersion::tls13, TlsVersion::tls12}) {
        INFO("version " << versionName(v));
        auto c = connect(version(v), {}, serverOptions(64 * KiB), clientOptions(64 * KiB));
        Pump pump(c->client, c->server, PumpOptions{}, 1);
        handshake(*c, pump);

        Bytes sent;
        for (int i = 0; i < 200; ++i) {
            const std::string piece = "record " + std::to_string(i) + " of many small writes;";
            REQUIRE(writeSome(c->client, asSpan(piece), pump) == piece.size());
            sent.insert(sent.end(), piece.begin(), piece.end());
        }
        const Bytes wire = takeCipherOut(c->client, pump);
        REQUIRE(wire.size() > sent.size() + 200 * 5); // at least one record header per write
        const auto space = c->server.engine->cipherInSpace();
        REQUIRE(space.size() >= wire.size());
        std::memcpy(space.data(), wire.data(), wire.size());
        c->server.engine->commitCipherIn(wire.size());
        pump.observe(c->server);

        // Everything must already be decrypted: no further ciphertext, no other call.
        const auto plain = c->server.engine->plainOut();
        CHECK(plain.size() == sent.size());
        drainPlain(c->server, pump);
        CHECK_SAME_BYTES(sent, c->server.received);
        checkClean(pump);
    }
}

TEST_CASE("a short read's plaintext waits in a small block that grows when more arrives") {
    // The plaintext of a short record goes into a small block; bytes that arrive while it waits
    // move it to a full one, in order, and the budget still bounds what is held.
    std::mt19937 rng(testSeed());
    for (const TlsVersion v : {TlsVersion::tls13, TlsVersion::tls12}) {
        INFO("version " << versionName(v));
        EngineOptions serverOpts = serverOptions(64 * KiB);
        serverOpts.plaintextBudget = 48 * KiB;
        auto c = connect(version(v), {}, serverOpts, clientOptions(64 * KiB));
        Pump pump(c->client, c->server, PumpOptions{}, 1);
        handshake(*c, pump);

        Bytes sent = toBytes("a short request");
        REQUIRE(writeSome(c->client, sent, pump) == sent.size());
        Bytes wire = takeCipherOut(c->client, pump);
        REQUIRE(feed(c->server, wire, pump) == wire.size());
        REQUIRE(c->server.engine->plainOut().size() == sent.size());

        // Not consumed; then 60 KiB more, past the small block and past the budget.
        const Bytes more = randomBytes(60 * KiB, rng);
        REQUIRE(writeSome(c->client, more, pump) == more.size());
        wire = takeCipherOut(c->client, pump);
        std::size_t fed = feed(c->server, wire, pump);
        CHECK(fed > 16 * KiB);
        const std::size_t held = c->server.engine->plainOut().size();
        CHECK(held > 16 * KiB);
        CHECK(held <= serverOpts.plaintextBudget);
        sent.insert(sent.end(), more.begin(), more.end());

        for (int guard = 0; guard < 1000 && c->server.received.size() < sent.size(); ++guard) {
            drainPlain(c->server, pump);
            if (fed < wire.size()) {
                fed += feed(c->server, std::span<const std::uint8_t>(wire).subspan(fed), pump);
            }
        }
        CHECK_SAME_BYTES(sent, c->server.received);
        checkClean(pump);
    }
}

TEST_CASE("a paused consumer stops ciphertext intake and resumes without new input") {
    // LESSONS #2 and #10: bounded memory while paused; buffered bytes delivered on resume.
    const std::uint32_t seed = testSeed();
    INFO("seed " << seed);
    std::mt19937 rng(seed);
    // Records of at most 1000 bytes: whole records wait in the pair while the consumer pauses.
    for (const std::size_t pairSize : {4 * KiB, 16 * KiB}) {
        CAPTURE(pairSize);
        EngineOptions serverOpts = serverOptions(pairSize);
        serverOpts.plaintextBudget = 20 * KiB;
        auto c = connect({}, {}, serverOpts, clientOptions(pairSize));
        PumpOptions options;
        options.randomChunks = true;
        options.maxOffer = 1000;
        Pump pump(c->client, c->server, options, seed);
        handshake(*c, pump);

        c->client.outgoing = randomBytes(1 * MiB, rng);
        c->server.readPaused = true;
        CHECK(pump.settle());
        const std::size_t held = c->server.engine->plainOut().size();
        CHECK(held > 0);
        CHECK(held <= serverOpts.plaintextBudget);
        CHECK(c->server.engine->cipherInSpace().empty()); // intake stopped, memory bounded
        CHECK(c->client.engine->cipherOutPending() > 0);
        CHECK(c->client.accepted < c->client.outgoing.size());
        CHECK(c->server.received.empty());
        CHECK_FALSE(c->server.engine->status().failed);

        // Resume with no new ciphertext: what is already inside the engine must come out.
        std::size_t resumed = 0;
        for (int i = 0; i < 100000; ++i) {
            const auto plain = c->server.engine->plainOut();
            if (plain.empty())
                break;
            c->server.received.insert(c->server.received.end(), plain.begin(), plain.end());
            c->server.engine->consumePlainOut(plain.size());
            pump.observe(c->server);
            resumed += plain.size();
        }
        CHECK(resumed > held);
        CHECK_FALSE(c->server.engine->cipherInSpace().empty());

        c->server.readPaused = false;
        const Outcome outcome = pump.run([&] {
            return c->client.allSent() && c->server.received.size() >= c->client.outgoing.size();
        });
        CHECK(outcome == Outcome::done);
        CHECK_SAME_BYTES(c->client.outgoing, c->server.received);
        checkClean(pump);
    }
}

TEST_CASE("a full pair makes write return 0 and the re-offered bytes lose nothing") {
    // LESSONS #3.
    const std::uint32_t seed = testSeed();
    INFO("seed " << seed);
    std::mt19937 rng(seed);
    for (const std::size_t pairSize : {1UL, 512UL, 16 * KiB}) {
        CAPTURE(pairSize);
        auto c = connect({}, {}, serverOptions(64 * KiB), clientOptions(pairSize));
        Pump pump(c->client, c->server, PumpOptions{}, seed);
        handshake(*c, pump);

        // A one-byte pair moves one byte per round: keep its volume small.
        const Bytes data = randomBytes(pairSize == 1 ? 64 * KiB : 256 * KiB, rng);
        std::size_t taken = 0;
        std::size_t zeros = 0;
        for (int round = 0; round < 1'000'000 && taken < data.size(); ++round) {
            // Offer until the engine refuses: the ciphertext queue is full.
            const std::size_t n =
                writeSome(c->client,
                          std::span(data).subspan(
                              taken, std::min<std::size_t>(data.size() - taken, 32 * KiB)),
                          pump);
            taken += n;
            if (taken == data.size())
                break;
            ++zeros;
            REQUIRE_FALSE(c->client.engine->status().failed);
            REQUIRE(c->client.engine->cipherOutPending() > 0);
            // A refused offer repeated at once is refused again and changes nothing.
            const std::size_t pending = c->client.engine->cipherOutPending();
            if (pending == pairSize) {
                const std::size_t again = std::min<std::size_t>(data.size() - taken, 32 * KiB);
                CHECK(c->client.engine->write(std::span(data).subspan(taken, again)) == 0);
                pump.observe(c->client);
            }
            // Drain some ciphertext to the server, then offer the same bytes again.
            moveAll(c->client, c->server, pump);
            drainPlain(c->server, pump);
        }
        CHECK(zeros > 0);
        for (int round = 0; round < 100000 && c->client.engine->cipherOutPending() > 0; ++round) {
            moveAll(c->client, c->server, pump);
            drainPlain(c->server, pump);
        }
        drainPlain(c->server, pump);
        CHECK(taken == data.size());
        CHECK_SAME_BYTES(data, c->server.received);
        checkClean(pump);
    }
}

// --- KeyUpdate and renegotiation -----------------------------------------------------------------

TEST_CASE("KeyUpdate mid-stream in both directions keeps data byte-exact") {
    const std::uint32_t seed = testSeed();
    INFO("seed " << seed);
    std::mt19937 rng(seed);
    for (const std::size_t pairSize : {64UL, 16 * KiB}) {
        CAPTURE(pairSize);
        auto c = connect(version(TlsVersion::tls13), {}, serverOptions(pairSize),
                         clientOptions(pairSize));
        PumpOptions options;
        options.randomChunks = true;
        options.maxOffer = 8 * KiB;
        Pump pump(c->client, c->server, options, seed);
        handshake(*c, pump);

        const std::size_t volume = 1 * MiB;
        c->client.outgoing = randomBytes(volume, rng);
        c->server.outgoing = randomBytes(volume, rng);

        struct Update {
            Endpoint *who;
            bool requestPeer;
        };
        const Update updates[] = {
            {&c->client, false}, {&c->server, false}, {&c->client, true}, {&c->server, true}};
        int phase = 0;
        for (const Update &u : updates) {
            ++phase;
            CAPTURE(phase);
            // Run until both directions carried another slice, so the update is mid-stream.
            const std::size_t mark = volume * static_cast<std::size_t>(phase) / 5;
            REQUIRE(pump.run([&] {
                return c->server.received.size() >= mark && c->client.received.size() >= mark;
            }) == Outcome::done);
            // OpenSSL cannot start an update over a half-written record; step until it can.
            bool started = false;
            for (int attempt = 0; attempt < 1000 && !started; ++attempt) {
                started = u.who->engine->requestKeyUpdate(u.requestPeer);
                pump.observe(*u.who);
                if (!started)
                    pump.step();
            }
            REQUIRE(started);
        }
        REQUIRE(pump.run([&] { return transferDone(*c); }) == Outcome::done);
        CHECK(pump.settle());
        CHECK_SAME_BYTES(c->client.outgoing, c->server.received);
        CHECK_SAME_BYTES(c->server.outgoing, c->client.received);
        CHECK_FALSE(c->server.engine->status().failed);
        CHECK_FALSE(c->client.engine->status().failed);

        // RFC 8446 4.6.3 wants the answer to update_requested only before the next application
        // data record, and OpenSSL sends it then: both sides write once more after reading all.
        transfer(*c, pump, randomBytes(10 * KiB, rng), randomBytes(10 * KiB, rng));

        // Each side sent one update of its own, one requesting the peer's, and one in answer.
        for (const TlsObserver *seen : {&c->clientSeen, &c->serverSeen}) {
            INFO("observer of the " << std::string(seen == &c->clientSeen ? "client" : "server"));
            CHECK(seen->keyUpdatesSent[0] == 2);
            CHECK(seen->keyUpdatesSent[1] == 1);
            CHECK(seen->keyUpdatesReceived[0] == 2);
            CHECK(seen->keyUpdatesReceived[1] == 1);
        }
        checkClean(pump);
    }
}

TEST_CASE("client-initiated TLS 1.2 renegotiation is refused") {
    // LESSONS #18.
    const std::uint32_t seed = testSeed();
    INFO("seed " << seed);
    std::mt19937 rng(seed);
    auto c = connect(version(TlsVersion::tls12), version(TlsVersion::tls12));
    Pump pump(c->client, c->server, PumpOptions{}, seed);
    handshake(*c, pump);
    const auto before = c->server.engine->handshake();

    transfer(*c, pump, randomBytes(64 * KiB, rng), randomBytes(64 * KiB, rng));
    const Bytes delivered = c->server.received;

    REQUIRE(c->client.engine->requestRenegotiation());
    pump.observe(c->client);
    c->client.outgoing.insert(c->client.outgoing.end(), 1000, 'z'); // offered during the attempt
    CHECK(pump.settle());

    // The server answers the second ClientHello with a no_renegotiation warning and never with
    // a second ServerHello; OpenSSL's client treats the refusal as fatal and says so.
    CHECK(c->serverSeen.sentAlert(SSL3_AL_WARNING, SSL_AD_NO_RENEGOTIATION));
    CHECK(c->serverSeen.handshakeSent[SSL3_MT_SERVER_HELLO] == 1);
    CHECK(c->client.engine->status().failed);
    CHECK(c->client.failedTransitions == 1);
    CHECK(c->clientSeen.sentAlert(SSL3_AL_FATAL, SSL_AD_HANDSHAKE_FAILURE));

    // The server's handshake is the first one, and it delivered exactly the bytes sent before.
    const auto &after = c->server.engine->handshake();
    CHECK(after.protocol == before.protocol);
    CHECK(after.cipher == before.cipher);
    CHECK_SAME_BYTES(delivered, c->server.received);
    CHECK(c->server.engine->status().failed); // by the client's fatal alert
    CHECK(c->server.engine->errorSource() == ErrorSource::peer);
    CHECK(c->server.failedTransitions == 1);
    CHECK(c->server.engine->finished());
    checkClean(pump);
}

// --- The ends of a stream ------------------------------------------------------------------------

TEST_CASE("close_notify each way delivers every byte before it") {
    const std::uint32_t seed = testSeed();
    INFO("seed " << seed);
    std::mt19937 rng(seed);
    for (const TlsVersion v : {TlsVersion::tls13, TlsVersion::tls12}) {
        for (const std::size_t pairSize : {7UL, 16 * KiB}) {
            CAPTURE(pairSize);
            INFO("version " << versionName(v));
            auto c = connect(version(v), {}, serverOptions(pairSize), clientOptions(pairSize));
            PumpOptions options;
            options.randomChunks = true;
            Pump pump(c->client, c->server, options, seed);
            handshake(*c, pump);

            // The client closes its direction first; the server keeps sending (half-close).
            c->client.outgoing = randomBytes(100 * KiB, rng);
            c->client.shutdownWhenSent = true;
            c->server.outgoing = randomBytes(300 * KiB, rng);
            REQUIRE(pump.run([&] { return c->server.engine->status().closeNotifyReceived; }) ==
                    Outcome::done);
            CHECK(c->client.engine->status().closeNotifySent);
            CHECK_FALSE(c->client.engine->finished());
            CHECK_FALSE(c->server.engine->finished());
            drainPlain(c->server, pump);
            CHECK_SAME_BYTES(c->client.outgoing, c->server.received);

            c->server.shutdownWhenSent = true;
            CHECK(pump.settle());
            CHECK_SAME_BYTES(c->server.outgoing, c->client.received);
            for (Endpoint *e : {&c->server, &c->client}) {
                INFO("endpoint " << std::string(e->name));
                const EngineStatus st = e->engine->status();
                CHECK(st.closeNotifyReceived);
                CHECK(st.closeNotifySent);
                CHECK_FALSE(st.truncated);
                CHECK_FALSE(st.failed);
                CHECK(e->engine->finished());
                CHECK(e->engine->write(asSpan("late")) == 0);
            }
            checkClean(pump);
        }
    }
}

TEST_CASE("transport EOF without close_notify is reported as truncated") {
    const std::uint32_t seed = testSeed();
    INFO("seed " << seed);
    std::mt19937 rng(seed);
    struct Case {
        bool midRecord;
        std::size_t budget; // a budget smaller than the data keeps the EOF behind plaintext
    };
    for (const Case k : {Case{false, 64 * KiB}, Case{true, 64 * KiB}, Case{false, 1 * KiB}}) {
        const bool midRecord = k.midRecord;
        CAPTURE(midRecord);
        CAPTURE(k.budget);
        EngineOptions serverOpts = serverOptions(64 * KiB);
        serverOpts.plaintextBudget = k.budget;
        auto c = connect({}, {}, serverOpts, clientOptions(64 * KiB));
        PumpOptions options;
        options.closeTransports = false;
        Pump pump(c->client, c->server, options, seed);
        handshake(*c, pump);

        const Bytes first = randomBytes(10 * KiB, rng);
        REQUIRE(writeSome(c->client, first, pump) == first.size());
        Bytes wire = takeCipherOut(c->client, pump);
        const Bytes second = toBytes("a record cut in half by the transport");
        if (midRecord) {
            REQUIRE(writeSome(c->client, second, pump) == second.size());
            const Bytes tail = takeCipherOut(c->client, pump);
            wire.insert(wire.end(), tail.begin(), tail.end() - 7);
        }
        // The consumer has not read yet: the EOF must not void what is waiting.
        REQUIRE(feed(c->server, wire, pump) == wire.size());
        c->server.engine->cipherInEof();
        pump.observe(c->server);
        CHECK(c->server.engine->cipherInSpace().empty());
        drainPlain(c->server, pump);
        CHECK_SAME_BYTES(first, c->server.received);
        const EngineStatus st = c->server.engine->status();
        CHECK(st.truncated);
        CHECK_FALSE(st.closeNotifyReceived);
        CHECK(c->server.engine->plainOut().empty());
        checkClean(pump);
    }
}

TEST_CASE("a server engine starts its handshake at the client's first byte") {
#if !defined(__SANITIZE_ADDRESS__) // ASan's allocator is not glibc's: mallinfo2 does not see it
    {
        // Before any byte a server holds its SSL object only: no pair (2 x 16 KiB here), no
        // handshake message buffer (21.8 KiB) or output buffering BIO (8 KiB), which OpenSSL
        // allocates at the handshake's first step.
        SslCtxPtr ctx = sluice::test::serverContext();
        std::vector<Endpoint> engines;
        engines.reserve(64);
        const struct mallinfo2 before = mallinfo2();
        for (int i = 0; i < 64; ++i) {
            engines.push_back(
                makeEndpoint("server", ctx.get(), Role::server, serverOptions(16 * KiB)));
        }
        const struct mallinfo2 after = mallinfo2();
        const double each = static_cast<double>((after.uordblks + after.hblkhd) -
                                                (before.uordblks + before.hblkhd)) /
                            64;
        INFO("heap per server engine before its first byte: " << each << " bytes");
        CHECK(each < 16 * 1024);
    }
#endif
    for (const bool hello : {false, true}) {
        CAPTURE(hello);
        auto c = connect({}, {}, serverOptions(16 * KiB), clientOptions(16 * KiB));
        Engine &server = *c->server.engine;
        // Nothing has arrived: nothing to send, nothing failed, the whole pair free to read into.
        CHECK(server.cipherOut().empty());
        CHECK(server.cipherOutPending() == 0);
        CHECK_FALSE(server.status().failed);
        CHECK_FALSE(server.status().handshakeDone);
        CHECK(server.cipherInCapacity() == 16 * KiB);
        if (!hello) {
            // A client that leaves without a byte fails the handshake, as the peer's doing.
            server.cipherInEof();
            CHECK(server.status().failed);
            CHECK(server.errorSource() == sluice::ErrorSource::peer);
            CHECK(server.errorReason().find("closed by peer") != std::string::npos);
            CHECK(server.cipherOut().empty());
            CHECK(server.finished());
            continue;
        }
        Pump pump(c->client, c->server, PumpOptions{}, 1);
        handshake(*c, pump);
        transfer(*c, pump, toBytes("first"), toBytes("bytes"));
        checkClean(pump);
    }
}

TEST_CASE("a server accepts the ClientHello before its handshake is done, and knows the SNI") {
    for (const TlsVersion v : {TlsVersion::tls13, TlsVersion::tls12}) {
        CAPTURE(versionName(v));
        auto c = connect(version(v), version(TlsVersion::any));
        Engine &server = *c->server.engine;
        Pump pump(c->client, c->server, PumpOptions{}, 1);
        const Bytes hello = takeCipherOut(c->client, pump);
        REQUIRE(hello.size() > 1);
        // A ClientHello short of its last byte is not yet one.
        feed(c->server, std::span(hello).first(hello.size() - 1), pump);
        CHECK_FALSE(server.status().helloAccepted);
        CHECK(server.handshake().serverName.empty());
        feed(c->server, std::span(hello).last(1), pump);
        CHECK(server.status().helloAccepted);
        CHECK(server.status().ciphertextPending);
        CHECK_FALSE(server.status().handshakeDone);
        CHECK(server.handshake().serverName == "localhost");
        CHECK(server.handshake().protocol.empty()); // the rest waits for the handshake
        handshake(*c, pump);
        CHECK(server.status().helloAccepted);
        CHECK(server.handshake().protocol == versionName(v));
        CHECK_FALSE(c->client.engine->status().helloAccepted); // a server's notion only
        checkClean(pump);
    }
    // A hello the server refuses (no version in common) is answered with an alert only.
    auto c = connect(version(TlsVersion::tls13), version(TlsVersion::tls12));
    Pump pump(c->client, c->server, PumpOptions{}, 1);
    feed(c->server, takeCipherOut(c->client, pump), pump);
    CHECK(c->server.engine->status().failed);
    CHECK_FALSE(c->server.engine->status().helloAccepted);
    CHECK(c->server.engine->status().ciphertextPending); // the alert
}

TEST_CASE("a half-closed engine gives its pair back and still sends the other direction") {
    const std::uint32_t seed = testSeed();
    INFO("seed " << seed);
    std::mt19937 rng(seed);
    for (const bool closeNotify : {false, true}) {
        CAPTURE(closeNotify);
        auto c = connect({}, {}, serverOptions(16 * KiB), clientOptions(16 * KiB));
        PumpOptions options;
        options.closeTransports = false;
        Pump pump(c->client, c->server, options, seed);
        handshake(*c, pump);

        // The client sends its request and leaves: a close_notify then the FIN, or the FIN alone.
        c->client.outgoing = randomBytes(20 * KiB, rng);
        c->client.shutdownWhenSent = closeNotify;
        CHECK(pump.settle());
        c->server.engine->cipherInEof();
        pump.observe(c->server);
        drainPlain(c->server, pump);
        CHECK_SAME_BYTES(c->client.outgoing, c->server.received);
        CHECK(c->server.engine->status().truncated == !closeNotify);
        CHECK(c->server.engine->status().closeNotifyReceived == closeNotify);

        // Waiting for its reply, the server holds no pair, and the transport stays closed.
        CHECK(c->server.engine->releaseIdleBuffers());
        CHECK(c->server.engine->cipherInCapacity() == 0);
        CHECK(c->server.engine->cipherInSpace().empty());

        // The reply goes out through a pair made again, then the server's close_notify.
        c->server.outgoing = randomBytes(100 * KiB, rng);
        c->server.shutdownWhenSent = true;
        CHECK(pump.settle());
        CHECK_SAME_BYTES(c->server.outgoing, c->client.received);
        CHECK(c->client.engine->status().closeNotifyReceived);
        const EngineStatus st = c->server.engine->status();
        CHECK(st.closeNotifySent);
        CHECK_FALSE(st.failed);
        CHECK(st.truncated == !closeNotify);
        CHECK(c->server.engine->cipherInSpace().empty());
        CHECK(c->server.engine->releaseIdleBuffers());
        checkClean(pump);
    }
}

TEST_CASE("bytes after close_notify are never delivered") {
    const std::uint32_t seed = testSeed();
    INFO("seed " << seed);
    std::mt19937 rng(seed);
    for (const TlsVersion v : {TlsVersion::tls13, TlsVersion::tls12}) {
        INFO("version " << versionName(v));
        auto c = connect(version(v), {}, serverOptions(64 * KiB), clientOptions(64 * KiB));
        PumpOptions options;
        options.closeTransports = false;
        Pump pump(c->client, c->server, options, seed);
        handshake(*c, pump);

        const Bytes data = randomBytes(3000, rng);
        REQUIRE(writeSome(c->client, data, pump) == data.size());
        const Bytes dataRecord = takeCipherOut(c->client, pump);
        c->client.engine->shutdown();
        pump.observe(c->client);
        const Bytes closeRecord = takeCipherOut(c->client, pump);
        REQUIRE_FALSE(closeRecord.empty());

        // One feed: data, close_notify, then a replayed data record and plaintext-looking junk.
        Bytes wire = dataRecord;
        wire.insert(wire.end(), closeRecord.begin(), closeRecord.end());
        wire.insert(wire.end(), dataRecord.begin(), dataRecord.end());
        Bytes junk = {SSL3_RT_APPLICATION_DATA, 0x03, 0x03, 0x00, 0x05, 'h', 'e', 'l', 'l', 'o'};
        const Bytes text = toBytes("GET / HTTP/1.1\r\n\r\n");
        junk.insert(junk.end(), text.begin(), text.end());
        wire.insert(wire.end(), junk.begin(), junk.end());
        feed(c->server, wire, pump);
        drainPlain(c->server, pump);
        CHECK(pump.settle());
        drainPlain(c->server, pump);

        CHECK_SAME_BYTES(data, c->server.received);
        const EngineStatus st = c->server.engine->status();
        CHECK(st.closeNotifyReceived);
        CHECK_FALSE(st.truncated);
        CHECK_FALSE(st.failed);
        CHECK(c->server.engine->plainOut().empty());
        checkClean(pump);
    }
}

// --- Errors --------------------------------------------------------------------------------------

TEST_CASE("a corrupted record fails the receiver, which sends an alert") {
    const std::uint32_t seed = testSeed();
    INFO("seed " << seed);
    for (const TlsVersion v : {TlsVersion::tls13, TlsVersion::tls12}) {
        INFO("version " << versionName(v));
        auto c = connect(version(v), {}, serverOptions(), clientOptions());
        Pump pump(c->client, c->server, PumpOptions{}, seed);
        handshake(*c, pump);

        const Bytes good = toBytes("delivered before the corruption");
        REQUIRE(writeSome(c->client, good, pump) == good.size());
        REQUIRE(pump.settle());
        drainPlain(c->server, pump);
        REQUIRE(c->server.received == good);

        const Bytes bad = toBytes("a record whose ciphertext is damaged on the way");
        REQUIRE(writeSome(c->client, bad, pump) == bad.size());
        Bytes wire = takeCipherOut(c->client, pump);
        REQUIRE(wire.size() > 5 + bad.size());
        REQUIRE(wire[0] == SSL3_RT_APPLICATION_DATA);
        wire[5 + bad.size() / 2] ^= 0x01;
        REQUIRE(feed(c->server, wire, pump) == wire.size());

        const EngineStatus st = c->server.engine->status();
        CHECK(st.failed);
        CHECK(c->server.engine->errorSource() == ErrorSource::peer);
        CHECK_FALSE(c->server.engine->errorReason().empty());
        CHECK(c->server.engine->plainOut().empty());
        // The alert must be flushed before the engine counts as finished (LESSONS #9).
        CHECK(st.ciphertextPending);
        CHECK_FALSE(c->server.engine->finished());
        CHECK(c->serverSeen.sentAlert(SSL3_AL_FATAL, SSL_AD_BAD_RECORD_MAC));
        drainPlain(c->server, pump);
        CHECK(c->server.received == good);

        moveAll(c->server, c->client, pump);
        CHECK(c->server.engine->finished());
        CHECK(c->client.engine->status().failed);
        CHECK(c->client.engine->errorSource() == ErrorSource::peer);
        CHECK(c->server.failedTransitions == 1);
        CHECK(c->client.failedTransitions == 1);
        exerciseAfterFailure(c->server, pump);
        exerciseAfterFailure(c->client, pump);
        checkClean(pump);
    }
}

TEST_CASE("a handshake failure is reported exactly once and later calls return nothing") {
    // LESSONS #6, #7, #9.
    const std::uint32_t seed = testSeed();
    INFO("seed " << seed);
    struct Case {
        const char *name;
        ContextOptions server;
        ContextOptions client;
        int alert;
    };
    ContextOptions tls12Aes = version(TlsVersion::tls12);
    tls12Aes.cipherList = "ECDHE-ECDSA-AES128-GCM-SHA256";
    ContextOptions tls12Chacha = version(TlsVersion::tls12);
    tls12Chacha.cipherList = "ECDHE-ECDSA-CHACHA20-POLY1305";
    ContextOptions tls13Aes = version(TlsVersion::tls13);
    tls13Aes.cipherSuites = "TLS_AES_128_GCM_SHA256";
    ContextOptions tls13Chacha = version(TlsVersion::tls13);
    tls13Chacha.cipherSuites = "TLS_CHACHA20_POLY1305_SHA256";
    const Case cases[] = {
        {"client TLS 1.2 only, server TLS 1.3 only", version(TlsVersion::tls13),
         version(TlsVersion::tls12), SSL_AD_PROTOCOL_VERSION},
        {"no shared TLS 1.2 cipher", tls12Aes, tls12Chacha, SSL_AD_HANDSHAKE_FAILURE},
        {"no shared TLS 1.3 suite", tls13Aes, tls13Chacha, SSL_AD_HANDSHAKE_FAILURE},
    };
    for (const Case &k : cases) {
        INFO("case " << std::string(k.name));
        for (const std::size_t pairSize : {1UL, 16 * KiB}) {
            CAPTURE(pairSize);
            auto c = connect(k.server, k.client, serverOptions(pairSize), clientOptions(pairSize));
            PumpOptions options;
            options.randomChunks = true;
            Pump pump(c->client, c->server, options, seed);
            c->client.outgoing = toBytes("never sent");
            c->server.outgoing = toBytes("never sent either");
            CHECK(pump.settle());

            CHECK(c->server.failedTransitions == 1);
            CHECK(c->client.failedTransitions == 1);
            CHECK_FALSE(c->server.engine->status().handshakeDone);
            CHECK_FALSE(c->client.engine->status().handshakeDone);
            CHECK(c->serverSeen.sentAlert(SSL3_AL_FATAL, k.alert));
            CHECK(c->client.engine->errorSource() == ErrorSource::peer); // it got the alert
            CHECK(c->server.engine->errorSource() != ErrorSource::none);
            CHECK(c->server.accepted == 0);
            CHECK(c->client.accepted == 0);
            CHECK(c->server.received.empty());
            CHECK(c->client.received.empty());
            exerciseAfterFailure(c->server, pump);
            exerciseAfterFailure(c->client, pump);
            // More pumping changes nothing.
            CHECK(pump.settle());
            CHECK(c->server.failedTransitions == 1);
            CHECK(c->client.failedTransitions == 1);
            checkClean(pump);
        }
    }
}

TEST_CASE("garbage instead of a ClientHello fails the server as the peer's fault") {
    for (const std::size_t chunk : {1UL, 1000UL}) {
        CAPTURE(chunk);
        SslCtxPtr ctx = sluice::test::serverContext();
        Endpoint server = makeEndpoint("server", ctx.get(), Role::server, serverOptions());
        // The pump here only checks invariants; an idle engine fills its other slot.
        Endpoint idle = makeEndpoint("idle", ctx.get(), Role::server, serverOptions());
        Pump pump(idle, server, PumpOptions{}, 1);
        const std::string_view request = "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n";
        for (std::size_t at = 0; at < request.size() && !server.engine->status().failed;
             at += chunk)
            feed(server, asSpan(request.substr(at, chunk)), pump);
        CHECK(server.engine->status().failed);
        CHECK(server.engine->errorSource() == ErrorSource::peer);
        CHECK_FALSE(server.engine->errorReason().empty());
        CHECK(server.engine->plainOut().empty());
        CHECK_FALSE(server.engine->status().handshakeDone);
        CHECK_FALSE(server.engine->status().helloAccepted);
        exerciseAfterFailure(server, pump);
        checkClean(pump);
    }
}

TEST_CASE("misuse is safe: every call is valid in every state") {
    auto c = connect({}, {});
    Pump pump(c->client, c->server, PumpOptions{}, 1);
    Engine &server = *c->server.engine;
    Engine &client = *c->client.engine;

    // Before the handshake.
    CHECK(server.write(asSpan("too early")) == 0);
    CHECK(client.write(asSpan("too early")) == 0);
    CHECK(client.write({}) == 0);
    server.consumeCipherOut(0);
    server.consumePlainOut(0);
    server.commitCipherIn(0);
    client.consumeCipherOut(0);
    client.consumePlainOut(0);
    client.commitCipherIn(0);
    CHECK_FALSE(server.requestKeyUpdate(false));
    CHECK_FALSE(client.requestKeyUpdate(true));
    CHECK_FALSE(server.requestRenegotiation());
    CHECK(server.plainOut().empty());
    CHECK_FALSE(server.finished());
    pump.observe(c->server);
    pump.observe(c->client);
    CHECK_FALSE(server.status().failed);
    CHECK_FALSE(client.status().failed);

    handshake(*c, pump);
    CHECK(client.write({}) == 0);
    CHECK_FALSE(server.requestRenegotiation()); // only a client may, and only on TLS 1.2
    CHECK_FALSE(client.requestRenegotiation()); // TLS 1.3 has none
    pump.observe(c->client);
    pump.observe(c->server);
    server.consumeCipherOut(0);
    server.consumePlainOut(0);
    server.commitCipherIn(0);
    CHECK_FALSE(server.status().failed);
    CHECK_FALSE(client.status().failed);
    transfer(*c, pump, toBytes("still works"), toBytes("both ways"));

    // Shutdown twice, then keep calling everything after finished().
    c->client.engine->shutdown();
    c->client.engine->shutdown();
    c->server.engine->shutdown();
    pump.observe(c->client);
    pump.observe(c->server);
    CHECK(client.write(asSpan("after shutdown")) == 0);
    CHECK(pump.settle());
    CHECK(server.finished());
    CHECK(client.finished());
    for (Endpoint *e : {&c->server, &c->client}) {
        INFO("endpoint " << std::string(e->name));
        Engine &engine = *e->engine;
        CHECK(engine.write(asSpan("after finished")) == 0);
        engine.shutdown();
        CHECK_FALSE(engine.requestKeyUpdate(false));
        engine.consumeCipherOut(0);
        engine.consumePlainOut(0);
        engine.commitCipherIn(0);
        engine.cipherInEof();
        engine.cipherInEof();
        CHECK(engine.cipherInSpace().empty()); // after EOF
        engine.commitCipherIn(0);
        CHECK(engine.plainOut().empty());
        CHECK(engine.cipherOut().empty());
        CHECK(engine.finished());
        CHECK_FALSE(engine.status().failed);
        CHECK_FALSE(engine.status().truncated); // close_notify came before the EOF
        pump.observe(*e);
    }
    checkClean(pump);

    // A TLS 1.2 connection: KeyUpdate does not exist there.
    auto old = connect(version(TlsVersion::tls12), {});
    Pump oldPump(old->client, old->server, PumpOptions{}, 1);
    handshake(*old, oldPump);
    CHECK_FALSE(old->client.engine->requestKeyUpdate(false));
    CHECK_FALSE(old->server.engine->requestKeyUpdate(true));
    oldPump.observe(old->client);
    oldPump.observe(old->server);
    transfer(*old, oldPump, toBytes("fine"), toBytes("still fine"));
    checkClean(oldPump);

    // Destroying engines mid-handshake and with data queued is fine too (ASan watches).
    auto early = connect({}, {});
    Pump earlyPump(early->client, early->server, PumpOptions{}, 1);
    earlyPump.step();
    early.reset();
}

// --- Stock OpenSSL on the other side -------------------------------------------------------------

/** A plain OpenSSL SSL over its own BIO pair; `network` is the end the test moves bytes from. */
struct StockPeer {
    SSL *ssl = nullptr;
    BIO *network = nullptr;

    StockPeer(SSL_CTX *ctx, bool client, std::size_t pairSize) {
        ssl = SSL_new(ctx);
        REQUIRE(ssl != nullptr);
        BIO *internal = nullptr;
        REQUIRE(BIO_new_bio_pair(&internal, pairSize, &network, pairSize) == 1);
        SSL_set_bio(ssl, internal, internal);
        if (client) {
            SSL_set_connect_state(ssl);
            SSL_set_tlsext_host_name(ssl, "localhost");
            SSL_set1_host(ssl, "localhost");
        } else {
            SSL_set_accept_state(ssl);
        }
    }
    ~StockPeer() {
        SSL_free(ssl);
        BIO_free(network);
    }
    StockPeer(const StockPeer &) = delete;
    StockPeer &operator=(const StockPeer &) = delete;

    /** Moves ciphertext both ways between this SSL and `e`; true if anything moved. */
    bool exchange(Endpoint &e, Pump &pump) {
        bool moved = false;
        const auto space = e.engine->cipherInSpace();
        const std::size_t waiting = BIO_ctrl_pending(network);
        if (!space.empty() && waiting > 0) {
            const int n =
                BIO_read(network, space.data(), static_cast<int>(std::min(space.size(), waiting)));
            if (n > 0) {
                e.engine->commitCipherIn(static_cast<std::size_t>(n));
                pump.observe(e);
                moved = true;
            }
        }
        const auto out = e.engine->cipherOut();
        if (!out.empty()) {
            const int n = BIO_write(network, out.data(), static_cast<int>(out.size()));
            if (n > 0) {
                e.engine->consumeCipherOut(static_cast<std::size_t>(n));
                pump.observe(e);
                moved = true;
            }
        }
        return moved;
    }
};

/** Runs data both ways between a stock SSL and an engine, with an optional stock KeyUpdate. */
void stockTransfer(StockPeer &stock, Endpoint &e, Pump &pump, const Bytes &toEngine,
                   const Bytes &toStock, bool keyUpdate) {
    std::size_t written = 0;
    Bytes stockReceived;
    bool updated = !keyUpdate;
    e.outgoing = toStock;
    e.accepted = 0;
    e.received.clear();
    for (int i = 0; i < 200000; ++i) {
        if (written >= toEngine.size() && stockReceived.size() >= toStock.size() &&
            e.received.size() >= toEngine.size() && e.allSent())
            break;
        if (!updated && written >= toEngine.size() / 2) {
            REQUIRE(SSL_key_update(stock.ssl, SSL_KEY_UPDATE_REQUESTED) == 1);
            updated = true;
        }
        if (written < toEngine.size()) {
            // Retries repeat the same arguments, as OpenSSL requires without partial writes.
            const std::size_t chunk = std::min<std::size_t>(4 * KiB, toEngine.size() - written);
            std::size_t n = 0;
            if (SSL_write_ex(stock.ssl, toEngine.data() + written, chunk, &n) == 1)
                written += n;
            else
                REQUIRE((SSL_get_error(stock.ssl, 0) == SSL_ERROR_WANT_READ ||
                         SSL_get_error(stock.ssl, 0) == SSL_ERROR_WANT_WRITE));
        }
        std::uint8_t buffer[4096];
        std::size_t got = 0;
        while (SSL_read_ex(stock.ssl, buffer, sizeof buffer, &got) == 1)
            stockReceived.insert(stockReceived.end(), buffer, buffer + got);
        if (!e.allSent()) {
            e.accepted += e.engine->write(std::span(e.outgoing).subspan(e.accepted));
            pump.observe(e);
        }
        drainPlain(e, pump);
        stock.exchange(e, pump);
    }
    CHECK(written == toEngine.size());
    CHECK_SAME_BYTES(toEngine, e.received);
    CHECK_SAME_BYTES(toStock, stockReceived);
}

TEST_CASE("a stock OpenSSL client interoperates with a server engine") {
    const std::uint32_t seed = testSeed();
    INFO("seed " << seed);
    std::mt19937 rng(seed);
    for (const TlsVersion v : {TlsVersion::tls13, TlsVersion::tls12}) {
        INFO("version " << versionName(v));
        TlsObserver serverSeen;
        SslCtxPtr serverCtx = sluice::test::serverContext(version(v), &serverSeen);
        SslCtxPtr clientCtx = sluice::test::clientContext();
        Endpoint server = makeEndpoint("server", serverCtx.get(), Role::server, serverOptions());
        // The pump here only checks invariants; an idle engine fills its other slot.
        Endpoint idle = makeEndpoint("idle", serverCtx.get(), Role::server, serverOptions());
        Pump pump(idle, server, PumpOptions{}, seed);
        StockPeer client(clientCtx.get(), true, 4 * KiB);

        int rc = 0;
        for (int i = 0; i < 10000 && (rc = SSL_do_handshake(client.ssl)) != 1; ++i) {
            REQUIRE(SSL_get_error(client.ssl, rc) == SSL_ERROR_WANT_READ);
            client.exchange(server, pump);
        }
        REQUIRE_MESSAGE(rc == 1, sluice::test::opensslErrors());
        for (int i = 0; i < 100 && !server.engine->status().handshakeDone; ++i)
            client.exchange(server, pump);
        CHECK(server.engine->status().handshakeDone);
        CHECK(server.engine->handshake().protocol == SSL_get_version(client.ssl));
        CHECK(server.engine->handshake().cipher ==
              SSL_CIPHER_get_name(SSL_get_current_cipher(client.ssl)));
        CHECK(server.engine->handshake().serverName == "localhost");
        CHECK(SSL_get_verify_result(client.ssl) == X509_V_OK);

        stockTransfer(client, server, pump, randomBytes(1 * MiB, rng), randomBytes(1 * MiB, rng),
                      v == TlsVersion::tls13);
        // The answer to update_requested goes out before the engine's next data (RFC 8446).
        stockTransfer(client, server, pump, randomBytes(1 * KiB, rng), randomBytes(1 * KiB, rng),
                      false);
        if (v == TlsVersion::tls13) {
            CHECK(serverSeen.keyUpdatesReceived[1] == 1);
            CHECK(serverSeen.keyUpdatesSent[0] == 1); // the engine answered the request
        }

        // The stock client closes; the engine sees it, answers, and the client sees that.
        CHECK(SSL_shutdown(client.ssl) == 0);
        for (int i = 0; i < 100; ++i)
            client.exchange(server, pump);
        CHECK(server.engine->status().closeNotifyReceived);
        server.engine->shutdown();
        pump.observe(server);
        for (int i = 0; i < 100; ++i)
            client.exchange(server, pump);
        std::uint8_t byte = 0;
        std::size_t got = 0;
        CHECK(SSL_read_ex(client.ssl, &byte, 1, &got) == 0);
        CHECK(SSL_get_error(client.ssl, 0) == SSL_ERROR_ZERO_RETURN);
        CHECK(server.engine->finished());
        CHECK_FALSE(server.engine->status().failed);
        checkClean(pump);
    }
}

TEST_CASE("a client engine interoperates with a stock OpenSSL server") {
    const std::uint32_t seed = testSeed();
    INFO("seed " << seed);
    std::mt19937 rng(seed);
    SslCtxPtr serverCtx = sluice::test::serverContext();
    SslCtxPtr clientCtx = sluice::test::clientContext();
    Endpoint client = makeEndpoint("client", clientCtx.get(), Role::client, clientOptions(1 * KiB));
    // The pump here only checks invariants; an idle engine fills its other slot.
    Endpoint idle = makeEndpoint("idle", clientCtx.get(), Role::client, clientOptions());
    Pump pump(client, idle, PumpOptions{}, seed);
    StockPeer server(serverCtx.get(), false, 4 * KiB);
    int rc = 0;
    for (int i = 0; i < 10000 && (rc = SSL_do_handshake(server.ssl)) != 1; ++i) {
        REQUIRE(SSL_get_error(server.ssl, rc) == SSL_ERROR_WANT_READ);
        server.exchange(client, pump);
    }
    REQUIRE_MESSAGE(rc == 1, sluice::test::opensslErrors());
    for (int i = 0; i < 100 && !client.engine->status().handshakeDone; ++i)
        server.exchange(client, pump);
    CHECK(client.engine->status().handshakeDone);
    const char *sni = SSL_get_servername(server.ssl, TLSEXT_NAMETYPE_host_name);
    CHECK(std::string(sni != nullptr ? sni : "") == "localhost");
    stockTransfer(server, client, pump, randomBytes(512 * KiB, rng), randomBytes(512 * KiB, rng),
                  true);
    checkClean(pump);
}

TEST_CASE("a server engine refuses a stock OpenSSL client's TLS 1.2 renegotiation") {
    // LESSONS #18, independent of the client engine's requestRenegotiation().
    const std::uint32_t seed = testSeed();
    INFO("seed " << seed);
    std::mt19937 rng(seed);
    TlsObserver serverSeen;
    TlsObserver clientSeen;
    SslCtxPtr serverCtx = sluice::test::serverContext(version(TlsVersion::tls12), &serverSeen);
    SslCtxPtr clientCtx = sluice::test::clientContext(version(TlsVersion::tls12), &clientSeen);
    Endpoint server = makeEndpoint("server", serverCtx.get(), Role::server, serverOptions());
    // The pump here only checks invariants; an idle engine fills its other slot.
    Endpoint idle = makeEndpoint("idle", serverCtx.get(), Role::server, serverOptions());
    Pump pump(idle, server, PumpOptions{}, seed);
    StockPeer client(clientCtx.get(), true, 4 * KiB);

    int rc = 0;
    for (int i = 0; i < 10000 && (rc = SSL_do_handshake(client.ssl)) != 1; ++i)
        client.exchange(server, pump);
    REQUIRE_MESSAGE(rc == 1, sluice::test::opensslErrors());
    const Bytes before = randomBytes(64 * KiB, rng);
    stockTransfer(client, server, pump, before, randomBytes(64 * KiB, rng), false);
    const auto firstHandshake = server.engine->handshake();

    REQUIRE(SSL_renegotiate(client.ssl) == 1);
    int err = SSL_ERROR_NONE;
    for (int i = 0; i < 1000; ++i) {
        rc = SSL_do_handshake(client.ssl);
        err = SSL_get_error(client.ssl, rc);
        if (rc == 1 || (err != SSL_ERROR_WANT_READ && err != SSL_ERROR_WANT_WRITE))
            break;
        drainPlain(server, pump);
        client.exchange(server, pump);
    }
    for (int i = 0; i < 100; ++i)
        client.exchange(server, pump);
    drainPlain(server, pump);

    // The stock client's renegotiation fails on the server's no_renegotiation warning.
    CHECK(rc != 1);
    CHECK(err == SSL_ERROR_SSL);
    CHECK(serverSeen.sentAlert(SSL3_AL_WARNING, SSL_AD_NO_RENEGOTIATION));
    CHECK(serverSeen.handshakeSent[SSL3_MT_SERVER_HELLO] == 1);
    CHECK(clientSeen.sentAlert(SSL3_AL_FATAL, SSL_AD_HANDSHAKE_FAILURE));
    // The server ends on the client's fatal alert, having delivered exactly the earlier bytes.
    CHECK(server.engine->handshake().protocol == firstHandshake.protocol);
    CHECK(server.engine->handshake().cipher == firstHandshake.cipher);
    CHECK_SAME_BYTES(before, server.received);
    CHECK(server.engine->status().failed);
    CHECK(server.engine->errorSource() == ErrorSource::peer);
    CHECK(server.failedTransitions == 1);
    CHECK(server.engine->finished());
    checkClean(pump);
}

TEST_CASE("a stale error on OpenSSL's queue does not fail the engine") {
    // LESSONS #8: the engine clears the queue before each SSL_* call.
    const std::uint32_t seed = testSeed();
    INFO("seed " << seed);
    std::mt19937 rng(seed);
    auto c = connect({}, {}, serverOptions(1 * KiB), clientOptions(1 * KiB));
    PumpOptions options;
    options.randomChunks = true;
    options.dirtyErrors = true;
    Pump pump(c->client, c->server, options, seed);
    handshake(*c, pump);
    transfer(*c, pump, randomBytes(64 * KiB, rng), randomBytes(64 * KiB, rng));
    c->client.shutdownWhenSent = true;
    c->server.shutdownWhenSent = true;
    CHECK(pump.settle());
    CHECK(c->client.engine->finished());
    CHECK(c->server.engine->finished());
    CHECK_FALSE(c->client.engine->status().failed);
    CHECK_FALSE(c->server.engine->status().failed);
    ERR_clear_error();
    checkClean(pump);
}

} // namespace
