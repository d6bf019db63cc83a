"""`growth compare`: several strategies over one task stream and several seeds, side by side.

A comparison config names a base campaign config (the stream, network and training every run
shares), the seeds, and a list of strategies (a name, or a mapping with the strategy's settings
and an optional `label`, so one strategy can appear twice: REC and its ablations):

    name: compare_permuted
    base: ../quickstart.yaml          # relative to this file
    seeds: [0, 1, 2]
    set: [train.epochs=10]            # overrides applied to every run (optional)
    strategies:
      - finetune
      - {name: ewc, lambda: 50}
      - {name: rec, label: rec-no-search, search: off}

Every (strategy, seed) is an ordinary run directory `OUT/<label>-s<seed>`: a finished one is
reused, an interrupted one resumed, so the command itself is resumable. Runs execute in
parallel as Ray tasks on the local machine or on a cluster (`--ray-address`). A run holds as
many CPUs as its torch threads; a run whose strategy searches (REC) holds none itself, since
its search trials claim the cluster's CPUs by their own resources: a campaign waiting for its
trials never sits on the CPUs they need, so the comparison cannot deadlock its own searches.

Outputs in OUT: `compare.md` and `compare.csv` (per strategy, mean and sample std over seeds:
ACC, BWT, FWT, final size relative to the base, wall time, children trained by a search and
their training time), `accuracy.png` and `size.png` (against tasks, one line per strategy)
and `acc_vs_size.png` (final ACC against final size, one point per strategy).
"""

from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from growth.commands.watch import RunsWatch
from growth.config import Config, load_config, parse_yaml, read_config_text
from growth.errors import ConfigError, GrowthError
from growth.metrics import read_metrics

log = logging.getLogger("growth.commands.compare")
WATCH_S = 10.0  # seconds between looks at the runs' progress while none finishes


class StrategyEntry(BaseModel):
    """One line of the comparison: a strategy, its settings, and the label it is shown by."""

    model_config = ConfigDict(extra="allow")
    name: str
    label: str | None = None

    @property
    def shown(self) -> str:
        return self.label or self.name

    def settings(self) -> dict[str, Any]:
        return {"name": self.name, **(self.model_extra or {})}


class CompareConfig(BaseModel):
    """A comparison (see the module docstring); unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")
    name: str = "compare"
    base: str
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    set: list[str] = Field(default_factory=list)
    strategies: list[StrategyEntry] = Field(min_length=1)

    @field_validator("strategies", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value


@dataclass
class Plan:
    """The validated comparison: its config, the base file and one config per run."""

    config: CompareConfig
    base: Path
    runs: dict[str, tuple[str, int, list[str]]] = field(default_factory=dict)
    # run folder name -> (label, seed, overrides of the base config)


def load_compare(path: str | Path) -> Plan:
    """Read and check a comparison config and every run's campaign config (nothing runs)."""
    path = Path(path)
    raw = parse_yaml(read_config_text(path), str(path))
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a comparison config is a mapping of keys (name, base, "
                          "seeds, strategies)")
    try:
        cfg = CompareConfig.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"{path}: {key}: {err['msg']}") from None
    base = (path.parent / cfg.base).resolve()
    labels = [s.shown for s in cfg.strategies]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        raise ConfigError(f"{path}: strategies: {twice[0]!r} appears twice; give one a "
                          "`label`")
    plan = Plan(cfg, base)
    for entry in cfg.strategies:
        flow = yaml.safe_dump(entry.settings(), default_flow_style=True, width=10**6).strip()
        for seed in cfg.seeds:
            overrides = [*cfg.set, f"strategy={flow}", f"seed={seed}", f"name={entry.shown}"]
            load_config(base, overrides)  # every run's config is valid before any run starts
            plan.runs[f"{entry.shown}-s{seed}"] = (entry.shown, seed, overrides)
    return plan


def run_one(base: str, overrides: list[str], out: str) -> str:
    """Run (or resume, or reuse) one campaign into `out`; returns `out`. Runs in a Ray task."""
    from growth.campaign import Campaign, resume_run
    from growth.report import write_report
    from growth.rundir import holds_run

    def report(run_dir: Path) -> None:
        write_report([run_dir])

    if holds_run(Path(out)):
        resume_run(out, report=report)
    else:
        Campaign(load_config(base, overrides), out, report=report).start()
    return out


def _resources(cfg: Config) -> dict[str, Any]:
    """A run whose children are Ray trials holds no CPU (they claim theirs); any other run,
    a searching one whose children train in its own process included, holds its threads."""
    from growth.cluster import driver_task_options

    if _search_backend(cfg) == "ray":
        return driver_task_options()
    return {"num_cpus": cfg.threads or 1}


