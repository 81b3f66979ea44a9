"""Connection limits. Per-source-IP handshake limit (global.max_handshakes_per_ip): silent
connections from one address hold at most N handshake slots; the rest are closed at accept and
counted, while other addresses are served, and the slots free up when the silent connections
leave. The handshake rate per source IP (global.max_handshake_rate_per_ip) the same way, for a
burst. max_connections: new connections wait in the backlog until a slot frees up."""

import signal
import socket
import time

import proxyproto
from backends import EchoBackend
from harness import check, client_context, raw_connect, wait_until
from test_ops import metrics, start_ops


def roundtrip_from(source, addr, payload=b"hello"):
    """One TLS echo from a client socket bound to `source`; raises if it fails."""
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.settimeout(10)
    raw.bind((source, 0))
    raw.connect(addr)
    with client_context().wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(payload)
        got = b""
        while len(got) < len(payload):
            data = tls.recv(len(payload) - len(got))
            check(data, "the connection closed before the echo")
            got += data
        check(got == payload, "echo mismatch")


def served_from(source, addr):
    """True when a TLS echo from `source` succeeds, False when the connection is refused or cut."""
    try:
        roundtrip_from(source, addr)
        return True
    except (OSError, AssertionError):
        return False


def closed_soon(sock, seconds):
    """True if the peer closed `sock` (EOF or reset) within `seconds`; False if it stayed open."""
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except socket.timeout:
        return False
    except ConnectionResetError:
        return True


def test_handshakes_per_ip_are_limited_and_other_addresses_are_not(t):
    limit = 4
    echo = t.backend(EchoBackend())
    d, admin = start_ops(t, t.listener(echo, timeouts={"handshake": "30s"}),
                         global_={"max_handshakes_per_ip": limit, "workers": 1})
    silent = [raw_connect(d.addr()) for _ in range(limit + 5)]
    for s in silent:
        t.defer(s.close)
    # The first `limit` are held in their handshake; the 5 after them are closed at accept.
    closed = [closed_soon(s, 3.0 if i >= limit else 0.5) for i, s in enumerate(silent)]
    check(closed == [False] * limit + [True] * 5,
          f"which silent connections were closed: {closed} (expected the last 5)")
    # A real client from the same address is refused as well while the slots are held ...
    refused = False
    try:
        roundtrip_from("127.0.0.1", d.addr())
    except (OSError, AssertionError):
        refused = True
    check(refused, "a 5th handshake from 127.0.0.1 was served while 4 were in progress")
    # ... but another address is not affected.
    roundtrip_from("127.0.0.2", d.addr())
    m = metrics(admin)
    check(m.get("sluice_handshake_limited_total") == 6,
          f"sluice_handshake_limited_total = {m.get('sluice_handshake_limited_total')}, expected 6")
    # When the silent ones leave, their slots are free again.
    for s in silent[:limit]:
        s.close()
    wait_until(lambda: served_from("127.0.0.1", d.addr()), 10,
               "a handshake from 127.0.0.1 once the silent connections left")


def test_zero_turns_the_handshake_limit_off(t):
    echo = t.backend(EchoBackend())
    d, admin = start_ops(t, t.listener(echo, timeouts={"handshake": "30s"}),
                         global_={"max_handshakes_per_ip": 0})
    silent = [raw_connect(d.addr()) for _ in range(80)]  # more than the default of 64
    for s in silent:
        t.defer(s.close)
    roundtrip_from("127.0.0.1", d.addr())
    check(not any(closed_soon(s, 0.01) for s in silent), "a silent connection was closed")
    check(metrics(admin).get("sluice_handshake_limited_total") == 0, "connections were limited")


def test_handshake_rate_per_ip_is_limited_and_other_addresses_are_not(t):
    # global.max_handshake_rate_per_ip: one second's worth pass at once, the rest of a burst is
    # closed at accept and counted; another address has its own bucket, and the first one
    # refills with time.
    rate = 2
    echo = t.backend(EchoBackend())
    d, admin = start_ops(t, t.listener(echo, timeouts={"handshake": "30s"}),
                         global_={"max_handshake_rate_per_ip": rate, "workers": 1})
    start = time.monotonic()
    silent = [raw_connect(d.addr()) for _ in range(12)]
    elapsed = time.monotonic() - start
    for s in silent:
        t.defer(s.close)
    closed = [closed_soon(s, 0.3 if i < rate else 2.0) for i, s in enumerate(silent)]
    held = closed.count(False)
    # The bucket refills at `rate` a second: a slow machine may let one more through.
    check(closed[:rate] == [False] * rate and rate <= held <= rate + int(elapsed * rate),
          f"which of the burst were closed: {closed} (connecting took {elapsed:.3f} s)")
    roundtrip_from("127.0.0.2", d.addr())
    m = metrics(admin)
    check(m.get("sluice_handshake_rate_limited_total") == 12 - held,
          f"sluice_handshake_rate_limited_total = {m.get('sluice_handshake_rate_limited_total')}, "
          f"expected {12 - held}")
    check(m.get("sluice_handshake_limited_total") == 0, "the concurrency limit was counted")
    time.sleep(1.0 / rate)  # a token back
    wait_until(lambda: served_from("127.0.0.1", d.addr()), 5,
               "a handshake from 127.0.0.1 once its bucket refilled")


