"""PNG plots from a locust run's CSV history (`locust --csv PREFIX --csv-full-history`):

    python clients/loadtest_plots.py PREFIX   ->  PREFIX_latency.png, PREFIX_tokens.png

latency: TTFT and TPOT percentiles (p50, p90, p99) over time, per endpoint; tokens: generated tokens
per second over time (stream requests/s times their average size, which the locustfile sets to the
request's tokens)."""

from __future__ import annotations

import csv
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(prefix: str) -> dict[tuple[str, str], list[dict]]:
    rows: dict[tuple[str, str], list[dict]] = defaultdict(list)
    with open(f"{prefix}_stats_history.csv") as f:
        for r in csv.DictReader(f):
            if r["Name"] != "Aggregated":
                rows[(r["Type"], r["Name"])].append(r)
    return rows


def _num(v: str) -> float:
    try:
        return float(v)
    except ValueError:       # "N/A" before the first sample
        return float("nan")


def plot(prefix: str) -> list[str]:
    rows = load(prefix)
    t0 = min(float(r["Timestamp"]) for rs in rows.values() for r in rs)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, kind in zip(axes, ("TTFT", "TPOT")):
        for (k, name), rs in sorted(rows.items()):
            if k != kind:
                continue
            t = [float(r["Timestamp"]) - t0 for r in rs]
            for p in ("50%", "90%", "99%"):
                ax.plot(t, [_num(r[p]) for r in rs], label=f"{name} p{p[:-1]}")
        ax.set_title(f"{kind} (ms, percentiles since start)")
        ax.set_xlabel("s")
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = [f"{prefix}_latency.png", f"{prefix}_tokens.png"]
    fig.savefig(out[0])
    fig, ax = plt.subplots(figsize=(6, 4))
    for (kind, name), rs in sorted(rows.items()):
        if kind in ("gRPC stream", "POST"):
            t = [float(r["Timestamp"]) - t0 for r in rs]
            ax.plot(t, [_num(r["Requests/s"]) * _num(r["Total Average Content Size"]) for r in rs], label=name)
    ax.set_title("generated tokens/s")
    ax.set_xlabel("s")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out[1])
    return out


if __name__ == "__main__":
    print("\n".join(plot(sys.argv[1])))
