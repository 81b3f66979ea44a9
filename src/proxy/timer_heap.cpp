// proxy/timer_heap: the deadlines of many connections on one libuv timer.
#include "proxy/timer_heap.hpp"

#include "net/timer.hpp"

namespace sluice::proxy {

TimerHeap::TimerHeap(uv_loop_t *loop, Fire fire)
    : loop_(loop)
    , fire_(fire) {}

TimerHeap::~TimerHeap() {
    close();
}

void TimerHeap::close() {
    closed_ = true;
    for (const Entry &entry : heap_) {
        entry.owner->heapIndex_ = Timed::notInHeap;
    }
    heap_.clear();
    if (timer_ == nullptr) {
        return;
    }
    net::freeTimer(timer_);
    timer_ = nullptr;
}

void TimerHeap::set(Timed &owner, std::uint64_t due) {
    if (closed_) {
        return;
    }
    if (timer_ == nullptr) {
        timer_ = net::newTimer(loop_, this);
    }
    if (firingAt_ != 0 && due <= firingAt_) {
        due = firingAt_ + 1;
    }
    const Entry entry{due, &owner};
    if (owner.heapIndex_ == Timed::notInHeap) {
        heap_.push_back(entry);
        siftUp(heap_.size() - 1, entry);
    } else {
        const std::size_t index = owner.heapIndex_;
        if (due < heap_[index].due) {
            siftUp(index, entry);
        } else {
            siftDown(index, entry);
        }
    }
    rearm();
}

void TimerHeap::cancel(Timed &owner) {
    if (owner.heapIndex_ == Timed::notInHeap) {
        return;
    }
    removeAt(owner.heapIndex_);
    rearm();
}

void TimerHeap::place(std::size_t index, Entry entry) {
    heap_[index] = entry;
    entry.owner->heapIndex_ = static_cast<std::uint32_t>(index);
}

void TimerHeap::siftUp(std::size_t index, Entry entry) {
    while (index > 0) {
        const std::size_t parent = (index - 1) / 2;
        if (heap_[parent].due <= entry.due) {
            break;
        }
        place(index, heap_[parent]);
        index = parent;
    }
    place(index, entry);
}

void TimerHeap::siftDown(std::size_t index, Entry entry) {
    const std::size_t count = heap_.size();
    for (;;) {
        std::size_t child = 2 * index + 1;
        if (child >= count) {
            break;
        }
        if (child + 1 < count && heap_[child + 1].due < heap_[child].due) {
            ++child;
        }
        if (entry.due <= heap_[child].due) {
            break;
        }
        place(index, heap_[child]);
        index = child;
    }
    place(index, entry);
}

void TimerHeap::removeAt(std::size_t index) {
    heap_[index].owner->heapIndex_ = Timed::notInHeap;
    const Entry last = heap_.back();
    heap_.pop_back();
    if (index == heap_.size()) {
        return;
    }
    // The last entry takes the hole, then moves whichever way restores the order.
    if (index > 0 && last.due < heap_[(index - 1) / 2].due) {
        siftUp(index, last);
    } else {
        siftDown(index, last);
    }
}

void TimerHeap::rearm() {
    if (firingAt_ != 0 || closed_) {
        return; // onTimer() arms once its pass is done
    }
    if (heap_.empty()) {
        if (armedFor_ != 0) {
            uv_timer_stop(timer_);
            armedFor_ = 0;
        }
        return;
    }
    const std::uint64_t due = heap_.front().due;
    if (due == armedFor_) {
        return;
    }
    const std::uint64_t now = uv_now(loop_);
    uv_timer_start(timer_, onTimer, due > now ? due - now : 0, 0);
    armedFor_ = due;
}

void TimerHeap::onTimer(uv_timer_t *timer) {
    auto *self = static_cast<TimerHeap *>(timer->data);
    self->armedFor_ = 0;
    // Never 0, which means "not firing": uv_now() starts near 0 on a fresh loop.
    const std::uint64_t now = uv_now(self->loop_);
    self->firingAt_ = now == 0 ? 1 : now;
    while (!self->closed_ && !self->heap_.empty() && self->heap_.front().due <= now) {
        Timed &owner = *self->heap_.front().owner;
        self->removeAt(0);
        self->fire_(owner);
    }
    self->firingAt_ = 0;
    self->rearm();
}

} // namespace sluice::proxy
