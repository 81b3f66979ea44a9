"""The libsluice examples (examples/), built beside the daemon under test: their self-tests, and
the embedding programs driven from outside like any server (a real TLS client, signals, exit
status). They link libsluice.so, so these also run the library as an embedding program does."""

import os
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

from harness import (
    SANITIZER_MARKERS,
    Skip,
    check,
    parse_address,
    pattern_bytes,
    pattern_sha256,
    sluice_bin,
    tls_roundtrip,
    wait_until,
)


def example(name):
    """The example binary built beside the daemon (BUILD/src/daemon/sluice -> BUILD/examples)."""
    build = Path(sluice_bin()).resolve().parents[2]
    path = build / "examples" / name
    if not os.access(path, os.X_OK):
        raise Skip(f"no {name} in {build}/examples (configured with -Dexamples=false?)")
    return str(path)


def run_example(t, args, timeout=60):
    proc = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace", timeout=timeout)
    out = proc.stdout + proc.stderr
    check(not SANITIZER_MARKERS.search(out), f"sanitizer report from {Path(args[0]).name}:\n{out}")
    check(proc.returncode == 0, f"{Path(args[0]).name} exited {proc.returncode}:\n{out}")
    return proc.stdout


def refuses(addr):
    """True once nothing listens on `addr` (a connect is refused)."""
    try:
        socket.create_connection(addr, timeout=2).close()
        return False
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        return False  # it sat in the backlog as the listener closed: ask again


def cert(t, name):
    return str(t.certs / name)


def test_engine_socketpair_with_its_own_certificate(t):
    out = run_example(t, [example("engine_socketpair")])
    check("identical" in out and "client closed cleanly, server closed cleanly" in out, out)


def test_engine_socketpair_with_the_test_certificates(t):
    for name in ("server-ecdsa", "server-rsa"):
        out = run_example(t, [example("engine_socketpair"), cert(t, f"{name}.crt"), cert(t, f"{name}.key"), cert(t, "ca.crt")])
        check("identical" in out and "client closed cleanly, server closed cleanly" in out, f"{name}: {out}")


def test_engine_socketpair_fails_against_the_wrong_ca(t):
    """The self-check can fail: a client that trusts another CA must not report success."""
    proc = subprocess.run(
        [example("engine_socketpair"), cert(t, "server-ecdsa.crt"), cert(t, "server-ecdsa.key"), cert(t, "other-ca.crt")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    check(proc.returncode == 1, f"exit {proc.returncode} with an untrusted certificate:\n{proc.stdout}{proc.stderr}")
    check("certificate verify failed" in proc.stderr, proc.stderr)


def test_embed_server_self_test(t):
    out = run_example(t, [example("embed_server"), "--self-test", cert(t, "server-ecdsa.crt"), cert(t, "server-ecdsa.key"), cert(t, "ca.crt")])
    check("self-test ok" in out, out)


def test_threaded_server_self_test(t):
    # Two threads, each with its own loop and Server on one port, sharing a HandshakeLimits: the
    # echoes spread over both, and of 12 silent connections 4 are held (the program's
    # max_handshakes_per_ip), not 4 per thread.
    out = run_example(t, [example("threaded_server"), "--self-test", cert(t, "server-ecdsa.crt"), cert(t, "server-ecdsa.key"), cert(t, "ca.crt")])
    check("silent connections: 4 held, 8 closed at accept" in out and "self-test ok" in out, out)


def test_reload_certificates_self_test(t):
    out = run_example(
        t,
        [
            example("reload_certificates"),
            "--self-test",
            cert(t, "server-ecdsa.crt"),
            cert(t, "server-ecdsa.key"),
            cert(t, "server-rsa.crt"),
            cert(t, "server-rsa.key"),
            cert(t, "ca.crt"),
        ],
    )
    check("before-reload ok, after-reload ok, first-connection-kept ok" in out and "self-test ok" in out, out)


class Program:
    """An example started as a server: its "listening NAME ADDRESS" lines up to "ready"."""

    def __init__(self, t, args):
        self.log = t.tmp / f"{Path(args[0]).name}.log"
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=open(self.log, "w"), text=True
        )
        t.defer(self.kill)
        self.listening = {}
        self.lines = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            check(line, f"{args[0]} ended before it was ready:\n{self.log.read_text()}")
            self.lines.append(line.strip())
            if line.startswith("listening "):
                _, name, address = line.split()
                self.listening[name] = parse_address(address)
            if line.strip() == "ready":
                return
        raise AssertionError(f"{args[0]} was not ready in 20 s")

    def read_line(self):
        line = self.proc.stdout.readline()
        check(line, f"no more output:\n{self.log.read_text()}")
        return line.strip()

    def stop(self, sig=signal.SIGTERM, timeout=20):
        """Sends `sig` (None: none, the program is already on its way out) and waits."""
        if sig is not None:
            self.proc.send_signal(sig)
        self.proc.wait(timeout)
        rest = self.proc.stdout.read()
        log = self.log.read_text()
        check(not SANITIZER_MARKERS.search(log), f"sanitizer report:\n{log}")
        return self.proc.returncode, rest, log

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


def drain_with_a_held_connection(t, p, addr):
    """A connection open at SIGTERM is let finish: the listeners close (every one on `addr`), the
    connection still echoes, and once it ends the program exits 0. Returns its last output."""
    held = t.client(addr)
    held.handshake()
    held.sendall(b"held")
    check(held.recv_exact(4) == b"held", "the held connection did not echo")
    p.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: refuses(addr), 10, "the listeners to close at SIGTERM")
    check(p.proc.poll() is None, "the program exited while a connection was open")
    held.sendall(b"still")
    check(held.recv_exact(9) == b"heldstill", "the held connection stopped echoing during the drain")
    held.close_write_tls()
    held.recv_until_closed()
    # The drain ends with the last connection; a second SIGTERM now could meet the default
    # action (the program closed its signal handles), so none is sent.
    code, rest, log = p.stop(None)
    check(code == 0, f"exit status {code}:\n{rest}\n{log}")
    return rest


