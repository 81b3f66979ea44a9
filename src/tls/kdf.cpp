#include "tls/kdf.hpp"

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <new>
#include <span>
#include <strings.h>
#include <vector>

#include <openssl/core.h>
#include <openssl/core_dispatch.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <openssl/params.h>
#include <openssl/proverr.h>
#include <openssl/provider.h>

namespace sluice::tls {
namespace {

constexpr const char *providerName = "sluice";
constexpr const char *preferQuery = "?provider=sluice";

// ---- digests ------------------------------------------------------------------------------

/** The digests TLS uses, fetched once when the provider is loaded; they live as long as the
 * process. */
struct Digests {
    EVP_MD *sha256 = nullptr;
    EVP_MD *sha384 = nullptr;
    EVP_MD *md5 = nullptr; // MD5-SHA1, the TLS 1.0 and 1.1 PRF; null where the build has no MD5
    EVP_MD *sha1 = nullptr;
};
Digests digests;

/** The provider as loaded, held (not unloaded) for the life of the process. */
OSSL_PROVIDER *provider = nullptr;

/** A KDF's digest: one of the fetched ones, one fetched by name for this context, or MD5-SHA1. */
class Digest {
public:
    Digest() = default;
    Digest(const Digest &) = delete;
    Digest &operator=(const Digest &) = delete;
    ~Digest() { reset(); }

    void reset() {
        EVP_MD_free(owned_);
        owned_ = nullptr;
        md_ = nullptr;
        md5sha1_ = false;
    }

    /** Takes the digest a DIGEST parameter names (and PROPERTIES, for one not fetched already). */
    bool set(const OSSL_PARAM params[]) {
        const OSSL_PARAM *p = OSSL_PARAM_locate_const(params, OSSL_KDF_PARAM_DIGEST);
        if (p == nullptr) {
            return true;
        }
        const char *name = nullptr;
        if (OSSL_PARAM_get_utf8_string_ptr(p, &name) != 1) {
            ERR_raise(ERR_LIB_PROV, PROV_R_FAILED_TO_GET_PARAMETER);
            return false;
        }
        reset();
        if (is(name, {"SHA2-256", "SHA-256", "SHA256"})) {
            md_ = digests.sha256;
        } else if (is(name, {"SHA2-384", "SHA-384", "SHA384"})) {
            md_ = digests.sha384;
        } else if (is(name, {"MD5-SHA1"})) {
            if (digests.md5 == nullptr || digests.sha1 == nullptr) {
                ERR_raise(ERR_LIB_PROV, PROV_R_INVALID_DIGEST);
                return false;
            }
            md5sha1_ = true;
            md_ = digests.sha1; // for the size checks; the PRF splits the work itself
        } else {
            const char *properties = nullptr;
            const OSSL_PARAM *q = OSSL_PARAM_locate_const(params, OSSL_KDF_PARAM_PROPERTIES);
            if (q != nullptr && OSSL_PARAM_get_utf8_string_ptr(q, &properties) != 1) {
                ERR_raise(ERR_LIB_PROV, PROV_R_FAILED_TO_GET_PARAMETER);
                return false;
            }
            owned_ = EVP_MD_fetch(nullptr, name, properties);
            md_ = owned_;
        }
        if (md_ == nullptr) {
            ERR_raise(ERR_LIB_PROV, PROV_R_INVALID_DIGEST);
            return false;
        }
        if ((EVP_MD_get_flags(md_) & EVP_MD_FLAG_XOF) != 0) {
            reset();
            ERR_raise(ERR_LIB_PROV, PROV_R_XOF_DIGESTS_NOT_ALLOWED);
            return false;
        }
        return true;
    }

    const EVP_MD *md() const { return md_; }
    bool md5sha1() const { return md5sha1_; }
    std::size_t size() const { return static_cast<std::size_t>(EVP_MD_get_size(md_)); }

private:
    static bool is(const char *name, std::initializer_list<const char *> names) {
        for (const char *candidate : names) {
            if (strcasecmp(name, candidate) == 0) {
                return true;
            }
        }
        return false;
    }

