"""The figures of ``optim report``: one function per figure, data in, PNG out.

Each function takes the plain data that :mod:`stagetune.optim.report` stores in
``report.json`` (so the picture and the checked data are the same) and writes
one PNG with matplotlib's Agg canvas (no pyplot, no display).  Many lines are
drawn as one collection: a 1,000-trial study draws in well under a second.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["STATE_COLOURS", "draw_history", "draw_importance", "draw_curves", "draw_parallel",
           "draw_memory", "draw_timeline", "draw_stages"]

#: Trial state -> colour, the same in every figure.
STATE_COLOURS = {
    "COMPLETE": "#1f77b4", "PRUNED": "#d62728", "FAIL": "#7f7f7f", "RUNNING": "#2ca02c", "WAITING": "#bcbd22",
}


def _figure(width: float = 7.0, height: float = 4.0) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig: Any, path: Path) -> None:
    # No software/date metadata: the same study gives the same bytes.
    fig.savefig(path, format="png", metadata={"Software": None})


def draw_history(data: dict[str, Any], path: Path, label: str) -> None:
    """Each completed trial's value by trial number, and the best so far."""
    fig = _figure()
    ax = fig.add_subplot()
    if data["trials"]:
        xs, ys = zip(*data["trials"])
        ax.scatter(xs, ys, s=10, color=STATE_COLOURS["COMPLETE"], alpha=0.6, label="trial value")
        bx, by = zip(*data["best_so_far"])
        ax.step(bx, by, where="post", color="#ff7f0e", linewidth=2, label="best so far")
        ax.legend(loc="upper right")
    ax.set_xlabel("trial number")
    ax.set_ylabel(label)
    ax.set_title("Optimisation history")
    _save(fig, path)


def draw_importance(data: dict[str, Any], path: Path) -> None:
    """Horizontal bars, most important on top."""
    items = list(data["importances"].items())
    fig = _figure(7.0, max(2.0, 0.4 * len(items) + 1.2))
    ax = fig.add_subplot()
    names = [n for n, _ in reversed(items)]
    ax.barh(names, [v for _, v in reversed(items)], color=STATE_COLOURS["COMPLETE"])
    ax.set_xlabel(f"importance ({data['evaluator']})")
    ax.set_title("Parameter importances")
    _save(fig, path)


def draw_curves(data: dict[str, Any], path: Path, label: str) -> None:
    """Each trial's reported values per epoch; a pruned trial ends in a red cross."""
    from matplotlib.collections import LineCollection
    from matplotlib.ticker import MaxNLocator

    fig = _figure()
    ax = fig.add_subplot()
    for state in ("COMPLETE", "RUNNING", "FAIL", "PRUNED"):
        curves = [c for c in data["curves"] if c["state"] == state]
        lines = [list(zip(c["steps"], c["values"])) for c in curves]
        if lines:
            ax.add_collection(LineCollection(lines, colors=STATE_COLOURS[state], linewidths=0.8, alpha=0.6,
                                             label=f"{state.lower()} ({len(lines)})"))
    pruned = [(c["steps"][-1], c["values"][-1]) for c in data["curves"] if c["pruned"]]
    if pruned:
        xs, ys = zip(*pruned)
        ax.scatter(xs, ys, marker="x", s=25, color=STATE_COLOURS["PRUNED"], zorder=3, label="pruned here")
    if data["curves"]:
        ax.autoscale_view()
        ax.legend(loc="upper right")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(label)
    ax.set_title("Learning curves (intermediate values)")
    _save(fig, path)


def draw_parallel(data: dict[str, Any], path: Path, label: str) -> None:
    """Completed trials across the top parameters (scaled to [0, 1]), coloured by value."""
    from matplotlib import colormaps
    from matplotlib.collections import LineCollection
    from matplotlib.colors import Normalize

    axes = [*data["params"], "value"]
    fig = _figure(max(6.0, 1.6 * len(axes)), 4.5)
    ax = fig.add_subplot()
    values = [t["value"] for t in data["trials"]]
    lines = [list(enumerate(t["scaled"])) for t in data["trials"]]
    if lines:
        norm = Normalize(min(values), max(values) if max(values) > min(values) else min(values) + 1)
        # The best trials on top.
        order = sorted(range(len(lines)), key=lambda i: -values[i])
        coll = LineCollection([lines[i] for i in order], cmap=colormaps["viridis_r"], norm=norm,
                              linewidths=1.0, alpha=0.7)
        coll.set_array([values[i] for i in order])
        ax.add_collection(coll)
        fig.colorbar(coll, ax=ax, label=label)
    for x in range(len(axes)):
        ax.axvline(x, color="black", linewidth=0.6)
    ax.set_xlim(-0.1, len(axes) - 0.9)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xticks(range(len(axes)), [a.split(".", 1)[-1] for a in axes], rotation=20, ha="right")
    ax.set_yticks([0, 1], ["low", "high"])
    ax.set_title("Parallel coordinates (top parameters; log scale where sampled so)")
    _save(fig, path)


