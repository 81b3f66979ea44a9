#include "daemon/file_watch.hpp"

#include <algorithm>
#include <filesystem>
#include <system_error>

#include "util/file_stamp.hpp"
#include "util/log.hpp"

namespace sluice::daemon {

std::vector<std::string> watchedFiles(const Config &config) {
    std::vector<std::string> paths;
    auto add = [&paths](const std::string &path) {
        if (!path.empty()) {
            paths.push_back(path);
        }
    };
    auto addClientAuth = [&add](const ClientAuth &auth) {
        add(auth.ca);
        for (const auto &crl : auth.crl) {
            add(crl);
        }
    };
    add(config.path);
    add(config.tls.ticketKeys);
    for (const auto &listener : config.listeners) {
        for (const auto &files : listener.certificates) {
            add(files.cert);
            add(files.key);
            if (files.clientAuth) {
                addClientAuth(*files.clientAuth);
            }
        }
        add(listener.certificatesDir);
        add(listener.tls.ticketKeys);
        addClientAuth(listener.clientAuth);
    }
    for (const auto &backend : config.backends) {
        add(backend.tls.ca);
        add(backend.tls.cert);
        add(backend.tls.key);
    }
    return paths;
}

FileWatch::FileWatch(uv_loop_t *loop, OnChange onChange)
    : loop_(loop)
    , onChange_(std::move(onChange)) {
    uv_timer_init(loop, &timer_);
    timer_.data = this;
    uv_timer_init(loop, &settle_);
    settle_.data = this;
}

std::vector<std::string> FileWatch::foldersToWatch(const std::vector<std::string> &paths) {
    namespace fs = std::filesystem;
    std::vector<std::string> folders;
    auto add = [&folders](const fs::path &folder) {
        if (!folder.empty()) {
            folders.push_back(folder.lexically_normal().string());
        }
    };
    for (const auto &text : paths) {
        std::error_code error;
        fs::path path = fs::absolute(text, error);
        if (error) {
            continue;
        }
        if (fs::is_directory(path, error)) {
            add(path);
        }
        // Each link of the chain lives in a folder whose events announce the link's change;
        // a bounded walk, so a loop of links ends.
        for (int hop = 0; hop < 8; ++hop) {
            add(path.parent_path());
            if (!fs::is_symlink(path, error)) {
                break;
            }
            const fs::path target = fs::read_symlink(path, error);
            if (error) {
                break;
            }
            path = target.is_absolute() ? target : path.parent_path() / target;
        }
        // The file's own folder, through links in the folders above it (a Kubernetes volume's
        // "..data" link to the folder of the current version).
        const fs::path real = fs::canonical(text, error);
        if (!error) {
            add(real.parent_path());
        }
    }
    std::sort(folders.begin(), folders.end());
    folders.erase(std::unique(folders.begin(), folders.end()), folders.end());
    return folders;
}

FileWatch::Stamps FileWatch::stamp(const std::vector<std::string> &paths) {
    Stamps stamps;
    for (const auto &path : paths) {
        std::string text;
        util::appendFileStamp(path, text);
        stamps.emplace(path, std::move(text));
    }
    return stamps;
}

void FileWatch::watch(std::vector<std::string> paths, Duration interval, const Stamps &readAt) {
    uv_timer_stop(&timer_);
    uv_timer_stop(&settle_);
    closeEvents();
    pending_.reset();
    if (interval == Duration::zero()) {
        paths_.clear(); // nothing is stamped, on a reload either
        reference_.clear();
        return;
    }
    // A file two listeners (or the running and a refused configuration) name is stamped once.
    std::sort(paths.begin(), paths.end());
    paths.erase(std::unique(paths.begin(), paths.end()), paths.end());
    paths_ = std::move(paths);
    reference_ = stamp(paths_);
    for (auto &[path, text] : reference_) {
        if (auto found = readAt.find(path); found != readAt.end()) {
            text = found->second;
        }
    }
    const auto ms = static_cast<std::uint64_t>(interval.count());
    uv_timer_start(&timer_, onTimer, ms, ms);
    for (const auto &folder : foldersToWatch(paths_)) {
        auto *event = new uv_fs_event_t;
        uv_fs_event_init(loop_, event);
        event->data = this;
        if (const int err = uv_fs_event_start(event, onEvent, folder.c_str(), 0); err != 0) {
            // No events from here (no inotify, a folder not there yet): the interval's checks
            // still see its files change.
            const std::string line = "watch-folder-failed folder=" + log::quoted(folder) +
                                     " reason=" + log::quoted(uv_strerror(err)) +
                                     " action=\"checked every interval only\"";
            if (err == UV_ENOENT) {
                log::debug(line);
            } else {
                log::warn(line);
            }
        }
        events_.push_back(event);
    }
}

void FileWatch::closeEvents() {
    for (auto *event : events_) {
        uv_close(reinterpret_cast<uv_handle_t *>(event),
                 [](uv_handle_t *handle) { delete reinterpret_cast<uv_fs_event_t *>(handle); });
    }
    events_.clear();
}

void FileWatch::stop() {
    uv_timer_stop(&timer_);
    uv_timer_stop(&settle_);
    closeEvents();
}

void FileWatch::close() {
    closeEvents();
    uv_close(reinterpret_cast<uv_handle_t *>(&timer_), nullptr);
    uv_close(reinterpret_cast<uv_handle_t *>(&settle_), nullptr);
}

void FileWatch::onTimer(uv_timer_t *timer) {
    static_cast<FileWatch *>(timer->data)->check();
}

void FileWatch::onEvent(uv_fs_event_t *handle, const char *, int, int) {
    // Any event in the folder: its other files change too (a log written beside the keys), so
    // this only brings the next check forward; the stamps decide. Events while a check is due
    // are folded into it.
    auto *self = static_cast<FileWatch *>(handle->data);
    if (uv_is_active(reinterpret_cast<uv_handle_t *>(&self->settle_)) == 0) {
        uv_timer_start(&self->settle_, onTimer, settleDelay, 0);
    }
}

void FileWatch::check() {
    Stamps current = stamp(paths_);
    if (current == reference_) {
        pending_.reset(); // changed and changed back: nothing to do
        return;
    }
    if (!pending_ || *pending_ != current) {
        pending_ = std::move(current); // still changing: act once it holds for a check
        if (!events_.empty() && uv_is_active(reinterpret_cast<uv_handle_t *>(&settle_)) == 0) {
            uv_timer_start(&settle_, onTimer, settleDelay, 0); // that check comes soon
        }
        return;
    }
    std::vector<std::string> changed;
    for (const auto &[path, text] : current) {
        if (auto found = reference_.find(path);
            found == reference_.end() || found->second != text) {
            changed.push_back(path);
        }
    }
    pending_.reset();
    onChange_(changed); // reloads, and through watch() sets the new reference
}

} // namespace sluice::daemon
