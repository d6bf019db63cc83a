"""`growth tune CONFIG`: the best settings of a strategy on a stream, found on Ray Tune without
reading test data.

The config is an ordinary campaign config (the stream, network, training and strategy) with a
`tune:` section naming the keys to tune and their ranges (a grid, a choice, a uniform or a
log-uniform interval); docs/tuning.md lists every key. The trials are fixed when the run starts:
t000 is the config's own setting (`include_default`), then grid points crossed with settings
drawn from `sample_seed`. Each trial runs one short campaign per seed in `tune.seeds`, with
`evaluate_on: val` (R on the validation splits; every test split is replaced by an empty one
before the campaign starts, so no part of a trial can read test data), and is scored by the
protocol:
- `stream`: the campaign learns the whole stream; the score is its validation ACC (the mean
  over tasks of the validation accuracy after the last task), averaged over the seeds;
- `first_tasks` (Chaudhry et al. 2019, "Efficient lifelong learning with A-GEM"): the campaign
  learns only the stream's first k tasks, and is scored by their validation ACC; the later
  tasks stay unseen by the tuning.
A trial reports after every task (the validation accuracy over the tasks seen so far), so
ASHA (`scheduler: asha`) can stop poor settings after a few tasks.

Run directory:
  run.json, config.yaml, .lock, log.txt   as every run directory (growth.rundir); config.yaml
                                          holds the number of trials and the presets folder
  plan.json                the trials (id, setting), written once at start: what resume runs
  trials/<id>/s<seed>/     each trial's campaigns: ordinary run directories
  trials.jsonl             one line per finished trial (score, each seed's score, status): the
                           record resume trusts; a recorded trial is never run again
  tune/                    Ray Tune's experiments, one per attempt
  tune.md, tune.csv        every trial, best first; the chosen setting and the default's score
  tune_scores.png          score against each tuned key
  preset.yaml              the chosen setting as a preset (growth.commands.presets), also
                           written into `tune.presets` when the config names a folder

Resume (`growth resume RUNDIR`, after a kill or a failure): recorded trials are kept, the others
run again, and a trial's campaigns resume from their last finished task; on the CPU every
campaign ends as it would have uninterrupted, so with the FIFO scheduler the resumed run chooses
the same setting (ASHA's stops depend on the order trials finish in). The best setting is the
highest score among finished trials, the earlier trial on a tie.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from ray.tune import Callback

from growth.config import Config, TuneConfig, dump_config, load_config, validate_config
from growth.errors import ConfigError, GrowthError, RunDirError
from growth.io import atomic_write_text
from growth.rundir import (
    CONFIG,
    RunLock,
    check_run_dir,
    check_writable_dir,
    clean_leftovers,
    holds_run,
    logging_to,
    new_run_id,
)

log = logging.getLogger("growth.tune")
PLAN = "plan.json"
RECORDS = "trials.jsonl"
STATE = "tune.json"
TRIALS = "trials"
PRESET = "preset.yaml"
TUNABLE = ("strategy.", "train.", "model.")  # the sections a tune may change
SAMPLED_TRIALS = 10  # trials per grid point when a key is drawn and `trials` is not set
TIE = 1e-9  # scores closer than this are equal (an average of the same counts, summed apart)


@dataclass(frozen=True)
class Trial:
    """One planned trial: its id and setting (dotted key -> value)."""

    id: str
    setting: dict[str, Any]
    default: bool = False


@dataclass
class TrialRecord:
    """A finished trial (one line of trials.jsonl). status: ok | stopped (by the scheduler,
    after `tasks_done` tasks) | failed."""

    id: str
    setting: dict[str, Any]
    status: str
    score: float | None = None
    seed_scores: dict[str, float] = field(default_factory=dict)
    tasks_done: int = 0
    error: str | None = None
    wall_s: float = 0.0

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)


@dataclass
class TuneProgress:
    """Hooks for a progress display (called in the driver); all optional."""

    on_start: Callable[[int, int], None] = lambda total, done: None
    on_trial: Callable[[TrialRecord], None] = lambda record: None


# ---- the plan ---------------------------------------------------------------------------------
def resolved_settings(cfg: Config) -> dict[str, Any]:
    """The config as a campaign resolves it (the strategy's defaults written out), without its
    tune section: the values the default trial uses."""
    from growth.strategies import make_strategy

    data = cfg.to_dict()
    data.pop("tune", None)
    strategy = make_strategy(cfg.strategy.name, cfg.strategy.settings())
    data["strategy"] = {"name": cfg.strategy.name,
                        **strategy.params.model_dump(mode="json", by_alias=True)}
    return data


def _get(data: dict[str, Any], key: str) -> Any:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def _put(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def _draw(spec: Any, rng: np.random.Generator) -> Any:
    if spec.choice is not None:
        return copy.deepcopy(spec.choice[int(rng.integers(len(spec.choice)))])
    if spec.uniform is not None:
        value = float(rng.uniform(*spec.uniform))
    else:
        lo, hi = spec.loguniform
        value = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    return int(round(value)) if spec.integer else float(f"{value:.4g}")


def make_plan(tune: TuneConfig, default: dict[str, Any]) -> list[Trial]:
    """The trials: the default setting (if included), then grid points crossed with drawn
    settings, `tune.trials` of them besides the default; a repeated setting is left out."""
    keys = list(tune.space)
    grid_keys = [k for k in keys if not tune.space[k].sampled]
    drawn_keys = sorted(k for k in keys if tune.space[k].sampled)
    points = [dict(zip(grid_keys, values)) for values in
              itertools.product(*(tune.space[k].grid for k in grid_keys))]
    wanted = tune.trials or len(points) * (SAMPLED_TRIALS if drawn_keys else 1)
    rng = np.random.default_rng(tune.sample_seed)
    plan: list[Trial] = []
    seen: list[dict[str, Any]] = []
    if tune.include_default:
        plan.append(Trial("t000", dict(default), default=True))
        seen.append(default)
    rounds = math.ceil(wanted / len(points)) if drawn_keys else 1
    count = 0
    for _ in range(rounds):
        drawn = {k: _draw(tune.space[k], rng) for k in drawn_keys}
        for point in points:
            setting = {k: {**point, **drawn}[k] for k in keys}
            if count >= wanted:
                break
            count += 1
            if setting in seen:
                continue
            seen.append(setting)
            plan.append(Trial(f"t{len(plan):03d}", setting))
    return plan


# ---- trial configs ----------------------------------------------------------------------------
def trial_configs(cfg: Config, trial: Trial, folder: Path, source: str
                  ) -> list[dict[str, Any]]:
    """The campaigns of one trial (one per seed): their configs, checked, and folders."""
    tune = cfg.tune
    assert tune is not None
    base = cfg.to_dict()
    base.pop("tune", None)
    for key, value in trial.setting.items():
        _put(base, key, copy.deepcopy(value))
    runs = []
    for seed in tune.seeds or [cfg.seed]:
        data = copy.deepcopy(base)
        data.update(seed=seed, name=f"{cfg.name}-{trial.id}-s{seed}", evaluate_on="val",
                    threads=max(1, int(tune.cpus_per_trial)))
        if tune.protocol == "first_tasks":
            data["data"]["order"] = _first_tasks(cfg, seed, tune.first_tasks or 1, source)
        try:
            validate_config(data, source)
        except ConfigError as exc:
            shown = ", ".join(f"{k}={v!r}" for k, v in trial.setting.items())
            raise ConfigError(f"{source}: tune.space: trial {trial.id} ({shown}) is not a "
                              f"valid config:\n{exc}") from None
        runs.append({"seed": seed, "dir": str(folder / trial.id / f"s{seed}"), "config": data})
    return runs


def _first_tasks(cfg: Config, seed: int, k: int, source: str) -> list[int]:
    """The first k tasks of the config's order (a named order is resolved on the seed's
    stream, whose training and validation splits it reads)."""
    from growth.data import build_stream, resolve_order

    order = cfg.data.order
    if isinstance(order, list):
        picked = order
    else:
        tasks = build_stream({**cfg.data.model_dump(), "order": None, "seed": seed})
        picked = resolve_order(tasks, order)
    if k > len(picked):
        raise ConfigError(f"{source}: tune.first_tasks: {k}, but the stream has "
                          f"{len(picked)} tasks")
    return list(picked[:k])


def check_space(tune: TuneConfig, default: dict[str, Any], source: str) -> None:
    """Every tuned key is a key of the config's strategy, training or model sections."""
    problems = []
    for key in tune.space:
        if not key.startswith(TUNABLE) or key == "strategy.name":
            problems.append(f"{source}: tune.space.{key}: only keys under strategy., train. "
                            "and model. can be tuned (not the strategy's name, the data or the "
                            "seed)")
            continue
        try:
            _get(default, key)
        except KeyError:
            problems.append(f"{source}: tune.space.{key}: not a key of this config (see "
                            "`growth strategies list` for the strategy's settings)")
    if problems:
        raise ConfigError("\n".join(problems))


