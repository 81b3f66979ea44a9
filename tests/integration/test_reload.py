"""Workers, reload (SIGHUP), privilege drop and the descriptor limit, against the real daemon."""

import os
import re
import signal
import ssl
import subprocess
import time

from backends import EchoBackend
from harness import (
    Skip,
    TlsClient,
    check,
    pattern_bytes,
    pattern_sha256,
    raw_connect,
    run_sluice,
    tls_roundtrip,
    wait_until,
)
from test_ops import start_ops


def leaf_der(path):
    """The DER of the first certificate in a PEM file."""
    text = open(path).read()
    end = text.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")
    return ssl.PEM_cert_to_DER_cert(text[text.index("-----BEGIN CERTIFICATE-----"):end])


def served_cert(addr):
    """The certificate a fresh connection to `addr` is served (after a completed handshake)."""
    c = TlsClient(addr).handshake()
    try:
        return c.obj.getpeercert(binary_form=True)
    finally:
        c.close()


def rewrite_config(d, old, new):
    text = d.config_path.read_text()
    check(old in text, f"{old!r} is not in the config")
    d.config_path.write_text(text.replace(old, new))


def thread_cpu_ticks(pid):
    """utime+stime of each thread of `pid`, by thread id."""
    ticks = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = open(f"/proc/{pid}/task/{tid}/stat").read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        ticks[tid] = int(fields[11]) + int(fields[12])
    return ticks


def test_two_workers_share_one_port_and_both_serve(t):
    echo = t.backend(EchoBackend())
    d = t.sluice(t.listener(echo), global_={"workers": 2})
    # The main thread plus two workers (OpenSSL and libuv add no threads of their own here).
    threads = len(os.listdir(f"/proc/{d.pid}/task"))
    check(threads >= 3, f"workers = 2 runs {threads} threads")
    before = thread_cpu_ticks(d.pid)
    clients = []
    for i in range(64):
        c = t.client(d.addr(), keep=False).handshake()
        clients.append(c)
    payload = pattern_bytes(256 * 1024)
    for c in clients:
        c.send(payload)
    for c in clients:
        c.flush(30)
    for c in clients:
        c.run_until(lambda c=c: c.nrecv >= len(payload), 30, "the echo")
        check(c.nrecv == len(payload), f"echo lost bytes: {c.ending()}")
    after = thread_cpu_ticks(d.pid)
    busy = [tid for tid in after if after[tid] - before.get(tid, 0) >= 1]
    check(len(busy) >= 2, f"only {len(busy)} thread(s) did the work of 64 connections: {after}")


def test_reload_under_load_loses_no_byte_and_serves_the_new_certificate(t):
    echo = t.backend(EchoBackend())
    d = t.sluice(t.listener(echo), global_={"workers": 2})
    ecdsa, rsa = leaf_der(t.certs / "server-ecdsa.crt"), leaf_der(t.certs / "server-rsa.crt")
    check(served_cert(d.addr()) == ecdsa, "the configured ECDSA certificate is not served")
    clients = [t.client(d.addr(), keep=False).handshake() for _ in range(8)]
    total = 2 * 1024 * 1024
    chunk = 64 * 1024
    sent = 0
    for reload in range(5):
        # Data is in flight in both directions while the signal arrives.
        for c in clients:
            c.send(pattern_bytes(chunk, offset=sent))
        if reload == 2:
            rewrite_config(d, "server-ecdsa", "server-rsa")
        d.signal(signal.SIGHUP)
        for c in clients:
            c.flush(30)
        sent += chunk
        wait_until(lambda: d.log().count("reload-done") >= reload + 1, 10, f"reload {reload + 1}")
    while sent < total:
        for c in clients:
            c.send(pattern_bytes(chunk, offset=sent))
        sent += chunk
    for c in clients:
        c.flush(30)
        c.run_until(lambda c=c: c.nrecv >= sent, 30, "every echoed byte")
        check(c.nrecv == sent and c.hash.hexdigest() == pattern_sha256(sent),
              f"bytes lost or changed: {c.ending()}")
    check(d.log().count("reload-done") == 5, "five reloads were not all applied")
    check(served_cert(d.addr()) == rsa, "after the reload the new (RSA) certificate is not served")
    d.assert_alive()


