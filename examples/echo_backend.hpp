// A plain TCP echo server on a libuv loop: the "existing program" that the embedding examples
// put sluice in front of. Every byte a client sends comes back; its EOF is answered with EOF once
// the echo is written. Not part of libsluice: just libuv.
#pragma once

#include <cstdlib>
#include <cstring>
#include <string>
#include <unordered_set>

#include <uv.h>

namespace example {

class EchoBackend {
public:
    explicit EchoBackend(uv_loop_t *loop)
        : loop_(loop) {}
    EchoBackend(const EchoBackend &) = delete;
    EchoBackend &operator=(const EchoBackend &) = delete;

    /** Listens on 127.0.0.1 with a port the kernel picks; returns "127.0.0.1:PORT", or "". */
    std::string start() {
        uv_tcp_init(loop_, &listener_);
        listener_.data = this;
        sockaddr_in address{};
        uv_ip4_addr("127.0.0.1", 0, &address);
        if (uv_tcp_bind(&listener_, reinterpret_cast<const sockaddr *>(&address), 0) != 0 ||
            uv_listen(reinterpret_cast<uv_stream_t *>(&listener_), 128, onConnection) != 0) {
            return {};
        }
        int length = sizeof address;
        uv_tcp_getsockname(&listener_, reinterpret_cast<sockaddr *>(&address), &length);
        return "127.0.0.1:" + std::to_string(ntohs(address.sin_port));
    }

    /** Closes the listener and every connection; their memory goes in the close callbacks. */
    void close() {
        if (!uv_is_closing(reinterpret_cast<uv_handle_t *>(&listener_))) {
            uv_close(reinterpret_cast<uv_handle_t *>(&listener_), nullptr);
        }
        for (uv_tcp_t *connection : connections_) {
            closeConnection(connection);
        }
    }

private:
    static void onConnection(uv_stream_t *listener, int status) {
        auto *self = static_cast<EchoBackend *>(listener->data);
        if (status != 0) {
            return;
        }
        auto *connection = new uv_tcp_t;
        uv_tcp_init(self->loop_, connection);
        connection->data = self;
        self->connections_.insert(connection);
        if (uv_accept(listener, reinterpret_cast<uv_stream_t *>(connection)) != 0 ||
            uv_read_start(reinterpret_cast<uv_stream_t *>(connection), onAlloc, onRead) != 0) {
            closeConnection(connection);
        }
    }

    static void onAlloc(uv_handle_t *, std::size_t suggested, uv_buf_t *buffer) {
        buffer->base = static_cast<char *>(std::malloc(suggested));
        buffer->len = buffer->base != nullptr ? suggested : 0;
    }

    static void onRead(uv_stream_t *stream, ssize_t n, const uv_buf_t *buffer) {
        auto *connection = reinterpret_cast<uv_tcp_t *>(stream);
        if (n > 0) {
            // The write request owns the bytes until its callback.
            auto *write = new uv_write_t;
            write->data = buffer->base;
            const uv_buf_t echo = uv_buf_init(buffer->base, static_cast<unsigned>(n));
            if (uv_write(write, stream, &echo, 1, onWritten) != 0) {
                std::free(buffer->base);
                delete write;
                closeConnection(connection);
            }
            return;
        }
        std::free(buffer->base);
        if (n == UV_EOF) {
            // Answer EOF with EOF once the queued echoes are written.
            auto *shutdown = new uv_shutdown_t;
            if (uv_shutdown(shutdown, stream, [](uv_shutdown_t *request, int) {
                    closeConnection(reinterpret_cast<uv_tcp_t *>(request->handle));
                    delete request;
                }) != 0) {
                delete shutdown;
                closeConnection(connection);
            }
        } else if (n < 0) {
            closeConnection(connection);
        }
    }

    static void onWritten(uv_write_t *write, int) {
        std::free(write->data);
        delete write;
    }

    static void closeConnection(uv_tcp_t *connection) {
        auto *handle = reinterpret_cast<uv_handle_t *>(connection);
        if (uv_is_closing(handle)) {
            return;
        }
        uv_close(handle, [](uv_handle_t *closed) {
            auto *tcp = reinterpret_cast<uv_tcp_t *>(closed);
            static_cast<EchoBackend *>(tcp->data)->connections_.erase(tcp);
            delete tcp;
        });
    }

    uv_loop_t *loop_;
    uv_tcp_t listener_{};
    std::unordered_set<uv_tcp_t *> connections_;
};

} // namespace example
