"""TLS features through the real daemon and real clients: SNI with many certificates (exact,
wildcard, case, default, strict), RSA and ECDSA for one name, ALPN and its no-overlap policy,
session resumption (TLS 1.3 and 1.2 tickets, the TLS 1.2 session-ID cache, ticket keys shared by
two processes through a key file, random keys that rotate), the number of TLS 1.3 tickets, OCSP
stapling from a file (and its refresh) and fetched from a local `openssl ocsp` responder (and
refreshed to a revocation), and client certificates (required, optional, CRL, allow lists, SPKI
pins, per SNI name).

Certificates come from tests/certs/make-feature-certs, made once per run next to the harness's
certificates."""

import base64
import fcntl
import hashlib
import os
import re
import select
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

from backends import EchoBackend, SilentBackend
from harness import (
    LIGHT,
    REPO,
    Skip,
    certs_dir,
    check,
    client_context,
    run_sluice,
    scaled,
    timeout,
    wait_until,
)

# ---------------------------------------------------------------------------------------------
# Helpers local to these tests.


def feature_certs():
    """The folder made by make-feature-certs, made once per run (a lock keeps parallel tests from
    racing to create it)."""
    d = certs_dir() / "features"
    lock_path = certs_dir() / ".features.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        subprocess.run(
            [str(REPO / "tests/certs/make-feature-certs"), str(d)],
            check=True,
            capture_output=True,
            timeout=120,
        )
    return d


def fc(name):
    return str(feature_certs() / name)


def cert(name, **extra):
    d = {"cert": fc(f"{name}.crt"), "key": fc(f"{name}.key")}
    d.update(extra)
    return d


ALL_SERVER_CERTS = ["default", "alpha", "alpha-rsa", "wild", "exact-wild"]


def listener(t, backend, certs=ALL_SERVER_CERTS, **extra):
    d = {
        "name": "web",
        "listen": "127.0.0.1:0",
        "certificate": [cert(c) if isinstance(c, str) else c for c in certs],
        "backend": backend.address,
    }
    d.update(extra)
    return d


def start(t, certs=ALL_SERVER_CERTS, tls=None, global_=None, **extra):
    echo = t.backend(EchoBackend())
    return t.sluice(listener(t, echo, certs, **extra), tls=tls, global_=global_)


def server_context(verify=True, min_version=None, max_version=None, ciphers=None):
    """A client context that trusts the feature PKI's root."""
    return client_context(fc("root.crt"), min_version, max_version, ciphers, verify)


def subject_cn(peercert):
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


def connect(addr, ctx, server_hostname, payload=b"ping", session=None):
    """One TLS connection that echoes `payload` and ends with close_notify both ways (OpenSSL
    drops a TLS 1.2 session from its cache when the connection ends without one). Returns the
    connection's facts as a dict. The echo makes the client read, so TLS 1.3 tickets have arrived
    when it returns."""
    with socket.create_connection(addr, timeout=10) as raw:
        s = ctx.wrap_socket(raw, server_hostname=server_hostname, session=session)
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            d = s.recv(4096)
            check(d, f"connection closed after {len(got)} echoed bytes")
            got += d
        check(got == payload, "echo mismatch")
        facts = {
            "cn": subject_cn(s.getpeercert()) if ctx.verify_mode != ssl.CERT_NONE else None,
            "der": s.getpeercert(binary_form=True),
            "version": s.version(),
            "cipher": s.cipher()[0],
            "alpn": s.selected_alpn_protocol(),
            "session": s.session,
            "reused": s.session_reused,
        }
        try:
            s.settimeout(5)
            s.unwrap()
        except (ssl.SSLError, OSError):
            pass
        return facts


def expect_handshake_failure(addr, ctx, server_hostname, pattern):
    """The connection must fail (in the handshake or on the first read, which is where a TLS 1.3
    client learns that the server rejected its certificate) with an error matching `pattern`."""
    try:
        connect(addr, ctx, server_hostname)
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as e:
        check(re.search(pattern, str(e), re.I), f"failed, but not with {pattern!r}: {e}")
        return str(e)
    raise AssertionError(f"the connection succeeded; expected a failure matching {pattern!r}")


