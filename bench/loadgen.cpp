// bench/loadgen: the benchmark's TLS load generator. One thread drives many non-blocking
// connections with epoll; OpenSSL runs directly over each socket. It talks to bench/backend,
// either through a terminator (TLS) or directly (--plain, the baseline).
//
// Modes:
//   check      one connection, one 4 KiB echo compared byte for byte; exit 0 if equal
//   handshake  new connection, full handshake, one 32-byte echo, close_notify, close; repeat
//              (with --total N, stop after N connections instead of after --duration)
//   resume     the same, offering the session (ticket) of the previous connection
//              ("tickets" counts the connections that brought a new ticket)
//   rr         --conns keep-alive connections, each with one --size-byte echo in flight
//   download   --conns connections reading an endless stream from the backend
//   upload     --conns connections writing an endless stream to the backend
//   idle       open --count connections (handshake + one echo each), print "ready N", hold
//              them until standard input closes
//
// With --serve PORT the load generator is also the backend: it listens on 127.0.0.1:PORT and
// echoes every byte its peers send, in the same thread and epoll set as its clients. The rr
// workload uses this so that the CPU beside the terminator runs one thread: with the client and
// a separate backend process sharing that CPU, the scheduler's alternation between the two set
// the latency tail more than the terminator did.
//
// Timed modes run --warmup seconds, print "start", measure for --duration seconds, print "end",
// and print one JSON object with the results. A supervisor samples the terminator's CPU time at
// "start" and "end", so both sides measure the same window.
#include <algorithm>
#include <arpa/inet.h>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <string>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>
#include <vector>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>

#include "echo_queue.hpp"

namespace {

struct Options {
    std::string mode;
    std::string host = "127.0.0.1";
    int port = 0;
    bool plain = false;
    int tls = 13;
    int conns = 32;
    double warmup = 1.0;
    double duration = 3.0;
    std::uint64_t total = 0; // handshake/resume: stop after this many connections (0: --duration)
    std::size_t size = 100;
    int sources = 1;
    int count = 1000;
    double limit = 300.0; // idle: give up establishing after this many seconds
    int serve = 0;        // also be the echo backend on this port (0: no)
};

std::uint64_t nowNs() {
    return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                          std::chrono::steady_clock::now().time_since_epoch())
                                          .count());
}

enum class Stage { connecting, handshaking, sending, receiving, streaming, holding, idle };
enum class Want { none, in, out };

struct Conn {
    int fd = -1;
    SSL *ssl = nullptr;
    Stage stage = Stage::idle;
    Want want = Want::none;
    std::uint32_t registered = 0; // epoll events currently registered; 0 = not in epoll
    std::size_t offset = 0;       // bytes of the current message sent or received
    std::uint64_t sentAt = 0;
    SSL_SESSION *offered = nullptr; // resume: the session offered (a reference held)
};

/** Frees what `c` holds and closes its socket (which also leaves the epoll set). */
void release(Conn &c) {
    SSL_free(c.ssl);
    SSL_SESSION_free(c.offered);
    if (c.fd >= 0) {
        close(c.fd);
    }
    c = Conn{};
}

/** A connection the load generator accepted as the backend (--serve): echoes what it reads. */
struct EchoPeer {
    int fd = -1;
    EchoQueue owed;
};

// epoll's data.u64 for the listener and echo peers carries a tag in its low bit; a client
// Conn's address (aligned, so its low bit is 0) is stored untagged.
constexpr std::uint64_t echoTag = 1;
constexpr std::uint64_t listenerKey = echoTag; // no peer lives at address 0

class LoadGen {
public:
    explicit LoadGen(const Options &options)
        : o_(options) {}
    ~LoadGen() {
        SSL_SESSION_free(session_);
        SSL_CTX_free(ctx_);
    }
    LoadGen(const LoadGen &) = delete;
    LoadGen &operator=(const LoadGen &) = delete;