# ---- one trial (runs in a Ray Tune trial; `run_trial` is its body) ----------------------------
def run_campaign(config: dict[str, Any], out: Path, progress: Any = None) -> dict[str, Any]:
    """Run one campaign of a trial into `out`, resuming it if it has a finished task (a folder
    a kill left before its first checkpoint starts over)."""
    from growth.campaign import Campaign, latest_checkpoint

    cfg = validate_config(config, str(out / CONFIG))
    if out.exists() and latest_checkpoint(out) is None:
        shutil.rmtree(out)
    campaign = Campaign(cfg, out, progress)
    return campaign.resume() if out.exists() else campaign.start()


def run_trial(spec: dict[str, Any], report: Callable[[dict[str, Any]], None]
              ) -> dict[str, Any]:
    """Run a trial's campaigns one after the other, reporting after each task; returns (and
    reports last) the final result. A campaign that fails (a diverged loss, a strategy's
    error) makes the trial failed, not an error of the trial's process."""
    from growth.campaign import Progress

    start = time.perf_counter()
    done, scores = 0, {}

    def task_end(i: int, metrics: dict[str, Any]) -> None:
        nonlocal done
        done += 1
        row = metrics["R"][i + 1][: i + 1]
        report({"score": float(np.mean(row)), "tasks_done": done, "final": False,
                "status": "running"})

    try:
        for k, run in enumerate(spec["runs"]):
            metrics = run_campaign(run["config"], Path(run["dir"]), Progress(on_task_end=task_end))
            if metrics.get("acc") is None:
                raise GrowthError(f"{run['dir']}: the campaign has no score")
            scores[str(run["seed"])] = float(metrics["acc"])
            done = (k + 1) * int(spec["tasks"])
        result = {"score": float(np.mean(list(scores.values()))), "seed_scores": scores,
                  "status": "ok", "error": None}
    except GrowthError as exc:
        result = {"score": -1.0, "seed_scores": scores, "status": "failed",
                  "error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
    result.update(tasks_done=done, final=True, wall_s=time.perf_counter() - start)
    report(result)
    return result


def tune_trial(config: dict[str, Any]) -> None:
    """The Ray Tune function trainable: `run_trial` with Tune's report."""
    from ray import tune

    run_trial(config["spec"], lambda metrics: tune.report(metrics))


# ---- records (a Tune callback in the driver) -------------------------------------------------
def read_records(path: Path) -> dict[str, TrialRecord]:
    """Recorded trials by id; a line a kill cut short is ignored (that trial runs again)."""
    out: dict[str, TrialRecord] = {}
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = TrialRecord(**json.loads(line))
        except (json.JSONDecodeError, TypeError):
            continue
        out[record.id] = record
    return out


class Recorder(Callback):
    """Appends each finished trial's record to trials.jsonl (in the driver), then tells
    `on_trial` (the progress display)."""

    def __init__(self, path: Path, settings: dict[str, dict[str, Any]],
                 on_trial: Callable[[TrialRecord], None] | None) -> None:
        self.path, self.settings, self.on_trial = path, settings, on_trial

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles callbacks into its experiment state: the live hook stays behind
        return {**self.__dict__, "on_trial": None}

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any
                          ) -> None:
        result = trial.last_result or {}
        trial_id = trial.config["spec"]["id"]
        if result.get("final"):
            ok = result["status"] == "ok"
            record = TrialRecord(trial_id, self.settings[trial_id], str(result["status"]),
                                 result["score"] if ok else None,
                                 dict(result.get("seed_scores") or {}),
                                 int(result.get("tasks_done", 0)), result.get("error"),
                                 float(result.get("wall_s", 0.0)))
        else:  # stopped by the scheduler after a report
            record = TrialRecord(trial_id, self.settings[trial_id], "stopped",
                                 tasks_done=int(result.get("tasks_done", 0)),
                                 wall_s=float(result.get("time_total_s", 0.0)))
        self._add(record)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        trial_id = trial.config["spec"]["id"]
        lines = [ln for ln in str(trial.get_error() or "").splitlines() if ln.strip()]
        self._add(TrialRecord(trial_id, self.settings[trial_id], "failed",
                              error="the trial's process failed: " +
                              (lines[-1].strip() if lines else "no error text")))

    def _add(self, record: TrialRecord) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(record.to_json() + "\n")
            f.flush()
        if self.on_trial is not None:
            self.on_trial(record)