def test_embed_server_serves_a_real_client_and_drains_on_sigterm(t):
    p = Program(t, [example("embed_server"), cert(t, "server-rsa.crt"), cert(t, "server-rsa.key")])
    addr = p.listening["tls-echo"]
    payload = pattern_bytes(3 * 1024 * 1024 + 11)
    tls_roundtrip(addr, payload)  # checks the echo byte for byte and the clean close
    rest = drain_with_a_held_connection(t, p, addr)
    check("forced=no" in rest, f"the drain was forced:\n{rest}")


def test_threaded_server_spreads_clients_over_its_threads_and_drains_them_all(t):
    p = Program(t, [example("threaded_server"), "--threads", "3", cert(t, "server-rsa.crt"), cert(t, "server-rsa.key")])
    addr = p.listening["tls-echo"]
    check("threads 3" in p.lines, f"{p.lines}")
    for i in range(60):
        tls_roundtrip(addr, pattern_bytes(1000 + i))
    rest = drain_with_a_held_connection(t, p, addr)
    served = [int(line.split()[2]) for line in rest.splitlines() if line.startswith("served ")]
    check(len(served) == 3 and sum(served) == 61, f"served per thread: {served}\n{rest}")
    check(all(n > 0 for n in served), f"a thread served nothing (SO_REUSEPORT did not spread): {served}")


def test_embed_server_in_process_handler_echoes_with_backpressure(t):
    # The "tls-handler" listener's connections go to an EchoHandler in the program: no backend
    # socket. 8 MiB sent in one go goes through the handler's pauseReading()/onWritable()
    # backpressure and comes back byte for byte, then a clean close.
    p = Program(t, [example("embed_server"), cert(t, "server-ecdsa.crt"), cert(t, "server-ecdsa.key")])
    addr = p.listening["tls-handler"]
    tls_roundtrip(addr, pattern_bytes(2 * 1024 * 1024 + 3))
    c = t.client(addr, keep=False)
    c.handshake()
    total = 8 * 1024 * 1024
    c.send(pattern_bytes(total))
    c.close_write_tls()
    c.recv_until_closed(timeout=60)
    check(c.nrecv == total and c.hash.hexdigest() == pattern_sha256(total), f"echo lost bytes: {c.ending()}")
    check(c.close_notify, f"the handler's shutdown() did not reach the client as close_notify: {c.ending()}")
    p.proc.send_signal(signal.SIGTERM)
    code, rest, log = p.stop(None)
    check(code == 0, f"exit status {code}:\n{rest}\n{log}")


def test_reload_certificates_switches_on_sighup(t):
    a = (cert(t, "server-ecdsa.crt"), cert(t, "server-ecdsa.key"))
    b = (cert(t, "server-rsa.crt"), cert(t, "server-rsa.key"))
    p = Program(t, [example("reload_certificates"), *a, *b])
    addr = p.listening["rotating"]

    def served():
        c = t.client(addr)
        c.handshake()
        der = c.obj.getpeercert(binary_form=True)
        c.close()
        return der

    der_a = ssl.PEM_cert_to_DER_cert(Path(a[0]).read_text())
    der_b = ssl.PEM_cert_to_DER_cert(Path(b[0]).read_text())
    check(served() == der_a, "not serving certificate A at start")
    before = t.client(addr)
    before.handshake()
    p.proc.send_signal(signal.SIGHUP)
    line = p.read_line()
    check(line == f"serving {b[0]}", f"after SIGHUP: {line!r}")
    check(served() == der_b, "a new connection after the reload does not see certificate B")
    before.sendall(b"kept")
    check(before.recv_exact(4) == b"kept", "a connection from before the reload stopped echoing")
    before.close_write_tls()
    before.recv_until_closed()
    p.proc.send_signal(signal.SIGHUP)
    check(p.read_line() == f"serving {a[0]}", "the second SIGHUP did not switch back")
    check(served() == der_a, "not serving certificate A after switching back")
    code, rest, log = p.stop(signal.SIGINT)
    check(code == 0, f"exit status {code}:\n{rest}\n{log}")
