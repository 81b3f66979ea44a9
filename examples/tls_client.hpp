// A blocking TLS client on OpenSSL, for the examples' self-tests (and server_test): it plays the
// remote client that connects through sluice. Not part of libsluice: just OpenSSL and a socket.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <string>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

namespace example {

/** One TLS connection to an IPv4 "host:port", verifying the server as "localhost" against `ca`. */
class TlsClient {
public:
    TlsClient(const std::string &hostPort, const std::string &ca) {
        ctx_ = SSL_CTX_new(TLS_client_method());
        if (ctx_ == nullptr || SSL_CTX_load_verify_locations(ctx_, ca.c_str(), nullptr) != 1) {
            return;
        }
        SSL_CTX_set_verify(ctx_, SSL_VERIFY_PEER, nullptr);
        fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        timeval timeout{10, 0}; // a broken self-test fails instead of hanging
        ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
        ::setsockopt(fd_, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout);
        sockaddr_in address{};
        address.sin_family = AF_INET;
        address.sin_port =
            htons(static_cast<uint16_t>(std::stoi(hostPort.substr(hostPort.rfind(':') + 1))));
        const std::string host = hostPort.substr(0, hostPort.rfind(':'));
        if (::inet_pton(AF_INET, host.c_str(), &address.sin_addr) != 1 ||
            ::connect(fd_, reinterpret_cast<sockaddr *>(&address), sizeof address) != 0) {
            return;
        }
        ssl_ = SSL_new(ctx_);
        SSL_set_fd(ssl_, fd_);
        SSL_set_tlsext_host_name(ssl_, "localhost");
        SSL_set1_host(ssl_, "localhost");
        connected_ = SSL_connect(ssl_) == 1;
    }
    ~TlsClient() {
        SSL_free(ssl_);
        SSL_CTX_free(ctx_);
        if (fd_ >= 0) {
            ::close(fd_);
        }
    }
    TlsClient(const TlsClient &) = delete;
    TlsClient &operator=(const TlsClient &) = delete;

    /** The handshake completed and the server's certificate verified. */
    bool ok() const { return connected_; }

    /** True when the server presented the certificate in the PEM file `path`. */
    bool servedCertificate(const std::string &path) const {
        X509 *peer = ssl_ != nullptr ? SSL_get1_peer_certificate(ssl_) : nullptr;
        std::FILE *file = std::fopen(path.c_str(), "r");
        X509 *expected = file != nullptr ? PEM_read_X509(file, nullptr, nullptr, nullptr) : nullptr;
        const bool same = peer != nullptr && expected != nullptr && X509_cmp(peer, expected) == 0;
        if (file != nullptr) {
            std::fclose(file);
        }
        X509_free(expected);
        X509_free(peer);
        return same;
    }

    /** Sends `data` in chunks, each echoed back before the next: true if all of it came back. */
    bool echo(const std::string &data) {
        constexpr std::size_t chunk = 16384;
        std::string back;
        for (std::size_t at = 0; connected_ && at < data.size(); at += chunk) {
            const int n = static_cast<int>(std::min(chunk, data.size() - at));
            if (SSL_write(ssl_, data.data() + at, n) != n) {
                return false;
            }
            const std::size_t want = back.size() + static_cast<std::size_t>(n);
            while (back.size() < want) {
                char buffer[16384];
                const int r = SSL_read(ssl_, buffer, sizeof buffer);
                if (r <= 0) {
                    return false;
                }
                back.append(buffer, static_cast<std::size_t>(r));
            }
        }
        return connected_ && back == data;
    }

    /** Sends `data`, then reads until `want` bytes came back, the stream ended or a read timed
     * out: what came, in order. */
    std::string request(const std::string &data, std::size_t want) {
        std::string reply;
        if (!connected_ || SSL_write(ssl_, data.data(), static_cast<int>(data.size())) !=
                               static_cast<int>(data.size())) {
            return reply;
        }
        while (reply.size() < want) {
            char buffer[16384];
            const int r = SSL_read(ssl_, buffer, sizeof buffer);
            if (r <= 0) {
                break;
            }
            reply.append(buffer, static_cast<std::size_t>(r));
        }
        return reply;
    }

    /** The server certificate's subject CN; empty without a handshake. */
    std::string peerName() const {
        X509 *peer = ssl_ != nullptr ? SSL_get1_peer_certificate(ssl_) : nullptr;
        if (peer == nullptr) {
            return {};
        }
        char name[256] = {};
        X509_NAME_get_text_by_NID(X509_get_subject_name(peer), NID_commonName, name, sizeof name);
        X509_free(peer);
        return name;
    }

    /** Sends `data`, then close_notify; returns the reply read until the stream ended, and
     * sets `clean` when it ended with the server's close_notify. */
    std::string sendThenClose(const std::string &data, bool &clean) {
        clean = false;
        if (!connected_ || SSL_write(ssl_, data.data(), static_cast<int>(data.size())) !=
                               static_cast<int>(data.size())) {
            return {};
        }
        SSL_shutdown(ssl_);
        std::string reply;
        char buffer[16384];
        for (;;) {
            const int r = SSL_read(ssl_, buffer, sizeof buffer);
            if (r <= 0) {
                clean = SSL_get_error(ssl_, r) == SSL_ERROR_ZERO_RETURN;
                return reply;
            }
            reply.append(buffer, static_cast<std::size_t>(r));
        }
    }

    /** Sends close_notify and waits for the server's: true for a clean end of the stream. */
    bool closeCleanly() {
        if (!connected_) {
            return false;
        }
        SSL_shutdown(ssl_);
        char buffer[256];
        const int r = SSL_read(ssl_, buffer, sizeof buffer);
        return r == 0 && SSL_get_error(ssl_, r) == SSL_ERROR_ZERO_RETURN;
    }

private:
    SSL_CTX *ctx_ = nullptr;
    SSL *ssl_ = nullptr;
    int fd_ = -1;
    bool connected_ = false;
};

} // namespace example
