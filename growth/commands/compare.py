"""`growth compare`: several strategies over one task stream and several seeds, side by side.

A comparison config names a base campaign config (the stream, network and training every run
shares), the seeds, and a list of strategies (a name, or a mapping with the strategy's settings
and an optional `label`, so one strategy can appear twice: REC and its ablations, a strategy
with its defaults and with its tuned preset):

    name: compare_permuted
    base: ../quickstart.yaml          # relative to this file
    seeds: 10                         # seeds 0..9, or a list [0, 1, 2] (default: DEFAULT_SEEDS)
    set: [train.epochs=10]            # overrides applied to every run (optional)
    reference: finetune               # differences are to this label (default: the first)
    settings: default                 # default | presets: each strategy's tuned preset
    presets: ../presets               # where presets are (relative to this file)
    orders: 0                         # random task orders (random-1..random-N) besides the
    curricula: []                     # stream's own; curricula: easy_first, hard_first
    strategies:
      - finetune
      - {name: ewc, lambda: 50}
      - {name: ewc, label: ewc-tuned, settings: presets, reference: ewc}
      - {name: rec, label: rec-no-search, search: off}

Runs are paired: for one seed (and one task order) every strategy starts from the same
network and sees the same data in the same order (growth.campaign), so each strategy's
difference to its reference is taken per pair and tested with a paired t-test
(growth.stats): the table shows the mean difference in ACC with its 95% interval and p-value,
and marks it "n.s." where it is not significant at 5%.

Every (strategy, seed, order) is an ordinary run directory `OUT/<label>-s<seed>` (the stream's
own order) or `OUT/<label>-s<seed>-<order>`: a finished one is reused, an interrupted one
resumed, so the command itself is resumable. Runs execute in
parallel as Ray tasks on the local machine or on a cluster (`--ray-address`). A run holds as
many CPUs as its torch threads; a run whose strategy searches (REC) holds none itself, since
its search trials claim the cluster's CPUs by their own resources: a campaign waiting for its
trials never sits on the CPUs they need, so the comparison cannot deadlock its own searches.

Outputs in OUT: `compare.md` and `compare.csv` (per strategy, mean and sample std over seeds
and orders: ACC, BWT, FWT, final size relative to the base, wall time, children trained by a
search and their training time), `differences.csv` (each strategy against its reference),
`accuracy.png` and `size.png` (against tasks, one line per strategy), `acc_vs_size.png`
(final ACC against final size, one point per strategy), and with several orders `orders.csv`
and `orders.png` (ACC per order, and its spread across orders, per strategy).
`compare.json`, written first, marks OUT as a comparison's folder (an existing folder without
it, and not empty, is refused), and `ray.log` holds Ray's own output. Labels and the name are
plain names (they name folders), and a run folder that links out of OUT is refused.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from growth.commands.watch import RunsWatch
from growth.config import Config, load_config, parse_yaml, read_config_text
from growth.data.orders import CURRICULA
from growth.errors import ConfigError, GrowthError
from growth.io import atomic_write_text, check_output, name_problem, resolve_under
from growth.metrics import read_metrics
from growth.rundir import RAY_LOG
from growth.stats import Paired, mean_sd, paired

log = logging.getLogger("growth.commands.compare")
MARKER = "compare.json"  # written first into OUT: the folder is a comparison's
GIVEN = "given"  # the stream's own task order
# Seeds when a comparison names none: with this many pairs a paired t-test at 5% detects a true
# 1-point difference in ACC with probability 0.8 for the median pair of strategies on both
# shipped digits streams (docs/tuning.md, "How many seeds": the spread of paired differences
# measured by bench/seeds_needed.py, 0.016 on permuted digits and 0.028 on split digits)
DEFAULT_SEEDS = 66
Settings = Literal["default", "presets"]
METRICS = ("acc", "bwt", "fwt")  # the run metrics paired differences can be taken in
WATCH_S = 10.0  # seconds between looks at the runs' progress while none finishes


class StrategyEntry(BaseModel):
    """One line of the comparison: a strategy, its settings, and the label it is shown by;
    `settings: presets` takes its settings from its preset (the entry's own keys win),
    `reference` is the label its differences are taken to."""

    model_config = ConfigDict(extra="allow")
    name: str
    label: str | None = None
    settings_from: Settings | None = Field(None, alias="settings")
    reference: str | None = None

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
    seeds: list[int] = Field(default_factory=lambda: list(range(DEFAULT_SEEDS)), min_length=1)
    set: list[str] = Field(default_factory=list)
    reference: str | None = None
    settings: Settings = "default"
    presets: str = "../presets"
    orders: int = Field(0, ge=0)
    curricula: list[Literal[CURRICULA]] = Field(default_factory=list)  # type: ignore[valid-type]
    strategies: list[StrategyEntry] = Field(min_length=1)

    @field_validator("strategies", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("seeds", mode="before")
    @classmethod
    def _count(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 1:
                raise ValueError("a seed count is 1 or more")
            return list(range(value))
        return value

    @property
    def order_names(self) -> list[str]:
        """The task orders every (strategy, seed) runs in: the stream's own first."""
        return [GIVEN, *(f"random-{k}" for k in range(1, self.orders + 1)), *self.curricula]


class RunSpec(NamedTuple):
    """One run of the comparison."""

    label: str
    seed: int
    overrides: list[str]  # of the base config
    order: str = GIVEN


@dataclass
class Plan:
    """The validated comparison: its config, the base file, each label's settings and
    reference, and one config per run."""

    config: CompareConfig
    base: Path
    runs: dict[str, RunSpec] = field(default_factory=dict)  # by run folder name
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> strategy
    preset_of: dict[str, str] = field(default_factory=dict)  # label -> preset file used
    reference_of: dict[str, str] = field(default_factory=dict)  # label -> its reference

    def pair_key(self, name: str) -> tuple[int, str]:
        """What a run is paired on across strategies: its seed and task order."""
        spec = self.runs[name]
        return spec.seed, spec.order


def load_compare(path: str | Path, reference: str | None = None) -> Plan:
    """Read and check a comparison config and every run's campaign config (nothing runs).
    `reference` (a label) replaces every strategy's reference: all differences are to it."""
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
    named = [("name", cfg.name)] + [(f"strategies.{i}.label", s.shown)
                                    for i, s in enumerate(cfg.strategies)]
    for key, name in named:  # each names a folder: OUT/<label>-s<seed>, runs/<name>
        if name_problem(name) is not None:
            raise ConfigError(f"{path}: {key}: {name_problem(name)}")
    labels = [s.shown for s in cfg.strategies]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        raise ConfigError(f"{path}: strategies: {twice[0]!r} appears twice; give one a "
                          "`label`")
    plan = Plan(cfg, base)
    _references(plan, path, labels, reference)
    base_cfg = load_config(base, cfg.set)
    for entry in cfg.strategies:
        settings, extra = _settings(plan, entry, base_cfg, path)
        plan.settings[entry.shown] = settings
        flow = yaml.safe_dump(settings, default_flow_style=True, width=10**6).strip()
        for seed in cfg.seeds:
            for order in cfg.order_names:
                overrides = [*cfg.set, *extra, f"strategy={flow}", f"seed={seed}",
                             f"name={entry.shown}"]
                name = f"{entry.shown}-s{seed}"
                if order != GIVEN:
                    overrides.append(f"data.order={order}")
                    name = f"{name}-{order}"
                load_config(base, overrides)  # every run's config is valid before any starts
                plan.runs[name] = RunSpec(entry.shown, seed, overrides, order)
    return plan


def _references(plan: Plan, path: Path, labels: list[str], named: str | None = None) -> None:
    """Each label's reference: `named` if given, else its own `reference`, else the
    comparison's, else the first label."""
    cfg = plan.config
    if named is not None and named not in labels:
        raise ConfigError(f"{path}: reference {named!r} is not a label of the strategies "
                          f"({', '.join(labels)})")
    default = cfg.reference or labels[0]
    if default not in labels:
        raise ConfigError(f"{path}: reference: {default!r} is not a label of the strategies "
                          f"({', '.join(labels)})")
    for entry in cfg.strategies:
        ref = named or entry.reference or default
        if ref not in labels:
            raise ConfigError(f"{path}: strategies: {entry.shown}: reference {ref!r} is not a "
                              f"label of the strategies ({', '.join(labels)})")
        if ref != entry.shown:
            plan.reference_of[entry.shown] = ref


def _settings(plan: Plan, entry: StrategyEntry, base_cfg: Config, path: Path
              ) -> tuple[dict[str, Any], list[str]]:
    """The strategy settings of an entry, and the other overrides its preset adds."""
    from growth.commands.presets import find_preset, preset_name
    from growth.strategies import available_strategies

    own = entry.settings()
    if (entry.settings_from or plan.config.settings) != "presets":
        return own, []
    folder = (path.parent / plan.config.presets).resolve()
    preset = find_preset(folder, entry.name, base_cfg)
    if preset is None:
        cls = available_strategies().get(entry.name)
        if cls is not None and not cls.Params.model_fields:  # nothing to tune (finetune)
            return own, []
        raise ConfigError(
            f"{path}: strategies: {entry.shown}: no preset "
            f"{folder / preset_name(entry.name, base_cfg)} for {entry.name} on this stream; "
            "make one with `growth tune` (a config with `tune.presets` naming that folder), "
            "or give the entry `settings: default`")
    plan.preset_of[entry.shown] = str(folder / preset_name(entry.name, base_cfg))
    return {**preset.strategy, **own}, list(preset.set)


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

    if _search_backend(cfg) in ("ray", "tune"):
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


def default_folder(plan: Plan) -> Path:
    """Where a comparison's runs go when no folder is given."""
    return Path("runs") / plan.config.name


def run_compare(path: str | Path, out: str | Path | None = None,
                ray_address: str | None = None, reference: str | None = None) -> Path:
    """Run every (strategy, seed) of the comparison in parallel on Ray, then write the table
    and plots (differences to `reference` when given, see load_compare); returns the output
    folder. A run that fails is named in a GrowthError raised after the others finished
    (their results are written)."""
    import ray

    from growth.cluster import ray_cluster

    plan = load_compare(path, reference)
    folder = Path(out) if out else default_folder(plan)
    check_output(folder, MARKER, "compare.md")  # compare.md: a comparison written before
    for name in plan.runs:  # a run folder that links out of the comparison is refused
        resolve_under(folder, folder / name, "run folder")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / MARKER, json.dumps({"format": "growth.compare",
                                                   "name": plan.config.name}) + "\n")
    failed: dict[str, str] = {}
    with ray_cluster(ray_address, log_file=folder / RAY_LOG):
        task = ray.remote(run_one)
        pending = {}
        for name, spec in plan.runs.items():
            overrides = spec.overrides
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


