// Feeding an Engine arbitrary ciphertext, shared by the fuzz targets that do it with different
// contexts and roles. Whatever arrives, the engine must not crash, must keep its queues bounded,
// must never deliver plaintext after a failure, and must report one sticky error.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>

#include <sluice/engine.hpp>

namespace sluice::fuzz {

constexpr std::size_t feedPairSize = 4096;
constexpr std::size_t feedBudget = 8192;

inline void check(bool condition, const char *what) {
    if (!condition) {
        throw std::logic_error(what); // an uncaught exception aborts the fuzzer with a report
    }
}

inline void drain(Engine &engine) {
    for (int i = 0; i < 64; ++i) {
        auto out = engine.cipherOut();
        auto plain = engine.plainOut();
        check(plain.size() <= feedBudget, "plaintext over budget");
        check(!engine.status().failed || plain.empty(), "plaintext after a failure");
        if (out.empty() && plain.empty()) {
            return;
        }
        engine.consumeCipherOut(out.size());
        engine.consumePlainOut(plain.size());
    }
}

/** Moves ciphertext both ways until neither side has any to send. */
inline void handshake(Engine &client, Engine &server) {
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

/**
 * One input: its first byte picks the start state (bit 0: after a completed handshake with a
 * peer engine of `peerContext`) and how the rest is cut into transport reads; the rest is the
 * ciphertext the engine of `context`, in `role`, receives. A client engine (and a client peer)
 * asks for `serverName`.
 */
inline void feedEngine(Role role, SSL_CTX *context, SSL_CTX *peerContext,
                       const std::string &serverName, const std::uint8_t *data, std::size_t size) {
    if (size == 0) {
        return;
    }
    const bool afterHandshake = (data[0] & 1) != 0;
    const std::size_t chunk = 1 + (data[0] >> 1) * 7;
    ++data;
    --size;

    EngineOptions options;
    options.pairSize = feedPairSize;
    options.plaintextBudget = feedBudget;
    EngineOptions clientOptions = options;
    clientOptions.serverName = serverName;
    auto engine = Engine::create(context, role, role == Role::client ? clientOptions : options);
    check(engine != nullptr, "engine");
    std::unique_ptr<Engine> peer;
    if (afterHandshake) {
        const Role peerRole = role == Role::client ? Role::server : Role::client;
        peer = Engine::create(peerContext, peerRole,
                              peerRole == Role::client ? clientOptions : options);
        check(peer != nullptr, "peer engine");
        if (role == Role::server) {
            handshake(*peer, *engine);
        } else {
            handshake(*engine, *peer);
        }
        check(engine->status().handshakeDone, "in-memory handshake");
    }
    bool failed = false;
    std::string reason;
    while (size > 0) {
        auto space = engine->cipherInSpace();
        if (space.empty()) {
            drain(*engine);
            space = engine->cipherInSpace();
            if (space.empty()) {
                break; // the engine stopped taking input (failed or closed): that is allowed
            }
        }
        const std::size_t n = std::min({chunk, size, space.size()});
        std::memcpy(space.data(), data, n);
        engine->commitCipherIn(n);
        data += n;
        size -= n;
        if (failed) {
            check(engine->status().failed && engine->errorReason() == reason, "sticky error");
        } else if (engine->status().failed) {
            failed = true;
            reason = engine->errorReason();
            check(!reason.empty(), "an error has a reason");
        }
        std::uint8_t reply[64] = {};
        engine->write(reply);
        drain(*engine);
    }
    engine->cipherInEof();
    drain(*engine);
}

} // namespace sluice::fuzz
