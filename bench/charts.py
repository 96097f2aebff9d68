#!/usr/bin/env python3
"""PNG charts of the latest benchmark figures (bench/results/*.json → docs/bench/*.png).

    python bench/charts.py   # after bench/ingest, bench/relay, bench/observability, bench/scrape

Per benchmark: msg/s of Empath and Postfix per run (ingest, relay), the latency
distribution of the relay's fixed-rate probe, observability on/off per run, and the
scrape times.  Needs matplotlib (`pip install -e '.[bench]'`); a missing result is
skipped with a note.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
OUT = ROOT / "docs" / "bench"


def load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    if not path.exists():
        print(f"charts: no {path.relative_to(ROOT)} (run bench/{name} first)")
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def bars(name: str, title: str, series: dict[str, list[float]], unit: str, machine: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    n = max(len(v) for v in series.values())
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        xs = [r + i * width for r in range(len(values))]
        ax.bar(xs, values, width, label=label)
        for x, v in zip(xs, values, strict=True):
            ax.annotate(f"{v:.0f}", (x, v), ha="center", va="bottom", fontsize=8)
    ax.set_xticks([r + width * (len(series) - 1) / 2 for r in range(n)])
    ax.set_xticklabels([f"run {r + 1}" for r in range(n)])
    ax.set_ylabel(unit)
    ax.set_title(title)
    ax.legend()
    fig.text(0.01, 0.01, machine, fontsize=7, color="grey")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(OUT / f"{name}.png", dpi=100)
    plt.close(fig)
    print(f"charts: wrote docs/bench/{name}.png")


def latency(data: dict[str, Any]) -> None:
    lat = data["latency_s"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for label in ("empath", "postfix"):
        values = sorted(v * 1000 for v in lat[label])
        if not values:
            continue
        ys = [(i + 1) / len(values) for i in range(len(values))]
        ax.plot(values, ys, label=f"{label} (n={len(values)})")
    ax.set_xscale("log")
    ax.set_xlabel("250 in → remote 250 (ms, log scale)")
    ax.set_ylabel("fraction of messages")
    ax.axhline(0.95, color="grey", linestyle=":", linewidth=1)
    ax.set_title(f"relay latency at {lat['rate']:.0f} msg/s (cumulative distribution)")
    ax.legend()
    fig.text(0.01, 0.01, data["machine"], fontsize=7, color="grey")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(OUT / "relay-latency.png", dpi=100)
    plt.close(fig)
    print("charts: wrote docs/bench/relay-latency.png")


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    if (d := load("ingest")) is not None:
        runs = d["runs"]
        bars("ingest", "ingest (smtp-source → MTA, mail parked)",
             {"Empath": [r["empath"] for r in runs],
              "Postfix (hold)": [r["postfix"] for r in runs]},
             "msg/s", d["machine"])  # fmt: skip
    if (d := load("relay")) is not None:
        runs = d["runs"]
        bars("relay", "relay end to end (smtp-source → MTA → smtp-sink)",
             {"Empath": [r["empath"] for r in runs], "Postfix": [r["postfix"] for r in runs]},
             "msg/s", d["machine"])  # fmt: skip
        if "latency_s" in d:
            latency(d)
    if (d := load("observability")) is not None:
        runs = d["runs"]
        bars("observability", "relay with observability on (Prometheus 1 s + JSON logs) vs off",
             {"on": [r["on"] for r in runs], "off": [r["off"] for r in runs]},
             "msg/s", d["machine"])  # fmt: skip
    if (d := load("scrape")) is not None:
        bars("scrape", f"/metrics scrape, {d['args']['domains']} domains, "
             f"{d['args']['units']} queued units",
             {"wall ms": d["times_ms"], "CPU ms": d.get("cpu_ms", [])},
             "ms", d["machine"])  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
