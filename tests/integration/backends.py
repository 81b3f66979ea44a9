"""Plain TCP / UNIX-socket backends that tests put behind sluice.

Every backend listens on loopback port 0 (or a UNIX socket in the test's folder), runs in
threads of the test process, records what it saw (bytes, SHA-256, EOF, resets) so a test can
check the far side of the proxy, and is stopped by close(). Each exposes `address`, the text to
put in a listener's `backend` key.
"""

import hashlib
import http.server
import os
import select
import selectors
import socket
import ssl
import threading
import time

import proxyproto
from harness import check, pattern_chunks, wait_until

CONN_TIMEOUT = 60.0  # no backend socket blocks longer than this


class Conn:
    """What a backend saw on one accepted connection."""

    def __init__(self, index, sock, peer):
        self.index = index
        self.sock = sock
        self.peer = peer
        self.accepted_at = time.monotonic()
        self.received = 0
        self.hash = hashlib.sha256()
        self.data = bytearray()
        self.sent = 0
        self.eof = False  # the proxy shut its write side (FIN)
        self.eof_at = None
        self.reset = False
        self.closed_at = None
        self.error = None
        self.done = threading.Event()

    @property
    def sha256(self):
        return self.hash.hexdigest()


class Backend:
    """A listening socket and an accept thread; each connection runs handle() in a thread."""

    def __init__(self, unix_path=None, family=socket.AF_INET, backlog=1024, keep=False):
        self.keep = keep  # keep received bytes in Conn.data
        if unix_path:
            self.lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.lsock.bind(str(unix_path))
            self.address = f"unix:{unix_path}"
        else:
            self.lsock = socket.socket(family, socket.SOCK_STREAM)
            host = "127.0.0.1" if family == socket.AF_INET else "::1"
            self.lsock.bind((host, 0))
            port = self.lsock.getsockname()[1]
            self.address = f"{host}:{port}" if family == socket.AF_INET else f"[{host}]:{port}"
        self.lsock.listen(backlog)
        self.lsock.setblocking(False)
        self._wake_r, self._wake_w = os.pipe()
        self.lock = threading.Lock()
        self.conns = []
        self._threads = []
        self._closing = False
        self.stopping = threading.Event()  # set by close(); handlers that hold a socket wait on it
        self.thread = threading.Thread(target=self._loop, daemon=True, name=type(self).__name__)
        self.thread.start()

    # -- overridable ----------------------------------------------------------------------
    def handle(self, c):
        raise NotImplementedError

    def _loop(self):
        while True:
            r, _, _ = select.select([self.lsock, self._wake_r], [], [])
            if self._wake_r in r:
                return
            try:
                sock, peer = self.lsock.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                return
            sock.setblocking(True)
            sock.settimeout(CONN_TIMEOUT)
            with self.lock:
                c = Conn(len(self.conns), sock, peer)
                self.conns.append(c)
            th = threading.Thread(target=self._run, args=(c,), daemon=True)
            self._threads.append(th)
            th.start()

    def _run(self, c):
        try:
            self.handle(c)
        except (ConnectionResetError, BrokenPipeError) as e:
            c.reset = True
            c.error = e
        except OSError as e:
            if not self._closing:
                c.error = e
        except Exception as e:  # recorded for the test to see
            c.error = e
        finally:
            c.closed_at = time.monotonic()
            try:
                c.sock.close()
            except OSError:
                pass
            c.done.set()

    # -- helpers for handlers -------------------------------------------------------------
    def read_to_eof(self, c, limit=None):
        """Reads until EOF (or `limit` bytes), hashing; returns when the proxy shut its side."""
        while limit is None or c.received < limit:
            want = 256 * 1024 if limit is None else min(256 * 1024, limit - c.received)
            d = c.sock.recv(want)
            if not d:
                c.eof = True
                c.eof_at = time.monotonic()
                return
            c.received += len(d)
            c.hash.update(d)
            if self.keep:
                c.data += d

    def send_all(self, c, data):
        c.sock.sendall(data)
        c.sent += len(data)

    # -- for tests ------------------------------------------------------------------------
    @property
    def accepted(self):
        with self.lock:
            return len(self.conns)

    def conn(self, index=0, timeout=10.0):
        wait_until(lambda: self.accepted > index, timeout, f"backend connection #{index}")
        return self.conns[index]

    def wait_done(self, index=0, timeout=10.0):
        c = self.conn(index, timeout)
        check(c.done.wait(timeout), f"backend connection #{index} still open after {timeout}s")
        return c

    def close(self):
        self._closing = True
        self.stopping.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        self.thread.join(5)
        self.lsock.close()
        with self.lock:
            conns = list(self.conns)
        for c in conns:
            if not c.done.is_set():
                try:
                    c.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for th in self._threads:
            th.join(5)
        os.close(self._wake_r)
        os.close(self._wake_w)


