// Unit tests for tls/: the SNI name table (exact, wildcard, case, trailing dot), the allow-list
// patterns and policy, the ticket-key file parser and the rotating key ring.
#include <chrono>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <string>
#include <unistd.h>
#include <vector>

#include <doctest/doctest.h>
#include <openssl/evp.h>
#include <openssl/ocsp.h>

#include <sluice/config.hpp>

#include "tls/client_auth.hpp"
#include "tls/context.hpp"
#include "tls/names.hpp"
#include "tls/ocsp.hpp"
#include "tls/ticket_keys.hpp"
#include "tls_fixture.hpp"

using sluice::tls::matchDnsName;
using sluice::tls::matchGlob;
using sluice::tls::NameTable;

namespace {

std::size_t slotOf(const NameTable &table, std::string_view name) {
    const std::size_t *slot = table.find(name);
    return slot == nullptr ? 999 : *slot;
}

std::string base64(const std::string &bytes) {
    std::string out(4 * ((bytes.size() + 2) / 3) + 1, '\0');
    const int n = EVP_EncodeBlock(reinterpret_cast<unsigned char *>(out.data()),
                                  reinterpret_cast<const unsigned char *>(bytes.data()),
                                  static_cast<int>(bytes.size()));
    out.resize(static_cast<std::size_t>(n));
    return out;
}

std::string keyBytes(char fill) {
    return std::string(80, fill);
}

std::string parseError(const std::string &text) {
    try {
        (void)sluice::tls::parseTicketKeys(text, "t.keys");
    } catch (const sluice::tls::TlsError &error) {
        return error.what();
    }
    return "(no error)";
}

} // namespace

TEST_CASE("SNI: exact names win over wildcards, a wildcard covers one label") {
    NameTable table;
    table.add("example.com", 0);
    table.add("*.example.com", 1);
    table.add("exact.example.com", 2);
    table.add("Mixed.Case.TEST", 3);
    CHECK(slotOf(table, "example.com") == 0);
    CHECK(slotOf(table, "a.example.com") == 1);
    CHECK(slotOf(table, "exact.example.com") == 2);
    CHECK(slotOf(table, "a.b.example.com") == 999); // two labels: no match
    CHECK(slotOf(table, ".example.com") == 999);    // an empty label is not a label
    CHECK(slotOf(table, "other.org") == 999);
    // Case-insensitive, both ways, and a trailing dot is the same name.
    CHECK(slotOf(table, "A.EXAMPLE.COM") == 1);
    CHECK(slotOf(table, "mixed.case.test") == 3);
    CHECK(slotOf(table, "example.com.") == 0);
    // The first slot added for a name keeps it.
    table.add("EXAMPLE.com", 7);
    CHECK(slotOf(table, "example.com") == 0);
    CHECK(table.findExact("*.example.com") != nullptr);
    CHECK(*table.findExact("*.EXAMPLE.com") == 1);
}

TEST_CASE("DNS patterns for allow lists") {
    CHECK(matchDnsName("*.example.com", "a.example.com"));
    CHECK(matchDnsName("*.example.com", "A.Example.COM"));
    CHECK_FALSE(matchDnsName("*.example.com", "example.com"));
    CHECK_FALSE(matchDnsName("*.example.com", "a.b.example.com"));
    CHECK(matchDnsName("host.example.com", "HOST.example.com."));
    CHECK_FALSE(matchDnsName("host.example.com", "host.example.co"));
}

TEST_CASE("glob patterns for CN and URI allow lists") {
    CHECK(matchGlob("spiffe://example.org/*", "spiffe://example.org/ns/web/sa/x"));
    CHECK_FALSE(matchGlob("spiffe://example.org/*", "spiffe://example.org.evil/x"));
    CHECK(matchGlob("good-*", "good-client"));
    CHECK_FALSE(matchGlob("good-*", "Good-client")); // case-sensitive
    CHECK(matchGlob("*", ""));
    CHECK(matchGlob("a*b*c", "aXXbYYc"));
    CHECK_FALSE(matchGlob("a*b*c", "aXXbYY"));
    CHECK(matchGlob("exact", "exact"));
    CHECK_FALSE(matchGlob("exact", "exact2"));
    // Many stars against a long mismatch stay fast (no exponential backtracking).
    CHECK_FALSE(matchGlob("*a*a*a*a*a*a*a*a*b", std::string(5000, 'a')));
}

