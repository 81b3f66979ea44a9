#include "proxy/generation.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdexcept>
#include <sys/socket.h>
#include <unistd.h>

#include "net/listen_socket.hpp"

namespace sluice::proxy {
namespace {

bool sameAddress(int fd, const net::SocketAddress &address) {
    sockaddr_storage storage{};
    socklen_t length = sizeof storage;
    if (address.kind != Address::Kind::tcp ||
        ::getsockname(fd, reinterpret_cast<sockaddr *>(&storage), &length) != 0 ||
        storage.ss_family != address.storage.ss_family) {
        return false;
    }
    if (storage.ss_family == AF_INET) {
        const auto &a = reinterpret_cast<const sockaddr_in &>(storage);
        const auto &b = reinterpret_cast<const sockaddr_in &>(address.storage);
        return a.sin_port == b.sin_port && a.sin_addr.s_addr == b.sin_addr.s_addr;
    }
    const auto &a = reinterpret_cast<const sockaddr_in6 &>(storage);
    const auto &b = reinterpret_cast<const sockaddr_in6 &>(address.storage);
    return a.sin6_port == b.sin6_port &&
           std::memcmp(&a.sin6_addr, &b.sin6_addr, sizeof a.sin6_addr) == 0;
}

/** The usable inherited sockets named `listener` (several may share a name), in order. */
std::vector<const InheritedSocket *> namedFor(const std::vector<InheritedSocket> &inherited,
                                              const std::string &listener) {
    std::vector<const InheritedSocket *> out;
    for (const auto &socket : inherited) {
        if (socket.usable && !socket.name.empty() && socket.name == listener) {
            out.push_back(&socket);
        }
    }
    return out;
}

/** The usable inherited socket bound to exactly `address` whose name is none of
 * `listenerNames` (unnamed, or named after no listener), or null. */
const InheritedSocket *unnamedAt(const std::vector<InheritedSocket> &inherited,
                                 const std::vector<std::string> &listenerNames,
                                 const net::SocketAddress &address) {
    for (const auto &socket : inherited) {
        const bool named = std::find(listenerNames.begin(), listenerNames.end(), socket.name) !=
                           listenerNames.end();
        if (socket.usable && !named && sameAddress(socket.fd, address)) {
            return &socket;
        }
    }
    return nullptr;
}

} // namespace

std::vector<PlannedSocket> planSockets(const Config &config,
                                       const std::vector<InheritedSocket> &inherited) {
    std::vector<PlannedSocket> plan;
    std::vector<std::string> names;
    for (const auto &listener : config.listeners) {
        names.push_back(listener.name);
    }
    for (const auto &listener : config.listeners) {
        const auto named = namedFor(inherited, listener.name);
        for (const auto *socket : named) {
            PlannedSocket planned;
            planned.name = listener.name;
            planned.text = socket->localText;
            planned.key = listener.name + " systemd:" + socket->localText;
            planned.backlog = listener.backlog;
            planned.inheritedFd = socket->fd;
            plan.push_back(std::move(planned));
        }
        if (!named.empty()) {
            continue;
        }
        for (const auto &address : listener.listen) {
            PlannedSocket socket;
            socket.name = listener.name;
            socket.text = address.text();
            socket.key = listener.name + " " + socket.text;
            try {
                socket.address = net::resolve(address);
            } catch (const std::exception &e) {
                throw std::runtime_error("listener " + listener.name + ": listen " + e.what());
            }
            socket.backlog = listener.backlog;
            if (const auto *found = unnamedAt(inherited, names, socket.address)) {
                socket.key = listener.name + " systemd:" + found->localText;
                socket.inheritedFd = found->fd;
            }
            plan.push_back(std::move(socket));
        }
    }
    return plan;
}

void closeSockets(std::vector<std::vector<ListenSocket>> &byWorker) {
    for (auto &sockets : byWorker) {
        for (auto &socket : sockets) {
            if (socket.fd >= 0) {
                ::close(socket.fd);
                socket.fd = -1;
            }
        }
    }
}

std::vector<std::vector<ListenSocket>> openSockets(const std::vector<PlannedSocket> &plan,
                                                   unsigned workers,
                                                   const HandedOverSocket &handedOver) {
    std::vector<std::vector<ListenSocket>> byWorker(workers);
    try {
        for (const auto &planned : plan) {
            net::SocketAddress address = planned.address;
            for (unsigned w = 0; w < workers; ++w) {
                if (planned.inheritedFd >= 0) {
                    // Each worker owns (and one day closes) a dup: the owner keeps the inherited
                    // socket. The dups share the socket's single accept queue.
                    const int fd = ::fcntl(planned.inheritedFd, F_DUPFD_CLOEXEC, 0);
                    if (fd < 0) {
                        throw std::runtime_error("listener " + planned.name + ": listen " +
                                                 planned.text + ": dup: " + std::strerror(errno));
                    }
                    byWorker[w].push_back({planned.key, planned.name, fd});
                    continue;
                }
                int fd = handedOver ? handedOver(planned.key) : -1;
                if (fd >= 0) {
                    byWorker[w].push_back({planned.key, planned.name, fd});
                    if (w == 0) {
                        address = net::withPort(address, net::boundPort(fd));
                    }
                    continue;
                }
                try {
                    fd = net::openListenSocket(address, planned.text, planned.backlog);
                } catch (const std::exception &e) {
                    throw std::runtime_error("listener " + planned.name + ": " + e.what());
                }
                byWorker[w].push_back({planned.key, planned.name, fd});
                if (w == 0) {
                    address = net::withPort(address, net::boundPort(fd));
                }
            }
        }
    } catch (...) {
        closeSockets(byWorker);
        throw;
    }
    return byWorker;
}

std::vector<std::pair<std::string, std::string>> ListenState::bound() const {
    std::vector<std::pair<std::string, std::string>> out;
    for (const auto &socket : sockets) {
        out.emplace_back(socket.name, socket.address);
    }
    return out;
}

ListenState listenStateOf(const std::vector<ListenSocket> &sockets) {
    ListenState state;
    for (const auto &socket : sockets) {
        state.sockets.push_back({socket.key, socket.name, net::localText(socket.fd)});
    }
    return state;
}

Generation buildGeneration(const Config &config, unsigned workers, const ListenState &running,
                           const std::vector<InheritedSocket> &inherited,
                           const std::map<std::string, HandlerFactory> *handlers) {
    workers = std::max(1U, workers);
    Generation next;
    next.runtime = buildRuntime(config, workers, handlers);
    const std::vector<PlannedSocket> plan = planSockets(config, inherited);
    auto runningSocket = [&running](const std::string &key) -> const BoundSocket * {
        for (const auto &socket : running.sockets) {
            if (socket.key == key) {
                return &socket;
            }
        }
        return nullptr;
    };
    std::vector<PlannedSocket> added;
    for (const auto &planned : plan) {
        if (runningSocket(planned.key) == nullptr) {
            added.push_back(planned);
        }
    }
    for (const auto &socket : running.sockets) {
        if (std::none_of(plan.begin(), plan.end(),
                         [&socket](const PlannedSocket &p) { return p.key == socket.key; })) {
            next.removed.push_back(socket.key);
        }
    }
    next.added = openSockets(added, workers);
    next.addedCount = added.size();
    // The new state in configuration order: running sockets keep their address, added ones
    // report the port the kernel chose. openSockets() keeps the order of `added`.
    std::size_t opened = 0;
    for (const auto &planned : plan) {
        if (const BoundSocket *kept = runningSocket(planned.key)) {
            next.state.sockets.push_back(*kept);
        } else {
            const ListenSocket &socket = next.added.front()[opened++];
            next.state.sockets.push_back({socket.key, socket.name, net::localText(socket.fd)});
        }
    }
    return next;
}

} // namespace sluice::proxy
