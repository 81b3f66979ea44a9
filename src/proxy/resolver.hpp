// proxy/resolver: re-resolves the host names of backend pools that ask for it
// (resolve_interval), off the event loops: a timer on the main loop queues each due pool to
// libuv's thread pool, where the blocking lookup runs; workers read the new address on their
// next connect. A lookup that fails keeps the previous address and is logged.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include <uv.h>

#include "proxy/server.hpp"

namespace sluice::proxy {

class Resolver {
public:
    explicit Resolver(uv_loop_t *loop);
    ~Resolver();
    Resolver(const Resolver &) = delete;
    Resolver &operator=(const Resolver &) = delete;

    /** Follows the pools of `runtime` from now on (at start and after each reload). */
    void watch(const std::shared_ptr<const Runtime> &runtime);

    /** Stops the timer and closes its handle; lookups in flight finish on their own. */
    void close();

private:
    struct Due {
        PoolPtr pool;
        std::uint64_t at = 0; // uv_now() milliseconds
    };
    static void onTick(uv_timer_t *timer);

    uv_loop_t *loop_;
    uv_timer_t *timer_;
    std::vector<Due> due_;
};

} // namespace sluice::proxy
