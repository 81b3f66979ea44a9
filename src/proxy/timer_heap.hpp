// proxy/timer_heap: the deadlines of many connections on one libuv timer.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

#include <uv.h>

namespace sluice::proxy {

/**
 * A base of whatever a TimerHeap holds a deadline for: it knows its own place in the heap, so
 * moving or cancelling its deadline needs no search.
 */
class Timed {
public:
    bool deadlineSet() const { return heapIndex_ != notInHeap; }

private:
    friend class TimerHeap;
    static constexpr std::uint32_t notInHeap = std::numeric_limits<std::uint32_t>::max();
    std::uint32_t heapIndex_ = notInHeap;
};

/**
 * Deadlines in uv_now() milliseconds, at most one per Timed, kept in a binary min-heap in one
 * vector and served by one libuv timer armed for the earliest. A connection's deadline costs a
 * heap entry (16 bytes) and its index instead of a uv_timer_t (152 bytes) of its own, and setting
 * one starts no libuv timer unless it becomes the earliest.
 *
 * `fire` runs from the libuv timer for each deadline reached, earliest first, with that deadline
 * already removed; it may set or cancel any deadline, its own included. A deadline set from
 * inside `fire` for a time already reached moves to the next millisecond, so an owner that keeps
 * re-arming for "now" cannot hold the loop.
 *
 * The libuv timer is made by the first set(). close() drops every deadline and closes the timer
 * (its memory is freed by the close callback, so the TimerHeap may go first); the destructor
 * closes it if close() was not called. A closed TimerHeap ignores set().
 */
class TimerHeap {
public:
    using Fire = void (*)(Timed &owner);

    TimerHeap(uv_loop_t *loop, Fire fire);
    ~TimerHeap();
    TimerHeap(const TimerHeap &) = delete;
    TimerHeap &operator=(const TimerHeap &) = delete;

    /** Sets (or moves) `owner`'s deadline to `due`. */
    void set(Timed &owner, std::uint64_t due);
    /** Removes `owner`'s deadline, if it has one. */
    void cancel(Timed &owner);
    void close();

    std::size_t size() const { return heap_.size(); }
    /** The earliest deadline, or 0 when there is none. */
    std::uint64_t earliest() const { return heap_.empty() ? 0 : heap_.front().due; }

private:
    struct Entry {
        std::uint64_t due;
        Timed *owner;
    };

    void place(std::size_t index, Entry entry);
    void siftUp(std::size_t index, Entry entry);
    void siftDown(std::size_t index, Entry entry);
    void removeAt(std::size_t index);
    void rearm();
    static void onTimer(uv_timer_t *timer);

    uv_loop_t *loop_;
    Fire fire_;
    uv_timer_t *timer_ = nullptr; // made by the first set()
    bool closed_ = false;
    std::vector<Entry> heap_;
    std::uint64_t armedFor_ = 0; // the deadline the libuv timer is started for; 0: stopped
    std::uint64_t firingAt_ = 0; // uv_now() of the pass in progress; 0: not firing
};

} // namespace sluice::proxy