class EchoBackend(Backend):
    """Echoes every byte; on EOF sends what is queued, then FIN. One selector thread serves any
    number of connections (the 1,000-connection test uses it)."""

    HIGH = 1024 * 1024

    def __init__(self, *a, **kw):
        self.bytes = 0
        self.active = 0
        self.peak = 0  # most connections open at once
        self.finished = 0
        self.resets = 0
        super().__init__(*a, **kw)

    def _loop(self):
        sel = selectors.DefaultSelector()
        sel.register(self.lsock, selectors.EVENT_READ, "accept")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        states = {}

        def finish(st, reset=False):
            sel.unregister(st["sock"])
            st["sock"].close()
            del states[st["sock"]]
            st["conn"].closed_at = time.monotonic()
            st["conn"].reset = reset
            st["conn"].done.set()
            with self.lock:
                self.active -= 1
                self.finished += 1
                self.resets += reset

        while True:
            for key, ev in sel.select():
                if key.data == "wake":
                    for st in list(states.values()):
                        finish(st)
                    sel.close()
                    return
                if key.data == "accept":
                    while True:
                        try:
                            sock, peer = self.lsock.accept()
                        except (BlockingIOError, InterruptedError):
                            break
                        sock.setblocking(False)
                        with self.lock:
                            c = Conn(len(self.conns), sock, peer)
                            self.conns.append(c)
                            self.active += 1
                            self.peak = max(self.peak, self.active)
                        st = {"sock": sock, "conn": c, "out": bytearray(), "eof": False}
                        states[sock] = st
                        sel.register(sock, selectors.EVENT_READ, st)
                    continue
                st = key.data
                sock, c = st["sock"], st["conn"]
                try:
                    if ev & selectors.EVENT_READ:
                        try:
                            d = sock.recv(256 * 1024)
                        except BlockingIOError:
                            d = None
                        if d == b"":
                            st["eof"] = True
                            c.eof = True
                            c.eof_at = time.monotonic()
                        elif d:
                            st["out"] += d
                            c.received += len(d)
                            with self.lock:
                                self.bytes += len(d)
                    if st["out"] and ev & selectors.EVENT_WRITE:
                        try:
                            n = sock.send(st["out"])
                            del st["out"][:n]
                            c.sent += n
                        except BlockingIOError:
                            pass
                except (ConnectionResetError, BrokenPipeError):
                    finish(st, reset=True)
                    continue
                if st["eof"] and not st["out"]:
                    try:
                        sock.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    finish(st)
                    continue
                events = 0
                if not st["eof"] and len(st["out"]) < self.HIGH:
                    events |= selectors.EVENT_READ
                if st["out"]:
                    events |= selectors.EVENT_WRITE
                sel.modify(sock, events, st)

    def close(self):
        self._closing = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        self.thread.join(5)
        self.lsock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


class SourceBackend(Backend):
    """Streams `nbytes` of the test pattern on accept, then FIN; reads and discards until EOF.
    Conn.sent tracks progress, so a test can see the stream stall."""

    def __init__(self, nbytes, *a, **kw):
        self.nbytes = nbytes
        super().__init__(*a, **kw)

    def handle(self, c):
        for chunk in pattern_chunks(self.nbytes, 64 * 1024):
            c.sock.sendall(chunk)
            c.sent += len(chunk)
            c.hash.update(chunk)
        c.sock.shutdown(socket.SHUT_WR)
        self.read_to_eof(c)


