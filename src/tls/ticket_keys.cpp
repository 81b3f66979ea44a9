#include "tls/ticket_keys.hpp"

#include <algorithm>
#include <cstring>
#include <fstream>
#include <iterator>
#include <sstream>

#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>

#include "tls/context.hpp"
#include "tls/errors.hpp"

namespace sluice::tls {
namespace {

constexpr std::size_t keyBytes = 80;
// Keys kept with random rotation: the encrypting one and two predecessors, so a ticket made just
// before a rotation still opens for at least two more periods.
constexpr std::size_t randomKeysKept = 3;

std::string trim(std::string_view line) {
    const auto notSpace = [](char c) { return c != ' ' && c != '\t' && c != '\r'; };
    auto begin = std::find_if(line.begin(), line.end(), notSpace);
    auto end = std::find_if(line.rbegin(), line.rend(), notSpace).base();
    return begin < end ? std::string(begin, end) : std::string();
}

bool isBase64(char c) {
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '+' ||
           c == '/' || c == '=';
}

TicketKey randomKey() {
    TicketKey key;
    if (RAND_bytes(key.name.data(), static_cast<int>(key.name.size())) != 1 ||
        RAND_bytes(key.aes.data(), static_cast<int>(key.aes.size())) != 1 ||
        RAND_bytes(key.hmac.data(), static_cast<int>(key.hmac.size())) != 1) {
        throw TlsError("cannot make a random ticket key: " + drainErrors().reason);
    }
    return key;
}

} // namespace

std::vector<TicketKey> parseTicketKeys(std::string_view text, const std::string &path) {
    std::vector<TicketKey> keys;
    std::size_t lineNumber = 0;
    while (!text.empty()) {
        ++lineNumber;
        const std::size_t end = text.find('\n');
        const std::string line = trim(text.substr(0, end));
        text.remove_prefix(end == std::string_view::npos ? text.size() : end + 1);
        if (line.empty() || line.front() == '#') {
            continue;
        }
        const std::string where = "ticket key file " + path + " line " + std::to_string(lineNumber);
        if (!std::all_of(line.begin(), line.end(), isBase64) || line.size() % 4 != 0) {
            throw TlsError(where + ": expected one base64 key (80 bytes) per line");
        }
        const std::size_t padding = std::count(line.end() - 2, line.end(), '=');
        std::vector<unsigned char> decoded(line.size() / 4 * 3);
        const int n =
            EVP_DecodeBlock(decoded.data(), reinterpret_cast<const unsigned char *>(line.data()),
                            static_cast<int>(line.size()));
        if (n < 0) {
            drainErrors();
            throw TlsError(where + ": expected one base64 key (80 bytes) per line");
        }
        // EVP_DecodeBlock counts the padding as zero bytes.
        const std::size_t length = static_cast<std::size_t>(n) - padding;
        if (length != keyBytes) {
            throw TlsError(where + ": a key is 80 bytes (16 name, 32 AES, 32 HMAC), this one is " +
                           std::to_string(length));
        }
        TicketKey key;
        std::memcpy(key.name.data(), decoded.data(), 16);
        std::memcpy(key.aes.data(), decoded.data() + 16, 32);
        std::memcpy(key.hmac.data(), decoded.data() + 48, 32);
        const bool duplicate = std::any_of(keys.begin(), keys.end(), [&](const TicketKey &other) {
            return other.name == key.name;
        });
        if (duplicate) {
            throw TlsError(where + ": two keys have the same name (first 16 bytes)");
        }
        keys.push_back(key);
    }
    if (keys.empty()) {
        throw TlsError("ticket key file " + path + ": no key (one base64 key per line)");
    }
    return keys;
}

std::vector<TicketKey> loadTicketKeys(const std::string &path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) {
        throw TlsError("ticket key file " + path + ": cannot read: " + std::strerror(errno));
    }
    std::ostringstream text;
    text << in.rdbuf();
    return parseTicketKeys(text.str(), path);
}

