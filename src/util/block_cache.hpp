// util/block_cache: the blocks a busy connection takes and gives back on every read (its
// plaintext and reply buffers) kept on small stacks per thread instead of going back to the
// heap. glibc serves blocks of 16 KiB and more from its bins, not its per-thread cache: a
// malloc/free pair costs a few hundred instructions there. Its per-thread cache holds seven
// blocks of a size, fewer than the plaintext blocks a poll's reads hold until the check phase
// writes them.
//
// OpenSSL's own buffers do not come here: routed through CRYPTO_set_mem_functions(), they
// saved 470 instructions a round trip but cost 10,000 a handshake (every OpenSSL allocation
// paid the hook), and the heap they left after a busy round held 7 KiB more per idle
// connection (faults.idle_connections_give_their_buffers_back in the full suite).
//
// The stacks are bounded (192 KiB of large blocks, 64 small ones per thread) and hold nothing
// that a connection owns: a connection's buffers are still given back when it idles. Every
// block is a malloc() block, so a kept one may be realloc()ed or free()d by anyone.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <malloc.h>

// Under AddressSanitizer nothing is kept: every block goes back to the heap, where ASan
// watches it (a kept block's use after its give would go unseen).
#if defined(__SANITIZE_ADDRESS__)
#define SLUICE_BLOCKS_UNKEPT 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SLUICE_BLOCKS_UNKEPT 1
#endif
#endif

namespace sluice::util {

#if defined(SLUICE_BLOCKS_UNKEPT)
inline constexpr bool blocksKept = false;
#else
inline constexpr bool blocksKept = true;
#endif

// Large blocks kept: from 16 KiB to 128 KiB (the default buffers are 64 KiB). Small ones: exactly
// smallBlock bytes (a short read's plaintext). Other sizes go straight to the heap.
inline constexpr std::size_t smallBlock = 1024;
inline constexpr std::size_t smallestKeptBlock = std::size_t{16} * 1024;
inline constexpr std::size_t largestKeptBlock = std::size_t{128} * 1024;

/** The stacks' side of takeBlock() and giveBlock(). */
void *takeKeptBlock(std::size_t size) noexcept;
void *takeSmallBlock() noexcept;
void keepBlock(void *block, std::size_t usable) noexcept;
void keepSmallBlock(void *block) noexcept;

/** A block of at least `size` bytes (uninitialised), from this thread's stacks when one of
 * about that size is there, else malloc(). nullptr only where malloc() fails. */
inline void *takeBlock(std::size_t size) noexcept {
    if (size < smallestKeptBlock) {
        return size == smallBlock ? takeSmallBlock() : std::malloc(size);
    }
    return takeKeptBlock(size);
}

/** Gives `block` (a malloc() block, or nullptr) back: onto this thread's stacks if its size is
 * one they keep, else to free(). */
inline void giveBlock(void *block) noexcept {
    if (block == nullptr) {
        return;
    }
    const std::size_t usable = malloc_usable_size(block);
    if (usable >= smallestKeptBlock && usable <= largestKeptBlock) {
        keepBlock(block, usable);
    } else if (usable >= smallBlock && usable < smallBlock + 32) {
        keepSmallBlock(block);
    } else {
        std::free(block);
    }
}

/** Frees every block on this thread's stacks. They are freed anyway when the thread ends;
 * gives after that go straight to free(). */
void releaseBlocks() noexcept;

/** Deleter for a std::unique_ptr<std::uint8_t[]> of takeBlock() memory. */
struct GiveBlock {
    void operator()(std::uint8_t *block) const noexcept { giveBlock(block); }
};

} // namespace sluice::util
