// net/timer: heap-allocated libuv timers (and check handles) whose memory outlives their owner
// until closed.
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

/** A heap-allocated, initialised libuv check handle whose `data` is `owner`; freed by
 * freeHandle(). */
inline uv_check_t *newCheck(uv_loop_t *loop, void *owner) {
    auto *check = new uv_check_t;
    uv_check_init(loop, check);
    check->data = owner;
    return check;
}

/** Closes a handle from newTimer() or newCheck(); its memory is freed by the close callback,
 * which touches nothing else, so the owner may be gone by then. */
template <typename Handle>
void freeHandle(Handle *handle) {
    uv_close(reinterpret_cast<uv_handle_t *>(handle),
             [](uv_handle_t *closed) { delete reinterpret_cast<Handle *>(closed); });
}

inline void freeTimer(uv_timer_t *timer) {
    freeHandle(timer);
}

} // namespace sluice::net
