"""The report's figures: R heatmaps, accuracy curves, average accuracy, ACC/BWT per group, size.

Every figure has a title and labelled axes with units; accuracy axes zoom to the data (a run
between 0.90 and 0.99 is not squeezed into the top of a 0-1 axis). Multi-run figures show one
mark per group of runs (same config but the seed): the mean, error bars of the sample standard
deviation, and each run as a dot. matplotlib's object API (``Figure`` rendered by Agg) is used,
so no screen and no global pyplot state are involved.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from growth.metrics import average_accuracy

if TYPE_CHECKING:
    from growth.runs import Group, Run

ACC_UNIT = "test accuracy (fraction correct)"
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=120, bbox_inches="tight")
    fig.clear()


def row_labels(tasks: Sequence[str]) -> list[str]:
    return ["init"] + [f"after {t}" for t in tasks]


def zoom(ax: Axes, values: Sequence[float], floor: float | None = 0.0,
         ceil: float | None = 1.0, include: Sequence[float] = ()) -> None:
    """Limit the y axis to the data (and `include`) with a margin, within [floor, ceil]."""
    xs = [float(v) for v in [*values, *include] if v is not None and math.isfinite(float(v))]
    if not xs:
        return
    lo, hi = min(xs), max(xs)
    pad = max(0.01, 0.1 * (hi - lo))
    lo, hi = lo - pad, hi + pad
    ax.set_ylim(lo if floor is None else max(floor, lo), hi if ceil is None else min(ceil, hi))


def _no_data(ax: Axes) -> None:
    ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes)


def _line_width(T: int) -> float:
    """Figure width for one x position per task: wider with more tasks, within a page."""
    return min(12.0, max(6.0, 0.6 * T + 3))


def _task_axis(ax: Axes, names: Sequence[str]) -> None:
    ax.set_xticks(range(1, len(names) + 1), names, rotation=45, ha="right")
    ax.set_xlim(0.5, len(names) + 0.5)
    ax.set_xlabel("after training task (task name)")


# ---- one run --------------------------------------------------------------------------------
def heatmap_figure(runs: Sequence[Run]) -> Figure:
    n = len(runs)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    T = max(r.R.shape[1] for r in runs)
    w, h = min(12.0, max(4.5, 0.9 * T + 2.5)), min(10.0, max(3.5, 0.55 * T + 2.5))
    fig = Figure(figsize=(w * ncols, h * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, r in zip(axes, runs):
        title = f"R matrix: {r.label}" if n > 1 else f"Accuracy matrix R ({r.label})"
        _heatmap(ax, r.R, r.tasks, title)
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig


def _heatmap(ax: Axes, R: np.ndarray, tasks: Sequence[str], title: str) -> None:
    """R as a heatmap with each value written in its cell; unmeasured cells grey."""
    cmap = colormaps["viridis"].with_extremes(bad="lightgrey")
    vmax = max(1.0, float(np.nanmax(R))) if np.isfinite(R).any() else 1.0
    img = ax.imshow(np.ma.masked_invalid(R), cmap=cmap, vmin=0.0, vmax=vmax, aspect="auto")
    T = R.shape[1]
    size = max(5.0, min(10.0, 60.0 / T))
    for (i, j), v in np.ndenumerate(R):
        text, color = ("–", "black") if np.isnan(v) else (f"{v:.2f}", _ink(v / vmax))
        ax.text(j, i, text, ha="center", va="center", fontsize=size, color=color)
    ax.set_xticks(range(T), tasks, rotation=45, ha="right")
    ax.set_yticks(range(T + 1), row_labels(tasks))
    ax.set_xlabel("evaluated task (task name)")
    ax.set_ylabel("model state (after training task)")
    ax.set_title(title)
    ax.figure.colorbar(img, ax=ax, label=ACC_UNIT)


def _ink(level: float) -> str:
    """Text colour readable on viridis: white on the dark end, black on the light end."""
    return "white" if level < 0.6 else "black"


def curves_figure(run: Run) -> Figure:
    """Each task's accuracy from its own training onwards, and the average over seen tasks."""
    T = run.R.shape[1]
    fig = Figure(figsize=(_line_width(T), 4.5), layout="constrained")
    ax = fig.subplots()
    shown: list[float] = []
    for j, name in enumerate(run.tasks):
        xs = np.arange(j + 1, T + 1)
        ys = run.R[j + 1:, j]
        keep = ~np.isnan(ys)
        if keep.any():
            ax.plot(xs[keep], ys[keep], marker="o", alpha=0.8, label=name)
            shown += ys[keep].tolist()
    avg = average_accuracy(run.R, run.done)
    if avg:
        ax.plot(np.arange(1, len(avg) + 1), avg, color="black", linewidth=2.5, linestyle="--",
                marker="D", label="average over tasks seen")
        shown += avg
    _task_axis(ax, run.tasks)
    zoom(ax, shown)
    ax.set_ylabel(ACC_UNIT)
    ax.set_title(f"Accuracy of each task as later tasks are learned ({run.label})")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(title="evaluated task", fontsize="small", ncols=max(1, T // 10),
                  loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
        _no_data(ax)
    return fig


def size_figure(run: Run) -> Figure:
    """Parameters after each task: total, per group (trunk, heads, masks, ...), with labels of
    the size relative to the base network."""
    T = run.R.shape[1]
    fig = Figure(figsize=(_line_width(T), 4.5), layout="constrained")
    ax = fig.subplots()
    xs = np.arange(1, len(run.sizes) + 1)
    ax.plot(xs, [s.get("params", np.nan) for s in run.sizes], marker="o", label="total")
    for g in _size_groups(run.sizes):
        ax.plot(xs, [s.get(f"{g}_params", np.nan) for s in run.sizes], linestyle="--",
                marker=".", label=g)
    for x, s in zip(xs, run.sizes):
        rel, p = s.get("relative"), s.get("params")
        if rel is not None and p is not None:
            ax.annotate(f"×{rel:.2f}", (x, p), textcoords="offset points", xytext=(0, 6),
                        ha="center", fontsize=8)
    _task_axis(ax, run.tasks)
    ax.set_ylabel("parameters (count)")
    ax.margins(y=0.12)
    ax.set_ylim(bottom=0)
    ax.set_title(f"Model size ({run.label}); labels: size relative to the base network")
    ax.grid(alpha=0.3)
    if run.sizes:
        ax.legend(fontsize="small")
    else:
        _no_data(ax)
    return fig


def _size_groups(sizes: Sequence[dict]) -> list[str]:
    """Size groups (trunk, heads, masks, ...) in first-seen order, from '<group>_params'."""
    seen: dict[str, None] = {}
    for s in sizes:
        for k in s:
            if k.endswith("_params") and k != "params":
                seen[k[: -len("_params")]] = None
    return list(seen)


# ---- groups of runs -------------------------------------------------------------------------
def _mean_std(values: Sequence[float | None]) -> tuple[float, float, int]:
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return math.nan, math.nan, 0
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0, len(xs)


def group_scores_figure(groups: Sequence[Group], score: str, title: str, ylabel: str,
                        accuracy: bool) -> Figure:
    """Per group: the mean as a large marker with error bars of the sample std, each run as a
    small dot beside it, n under the name. Points, not bars, so the axis can zoom honestly."""
    fig = Figure(figsize=(max(6.0, 1.1 * len(groups) + 3), 4.8), layout="constrained")
    ax = fig.subplots()
    colors, shown = colormaps["tab10"], []
    for k, g in enumerate(groups):
        values = [r.scores[score] for r in g.runs]
        mean, std, n = _mean_std(values)
        if n == 0:
            continue
        ax.errorbar(k, mean, yerr=std if n > 1 else None, fmt="o", markersize=9, capsize=6,
                    color=colors(k % 10))
        dots = [v for v in values if math.isfinite(v)]
        ax.scatter([k + 0.18] * len(dots), dots, color="black", s=12, zorder=3)
        ax.annotate(f"{mean:.3f}" + (f" ± {std:.3f}" if n > 1 else ""), (k, mean + std),
                    textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
        shown += [mean - std, mean + std, *dots]
    ax.set_xticks(range(len(groups)), [f"{g.label}\n(n={len(g.runs)})" for g in groups],
                  rotation=30, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_xlabel("group of runs (same config but the seed; n = runs)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if accuracy:
        zoom(ax, shown)
    else:
        zoom(ax, shown, floor=None, ceil=None, include=[0.0])
        ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.grid(axis="y", alpha=0.3)
    if not shown:
        _no_data(ax)
    return fig


def average_accuracy_figure(groups: Sequence[Group]) -> Figure:
    """Average accuracy over the tasks seen so far, after each task: mean ± std per group."""
    T = max(r.R.shape[1] for g in groups for r in g.runs)
    fig = Figure(figsize=(_line_width(T) + 2, 4.8), layout="constrained")
    ax = fig.subplots()
    shown: list[float] = []
    for k, g in enumerate(groups):
        curves = [average_accuracy(r.R, r.done) for r in g.runs]
        length = max((len(c) for c in curves), default=0)
        if not length:
            continue
        stats = [_mean_std([c[i] for c in curves if i < len(c)]) for i in range(length)]
        means = [s[0] for s in stats]
        stds = [s[1] for s in stats]
        ax.errorbar(np.arange(1, length + 1) + 0.04 * (k - len(groups) / 2), means, yerr=stds,
                    marker=_MARKERS[k % len(_MARKERS)], capsize=4,
                    label=f"{g.label} (n={len(g.runs)})")
        shown += [m - s for m, s in zip(means, stds)] + [m + s for m, s in zip(means, stds)]
    ax.set_xticks(range(1, T + 1), [str(t) for t in range(1, T + 1)])
    ax.set_xlim(0.5, T + 0.5)
    ax.set_xlabel("tasks learned so far (count)")
    ax.set_ylabel("average accuracy over tasks seen (fraction)")
    ax.set_title("Average accuracy as tasks are learned (mean ± std over each group's runs)")
    zoom(ax, shown)
    ax.grid(alpha=0.3)
    if ax.lines or ax.containers:
        ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
        _no_data(ax)
    return fig


def group_size_figure(groups: Sequence[Group]) -> Figure:
    """Parameters and bytes (masks and other stored parts included) after each task: mean ±
    std per group."""
    T = max(r.R.shape[1] for g in groups for r in g.runs)
    fig = Figure(figsize=(2 * _line_width(T) + 2, 4.5), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, key, scale, unit in ((axes[0], "params", 1.0, "parameters (count)"),
                                 (axes[1], "bytes", 1024.0, "size in memory (KiB)")):
        tops: list[float] = []
        for k, g in enumerate(groups):
            series = [[s.get(key) for s in r.sizes] for r in g.runs]
            length = max((len(s) for s in series), default=0)
            if not length:
                continue
            stats = [_mean_std([s[i] for s in series if i < len(s)]) for i in range(length)]
            tops += [(m + d) / scale for m, d, n in stats if n]
            ax.errorbar(np.arange(1, length + 1) + 0.04 * (k - len(groups) / 2),
                        [m / scale for m, _, _ in stats], yerr=[d / scale for _, d, _ in stats],
                        marker=_MARKERS[k % len(_MARKERS)], capsize=4,
                        label=f"{g.label} (n={len(g.runs)})")
        ax.set_xticks(range(1, T + 1), [str(t) for t in range(1, T + 1)])
        ax.set_xlim(0.5, T + 0.5)
        ax.set_xlabel("tasks learned so far (count)")
        ax.set_ylabel(unit)
        ax.set_ylim(0, 1.12 * max(tops, default=1.0))
        ax.grid(alpha=0.3)
        if not ax.containers:
            _no_data(ax)
    axes[0].set_title("Parameters after each task (mean ± std per group)")
    axes[1].set_title("Bytes after each task, masks included (mean ± std per group)")
    if axes[1].containers:
        axes[1].legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig
