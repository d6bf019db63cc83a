"""The report of a search run directory: a plot and a markdown page, read from its files only.

`search.png`: each trained child's validation accuracy (the controller's reward signal) in
trial order, failed children marked, generations separated; the mean accuracy of each
generation's children (what the controller's policy earns: its learning curve); and the best
accuracy so far after each generation (the base network counts as generation -1).
`search.md`: the summary, the leaderboard and the failed children. Several search runs (EAS
and random on one budget) share one plot of these curves.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from growth.controllers.records import RECORDS, ChildRecord, leaderboard, read_records
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from growth.errors import ReportError
from growth.io import check_output

SUMMARY = "search_metrics.json"
ARCH_CHARS = 80  # an architecture string in the leaderboard: longer ones are shortened


def is_search_run(run_dir: Path) -> bool:
    return (Path(run_dir) / "search.json").is_file()


def _summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / SUMMARY
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path} is corrupt ({exc})") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _records(run_dir: Path) -> list[ChildRecord]:
    records = sorted(read_records(run_dir / RECORDS), key=lambda r: r.key)
    if not records and not (run_dir / RECORDS).is_file():
        raise ReportError(f"{run_dir} holds no search records ({RECORDS}); is it a search run "
                          "directory?")
    return records


def best_so_far(records: Sequence[ChildRecord], base_acc: float | None
                ) -> list[tuple[int, float | None]]:
    """(generation, best validation accuracy up to and including it), from -1 (the base)."""
    best = base_acc
    out = [(-1, best)]
    for g in sorted({r.generation for r in records}):
        for r in records:
            if r.generation == g and r.ok and (best is None or r.val_acc > best):
                best = r.val_acc
        out.append((g, best))
    return out


def generation_means(records: Sequence[ChildRecord]) -> list[tuple[int, float]]:
    """(generation, mean validation accuracy of its finished children): the reward the
    controller's policy earned, generation by generation."""
    out = []
    for g in sorted({r.generation for r in records}):
        accs = [float(r.val_acc) for r in records if r.generation == g and r.ok]
        if accs:
            out.append((g, sum(accs) / len(accs)))
    return out


def write_search_report(run_dirs: Sequence[Path], out: Path | None = None) -> Path:
    """report/search.md and search.png for one search run (or a comparison of several)."""
    runs = [Path(d) for d in run_dirs]
    out = Path(out) if out is not None else (runs[0] / "report" if len(runs) == 1
                                             else Path("report"))
    check_output(out, "search.md", "report.md", what="report folder")  # only a report's
    out.mkdir(parents=True, exist_ok=True)
    data = [(d, _summary(d), _records(d)) for d in runs]
    _plot(data, out / "search.png")
    lines = []
    for d, summary, records in data:
        lines += _markdown(d, summary, records)
    lines.append("![search](search.png)")
    path = out / "search.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def short_arch(arch: str, limit: int = ARCH_CHARS) -> str:
    """An architecture string fit for one table cell: whole when short, else its start, its
    node count and a digest that tells two long strings apart (leaderboard.json keeps all)."""
    if len(arch) <= limit:
        return arch
    digest = hashlib.sha1(arch.encode()).hexdigest()[:8]
    return f"{arch[:limit].rsplit(' ', 1)[0]} … ({len(arch.split())} nodes, #{digest})"


def describe_actions(actions: Sequence[dict[str, Any]], limit: int = 4) -> str:
    """The operator calls that made a child from the search's base, in a few words."""
    words = []
    for a in actions:
        where = a.get("node") or a.get("after") or "?"
        if "width" in a:
            words.append(f"{a.get('op')} {where}→{a['width']}")
        elif a.get("kernel_size") is not None:
            words.append(f"{a.get('op')} after {where} (k{a['kernel_size']})")
        else:
            words.append(f"{a.get('op')} after {where}")
    if not words:
        return "none"
    more = f", … {len(words) - limit} more" if len(words) > limit else ""
    return ", ".join(words[:limit]) + more


def _label(run_dir: Path, summary: dict[str, Any]) -> str:
    run = summary.get("run") or {}
    return f"{run.get('controller', '?')} ({run_dir.name})"


def _plot(data: list[tuple[Path, dict[str, Any], list[ChildRecord]]], path: Path) -> None:
    fig = Figure(figsize=(15, 4.2))
    ax_trials, ax_mean, ax_best = fig.subplots(1, 3)
    for d, summary, records in data:
        label = _label(d, summary)
        base = (summary.get("base") or {}).get("val_acc")
        xs = list(range(1, len(records) + 1))
        ok = [(x, r.val_acc) for x, r in zip(xs, records) if r.ok]
        bad = [x for x, r in zip(xs, records) if not r.ok]
        line = ax_trials.plot([x for x, _ in ok], [a for _, a in ok], "o", ms=4,
                              label=label)[0]
        if bad:
            ax_trials.plot(bad, [0.0] * len(bad), "x", color=line.get_color(),
                           label=f"{label}: failed")
        if len(data) == 1:
            for x, (prev, r) in enumerate(zip(records, records[1:]), start=1):
                if r.generation != prev.generation:
                    ax_trials.axvline(x + 0.5, color="0.8", lw=0.8)
            if base is not None:
                ax_trials.axhline(base, color="0.5", ls="--", lw=0.8, label="base network")
        means = generation_means(records)
        ax_mean.plot([g for g, _ in means], [m for _, m in means], "o-", label=label,
                     color=line.get_color())
        curve = [(g, b) for g, b in best_so_far(records, base) if b is not None]
        ax_best.plot([g for g, _ in curve], [b for _, b in curve], "o-", label=label,
                     color=line.get_color())
    ax_trials.set(xlabel="trained child (trial order)", ylabel="validation accuracy (reward)",
                  title="reward per trial")
    ax_best.set(xlabel="generation (-1: base network)", ylabel="best validation accuracy",
                title="best so far per generation")
    ax_mean.set(xlabel="generation", ylabel="mean validation accuracy of its children",
                title="the controller's learning curve")
    for ax in (ax_trials, ax_mean, ax_best):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)  # pragma: no mutate (presentation only)
        ax.legend(fontsize=8)  # pragma: no mutate (presentation only)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _fmt(v: Any, digits: int = 4) -> str:
    return "n/a" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def _markdown(run_dir: Path, summary: dict[str, Any], records: list[ChildRecord]
              ) -> list[str]:
    base, best = summary.get("base") or {}, summary.get("best") or {}
    trained = len(records)
    failed = [r for r in records if not r.ok]
    lines = [f"# Search: {_label(run_dir, summary)}", "",
             "| | network | val acc | test acc | params |", "|---|---|---|---|---|",
             f"| base | base | {_fmt(base.get('val_acc'))} | {_fmt(base.get('test_acc'))} | "
             f"{_fmt(base.get('params'))} |",
             f"| best | {best.get('key', 'n/a')} | {_fmt(best.get('val_acc'))} | "
             f"{_fmt(best.get('test_acc'))} | {_fmt(best.get('params'))} |", "",
             f"{trained} children trained ({len(failed)} failed) in "
             f"{summary.get('generations', 'n/a')} generations (the parent kept after "
             f"{summary.get('parent_kept', 'n/a')}); search wall time "
             f"{_fmt(summary.get('wall_time_s'), 1)} s, child training "
             f"{sum(r.train_time_s for r in records):.1f} s in all.", "",
             "| rank | child | val acc | before training | params | train s | changes | arch |",
             "|---|---|---|---|---|---|---|---|"]
    for rank, r in enumerate(leaderboard(records)[:10], start=1):
        changes = describe_actions([a for step in (r.lineage or [r.actions]) for a in step])
        lines.append(f"| {rank} | {r.key} | {_fmt(r.val_acc)} | {_fmt(r.val_acc_before)} | "
                     f"{r.params:,} | {r.train_time_s:.1f} | {changes} | "
                     f"`{short_arch(r.arch)}` |")
    if failed:
        lines += ["", "Failed children:", ""]
        lines += [f"- {r.key}: {r.error}" for r in failed]
    return lines + [""]