def test_broken_certificate_on_reload_keeps_the_old_configuration(t):
    echo = t.backend(EchoBackend())
    d = t.sluice(t.listener(echo))
    ecdsa = leaf_der(t.certs / "server-ecdsa.crt")
    live = t.client(d.addr()).handshake()
    rewrite_config(d, "server-ecdsa.crt", "does-not-exist.crt")
    d.signal(signal.SIGHUP)
    m = d.wait_log(r"reload-failed reason=\"([^\"]*)\"", 10)
    check("does-not-exist.crt" in m.group(1), f"the failure does not name the file: {m.group(0)}")
    # Still serving, with the old certificate, to new and live connections alike.
    check(served_cert(d.addr()) == ecdsa, "the old certificate is no longer served")
    live.sendall(b"still here")
    check(live.recv_exact(10) == b"still here", "a live connection broke on a failed reload")
    # A key that does not match its certificate is refused the same way.
    rewrite_config(d, "does-not-exist.crt", "server-ecdsa.crt")
    rewrite_config(d, "server-ecdsa.key", "server-rsa.key")
    d.signal(signal.SIGHUP)
    wait_until(lambda: d.log().count("reload-failed") == 2, 10, "the second reload to fail")
    check("does not match" in d.log(), "a mismatched key was not reported")
    tls_roundtrip(d.addr(), b"after two failed reloads")


def test_reload_switches_who_derives_the_keys(t):
    # A reload reuses a listener's TLS context when nothing it was built from changed, and
    # global.tls_kdf is part of that: switching it builds the context again. Clients are served
    # before and after, with resumption across the switch.
    echo = t.backend(EchoBackend())
    d = t.sluice(t.listener(echo), global_={"tls_kdf": "sluice"})
    d.wait_log(r"ready .* tls_kdf=sluice$")
    tls_roundtrip(d.addr(), b"before")
    d.signal(signal.SIGHUP)
    wait_until(lambda: d.log().count("reload-done") == 1, 10, "the first reload")
    check(re.search(r"reload-done .* tls_kdf=sluice$", d.log(), re.M), "reload-done: not tls_kdf=sluice")
    reused = d.log().count("tls-context-reused")
    check(reused == 1, f"an unchanged reload did not reuse the context ({reused})")
    rewrite_config(d, 'tls_kdf = "sluice"', 'tls_kdf = "openssl"')
    d.signal(signal.SIGHUP)
    wait_until(lambda: d.log().count("reload-done") == 2, 10, "the second reload")
    check(re.search(r"reload-done .* tls_kdf=openssl$", d.log(), re.M), "reload-done: not tls_kdf=openssl")
    check(d.log().count("tls-context-reused") == reused,
          "the context built for sluice's key derivation was reused for OpenSSL's")
    tls_roundtrip(d.addr(), b"after")
    d.assert_alive()


def test_reload_adds_and_removes_listeners(t):
    echo = t.backend(EchoBackend())
    d = t.sluice(t.listener(echo, name="first"), global_={"workers": 2})
    first = d.addr("first")
    text = d.config_path.read_text()
    second = text.replace('name = "first"', 'name = "second"')
    d.config_path.write_text(text + "\n" + second[second.index("[[listener]]"):])
    d.signal(signal.SIGHUP)
    m = d.wait_log(r"listening listener=second address=127\.0\.0\.1:(\d+)", 10)
    port = int(m.group(1))
    tls_roundtrip(("127.0.0.1", port), b"to the new listener")
    tls_roundtrip(first, b"the unchanged listener kept its socket")
    # Remove the first listener: its socket closes, the second keeps serving, and a connection
    # that was live on the first finishes normally.
    live = t.client(first).handshake()
    d.config_path.write_text(text.replace('name = "first"', 'name = "second"'))
    d.signal(signal.SIGHUP)
    wait_until(lambda: d.log().count("reload-done") == 2, 10, "the second reload")

    def refused():
        try:
            raw_connect(first, timeout=2).close()
        except (ConnectionRefusedError, ConnectionResetError):
            return True
        return False

    wait_until(refused, 5, "the removed listener's socket to close")
    tls_roundtrip(("127.0.0.1", port), b"the second listener still serves")
    live.sendall(b"live on a removed listener")
    check(live.recv_exact(26) == b"live on a removed listener", "a live connection was dropped")


def site_files(t, name):
    """Copies tests/certs NAME.crt and NAME.key to t.tmp as site.crt and site.key, each replaced
    by a rename (as a deploy tool or a Kubernetes Secret update does); returns the listener's
    certificate table."""
    for ext in ("crt", "key"):
        staged = t.tmp / f"site.{ext}.new"
        staged.write_bytes((t.certs / f"{name}.{ext}").read_bytes())
        os.replace(staged, t.tmp / f"site.{ext}")
    return {"cert": str(t.tmp / "site.crt"), "key": str(t.tmp / "site.key")}


