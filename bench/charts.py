#!/usr/bin/env python3
"""bench/charts.py RESULTS.json OUTDIR: draws handshakes.png, throughput.png and memory.png.

Needs matplotlib (Debian: python3-matplotlib); exits 1 with a message when it is missing.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import NAMES, PEERS, WORKLOADS, summarize  # noqa: E402

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    sys.exit("charts.py: matplotlib is missing (apt-get install python3-matplotlib)")

COLORS = {"sluice": "#1f77b4", "hitch": "#ff7f0e", "haproxy": "#2ca02c", "stunnel": "#d62728"}


def grouped(ax, groups, labels, series, ylabel, marks=None):
    """Bars: one group per workload, one bar per terminator; marks draws ceiling ticks."""
    terms = [t for t in ["sluice"] + PEERS if t in series]
    width = 0.8 / max(1, len(terms))
    for i, t in enumerate(terms):
        xs = [g + (i - (len(terms) - 1) / 2) * width for g in range(len(groups))]
        ys = [series[t].get(k) or 0 for k in groups]
        ax.bar(xs, ys, width, label=NAMES[t], color=COLORS[t])
    tallest = max([series[t].get(k) or 0 for t in terms for k in groups] + [1])
    top = tallest * 1.35
    if marks:
        for g, k in enumerate(groups):
            if not marks.get(k):
                continue
            if marks[k] <= top:
                ax.hlines(marks[k], g - 0.45, g + 0.45, colors="black", linestyles="dashed",
                          linewidth=1)
            else:
                # Off the scale: say so at the top instead of squashing every bar.
                ax.hlines(top * 0.97, g - 0.45, g + 0.45, colors="black", linestyles="dashed",
                          linewidth=1)
                ax.text(g, top * 0.92, f"ceiling {marks[k]:,.0f} ↑", ha="center", fontsize=7)
        ax.plot([], [], "k--", linewidth=1, label="sluice Engine in memory (ceiling)")
    ax.set_ylim(0, top)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")


def main():
    results = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    s = summarize(results)
    m = results["machine"]
    stamp = f"{m['date']}, {m['nproc']} × {m['cpu']}, terminator on one CPU"
    titles = {k: t for k, t, _, _ in WORKLOADS}
    ceiling = results.get("ceiling") or {}

    hs = [k for k in ("hs_ecdsa_13", "hs_ecdsa_12", "hs_rsa_13", "hs_rsa_12", "res_13", "res_12")
          if k in s]
    if hs:
        series = {}
        for k in hs:
            for t, r in s[k].items():
                series.setdefault(t, {})[k] = r["cpu"]
        marks = {"hs_ecdsa_13": ceiling.get("ecdsa_tls13_full"),
                 "hs_ecdsa_12": ceiling.get("ecdsa_tls12_full"),
                 "hs_rsa_13": ceiling.get("rsa_tls13_full"),
                 "hs_rsa_12": ceiling.get("rsa_tls12_full"),
                 "res_13": ceiling.get("ecdsa_tls13_resumed"),
                 "res_12": ceiling.get("ecdsa_tls12_resumed")}
        labels = [titles[k].replace("full handshake, ", "full\n").replace(
            "resumed handshake, ", "resumed\n") for k in hs]
        fig, ax = plt.subplots(figsize=(10, 5))
        grouped(ax, hs, labels, series, "handshakes per terminator CPU-second", marks)
        ax.set_title(f"TLS handshakes per CPU-second (higher is better)\n{stamp}", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / "handshakes.png", dpi=110)
        plt.close(fig)

    bulk = [k for k in ("down", "up") if k in s]
    if bulk:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
        for ax, per_cpu in zip(axes, (True, False)):
            series = {}
            for k in bulk:
                for t, r in s[k].items():
                    series.setdefault(t, {})[k] = r["cpu" if per_cpu else "wall"]
            marks = ({"down": ceiling.get("download_mb_per_cpu_s"),
                      "up": ceiling.get("upload_mb_per_cpu_s")} if per_cpu else None)
            grouped(ax, bulk, [titles[k] for k in bulk], series,
                    "MB per terminator CPU-second" if per_cpu else "MB per second", marks)
        fig.suptitle(f"Bulk throughput, AES-128-GCM (higher is better)\n{stamp}", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / "throughput.png", dpi=110)
        plt.close(fig)

    idle = results.get("idle") or {}
    if idle:
        counts = sorted(idle, key=int)
        series = {}
        for c in counts:
            for t, r in idle[c].items():
                if "per_conn" in r:
                    series.setdefault(t, {})[c] = r["per_conn"] / 1024
        fig, ax = plt.subplots(figsize=(8, 4.5))
        grouped(ax, counts, [f"{int(c):,} connections" for c in counts], series,
                "KiB of RSS per idle TLS connection")
        floor = ceiling.get("idle_bytes_per_engine")
        if floor:
            ax.axhline(floor / 1024, color="black", linestyle="dashed", linewidth=1,
                       label="sluice Engine heap floor")
            ax.legend(fontsize=8, loc="upper left")
        ax.set_title(f"Memory per idle TLS connection (lower is better)\n{stamp}", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / "memory.png", dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    main()
