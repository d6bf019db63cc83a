"""Markdown and PNG reports for one run or a comparison of runs, read from their metrics.json.

Plots use matplotlib's object API (``Figure`` rendered by Agg), so no screen and no global
pyplot state are involved; each figure is released once saved.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from growth.errors import ReportError
from growth.metrics import as_matrix, finished_tasks, read_metrics, summarize
from growth.rundir import check_writable_dir


@dataclass
class Run:
    """One run's metrics, with R as an array and a label unique within the report."""

    dir: Path
    metrics: dict
    R: np.ndarray
    label: str

    @property
    def tasks(self) -> list[str]:
        return [str(t) for t in self.metrics["tasks"]]

    @property
    def info(self) -> dict:
        return self.metrics.get("run") or {}

    @property
    def done(self) -> int:
        """Finished tasks: as the campaign recorded it, else read off the measured rows of R."""
        k = self.metrics.get("finished_tasks")
        T = self.R.shape[1]
        return k if isinstance(k, int) and 0 <= k <= T else finished_tasks(self.R)

    @property
    def scores(self) -> dict[str, float]:
        """ACC/BWT/FWT recomputed from R over finished tasks, so partial runs score alike."""
        return summarize(self.R, self.done)

    @property
    def sizes(self) -> list[dict]:
        return self.metrics.get("sizes") or []

    @property
    def wall(self) -> list[float]:
        return [float(w) for w in self.metrics.get("wall_time_s") or []]


def write_report(run_dirs: Sequence[str | Path], out: str | Path | None = None) -> Path:
    """Write report.md and PNG plots; one run -> <run_dir>/report, several -> ./report.

    Returns the path of report.md. Raises ReportError naming any run without valid metrics.
    """
    runs = load_runs(run_dirs)
    if len(runs) == 1:
        folder = Path(out) if out is not None else runs[0].dir / "report"
        check_writable_dir(folder, "report folder")
        text = _single_report(runs[0], folder)
    else:
        folder = Path(out) if out is not None else Path("report")
        check_writable_dir(folder, "report folder")
        text = _comparison_report(runs, folder)
    path = folder / "report.md"
    path.write_text(text, encoding="utf-8")
    return path


def load_runs(run_dirs: Sequence[str | Path]) -> list[Run]:
    """Read every run's metrics; ReportError names the first folder without valid metrics."""
    if not run_dirs:
        raise ReportError("no run directory given; pass at least one folder with metrics.json")
    runs, seen = [], set()
    for d in map(Path, run_dirs):
        if d.resolve() in seen:  # one run named twice (or through a link) counts once
            continue
        seen.add(d.resolve())
        m = read_metrics(d)
        name = str((m.get("run") or {}).get("name") or d.name)
        runs.append(Run(d, m, as_matrix(m["R"]), name))
    _make_labels_unique(runs)
    return runs


def _make_labels_unique(runs: list[Run]) -> None:
    """Tell apart runs sharing a name: add the folder name, then the position if still equal."""
    for extra in (lambda i, r: r.dir.name, lambda i, r: f"#{i + 1}"):
        counts = Counter(r.label for r in runs)
        for i, r in enumerate(runs):
            if counts[r.label] > 1:
                r.label = f"{r.label} [{extra(i, r)}]"


# --------------------------------------------------------------------------- formatting


def _strategy(run: Run) -> str:
    return str(run.info.get("strategy", "n/a"))