    const EVP_MD *md_ = nullptr;
    EVP_MD *owned_ = nullptr;
    bool md5sha1_ = false;
};

// ---- bytes --------------------------------------------------------------------------------

/**
 * Bytes a KDF was given: inline up to 128 (every TLS secret, label and seed), on the heap
 * beyond. Wiped when replaced or freed.
 */
class Bytes {
public:
    Bytes() = default;
    Bytes(const Bytes &) = delete;
    Bytes &operator=(const Bytes &) = delete;
    ~Bytes() { clear(); }

    void clear() {
        OPENSSL_cleanse(data(), size_);
        heap_.clear();
        heap_.shrink_to_fit();
        size_ = 0;
        present_ = false;
    }

    /** Replaces the bytes with an octet-string parameter's, if `params` has one named `key`. */
    bool take(const OSSL_PARAM params[], const char *key) {
        const OSSL_PARAM *p = OSSL_PARAM_locate_const(params, key);
        if (p == nullptr) {
            return true;
        }
        clear();
        const void *bytes = nullptr;
        std::size_t length = 0;
        // As OpenSSL's: a parameter with no data pointer at all (even for no bytes) is refused.
        if (p->data == nullptr || OSSL_PARAM_get_octet_string_ptr(p, &bytes, &length) != 1) {
            ERR_raise(ERR_LIB_PROV, PROV_R_FAILED_TO_GET_PARAMETER);
            return false;
        }
        return append(bytes, length);
    }

    /** Appends bytes; the parameter counts as given even when there are none. */
    bool append(const void *bytes, std::size_t length) {
        present_ = true;
        if (length == 0) {
            return true;
        }
        const std::size_t total = size_ + length;
        if (total > inline_.size()) {
            std::vector<unsigned char> grown;
            try {
                grown.reserve(total);
            } catch (const std::bad_alloc &) {
                ERR_raise(ERR_LIB_PROV, ERR_R_MALLOC_FAILURE);
                return false;
            }
            grown.insert(grown.end(), data(), data() + size_);
            grown.insert(grown.end(), static_cast<const unsigned char *>(bytes),
                         static_cast<const unsigned char *>(bytes) + length);
            OPENSSL_cleanse(data(), size_);
            heap_.swap(grown); // the old heap copy, if any, was wiped above
        } else {
            std::memcpy(inline_.data() + size_, bytes, length);
        }
        size_ = total;
        return true;
    }

    bool present() const { return present_; }
    std::span<const unsigned char> view() const { return {data(), size_}; }
    std::size_t size() const { return size_; }

private:
    unsigned char *data() { return heap_.empty() ? inline_.data() : heap_.data(); }
    const unsigned char *data() const { return heap_.empty() ? inline_.data() : heap_.data(); }

    std::array<unsigned char, 128> inline_{};
    std::vector<unsigned char> heap_;
    std::size_t size_ = 0;
    bool present_ = false;
};

// ---- HMAC ---------------------------------------------------------------------------------

/** Each thread's digest contexts, made once: the key schedule allocates none per call. */
struct Scratch {
    EVP_MD_CTX *inner = EVP_MD_CTX_new(); // hashing ipad ^ key, then the message
    EVP_MD_CTX *outer = EVP_MD_CTX_new(); // hashing opad ^ key, then the inner hash
    EVP_MD_CTX *work = EVP_MD_CTX_new();  // a copy of either, when the key is used again
    ~Scratch() {
        EVP_MD_CTX_free(inner);
        EVP_MD_CTX_free(outer);
        EVP_MD_CTX_free(work);
    }
    bool ready() const { return inner != nullptr && outer != nullptr && work != nullptr; }
};

using Parts = std::initializer_list<std::span<const unsigned char>>;

/**
 * HMAC (RFC 2104) over one of OpenSSL's digests. key() hashes the padded key once; mac() then
 * costs the message's blocks and one block more, and keeps the key for the next mac() unless it
 * is the last.
 */
class Hmac {
public:
    explicit Hmac(Scratch &scratch)
        : s_(scratch) {}

