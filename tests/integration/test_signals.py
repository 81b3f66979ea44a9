"""Signals: SIGTERM/SIGINT drain (live transfers finish, exit 0), the drain deadline (exit 1),
a second signal (exit at once), and SIGPIPE (ignored)."""

import signal
import time

from backends import EchoBackend, SlowSourceBackend
from harness import TIMING_MARGIN, check, pattern_sha256, raw_connect, tls_roundtrip, wait_until


def refuses_connections(addr):
    try:
        s = raw_connect(addr, timeout=2)
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        return False  # it sat in the backlog as the listener closed: ask again
    s.close()
    return False


def test_sigterm_drain_lets_transfer_finish(t):
    pieces, piece, interval = 12, 32 * 1024, 0.2
    src = t.backend(SlowSourceBackend(pieces, piece, interval))
    d = t.sluice(t.listener(src), global_={"drain_timeout": "20s"})
    addr = d.addr()
    c = t.client(addr, keep=False).handshake()
    c.run_until(lambda: c.nrecv > 0, timeout=10, what="the first bytes")
    sent_at = time.monotonic()
    d.signal(signal.SIGTERM)
    # It stops accepting: new connections are refused while the old one goes on.
    wait_until(lambda: refuses_connections(addr), 5, "the listener to close after SIGTERM")
    check(d.alive(), f"sluice exited at once on SIGTERM ({d.describe_exit()}) with a transfer live")
    c.recv_until_closed(timeout=30)
    total = pieces * piece
    check(c.nrecv == total and c.hash.hexdigest() == pattern_sha256(total), f"the transfer was cut: {c.ending()}")
    check(c.close_notify, f"the drained connection ended without close_notify: {c.ending()}")
    # The client's direction is still open (half-close); a polite client now closes it too,
    # and that ends the last connection.
    c.close_write_tls()
    rc = d.wait_exit(10)
    check(rc == 0, f"sluice exited {rc} after a drain that finished in time")
    check(time.monotonic() - sent_at >= (pieces - 2) * interval, "sluice exited before the transfer could finish")


def test_sigint_drains_too(t):
    echo = t.backend(EchoBackend())
    d = t.sluice(t.listener(echo))
    tls_roundtrip(d.addr(), b"before")
    d.signal(signal.SIGINT)
    rc = d.wait_exit(10)
    check(rc == 0, f"sluice exited {rc} on SIGINT with no live connection")


def test_sigterm_idle_daemon_exits_promptly(t):
    echo = t.backend(EchoBackend())
    d = t.sluice(t.listener(echo), global_={"drain_timeout": "30s"})
    start = time.monotonic()
    d.stop(expect=0)
    check(time.monotonic() - start < 5, "an idle daemon took long to stop")


def test_drain_deadline_forces_close_and_exit_1(t):
    echo = t.backend(EchoBackend())
    d = t.sluice(t.listener(echo), global_={"drain_timeout": "1s"})
    c = t.client(d.addr()).handshake()
    c.sendall(b"hold on").recv_exact(7)
    start = time.monotonic()
    d.signal(signal.SIGTERM)
    rc = d.wait_exit(1 + TIMING_MARGIN + 5)
    secs = time.monotonic() - start
    check(rc == 1, f"sluice exited {rc} when the drain deadline forced a connection closed, expected 1")
    check(0.8 <= secs <= 1 + TIMING_MARGIN, f"exited {secs:.2f}s after SIGTERM with drain_timeout 1s")
    c.recv_until_closed(timeout=5)


def test_second_signal_exits_at_once(t):
    echo = t.backend(EchoBackend())
    d = t.sluice(t.listener(echo), global_={"drain_timeout": "60s"})
    addr = d.addr()
    c = t.client(addr).handshake()
    c.sendall(b"hold on").recv_exact(7)
    d.signal(signal.SIGTERM)
    wait_until(lambda: refuses_connections(addr), 5, "the listener to close after SIGTERM")
    check(d.alive(), "sluice did not wait for the live connection")
    start = time.monotonic()
    d.signal(signal.SIGTERM)
    rc = d.wait_exit(5)
    check(time.monotonic() - start < 2, "the second SIGTERM did not stop sluice at once")
    check(rc != 0, "sluice exited 0 although the second signal cut a live connection")


def test_sigpipe_ignored(t):
    # The client disappears while sluice has a reply to write; a write to the dead socket
    # must be an error, not a SIGPIPE that kills the daemon.
    echo = t.backend(EchoBackend())
    d = t.sluice(t.listener(echo))
    for i in range(20):
        c = t.client(d.addr()).handshake()
        c.sendall(b"z" * 500_000)
        c.abort()
    tls_roundtrip(d.addr(), b"alive")
    d.assert_alive()
