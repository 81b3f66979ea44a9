"""Backends: the PROXY header sent to them (v1, v2 with the TLS facts in TLVs, the client
certificate, IPv6) and received from a load balancer in front of sluice (allowed sources,
malformed and slow headers), routes by SNI and ALPN, pools (round-robin, first,
least-connections, failover and passive health with recovery), TLS to the backends
(re-encryption with a client certificate, wrong CA, wrong name, client mode from a plaintext
listener), UNIX-socket and named servers, and how a TLS backend's end (close_notify or not)
reaches TLS and plaintext clients.

Every backend is a PoolBackend (backends.py) that records what it saw: the PROXY header parsed
with proxyproto, the TLS facts of its own ssl server socket, the bytes."""

import hashlib
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import time

import proxyproto
from backends import (
    Backend,
    BlackholeBackend,
    EchoBackend,
    PoolBackend,
    SilentBackend,
    TlsHalfCloseFirstBackend,
    refused_address,
    tag_of,
)
from harness import (
    TIMING_MARGIN,
    HandshakeFailed,
    MiB,
    Sluice,
    Skip,
    TlsClient,
    certs_dir,
    check,
    client_context,
    have_ipv6_loopback,
    pattern_bytes,
    pattern_chunks,
    pattern_sha256,
    raw_connect,
    scaled,
    timeout,
    tls_roundtrip,
    toml_value,
    wait_peer_close,
    wait_until,
)
from test_ops import metrics
from test_tls_features import feature_certs

# ---------------------------------------------------------------------------------------------
# Helpers.

TAG_LEN = len(tag_of("x"))
PROXY_HEADER_CLOSED = 'sluice_connections_closed_total{reason="proxy_header"}'
TIMEOUT_HANDSHAKE_CLOSED = 'sluice_connections_closed_total{reason="timeout_handshake"}'
SOURCE_REFUSED = "sluice_proxy_source_refused_total"


def start(t, listeners, backends=None, admin=False, global_=None):
    """Starts a daemon with these listener tables and [backend.NAME] tables (a dict of name ->
    table); with admin, an [admin] listener whose address is left in d.admin."""
    if isinstance(listeners, dict):
        listeners = [listeners]
    text = t.config(listeners, global_)
    for name, table in (backends or {}).items():
        text += f"\n[backend.{name}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in table.items())
    if admin:
        text += '\n[admin]\nlisten = "127.0.0.1:0"\n'
    t._n += 1
    d = Sluice(t, text, f"sluice{t._n}")
    t.daemons.append(d)
    d.start()
    d.admin = None
    if admin:
        m = d.wait_log(r"admin-listening address=(\S+):(\d+)", timeout=10)
        d.admin = (m.group(1), int(m.group(2)))
    return d


def server_metric(d, name, backend, server, **labels):
    """One per-server sample from /metrics, e.g. sluice_backend_server_up for ("app", address)."""
    want = dict(labels, backend=backend, server=server)
    for key, value in metrics(d.admin).items():
        m = re.fullmatch(r"([a-z_]+)\{(.*)\}", key)
        if m and m.group(1) == name and dict(re.findall(r'(\w+)="([^"]*)"', m.group(2))) == want:
            return value
    raise AssertionError(f"no {name} sample for {want}")


def wait_servers_idle(d, backend, servers):
    """Waits until sluice counts no connection on any of these servers (a leaked count would make
    least-connections avoid a server for ever)."""
    wait_until(lambda: all(server_metric(d, "sluice_backend_server_active_connections", backend, s) == 0
                           for s in servers), 10,
               f"sluice_backend_server_active_connections of {backend}'s servers {servers} to drop to 0")


def plain_listener(backend, name="plain", listen="127.0.0.1:0", **extra):
    """A plaintext listener table (no certificate)."""
    d = {"name": name, "listen": listen, "plaintext": True, "backend": backend}
    d.update(extra)
    return d


def localhost_address():
    """The address "localhost" resolves to first: where sluice will connect for "localhost:PORT"."""
    return socket.getaddrinfo("localhost", None, 0, socket.SOCK_STREAM)[0][4][0]


def cert_path(name):
    return str(certs_dir() / name)


