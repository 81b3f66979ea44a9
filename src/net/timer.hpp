// net/timer: heap-allocated libuv timers whose memory outlives their owner until closed.
#pragma once

#include <uv.h>

namespace sluice::net {

/** A heap-allocated, initialised libuv timer whose `data` is `owner`; freed by freeTimer(). */
inline uv_timer_t *newTimer(uv_loop_t *loop, void *owner) {
    auto *timer = new uv_timer_t;
    uv_timer_init(loop, timer);
    timer->data = owner;
    return timer;
}

/** Closes a timer from newTimer(); its memory is freed by the close callback, which touches
 * nothing else, so the owner may be gone by then. */
inline void freeTimer(uv_timer_t *timer) {
    uv_close(reinterpret_cast<uv_handle_t *>(timer),
             [](uv_handle_t *handle) { delete reinterpret_cast<uv_timer_t *>(handle); });
}

} // namespace sluice::net