def finished(plan: Plan, folder: Path) -> dict[str, dict[str, Any]]:
    """Metrics of the runs that finished every task, by run folder name."""
    out = {}
    for name in plan.runs:
        try:
            m = read_metrics(folder / name)
        except GrowthError:
            continue
        if m.get("finished_tasks") == len(m["tasks"]):
            out[name] = m
    return out


def collect(plan: Plan, folder: Path) -> dict[str, list[dict[str, Any]]]:
    """Finished runs' metrics by label, in the order the config lists the strategies."""
    by: dict[str, list[dict[str, Any]]] = {s.shown: [] for s in plan.config.strategies}
    for name, m in finished(plan, folder).items():
        by[plan.runs[name].label].append(m)
    return by


def differences(plan: Plan, done: dict[str, dict[str, Any]], metric: str = "acc"
                ) -> dict[str, tuple[str, Paired | None]]:
    """Each label's paired comparison of `metric` (acc, bwt or fwt) with its reference, over
    the pairs (seed, task order) both finished: label -> (reference, Paired), None below two
    pairs. The reference itself has no entry."""
    if metric not in METRICS:
        raise ConfigError(f"metric {metric!r}: differences are taken in {', '.join(METRICS)}")
    acc: dict[str, dict[tuple[int, str], float]] = {}
    for name, m in done.items():
        if m.get(metric) is not None:
            acc.setdefault(plan.runs[name].label, {})[plan.pair_key(name)] = float(m[metric])
    out: dict[str, tuple[str, Paired | None]] = {}
    for label, ref in plan.reference_of.items():
        mine, theirs = acc.get(label, {}), acc.get(ref, {})
        keys = sorted(set(mine) & set(theirs))
        out[label] = (ref, paired([mine[k] for k in keys], [theirs[k] for k in keys])
                      if len(keys) >= 2 else None)
    return out


