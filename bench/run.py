#!/usr/bin/env python3
"""bench/run.py: runs the benchmark that scripts/bench builds for.

Starts the backend and every terminator (sluice, hitch, HAProxy, stunnel) with the same TLS
policy, pins the terminators to CPU 0 and everything else to CPU 1, checks each terminator with a
byte-exact echo, then measures every workload in rounds (each round visits every terminator, so a
machine that gets busier affects them alike). A figure is the median over rounds; each is given
per wall second and per terminator CPU-second (utime + stime of the terminator's process group,
sampled from /proc when the load generator starts and ends its measured window).

For the keep-alive round trips the load generator is also the backend (loadgen --serve, on the
backend's port, while bench/backend is stopped): the CPU beside the terminator then runs one
thread. With the client and a backend process sharing that CPU, the scheduler's alternation
between the two set the latency tail and capped the rate below what the terminators could do:
made real-time (chrt -f 1), the backend took every terminator's p99 to 2.7-2.8 ms, within 4% of
each other, while sluice spinning instead of sleeping left its own p99 where it was.

Writes results.md, results.json and the charts into --out. Standard library only (the charts
use matplotlib through bench/charts.py, skipped with a note when it is missing).
"""

import argparse
import contextlib
import datetime
import json
import os
import platform
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TERMINATOR_CPU = "0"
LOAD_CPU = "1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

NAMES = {"sluice": "sluice", "hitch": "hitch", "haproxy": "HAProxy", "stunnel": "stunnel"}
PEERS = ["hitch", "haproxy", "stunnel"]

# (key, title, loadgen arguments, what it counts)
WORKLOADS = [
    ("hs_ecdsa_13", "full handshake, ECDSA P-256, TLS 1.3",
     ["--mode", "handshake", "--tls", "13", "--conns", "32"], "handshakes"),
    ("hs_ecdsa_12", "full handshake, ECDSA P-256, TLS 1.2",
     ["--mode", "handshake", "--tls", "12", "--conns", "32"], "handshakes"),
    ("hs_rsa_13", "full handshake, RSA-2048, TLS 1.3",
     ["--mode", "handshake", "--tls", "13", "--conns", "32", "@rsa"], "handshakes"),
    ("hs_rsa_12", "full handshake, RSA-2048, TLS 1.2",
     ["--mode", "handshake", "--tls", "12", "--conns", "32", "@rsa"], "handshakes"),
    ("res_13", "resumed handshake, TLS 1.3 ticket",
     ["--mode", "resume", "--tls", "13", "--conns", "32"], "handshakes"),
    ("res_12", "resumed handshake, TLS 1.2 ticket",
     ["--mode", "resume", "--tls", "12", "--conns", "32"], "handshakes"),
    ("rr", "keep-alive round trips, 64 conns, 100 B",
     ["--mode", "rr", "--tls", "13", "--conns", "64", "--size", "100"], "round trips"),
    ("down", "bulk download, 4 conns",
     ["--mode", "download", "--tls", "13", "--conns", "4"], "MB"),
    ("up", "bulk upload, 4 conns",
     ["--mode", "upload", "--tls", "13", "--conns", "4"], "MB"),
]


def log(*parts):
    print("bench:", *parts, file=sys.stderr, flush=True)


def free_port():
    """A free port below the ephemeral range, so no outgoing connection can be holding it."""
    for _ in range(200):
        port = random.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise SystemExit("bench: no free port in 20000-32000")


