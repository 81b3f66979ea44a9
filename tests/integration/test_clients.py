"""Other TLS stacks as clients: openssl s_client, gnutls-cli (GnuTLS) and curl."""

import hashlib
import os
import shutil
import subprocess
import threading

from backends import EchoBackend, HttpBackend, ReplyBackend
from harness import MiB, Skip, check, pattern_bytes, pattern_sha256, wait_until


def need(tool):
    path = shutil.which(tool)
    if not path:
        raise Skip(f"{tool} is not installed (scripts/test installs it)")
    return path


def run_tool(argv, payload=b"", timeout=30):
    p = subprocess.run(argv, input=payload, capture_output=True, timeout=timeout)
    return p


def s_client(t, version_flag):
    need("openssl")
    payload = os.urandom(200_000)
    backend = t.backend(ReplyBackend(len(payload)))
    d = t.sluice(t.listener(backend))
    host, port = d.addr()
    p = run_tool(
        [
            "openssl", "s_client", "-connect", f"{host}:{port}", "-servername", "localhost",
            "-CAfile", str(t.certs / "ca.crt"), "-verify_return_error", "-verify_hostname",
            "localhost", "-quiet", "-nocommands", version_flag,
        ],
        payload,
    )
    check(p.returncode == 0, f"s_client {version_flag} exited {p.returncode}:\n{p.stderr.decode(errors='replace')}")
    check(p.stdout == payload, f"s_client {version_flag}: got {len(p.stdout)} bytes back, sent {len(payload)}")
    check(backend.wait_done().received == len(payload), "the backend did not get every byte")


def test_openssl_s_client_tls13(t):
    s_client(t, "-tls1_3")


def test_openssl_s_client_tls12(t):
    s_client(t, "-tls1_2")


def gnutls(t, priority):
    need("gnutls-cli")
    payload = os.urandom(200_000)
    backend = t.backend(ReplyBackend(len(payload)))
    d = t.sluice(t.listener(backend))
    host, port = d.addr()
    p = run_tool(
        [
            "gnutls-cli", "--x509cafile", str(t.certs / "ca.crt"), "--port", str(port),
            "--priority", priority, "--logfile", str(t.tmp / "gnutls.log"), "localhost",
        ],
        payload,
    )
    log = (t.tmp / "gnutls.log").read_text(errors="replace") if (t.tmp / "gnutls.log").exists() else ""
    check(p.returncode == 0, f"gnutls-cli exited {p.returncode}:\n{p.stderr.decode(errors='replace')}\n{log}")
    check(p.stdout == payload, f"gnutls-cli: got {len(p.stdout)} bytes back, sent {len(payload)}")
    check(backend.wait_done().received == len(payload), "the backend did not get every byte")


def test_gnutls_cli_tls13(t):
    gnutls(t, "NORMAL:-VERS-ALL:+VERS-TLS1.3")


def test_gnutls_cli_tls12(t):
    gnutls(t, "NORMAL:-VERS-ALL:+VERS-TLS1.2")


S_CLIENT_LINE = 1001  # what s_client_echo() sends: the size of the ReplyBackend it talks to