TEST_CASE("allow lists: any entry of any list admits, none set admits all") {
    sluice::tls::PeerNames names;
    names.subject = "CN=svc";
    names.cn = "svc";
    names.dns = {"svc.internal.test"};
    names.uri = {"spiffe://example.org/ns/web"};
    names.spkiSha256 = std::string(64, 'a');
    sluice::ClientAuth auth;
    std::string matched;
    CHECK(sluice::tls::allowedByLists(auth, names, matched));

    auth.allowUri = {"spiffe://other.org/*"};
    CHECK_FALSE(sluice::tls::allowedByLists(auth, names, matched));
    // The refusal names what the certificate had, for the log line.
    CHECK(matched.find("uri spiffe://example.org/ns/web") != std::string::npos);
    CHECK(matched.find("dns svc.internal.test") != std::string::npos);

    auth.allowDns = {"*.internal.test"};
    CHECK(sluice::tls::allowedByLists(auth, names, matched));
    CHECK(matched == "dns *.internal.test");

    auth.allowDns.clear();
    auth.allowCn = {"sv*"};
    CHECK(sluice::tls::allowedByLists(auth, names, matched));
    CHECK(matched == "cn sv*");

    auth.allowCn.clear();
    auth.allowSpkiSha256 = {std::string(64, 'b')};
    CHECK_FALSE(sluice::tls::allowedByLists(auth, names, matched));
    auth.allowSpkiSha256.push_back(std::string(64, 'a'));
    CHECK(sluice::tls::allowedByLists(auth, names, matched));
}

TEST_CASE("the identity is the first URI SAN, else DNS SAN, else CN") {
    sluice::tls::PeerNames names;
    names.cn = "cn";
    CHECK(sluice::tls::identityOf(names) == "cn");
    names.dns = {"d1", "d2"};
    CHECK(sluice::tls::identityOf(names) == "d1");
    names.uri = {"u1"};
    CHECK(sluice::tls::identityOf(names) == "u1");
}

TEST_CASE("ticket key files: one base64 key per line, first encrypts") {
    const std::string first = keyBytes('1');
    const std::string second = keyBytes('2');
    auto keys = sluice::tls::parseTicketKeys(
        "# comment\n\n  " + base64(first) + "  \r\n" + base64(second) + "\n", "t.keys");
    REQUIRE(keys.size() == 2);
    CHECK(keys[0].name[0] == '1');
    CHECK(keys[0].aes[31] == '1');
    CHECK(keys[1].hmac[0] == '2');
    // Without a final newline too.
    CHECK(sluice::tls::parseTicketKeys(base64(first), "t.keys").size() == 1);
}

TEST_CASE("ticket key files: errors name the file and line") {
    CHECK(parseError("") == "ticket key file t.keys: no key (one base64 key per line)");
    CHECK(parseError("# only a comment\n") ==
          "ticket key file t.keys: no key (one base64 key per line)");
    CHECK(parseError("\n" + base64(std::string(48, 'x')) + "\n") ==
          "ticket key file t.keys line 2: a key is 80 bytes (16 name, 32 AES, 32 HMAC), this "
          "one is 48");
    CHECK(parseError(base64(std::string(81, 'x'))) ==
          "ticket key file t.keys line 1: a key is 80 bytes (16 name, 32 AES, 32 HMAC), this "
          "one is 81");
    CHECK(parseError("not base64!\n") ==
          "ticket key file t.keys line 1: expected one base64 key (80 bytes) per line");
    CHECK(parseError("abc\n") ==
          "ticket key file t.keys line 1: expected one base64 key (80 bytes) per line");
    const std::string key = base64(keyBytes('k'));
    CHECK(parseError(key + "\n" + key + "\n") ==
          "ticket key file t.keys line 2: two keys have the same name (first 16 bytes)");
}

TEST_CASE("ticket key ring from a file: first encrypts, the others decrypt and renew") {
    auto keys = sluice::tls::parseTicketKeys(base64(keyBytes('2')) + "\n" + base64(keyBytes('1')),
                                             "t.keys");
    sluice::tls::TicketKeyRing ring(keys);
    CHECK(ring.encryptionKey().name == keys[0].name);
    sluice::tls::TicketKey found;
    CHECK(ring.decryptionKey(keys[0].name.data(), found) == 1);
    CHECK(ring.decryptionKey(keys[1].name.data(), found) == 2);
    CHECK(found.aes == keys[1].aes);
    const std::uint8_t unknown[16] = {};
    CHECK(ring.decryptionKey(unknown, found) == 0);
}

