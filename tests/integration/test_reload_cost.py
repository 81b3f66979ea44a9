"""Reload cost is proportional to what changed: a listener whose TLS settings and files are
unchanged keeps its SSL_CTX across a reload (no second copy of a thousand certificates), and a
changed certificate file is still picked up."""

import os
import shutil
import signal
import ssl

from harness import LIGHT, check, scaled, timeout, wait_until
from test_tls_features import connect, make_many_certificates, server_context, start


def reloads_done(d):
    return d.log().count("reload-done")


def reload_and_wait(d):
    n = reloads_done(d)
    d.signal(signal.SIGHUP)
    wait_until(lambda: reloads_done(d) > n or "reload-failed" in d.log(), 30, "the reload")
    check("reload-failed" not in d.log(), "a reload failed\n" + d.log_tail())


@timeout(600)
def test_reload_with_many_certificates_reuses_the_context_and_sees_changed_files(t):
    n = int(os.environ.get("SLUICE_SCALE_CERTS", scaled(1000, 300)))
    folder = t.tmp / "many"
    make_many_certificates(folder, n)
    base = start(t, certs=["default"])
    base_rss = base.rss()
    base.stop()
    d = start(t, certs=["default"], certificates_dir=str(folder))
    d.wait_log(r"certificates-loaded listener=web count=%d" % (n + 1), 60)
    nocheck = server_context(verify=False)
    connect(d.addr(), nocheck, "host-1.scale.test")
    before = d.rss()
    cost = before - base_rss
    for _ in range(3):
        reload_and_wait(d)
    after = d.rss()
    reused = d.log().count("tls-context-reused listener=web")
    check(reused == 3, f"the context was reused on {reused} of 3 unchanged reloads")
    check(d.log().count("certificates-loaded listener=web") == 1,
          "the certificates were loaded again on a reload that changed nothing")
    growth = after - before
    print(f"reload cost: {n} certificates take {cost / 2**20:.1f} MiB; RSS after 3 reloads "
          f"{before / 2**20:.1f} -> {after / 2**20:.1f} MiB")
    if not LIGHT:  # sanitizer quarantine and redzones make RSS meaningless
        check(growth < max(2 * 2**20, cost // 10),
              f"RSS grew {growth / 2**20:.1f} MiB over 3 reloads (the certificates take "
              f"{cost / 2**20:.1f} MiB)")
    # Replace one certificate (and its key) with a freshly made one: the next reload rebuilds.
    fresh = t.tmp / "fresh"
    make_many_certificates(fresh, 1)
    old_der = connect(d.addr(), nocheck, "host-0.scale.test")["der"]
    for ext in ("crt", "key"):
        shutil.copy(fresh / f"host-0.scale.test.{ext}", folder / f"host-0.scale.test.{ext}.new")
        os.replace(folder / f"host-0.scale.test.{ext}.new", folder / f"host-0.scale.test.{ext}")
    reload_and_wait(d)
    check(d.log().count("tls-context-reused listener=web") == 3,
          "a reload after a certificate file changed reused the old context")
    new_der = connect(d.addr(), nocheck, "host-0.scale.test")["der"]
    check(new_der != old_der, "the replaced certificate is not served after the reload")
    check(new_der == connect(d.addr(), nocheck, "host-0.scale.test")["der"], "unstable")
    expected = (fresh / "host-0.scale.test.crt").read_text()
    check(new_der == ssl.PEM_cert_to_DER_cert(expected), "served something else than the new file")


def test_reload_that_changes_tls_settings_rebuilds_the_context(t):
    d = start(t, certs=["default"])
    reload_and_wait(d)
    check(d.log().count("tls-context-reused listener=web") == 1, "an unchanged reload rebuilt")
    d.config_path.write_text(d.config_path.read_text().replace(
        "[[listener]]", '[[listener]]\nalpn = ["h2"]', 1))
    reload_and_wait(d)
    check(d.log().count("tls-context-reused listener=web") == 1,
          "a reload that set alpn reused the old context")
    check(connect(d.addr(), server_context(verify=False), "localhost") is not None, "not serving")