def _search_backend(cfg: Config) -> str | None:
    """The backend of the run's strategy's search (None: it does not search)."""
    from growth.searching import SearchSettings
    from growth.strategies import make_strategy

    params = make_strategy(cfg.strategy.name, cfg.strategy.settings()).params
    for key in type(params).model_fields:
        value = getattr(params, key)
        if isinstance(value, SearchSettings) and value.enabled:
            return value.backend
    return None


def run_compare(path: str | Path, out: str | Path | None = None,
                ray_address: str | None = None) -> Path:
    """Run every (strategy, seed) of the comparison in parallel on Ray, then write the table
    and plots; returns the output folder. A run that fails is named in a GrowthError raised
    after the others finished (their results are written)."""
    import ray

    from growth.cluster import ray_cluster

    plan = load_compare(path)
    folder = Path(out) if out else Path("runs") / plan.config.name
    folder.mkdir(parents=True, exist_ok=True)
    failed: dict[str, str] = {}
    with ray_cluster(ray_address):
        task = ray.remote(run_one)
        pending = {}
        for name, (_, _, overrides) in plan.runs.items():
            cfg = load_config(plan.base, overrides)
            ref = task.options(**_resources(cfg)).remote(str(plan.base), overrides,
                                                         str(folder / name))
            pending[ref] = name
        total = len(pending)
        watch = RunsWatch(folder, list(pending.values()))
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=WATCH_S)
            if not done:  # nothing finished meanwhile: how far the runs are, and an ETA
                watch.report()
                continue
            name = pending.pop(done[0])
            watch.done(name)
            try:
                ray.get(done[0])
                _progress(total - len(pending), total, name, folder / name)
            except Exception as exc:  # a failed run is reported, the others go on
                cause = getattr(exc, "cause", None) or exc
                failed[name] = f"{type(cause).__name__}: {str(cause).splitlines()[0]}"
                _progress(total - len(pending), total, name, None, failed[name])
    write_comparison(plan, folder)
    if failed:
        first = next(iter(failed.items()))
        raise GrowthError(f"{len(failed)} run(s) failed ({first[0]}: {first[1]}); the table "
                          f"in {folder} covers the others; `growth compare` again resumes them")
    return folder


def _progress(done: int, total: int, name: str, run: Path | None, error: str = "") -> None:
    """One line per finished run on stderr, so a long comparison shows where it is."""
    import sys

    if run is None:
        what = f"failed: {error}"
    else:
        m = read_metrics(run)
        what = f"ACC {m['acc']:.4f}" if m.get("acc") is not None else "finished"
    print(f"[{done}/{total}] {name}: {what}", file=sys.stderr, flush=True)
    log.info("run %s: %s", name, what)


# ---- the table and the plots -----------------------------------------------------------------
# (heading in compare.md, column in compare.csv, digits shown), in _figures' order
COLUMNS = (("ACC", "acc", 4), ("BWT", "bwt", 4), ("FWT", "fwt", 4),
           ("size vs base", "size_relative", 3), ("bytes vs base", "bytes_relative", 3),
           ("wall time (s)", "wall_time_s", 1), ("children", "children", 1),
           ("search time (s)", "child_time_s", 1))


def _figures(m: dict[str, Any]) -> list[float | None]:
    size = m["sizes"][-1] if m.get("sizes") else {}
    search = m.get("search") or {}
    return [m.get("acc"), m.get("bwt"), m.get("fwt"), size.get("relative"),
            size.get("relative_bytes"), float(sum(m.get("wall_time_s") or [])),
            search.get("children"), search.get("child_time_s")]


def _curves(m: dict[str, Any]) -> tuple[list[float], list[float]]:
    """Average accuracy over the tasks seen so far, and relative size, after each task."""
    R = np.array([[np.nan if v is None else v for v in row] for row in m["R"]], dtype=float)
    done = int(m.get("finished_tasks") or 0)
    acc = [float(np.nanmean(R[i, :i])) for i in range(1, done + 1)]
    sizes = [float(s.get("relative") or np.nan) for s in (m.get("sizes") or [])][:done]
    return acc, sizes


def _stats(values: list[float | None]) -> tuple[float | None, float | None]:
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return None, None
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else None