TEST_CASE("random ticket keys rotate, and two predecessors still decrypt") {
    using namespace std::chrono_literals;
    sluice::tls::TicketKeyRing ring(1000ms);
    const auto start = sluice::tls::TicketKeyRing::Clock::now();
    const auto k0 = ring.encryptionKey(start);
    CHECK(ring.encryptionKey(start + 500ms).name == k0.name);
    const auto k1 = ring.encryptionKey(start + 1100ms);
    CHECK(k1.name != k0.name);
    sluice::tls::TicketKey found;
    CHECK(ring.decryptionKey(k0.name.data(), found, start + 1200ms) == 2);
    (void)ring.encryptionKey(start + 2200ms);
    CHECK(ring.decryptionKey(k0.name.data(), found, start + 2300ms) == 2);
    (void)ring.encryptionKey(start + 3300ms);
    CHECK(ring.size() == 3);
    CHECK(ring.decryptionKey(k0.name.data(), found, start + 3400ms) == 0); // retired
    CHECK(ring.decryptionKey(k1.name.data(), found, start + 3400ms) == 2);
}

// ---------------------------------------------------------------------------------------------
// OCSP: what may be stapled.

namespace {

using sluice::test::pki;

struct ChainFree {
    void operator()(STACK_OF(X509) * chain) const { sk_X509_pop_free(chain, X509_free); }
};
using ChainPtr = std::unique_ptr<STACK_OF(X509), ChainFree>;

/** The issuer chain of the fixture's leaf: its CA. */
ChainPtr issuerChain() {
    ChainPtr chain(sk_X509_new_null());
    X509_up_ref(pki().caCert.get());
    sk_X509_push(chain.get(), pki().caCert.get());
    return chain;
}

/**
 * A DER OCSP response saying `status` about `subject` (issued by the fixture CA), signed by
 * `signer`, with thisUpdate and nextUpdate at these offsets from now (seconds).
 */
std::vector<unsigned char> ocspResponse(X509 *subject, X509 *signer, EVP_PKEY *signerKey,
                                        long thisOffset, long nextOffset,
                                        int status = V_OCSP_CERTSTATUS_GOOD) {
    OCSP_CERTID *id = OCSP_cert_to_id(EVP_sha1(), subject, pki().caCert.get());
    OCSP_BASICRESP *basic = OCSP_BASICRESP_new();
    ASN1_TIME *thisUpdate = X509_gmtime_adj(nullptr, thisOffset);
    ASN1_TIME *nextUpdate = X509_gmtime_adj(nullptr, nextOffset);
    ASN1_TIME *revokedAt = X509_gmtime_adj(nullptr, thisOffset);
    REQUIRE(id != nullptr);
    REQUIRE(basic != nullptr);
    REQUIRE(OCSP_basic_add1_status(basic, id, status, OCSP_REVOKED_STATUS_KEYCOMPROMISE,
                                   status == V_OCSP_CERTSTATUS_REVOKED ? revokedAt : nullptr,
                                   thisUpdate, nextUpdate) != nullptr);
    REQUIRE(OCSP_basic_sign(basic, signer, signerKey, EVP_sha256(), nullptr, 0) == 1);
    OCSP_RESPONSE *response = OCSP_response_create(OCSP_RESPONSE_STATUS_SUCCESSFUL, basic);
    REQUIRE(response != nullptr);
    unsigned char *der = nullptr;
    const int length = i2d_OCSP_RESPONSE(response, &der);
    REQUIRE(length > 0);
    std::vector<unsigned char> out(der, der + length);
    OPENSSL_free(der);
    OCSP_RESPONSE_free(response);
    OCSP_BASICRESP_free(basic);
    OCSP_CERTID_free(id);
    ASN1_TIME_free(thisUpdate);
    ASN1_TIME_free(nextUpdate);
    ASN1_TIME_free(revokedAt);
    return out;
}

std::vector<unsigned char> caSigned(long thisOffset, long nextOffset,
                                    int status = V_OCSP_CERTSTATUS_GOOD) {
    return ocspResponse(pki().leafCert.get(), pki().caCert.get(), pki().caKey.get(), thisOffset,
                        nextOffset, status);
}

std::string checkError(const std::vector<unsigned char> &der, std::time_t now) {
    ChainPtr chain = issuerChain();
    try {
        (void)sluice::tls::checkOcspResponse(der, pki().leafCert.get(), chain.get(), now);
    } catch (const sluice::tls::TlsError &e) {
        return e.what();
    }
    return "accepted";
}

/** A file holding `bytes`, removed with the object. */
struct TempFile {
    std::filesystem::path path;
    explicit TempFile(const std::vector<unsigned char> &bytes) {
        path = std::filesystem::temp_directory_path() /
               ("sluice-ocsp-" + std::to_string(::getpid()) + "-" +
                std::to_string(reinterpret_cast<std::uintptr_t>(this)) + ".der");
        std::FILE *file = std::fopen(path.c_str(), "wb");
        REQUIRE(file != nullptr);
        REQUIRE(std::fwrite(bytes.data(), 1, bytes.size(), file) == bytes.size());
        std::fclose(file);
    }
    ~TempFile() { std::filesystem::remove(path); }
};

} // namespace

