// proxy/warm_list: the connections that keep their I/O buffers between pumps while busy.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

namespace sluice::proxy {

/** A base of whatever a WarmList holds: it knows its own place, so removal needs no search. */
class Warm {
public:
    bool warm() const { return warmIndex_ != notWarm; }

private:
    friend class WarmList;
    static constexpr std::uint32_t notWarm = std::numeric_limits<std::uint32_t>::max();
    std::uint32_t warmIndex_ = notWarm;
};

/**
 * Owners that were busy lately, holding at most `budget` bytes between them. Re-creating a
 * connection's BIO pair costs more than the rest of its user-space work on a small round trip (two
 * BIOs, a lock each and two 16 KiB buffers made and freed), so a busy connection keeps its buffers
 * between pumps and gives them back once a whole sweep interval has passed without one.
 *
 * keep() after each pump marks the owner busy; sweep(), from a timer, releases every owner not
 * kept since the previous sweep (an owner whose release fails, say with bytes still queued,
 * stays and is tried again) and clears the mark of the others. So an owner is released between
 * one and two intervals after its last pump. When an owner's bytes do not fit the budget, keep()
 * says no and the caller releases at once: the memory held is bounded whatever the load. A pure
 * container: the caller owns the timer.
 */
class WarmList {
public:
    /** Frees what `owner` holds; true when it holds nothing more (it leaves the list). */
    using Release = bool (*)(Warm &owner);

    WarmList(std::size_t budget, Release release);
    WarmList(const WarmList &) = delete;
    WarmList &operator=(const WarmList &) = delete;

    /**
     * `owner`, which holds `bytes` while kept, was just busy. False when it is not in the list
     * and its bytes do not fit what is left of the budget (one in the list stays, with its new
     * size, even past the budget).
     */
    bool keep(Warm &owner, std::size_t bytes);
    /** Takes `owner` out without releasing anything (it is closing). */
    void remove(Warm &owner);
    /** Releases the owners not kept since the last sweep; returns how many left the list. */
    std::size_t sweep();

    std::size_t size() const { return entries_.size(); }
    bool empty() const { return entries_.empty(); }
    /** The bytes the owners in the list hold, as given to keep(). */
    std::size_t bytes() const { return bytes_; }

private:
    struct Entry {
        Warm *owner;
        std::size_t bytes;
        bool busy; // kept since the last sweep
    };
    void removeAt(std::size_t index);

    std::size_t budget_;
    std::size_t bytes_ = 0;
    Release release_;
    std::vector<Entry> entries_;
};

} // namespace sluice::proxy
