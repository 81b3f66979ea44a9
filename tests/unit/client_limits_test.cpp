// Unit tests for proxy/client_limits: the handshakes in progress by address are counted together
// from several threads (the daemon's workers) and never pass the limit; ending frees the slot and
// forgets the address; the rate's bucket holds one second's worth and refills with time; an
// address's limits leave every other address alone.

#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

#include <doctest/doctest.h>

#include "proxy/client_limits.hpp"

using sluice::proxy::ClientLimits;
using Admission = ClientLimits::Admission;
using namespace std::string_literals;

TEST_CASE("client limits: handshakes in progress by address, and ending frees them") {
    ClientLimits limits;
    const std::string a = "4\x7f\x00\x00\x01"s;
    const std::string b = "4\x7f\x00\x00\x02"s;
    for (int i = 0; i < 3; ++i) {
        CHECK(limits.starting(a, 3, 0) == Admission::admitted);
    }
    CHECK(limits.starting(a, 3, 0) == Admission::tooMany);
    CHECK(limits.starting(b, 3, 0) == Admission::admitted);
    CHECK(limits.addressesInProgress() == 2);
    limits.ended(a);
    CHECK(limits.starting(a, 3, 0) == Admission::admitted);
    CHECK(limits.starting(a, 3, 0) == Admission::tooMany);
    // Off (0), it still counts, so that turning it on later finds the handshakes in progress.
    CHECK(limits.starting(a, 0, 0) == Admission::admitted);
    CHECK(limits.starting(a, 4, 0) == Admission::tooMany);
    for (int i = 0; i < 4; ++i) {
        limits.ended(a);
    }
    limits.ended(b);
    CHECK(limits.addressesInProgress() == 0);
    limits.ended(a); // one too many (never admitted) changes nothing
    CHECK(limits.addressesInProgress() == 0);
}

TEST_CASE("client limits: threads admitting one address together never pass the limit") {
    ClientLimits limits;
    constexpr int threads = 4;
    constexpr int rounds = 2000;
    constexpr std::uint64_t limit = 5;
    const std::string key = "4\x0a\x00\x00\x07"s;
    std::atomic<int> inProgress{0};
    std::atomic<int> most{0};
    std::atomic<int> admitted{0};
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) {
        pool.emplace_back([&] {
            for (int i = 0; i < rounds; ++i) {
                if (limits.starting(key, limit, 0) != Admission::admitted) {
                    continue;
                }
                ++admitted;
                const int now = ++inProgress;
                int seen = most.load();
                while (now > seen && !most.compare_exchange_weak(seen, now)) {
                }
                --inProgress;
                limits.ended(key);
            }
        });
    }
    for (auto &thread : pool) {
        thread.join();
    }
    CHECK(most.load() <= static_cast<int>(limit));
    CHECK(admitted.load() > 0);
    CHECK(limits.addressesInProgress() == 0);

    // Holding the slots from one thread, no other thread gets one.
    for (std::uint64_t i = 0; i < limit; ++i) {
        REQUIRE(limits.starting(key, limit, 0) == Admission::admitted);
    }
    std::atomic<int> refused{0};
    std::vector<std::thread> others;
    for (int t = 0; t < threads; ++t) {
        others.emplace_back([&] {
            for (int i = 0; i < 100; ++i) {
                refused += limits.starting(key, limit, 0) == Admission::tooMany ? 1 : 0;
            }
        });
    }
    for (auto &thread : others) {
        thread.join();
    }
    CHECK(refused.load() == threads * 100);
}

TEST_CASE("client limits: the rate passes one second's worth at once, then refills") {
    ClientLimits limits;
    const std::string a = "6\x20\x01\x0d\xb8\x00\x01\x00\x02"s;
    const std::string b = "6\x20\x01\x0d\xb8\x00\x01\x00\x03"s;
    constexpr std::uint64_t rate = 20; // a token every 50 ms
    int passed = 0;
    for (int i = 0; i < 100; ++i) {
        const auto admission = limits.starting(a, 0, rate);
        if (admission == Admission::admitted) {
            ++passed;
        } else {
            CHECK(admission == Admission::tooFast);
        }
    }
    // One second's worth, and at most one more if the loop spanned a refill.
    CHECK(passed >= static_cast<int>(rate));
    CHECK(passed <= static_cast<int>(rate) + 1);
    CHECK(limits.starting(b, 0, rate) == Admission::admitted); // another address: its own bucket
    std::this_thread::sleep_for(std::chrono::milliseconds(120));
    CHECK(limits.starting(a, 0, rate) == Admission::admitted); // refilled
    // The concurrency limit is checked first, and a refusal for it takes no token.
    CHECK(limits.starting(b, 1, rate) == Admission::tooMany);
    CHECK(limits.bucketsHeld() == 2);
    limits.forgetRates(); // the rate turned off by a reload
    CHECK(limits.bucketsHeld() == 0);
    CHECK(limits.addressesInProgress() == 2); // the handshakes in progress are still counted
}

TEST_CASE("client limits: buckets of addresses gone quiet for a second are pruned") {
    ClientLimits limits;
    // Thousands of addresses, one handshake each, then a second of quiet: the next ones that
    // take tokens prune the full buckets, so the record holds what the last second saw.
    int admitted = 0;
    for (std::uint32_t i = 0; i < 40000; ++i) {
        const std::string key = "4" + std::string(reinterpret_cast<const char *>(&i), 4);
        admitted += limits.starting(key, 0, 5) == Admission::admitted ? 1 : 0;
        limits.ended(key);
    }
    CHECK(admitted == 40000);
    CHECK(limits.bucketsHeld() == 40000);
    std::this_thread::sleep_for(std::chrono::milliseconds(1100));
    for (std::uint32_t i = 0; i < 40000; ++i) {
        const std::uint32_t other = 1000000 + i;
        const std::string key = "4" + std::string(reinterpret_cast<const char *>(&other), 4);
        limits.starting(key, 0, 5);
        limits.ended(key);
    }
    CHECK(limits.bucketsHeld() < 80000);
    CHECK(limits.addressesInProgress() == 0);
}
