"""The command line: --version, --help, --check on good and broken configurations, and a daemon
that refuses to start on a broken one."""

import re
import socket

from harness import REPO, check, render_config, run_sluice


def project_version():
    m = re.search(r"version\s*:\s*'([^']+)'", (REPO / "meson.build").read_text())
    return m.group(1)


def test_version(t):
    p = run_sluice(["--version"])
    check(p.returncode == 0, f"--version exited {p.returncode}: {p.stderr}")
    line = p.stdout.strip()
    m = re.fullmatch(r"sluice (\d+\.\d+\.\d+) \(OpenSSL (\d+)\.\d+\.\d+[^)]*\)", line)
    check(m, f"--version printed {line!r}, expected 'sluice X.Y.Z (OpenSSL ...)'")
    check(m.group(1) == project_version(), f"--version says {m.group(1)}, meson.build says {project_version()}")
    check(int(m.group(2)) >= 3, f"sluice reports OpenSSL {m.group(2)}.x; it needs 3.0 or later")


def test_help(t):
    p = run_sluice(["--help"])
    check(p.returncode == 0, f"--help exited {p.returncode}")
    text = p.stdout + p.stderr
    for flag in ("--config", "--check", "--version", "--ready-fd"):
        check(flag in text, f"--help does not mention {flag}:\n{text}")


def test_unknown_option_fails(t):
    p = run_sluice(["--no-such-option"])
    check(p.returncode != 0, "an unknown option was accepted")
    check(p.stderr.strip(), "an unknown option failed without a message on stderr")


def good_listeners(t):
    return [
        t.listener("127.0.0.1:9", name="ecdsa"),
        t.listener("unix:/tmp/nowhere.sock", name="rsa", cert="server-rsa", listen=["127.0.0.1:0", "[::1]:0"]),
    ]


def write(t, name, text):
    path = t.tmp / name
    path.write_text(text)
    return str(path)


def check_config(path):
    return run_sluice(["--config", path, "--check"])


def test_check_good_config(t):
    path = write(t, "good.toml", t.config(good_listeners(t)))
    p = check_config(path)
    check(p.returncode == 0, f"--check rejected a good config ({p.returncode}):\n{p.stderr}")


def test_check_smallest_config(t):
    # CONFIG.md: the smallest useful file is the listener's three keys.
    text = (
        "[[listener]]\n"
        'listen = "127.0.0.1:0"\n'
        f'certificate = {{ cert = "{t.certs}/server-ecdsa.crt", key = "{t.certs}/server-ecdsa.key" }}\n'
        'backend = "127.0.0.1:8080"\n'
    )
    p = check_config(write(t, "small.toml", text))
    check(p.returncode == 0, f"--check rejected the smallest config ({p.returncode}):\n{p.stderr}")


def test_check_relative_paths_from_config_folder(t):
    # Paths are relative to the config file's folder, not to the working directory.
    sub = t.tmp / "etc"
    sub.mkdir()
    for f in ("server-ecdsa.crt", "server-ecdsa.key"):
        (sub / f).write_bytes((t.certs / f).read_bytes())
    listener = t.listener("127.0.0.1:9", cert={"cert": "server-ecdsa.crt", "key": "server-ecdsa.key"})
    (sub / "rel.toml").write_text(t.config([listener]))
    p = run_sluice(["--config", str(sub / "rel.toml"), "--check"], cwd="/")
    check(p.returncode == 0, f"--check did not find certificates beside the config:\n{p.stderr}")


def test_check_does_not_bind(t):
    # --check loads everything without binding: a port in use must not fail it.
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    t.defer(busy.close)
    port = busy.getsockname()[1]
    path = write(t, "busy.toml", t.config([t.listener("127.0.0.1:9", listen=f"127.0.0.1:{port}")]))
    p = check_config(path)
    check(p.returncode == 0, f"--check failed on a busy port, so it binds ({p.returncode}):\n{p.stderr}")


def expect_check_failure(path, *mentions):
    p = check_config(path)
    check(p.returncode == 2, f"--check exited {p.returncode} on a broken config, expected 2:\n{p.stderr}")
    for m in mentions:
        check(m in p.stderr, f"--check's message does not mention {m!r}:\n{p.stderr}")
    return p


def test_check_key_does_not_match_certificate(t):
    for key in ("mismatch", "server-rsa"):
        cert = {"cert": str(t.certs / "server-ecdsa.crt"), "key": str(t.certs / f"{key}.key")}
        path = write(t, f"wrong-{key}.toml", t.config([t.listener("127.0.0.1:9", cert=cert)]))
        p = check_config(path)
        check(p.returncode == 2, f"--check accepted server-ecdsa.crt with {key}.key ({p.returncode})")
        check(
            f"{key}.key" in p.stderr or "server-ecdsa.crt" in p.stderr,
            f"the mismatch message names neither file:\n{p.stderr}",
        )


def test_check_missing_files(t):
    for which in ("cert", "key"):
        cert = t.cert("server-ecdsa")
        cert[which] = str(t.tmp / f"no-such-{which}.pem")
        path = write(t, f"missing-{which}.toml", t.config([t.listener("127.0.0.1:9", cert=cert)]))
        expect_check_failure(path, f"no-such-{which}.pem")


def test_check_not_a_certificate(t):
    junk = t.tmp / "junk.pem"
    junk.write_text("this is not PEM\n")
    cert = {"cert": str(junk), "key": str(t.certs / "server-ecdsa.key")}
    path = write(t, "junk.toml", t.config([t.listener("127.0.0.1:9", cert=cert)]))
    expect_check_failure(path, "junk.pem")


