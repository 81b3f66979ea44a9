// Unit tests for proxy/warm_list: an owner kept after a pump survives the next sweep and goes at
// the one after; a failed release keeps it; no new owner is taken past the byte budget; removals
// in any order keep every owner's index and the bytes held right (checked against a model).

#include <algorithm>
#include <cstdint>
#include <map>
#include <random>
#include <set>
#include <vector>

#include <doctest/doctest.h>

#include "proxy/warm_list.hpp"

using sluice::proxy::Warm;
using sluice::proxy::WarmList;

namespace {

struct Owner : Warm {
    int id = 0;
    bool holding = true; // what release() frees
    bool stuck = false;  // release() fails: bytes still queued
    int releases = 0;
};

bool release(Warm &warm) {
    auto &owner = static_cast<Owner &>(warm);
    ++owner.releases;
    if (owner.stuck) {
        return false;
    }
    owner.holding = false;
    return true;
}

} // namespace

TEST_CASE("warm list: a kept owner goes one sweep after its last keep") {
    WarmList list(8, release);
    Owner a;
    Owner b;
    CHECK(list.keep(a, 1));
    CHECK(list.keep(a, 1)); // once only
    CHECK(list.size() == 1);
    CHECK(a.warm());
    CHECK_FALSE(b.warm());

    CHECK(list.sweep() == 0); // busy since the last sweep: only the mark goes
    CHECK(a.holding);
    CHECK(a.releases == 0);
    CHECK(list.keep(a, 1)); // busy again
    CHECK(list.sweep() == 0);
    CHECK(a.holding);
    CHECK(list.sweep() == 1); // a whole interval without a pump
    CHECK_FALSE(a.holding);
    CHECK(a.releases == 1);
    CHECK_FALSE(a.warm());
    CHECK(list.empty());
    CHECK(list.sweep() == 0);
    CHECK(a.releases == 1);
}

TEST_CASE("warm list: a release that fails keeps the owner for the next sweep") {
    WarmList list(8, release);
    Owner a;
    a.stuck = true;
    list.keep(a, 1);
    list.sweep();
    CHECK(list.sweep() == 0);
    CHECK(a.releases == 1);
    CHECK(a.warm());
    CHECK(list.sweep() == 0);
    CHECK(a.releases == 2);
    a.stuck = false;
    CHECK(list.sweep() == 1);
    CHECK_FALSE(a.warm());
}

TEST_CASE("warm list: past the budget means no, but one already in is still kept") {
    WarmList list(100, release);
    Owner a;
    Owner b;
    Owner c;
    CHECK(list.keep(a, 40));
    CHECK(list.keep(b, 60));
    CHECK_FALSE(list.keep(c, 1));
    CHECK_FALSE(c.warm());
    CHECK(list.bytes() == 100);
    CHECK(list.keep(a, 50)); // grew: kept, and counted at its new size
    CHECK(list.bytes() == 110);
    list.remove(b);
    CHECK_FALSE(b.warm());
    CHECK(list.bytes() == 50);
    CHECK_FALSE(list.keep(c, 51));
    CHECK(list.keep(c, 50));
    CHECK(list.size() == 2);
    CHECK(list.bytes() == 100);
    list.remove(a);
    list.remove(c);
    CHECK(list.empty());
    CHECK(list.bytes() == 0);
    CHECK_FALSE(a.warm());
    CHECK_FALSE(c.warm());
    CHECK(a.releases + b.releases + c.releases == 0); // remove() releases nothing
}

TEST_CASE("warm list: random keeps, removals and sweeps agree with a model") {
    constexpr int count = 200;
    constexpr std::size_t budget = 64 * 3;
    std::vector<Owner> owners(count);
    for (int i = 0; i < count; ++i) {
        owners[static_cast<std::size_t>(i)].id = i;
    }
    WarmList list(budget, release);
    std::map<int, std::size_t> in; // the model: owners in the list, with their bytes
    std::set<int> busy;            // ... and kept since the last sweep
    std::mt19937 random(7);
    for (int step = 0; step < 20000; ++step) {
        const int id = static_cast<int>(random() % count);
        Owner &owner = owners[static_cast<std::size_t>(id)];
        const unsigned what = random() % 16;
        if (what < 10) {
            owner.holding = true;
            const std::size_t bytes = 1 + random() % 5;
            std::size_t held = 0;
            for (const auto &entry : in) {
                held += entry.second;
            }
            const bool kept = list.keep(owner, bytes);
            CHECK(kept == (in.count(id) == 1 || held + bytes <= budget));
            if (kept) {
                in[id] = bytes;
                busy.insert(id);
            }
        } else if (what < 13) {
            list.remove(owner);
            in.erase(id);
            busy.erase(id);
        } else if (what == 13) {
            owner.stuck = !owner.stuck;
        } else {
            std::size_t expected = 0;
            for (auto it = in.begin(); it != in.end();) {
                const Owner &o = owners[static_cast<std::size_t>(it->first)];
                if (busy.count(it->first) == 0 && !o.stuck) {
                    it = in.erase(it);
                    ++expected;
                } else {
                    ++it;
                }
            }
            busy.clear();
            CHECK(list.sweep() == expected);
        }
        REQUIRE(list.size() == in.size());
        std::size_t held = 0;
        for (const auto &entry : in) {
            held += entry.second;
        }
        REQUIRE(list.bytes() == held);
        for (const Owner &o : owners) {
            REQUIRE(o.warm() == (in.count(o.id) == 1));
        }
    }
}
