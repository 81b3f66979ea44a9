// The config loader and its value parsers fed arbitrary text: every input is either a Config or
// one ConfigError / invalid_argument, never a crash or another exception.
#include <stdexcept>
#include <string>

#include <sluice/config.hpp>

#include "fuzz_target.hpp"

namespace sluice::fuzz {

SLUICE_FUZZ_TARGET(configLoader) {
    const std::string text(reinterpret_cast<const char *>(data), size);
    try {
        parseConfig(text, "/fuzz/sluice.toml");
    } catch (const ConfigError &) {
    }
    for (auto parse : {+[](std::string_view t) { parseAddress(t); },
                       +[](std::string_view t) { parseDuration(t); },
                       +[](std::string_view t) { parseSize(t); }}) {
        try {
            parse(text);
        } catch (const std::invalid_argument &) {
        }
    }
    return 0;
}

} // namespace sluice::fuzz
