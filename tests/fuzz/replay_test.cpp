// Replays every seed-corpus file of every fuzz target as an ordinary test, in every build.
#include <filesystem>
#include <fstream>
#include <iterator>
#include <vector>

#include <doctest/doctest.h>

#include "fuzz_target.hpp"

namespace {

std::size_t replay(const char *target, int (*run)(const std::uint8_t *, std::size_t)) {
    const auto folder = std::filesystem::path(SLUICE_SOURCE_ROOT) / "tests/fuzz/corpus" / target;
    std::size_t count = 0;
    for (const auto &entry : std::filesystem::directory_iterator(folder)) {
        if (!entry.is_regular_file()) {
            continue;
        }
        std::ifstream in(entry.path(), std::ios::binary);
        const std::vector<std::uint8_t> bytes{std::istreambuf_iterator<char>(in), {}};
        INFO(entry.path().string());
        CHECK(run(bytes.data(), bytes.size()) == 0);
        ++count;
    }
    return count;
}

} // namespace

TEST_CASE("the engine corpus replays cleanly") {
    CHECK(replay("engine", sluice::fuzz::engineServer) >= 4);
}

TEST_CASE("the config corpus replays cleanly") {
    CHECK(replay("config", sluice::fuzz::configLoader) >= 4);
}

TEST_CASE("the admin request corpus replays cleanly") {
    CHECK(replay("admin", sluice::fuzz::adminRequest) >= 4);
}

TEST_CASE("the PROXY protocol corpus replays cleanly") {
    CHECK(replay("proxy_protocol", sluice::fuzz::proxyProtocol) >= 4);
}

TEST_CASE("the OCSP response corpus replays cleanly") {
    CHECK(replay("ocsp", sluice::fuzz::ocspResponse) >= 4);
}

TEST_CASE("the listener hello corpus replays cleanly") {
    CHECK(replay("hello", sluice::fuzz::listenerHello) >= 4);
}

TEST_CASE("the backend reply corpus replays cleanly") {
    CHECK(replay("backend", sluice::fuzz::backendReply) >= 4);
}