    int run();

private:
    bool makeContext();
    void startConn(Conn &c);
    void drive(Conn &c, std::uint32_t events);
    void finish(Conn &c, bool failed);
    void update(Conn &c);
    long ioWrite(Conn &c, const char *data, std::size_t n);
    long ioRead(Conn &c, char *data, std::size_t n);
    bool inWindow(std::uint64_t t) const { return t >= start_ && t < end_; }
    bool streamMode() const { return o_.mode == "download" || o_.mode == "upload"; }
    bool newConnMode() const { return o_.mode == "handshake" || o_.mode == "resume"; }
    int runCheck();
    int runIdle();
    bool serve();
    void dispatch(const epoll_event &event);
    void acceptPeers();
    void echo(EchoPeer *peer);
    void closePeer(EchoPeer *peer);
    void report(double seconds);

    Options o_;
    SSL_CTX *ctx_ = nullptr;
    int epfd_ = -1;
    std::vector<Conn> conns_;
    std::string message_;
    std::vector<char> buffer_ = std::vector<char>(256 * 1024);
    std::vector<char> stream_ = std::vector<char>(16 * 1024);
    SSL_SESSION *session_ = nullptr;
    std::uint64_t start_ = 0;
    std::uint64_t end_ = 0;
    bool stopping_ = false;
    unsigned nextSource_ = 0;

    // Results (counted inside the measured window only).
    std::uint64_t completed_ = 0;
    std::uint64_t resumed_ = 0;
    std::uint64_t tickets_ = 0;
    std::uint64_t bytes_ = 0;
    std::uint64_t errors_ = 0;
    std::uint64_t held_ = 0;
    std::vector<std::uint32_t> latencyNs_;
    std::string firstError_;

    int listenFd_ = -1; // --serve
    std::vector<std::unique_ptr<EchoPeer>> peers_;
};

bool LoadGen::serve() {
    listenFd_ = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    const int one = 1;
    setsockopt(listenFd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<std::uint16_t>(o_.serve));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (listenFd_ < 0 || bind(listenFd_, reinterpret_cast<sockaddr *>(&addr), sizeof addr) != 0 ||
        listen(listenFd_, 1024) != 0) {
        std::fprintf(stderr, "loadgen: cannot listen on port %d: %s\n", o_.serve,
                     std::strerror(errno));
        return false;
    }
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = listenerKey;
    epoll_ctl(epfd_, EPOLL_CTL_ADD, listenFd_, &ev);
    return true;
}

void LoadGen::dispatch(const epoll_event &event) {
    if (event.data.u64 == listenerKey) {
        acceptPeers();
    } else if ((event.data.u64 & echoTag) != 0) {
        echo(reinterpret_cast<EchoPeer *>(event.data.u64 & ~echoTag));
    } else {
        drive(*static_cast<Conn *>(event.data.ptr), event.events);
    }
}

void LoadGen::acceptPeers() {
    for (;;) {
        const int fd = accept4(listenFd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            return;
        }
        const int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        auto peer = std::make_unique<EchoPeer>();
        peer->fd = fd;
        epoll_event ev{};
        ev.events = EPOLLIN;
        ev.data.u64 = reinterpret_cast<std::uint64_t>(peer.get()) | echoTag;
        epoll_ctl(epfd_, EPOLL_CTL_ADD, fd, &ev);
        peers_.push_back(std::move(peer));
    }
}

void LoadGen::closePeer(EchoPeer *peer) {
    close(peer->fd); // also leaves the epoll set
    std::erase_if(peers_, [peer](const auto &p) { return p.get() == peer; });
}

void LoadGen::echo(EchoPeer *peer) {
    // While bytes are owed the peer waits for EPOLLOUT alone and is not read, so a peer that
    // does not read its replies cannot grow them without bound.
    const bool wasOwing = !peer->owed.empty();
    if (!peer->owed.flush(peer->fd)) {
        closePeer(peer);
        return;
    }
    if (!peer->owed.empty()) {
        return;
    }
    const ssize_t got = recv(peer->fd, buffer_.data(), buffer_.size(), 0);
    if (got == 0 || (got < 0 && errno != EAGAIN && errno != EWOULDBLOCK) ||
        (got > 0 && !peer->owed.echo(peer->fd, buffer_.data(), static_cast<std::size_t>(got)))) {
        closePeer(peer);
        return;
    }
    if (wasOwing != !peer->owed.empty()) {
        epoll_event ev{};
        ev.events = peer->owed.empty() ? EPOLLIN : EPOLLOUT;
        ev.data.u64 = reinterpret_cast<std::uint64_t>(peer) | echoTag;
        epoll_ctl(epfd_, EPOLL_CTL_MOD, peer->fd, &ev);
    }
}

