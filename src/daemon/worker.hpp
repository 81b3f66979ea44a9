// daemon/worker: one thread with its own libuv loop and its own proxy::Server. Workers share
// nothing but the immutable Runtime (TLS contexts), the per-address handshake record
// (proxy::ClientLimits, sharded behind mutexes) and the kernel's SO_REUSEPORT spreading.
#pragma once

#include <atomic>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include <uv.h>

#include "proxy/server.hpp"

namespace sluice::daemon {

/**
 * A worker thread. Built on the main thread (its server starts listening before the thread
 * runs, so binding errors surface at startup); afterwards it is driven only through post(),
 * which runs a command on the worker's own loop. When its server has drained the loop ends, the
 * thread calls `exited` (from the worker thread) and waits to be joined.
 */
class Worker {
public:
    Worker(unsigned index, std::shared_ptr<const proxy::Runtime> runtime,
           std::shared_ptr<proxy::ClientLimits> limits, std::vector<proxy::ListenSocket> sockets,
           std::function<void()> exited);
    ~Worker();
    Worker(const Worker &) = delete;
    Worker &operator=(const Worker &) = delete;

    /** "NAME ADDRESS" of every listening socket; call before start(). */
    std::vector<std::pair<std::string, std::string>> boundAddresses() const;

    /** Runs the loop on a new thread. */
    void start();

    /**
     * Runs `command` on the worker's loop, soon; safe from any thread. False (and the command
     * dropped) once the worker has drained.
     */
    bool post(std::function<void(Worker &)> command);

    /** Asks the server to drain; the loop ends when it has. */
    void drain();

    /** Asks the server to close everything now. */
    void stop();

    void join();

    proxy::Server &server() { return *server_; }
    bool forced() const { return forced_; }
    /** True once the thread has left its loop (safe from any thread). */
    bool exitedFlag() const { return exitedFlag_.load(); }

private:
    static void onWake(uv_async_t *handle);
    void finish(bool forced);

    unsigned index_;
    uv_loop_t loop_{};
    uv_async_t wake_{};
    std::unique_ptr<proxy::Server> server_;
    std::function<void()> exited_;
    std::mutex mutex_;
    std::deque<std::function<void(Worker &)>> commands_;
    std::thread thread_;
    bool forced_ = false;
    bool closed_ = false; // guarded by mutex_
    bool started_ = false;
    std::atomic<bool> exitedFlag_{false};
};

} // namespace sluice::daemon
