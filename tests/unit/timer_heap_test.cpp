// Unit tests for proxy/timer_heap: deadlines on a real libuv loop fire once each, in order, not
// before they are due; moved and cancelled ones are honoured; an owner re-arming for "now" from
// its own callback cannot hold the loop; close() leaves a loop that closes cleanly.

#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include <doctest/doctest.h>
#include <uv.h>

#include "proxy/timer_heap.hpp"

using sluice::proxy::Timed;
using sluice::proxy::TimerHeap;

namespace {

struct Owner : Timed {
    int id = 0;
    std::uint64_t due = 0;         // what the test set last; 0: none expected
    std::vector<std::uint64_t> at; // uv_now() at each firing
    int rearms = 0;                // times to set the deadline again for "now" when fired
    TimerHeap *heap = nullptr;
};

std::vector<int> fired;
uv_loop_t *firingLoop = nullptr;

void record(Timed &timed) {
    auto &owner = static_cast<Owner &>(timed);
    CHECK_FALSE(owner.deadlineSet());
    owner.at.push_back(uv_now(firingLoop));
    fired.push_back(owner.id);
    if (owner.rearms > 0) {
        --owner.rearms;
        owner.heap->set(owner, uv_now(firingLoop)); // already reached: moves to the next ms
    }
}

struct Loop {
    uv_loop_t loop{};
    Loop() {
        uv_loop_init(&loop);
        firingLoop = &loop;
        fired.clear();
    }
    ~Loop() {
        uv_run(&loop, UV_RUN_DEFAULT);
        CHECK(uv_loop_close(&loop) == 0);
    }
};

} // namespace

TEST_CASE("timer heap: a heap never set makes no handle") {
    Loop l;
    {
        TimerHeap heap(&l.loop, record);
        CHECK(heap.size() == 0);
        CHECK(heap.earliest() == 0);
    }
    CHECK(uv_loop_close(&l.loop) == 0); // nothing to run: no handle was ever made
    uv_loop_init(&l.loop);
}

TEST_CASE("timer heap: deadlines fire once each, in order, never early; moved and cancelled ones "
          "are honoured") {
    Loop l;
    TimerHeap heap(&l.loop, record);
    std::vector<Owner> owners(400);
    std::mt19937 random(7);
    const std::uint64_t start = uv_now(&l.loop);
    for (std::size_t i = 0; i < owners.size(); ++i) {
        owners[i].id = static_cast<int>(i);
        owners[i].due = start + 1 + random() % 60;
        heap.set(owners[i], owners[i].due);
    }
    CHECK(heap.size() == owners.size());
    // Move some earlier, some later, cancel some (each of these never fires).
    for (std::size_t i = 0; i < owners.size(); i += 3) {
        owners[i].due = start + 1 + random() % 60;
        heap.set(owners[i], owners[i].due);
    }
    for (std::size_t i = 1; i < owners.size(); i += 7) {
        heap.cancel(owners[i]);
        CHECK_FALSE(owners[i].deadlineSet());
        owners[i].due = 0;
    }
    heap.cancel(owners[1]); // twice: no effect
    const std::uint64_t earliest =
        std::min_element(owners.begin(), owners.end(), [](auto &a, auto &b) {
            return (a.due ? a.due : UINT64_MAX) < (b.due ? b.due : UINT64_MAX);
        })->due;
    CHECK(heap.earliest() == earliest);

    uv_run(&l.loop, UV_RUN_DEFAULT);

    CHECK(heap.size() == 0);
    std::size_t expected = 0;
    for (const Owner &owner : owners) {
        if (owner.due == 0) {
            CHECK(owner.at.empty());
            continue;
        }
        ++expected;
        REQUIRE(owner.at.size() == 1);
        CHECK(owner.at[0] >= owner.due);
    }
    REQUIRE(fired.size() == expected);
    for (std::size_t i = 1; i < fired.size(); ++i) {
        CHECK(owners[static_cast<std::size_t>(fired[i - 1])].due <=
              owners[static_cast<std::size_t>(fired[i])].due);
    }
    heap.close();
}

TEST_CASE("timer heap: an owner re-arming for now from its callback waits for the next "
          "millisecond") {
    Loop l;
    TimerHeap heap(&l.loop, record);
    Owner owner;
    owner.heap = &heap;
    owner.rearms = 3;
    heap.set(owner, uv_now(&l.loop)); // due at once
    uv_run(&l.loop, UV_RUN_DEFAULT);  // returns: the heap empties after four firings
    REQUIRE(owner.at.size() == 4);
    for (std::size_t i = 1; i < owner.at.size(); ++i) {
        CHECK(owner.at[i] > owner.at[i - 1]);
    }
    heap.close();
}

TEST_CASE("timer heap: close drops every deadline and ignores later ones") {
    Loop l;
    TimerHeap heap(&l.loop, record);
    Owner a, b;
    heap.set(a, uv_now(&l.loop) + 5);
    heap.set(b, uv_now(&l.loop) + 10);
    heap.close();
    CHECK_FALSE(a.deadlineSet());
    CHECK_FALSE(b.deadlineSet());
    heap.set(a, uv_now(&l.loop) + 1);
    CHECK_FALSE(a.deadlineSet());
    uv_run(&l.loop, UV_RUN_DEFAULT);
    CHECK(fired.empty());
}