TEST_CASE("ocsp: a current response about the certificate, signed by its issuer, is accepted") {
    // The response's times come from the clock while it is built, which can cross a second
    // boundary (slowly, under a sanitizer): bound them by the clock before and after.
    const std::time_t before = std::time(nullptr);
    const std::vector<unsigned char> good = caSigned(-3600, 3600);
    const std::time_t now = std::time(nullptr);
    ChainPtr chain = issuerChain();
    const auto staple =
        sluice::tls::checkOcspResponse(good, pki().leafCert.get(), chain.get(), now);
    CHECK_FALSE(staple.revoked);
    CHECK(staple.nextUpdate >= before + 3600);
    CHECK(staple.nextUpdate <= now + 3600);
    const auto revoked = sluice::tls::checkOcspResponse(
        caSigned(-3600, 3600, V_OCSP_CERTSTATUS_REVOKED), pki().leafCert.get(), chain.get(), now);
    CHECK(revoked.revoked);
}

TEST_CASE("ocsp: an expired response is refused, and is never stapled") {
    const std::time_t now = std::time(nullptr);
    // nextUpdate an hour ago: well signed, about the right certificate, but stale.
    const std::vector<unsigned char> expired = caSigned(-7200, -3600);
    CHECK(checkError(expired, now).find("expired") != std::string::npos);
    // Through the stapler, as the status callback sees it: an expired file is logged at startup
    // (not fatal: a cron job may replace it) and nothing is stapled.
    TempFile file(expired);
    ChainPtr chain = issuerChain();
    {
        sluice::tls::OcspStapler stapler;
        stapler.add(pki().leafCert.get(), chain.get(), file.path.string());
        std::vector<unsigned char> out;
        CHECK_FALSE(stapler.staple(pki().leafCert.get(), out, now));
        CHECK(out.empty());
    }
    // A response that was good when loaded is no longer stapled once its nextUpdate passes,
    // even if no fresher one came.
    TempFile fresh(caSigned(-60, 600));
    sluice::tls::OcspStapler stapler;
    stapler.add(pki().leafCert.get(), chain.get(), fresh.path.string());
    std::vector<unsigned char> out;
    CHECK(stapler.staple(pki().leafCert.get(), out, now));
    CHECK_FALSE(out.empty());
    out.clear();
    // now + 700: past nextUpdate even if the clock moved on while the response was built.
    CHECK_FALSE(stapler.staple(pki().leafCert.get(), out, now + 700));
    CHECK(out.empty());
}

TEST_CASE("ocsp: mismatched, badly signed and undated responses are refused") {
    const std::time_t now = std::time(nullptr);
    // Signed by an unrelated CA (and not delegated by the issuer).
    CHECK(checkError(ocspResponse(pki().leafCert.get(), pki().otherCaCert.get(),
                                  pki().otherCaKey.get(), -60, 600),
                     now)
              .find("does not verify") != std::string::npos);
    // About another certificate (the CA itself, "issued" by the CA).
    CHECK(
        checkError(
            ocspResponse(pki().caCert.get(), pki().caCert.get(), pki().caKey.get(), -60, 600), now)
            .find("another certificate") != std::string::npos);
    // Not valid yet (beyond the tolerated clock skew).
    CHECK(checkError(caSigned(3600, 7200), now).find("not valid yet") != std::string::npos);
    // Not an OCSP response at all.
    CHECK(checkError({1, 2, 3}, now).find("not a DER OCSP response") != std::string::npos);
    // A good response with bytes after it: they would be stapled to every client.
    std::vector<unsigned char> trailing = caSigned(-60, 600);
    CHECK(checkError(trailing, now) == "accepted");
    trailing.push_back('\n');
    CHECK(checkError(trailing, now) == "1 byte after the end of the DER OCSP response");
    trailing.push_back('\n');
    CHECK(checkError(trailing, now) == "2 bytes after the end of the DER OCSP response");
}

TEST_CASE("ocsp: fetched responses are refreshed at half their remaining validity, capped") {
    using sluice::tls::OcspStapler;
    using std::chrono::seconds;
    const std::time_t now = 1'000'000;
    CHECK(OcspStapler::refreshDelay(now + 7200, now, seconds(86400)) == seconds(3600));
    CHECK(OcspStapler::refreshDelay(now + 7200, now, seconds(60)) == seconds(60));
    // Already expired or about to: retry soon, never in the past.
    CHECK(OcspStapler::refreshDelay(now - 10, now, seconds(3600)) == seconds(1));
}