bool LoadGen::makeContext() {
    if (o_.plain) {
        return true;
    }
    ctx_ = SSL_CTX_new(TLS_client_method());
    const int version = o_.tls == 12 ? TLS1_2_VERSION : TLS1_3_VERSION;
    SSL_CTX_set_min_proto_version(ctx_, version);
    SSL_CTX_set_max_proto_version(ctx_, version);
    // The benchmark's one policy: AES-128-GCM, X25519 (the servers allow nothing else; P-256 is
    // listed because TLS 1.2 servers only pick a P-256 ECDSA certificate for clients that name
    // the curve). The client does not verify: its own cost is not what is measured.
    if (SSL_CTX_set_ciphersuites(ctx_, "TLS_AES_128_GCM_SHA256") != 1 ||
        SSL_CTX_set_cipher_list(ctx_,
                                "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256") != 1 ||
        SSL_CTX_set1_groups_list(ctx_, "X25519:P-256") != 1) {
        std::fprintf(stderr, "loadgen: cannot set the TLS policy\n");
        return false;
    }
    SSL_CTX_set_verify(ctx_, SSL_VERIFY_NONE, nullptr);
    SSL_CTX_set_session_cache_mode(ctx_, SSL_SESS_CACHE_OFF);
    return true;
}

long LoadGen::ioWrite(Conn &c, const char *data, std::size_t n) {
    if (o_.plain) {
        const ssize_t r = send(c.fd, data, n, MSG_NOSIGNAL);
        if (r >= 0) {
            return r;
        }
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            c.want = Want::out;
            return 0;
        }
        return -1;
    }
    std::size_t written = 0;
    ERR_clear_error();
    const int r = SSL_write_ex(c.ssl, data, n, &written);
    if (r == 1) {
        return static_cast<long>(written);
    }
    const int err = SSL_get_error(c.ssl, r);
    if (err == SSL_ERROR_WANT_WRITE) {
        c.want = Want::out;
        return 0;
    }
    if (err == SSL_ERROR_WANT_READ) {
        c.want = Want::in;
        return 0;
    }
    return -1;
}

long LoadGen::ioRead(Conn &c, char *data, std::size_t n) {
    if (o_.plain) {
        const ssize_t r = recv(c.fd, data, n, 0);
        if (r > 0) {
            return r;
        }
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            c.want = Want::in;
            return 0;
        }
        return -1;
    }
    std::size_t got = 0;
    ERR_clear_error();
    const int r = SSL_read_ex(c.ssl, data, n, &got);
    if (r == 1) {
        return static_cast<long>(got);
    }
    const int err = SSL_get_error(c.ssl, r);
    if (err == SSL_ERROR_WANT_READ) {
        c.want = Want::in;
        return 0;
    }
    if (err == SSL_ERROR_WANT_WRITE) {
        c.want = Want::out;
        return 0;
    }
    return -1;
}

void LoadGen::startConn(Conn &c) {
    c = Conn{};
    c.fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c.fd < 0) {
        errors_++;
        if (firstError_.empty()) {
            firstError_ = std::string("socket: ") + std::strerror(errno);
        }
        return;
    }
    const int one = 1;
    setsockopt(c.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (o_.sources > 1) {
        // More source addresses, more ephemeral ports: 127.0.0.1, 127.0.0.2, ...
        setsockopt(c.fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        sockaddr_in local{};
        local.sin_family = AF_INET;
        local.sin_addr.s_addr = htonl(0x7f000001u + (nextSource_++ % o_.sources));
        bind(c.fd, reinterpret_cast<sockaddr *>(&local), sizeof local);
    }
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<std::uint16_t>(o_.port));
    inet_pton(AF_INET, o_.host.c_str(), &addr.sin_addr);
    const int r = connect(c.fd, reinterpret_cast<sockaddr *>(&addr), sizeof addr);
    if (r != 0 && errno != EINPROGRESS) {
        errors_++;
        if (firstError_.empty()) {
            firstError_ = std::string("connect: ") + std::strerror(errno);
        }
        close(c.fd);
        c.fd = -1;
        return;
    }
    c.stage = Stage::connecting;
    c.want = Want::out;
    update(c);
}

