"""TLS round trips through sluice with Python's ssl: versions, certificate types, policy
settings from the config, IPv6 listeners, UNIX-socket backends."""

import os
import socket
import ssl

from backends import EchoBackend, SinkBackend
from harness import (
    HandshakeFailed,
    MiB,
    Skip,
    TlsClient,
    check,
    client_context,
    have_ipv6_loopback,
    tls_roundtrip,
)


def sslsocket_echo(addr, ctx, payload, server_hostname="localhost"):
    """A round trip with the stock ssl.SSLSocket API (blocking, with timeouts)."""
    with socket.create_connection(addr, timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_hostname) as s:
            s.sendall(payload)
            got = bytearray()
            while len(got) < len(payload):
                d = s.recv(min(1 << 20, len(payload) - len(got)))
                check(d, f"connection closed after {len(got)} of {len(payload)} echoed bytes")
                got += d
            check(got == payload, "echoed bytes differ from the bytes sent")
            return s.version(), s.cipher()


def test_tls13_roundtrip(t):
    echo = t.backend(EchoBackend())
    d = t.sluice(t.listener(echo))
    ctx = client_context(min_version=ssl.TLSVersion.TLSv1_3)
    payload = os.urandom(1 * MiB)
    version, cipher = sslsocket_echo(d.addr(), ctx, payload)
    check(version == "TLSv1.3", f"negotiated {version}")
    c = tls_roundtrip(d.addr(), os.urandom(300_000), ctx)
    check(c.version() == "TLSv1.3", f"negotiated {c.version()}")


def test_tls12_roundtrip(t):
    echo = t.backend(EchoBackend())
    d = t.sluice(t.listener(echo))
    ctx = client_context(max_version=ssl.TLSVersion.TLSv1_2)
    payload = os.urandom(1 * MiB)
    version, cipher = sslsocket_echo(d.addr(), ctx, payload)
    check(version == "TLSv1.2", f"negotiated {version}")
    check(cipher[0].startswith("ECDHE-ECDSA-"), f"TLS 1.2 cipher {cipher[0]} is not ECDHE-ECDSA")
    c = tls_roundtrip(d.addr(), os.urandom(300_000), ctx)
    check(c.version() == "TLSv1.2", f"negotiated {c.version()}")


def test_rsa_certificate(t):
    echo = t.backend(EchoBackend())
    d = t.sluice(t.listener(echo, cert="server-rsa"))
    for v in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ctx = client_context(min_version=v, max_version=v)
        version, cipher = sslsocket_echo(d.addr(), ctx, os.urandom(200_000))
        check(version == v.name.replace("v1_", "v1."), f"asked for {v.name}, negotiated {version}")
        if v == ssl.TLSVersion.TLSv1_2:
            check(cipher[0].startswith("ECDHE-RSA-"), f"TLS 1.2 cipher {cipher[0]} is not ECDHE-RSA")


def test_no_sni_client(t):
    # A client that sends no server name still gets the (only, default) certificate.
    echo = t.backend(EchoBackend())
    d = t.sluice(t.listener(echo))
    ctx = client_context()
    ctx.check_hostname = False
    tls_roundtrip(d.addr(), b"no sni here", ctx, server_hostname=None)


def test_ip_address_client(t):
    # The certificate names 127.0.0.1; a client connecting by IP verifies it.
    echo = t.backend(EchoBackend())
    d = t.sluice(t.listener(echo))
    tls_roundtrip(d.addr(), b"by address", client_context(), server_hostname="127.0.0.1")


def test_listener_overrides_min_version(t):
    echo = t.backend(EchoBackend())
    d = t.sluice(
        [t.listener(echo, name="strict", min_version="1.3"), t.listener(echo, name="lax")],
        tls={"min_version": "1.2"},
    )
    only12 = client_context(max_version=ssl.TLSVersion.TLSv1_2)
    c = TlsClient(d.addr("strict"), only12)
    t.defer(c.close)
    try:
        c.handshake()
        raise AssertionError(f"the 1.3-only listener accepted {c.version()}")
    except HandshakeFailed:
        pass
    c = tls_roundtrip(d.addr("lax"), b"twelve", only12)
    check(c.version() == "TLSv1.2", f"lax listener negotiated {c.version()}")
    c = tls_roundtrip(d.addr("strict"), b"thirteen", client_context())
    check(c.version() == "TLSv1.3", f"strict listener negotiated {c.version()}")


def test_max_version_12(t):
    echo = t.backend(EchoBackend())
    d = t.sluice(t.listener(echo, max_version="1.2"))
    c = tls_roundtrip(d.addr(), b"capped", client_context())
    check(c.version() == "TLSv1.2", f"a listener capped at 1.2 negotiated {c.version()}")
    c = TlsClient(d.addr(), client_context(min_version=ssl.TLSVersion.TLSv1_3))
    t.defer(c.close)
    try:
        c.handshake()
        raise AssertionError("a listener capped at 1.2 accepted a 1.3-only client")
    except HandshakeFailed:
        pass


