// The in-process echo of the embedding examples: a sluice::StreamHandler that sends back what
// arrives. While the client is slow to read, it stops reading from it, so neither side's memory
// grows; the client's end is answered with the handler's own once the echo is written.
#pragma once

#include <cstdint>
#include <span>

#include <sluice/stream.hpp>

namespace example {

struct EchoHandler : sluice::StreamHandler {
    void onData(sluice::Stream &stream, std::span<const std::uint8_t> data) override {
        stream.write(data);
        if (stream.writeQueued() >= stream.writeHighWater()) {
            stream.pauseReading(true);
        }
    }
    void onWritable(sluice::Stream &stream) override { stream.pauseReading(false); }
    void onEnd(sluice::Stream &stream, bool) override { stream.shutdown(); }
};

} // namespace example
