// proxy/generation: one configuration built whole before it is swapped in. The daemon (at SIGHUP)
// and sluice::Server (at reload()) both build a new generation here: the Runtime, the listening
// sockets the configuration needs, and what changes from the running generation (sockets to
// open, sockets to close). Nothing is swapped until all of it succeeded, and sockets whose
// listener and address are unchanged stay open, so a reload never refuses a connection.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <sluice/config.hpp>

#include "net/address.hpp"
#include "proxy/server.hpp"

namespace sluice::proxy {

/**
 * A listening socket the process was given rather than made (systemd socket activation), which a
 * listener takes instead of binding. The caller owns `fd` and keeps it open; a listener that
 * takes it gets a dup.
 */
struct InheritedSocket {
    int fd = -1;
    std::string name;      ///< its name ($LISTEN_FDNAMES); empty when it has none
    std::string localText; ///< getsockname(), e.g. "127.0.0.1:443"; "?" if it has none
    bool usable = false;   ///< a listening TCP (IPv4 or IPv6) socket
};

/** A listen address of the configuration, resolved, with the identity it keeps across reloads. */
struct PlannedSocket {
    std::string key; ///< "NAME ADDRESS" as configured ("NAME systemd:ADDRESS" when inherited)
    std::string name;
    std::string text;
    net::SocketAddress address;
    int backlog = 511;
    int inheritedFd = -1; ///< an inherited socket to dup, or -1: bind one
};

/**
 * The sockets `config` needs, in configuration order. A listener that has inherited sockets named
 * after it takes all of them and binds none of its configured addresses; a configured address
 * that an inherited socket named after no listener is bound to takes that socket. The result
 * depends only on the configuration and `inherited`, so keys stay the same across reloads.
 * Resolves host names (blocking). Throws std::runtime_error naming the listener.
 */
std::vector<PlannedSocket> planSockets(const Config &config,
                                       const std::vector<InheritedSocket> &inherited = {});

/** Gives a socket a previous process handed over under `key` ("NAME ADDRESS"), or -1. */
using HandedOverSocket = std::function<int(const std::string &key)>;

/**
 * Opens one socket per worker for each planned address (SO_REUSEPORT), or dups the inherited one.
 * A worker takes a socket `handedOver` gives for the address's key before it binds one (each
 * worker asks once, so the handed-over sockets go one per worker and the rest are bound).
 * For port 0 the first socket's port is reused by the others, so all workers share one port.
 * Returns the sockets by worker; on failure closes what it opened (handed-over ones included)
 * and throws std::runtime_error naming the listener and the address.
 */
std::vector<std::vector<ListenSocket>> openSockets(const std::vector<PlannedSocket> &plan,
                                                   unsigned workers,
                                                   const HandedOverSocket &handedOver = {});

/** Closes the descriptors of sockets that were opened but never handed to a Server. */
void closeSockets(std::vector<std::vector<ListenSocket>> &byWorker);

/** A socket a running generation listens on. */
struct BoundSocket {
    std::string key;     ///< as PlannedSocket::key
    std::string name;    ///< the listener's name
    std::string address; ///< the bound address, with the port the kernel chose
};

/** What a running generation listens on, in configuration order. */
struct ListenState {
    std::vector<BoundSocket> sockets;

    /** ("NAME", "ADDRESS") of every socket. */
    std::vector<std::pair<std::string, std::string>> bound() const;
};

/** The state of one worker's freshly opened `sockets` (all of a plan, at startup). */
ListenState listenStateOf(const std::vector<ListenSocket> &sockets);

/**
 * A generation that is built and not yet applied. Applying it means handing `added[w]` and
 * `removed` to worker w's Server::update() with `runtime`, then taking `state` as the running
 * one. Dropping it instead must close the added sockets (closeSockets).
 */
struct Generation {
    std::shared_ptr<const Runtime> runtime;
    std::vector<std::vector<ListenSocket>> added; ///< by worker: the sockets to start accepting on
    std::vector<std::string> removed;             ///< keys of the sockets to close
    std::size_t addedCount = 0;                   ///< planned sockets opened (not per worker)
    ListenState state;                            ///< what runs once it is applied
};

/**
 * Builds a generation for `config` on `workers` workers, relative to `running` (empty at
 * startup: every socket is added): the runtime (TLS contexts, backend pools, with `handlers`
 * for backends served in-process, as buildRuntime()), the socket plan, and the sockets to add.
 * Throws std::runtime_error (or a subclass) with one message; nothing is left open then.
 */
Generation buildGeneration(const Config &config, unsigned workers, const ListenState &running,
                           const std::vector<InheritedSocket> &inherited = {},
                           const std::map<std::string, HandlerFactory> *handlers = nullptr);

} // namespace sluice::proxy
