// daemon/upgrade: replacing the running process with a new one (SIGUSR2) without closing a
// listening socket, the way a binary upgrade needs.
//
// The running process starts its own binary again (the path it was started from, so an upgraded
// file is what runs) with the same arguments, and hands it every listening socket it bound: each
// worker's socket of each listener, and the admin listener's. They arrive as descriptors 3, 4, ...
// with $SLUICE_UPGRADE_SOCKETS naming each one's key ("NAME ADDRESS" as configured, one per line,
// a key once per worker) and $SLUICE_UPGRADE_PID the process that handed them over. The new
// process takes the sockets whose keys its configuration still has, binds the rest, closes
// what it does not use, and reports ready on a pipe (--ready-fd). Only then does the old one
// drain; until then, and if the new one fails, it goes on serving as if nothing had happened.
//
// Sockets systemd passed (socket activation) go on after those, in systemd's order, counted by
// $SLUICE_UPGRADE_ACTIVATED and named by $SLUICE_UPGRADE_ACTIVATED_NAMES (as $LISTEN_FDS and
// $LISTEN_FDNAMES): the new process matches them to its listeners as if systemd had passed them.
//
// The sockets are the same kernel objects in both processes, so nothing waiting in their accept
// queues, or still in its TCP handshake, is lost when the old process lets go of its copies.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <uv.h>

#include "daemon/activation.hpp"

namespace sluice::daemon {

/** The listening sockets a previous sluice process handed to this one, by key. */
class HandedOver {
public:
    /**
     * Takes the sockets from the environment when $SLUICE_UPGRADE_PID is this process's parent:
     * descriptors 3 .. 3+N-1, one per line of $SLUICE_UPGRADE_SOCKETS, then the activated ones,
     * all marked close-on-exec. Unsets the variables either way (call before any thread
     * starts). Throws std::runtime_error when they are malformed or a keyed descriptor is not a
     * listening socket.
     */
    static HandedOver fromEnvironment();

    /** This process was started by an upgrade (the variables were there and meant for it). */
    bool fromParent() const { return fromParent_; }
    /** The next socket handed over under `key` (in the old process's worker order), or -1. */
    int take(const std::string &key);
    /** Closes the sockets nobody took, logging each; call once the new sockets are open. */
    void closeUnused();
    /** The sockets systemd passed to the old process, handed on (moved out). */
    std::vector<ActivatedSocket> takeActivated() { return std::move(activated_); }

private:
    std::map<std::string, std::vector<int>> byKey_;
    std::vector<ActivatedSocket> activated_;
    bool fromParent_ = false;
};

/** A socket the running process hands over: its key and descriptor (which it keeps). */
struct HandOver {
    std::string key;
    int fd = -1;
};

/**
 * One upgrade in progress: the new process, the pipe it reports ready on, and a deadline. Runs on
 * the main loop. Exactly one of the callbacks runs, once: `ready` with the new process's pid once
 * it wrote "ready", or `failed` with the reason (it could not start, exited, or was not ready in
 * time, in which case it is killed).
 */
class Upgrade {
public:
    using Ready = std::function<void(int pid)>;
    using Failed = std::function<void(const std::string &reason)>;

    /**
     * Starts `program` with `args` (argv[1..], without --ready-fd), `sockets` and the sockets
     * systemd passed (`activated`). Returns null after calling nothing when the process could
     * not be started, with the reason in `error`.
     */
    static std::unique_ptr<Upgrade>
    start(uv_loop_t *loop, const std::string &program, const std::vector<std::string> &args,
          const std::vector<HandOver> &sockets, const std::vector<ActivatedSocket> &activated,
          std::uint64_t timeoutMs, Ready ready, Failed failed, std::string &error);
    ~Upgrade();
    Upgrade(const Upgrade &) = delete;
    Upgrade &operator=(const Upgrade &) = delete;

    int pid() const { return pid_; }
    /** Closes the handles still open (the new process goes on); the object may go once `done`
     * ran (at once when none was open). Later calls do nothing. */
    void close(std::function<void()> done);

private:
    Upgrade(Ready ready, Failed failed);
    static void onExit(uv_process_t *process, std::int64_t status, int signal);
    static void onAlloc(uv_handle_t *handle, std::size_t suggested, uv_buf_t *buf);
    static void onRead(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf);
    static void onTimeout(uv_timer_t *timer);
    void fail(const std::string &reason);
    /** Closes one handle once (its pointer becomes null); closed() counts it. */
    template <typename Handle>
    void closeHandle(Handle *&handle);
    void closed();

    Ready ready_;
    Failed failed_;
    // Handles live on the heap and go in their close callbacks.
    uv_process_t *process_ = nullptr;
    uv_pipe_t *pipe_ = nullptr;
    uv_timer_t *timer_ = nullptr;
    std::string received_; // what the pipe brought so far
    char buffer_[512]{};
    int open_ = 0; // handles not yet closed
    int pid_ = 0;
    bool decided_ = false;
    bool closeRequested_ = false;
    std::function<void()> done_;
};

/**
 * The arguments to start the new process with: `argv` without --ready-fd and its value, and
 * with the configuration's path made absolute (the new process starts in the old one's working
 * folder, which may have changed since). Returns argv[1..].
 */
std::vector<std::string> upgradeArguments(int argc, char **argv, const std::string &absoluteConfig);

/** `path` made absolute from the current folder (not resolved through symbolic links). */
std::string absoluteConfigPath(const std::string &path);

/** The path this process was started from, absolute (argv[0], looked up in $PATH when it has no
 * slash), or empty when it cannot be found. Resolved at startup, before any chdir(). */
std::string programPath(const char *argv0);

} // namespace sluice::daemon