# ---- the run ----------------------------------------------------------------------------------
class TuneRun:
    """Runs (or resumes) one tune config into one run directory."""

    def __init__(self, cfg: Config, run_dir: str | Path, source: str = "config",
                 ray_address: str | None = None, command: str | None = None,
                 progress: TuneProgress | None = None) -> None:
        if cfg.tune is None:
            raise ConfigError(f"{source}: no `tune:` section; add one (see docs/tuning.md), "
                              "or run the campaign with `growth run`")
        if cfg.search is not None:
            raise ConfigError(f"{source}: search: a tune config has no `search:` section")
        self.cfg, self.source = cfg, source
        self.run_dir = Path(run_dir)
        self.ray_address = ray_address or cfg.tune.ray_address
        self.command = command
        self.progress = progress or TuneProgress()
        self.default = resolved_settings(cfg)
        check_space(cfg.tune, self.default, source)

    # ---- entry points ----------------------------------------------------------------------
    def start(self) -> dict[str, Any]:
        """Tune into a folder that holds no run yet (every trial's config is checked first)."""
        plan = self.plan()
        check_writable_dir(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with RunLock(self.run_dir) as lock:
            if holds_run(self.run_dir) or (self.run_dir / PLAN).exists():
                raise RunDirError(f"{self.run_dir} already holds a run; continue it with "
                                  f"`growth resume {self.run_dir}` or choose another --out")
            new_run_id(self.run_dir)
            atomic_write_text(self.run_dir / CONFIG, dump_config(self.cfg))
            atomic_write_text(self.run_dir / STATE, json.dumps(
                {"command": self.command, "config": self.source, "attempts": 0,
                 "elapsed_s": 0.0}, indent=1))
            atomic_write_text(self.run_dir / PLAN, json.dumps(
                [t.__dict__ for t in plan], indent=1))
            with logging_to(self.run_dir):
                lock.note_stale()
                log.info("tune %r: %d trials of %s", self.cfg.name, len(plan),
                         ", ".join(self.cfg.tune.space) if self.cfg.tune else "")
                return self._run(plan)

    def resume(self) -> dict[str, Any]:
        """Continue the tune in this run directory (recorded trials are kept)."""
        check_run_dir(self.run_dir)
        with RunLock(self.run_dir) as lock, logging_to(self.run_dir):
            lock.note_stale()
            for p in clean_leftovers(self.run_dir):
                log.info("removed %s, left by an interrupted write", p)
            plan = self._read_plan()
            log.info("resuming the tune in %s", self.run_dir)
            return self._run(plan)

    def plan(self) -> list[Trial]:
        """The trials of this config, every trial's campaigns checked."""
        assert self.cfg.tune is not None
        default = {k: _get(self.default, k) for k in self.cfg.tune.space}
        plan = make_plan(self.cfg.tune, default)
        for trial in plan:
            trial_configs(self.cfg, trial, self.run_dir / TRIALS, self.source)
        return plan

    def _read_plan(self) -> list[Trial]:
        path = self.run_dir / PLAN
        try:
            return [Trial(**t) for t in json.loads(path.read_text())]
        except (OSError, json.JSONDecodeError, TypeError) as exc:
            raise RunDirError(f"{path} is missing or corrupt ({exc}); the tune cannot resume "
                              "(start it again in another folder)") from None

    # ---- the trials ------------------------------------------------------------------------
    def _run(self, plan: list[Trial]) -> dict[str, Any]:
        state_path = self.run_dir / STATE
        state = json.loads(state_path.read_text())
        records = read_records(self.run_dir / RECORDS)
        pending = [t for t in plan if t.id not in records]
        self.progress.on_start(len(plan), len(plan) - len(pending))
        start = time.perf_counter()
        if pending:
            state["attempts"] = int(state.get("attempts", 0)) + 1
            atomic_write_text(state_path, json.dumps(state, indent=1))
            self._fit(pending, int(state["attempts"]))
        state["elapsed_s"] = float(state.get("elapsed_s", 0.0)) + time.perf_counter() - start
        atomic_write_text(state_path, json.dumps(state, indent=1))
        records = read_records(self.run_dir / RECORDS)
        return self._finish(plan, records, state)

    def _fit(self, pending: list[Trial], attempt: int) -> None:
        from ray import tune

        from growth.cluster import ray_cluster

        t = self.cfg.tune
        assert t is not None
        specs = [{"id": trial.id, "tasks": self._tasks(),
                  "runs": trial_configs(self.cfg, trial, (self.run_dir / TRIALS).resolve(),
                                        self.source)} for trial in pending]
        asha = t.scheduler == "asha"
        scheduler = None
        if asha:
            from ray.tune.schedulers import ASHAScheduler

            scheduler = ASHAScheduler(time_attr="tasks_done",
                                      max_t=self._tasks() * len(t.seeds or [self.cfg.seed]),
                                      grace_period=t.grace_tasks,
                                      reduction_factor=t.reduction_factor)
        trainable = tune.with_resources(tune_trial, {"cpu": t.cpus_per_trial,
                                                     "gpu": 1.0 if self.cfg.device == "cuda"
                                                     else 0.0})
        settings = {trial.id: trial.setting for trial in pending}
        with ray_cluster(self.ray_address, log_file=self.run_dir / "log.txt"):
            tuner = tune.Tuner(
                trainable, param_space={"spec": tune.grid_search(specs)},
                tune_config=tune.TuneConfig(
                    metric="score", mode="max", scheduler=scheduler,
                    max_concurrent_trials=t.concurrency, reuse_actors=not asha,
                    trial_dirname_creator=_trial_name, trial_name_creator=_trial_name),
                run_config=tune.RunConfig(
                    name=f"attempt-{attempt}", storage_path=str((self.run_dir / "tune")
                                                                .resolve()), verbose=0,
                    failure_config=tune.FailureConfig(max_failures=t.max_failures),
                    callbacks=[Recorder(self.run_dir / RECORDS, settings,
                                        self.progress.on_trial)]))
            tuner.fit()

    def _tasks(self) -> int:
        """Tasks each campaign of a trial learns."""
        t = self.cfg.tune
        assert t is not None
        if t.protocol == "first_tasks":
            return int(t.first_tasks or 1)
        if isinstance(self.cfg.data.order, list):
            return len(self.cfg.data.order)
        from growth.data import build_stream

        return len(build_stream({**self.cfg.data.model_dump(), "order": None,
                                 "seed": self.cfg.seed}))

    # ---- results ---------------------------------------------------------------------------
    def _finish(self, plan: list[Trial], records: dict[str, TrialRecord],
                state: dict[str, Any]) -> dict[str, Any]:
        ok = [r for t in plan if (r := records.get(t.id)) is not None and r.status == "ok"]
        top = max((r.score or 0.0 for r in ok), default=None)
        # the first trial at the top score: scores that differ only by float rounding tie
        best = next((r for r in ok if (r.score or 0.0) >= (top or 0.0) - TIE), None)
        default = next((records.get(t.id) for t in plan if t.default), None)
        summary = {
            "name": self.cfg.name, "strategy": self.cfg.strategy.name,
            "trials": len(plan), "finished": len(ok),
            "stopped": sum(r.status == "stopped" for r in records.values()),
            "failed": sum(r.status == "failed" for r in records.values()),
            "pending": sum(t.id not in records for t in plan),
            "best": None if best is None else {"id": best.id, "setting": best.setting,
                                               "score": best.score},
            "default": None if default is None else {"id": default.id,
                                                     "setting": default.setting,
                                                     "score": default.score},
            "wall_time_s": float(state.get("elapsed_s", 0.0)),
            "presets": [],
        }
        if best is not None:
            summary["presets"] = [str(p) for p in self._write_presets(best, default, summary,
                                                                       state)]
            log.info("best setting %s (%s): score %.4f", best.id, best.setting, best.score)
        write_tune_report(self.run_dir, self.cfg, plan, records, summary)
        return summary

    def _write_presets(self, best: TrialRecord, default: TrialRecord | None,
                       summary: dict[str, Any], state: dict[str, Any]) -> list[Path]:
        from growth.commands.presets import Preset, preset_name, write_preset

        t = self.cfg.tune
        assert t is not None
        strategy = {"name": self.cfg.strategy.name, **self.cfg.strategy.settings()}
        others = []
        for key, value in best.setting.items():
            if key.startswith("strategy."):
                strategy[key.removeprefix("strategy.")] = value
            else:
                flow = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
                others.append(f"{key}={flow.removesuffix('...').strip()}")
        seeds = t.seeds or [self.cfg.seed]
        source = state.get("config") or self.source  # the file the tune was started from
        tuned = {"config": source, "dataset": self.cfg.data.dataset,
                 "stream": self.cfg.data.stream, "scenario": self.cfg.scenario,
                 "protocol": t.protocol, "seeds": seeds, "trials": summary["trials"],
                 "trial": best.id, "score": best.score,
                 "default_score": None if default is None else default.score}
        if t.protocol == "first_tasks":
            tuned["first_tasks"] = t.first_tasks
        what = ("validation ACC of the first "
                f"{t.first_tasks} tasks" if t.protocol == "first_tasks" else
                "validation ACC over the whole stream")
        header = [f"Best settings of {self.cfg.strategy.name} on {self.cfg.data.dataset}, "
                  f"{self.cfg.data.stream} stream, {self.cfg.scenario} scenario, found by "
                  "growth tune.",
                  f"Made by: {state.get('command') or f'growth tune {source}'}",
                  f"Protocol {t.protocol}: {what}, mean over seeds {seeds}; test data never "
                  "read.",
                  f"Chosen: trial {best.id} of {summary['trials']}, score {best.score:.4f}"
                  + ("" if default is None or default.score is None else
                     f"; the config's own setting (trial {default.id}): {default.score:.4f}")
                  + "."]
        preset = Preset(strategy=strategy, set=others, tuned=tuned)
        paths = [write_preset(self.run_dir, PRESET, preset, header)]
        if t.presets:
            folder = Path(t.presets)
            paths.append(write_preset(folder, preset_name(self.cfg.strategy.name, self.cfg),
                                      preset, header))
        return paths


def _trial_name(trial: Any) -> str:
    return f"{trial.config['spec']['id']}-{trial.trial_id}"


# ---- report -----------------------------------------------------------------------------------
def write_tune_report(folder: Path, cfg: Config, plan: list[Trial],
                      records: dict[str, TrialRecord], summary: dict[str, Any]) -> Path:
    """tune.md, tune.csv and tune_scores.png from the plan and the records."""
    import csv
    import io

    t = cfg.tune
    assert t is not None
    keys = list(t.space)
    seeds = [str(s) for s in (t.seeds or [cfg.seed])]
    order = sorted(plan, key=lambda tr: _rank(records.get(tr.id)))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["trial", *keys, "score", *(f"seed_{s}" for s in seeds), "status",
                "tasks_done", "wall_s", "error"])
    rows = []
    for trial in order:
        r = records.get(trial.id)
        values = [_shown(trial.setting[k]) for k in keys]
        seed_scores = [(r.seed_scores.get(s) if r else None) for s in seeds]
        status = "pending" if r is None else r.status
        w.writerow([trial.id, *values, "" if r is None or r.score is None else repr(r.score),
                    *("" if v is None else repr(v) for v in seed_scores), status,
                    0 if r is None else r.tasks_done, "" if r is None else f"{r.wall_s:.1f}",
                    "" if r is None or r.error is None else r.error])
        name = f"**{trial.id}**" if summary["best"] and summary["best"]["id"] == trial.id \
            else trial.id
        rows.append([name + (" (default)" if trial.default else ""), *values,
                     _num(None if r is None else r.score),
                     *(_num(v) for v in seed_scores), status])
    (folder / "tune.csv").write_text(buf.getvalue())
    what = (f"the first {t.first_tasks} tasks" if t.protocol == "first_tasks" else
            "the whole stream")
    lines = [f"# Tune: {cfg.name}", "",
             f"Strategy `{cfg.strategy.name}` on {cfg.data.dataset} ({cfg.data.stream} stream, "
             f"{cfg.scenario} scenario). Protocol `{t.protocol}`: each trial learns {what} once "
             f"per seed ({', '.join(seeds)}) and is scored by the validation ACC (mean over "
             "those tasks of the validation accuracy after the last one), averaged over the "
             "seeds; test splits are never read. Scheduler "
             f"`{t.scheduler}`.", "",
             f"Trials: {summary['trials']} ({summary['finished']} finished, "
             f"{summary['stopped']} stopped early, {summary['failed']} failed, "
             f"{summary['pending']} not run); wall time {summary['wall_time_s']:.0f} s.", ""]
    best, default = summary["best"], summary["default"]
    if best is not None:
        shown = ", ".join(f"`{k}: {_shown(v)}`" for k, v in best["setting"].items())
        lines.append(f"Chosen: **{best['id']}**, {shown}: score {best['score']:.4f}"
                     + ("" if default is None or default["score"] is None else
                        f" (the config's own setting, {default['id']}: "
                        f"{default['score']:.4f})") + ".")
        lines.append("")
    head = ["trial", *keys, "score", *(f"seed {s}" for s in seeds), "status"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    failed = [(tr.id, r.error) for tr in order if (r := records.get(tr.id)) is not None
              and r.status == "failed"]
    if failed:
        lines += ["", "Failed trials:", ""] + [f"- {i}: {e}" for i, e in failed]
    lines += ["", "![score against each tuned key](tune_scores.png)", ""]
    path = folder / "tune.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    _scores_plot(folder / "tune_scores.png", cfg, plan, records, summary)
    return path


def _rank(record: TrialRecord | None) -> tuple[int, float]:
    if record is None:
        return (3, 0.0)
    if record.status == "ok":
        return (0, -(record.score or 0.0))
    return (1 if record.status == "stopped" else 2, 0.0)


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _scores_plot(path: Path, cfg: Config, plan: list[Trial], records: dict[str, TrialRecord],
                 summary: dict[str, Any]) -> None:
    from matplotlib.figure import Figure

    from growth.plots import save

    t = cfg.tune
    assert t is not None
    keys = list(t.space)
    fig = Figure(figsize=(4.2 * len(keys), 3.8), layout="constrained")
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    best = (summary["best"] or {}).get("id")
    done = [(tr, records[tr.id]) for tr in plan
            if tr.id in records and records[tr.id].status == "ok"]
    for ax, key in zip(axes, keys):
        values = [tr.setting[key] for tr, _ in done]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric:
            xs = [float(v) for v in values]
        else:
            cats = sorted({_shown(v) for v in values})
            xs = [float(cats.index(_shown(v))) for v in values]
            ax.set_xticks(range(len(cats)), cats, rotation=30)
        ys = [r.score for _, r in done]
        ax.scatter(xs, ys, s=22, color="tab:blue", label="trial")
        for (tr, r), x in zip(done, xs):
            if tr.default:
                ax.scatter([x], [r.score], s=90, facecolors="none", edgecolors="tab:gray",
                           label="config's own setting")
            if tr.id == best:
                ax.scatter([x], [r.score], s=90, marker="*", color="tab:red", label="chosen")
        spec = t.space[key]
        if numeric and (spec.loguniform is not None or
                        (xs and min(xs) > 0 and max(xs) / min(xs) >= 10)):  # values a decade apart
            ax.set_xscale("log")
        ax.set_title(f"score against {key}")
        ax.set_xlabel(key)
        ax.set_ylabel("validation ACC (fraction)")
        ax.grid(alpha=0.3)
        if not done:
            ax.text(0.5, 0.5, "no finished trial yet", ha="center", va="center",
                    transform=ax.transAxes)
    handles, labels = axes[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    if unique:
        axes[0].legend(unique.values(), unique.keys(), fontsize=7)
    fig.suptitle(f"growth tune: {cfg.name} ({cfg.strategy.name}, protocol {t.protocol})")
    save(fig, path)


# ---- entry points -----------------------------------------------------------------------------
def tune_config(path: str | Path, out: str | Path, trials: int | None = None,
                ray_address: str | None = None, command: str | None = None,
                progress: TuneProgress | None = None) -> dict[str, Any]:
    """Load a tune config and run it into `out` (the Python form of `growth tune`)."""
    path = Path(path)
    cfg = load_config(path)
    if cfg.tune is not None:
        update: dict[str, Any] = {}
        if trials is not None:
            update["trials"] = trials
        if cfg.tune.presets is not None:  # relative to the config file; saved as absolute
            update["presets"] = str((path.parent / cfg.tune.presets).resolve())
        if update:
            cfg = cfg.model_copy(update={"tune": cfg.tune.model_copy(update=update)})
    return TuneRun(cfg, out, str(path), ray_address, command, progress).start()


def resume_tune(run_dir: str | Path, ray_address: str | None = None,
                progress: TuneProgress | None = None) -> dict[str, Any]:
    """Continue a tune run directory with the config it was started with."""
    path = Path(run_dir) / CONFIG
    cfg = load_config(path)
    return TuneRun(cfg, run_dir, str(path), ray_address, progress=progress).resume()


__all__ = ["TrialRecord", "TuneProgress", "TuneRun", "make_plan", "read_records",
           "resume_tune", "run_trial", "tune_config"]
