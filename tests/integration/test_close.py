"""Ends of streams: half-close both ways, backends that refuse, close or reset, and the
connect, idle and half-close timeouts."""

import os
import time

from backends import (
    BlackholeBackend,
    CloseAtOnceBackend,
    EchoBackend,
    GreetFirstBackend,
    HalfCloseBackend,
    ResetBackend,
    SilentBackend,
    SourceBackend,
    refused_address,
)
from harness import (
    TIMING_MARGIN,
    HandshakeFailed,
    MiB,
    TlsClient,
    check,
    pattern_bytes,
    pattern_chunks,
    pattern_sha256,
    tls_roundtrip,
)


def half_close_from_client(t, how):
    reply = pattern_bytes(256 * 1024, offset=99)
    backend = t.backend(HalfCloseBackend(reply, delay=0.5))
    d = t.sluice(t.listener(backend))
    c = t.client(d.addr()).handshake()
    size = 1 * MiB + 17
    c.send(pattern_chunks(size))
    if how == "tls":
        c.close_write_tls()
    else:
        c.close_write_tcp()
    conn = backend.wait_done(timeout=15)
    check(conn.eof, "the backend never saw EOF after the client closed its side")
    check(conn.received == size and conn.sha256 == pattern_sha256(size),
          f"the backend got {conn.received} of {size} bytes before EOF (or different ones)")
    c.recv_until_closed(timeout=10)
    check(bytes(c.data) == reply, f"the delayed reply did not arrive whole: {c.ending()}")
    check(c.close_notify, f"the backend's FIN did not become close_notify: {c.ending()}")


def test_client_close_notify_half_close(t):
    # Client close_notify -> FIN to the backend after the queued data; the backend's later
    # reply still reaches the client, then close_notify + FIN.
    half_close_from_client(t, "tls")


def test_client_fin_half_close(t):
    # The same with a bare TCP FIN (no close_notify) from the client.
    half_close_from_client(t, "tcp")


def test_backend_fin_half_close(t):
    # Backend FIN -> close_notify + FIN to the client after the queued data, while the
    # client's direction stays open: what the client sends afterwards still reaches the backend.
    greeting = pattern_bytes(300_000, offset=5)
    backend = t.backend(GreetFirstBackend(greeting))
    d = t.sluice(t.listener(backend))
    c = t.client(d.addr()).handshake()
    c.run_until(lambda: c.close_notify, timeout=10, what="close_notify after the greeting")
    check(bytes(c.data) == greeting, f"greeting incomplete before close_notify: {c.ending()}")
    c.run_until(lambda: c.tcp_eof, timeout=10, what="the FIN after close_notify")
    size = 200_000
    c.send(pattern_chunks(size)).close_write_tls()
    conn = backend.wait_done(timeout=15)
    check(conn.received == size and conn.sha256 == pattern_sha256(size),
          f"after the backend's FIN, the backend got {conn.received} of {size} bytes from the client")
    check(conn.eof, "the backend never saw the client's close")


def test_echo_half_close_many(t):
    # Close ordering in a loop: close_notify right after the data, the echo drains, then FIN.
    echo = t.backend(EchoBackend())
    d = t.sluice(t.listener(echo))
    for i in range(50):
        tls_roundtrip(d.addr(), os.urandom(1 + i * 997))


def expect_client_sees_close(addr, limit, payload=b"hello?"):
    """Connects, sends, and expects the connection to end within `limit` seconds.
    Returns (client, handshake_ok, seconds)."""
    start = time.monotonic()
    c = TlsClient(addr, timeout=limit)
    ok = True
    try:
        c.handshake()
        c.send(payload)
        c.recv_until_closed(timeout=limit)
    except HandshakeFailed:
        ok = False
    c.close()
    return c, ok, time.monotonic() - start


def test_backend_refused(t):
    echo = t.backend(EchoBackend())
    d = t.sluice(
        [
            # A long connect timeout: a quick close proves the refusal was handled as such.
            t.listener(refused_address(), name="bad", timeouts={"connect": "30s"}),
            t.listener(echo, name="good"),
        ]
    )
    for _ in range(20):
        c, ok, secs = expect_client_sees_close(d.addr("bad"), 5)
        check(c.nrecv == 0, f"a refused backend produced {c.nrecv} bytes")
        tls_roundtrip(d.addr("good"), b"still serving")
    d.assert_alive()


def test_backend_closes_at_once(t):
    echo = t.backend(EchoBackend())
    bad = t.backend(CloseAtOnceBackend())
    d = t.sluice([t.listener(bad, name="bad"), t.listener(echo, name="good")])
    for i in range(20):
        start = time.monotonic()
        c = TlsClient(d.addr("bad"), timeout=5)
        try:
            c.handshake()
        except HandshakeFailed:
            c.close()
            continue
        # The handshake completed: the backend's FIN must arrive as close_notify + FIN.
        c.recv_until_closed(timeout=5)
        c.close()
        check(c.close_notify and c.nrecv == 0, f"attempt {i}: {c.ending()}")
        check(time.monotonic() - start < 5, "closing took too long")
        tls_roundtrip(d.addr("good"), b"still serving")
    check(bad.accepted >= 1, "the closing backend was never reached")
    d.assert_alive()


