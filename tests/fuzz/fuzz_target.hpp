// One source per fuzz target, built two ways: with -Dfuzzing=true as a libFuzzer binary (the
// macro names LLVMFuzzerTestOneInput), and always as a plain function that the corpus replay
// test calls on every file of the target's seed corpus.
#pragma once

#include <cstddef>
#include <cstdint>

#ifdef SLUICE_FUZZING
#define SLUICE_FUZZ_TARGET(name)                                                                   \
    extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t *data, std::size_t size)
#else
#define SLUICE_FUZZ_TARGET(name) int name(const std::uint8_t *data, std::size_t size)
#endif

namespace sluice::fuzz {
int engineServer(const std::uint8_t *data, std::size_t size);
int configLoader(const std::uint8_t *data, std::size_t size);
int adminRequest(const std::uint8_t *data, std::size_t size);
int proxyProtocol(const std::uint8_t *data, std::size_t size);
int ocspResponse(const std::uint8_t *data, std::size_t size);
int listenerHello(const std::uint8_t *data, std::size_t size);
int backendReply(const std::uint8_t *data, std::size_t size);
} // namespace sluice::fuzz
