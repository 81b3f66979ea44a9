#!/usr/bin/env python3
"""How sluice scales from 1 to 2 workers: full TLS 1.3 ECDSA handshakes and keep-alive round
trips through the daemon with `workers = 1` and `workers = 2`, per wall second and per sluice
CPU-second (utime + stime from /proc over the measured window). The load generator and backend
are not pinned, since on a 2-core machine pinning them would leave one core to two workers.

    bench/workers.py BUILD_DIR CERT_DIR [ROUNDS]

Uses BUILD_DIR/bench/{loadgen,backend} and BUILD_DIR/src/daemon/sluice (scripts/bench builds
them in build-release/). CERT_DIR holds ecdsa.crt and ecdsa.key. Prints a markdown table.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile

build, certs = sys.argv[1], sys.argv[2]
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
tick = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = open(f"/proc/{pid}/task/{tid}/stat").read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / tick


def start_backend():
    p = subprocess.Popen([f"{build}/bench/backend", "--port", "0"], stdout=subprocess.PIPE, text=True)
    return p, int(p.stdout.readline().split()[-1])


def start_sluice(workers, backend_port, folder):
    config = os.path.join(folder, f"w{workers}.toml")
    with open(config, "w") as f:
        f.write(f"""[global]
log_level = "warn"
workers = {workers}
drain_timeout = "1s"
max_handshakes_per_ip = 0
[log]
access = "off"
[tls]
ciphersuites = "TLS_AES_128_GCM_SHA256"
groups = "X25519"
[[listener]]
name = "ecdsa"
listen = "127.0.0.1:0"
certificate = {{ cert = "{certs}/ecdsa.crt", key = "{certs}/ecdsa.key" }}
backend = "127.0.0.1:{backend_port}"
""")
    r, w = os.pipe()
    p = subprocess.Popen([f"{build}/src/daemon/sluice", "--config", config, "--ready-fd", str(w)],
                         pass_fds=(w,), stderr=subprocess.DEVNULL)
    os.close(w)
    text = b""
    while b"ready\n" not in text:
        chunk = os.read(r, 4096)
        if not chunk:
            raise SystemExit("sluice did not start")
        text += chunk
    os.close(r)
    port = int(text.split(b"\n")[0].split()[-1].rsplit(b":", 1)[1])
    return p, port


def measure(pid, port, mode):
    argv = [f"{build}/bench/loadgen", "--mode", mode, "--port", str(port), "--tls", "13",
            "--conns", "64", "--warmup", "1", "--duration", "5"]
    if mode == "rr":
        argv += ["--size", "100"]
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    cpu0 = cpu1 = None
    result = None
    for line in p.stdout:
        line = line.strip()
        if line == "start":
            cpu0 = cpu_seconds(pid)
        elif line == "end":
            cpu1 = cpu_seconds(pid)
        elif line.startswith("{"):
            result = json.loads(line)
    p.wait()
    return result, cpu1 - cpu0


def main():
    backend, backend_port = start_backend()
    samples = {}
    with tempfile.TemporaryDirectory() as folder:
        try:
            for mode, key in (("handshake", "handshakes"), ("rr", "round trips")):
                # Rounds alternate 1 and 2 workers, so that a slow spell of the machine weighs on
                # both; each round pairs its two runs.
                for _ in range(rounds):
                    for workers in (1, 2):
                        sluice, port = start_sluice(workers, backend_port, folder)
                        try:
                            result, cpu = measure(sluice.pid, port, mode)
                        finally:
                            sluice.terminate()
                            sluice.wait()
                        count = result.get("completed", 0)
                        seconds = result.get("seconds") or 5
                        samples.setdefault((key, workers), []).append(
                            (count / seconds, count / cpu if cpu > 0 else 0))
        finally:
            backend.terminate()
            backend.wait()
    median = statistics.median
    print("| workload | workers | per wall second | per sluice CPU-second |")
    print("|---|---:|---:|---:|")
    for (key, workers), runs in samples.items():
        print(f"| {key} | {workers} | {median(r[0] for r in runs):,.0f} | "
              f"{median(r[1] for r in runs):,.0f} |")
    for key in ("handshakes", "round trips"):
        one, two = samples[(key, 1)], samples[(key, 2)]
        paired = sorted(b[1] / a[1] for a, b in zip(one, two) if a[1] > 0)
        print(f"\n{key}: 2 workers / 1 worker = "
              f"{median(r[0] for r in two) / median(r[0] for r in one):.2f}x per wall second, "
              f"{median(r[1] for r in two) / median(r[1] for r in one):.2f}x per CPU-second "
              f"(same round: {median(paired):.2f}x, rounds {paired[0]:.2f}-{paired[-1]:.2f})")

main()