def server_ctx(cert="server-ecdsa", client_ca=None, alpn=None):
    """An ssl server context for a TLS backend; with client_ca it requires a client certificate
    signed by that CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_path(f"{cert}.crt"), cert_path(f"{cert}.key"))
    if client_ca:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=str(client_ca))
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def alpn_ctx(protocols=None, verify=True):
    ctx = client_context(verify=verify)
    if protocols:
        ctx.set_alpn_protocols(protocols)
    return ctx


def cert_algorithms(path):
    """(signature algorithm, key algorithm) of a certificate as `openssl x509 -text` names them,
    e.g. ("ecdsa-with-SHA256", "EC256"): what PROXY v2 SIG_ALG and KEY_ALG must carry."""
    out = subprocess.run(["openssl", "x509", "-in", path, "-noout", "-text"], check=True,
                         capture_output=True, text=True).stdout
    sig = re.search(r"Signature Algorithm: (\S+)", out).group(1)
    bits = re.search(r"Public-Key: \((\d+) bit\)", out).group(1)
    kind = "EC" if "id-ecPublicKey" in out else "RSA"
    return sig, f"{kind}{bits}"


def send_raw(sock, data, timeout=5.0):
    """Sends all of data on a socket that may be non-blocking (a TlsClient's)."""
    deadline = time.monotonic() + timeout
    view = memoryview(data)
    while view:
        try:
            n = sock.send(view)
            view = view[n:]
        except BlockingIOError:
            check(time.monotonic() < deadline, "could not send the raw bytes in time")
            time.sleep(0.005)  # pacing a retry of a full socket buffer; nothing relies on it


def echo_exact(c, size, offset=0, timeout=30):
    """Sends `size` pattern bytes through an echo path and checks that exactly those came back
    (the client must have keep=False, so its hash covers only the echo)."""
    c.send(pattern_chunks(size, offset=offset))
    c.run_until(lambda: c.nrecv >= size or c.finished, timeout, f"{size} echoed bytes")
    check(c.nrecv == size, f"echo: {c.nrecv} of {size} bytes ({c.ending()})")
    check(c.hash.hexdigest() == pattern_sha256(size, offset), "echoed bytes differ from those sent")


def finish_clean(c):
    """close_notify from the client; the echo backend's FIN must come back as close_notify."""
    c.close_write_tls()
    c.recv_until_closed()
    check(c.close_notify, f"no close_notify at the end: {c.ending()}")


def tag_through(addr, ctx=None, sni="localhost", payload=b""):
    """One connection to a tagging backend: returns (tag text, negotiated ALPN). Ends cleanly."""
    c = TlsClient(addr, ctx, server_hostname=sni, timeout=10)
    try:
        c.handshake()
        c.sendall(payload)
        got = c.recv_exact(TAG_LEN + len(payload))
        check(got[TAG_LEN:] == payload, f"echo after the tag differs: {got!r}")
        finish_clean(c)
        check(c.nrecv == TAG_LEN + len(payload), f"extra bytes: {c.ending()}")
        return got[:TAG_LEN].decode(), c.obj.selected_alpn_protocol()
    finally:
        c.close()


def check_header_addresses(h, version, src, dst):
    check(h is not None, "the backend got no PROXY header")
    check(h["version"] == version, f"PROXY v{h['version']}, expected v{version}")
    check(h["command"] == "PROXY", f"command {h['command']}")
    check(h["src"] == tuple(src[:2]), f"PROXY source {h['src']}, expected {tuple(src[:2])}")
    check(h["dst"] == tuple(dst[:2]), f"PROXY destination {h['dst']}, expected {tuple(dst[:2])}")


KNOWN_TLVS = {proxyproto.PP2_TYPE_ALPN, proxyproto.PP2_TYPE_AUTHORITY, proxyproto.PP2_TYPE_SSL,
              proxyproto.PP2_TYPE_CLIENT_CERT, proxyproto.PP2_TYPE_NOOP, proxyproto.PP2_TYPE_CRC32C}


def check_tls_tlvs(h, c, sni, alpn, sig_key):
    """The v2 TLVs against what the client `c` itself negotiated: ALPN, SNI, TLS version and
    cipher, and sluice's own certificate's algorithms. Returns the SSL TLV for more checks."""
    types = [k for k, _ in h["tlvs"]]
    check(set(types) <= KNOWN_TLVS, f"unexpected TLV types {types}")
    check(h["alpn"] == (alpn.encode() if alpn else None), f"ALPN TLV {h['alpn']!r}, client negotiated {alpn!r}")
    check(h["authority"] == sni, f"AUTHORITY TLV {h['authority']!r}, client sent SNI {sni!r}")
    s = h["ssl"]
    check(s is not None, "no PP2_TYPE_SSL TLV")
    check(s["version"] == c.version(), f"SSL_VERSION {s['version']!r}, client has {c.version()!r}")
    check(s["cipher"] == c.cipher()[0], f"SSL_CIPHER {s['cipher']!r}, client has {c.cipher()[0]!r}")
    check((s["sig_alg"], s["key_alg"]) == sig_key,
          f"SIG_ALG/KEY_ALG {(s['sig_alg'], s['key_alg'])}, sluice's certificate has {sig_key}")
    return s


# ---------------------------------------------------------------------------------------------
# PROXY header sent to the backend.


def test_proxy_v1_to_backend(t):
    be = t.backend(PoolBackend(proxy=True))
    d = start(t, t.listener("app"), {"app": {"servers": [be.address], "proxy_protocol": "v1"}})
    size = scaled(1 * MiB, 256 * 1024) + 13
    c = t.client(d.addr(), keep=False).handshake()
    echo_exact(c, size)
    finish_clean(c)
    conn = be.wait_done()
    check(conn.header_error is None, f"the backend could not parse the header: {conn.header_error}")
    check_header_addresses(conn.header, 1, c.local, d.addr())
    check(conn.header["family"] == "TCP4", f"v1 family {conn.header['family']}")
    check(conn.received == size and conn.sha256 == pattern_sha256(size),
          f"after the v1 header the backend got {conn.received} of {size} bytes (or others)")


def test_proxy_v2_tlvs_to_backend(t):
    be = t.backend(PoolBackend(proxy=True))
    d = start(t, t.listener("app", alpn=["h2", "http/1.1"]),
              {"app": {"servers": [be.address], "proxy_protocol": "v2"}})
    sig_key = cert_algorithms(cert_path("server-ecdsa.crt"))
    size = scaled(1 * MiB, 256 * 1024) + 7
    cases = [
        # (client context, SNI sent, ALPN the client must negotiate)
        (alpn_ctx(["http/1.1"]), "localhost", "http/1.1"),
        (alpn_ctx(["h2", "http/1.1"], verify=False), "v2.proxy.test", "h2"),
        (client_context(verify=False, max_version=ssl.TLSVersion.TLSv1_2), None, None),
    ]
    for i, (ctx, sni, alpn) in enumerate(cases):
        c = t.client(d.addr(), ctx=ctx, server_hostname=sni, keep=False).handshake()
        check(c.obj.selected_alpn_protocol() == alpn,
              f"case {i}: negotiated {c.obj.selected_alpn_protocol()!r}, expected {alpn!r}")
        echo_exact(c, size, offset=i)
        finish_clean(c)
        conn = be.wait_done(i)
        check(conn.header_error is None, f"case {i}: bad header: {conn.header_error}")
        h = conn.header
        check_header_addresses(h, 2, c.local, d.addr())
        check(h["family"] == "AF_INET" and h["transport"] == "STREAM", f"{h['family']} {h['transport']}")
        s = check_tls_tlvs(h, c, sni, alpn, sig_key)
        check(s["client"] == proxyproto.PP2_CLIENT_SSL,
              f"case {i}: client flags 0x{s['client']:02x} without a client certificate, expected 0x01")
        check(s["verify"] != 0, f"case {i}: verify 0 without a client certificate")
        check(s["cn"] is None and h["client_cert_der"] is None, f"case {i}: a client CN or cert from nowhere")
        check(conn.received == size and conn.sha256 == pattern_sha256(size, i),
              f"case {i}: the backend got {conn.received} of {size} bytes after the header (or others)")
    check(be.conn(2).header["ssl"]["version"] == "TLSv1.2", "the TLS 1.2 client was not reported as TLSv1.2")


def client_cert_ctx(fcs, name="client-good"):
    ctx = client_context()
    ctx.load_cert_chain(str(fcs / f"{name}.crt"), str(fcs / f"{name}.key"))
    return ctx


def test_proxy_v2_client_certificate(t):
    fcs = feature_certs()
    be = t.backend(PoolBackend(proxy=True))
    auth = {"mode": "optional", "ca": str(fcs / "client-ca.crt")}
    d = start(
        t,
        [
            t.listener("big", name="big", client_auth=auth),
            t.listener("small", name="small", client_auth=auth),
        ],
        {
            "big": {"servers": [be.address], "proxy_protocol": "v2", "proxy_client_cert_max": "4KiB"},
            "small": {"servers": [be.address], "proxy_protocol": "v2", "proxy_client_cert_max": 64},
        },
    )
    der = ssl.PEM_cert_to_DER_cert((fcs / "client-good.crt").read_text())
    check(64 < len(der) <= 4096, f"the client certificate is {len(der)} bytes; the test needs 64 < n <= 4 KiB")
    sig_key = cert_algorithms(cert_path("server-ecdsa.crt"))
    all_flags = proxyproto.PP2_CLIENT_SSL | proxyproto.PP2_CLIENT_CERT_CONN | proxyproto.PP2_CLIENT_CERT_SESS

    def one(listener, ctx, session=None):
        c = t.client(d.addr(listener), ctx=ctx, keep=False)
        if session is not None:
            c.obj.session = session
        c.handshake()
        echo_exact(c, 100_000)
        session = c.obj.session  # read after the echo: TLS 1.3 tickets have arrived
        reused = c.obj.session_reused
        finish_clean(c)
        conn = be.wait_done(be.accepted - 1)
        check(conn.header_error is None, f"bad header: {conn.header_error}")
        check_header_addresses(conn.header, 2, c.local, d.addr(listener))
        s = check_tls_tlvs(conn.header, c, "localhost", None, sig_key)
        check(conn.received == 100_000 and conn.sha256 == pattern_sha256(100_000), "data after the header")
        return conn.header, s, session, reused

    # With a certificate, it fits in 4 KiB: flags, verify 0, CN and the DER itself.
    with_cert = client_cert_ctx(fcs)
    h, s, session, _ = one("big", with_cert)
    check(s["client"] == all_flags, f"client flags 0x{s['client']:02x} with a certificate, expected 0x07")
    check(s["verify"] == 0, f"verify {s['verify']} for a verified client certificate")
    check(s["cn"] == "good-client", f"SSL_CN {s['cn']!r}")
    check(h["client_cert_der"] == der, "TLV 0xE0 is not the client's certificate DER"
          if h["client_cert_der"] else "no TLV 0xE0 although the certificate fits")

    # Resumed with that session: the certificate is in the session, not on this connection.
    h, s, _, reused = one("big", with_cert, session)
    check(reused, "the session was not resumed (the test needs a resumption)")
    check(s["cert_sess"] and not s["cert_conn"] and s["client_ssl"],
          f"client flags 0x{s['client']:02x} on a resumption, expected 0x05")
    check(s["cn"] == "good-client", f"SSL_CN {s['cn']!r} on a resumption")
    check(s["verify"] == 0, f"verify {s['verify']} on a resumption of a verified client")

    # Without a certificate: TLS only, verify non-zero, no CN, no DER.
    h, s, _, _ = one("big", client_context())
    check(s["client"] == proxyproto.PP2_CLIENT_SSL, f"client flags 0x{s['client']:02x} without a certificate")
    check(s["verify"] != 0, "verify 0 without a client certificate")
    check(s["cn"] is None and h["client_cert_der"] is None, "CN or certificate without a client certificate")

    # proxy_client_cert_max below the certificate's size: no 0xE0, but the CN and flags still go.
    h, s, _, _ = one("small", client_cert_ctx(fcs))
    check(h["client_cert_der"] is None, f"TLV 0xE0 of {len(h['client_cert_der'] or b'')} bytes with a 64-byte limit")
    check(proxyproto.PP2_TYPE_CLIENT_CERT not in [k for k, _ in h["tlvs"]], "a TLV 0xE0 is present")
    check(s["cn"] == "good-client" and s["client"] == all_flags and s["verify"] == 0,
          f"small limit: CN {s['cn']!r}, flags 0x{s['client']:02x}, verify {s['verify']}")


def test_proxy_header_ipv6_client(t):
    if not have_ipv6_loopback():
        raise Skip("no IPv6 loopback")
    be = t.backend(PoolBackend(proxy=True))
    d = start(
        t,
        [t.listener("v2", name="six", listen="[::1]:0"), t.listener("v1", name="six-v1", listen="[::1]:0")],
        {"v2": {"servers": [be.address], "proxy_protocol": "v2"},
         "v1": {"servers": [be.address], "proxy_protocol": "v1"}},
    )
    check(d.addr("six")[0] == "::1", f"listener announced {d.addr('six')}")
    for i, (listener, version, family) in enumerate((("six", 2, "AF_INET6"), ("six-v1", 1, "TCP6"))):
        c = t.client(d.addr(listener), keep=False).handshake()
        check(c.sock.family == socket.AF_INET6 and c.local[0] == "::1", f"client bound {c.local}")
        echo_exact(c, 50_000)
        finish_clean(c)
        h = be.wait_done(i).header
        check(h is not None and h["family"] == family, f"{listener}: family {h and h['family']}, expected {family}")
        check_header_addresses(h, version, c.local, d.addr(listener))


# ---------------------------------------------------------------------------------------------
# PROXY header from a load balancer in front of sluice.

LB_SRC = ("203.0.113.7", 40000)
LB_DST = ("192.0.2.1", 443)


def balancer_daemon(t, handshake="30s"):
    be = t.backend(PoolBackend(proxy=True))
    d = start(
        t,
        [
            t.listener("app", name="lb", accept_proxy_from=["127.0.0.0/8"], timeouts={"handshake": handshake}),
            t.listener("app", name="lb10", accept_proxy_from=["10.0.0.0/8"], timeouts={"handshake": "30s"}),
            t.listener("app", name="direct"),
        ],
        {"app": {"servers": [be.address], "proxy_protocol": "v2"}},
        admin=True,
    )
    return be, d


def through_balancer(t, d, header, payload=b"behind a balancer"):
    c = t.client(d.addr("lb"))
    send_raw(c.sock, header)
    c.handshake()
    c.sendall(payload)
    check(c.recv_exact(len(payload)) == payload, "echo through the balancer path")
    return c


def balancer_case(t, header):
    be, d = balancer_daemon(t)
    c = through_balancer(t, d, header)
    finish_clean(c)
    h = be.wait_done().header
    check_header_addresses(h, 2, LB_SRC, LB_DST)
    check(h["authority"] == "localhost" and h["ssl"] and h["ssl"]["version"] == c.version(),
          f"TLS facts lost behind the balancer: {h['authority']!r} {h['ssl']}")
    m = d.wait_log(r"^sluice info access .*listener=lb client=(\S+)")
    check(m.group(1) == "203.0.113.7:40000", f"access log client={m.group(1)}")


def test_proxy_v1_from_balancer(t):
    balancer_case(t, proxyproto.v1(LB_SRC, LB_DST))


def test_proxy_v2_from_balancer(t):
    balancer_case(t, proxyproto.v2(LB_SRC, LB_DST, tlvs=[(proxyproto.PP2_TYPE_AUTHORITY, "lb.example")]))


def test_proxy_source_not_allowed(t):
    be, d = balancer_daemon(t)
    before = metrics(d.admin)
    # From 127.0.0.1, outside 10.0.0.0/8: closed at accept, before a byte is sent (the
    # handshake timeout is 30 s, so a quick close is not the timeout).
    for _ in range(3):
        s = raw_connect(d.addr("lb10"))
        try:
            secs = wait_peer_close(s, 10)
        finally:
            s.close()
        check(secs < TIMING_MARGIN, f"a refused source stayed open {secs:.2f}s")
    # A well-formed header does not help a source that may not send one.
    c = t.client(d.addr("lb10"))
    try:
        send_raw(c.sock, proxyproto.v1(LB_SRC, LB_DST))
        c.handshake()
        c.sendall(b"let me in")
        c.recv_until_closed(timeout=10)
        check(c.nrecv == 0, f"a refused source got {c.nrecv} bytes")
    except (HandshakeFailed, ConnectionError):
        pass
    wait_until(lambda: metrics(d.admin)[SOURCE_REFUSED] - before[SOURCE_REFUSED] == 4, 10,
               f"{SOURCE_REFUSED} to count the 4 refused connections")
    check(be.accepted == 0, f"a refused source reached the backend {be.accepted} times")
    # The daemon still serves both the balancer listener and the direct one.
    finish_clean(through_balancer(t, d, proxyproto.v1(LB_SRC, LB_DST)))
    tls_roundtrip(d.addr("direct"), b"still serving")
    check(metrics(d.admin)[SOURCE_REFUSED] - before[SOURCE_REFUSED] == 4, "good connections counted as refused")


def test_proxy_header_malformed_closes_only_that_connection(t):
    be, d = balancer_daemon(t)
    # A good connection, in the middle of its exchange while the bad ones come and go.
    good = through_balancer(t, d, proxyproto.v2(LB_SRC, LB_DST), b"first half ")
    before = metrics(d.admin)[PROXY_HEADER_CLOSED]
    bad = [
        ("garbage", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
        # "PROXY UNKNOWN" may carry anything up to its CRLF, so only the length is wrong here.
        ("a v1 line of 108 bytes", b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n"),
        ("a v2 header of version 3", proxyproto.SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12)),
        ("a v1 line with a bad address", b"PROXY TCP4 203.0.113.999 192.0.2.1 40000 443\r\n"),
    ]
    for what, data in bad:
        s = raw_connect(d.addr("lb"))
        try:
            s.sendall(data)
            secs = wait_peer_close(s, 10)
        finally:
            s.close()
        check(secs < TIMING_MARGIN, f"{what}: closed after {secs:.2f}s, not at once")
    # A TLS ClientHello without a header.
    c = t.client(d.addr("lb"))
    try:
        c.handshake()
        raise AssertionError("a TLS handshake without a PROXY header succeeded")
    except HandshakeFailed:
        pass
    wait_until(lambda: metrics(d.admin)[PROXY_HEADER_CLOSED] - before == len(bad) + 1, 10,
               f"{PROXY_HEADER_CLOSED} to grow by {len(bad) + 1}")
    # The good connection is unharmed.
    good.sendall(b"second half")
    check(good.recv_exact(len(b"first half second half")) == b"first half second half", "the good echo")
    finish_clean(good)
    check(be.accepted == 1, f"bad headers reached the backend: {be.accepted} connections")
    check_header_addresses(be.wait_done().header, 2, LB_SRC, LB_DST)
    d.assert_alive()


def test_proxy_header_slow_is_cut_by_the_handshake_timeout(t):
    be, d = balancer_daemon(t, handshake="1s")
    before = metrics(d.admin)[PROXY_HEADER_CLOSED]
    for half in (proxyproto.v2(LB_SRC, LB_DST)[:10], b"PROXY TCP4 203.0.1"):
        s = raw_connect(d.addr("lb"))
        try:
            s.sendall(half)
            secs = wait_peer_close(s, 1 + TIMING_MARGIN + 2)
        finally:
            s.close()
        check(0.8 <= secs <= 1 + TIMING_MARGIN, f"half a header {half[:6]!r}: closed after {secs:.2f}s, timeout 1s")
    m = metrics(d.admin)
    check(m[PROXY_HEADER_CLOSED] - before == 2,
          f"closed with reason proxy_header: {m[PROXY_HEADER_CLOSED] - before}, expected 2; "
          f"timeout_handshake: {m.get(TIMEOUT_HANDSHAKE_CLOSED)}")
    check(be.accepted == 0, "a half header reached the backend")
    finish_clean(through_balancer(t, d, proxyproto.v1(LB_SRC, LB_DST)))


def test_balancer_header_variants(t):
    be, d = balancer_daemon(t)
    lb = d.addr("lb")

    def connect_with(header, together=False):
        """TLS behind `header`; with together, the header and the ClientHello leave in one
        send(), so sluice finds TLS bytes right after the header in its first read."""
        c = t.client(lb)
        if together:
            try:
                c.obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
            send_raw(c.sock, header + c.out.read())
        else:
            send_raw(c.sock, header)
        c.handshake()
        c.sendall(b"variant")
        check(c.recv_exact(7) == b"variant", "echo")
        finish_clean(c)
        return c, be.wait_done(be.accepted - 1).header

    # The header and the ClientHello in one segment, v1 and v2 (with a checksum and TLVs that
    # sluice must skip).
    _, h = connect_with(proxyproto.v1(LB_SRC, LB_DST), together=True)
    check_header_addresses(h, 2, LB_SRC, LB_DST)
    big = proxyproto.v2(LB_SRC, LB_DST, with_crc32c=True,
                        tlvs=[(proxyproto.PP2_TYPE_UNIQUE_ID, b"u" * 128), (0xE5, bytes(range(256)) * 4)])
    _, h = connect_with(big, together=True)
    check_header_addresses(h, 2, LB_SRC, LB_DST)
    check(h["alpn"] is None and h["authority"] == "localhost" and h["client_cert_der"] is None,
          "TLVs of the incoming header leaked into the outgoing one")
    check(not any(k == 0xE5 or k == proxyproto.PP2_TYPE_UNIQUE_ID for k, _ in h["tlvs"]), "incoming TLVs copied")
    # IPv6 addresses from the balancer on an IPv4 listener.
    src6, dst6 = ("2001:db8::7", 40001), ("2001:db8::1", 8443)
    _, h = connect_with(proxyproto.v1(src6, dst6))
    check(h["family"] == "AF_INET6", f"family {h['family']} for IPv6 addresses from the balancer")
    check_header_addresses(h, 2, src6, dst6)
    d.wait_log(r"^sluice info access .*listener=lb client=\[2001:db8::7\]:40001 ")
    # A LOCAL command (a balancer's health check) and PROXY UNKNOWN carry no addresses: the
    # connection's own stand.
    longest = b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n"  # 107 bytes: the longest v1 line allowed
    check(len(longest) == proxyproto.V1_MAX, "test bug: not 107 bytes")
    for header in (proxyproto.v2(None, None, command="LOCAL"), b"PROXY UNKNOWN\r\n", longest):
        c, h = connect_with(header)
        check_header_addresses(h, 2, c.local, lb)


# ---------------------------------------------------------------------------------------------
# Routes.


def test_routes_by_sni_and_alpn(t):
    names = ["api", "img", "h2", "default"]
    bes = {n: t.backend(PoolBackend(tag=tag_of(n))) for n in names}
    routes = [
        {"sni": "api.example.test", "backend": "api"},
        {"sni": "*.img.example.test", "backend": "img"},
        {"alpn": "h2", "backend": "h2"},
        {"sni": "late.example.test", "backend": "img"},  # after the h2 route: h2 wins over it
        {"sni": "both.example.test", "alpn": "http/1.1", "backend": "api"},
    ]
    d = start(t, t.listener("default", alpn=["h2", "http/1.1"], route=routes),
              {n: {"servers": [b.address]} for n, b in bes.items()})
    cases = [
        # (SNI, ALPN offered, backend, ALPN negotiated)
        ("api.example.test", None, "api", None),
        ("API.Example.TEST", None, "api", None),
        ("api.example.test", ["h2"], "api", "h2"),  # routes 0 and 2 match: the first wins
        ("xapi.example.test", None, "default", None),
        ("cdn.img.example.test", None, "img", None),
        ("CDN.IMG.example.test", ["http/1.1"], "img", "http/1.1"),
        ("cdn.img.example.test", ["h2"], "img", "h2"),
        ("x.y.img.example.test", None, "default", None),  # two labels: not the wildcard
        ("x.y.img.example.test", ["h2"], "h2", "h2"),
        ("img.example.test", None, "default", None),  # the wildcard needs one label
        ("other.example.test", ["h2", "http/1.1"], "h2", "h2"),
        ("other.example.test", ["http/1.1"], "default", "http/1.1"),
        ("late.example.test", None, "img", None),
        ("late.example.test", ["h2"], "h2", "h2"),
        ("both.example.test", ["http/1.1"], "api", "http/1.1"),
        ("both.example.test", None, "default", None),  # SNI matches, ALPN missing
        ("both.example.test", ["h2"], "h2", "h2"),
        (None, None, "default", None),
        (None, ["h2"], "h2", "h2"),
        (None, ["http/1.1"], "default", "http/1.1"),
    ]
    want = {n: 0 for n in names}
    for sni, offered, backend, negotiated in cases:
        tag, alpn = tag_through(d.addr(), alpn_ctx(offered, verify=False), sni, b"routed")
        check(alpn == negotiated, f"SNI {sni!r} ALPN {offered}: negotiated {alpn!r}, expected {negotiated!r}")
        check(tag == tag_of(backend).decode(), f"SNI {sni!r} ALPN {offered}: reached {tag}, expected {backend}")
        want[backend] += 1
    for n in names:
        check(bes[n].accepted == want[n], f"backend {n} got {bes[n].accepted} connections, expected {want[n]}")


# ---------------------------------------------------------------------------------------------
# Pools.


def pool_of(t, n, prefix, **backend_kw):
    return [t.backend(PoolBackend(tag=tag_of(f"{prefix}{i}"), **backend_kw)) for i in range(n)]


def test_round_robin_spreads_evenly(t):
    bes = pool_of(t, 3, "rr")
    d = start(t, t.listener("app"), {"app": {"servers": [b.address for b in bes], "balance": "round-robin"}})
    seq = [tag_through(d.addr())[0] for _ in range(30)]
    for i, b in enumerate(bes):
        check(b.accepted == 10, f"server {i} got {b.accepted} of 30 connections: {seq}")
    check(len(set(seq[:3])) == 3 and all(seq[i] == seq[i % 3] for i in range(30)),
          f"not in turn: {seq}")


def test_first_takes_all_until_it_fails(t):
    bes = pool_of(t, 3, "first")
    d = start(t, t.listener("app"),
              {"app": {"servers": [b.address for b in bes], "balance": "first", "max_fails": 1,
                       "fail_timeout": "30s"}})
    seq = [tag_through(d.addr())[0] for _ in range(12)]
    check(seq == [tag_of("first0").decode()] * 12, f"'first' spread: {seq}")
    check(bes[1].accepted == bes[2].accepted == 0, "spares got connections")
    # The first goes away: the second (not the third) takes everything, and nothing fails.
    bes[0].close()
    seq = [tag_through(d.addr())[0] for _ in range(6)]
    check(seq == [tag_of("first1").decode()] * 6, f"after the first server stopped: {seq}")
    check(bes[2].accepted == 0, "the third server got connections while the second was up")


@timeout(90)
def test_failover_marks_down_and_recovers(t):
    fail_timeout = 2.0
    max_fails = 2
    bes = pool_of(t, 3, "fo")
    d = start(t, t.listener("app"),
              {"app": {"servers": [b.address for b in bes], "balance": "round-robin",
                       "max_fails": max_fails, "fail_timeout": f"{int(fail_timeout)}s",
                       "connect_timeout": "2s"}}, admin=True)
    for _ in range(3):
        tag_through(d.addr())
    check([b.accepted for b in bes] == [1, 1, 1], f"warm-up spread {[b.accepted for b in bes]}")
    victim = bes[1]
    port = victim.port
    victim.close()  # its port now refuses
    server = re.escape(f"127.0.0.1:{port}")
    n = 15
    phase = time.monotonic()
    seq = [tag_through(d.addr(), payload=b"x" * i)[0] for i in range(n)]
    elapsed = time.monotonic() - phase
    others = {tag_of("fo0").decode(), tag_of("fo2").decode()}
    check(set(seq) == others, f"every connection must succeed on the others, got {seq}")
    check(bes[0].accepted + bes[2].accepted == 2 + n, "connections lost on the way")
    d.wait_log(rf"backend-down backend=app server={server} failures={max_fails} ")
    fails = len(re.findall(rf"backend-failed .*server={server} during=connect .*next=retry", d.log()))
    # Without passive health it would be tried every third connection (n / 3 = 5 failures); with
    # it, max_fails times, plus once more each time fail_timeout ran out during the phase.
    bound = max_fails + int(elapsed // fail_timeout)
    check(max_fails <= fails <= bound, f"{fails} failed connects to the stopped server in {elapsed:.2f}s, "
                                       f"expected {max_fails}..{bound}")
    victim_addr = f"127.0.0.1:{port}"
    check(server_metric(d, "sluice_backend_server_connects_total", "app", victim_addr, result="failed") == fails,
          "connects_total{result=failed} differs from the backend-failed lines")
    if time.monotonic() - phase < fail_timeout * 0.9:
        check(server_metric(d, "sluice_backend_server_up", "app", victim_addr) == 0, "the down server shows up=1")
    # The server comes back on the same port; after fail_timeout it gets connections again.
    back = t.backend(PoolBackend(tag=tag_of("fo1-back"), port=port))
    wait_until(lambda: tag_through(d.addr())[0] == tag_of("fo1-back").decode(), fail_timeout + 10,
               "the restarted server to get a connection", interval=0.05)
    first = back.conn(0).accepted_at
    check(first - phase >= fail_timeout * 0.9,
          f"the down server got a connection {first - phase:.2f}s after the failures began, "
          f"before fail_timeout ({fail_timeout}s)")
    d.wait_log(rf"backend-up backend=app server={server}")
    before = [bes[0].accepted, back.accepted, bes[2].accepted]
    for _ in range(6):
        tag_through(d.addr())
    gained = [b.accepted - x for b, x in zip((bes[0], back, bes[2]), before)]
    check(gained == [2, 2, 2], f"after recovery, 6 connections spread {gained}")
    check(server_metric(d, "sluice_backend_server_up", "app", victim_addr) == 1, "up=0 after backend-up")
    wait_servers_idle(d, "app", [b.address for b in bes])


def test_least_connections_avoids_the_busy_server(t):
    bes = pool_of(t, 3, "lc")
    d = start(t, t.listener("app"), {"app": {"servers": [b.address for b in bes], "balance": "least-connections"}},
              admin=True)
    held = []
    for _ in range(3):
        c = t.client(d.addr()).handshake()
        held.append((c.recv_exact(TAG_LEN).decode(), c))
    tags = [tag for tag, _ in held]
    check(len(set(tags)) == 3, f"three open connections on an idle pool went to {tags}")
    busy = tags[0]
    for _, c in held[1:]:
        finish_clean(c)
    wait_until(lambda: metrics(d.admin)["sluice_connections_active"] == 1, 10, "the two closed connections to end")
    seq = [tag_through(d.addr())[0] for _ in range(8)]
    check(busy not in seq, f"a new connection went to the server with an open one: {seq} (busy {busy})")
    check(len(set(seq)) == 2, f"the idle servers were not both used: {seq}")
    # Two open on the busy one, one on a second: the third idle one is the only choice.
    c2 = t.client(d.addr()).handshake()
    t2 = c2.recv_exact(TAG_LEN).decode()
    c3 = t.client(d.addr()).handshake()
    t3 = c3.recv_exact(TAG_LEN).decode()
    check(len({busy, t2, t3}) == 3, f"with one open on {busy}: then {t2}, then {t3}")
    for c in (held[0][1], c2, c3):
        finish_clean(c)
    wait_servers_idle(d, "app", [b.address for b in bes])


def test_attempts_limit_and_connect_timeout(t):
    good = t.backend(PoolBackend(tag=tag_of("good")))
    hole = BlackholeBackend()
    t.defer(hole.close)
    refused = [refused_address(), refused_address()]
    # max_fails = 0: never marked down, so every connection walks the same servers.
    d = start(
        t,
        [t.listener("two", name="two"), t.listener("three", name="three"), t.listener("slow", name="slow")],
        {
            "two": {"servers": refused + [good.address], "balance": "first", "attempts": 2, "max_fails": 0},
            "three": {"servers": refused + [good.address], "balance": "first", "attempts": 3, "max_fails": 0},
            "slow": {"servers": [hole.address, good.address], "balance": "first", "max_fails": 0,
                     "connect_timeout": "1s"},
        },
        admin=True,
    )
    expect_clean_refusal(t, d.addr("two"))
    check(good.accepted == 0, "attempts = 2 reached the third server")
    fails = re.findall(r"backend-failed listener=two .*", d.log())
    check(len(fails) == 2 and "next=retry" in fails[0] and "next=retry" not in fails[1],
          f"attempts = 2: {fails}")
    check(tag_through(d.addr("three"))[0] == tag_of("good").decode(), "attempts = 3")
    # A server that never answers costs connect_timeout, then the next one takes over.
    start_at = time.monotonic()
    check(tag_through(d.addr("slow"))[0] == tag_of("good").decode(), "after a connect timeout")
    secs = time.monotonic() - start_at
    check(0.8 <= secs <= 1 + TIMING_MARGIN, f"failover after {secs:.2f}s, connect_timeout 1s")
    d.wait_log(rf"backend-failed listener=slow .*server={re.escape(hole.address)} during=connect .*ETIMEDOUT.*next=retry")
    # Failed and timed-out attempts give their server back.
    for pool in ("two", "three"):
        wait_servers_idle(d, pool, refused + [good.address])
    wait_servers_idle(d, "slow", [hole.address, good.address])


def test_a_pool_whose_servers_are_all_down_still_tries_them(t):
    be = t.backend(PoolBackend(tag=tag_of("only")))
    port = be.port
    d = start(t, t.listener("app"),
              {"app": {"servers": [be.address], "max_fails": 1, "fail_timeout": "60s"}})
    check(tag_through(d.addr())[0] == tag_of("only").decode(), "before")
    be.close()
    expect_clean_refusal(t, d.addr())
    d.wait_log(rf"backend-down backend=app server=127\.0\.0\.1:{port} ")
    # Down for a minute, but the only server: it is tried anyway, and it is back.
    again = t.backend(PoolBackend(tag=tag_of("again"), port=port))
    check(tag_through(d.addr())[0] == tag_of("again").decode(), "a down server that is the only one was not tried")
    d.wait_log(rf"backend-up backend=app server=127\.0\.0\.1:{port}")
    check(again.accepted == 1, f"{again.accepted}")


def test_tls_backend_that_never_answers_times_out_and_fails_over(t):
    silent = t.backend(SilentBackend())
    good = t.backend(PoolBackend(tls=server_ctx(), tag=tag_of("good")))
    d = start(t, t.listener("app"), {"app": {
        "servers": [silent.address, good.address], "balance": "first", "max_fails": 0,
        "connect_timeout": "1s", "tls": {"ca": cert_path("ca.crt"), "server_name": "localhost"}}})
    start_at = time.monotonic()
    check(tag_through(d.addr(), payload=b"late")[0] == tag_of("good").decode(), "after a silent TLS server")
    secs = time.monotonic() - start_at
    check(0.8 <= secs <= 1 + TIMING_MARGIN, f"failover after {secs:.2f}s, connect_timeout 1s")
    check(silent.accepted == 1, "the silent server was not tried")
    d.wait_log(rf"backend-failed listener=web .*server={re.escape(silent.address)} .*next=retry")


# ---------------------------------------------------------------------------------------------
# TLS to the backends.


@timeout(120)
def test_reencrypt_with_client_certificate(t):
    fcs = feature_certs()
    ctx = server_ctx(client_ca=fcs / "client-ca.crt", alpn=["x-sluice-test"])
    be = t.backend(PoolBackend(proxy=True, tls=ctx))
    d = start(t, t.listener("secure"), {"secure": {
        "servers": [be.address],
        "proxy_protocol": "v2",
        "tls": {"ca": cert_path("ca.crt"), "server_name": "localhost", "alpn": ["x-sluice-test"],
                "cert": str(fcs / "client-good.crt"), "key": str(fcs / "client-good.key")},
    }})
    size = scaled(8 * MiB, 2 * MiB) + 5
    c = t.client(d.addr(), keep=False, timeout=60).handshake()
    echo_exact(c, size, timeout=90)
    finish_clean(c)
    conn = be.wait_done(timeout=30)
    check(conn.error is None, f"the TLS backend failed: {conn.error!r}")
    check(conn.header is not None, "no PROXY header before the TLS ClientHello")
    check_header_addresses(conn.header, 2, c.local, d.addr())
    check(conn.tls_version in ("TLSv1.2", "TLSv1.3"), f"backend TLS version {conn.tls_version}")
    cn = dict(x[0] for x in conn.peer_cert.get("subject", ())).get("commonName") if conn.peer_cert else None
    check(cn == "good-client", f"the backend saw client certificate CN {cn!r}")
    check(be.snis == ["localhost"], f"SNI sent to the backend: {be.snis}")
    check(conn.alpn == "x-sluice-test", f"ALPN to the backend {conn.alpn!r}")
    check(conn.received == size and conn.sha256 == pattern_sha256(size),
          f"the backend got {conn.received} of {size} bytes (or others)")
    check(conn.tls_close == "close_notify", f"the client's close reached the backend as {conn.tls_close}")


def expect_clean_refusal(t, addr):
    """The client's handshake succeeds, the backend is refused: a clean close, no data."""
    c = t.client(addr, timeout=10).handshake()
    c.send(b"hello?")
    c.recv_until_closed(timeout=10)
    check(c.nrecv == 0, f"got {c.nrecv} bytes from a refused backend")
    check(c.close_notify and not c.truncated and not c.reset, f"not a clean close: {c.ending()}")


def test_reencrypt_refuses_a_backend_from_the_wrong_ca(t):
    be = t.backend(PoolBackend(tls=server_ctx()))
    d = start(t, t.listener("bad"), {"bad": {
        "servers": [be.address], "tls": {"ca": cert_path("other-ca.crt"), "server_name": "localhost"}}})
    expect_clean_refusal(t, d.addr())
    d.wait_log(rf"backend-failed listener=web .*server={re.escape(be.address)} during=tls ")
    conn = be.wait_done()
    check(conn.tls_version is None and conn.received == 0, "the backend's handshake completed")


def test_reencrypt_refuses_a_wrong_name_and_fails_over(t):
    # Every server reads a PROXY header first: a failover must send the new server a header of
    # its own, before its ClientHello.
    wrong = t.backend(PoolBackend(tls=server_ctx("wrong-name"), tag=tag_of("wrong"), proxy=True))
    good = t.backend(PoolBackend(tls=server_ctx(), tag=tag_of("good"), proxy=True))
    tls = {"ca": cert_path("ca.crt"), "server_name": "localhost"}
    d = start(
        t,
        [t.listener("wrong", name="wrong"), t.listener("mixed", name="mixed"),
         t.listener("noverify", name="noverify")],
        {
            "wrong": {"servers": [wrong.address], "tls": tls, "proxy_protocol": "v2"},
            "mixed": {"servers": [wrong.address, good.address], "balance": "first", "tls": tls,
                      "proxy_protocol": "v2", "max_fails": 0},
            "noverify": {"servers": [wrong.address], "tls": {"verify": False}, "proxy_protocol": "v1"},
        },
    )
    expect_clean_refusal(t, d.addr("wrong"))
    d.wait_log(rf"backend-failed listener=wrong .*server={re.escape(wrong.address)} during=tls ")
    first = wrong.wait_done(0)
    check(first.tls_version is None and first.received == 0, "the refused handshake completed on the backend")
    # A TLS failure moves on to the next server before any client byte was sent.
    for i in range(3):
        c = t.client(d.addr("mixed")).handshake()
        payload = b"after a failover %d" % i
        c.sendall(payload)
        got = c.recv_exact(TAG_LEN + len(payload))
        check(got == tag_of("good") + payload, f"mixed pool: {got!r}")
        finish_clean(c)
        check(wrong.wait_done(1 + i).tls_version is None, "the wrong-name server's handshake completed")
        conn = good.wait_done(i)
        check(conn.header_error is None, f"after a failover the next server's header: {conn.header_error}")
        check_header_addresses(conn.header, 2, c.local, d.addr("mixed"))
        check(conn.received == len(payload), f"the good server got {conn.received} bytes")
    d.wait_log(rf"backend-failed listener=mixed .*server={re.escape(wrong.address)} during=tls .*next=retry")
    # The same server is fine when verification is off: the refusal was the name check.
    tag, _ = tag_through(d.addr("noverify"), payload=b"unverified")
    check(tag == tag_of("wrong").decode(), f"verify = false: reached {tag}")


def test_backend_tls_name_defaults_versions_and_unix_sockets(t):
    # server_name defaults to the host written in servers, when it is a name.
    named = t.backend(PoolBackend(tls=server_ctx(), tag=tag_of("named"), host=localhost_address()))
    # A TLS server on a UNIX socket, with server_name set.
    unix = t.backend(PoolBackend(tls=server_ctx(), tag=tag_of("unix"), unix_path=t.tmp / "tls.sock"))
    old = t.backend(PoolBackend(tls=server_ctx(), tag=tag_of("tls12")))
    ca = cert_path("ca.crt")
    d = start(
        t,
        [t.listener("named", name="named"), plain_listener("unix", name="unix"),
         t.listener("tls12", name="tls12")],
        {
            "named": {"servers": f"localhost:{named.port}", "tls": {"ca": ca}},
            "unix": {"servers": unix.address, "tls": {"ca": ca, "server_name": "localhost"}},
            "tls12": {"servers": old.address, "tls": {"ca": ca, "server_name": "localhost", "max_version": "1.2"}},
        },
    )
    check(tag_through(d.addr("named"), payload=b"n")[0] == tag_of("named").decode(), "named")
    check(named.snis == ["localhost"] and named.wait_done().tls_version, f"SNI from the host name: {named.snis}")
    s = raw_connect(d.addr("unix"))
    try:
        s.sendall(b"over TLS on a unix socket")
        s.shutdown(socket.SHUT_WR)
        got = b""
        while True:
            part = s.recv(65536)
            if not part:
                break
            got += part
    finally:
        s.close()
    check(got == tag_of("unix") + b"over TLS on a unix socket", f"unix TLS backend: {got!r}")
    check(unix.snis == ["localhost"] and unix.wait_done().tls_version, f"unix: {unix.snis}")
    check(tag_through(d.addr("tls12"))[0] == tag_of("tls12").decode(), "tls12")
    check(old.wait_done().tls_version == "TLSv1.2", f"max_version 1.2 gave {old.conn(0).tls_version}")


def plain_exchange(addr, size, timeout=60):
    """A plaintext client: sends `size` pattern bytes from a thread, then shuts its write side;
    reads until EOF meanwhile. Returns (bytes received, sha256 hex, how it ended)."""
    s = raw_connect(addr, timeout=timeout)
    errors = []

    def sender():
        try:
            for chunk in pattern_chunks(size):
                s.sendall(chunk)
            s.shutdown(socket.SHUT_WR)
        except OSError as e:
            errors.append(e)

    th = threading.Thread(target=sender, daemon=True)
    th.start()
    h = hashlib.sha256()
    n = 0
    end = "eof"
    try:
        while True:
            try:
                d = s.recv(256 * 1024)
            except ConnectionResetError:
                end = "reset"
                break
            if not d:
                break
            n += len(d)
            h.update(d)
    finally:
        th.join(timeout)
        s.close()
    check(not errors, f"sending failed: {errors}")
    return n, h.hexdigest(), end


@timeout(90)
def test_client_mode_plaintext_in_tls_out(t):
    be = t.backend(PoolBackend(tls=server_ctx()))
    d = start(t, plain_listener("tlsapp"), {"tlsapp": {
        "servers": [be.address], "tls": {"ca": cert_path("ca.crt"), "server_name": "localhost"}}})
    size = scaled(4 * MiB, 1 * MiB) + 3
    n, sha, end = plain_exchange(d.addr(), size)
    check(end == "eof", f"the plaintext client's connection ended with a {end}")
    check(n == size and sha == pattern_sha256(size),
          f"after its half-close the client got {n} of {size} echoed bytes (or others)")
    conn = be.wait_done(timeout=30)
    check(conn.error is None, f"the TLS backend failed: {conn.error!r}")
    check(conn.tls_version in ("TLSv1.2", "TLSv1.3"), f"the backend did not speak TLS: {conn.tls_version}")
    check(be.snis == ["localhost"], f"SNI {be.snis}")
    check(conn.received == size and conn.sha256 == pattern_sha256(size), "bytes at the TLS backend")
    check(conn.tls_close == "close_notify", f"the client's FIN reached the TLS backend as {conn.tls_close}")


def test_plaintext_listener_behind_a_balancer_sends_addresses_only(t):
    be = t.backend(PoolBackend(proxy=True, tls=server_ctx()))
    d = start(t, plain_listener("tlsapp", accept_proxy_from=["127.0.0.0/8"]), {"tlsapp": {
        "servers": [be.address], "proxy_protocol": "v2",
        "tls": {"ca": cert_path("ca.crt"), "server_name": "localhost"}}})
    s = raw_connect(d.addr())
    try:
        s.sendall(proxyproto.v2(LB_SRC, LB_DST) + b"plain bytes in")
        got = b""
        while len(got) < 14:
            part = s.recv(100)
            check(part, f"closed after {got!r}")
            got += part
        check(got == b"plain bytes in", f"echo {got!r}")
        s.shutdown(socket.SHUT_WR)
        check(s.recv(100) == b"", "no FIN after the echo")
    finally:
        s.close()
    conn = be.wait_done()
    check(conn.error is None and conn.tls_version, f"the TLS backend: {conn.error!r}")
    check_header_addresses(conn.header, 2, LB_SRC, LB_DST)
    check(conn.header["tlvs"] == [] or set(k for k, _ in conn.header["tlvs"]) <= {proxyproto.PP2_TYPE_NOOP,
                                                                                  proxyproto.PP2_TYPE_CRC32C},
          f"a plaintext listener sent TLVs: {conn.header['tlvs']}")


# ---------------------------------------------------------------------------------------------
# UNIX sockets and names.


def test_unix_tcp_and_ipv6_servers_in_one_pool_and_a_named_server(t):
    servers = [
        t.backend(PoolBackend(tag=tag_of("unix"), proxy=True, unix_path=t.tmp / "be.sock")),
        t.backend(PoolBackend(tag=tag_of("tcp"), proxy=True)),
    ]
    if have_ipv6_loopback():
        servers.append(t.backend(PoolBackend(tag=tag_of("tcp6"), proxy=True, host="::1")))
    nb = t.backend(PoolBackend(tag=tag_of("named"), host=localhost_address()))
    d = start(
        t,
        [t.listener("mixed", name="mixed"), t.listener("named", name="named")],
        {"mixed": {"servers": [b.address for b in servers], "proxy_protocol": "v2"},
         "named": {"servers": f"localhost:{nb.port}"}},
    )
    by_tag = {b.tag.decode(): b for b in servers}
    seq = []
    for i in range(2 * len(servers)):
        c = t.client(d.addr("mixed")).handshake()
        payload = b"over a unix socket, tcp or tcp6 %d" % i
        c.sendall(payload)
        got = c.recv_exact(TAG_LEN + len(payload))
        check(got[TAG_LEN:] == payload, f"echo {got!r}")
        finish_clean(c)
        tag = got[:TAG_LEN].decode()
        seq.append(tag)
        owner = by_tag[tag]
        check_header_addresses(owner.wait_done(owner.accepted - 1).header, 2, c.local, d.addr("mixed"))
    check(sorted(seq) == sorted(list(by_tag) * 2), f"round-robin over {list(by_tag)}: {seq}")
    for _ in range(2):
        tag, _ = tag_through(d.addr("named"), payload=b"by name")
        check(tag == tag_of("named").decode(), f"localhost:{nb.port} reached {tag}")
    check(nb.accepted == 2, f"the named server got {nb.accepted} connections")


# ---------------------------------------------------------------------------------------------
# How a TLS backend's end reaches the client.


def test_tls_backend_end_reaches_the_client(t):
    reply = b"a reply before the backend ends" * 100
    clean = t.backend(PoolBackend(tls=server_ctx(), tag=reply, first=True, end="close"))
    trunc = t.backend(PoolBackend(tls=server_ctx(), tag=reply, first=True, end="fin"))
    tls = {"ca": cert_path("ca.crt"), "server_name": "localhost"}
    d = start(
        t,
        [t.listener("clean", name="clean"), t.listener("trunc", name="trunc"),
         plain_listener("clean", name="plain-clean"), plain_listener("trunc", name="plain-trunc")],
        {"clean": {"servers": [clean.address], "tls": tls}, "trunc": {"servers": [trunc.address], "tls": tls}},
    )
    # TLS client, backend ends without close_notify: truncation, passed on as a bare FIN.
    c = t.client(d.addr("trunc")).handshake()
    c.recv_until_closed(timeout=10)
    check(bytes(c.data) == reply, f"the reply before the truncation: {c.ending()}")
    check(c.truncated and not c.close_notify, f"a truncated backend reached the client as: {c.ending()}")
    # TLS client, backend sends close_notify: the client sees close_notify, and its own
    # close_notify then reaches the backend.
    c = t.client(d.addr("clean")).handshake()
    c.run_until(lambda: c.close_notify or c.finished, timeout=10, what="close_notify")
    check(bytes(c.data) == reply and c.close_notify and not c.truncated, f"clean end: {c.ending()}")
    finish_clean(c)
    conn = clean.wait_done()
    check(conn.error is None, f"the clean backend's unwrap failed: {conn.error!r}")
    # Plaintext clients: a clean close is a FIN, a truncation is a reset.
    for listener, backend, expect in (("plain-clean", clean, "eof"), ("plain-trunc", trunc, "reset")):
        s = raw_connect(d.addr(listener), timeout=10)
        got = b""
        end = "eof"
        try:
            while True:
                try:
                    part = s.recv(65536)
                except ConnectionResetError:
                    end = "reset"
                    break
                if not part:
                    break
                got += part
                if expect == "eof" and got == reply:
                    s.shutdown(socket.SHUT_WR)  # lets the clean backend's unwrap() finish
        finally:
            s.close()
        check(end == expect, f"{listener}: the plaintext client saw {end}, expected {expect}")
        check(reply.startswith(got) and (expect == "reset" or got == reply),
              f"{listener}: got {len(got)} bytes of the {len(reply)}-byte reply")


def test_tls_backend_half_close_both_ways(t):
    tls = {"ca": cert_path("ca.crt"), "server_name": "localhost"}
    greeting = pattern_bytes(300_000, offset=5)
    reply = pattern_bytes(200_000, offset=77)
    first = t.backend(TlsHalfCloseFirstBackend(server_ctx(), greeting))
    late = t.backend(PoolBackend(tls=server_ctx(), echo=False, after=reply))
    d = start(
        t,
        [t.listener("first", name="first"), t.listener("late", name="late"),
         plain_listener("first", name="plain-first"), plain_listener("late", name="plain-late")],
        {"first": {"servers": [first.address], "tls": tls}, "late": {"servers": [late.address], "tls": tls}},
    )
    size = 200_000
    # The backend half-closes first (close_notify, TCP still open): the client gets the greeting
    # and close_notify, and what it sends afterwards still reaches the backend, ended by the
    # client's close as close_notify.
    c = t.client(d.addr("first")).handshake()
    c.run_until(lambda: c.close_notify or c.finished, timeout=10, what="close_notify after the greeting")
    check(bytes(c.data) == greeting and c.close_notify, f"greeting, then close_notify: {c.ending()}")
    c.send(pattern_chunks(size)).close_write_tls()
    conn = first.wait_done(0, timeout=15)
    check(conn.error is None, f"backend: {conn.error!r}")
    check(conn.received == size and conn.sha256 == pattern_sha256(size),
          f"after its close_notify the backend got {conn.received} of {size} bytes from a TLS client")
    check(conn.tls_close == "close_notify", f"the client's close reached the backend as {conn.tls_close}")
    # The same from a plaintext client: greeting then FIN; its bytes and FIN still go through.
    s = raw_connect(d.addr("plain-first"))
    try:
        got = b""
        while True:
            part = s.recv(65536)
            if not part:
                break
            got += part
        check(got == greeting, f"plaintext client: {len(got)} bytes of the greeting before the FIN")
        for chunk in pattern_chunks(size):
            s.sendall(chunk)
        s.shutdown(socket.SHUT_WR)
        conn = first.wait_done(1, timeout=15)
    finally:
        s.close()
    check(conn.received == size and conn.sha256 == pattern_sha256(size),
          f"after its close_notify the backend got {conn.received} of {size} bytes from a plaintext client")
    check(conn.tls_close == "close_notify", f"the plaintext client's FIN reached the backend as {conn.tls_close}")
    # The client half-closes first: the backend's reply, sent after it got close_notify, still
    # arrives whole, then close_notify (TLS client) or FIN (plaintext client).
    c = t.client(d.addr("late")).handshake()
    c.send(pattern_chunks(size)).close_write_tls()
    c.recv_until_closed(timeout=15)
    check(bytes(c.data) == reply and c.close_notify, f"the reply after a half-close: {c.ending()}")
    conn = late.wait_done(0)
    check(conn.received == size and conn.sha256 == pattern_sha256(size) and conn.tls_close == "close_notify",
          f"backend got {conn.received} bytes, then {conn.tls_close}")
    n, sha, end = plain_exchange(d.addr("plain-late"), size)
    check(end == "eof" and n == len(reply) and sha == hashlib.sha256(reply).hexdigest(),
          f"plaintext client: {n} of {len(reply)} reply bytes after its half-close, then {end}")
    conn = late.wait_done(1)
    check(conn.received == size and conn.tls_close == "close_notify", f"backend: {conn.received}, {conn.tls_close}")


def sockets_of(pid):
    """Duplicates of every TCP socket the process holds (pidfd_getfd; needs ptrace rights over
    it, which the test has as its parent or as root), as socket objects the caller closes."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    out = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                    continue
            except OSError:
                continue
            dup = libc.syscall(438, pidfd, int(fd), 0)  # SYS_pidfd_getfd on x86-64 and arm64
            if dup < 0:
                raise OSError(ctypes.get_errno(), "pidfd_getfd")
            s = socket.socket(fileno=dup)
            if s.family in (socket.AF_INET, socket.AF_INET6) and s.type == socket.SOCK_STREAM:
                out.append(s)
            else:
                s.close()
    finally:
        os.close(pidfd)
    return out


def test_socket_options_applied_to_both_sides(t):
    # The options are read back from sluice's own sockets: the accepted client socket, the
    # backend socket and the listening socket, with the defaults and with explicit values.
    echo = t.backend(EchoBackend())
    echo_port = int(echo.address.rsplit(":", 1)[1])
    listener = t.listener("app", backlog=77,
                          socket={"no_delay": True, "keep_alive": "17s", "send_buffer": "256KiB",
                                  "receive_buffer": "128KiB"})
    d = start(t, listener, {"app": {"servers": [echo.address],
                                   "socket": {"no_delay": False, "keep_alive": "0s", "send_buffer": "64KiB"}}})
    defaults = start(t, t.listener(echo))

    def check_sockets(daemon, client_want, backend_want, backlog=None):
        addr = daemon.addr()
        c = t.client(addr).handshake()
        c.sendall(b"ping")
        check(c.recv_exact(4) == b"ping", "no echo")
        client_port = c.sock.getsockname()[1]
        seen = {"client": False, "backend": False, "listen": False}
        for s in sockets_of(daemon.pid):
            with s:
                local, peer = s.getsockname(), None
                try:
                    peer = s.getpeername()
                except OSError:
                    pass
                if peer is None:
                    if local[1] == addr[1]:
                        seen["listen"] = True
                        check(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1, "no SO_REUSEPORT")
                    continue
                want = client_want if peer[1] == client_port else backend_want if peer[1] == echo_port else None
                if want is None:
                    continue
                side = "client" if want is client_want else "backend"
                seen[side] = True
                got = {
                    "no_delay": s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0,
                    "keep_alive": s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0,
                }
                if got["keep_alive"]:
                    got["idle"] = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)
                # Linux doubles the size it is given, for its bookkeeping.
                got["sndbuf"] = s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
                got["rcvbuf"] = s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
                for key, value in want.items():
                    check(got.get(key) == value, f"{side} socket: {key} is {got.get(key)}, expected {value} ({got})")
        check(all(seen.values()), f"sockets not found: {seen}")
        if backlog is not None:
            out = subprocess.run(["ss", "-ltnH", f"sport = :{addr[1]}"], capture_output=True, text=True).stdout
            check(out.split()[2] == str(backlog), f"listen backlog: {out!r}")
        c.close()

    check_sockets(d, {"no_delay": True, "keep_alive": True, "idle": 17, "sndbuf": 2 * 256 * 1024,
                      "rcvbuf": 2 * 128 * 1024},
                  {"no_delay": False, "keep_alive": False, "sndbuf": 2 * 64 * 1024}, backlog=77)
    check_sockets(defaults, {"no_delay": True, "keep_alive": True, "idle": 60},
                  {"no_delay": True, "keep_alive": True, "idle": 60}, backlog=511)

    # The listener's options live on its listening socket, which accepted sockets inherit and a
    # reload keeps: a reload that changes them reaches the next accepted socket.
    text = d.config_path.read_text()
    check(text.count('"17s"') == 1, "the listener's keep_alive is not in the configuration")
    d.config_path.write_text(text.replace('"17s"', '"23s"'))
    d.signal(signal.SIGHUP)
    d.wait_log(r"reload-done", 10)
    # reload-done is logged once every worker has switched: each listening socket (one a
    # worker) already has the new value, so no connection made after it gets the old one.
    for _ in range(6):
        check_sockets(d, {"no_delay": True, "keep_alive": True, "idle": 23, "sndbuf": 2 * 256 * 1024,
                          "rcvbuf": 2 * 128 * 1024},
                      {"no_delay": False, "keep_alive": False, "sndbuf": 2 * 64 * 1024})


# ---------------------------------------------------------------------------------------------
# connect_after: the backend connect starts with the accepted ClientHello, or after the handshake.


def test_connect_after_hello_overlaps_the_handshake(t):
    greeting = b"220 ready\r\n"
    early = t.backend(PoolBackend(tag=greeting))
    late = t.backend(PoolBackend(tag=greeting))
    framed = t.backend(PoolBackend(proxy=True))
    d = start(t, [t.listener("early", name="early"), t.listener("late", name="late"),
                  t.listener("framed", name="framed")],
              {"early": {"servers": [early.address], "connect_after": "hello"},
               "late": {"servers": [late.address]},
               "framed": {"servers": [framed.address], "connect_after": "hello",
                          "proxy_protocol": "v2"}})
    sig_key = cert_algorithms(cert_path("server-ecdsa.crt"))
    payload = pattern_bytes(200_000)
    for name, be in (("early", early), ("late", late), ("framed", framed)):
        c = t.client(d.addr(name)).send_hello()
        if name == "late":
            # The default: no backend connection while the handshake is not done.
            time.sleep(0.3)
            check(be.accepted == 0, "the backend was connected before the handshake was done")
        else:
            wait_until(lambda: be.accepted == 1, 5, f"{name}: the connect that starts at the hello")
        c.handshake()
        wait_until(lambda: be.accepted == 1, 5, f"{name}: the backend connection")
        c.sendall(payload)
        want = (b"" if name == "framed" else greeting) + payload
        got = c.recv_exact(len(want))
        # A greeting sent while the client's handshake went on arrives first, then the echo.
        check(got == want, f"{name}: {len(got)} bytes back, not the greeting and the echo in order")
        finish_clean(c)
        conn = be.wait_done()
        check(conn.received == len(payload) and conn.error is None,
              f"{name}: the backend got {conn.received} of {len(payload)} bytes ({conn.error})")
    # The PROXY header still comes first, with the facts of the handshake that finished later.
    h = framed.conn().header
    check(framed.conn().header_error is None, f"bad header: {framed.conn().header_error}")
    check_tls_tlvs(h, c, "localhost", None, sig_key)


class QuietFirstBackend(Backend):
    """Ends its first connection a moment after accepting it, without a byte (a FIN, or with
    `reset` an RST), as a server with a short idle timeout does; echoes on every later one."""

    def __init__(self, reset, *a, **kw):
        self.reset = reset
        super().__init__(*a, **kw)

    def handle(self, c):
        if c.index == 0:
            time.sleep(0.3)  # long enough for sluice to have seen the connect complete
            if self.reset:
                c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, (1).to_bytes(4, "little") + bytes(4))
            return
        while d := c.sock.recv(65536):
            c.received += len(d)
            self.send_all(c, d)
        c.sock.shutdown(socket.SHUT_WR)


def holds_connection_to(pid, port):
    """The process has a TCP socket connected to this port."""
    found = False
    for s in sockets_of(pid):
        with s:
            try:
                found = found or s.getpeername()[1] == port
            except OSError:
                pass
    return found


def test_connect_after_hello_when_the_handshake_or_the_backend_fails(t):
    greeting = b"220 ready\r\n"
    be = t.backend(PoolBackend(tag=greeting))
    hole = t.backend(BlackholeBackend())
    long_handshake = {"handshake": "30s"}
    quiet = {"fin": t.backend(QuietFirstBackend(False)), "reset": t.backend(QuietFirstBackend(True))}
    stalled = t.backend(PoolBackend())
    d = start(t, [t.listener("app", name="app"),
                  t.listener("stall", name="stall", timeouts={"handshake": "1s"}),
                  t.listener("hole", name="hole", timeouts=long_handshake),
                  t.listener("refused", name="refused", timeouts=long_handshake),
                  t.listener("fin", name="fin", timeouts=long_handshake),
                  t.listener("reset", name="reset", timeouts=long_handshake)],
              {"app": {"servers": [be.address], "connect_after": "hello"},
               "stall": {"servers": [stalled.address], "connect_after": "hello"},
               "hole": {"servers": [hole.address], "connect_after": "hello", "connect_timeout": "1s",
                        "attempts": 1},
               "refused": {"servers": [refused_address()], "connect_after": "hello"},
               "fin": {"servers": [quiet["fin"].address], "connect_after": "hello"},
               "reset": {"servers": [quiet["reset"].address], "connect_after": "hello"}},
              admin=True)
    unused = "sluice_backend_unused_total"
    check(metrics(d.admin).get(unused) == 0, f"{unused} before any connection")

    # A client that refuses sluice's certificate: the backend connection made at its hello
    # closes without one byte, and the greeting goes nowhere.
    c = t.client(d.addr("app"), server_hostname="wrong.example")
    try:
        c.handshake()
        check(False, "a client that checks for another name completed the handshake")
    except HandshakeFailed:
        pass
    conn = be.wait_done(0)
    wait_until(lambda: metrics(d.admin).get(unused) == 1, 5, f"{unused} to count it")
    # A FIN, or a reset when the close found the greeting still unread: closed either way.
    check(conn.received == 0 and (conn.eof or conn.reset),
          f"the backend got {conn.received} bytes (eof {conn.eof}, reset {conn.reset}, {conn.error})")
    check(c.nrecv == 0, f"the client got {c.nrecv} plaintext bytes")

    # A connect that hangs times out during the handshake (connect_timeout, not the handshake's
    # 30s); the client still completes its handshake, then gets a clean close and no byte.
    # TLS 1.2: its client sends Finished before the server does, so its handshake completes
    # only if sluice finishes it (a TLS 1.3 client would not notice a server gone by then).
    tls12 = client_context(max_version=ssl.TLSVersion.TLSv1_2)
    for name in ("hole", "refused"):
        start_at = time.monotonic()
        c = t.client(d.addr(name), ctx=tls12).send_hello()
        if name == "hole":
            d.wait_log(r"timeout listener=hole .*phase=connect", timeout=5)
            secs = time.monotonic() - start_at
            check(secs <= 1 + TIMING_MARGIN, f"the connect timed out after {secs:.2f}s, limit 1s")
        d.wait_log(rf"backend-failed listener={name} ", timeout=5)
        c.handshake()
        c.recv_until_closed(timeout=5)
        check(c.close_notify and c.nrecv == 0, f"{name}: {c.ending()}")

    # A server that ends the connection made at the hello (FIN or reset) before the handshake is
    # done, without a byte: sluice connects again once it is, and the client notices nothing.
    for name, be_quiet in quiet.items():
        c = t.client(d.addr(name), ctx=tls12, keep=True).send_hello()
        port = int(be_quiet.address.rsplit(":", 1)[1])
        be_quiet.wait_done(0)
        wait_until(lambda: not holds_connection_to(d.pid, port), 5, f"{name}: sluice to drop it")
        c.handshake()
        c.sendall(b"after an early end")
        check(c.recv_exact(18) == b"after an early end", f"{name}: {c.ending()}")
        finish_clean(c)
        check(be_quiet.accepted == 2, f"{name}: {be_quiet.accepted} backend connections, not 2")
        check(be_quiet.wait_done(1).received == 18, f"{name}: the second connection's bytes")
    # A client that stalls after its hello: the server connection lasts as long as the handshake
    # may (1 s here), then closes without a byte.
    c = t.client(d.addr("stall")).send_hello()
    wait_until(lambda: stalled.accepted == 1, 5, "the connect at the hello")
    conn = stalled.wait_done(0, timeout=5)
    secs = conn.closed_at - conn.accepted_at
    check(0.5 <= secs <= 1 + TIMING_MARGIN and conn.received == 0,
          f"the stalled handshake's server connection closed after {secs:.2f}s with {conn.received} bytes")

    # The certificate refusal, the stall and the two early ends; connects that never succeeded are
    # not counted.
    check(metrics(d.admin).get(unused) == 4, f"{unused} = {metrics(d.admin).get(unused)}, not 4")

    # Everyone else is served, byte for byte.
    c = t.client(d.addr("app"), keep=True).handshake()
    c.sendall(b"still serving")
    check(c.recv_exact(len(greeting) + 13) == greeting + b"still serving", "no greeting and echo")
    finish_clean(c)
    d.assert_alive()
