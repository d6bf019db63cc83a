"""Markdown and PNG reports for one run or a comparison of runs, read from their metrics.json.

A comparison groups runs whose resolved configs are equal but for the seed (and the run's name
and thread count): each group gets n, mean ± std (sample std) and error bars in the plots; a
group of one run is listed like any other. Groups of one strategy whose configs differ are
told apart by the keys that differ, and marked. The figures are in growth.plots.

A comparison also gives each group's difference in ACC to a reference group (the first, or
`reference`), paired by seed: runs of one seed share their data and initial network, so the
per-seed differences are tested with a paired t-test (growth.stats), with a 95% interval and
"n.s." where the difference is not significant. `paired_by_seed` gives the same numbers to
code, `differences_markdown` the table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from growth import plots
from growth.errors import ReportError
from growth.io import check_output
from growth.rundir import check_writable_dir
from growth.runs import Group, Run, group_runs, load_runs
from growth.stats import Paired, paired


def write_report(run_dirs: Sequence[str | Path], out: str | Path | None = None,
                 reference: str | None = None) -> Path:
    """Write report.md and PNG plots; one run -> <run_dir>/report, several -> ./report.
    `reference`: the group the others' differences are taken to (its label, or a strategy's
    name when one group has that strategy).

    Returns the path of report.md. Raises ReportError naming any run without valid metrics,
    or a reference that is no group's label.
    """
    runs = load_runs(run_dirs)
    if len(runs) == 1:
        folder = Path(out) if out is not None else runs[0].dir / "report"
        _check_folder(folder)
        text = _single_report(runs[0], folder)
    else:
        folder = Path(out) if out is not None else Path("report")
        _check_folder(folder)
        text = _comparison_report(runs, folder, reference)
    path = folder / "report.md"
    path.write_text(text, encoding="utf-8")
    return path


def _check_folder(folder: Path) -> None:
    """Writable, and new, empty or a report's (report.md, or a search's search.md: `growth
    report` puts both in one folder): a report overwrites only a report."""
    check_writable_dir(folder, "report folder")
    check_output(folder, "report.md", "search.md", what="report folder")


# --------------------------------------------------------------------------- formatting


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


_row_labels = plots.row_labels
_groups = plots._size_groups


# --------------------------------------------------------------------------- single run


def _single_report(run: Run, folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    plots.save(plots.heatmap_figure([run]), folder / "r_matrix.png")
    plots.save(plots.curves_figure(run), folder / "accuracy_curves.png")
    plots.save(plots.size_figure(run), folder / "model_size.png")
    return "\n".join(
        [
            f"# Run report: {run.label}\n",
            _run_info(run),
            _scores_section(run),
            _r_section(run),
            _size_section(run),
            _wall_section(run),
            _cost_section(run),
            _search_section(run),
            "## Plots\n",
            "![R matrix](r_matrix.png)\n",
            "![Accuracy curves and the average over tasks seen](accuracy_curves.png)\n",
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
    split = "Validation" if run.info.get("evaluated_on") == "val" else "Test"
    note = (
        f"{split} accuracy on each task (column) after training the task named in the row; "
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


def _cost_section(run: Run) -> str:
    """What the run takes on disk (metrics "storage") and each task's peak resident memory."""
    storage = run.metrics.get("storage") or {}
    rss = list(run.metrics.get("peak_rss_bytes") or [])
    head = "## Disk and memory\n\n"
    if not storage and all(r is None for r in rss):
        return head + "Not recorded (the run was made before these figures were kept).\n"
    text = head
    if storage:
        text += (f"Run directory: {_bytes(storage.get('run_bytes'))} on disk; its newest "
                 f"checkpoint {_bytes(storage.get('checkpoint_bytes'))} (its folder and the "
                 f"tensor files it names); {_num(storage.get('checkpoints'))} checkpoints "
                 f"kept, {_num(storage.get('tensor_files'))} tensor files.\n\n")
    if any(r is not None for r in rss):
        rows = [[run.tasks[k] if k < len(run.tasks) else str(k), _bytes(r)]
                for k, r in enumerate(rss)]
        text += ("Peak resident memory of the process while it learned and evaluated each "
                 "task:\n\n" + _table(["task", "peak resident memory"], rows))
    return text


def _search_section(run: Run) -> str:
    s = run.metrics.get("search") or {}
    return (
        "## Search cost\n\n"
        f"Child networks trained: {_num(s.get('children', 0))}; "
        f"their training time: {_num(s.get('child_time_s', 0.0), 1)} s\n"
    )


# --------------------------------------------------------------------------- comparison


def _comparison_report(runs: list[Run], folder: Path, reference: str | None = None) -> str:
    groups = group_runs(runs)
    ref = reference_group(groups, reference)
    folder.mkdir(parents=True, exist_ok=True)
    figures = {
        "r_matrices.png": ("R matrices", plots.heatmap_figure(runs)),
        "average_accuracy.png": ("Average accuracy after each task",
                                 plots.average_accuracy_figure(groups)),
        "acc.png": ("ACC per group", plots.group_scores_figure(
            groups, "acc", "ACC after the last finished task (mean ± std per group)",
            "ACC (mean final test accuracy, fraction)", accuracy=True)),
        "bwt.png": ("BWT per group", plots.group_scores_figure(
            groups, "bwt", "Backward transfer (mean ± std per group; below 0: forgetting)",
            "BWT (change in test accuracy, fraction)", accuracy=False)),
        "model_size.png": ("Model size per task", plots.group_size_figure(groups)),
    }
    for name, (_, fig) in figures.items():
        plots.save(fig, folder / name)
    parts = [f"# Comparison of {len(runs)} runs in {len(groups)} groups\n",
             "## Groups (same config but the seed): mean ± std over runs (sample std)\n",
             _group_table(groups), _group_notes(groups),
             _differences_section(groups, ref),
             "## Runs\n", _comparison_table(runs, groups), "## Plots\n"]
    parts += [f"![{alt}]({name})\n" for name, (alt, _) in figures.items()]
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