def s_client(addr, *args, timeout=15):
    """openssl s_client: sends one line, waits until the echo backend returns it (or s_client
    exits, after a failed handshake), then closes its stdin so it sends close_notify and exits.
    Waiting for the echo also means every TLS 1.3 ticket sent before it has been read. Returns
    everything s_client printed."""
    marker = b"marker-line-4711"
    cmd = ["openssl", "s_client", "-connect", f"{addr[0]}:{addr[1]}"] + list(args)
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        try:
            proc.stdin.write(marker + b"\n")
            proc.stdin.flush()
        except BrokenPipeError:
            pass
        fd = proc.stdout.fileno()
        while out.count(marker) < 1 and time.monotonic() < deadline:
            r, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not r:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            out += chunk
        try:
            proc.stdin.close()
        except BrokenPipeError:
            pass
        while time.monotonic() < deadline:
            r, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not r:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            out += chunk
        proc.wait(max(0.1, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    return out.decode(errors="replace")


def key_line():
    return base64.b64encode(os.urandom(80)).decode()


def write_keys(t, name, lines):
    path = t.tmp / name
    path.write_text("# sluice ticket keys, first encrypts\n" + "\n".join(lines) + "\n")
    return str(path)


def client_ctx_with_cert(name=None, min_version=None, max_version=None):
    ctx = server_context(min_version=min_version, max_version=max_version)
    if name:
        ctx.load_cert_chain(fc(f"{name}.crt"), fc(f"{name}.key"))
    return ctx


def spki_sha256(cert_path):
    der = subprocess.run(
        ["sh", "-c", f"openssl x509 -in '{cert_path}' -noout -pubkey | openssl pkey -pubin -outform DER"],
        capture_output=True,
        check=True,
    ).stdout
    return hashlib.sha256(der).hexdigest()


# ---------------------------------------------------------------------------------------------
# SNI and certificates.


def test_sni_picks_exact_wildcard_and_default(t):
    d = start(t)
    ctx = server_context()
    # Exact names, both SANs of one certificate; the chain (with the intermediate) must come along
    # or verification against the root alone fails.
    check(connect(d.addr(), ctx, "alpha.example")["cn"] == "alpha.example", "alpha.example")
    check(connect(d.addr(), ctx, "www.alpha.example")["cn"] == "alpha.example", "www.alpha")
    # A wildcard covers one label; an exact name beats it.
    check(connect(d.addr(), ctx, "foo.wild.example")["cn"] == "*.wild.example", "wildcard")
    check(connect(d.addr(), ctx, "exact.wild.example")["cn"] == "exact.wild.example", "exact")
    # Unknown names, two labels under the wildcard, and no SNI: the first certificate.
    nocheck = server_context()
    nocheck.check_hostname = False
    for name in ("unknown.example", "a.b.wild.example", "wild.example", None):
        got = connect(d.addr(), nocheck, name)["cn"]
        check(got == "default.example", f"SNI {name!r} got {got}, expected the default")
    # Case does not matter (s_client sends the name as written).
    out = s_client(d.addr(), "-servername", "WWW.Alpha.EXAMPLE", "-CAfile", fc("root.crt"))
    check(re.search(r"subject=\s*CN\s*=\s*alpha\.example", out), f"mixed-case SNI:\n{out[-2000:]}")
    check("Verify return code: 0 (ok)" in out, f"chain did not verify:\n{out[-2000:]}")


def test_strict_sni_rejects_unknown_names(t):
    d = start(t, strict_sni=True)
    ctx = server_context()
    check(connect(d.addr(), ctx, "alpha.example")["cn"] == "alpha.example", "known name")
    nocheck = server_context()
    nocheck.check_hostname = False
    expect_handshake_failure(d.addr(), nocheck, "unknown.example", "unrecognized.name")
    d.wait_log(r"handshake-failed .*no certificate for SNI .*unknown\.example")
    # A client without SNI still gets the default certificate.
    check(connect(d.addr(), nocheck, None)["cn"] == "default.example", "no SNI under strict_sni")


def test_rsa_and_ecdsa_for_one_name(t):
    d = start(t)
    # TLS 1.3: the client's signature algorithms decide.
    out = s_client(d.addr(), "-tls1_3", "-servername", "alpha.example", "-sigalgs", "ECDSA+SHA256")
    check("Peer signature type: ECDSA" in out, f"ECDSA-only client:\n{out[-2500:]}")
    out = s_client(
        d.addr(), "-tls1_3", "-servername", "alpha.example", "-sigalgs", "rsa_pss_rsae_sha256"
    )
    check("Peer signature type: RSA-PSS" in out, f"RSA-only client:\n{out[-2500:]}")
    check(re.search(r"Server public key is 2048 bit", out), f"RSA key expected:\n{out[-2500:]}")
    check(re.search(r"subject=\s*CN\s*=\s*alpha\.example", out), "the RSA certificate's name")
    # TLS 1.2: the cipher suites decide.
    rsa = connect(
        d.addr(),
        server_context(max_version=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-RSA-AES128-GCM-SHA256"),
        "alpha.example",
    )
    check(rsa["cipher"].startswith("ECDHE-RSA-") and rsa["cn"] == "alpha.example", f"{rsa['cipher']}")
    ec = connect(
        d.addr(),
        server_context(max_version=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-ECDSA-AES128-GCM-SHA256"),
        "alpha.example",
    )
    check(ec["cipher"].startswith("ECDHE-ECDSA-"), ec["cipher"])
    check(rsa["der"] != ec["der"], "the RSA and the ECDSA client got the same certificate")
    # A name with only an ECDSA certificate must not hand an RSA-only client the RSA certificate
    # of another name.
    nocheck = server_context(max_version=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-RSA-AES128-GCM-SHA256")
    expect_handshake_failure(d.addr(), nocheck, "foo.wild.example", "handshake failure|no shared cipher|alert")
    # gnutls-cli agrees (an independent TLS stack).
    if shutil.which("gnutls-cli"):
        proc = subprocess.run(
            ["gnutls-cli", "--x509cafile", fc("root.crt"), "--port", str(d.addr()[1]),
             "--priority", "NORMAL:-SIGN-ALL:+SIGN-RSA-PSS-RSAE-SHA256:-VERS-ALL:+VERS-TLS1.3",
             "--sni-hostname", "alpha.example", "--verify-hostname", "alpha.example", "127.0.0.1"],
            input=b"", capture_output=True, timeout=15,
        )
        out = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
        check(proc.returncode == 0, f"gnutls-cli failed:\n{out[-2000:]}")
        check(re.search(r"RSA", out) and "Handshake was completed" in out, f"gnutls-cli:\n{out[-2000:]}")


def test_certificates_dir(t):
    # A folder in both supported layouts: NAME.crt + NAME.key, and DIR/fullchain.pem + privkey.pem.
    folder = t.tmp / "certs.d"
    (folder / "live-alpha").mkdir(parents=True)
    shutil.copy(fc("alpha.crt"), folder / "live-alpha" / "fullchain.pem")
    shutil.copy(fc("alpha.key"), folder / "live-alpha" / "privkey.pem")
    shutil.copy(fc("wild.crt"), folder / "wild.crt")
    shutil.copy(fc("wild.key"), folder / "wild.key")
    (folder / "README").write_text("ignored\n")
    d = start(t, certs=["default"], certificates_dir=str(folder))
    ctx = server_context()
    check(connect(d.addr(), ctx, "www.alpha.example")["cn"] == "alpha.example", "from live-alpha/")
    check(connect(d.addr(), ctx, "x.wild.example")["cn"] == "*.wild.example", "from wild.crt")
    nocheck = server_context()
    nocheck.check_hostname = False
    check(connect(d.addr(), nocheck, None)["cn"] == "default.example", "listed cert stays default")
    d.wait_log(r"certificates-loaded listener=web count=3 ")
    # A certificate without its key is an error that names the file.
    (folder / "lonely.crt").write_bytes(Path(fc("default.crt")).read_bytes())
    cfg = t.tmp / "bad.toml"
    cfg.write_text(d.config_path.read_text())
    p = run_sluice(["--config", str(cfg), "--check"])
    check(p.returncode == 2 and "lonely.crt" in p.stderr, f"--check: {p.returncode} {p.stderr}")


# ---------------------------------------------------------------------------------------------
# Protocol policy and ALPN.


def test_signature_algorithms_policy(t):
    # Only ECDSA signatures: an RSA-only TLS 1.3 client cannot complete.
    d = start(t, certs=["alpha", "alpha-rsa"], signature_algorithms="ECDSA+SHA256:ECDSA+SHA384")
    out = s_client(d.addr(), "-tls1_3", "-servername", "alpha.example", "-sigalgs", "ECDSA+SHA256")
    check("Peer signature type: ECDSA" in out, f"ECDSA client:\n{out[-2000:]}")
    out = s_client(d.addr(), "-tls1_3", "-servername", "alpha.example", "-sigalgs", "rsa_pss_rsae_sha256")
    check("Peer signature type" not in out and re.search(r"alert|error", out, re.I), f"RSA client:\n{out[-2000:]}")
    # A name OpenSSL does not know is refused when the configuration is checked.
    cfg = t.tmp / "bad.toml"
    cfg.write_text(d.config_path.read_text().replace("ECDSA+SHA256:ECDSA+SHA384", "ECDSA+MD17"))
    p = run_sluice(["--config", str(cfg), "--check"])
    check(p.returncode == 2 and "signature_algorithms" in p.stderr, f"{p.returncode} {p.stderr}")


def test_alpn_server_preference_and_no_overlap(t):
    d = start(t, alpn=["h2", "http/1.1"], global_={"log_level": "debug"})
    ctx = server_context()
    ctx.set_alpn_protocols(["http/1.1", "h2"])
    check(connect(d.addr(), ctx, "alpha.example")["alpn"] == "h2", "our preference wins")
    ctx = server_context()
    ctx.set_alpn_protocols(["http/1.1"])
    check(connect(d.addr(), ctx, "alpha.example")["alpn"] == "http/1.1", "the only overlap")
    out = s_client(d.addr(), "-servername", "alpha.example", "-alpn", "spdy/3,h2")
    check("ALPN protocol: h2" in out, f"s_client -alpn:\n{out[-2000:]}")
    # No overlap, default policy: the handshake proceeds without ALPN.
    ctx = server_context()
    ctx.set_alpn_protocols(["spdy/3"])
    check(connect(d.addr(), ctx, "alpha.example")["alpn"] is None, "no ALPN on no overlap")
    d.wait_log(r'handshake listener=web .*alpn="h2"')


def test_alpn_mismatch_fail(t):
    d = start(t, alpn=["h2"], alpn_mismatch="fail")
    ctx = server_context()
    ctx.set_alpn_protocols(["http/1.1"])
    expect_handshake_failure(d.addr(), ctx, "alpha.example", "no.application.protocol")
    d.wait_log(r"handshake-failed listener=web")
    # A client that offers no ALPN at all is not affected.
    check(connect(d.addr(), server_context(), "alpha.example")["alpn"] is None, "no ALPN offered")


# ---------------------------------------------------------------------------------------------
# Session resumption.


def resumes(addr, ctx, session, name="alpha.example"):
    return connect(addr, ctx, name, session=session)["reused"]


def test_resumption_tls13_tls12_tickets_and_cache(t):
    d = start(t)
    for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
        ctx = server_context(min_version=version, max_version=version)
        first = connect(d.addr(), ctx, "alpha.example")
        check(not first["reused"] and first["session"] is not None, f"{version.name}: first")
        check(resumes(d.addr(), ctx, first["session"]), f"{version.name}: ticket not resumed")
    # TLS 1.2 without tickets: the session-ID cache.
    ctx = server_context(min_version=ssl.TLSVersion.TLSv1_2, max_version=ssl.TLSVersion.TLSv1_2)
    ctx.options |= ssl.OP_NO_TICKET
    first = connect(d.addr(), ctx, "alpha.example")
    check(first["session"].has_ticket is False, "the client asked for no ticket")
    check(resumes(d.addr(), ctx, first["session"]), "TLS 1.2 session-ID cache did not resume")


def test_tls13_resumption_brings_a_fresh_ticket(t):
    # A TLS 1.3 client uses each ticket once (RFC 8446, C.4): a resumed connection must bring a
    # new ticket, or every other connection of such a client is a full handshake. OpenSSL names
    # a client session after the ticket it holds, so a new ticket shows as a new session ID.
    d = start(t)
    ctx = server_context(min_version=ssl.TLSVersion.TLSv1_3, max_version=ssl.TLSVersion.TLSv1_3)
    session = connect(d.addr(), ctx, "alpha.example")["session"]
    check(session is not None and session.has_ticket, "no ticket after a full handshake")
    for n in range(1, 4):
        resumed = connect(d.addr(), ctx, "alpha.example", session=session)
        check(resumed["reused"], f"resumption {n} with the latest ticket did not resume")
        fresh = resumed["session"]
        check(fresh is not None and fresh.has_ticket and fresh.id != session.id,
              f"resumption {n} brought no new ticket")
        session = fresh
    # TLS 1.2 tickets are reused by design; a ticket of the current key is not replaced.
    ctx = server_context(min_version=ssl.TLSVersion.TLSv1_2, max_version=ssl.TLSVersion.TLSv1_2)
    first = connect(d.addr(), ctx, "alpha.example")["session"]
    again = connect(d.addr(), ctx, "alpha.example", session=first)
    check(again["reused"], "TLS 1.2 ticket not resumed")
    check(again["session"].id == first.id, "a TLS 1.2 ticket of the current key was replaced")


def test_resumption_disabled_by_config(t):
    d = start(t, session_tickets=0, session_cache=0)
    for version, no_ticket in (
        (ssl.TLSVersion.TLSv1_3, False),
        (ssl.TLSVersion.TLSv1_2, False),
        (ssl.TLSVersion.TLSv1_2, True),
    ):
        ctx = server_context(min_version=version, max_version=version)
        if no_ticket:
            ctx.options |= ssl.OP_NO_TICKET
        first = connect(d.addr(), ctx, "alpha.example")
        if first["session"] is None:
            continue  # TLS 1.3 without tickets: nothing to resume with
        check(not resumes(d.addr(), ctx, first["session"]), f"{version.name} resumed with both off")


def count_tickets(addr):
    out = s_client(addr, "-tls1_3", "-servername", "alpha.example")
    check("marker-line-4711" in out, f"no echo through s_client:\n{out[-2000:]}")
    return out.count("Post-Handshake New Session Ticket arrived")


def test_tls13_ticket_count(t):
    default = start(t)
    check(count_tickets(default.addr()) == 1, "one ticket by default")
    d3 = start(t, session_tickets=3)
    check(count_tickets(d3.addr()) == 3, "session_tickets = 3")
    d1 = start(t, session_tickets=1)
    check(count_tickets(d1.addr()) == 1, "session_tickets = 1")
    d0 = start(t, session_tickets=0)
    check(count_tickets(d0.addr()) == 0, "session_tickets = 0")


def test_tls13_ticket_arrives_when_the_backend_never_replies(t):
    # sluice keeps a TLS 1.3 ticket to send with the first reply; a backend that never replies
    # must not keep it from the client for long.
    silent = t.backend(SilentBackend())
    d = t.sluice(listener(t, silent))
    ctx = server_context(min_version=ssl.TLSVersion.TLSv1_3, max_version=ssl.TLSVersion.TLSv1_3)
    with socket.create_connection(d.addr(), timeout=10) as raw:
        s = ctx.wrap_socket(raw, server_hostname="alpha.example")
        s.sendall(b"a request that gets no answer")
        s.settimeout(2)
        try:
            got = s.recv(4096)  # reads, and so processes, the ticket; no data comes
            check(False, f"the silent backend answered {got!r}")
        except (TimeoutError, socket.timeout):
            pass
        session = s.session
        check(session is not None and session.has_ticket, "no ticket within 2 s without a reply")
    with socket.create_connection(d.addr(), timeout=10) as raw:
        s = ctx.wrap_socket(raw, server_hostname="alpha.example", session=session)
        check(s.session_reused, "the ticket sent without a reply does not resume")
        s.close()


def test_tls13_ticket_waits_for_the_first_reply(t):
    # sluice holds a TLS 1.3 ticket for up to 50 ms so that the backend's first reply takes it
    # along in one write. With a backend that stays silent the ticket leaves on its own, and not
    # before the hold is over: one sent as the handshake ends would arrive within a millisecond
    # or two. The client is Python's ssl over memory BIOs, so the socket shows when the bytes
    # after the handshake arrive. (A slow machine only makes them later.)
    silent = t.backend(SilentBackend())
    d = t.sluice(listener(t, silent))
    ctx = server_context(min_version=ssl.TLSVersion.TLSv1_3, max_version=ssl.TLSVersion.TLSv1_3)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    with socket.create_connection(d.addr(), timeout=10) as raw:
        s = ctx.wrap_bio(incoming, outgoing, server_hostname="alpha.example")
        while True:
            try:
                s.do_handshake()
                break
            except ssl.SSLWantReadError:
                raw.sendall(outgoing.read())
                data = raw.recv(65536)
                check(data, "sluice closed during the handshake")
                incoming.write(data)
        raw.sendall(outgoing.read())  # the client's Finished: sluice's handshake ends on it
        sent = time.monotonic()
        readable, _, _ = select.select([raw], [], [], 5)
        arrived = time.monotonic()
        check(readable, "no ticket within 5 s after the handshake")
        incoming.write(raw.recv(65536))
        try:
            got = s.read(4096)
            check(False, f"the silent backend answered {got!r}")
        except ssl.SSLWantReadError:
            pass
        check(s.session is not None and s.session.has_ticket, "what arrived was not a ticket")
        waited = arrived - sent
        check(waited >= 0.040, f"the ticket came {waited * 1000:.1f} ms after the handshake: "
              "it did not wait for a reply")


def test_ticket_keys_shared_between_processes(t):
    k1, k2 = key_line(), key_line()
    a = start(t, tls={"ticket_keys": write_keys(t, "a.keys", [k1])})
    b = start(t, tls={"ticket_keys": write_keys(t, "b.keys", [k2, k1])})
    for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
        ctx = server_context(min_version=version, max_version=version)
        from_a = connect(a.addr(), ctx, "alpha.example")["session"]
        # B decrypts with k1 (its second key): the operator prepended k2 and A's tickets live on.
        check(resumes(b.addr(), ctx, from_a), f"{version.name}: A's ticket did not resume on B")
        # B encrypts with k2, which A does not have.
        from_b = connect(b.addr(), ctx, "alpha.example")["session"]
        check(resumes(b.addr(), ctx, from_b), f"{version.name}: B's ticket on B")
        check(not resumes(a.addr(), ctx, from_b), f"{version.name}: B's k2 ticket resumed on A")
    # Without a key file, two processes never share tickets.
    c = start(t)
    e = start(t)
    ctx = server_context()
    from_c = connect(c.addr(), ctx, "alpha.example")["session"]
    check(resumes(c.addr(), ctx, from_c), "random keys resume on the same process")
    check(not resumes(e.addr(), ctx, from_c), "random keys resumed on another process")


def test_random_ticket_keys_rotate(t):
    d = start(t, tls={"ticket_key_rotation": "1s"})
    ctx = server_context()
    old = connect(d.addr(), ctx, "alpha.example")["session"]
    check(resumes(d.addr(), ctx, old), "a fresh ticket resumes")
    # Three keys are kept (current and two previous), so within a few rotations the first key is
    # dropped and its ticket stops resuming. Bounded by a deadline; each try is a handshake.
    started = time.monotonic()
    wait_until(lambda: not resumes(d.addr(), ctx, old), scaled(15, 30), "the old ticket to expire")
    elapsed = time.monotonic() - started
    check(elapsed >= 1.0, f"the ticket stopped resuming after {elapsed:.2f}s, before one rotation")
    fresh = connect(d.addr(), ctx, "alpha.example")["session"]
    check(resumes(d.addr(), ctx, fresh), "a ticket from the new key resumes")


def test_bad_ticket_key_file_is_refused(t):
    bad = write_keys(t, "bad.keys", [key_line(), base64.b64encode(os.urandom(48)).decode()])
    echo = t.backend(EchoBackend())
    d = t.sluice(listener(t, echo), tls={"ticket_keys": bad}, start=False)
    p = run_sluice(["--config", str(d.config_path), "--check"])
    check(p.returncode == 2, f"exit {p.returncode}")
    check(re.search(r"bad\.keys line 3: a key is 80 bytes .* 48", p.stderr), p.stderr)


# ---------------------------------------------------------------------------------------------
# OCSP stapling.


def ocsp_status(addr, name):
    return s_client(addr, "-status", "-servername", name, "-CAfile", fc("root.crt"))


def next_update(out):
    m = re.search(r"Next Update: (.+)", out)
    return m and m.group(1).strip()


def test_ocsp_stapling_from_file_and_refresh(t):
    staple = t.tmp / "alpha.ocsp"
    shutil.copy(fc("alpha.ocsp"), staple)
    d = start(t, certs=["default", cert("alpha", ocsp=str(staple)), "alpha-rsa"])
    out = ocsp_status(d.addr(), "alpha.example")
    check("OCSP Response Status: successful" in out and "Cert Status: good" in out, out[-3000:])
    first = next_update(out)
    check(first, "no Next Update in the stapled response")
    # The default certificate has no staple; neither has the RSA twin of alpha.
    out = ocsp_status(d.addr(), "default.example")
    check("OCSP response: no response sent" in out, f"default.example:\n{out[-2000:]}")
    # A fresh response (valid two days) replaces the file: sluice staples it without a restart.
    certs = feature_certs()
    req = t.tmp / "alpha.req"
    subprocess.run(["sh", "-c", f"openssl x509 -in '{certs}/alpha.crt' > '{t.tmp}/alpha.leaf'"], check=True)
    subprocess.run(
        ["openssl", "ocsp", "-issuer", str(certs / "inter.crt"), "-cert", str(t.tmp / "alpha.leaf"),
         "-no_nonce", "-reqout", str(req)],
        check=True, capture_output=True,
    )
    index = t.tmp / "index.txt"
    shutil.copy(certs / "ocsp-index.txt", index)
    (t.tmp / "index.txt.attr").write_text("unique_subject = no\n")
    fresh = t.tmp / "fresh.ocsp"
    subprocess.run(
        ["openssl", "ocsp", "-index", str(index), "-CA", str(certs / "inter.crt"), "-rsigner",
         str(certs / "inter.crt"), "-rkey", str(certs / "inter.key"), "-reqin", str(req),
         "-respout", str(fresh), "-ndays", "2"],
        check=True, capture_output=True,
    )
    # Garbage first: it must be refused and the old response kept.
    tmp = t.tmp / "staple.tmp"
    tmp.write_bytes(b"not an OCSP response")
    os.replace(tmp, staple)
    d.wait_log(r"ocsp-rejected file=.*alpha\.ocsp", timeout=10)
    check(next_update(ocsp_status(d.addr(), "alpha.example")) == first, "the old staple was dropped")
    shutil.copy(fresh, tmp)
    os.replace(tmp, staple)
    wait_until(
        lambda: (lambda nu: nu and nu != first)(next_update(ocsp_status(d.addr(), "alpha.example"))),
        10,
        "the refreshed staple",
        interval=0.2,
    )


def test_ocsp_for_another_certificate_is_refused(t):
    echo = t.backend(EchoBackend())
    d = t.sluice(listener(t, echo, certs=[cert("alpha", ocsp=fc("default.ocsp"))]), start=False)
    p = run_sluice(["--config", str(d.config_path), "--check"])
    check(p.returncode == 2 and "another certificate" in p.stderr, f"{p.returncode} {p.stderr}")


def make_aia_leaf(t, name, cn, ocsp_url):
    """A leaf signed by the feature intermediate whose authorityInfoAccess names `ocsp_url`.
    Returns (chain file, key file, its responder index line)."""
    certs = feature_certs()
    key, csr, ext, leaf, chain = (t.tmp / f"{name}.{x}" for x in ("key", "csr", "ext", "leaf", "crt"))
    subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-out", str(key)], check=True, capture_output=True)
    subprocess.run(["openssl", "req", "-new", "-key", str(key), "-out", str(csr), "-subj", f"/CN={cn}"],
                   check=True, capture_output=True)
    ext.write_text(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        f"extendedKeyUsage=serverAuth\nsubjectAltName=DNS:{cn}\n"
        f"authorityInfoAccess=OCSP;URI:{ocsp_url}\n"
    )
    subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(certs / "inter.crt"),
                    "-CAkey", str(certs / "inter.key"), "-set_serial", str(int.from_bytes(os.urandom(8), "big")),
                    "-out", str(leaf), "-days", "30", "-sha256", "-extfile", str(ext)],
                   check=True, capture_output=True)
    chain.write_text(leaf.read_text() + (certs / "inter.crt").read_text())
    serial = subprocess.run(["openssl", "x509", "-in", str(leaf), "-noout", "-serial"], check=True,
                            capture_output=True, text=True).stdout.strip().split("=")[1]
    end = subprocess.run(["openssl", "x509", "-in", str(leaf), "-noout", "-enddate"], check=True,
                         capture_output=True, text=True).stdout.strip().split("=")[1]
    expiry = time.strftime("%y%m%d%H%M%SZ", time.strptime(end, "%b %d %H:%M:%S %Y GMT"))
    return chain, key, (expiry, serial, cn)


def write_index(path, entries):
    """An `openssl ocsp -index` database; entries are (expiry, serial, cn, revoked_at or None).
    Replaced with a new inode, which is what makes the responder reload it."""
    lines = []
    for expiry, serial, cn, revoked_at in entries:
        status = "R" if revoked_at else "V"
        lines.append(f"{status}\t{expiry}\t{revoked_at or ''}\t{serial}\tunknown\t/CN={cn}\n")
    Path(str(path) + ".attr").write_text("unique_subject = no\n")
    tmp = Path(str(path) + ".tmp")
    tmp.write_text("".join(lines))
    os.replace(tmp, path)


def start_ocsp_responder(t, index, port):
    """`openssl ocsp` answering for the feature intermediate on 127.0.0.1:port (it re-reads the
    index when the file changes). Stopped when the test ends."""
    certs = feature_certs()
    log = open(t.tmp / "ocsp-responder.log", "wb")
    proc = subprocess.Popen(
        ["openssl", "ocsp", "-index", str(index), "-port", str(port), "-CA", str(certs / "inter.crt"),
         "-rsigner", str(certs / "inter.crt"), "-rkey", str(certs / "inter.key"), "-ndays", "1",
         "-ignore_err"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
    )

    def stop():
        proc.kill()
        proc.wait()
        log.close()

    t.defer(stop)
    return proc


def test_ocsp_auto_fetches_from_the_responder_and_refreshes(t):
    from harness import free_loopback_port

    index = t.tmp / "responder-index.txt"
    # The responder's port is written into the certificate before the responder binds it, so
    # another process can take it in between: try again with a new port and certificate.
    for attempt in range(5):
        port = free_loopback_port()
        chain, key, (expiry, serial, cn) = make_aia_leaf(t, "fetched", "fetched.example",
                                                         f"http://127.0.0.1:{port}/")
        write_index(index, [(expiry, serial, cn, None)])
        responder = start_ocsp_responder(t, index, port)

        def listening():
            # Read its log rather than probing the port: `openssl ocsp` serves one connection
            # at a time and a probe could hold it up.
            if b"waiting for OCSP client connections" in (t.tmp / "ocsp-responder.log").read_bytes():
                return "up"
            return "exited" if responder.poll() is not None else None

        if wait_until(listening, 10, "the OCSP responder to listen") == "up":
            break
    else:
        raise AssertionError("the OCSP responder could not bind a port in 5 attempts")
    d = start(t, certs=["default", {"cert": str(chain), "key": str(key), "ocsp": "auto"}],
              tls={"ocsp_refresh": "1s"})
    d.wait_log(r"ocsp-fetched cert=.*fetched\.crt .*status=good", timeout=20)
    out = ocsp_status(d.addr(), "fetched.example")
    check("OCSP Response Status: successful" in out and "Cert Status: good" in out, out[-3000:])
    check(next_update(out), "no Next Update in the fetched staple")
    # The default certificate has no staple.
    out = ocsp_status(d.addr(), "default.example")
    check("OCSP response: no response sent" in out, f"default.example:\n{out[-2000:]}")
    # The responder now says revoked; the next refresh (ocsp_refresh = 1s) staples that.
    write_index(index, [(expiry, serial, cn, time.strftime("%y%m%d%H%M%SZ", time.gmtime()))])
    wait_until(
        lambda: "Cert Status: revoked" in ocsp_status(d.addr(), "fetched.example"),
        20,
        "the revoked status from the responder",
        interval=0.5,
    )
    d.wait_log(r"ocsp-revoked cert=.*fetched\.crt")
    # The responder goes away: fetches fail and are retried with backoff; the last good
    # response stays stapled while it is valid.
    responder.kill()
    responder.wait()
    d.wait_log(r"ocsp-fetch-failed cert=.*fetched\.crt .*retry_in=\d+s", timeout=20)
    check("Cert Status: revoked" in ocsp_status(d.addr(), "fetched.example"), "the staple was dropped")


def test_ocsp_auto_needs_a_responder_url(t):
    echo = t.backend(EchoBackend())
    d = t.sluice(listener(t, echo, certs=[cert("alpha", ocsp="auto")]), start=False)
    p = run_sluice(["--config", str(d.config_path), "--check"])
    check(p.returncode == 2 and "no OCSP responder" in p.stderr, f"{p.returncode} {p.stderr}")


# ---------------------------------------------------------------------------------------------
# Client certificates.


def auth(mode="required", **extra):
    d = {"mode": mode, "ca": fc("client-ca.crt"), "crl": [fc("clients.crl")]}
    d.update(extra)
    return d


def test_client_auth_required(t):
    d = start(t, client_auth=auth(), global_={"log_level": "debug"})
    for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
        ok = connect(d.addr(), client_ctx_with_cert("client-good", version, version), "alpha.example")
        check(ok["version"] == version.name.replace("v1_", "v1."), ok["version"])
        expect_handshake_failure(
            d.addr(), client_ctx_with_cert(None, version, version), "alpha.example",
            "certificate.required|handshake.failure",
        )
        expect_handshake_failure(
            d.addr(), client_ctx_with_cert("client-wrongca", version, version), "alpha.example",
            "unknown.ca",
        )
        expect_handshake_failure(
            d.addr(), client_ctx_with_cert("client-revoked", version, version), "alpha.example",
            "certificate.revoked",
        )
    # The log says why, and the verified identity reaches the proxy.
    d.wait_log(r'handshake listener=web .*client="spiffe://sluice\.test/ns/web" .*client_verified=yes')
    d.wait_log(r"handshake-failed .*peer did not return a certificate")
    d.wait_log(r'handshake-failed .*CN=good-client.*unable to get local issuer certificate')
    d.wait_log(r'handshake-failed .*CN=revoked-client.*certificate revoked')


def test_client_auth_optional(t):
    d = start(t, client_auth=auth("optional"), global_={"log_level": "debug"})
    check(connect(d.addr(), client_ctx_with_cert(None), "alpha.example")["version"], "no cert")
    connect(d.addr(), client_ctx_with_cert("client-good"), "alpha.example")
    d.wait_log(r'handshake listener=web .*client="spiffe://sluice\.test/ns/web"')
    # A certificate that is presented must still verify.
    expect_handshake_failure(d.addr(), client_ctx_with_cert("client-wrongca"), "alpha.example", "unknown.ca")


def test_client_auth_allow_lists(t):
    cases = [
        ({"allow_uri": ["spiffe://sluice.test/ns/*"]}, "client-good", "client-other"),
        ({"allow_dns": ["*.elsewhere.test"]}, "client-other", "client-good"),
        ({"allow_cn": ["good-*"]}, "client-good", "client-other"),
        ({"allow_spki_sha256": [spki_sha256(fc("client-other.crt"))]}, "client-other", "client-good"),
    ]
    for lists, allowed, refused in cases:
        d = start(t, client_auth=auth(**lists))
        connect(d.addr(), client_ctx_with_cert(allowed), "alpha.example")
        expect_handshake_failure(d.addr(), client_ctx_with_cert(refused), "alpha.example", "bad.certificate")
        d.wait_log(r"handshake-failed .*client certificate not in the allow lists: subject")
        d.stop()
    # A session resumed from an allowed client keeps its identity; nothing else is needed.


def test_client_auth_per_sni_name(t):
    # One listener, no client_auth of its own; alpha.example requires a client certificate
    # (with an allow list), default.example does not.
    d = start(t, certs=["default", cert("alpha", client_auth=auth(allow_cn=["good-*"])), "wild"],
              global_={"log_level": "debug"})
    for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
        plain = client_ctx_with_cert(None, version, version)
        check(connect(d.addr(), plain, "default.example")["cn"] == "default.example", "default")
        check(connect(d.addr(), plain, "x.wild.example")["cn"] == "*.wild.example", "wildcard")
        expect_handshake_failure(d.addr(), plain, "alpha.example",
                                 "certificate.required|handshake.failure")
        good = client_ctx_with_cert("client-good", version, version)
        check(connect(d.addr(), good, "alpha.example")["cn"] == "alpha.example", "alpha with a cert")
        expect_handshake_failure(d.addr(), client_ctx_with_cert("client-wrongca", version, version),
                                 "alpha.example", "unknown.ca")
        expect_handshake_failure(d.addr(), client_ctx_with_cert("client-revoked", version, version),
                                 "alpha.example", "certificate.revoked")
        expect_handshake_failure(d.addr(), client_ctx_with_cert("client-other", version, version),
                                 "alpha.example", "bad.certificate")
        # A session from the name without client_auth must not let a client into the other one.
        first = connect(d.addr(), plain, "default.example")
        check(first["session"] is not None, "no session to resume")
        try:
            resumed = connect(d.addr(), plain, "alpha.example", session=first["session"])
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            resumed = None
        check(resumed is None, f"{version.name}: a default.example session got into alpha.example")
    d.wait_log(r'handshake listener=web .*client="spiffe://sluice\.test/ns/web" .*client_verified=yes')
    d.wait_log(r"handshake-failed .*client certificate not in the allow lists: subject")

    # The other way round: the listener requires a certificate, one name turns it off.
    d2 = start(t, certs=["default", cert("alpha", client_auth={"mode": "none"})], client_auth=auth())
    plain = client_ctx_with_cert(None)
    check(connect(d2.addr(), plain, "alpha.example")["cn"] == "alpha.example", "alpha without a cert")
    expect_handshake_failure(d2.addr(), plain, "default.example", "certificate.required|handshake.failure")
    connect(d2.addr(), client_ctx_with_cert("client-good"), "default.example")


# ---------------------------------------------------------------------------------------------
# Scale: many certificates in one listener.


def make_many_certificates(folder, n):
    """n ECDSA certificates (one key each) for host-i.scale.test, signed by one CA: with
    python3-cryptography when it is installed (fast), otherwise with the openssl command."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
        import datetime
    except ImportError:
        x509 = None
    if x509 is None:
        key = folder / "shared.key"
        subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt",
                        "ec_paramgen_curve:P-256", "-out", str(key)], check=True, capture_output=True)
        for i in range(n):
            name = f"host-{i}.scale.test"
            subprocess.run(["openssl", "req", "-x509", "-key", str(key), "-subj", f"/CN={name}",
                            "-addext", f"subjectAltName=DNS:{name}", "-days", "30",
                            "-out", str(folder / f"{name}.crt")], check=True, capture_output=True)
            shutil.copy(key, folder / f"{name}.key")
        return
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "scale CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    for i in range(n):
        name = f"host-{i}.scale.test"
        key = ec.generate_private_key(ec.SECP256R1())
        c = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        (folder / f"{name}.crt").write_bytes(c.public_bytes(serialization.Encoding.PEM))
        (folder / f"{name}.key").write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
        )


@timeout(600)
def test_many_certificates_load_fast_and_small(t):
    """Loads N certificates (SLUICE_SCALE_CERTS, default 1000) from a certificates_dir, checks a
    few names, and reports the load time and the memory per certificate (RSS delta / N)."""
    n = int(os.environ.get("SLUICE_SCALE_CERTS", scaled(1000, 300)))
    folder = t.tmp / "many"
    make_many_certificates(folder, n)
    base = start(t, certs=["default"])
    base_rss = base.rss()
    d = start(t, certs=["default"], certificates_dir=str(folder))
    rss = d.rss()
    m = d.wait_log(r"certificates-loaded listener=web count=(\d+) names=(\d+) ms=(\d+)")
    count, ms = int(m.group(1)), int(m.group(3))
    check(count == n + 1, f"loaded {count}, expected {n + 1}")
    per_cert = (rss - base_rss) / n
    print(f"scale: {n} certificates loaded in {ms} ms; RSS {base_rss / 2**20:.1f} MiB -> "
          f"{rss / 2**20:.1f} MiB, {per_cert / 1024:.1f} KiB per certificate")
    (t.tmp.parent / "sluice-scale-result.txt").write_text(
        f"{n} certificates: load {ms} ms, {per_cert / 1024:.1f} KiB per certificate\n")
    # Load time is reported above, not asserted: speed is measured by scripts/bench. Memory is
    # asserted only without sanitizers, whose redzones and quarantine inflate every allocation.
    if not LIGHT:
        check(per_cert < 64 * 1024, f"{per_cert / 1024:.1f} KiB per certificate")
    nocheck = server_context(verify=False)
    for i in (0, n // 2, n - 1):
        name = f"host-{i}.scale.test"
        der = connect(d.addr(), nocheck, name)["der"]
        check(name.encode() in der, f"{name} was not served its own certificate")
