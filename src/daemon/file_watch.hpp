// daemon/file_watch: global.reload_on_change. The daemon's configuration file and every file it
// names for TLS are stamped (util/file_stamp) when a configuration is read; every interval they
// are stamped again, and a difference that is still the same at the next check (so that a
// certificate and its key written one after the other count as one change) asks for a reload.
// The reload, successful or not, sets the stamps it read the files at as the new reference, so
// a broken file is tried once, and again only when it changes once more.
#pragma once

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
     * Watches `paths` (a path named twice is stamped once) every `interval` (zero: stops
     * watching, and stamps nothing) against `readAt`, the stamps at which the running
     * configuration read them; a path missing from `readAt` is stamped now.
     */
    void watch(std::vector<std::string> paths, Duration interval, const Stamps &readAt);

    /** Stops checking (a drain); close() still has to follow. */
    void stop();
    /** Closes the timer handle; the loop must run once more before the object goes. */
    void close();

private:
    static void onTimer(uv_timer_t *timer);
    void check();

    uv_timer_t timer_{};
    OnChange onChange_;
    std::vector<std::string> paths_;
    Stamps reference_;
    std::optional<Stamps> pending_; // a difference seen at the last check, not yet acted on
};

} // namespace sluice::daemon
