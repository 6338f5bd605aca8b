"""The picture beside RESULTS.md: throughput against layer size and against concurrency, both
servers on the same axes. matplotlib is optional (`pip install -e '.[bench]'`, which `make bench`
does); without it the run says so and writes the tables only."""

from __future__ import annotations

import re
import sys
from pathlib import Path

SIZE = re.compile(r"^(push_large|pull_large)\[(\d+)(MiB|GiB)(,warm)?\]$")
MANY = re.compile(r"^(push_concurrent|pull_concurrent|pull_fanout)\[(\d+)x(\d+)(MiB|GiB)\]$")


def _mib(number: str, unit: str) -> int:
    return int(number) * (1024 if unit == "GiB" else 1)


def series(summaries: list[dict], names: tuple[str, str]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """{panel: {line label: [(x, MiB/s median), ...]}} from the summaries; lines per server."""
    panels: dict[str, dict[str, list[tuple[float, float]]]] = {"size": {}, "concurrency": {}}

    def add(panel: str, label: str, x: float, per: dict, figure: str = "MiB/s") -> None:
        for name in names:
            median = per.get(figure, {}).get(name, {}).get("median")
            if median:
                panels[panel].setdefault(f"{label}, {name}", []).append((x, median))

    pushed_mib = None
    for s in summaries:
        if m := SIZE.match(s["scenario"]):
            kind, mib = m[1], _mib(m[2], m[3])
            add("size", "push" if kind == "push_large" else "pull (warm)", mib, s)
        if m := MANY.match(s["scenario"]):
            kind, clients = m[1], int(m[2])
            if kind == "push_concurrent":
                pushed_mib = _mib(m[3], m[4])
                add("concurrency", f"push {m[3]}{m[4]}", clients, s)
            else:
                add("concurrency", f"pull {m[3]}{m[4]}", clients, s)
                if kind == "pull_fanout":  # one client alone, measured in the same scenario
                    add("concurrency", f"pull {m[3]}{m[4]}", 1, s, "one_client_MiB/s")
    if pushed_mib is not None:  # one push of the same size is the single point of the push line
        for s in summaries:
            if (m := SIZE.match(s["scenario"])) and m[1] == "push_large" and _mib(m[2], m[3]) == pushed_mib:
                add("concurrency", f"push {m[2]}{m[3]}", 1, s)
    return {panel: {label: sorted(points) for label, points in lines.items()} for panel, lines in panels.items()}


def draw(summaries: list[dict], names: tuple[str, str], out: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("benchmarks: no chart (matplotlib is not installed: pip install -e '.[bench]')", file=sys.stderr)
        return False
    panels = series(summaries, names)
    if not any(panels.values()):
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    titles = {"size": ("Throughput against layer size", "layer size (MiB)"),
              "concurrency": ("Throughput against concurrency (aggregate)", "clients at once")}
    for ax, (panel, lines) in zip(axes, panels.items()):
        for label, points in lines.items():
            style = "-" if label.endswith(names[0]) else "--"
            ax.plot([x for x, _ in points], [y for _, y in points], style, marker="o", label=label)
        ax.set_xscale("log", base=2)
        xs = sorted({x for points in lines.values() for x, _ in points})
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.minorticks_off()
        ax.set_title(titles[panel][0])
        ax.set_xlabel(titles[panel][1])
        ax.set_ylabel("MiB/s")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        if lines:
            ax.legend(fontsize="small")
    fig.suptitle(f"{names[0]} (solid) and {names[1]} (dashed), medians")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return True
