// proxy/warm_list: the connections that keep their I/O buffers between pumps while busy.
#include "proxy/warm_list.hpp"

#include <algorithm>

namespace sluice::proxy {

WarmList::WarmList(std::size_t budget, Release release)
    : budget_(budget)
    , release_(release) {}

bool WarmList::keep(Warm &owner, std::size_t bytes) {
    if (owner.warmIndex_ != Warm::notWarm) {
        Entry &entry = entries_[owner.warmIndex_];
        entry.busy = true;
        bytes_ = bytes_ - entry.bytes + bytes; // it may have grown (a backend pair came)
        entry.bytes = bytes;
        return true;
    }
    if (bytes > budget_ - std::min(bytes_, budget_)) {
        return false;
    }
    owner.warmIndex_ = static_cast<std::uint32_t>(entries_.size());
    entries_.push_back({&owner, bytes, true});
    bytes_ += bytes;
    return true;
}

void WarmList::remove(Warm &owner) {
    if (owner.warmIndex_ != Warm::notWarm) {
        removeAt(owner.warmIndex_);
    }
}

std::size_t WarmList::sweep() {
    std::size_t released = 0;
    // From the back, so the entry moved into a released one's place has been seen already.
    for (std::size_t index = entries_.size(); index-- > 0;) {
        Entry &entry = entries_[index];
        if (entry.busy) {
            entry.busy = false;
        } else if (release_(*entry.owner)) {
            removeAt(index);
            ++released;
        }
    }
    return released;
}

void WarmList::removeAt(std::size_t index) {
    entries_[index].owner->warmIndex_ = Warm::notWarm;
    bytes_ -= entries_[index].bytes;
    if (index + 1 != entries_.size()) {
        entries_[index] = entries_.back();
        entries_[index].owner->warmIndex_ = static_cast<std::uint32_t>(index);
    }
    entries_.pop_back();
}

} // namespace sluice::proxy
