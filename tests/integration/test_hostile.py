"""Clients that are not TLS clients, or stop halfway: sluice closes them, reaps the silent ones
with the handshake timeout, logs the peer, keeps serving real clients, and gives back every
file descriptor (LESSONS #11, #13)."""

import os
import re
import socket
import ssl
import time

from backends import EchoBackend, SourceBackend, refused_address
from harness import (
    alone,
    settle_fds,
    TIMING_MARGIN,
    MiB,
    TlsClient,
    check,
    client_context,
    raw_connect,
    tls_roundtrip,
    wait_peer_close,
    wait_until,
)

# The handshake timeout these tests configure, and the one that proves a prompt close was not
# the timeout's doing.
SHORT = 1.0
LONG = "30s"


def client_hello():
    """The bytes of a real TLS ClientHello from Python's ssl."""
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = client_context().wrap_bio(inc, out, server_hostname="localhost")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = out.read()
    check(len(hello) > 100 and hello[0] == 0x16, "could not make a ClientHello")
    return hello


def hostile_then_real(t, data, what, fin=False):
    """Sends `data` on the TLS port; sluice must close the connection promptly (well before
    the handshake timeout), log the peer, and serve a real client afterwards."""
    echo = t.backend(EchoBackend())
    d = t.sluice(t.listener(echo, timeouts={"handshake": LONG}))
    s = raw_connect(d.addr())
    t.defer(s.close)
    port = s.getsockname()[1]
    try:
        s.sendall(data)
        if fin:
            s.shutdown(socket.SHUT_WR)
    except (BrokenPipeError, ConnectionResetError):
        pass  # already closed by sluice: fine
    secs = wait_peer_close(s, 5)
    check(secs < 5, f"{what}: still open after {secs:.1f}s")
    d.wait_log(rf"\bpeer=127\.0\.0\.1:{port}\b", timeout=5)
    check(echo.accepted == 0 or echo.conns[0].received == 0, f"{what}: bytes reached the backend")
    tls_roundtrip(d.addr(), b"a real client after " + what.encode())
    d.assert_alive()
    return d