class SlowSourceBackend(Backend):
    """Sends `pieces` pieces of `piece` bytes with `interval` seconds between them, then FIN.
    The pauses are the behaviour under test (a slow transfer), not synchronisation."""

    def __init__(self, pieces, piece, interval, *a, **kw):
        self.pieces, self.piece, self.interval = pieces, piece, interval
        self.started = threading.Event()
        super().__init__(*a, **kw)

    def handle(self, c):
        total = self.pieces * self.piece
        for i, chunk in enumerate(pattern_chunks(total, self.piece)):
            if i:
                time.sleep(self.interval)
            c.sock.sendall(chunk)
            c.sent += len(chunk)
            c.hash.update(chunk)
            self.started.set()
        c.sock.shutdown(socket.SHUT_WR)
        self.read_to_eof(c)


class SinkBackend(Backend):
    """Reads everything until EOF and hashes it; then replies "N SHA256\\n" and closes.
    With `gate` (a threading.Event) it does not read until the gate opens: a stalled backend."""

    def __init__(self, *a, gate=None, **kw):
        self.gate = gate
        super().__init__(*a, **kw)

    def handle(self, c):
        if self.gate is not None:
            self.gate.wait(CONN_TIMEOUT)
        self.read_to_eof(c)
        self.send_all(c, f"{c.received} {c.sha256}\n".encode())


