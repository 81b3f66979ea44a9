#include "daemon/worker.hpp"

#include <future>
#include <pthread.h>

#include "daemon/privileges.hpp"
#include "util/log.hpp"

namespace sluice::daemon {

Worker::Worker(unsigned index, std::shared_ptr<const proxy::Runtime> runtime,
               std::shared_ptr<proxy::ClientLimits> limits,
               std::vector<proxy::ListenSocket> sockets, std::function<void()> exited)
    : index_(index)
    , exited_(std::move(exited)) {
    uv_loop_init(&loop_);
    uv_async_init(&loop_, &wake_, onWake);
    wake_.data = this;
    server_ = std::make_unique<proxy::Server>(&loop_, std::move(runtime), std::move(limits));
    server_->listen(std::move(sockets));
}

Worker::~Worker() {
    if (!thread_.joinable() && !started_) {
        // Never started (startup failed after it was built): close its sockets and handles on
        // this thread so the loop can be closed without leaking.
        server_->stop([this](bool forced) { finish(forced); });
        uv_run(&loop_, UV_RUN_DEFAULT);
    }
    join();
    server_.reset();
    uv_loop_close(&loop_);
}

std::vector<std::pair<std::string, std::string>> Worker::boundAddresses() const {
    return server_->boundAddresses();
}

void Worker::start() {
    started_ = true;
    // Only the main thread (reloads) keeps capabilities after the privilege drop; the worker
    // has given up its own before start() returns, so it never serves with them.
    std::promise<void> dropped;
    std::future<void> ready = dropped.get_future();
    thread_ = std::thread([this, &dropped] {
        // Named for ps/top and for the tests that look at each worker's capabilities.
        const std::string name = "sluice-w" + std::to_string(index_);
        pthread_setname_np(pthread_self(), name.substr(0, 15).c_str());
        dropThreadCapabilities();
        dropped.set_value();
        uv_run(&loop_, UV_RUN_DEFAULT);
        if (uv_loop_alive(&loop_) != 0) {
            log::error("worker-exit index=" + std::to_string(index_) +
                       " reason=\"handles left open\"");
        }
        exitedFlag_.store(true);
        exited_();
    });
    ready.wait();
}

bool Worker::post(std::function<void(Worker &)> command) {
    // The lock also orders uv_async_send before finish() closes the handle.
    std::lock_guard lock(mutex_);
    if (closed_) {
        return false; // the worker has drained: nothing is left to command
    }
    commands_.push_back(std::move(command));
    uv_async_send(&wake_);
    return true;
}

void Worker::onWake(uv_async_t *handle) {
    auto *self = static_cast<Worker *>(handle->data);
    std::deque<std::function<void(Worker &)>> commands;
    {
        std::lock_guard lock(self->mutex_);
        commands.swap(self->commands_);
    }
    for (auto &command : commands) {
        command(*self);
    }
}

void Worker::drain() {
    post([](Worker &self) { self.server_->drain([&self](bool forced) { self.finish(forced); }); });
}

void Worker::stop() {
    post([](Worker &self) { self.server_->stop([&self](bool forced) { self.finish(forced); }); });
}

void Worker::finish(bool forced) {
    forced_ = forced;
    {
        std::lock_guard lock(mutex_);
        if (closed_) {
            return;
        }
        closed_ = true;
    }
    // The last handle: once closed, uv_run returns and the thread reports its exit.
    uv_close(reinterpret_cast<uv_handle_t *>(&wake_), nullptr);
}

void Worker::join() {
    if (thread_.joinable()) {
        thread_.join();
    }
}

} // namespace sluice::daemon