def paired_differences(config: str | Path, folder: str | Path | None = None,
                       reference: str | None = None, metric: str = "acc"
                       ) -> dict[str, tuple[str, Paired | None]]:
    """The paired differences of a comparison whose runs are in `folder` (default: the
    config's own, runs/<name>), read from the runs that finished; nothing runs. `reference`:
    a label every other label is compared with (default: each entry's reference, as the
    config says). Returns label -> (reference, growth.stats.Paired or None below two pairs);
    `differences_table` renders it."""
    plan = load_compare(config, reference)
    where = Path(folder) if folder is not None else default_folder(plan)
    if not where.is_dir():
        raise GrowthError(f"{where}: no such comparison folder; run `growth compare {config} "
                          f"--out {where}` first")
    return differences(plan, finished(plan, where), metric)


def differences_table(diffs: dict[str, tuple[str, Paired | None]], metric: str = "acc") -> str:
    """A markdown table of paired differences (as `differences` returns them)."""
    lines = [f"| strategy | reference | pairs | Δ {metric.upper()} | 95% interval | p | |",
             "|---|---|---|---|---|---|---|"]
    for label, (ref, d) in diffs.items():
        if d is None:
            lines.append(f"| {label} | {ref} | <2 | n/a | n/a | n/a | |")
            continue
        lines.append(f"| {label} | {ref} | {d.n} | {_signed(d.diff)} | "
                     f"[{_signed(d.low)}, {_signed(d.high)}] | {_p(d.p)} | "
                     f"{'' if d.significant else 'n.s.'} |")
    return "\n".join(lines)


