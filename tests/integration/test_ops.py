"""Observability: the admin listener (/metrics, /status, /ready) reports what the test did, the
access log writes one line per connection with the documented fields (logfmt and JSON) and
escapes hostile SNI values, handshake-failure lines are rate-limited, and garbage sent to the
admin port does not hurt the daemon."""

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time

from backends import EchoBackend, ReplyBackend
from harness import (
    Sluice,
    check,
    raw_connect,
    tls_roundtrip,
    toml_value,
    wait_peer_close,
    wait_until,
)


# ---------------------------------------------------------------------------------------------
# Helpers (the harness renders [global], [tls] and listeners; [admin] and [log] are added here).


def start_ops(t, listener, admin=True, log=None, global_=None):
    """Starts a daemon with an [admin] listener on a free loopback port and an optional [log]
    table; returns (daemon, (admin_host, admin_port) or None)."""
    text = t.config([listener], global_)
    if admin:
        text += '\n[admin]\nlisten = "127.0.0.1:0"\n'
    if log:
        text += "\n[log]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in log.items())
    t._n += 1
    d = Sluice(t, text, f"sluice{t._n}")
    t.daemons.append(d)
    d.start()
    if not admin:
        return d, None
    m = d.wait_log(r"admin-listening address=(\S+):(\d+)", timeout=10)
    return d, (m.group(1), int(m.group(2)))


def http_get(addr, path, method="GET"):
    """(status, headers dict, body bytes) of one request to the admin listener."""
    conn = http.client.HTTPConnection(addr[0], addr[1], timeout=10)
    try:
        conn.request(method, path)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$')


def metrics(addr):
    """/metrics parsed into {'name{labels}': float}, after checking the exposition format."""
    status, headers, body = http_get(addr, "/metrics")
    check(status == 200, f"/metrics answered {status}")
    check(headers.get("content-type", "").startswith("text/plain; version=0.0.4"),
          f"/metrics content type {headers.get('content-type')!r}")
    out = {}
    typed = set()
    for line in body.decode().splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
            continue
        if line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        check(m, f"not a Prometheus sample line: {line!r}")
        family = re.sub(r"_(bucket|sum|count)$", "", m.group(1))
        check(m.group(1) in typed or family in typed, f"sample before its # TYPE: {line!r}")
        out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def garbage_handshake(addr):
    """A plaintext HTTP request to the TLS port: the handshake fails on sluice's side."""
    s = raw_connect(addr)
    try:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_peer_close(s, 10)
    finally:
        s.close()


def logfmt_fields(line):
    """A logfmt line as a list of (key, value) pairs, with quoted values unescaped."""
    out = []
    i = 0
    while i < len(line):
        eq = line.index("=", i)
        key = line[i:eq]
        i = eq + 1
        if i < len(line) and line[i] == '"':
            i += 1
            value = []
            while line[i] != '"':
                if line[i] == "\\":
                    i += 1
                    esc = line[i]
                    if esc == "x":
                        value.append(chr(int(line[i + 1 : i + 3], 16)))
                        i += 2
                    else:
                        value.append({"n": "\n", "r": "\r", "t": "\t"}.get(esc, esc))
                else:
                    value.append(line[i])
                i += 1
            i += 1
            value = "".join(value)
        else:
            end = line.find(" ", i)
            end = len(line) if end < 0 else end
            value = line[i:end]
            i = end
        out.append((key, value))
        if i < len(line):
            check(line[i] == " ", f"logfmt: expected a space at {i} in {line!r}")
            i += 1
    return out


