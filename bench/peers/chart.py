"""``python chart.py RESULTS.json OUT.png``: the utilisation of each system as a
horizontal bar, the ideal 1.0 marked (run with .venv-peers, which has matplotlib)."""

# Runs in .venv-peers: llmworker's mypy has neither the peer libraries nor this folder.

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

OURS, PEER, IDEAL = "#2b6cb0", "#8a9bb0", "#c53030"


def label(row: dict) -> str:
    version = row["version"].split(" (")[0].split(",")[0]
    return f"{row['system']} {version}\n{row['short']}"


def main() -> None:
    data = json.loads(Path(sys.argv[1]).read_text())
    rows = list(reversed(data["rows"]))  # the first system on top
    values = [r["utilisation"] or 0.0 for r in rows]
    colours = [OURS if r["system"] == "llmworker" else PEER for r in rows]

    fig, ax = plt.subplots(figsize=(9.5, 0.62 * len(rows) + 1.5), dpi=130)
    bars = ax.barh([label(r) for r in rows], values, color=colours, height=0.62)
    ax.axvline(1.0, color=IDEAL, linestyle="--", linewidth=1.2)
    ax.text(1.01, len(rows) / 2 - 0.5, "ideal\n1.0", color=IDEAL, va="center", fontsize=9)
    for bar, row, value in zip(bars, rows, values, strict=True):
        y = bar.get_y() + bar.get_height() / 2
        if row["utilisation"] is None:
            ax.text(0.01, y, f"failed: {row['failure']}"[:70], va="center", fontsize=8.5)
            continue
        note = f"{value:.3f}"
        if row["max_inflight"] is not None and row["max_inflight"] > 20:
            note += f", max in flight {row['max_inflight']}"
        # Inside the bar's end when it fits, so no figure crosses the ideal line.
        if value > 0.25:
            ax.text(value - 0.01, y, note, va="center", ha="right", color="white",
                    fontsize=9, fontweight="bold")  # fmt: skip
        else:
            ax.text(value + 0.01, y, note, va="center", fontsize=9)
    ax.set_xlim(0, 1.1)
    ax.set_xlabel("utilisation = ideal makespan 10 s / measured makespan (higher is better)")
    ax.set_ylabel("system, how it ran (processes x concurrency)")
    ax.set_title(data["title"], fontsize=11)
    ax.tick_params(axis="y", labelsize=8.5)
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    fig.tight_layout()
    fig.savefig(sys.argv[2])


if __name__ == "__main__":
    main()