    bool key(const EVP_MD *md, std::span<const unsigned char> key) {
        size_ = static_cast<std::size_t>(EVP_MD_get_size(md));
        const auto block = static_cast<std::size_t>(EVP_MD_get_block_size(md));
        std::array<unsigned char, 256> pad{};
        if (!s_.ready() || block > pad.size() || size_ > EVP_MAX_MD_SIZE) {
            ERR_raise(ERR_LIB_PROV, s_.ready() ? PROV_R_INVALID_DIGEST : ERR_R_MALLOC_FAILURE);
            return false;
        }
        bool ok = true;
        if (key.size() > block) {
            unsigned int hashed = 0;
            ok = EVP_DigestInit_ex(s_.inner, md, nullptr) == 1 &&
                 EVP_DigestUpdate(s_.inner, key.data(), key.size()) == 1 &&
                 EVP_DigestFinal_ex(s_.inner, pad.data(), &hashed) == 1;
        } else if (!key.empty()) {
            std::memcpy(pad.data(), key.data(), key.size());
        }
        for (std::size_t i = 0; i < block; ++i) {
            pad[i] ^= 0x36;
        }
        ok = ok && EVP_DigestInit_ex(s_.inner, md, nullptr) == 1 &&
             EVP_DigestUpdate(s_.inner, pad.data(), block) == 1;
        for (std::size_t i = 0; i < block; ++i) {
            pad[i] ^= 0x36 ^ 0x5c;
        }
        ok = ok && EVP_DigestInit_ex(s_.outer, md, nullptr) == 1 &&
             EVP_DigestUpdate(s_.outer, pad.data(), block) == 1;
        OPENSSL_cleanse(pad.data(), pad.size());
        return ok;
    }

    /** out (size() bytes) = HMAC(key, the parts joined). */
    bool mac(Parts parts, unsigned char *out, bool last) {
        EVP_MD_CTX *inner = s_.inner;
        if (!last) {
            if (EVP_MD_CTX_copy_ex(s_.work, s_.inner) != 1) {
                return false;
            }
            inner = s_.work;
        }
        for (const auto &part : parts) {
            if (!part.empty() && EVP_DigestUpdate(inner, part.data(), part.size()) != 1) {
                return false;
            }
        }
        std::array<unsigned char, EVP_MAX_MD_SIZE> hashed{};
        unsigned int length = 0;
        if (EVP_DigestFinal_ex(inner, hashed.data(), &length) != 1) {
            return false;
        }
        EVP_MD_CTX *outer = s_.outer;
        if (!last) {
            if (EVP_MD_CTX_copy_ex(s_.work, s_.outer) != 1) {
                return false;
            }
            outer = s_.work;
        }
        const bool ok = EVP_DigestUpdate(outer, hashed.data(), length) == 1 &&
                        EVP_DigestFinal_ex(outer, out, &length) == 1;
        OPENSSL_cleanse(hashed.data(), hashed.size());
        return ok;
    }

