// util/block_cache: what a thread gives back is what it takes next, within bounds, and nothing
// outlives the thread.
#include <cstdlib>
#include <malloc.h>
#include <set>
#include <thread>
#include <vector>

#include <doctest/doctest.h>

#include "util/block_cache.hpp"

using sluice::util::giveBlock;
using sluice::util::releaseBlocks;
using sluice::util::takeBlock;

namespace {

constexpr bool keeping = sluice::util::blocksKept; // not in the sanitizer build

constexpr std::size_t kib = 1024;

std::size_t usable(void *block) {
    return malloc_usable_size(block);
}

} // namespace

TEST_CASE("block cache: a block given back serves the next take of about its size") {
    releaseBlocks();
    void *record = takeBlock(16712);
    void *plain = takeBlock(64 * kib);
    REQUIRE(record != nullptr);
    REQUIRE(plain != nullptr);
    CHECK(usable(record) >= 16712);
    CHECK(usable(plain) >= 64 * kib);
    giveBlock(record);
    giveBlock(plain);

    // A slightly smaller request takes the record block; a 64 KiB one never gets a 16 KiB block.
    void *again = takeBlock(16584);
    void *big = takeBlock(64 * kib);
    CHECK(usable(again) >= 16584);
    CHECK(usable(big) >= 64 * kib);
    if (keeping) {
        CHECK(again == record);
        CHECK(big == plain);
    }
    // A request much smaller than a kept block does not take it (the block would be wasted).
    giveBlock(big);
    void *twenty = takeBlock(20 * kib);
    CHECK(usable(twenty) >= 20 * kib);
    CHECK(twenty != big);
    std::free(twenty); // a taken block is an ordinary malloc() block
    giveBlock(again);
    void *grown = std::realloc(takeBlock(16584), 40 * kib);
    REQUIRE(grown != nullptr);
    giveBlock(grown);
    giveBlock(nullptr);
    releaseBlocks();
}

TEST_CASE("block cache: at most 192 KiB of large blocks and 64 small ones are kept") {
    releaseBlocks();
    std::vector<void *> given;
    for (int i = 0; i < 6; ++i) {
        given.push_back(takeBlock(64 * kib));
    }
    for (void *block : given) {
        giveBlock(block);
    }
    // The stack keeps the latest blocks that fit in its bound: two 64 KiB blocks (usable sizes
    // are a few bytes over, so a third would pass 192 KiB). The older ones went to the heap.
    const std::set<void *> latest(given.end() - 2, given.end());
    std::vector<void *> taken;
    int reused = 0;
    for (int i = 0; i < 6; ++i) {
        taken.push_back(takeBlock(64 * kib));
        reused += latest.count(taken.back()) > 0 ? 1 : 0;
    }
    if (keeping) {
        CHECK(reused == 2);
    }
    for (void *block : taken) {
        giveBlock(block);
    }

    std::vector<void *> small;
    for (int i = 0; i < 70; ++i) {
        small.push_back(takeBlock(sluice::util::smallBlock));
        CHECK(usable(small.back()) >= sluice::util::smallBlock);
    }
    const std::set<void *> smallGiven(small.begin(), small.end());
    for (void *block : small) {
        giveBlock(block);
    }
    int smallReused = 0;
    std::vector<void *> smallTaken;
    for (int i = 0; i < 70; ++i) {
        smallTaken.push_back(takeBlock(sluice::util::smallBlock));
        smallReused += smallGiven.count(smallTaken.back()) > 0 ? 1 : 0;
    }
    if (keeping) {
        CHECK(smallReused >= 64); // the heap may hand back some of the others
    }
    for (void *block : smallTaken) {
        giveBlock(block);
    }
    releaseBlocks();
}

TEST_CASE("block cache: a thread's kept blocks are freed when it ends") {
    if (!keeping) {
        return; // nothing is kept, and ASan's allocator does not report through mallinfo2()
    }
    releaseBlocks();
    const std::size_t before = mallinfo2().uordblks;
    std::thread([] {
        void *a = takeBlock(64 * kib);
        void *b = takeBlock(16712);
        void *c = takeBlock(sluice::util::smallBlock);
        giveBlock(a);
        giveBlock(b);
        giveBlock(c);
        // Kept: the heap still counts them in use.
        CHECK(mallinfo2().uordblks >= 80 * kib);
    }).join();
    // The thread's own bookkeeping aside, nothing of its blocks is left in use.
    CHECK(mallinfo2().uordblks < before + 16 * kib);
}