void LoadGen::update(Conn &c) {
    if (c.fd < 0) {
        return;
    }
    const std::uint32_t wanted = c.stage == Stage::holding ? 0u
                                 : c.want == Want::out     ? static_cast<std::uint32_t>(EPOLLOUT)
                                                           : static_cast<std::uint32_t>(EPOLLIN);
    if (wanted == c.registered) {
        return;
    }
    epoll_event ev{};
    ev.events = wanted;
    ev.data.ptr = &c;
    if (wanted == 0) {
        epoll_ctl(epfd_, EPOLL_CTL_DEL, c.fd, nullptr);
    } else if (c.registered == 0) {
        epoll_ctl(epfd_, EPOLL_CTL_ADD, c.fd, &ev);
    } else {
        epoll_ctl(epfd_, EPOLL_CTL_MOD, c.fd, &ev);
    }
    c.registered = wanted;
}

void LoadGen::finish(Conn &c, bool failed) {
    if (failed) {
        errors_++;
        if (firstError_.empty()) {
            const unsigned long code = ERR_peek_last_error();
            char text[256] = "connection closed";
            if (code != 0) {
                ERR_error_string_n(code, text, sizeof text);
            }
            firstError_ = text;
        }
    } else if (c.ssl != nullptr) {
        SSL_shutdown(c.ssl); // sends close_notify; the reply is not waited for
    }
    release(c);
    if (!stopping_ && (newConnMode() || failed) && o_.mode != "idle") {
        startConn(c);
    }
}

void LoadGen::drive(Conn &c, std::uint32_t events) {
    if (c.stage == Stage::connecting) {
        int error = 0;
        socklen_t length = sizeof error;
        getsockopt(c.fd, SOL_SOCKET, SO_ERROR, &error, &length);
        if (error != 0 || (events & EPOLLERR) != 0) {
            if (firstError_.empty()) {
                firstError_ = std::string("connect: ") + std::strerror(error);
            }
            finish(c, true);
            return;
        }
        if (o_.plain) {
            c.stage = Stage::sending;
        } else {
            c.ssl = SSL_new(ctx_);
            SSL_set_fd(c.ssl, c.fd);
            SSL_set_connect_state(c.ssl);
            if (o_.mode == "resume" && session_ != nullptr) {
                SSL_set_session(c.ssl, session_);
                SSL_SESSION_up_ref(session_);
                c.offered = session_;
            }
            c.stage = Stage::handshaking;
        }
    }
    for (;;) {
        switch (c.stage) {
        case Stage::handshaking: {
            ERR_clear_error();
            const int r = SSL_do_handshake(c.ssl);
            if (r != 1) {
                const int err = SSL_get_error(c.ssl, r);
                if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) {
                    c.want = err == SSL_ERROR_WANT_READ ? Want::in : Want::out;
                    update(c);
                    return;
                }
                finish(c, true);
                return;
            }
            c.stage = Stage::sending;
            c.offset = 0;
            break;
        }
        case Stage::sending: {
            if (streamMode()) {
                // One command byte picks the backend's role; a download then only reads.
                const char command = o_.mode == "download" ? 'D' : 'U';
                const long n = ioWrite(c, &command, 1);
                if (n < 0) {
                    finish(c, true);
                    return;
                }
                if (n == 0) {
                    update(c);
                    return;
                }
                c.stage = Stage::streaming;
                break;
            }
            if (c.offset == 0) {
                c.sentAt = nowNs();
            }
            const long n = ioWrite(c, message_.data() + c.offset, message_.size() - c.offset);
            if (n < 0) {
                finish(c, true);
                return;
            }
            if (n == 0) {
                update(c);
                return;
            }
            c.offset += static_cast<std::size_t>(n);
            if (c.offset == message_.size()) {
                c.stage = Stage::receiving;
                c.offset = 0;
            }
            break;
        }
        case Stage::receiving: {
            const long n =
                ioRead(c, buffer_.data(), std::min(buffer_.size(), message_.size() - c.offset));
            if (n < 0) {
                finish(c, true);
                return;
            }
            if (n == 0) {
                update(c);
                return;
            }
            c.offset += static_cast<std::size_t>(n);
            if (c.offset < message_.size()) {
                break;
            }
            const std::uint64_t t = nowNs();
            c.offset = 0;
            if (o_.mode == "rr") {
                if (inWindow(t)) {
                    completed_++;
                    latencyNs_.push_back(static_cast<std::uint32_t>(
                        std::min<std::uint64_t>(t - c.sentAt, UINT32_MAX)));
                }
                c.stage = Stage::sending;
                break;
            }
            if (o_.mode == "idle") {
                c.stage = Stage::holding;
                held_++;
                update(c);
                return;
            }
            // handshake / resume: one exchange per connection.
            if (inWindow(t)) {
                completed_++;
                if (c.ssl != nullptr && SSL_session_reused(c.ssl) == 1) {
                    resumed_++;
                }
            }
            if (o_.mode == "resume") {
                SSL_SESSION *latest = SSL_get1_session(c.ssl);
                if (latest != nullptr && SSL_SESSION_is_resumable(latest) == 1) {
                    // OpenSSL keeps the offered session unless a new ticket replaced it.
                    if (inWindow(t) && latest != c.offered && SSL_SESSION_has_ticket(latest) == 1) {
                        tickets_++;
                    }
                    SSL_SESSION_free(session_);
                    session_ = latest;
                } else {
                    SSL_SESSION_free(latest);
                }
            }
            finish(c, false);
            return;
        }
        case Stage::streaming: {
            long n = 0;
            if (o_.mode == "download") {
                n = ioRead(c, buffer_.data(), buffer_.size());
            } else {
                n = ioWrite(c, stream_.data(), stream_.size());
            }
            if (n < 0) {
                finish(c, true);
                return;
            }
            if (n == 0) {
                update(c);
                return;
            }
            if (inWindow(nowNs())) {
                bytes_ += static_cast<std::uint64_t>(n);
            }
            // Yield to other connections now and then so one fast stream cannot starve them.
            if (++c.offset % 16 == 0) {
                c.want = o_.mode == "download" ? Want::in : Want::out;
                update(c);
                return;
            }
            break;
        }
        default:
            update(c);
            return;
        }
    }
}