@dataclass
class OrderRow:
    """ACC of one strategy per task order (mean over seeds) and its spread across orders."""

    label: str
    means: dict[str, float | None]
    spread: float | None  # std of ACC across orders for one seed, averaged over seeds
    range: float | None  # largest minus smallest of the per-order means
    seeds: int  # seeds with every order finished (those the spread is taken over)


def order_rows(plan: Plan, done: dict[str, dict[str, Any]]) -> list[OrderRow]:
    """Order sensitivity of every strategy (see OrderRow)."""
    orders = plan.config.order_names
    acc: dict[tuple[str, int, str], float] = {}
    for name, m in done.items():
        spec = plan.runs[name]
        if m.get("acc") is not None:
            acc[(spec.label, spec.seed, spec.order)] = float(m["acc"])
    rows = []
    for entry in plan.config.strategies:
        label = entry.shown
        means: dict[str, float | None] = {}
        for order in orders:
            xs = [acc[(label, s, order)] for s in plan.config.seeds
                  if (label, s, order) in acc]
            means[order] = mean_sd(xs)[0] if xs else None
        spreads = [mean_sd([acc[(label, s, o)] for o in orders])[1]
                   for s in plan.config.seeds if all((label, s, o) in acc for o in orders)]
        known = [v for v in means.values() if v is not None]
        rows.append(OrderRow(label, means, mean_sd(spreads)[0] if spreads else None,
                             max(known) - min(known) if len(known) == len(orders) else None,
                             len(spreads)))
    return rows