def _num(v: float | int | None, digits: int = 4) -> str:
    """Readable number: 'n/a' for missing/NaN, thousands separators for integers."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    return f"{float(v):.{digits}f}"


def _bytes(v: int | None) -> str:
    if v is None:
        return "n/a"
    size, unit = float(v), "B"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            break
        size /= 1024
    return f"{int(size)} B" if unit == "B" else f"{size:.2f} {unit}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *map(line, rows)]) + "\n"


def _row_labels(tasks: Sequence[str]) -> list[str]:
    return ["init"] + [f"after {t}" for t in tasks]


def _groups(sizes: Sequence[dict]) -> list[str]:
    """Size groups (trunk, heads, masks, ...) in first-seen order, from '<group>_params' keys."""
    seen: dict[str, None] = {}
    for s in sizes:
        for k in s:
            if k.endswith("_params") and k != "params":
                seen[k[: -len("_params")]] = None
    return list(seen)


# --------------------------------------------------------------------------- single run


def _single_report(run: Run, folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    _save(_heatmap_figure([run]), folder / "r_matrix.png")
    _save(_curves_figure(run), folder / "accuracy_curves.png")
    _save(_size_figure([run]), folder / "model_size.png")
    return "\n".join(
        [
            f"# Run report: {run.label}\n",
            _run_info(run),
            _scores_section(run),
            _r_section(run),
            _size_section(run),
            _wall_section(run),
            _search_section(run),
            "## Plots\n",
            "![R matrix](r_matrix.png)\n",
            "![Accuracy curves](accuracy_curves.png)\n",
            "![Model size](model_size.png)\n",
        ]
    )


def _run_info(run: Run) -> str:
    keys = ("name", "strategy", "seed", "stream", "dataset")
    done, T = run.done, run.R.shape[1]
    cells = [str(run.info.get(k, "n/a")) for k in keys] + [f"{done} / {T}", str(run.dir)]
    return _table([*keys, "finished tasks", "run dir"], [cells])


def _scores_section(run: Run) -> str:
    s = run.scores
    cells = [_num(s[k]) for k in ("acc", "bwt", "fwt")]
    head = f"## Scores (over {run.done} finished tasks)\n\n"
    return head + _table(["ACC", "BWT", "FWT"], [cells])


def _r_section(run: Run) -> str:
    rows = [[lbl, *(_num(v) for v in row)] for lbl, row in zip(_row_labels(run.tasks), run.R)]
    note = (
        "Test accuracy on each task (column) after training the task named in the row; "
        "`init` is the random initial model, `n/a` not measured yet.\n\n"
    )
    return "## Accuracy matrix R\n\n" + note + _table(["", *run.tasks], rows)


def _size_section(run: Run) -> str:
    if not run.sizes:
        return "## Model size\n\nNo size recorded yet.\n"
    groups = _groups(run.sizes)
    header = ["after task", "params", "bytes", "relative", *(f"{g} params" for g in groups)]
    rows = []
    for k, s in enumerate(run.sizes):
        name = run.tasks[k] if k < len(run.tasks) else str(k)
        rows.append(
            [
                name,
                _num(s.get("params")),
                _bytes(s.get("bytes")),
                _num(s.get("relative"), 3),
                *(_num(s.get(f"{g}_params")) for g in groups),
            ]
        )
    return "## Model size\n\n" + _table(header, rows)


def _wall_section(run: Run) -> str:
    rows = [
        [run.tasks[k] if k < len(run.tasks) else str(k), _num(w, 1)] for k, w in enumerate(run.wall)
    ]
    total = f"\nTotal: {_num(sum(run.wall), 1)} s\n"
    return "## Wall time\n\n" + _table(["task", "wall time (s)"], rows) + total


def _search_section(run: Run) -> str:
    s = run.metrics.get("search") or {}
    return (
        "## Search cost\n\n"
        f"Child networks trained: {_num(s.get('children', 0))}; "
        f"their training time: {_num(s.get('child_time_s', 0.0), 1)} s\n"
    )


# --------------------------------------------------------------------------- comparison


def _comparison_report(runs: list[Run], folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    _save(_heatmap_figure(runs), folder / "r_matrices.png")
    _save(_acc_figure(runs), folder / "acc.png")
    _save(_size_figure(runs), folder / "model_size.png")
    parts = [f"# Comparison of {len(runs)} runs\n", _comparison_table(runs)]
    agg = _strategy_table(runs)
    if agg:
        parts += ["## Mean ± std per strategy (over seeds, sample std)\n", agg]
    parts += [
        "## Plots\n",
        "![R matrices](r_matrices.png)\n",
        "![ACC per run](acc.png)\n",
        "![Model size per task](model_size.png)\n",
    ]
    return "\n".join(parts)


_SUMMARY_COLS = ("ACC", "BWT", "FWT", "final params", "relative", "wall time (s)")


def _summary(run: Run) -> list[float | None]:
    """ACC, BWT, FWT, final params, final relative size, total wall time of one run."""
    s, last = run.scores, (run.sizes[-1] if run.sizes else {})
    return [
        s["acc"],
        s["bwt"],
        s["fwt"],
        last.get("params"),
        last.get("relative"),
        sum(run.wall) if run.wall else None,
    ]


def _summary_cells(values: Sequence[float | None]) -> list[str]:
    digits = (4, 4, 4, 0, 3, 1)
    return [_num(v, d) for v, d in zip(values, digits)]


def _comparison_table(runs: list[Run]) -> str:
    header = ["run", "strategy", "seed", "tasks", *_SUMMARY_COLS]
    rows = [
        [
            r.label,
            _strategy(r),
            str(r.info.get("seed", "n/a")),
            f"{r.done} / {r.R.shape[1]}",
            *_summary_cells(_summary(r)),
        ]
        for r in runs
    ]
    return _table(header, rows)


def mean_std(values: Sequence[float | None], digits: int) -> str:
    """"mean ± std" (sample std) of the finite values, or "n/a"."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return "n/a"
    mean, std = float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0
    fmt = f"{{:,.{digits}f}}"
    return f"{fmt.format(mean)} ± {fmt.format(std)}"


def _strategy_table(runs: list[Run]) -> str:
    """One mean ± std row per strategy run more than once; empty if there is none."""
    by: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        by[_strategy(r)].append(r)
    rows = []
    for strategy, group in by.items():
        if len(group) < 2:
            continue
        cols = list(zip(*(_summary(r) for r in group)))
        rows.append(
            [
                strategy,
                str(len(group)),
                *(mean_std(c, d) for c, d in zip(cols, (4, 4, 4, 0, 3, 1))),
            ]
        )
    return _table(["strategy", "runs", *_SUMMARY_COLS], rows) if rows else ""