def s_client_echo(t, addr, args, expect, what=""):
    """One TLS 1.3 openssl s_client connection through a ReplyBackend(S_CLIENT_LINE): sends a
    line of that length, checks that s_client printed `expect` and got the line back, and
    returns its output."""
    payload = os.urandom(S_CLIENT_LINE // 2).hex().encode() + b"\n"
    p = run_tool(["openssl", "s_client", "-connect", f"{addr[0]}:{addr[1]}", "-servername",
                  "localhost", "-CAfile", str(t.certs / "ca.crt"), "-verify_return_error",
                  "-ign_eof", "-tls1_3", *args], payload)
    out = p.stdout.decode(errors="replace")
    what = f"{what} s_client {' '.join(args)}".strip()
    check(p.returncode == 0, f"{what} exited {p.returncode}:\n{p.stderr.decode(errors='replace')}")
    check(expect in out, f"{what}: no {expect!r}:\n{out[-3000:]}")
    check(payload.decode() in out, f"{what}: the echo did not come back")
    return out


def test_both_key_derivations_serve_other_stacks_and_resume(t):
    # global.tls_kdf picks who derives the TLS keys: sluice's own TLS 1.3 key schedule and TLS
    # 1.2 PRF, or OpenSSL's. GnuTLS and OpenSSL's s_client derive theirs with their own code, so
    # one wrong byte fails the handshake or the first record. SHA-384 suites and resumptions
    # (binder and resumption secrets, the PRF over a stored master secret) run derivations that
    # AES-128 full handshakes do not.
    need("gnutls-cli")
    need("openssl")
    ca = str(t.certs / "ca.crt")
    for kdf in ("sluice", "openssl"):
        echo = t.backend(EchoBackend())
        d = t.sluice(t.listener(echo), global_={"tls_kdf": kdf})
        d.wait_log(rf"ready version=\S+ workers=1 tls_kdf={kdf}$")
        host, port = d.addr()
        for version in ("TLS1.3", "TLS1.2"):
            for cipher in ("AES-256-GCM", "AES-128-GCM"):
                payload = os.urandom(3000).hex().encode() + b"\n"
                priority = f"NORMAL:-VERS-ALL:+VERS-{version}:-CIPHER-ALL:+{cipher}"
                p = run_tool(["gnutls-cli", "--x509cafile", ca, "--port", str(port), "--resume",
                              "--waitresumption", "--priority", priority, "localhost"], payload)
                said = (p.stdout + p.stderr).decode(errors="replace")
                what = f"tls_kdf={kdf} gnutls-cli {version} {cipher}"
                check(p.returncode == 0, f"{what} exited {p.returncode}:\n{said[-3000:]}")
                check("This is a resumed session" in said, f"{what}: not resumed:\n{said[-3000:]}")
                # With --resume gnutls-cli also prints its progress on standard output.
                check(p.stdout.count(payload) == 1, f"{what}: the echo did not come back whole")
        # s_client ends when the backend closes: each connection gets its bytes back, then FIN.
        reply = t.backend(ReplyBackend(S_CLIENT_LINE))
        r = t.sluice(t.listener(reply), global_={"tls_kdf": kdf})
        session = t.tmp / f"s_client-{kdf}.pem"
        suite = ["-ciphersuites", "TLS_AES_256_GCM_SHA384"]
        for flag, expect in (("-sess_out", "New, TLSv1.3"), ("-sess_in", "Reused, TLSv1.3")):
            s_client_echo(t, r.addr(), suite + [flag, str(session)],
                          expect + ", Cipher is TLS_AES_256_GCM_SHA384", f"tls_kdf={kdf}")
        r.assert_alive()
        d.assert_alive()


class LineClient:
    """openssl s_client run line by line: each line sent on its standard input, its output
    collected by a reader thread, so the test waits for an echo instead of sleeping.
    key_update("K") (or "k") makes it send a TLS 1.3 KeyUpdate asking (or not asking) for one
    back."""

    def __init__(self, argv):
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT)
        self.lines = []
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for raw in self.p.stdout:
            with self.lock:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    def output(self):
        with self.lock:
            return list(self.lines)

    def send(self, line):
        self.p.stdin.write(line.encode() + b"\n")
        self.p.stdin.flush()

    def wait_for(self, line, timeout=10, count=1):
        wait_until(lambda: self.output().count(line) >= count, timeout,
                   f"{line!r} from s_client:\n" + "\n".join(self.output()[-40:]))

    def key_update(self, letter):
        # s_client reads a command only at the start of what one read of its input returns,
        # and drops the rest of that read: wait until it has acted before sending more.
        done = self.output().count("KEYUPDATE")
        self.send(letter)
        self.wait_for("KEYUPDATE", count=done + 1)

    def finish(self, timeout=10):
        self.p.stdin.close()  # s_client sends close_notify and exits at the end of its input
        code = self.p.wait(timeout=timeout)
        self.reader.join(timeout)
        return code