def test_backend_resets_midstream(t):
    size = 2 * MiB
    bad = t.backend(ResetBackend(size))
    echo = t.backend(EchoBackend())
    d = t.sluice([t.listener(bad, name="bad"), t.listener(echo, name="good")])
    expect = pattern_bytes(size)
    for i in range(10):
        c = t.client(d.addr("bad"), timeout=10).handshake()
        c.recv_until_closed(timeout=10)
        got = bytes(c.data)
        check(expect.startswith(got), f"attempt {i}: the {len(got)} bytes before the reset are not a prefix")
        c.close()
        tls_roundtrip(d.addr("good"), os.urandom(10_000))
    d.assert_alive()


def test_client_resets_midstream(t):
    # The client aborts (RST) while the backend streams: sluice must not die of SIGPIPE or
    # EPIPE, and must keep serving.
    src = t.backend(SourceBackend(64 * MiB))
    echo = t.backend(EchoBackend())
    d = t.sluice([t.listener(src, name="src"), t.listener(echo, name="good")])
    for i in range(10):
        c = t.client(d.addr("src"), keep=False).handshake()
        c.run_until(lambda: c.nrecv >= 256 * 1024, what="the first bytes")
        c.abort()
        src.wait_done(i, timeout=15)
        tls_roundtrip(d.addr("good"), b"still serving")
    d.assert_alive()


def check_reaped(secs, timeout, what):
    check(secs >= timeout * 0.8, f"{what}: closed after {secs:.2f}s, before the {timeout}s timeout")
    check(secs <= timeout + TIMING_MARGIN, f"{what}: closed after {secs:.2f}s, timeout {timeout}s")


def test_backend_connect_timeout(t):
    hole = BlackholeBackend()
    t.defer(hole.close)
    echo = t.backend(EchoBackend())
    d = t.sluice(
        [
            t.listener(hole.address, name="hole", timeouts={"connect": "1s", "handshake": "30s"}),
            t.listener(echo, name="good"),
        ]
    )
    start = time.monotonic()
    c = t.client(d.addr("hole"), timeout=10)
    try:
        c.handshake()
        c.send(b"anyone there?")
        c.recv_until_closed(timeout=10)
    except HandshakeFailed:
        pass
    check_reaped(time.monotonic() - start, 1.0, "backend connect timeout")
    check(c.nrecv == 0, f"got bytes from a backend that never answered: {c.ending()}")
    tls_roundtrip(d.addr("good"), b"still serving")


def test_idle_timeout(t):
    echo = t.backend(EchoBackend())
    d = t.sluice(t.listener(echo, timeouts={"idle": "1s"}))
    # Busy for three times the idle timeout: the connection must stay up (idleness, not age).
    c = t.client(d.addr()).handshake()
    start = time.monotonic()
    while True:
        before = c.nrecv
        c.sendall(b"tick")
        c.run_until(lambda: c.nrecv >= before + 4, timeout=5, what="an echo")
        last = time.monotonic()
        if last - start >= 3.0:
            break
        c.pump(0.3)  # the client's own pace: activity every 0.3 s, well inside 1 s
        check(not c.finished, f"an active connection was closed after {time.monotonic() - start:.1f}s")
    # Then silent: it must be closed about one idle timeout after the last byte.
    c.recv_until_closed(timeout=1 + TIMING_MARGIN + 1)
    check_reaped(time.monotonic() - last, 1.0, "idle timeout")


def test_half_close_timeout(t):
    # The client half-closes; the backend never answers nor closes: the half-close linger
    # timeout ends the connection.
    silent = t.backend(SilentBackend())
    d = t.sluice(t.listener(silent, timeouts={"half_close": "1s", "idle": "60s"}))
    c = t.client(d.addr()).handshake()
    c.sendall(b"last words")
    start = time.monotonic()
    c.close_write_tls()
    c.recv_until_closed(timeout=1 + TIMING_MARGIN + 1)
    check_reaped(time.monotonic() - start, 1.0, "half-close timeout")
    check(silent.conn(0).eof, "the backend never got the FIN")


def test_half_close_linger_counts_idleness(t):
    # A reply that keeps flowing for longer than the half-close timeout is not cut
    # (LESSONS #12): the linger counts idleness, not age.
    reply = pattern_bytes(8 * 4096, offset=3)
    backend = t.backend(HalfCloseBackend(reply, delay=0.3, drips=8, interval=0.4))
    d = t.sluice(t.listener(backend, timeouts={"half_close": "1s"}))
    c = t.client(d.addr()).handshake()
    c.sendall(b"request").close_write_tls()
    c.recv_until_closed(timeout=15)
    check(bytes(c.data) == reply, f"the slow reply was cut: {c.ending()} of {len(reply)}")
    check(c.close_notify, f"no close_notify after the reply: {c.ending()}")