def wait_port(port, proc, seconds=10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def group_pids(pgid):
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # field 5 (pgrp), counted after the ")"
            pids.append(int(entry))
    return pids


def cpu_seconds(pids):
    """utime + stime (threads included, exited threads too) summed over `pids`."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # fields 14 and 15
        except OSError:
            pass
    return total / CLK_TCK


def rss_bytes(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * PAGE
        except OSError:
            pass
    return total


def pinned(cpu, argv):
    return ["taskset", "-c", cpu] + argv


class Terminator:
    """One terminator process group on CPU 0: start, check, stop."""

    def __init__(self, key, tools, work, backend_port):
        self.key = key
        self.name = NAMES[key]
        self.tools = tools
        self.work = work
        self.backend_port = backend_port
        self.proc = None
        self.ports = {}
        self.error = None
        self.version = ""
        self.pids = []
        self.wrap = []  # a command the terminator runs under (callgrind, for --instructions)

    def render(self, template, out, extra=None):
        text = (HERE / "peers" / template).read_text()
        values = {
            "@DIR@": str(self.work),
            "@BACKEND_PORT@": str(self.backend_port),
            "@ECDSA_PORT@": str(self.ports.get("ecdsa", 0)),
            "@RSA_PORT@": str(self.ports.get("rsa", 0)),
        }
        values.update(extra or {})
        for k, v in values.items():
            text = text.replace(k, v)
        path = self.work / out
        path.write_text(text)
        return path

    def start(self):
        self.error = None
        logfile = open(self.work / f"{self.key}.log", "ab")
        try:
            argv = getattr(self, "argv_" + self.key)()
        except RuntimeError as e:
            self.error = str(e)
            return False
        if argv is None:
            return False
        ready_r = ready_w = None
        pass_fds = ()
        if self.key == "sluice":
            ready_r, ready_w = os.pipe()
            argv += ["--ready-fd", str(ready_w)]
            pass_fds = (ready_w,)
        self.proc = subprocess.Popen(pinned(TERMINATOR_CPU, self.wrap + argv),
                                     stdin=subprocess.DEVNULL,
                                     stdout=logfile, stderr=logfile, start_new_session=True,
                                     pass_fds=pass_fds)
        ok = True
        if self.key == "sluice":
            os.close(ready_w)
            text = b""
            deadline = time.monotonic() + 15
            os.set_blocking(ready_r, False)
            while b"ready" not in text and time.monotonic() < deadline:
                try:
                    chunk = os.read(ready_r, 4096)
                    if not chunk:
                        break
                    text += chunk
                except BlockingIOError:
                    if self.proc.poll() is not None:
                        break
                    time.sleep(0.02)
            os.close(ready_r)
            for line in text.decode().splitlines():
                parts = line.split()
                if len(parts) == 3 and parts[0] == "listen":
                    self.ports[parts[1]] = int(parts[2].rsplit(":", 1)[1])
            ok = b"ready" in text and "ecdsa" in self.ports and "rsa" in self.ports
        else:
            wait = 60.0 if self.wrap else 10.0
            ok = all(wait_port(p, self.proc, wait) for p in self.ports.values())
        if not ok:
            self.error = "did not start: " + self.log_tail()
            self.stop()
            return False
        time.sleep(0.2)
        self.pids = group_pids(self.proc.pid)
        return True

    def log_tail(self):
        try:
            lines = (self.work / f"{self.key}.log").read_text(errors="replace").strip().splitlines()
            return " / ".join(lines[-3:]) or "no output"
        except OSError:
            return "no output"

    def refresh_pids(self):
        if self.proc is not None:
            self.pids = group_pids(self.proc.pid) or [self.proc.pid]

    def stop(self, grace=10):
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        # hitch's worker is in the same group; make sure nothing of ours lingers (given the
        # grace period to exit by itself: under callgrind it writes its profile as it goes).
        deadline = time.monotonic() + grace
        while group_pids(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in group_pids(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc = None

    # --- one argv builder per terminator; each picks fresh ports ---------------------------

    def fresh_ports(self):
        self.ports = {"ecdsa": free_port(), "rsa": free_port()}

    def argv_sluice(self):
        self.ports = {}
        binary = self.tools["sluice"]
        with_log = self.render("sluice.toml.in", "sluice.toml",
                               {"@LOG_TABLE@": '[log]\naccess = "off"', "@ECDSA_PORT@": "0",
                                "@RSA_PORT@": "0"})
        check = subprocess.run([binary, "--config", str(with_log), "--check"],
                               capture_output=True, text=True)
        if check.returncode != 0 and "log" in check.stderr + check.stdout:
            # A sluice without the [log] table writes no access log at all.
            self.render("sluice.toml.in", "sluice.toml",
                        {"@LOG_TABLE@": "", "@ECDSA_PORT@": "0", "@RSA_PORT@": "0"})
            check = subprocess.run([binary, "--config", str(with_log), "--check"],
                                   capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError("configuration refused: " + (check.stderr or check.stdout).strip())
        self.version = subprocess.run([binary, "--version"], capture_output=True,
                                      text=True).stdout.strip().splitlines()[0]
        return [binary, "--config", str(with_log)]

    def argv_hitch(self):
        binary = shutil.which("hitch")
        if binary is None:
            raise RuntimeError("not installed (apt-get install hitch)")
        self.fresh_ports()
        (self.work / "hitch-ocsp").mkdir(exist_ok=True)
        user = "_hitch"
        try:
            import pwd
            pwd.getpwnam(user)
        except KeyError:
            user = "nobody"
        conf = self.render("hitch.conf.in", "hitch.conf", {"@USER@": user})
        self.version = subprocess.run([binary, "--version"], capture_output=True,
                                      text=True).stdout.strip() or "hitch"
        return [binary, "--config", str(conf)]

    def argv_haproxy(self):
        binary = shutil.which("haproxy")
        if binary is None:
            raise RuntimeError("not installed (apt-get install haproxy)")
        self.fresh_ports()
        # Two descriptors per connection, within the descriptor limit it inherits.
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.ports["plain"] = free_port()
        conf = self.render("haproxy.cfg.in", "haproxy.cfg",
                           {"@MAXCONN@": str(max(1000, (limit - 200) // 2)),
                            "@PLAIN_PORT@": str(self.ports["plain"])})
        out = subprocess.run([binary, "-v"], capture_output=True, text=True).stdout
        self.version = " ".join(out.split()[:3]) if out else "HAProxy"
        return [binary, "-db", "-f", str(conf)]

    def argv_stunnel(self):
        binary = shutil.which("stunnel4") or shutil.which("stunnel")
        if binary is None:
            raise RuntimeError("not installed (apt-get install stunnel4)")
        self.fresh_ports()
        conf = self.render("stunnel.conf.in", "stunnel.conf")
        out = subprocess.run([binary, "-version"], capture_output=True, text=True)
        for line in (out.stdout + out.stderr).splitlines():
            if line.startswith("stunnel "):
                self.version = " ".join(line.split()[:2])
                break
        return [binary, str(conf)]


class Bench:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out).resolve()
        self.build = Path(args.build).resolve()
        self.tools = {
            "sluice": str(self.build / "src" / "daemon" / "sluice"),
            "loadgen": str(self.build / "bench" / "loadgen"),
            "backend": str(self.build / "bench" / "backend"),
            "ceiling": str(self.build / "bench" / "ceiling"),
        }
        self.work = Path(tempfile.mkdtemp(prefix="sluice-bench."))
        self.backend = None
        self.backend_port = 0
        self.results = {"rounds": {}, "checks": {}, "idle": {}, "silent": {}, "notes": []}

    # --- setup -------------------------------------------------------------------------------

    def certificates(self):
        w = self.work
        run = lambda *a: subprocess.run(a, check=True, capture_output=True, cwd=w)
        san = "subjectAltName=DNS:localhost,IP:127.0.0.1"
        run("openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-out", "ecdsa.key")
        run("openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
            "-out", "rsa.key")
        for kind in ("ecdsa", "rsa"):
            run("openssl", "req", "-x509", "-new", "-key", f"{kind}.key", "-out", f"{kind}.crt",
                "-days", "30", "-sha256", "-subj", "/CN=localhost", "-addext", san)
            (w / f"{kind}.pem").write_text((w / f"{kind}.crt").read_text() +
                                           (w / f"{kind}.key").read_text())

    def start_backend(self, port=0):
        self.backend = subprocess.Popen(
            pinned(LOAD_CPU, [self.tools["backend"], "--port", str(port)]),
            stdout=subprocess.PIPE, text=True)
        line = self.backend.stdout.readline().split()
        if len(line) != 2 or line[0] != "port":
            raise SystemExit("bench: the backend did not start")
        self.backend_port = int(line[1])

    def stop_backend(self):
        self.backend.terminate()
        self.backend.wait()

    @contextlib.contextmanager
    def load_generator_serving(self, serving=True):
        """For the round trips: bench/backend steps aside and the load generator serves the
        backend's port itself (see the module's comment). Yields the load generator's extra
        arguments; with serving=False nothing changes and they are empty."""
        if not serving:
            yield []
            return
        self.stop_backend()
        try:
            yield ["--serve", str(self.backend_port)]
        finally:
            self.start_backend(self.backend_port)

    def loadgen(self, port, extra, plain=False, timeout=120):
        argv = [self.tools["loadgen"], "--port", str(port)] + extra + (["--plain"] if plain else [])
        return subprocess.Popen(pinned(LOAD_CPU, argv), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)

    def check(self, term):
        """One byte-exact echo per listener and TLS version; returns an error or None."""
        seen = []
        for listener in ("ecdsa", "rsa"):
            for version in ("13", "12"):
                p = subprocess.run(pinned(LOAD_CPU, [self.tools["loadgen"], "--mode", "check",
                                                     "--port", str(term.ports[listener]),
                                                     "--tls", version]),
                                   capture_output=True, text=True, timeout=30)
                try:
                    result = json.loads(p.stdout.strip().splitlines()[-1])
                except (ValueError, IndexError):
                    result = {"ok": False, "error": p.stderr.strip() or "no output"}
                seen.append({"listener": listener, "tls": version, **result})
                if not result.get("ok"):
                    return f"{listener} TLS 1.{version[1]} echo failed: {result.get('error')}", seen
                if "AES128-GCM" not in result.get("cipher", "") and \
                        "AES_128_GCM" not in result.get("cipher", ""):
                    return f"negotiated {result.get('cipher')}, not AES-128-GCM", seen
                if result.get("group") != "X25519":
                    return f"negotiated group {result.get('group')}, not X25519", seen
        return None, seen

    # --- measuring ---------------------------------------------------------------------------

    def measure(self, port, extra, pids, plain=False):
        """Runs one timed loadgen; returns its JSON plus the CPU the pids used in its window."""
        args = ["--warmup", str(self.args.warmup), "--duration", str(self.args.duration)] + extra
        p = self.loadgen(port, args, plain=plain)
        cpu0 = cpu1 = None
        result = None
        for line in p.stdout:
            line = line.strip()
            if line == "start":
                cpu0 = cpu_seconds(pids)
            elif line == "end":
                cpu1 = cpu_seconds(pids)
            elif line.startswith("{"):
                result = json.loads(line)
        p.wait()
        if result is None:
            return None
        result["cpu"] = (cpu1 - cpu0) if cpu0 is not None and cpu1 is not None else 0.0
        return result

    def run_workloads(self, terms):
        live = [t for t in terms if t.proc is not None]
        wanted = lambda key: not self.args.workloads or key in self.args.workloads
        for key, title, extra, unit in WORKLOADS:
            if not wanted(key):
                continue
            rounds = self.results["rounds"].setdefault(key, {})
            with self.load_generator_serving(key == "rr") as serve:
                for r in range(self.args.rounds):
                    # Rotate the order each round so no terminator always goes first.
                    order = live[r % len(live):] + live[:r % len(live)] if live else []
                    for t in order:
                        args = [a for a in extra if a != "@rsa"] + serve
                        port = t.ports["rsa" if "@rsa" in extra else "ecdsa"]
                        t.refresh_pids()
                        res = self.measure(port, args, t.pids)
                        if res is None:
                            log(f"{t.name} {key}: the load generator failed")
                            continue
                        res["round"] = r
                        rounds.setdefault(t.key, []).append(res)
                        log(f"{key:12} r{r + 1} {t.name:8} "
                            f"wall={self.figure(key, res):10.1f} "
                            f"per-cpu-s={self.figure(key, res, True):10.1f} "
                            f"cpu={res['cpu']:.2f}s errors={res['errors']}")
                # One-second speed probes between workloads catch a slow spell that starts
                # and ends inside the run, which the probes at its start and end miss.
                self.results["speed"].setdefault("during", []).append(speed_probe())
                if serve and wanted("rr_direct"):
                    # The baseline: the same load generator talking to its own echo, no terminator.
                    base = self.results["rounds"].setdefault("rr_direct", {})
                    for r in range(self.args.rounds):
                        res = self.measure(self.backend_port,
                                           ["--mode", "rr", "--conns", "64", "--size", "100"] +
                                           serve, [], plain=True)
                        if res:
                            base.setdefault("backend", []).append(res)
        proxy = next((t for t in live if "plain" in t.ports), None)
        if proxy is not None and wanted("tcp_conn"):
            # The cost of the connections alone: HAProxy proxying the same exchange without TLS.
            tcp = self.results["rounds"].setdefault("tcp_conn", {})
            for r in range(self.args.rounds):
                proxy.refresh_pids()
                res = self.measure(proxy.ports["plain"],
                                   ["--mode", "handshake", "--conns", "32"], proxy.pids,
                                   plain=True)
                if res:
                    tcp.setdefault(proxy.key, []).append(res)
                    log(f"tcp_conn     r{r + 1} {proxy.name:8} wall={res['rate']:10.1f} "
                        f"per-cpu-s={self.figure('tcp_conn', res, True):10.1f}")

    @staticmethod
    def figure(key, res, per_cpu=False):
        value = res["mbps"] if key in ("down", "up") else res["rate"]
        if per_cpu:
            return value * res["seconds"] / res["cpu"] if res["cpu"] > 0 else 0.0
        return value

    def settled_rss(self, term):
        """The RSS of a just-started terminator after one connection went through, so lazily
        built state is not charged to the connections measured after it."""
        subprocess.run(pinned(LOAD_CPU, [self.tools["loadgen"], "--mode", "check", "--port",
                                          str(term.ports["ecdsa"])]),
                       capture_output=True, timeout=30)
        time.sleep(0.5)
        term.refresh_pids()
        return rss_bytes(term.pids)

    def idle_memory(self, term, count):
        """RSS growth per established idle TLS connection, on a freshly started terminator."""
        if not term.start():
            return {"error": term.error}
        try:
            before = self.settled_rss(term)
            p = self.loadgen(term.ports["ecdsa"], ["--mode", "idle", "--tls", "13", "--count",
                                                   str(count), "--conns", "64", "--sources",
                                                   "8", "--limit", "180"])
            line = p.stdout.readline().split()
            held = int(line[1]) if len(line) >= 4 and line[0] == "ready" else 0
            errors = int(line[3]) if len(line) >= 4 else count
            # Idle means settled: every terminator gets the same quiet spell before the reading
            # (sluice hands a burst's free heap memory back after one quiet second).
            time.sleep(2.5)
            term.refresh_pids()
            after = rss_bytes(term.pids)
            p.stdin.close()
            p.wait(timeout=60)
            if held == 0:
                return {"error": f"no connection established ({errors} errors)"}
            return {"count": count, "held": held, "errors": errors, "rss_before": before,
                    "rss_after": after, "per_conn": (after - before) / held}
        finally:
            term.stop()

    def silent_memory(self, term, count):
        """RSS growth per connection that is open but has sent nothing (a browser's preconnect,
        a port check, a silent client), on a freshly started terminator. The connections come
        from several loopback addresses, fewer than 64 each (sluice's default
        max_handshakes_per_ip), and stay well inside every terminator's handshake timeout."""
        if not term.start():
            return {"error": term.error}
        socks = []
        try:
            before = self.settled_rss(term)
            for i in range(count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind((f"127.0.{1 + i // 50}.{1 + i % 50}", 0))
                s.connect(("127.0.0.1", term.ports["ecdsa"]))
            time.sleep(2.5)
            term.refresh_pids()
            after = rss_bytes(term.pids)
            # Held: not closed by the terminator (no EOF or reset waiting to be read).
            held = 0
            for s in socks:
                s.setblocking(False)
                try:
                    held += 0 if s.recv(1) == b"" else 1
                except BlockingIOError:
                    held += 1
                except OSError:
                    pass
            if held == 0:
                return {"error": "no connection held"}
            return {"count": count, "held": held, "rss_before": before, "rss_after": after,
                    "per_conn": (after - before) / held}
        finally:
            for s in socks:
                s.close()
            term.stop()

    def ceiling(self):
        conf = self.work / "sluice.toml"
        if not conf.exists():
            return {"error": "no sluice configuration"}
        argv = [self.tools["ceiling"], "--config", str(conf), "--seconds",
                str(self.args.ceiling_seconds), "--rounds", str(max(1, self.args.rounds)),
                # As many idle engines as the largest idle count the daemon is measured at.
                "--idle", str(max(self.args.idle_counts, default=1000))]
        p = subprocess.run(pinned(TERMINATOR_CPU, argv), capture_output=True, text=True,
                           timeout=600)
        try:
            return json.loads(p.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return {"error": (p.stderr or "no output").strip()}

    # --- profiles ----------------------------------------------------------------------------

    def profile(self):
        """perf profiles of sluice under four workloads: the top symbols, by self time."""
        if shutil.which("perf") is None:
            raise SystemExit("bench: --profile needs perf (apt-get install linux-perf)")
        self.certificates()
        self.start_backend()
        term = Terminator("sluice", self.tools, self.work, self.backend_port)
        if not term.start():
            raise SystemExit(f"bench: sluice did not start: {term.error}")
        sections = []
        try:
            for key, title, extra, _ in WORKLOADS:
                if key not in ("hs_ecdsa_13", "res_13", "rr", "down", "up"):
                    continue
                data = self.work / f"perf-{key}.data"
                args = [a for a in extra if a != "@rsa"]
                # As measured: for the round trips the load generator is the backend too.
                with self.load_generator_serving(key == "rr") as serve:
                    p = self.loadgen(term.ports["ecdsa"],
                                     ["--warmup", "0.5", "--duration", "6"] + args + serve)
                    p.stdout.readline()  # "start": the warm-up is over
                    rec = subprocess.run(["perf", "record", "-q", "-g", "-o", str(data), "-p",
                                          str(term.proc.pid), "--", "sleep", "4"],
                                         capture_output=True, text=True)
                    p.communicate()
                def perf_report(*extra_args, limit=30):
                    out = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "-g",
                                          "none"] + list(extra_args),
                                         capture_output=True, text=True).stdout
                    return [ln for ln in out.splitlines()
                            if ln.strip() and not ln.startswith("#")][:limit]

                by_dso = perf_report("--no-children", "--sort", "dso", limit=8)
                by_sym = perf_report("--no-children", "--sort", "dso,sym", "--percent-limit",
                                     "0.7", limit=30)
                # Inclusive time of sluice's and the libraries' entry points: where it goes.
                entry = [ln for ln in perf_report("--children", "--sort", "sym",
                                                  "--percent-limit", "2", limit=400)
                         if any(k in ln for k in ("sluice::", "uv_", "SSL_", "EVP_", "ossl_",
                                                  "BIO_", "__sys", "do_syscall", "tcp_", "sock_",
                                                  "malloc", "free", "epoll", "accept",
                                                  "connect", "close"))][:30]
                sections.append(f"## {title}\n\n" +
                                (rec.stderr.strip() + "\n" if rec.returncode else "") +
                                "Self time by object:\n" + "\n".join(by_dso) +
                                "\n\nSelf time by symbol:\n" + "\n".join(by_sym) +
                                "\n\nInclusive time (children) of entry points:\n" +
                                "\n".join(entry) + "\n")
                log(f"profiled {key}")
        finally:
            term.stop()
            self.backend.terminate()
            self.backend.wait()
        self.out.mkdir(parents=True, exist_ok=True)
        m = machine()
        text = (f"# sluice profiles ({m['date']}, {m['nproc']} × {m['cpu']}, perf record -g, "
                f"self time per DSO and symbol)\n\n" + "\n".join(sections))
        (self.out / "profile.txt").write_text(text)
        print(text)
        shutil.rmtree(self.work, ignore_errors=True)

    # --- instructions --------------------------------------------------------------------------

    # Workload, title, load generator arguments, and the two operation counts whose difference
    # is measured (what a terminator executes to start, warm up and stop cancels out).
    INSTRUCTION_WORKLOADS = [
        ("res_12", "resumed handshake, TLS 1.2 ticket",
         ["--mode", "resume", "--tls", "12", "--conns", "8"], (1000, 3000), "connection"),
        ("res_13", "resumed handshake, TLS 1.3 ticket",
         ["--mode", "resume", "--tls", "13", "--conns", "8"], (500, 1500), "connection"),
        ("hs_ecdsa_13", "full handshake, ECDSA P-256, TLS 1.3",
         ["--mode", "handshake", "--tls", "13", "--conns", "8"], (300, 900), "connection"),
        ("rr", "keep-alive round trips, 64 conns, 100 B",
         ["--mode", "rr", "--tls", "13", "--conns", "64", "--size", "100"], (20000, 60000),
         "round trip"),
    ]

    def callgrind_run(self, key, extra, count):
        """One terminator under callgrind for `count` operations; its cost by object."""
        # Outside the work folder, which only its owner may enter: hitch's worker writes its
        # profile as the unprivileged user it runs as.
        outdir = Path(tempfile.mkdtemp(prefix="sluice-callgrind."))
        outdir.chmod(0o1777)
        try:
            return self.callgrind_count(key, extra, count, outdir)
        finally:
            shutil.rmtree(outdir, ignore_errors=True)

    def callgrind_count(self, key, extra, count, outdir):
        term = Terminator(key, self.tools, self.work, self.backend_port)
        term.wrap = ["valgrind", "--tool=callgrind", "--trace-children=yes",
                     f"--callgrind-out-file={outdir}/callgrind.out.%p"]
        if not term.start():
            raise SystemExit(f"bench: {key} did not start under callgrind: {term.error}")
        try:
            with self.load_generator_serving(extra[1] == "rr") as serve:
                p = self.loadgen(term.ports["ecdsa"], ["--warmup", "0", "--duration", "600",
                                                       "--total", str(count)] + extra + serve)
                out, _ = p.communicate(timeout=900)
        finally:
            term.stop(grace=120)
        result = json.loads(out.strip().splitlines()[-1])
        if result.get("completed", 0) < count or result.get("errors", 0):
            raise SystemExit(f"bench: {key} under callgrind: {result}")
        by_object = {}
        for path in outdir.glob("callgrind.out.*"):
            text = subprocess.run(["callgrind_annotate", "--threshold=100", "--show-percs=no",
                                   str(path)], capture_output=True, text=True).stdout
            for line in text.splitlines():
                # "  1,234  file:function [object]"; glibc's inlined parts name no object.
                parts = line.split(None, 1)
                if len(parts) != 2 or not parts[0].replace(",", "").isdigit() or \
                        ":" not in parts[1] or "PROGRAM TOTALS" in parts[1]:
                    continue
                cost = int(parts[0].replace(",", ""))
                obj = parts[1].rsplit("[", 1)[1].rstrip("]") if parts[1].endswith("]") else \
                    "libc.so.6" if parts[1].startswith("./") else "other"
                name = Path(obj).name
                name = name if name.startswith(("lib", "ld-")) else \
                    key if name in ("sluice", "hitch", "haproxy") else "other"
                name = name.split(".so")[0]
                by_object[name] = by_object.get(name, 0) + cost
        if not by_object:
            raise SystemExit(f"bench: {key} under callgrind left no profile")
        return by_object

    def instructions(self):
        """User-space instructions per operation (callgrind), sluice against the peers: a
        count, unlike CPU time, that the machine's load does not move."""
        if shutil.which("valgrind") is None:
            raise SystemExit("bench: --instructions needs valgrind (apt-get install valgrind)")
        self.certificates()
        self.start_backend()
        keys = [k for k in self.args.terminators if k in ("sluice", "hitch", "haproxy")]
        chosen = [w for w in self.INSTRUCTION_WORKLOADS
                  if not self.args.workloads or w[0] in self.args.workloads]
        rows = {}
        try:
            for wkey, title, extra, (low, high), unit in chosen:
                for key in keys:
                    base = self.callgrind_run(key, extra, low)
                    more = self.callgrind_run(key, extra, high)
                    per = {o: (more.get(o, 0) - base.get(o, 0)) / (high - low)
                           for o in set(base) | set(more)}
                    rows.setdefault(wkey, {})[key] = per
                    log(f"instructions {wkey} {key}: {sum(per.values()):,.0f} per {unit}")
        finally:
            self.backend.terminate()
            self.backend.wait()
        peers = [k for k in keys if k != "sluice"]
        ratios = "sluice" in keys and bool(peers)
        m = machine()
        lines = [f"# User-space instructions per operation ({m['date']}, {m['nproc']} × "
                 f"{m['cpu']}, {m['openssl']})", "",
                 "Counted by callgrind (valgrind) in the terminator's processes: the same "
                 "workload run twice, to two operation counts, and the difference divided by "
                 "the difference in operations, so start-up, warm-up and exit cancel out. "
                 "Kernel work (system calls, TCP) is not counted; a CPU-second figure "
                 "includes it.", "",
                 "| workload | " + " | ".join(NAMES[k] for k in keys) +
                 (" | sluice / " + " / ".join(NAMES[k] for k in peers) if ratios else "") +
                 " |",
                 "|---|" + "---:|" * (len(keys) + (1 if ratios else 0))]
        for wkey, title, _, _, unit in chosen:
            totals = {k: sum(rows[wkey][k].values()) for k in keys}
            ratio = ""
            if ratios:
                ratio = " | " + " / ".join(f"{totals['sluice'] / totals[k]:.2f}" for k in peers)
            lines.append(f"| {title} (per {unit}) | " +
                         " | ".join(f"{totals[k]:,.0f}" for k in keys) + ratio + " |")
        lines += ["", "By object (instructions per operation):", ""]
        for wkey, title, _, _, unit in chosen:
            lines.append(f"- {title}:")
            for k in keys:
                per = sorted(rows[wkey][k].items(), key=lambda kv: -kv[1])
                lines.append(f"  - {NAMES[k]}: " + ", ".join(
                    f"{o} {v:,.0f}" for o, v in per if abs(v) >= 50))
        text = "\n".join(lines) + "\n"
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "instructions.md").write_text(text)
        print(text)
        shutil.rmtree(self.work, ignore_errors=True)

    # --- the run -----------------------------------------------------------------------------

    def run(self):
        self.out.mkdir(parents=True, exist_ok=True)
        os.sched_setaffinity(0, {int(LOAD_CPU)})
        self.certificates()
        self.start_backend()
        keys = [k for k in ["sluice"] + PEERS if k in self.args.terminators]
        terms = [Terminator(k, self.tools, self.work, self.backend_port) for k in keys]
        self.results["machine"] = machine()
        self.results["speed"] = {"start": speed_probe()}
        self.results["started"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds")
        self.results["settings"] = {k: getattr(self.args, k) for k in
                                    ("rounds", "warmup", "duration", "idle_counts", "silent",
                                              "quick", "fd_limit")}
        try:
            for t in terms:
                if t.start():
                    err, seen = self.check(t)
                    self.results["checks"][t.key] = seen
                    if err:
                        t.error = "check failed: " + err
                        t.stop()
                log(f"{t.name}: " + ("ready on " + str(t.ports) if t.error is None else t.error))
            self.results["versions"] = {t.key: t.version for t in terms}
            self.run_workloads(terms)
            for t in terms:
                t.stop()
            self.results["errors"] = {t.key: t.error for t in terms if t.error}
            for count in self.args.idle_counts:
                for t in terms:
                    if t.key in self.results["errors"]:
                        continue
                    res = self.idle_memory(t, count)
                    self.results["idle"].setdefault(str(count), {})[t.key] = res
                    log(f"idle {count:6} {t.name:8} " +
                        (f"{res['per_conn'] / 1024:.1f} KiB/conn ({res['held']} held)"
                         if "per_conn" in res else res.get("error", "")))
            if self.args.silent:
                for t in terms:
                    if t.key in self.results["errors"]:
                        continue
                    res = self.silent_memory(t, self.args.silent)
                    self.results["silent"][t.key] = res
                    log(f"silent {self.args.silent:6} {t.name:8} " +
                        (f"{res['per_conn'] / 1024:.1f} KiB/conn ({res['held']} held)"
                         if "per_conn" in res else res.get("error", "")))
            if "sluice" in keys and not self.args.no_ceiling:
                self.results["ceiling"] = self.ceiling()
                log("ceiling: " + json.dumps(self.results["ceiling"]))
        finally:
            for t in terms:
                t.stop()
            if self.backend:
                self.backend.terminate()
                self.backend.wait()
        self.results["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds")
        self.results["speed"]["end"] = speed_probe()
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1))
        report = render(self.results)
        (self.out / "results.md").write_text(report)
        charts = subprocess.run([sys.executable, str(HERE / "charts.py"),
                                 str(self.out / "results.json"), str(self.out)],
                                capture_output=True, text=True)
        if charts.returncode != 0:
            log("charts skipped: " + (charts.stderr.strip().splitlines() or ["?"])[-1])
        print(report)
        shutil.rmtree(self.work, ignore_errors=True)


