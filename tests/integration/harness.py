"""The integration-test harness: runs the real sluice binary and talks to it.

A test is a function `test_NAME(t)` in a `test_*.py` module; `t` is a `Context` (below) that
owns everything the test starts: a temporary folder, sluice daemons, backends and clients.
`run.py` runs each test in its own process and calls `Context.close()` afterwards, which also
decides whether the daemon behaved: a daemon that died from a signal, printed a sanitizer report,
or did not exit 0 on SIGTERM fails the test.

Rules every test keeps: loopback only, port 0 everywhere, every socket has a timeout, every loop
is bounded by a deadline, and readiness comes from sluice's --ready-fd, never from a sleep.

Environment:
  SLUICE_BIN          the daemon to test (run.py sets it from --bin)
  SLUICE_TEST_CERTS   a folder made by tests/certs/make-certs (run.py makes one)
  SLUICE_TEST_LIGHT   "1": heavy tests move smaller volumes (the ASan run sets it); every test
                      still runs and still checks the same properties
"""

import hashlib
import json
import os
import random
import re
import select
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LIGHT = os.environ.get("SLUICE_TEST_LIGHT") == "1"

# Seconds of slack for timing checks: the daemon may be an ASan build on a loaded 2-core machine.
TIMING_MARGIN = 2.5 if LIGHT else 1.5


def scaled(full, light):
    """`full` normally, `light` when SLUICE_TEST_LIGHT=1."""
    return light if LIGHT else full


MiB = 1024 * 1024
GiB = 1024 * MiB


class Skip(Exception):
    """Raised by a test that cannot run here (for example, no IPv6 loopback)."""


def timeout(seconds):
    """Decorator: the test's time limit in run.py (the default is 120 s)."""

    def mark(fn):
        fn.timeout = seconds
        return fn

    return mark


def alone(fn):
    """Decorator: run.py runs the test with no other test beside it, even with -j. For tests that
    keep both CPUs busy for seconds (churn, gigabyte transfers, thousands of connections) or that
    measure the daemon's CPU time, so that neither they nor their neighbours run short of CPU."""
    fn.alone = True
    return fn


