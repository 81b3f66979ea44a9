// sluice::Stream and sluice::StreamHandler: a decrypted connection delivered to code in the same
// process instead of a backend socket. A backend pool with a `handler` name (BackendConfig::
// handler) routes each connection to a StreamHandler that the embedding program registered under
// that name (Server::setHandler); the program gets TLS termination with no second socket.
//
//     struct Echo : sluice::StreamHandler {
//         void onData(sluice::Stream &s, std::span<const std::uint8_t> data) override {
//             s.write(data);
//             // Backpressure: stop taking client bytes while the client is slow to read ours.
//             if (s.writeQueued() >= s.writeHighWater()) s.pauseReading(true);
//         }
//         void onWritable(sluice::Stream &s) override { s.pauseReading(false); }
//         void onEnd(sluice::Stream &s, bool) override { s.shutdown(); }
//     };
//     server.setHandler("echo", [](const sluice::StreamInfo &) {
//         return std::make_unique<Echo>();
//     });
//
// Threading and lifetime: every callback runs on the loop's thread, never re-entrantly from
// inside a Stream call the handler made (a write() inside onData() does not call onWritable()
// before onData() returns). The Stream is valid from onOpen() until onClose() returns; the
// handler object is destroyed right after onClose(). Calls on a Stream that has closed do
// nothing (write() returns false).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>

namespace sluice {

/** What a handler knows about the connection it serves (after the TLS handshake). */
struct StreamInfo {
    std::string listener;       ///< the listener's name
    std::string handler;        ///< the handler name the route chose
    std::string client;         ///< "ip:port" (behind a PROXY header: the client it names)
    std::string serverName;     ///< SNI, empty if none (or on a plaintext listener)
    std::string alpn;           ///< negotiated ALPN protocol, empty if none
    std::string protocol;       ///< "TLSv1.3", ...; empty on a plaintext listener
    std::string cipher;         ///< OpenSSL's name of the cipher
    bool resumed = false;       ///< the TLS session was resumed
    std::string clientIdentity; ///< client certificate: URI SAN, else DNS SAN, else CN
    bool clientVerified = false;
};

/** sluice's side of one connection, as a handler sees it. */
class Stream {
public:
    /**
     * Queues `data` for the client (copied), to be encrypted and sent as the client reads.
     * Never refuses for lack of room, so a handler bounds its own memory by watching
     * writeQueued() against writeHighWater() and waiting for onWritable(). Returns false, taking
     * nothing, once the stream cannot send: after shutdown(), close(), or the client's failure.
     */
    virtual bool write(std::span<const std::uint8_t> data) = 0;

    /** Bytes queued by write() that have not been encrypted yet. */
    virtual std::size_t writeQueued() const = 0;

    /** The level writeQueued() should stay under (global.buffers.backend); onWritable() fires
     * once it has dropped to half of it after reaching it. */
    virtual std::size_t writeHighWater() const = 0;

    /** Ends the handler's direction: once every queued byte is sent, close_notify (then FIN)
     * reaches the client. The client's direction stays open (onData, onEnd). */
    virtual void shutdown() = 0;

    /** Ends the connection now: queued bytes are dropped and the client's connection closes
     * without close_notify, so the client can tell the stream was cut. */
    virtual void close() = 0;

    /** Pauses (true) or resumes onData(). While paused, client bytes wait in sluice's bounded
     * buffers and then in TCP: a handler that stops reading bounds memory. */
    virtual void pauseReading(bool paused) = 0;

    virtual const StreamInfo &info() const = 0;

protected:
    Stream() = default;
    ~Stream() = default;
    Stream(const Stream &) = delete;
    Stream &operator=(const Stream &) = delete;
};

/** The program's side of one connection; see the file comment. */
class StreamHandler {
public:
    virtual ~StreamHandler() = default;

    /** The stream is ready: the handler may write at once. */
    virtual void onOpen(Stream &stream) { (void)stream; }

    /** Client bytes, in order; `data` is valid during the call only. */
    virtual void onData(Stream &stream, std::span<const std::uint8_t> data) = 0;

    /** The client ended its direction: close_notify, or (`truncated`) a FIN without it, so
     * the last request may be incomplete. Nothing more arrives; the handler may still write. */
    virtual void onEnd(Stream &stream, bool truncated) {
        (void)stream;
        (void)truncated;
    }

    /** writeQueued() fell to half of writeHighWater() after reaching it. */
    virtual void onWritable(Stream &stream) { (void)stream; }

    /** The connection is over. `reason` is the close reason as the metrics name it ("done",
     * "client_reset", "timeout_idle", "handler_close", ...). Destroyed right after. */
    virtual void onClose(Stream &stream, std::string_view reason) {
        (void)stream;
        (void)reason;
    }
};

/** Makes the handler of one connection; returning null refuses the connection (it is closed
 * with close_notify, as a backend that could not be reached). */
using HandlerFactory = std::function<std::unique_ptr<StreamHandler>(const StreamInfo &info)>;

} // namespace sluice
