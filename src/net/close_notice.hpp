// net/close_notice: closing a handle that owns a socket, told to ThreadSanitizer. libuv closes
// descriptors with a raw close system call, which TSan does not intercept, so in a TSan build a
// descriptor number that a worker's connection used, and that another thread then got again
// (the main thread reading a certificate folder at a reload), looked like a data race on the
// descriptor. Outside TSan builds these are uv_close() and uv_tcp_close_reset().
#pragma once

#include <uv.h>

#if defined(__SANITIZE_THREAD__)
// The sanitizer runtime's hook for a close(2) it did not see (what clang's
// <sanitizer/linux_syscall_hooks.h> names __sanitizer_syscall_pre_close; GCC ships no header).
extern "C" void __sanitizer_syscall_pre_impl_close(long fd);
extern "C" void __tsan_ignore_thread_begin();
extern "C" void __tsan_ignore_thread_end();
#endif

namespace sluice::net {

namespace detail {

/**
 * Runs `close`, which closes `handle`'s descriptor. In a TSan build TSan hears of the close
 * first, on this thread, before any other thread can get the number again; libuv's own last
 * use of the descriptor inside `close` (the epoll_ctl that takes it out of the loop) is then
 * left out of TSan's record, where it would outlive the close that TSan cannot see.
 */
template <typename Close>
int closeNoticed([[maybe_unused]] const uv_handle_t *handle, Close close) {
#if defined(__SANITIZE_THREAD__)
    uv_os_fd_t fd = -1;
    if (uv_fileno(handle, &fd) == 0 && fd >= 0) {
        __sanitizer_syscall_pre_impl_close(fd);
    }
    __tsan_ignore_thread_begin();
    const int result = close();
    __tsan_ignore_thread_end();
    return result;
#else
    return close();
#endif
}

} // namespace detail

/** uv_close() of a TCP or pipe handle. */
inline void closeSocket(uv_handle_t *handle, uv_close_cb done) {
    detail::closeNoticed(handle, [&] {
        uv_close(handle, done);
        return 0;
    });
}

/** uv_tcp_close_reset(): the peer gets a reset. Returns its result (non-zero: not closed, and
 * the caller closes it with closeSocket()). */
inline int closeSocketReset(uv_tcp_t *handle, uv_close_cb done) {
    return detail::closeNoticed(reinterpret_cast<uv_handle_t *>(handle),
                                [&] { return uv_tcp_close_reset(handle, done); });
}

} // namespace sluice::net