def wait_until(cond, timeout, what, interval=0.02):
    """Polls cond() until it returns something truthy, and returns that. Fails after `timeout`
    seconds naming `what`. The interval only paces the poll; nothing relies on it."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def check(cond, message):
    """assert that survives python -O and always carries a message."""
    if not cond:
        raise AssertionError(message)


# ---------------------------------------------------------------------------------------------
# Deterministic test data. A random block of prime length repeats, so the stream never lines up
# with a power-of-two buffer and a dropped, repeated or reordered chunk changes the SHA-256.

_PATTERN_LEN = 1048573
_PATTERN = random.Random(20240601).randbytes(_PATTERN_LEN)
_PATTERN2 = _PATTERN + _PATTERN


def pattern_chunks(total, chunk=256 * 1024, offset=0):
    """Yields memoryviews that together are bytes [offset, offset+total) of the pattern."""
    view = memoryview(_PATTERN2)
    pos = offset % _PATTERN_LEN
    left = total
    while left > 0:
        n = min(chunk, left, _PATTERN_LEN)
        yield view[pos : pos + n]
        pos = (pos + n) % _PATTERN_LEN
        left -= n


def pattern_bytes(total, offset=0):
    return b"".join(bytes(c) for c in pattern_chunks(total, offset=offset))


_sha_cache = {}


def pattern_sha256(total, offset=0):
    key = (total, offset)
    if key not in _sha_cache:
        h = hashlib.sha256()
        for c in pattern_chunks(total, 1 << 20, offset):
            h.update(c)
        _sha_cache[key] = h.hexdigest()
    return _sha_cache[key]


# ---------------------------------------------------------------------------------------------
# Configuration files.


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {v!r} as TOML")


def render_config(listeners, global_=None, tls=None):
    """The text of a sluice.toml: [global], [tls] and one [[listener]] per dict."""
    lines = []
    if global_:
        lines.append("[global]")
        lines += [f"{k} = {toml_value(v)}" for k, v in global_.items()]
        lines.append("")
    if tls:
        lines.append("[tls]")
        lines += [f"{k} = {toml_value(v)}" for k, v in tls.items()]
        lines.append("")
    for listener in listeners:
        lines.append("[[listener]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in listener.items()]
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The daemon.

SANITIZER_MARKERS = re.compile(
    r"ERROR: AddressSanitizer|ERROR: LeakSanitizer|runtime error:|"
    r"SUMMARY: UndefinedBehaviorSanitizer|WARNING: ThreadSanitizer|ERROR: MemorySanitizer"
)


def sluice_bin():
    path = os.environ.get("SLUICE_BIN") or str(REPO / "build/src/daemon/sluice")
    if not os.access(path, os.X_OK):
        raise AssertionError(f"no sluice binary at {path} (set SLUICE_BIN or pass --bin)")
    return path


def parse_address(text):
    """'127.0.0.1:5' -> ('127.0.0.1', 5); '[::1]:5' -> ('::1', 5)."""
    m = re.fullmatch(r"\[([^\]]+)\]:(\d+)", text) or re.fullmatch(r"([^:]+):(\d+)", text)
    if not m:
        raise AssertionError(f"sluice announced an address it should not: {text!r}")
    return (m.group(1), int(m.group(2)))


def run_sluice(args, timeout=30, **kw):
    """Runs the binary to completion (for --check, --version, --help). Returns CompletedProcess
    with text output; fails on a sanitizer report or a death by signal."""
    proc = subprocess.run(
        [sluice_bin()] + args,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        text=True,
        errors="replace",
        **kw,
    )
    out = proc.stdout + proc.stderr
    check(not SANITIZER_MARKERS.search(out), f"sanitizer report from sluice {args}:\n{out}")
    check(proc.returncode >= 0, f"sluice {args} died from signal {-proc.returncode}:\n{out}")
    return proc


class Sluice:
    """One sluice daemon run by a test, with its config in the test's folder."""

    def __init__(self, t, config_text, name, env=None):
        self.t = t
        self.env = env  # extra environment variables for the daemon
        self.name = name
        self.config_path = t.tmp / f"{name}.toml"
        self.config_path.write_text(config_text)
        self.stderr_path = t.tmp / f"{name}.stderr"
        self.proc = None
        self.listeners = {}  # name -> [(host, port), ...] in announcement order
        self.stopped = False  # set once a test or teardown has ended it on purpose
        self.signalled = False  # a test sent it a signal (so an exit is not a surprise)
        self.ready_lines = []

    # -- starting -------------------------------------------------------------------------
    def start(self, timeout=None):
        timeout = timeout or scaled(15, 40)
        rfd, wfd = os.pipe()
        self._stderr = open(self.stderr_path, "wb")
        try:
            self.proc = subprocess.Popen(
                [sluice_bin(), "--config", str(self.config_path), "--ready-fd", str(wfd)],
                stdin=subprocess.DEVNULL,
                stdout=self._stderr,
                stderr=self._stderr,
                pass_fds=(wfd,),
                cwd=self.t.tmp,
                env=dict(os.environ, **self.env) if self.env else None,
            )
        finally:
            os.close(wfd)
        try:
            self._read_ready(rfd, timeout)
        finally:
            os.close(rfd)
        return self

    def _read_ready(self, rfd, timeout):
        deadline = time.monotonic() + timeout
        buf = b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"{self.name}: no 'ready' line within {timeout}s; got {buf!r}\n" + self.log_tail()
                )
            p = select.poll()
            p.register(rfd, select.POLLIN)
            if not p.poll(left * 1000):
                continue
            data = os.read(rfd, 4096)
            if not data:
                self._wait_exit(5)
                raise AssertionError(
                    f"{self.name}: ready fd closed before 'ready' (got {buf!r}); "
                    f"exit status {self.proc.returncode}\n" + self.log_tail()
                )
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                text = line.decode("utf-8", "replace").strip()
                self.ready_lines.append(text)
                if text == "ready":
                    check(self.listeners, f"{self.name}: 'ready' without any 'listen' line")
                    return
                m = re.fullmatch(r"listen (\S+) (\S+)", text)
                check(m, f"{self.name}: unexpected line on the ready fd: {text!r}")
                self.listeners.setdefault(m.group(1), []).append(parse_address(m.group(2)))

    # -- addresses ------------------------------------------------------------------------
    def addr(self, listener=None, index=0):
        """(host, port) of a listener (the first one by default)."""
        name = listener or next(iter(self.listeners))
        check(name in self.listeners, f"no listener {name!r}; have {list(self.listeners)}")
        return self.listeners[name][index]

    @property
    def pid(self):
        return self.proc.pid

    # -- observing ------------------------------------------------------------------------
    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def assert_alive(self):
        if not self.alive():
            raise AssertionError(
                f"{self.name} exited unexpectedly ({self.describe_exit()})\n" + self.log_tail()
            )

    def describe_exit(self):
        rc = self.proc.returncode
        if rc is None:
            return "still running"
        if rc < 0:
            return f"killed by signal {signal.Signals(-rc).name}"
        return f"exit code {rc}"

    def log(self):
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines=40):
        text = self.log().splitlines()[-lines:]
        return f"--- {self.name} stderr (last {len(text)} lines) ---\n" + "\n".join(text)

    def wait_log(self, pattern, timeout=5.0):
        """Waits for a stderr line matching the regex; returns the match."""
        rx = re.compile(pattern)
        return wait_until(
            lambda: next((m for m in map(rx.search, self.log().splitlines()) if m), None),
            timeout,
            f"a log line matching {pattern!r} from {self.name}",
        )

    def status(self, field):
        """A field of /proc/PID/status in bytes (for the kB fields), e.g. VmRSS, VmHWM."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    parts = line.split()
                    return int(parts[1]) * (1024 if parts[-1] == "kB" else 1)
        raise AssertionError(f"no {field} in /proc/{self.pid}/status")

    def rss(self):
        return self.status("VmRSS")

    def cpu_seconds(self):
        """User + system CPU time the daemon has used so far."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def fd_count(self):
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def fds(self):
        out = {}
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                out[int(fd)] = os.readlink(f"/proc/{self.pid}/fd/{fd}")
            except OSError:
                pass
        return out

    # -- stopping -------------------------------------------------------------------------
    def signal(self, sig=signal.SIGTERM):
        self.assert_alive()
        self.signalled = True
        self.proc.send_signal(sig)

    def _wait_exit(self, timeout):
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        finally:
            if self.proc.returncode is not None and not self._stderr.closed:
                self._stderr.close()
        return True

    def wait_exit(self, timeout):
        """Waits for the daemon to exit; returns its exit code, or fails after `timeout`."""
        if not self._wait_exit(timeout):
            raise AssertionError(f"{self.name} still running {timeout}s later\n" + self.log_tail())
        self.stopped = True
        self.check_sanitizers()
        check(self.proc.returncode >= 0, f"{self.name} {self.describe_exit()}\n" + self.log_tail())
        return self.proc.returncode

    def stop(self, expect=0, timeout=None):
        """SIGTERM, then the exit code must be `expect` (None: anything but a crash)."""
        timeout = timeout or scaled(15, 30)
        self.signal(signal.SIGTERM)
        rc = self.wait_exit(timeout)
        if expect is not None:
            check(
                rc == expect,
                f"{self.name} exited {rc} after SIGTERM, expected {expect}\n" + self.log_tail(),
            )
        return rc

    def kill(self):
        """SIGKILL without any check: cleaning up after a failure, or a test's sudden death of an
        instance."""
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)
        self.stopped = True
        if not self._stderr.closed:
            self._stderr.close()

    def check_sanitizers(self):
        text = self.log()
        m = SANITIZER_MARKERS.search(text)
        if m:
            line_start = text.rfind("\n", 0, m.start()) + 1
            line_end = text.find("\n", m.end())
            first = text[line_start : line_end if line_end >= 0 else None].strip()
            raise AssertionError(
                f"{self.name}: sanitizer report: {first}\n{text[max(0, line_start - 200):line_start + 6000]}"
            )