def test_plaintext_http_on_tls_port(t):
    hostile_then_real(t, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", "plaintext HTTP")


def test_garbage_on_tls_port(t):
    hostile_then_real(t, b"\xff\x00" + os.urandom(4094), "garbage")


def test_oversized_record_header(t):
    # A handshake record header announcing 65535 bytes: more than TLS allows.
    hostile_then_real(t, b"\x16\x03\x01\xff\xff" + os.urandom(2000), "an oversized record")


def test_truncated_client_hello_then_fin(t):
    hello = client_hello()
    hostile_then_real(t, hello[: len(hello) // 2], "a truncated ClientHello and FIN", fin=True)


def test_corrupted_client_hello(t):
    hello = bytearray(client_hello())
    for i in range(9, len(hello), 7):
        hello[i] ^= 0x5A
    hostile_then_real(t, bytes(hello), "a corrupted ClientHello")


def test_truncated_client_hello_reaped_by_handshake_timeout(t):
    echo = t.backend(EchoBackend())
    d = t.sluice(t.listener(echo, timeouts={"handshake": "1s"}))
    hello = client_hello()
    s = raw_connect(d.addr())
    t.defer(s.close)
    start = time.monotonic()
    s.sendall(hello[: len(hello) // 2])
    secs = wait_peer_close(s, SHORT + TIMING_MARGIN + 2)
    check(SHORT * 0.8 <= secs <= SHORT + TIMING_MARGIN, f"closed after {secs:.2f}s, timeout {SHORT}s")
    tls_roundtrip(d.addr(), b"after the truncated hello")
    check(time.monotonic() - start < 30, "took too long")


def test_slowloris_handshake_reaped(t):
    # One byte of ClientHello every 0.2 s: the handshake timeout runs from accept, so
    # trickling bytes does not keep the connection alive.
    echo = t.backend(EchoBackend())
    d = t.sluice(t.listener(echo, timeouts={"handshake": "1s", "idle": "30s"}))
    hello = client_hello()
    s = raw_connect(d.addr())
    t.defer(s.close)
    start = time.monotonic()
    closed_at = None
    for b in hello:
        try:
            s.sendall(bytes([b]))
        except (BrokenPipeError, ConnectionResetError):
            closed_at = time.monotonic() - start
            break
        s.settimeout(0.2)  # the trickle's pace; a close shows up as EOF here
        try:
            if s.recv(65536) == b"":
                closed_at = time.monotonic() - start
                break
        except socket.timeout:
            pass
        except ConnectionResetError:
            closed_at = time.monotonic() - start
            break
        if time.monotonic() - start > SHORT + TIMING_MARGIN + 1:
            break
    check(closed_at is not None, f"a trickling handshake stayed open for {time.monotonic() - start:.1f}s")
    check(SHORT * 0.8 <= closed_at <= SHORT + TIMING_MARGIN, f"closed after {closed_at:.2f}s")
    tls_roundtrip(d.addr(), b"after the slowloris")


def test_silent_clients_reaped(t):
    echo = t.backend(EchoBackend())
    d = t.sluice(t.listener(echo, timeouts={"handshake": "1s"}))
    tls_roundtrip(d.addr(), b"warm up")
    baseline = settle_fds(d)
    n = 50
    start = time.monotonic()
    silent = [raw_connect(d.addr(), timeout=10) for _ in range(n)]
    for s in silent:
        t.defer(s.close)
    opened = time.monotonic()
    # While they sit there, a real client is served at once.
    tls_roundtrip(d.addr(), b"not blocked by silent clients")
    check(time.monotonic() - opened < SHORT, "a real client waited behind silent ones")
    for i, s in enumerate(silent):
        left = SHORT + TIMING_MARGIN - (time.monotonic() - start)
        wait_peer_close(s, max(0.1, left))
    secs = time.monotonic() - opened
    check(secs >= SHORT * 0.8, f"silent clients were closed after {secs:.2f}s, before the timeout")
    for s in silent:
        s.close()
    wait_fds(d, baseline, "after the silent clients were reaped")




def wait_fds(d, baseline, when):
    try:
        wait_until(lambda: d.fd_count() <= baseline, 10, f"sluice's fd count to return to {baseline}")
    except AssertionError:
        raise AssertionError(f"{when}: sluice has {d.fd_count()} fds open, {baseline} before:\n"
                             + "\n".join(f"  {k} -> {v}" for k, v in sorted(d.fds().items())))


@alone
def test_fd_count_back_to_baseline_after_churn(t):
    echo = t.backend(EchoBackend())
    src = t.backend(SourceBackend(16 * MiB))
    d = t.sluice(
        [
            t.listener(echo, name="echo", timeouts={"handshake": "2s"}),
            t.listener(src, name="src"),
            t.listener(refused_address(), name="refused"),
        ]
    )
    tls_roundtrip(d.addr("echo"), b"warm up")
    baseline = settle_fds(d)
    for round_ in range(3):
        for i in range(40):
            tls_roundtrip(d.addr("echo"), os.urandom(100 + i))
        for i in range(20):  # TCP FIN without close_notify, then gone
            c = TlsClient(d.addr("echo")).handshake()
            c.sendall(b"x" * 100).close_write_tcp()
            c.recv_until_closed()
            c.close()
        for i in range(10):  # abort in the middle of a download
            c = TlsClient(d.addr("src"), keep=False).handshake()
            c.run_until(lambda: c.nrecv >= 64 * 1024, what="some bytes")
            c.abort()
        for i in range(10):  # close without reading anything, just after the handshake
            TlsClient(d.addr("src"), keep=False).handshake().close()
        for i in range(20):  # garbage
            s = raw_connect(d.addr("echo"))
            s.sendall(os.urandom(300))
            wait_peer_close(s, 5)
            s.close()
        for i in range(10):  # connect and leave before saying anything
            raw_connect(d.addr("echo")).close()
        for i in range(10):  # the backend refuses
            c = TlsClient(d.addr("refused"), timeout=5)
            try:
                c.handshake()
                c.recv_until_closed(timeout=5)
            except AssertionError:
                pass
            c.close()
        wait_fds(d, baseline, f"after churn round {round_ + 1}")
    d.assert_alive()


LOG_LINE = re.compile(
    r'sluice (error|warn|info|debug) [a-z][a-z0-9-]*( [a-z_][a-z0-9_.-]*=("([^"\\]|\\.)*"|[^\s"]*))*'
)


def test_log_lines_are_one_event_each(t):
    echo = t.backend(EchoBackend())
    d = t.sluice(t.listener(echo), global_={"log_level": "debug"})
    tls_roundtrip(d.addr(), b"hello")
    s = raw_connect(d.addr())
    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    wait_peer_close(s, 5)
    s.close()
    d.wait_log(r"peer=", timeout=5)
    d.stop()
    lines = d.log().splitlines()
    check(lines, "sluice logged nothing")
    bad = [l for l in lines if not LOG_LINE.fullmatch(l)]
    check(not bad, "log lines not of the form 'sluice LEVEL EVENT key=value ...':\n" + "\n".join(bad[:10]))


def test_log_level_filters(t):
    echo = t.backend(EchoBackend())
    d = t.sluice(t.listener(echo), global_={"log_level": "warn"})
    tls_roundtrip(d.addr(), b"hello")
    s = raw_connect(d.addr())
    s.sendall(b"\x00" * 64)
    wait_peer_close(s, 5)
    s.close()
    d.stop()
    lines = d.log().splitlines()
    noisy = [l for l in lines if l.startswith(("sluice info ", "sluice debug "))]
    check(not noisy, "log_level = warn still logs:\n" + "\n".join(noisy[:10]))


def failed_handshake(addr):
    """A client that rejects the server's certificate (it trusts another CA): the handshake
    fails on the client's side, which sends an alert. Returns the client, still connected."""
    c = TlsClient(addr, client_context(ca="other-ca.crt"))
    try:
        c.handshake()
    except AssertionError:
        return c
    raise AssertionError("a client trusting another CA completed the handshake")


def test_failed_handshake_released_when_client_leaves(t):
    # After a handshake failure the client closes; sluice must free the connection as soon as
    # it sees that, not when the flush timeout (30 s here) runs out.
    echo = t.backend(EchoBackend())
    d = t.sluice(t.listener(echo, timeouts={"flush": "30s", "handshake": "30s"}))
    tls_roundtrip(d.addr(), b"warm up")
    baseline = settle_fds(d)
    for i in range(5):
        c = failed_handshake(d.addr())
        c.close()
    start = time.monotonic()
    wait_until(lambda: d.fd_count() <= baseline, 2 + TIMING_MARGIN,
               "connections whose handshake failed to be released after the clients closed")
    print(f"released after {time.monotonic() - start:.2f}s")


@alone
def test_lingering_connections_do_not_spin(t):
    # Connections that wait for something (a failed handshake's lingering close, a silent
    # client, an idle session) must cost no CPU while they wait.
    echo = t.backend(EchoBackend())
    d = t.sluice(t.listener(echo, timeouts={"flush": "30s", "handshake": "30s", "idle": "30s"}))
    held = [failed_handshake(d.addr()) for _ in range(3)]
    for _ in range(3):  # and some that then leave (FIN) while sluice lingers
        failed_handshake(d.addr()).close()
    held += [raw_connect(d.addr()) for _ in range(3)]
    held += [TlsClient(d.addr()).handshake() for _ in range(3)]
    for h in held:
        t.defer(h.close)
    tls_roundtrip(d.addr(), b"settle")
    before, start = d.cpu_seconds(), time.monotonic()
    wait_until(lambda: time.monotonic() - start >= 1.5, 5, "a measuring window")  # the window itself
    used = d.cpu_seconds() - before
    wall = time.monotonic() - start
    check(used < 0.1 * wall, f"sluice used {used:.2f}s of CPU in {wall:.2f}s while its connections waited")
