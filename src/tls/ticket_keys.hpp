// tls/ticket_keys: the keys that encrypt session tickets (TLS 1.2 tickets and TLS 1.3 stateless
// resumption). Either a key file shared by every sluice instance (the first key encrypts, every
// key decrypts, so rotating by prepending a key never invalidates live tickets), or random keys
// made per process and replaced on a timer.
//
// Key file format: one key per line, the base64 of 80 bytes: a 16-byte key name, a 32-byte
// AES-256 key and a 32-byte HMAC-SHA256 key. Blank lines and lines starting with '#' are skipped.
// Make a key with `openssl rand 80 | base64 -w0`.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

struct ssl_st;
struct evp_cipher_ctx_st;
struct evp_mac_ctx_st;

namespace sluice::tls {

/** One ticket key. */
struct TicketKey {
    std::array<std::uint8_t, 16> name{};
    std::array<std::uint8_t, 32> aes{};
    std::array<std::uint8_t, 32> hmac{};
};

/** Parses a key file's text; `path` names it in errors. Throws TlsError naming file and line. */
std::vector<TicketKey> parseTicketKeys(std::string_view text, const std::string &path);

/** Reads and parses a key file. Throws TlsError. */
std::vector<TicketKey> loadTicketKeys(const std::string &path);

/**
 * The keys one context encrypts and decrypts tickets with. Thread-safe: every worker's
 * connections share it. With random keys, the encrypting key is replaced once `rotation` has
 * passed (checked when a ticket is made or opened) and the two previous keys still decrypt.
 */
class TicketKeyRing {
public:
    using Clock = std::chrono::steady_clock;

    /** Fixed keys from a file: keys[0] encrypts. `keys` must not be empty. */
    explicit TicketKeyRing(std::vector<TicketKey> keys);

    /** Random keys, replaced every `rotation`. */
    explicit TicketKeyRing(std::chrono::milliseconds rotation);

    /** The key that encrypts now (rotating first if it is due). */
    TicketKey encryptionKey(Clock::time_point now = Clock::now());

    /**
     * Finds the key named `name`: 1 if it is the encrypting key, 2 if it is an older key (the
     * ticket should be renewed), 0 if unknown (full handshake). Fills `key` when found.
     */
    int decryptionKey(const std::uint8_t *name, TicketKey &key,
                      Clock::time_point now = Clock::now());

    /** How many keys decrypt now. */
    std::size_t size() const;

private:
    void rotateIfDue(Clock::time_point now);

    mutable std::mutex mutex_;
    std::vector<TicketKey> keys_; // [0] encrypts
    bool random_ = false;
    std::chrono::milliseconds rotation_{0};
    Clock::time_point nextRotation_{};
};

/** Installs the ring as `ssl`'s context's ticket callback target (see context.cpp). */
int ticketKeyCallback(TicketKeyRing &ring, ssl_st *ssl, unsigned char *keyName, unsigned char *iv,
                      evp_cipher_ctx_st *cipher, evp_mac_ctx_st *mac, int encrypt);

} // namespace sluice::tls