void LoadGen::report(double seconds) {
    std::sort(latencyNs_.begin(), latencyNs_.end());
    auto percentile = [this](double p) -> double {
        if (latencyNs_.empty()) {
            return 0.0;
        }
        const auto index = static_cast<std::size_t>(p * static_cast<double>(latencyNs_.size() - 1));
        return latencyNs_[index] / 1000.0;
    };
    std::string error;
    for (char ch : firstError_) {
        error += (ch == '"' || ch == '\\') ? '\'' : ch;
    }
    std::printf("{\"mode\":\"%s\",\"seconds\":%.4f,\"completed\":%llu,\"rate\":%.1f,"
                "\"bytes\":%llu,\"mbps\":%.2f,\"resumed\":%llu,\"tickets\":%llu,"
                "\"errors\":%llu,\"p50_us\":%.1f,\"p99_us\":%.1f,\"first_error\":\"%s\"}\n",
                o_.mode.c_str(), seconds, static_cast<unsigned long long>(completed_),
                static_cast<double>(completed_) / seconds, static_cast<unsigned long long>(bytes_),
                static_cast<double>(bytes_) / seconds / 1e6,
                static_cast<unsigned long long>(resumed_),
                static_cast<unsigned long long>(tickets_), static_cast<unsigned long long>(errors_),
                percentile(0.50), percentile(0.99), error.c_str());
    std::fflush(stdout);
}

