"""`meson install` of the build under test into a staging folder, and programs built outside the
source tree against the installed headers and libraries only, found through pkg-config: the way
a distribution package or another project consumes libsluice."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from harness import REPO, SANITIZER_MARKERS, Skip, check, sluice_bin, timeout

HEADERS = ["config.hpp", "engine.hpp", "error.hpp", "export.hpp", "server.hpp", "stream.hpp"]


def build_dir():
    build = Path(sluice_bin()).resolve().parents[2]
    if not (build / "meson-info" / "intro-buildoptions.json").is_file():
        raise Skip(f"{sluice_bin()} is not in a meson build folder")
    for tool in ("meson", "pkg-config", "c++"):
        if shutil.which(tool) is None:
            raise Skip(f"{tool} is not installed")
    return build


def build_option(build, name):
    for option in json.loads((build / "meson-info" / "intro-buildoptions.json").read_text()):
        if option["name"] == name:
            return option["value"]
    return None


def install(t):
    """Installs into t.tmp/stage; returns (stage prefix, pkg-config environment, extra flags)."""
    build = build_dir()
    stage = t.tmp / "stage"
    p = subprocess.run(
        ["meson", "install", "-C", str(build), "--destdir", str(stage), "--no-rebuild", "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    check(p.returncode == 0, f"meson install failed:\n{p.stdout}{p.stderr}")
    prefix = stage / str(build_option(build, "prefix")).lstrip("/")
    pcs = list(stage.rglob("pkgconfig/sluice.pc"))
    check(len(pcs) == 1, f"expected one sluice.pc under {stage}, found {pcs}")
    # The .pc file names the configured prefix; the staged copy lives under the destdir.
    pcdir = t.tmp / "pkgconfig"
    pcdir.mkdir()
    text = re.sub(r"(?m)^prefix=(.*)$", lambda m: f"prefix={stage}{m.group(1)}", pcs[0].read_text())
    (pcdir / "sluice.pc").write_text(text)
    env = dict(os.environ, PKG_CONFIG_PATH=str(pcdir))
    # A sanitized libsluice needs the sanitizer runtime in the program that links it.
    sanitize = build_option(build, "b_sanitize")
    extra = [f"-fsanitize={sanitize}"] if sanitize and sanitize != "none" else []
    return prefix, env, extra, pcs[0].parent.parent


def pkg_config(env, *args):
    p = subprocess.run(["pkg-config", *args, "sluice"], capture_output=True, text=True, env=env)
    check(p.returncode == 0, f"pkg-config {' '.join(args)} sluice failed:\n{p.stderr}")
    return p.stdout.split()


def compile_outside(t, name, sources, flags, extra):
    """Copies `sources` (the first is the program) out of the tree and compiles them there."""
    work = t.tmp / f"consumer-{name}"
    work.mkdir()
    for src in sources:
        shutil.copy(REPO / src, work)
    out = work / name
    cmd = ["c++", "-std=c++20", "-Wall", "-Wextra", "-Werror", "-O1", *extra,
           str(work / Path(sources[0]).name), "-o", str(out), *flags, "-pthread"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=work, timeout=120)
    check(p.returncode == 0, f"compiling {name} against the installed libsluice failed:\n{' '.join(cmd)}\n{p.stderr}")
    return out


def run(args, env=None):
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60, env=env)
    out = p.stdout + p.stderr
    check(not SANITIZER_MARKERS.search(out), f"sanitizer report from {args[0]}:\n{out}")
    check(p.returncode == 0, f"{args[0]} exited {p.returncode}:\n{out}")
    return p.stdout


def needed(binary):
    p = subprocess.run(["readelf", "-d", str(binary)], capture_output=True, text=True)
    return re.findall(r"\(NEEDED\).*\[(.*)\]", p.stdout)


@timeout(180)
def test_install_lists_the_right_files(t):
    prefix, env, extra, libdir = install(t)
    files = sorted(str(p.relative_to(prefix)) for p in prefix.rglob("*") if p.is_file() or p.is_symlink())
    lib = str(libdir.relative_to(prefix))
    expected = [
        "bin/sluice",
        *[f"include/sluice/{h}" for h in HEADERS],
        f"{lib}/libsluice.a",
        f"{lib}/libsluice.so",
        f"{lib}/libsluice.so.0",
        f"{lib}/pkgconfig/sluice.pc",
        "share/man/man8/sluice.8",
        "share/man/man5/sluice.toml.5",
        "share/doc/sluice/examples/sluice.toml",
        "share/doc/sluice/examples/minimal.toml",
        "share/doc/sluice/examples/sluice.service",
    ]
    for f in expected:
        check(f in files, f"{f} is not installed; installed: {files}")
    headers = sorted(p.name for p in (prefix / "include" / "sluice").iterdir())
    check(headers == HEADERS, f"installed headers {headers}, expected {HEADERS}")
    # The public headers include only the standard library and each other: OpenSSL and libuv
    # types appear as forward declarations.
    for h in HEADERS:
        for inc in re.findall(r"(?m)^#include\s+[<\"]([^>\"]+)", (prefix / "include" / "sluice" / h).read_text()):
            check(inc.startswith("sluice/") or re.fullmatch(r"[a-z_]+", inc), f"include/sluice/{h} includes <{inc}>")
    # Each header compiles on its own.
    cflags = pkg_config(env, "--cflags")
    for h in HEADERS:
        p = subprocess.run(
            ["c++", "-std=c++20", "-Wall", "-Wextra", "-Wpedantic", "-Werror", "-fsyntax-only", *cflags, "-x", "c++", "-"],
            input=f"#include <sluice/{h}>\n",
            capture_output=True,
            text=True,
        )
        check(p.returncode == 0, f"<sluice/{h}> does not compile on its own:\n{p.stderr}")


@timeout(180)
def test_program_built_against_the_installed_shared_library(t):
    prefix, env, extra, libdir = install(t)
    flags = pkg_config(env, "--cflags", "--libs")
    check(any(f.startswith("-I") and str(t.tmp) in f for f in flags), f"no staged include folder in {flags}")
    program = compile_outside(
        t, "embed_server", ["examples/embed_server.cpp", "examples/echo_backend.hpp", "examples/echo_handler.hpp", "examples/tls_client.hpp"], flags, extra
    )
    check(any(n.startswith("libsluice.so") for n in needed(program)), f"not linked to libsluice.so: {needed(program)}")
    runtime = dict(os.environ, LD_LIBRARY_PATH=str(libdir))
    certs = t.certs
    out = run([program, "--self-test", certs / "server-ecdsa.crt", certs / "server-ecdsa.key", certs / "ca.crt"], env=runtime)
    check("self-test ok" in out, out)
    # It ran the staged library, not one from elsewhere.
    p = subprocess.run(["ldd", str(program)], capture_output=True, text=True, env=runtime)
    check(str(libdir) in p.stdout, f"ldd does not show the staged libsluice:\n{p.stdout}")


@timeout(180)
def test_program_built_against_the_installed_static_library(t):
    prefix, env, extra, libdir = install(t)
    # libsluice.a even though libsluice.so sits beside it; its private dependencies (toml++,
    # libcurl) as the shared libraries the system has, so their own private ones are not needed.
    p = subprocess.run(["pkg-config", "--print-requires-private", "sluice"], capture_output=True, text=True, env=env)
    private = [line.split()[0] for line in p.stdout.splitlines() if line.strip()]
    flags = (
        pkg_config(env, "--cflags")
        + ["-Wl,-Bstatic", "-lsluice", "-Wl,-Bdynamic"]
        + [f for f in pkg_config(env, "--libs") if f != "-lsluice"]
        + (subprocess.run(["pkg-config", "--libs", *private], capture_output=True, text=True).stdout.split() if private else [])
    )
    program = compile_outside(t, "engine_socketpair", ["examples/engine_socketpair.cpp"], flags, extra)
    check(not any(n.startswith("libsluice") for n in needed(program)), f"linked to a shared libsluice: {needed(program)}")
    out = run([program])
    check("identical" in out and "client closed cleanly, server closed cleanly" in out, out)
