// proxy/byte_queue: a bounded FIFO of bytes read from a socket, taken (util/block_cache) only
// while it holds bytes, so an idle connection keeps none. Its front may be handed to one
// asynchronous write (pinned); the unsent tail is moved to the front only while nothing is pinned.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <span>

#include "util/block_cache.hpp"

namespace sluice::proxy {

class ByteQueue {
public:
    /** Capped at 4 GiB - 1 (the configuration allows 64 MiB): offsets are 32-bit, as every
     * idle connection holds two queues. */
    void setCapacity(std::size_t capacity) {
        capacity_ = static_cast<std::uint32_t>(std::min<std::size_t>(capacity, UINT32_MAX));
    }
    std::size_t capacity() const { return capacity_; }

    std::span<const std::uint8_t> data() const { return {buffer_.get() + head_, tail_ - head_}; }
    std::size_t size() const { return tail_ - head_; }
    bool empty() const { return tail_ == head_; }

    /** True when space() would return something (with `mayMove` as given). */
    bool hasSpace(bool mayMove) const {
        return tail_ < capacity_ || (mayMove && head_ > 0) || !buffer_;
    }

    /** Contiguous free space at the back; allocates the buffer when there is none. With
     * `mayMove`, the bytes waiting are first moved to the front if that makes room. */
    std::span<std::uint8_t> space(bool mayMove) {
        if (!buffer_) {
            buffer_.reset(static_cast<std::uint8_t *>(util::takeBlock(capacity_)));
            head_ = tail_ = 0;
            if (!buffer_) {
                return {}; // the read reports UV_ENOBUFS
            }
        } else if (mayMove && tail_ == capacity_ && head_ > 0) {
            std::memmove(buffer_.get(), buffer_.get() + head_, tail_ - head_);
            tail_ -= head_;
            head_ = 0;
        }
        return {buffer_.get() + tail_, capacity_ - tail_};
    }

    /** Adds `n` bytes written into the last space(). */
    void commit(std::size_t n) { tail_ += static_cast<std::uint32_t>(n); }

    /** Drops `n` bytes from the front; frees the buffer when it empties. */
    void consume(std::size_t n) {
        head_ += static_cast<std::uint32_t>(n);
        releaseIfEmpty();
    }

    /** Frees the buffer if it holds nothing (after a read that brought no bytes). */
    void releaseIfEmpty() {
        if (head_ == tail_ && buffer_) {
            buffer_.reset();
            head_ = tail_ = 0;
        }
    }

private:
    std::unique_ptr<std::uint8_t[], util::GiveBlock> buffer_;
    std::uint32_t capacity_ = 0;
    std::uint32_t head_ = 0;
    std::uint32_t tail_ = 0;
};

} // namespace sluice::proxy