# ---------------------------------------------------------------------------------------------
# TLS clients.


def settle_fds(d):
    """The daemon's open-fd count once it has not changed for ten polls in a row (connections
    that were closing have finished)."""
    last = [None, 0]

    def stable():
        n = d.fd_count()
        if n == last[0]:
            last[1] += 1
        else:
            last[0], last[1] = n, 0
        return last[1] >= 10

    wait_until(stable, 15, "the fd count to settle", interval=0.05)
    return last[0]


def client_context(ca="ca.crt", min_version=None, max_version=None, ciphers=None, verify=True):
    """A Python ssl client context that trusts the test CA (`ca` is a file in the certs dir)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.options &= ~getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)  # see TlsClient.__init__
    if verify:
        ctx.load_verify_locations(cafile=str(certs_dir() / ca))
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if min_version:
        ctx.minimum_version = min_version
    if max_version:
        ctx.maximum_version = max_version
    if ciphers:
        ctx.set_ciphers(ciphers)
    return ctx


def certs_dir():
    d = os.environ.get("SLUICE_TEST_CERTS")
    check(d, "SLUICE_TEST_CERTS is not set (run the tests through run.py)")
    return Path(d)


class HandshakeFailed(AssertionError):
    pass


class TlsClient:
    """A TLS client over one non-blocking socket and an ssl.SSLObject, driven by select().

    Unlike ssl.SSLSocket it can send close_notify and keep reading (TLS half-close), shut the TCP
    write side without close_notify, and send and receive at the same time in one thread. It
    reads the socket only inside its own calls, so a test that stops calling it is a client
    that stopped reading.

    The ends of the stream are recorded separately: close_notify (a clean TLS close), truncated
    (TCP EOF without close_notify), reset (ECONNRESET), tcp_eof, error (a TLS alert or failure).
    """

    CHUNK = 256 * 1024
    HIGH = 1024 * 1024  # ciphertext queued in this process before we stop encrypting more

    def __init__(self, addr, ctx=None, server_hostname="localhost", timeout=10.0, keep=True):
        family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(addr)
        self.sock.setblocking(False)
        self.local = self.sock.getsockname()
        self.timeout = timeout
        self.inc = ssl.MemoryBIO()
        self.out = ssl.MemoryBIO()
        ctx = ctx or client_context()
        # Some CPython 3.11 releases (Debian 12's 3.11.2 among them) set OP_IGNORE_UNEXPECTED_EOF
        # by default, which makes a bare TCP EOF read like close_notify; the tests must tell the
        # two apart, so the option is always cleared.
        ctx.options &= ~getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
        self.obj = ctx.wrap_bio(
            self.inc, self.out, server_side=False, server_hostname=server_hostname
        )
        self.pending = bytearray()  # ciphertext not yet accepted by the socket
        self.sendq = []  # memoryviews of plaintext not yet given to the SSLObject
        self.keep = keep
        self.data = bytearray()  # plaintext received (when keep)
        self.nrecv = 0
        self.hash = hashlib.sha256()
        self.close_notify = False
        self.truncated = False
        self.reset = False
        self.tcp_eof = False
        self.error = None
        self.write_closed = False
        self.handshake_done = False
        self.finished_override = False
        self.app_sent = 0  # plaintext bytes given to TLS
        self.wire_sent = 0  # ciphertext bytes the socket accepted

    # -- the pump -------------------------------------------------------------------------
    def _drain_out(self):
        if self.out.pending:
            self.pending += self.out.read()

    def _read_app(self):
        while True:
            try:
                d = self.obj.read(self.CHUNK)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLZeroReturnError:
                self.close_notify = True
                return
            except ssl.SSLEOFError:
                self.truncated = True
                return
            except ssl.SSLError as e:
                self.error = e
                return
            if not d:
                # CPython returns b"" (rather than raising SSLZeroReturnError) for a
                # close_notify received before we sent ours.
                self.close_notify = True
                return
            self.nrecv += len(d)
            self.hash.update(d)
            if self.keep:
                self.data += d

    @property
    def finished(self):
        """Nothing more will arrive from the server (or pump(read=False) is running)."""
        return self.finished_override or self.tcp_eof or self.reset or self.error is not None

    def _next_plain(self):
        """The next memoryview of plaintext to encrypt, or None."""
        while self.sendq:
            head = self.sendq[0]
            if isinstance(head, memoryview):
                if len(head):
                    return head
                self.sendq.pop(0)
                continue
            chunk = next(head, None)  # an iterator of chunks
            if chunk is None:
                self.sendq.pop(0)
                continue
            self.sendq.insert(0, memoryview(chunk))
        return None

    def _step(self, deadline, what, quiet=False):
        """Moves plaintext into TLS and ciphertext to and from the socket, once. With quiet,
        reaching the deadline returns False instead of failing."""
        while len(self.pending) + self.out.pending < self.HIGH:
            mv = self._next_plain()
            if mv is None:
                break
            n = self.obj.write(mv[: self.CHUNK])
            self.app_sent += n
            self.sendq[0] = mv[n:]
        self._drain_out()
        rlist = [] if self.finished else [self.sock]
        wlist = [self.sock] if self.pending and not self.reset else []
        if not rlist and not wlist:
            if quiet:
                return False
            raise AssertionError(f"{what}: the connection ended first ({self.ending()})")
        left = deadline - time.monotonic()
        if left <= 0:
            if quiet:
                return False
            raise AssertionError(f"timed out waiting for {what} ({self.ending()})")
        # poll, not select: the 1,000-connection test has descriptors above FD_SETSIZE.
        p = select.poll()
        p.register(self.sock, (select.POLLIN if rlist else 0) | (select.POLLOUT if wlist else 0))
        events = p.poll(left * 1000)
        ev = events[0][1] if events else 0
        bad = select.POLLERR | select.POLLHUP
        w = bool(wlist) and bool(ev & (select.POLLOUT | bad))
        r = bool(rlist) and bool(ev & (select.POLLIN | bad))
        if w:
            try:
                n = self.sock.send(self.pending[: self.CHUNK])
                del self.pending[:n]
                self.wire_sent += n
            except BlockingIOError:
                pass
            except (BrokenPipeError, ConnectionResetError):
                self.reset = True
                self.pending.clear()
        if r:
            try:
                data = self.sock.recv(self.CHUNK)
            except BlockingIOError:
                data = None
            except ConnectionResetError:
                self.reset = True
                data = b""
            if data == b"":
                self.tcp_eof = True
                self.inc.write_eof()
            elif data:
                self.inc.write(data)
            if self.handshake_done:
                self._read_app()
        return True

    def pump(self, seconds, read=True):
        """Sends (and, with read, receives) for `seconds`, then returns: for watching a stall.
        With read=False the socket is not read: a client that stopped reading."""
        deadline = time.monotonic() + seconds
        if not read:
            saved, self.finished_override = self.finished_override, True
        try:
            while time.monotonic() < deadline and self._step(deadline, "pumping", quiet=True):
                pass
        finally:
            if not read:
                self.finished_override = saved
        return self

    def run_until(self, cond, timeout=None, what="a condition"):
        deadline = time.monotonic() + (timeout or self.timeout)
        while not cond():
            self._step(deadline, what)
        return self

    def ending(self):
        parts = [f"received {self.nrecv} bytes"]
        for flag in ("close_notify", "truncated", "reset", "tcp_eof"):
            if getattr(self, flag):
                parts.append(flag)
        if self.error is not None:
            parts.append(f"error={self.error}")
        return ", ".join(parts)

    # -- the API tests use ----------------------------------------------------------------
    def handshake(self, timeout=None):
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as e:
                self._drain_out()
                self._flush_best_effort()
                raise HandshakeFailed(f"handshake failed: {e}") from e
            self._drain_out()
            if self.finished and not self.inc.pending:
                # The EOF was fed to the BIO; one more do_handshake() reports it.
                try:
                    self.obj.do_handshake()
                except ssl.SSLError as e:
                    raise HandshakeFailed(f"handshake failed: {e} ({self.ending()})") from e
                break
            self._step(deadline, "the TLS handshake")
        self._drain_out()
        self.handshake_done = True
        self._read_app()
        # Our last flight (TLS 1.3: the client Finished) must reach the server, or its side
        # of the handshake never completes.
        self.run_until(lambda: not self.pending, deadline - time.monotonic(), "the last handshake flight to leave")
        return self

    def send_hello(self, timeout=None):
        """Sends the ClientHello and stops there; handshake() goes on from it."""
        try:
            self.obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        self._drain_out()
        return self.run_until(lambda: not self.pending, timeout, "the ClientHello to leave")

    def _flush_best_effort(self):
        try:
            if self.pending:
                n = self.sock.send(self.pending)
                del self.pending[:n]
        except OSError:
            pass

    def version(self):
        return self.obj.version()

    def cipher(self):
        return self.obj.cipher()

    def send(self, data):
        """Queues plaintext (bytes, or an iterator of chunks); it leaves during later calls."""
        if isinstance(data, (bytes, bytearray)):
            data = memoryview(bytes(data))
        self.sendq.append(data if isinstance(data, memoryview) else iter(data))
        return self

    def flush(self, timeout=None):
        """Until every queued byte has reached the socket, reading meanwhile."""
        return self.run_until(
            lambda: self._next_plain() is None and not self.pending and not self.out.pending,
            timeout,
            "the send queue to drain",
        )

    def sendall(self, data, timeout=None):
        return self.send(data).flush(timeout)

    def recv_exact(self, n, timeout=None):
        """Until `n` plaintext bytes in total have arrived; returns the kept bytes."""
        self.run_until(
            lambda: self.nrecv >= n or self.close_notify or self.truncated or self.finished,
            timeout,
            f"{n} received bytes",
        )
        check(self.nrecv >= n, f"wanted {n} bytes, the connection ended: {self.ending()}")
        return bytes(self.data)

    def recv_until_closed(self, timeout=None):
        """Reads until the server is done (TCP EOF, reset or a TLS error)."""
        self.run_until(lambda: self.finished, timeout, "the server to close")
        self._read_app()
        return self

    def close_write_tls(self, timeout=None):
        """Sends close_notify after queued data (TLS half-close); keeps reading."""
        self.flush(timeout)
        try:
            self.obj.unwrap()
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as e:
            raise AssertionError(f"sending close_notify failed: {e}") from e
        self.write_closed = True
        self._drain_out()
        return self.flush(timeout)

    def close_write_tcp(self, timeout=None):
        """Shuts the TCP write side after queued data, without close_notify; keeps reading."""
        self.flush(timeout)
        self.sock.shutdown(socket.SHUT_WR)
        self.write_closed = True
        return self

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def abort(self):
        """Closes with an RST."""
        try:
            self.sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, (1).to_bytes(4, "little") + bytes(4)
            )
        except OSError:
            pass
        self.close()


def raw_connect(addr, timeout=10.0):
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(addr)
    return s


def wait_peer_close(sock, timeout):
    """Reads and discards until the peer closes the socket (EOF or RST); returns the elapsed
    seconds. Fails if the peer keeps it open for `timeout` seconds."""
    start = time.monotonic()
    deadline = start + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"the server kept the connection open for {timeout:.1f}s")
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except socket.timeout:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - start
        if not data:
            return time.monotonic() - start


def tls_roundtrip(addr, payload=b"ping", ctx=None, timeout=10.0, server_hostname="localhost"):
    """One TLS connection through an echo path: handshake, send, read the echo, close_notify,
    and expect the backend's FIN to come back as close_notify. Returns the client."""
    c = TlsClient(addr, ctx, server_hostname=server_hostname, timeout=timeout)
    try:
        c.handshake()
        c.sendall(payload)
        got = c.recv_exact(len(payload))
        check(got == payload, f"echo mismatch: sent {len(payload)} bytes, got {len(got)} differing")
        c.close_write_tls()
        c.recv_until_closed()
        check(c.close_notify, f"no close_notify after the echo: {c.ending()}")
        check(c.nrecv == len(payload), f"extra bytes after the echo: {c.ending()}")
    finally:
        c.close()
    return c