def line_of(text, needle):
    for i, line in enumerate(text.splitlines(), 1):
        if needle in line:
            return i
    raise AssertionError(f"{needle!r} not in the generated config")


def expect_located_error(t, name, text, needle, key):
    """--check fails with FILE:LINE:COLUMN naming the line that holds `needle`, and `key`."""
    path = write(t, name, text)
    line = line_of(text, needle)
    p = check_config(path)
    check(p.returncode == 2, f"{name}: --check exited {p.returncode}, expected 2:\n{text}\n{p.stderr}")
    rx = re.escape(path) + rf":{line}:\d+:"
    check(re.search(rx, p.stderr), f"{name}: the error does not name {path}:{line}:COLUMN:\n{p.stderr}")
    check(key in p.stderr, f"{name}: the error does not name the key {key!r}:\n{p.stderr}")


def test_check_unknown_keys(t):
    base = t.listener("127.0.0.1:9")
    cases = {
        "listener": ([dict(base, bogus_option=1)], None, None, "bogus_option = 1", "bogus_option"),
        "global": ([base], {"max_conections": 5}, None, "max_conections", "max_conections"),
        "tls": ([base], None, {"min_verison": "1.2"}, "min_verison", "min_verison"),
        "inline": (
            [dict(base, timeouts={"handshake": "1s", "handshak": "2s"})],
            None,
            None,
            "handshak = ",
            "handshak",
        ),
    }
    for name, (listeners, global_, tls, needle, key) in cases.items():
        expect_located_error(t, f"unknown-{name}.toml", render_config(listeners, global_, tls), needle, key)


def test_check_unknown_table(t):
    text = render_config([t.listener("127.0.0.1:9")]) + "\n[bogus_table]\nx = 1\n"
    expect_located_error(t, "table.toml", text, "[bogus_table]", "bogus_table")


def test_check_bad_values(t):
    base = t.listener("127.0.0.1:9")
    cases = {
        "type": ([base], {"max_connections": "many"}, None, "max_connections", "max_connections"),
        "duration": ([dict(base, timeouts={"idle": "5 fortnights"})], None, None, "timeouts", "idle"),
        "drain": ([base], {"drain_timeout": "soon"}, None, "drain_timeout", "drain_timeout"),
        "version": ([dict(base, min_version="1.1")], None, None, "min_version", "min_version"),
        "level": ([base], {"log_level": "chatty"}, None, "log_level", "log_level"),
        "size": ([base], {"buffers": {"tls": "lots"}}, None, "buffers", "tls"),
        "address": ([dict(base, backend="127.0.0.1")], None, None, "backend =", "backend"),
        "listen": ([dict(base, listen="localhost:notaport")], None, None, "listen =", "listen"),
    }
    for name, (listeners, global_, tls, needle, key) in cases.items():
        expect_located_error(t, f"bad-{name}.toml", render_config(listeners, global_, tls), needle, key)


def test_check_missing_required(t):
    base = t.listener("127.0.0.1:9")
    del base["backend"]
    p = expect_check_failure(write(t, "nobackend.toml", render_config([base])), "backend")
    check(str(t.tmp / "nobackend.toml") in p.stderr, f"the error does not name the file:\n{p.stderr}")
    p = expect_check_failure(write(t, "empty.toml", "[global]\nlog_level = \"info\"\n"), "listener")


def test_check_malformed_toml(t):
    text = render_config([t.listener("127.0.0.1:9")]) + 'oops = "unterminated\n'
    path = write(t, "syntax.toml", text)
    p = check_config(path)
    check(p.returncode == 2, f"--check exited {p.returncode} on a TOML syntax error")
    line = line_of(text, "oops")
    check(re.search(re.escape(path) + rf":{line}:\d+", p.stderr), f"no {path}:{line}:COLUMN in:\n{p.stderr}")


def test_check_missing_config_file(t):
    p = check_config(str(t.tmp / "absent.toml"))
    check(p.returncode == 2, f"--check exited {p.returncode} for a missing config file")
    check("absent.toml" in p.stderr, f"the error does not name the file:\n{p.stderr}")


def test_broken_config_daemon_does_not_start(t):
    # Without --check, a wrong key must stop startup before 'ready', with a non-zero exit.
    cert = {"cert": str(t.certs / "server-ecdsa.crt"), "key": str(t.certs / "mismatch.key")}
    d = t.sluice([t.listener("127.0.0.1:9", cert=cert)], start=False)
    try:
        d.start(timeout=15)
    except AssertionError as e:
        check("before 'ready'" in str(e), f"unexpected start failure: {e}")
        check(d.proc.returncode not in (0, None) and d.proc.returncode > 0, f"exit status {d.proc.returncode}")
        d.stopped = True
        return
    raise AssertionError("sluice started with a key that does not match its certificate")


def test_listen_address_in_use_fails(t):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    t.defer(busy.close)
    port = busy.getsockname()[1]
    d = t.sluice([t.listener("127.0.0.1:9", listen=f"127.0.0.1:{port}")], start=False)
    try:
        d.start(timeout=15)
    except AssertionError as e:
        check("before 'ready'" in str(e), f"unexpected start failure: {e}")
        check(d.proc.returncode > 0, f"exit status {d.proc.returncode}")
        check(str(port) in d.log(), f"the error does not name the busy address:\n{d.log()}")
        d.stopped = True
        return
    raise AssertionError(f"sluice reported ready although 127.0.0.1:{port} is taken")
