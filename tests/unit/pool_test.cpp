// Unit tests for proxy/pool: the balancing rules, passive health (marking down, skipping,
// recovery), the fallback when every server is down, the attempt limit, and routes by SNI and
// ALPN on a listener's settings.

#include <string>
#include <vector>

#include <doctest/doctest.h>

#include "proxy/pool.hpp"
#include "proxy/server.hpp"

using sluice::Address;
using sluice::BackendConfig;
using sluice::Balance;
using sluice::proxy::HealthChange;
using sluice::proxy::Pool;
using sluice::proxy::TriedServers;

namespace {

BackendConfig threeServers(Balance balance) {
    BackendConfig config;
    config.name = "app";
    config.balance = balance;
    for (std::uint16_t port : {9001, 9002, 9003}) {
        Address address;
        address.host = "127.0.0.1";
        address.port = port;
        config.servers.push_back(address);
    }
    config.maxFails = 2;
    config.failTimeout = std::chrono::seconds(10);
    return config;
}

TriedServers none(const Pool &pool) {
    return TriedServers(pool.size());
}

} // namespace

TEST_CASE("round-robin takes each server in turn") {
    Pool pool(threeServers(Balance::roundRobin));
    std::vector<int> counts(3, 0);
    for (int i = 0; i < 30; ++i) {
        const int picked = pool.pick(none(pool), 1000);
        REQUIRE(picked >= 0);
        ++counts[static_cast<std::size_t>(picked)];
    }
    CHECK(counts == std::vector<int>{10, 10, 10});
}

TEST_CASE("first takes the first healthy server") {
    Pool pool(threeServers(Balance::first));
    for (int i = 0; i < 5; ++i) {
        CHECK(pool.pick(none(pool), 1000) == 0);
    }
    TriedServers tried = none(pool);
    tried.set(0);
    CHECK(pool.pick(tried, 1000) == 1);
}

TEST_CASE("least-connections avoids busy servers") {
    Pool pool(threeServers(Balance::leastConnections));
    pool.server(0).active = 5;
    pool.server(1).active = 1;
    pool.server(2).active = 3;
    CHECK(pool.pick(none(pool), 1000) == 1);
    pool.server(1).active = 7;
    CHECK(pool.pick(none(pool), 1000) == 2);
}

TEST_CASE("a server failing max_fails times in a row is skipped until fail_timeout") {
    Pool pool(threeServers(Balance::first));
    CHECK(pool.failed(0, 1000) == HealthChange::none);
    CHECK(pool.pick(none(pool), 1000) == 0); // one failure is not enough
    CHECK(pool.failed(0, 1000) == HealthChange::markedDown);
    CHECK(pool.pick(none(pool), 1000) == 1);
    CHECK(pool.pick(none(pool), 10999) == 1);
    // After fail_timeout it is tried again; one more failure marks it down again at once.
    CHECK(pool.pick(none(pool), 11000) == 0);
    CHECK(pool.failed(0, 11000) == HealthChange::markedDown);
    CHECK(pool.pick(none(pool), 11001) == 1);
    // A success clears the record.
    CHECK(pool.succeeded(0) == HealthChange::recovered);
    CHECK(pool.pick(none(pool), 11002) == 0);
    CHECK(pool.server(0).failures == 0);
    CHECK(pool.server(0).connectFailures == 3);
    CHECK(pool.server(0).connects == 1);
}

TEST_CASE("a success in between resets the consecutive count") {
    Pool pool(threeServers(Balance::first));
    CHECK(pool.failed(0, 1000) == HealthChange::none);
    CHECK(pool.succeeded(0) == HealthChange::none);
    CHECK(pool.failed(0, 1000) == HealthChange::none);
    CHECK(pool.pick(none(pool), 1000) == 0);
}

TEST_CASE("max_fails = 0 never marks a server down") {
    BackendConfig config = threeServers(Balance::first);
    config.maxFails = 0;
    Pool pool(config);
    for (int i = 0; i < 10; ++i) {
        CHECK(pool.failed(0, 1000) == HealthChange::none);
    }
    CHECK(pool.pick(none(pool), 1000) == 0);
}

TEST_CASE("when every untried server is down, the one back soonest is tried") {
    Pool pool(threeServers(Balance::roundRobin));
    for (std::size_t i = 0; i < 3; ++i) {
        pool.failed(i, 1000 + i * 100);
        pool.failed(i, 1000 + i * 100);
    }
    CHECK(pool.pick(none(pool), 2000) == 0);
    TriedServers tried = none(pool);
    tried.set(0);
    CHECK(pool.pick(tried, 2000) == 1);
    tried.set(1);
    tried.set(2);
    CHECK(pool.pick(tried, 2000) == -1);
}

TEST_CASE("attempts bounds the servers one connection tries") {
    BackendConfig config = threeServers(Balance::roundRobin);
    CHECK(Pool(config).attemptLimit() == 3);
    config.attempts = 2;
    CHECK(Pool(config).attemptLimit() == 2);
    config.attempts = 10;
    CHECK(Pool(config).attemptLimit() == 3);
}

TEST_CASE("the name for SNI and verification") {
    BackendConfig config = threeServers(Balance::first);
    config.servers[1].host = "localhost";
    CHECK(Pool(config).serverName(0).empty()); // an IP literal is not a name
    CHECK(Pool(config).serverName(1) == "localhost");
    config.tls.serverName = "api.internal";
    CHECK(Pool(config).serverName(0) == "api.internal");
    CHECK(Pool(config).serverName(1) == "api.internal");
}

TEST_CASE("routes match SNI (exact and one-label wildcard) and ALPN, first match wins") {
    auto pool = [](const char *name) {
        BackendConfig config = threeServers(Balance::first);
        config.name = name;
        return std::make_shared<Pool>(config);
    };
    sluice::proxy::ListenerSettings settings;
    settings.pool = pool("default");
    settings.routes.push_back({"api.example.test", "", pool("api")});
    settings.routes.push_back({"*.img.example.test", "", pool("img")});
    settings.routes.push_back({"", "h2", pool("h2")});
    settings.routes.push_back({"api.example.test", "h2", pool("never")});
    CHECK(settings.route("api.example.test", "")->name() == "api");
    CHECK(settings.route("API.Example.Test", "h2")->name() == "api");
    CHECK(settings.route("a.img.example.test", "")->name() == "img");
    CHECK(settings.route("x.a.img.example.test", "")->name() == "default");
    CHECK(settings.route("img.example.test", "")->name() == "default");
    CHECK(settings.route("other.test", "h2")->name() == "h2");
    CHECK(settings.route("", "http/1.1")->name() == "default");
    CHECK(settings.route("", "")->name() == "default");
}

TEST_CASE("tried servers: inline bits up to 64, a vector beyond, the same answers") {
    for (const std::size_t count :
         {std::size_t{1}, std::size_t{64}, std::size_t{65}, std::size_t{200}}) {
        INFO("servers " << count);
        TriedServers tried(count);
        CHECK(tried.size() == count);
        CHECK_FALSE(tried.all());
        for (std::size_t i = 0; i < count; ++i) {
            CHECK_FALSE(tried[i]);
        }
        for (std::size_t i = 0; i + 1 < count; i += 2) {
            tried.set(i);
        }
        for (std::size_t i = 0; i < count; ++i) {
            CHECK(tried[i] == (i % 2 == 0 && i + 1 < count));
        }
        for (std::size_t i = 0; i < count; ++i) {
            tried.set(i);
        }
        CHECK(tried.all());
        tried.reset(count);
        CHECK_FALSE(tried[count - 1]);
        CHECK_FALSE(tried.all());
    }
}
