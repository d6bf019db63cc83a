"""Runs as the reports read them: each run's metrics.json, and runs grouped by config.

A comparison groups runs whose resolved configs are equal but for the seed (and the run's name
and thread count). This is the data both the markdown report (growth.report) and the figures
(growth.plots) are drawn from; it reads only metrics.json (and config.yaml for older runs).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from growth.errors import ReportError
from growth.metrics import as_matrix, finished_tasks, read_metrics, summarize

IGNORED_KEYS = ("seed", "name", "threads", "tracking", "tensorboard", "checkpoints")  # keys
# that do not make runs different (tensorboard: the top-level key of runs started before
# `tracking:`; checkpoints: retention changes no result)


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

    @property
    def config(self) -> dict[str, Any] | None:
        """The resolved config: from metrics.json, else the run's config.yaml, else None."""
        cfg = self.metrics.get("config")
        if isinstance(cfg, dict):
            return cfg
        path = self.dir / "config.yaml"
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return None
        return data if isinstance(data, dict) else None


@dataclass
class Group:
    """Runs whose configs are equal but for IGNORED_KEYS; `differs` tells it apart from other
    groups of the same strategy (empty when it is the strategy's only group)."""

    config: dict[str, Any]
    runs: list[Run] = field(default_factory=list)
    differs: dict[str, Any] = field(default_factory=dict)
    known: bool = True  # False: no config was found; grouped by the run's metrics info

    @property
    def strategy(self) -> str:
        return strategy_of(self.runs[0])

    @property
    def label(self) -> str:
        if not self.differs:
            return self.strategy
        keys = ", ".join(f"{k}={short_value(v)}" for k, v in self.differs.items())
        return f"{self.strategy} † ({keys})"


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


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Groups of runs with equal configs but the seed, in order of first appearance."""
    groups: dict[str, Group] = {}
    for r in runs:
        cfg, known = r.config, True
        if cfg is None:  # older metrics without a config: what the metrics say about the run
            cfg = {"run": {k: v for k, v in r.info.items() if k not in IGNORED_KEYS},
                   "tasks": r.tasks}
            known = False
        cfg = {k: v for k, v in cfg.items() if k not in IGNORED_KEYS}
        key = json.dumps([known, cfg], sort_keys=True, default=str)
        groups.setdefault(key, Group(cfg, known=known)).runs.append(r)
    out = list(groups.values())
    for g in out:
        same = [o for o in out if o.strategy == g.strategy]
        if len(same) > 1:
            flat = [_flatten(o.config) for o in same]
            keys = sorted({k for f in flat for k in f if len({str(x.get(k)) for x in flat}) > 1})
            mine = _flatten(g.config)
            g.differs = {k: mine.get(k) for k in keys}
    return out


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


def short_value(v: Any, limit: int = 24) -> str:
    text = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _make_labels_unique(runs: list[Run]) -> None:
    """Tell apart runs sharing a name: add the folder name, then the position if still equal."""
    for extra in (lambda i, r: r.dir.name, lambda i, r: f"#{i + 1}"):
        counts = Counter(r.label for r in runs)
        for i, r in enumerate(runs):
            if counts[r.label] > 1:
                r.label = f"{r.label} [{extra(i, r)}]"


def strategy_of(run: Run) -> str:
    return str(run.info.get("strategy", "n/a"))