    std::size_t size() const { return size_; }

private:
    Scratch &s_;
    std::size_t size_ = 0;
};

thread_local Scratch scratch;

std::span<const unsigned char> bytesOf(const unsigned char *data, std::size_t size) {
    return {data, size};
}

// ---- the algorithms -----------------------------------------------------------------------

/** HKDF-Expand (RFC 5869 section 2.3). */
bool hkdfExpand(const EVP_MD *md, std::span<const unsigned char> prk,
                std::span<const unsigned char> info, unsigned char *out, std::size_t length) {
    Hmac hmac(scratch);
    if (!hmac.key(md, prk)) {
        return false;
    }
    const std::size_t size = hmac.size();
    if (length > 255 * size) {
        ERR_raise(ERR_LIB_PROV, PROV_R_LENGTH_TOO_LARGE);
        return false;
    }
    std::array<unsigned char, EVP_MAX_MD_SIZE> block{};
    std::size_t done = 0;
    bool ok = true;
    for (unsigned char counter = 1; ok && done < length; ++counter) {
        const bool last = done + size >= length;
        const auto previous = counter == 1 ? bytesOf(nullptr, 0) : bytesOf(block.data(), size);
        ok = hmac.mac({previous, info, bytesOf(&counter, 1)}, block.data(), last);
        const std::size_t take = std::min(size, length - done);
        std::memcpy(out + done, block.data(), take);
        done += take;
    }
    OPENSSL_cleanse(block.data(), block.size());
    return ok;
}

/** HKDF-Expand-Label (RFC 8446 section 7.1), with the prefix ("tls13 ") passed apart. */
bool expandLabel(const EVP_MD *md, std::span<const unsigned char> secret,
                 std::span<const unsigned char> prefix, std::span<const unsigned char> label,
                 std::span<const unsigned char> context, unsigned char *out, std::size_t length) {
    if (length > 0xffff || prefix.size() + label.size() > 255 || context.size() > 255) {
        ERR_raise(ERR_LIB_PROV, PROV_R_LENGTH_TOO_LARGE);
        return false;
    }
    // struct { uint16 length; opaque label<7..255>; opaque context<0..255>; } HkdfLabel
    std::array<unsigned char, 2 + 1 + 255 + 1 + 255> info{};
    std::size_t n = 0;
    info[n++] = static_cast<unsigned char>(length >> 8);
    info[n++] = static_cast<unsigned char>(length);
    info[n++] = static_cast<unsigned char>(prefix.size() + label.size());
    for (auto part : {prefix, label}) {
        if (!part.empty()) {
            std::memcpy(info.data() + n, part.data(), part.size());
            n += part.size();
        }
    }
    info[n++] = static_cast<unsigned char>(context.size());
    if (!context.empty()) {
        std::memcpy(info.data() + n, context.data(), context.size());
        n += context.size();
    }
    return hkdfExpand(md, secret, bytesOf(info.data(), n), out, length);
}

/**
 * The TLS 1.3 key schedule's extract step (RFC 8446 section 7.1): HKDF-Extract(salt, secret),
 * where a missing secret is Hash.length zeros, and the salt is Derive-Secret(previous, "derived",
 * "") or zeros when there is no previous secret.
 */
bool generateSecret(const EVP_MD *md, const Bytes &previous, const Bytes &secret,
                    std::span<const unsigned char> prefix, std::span<const unsigned char> label,
                    unsigned char *out, std::size_t length) {
    const auto size = static_cast<std::size_t>(EVP_MD_get_size(md));
    if (length != size) {
        ERR_raise(ERR_LIB_PROV, PROV_R_OUTPUT_BUFFER_TOO_SMALL);
        return false;
    }
    static constexpr std::array<unsigned char, EVP_MAX_MD_SIZE> zeros{};
    std::array<unsigned char, EVP_MAX_MD_SIZE> salt{};
    auto saltBytes = bytesOf(zeros.data(), size);
    bool ok = true;
    if (previous.present()) {
        std::array<unsigned char, EVP_MAX_MD_SIZE> empty{};
        unsigned int emptyLength = 0;
        ok = EVP_Digest(nullptr, 0, empty.data(), &emptyLength, md, nullptr) == 1 &&
             expandLabel(md, previous.view(), prefix, label, bytesOf(empty.data(), emptyLength),
                         salt.data(), size);
        saltBytes = bytesOf(salt.data(), size);
    }
    const auto input = secret.present() ? secret.view() : bytesOf(zeros.data(), size);
    Hmac hmac(scratch);
    ok = ok && hmac.key(md, saltBytes) && hmac.mac({input}, out, true);
    OPENSSL_cleanse(salt.data(), salt.size());
    return ok;
}

/** P_hash (RFC 5246 section 5), XORed into `out` when `mix` is set. */
bool pHash(const EVP_MD *md, std::span<const unsigned char> secret,
           std::span<const unsigned char> seed, unsigned char *out, std::size_t length, bool mix) {
    Hmac hmac(scratch);
    if (!hmac.key(md, secret)) {
        return false;
    }
    const std::size_t size = hmac.size();
    std::array<unsigned char, EVP_MAX_MD_SIZE> a{};     // A(i)
    std::array<unsigned char, EVP_MAX_MD_SIZE> chunk{}; // HMAC(A(i) + seed)
    bool ok = hmac.mac({seed}, a.data(), false);        // A(1)
    std::size_t done = 0;
    while (ok && done < length) {
        const bool last = done + size >= length;
        ok = hmac.mac({bytesOf(a.data(), size), seed}, chunk.data(), last);
        const std::size_t take = std::min(size, length - done);
        for (std::size_t i = 0; ok && i < take; ++i) {
            out[done + i] = mix ? out[done + i] ^ chunk[i] : chunk[i];
        }
        done += take;
        if (ok && !last) {
            ok = hmac.mac({bytesOf(a.data(), size)}, a.data(), false); // A(i + 1)
        }
    }
    OPENSSL_cleanse(a.data(), a.size());
    OPENSSL_cleanse(chunk.data(), chunk.size());
    return ok;
}

// ---- TLS13-KDF ----------------------------------------------------------------------------

struct Tls13Kdf {
    Digest digest;
    int mode = EVP_KDF_HKDF_MODE_EXTRACT_AND_EXPAND; // not valid here: a caller must choose
    Bytes key;
    Bytes salt;
    Bytes prefix;
    Bytes label;
    Bytes data;