def test_cipher_policy(t):
    echo = t.backend(EchoBackend())
    d = t.sluice(
        t.listener(echo),
        tls={"ciphers": "ECDHE+CHACHA20", "ciphersuites": "TLS_AES_256_GCM_SHA384", "groups": "P-256"},
    )
    c = tls_roundtrip(d.addr(), b"x" * 1000, client_context(max_version=ssl.TLSVersion.TLSv1_2))
    check("CHACHA20" in c.cipher()[0], f"[tls] ciphers ignored: negotiated {c.cipher()[0]}")
    c = tls_roundtrip(d.addr(), b"y" * 1000, client_context())
    check(c.cipher()[0] == "TLS_AES_256_GCM_SHA384", f"[tls] ciphersuites ignored: {c.cipher()[0]}")
    # A client that offers only suites the listener does not allow is refused.
    only_aes128 = client_context(max_version=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-ECDSA-AES128-GCM-SHA256")
    c = TlsClient(d.addr(), only_aes128)
    t.defer(c.close)
    try:
        c.handshake()
        raise AssertionError(f"negotiated {c.cipher()[0]} although [tls] ciphers allows only CHACHA20")
    except HandshakeFailed:
        pass
    tls_roundtrip(d.addr(), b"still serving", client_context())


def expect_verify_failure(addr, what):
    c = TlsClient(addr, client_context())
    try:
        c.handshake()
        raise AssertionError(f"the client accepted the {what} certificate")
    except HandshakeFailed as e:
        check("certificate verify failed" in str(e), f"{what}: failed for another reason: {e}")
    finally:
        c.close()


def test_served_certificate_is_the_configured_one(t):
    # Each listener serves its own file: a verifying client rejects the bad ones for the
    # expected reason and accepts them with verification off.
    echo = t.backend(EchoBackend())
    d = t.sluice(
        [
            t.listener(echo, name="good"),
            t.listener(echo, name="wrongname", cert="wrong-name"),
            t.listener(echo, name="wrongca", cert="wrong-ca"),
        ]
    )
    tls_roundtrip(d.addr("good"), b"ok")
    for name in ("wrongname", "wrongca"):
        expect_verify_failure(d.addr(name), name)
        tls_roundtrip(d.addr(name), b"unverified", client_context(verify=False))


def test_expired_certificate_is_served(t):
    # An expired certificate is the operator's problem, not a reason to refuse to start:
    # sluice serves it and the client's verification is what rejects it.
    echo = t.backend(EchoBackend())
    d = t.sluice(t.listener(echo, cert="expired"))
    expect_verify_failure(d.addr(), "expired")
    tls_roundtrip(d.addr(), b"unverified", client_context(verify=False))


def test_ipv4_and_ipv6_listeners(t):
    if not have_ipv6_loopback():
        raise Skip("no IPv6 loopback here")
    echo = t.backend(EchoBackend())
    d = t.sluice(t.listener(echo, listen=["127.0.0.1:0", "[::1]:0"]))
    addrs = d.listeners["web"]
    check(len(addrs) == 2, f"expected two bound addresses, got {d.ready_lines}")
    check({a[0] for a in addrs} == {"127.0.0.1", "::1"}, f"bound {addrs}")
    for a in addrs:
        tls_roundtrip(a, os.urandom(100_000))


def test_ipv6_backend(t):
    if not have_ipv6_loopback():
        raise Skip("no IPv6 loopback here")
    echo = t.backend(EchoBackend(family=socket.AF_INET6))
    d = t.sluice(t.listener(echo))
    tls_roundtrip(d.addr(), os.urandom(100_000))


def test_unix_socket_backend(t):
    echo = t.backend(EchoBackend(unix_path=t.tmp / "echo.sock"))
    d = t.sluice(t.listener(echo))
    tls_roundtrip(d.addr(), os.urandom(500_000))
    tls_roundtrip(d.addr(), b"second")
    check(echo.accepted == 2, f"the UNIX backend saw {echo.accepted} connections, expected 2")


def test_listeners_reach_their_own_backends(t):
    echo = t.backend(EchoBackend())
    sink = t.backend(SinkBackend())
    d = t.sluice([t.listener(echo, name="echo"), t.listener(sink, name="sink")])
    tls_roundtrip(d.addr("echo"), b"to the echo")
    c = t.client(d.addr("sink")).handshake()
    c.sendall(b"to the sink").close_write_tls()
    c.recv_until_closed()
    check(bytes(c.data).startswith(b"11 "), f"the sink listener answered {bytes(c.data)!r}")
    check(echo.accepted == 1 and sink.accepted == 1, f"echo {echo.accepted}, sink {sink.accepted}")
