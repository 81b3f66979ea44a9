#include "proxy/resolver.hpp"

#include <algorithm>
#include <string>

#include "net/timer.hpp"
#include "util/log.hpp"

namespace sluice::proxy {
namespace {

// The timer's period: resolve_interval is at least a second.
constexpr std::uint64_t tickMs = 1000;

/** One lookup on the thread pool; owns a reference to its pool until it is done. */
struct Lookup {
    uv_work_t work{};
    PoolPtr pool;
    std::vector<std::string> failures;
};

} // namespace

Resolver::Resolver(uv_loop_t *loop)
    : loop_(loop)
    , timer_(net::newTimer(loop, this)) {}

Resolver::~Resolver() = default;

void Resolver::watch(const std::shared_ptr<const Runtime> &runtime) {
    due_.clear();
    const std::uint64_t now = uv_now(loop_);
    for (const auto &pool : runtime->pools) {
        const auto interval = static_cast<std::uint64_t>(pool->config().resolveInterval.count());
        if (interval > 0) {
            due_.push_back({pool, now + interval});
        }
    }
    if (due_.empty()) {
        uv_timer_stop(timer_);
    } else {
        uv_timer_start(timer_, onTick, tickMs, tickMs);
    }
}

void Resolver::close() {
    due_.clear();
    if (timer_ != nullptr) {
        net::freeTimer(timer_);
        timer_ = nullptr;
    }
}

void Resolver::onTick(uv_timer_t *timer) {
    auto *self = static_cast<Resolver *>(timer->data);
    const std::uint64_t now = uv_now(self->loop_);
    for (auto &entry : self->due_) {
        if (entry.at > now) {
            continue;
        }
        entry.at = now + static_cast<std::uint64_t>(entry.pool->config().resolveInterval.count());
        auto *lookup = new Lookup;
        lookup->work.data = lookup;
        lookup->pool = entry.pool;
        const int err = uv_queue_work(
            self->loop_, &lookup->work,
            [](uv_work_t *work) {
                auto *job = static_cast<Lookup *>(work->data);
                job->failures = job->pool->resolveAgain();
            },
            [](uv_work_t *work, int) {
                auto *job = static_cast<Lookup *>(work->data);
                for (const auto &failure : job->failures) {
                    log::warn("resolve-failed reason=" + log::quoted(failure) +
                              " action=\"kept the previous address\"");
                }
                delete job;
            });
        if (err != 0) {
            delete lookup;
        }
    }
}

} // namespace sluice::proxy