int LoadGen::runCheck() {
    // Blocking and simple: this is a correctness probe, not a measurement.
    const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    timeval timeout{5, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<std::uint16_t>(o_.port));
    inet_pton(AF_INET, o_.host.c_str(), &addr.sin_addr);
    if (connect(fd, reinterpret_cast<sockaddr *>(&addr), sizeof addr) != 0) {
        std::printf("{\"ok\":false,\"error\":\"connect: %s\"}\n", std::strerror(errno));
        return 1;
    }
    std::string sent(4096, '\0');
    std::uint32_t state = 2463534242u;
    for (auto &ch : sent) {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        ch = static_cast<char>(state & 0xff);
    }
    sent[0] = 'E';
    std::string got;
    std::string protocol = "plain";
    std::string cipher = "none";
    std::string group = "none";
    SSL *ssl = nullptr;
    bool ok = true;
    if (!o_.plain) {
        ssl = SSL_new(ctx_);
        SSL_set_fd(ssl, fd);
        if (SSL_connect(ssl) != 1) {
            ok = false;
        } else {
            protocol = SSL_get_version(ssl);
            cipher = SSL_get_cipher_name(ssl);
            EVP_PKEY *key = nullptr;
            if (SSL_get_peer_tmp_key(ssl, &key) == 1 && key != nullptr) {
                group = EVP_PKEY_get0_type_name(key);
                EVP_PKEY_free(key);
            }
        }
    }
    if (ok) {
        ok = o_.plain ? send(fd, sent.data(), sent.size(), MSG_NOSIGNAL) ==
                            static_cast<ssize_t>(sent.size())
                      : SSL_write(ssl, sent.data(), static_cast<int>(sent.size())) ==
                            static_cast<int>(sent.size());
    }
    while (ok && got.size() < sent.size()) {
        char chunk[4096];
        const long n = o_.plain ? recv(fd, chunk, sizeof chunk, 0)
                                : SSL_read(ssl, chunk, static_cast<int>(sizeof chunk));
        if (n <= 0) {
            break;
        }
        got.append(chunk, static_cast<std::size_t>(n));
    }
    ok = ok && got == sent;
    char reason[256] = "";
    if (!ok) {
        ERR_error_string_n(ERR_peek_last_error(), reason, sizeof reason);
    }
    std::printf("{\"ok\":%s,\"protocol\":\"%s\",\"cipher\":\"%s\",\"group\":\"%s\","
                "\"echoed\":%zu,\"error\":\"%s\"}\n",
                ok ? "true" : "false", protocol.c_str(), cipher.c_str(), group.c_str(), got.size(),
                reason);
    if (ssl != nullptr) {
        SSL_shutdown(ssl);
        SSL_free(ssl);
    }
    close(fd);
    return ok ? 0 : 1;
}

int LoadGen::runIdle() {
    conns_.resize(static_cast<std::size_t>(o_.count));
    std::vector<epoll_event> events(1024);
    std::size_t started = 0;
    const std::uint64_t giveUp = nowNs() + static_cast<std::uint64_t>(o_.limit * 1e9);
    for (;;) {
        // Keep at most --conns connections establishing at once.
        std::size_t busy = 0;
        for (std::size_t i = 0; i < started; ++i) {
            busy += conns_[i].fd >= 0 && conns_[i].stage != Stage::holding ? 1 : 0;
        }
        while (started < conns_.size() && busy < static_cast<std::size_t>(o_.conns)) {
            startConn(conns_[started++]);
            busy++;
        }
        if ((held_ + errors_ >= conns_.size() && started == conns_.size()) || nowNs() > giveUp) {
            break;
        }
        const int n = epoll_wait(epfd_, events.data(), static_cast<int>(events.size()), 50);
        for (int i = 0; i < n; ++i) {
            dispatch(events[i]);
        }
    }
    std::printf("ready %llu errors %llu\n", static_cast<unsigned long long>(held_),
                static_cast<unsigned long long>(errors_));
    std::fflush(stdout);
    char line[64];
    while (read(0, line, sizeof line) > 0) {
    }
    std::printf("{\"mode\":\"idle\",\"held\":%llu,\"errors\":%llu}\n",
                static_cast<unsigned long long>(held_), static_cast<unsigned long long>(errors_));
    return held_ > 0 ? 0 : 1;
}