    void reset() {
        digest.reset();
        mode = EVP_KDF_HKDF_MODE_EXTRACT_AND_EXPAND;
        key.clear();
        salt.clear();
        prefix.clear();
        label.clear();
        data.clear();
    }
};

bool readMode(const OSSL_PARAM params[], int &mode) {
    const OSSL_PARAM *p = OSSL_PARAM_locate_const(params, OSSL_KDF_PARAM_MODE);
    if (p == nullptr) {
        return true;
    }
    int value = -1;
    const char *text = nullptr;
    if (p->data_type == OSSL_PARAM_UTF8_STRING) {
        if (OSSL_PARAM_get_utf8_string_ptr(p, &text) != 1) {
            text = "";
        }
        if (strcasecmp(text, "EXTRACT_AND_EXPAND") == 0) {
            value = EVP_KDF_HKDF_MODE_EXTRACT_AND_EXPAND;
        } else if (strcasecmp(text, "EXTRACT_ONLY") == 0) {
            value = EVP_KDF_HKDF_MODE_EXTRACT_ONLY;
        } else if (strcasecmp(text, "EXPAND_ONLY") == 0) {
            value = EVP_KDF_HKDF_MODE_EXPAND_ONLY;
        }
    } else if (OSSL_PARAM_get_int(p, &value) != 1) {
        value = -1;
    }
    if (value != EVP_KDF_HKDF_MODE_EXTRACT_ONLY && value != EVP_KDF_HKDF_MODE_EXPAND_ONLY) {
        // TLS13-KDF has no extract-and-expand: the key schedule asks for each step itself.
        ERR_raise(ERR_LIB_PROV, PROV_R_INVALID_MODE);
        return false;
    }
    mode = value;
    return true;
}

void *tls13New(void *) {
    return new (std::nothrow) Tls13Kdf();
}

void tls13Free(void *ctx) {
    delete static_cast<Tls13Kdf *>(ctx);
}

void tls13Reset(void *ctx) {
    static_cast<Tls13Kdf *>(ctx)->reset();
}

int tls13Set(void *vctx, const OSSL_PARAM params[]) {
    if (params == nullptr) {
        return 1;
    }
    auto *ctx = static_cast<Tls13Kdf *>(vctx);
    if (!ctx->digest.set(params) || !readMode(params, ctx->mode) ||
        !ctx->key.take(params, OSSL_KDF_PARAM_KEY) ||
        !ctx->salt.take(params, OSSL_KDF_PARAM_SALT) ||
        !ctx->prefix.take(params, OSSL_KDF_PARAM_PREFIX) ||
        !ctx->label.take(params, OSSL_KDF_PARAM_LABEL)) {
        return 0;
    }
    // As in OpenSSL: the context (DATA) belongs to one call and is dropped by the next.
    ctx->data.clear();
    return ctx->data.take(params, OSSL_KDF_PARAM_DATA) ? 1 : 0;
}

int tls13Derive(void *vctx, unsigned char *out, std::size_t length, const OSSL_PARAM params[]) {
    auto *ctx = static_cast<Tls13Kdf *>(vctx);
    if (tls13Set(ctx, params) != 1) {
        return 0;
    }
    const EVP_MD *md = ctx->digest.md();
    if (md == nullptr || ctx->digest.md5sha1()) {
        ERR_raise(ERR_LIB_PROV, PROV_R_MISSING_MESSAGE_DIGEST);
        return 0;
    }
    if (ctx->mode == EVP_KDF_HKDF_MODE_EXTRACT_ONLY) {
        return generateSecret(md, ctx->salt, ctx->key, ctx->prefix.view(), ctx->label.view(), out,
                              length)
                   ? 1
                   : 0;
    }
    if (ctx->mode == EVP_KDF_HKDF_MODE_EXPAND_ONLY) {
        return expandLabel(md, ctx->key.view(), ctx->prefix.view(), ctx->label.view(),
                           ctx->data.view(), out, length)
                   ? 1
                   : 0;
    }
    ERR_raise(ERR_LIB_PROV, PROV_R_INVALID_MODE);
    return 0;
}

int tls13Get(void *vctx, OSSL_PARAM params[]) {
    auto *ctx = static_cast<Tls13Kdf *>(vctx);
    OSSL_PARAM *p = OSSL_PARAM_locate(params, OSSL_KDF_PARAM_SIZE);
    if (p == nullptr) {
        return 1;
    }
    if (ctx->mode != EVP_KDF_HKDF_MODE_EXTRACT_ONLY) {
        return OSSL_PARAM_set_size_t(p, SIZE_MAX);
    }
    if (ctx->digest.md() == nullptr) {
        ERR_raise(ERR_LIB_PROV, PROV_R_MISSING_MESSAGE_DIGEST);
        return 0;
    }
    return OSSL_PARAM_set_size_t(p, ctx->digest.size());
}

const OSSL_PARAM *tls13Settable(void *, void *) {
    static const OSSL_PARAM settable[] = {
        OSSL_PARAM_utf8_string(OSSL_KDF_PARAM_MODE, nullptr, 0),
        OSSL_PARAM_int(OSSL_KDF_PARAM_MODE, nullptr),
        OSSL_PARAM_utf8_string(OSSL_KDF_PARAM_PROPERTIES, nullptr, 0),
        OSSL_PARAM_utf8_string(OSSL_KDF_PARAM_DIGEST, nullptr, 0),
        OSSL_PARAM_octet_string(OSSL_KDF_PARAM_KEY, nullptr, 0),
        OSSL_PARAM_octet_string(OSSL_KDF_PARAM_SALT, nullptr, 0),
        OSSL_PARAM_octet_string(OSSL_KDF_PARAM_PREFIX, nullptr, 0),
        OSSL_PARAM_octet_string(OSSL_KDF_PARAM_LABEL, nullptr, 0),
        OSSL_PARAM_octet_string(OSSL_KDF_PARAM_DATA, nullptr, 0),
        OSSL_PARAM_END};
    return settable;
}

const OSSL_PARAM *sizeGettable(void *, void *) {
    static const OSSL_PARAM gettable[] = {OSSL_PARAM_size_t(OSSL_KDF_PARAM_SIZE, nullptr),
                                          OSSL_PARAM_END};
    return gettable;
}

// ---- TLS1-PRF -----------------------------------------------------------------------------

struct Tls1Prf {
    Digest digest;
    Bytes secret;
    Bytes seed; // every SEED parameter given, joined in order

