#include "daemon/file_watch.hpp"

#include <algorithm>

#include "util/file_stamp.hpp"

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
    : onChange_(std::move(onChange)) {
    uv_timer_init(loop, &timer_);
    timer_.data = this;
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
}

void FileWatch::stop() {
    uv_timer_stop(&timer_);
}

void FileWatch::close() {
    uv_close(reinterpret_cast<uv_handle_t *>(&timer_), nullptr);
}

void FileWatch::onTimer(uv_timer_t *timer) {
    static_cast<FileWatch *>(timer->data)->check();
}

void FileWatch::check() {
    Stamps current = stamp(paths_);
    if (current == reference_) {
        pending_.reset(); // changed and changed back: nothing to do
        return;
    }
    if (!pending_ || *pending_ != current) {
        pending_ = std::move(current); // still changing: act once it holds for a check
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