def collect(plan: Plan, folder: Path) -> dict[str, list[dict[str, Any]]]:
    """Finished runs' metrics by label, in the order the config lists the strategies."""
    by: dict[str, list[dict[str, Any]]] = {s.shown: [] for s in plan.config.strategies}
    for name, (label, _, _) in plan.runs.items():
        try:
            m = read_metrics(folder / name)
        except GrowthError:
            continue
        if m.get("finished_tasks") == len(m["tasks"]):
            by[label].append(m)
    return by


def write_comparison(plan: Plan, folder: Path) -> Path:
    """compare.md, compare.csv and the three plots from the finished runs in `folder`."""
    by = collect(plan, folder)
    rows = []
    for label, runs in by.items():
        cols = list(zip(*(_figures(m) for m in runs))) if runs else [[]] * len(COLUMNS)
        rows.append((label, len(runs), [_stats(list(c)) for c in cols]))
    (folder / "compare.csv").write_text(_csv(rows))
    md = _markdown(plan, rows)
    (folder / "compare.md").write_text(md)
    _plots(by, folder)
    return folder / "compare.md"


def _cell(stat: tuple[float | None, float | None], digits: int) -> str:
    mean, std = stat
    if mean is None:
        return "n/a"
    if std is None:  # one run: its value, no spread to show
        return f"{mean:,.{digits}f}"
    return f"{mean:,.{digits}f} ± {std:,.{digits}f}"


def _markdown(plan: Plan, rows: list[tuple[str, int, list]]) -> str:
    head = "| strategy | runs | " + " | ".join(c[0] for c in COLUMNS) + " |"
    lines = [f"# {plan.config.name}", "",
             f"Base config `{plan.config.base}`, seeds {plan.config.seeds}; mean ± sample std "
             "over seeds (one run: its value). Size: final model's parameters (trunk, heads, "
             "adapters) over the base "
             "network's; bytes: stored bytes (masks and owner indices included) over the "
             "base's. Children: networks trained by a search, with their training time.", "",
             head, "|" + "---|" * (len(COLUMNS) + 2)]
    for label, n, stats in rows:
        cells = [_cell(s, c[2]) for s, c in zip(stats, COLUMNS)]
        lines.append(f"| {label} | {n} | " + " | ".join(cells) + " |")
    lines += ["", "![accuracy](accuracy.png)", "", "![size](size.png)", "",
              "![ACC against size](acc_vs_size.png)", ""]
    return "\n".join(lines)


def _csv(rows: list[tuple[str, int, list]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["strategy", "runs",
                *(f"{c[1]}_{s}" for c in COLUMNS for s in ("mean", "std"))])
    for label, n, stats in rows:
        w.writerow([label, n, *("" if v is None else repr(v) for st in stats for v in st)])
    return buf.getvalue()


def _plots(by: dict[str, list[dict[str, Any]]], folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    markers = "osD^vP*Xh<>p"
    for what, file, ylabel in (("acc", "accuracy.png", "average accuracy on tasks seen (fraction)"),
                               ("size", "size.png", "model size / base (ratio)")):
        fig, ax = plt.subplots(figsize=(7.4, 4.2))
        for i, (label, runs) in enumerate(by.items()):
            if not runs:
                continue
            curves = [_curves(m)[0 if what == "acc" else 1] for m in runs]
            n = min(len(c) for c in curves)
            if n == 0:
                continue
            mean = np.nanmean(np.array([c[:n] for c in curves]), axis=0)
            style = ("-", "--", ":", "-.")[(i // 10) % 4]  # colours repeat after ten lines
            ax.plot(range(1, n + 1), mean, marker=markers[i % 12], linestyle=style, label=label)
        ax.set_title(("Average accuracy" if what == "acc" else "Model size")
                     + " after each task (mean over seeds)")
        ax.set_xlabel("tasks learned")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if what == "size" and ax.get_ylim()[1] > 10:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.savefig(folder / file, dpi=120, bbox_inches="tight")
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7.4, 4.2))
    sizes: list[float] = []
    for i, (label, runs) in enumerate(by.items()):
        pts = [(f[3], f[0]) for f in (_figures(m) for m in runs) if None not in (f[0], f[3])]
        if pts:
            xs, ys = zip(*pts)
            sizes.append(float(np.mean(xs)))
            ax.scatter([np.mean(xs)], [np.mean(ys)], label=label, marker=markers[i % 12], s=40)
    if sizes and max(sizes) > 10 * min(sizes):  # one grown network would squeeze the rest
        ax.set_xscale("log")
    ax.set_title("Final ACC against final model size (mean over seeds)")
    ax.set_xlabel("final parameters / base parameters (ratio)")
    ax.set_ylabel("final ACC (average accuracy over all tasks)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.savefig(folder / "acc_vs_size.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