    void reset() {
        digest.reset();
        secret.clear();
        seed.clear();
    }
};

void *prfNew(void *) {
    return new (std::nothrow) Tls1Prf();
}

void prfFree(void *ctx) {
    delete static_cast<Tls1Prf *>(ctx);
}

void prfReset(void *ctx) {
    static_cast<Tls1Prf *>(ctx)->reset();
}

int prfSet(void *vctx, const OSSL_PARAM params[]) {
    if (params == nullptr) {
        return 1;
    }
    auto *ctx = static_cast<Tls1Prf *>(vctx);
    if (!ctx->digest.set(params) || !ctx->secret.take(params, OSSL_KDF_PARAM_SECRET)) {
        return 0;
    }
    // libssl passes the label and each random as a SEED of its own; as in OpenSSL they join.
    for (const OSSL_PARAM *p = OSSL_PARAM_locate_const(params, OSSL_KDF_PARAM_SEED); p != nullptr;
         p = OSSL_PARAM_locate_const(p + 1, OSSL_KDF_PARAM_SEED)) {
        const void *bytes = nullptr;
        std::size_t length = 0;
        if (p->data == nullptr || p->data_size == 0) {
            continue; // as OpenSSL's: an empty seed adds nothing
        }
        if (OSSL_PARAM_get_octet_string_ptr(p, &bytes, &length) != 1) {
            ERR_raise(ERR_LIB_PROV, PROV_R_FAILED_TO_GET_PARAMETER);
            return 0;
        }
        if (!ctx->seed.append(bytes, length)) {
            return 0;
        }
    }
    return 1;
}

int prfDerive(void *vctx, unsigned char *out, std::size_t length, const OSSL_PARAM params[]) {
    auto *ctx = static_cast<Tls1Prf *>(vctx);
    if (prfSet(ctx, params) != 1) {
        return 0;
    }
    if (ctx->digest.md() == nullptr) {
        ERR_raise(ERR_LIB_PROV, PROV_R_MISSING_MESSAGE_DIGEST);
        return 0;
    }
    if (!ctx->secret.present()) {
        ERR_raise(ERR_LIB_PROV, PROV_R_MISSING_SECRET);
        return 0;
    }
    if (ctx->seed.size() == 0) {
        ERR_raise(ERR_LIB_PROV, PROV_R_MISSING_SEED);
        return 0;
    }
    if (length == 0) {
        ERR_raise(ERR_LIB_PROV, PROV_R_INVALID_KEY_LENGTH);
        return 0;
    }
    const auto secret = ctx->secret.view();
    if (!ctx->digest.md5sha1()) {
        return pHash(ctx->digest.md(), secret, ctx->seed.view(), out, length, false) ? 1 : 0;
    }
    // TLS 1.0 and 1.1 (RFC 2246 section 5): P_MD5 over the secret's first half XOR P_SHA-1
    // over its second; the halves share the middle byte when the length is odd.
    const std::size_t half = (secret.size() + 1) / 2;
    return pHash(digests.md5, secret.first(half), ctx->seed.view(), out, length, false) &&
                   pHash(digests.sha1, secret.last(half), ctx->seed.view(), out, length, true)
               ? 1
               : 0;
}

int prfGet(void *, OSSL_PARAM params[]) {
    OSSL_PARAM *p = OSSL_PARAM_locate(params, OSSL_KDF_PARAM_SIZE);
    return p == nullptr ? 1 : OSSL_PARAM_set_size_t(p, SIZE_MAX);
}

const OSSL_PARAM *prfSettable(void *, void *) {
    static const OSSL_PARAM settable[] = {
        OSSL_PARAM_utf8_string(OSSL_KDF_PARAM_PROPERTIES, nullptr, 0),
        OSSL_PARAM_utf8_string(OSSL_KDF_PARAM_DIGEST, nullptr, 0),
        OSSL_PARAM_octet_string(OSSL_KDF_PARAM_SECRET, nullptr, 0),
        OSSL_PARAM_octet_string(OSSL_KDF_PARAM_SEED, nullptr, 0), OSSL_PARAM_END};
    return settable;
}

// ---- the provider -------------------------------------------------------------------------

template <typename F>
OSSL_DISPATCH entry(int id, F *function) {
    return {id, reinterpret_cast<void (*)()>(function)};
}

const OSSL_DISPATCH tls13Functions[] = {entry(OSSL_FUNC_KDF_NEWCTX, tls13New),
                                        entry(OSSL_FUNC_KDF_FREECTX, tls13Free),
                                        entry(OSSL_FUNC_KDF_RESET, tls13Reset),
                                        entry(OSSL_FUNC_KDF_DERIVE, tls13Derive),
                                        entry(OSSL_FUNC_KDF_SETTABLE_CTX_PARAMS, tls13Settable),
                                        entry(OSSL_FUNC_KDF_SET_CTX_PARAMS, tls13Set),
                                        entry(OSSL_FUNC_KDF_GETTABLE_CTX_PARAMS, sizeGettable),
                                        entry(OSSL_FUNC_KDF_GET_CTX_PARAMS, tls13Get),
                                        {0, nullptr}};

const OSSL_DISPATCH prfFunctions[] = {entry(OSSL_FUNC_KDF_NEWCTX, prfNew),
                                      entry(OSSL_FUNC_KDF_FREECTX, prfFree),
                                      entry(OSSL_FUNC_KDF_RESET, prfReset),
                                      entry(OSSL_FUNC_KDF_DERIVE, prfDerive),
                                      entry(OSSL_FUNC_KDF_SETTABLE_CTX_PARAMS, prfSettable),
                                      entry(OSSL_FUNC_KDF_SET_CTX_PARAMS, prfSet),
                                      entry(OSSL_FUNC_KDF_GETTABLE_CTX_PARAMS, sizeGettable),
                                      entry(OSSL_FUNC_KDF_GET_CTX_PARAMS, prfGet),
                                      {0, nullptr}};

const OSSL_ALGORITHM kdfs[] = {
    {"TLS13-KDF", "provider=sluice", tls13Functions, "TLS 1.3 key schedule (sluice)"},
    {"TLS1-PRF", "provider=sluice", prfFunctions, "TLS 1.0-1.2 PRF (sluice)"},
    {nullptr, nullptr, nullptr, nullptr}};

const OSSL_ALGORITHM *queryOperation(void *, int operation, int *noCache) {
    *noCache = 0;
    return operation == OSSL_OP_KDF ? kdfs : nullptr;
}

const OSSL_DISPATCH providerFunctions[] = {
    entry(OSSL_FUNC_PROVIDER_QUERY_OPERATION, queryOperation), {0, nullptr}};

int providerInit(const OSSL_CORE_HANDLE *, const OSSL_DISPATCH *, const OSSL_DISPATCH **out,
                 void **context) {
    *out = providerFunctions;
    *context = &digests;
    return 1;
}

} // namespace

bool loadKdfProvider() {
    static std::once_flag once;
    static bool loaded = false;
    std::call_once(once, [] {
        // In FIPS mode every algorithm must come from the FIPS provider: leave OpenSSL's.
        if (EVP_default_properties_is_fips_enabled(nullptr) != 0) {
            return;
        }
        digests.sha256 = EVP_MD_fetch(nullptr, "SHA2-256", nullptr);
        digests.sha384 = EVP_MD_fetch(nullptr, "SHA2-384", nullptr);
        digests.md5 = EVP_MD_fetch(nullptr, "MD5", nullptr);
        digests.sha1 = EVP_MD_fetch(nullptr, "SHA1", nullptr);
        // retain_fallbacks: OpenSSL's default provider still loads as if this one were not here.
        if (digests.sha256 != nullptr && digests.sha384 != nullptr &&
            OSSL_PROVIDER_add_builtin(nullptr, providerName, providerInit) == 1) {
            provider = OSSL_PROVIDER_try_load(nullptr, providerName, 1);
        }
        loaded = provider != nullptr;
        ERR_clear_error(); // a digest this build lacks is not an error of the caller's
    });
    return loaded;
}

const char *contextProperties(bool builtin) {
    return builtin && loadKdfProvider() ? preferQuery : nullptr;
}

const char *kdfName(bool builtin) {
    return contextProperties(builtin) != nullptr ? "sluice" : "openssl";
}

} // namespace sluice::tls