def test_key_updates_from_openssl_rekey_both_directions(t):
    # A TLS 1.3 KeyUpdate changes the keys of one direction and may ask the other side to change
    # its own. Each derivation runs through the key schedule that global.tls_kdf picks, and the
    # client (s_client) derives with OpenSSL's own code, so a wrong byte in either direction
    # breaks the next record. A burst of requested updates each gets its answer, and the
    # stream's bytes stay whole and in order throughout.
    need("openssl")
    for kdf in ("sluice", "openssl"):
        echo = t.backend(EchoBackend())
        d = t.sluice(t.listener(echo), global_={"tls_kdf": kdf})
        host, port = d.addr()
        c = LineClient(["openssl", "s_client", "-connect", f"{host}:{port}", "-servername",
                        "localhost", "-CAfile", str(t.certs / "ca.crt"), "-verify_return_error",
                        "-tls1_3", "-msg"])
        t.defer(c.p.kill)
        c.send("before any update")
        c.wait_for("before any update")
        c.key_update("K")  # update the client's keys and ask sluice to update its own
        c.send("after a requested update")
        c.wait_for("after a requested update")
        c.key_update("k")  # update the client's keys only
        c.send("after an update of one direction")
        c.wait_for("after an update of one direction")
        burst = 50
        for _ in range(burst):
            c.key_update("K")
        c.send("after a burst of updates")
        c.wait_for("after a burst of updates")
        code = c.finish()
        out = c.output()
        what = f"tls_kdf={kdf}"
        check(code == 0, f"{what}: s_client exited {code}:\n" + "\n".join(out[-40:]))
        sent = sum(1 for line in out if line.startswith(">>> ") and line.endswith("KeyUpdate"))
        got = sum(1 for line in out if line.startswith("<<< ") and line.endswith("KeyUpdate"))
        check(sent == burst + 2, f"{what}: s_client sent {sent} KeyUpdates, not {burst + 2}")
        check(got == burst + 1,
              f"{what}: sluice answered {burst + 1} requested KeyUpdates with {got} of its own")
        d.assert_alive()


def test_tickets_allow_no_early_data(t):
    # TLS 1.3 early data (0-RTT) can be replayed by anyone who recorded it, and the backend
    # could not tell, so sluice never allows it: its tickets say "Max Early Data: 0", and a
    # client holding one sends its request after the handshake, where it is not replayable.
    need("openssl")
    d = t.sluice(t.listener(t.backend(ReplyBackend(S_CLIENT_LINE))))
    session = t.tmp / "ticket.pem"
    early = t.tmp / "early.txt"
    early.write_bytes(b"GET /transfer?amount=100 HTTP/1.1\r\n\r\n")
    s_client_echo(t, d.addr(), ["-sess_out", str(session)], "New, TLSv1.3")
    text = run_tool(["openssl", "sess_id", "-in", str(session), "-text", "-noout"])
    said = text.stdout.decode(errors="replace")
    check("Max Early Data: 0\n" in said, f"the ticket allows early data:\n{said}")
    out = s_client_echo(t, d.addr(), ["-sess_in", str(session), "-early_data", str(early)],
                        "Reused, TLSv1.3")
    check("Early data was not sent" in out, f"the client sent early data:\n{out[-3000:]}")
    d.assert_alive()


def curl(t, d, *args, timeout=60):
    need("curl")
    host, port = d.addr()
    p = run_tool(
        ["curl", "--silent", "--show-error", "--fail", "--cacert", str(t.certs / "ca.crt"),
         "--resolve", f"localhost:{port}:{host}", "--max-time", str(timeout - 5), *args],
        timeout=timeout,
    )
    check(p.returncode == 0, f"curl {' '.join(args)} exited {p.returncode}: {p.stderr.decode(errors='replace')}")
    return p.stdout, port


def test_curl_get(t):
    http = t.backend(HttpBackend())
    d = t.sluice(t.listener(http))
    out, port = curl(t, d, f"https://localhost:{d.addr()[1]}/")
    check(out == HttpBackend.GREETING, f"curl got {out!r}")
    n = 8 * MiB + 3
    out, _ = curl(t, d, f"https://localhost:{port}/blob/{n}")
    check(len(out) == n and hashlib.sha256(out).hexdigest() == pattern_sha256(n), f"blob of {len(out)} bytes differs")


def test_curl_post_and_keepalive(t):
    http = t.backend(HttpBackend())
    d = t.sluice(t.listener(http))
    body = t.tmp / "body"
    n = 4 * MiB + 1
    body.write_bytes(pattern_bytes(n))
    port = d.addr()[1]
    # Two requests on one connection (keep-alive), the second one a POST.
    out, _ = curl(t, d, f"https://localhost:{port}/", "--next", "--cacert", str(t.certs / "ca.crt"),
                  "--resolve", f"localhost:{port}:127.0.0.1", "--data-binary", f"@{body}",
                  f"https://localhost:{port}/sha256")
    expect = HttpBackend.GREETING + f"{n} {pattern_sha256(n)}\n".encode()
    check(out == expect, f"curl got {out[:200]!r}")


def test_curl_tls12(t):
    http = t.backend(HttpBackend())
    d = t.sluice(t.listener(http, cert="server-rsa"))
    out, _ = curl(t, d, "--tlsv1.2", "--tls-max", "1.2", f"https://localhost:{d.addr()[1]}/")
    check(out == HttpBackend.GREETING, f"curl got {out!r}")
