// ops/systemd: the sd_notify protocol, implemented here in a few lines rather than linking
// libsystemd: each notification is one datagram of "KEY=VALUE\n" lines sent to the AF_UNIX
// socket named by $NOTIFY_SOCKET (a path, or an abstract name written with a leading '@').
// Without $NOTIFY_SOCKET every call does nothing and returns false. Calls may come from any
// thread; none blocks (a full socket drops the message, as sd_notify does).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>

#include <uv.h>

namespace sluice::ops::systemd {

/** Sends `state` ("READY=1\nSTATUS=...") as one datagram. False when unset or on failure. */
bool notify(std::string_view state);

/** READY=1, with STATUS=`status` when it is not empty. After every listener is bound. */
bool notifyReady(std::string_view status = {});

/**
 * RELOADING=1 with MONOTONIC_USEC=<CLOCK_MONOTONIC in microseconds>, as Type=notify-reload
 * requires (without it `systemctl reload` waits forever). Send notifyReady() when the reload
 * ended, whether it succeeded or not.
 */
bool notifyReloading(std::string_view status = {});

/** STOPPING=1: the drain has started. */
bool notifyStopping(std::string_view status = {});

/** STATUS=`text` (one line; newlines are replaced by spaces). */
bool notifyStatus(std::string_view text);

/** The message notifyReloading() sends, for tests: "RELOADING=1\nMONOTONIC_USEC=N\n...". */
std::string reloadingMessage(std::uint64_t monotonicMicros, std::string_view status);

/**
 * The watchdog interval systemd expects for this process, in microseconds: $WATCHDOG_USEC when
 * it is set and $WATCHDOG_PID is unset or names this process; 0 otherwise.
 */
std::uint64_t watchdogMicros();

/**
 * Sends WATCHDOG=1 from a loop's timer every watchdogMicros()/2. The timer does not keep the
 * loop alive (uv_unref). It pings from the loop itself, so a loop that hangs stops the pings and
 * systemd restarts the service. Call close() before the loop is closed.
 */
class Watchdog {
public:
    explicit Watchdog(uv_loop_t *loop);
    ~Watchdog();
    Watchdog(const Watchdog &) = delete;
    Watchdog &operator=(const Watchdog &) = delete;

    /** Starts the pings if systemd asked for them; true when it did. Sends one ping at once. */
    bool start();

    /** Stops and closes the timer; its memory is released in the close callback. */
    void close();

    std::uint64_t intervalMicros() const { return intervalMicros_; }

private:
    uv_loop_t *loop_;
    uv_timer_t *timer_ = nullptr;
    std::uint64_t intervalMicros_ = 0;
};

} // namespace sluice::ops::systemd
