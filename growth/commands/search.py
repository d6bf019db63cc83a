"""`growth search CONFIG`: an architecture search on one task, from a base network.

The config is an ordinary campaign config (data, model, train, seed) with a `search:`
section. The base network is trained on the task first (`search.base_epochs`), then
`growth.controllers.driver.run_search` grows it generation by generation; children train with the
plain task loss.

Run directory (besides the search directory's own files, see growth.controllers.driver):
  config.yaml, log.txt   the config as validated; what happened
  ray.log                Ray's own output (its warnings, a failed trial's traceback)
  base/                  the trained base network (graph folder) and base.json (accuracies)
  best/                  the best network found (base included): structure.json +
                         weights.safetensors, loadable with NetGraph.load
  search_metrics.json    base and best accuracies (validation, test), sizes, trials, time
  report/                search.md and search.png (`growth report RUNDIR` rewrites them)
  tracking.json          the MLflow run id of the search (with `tracking: {mlflow: ...}`)

Trackers (`tracking:`, growth.tracking): the search is one tracked run (each child's
validation accuracy, the best so far, and the summary; its files at the end). With the `tune`
backend, Ray Tune's own MLflow and W&B loggers also get one run per child (`tune_callbacks`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from growth.campaign import build_base_graph, task_seed
from growth.config import Config, dump_config, load_config
from growth.controllers import make_controller
from growth.controllers.driver import Budget, Resources, SearchProgress, SearchResult, run_search
from growth.controllers.records import RECORDS, ChildRecord, read_records
from growth.controllers.search_report import SUMMARY, write_search_report
from growth.controllers.trial import TrialSpec, save_moments
from growth.data import Task, build_stream
from growth.devices import resolve_device
from growth.errors import ConfigError, GraphError, RunDirError
from growth.graph import NetGraph
from growth.io import atomic_write_text
from growth.model import Model
from growth.rundir import (
    CONFIG,
    RAY_LOG,
    RunLock,
    check_new_run_dir,
    check_run_dir,
    clean_leftovers,
    holds_run,
    logging_to,
    new_run_id,
    read_run_id,
)
from growth.scenarios import labelers
from growth.search_spaces.space import make_space
from growth.strategies import Context, make_strategy
from growth.tracking import Tracking, allow_file_store, open_tracking
from growth.train import evaluate, fit

log = logging.getLogger("growth.search")


class SearchRun:
    """Runs (or resumes) one search config into one run directory."""

    def __init__(self, cfg: Config, run_dir: str | Path, progress: SearchProgress | None = None,
                 ray_address: str | None = None, source: str = "config") -> None:
        if cfg.search is None:
            raise ConfigError(f"{source}: no `search:` section; add one (see docs/search.md), "
                              "or run the campaign with `growth run`")
        if cfg.strategy.name != "finetune":
            raise ConfigError(f"{source}: strategy.name: growth search trains children with "
                              f"the task loss alone, not {cfg.strategy.name!r}; remove the "
                              "strategy section")
        self.cfg, self.s = cfg, cfg.search
        self.run_dir = Path(run_dir)
        self.progress = progress or SearchProgress()
        self.ray_address = ray_address or self.s.ray_address
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        tasks = build_stream({**cfg.data.model_dump(), "seed": cfg.seed})
        if self.s.task >= len(tasks):
            raise ConfigError(f"{source}: search.task: {self.s.task}, but the stream has "
                              f"{len(tasks)} task(s); use 0..{len(tasks) - 1}")
        self.task: Task = tasks[self.s.task]
        torch.manual_seed(cfg.seed)
        try:
            self.base = build_base_graph(cfg, [self.task])
        except GraphError as exc:
            raise ConfigError(f"{source}: model: {exc}") from None
        space_spec = dict(self.s.space)
        limit = self.s.budget.max_params
        if limit is not None:
            space_spec["max_params"] = min(limit, space_spec.get("max_params") or limit)
        self.space = make_space(space_spec, self.base, where=f"{source}: search.space")
        self.controller = make_controller(self.s.controller.name, self.space,
                                          self.s.controller.settings(), seed=cfg.seed,
                                          where=f"{source}: search.controller")

    # ---- entry points ------------------------------------------------------------------------
    def start(self) -> dict[str, Any]:
        """Search into a folder that holds no run yet."""
        check_new_run_dir(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with RunLock(self.run_dir) as lock:
            if holds_run(self.run_dir) or (self.run_dir / "search.json").exists():
                raise RunDirError(f"{self.run_dir} already holds a run; continue it with "
                                  f"`growth resume {self.run_dir}` or choose another --out")
            new_run_id(self.run_dir)
            atomic_write_text(self.run_dir / CONFIG, dump_config(self.cfg))
            with logging_to(self.run_dir):
                lock.note_stale()
                return self._run()

    def resume(self) -> dict[str, Any]:
        """Continue the search in this run directory (finished children are kept)."""
        check_run_dir(self.run_dir)
        with RunLock(self.run_dir) as lock, logging_to(self.run_dir):
            lock.note_stale()
            for p in clean_leftovers(self.run_dir):
                log.info("removed %s, left by an interrupted write", p)
            log.info("resuming the search in %s", self.run_dir)
            return self._run()

    # ---- the run -------------------------------------------------------------------------------
    def _run(self) -> dict[str, Any]:
        base = self._base()
        tracking = open_tracking(self.cfg.tracking, self.run_dir, read_run_id(self.run_dir),
                                 self.cfg.name, 1)
        ok = False
        try:
            tracking.params(self.cfg.to_dict())
            metrics = self._search(base, tracking)
            tracking.log(summary_values(metrics), int(metrics["trials"]))
            t = self.cfg.tracking
            if t.artifacts and (t.mlflow is not None or t.wandb is not None):
                tracking.finish(self.run_dir, SEARCH_FILES)
            ok = True
        finally:
            tracking.close(ok)
        return metrics

    def _search(self, base: dict[str, Any], tracking: Tracking) -> dict[str, Any]:
        budget, s = self.s.budget, self.s
        train = self.cfg.train.model_copy(update={
            "epochs": s.epochs or self.cfg.train.epochs, "lr": self.cfg.train.lr * s.lr_scale,
            "schedule": s.schedule, "warmup_epochs": 0})
        result = run_search(
            self.run_dir, self.run_dir / "base", self.controller, self.space, self.task,
            TrialSpec(train=train, scenario=self.cfg.scenario, device=self.cfg.device),
            Budget(children=s.children, generations=budget.generations,
                   trials=budget.trials, wall_time_s=budget.wall_time_s),
            Resources(concurrency=s.concurrency, cpus_per_trial=s.cpus_per_trial,
                      gpus_per_trial=s.gpus_per_trial, max_failures=s.max_failures),
            seed=self.cfg.seed, parent_acc=base["val_acc"], policy=s.parent, margin=s.margin,
            backend=s.backend, storage=s.storage, name=self.cfg.name,
            ray_address=self.ray_address, progress=self._tracked(tracking),
            log_file=self.run_dir / RAY_LOG,
            callbacks=(tune_callbacks(self.cfg.tracking, self.cfg.name)
                       if s.backend == "tune" else ()))
        metrics = self._finish(result, base)
        write_search_report([self.run_dir])
        return metrics

    def _tracked(self, tracking: Tracking) -> SearchProgress:
        """The progress hooks, and each finished child to the trackers (step: children so
        far, those of an interrupted run included)."""
        if not tracking:
            return self.progress
        shown = self.progress
        done = [len(read_records(self.run_dir / RECORDS))]

        def on_child(record: ChildRecord, board: list[ChildRecord]) -> None:
            shown.on_child(record, board)
            done[0] += 1
            values = {"child/val_accuracy": record.val_acc, "child/params": record.params,
                      "child/train_time_s": record.train_time_s,
                      "best/val_accuracy": board[0].val_acc if board else None}
            tracking.log({k: float(v) for k, v in values.items() if v is not None}, done[0])

        return SearchProgress(shown.on_generation, on_child, shown.on_generation_end)

    def _ctx(self, graph: NetGraph) -> Context:
        head_of, label_of = labelers(self.cfg.scenario)
        device = resolve_device(self.cfg.device)
        return Context(Model(graph, device), self.task, [], head_of, label_of, device,
                       seed=task_seed(self.cfg.seed, self.task.index))

    def _base(self) -> dict[str, Any]:
        """The trained base network's accuracies (training it first if no run has yet)."""
        info = self.run_dir / "base" / "base.json"
        if info.is_file():
            return json.loads(info.read_text())
        ctx = self._ctx(self.base)
        torch.manual_seed(ctx.seed)
        train = self.cfg.train
        if self.s.base_epochs is not None:
            train = train.model_copy(update={"epochs": self.s.base_epochs})
        start = time.perf_counter()
        fit(ctx, make_strategy("finetune"), train, seed=ctx.seed)
        wall = time.perf_counter() - start
        graph = ctx.model.graph
        base = {"val_acc": evaluate(ctx, self.task, "val"),
                "test_acc": evaluate(ctx, self.task, "test"),
                "params": graph.param_count(), "train_time_s": wall}
        graph.save(self.run_dir / "base")
        save_moments(ctx.optimizer, ctx.model.named_parameters(), self.run_dir / "base")
        atomic_write_text(info, json.dumps(base, indent=1))  # written last: base is complete
        log.info("base network trained in %.1fs: validation accuracy %.4f, %d parameters",
                 wall, base["val_acc"], base["params"])
        return base

    def _finish(self, result: SearchResult, base: dict[str, Any]) -> dict[str, Any]:
        """Save the best network (the base unless a child beats it by the margin) and the
        summary."""
        best = result.best
        if result.replaced:  # the driver's choice ("best" or "fixed"), the margin applied
            src, key = result.parent, result.parent.name
        else:
            src, key = self.run_dir / "base", "base"
        graph = NetGraph.load(src)
        tmp = self.run_dir / ".tmp-best"
        shutil.rmtree(tmp, ignore_errors=True)
        graph.save(tmp)
        shutil.rmtree(self.run_dir / "best", ignore_errors=True)
        tmp.rename(self.run_dir / "best")
        ctx = self._ctx(graph)
        failed = sum(1 for r in result.records if not r.ok)
        metrics = {
            "run": {"name": self.cfg.name, "controller": self.s.controller.name,
                    "dataset": self.cfg.data.dataset, "task": self.task.name,
                    "seed": self.cfg.seed},
            "base": base,
            "best": {"key": key, "val_acc": evaluate(ctx, self.task, "val"),
                     "test_acc": evaluate(ctx, self.task, "test"),
                     "params": graph.param_count(), "arch": self.space.arch(graph)},
            "trials": len(result.records), "failed": failed,
            "generations": result.generations, "parent_kept": result.kept,
            "best_child": None if best is None else {"key": best.key, "val_acc": best.val_acc},
            "wall_time_s": result.elapsed_s,
            "child_train_time_s": sum(r.train_time_s for r in result.records),
            "done": result.done,
        }
        atomic_write_text(self.run_dir / SUMMARY, json.dumps(metrics, indent=1))
        log.info("search done: best %s, validation %.4f, test %.4f, %d parameters", key,
                 metrics["best"]["val_acc"], metrics["best"]["test_acc"],
                 metrics["best"]["params"])
        return metrics