def test_changed_files_reload_without_a_signal(t):
    # global.reload_on_change: a certificate and key replaced on disk, and then an edit of the
    # configuration file itself, each reload the daemon with no SIGHUP.
    echo = t.backend(EchoBackend())
    d = t.sluice(t.listener(echo, cert=site_files(t, "server-ecdsa")),
                 global_={"reload_on_change": "200ms", "workers": 2})
    ecdsa, rsa = leaf_der(t.certs / "server-ecdsa.crt"), leaf_der(t.certs / "server-rsa.crt")
    check(served_cert(d.addr()) == ecdsa, "the configured certificate is not served")
    live = t.client(d.addr()).handshake()
    site_files(t, "server-rsa")
    m = d.wait_log(r'files-changed files="([^"]*)"', 10)
    check(set(m.group(1).split(",")) == {str(t.tmp / "site.crt"), str(t.tmp / "site.key")},
          f"the changed files are not named: {m.group(0)}")
    wait_until(lambda: "reload-done" in d.log(), 10, "the reload")
    check(served_cert(d.addr()) == rsa, "the replaced certificate is not served")
    live.sendall(b"across the reload")
    check(live.recv_exact(17) == b"across the reload", "a live connection broke")
    # The configuration file is watched too.
    rewrite_config(d, str(t.tmp / "site.crt"), str(t.certs / "server-ecdsa.crt"))
    rewrite_config(d, str(t.tmp / "site.key"), str(t.certs / "server-ecdsa.key"))
    wait_until(lambda: d.log().count("reload-done") == 2, 10, "the reload for the edited file")
    check(served_cert(d.addr()) == ecdsa, "the certificate named by the edited file is not served")
    check("reload-failed" not in d.log(), "a reload failed")
    # Nothing changes: nothing reloads.
    time.sleep(1)
    check(d.log().count("reload-start") == 2, "the daemon reloaded with nothing changed")


def test_a_broken_changed_file_is_tried_once_and_again_when_it_changes(t):
    echo = t.backend(EchoBackend())
    d = t.sluice(t.listener(echo, cert=site_files(t, "server-ecdsa")),
                 global_={"reload_on_change": "200ms"})
    ecdsa, rsa = leaf_der(t.certs / "server-ecdsa.crt"), leaf_der(t.certs / "server-rsa.crt")
    (t.tmp / "site.crt.new").write_text("not a certificate\n")
    os.replace(t.tmp / "site.crt.new", t.tmp / "site.crt")
    m = d.wait_log(r'reload-failed reason="([^"]*)"', 10)
    check("site.crt" in m.group(1), f"the failure does not name the file: {m.group(0)}")
    time.sleep(1.2)  # six more checks of an unchanged (still broken) file
    check(d.log().count("reload-failed") == 1, "the same broken file was tried again")
    check(served_cert(d.addr()) == ecdsa, "the old certificate is no longer served")
    site_files(t, "server-rsa")
    wait_until(lambda: "reload-done" in d.log(), 10, "the reload once the file is whole")
    check(served_cert(d.addr()) == rsa, "the repaired certificate is not served")


def test_a_certificate_named_before_it_exists_is_loaded_when_it_appears(t):
    # The configuration is edited to name files that are not there yet: that reload fails, and
    # the new names are watched from then on, so the files' arrival reloads it.
    echo = t.backend(EchoBackend())
    d = t.sluice(t.listener(echo, cert=site_files(t, "server-ecdsa")),
                 global_={"reload_on_change": "200ms"})
    rewrite_config(d, str(t.tmp / "site."), str(t.tmp / "next."))
    d.wait_log(r'reload-failed reason="[^"]*next\.crt', 10)
    for ext in ("crt", "key"):
        (t.tmp / f"next.{ext}").write_bytes((t.certs / f"server-rsa.{ext}").read_bytes())
    wait_until(lambda: "reload-done" in d.log(), 10, "the reload once the files exist")
    check(served_cert(d.addr()) == leaf_der(t.certs / "server-rsa.crt"),
          "the certificate that appeared is not served")


def swap_link(link, target):
    """Points the symbolic link `link` at `target` in one rename, as certbot and Kubernetes do."""
    staged = link.parent / (link.name + ".tmp")
    if staged.is_symlink():
        staged.unlink()
    os.symlink(target, staged)
    os.replace(staged, link)


