#include "proxy/server.hpp"

#include <stdexcept>

#include "proxy/connection.hpp"
#include "proxy/listener.hpp"
#include "util/log.hpp"

namespace sluice::proxy {

Server::Server(uv_loop_t *loop, const Config &config)
    : loop_(loop)
    , maxConnections_(config.global.maxConnections)
    , drainTimeout_(config.global.drainTimeout) {
    for (const auto &listener : config.listeners) {
        auto settings = std::make_shared<ListenerSettings>();
        settings->name = listener.name;
        settings->context = tls::makeServerContext(listener);
        try {
            settings->backend = net::resolve(listener.backend);
        } catch (const std::exception &e) {
            throw std::runtime_error("listener " + listener.name + ": backend " + e.what());
        }
        settings->backendText = listener.backend.text();
        settings->timeouts = listener.timeouts;
        settings->buffers = config.global.buffers;
        settings->maxConnections = listener.maxConnections;
        settings->backlog = listener.backlog;
        for (const auto &address : listener.listen) {
            try {
                binds_.push_back({settings, net::resolve(address), address.text()});
            } catch (const std::exception &e) {
                throw std::runtime_error("listener " + listener.name + ": listen " + e.what());
            }
        }
        settings_.push_back(std::move(settings));
    }
}

Server::~Server() = default;

void Server::start() {
    for (const auto &bind : binds_) {
        auto listener = std::make_unique<Listener>(*this, bind.settings);
        Listener &added = *listener;
        // Owned before binding, so a failed bind's handle is closed with the others.
        listeners_.push_back(std::move(listener));
        added.bind(bind.address, bind.text, bind.settings->backlog);
        log::info("listening listener=" + added.name() + " address=" + added.boundText() +
                  " backend=" + bind.settings->backendText);
    }
}

std::vector<std::pair<std::string, std::string>> Server::boundAddresses() const {
    std::vector<std::pair<std::string, std::string>> out;
    for (const auto &listener : listeners_) {
        out.emplace_back(listener->name(), listener->boundText());
    }
    return out;
}

bool Server::admits(const ListenerSettings &settings) const {
    if (draining_ || stats_.active >= maxConnections_) {
        return false;
    }
    if (settings.maxConnections == 0) {
        return true;
    }
    auto found = perListener_.find(&settings);
    return found == perListener_.end() || found->second < settings.maxConnections;
}

void Server::connectionOpened(Connection *connection, const ListenerSettings &settings) {
    connections_.insert(connection);
    perListener_[&settings]++;
    stats_.active++;
}

void Server::connectionClosed(Connection *connection, const ListenerSettings &settings) {
    connections_.erase(connection);
    if (--perListener_[&settings] == 0) {
        perListener_.erase(&settings);
    }
    stats_.active--;
    if (!draining_) {
        for (auto &listener : listeners_) {
            listener->retryAccept();
        }
    }
    checkDrained();
}

void Server::closeListeners() {
    for (auto &listener : listeners_) {
        ++closingHandles_;
        listener->close([this] {
            --closingHandles_;
            checkDrained();
        });
    }
}

void Server::drain(std::function<void(bool forced)> done) {
    if (draining_) {
        return;
    }
    draining_ = true;
    drained_ = std::move(done);
    log::info("drain-start connections=" + std::to_string(connections_.size()) +
              " timeout_ms=" + std::to_string(drainTimeout_.count()));
    drainTimer_ = new uv_timer_t;
    uv_timer_init(loop_, drainTimer_);
    drainTimer_->data = this;
    if (drainTimeout_.count() > 0) {
        uv_timer_start(drainTimer_, onDrainTimer, static_cast<std::uint64_t>(drainTimeout_.count()),
                       0);
    }
    closeListeners();
    checkDrained();
}

void Server::stop(std::function<void(bool forced)> done) {
    if (!draining_) {
        drain(std::move(done));
    } else if (done) {
        drained_ = std::move(done);
    }
    if (!connections_.empty()) {
        onDrainTimer(drainTimer_);
    }
}

void Server::onDrainTimer(uv_timer_t *timer) {
    auto *self = static_cast<Server *>(timer->data);
    if (self->connections_.empty()) {
        return;
    }
    self->forced_ = true;
    log::warn("drain-deadline connections=" + std::to_string(self->connections_.size()));
    // abort() only starts closing; connections leave the set from their close callbacks.
    for (Connection *connection :
         std::vector<Connection *>(self->connections_.begin(), self->connections_.end())) {
        connection->abort("drain deadline");
    }
}

void Server::checkDrained() {
    if (!draining_ || doneScheduled_ || !connections_.empty() || closingHandles_ > 0 ||
        drainTimer_ == nullptr) {
        return;
    }
    doneScheduled_ = true;
    // Completion is reported from the timer's close callback: after every handle is closed and
    // never inside the call that started the drain.
    uv_close(reinterpret_cast<uv_handle_t *>(drainTimer_), [](uv_handle_t *handle) {
        auto *self = static_cast<Server *>(handle->data);
        delete reinterpret_cast<uv_timer_t *>(handle);
        self->drainTimer_ = nullptr;
        log::info(std::string("drain-done forced=") + (self->forced_ ? "yes" : "no"));
        if (auto done = std::move(self->drained_)) {
            done(self->forced_);
        }
    });
}

} // namespace sluice::proxy
