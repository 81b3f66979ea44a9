// daemon/file_watch: global.reload_on_change. The daemon's configuration file and every file it
// names for TLS are stamped (util/file_stamp) when a configuration is read. They are stamped
// again when inotify reports a change in a folder that holds one of them (or a link on the way
// to one), settleDelay after the first event, and in any case every interval (for file systems
// that send no events). A difference that is still the same at the next check (so that a
// certificate and its key written one after the other count as one change) asks for a reload.
// The reload, successful or not, sets the stamps it read the files at as the new reference, so
// a broken file is tried once, and again only when it changes once more.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <uv.h>

#include <sluice/config.hpp>

namespace sluice::daemon {

/** The configuration file and the files it names for TLS: certificates, keys, certificate
 * folders, client CAs and CRLs, ticket keys, and the backends' CA, certificate and key. OCSP
 * responses are not among them: each listener re-reads its own when it changes. */
std::vector<std::string> watchedFiles(const Config &config);

class FileWatch {
public:
    /** Each file's stamp, by path. */
    using Stamps = std::map<std::string, std::string>;
    /** `changed` names the files that differ from the reference. */
    using OnChange = std::function<void(const std::vector<std::string> &changed)>;

    FileWatch(uv_loop_t *loop, OnChange onChange);
    FileWatch(const FileWatch &) = delete;
    FileWatch &operator=(const FileWatch &) = delete;

    static Stamps stamp(const std::vector<std::string> &paths);

    /** The watched files' stamps now (none while not watching): what a reload about to read
     * them takes as `readAt`. */
    Stamps now() const { return stamp(paths_); }

    /**
     * Watches `paths` (a path named twice is stamped once) on inotify events and every
     * `interval` (zero: stops watching, and stamps nothing) against `readAt`, the stamps at
     * which the running configuration read them; a path missing from `readAt` is stamped now.
     */
    void watch(std::vector<std::string> paths, Duration interval, const Stamps &readAt);

    /** Stops checking (a drain); close() still has to follow. */
    void stop();
    /** Closes the timer and event handles; the loop must run once more before the object goes. */
    void close();

    /** The folders whose events may mean one of `paths` changed: each path's folder, the path
     * itself when it is a folder, and the folder of each symbolic link on the way from the path
     * to the file (a certbot `live/` link, a Kubernetes `..data` swap). */
    static std::vector<std::string> foldersToWatch(const std::vector<std::string> &paths);

    /** How long after an event the files are stamped, and stamped again to see them settled. */
    static constexpr std::uint64_t settleDelay = 200; // milliseconds

private:
    static void onTimer(uv_timer_t *timer);
    static void onEvent(uv_fs_event_t *handle, const char *name, int events, int status);
    void check();
    void closeEvents();

    uv_loop_t *loop_;
    uv_timer_t timer_{};
    uv_timer_t settle_{}; // a check soon after an event, and after a change not yet settled
    std::vector<uv_fs_event_t *> events_; // one per watched folder; each freed by its close
    OnChange onChange_;
    std::vector<std::string> paths_;
    Stamps reference_;
    std::optional<Stamps> pending_; // a difference seen at the last check, not yet acted on
};

} // namespace sluice::daemon