def test_the_handshake_limits_count_every_workers_handshakes_together(t):
    # With 2 workers the kernel spreads one address's connections over both; the limits count
    # them together, so an address gets the configured number, not that many per worker (a
    # count per worker would hold min(k, 4) + min(12 - k, 4) of 12, which is 4 only when one
    # worker took all 12).
    limit = 4
    echo = t.backend(EchoBackend())
    d, admin = start_ops(t, t.listener(echo, timeouts={"handshake": "30s"}),
                         global_={"max_handshakes_per_ip": limit, "workers": 2})
    silent = [raw_connect(d.addr()) for _ in range(12)]
    for s in silent:
        t.defer(s.close)
    wait_until(lambda: metrics(admin).get("sluice_handshake_limited_total") == 12 - limit, 10,
               f"{12 - limit} of 12 silent connections refused")
    held = [s for s in silent if not closed_soon(s, 0.3)]
    check(len(held) == limit, f"{len(held)} silent connections held, expected {limit}")
    check(not served_from("127.0.0.1", d.addr()), "a handshake beyond the limit was served")
    roundtrip_from("127.0.0.2", d.addr())
    for s in held:
        s.close()
    wait_until(lambda: served_from("127.0.0.1", d.addr()), 10,
               "a handshake from 127.0.0.1 once the silent connections left")

    # The rate the same way, after a reload that turns it on: one bucket for both workers.
    rate = 3
    text = d.config_path.read_text()
    check(f"max_handshakes_per_ip = {limit}\n" in text, "the limit is not in the configuration")
    d.config_path.write_text(text.replace(f"max_handshakes_per_ip = {limit}\n",
                                          f"max_handshake_rate_per_ip = {rate}\n"))
    d.signal(signal.SIGHUP)
    d.wait_log("reload-done", 10)
    time.sleep(1.0)  # the bucket full again after the round trips above
    before = metrics(admin).get("sluice_handshake_rate_limited_total")
    start = time.monotonic()
    burst = [raw_connect(d.addr()) for _ in range(12)]
    elapsed = time.monotonic() - start
    for s in burst:
        t.defer(s.close)
    held = [s for s in burst if not closed_soon(s, 0.5)]
    check(rate <= len(held) <= rate + int(elapsed * rate),
          f"{len(held)} of a burst of 12 held at {rate} a second (connecting took {elapsed:.3f} s)")
    check(metrics(admin).get("sluice_handshake_rate_limited_total") - before == 12 - len(held),
          "the rate's refusals were not counted")


def test_behind_a_balancer_the_limits_count_the_address_the_header_names(t):
    # Every connection comes from the balancer (127.0.0.1), so the per-address limits must
    # count the client each PROXY header names; an IPv6 client counts by its /64, so another
    # address in the same /64 takes no fresh slot, while another /64 is another client.
    echo = t.backend(EchoBackend())
    listener = t.listener(echo, accept_proxy_from=["127.0.0.0/8"], timeouts={"handshake": "30s"})
    d, admin = start_ops(t, listener, global_={"max_handshakes_per_ip": 2, "workers": 1})
    dst = ("2001:db8::443", 443)

    def silent_behind(source):
        s = raw_connect(d.addr())
        t.defer(s.close)
        s.sendall(proxyproto.v1((source, 40000), dst))
        return s

    held = [silent_behind("2001:db8:1:2::1"), silent_behind("2001:db8:1:2::99")]
    third = silent_behind("2001:db8:1:2:ffff::5")
    check(closed_soon(third, 3.0), "a third silent client in the same /64 was not closed")
    check(not any(closed_soon(s, 0.3) for s in held), "a silent client within the limit was closed")
    c = t.client(d.addr())
    c.sock.setblocking(True)
    c.sock.sendall(proxyproto.v1(("2001:db8:1:3::1", 40000), dst))
    c.sock.setblocking(False)
    c.handshake()
    c.sendall(b"another /64")
    check(c.recv_exact(11) == b"another /64", "the client from another /64 was not served")
    m = metrics(admin)
    check(m.get("sluice_handshake_limited_total") == 1,
          f"sluice_handshake_limited_total = {m.get('sluice_handshake_limited_total')}, expected 1")
    # The access log names the refused client by the header's address.
    d.wait_log(r"access .*client=\[2001:db8:1:2:ffff::5\]:40000 .*reason=limit")


def test_connection_limit_holds_new_connections_in_the_backlog(t):
    # At max_connections sluice stops accepting: a new client waits in the kernel's backlog
    # (its TCP connect succeeds, its handshake does not) and is served once a slot frees up.
    echo = t.backend(EchoBackend())
    d = t.sluice(t.listener(echo, max_connections=3))
    held = [t.client(d.addr()).handshake() for _ in range(3)]
    waiting = t.client(d.addr(), timeout=10)
    served_early = True
    try:
        waiting.handshake(timeout=1.5)
    except AssertionError:
        served_early = False
    check(not served_early, "a fourth connection was served past max_connections = 3")
    held[0].close()
    waiting.handshake(timeout=10)
    waiting.sendall(b"served after a slot freed")
    check(waiting.recv_exact(25) == b"served after a slot freed", "the waiting client got no echo")
    for c in held[1:]:
        c.sendall(b"still fine")
        check(c.recv_exact(10) == b"still fine", "a held connection broke")