SEARCH_FILES = ("config.yaml", "log.txt", SUMMARY, "leaderboard.json", "report")


def summary_values(metrics: dict[str, Any]) -> dict[str, float]:
    """The search's summary as scalars for the trackers."""
    values = {f"{part}/{key}": metrics[part][key] for part in ("base", "best")
              for key in ("val_acc", "test_acc", "params")}
    values.update(trials=metrics["trials"], failed=metrics["failed"],
                  wall_time_s=metrics["wall_time_s"])
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float))}


def tune_callbacks(tracking: Any, name: str) -> list[Any]:
    """Ray Tune's own MLflow and W&B loggers with the config's settings: one tracked run per
    child trained as a Tune trial (its reported metrics; MLflow: its trial config as params).
    Only the `tune` backend runs Tune; with the others the search's own run covers them."""
    out: list[Any] = []
    if tracking.mlflow is not None:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        m = tracking.mlflow
        allow_file_store(m.uri)
        out.append(MLflowLoggerCallback(tracking_uri=m.uri, experiment_name=m.experiment,
                                        tags={**m.tags, "growth.search": name}))
    if tracking.wandb is not None:
        from ray.air.integrations.wandb import WandbLoggerCallback

        w = tracking.wandb
        if w.mode != "online":  # Ray's logger asks for an API key unless WANDB_MODE says not
            os.environ.setdefault("WANDB_MODE", w.mode)
        extra = {"mode": w.mode, "entity": w.entity, "dir": w.dir, "tags": list(w.tags) or None}
        out.append(WandbLoggerCallback(project=w.project, group=w.group or f"{name}-children",
                                       **{k: v for k, v in extra.items() if v is not None}))
    return out


def search_config(path: str | Path, out: str | Path, overrides: list[str] | None = None,
                  progress: SearchProgress | None = None, ray_address: str | None = None
                  ) -> dict[str, Any]:
    """Load a search config and run it into `out` (the Python form of `growth search`)."""
    cfg = load_config(path, overrides)
    return SearchRun(cfg, out, progress, ray_address, source=str(path)).start()


def resume_search(run_dir: str | Path, progress: SearchProgress | None = None,
                  ray_address: str | None = None) -> dict[str, Any]:
    """Continue a search run directory with the config it was started with."""
    path = Path(run_dir) / CONFIG
    cfg = load_config(path)
    return SearchRun(cfg, run_dir, progress, ray_address, source=str(path)).resume()


__all__ = ["SearchRun", "resume_search", "search_config"]