def certbot_layout(t, name, version):
    """conf/site.crt -> live/site/cert.pem -> ../../archive/site/certN.pem, and the same for the
    key: certbot's renewal adds certN+1 to archive/ and swaps the live/ links."""
    archive, live, conf = t.tmp / "archive" / "site", t.tmp / "live" / "site", t.tmp / "conf"
    for folder in (archive, live, conf):
        folder.mkdir(parents=True, exist_ok=True)
    for ext, leaf in (("crt", "cert"), ("key", "privkey")):
        (archive / f"{leaf}{version}.pem").write_bytes((t.certs / f"{name}.{ext}").read_bytes())
        swap_link(live / f"{leaf}.pem", f"../../archive/site/{leaf}{version}.pem")
        if not (conf / f"site.{ext}").is_symlink():
            os.symlink(live / f"{leaf}.pem", conf / f"site.{ext}")
    return {"cert": str(conf / "site.crt"), "key": str(conf / "site.key")}


def kubernetes_layout(t, name, version):
    """A mounted Secret: tls.crt -> ..data/tls.crt, ..data -> ..VERSION/; an update writes a new
    ..VERSION folder, swaps ..data and removes the old folder."""
    volume = t.tmp / "secret"
    current = volume / f"..{version}"
    current.mkdir(parents=True)
    for ext in ("crt", "key"):
        (current / f"tls.{ext}").write_bytes((t.certs / f"{name}.{ext}").read_bytes())
    old = os.readlink(volume / "..data") if (volume / "..data").is_symlink() else None
    swap_link(volume / "..data", current.name)
    for ext in ("crt", "key"):
        if not (volume / f"tls.{ext}").is_symlink():
            os.symlink(f"..data/tls.{ext}", volume / f"tls.{ext}")
    if old:
        for f in (volume / old).iterdir():
            f.unlink()
        (volume / old).rmdir()
    return {"cert": str(volume / "tls.crt"), "key": str(volume / "tls.key")}


def reloads_at_once_on_change(t, layout):
    # With a 60 s interval only inotify can make the reload come within seconds: the folders of
    # the files and of every link on the way to them are watched. No access log: its lines,
    # written beside the configuration, would bring a check forward by themselves.
    echo = t.backend(EchoBackend())
    d, _ = start_ops(t, t.listener(echo, cert=layout(t, "server-ecdsa", 1)), admin=False,
                     log={"access": "off"}, global_={"reload_on_change": "60s"})
    check(served_cert(d.addr()) == leaf_der(t.certs / "server-ecdsa.crt"),
          "the configured certificate is not served")
    start = time.monotonic()
    layout(t, "server-rsa", 2)
    wait_until(lambda: "reload-done" in d.log(), 10, "the reload on the change")
    took = time.monotonic() - start
    check(took < 5, f"the reload came {took:.1f} s after the change")
    check(served_cert(d.addr()) == leaf_der(t.certs / "server-rsa.crt"),
          "the renewed certificate is not served")
    check(d.log().count("reload-start") == 1, "one change made more than one reload")
    # Watched again after the reload: the next renewal is seen as well.
    layout(t, "server-ecdsa", 3)
    wait_until(lambda: d.log().count("reload-done") == 2, 10, "the reload on the second change")
    check(served_cert(d.addr()) == leaf_der(t.certs / "server-ecdsa.crt"),
          "the second renewal is not served")
    check("reload-failed" not in d.log(), "a reload failed")


def test_a_replaced_file_reloads_at_once_without_waiting_for_the_interval(t):
    def plain(t, name, version):
        return site_files(t, name)
    reloads_at_once_on_change(t, plain)


def test_a_certbot_renewal_through_its_links_reloads_at_once(t):
    reloads_at_once_on_change(t, certbot_layout)


def test_a_kubernetes_secret_update_reloads_at_once(t):
    reloads_at_once_on_change(t, kubernetes_layout)


def test_files_are_not_watched_by_default(t):
    echo = t.backend(EchoBackend())
    d = t.sluice(t.listener(echo, cert=site_files(t, "server-ecdsa")))
    site_files(t, "server-rsa")
    time.sleep(1.5)
    check("reload-start" not in d.log(), "the daemon reloaded without reload_on_change")
    check(served_cert(d.addr()) == leaf_der(t.certs / "server-ecdsa.crt"),
          "the certificate changed without a reload")
    d.signal(signal.SIGHUP)
    wait_until(lambda: "reload-done" in d.log(), 10, "the reload on SIGHUP")
    check(served_cert(d.addr()) == leaf_der(t.certs / "server-rsa.crt"),
          "SIGHUP did not load the replaced certificate")