def _comparison_table(runs: list[Run], groups: list[Group]) -> str:
    group_of = {id(r): g.label for g in groups for r in g.runs}
    header = ["run", "group", "seed", "tasks", *_SUMMARY_COLS]
    rows = [
        [
            r.label,
            group_of[id(r)],
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


def _group_table(groups: list[Group]) -> str:
    """One row per group: n, seeds, mean ± std of each summary column (a lone run: its value)."""
    digits = (4, 4, 4, 0, 3, 1)
    rows = []
    for g in groups:
        cols = list(zip(*(_summary(r) for r in g.runs)))
        cells = [mean_std(c, d) if len(g.runs) > 1 else _num(c[0], d) for c, d in
                 zip(cols, digits)]
        seeds = ", ".join(str(r.info.get("seed", "?")) for r in g.runs)
        tasks = sorted({f"{r.done} / {r.R.shape[1]}" for r in g.runs})
        rows.append([g.label, str(len(g.runs)), seeds, ", ".join(tasks), *cells])
    return _table(["group", "n", "seeds", "tasks", *_SUMMARY_COLS], rows)


def _group_notes(groups: list[Group]) -> str:
    notes = []
    marked = sorted({g.strategy for g in groups if g.differs})
    for strategy in marked:
        keys = sorted({k for g in groups if g.strategy == strategy for k in g.differs})
        notes.append(f"- † {strategy}: runs with different configs are kept apart; they "
                     f"differ in {', '.join(f'`{k}`' for k in keys)}.")
    partial = [g.label for g in groups if len({r.done for r in g.runs}) > 1]
    if partial:
        notes.append(f"- Runs of {', '.join(partial)} finished different numbers of tasks; "
                     "each is scored over its own finished tasks.")
    if any(not g.known for g in groups):
        notes.append("- Some runs have no config (no `config` in metrics.json and no "
                     "config.yaml); they are grouped by strategy, stream, dataset, scenario "
                     "and task names only.")
    return "\n".join(notes) + "\n" if notes else ""


def _complete_by_seed(group: Group) -> dict[object, float]:
    """ACC of the group's runs that finished every task, by seed (the first run of a seed)."""
    out: dict[object, float] = {}
    for r in group.runs:
        seed = r.info.get("seed")
        acc = r.scores["acc"]
        if seed is not None and r.done == r.R.shape[1] and math.isfinite(acc):
            out.setdefault(seed, acc)
    return out


def reference_group(groups: list[Group], reference: str | None) -> Group:
    """The group named by `reference`: its label, else a strategy's name that one group has
    (None: the first group). ReportError lists the groups when it names none."""
    if reference is None:
        return groups[0]
    for g in groups:
        if g.label == reference:
            return g
    same = [g for g in groups if g.strategy == reference]
    if len(same) == 1:
        return same[0]
    labels = ", ".join(g.label for g in groups)
    why = "names several groups; give one's label" if same else "is not a group of these runs"
    raise ReportError(f"--reference {reference!r} {why}; the groups are: {labels}")


def paired_by_seed(run_dirs: Sequence[str | Path], reference: str | None = None
                   ) -> tuple[str, dict[str, Paired | None]]:
    """Each group's paired difference in ACC to the reference group (see reference_group),
    over the seeds both finished: (the reference's label, group label -> growth.stats.Paired,
    None below two common seeds). Runs are grouped as in the report."""
    groups = group_runs(load_runs(run_dirs))
    ref = reference_group(groups, reference)
    return ref.label, _group_differences(groups, ref)


def _group_differences(groups: list[Group], ref: Group) -> dict[str, Paired | None]:
    theirs = _complete_by_seed(ref)
    out: dict[str, Paired | None] = {}
    for g in groups:
        if g is ref:
            continue
        mine = _complete_by_seed(g)
        seeds = sorted(set(mine) & set(theirs), key=str)
        out[g.label] = (paired([mine[s] for s in seeds], [theirs[s] for s in seeds])
                        if len(seeds) >= 2 else None)
    return out


def differences_markdown(reference: str, diffs: dict[str, Paired | None]) -> str:
    """The table of `paired_by_seed`'s differences, with its heading and legend."""
    rows = []
    for label, d in diffs.items():
        if d is None:
            rows.append([label, "<2", "n/a", "n/a", "n/a", ""])
            continue
        p = "< 0.001" if d.p < 0.001 else f"{d.p:.3f}"
        rows.append([label, str(d.n), f"{d.diff:+.4f}", f"[{d.low:+.4f}, {d.high:+.4f}]", p,
                     "" if d.significant else "n.s."])
    return (f"## Differences in ACC to {reference} (paired by seed)\n\n"
            "Runs of one seed share their data and initial network; the mean of the per-seed "
            "differences (group - reference) is given with its 95% t interval and the "
            "two-sided p-value of the paired t-test, over the seeds both groups finished; "
            "n.s.: not significant at 5%.\n\n"
            + _table(["group", "pairs", "Δ ACC", "95% interval", "p", ""], rows))


def _differences_section(groups: list[Group], ref: Group) -> str:
    """Each group's paired difference in ACC to the reference group."""
    if len(groups) < 2:
        return ""
    return differences_markdown(ref.label, _group_differences(groups, ref))