def write_comparison(plan: Plan, folder: Path) -> Path:
    """compare.md, the CSV files and the plots from the finished runs in `folder`."""
    done = finished(plan, folder)
    by = collect(plan, folder)
    rows = []
    for label, runs in by.items():
        cols = list(zip(*(_figures(m) for m in runs))) if runs else [[]] * len(COLUMNS)
        rows.append((label, len(runs), [_stats(list(c)) for c in cols]))
    (folder / "compare.csv").write_text(_csv(rows))
    diffs = differences(plan, done)
    (folder / "differences.csv").write_text(_differences_csv(diffs))
    orders = order_rows(plan, done) if len(plan.config.order_names) > 1 else []
    if orders:
        (folder / "orders.csv").write_text(_orders_csv(plan, orders))
        _orders_plot(plan, orders, folder / "orders.png")
    md = _markdown(plan, rows, diffs, orders, _order_tasks(plan, done))
    (folder / "compare.md").write_text(md)
    _plots(by, folder)
    return folder / "compare.md"


def _order_tasks(plan: Plan, done: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """The tasks of each order, as one finished run with the first seed learned them."""
    out: dict[str, list[str]] = {}
    for name, m in done.items():
        spec = plan.runs[name]
        if spec.order not in out and spec.seed == plan.config.seeds[0]:
            out[spec.order] = [str(t) for t in m["tasks"]]
    return out


def _cell(stat: tuple[float | None, float | None], digits: int) -> str:
    mean, std = stat
    if mean is None:
        return "n/a"
    if std is None:  # one run: its value, no spread to show
        return f"{mean:,.{digits}f}"
    return f"{mean:,.{digits}f} ± {std:,.{digits}f}"


def _signed(v: float | None, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:+.{digits}f}"


def _p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _markdown(plan: Plan, rows: list[tuple[str, int, list]],
              diffs: dict[str, tuple[str, Paired | None]], orders: list[OrderRow],
              order_tasks: dict[str, list[str]]) -> str:
    cfg = plan.config
    over = "seeds" if len(cfg.order_names) == 1 else "seeds and task orders"
    pair = "seed" if len(cfg.order_names) == 1 else "seed and task order"
    head = "| strategy | runs | " + " | ".join(c[0] for c in COLUMNS) + " |"
    lines = [f"# {cfg.name}", "",
             f"Base config `{cfg.base}`, seeds {_seeds(cfg.seeds)}"
             + ("" if len(cfg.order_names) == 1 else
                f", task orders {', '.join(cfg.order_names)}")
             + f"; mean ± sample std over {over} (one run: its value). Size: final model's "
             "parameters (trunk, heads, adapters) over the base network's; bytes: stored bytes "
             "(masks and owner indices included) over the base's. Children: networks trained "
             "by a search, with their training time.", "",
             head, "|" + "---|" * (len(COLUMNS) + 2)]
    for label, n, stats in rows:
        cells = [_cell(s, c[2]) for s, c in zip(stats, COLUMNS)]
        lines.append(f"| {label} | {n} | " + " | ".join(cells) + " |")
    planned = {label: sum(spec.label == label for spec in plan.runs.values())
               for label, _, _ in rows}
    short = [f"{label} ({n} of {planned[label]})" for label, n, _ in rows if n < planned[label]]
    if short:
        lines += ["", "Not every run finished (failed, or not run yet; `growth compare` again "
                  "resumes them): " + ", ".join(short) + ". Their rows and differences are "
                  "over the runs that finished."]
    lines += ["", "## Settings", "", "| strategy | settings | from |", "|---|---|---|"]
    for entry in cfg.strategies:
        flow = yaml.safe_dump(plan.settings[entry.shown], default_flow_style=True,
                              width=10**6).strip()
        source = plan.preset_of.get(entry.shown)
        lines.append(f"| {entry.shown} | `{flow}` | "
                     + (f"preset `{Path(source).name}`" if source else "the entry and the "
                        "strategy's defaults") + " |")
    if diffs:
        lines += ["", f"## Differences in ACC to the reference (paired by {pair})", "",
                  "The mean of the per-pair differences (strategy - reference) with its 95% t "
                  "interval, and the two-sided p-value of the paired t-test; n.s.: not "
                  "significant at 5% (the interval holds 0).", "",
                  differences_table(diffs)]
    if orders:
        names = cfg.order_names
        lines += ["", "## Task orders", "",
                  "ACC per task order (mean over seeds); spread: the standard deviation of ACC "
                  "across the orders for one seed, averaged over seeds; range: the largest "
                  "minus the smallest order mean.", "",
                  "| strategy | " + " | ".join(names) + " | spread | range |",
                  "|" + "---|" * (len(names) + 3)]
        for r in orders:
            cells = ["n/a" if r.means[o] is None else f"{r.means[o]:.4f}" for o in names]
            lines.append(f"| {r.label} | " + " | ".join(cells) + " | "
                         + ("n/a" if r.spread is None else f"{r.spread:.4f}") + " | "
                         + ("n/a" if r.range is None else f"{r.range:.4f}") + " |")
        lines += ["", f"Tasks of each order, as seed {cfg.seeds[0]} learned them (a curriculum "
                  "ranks each seed's own validation split):", ""]
        lines += [f"- {o}: {', '.join(order_tasks[o])}" for o in names if o in order_tasks]
        lines += ["", "![ACC per task order](orders.png)"]
    lines += ["", "![accuracy](accuracy.png)", "", "![size](size.png)", "",
              "![ACC against size](acc_vs_size.png)", ""]
    return "\n".join(lines)


def _seeds(seeds: list[int]) -> str:
    if len(seeds) > 3 and seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(map(str, seeds))


def _differences_csv(diffs: dict[str, tuple[str, Paired | None]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["strategy", "reference", "pairs", "acc_diff", "low", "high", "t", "p",
                "significant"])
    for label, (ref, d) in diffs.items():
        if d is None:
            w.writerow([label, ref, "", "", "", "", "", "", ""])
        else:
            w.writerow([label, ref, d.n, repr(d.diff), repr(d.low), repr(d.high), repr(d.t),
                        repr(d.p), d.significant])
    return buf.getvalue()


def _orders_csv(plan: Plan, rows: list[OrderRow]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    names = plan.config.order_names
    w.writerow(["strategy", *(f"acc_{o}" for o in names), "spread", "range", "seeds"])
    for r in rows:
        w.writerow([r.label, *("" if r.means[o] is None else repr(r.means[o]) for o in names),
                    "" if r.spread is None else repr(r.spread),
                    "" if r.range is None else repr(r.range), r.seeds])
    return buf.getvalue()


def _orders_plot(plan: Plan, rows: list[OrderRow], path: Path) -> None:
    from matplotlib.figure import Figure

    from growth.plots import save

    names = plan.config.order_names
    fig = Figure(figsize=(7.4, 4.2))
    ax = fig.subplots()
    markers = "osD^vP*Xh<>p"
    for i, r in enumerate(rows):
        xs = [k for k, o in enumerate(names) if r.means[o] is not None]
        if xs:
            ax.plot(xs, [r.means[names[k]] for k in xs], marker=markers[i % 12],
                    linestyle=("-", "--", ":", "-.")[(i // 10) % 4],
                    label=r.label if r.spread is None else f"{r.label} (spread {r.spread:.3f})")
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_title("Final ACC per task order (mean over seeds)")
    ax.set_xlabel("task order")
    ax.set_ylabel("final ACC (average test accuracy, fraction)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    save(fig, path)


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