TicketKeyRing::TicketKeyRing(std::vector<TicketKey> keys)
    : keys_(std::move(keys)) {}

TicketKeyRing::TicketKeyRing(std::chrono::milliseconds rotation)
    : random_(true)
    , rotation_(rotation) {
    keys_.push_back(randomKey());
    nextRotation_ = Clock::now() + rotation_;
}

void TicketKeyRing::rotateIfDue(Clock::time_point now) {
    if (!random_ || now < nextRotation_) {
        return;
    }
    try {
        // push_back + rotate rather than insert at the front: GCC 12 at -O3 reports a false
        // -Wnull-dereference inside vector::insert.
        keys_.push_back(randomKey());
        std::rotate(keys_.begin(), keys_.end() - 1, keys_.end());
    } catch (const TlsError &) {
        return; // keep the old key rather than fail a handshake; retried next time
    }
    if (keys_.size() > randomKeysKept) {
        keys_.resize(randomKeysKept);
    }
    // After a long quiet spell, one rotation is enough: older keys would all be stale anyway.
    nextRotation_ = now + rotation_;
}

TicketKey TicketKeyRing::encryptionKey(Clock::time_point now) {
    std::lock_guard lock(mutex_);
    rotateIfDue(now);
    return keys_.front();
}

int TicketKeyRing::decryptionKey(const std::uint8_t *name, TicketKey &key, Clock::time_point now) {
    std::lock_guard lock(mutex_);
    rotateIfDue(now);
    for (std::size_t i = 0; i < keys_.size(); ++i) {
        if (std::memcmp(keys_[i].name.data(), name, keys_[i].name.size()) == 0) {
            key = keys_[i];
            return i == 0 ? 1 : 2;
        }
    }
    return 0;
}

std::size_t TicketKeyRing::size() const {
    std::lock_guard lock(mutex_);
    return keys_.size();
}

int ticketKeyCallback(TicketKeyRing &ring, ssl_st *ssl, unsigned char *keyName, unsigned char *iv,
                      evp_cipher_ctx_st *cipher, evp_mac_ctx_st *mac, int encrypt) {
    // Fetched once: OpenSSL 3 looks a legacy EVP_aes_256_cbc() up in its provider store again on
    // every init, which is once per ticket issued or opened.
    static EVP_CIPHER *const aes = EVP_CIPHER_fetch(nullptr, "AES-256-CBC", nullptr);
    TicketKey key;
    int result = 1;
    if (encrypt != 0) {
        key = ring.encryptionKey();
        std::memcpy(keyName, key.name.data(), key.name.size());
        if (aes == nullptr || RAND_bytes(iv, EVP_CIPHER_get_iv_length(aes)) != 1) {
            return -1;
        }
        if (EVP_EncryptInit_ex(cipher, aes, nullptr, key.aes.data(), iv) != 1) {
            return -1;
        }
    } else {
        result = ring.decryptionKey(keyName, key);
        if (result == 0) {
            return 0; // unknown or retired key: a full handshake, and a fresh ticket
        }
        if (aes == nullptr || EVP_DecryptInit_ex(cipher, aes, nullptr, key.aes.data(), iv) != 1) {
            return -1;
        }
        // A TLS 1.3 client uses a ticket once (RFC 8446, C.4), and OpenSSL sends a resumed
        // connection a new one only when told to renew: always, as its own keys do. TLS 1.2
        // clients keep their ticket, so only the previous keys' tickets are replaced there.
        if (SSL_version(ssl) == TLS1_3_VERSION) {
            result = 2;
        }
    }
    char digest[] = "SHA256";
    OSSL_PARAM params[] = {
        OSSL_PARAM_construct_octet_string(OSSL_MAC_PARAM_KEY, key.hmac.data(), key.hmac.size()),
        OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, digest, 0),
        OSSL_PARAM_construct_end(),
    };
    if (EVP_MAC_CTX_set_params(mac, params) != 1) {
        return -1;
    }
    return result;
}

} // namespace sluice::tls