def draw_memory(data: dict[str, Any], path: Path, label: str) -> None:
    """Measured training-step bytes against the value; the limit as a vertical line."""
    fig = _figure()
    ax = fig.add_subplot()
    with_value = [p for p in data["points"] if p["value"] is not None]
    top = max((p["value"] for p in with_value), default=1.0)
    for state in ("COMPLETE", "PRUNED", "FAIL", "RUNNING"):
        pts = [p for p in with_value if p["state"] == state]
        if pts:
            ax.scatter([p["mem_bytes"] / 2**20 for p in pts], [p["value"] for p in pts], s=14,
                       color=STATE_COLOURS[state], label=state.lower())
    no_value = [p for p in data["points"] if p["value"] is None]
    if no_value:
        ax.scatter([p["mem_bytes"] / 2**20 for p in no_value], [top] * len(no_value), marker="x", s=25,
                   color=STATE_COLOURS["PRUNED"], label="pruned before training (no value)")
    if data["limit_bytes"] is not None:
        ax.axvline(data["limit_bytes"] / 2**20, color="black", linestyle="--",
                   label=f"limit {data['limit_bytes'] / 2**20:.0f} MiB")
    ax.set_xlabel("training-step memory (MiB)")
    ax.set_ylabel(label)
    ax.set_title("Memory footprint against the value")
    ax.legend(loc="best", fontsize="small")
    _save(fig, path)


def draw_timeline(data: dict[str, Any], path: Path) -> None:
    """One row per worker, one bar per trial from its start to its end, coloured by state."""
    from matplotlib.patches import Patch

    workers = data["workers"]
    fig = _figure(8.0, max(2.0, 0.35 * len(workers) + 1.4))
    ax = fig.add_subplot()
    by_row: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for bar in data["bars"]:
        row = workers.index(bar["worker"])
        by_row.setdefault((row, bar["state"]), []).append((bar["start_s"], max(bar["end_s"] - bar["start_s"], 1e-3)))
    for (row, state), spans in sorted(by_row.items()):
        ax.broken_barh(spans, (row - 0.4, 0.8), facecolors=STATE_COLOURS[state], edgecolor="white", linewidth=0.3)
    ax.set_yticks(range(len(workers)), [w if len(w) <= 28 else "..." + w[-25:] for w in workers])
    ax.set_ylim(len(workers) - 0.5, -0.5)
    ax.set_xlabel("seconds since the first trial started")
    present = sorted({b["state"] for b in data["bars"]}, key=list(STATE_COLOURS).index)
    if present:
        ax.legend(handles=[Patch(color=STATE_COLOURS[s], label=s.lower()) for s in present],
                  loc="upper right", fontsize="small")
    ax.set_title("Trials per worker (gaps: idle)")
    _save(fig, path)


def draw_stages(rows: list[dict[str, Any]], path: Path) -> None:
    """A plan's stages side by side: best value, and finished trials against the budget."""
    fig = _figure(8.0, 3.5)
    left, right = fig.subplots(1, 2)
    names = [r["stage"] for r in rows]
    best = [r["best_value"] if r["best_value"] is not None else math.nan for r in rows]
    xs = range(len(rows))
    left.bar(list(xs), best, color=STATE_COLOURS["COMPLETE"])
    left.set_xticks(list(xs), names)  # a stage without a value yet keeps its place
    left.set_title("Best value per stage")
    right.bar([x - 0.2 for x in xs], [r["budget"] or 0 for r in rows], width=0.4, color="#cccccc", label="budget")
    right.bar([x + 0.2 for x in xs], [r["finished"] for r in rows], width=0.4, color="#ff7f0e", label="finished")
    right.set_xticks(list(xs), names)
    right.set_title("Trials per stage")
    right.legend(fontsize="small")
    _save(fig, path)