def free_loopback_port(family=socket.AF_INET):
    """A port that nothing listens on right now (bind, read, close)."""
    s = socket.socket(family, socket.SOCK_STREAM)
    s.bind(("127.0.0.1" if family == socket.AF_INET else "::1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def have_ipv6_loopback():
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.bind(("::1", 0))
        s.close()
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# The per-test context.


class Context:
    """What a test gets: a folder, and factories whose products are cleaned up after it."""

    def __init__(self, name):
        self.name = name
        self.tmp = Path(tempfile.mkdtemp(prefix=f"sluice-{name}-"))
        self.certs = certs_dir()
        self._cleanups = []
        self.daemons = []
        self._n = 0

    def defer(self, fn):
        """Runs fn() at teardown (last registered runs first)."""
        self._cleanups.append(fn)
        return fn

    def cert(self, name="server-ecdsa", key=None):
        """A listener's certificate table for tests/certs files."""
        return {"cert": str(self.certs / f"{name}.crt"), "key": str(self.certs / f"{key or name}.key")}

    def listener(self, backend, name="web", listen="127.0.0.1:0", cert="server-ecdsa", **extra):
        """A [[listener]] table; `backend` is a Backend object or an address string."""
        d = {
            "name": name,
            "listen": listen,
            "certificate": self.cert(cert) if isinstance(cert, str) else cert,
            "backend": backend if isinstance(backend, str) else backend.address,
        }
        d.update(extra)
        return d

    def config(self, listeners, global_=None, tls=None):
        g = {"drain_timeout": "10s", "log_level": "info"}
        g.update(global_ or {})
        return render_config(listeners, g, tls)

    def sluice(self, listeners, global_=None, tls=None, start=True, env=None):
        """Starts a daemon (unless start=False) for these listener tables; `env` adds
        environment variables for it."""
        if isinstance(listeners, dict):
            listeners = [listeners]
        self._n += 1
        d = Sluice(self, self.config(listeners, global_, tls), f"sluice{self._n}", env)
        self.daemons.append(d)
        if start:
            d.start()
        return d

    def client(self, addr, **kw):
        c = TlsClient(addr, **kw)
        self.defer(c.close)
        return c

    def backend(self, backend):
        """Registers a started backend for teardown; returns it."""
        self.defer(backend.close)
        return backend

    def close(self, test_failed):
        """Teardown. Returns a list of problems (each fails the test)."""
        problems = []
        # Say first if a daemon died during the test: that explains any other failure.
        for d in self.daemons:
            if d.proc is not None and not d.stopped and d.proc.poll() is not None:
                d.stopped = True
                if d.signalled and d.proc.returncode >= 0:
                    continue  # the test signalled it; the test judges the exit itself
                problems.append(f"{d.name} died during the test ({d.describe_exit()})\n" + d.log_tail())
                try:
                    d.check_sanitizers()
                except AssertionError as e:
                    problems.append(str(e))
        for fn in reversed(self._cleanups):
            try:
                fn()
            except Exception as e:  # cleanup must go on
                problems.append(f"cleanup {getattr(fn, '__qualname__', fn)}: {e!r}")
        for d in self.daemons:
            if d.proc is None or d.stopped:
                continue
            if test_failed:
                # The test's failure is the story: only a crash or a sanitizer report adds to it,
                # and a drain that is still waiting is cut short (one the test started may have
                # ended since).
                if d.alive():
                    d.signal(signal.SIGTERM)
                if not d._wait_exit(5):
                    d.kill()
                    continue
                d.stopped = True
                if d.proc.returncode < 0:
                    problems.append(f"{d.name} {d.describe_exit()} after SIGTERM\n" + d.log_tail())
                continue
            try:
                d.stop(expect=0)
            except AssertionError as e:
                problems.append(f"teardown: {e}")
                d.kill()
        for d in self.daemons:
            if d.proc is not None and d.proc.returncode is not None:
                try:
                    d.check_sanitizers()
                except AssertionError as e:
                    if str(e) not in "\n".join(problems):
                        problems.append(str(e))
        return problems

    def remove_tmp(self):
        subprocess.run(["rm", "-rf", str(self.tmp)], check=False)