int LoadGen::run() {
    if (!makeContext()) {
        return 2;
    }
    if (o_.mode == "check") {
        return runCheck();
    }
    epfd_ = epoll_create1(EPOLL_CLOEXEC);
    if (o_.serve > 0 && !serve()) {
        return 2;
    }
    message_.assign(newConnMode() ? 32 : o_.size, 'm');
    message_[0] = 'E';
    std::fill(stream_.begin(), stream_.end(), 'u');
    if (o_.mode == "idle") {
        message_.assign(32, 'm');
        message_[0] = 'E';
        return runIdle();
    }
    if (o_.mode != "handshake" && o_.mode != "resume" && o_.mode != "rr" && !streamMode()) {
        std::fprintf(stderr, "loadgen: unknown mode %s\n", o_.mode.c_str());
        return 2;
    }
    latencyNs_.reserve(4 << 20);
    conns_.resize(static_cast<std::size_t>(o_.conns));
    const std::uint64_t t0 = nowNs();
    start_ = t0 + static_cast<std::uint64_t>(o_.warmup * 1e9);
    end_ = start_ + static_cast<std::uint64_t>(o_.duration * 1e9);
    for (auto &c : conns_) {
        startConn(c);
    }
    std::vector<epoll_event> events(1024);
    bool announced = false;
    for (;;) {
        const std::uint64_t t = nowNs();
        if (!announced && t >= start_) {
            std::printf("start\n");
            std::fflush(stdout);
            announced = true;
        }
        if (t >= end_ || (o_.total > 0 && completed_ >= o_.total)) {
            end_ = std::min(end_, t);
            break;
        }
        const int n = epoll_wait(epfd_, events.data(), static_cast<int>(events.size()), 2);
        for (int i = 0; i < n; ++i) {
            dispatch(events[i]);
        }
        // A connection that failed to start (no socket, no port) is retried here.
        if (newConnMode() || o_.mode == "rr") {
            for (auto &c : conns_) {
                if (c.fd < 0) {
                    startConn(c);
                }
            }
        }
    }
    std::printf("end\n");
    std::fflush(stdout);
    stopping_ = true;
    report(static_cast<double>(end_ - start_) / 1e9);
    for (auto &c : conns_) {
        release(c);
    }
    return 0;
}

int usage() {
    std::fprintf(stderr,
                 "usage: loadgen --mode check|handshake|resume|rr|download|upload|idle --port P\n"
                 "               [--host 127.0.0.1] [--plain] [--tls 12|13] [--conns N]\n"
                 "               [--warmup S] [--duration S] [--size BYTES] [--sources K]\n"
                 "               [--count N] [--limit S] [--total N] [--serve PORT]\n");
    return 2;
}

} // namespace

int main(int argc, char **argv) {
    Options o;
    for (int i = 1; i < argc; ++i) {
        const std::string key = argv[i];
        if (key == "--plain") {
            o.plain = true;
            continue;
        }
        if (i + 1 >= argc) {
            return usage();
        }
        const std::string value = argv[++i];
        if (key == "--mode") {
            o.mode = value;
        } else if (key == "--host") {
            o.host = value;
        } else if (key == "--port") {
            o.port = std::atoi(value.c_str());
        } else if (key == "--tls") {
            o.tls = std::atoi(value.c_str());
        } else if (key == "--conns") {
            o.conns = std::max(1, std::atoi(value.c_str()));
        } else if (key == "--warmup") {
            o.warmup = std::atof(value.c_str());
        } else if (key == "--duration") {
            o.duration = std::atof(value.c_str());
        } else if (key == "--size") {
            o.size = static_cast<std::size_t>(std::max(1, std::atoi(value.c_str())));
        } else if (key == "--sources") {
            o.sources = std::max(1, std::atoi(value.c_str()));
        } else if (key == "--total") {
            o.total = std::strtoull(value.c_str(), nullptr, 10);
        } else if (key == "--count") {
            o.count = std::max(1, std::atoi(value.c_str()));
        } else if (key == "--limit") {
            o.limit = std::atof(value.c_str());
        } else if (key == "--serve") {
            o.serve = std::atoi(value.c_str());
        } else {
            return usage();
        }
    }
    if (o.mode.empty() || o.port <= 0 || (o.tls != 12 && o.tls != 13)) {
        return usage();
    }
    rlimit limit{};
    if (getrlimit(RLIMIT_NOFILE, &limit) == 0) {
        limit.rlim_cur = limit.rlim_max;
        setrlimit(RLIMIT_NOFILE, &limit);
    }
    std::signal(SIGPIPE, SIG_IGN);
    LoadGen generator(o);
    return generator.run();
}