def test_privileges_dropped_after_binding(t):
    if os.geteuid() != 0:
        raise Skip("needs root to drop privileges")
    echo = t.backend(EchoBackend())
    os.chmod(t.tmp, 0o755)
    d = t.sluice(t.listener(echo, listen="127.0.0.1:0"), global_={"user": "nobody"})
    uids = next(line for line in open(f"/proc/{d.pid}/status") if line.startswith("Uid:")).split()[1:]
    check(set(uids) == {str(65534)}, f"sluice still runs with uids {uids}")
    tls_roundtrip(d.addr(), b"served after dropping root")
    d.wait_log(r"privileges-dropped user=nobody", 5)


def root_only_copies(t, names):
    """Copies of the test certificates and keys `names` in a folder only root may enter, each
    file 0600 (the test's folder made 0755, so that an unprivileged user reaches the rest).
    Returns the folder."""
    os.chmod(t.tmp, 0o755)
    keys = t.tmp / "keys"
    keys.mkdir(mode=0o700)
    for name in names:
        for ext in ("crt", "key"):
            target = keys / f"{name}.{ext}"
            target.write_bytes((t.certs / f"{name}.{ext}").read_bytes())
            os.chmod(target, 0o600)
    return keys


def test_root_only_keys_reload_after_dropping_privileges(t):
    # After dropping to an unprivileged user the main thread keeps CAP_DAC_READ_SEARCH (and
    # CAP_NET_BIND_SERVICE) and nothing else, so a reload can read keys only root may read; the
    # workers keep no capability at all.
    if os.geteuid() != 0:
        raise Skip("needs root to drop privileges")
    echo = t.backend(EchoBackend())
    keys = root_only_copies(t, ("server-ecdsa", "server-rsa"))
    cert = {"cert": str(keys / "server-ecdsa.crt"), "key": str(keys / "server-ecdsa.key")}
    d = t.sluice(t.listener(echo, cert=cert), global_={"user": "nobody", "workers": 2})
    d.wait_log(r"privileges-dropped user=nobody .*kept=cap_net_bind_service,cap_dac_read_search", 5)
    cap_net_bind_service, cap_dac_read_search = 10, 2
    expected = (1 << cap_net_bind_service) | (1 << cap_dac_read_search)
    workers = 0
    for tid in os.listdir(f"/proc/{d.pid}/task"):
        status = open(f"/proc/{d.pid}/task/{tid}/status").read()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        uid = fields["Uid"].split()
        check(set(uid) == {"65534"}, f"thread {tid} runs with uids {uid}")
        effective = int(fields["CapEff"].strip(), 16)
        name = fields["Name"].strip()
        if tid == str(d.pid):
            check(effective == expected, f"the main thread keeps capabilities {effective:#x}")
        elif name.startswith("sluice-w"):
            workers += 1
            check(effective == 0, f"worker thread {tid} ({name}) keeps capabilities {effective:#x}")
    # (Other threads, such as a sanitizer runtime's, are not sluice's to check.)
    check(workers == 2, f"found {workers} worker threads named sluice-w*, expected 2")
    ecdsa, rsa = leaf_der(t.certs / "server-ecdsa.crt"), leaf_der(t.certs / "server-rsa.crt")
    check(served_cert(d.addr()) == ecdsa, "the ECDSA certificate is not served")
    # The unprivileged user cannot read the keys itself...
    r = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "cat",
                        str(keys / "server-rsa.key")], capture_output=True)
    check(r.returncode != 0, "nobody can read the root-only key: the test proves nothing")
    # ...yet a reload that switches to the root-only RSA pair succeeds.
    rewrite_config(d, "server-ecdsa", "server-rsa")
    d.signal(signal.SIGHUP)
    d.wait_log(r"reload-done", 10)
    check("reload-failed" not in d.log(), f"the reload failed: {d.log_tail()}")
    check(served_cert(d.addr()) == rsa, "after the reload the root-only RSA certificate is not served")


def test_unknown_user_is_a_startup_error(t):
    echo = t.backend(EchoBackend())
    d = t.sluice(t.listener(echo), global_={"user": "no-such-user-here"}, start=False)
    r = run_sluice(["--config", str(d.config_path)], timeout=20)
    check(r.returncode == 2, f"exit {r.returncode} for an unknown user")
    check("no-such-user-here" in r.stderr, f"the error does not name the user: {r.stderr!r}")


def test_descriptor_limit_raised_to_the_hard_limit(t):
    echo = t.backend(EchoBackend())
    d = t.sluice(t.listener(echo))
    for line in open(f"/proc/{d.pid}/limits"):
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            check(soft == hard, f"soft limit {soft} was not raised to the hard limit {hard}")
            return
    raise AssertionError("no 'Max open files' line in /proc/PID/limits")