def machine():
    model = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ssl = subprocess.run(["openssl", "version"], capture_output=True, text=True).stdout.strip()
    mem = 0
    for line in open("/proc/meminfo"):
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1]) // 1024 // 1024
    busy = subprocess.run(["pgrep", "-c", "cc1plus"], capture_output=True, text=True)
    return {"nproc": os.cpu_count(), "cpu": model, "memory_gib": mem,
            "kernel": platform.release(), "openssl": ssl,
            "date": datetime.date.today().isoformat(),
            "source": source_revision(),
            "compilers_running_at_start": int(busy.stdout.strip() or 0)}


def source_revision():
    """The commit the measured sluice was built from, and whether tracked files other than the
    results a run writes differed from it when the run started (None outside a git checkout)."""
    def git(*args):
        return subprocess.run(["git", "-C", str(HERE.parent), *args], capture_output=True,
                              text=True)
    try:
        head = git("rev-parse", "--short=12", "HEAD")
        if head.returncode != 0:
            return None
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                      ":(exclude)bench/results").stdout.strip()
    except OSError:
        return None
    return head.stdout.strip() + (" with local changes" if changed else "")


def speed_probe():
    """ECDSA P-256 signatures per second on the terminator's CPU (openssl speed, 1 s): taken at
    the start and the end of a run and after each workload, so a report says when the machine
    itself changed speed."""
    out = subprocess.run(pinned(TERMINATOR_CPU, ["openssl", "speed", "-mr", "-seconds", "1",
                                                  "ecdsap256"]),
                         capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.startswith("+F4:"):  # +F4:index:bits:signs per second:verifications per second
            return float(line.split(":")[3])
    return None


# --- the report --------------------------------------------------------------------------------

def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(results):
    """{workload: {terminator: {wall, cpu, p50, p99, errors, resumed, tickets, util}}}."""
    out = {}
    for key, per in results["rounds"].items():
        for term, runs in per.items():
            fig = lambda r, c: Bench.figure(key if key != "rr_direct" else "rr", r, c)
            out.setdefault(key, {})[term] = {
                "wall": med([fig(r, False) for r in runs]),
                "cpu": med([fig(r, True) for r in runs]) if term != "backend" else None,
                "p50": med([r["p50_us"] for r in runs]),
                "p99": med([r["p99_us"] for r in runs]),
                "errors": sum(r["errors"] for r in runs),
                "completed": sum(r["completed"] for r in runs),
                "resumed": sum(r["resumed"] for r in runs),
                "tickets": sum(r["tickets"] for r in runs),
                "util": med([r["cpu"] / r["seconds"] for r in runs]),
                "rounds": len(runs),
            }
    return out


def fmt(v, digits=0):
    if v is None:
        return "—"
    if digits == 0:
        return f"{v:,.0f}"
    return f"{v:,.{digits}f}"


def ratio(mine, peers, lower_better=False):
    peers = [p for p in peers if p is not None and p > 0]
    if mine is None or not peers:
        return "—"
    best = min(peers) if lower_better else max(peers)
    return f"**{mine / best:.2f}×**"


def same_round_ratio(results, key):
    """The median over rounds of sluice's figure per terminator CPU-second divided by the best
    peer's in the same round: every terminator runs once per round, one after the other, so a
    slow spell of the machine that spans a round weighs on all of them alike."""
    per = results["rounds"].get(key, {})
    by_round = {}
    for term, runs in per.items():
        for i, r in enumerate(runs):
            value = Bench.figure(key, r, True)
            if value:
                by_round.setdefault(r.get("round", i), {})[term] = value
    ratios = [figs["sluice"] / max(v for t, v in figs.items() if t != "sluice")
              for figs in by_round.values()
              if "sluice" in figs and any(t != "sluice" for t in figs)]
    if not ratios:
        return "—"
    return f"{statistics.median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f})"


def render(results):
    s = summarize(results)
    measured = (list(s.values()) + list(results.get("idle", {}).values()) +
                [results.get("silent", {})])
    terms = [t for t in ["sluice"] + PEERS if any(t in per for per in measured) or
             t in results.get("errors", {})]
    peers = [t for t in terms if t != "sluice"]
    m = results["machine"]
    lines = []
    add = lines.append
    add("# sluice benchmark results")
    add("")
    add(f"- Date: {m['date']} (run {results['started']} – {results['finished']} UTC)")
    add(f"- Machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory_gib']} GiB, Linux {m['kernel']}, "
        f"{m['openssl']}")
    if m.get("source"):
        add(f"- Code: sluice at commit {m['source']}")
    v = results.get("versions", {})
    add("- Terminators: " + ", ".join(f"{NAMES[t]} ({v.get(t, '?')})" for t in terms))
    st = results["settings"]
    add(f"- Method: terminator pinned to CPU 0, load generator and backend to CPU 1 (for the "
        f"round trips, one process: the load generator echoes as the backend in the same "
        f"thread); "
        f"{st['rounds']} round(s) of {st['duration']} s (after {st['warmup']} s warm-up) per "
        f"figure, median shown; per CPU-second = work done / (utime + stime of the terminator's "
        f"processes) over the same window. TLS 1.3 and 1.2, X25519, AES-128-GCM everywhere.")
    speed = results.get("speed", {})
    if speed.get("start") and speed.get("end"):
        a, b = speed["start"], speed["end"]
        during = [v for v in speed.get("during", []) if v]
        probes = [a, b] + during
        change = (max(probes) - min(probes)) / max(probes)
        add(f"- Machine check: {a:,.0f} ECDSA P-256 signatures per second on the terminator's CPU "
            f"at the start, {b:,.0f} at the end" +
            (f", {min(during):,.0f}–{max(during):,.0f} between the workloads" if during else "") +
            " (`openssl speed`, 1 s)" +
            (f"; **the machine's own speed changed by {change:.0%} during the run**, so the "
             "same-round ratios are the ones to read." if change > 0.15 else "."))
    if m.get("compilers_running_at_start"):
        add(f"- Note: {m['compilers_running_at_start']} compiler processes were running when the "
            "run started (a shared machine); per-CPU-second figures are the robust ones.")
    for t, err in results.get("errors", {}).items():
        add(f"- **{NAMES[t]} not measured**: {err}")
    add("")

    header = "| workload | " + " | ".join(NAMES[t] for t in terms) + " | sluice / best peer |"
    rule = "|---|" + "---:|" * (len(terms) + 1)

    def row(title, values, lower_better=False, digits=0):
        cells = [fmt(values.get(t), digits) if t not in results.get("errors", {}) else
                 "not run" for t in terms]
        return (f"| {title} | " + " | ".join(cells) + " | " +
                ratio(values.get("sluice"), [values.get(p) for p in peers], lower_better) + " |")

    titles = {k: (t, u) for k, t, _, u in WORKLOADS}
    add("## Per terminator CPU-second")
    add("")
    add("Handshakes, round trips or MB per second of CPU the terminator used (higher is better). "
        "The last column pairs the figures of each round instead: sluice's divided by the best "
        "peer's in the same round, median over the rounds (lowest–highest in brackets).")
    add("")
    add(header + " same round |")
    add(rule + "---:|")
    for key, (title, unit) in titles.items():
        if key in s:
            add(row(f"{title} ({unit})", {t: s[key][t]["cpu"] for t in s[key]}) +
                f" {same_round_ratio(results, key)} |")
    add("")
    add("## Per wall-clock second")
    add("")
    add("The same runs per second of wall time; the terminator's CPU use is in brackets "
        "(1.00 = one full core).")
    add("")
    add(header)
    add(rule)
    for key, (title, unit) in titles.items():
        if key not in s:
            continue
        cells = []
        for t in terms:
            if t in results.get("errors", {}) or t not in s[key]:
                cells.append("not run")
            else:
                cells.append(f"{fmt(s[key][t]['wall'])} ({s[key][t]['util']:.2f})")
        add(f"| {title} ({unit}/s) | " + " | ".join(cells) + " | " +
            ratio(s[key].get("sluice", {}).get("wall"),
                  [s[key].get(p, {}).get("wall") for p in peers]) + " |")
    add("")
    if "rr" in s:
        add("## Keep-alive latency (64 connections, 100-byte echo)")
        add("")
        add(header.replace("sluice / best peer", "sluice / best peer (lower is better)"))
        add(rule)
        add(row("p50 latency (µs)", {t: s["rr"][t]["p50"] for t in s["rr"]}, True))
        add(row("p99 latency (µs)", {t: s["rr"][t]["p99"] for t in s["rr"]}, True))
        base = s.get("rr_direct", {}).get("backend")
        if base:
            add("")
            add(f"Baseline, the load generator straight to its own echo (no TLS, no terminator): "
                f"{fmt(base['wall'])} round trips/s, p50 {fmt(base['p50'])} µs, "
                f"p99 {fmt(base['p99'])} µs.")
        add("")
    res_notes = []
    for key in ("res_13", "res_12"):
        for t, r in s.get(key, {}).items():
            if r["completed"]:
                res_notes.append(f"{NAMES[t]} {titles[key][0].split(', ')[1]}: "
                                 f"{100 * r['resumed'] / r['completed']:.0f}% resumed, "
                                 f"{100 * r['tickets'] / r['completed']:.0f}% brought a new ticket")
    if res_notes:
        add("Resumption check (share of measured connections): " + "; ".join(res_notes) + ".")
        add("")
    errs = [f"{NAMES.get(t, t)} {k}: {r['errors']}" for k, per in s.items()
            for t, r in per.items() if r["errors"]]
    if errs:
        add("Failed connections during measurement: " + "; ".join(errs) + ".")
        add("")

    if results.get("idle"):
        add("## Memory per idle TLS connection")
        add("")
        add("RSS growth of the terminator's processes divided by established idle TLS 1.3 "
            "connections (each did a handshake and one echo), read 2.5 s after the last one "
            "was established, fresh process per count (KiB, lower is better).")
        add("")
        add(header.replace("sluice / best peer", "sluice / best peer (lower is better)"))
        add(rule)
        for count, per in results["idle"].items():
            vals = {t: r["per_conn"] / 1024 for t, r in per.items() if "per_conn" in r}
            add(row(f"{int(count):,} connections (KiB each)", vals, True, 1))
        top = max(int(c) for c in results["idle"])
        limit = results["settings"].get("fd_limit")
        if top < 10000 and limit and not results["settings"].get("quick"):
            add("")
            add(f"10,000 connections would need more than 20,000 descriptors per terminator; "
                f"the descriptor limit here is {limit:,} (the hard limit cannot be raised in "
                f"this sandbox), so the larger count is {top:,}.")
        problems = [f"{NAMES[t]} at {c}: {r['error']}" for c, per in results["idle"].items()
                    for t, r in per.items() if "error" in r]
        problems += [f"{NAMES[t]} at {c}: {r['held']} of {r['count']} held"
                     for c, per in results["idle"].items() for t, r in per.items()
                     if "held" in r and r["held"] < r["count"]]
        if problems:
            add("")
            add("Idle-test problems: " + "; ".join(problems) + ".")
        add("")

    silent = results.get("silent") or {}
    if silent:
        count = next((r["count"] for r in silent.values() if "count" in r), 0)
        add("## Memory per silent connection")
        add("")
        add(f"RSS growth of the terminator's processes divided by {count:,} TCP connections that "
            "sent nothing at all (a browser's preconnect, a port check, a silent client), read "
            "2.5 s after the last one was opened, fresh process (KiB, lower is better).")
        add("")
        add(header.replace("sluice / best peer", "sluice / best peer (lower is better)"))
        add(rule)
        vals = {t: r["per_conn"] / 1024 for t, r in silent.items() if "per_conn" in r}
        add(row(f"{count:,} silent connections (KiB each)", vals, True, 1))
        problems = [f"{NAMES[t]}: {r['error']}" for t, r in silent.items() if "error" in r]
        problems += [f"{NAMES[t]}: {r['held']} of {r['count']} held" for t, r in silent.items()
                     if "held" in r and r["held"] < r["count"]]
        if problems:
            add("")
            add("Silent-test problems: " + "; ".join(problems) + ".")
        add("")

    c = results.get("ceiling")
    if c and "error" not in c:
        tcp = s.get("tcp_conn", {}).get("haproxy", {}).get("cpu")
        add("## The ceiling: sluice's Engine in memory")
        add("")
        add("The same handshakes and bulk crypto done by `sluice::Engine` with no sockets "
            "(bench/ceiling: server CPU only), against the daemon's per-CPU-second figures.")
        add("")
        if tcp:
            add(f"Connections alone cost: HAProxy proxying the same exchange with no TLS "
                f"(connect, 32-byte echo through the backend, close) reached {fmt(tcp)} "
                f"connections per CPU-second. \"Engine + TCP\" is the rate if a handshake cost "
                f"the Engine's time plus that (in brackets: how close the daemon gets).")
            add("")
        add("| workload | Engine in memory | Engine + TCP (daemon's share) | sluice daemon | "
            "daemon / Engine |")
        add("|---|---:|---:|---:|---:|")
        pairs = [("hs_ecdsa_13", "ecdsa_tls13_full"), ("hs_ecdsa_12", "ecdsa_tls12_full"),
                 ("hs_rsa_13", "rsa_tls13_full"), ("hs_rsa_12", "rsa_tls12_full"),
                 ("res_13", "ecdsa_tls13_resumed"), ("res_12", "ecdsa_tls12_resumed"),
                 ("down", "download_mb_per_cpu_s"), ("up", "upload_mb_per_cpu_s")]
        for key, ck in pairs:
            daemon = s.get(key, {}).get("sluice", {}).get("cpu")
            eng = c.get(ck)
            r = f"{daemon / eng:.2f}" if daemon and eng else "—"
            with_tcp = "—"
            if daemon and eng and tcp and key.startswith(("hs_", "res_")):
                with_tcp = f"{fmt(1 / (1 / eng + 1 / tcp))} ({daemon * (1 / eng + 1 / tcp):.2f})"
            add(f"| {titles[key][0]} ({titles[key][1]}) | {fmt(eng)} | {with_tcp} | "
                f"{fmt(daemon)} | {r} |")
        idle = results.get("idle", {})
        last = sorted(idle, key=int)[-1] if idle else None
        daemon = idle.get(last, {}).get("sluice", {}).get("per_conn") if last else None
        engines = c.get("idle_engines")
        for ck, what in (("idle_bytes_per_engine", "heap in use"),
                         ("idle_rss_per_engine", "RSS growth")):
            floor = c.get(ck)
            if not floor:
                continue
            line = (f"| idle connection (KiB): Engine floor, {what}"
                    f"{f' ({int(engines):,} engines)' if engines else ''} | "
                    f"{floor / 1024:.1f} | — |")
            line += (f" {daemon / 1024:.1f} ({daemon - floor:,.0f} bytes above) | "
                     f"{daemon / floor:.2f} |" if daemon else " — | — |")
            add(line)
        add("")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", default="build-release")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--quick", action="store_true", help="one short round: about 3 minutes")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--duration", type=float)
    ap.add_argument("--warmup", type=float)
    ap.add_argument("--idle", type=str,
                    help="comma-separated idle connection counts, or none")
    ap.add_argument("--silent", type=str,
                    help="silent connections for the memory test (default 2000, quick 500), or none")
    ap.add_argument("--only", type=str, help="comma-separated terminators (sluice,hitch,...)")
    ap.add_argument("--workloads", type=str,
                    help="comma-separated workload keys (" + ",".join(w[0] for w in WORKLOADS) +
                    "); default all")
    ap.add_argument("--no-ceiling", action="store_true")
    ap.add_argument("--render", type=str, help="only re-render results.md from a results.json")
    ap.add_argument("--profile", action="store_true",
                    help="perf profiles of sluice only, written to OUT/profile.txt")
    ap.add_argument("--instructions", action="store_true",
                    help="user-space instructions per operation under callgrind, sluice and "
                    "hitch (--only to choose), written to OUT/instructions.md")
    args = ap.parse_args()
    if args.render:
        results = json.loads(Path(args.render).read_text())
        sys.stdout.write(render(results))
        return
    quick = args.quick
    args.rounds = args.rounds if args.rounds is not None else (1 if quick else 5)
    args.duration = args.duration or (1.5 if quick else 3.0)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if quick else 1.0)
    args.ceiling_seconds = 0.3 if quick else 1.0
    args.terminators = (args.only or "sluice,hitch,haproxy,stunnel").split(",")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        with open("/proc/sys/fs/nr_open") as f:
            top = int(f.read())
        resource.setrlimit(resource.RLIMIT_NOFILE, (top, top))
    except (OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # A terminator holds two descriptors per connection (client and backend): 10,000 idle
    # connections need a limit above 20,000; below that, the largest thousand that fits.
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    fits = min(10000, (limit - 200) // 2 // 1000 * 1000)
    args.workloads = [w for w in (args.workloads or "").split(",") if w]
    args.idle_counts = ([] if args.idle == "none" else
                        [int(x) for x in args.idle.split(",") if x] if args.idle else
                        [1000] if quick else sorted({1000, max(1000, fits)}))
    args.silent = (0 if args.silent == "none" else int(args.silent) if args.silent else
                   500 if quick else 2000)
    args.fd_limit = limit
    if args.profile:
        Bench(args).profile()
        return
    if args.instructions:
        if not args.only:
            args.terminators = ["sluice", "hitch"]
        Bench(args).instructions()
        return
    Bench(args).run()


if __name__ == "__main__":
    main()