class HalfCloseBackend(Backend):
    """Reads to EOF, then after `delay` seconds sends `reply` in `drips` pieces `interval`
    seconds apart, then closes. The delay is what the test is about: the proxy must keep the
    backend-to-client direction open after the client finished sending."""

    def __init__(self, reply, delay=0.5, drips=1, interval=0.0, *a, **kw):
        self.reply, self.delay, self.drips, self.interval = reply, delay, drips, interval
        super().__init__(*a, **kw)

    def handle(self, c):
        self.read_to_eof(c)
        time.sleep(self.delay)
        step = max(1, -(-len(self.reply) // self.drips))
        for i in range(0, len(self.reply), step):
            if i:
                time.sleep(self.interval)
            self.send_all(c, self.reply[i : i + step])
        c.sock.shutdown(socket.SHUT_WR)


class SilentBackend(Backend):
    """Accepts, never sends, reads (and records) until the proxy closes."""

    def handle(self, c):
        self.read_to_eof(c)
        # After the proxy's FIN, keep our side open and silent until teardown: a half-closed
        # backend that never replies.
        self.stopping.wait(CONN_TIMEOUT)


class CloseAtOnceBackend(Backend):
    """Accepts and closes at once (FIN)."""

    def handle(self, c):
        pass


class ResetBackend(Backend):
    """Sends `nbytes` of the pattern, then resets the connection (SO_LINGER 0, RST)."""

    def __init__(self, nbytes, *a, **kw):
        self.nbytes = nbytes
        super().__init__(*a, **kw)

    def handle(self, c):
        for chunk in pattern_chunks(self.nbytes, 64 * 1024):
            c.sock.sendall(chunk)
            c.sent += len(chunk)
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, (1).to_bytes(4, "little") + bytes(4))


_refused_ports = []  # bound and never listening, kept for the test process's life


def refused_address():
    """A loopback address where nothing listens: connecting to it is refused. The port stays
    bound (without listen()), so no listener the test starts later can be given it."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    _refused_ports.append(s)
    return f"127.0.0.1:{s.getsockname()[1]}"


class BlackholeBackend:
    """An address where connect() hangs: a listener whose accept queue is full and never
    drained, so the kernel drops new SYNs."""

    def __init__(self):
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(0)
        addr = self.lsock.getsockname()
        self.address = f"127.0.0.1:{addr[1]}"
        self.fillers = []
        # Fill the queue until a connect stays pending; bounded in count and time.
        for _ in range(16):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.connect_ex(addr)
            self.fillers.append(s)
            _, w, _ = select.select([], [s], [], 0.3)
            if not w:
                return
        raise AssertionError("could not fill a listen queue to make connect() hang")

    def close(self):
        for s in self.fillers:
            s.close()
        self.lsock.close()


class HttpBackend:
    """A tiny HTTP/1.1 server: GET / (a greeting), GET /blob/N (N pattern bytes),
    POST /sha256 (replies with the body's length and SHA-256)."""

    GREETING = b"hello from the backend\n"

    def __init__(self):
        outer = self
        self.requests = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = CONN_TIMEOUT

            def log_message(self, *a):
                pass

            def _reply(self, body, ctype="application/octet-stream"):
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                outer.requests += 1
                if self.path == "/":
                    return self._reply(outer.GREETING, "text/plain")
                if self.path.startswith("/blob/"):
                    n = int(self.path[len("/blob/") :])
                    self.send_response(200)
                    self.send_header("Content-Length", str(n))
                    self.end_headers()
                    for chunk in pattern_chunks(n):
                        self.wfile.write(chunk)
                    return None
                self.send_error(404)
                return None

            def do_POST(self):
                outer.requests += 1
                n = int(self.headers.get("Content-Length", "0"))
                h = hashlib.sha256()
                left = n
                while left:
                    d = self.rfile.read(min(left, 256 * 1024))
                    if not d:
                        break
                    h.update(d)
                    left -= len(d)
                return self._reply(f"{n - left} {h.hexdigest()}\n".encode(), "text/plain")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


class ReplyBackend(Backend):
    """Reads exactly `expect` bytes, sends them back, then closes. For command-line clients
    that never half-close: the backend's FIN is what ends their session."""

    def __init__(self, expect, *a, **kw):
        self.expect = expect
        super().__init__(*a, keep=True, **kw)

    def handle(self, c):
        self.read_to_eof(c, limit=self.expect)
        self.send_all(c, bytes(c.data))
        c.sock.shutdown(socket.SHUT_WR)
        # Wait for the proxy to finish too, so the client is not reset by unread bytes.
        self.read_to_eof(c)


class GreetFirstBackend(Backend):
    """Sends `greeting` and FIN at once, then reads (and hashes) until EOF: a backend that
    half-closes first and keeps listening."""

    def __init__(self, greeting, *a, **kw):
        self.greeting = greeting
        super().__init__(*a, **kw)

    def handle(self, c):
        self.send_all(c, self.greeting)
        c.sock.shutdown(socket.SHUT_WR)
        self.read_to_eof(c)


class PoolBackend(Backend):
    """A server for the pool and PROXY-protocol tests, any of: on a chosen port (SO_REUSEADDR, so
    a test can stop it and start it again on the same port), behind a PROXY header it parses with
    proxyproto, speaking TLS as a real ssl server socket. Per connection it reads the header (if
    `proxy`), does the TLS handshake (if `tls`, an ssl.SSLContext), sends `tag`, then echoes what
    it reads until the proxy closes its side, then ends with `end`:

      "close"  a clean close: close_notify (TLS) and FIN
      "fin"    FIN only: for TLS, a close without close_notify (truncation)

    With `after`, those bytes are sent once the proxy has closed its side (a reply to a
    half-closed request), before the end. With `first` the backend does not wait for the proxy:
    it sends `tag`, ends at once as `end` says, then reads until EOF.

    Conn gets: header (the parsed PROXY header) or header_error; tls_version, tls_cipher, alpn,
    peer_cert (getpeercert() dict), peer_der, tls_close ("close_notify" or "truncated": how the
    proxy ended its TLS side). The SNI names sent by the proxy collect in `snis`."""

    def __init__(self, tag=b"", proxy=False, tls=None, end="close", first=False, port=0,
                 host="127.0.0.1", unix_path=None, keep=False, echo=True, after=b"", backlog=1024):
        self.tag, self.proxy, self.tls, self.end, self.first = tag, proxy, tls, end, first
        self.echo = echo
        self.after = after  # sent once the proxy has closed its side, before ending
        self.snis = []
        self.keep = keep
        if tls is not None:
            tls.sni_callback = self._note_sni
        if unix_path:
            self.lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.lsock.bind(str(unix_path))
            self.address = f"unix:{unix_path}"
        else:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self.lsock = socket.socket(family, socket.SOCK_STREAM)
            self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.lsock.bind((host, port))
            self.port = self.lsock.getsockname()[1]
            self.address = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        self.lsock.listen(backlog)
        self.lsock.setblocking(False)
        self._wake_r, self._wake_w = os.pipe()
        self.lock = threading.Lock()
        self.conns = []
        self._threads = []
        self._closing = False
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name=type(self).__name__)
        self.thread.start()

    def close(self):
        """Stops it; a second call (a test stopped it, then the teardown) does nothing."""
        if getattr(self, "_stopped", False):
            return
        self._stopped = True
        super().close()

    def _note_sni(self, sslobj, name, ctx):
        with self.lock:
            self.snis.append(name)

    def handle(self, c):
        c.header = c.header_error = None
        c.tls_version = c.tls_cipher = c.alpn = c.peer_cert = c.peer_der = c.tls_close = None
        if self.proxy:
            try:
                c.header = proxyproto.read_header(c.sock)
            except (ValueError, ConnectionError) as e:
                c.header_error = e
                return
        sock = c.sock
        if self.tls is not None:
            sock = self.tls.wrap_socket(c.sock, server_side=True, suppress_ragged_eofs=False)
            c.sock = sock
            c.tls_version = sock.version()
            c.tls_cipher = sock.cipher()[0]
            c.alpn = sock.selected_alpn_protocol()
            c.peer_cert = sock.getpeercert()
            c.peer_der = sock.getpeercert(binary_form=True)
        if self.tag:
            self.send_all(c, self.tag)
        if self.first:
            self._end(c, sock)
            self._read_raw_to_eof(c)
            return
        while True:
            try:
                d = sock.recv(256 * 1024)
            except ssl.SSLEOFError:
                c.tls_close = "truncated"
                d = b""
            if not d:
                if self.tls is not None and c.tls_close is None:
                    c.tls_close = "close_notify"
                c.eof = True
                c.eof_at = time.monotonic()
                break
            c.received += len(d)
            c.hash.update(d)
            if self.keep:
                c.data += d
            if self.echo:
                sock.sendall(d)
                c.sent += len(d)
        if self.after:
            self.send_all(c, self.after)
        self._end(c, sock)

    def _end(self, c, sock):
        if self.tls is not None and self.end == "close":
            # unwrap() sends close_notify, then waits for the proxy's (bounded by the socket
            # timeout); when the proxy closed first, that has already arrived.
            raw = sock.unwrap()
            c.sock = raw
            raw.shutdown(socket.SHUT_WR)
        else:
            # For an SSLSocket this drops the TLS layer first: FIN without close_notify.
            sock.shutdown(socket.SHUT_WR)

    def _read_raw_to_eof(self, c):
        while True:
            d = c.sock.recv(256 * 1024)
            if not d:
                c.eof = True
                c.eof_at = time.monotonic()
                return


def tag_of(text):
    """The tag a PoolBackend named `text` sends: fixed width, so a reader knows its length."""
    return f"<{text:>8}>".encode()


class TlsHalfCloseFirstBackend(Backend):
    """TLS driven through an ssl.SSLObject, so that it can half-close: sends `greeting`, then its
    close_notify at once while keeping the TCP connection open, then reads (and hashes) until the
    proxy's close_notify or EOF, then closes. Conn gets tls_version and tls_close
    ("close_notify" or "truncated")."""

    def __init__(self, ctx, greeting, *a, **kw):
        self.ctx, self.greeting = ctx, greeting
        super().__init__(*a, **kw)

    def handle(self, c):
        c.tls_version = c.tls_close = None
        inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = self.ctx.wrap_bio(inc, out, server_side=True)

        def flush():
            data = out.read()
            if data:
                c.sock.sendall(data)

        def feed():
            data = c.sock.recv(256 * 1024)
            if data:
                inc.write(data)
            else:
                inc.write_eof()

        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                flush()
                feed()
        flush()
        c.tls_version = obj.version()
        obj.write(self.greeting)
        c.sent += len(self.greeting)
        try:
            obj.unwrap()  # close_notify out; the proxy's has not come yet
        except ssl.SSLWantReadError:
            pass
        flush()
        while True:
            try:
                data = obj.read(256 * 1024)
            except ssl.SSLWantReadError:
                feed()
                continue
            except ssl.SSLZeroReturnError:
                data = b""
            except ssl.SSLEOFError:
                c.tls_close = "truncated"
                break
            if not data:
                c.tls_close = "close_notify"
                break
            c.received += len(data)
            c.hash.update(data)
        c.eof = True
        c.eof_at = time.monotonic()
