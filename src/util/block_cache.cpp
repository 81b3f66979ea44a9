#include "util/block_cache.hpp"

#include <cstdlib>
#include <pthread.h>

namespace sluice::util {
namespace {

// At most four large blocks and 192 KiB in all per thread (enough for a pump's buffers in
// flight at once), and 64 small ones (a poll's worth of short reads): little beside a worker's
// connections.
constexpr std::size_t bytesKept = std::size_t{192} * 1024;
constexpr int largeKept = blocksKept ? 4 : 0;
constexpr int smallKept = blocksKept ? 64 : 0;

// Plain data, so thread_local needs no guard or destructor; the key's destructor empties it when
// the thread ends. Oldest block first. (+ 1: no zero-length array in the sanitizer build.)
struct Stacks {
    void *blocks[largeKept + 1];
    std::size_t sizes[largeKept + 1]; // usable sizes
    std::size_t bytes;
    int count;
    void *small[smallKept + 1];
    int smallCount;
    bool keyed; // the thread's key is set: its destructor will run
    bool ended; // the thread is ending: nothing is kept any more
};

thread_local Stacks stacks{};

pthread_key_t key;
pthread_once_t keyOnce = PTHREAD_ONCE_INIT;

void freeAll(Stacks &s) noexcept {
    for (int i = 0; i < s.count; ++i) {
        std::free(s.blocks[i]);
    }
    s.count = 0;
    s.bytes = 0;
    for (int i = 0; i < s.smallCount; ++i) {
        std::free(s.small[i]);
    }
    s.smallCount = 0;
}

// Drops large entry `i`, keeping the others in the order they were given.
void remove(Stacks &s, int i) noexcept {
    for (--s.count; i < s.count; ++i) {
        s.blocks[i] = s.blocks[i + 1];
        s.sizes[i] = s.sizes[i + 1];
    }
}

void threadEnds(void *) {
    freeAll(stacks);
    stacks.ended = true;
}

void makeKey() {
    (void)pthread_key_create(&key, threadEnds);
}

// True when the thread may keep blocks: its key is set, so they are freed when it ends.
bool mayKeep(Stacks &s) noexcept {
    if (s.ended) {
        return false;
    }
    if (!s.keyed) {
        (void)pthread_once(&keyOnce, makeKey);
        s.keyed = pthread_setspecific(key, &s) == 0;
    }
    return s.keyed;
}

} // namespace

void *takeKeptBlock(std::size_t size) noexcept {
    Stacks &s = stacks;
    // A block up to an eighth larger serves: the record and pair buffers differ by a few bytes,
    // and a 16 KiB block must not go to a 64 KiB request or the other way round.
    for (int i = s.count - 1; i >= 0; --i) {
        if (s.sizes[i] >= size && s.sizes[i] - size <= size / 8) {
            void *block = s.blocks[i];
            s.bytes -= s.sizes[i];
            remove(s, i);
            return block;
        }
    }
    return std::malloc(size);
}

void *takeSmallBlock() noexcept {
    Stacks &s = stacks;
    return s.smallCount > 0 ? s.small[--s.smallCount] : std::malloc(smallBlock);
}

void keepBlock(void *block, std::size_t usable) noexcept {
    Stacks &s = stacks;
    if (largeKept == 0 || !mayKeep(s)) {
        std::free(block);
        return;
    }
    // The block given last is the likeliest to be asked for next: room is made by freeing the
    // oldest, so the stack settles on the sizes a worker's traffic keeps asking for.
    while (s.count == largeKept || s.bytes + usable > bytesKept) {
        std::free(s.blocks[0]);
        s.bytes -= s.sizes[0];
        remove(s, 0);
    }
    s.blocks[s.count] = block;
    s.sizes[s.count] = usable;
    ++s.count;
    s.bytes += usable;
}

void keepSmallBlock(void *block) noexcept {
    Stacks &s = stacks;
    if (s.smallCount == smallKept || !mayKeep(s)) {
        std::free(block);
        return;
    }
    s.small[s.smallCount++] = block;
}

void releaseBlocks() noexcept {
    freeAll(stacks);
}

} // namespace sluice::util
