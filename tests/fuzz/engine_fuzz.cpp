// The server Engine fed arbitrary ciphertext, either from the first byte or after a complete
// in-memory handshake with a client engine. Whatever arrives, the engine must not crash, must
// keep its queues bounded, must never deliver plaintext after a failure, and must report one
// sticky error.
#include <algorithm>
#include <cstring>
#include <stdexcept>

#include <sluice/engine.hpp>

#include "../unit/tls_fixture.hpp"
#include "fuzz_target.hpp"

namespace sluice::fuzz {
namespace {

constexpr std::size_t pairSize = 4096;
constexpr std::size_t budget = 8192;

void check(bool condition, const char *what) {
    if (!condition) {
        throw std::logic_error(what); // an uncaught exception aborts the fuzzer with a report
    }
}

void drain(Engine &engine) {
    for (int i = 0; i < 64; ++i) {
        auto out = engine.cipherOut();
        auto plain = engine.plainOut();
        check(plain.size() <= budget, "plaintext over budget");
        check(!engine.status().failed || plain.empty(), "plaintext after a failure");
        if (out.empty() && plain.empty()) {
            return;
        }
        engine.consumeCipherOut(out.size());
        engine.consumePlainOut(plain.size());
    }
}

/** Moves ciphertext both ways until neither side has any to send. */
void handshake(Engine &client, Engine &server) {
    for (int i = 0; i < 64 && !(client.status().handshakeDone && server.status().handshakeDone);
         ++i) {
        for (auto [from, to] : {std::pair{&client, &server}, std::pair{&server, &client}}) {
            auto out = from->cipherOut();
            auto space = to->cipherInSpace();
            const std::size_t n = std::min(out.size(), space.size());
            std::memcpy(space.data(), out.data(), n);
            to->commitCipherIn(n);
            from->consumeCipherOut(n);
        }
    }
}

} // namespace

SLUICE_FUZZ_TARGET(engineServer) {
    static const auto serverContext = test::serverContext();
    static const auto clientContext = test::clientContext();
    if (size == 0) {
        return 0;
    }
    // The first byte picks the start state and how the rest is cut into transport reads.
    const bool afterHandshake = (data[0] & 1) != 0;
    const std::size_t chunk = 1 + (data[0] >> 1) * 7;
    ++data;
    --size;

    EngineOptions options;
    options.pairSize = pairSize;
    options.plaintextBudget = budget;
    auto server = Engine::create(serverContext.get(), Role::server, options);
    check(server != nullptr, "server engine");
    std::unique_ptr<Engine> client;
    if (afterHandshake) {
        EngineOptions clientOptions = options;
        clientOptions.serverName = "localhost";
        client = Engine::create(clientContext.get(), Role::client, clientOptions);
        handshake(*client, *server);
        check(server->status().handshakeDone, "in-memory handshake");
    }
    bool failed = false;
    std::string reason;
    while (size > 0) {
        auto space = server->cipherInSpace();
        if (space.empty()) {
            drain(*server);
            space = server->cipherInSpace();
            if (space.empty()) {
                break; // the engine stopped taking input (failed or closed): that is allowed
            }
        }
        const std::size_t n = std::min({chunk, size, space.size()});
        std::memcpy(space.data(), data, n);
        server->commitCipherIn(n);
        data += n;
        size -= n;
        if (failed) {
            check(server->status().failed && server->errorReason() == reason, "sticky error");
        } else if (server->status().failed) {
            failed = true;
            reason = server->errorReason();
            check(!reason.empty(), "an error has a reason");
        }
        std::uint8_t reply[64] = {};
        server->write(reply);
        drain(*server);
    }
    server->cipherInEof();
    drain(*server);
    return 0;
}

} // namespace sluice::fuzz