def complete_lines(path):
    """The lines of a log file another process appends to, without one it is still writing: a
    reader can see part of a write(2) to a regular file. None while the file does not exist."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    return text[:text.rfind("\n") + 1].splitlines()


def access_lines(path, n, timeout=10):
    """Waits until the file holds at least n lines; returns them."""
    def read():
        lines = complete_lines(path)
        return lines if lines is not None and len(lines) >= n else None

    return wait_until(read, timeout, f"{n} access-log lines in {path}")


# ---------------------------------------------------------------------------------------------


def test_metrics_match_what_the_test_did(t):
    echo = t.backend(EchoBackend())
    d, admin = start_ops(t, t.listener(echo))
    before = metrics(admin)
    check(before["sluice_connections_accepted_total"] == 0, "connections counted before any")
    check(any(k.startswith('sluice_build_info{version="') and v == 1 for k, v in before.items()),
          "no sluice_build_info sample")

    payloads = [b"a" * 10, b"b" * 1000, b"c" * 70000]
    for p in payloads:
        tls_roundtrip(d.addr(), p)
    for _ in range(2):
        garbage_handshake(d.addr())

    def settled():
        m = metrics(admin)
        return m if m["sluice_connections_active"] == 0 and m["sluice_connections_accepted_total"] == 5 else None

    m = wait_until(settled, 10, "5 accepted connections, none active")
    total = sum(len(p) for p in payloads)
    expect = {
        'sluice_handshakes_total{result="ok"}': 3,
        'sluice_handshakes_total{result="failed"}': 2,
        'sluice_handshakes_version_total{version="1.3"}': 3,
        'sluice_connections_closed_total{reason="done"}': 3,
        'sluice_connections_closed_total{reason="handshake_failed"}': 2,
        'sluice_bytes_total{direction="client_to_backend"}': total,
        'sluice_bytes_total{direction="backend_to_client"}': total,
        "sluice_handshake_duration_seconds_count": 3,
        'sluice_handshake_duration_seconds_bucket{le="+Inf"}': 3,
        "sluice_backend_connect_duration_seconds_count": 3,
        "sluice_backend_connect_failures_total": 0,
        "sluice_accept_errors_total": 0,
        "sluice_draining": 0,
    }
    for key, value in expect.items():
        check(m.get(key) == value, f"{key} = {m.get(key)}, expected {value}")
    expiry = [v for k, v in m.items() if k.startswith("sluice_certificate_expiry_timestamp_seconds{")]
    check(expiry and all(v > time.time() for v in expiry), f"certificate expiry samples: {expiry}")
    check(m["sluice_handshake_duration_seconds_sum"] > 0, "handshake durations sum to zero")


def test_status_and_ready(t):
    echo = t.backend(EchoBackend())
    d, admin = start_ops(t, t.listener(echo), global_={"drain_timeout": "20s"})
    status, headers, body = http_get(admin, "/status")
    check(status == 200 and headers.get("content-type") == "application/json", f"/status: {status} {headers}")
    s = json.loads(body)
    check(s["ok"] is True and s["status"] == "serving", f"/status: {s}")
    check(re.fullmatch(r"\d+\.\d+\.\d+.*", s["version"]), f"version {s['version']!r}")
    check(isinstance(s["uptime_seconds"], int) and s["uptime_seconds"] >= 0, f"uptime {s.get('uptime_seconds')}")
    host, port = d.addr()
    check([l["name"] for l in s["listeners"]] == ["web"], f"listeners {s['listeners']}")
    check(f"{host}:{port}" in s["listeners"][0]["addresses"], f"bound address missing: {s['listeners']}")
    check(s["reload"]["last"] is None, f"a reload before any: {s['reload']}")
    certs = s["certificates"]
    check(certs and certs[0]["listener"] == "web" and certs[0]["not_after"] > time.time(), f"certificates {certs}")
    check(certs[0]["name"] == "localhost", f"certificate name {certs[0]['name']!r}")

    status, _, body = http_get(admin, "/ready")
    check(status == 200 and body == b"ready\n", f"/ready while serving: {status} {body!r}")
    status, _, body = http_get(admin, "/ready", method="HEAD")
    check(status == 200 and body == b"", f"HEAD /ready: {status} {body!r}")
    check(http_get(admin, "/nope")[0] == 404, "unknown path not 404")

    # While draining (a connection holds the drain open), /ready says 503.
    c = t.client(d.addr()).handshake()
    c.sendall(b"hold").recv_exact(4)
    d.signal(signal.SIGTERM)

    def draining():
        try:
            return http_get(admin, "/ready")[0] == 503
        except OSError:
            return False

    wait_until(draining, 10, "/ready to answer 503 during the drain")
    check(json.loads(http_get(admin, "/status")[2])["status"] == "draining", "/status not draining")
    c.close_write_tls()
    c.recv_until_closed(timeout=10)
    check(d.wait_exit(15) == 0, "sluice did not exit 0 after the drain")


def test_access_log_logfmt(t):
    echo = t.backend(EchoBackend())
    path = t.tmp / "access.log"
    d, _ = start_ops(t, t.listener(echo), admin=False, log={"access": str(path), "format": "logfmt"})
    c = tls_roundtrip(d.addr(), b"x" * 1234)
    garbage_handshake(d.addr())
    lines = access_lines(path, 2)
    ok = dict(logfmt_fields(lines[0]))
    for key in ("ts", "event", "listener", "client", "tls", "cipher", "sni", "alpn", "resumed",
                "backend", "handshake_ms", "connect_ms", "bytes_in", "bytes_out", "duration_ms", "reason"):
        check(key in ok, f"access line lacks {key}: {lines[0]}")
    check(ok["event"] == "access" and ok["listener"] == "web", lines[0])
    check(ok["client"] == f"127.0.0.1:{c.local[1]}", f"client {ok['client']} is not the test's {c.local}")
    check(ok["tls"] == "TLSv1.3" and ok["sni"] == "localhost" and ok["resumed"] == "false", lines[0])
    check(ok["backend"] == echo.address, f"backend {ok['backend']} != {echo.address}")
    check(ok["bytes_in"] == "1234" and ok["bytes_out"] == "1234", lines[0])
    check(ok["reason"] == "done", lines[0])
    check(float(ok["handshake_ms"]) > 0 and float(ok["duration_ms"]) >= float(ok["handshake_ms"]), lines[0])
    check(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", ok["ts"]), f"ts {ok['ts']}")
    bad = dict(logfmt_fields(lines[1]))
    check(bad["reason"] == "handshake_failed" and "tls" not in bad and bad.get("error"), lines[1])
    check("handshake_ms" not in bad and "connect_ms" not in bad, lines[1])


def test_access_log_json_and_reopen(t):
    echo = t.backend(EchoBackend())
    path = t.tmp / "access.json"
    d, _ = start_ops(t, t.listener(echo), admin=False, log={"access": str(path), "format": "json"})
    tls_roundtrip(d.addr(), b"hello")
    lines = access_lines(path, 1)
    r = json.loads(lines[0])
    check(r["event"] == "access" and r["tls"] == "TLSv1.3" and r["sni"] == "localhost", lines[0])
    check(r["bytes_in"] == 5 and r["bytes_out"] == 5 and r["reason"] == "done", lines[0])
    check(isinstance(r["handshake_ms"], float) and isinstance(r["connect_ms"], float), lines[0])
    # Rotation: move the file away, SIGUSR1, and the next line goes to a new file.
    os.rename(path, t.tmp / "access.json.1")
    d.proc.send_signal(signal.SIGUSR1)
    wait_until(path.exists, 10, "the access log to be reopened after SIGUSR1")
    tls_roundtrip(d.addr(), b"again")
    lines = access_lines(path, 1)
    check(json.loads(lines[0])["bytes_in"] == 5, lines[0])
    check(len((t.tmp / "access.json.1").read_text().splitlines()) == 1, "the rotated file grew")


def test_hostile_sni_is_escaped_in_both_formats(t):
    if shutil.which("openssl") is None:
        from harness import Skip

        raise Skip("no openssl command")
    hostile = 'evil" reason=done x=\\"{}'
    for fmt in ("logfmt", "json"):
        echo = t.backend(ReplyBackend(4))  # replies, then closes: that ends s_client's session
        path = t.tmp / f"access-{fmt}.log"
        d, _ = start_ops(t, t.listener(echo), admin=False, log={"access": str(path), "format": fmt})
        host, port = d.addr()
        p = subprocess.run(
            ["openssl", "s_client", "-connect", f"{host}:{port}", "-servername", hostile, "-quiet",
             "-nocommands", "-tls1_3"],
            input=b"ping", capture_output=True, timeout=20,
        )
        check(p.stdout == b"ping", f"s_client with a hostile SNI: {p.returncode} {p.stderr[-500:]!r}")
        lines = access_lines(path, 1)
        check(len(lines) == 1, f"one connection made {len(lines)} lines: {lines}")
        if fmt == "json":
            r = json.loads(lines[0])
            check(r["sni"] == hostile and r["reason"] == "done", f"JSON sni {r['sni']!r}")
        else:
            fields = logfmt_fields(lines[0])
            keys = [k for k, _ in fields]
            check(len(keys) == len(set(keys)) and "x" not in keys, f"forged fields in {lines[0]}")
            check(dict(fields)["sni"] == hostile, f"logfmt sni {dict(fields)['sni']!r}")
        d.stop()


def test_handshake_failure_lines_are_rate_limited(t):
    echo = t.backend(EchoBackend())
    d, _ = start_ops(t, t.listener(echo), admin=False, log={"access": "off"})
    n = 40
    start = time.monotonic()
    for _ in range(n):
        garbage_handshake(d.addr())
    elapsed = time.monotonic() - start
    time.sleep(1.1)  # a new one-second window: the next failure reports what was held back
    garbage_handshake(d.addr())
    d.wait_log(r"handshake-failed listener=web peer=127\.0\.0\.1:\d+", timeout=5)
    log = d.log()
    written = len(re.findall(r"handshake-failed listener=web peer=127\.0\.0\.1:\d+ reason=", log))
    suppressed = sum(int(k) for k in re.findall(r"handshake-failed-suppressed count=(\d+)", log))
    check(written + suppressed == n + 1, f"{written} written + {suppressed} suppressed != {n + 1} failures")
    check(written <= 10 * (int(elapsed) + 2) + 1, f"{written} lines for {n} failures in {elapsed:.1f}s")
    if elapsed < 1:
        check(suppressed > 0, "40 failures inside one second and nothing suppressed")


def test_admin_port_shrugs_off_garbage(t):
    echo = t.backend(EchoBackend())
    d, admin = start_ops(t, t.listener(echo))
    attacks = [
        os.urandom(4096),
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(100),  # a TLS ClientHello
        b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\n" + b"X-A: b\r\n" * 2000 + b"\r\n",
        b"POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
        b"GET /metrics HTTP/1.1\n\n",
        b"\r\n" * 100,
        b"GET /metrics HTTP/9.9\r\n\r\n",
    ]
    for payload in attacks:
        s = raw_connect(admin)
        try:
            try:
                s.sendall(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass
            reply = b""
            s.settimeout(10)
            try:
                while True:
                    data = s.recv(65536)
                    if not data:
                        break
                    reply += data
            except (ConnectionResetError, socket.timeout):
                pass
            check(reply == b"" or re.match(rb"HTTP/1\.1 4\d\d ", reply) or reply.startswith(b"HTTP/1.1 505"),
                  f"admin answered {reply[:80]!r} to {payload[:40]!r}")
        finally:
            s.close()
    # Many idle connections at once: beyond the cap they are closed, and the rest time out.
    idle = [raw_connect(admin) for _ in range(100)]
    for s in idle:
        s.close()

    def ready():
        try:
            return http_get(admin, "/ready")[0] == 200
        except OSError:
            return False  # still over the connection cap while the idle ones are closed

    wait_until(ready, 10, "/ready to answer 200 after the garbage")
    m = metrics(admin)
    check(m["sluice_connections_accepted_total"] == 0, "admin traffic counted as proxy connections")
    tls_roundtrip(d.addr(), b"still serving")
    d.assert_alive()


def test_access_log_on_stderr_reads_like_the_event_log(t):
    echo = t.backend(EchoBackend())
    d = t.sluice(t.listener(echo))  # [log] absent: access lines go to stderr as logfmt
    tls_roundtrip(d.addr(), b"hello")
    m = d.wait_log(r"^sluice info access (ts=\S+ listener=web client=127\.0\.0\.1:\d+ .*)$")
    fields = dict(logfmt_fields(m.group(1)))
    check(fields["reason"] == "done" and fields["bytes_in"] == "5" and "event" not in fields, m.group(0))


def test_drain_delay_keeps_accepting_while_not_ready(t):
    # With drain_delay, SIGTERM turns /ready to 503 at once but keeps accepting for the delay, so
    # a balancer that checks /ready takes the instance out before connections are refused.
    echo = t.backend(EchoBackend())
    d, admin = start_ops(t, t.listener(echo), global_={"drain_delay": "2s", "drain_timeout": "10s"})
    tls_roundtrip(d.addr(), b"before")
    sent_at = time.monotonic()
    d.signal(signal.SIGTERM)
    wait_until(lambda: http_get(admin, "/ready")[0] == 503, 1.5, "/ready to answer 503 at once")
    served = 0
    while time.monotonic() - sent_at < 1.2:
        tls_roundtrip(d.addr(), b"during the delay")  # fails the test if refused
        served += 1
    check(served > 0, "no connection was tried during the delay")
    check(d.alive(), f"sluice exited during drain_delay ({d.describe_exit()})")
    rc = d.wait_exit(10)
    elapsed = time.monotonic() - sent_at
    check(rc == 0, f"sluice exited {rc} after the delayed drain")
    check(elapsed >= 1.9, f"sluice exited {elapsed:.2f}s after SIGTERM, before drain_delay")
    check(d.wait_log(r"drain-delay ms=2000", timeout=1), "no drain-delay log line")