# --------------------------------------------------------------------------- plots


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=120, bbox_inches="tight")
    fig.clear()


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
    ax.set_yticks(range(T + 1), _row_labels(tasks))
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("model state")
    ax.set_title(title)
    ax.figure.colorbar(img, ax=ax, label="test accuracy")


def _ink(level: float) -> str:
    """Text colour readable on viridis: white on the dark end, black on the light end."""
    return "white" if level < 0.6 else "black"


def _heatmap_figure(runs: list[Run]) -> Figure:
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


def _curves_figure(run: Run) -> Figure:
    """Each task's accuracy from its own training onwards, as later tasks are learned."""
    T = run.R.shape[1]
    fig = Figure(figsize=(_line_width(T), 4.5), layout="constrained")
    ax = fig.subplots()
    for j, name in enumerate(run.tasks):
        xs = np.arange(j + 1, T + 1)
        ys = run.R[j + 1 :, j]
        keep = ~np.isnan(ys)
        if keep.any():
            ax.plot(xs[keep], ys[keep], marker="o", label=name)
    ax.set_xticks(range(1, T + 1), run.tasks, rotation=45, ha="right")
    ax.set_xlim(0.5, T + 0.5)
    top = float(np.nanmax(run.R)) if np.isfinite(run.R).any() else 1.0
    ax.set_ylim(0.0, 1.02 * max(1.0, top))  # full scale, so forgetting is not exaggerated
    ax.set_xlabel("after training task")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"Accuracy of each task as later tasks are learned ({run.label})")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(
            title="evaluated task",
            fontsize="small",
            ncols=max(1, T // 10),
            loc="center left",
            bbox_to_anchor=(1.01, 0.5),
        )
    else:
        _no_data(ax)
    return fig


def _line_width(T: int) -> float:
    """Figure width for one x position per task: wider with more tasks, within a page."""
    return min(12.0, max(6.0, 0.6 * T + 3))


def _no_data(ax: Axes) -> None:
    ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes)


_MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def _size_figure(runs: list[Run]) -> Figure:
    """Parameters after each task; one run shows its groups and relative-size labels."""
    T = max(r.R.shape[1] for r in runs)
    fig = Figure(figsize=(_line_width(T), 4.5), layout="constrained")
    ax = fig.subplots()
    for k, r in enumerate(runs):
        params = [s.get("params") for s in r.sizes]
        xs = np.arange(1, len(params) + 1)
        label = "total" if len(runs) == 1 else r.label
        ys = [np.nan if p is None else p for p in params]
        ax.plot(xs, ys, marker=_MARKERS[k % len(_MARKERS)], label=label)
        if len(runs) == 1:
            _size_details(ax, r, xs)
    same_tasks = all(r.tasks == runs[0].tasks for r in runs)
    names = runs[0].tasks if same_tasks else [f"task {k}" for k in range(1, T + 1)]
    ax.set_xticks(range(1, T + 1), names, rotation=45, ha="right")
    ax.set_xlim(0.5, T + 0.5)
    ax.set_xlabel("after training task")
    ax.set_ylabel("parameters")
    ax.margins(y=0.12)  # room for the relative-size labels
    ax.set_ylim(bottom=0)
    if len(runs) > 1:
        ax.set_title("Model size after each task")
    else:
        ax.set_title(f"Model size ({runs[0].label}); labels: size relative to the base network")
    ax.grid(alpha=0.3)
    if any(r.sizes for r in runs):
        ax.legend(fontsize="small")
    else:
        _no_data(ax)
    return fig


def _size_details(ax: Axes, run: Run, xs: np.ndarray) -> None:
    """Per-group parameter lines and '×relative' labels on the total line."""
    for g in _groups(run.sizes):
        ys = [s.get(f"{g}_params", np.nan) for s in run.sizes]
        ax.plot(xs, ys, linestyle="--", marker=".", label=g)
    for x, s in zip(xs, run.sizes):
        rel, p = s.get("relative"), s.get("params")
        if rel is not None and p is not None:
            ax.annotate(
                f"×{rel:.2f}",
                (x, p),
                textcoords="offset points",
                xytext=(0, 6),
                ha="center",
                fontsize=8,
            )


def _acc_figure(runs: list[Run]) -> Figure:
    """Final ACC per run, coloured by strategy, value written on each bar."""
    fig = Figure(figsize=(max(6.0, 0.9 * len(runs) + 3), 4.5), layout="constrained")
    ax = fig.subplots()
    strategies = list(dict.fromkeys(_strategy(r) for r in runs))
    colors, labelled = colormaps["tab10"], set()
    for k, r in enumerate(runs):
        strategy, value = _strategy(r), r.scores["acc"]
        label = None if strategy in labelled else strategy
        labelled.add(strategy)
        color = colors(strategies.index(strategy) % 10)
        bar = ax.bar(k, 0.0 if math.isnan(value) else value, color=color, label=label)
        ax.bar_label(bar, labels=[_num(value, 3)], fontsize=8)
    ax.set_xticks(range(len(runs)), [r.label for r in runs], rotation=45, ha="right")
    ax.set_xlabel("run")
    ax.set_ylabel("ACC (mean final accuracy)")
    ax.set_title("Average accuracy after the last finished task")
    ax.legend(title="strategy", fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig
