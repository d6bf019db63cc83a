"""A campaign: one strategy over one task stream, with a run directory that survives a crash.

Run directory (growth.rundir: lock, run id, paths; growth.checkpoint: checkpoints):
  run.json               the run id, written once at start and carried by every checkpoint
  config.yaml            the resolved config (defaults filled in)
  .lock                  held by the one process writing the run (its pid inside)
  log.txt                what happened, task by task
  ray.log                Ray's own output, if a search used Ray
  epochs.csv             per epoch of every task: training loss, validation accuracy
  tensorboard/           TensorBoard event files (with `tracking: {tensorboard: true}`)
  tracking.json          the MLflow run id, so a resume continues that run (growth.tracking)
  metrics.json / .csv    R matrix, ACC/BWT/FWT, sizes, wall times and peak resident memory
                         per task, the run's bytes on disk (rewritten after every task, and
                         rebuilt from the latest checkpoint on resume when behind)
  checkpoints/task_NNN/  graph, campaign state and a manifest of SHA-256 sums that also names
                         the strategy's tensor files; everything is checked before a resume
                         trusts it; `checkpoints: {keep: N}` keeps the newest N
  tensors/               the strategy's tensors, each file written once (when the task that
                         owns it ends) and named by its SHA-256; later checkpoints name it
  work/task_NNN/         a strategy's own artefacts for a task (REC: its architecture search,
                         which resumes from there); the strategy gets the folder, not the layout

A run or resume holds the directory's lock from before its first write to its exit; a resume
checks the run id, the newest checkpoint and the config before it changes anything, so a
refused resume leaves the directory as it was.

Each task starts from a seed derived from (config seed, task index), never from the random
state the previous task left behind, so a resumed run ends with the same R matrix as an
uninterrupted one. The base network's initial weights come from the config's seed alone, so
runs of different strategies with one seed start from the same network and see the same data
in the same order: they are paired (growth.stats).

With `evaluate_on: val` the R matrix holds validation accuracies and every task's test split is
replaced by an empty one before anything runs, so no part of the run can read test data
(`growth tune`'s trials).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from growth.checkpoint import (
    CampaignState,
    Checkpoint,
    Saved,
    apply_retention,
    checkpoint_bytes,
    checkpoint_folders,
    latest_checkpoint,
    read_checkpoint,
    remove_unnamed_tensors,
    tensor_store,
    write_checkpoint,
)
from growth.compile import compile_graph
from growth.config import Config, dump_config, load_config
from growth.controllers.service import SearchService
from growth.data import Task, build_stream
from growth.data.streaming import take
from growth.devices import resolve_device
from growth.errors import (
    ConfigError,
    DataError,
    GraphError,
    ReportError,
    RunDirError,
    UnsupportedModuleError,
)
from growth.graph import NetGraph
from growth.io import atomic_write_text
from growth.metrics import (
    METRICS_CSV,
    METRICS_JSON,
    RMatrix,
    make_metrics,
    read_metrics,
    size_report,
    write_metrics,
)
from growth.model import Model
from growth.resources import Collector, disk_bytes, peak_rss_bytes, reset_peak_rss
from growth.rundir import (
    CHECKPOINTS,
    CONFIG,
    LOCK,
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
from growth.runlog import EpochLog
from growth.scenarios import heads, labelers
from growth.searching import Searcher
from growth.strategies import Context, Strategy, make_strategy
from growth.tracking import Tracking, open_tracking
from growth.train import evaluate, learn_task

log = logging.getLogger("growth.campaign")
WORK = "work"  # RUNDIR/work/task_NNN: Context.workdir of each task
UNCHECKED = ("tracking", "tensorboard", "checkpoints")  # config keys a resume may change
__all__ = ["Campaign", "CampaignState", "Progress", "latest_checkpoint", "resume_run",
           "run_config", "run_config_of"]


@dataclass
class Progress:
    """Callbacks a front end (the CLI's progress bar) can hook into; all optional."""

    on_task_start: Callable[[int, Task], None] = lambda i, t: None
    on_epoch: Callable[[int, int, float], None] = lambda task, epoch, loss: None
    on_task_end: Callable[[int, dict[str, Any]], None] = lambda i, m: None
    # a strategy's architecture search within a task (REC): its children, trained apart from
    # the task's epochs
    on_search_start: Callable[[int, int], None] = lambda task, children: None
    on_search_child: Callable[[int, Any], None] = lambda task, record: None
    on_search_end: Callable[[int], None] = lambda task: None


def task_seed(seed: int, task: int) -> int:
    return (seed * 1_000_003 + task * 7919 + 17) % (2**31 - 1)


def build_base_graph(cfg: Config, tasks: list[Task]) -> NetGraph:
    """The base network with its heads: one per task, or one shared head (class and domain
    scenarios)."""
    from growth.search_spaces.networks import add_head, mlp, small_cnn, vit

    m = cfg.model
    shape = tasks[0].input_shape
    if m.kind == "mlp":
        g = mlp(shape, m.hidden, activation=m.activation, batchnorm=m.batchnorm,
                dropout=m.dropout)
    elif m.kind == "vit":
        g = vit(shape, m.patch, m.dim, m.depth, m.heads, m.mlp_dim)
    elif m.kind == "torchvision":
        from growth.search_spaces.zoo import torchvision_trunk

        g = torchvision_trunk(m.arch, shape, m.weights)
    elif m.kind == "python":
        g = _python_trunk(cfg, shape)
    else:
        g = small_cnn(shape, m.channels, batchnorm=m.batchnorm, activation=m.activation,
                      fc=m.fc, dropout=m.dropout)
    for name, outputs in heads(cfg.scenario, tasks).items():
        g = add_head(g, name, outputs)
    return g


def _python_trunk(cfg: Config, shape: tuple[int, ...]) -> NetGraph:
    """The user's `model.factory(**model.args)`, imported as the trunk."""
    from growth.plugins import load_factory
    from growth.search_spaces.zoo import module_trunk

    m = cfg.model
    build = load_factory(m.factory, f"{cfg.source}: model.factory")
    try:
        module = build(**m.args)
    except Exception as exc:  # the user's code: any error, named with the call
        raise ConfigError(f"{cfg.source}: model.factory: {m.factory}(**model.args) failed: "
                          f"{type(exc).__name__}: {exc}") from None
    return module_trunk(module, shape, m.output, f"model.factory {m.factory!r}")


class Campaign:
    """Runs (or resumes) one config into one run directory."""

    def __init__(self, cfg: Config, run_dir: str | Path, progress: Progress | None = None,
                 report: Callable[[Path], Any] | None = None) -> None:
        """`report(run_dir)` writes RUNDIR/report when the run finishes, before MLflow or
        W&B take the run's files (the commands pass growth.report's writer)."""
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.progress = progress or Progress()
        self.report = report
        self.tracking = Tracking({}, cfg.train.epochs)
        self.device = resolve_device(cfg.device, cfg.source)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        try:
            self.tasks = build_stream(self._stream_args())
        except DataError as exc:  # names the config the data section came from
            raise type(exc)(f"{cfg.source}: data: {exc}") from None
        self.split = cfg.evaluate_on  # the split R is measured on
        if self.split == "val":
            self.tasks = [without_test(t) for t in self.tasks]
        self.head_of, self.label_of = labelers(cfg.scenario)
        self.strategy: Strategy = make_strategy(cfg.strategy.name, cfg.strategy.settings())
        if cfg.scenario not in self.strategy.scenarios:
            advice = self.strategy.scenario_advice
            raise ConfigError(f"strategy {cfg.strategy.name!r} runs only in scenario "
                              f"{' or '.join(self.strategy.scenarios)}, not {cfg.scenario!r}"
                              + (f" ({advice})" if advice else ""))
        torch.manual_seed(cfg.seed)  # the base network's initial weights
        try:  # a model section the data cannot feed is a config error, found before any write
            self.base = build_base_graph(cfg, self.tasks)
        except (GraphError, UnsupportedModuleError) as exc:
            raise ConfigError(f"{cfg.source}: model: {exc} (input shape "
                              f"{self.tasks[0].input_shape})") from None
        self._base_bytes: int | None = None
        self.searcher: Searcher | None = None  # held while tasks are learned (_loop)
        self.run_id = ""
        self.resumed_at: int | None = None  # finished tasks found by resume
        if self.device.type == "cuda":  # bitwise-equal resumes need deterministic kernels
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False

    def _stream_args(self) -> dict[str, Any]:
        return {**self.cfg.data.model_dump(), "seed": self.cfg.seed}

    # ---- entry points ----------------------------------------------------------------------
    def start(self) -> dict[str, Any]:
        """Run from the first task into a folder that holds no run yet."""
        check_new_run_dir(self.run_dir)
        _mkdir(self.run_dir)
        with RunLock(self.run_dir) as lock:
            if holds_run(self.run_dir):
                raise RunDirError(f"{self.run_dir} already holds a run; continue it with "
                                  f"`growth resume {self.run_dir}` or choose another --out")
            self.run_id = new_run_id(self.run_dir)
            with logging_to(self.run_dir):
                lock.note_stale()
                return self._begin()

    def resume(self) -> dict[str, Any]:
        """Continue from the newest checkpoint, after checking everything it loads."""
        check_run_dir(self.run_dir)
        with RunLock(self.run_dir) as lock:
            self.run_id = read_run_id(self.run_dir)
            path = latest_checkpoint(self.run_dir)
            ckpt = None
            if path is not None:
                ckpt = read_checkpoint(path, self.run_id, len(self.tasks), self.strategy)
                self._check_same_config(ckpt)
            # everything is checked: from here on the run directory may change
            removed = clean_leftovers(self.run_dir)
            unnamed = remove_unnamed_tensors(self.run_dir)
            if ckpt is not None and ckpt.state.finished == len(self.tasks) and not (
                    removed or unnamed):
                self._restore(ckpt)
                return self._refresh_metrics()  # nothing to train; metrics may lag behind
            with logging_to(self.run_dir):
                lock.note_stale()
                for p in removed:
                    log.info("removed %s, left by an interrupted write or removal", p)
                if unnamed:
                    log.info("removed %d tensor file(s) that no checkpoint names (left by an "
                             "interrupted write or a removed checkpoint)", len(unnamed))
                if ckpt is None:
                    log.info("no finished task in %s; starting from the beginning",
                             self.run_dir)
                    return self._begin()
                self._restore(ckpt)
                log.info("resuming after task %d from %s", ckpt.state.finished - 1, path)
                return self._loop()

    def _begin(self) -> dict[str, Any]:
        resolved = self._resolved()
        atomic_write_text(self.run_dir / CONFIG, dump_config(resolved))
        self.model = Model(self.base, self.device)
        base = self.base.param_count()
        self.state = CampaignState(RMatrix(len(self.tasks)), base_params=base,
                                   config=resolved.to_dict())
        log.info("campaign %r: strategy %s on %s/%s, %d tasks, %s scenario; base network %d "
                 "parameters", self.cfg.name, self.cfg.strategy.name, self.cfg.data.dataset,
                 self.cfg.data.stream, len(self.tasks), self.cfg.scenario, base)
        for j, task in enumerate(self.tasks):
            self.state.R.record(0, j, evaluate(self._ctx(task), task, self.split,
                                                strategy=self.strategy))
        log.info("R[0] (random init): %s", self.state.R.row(0).round(4).tolist())
        return self._loop()

    def _restore(self, ckpt: Checkpoint) -> None:
        self.model = Model(ckpt.graph, self.device)
        self.strategy.load_state_dict(ckpt.tensors, ckpt.extra)
        self.strategy.offload(ckpt.tensors.refs())  # per-task state stays in its files
        self.state = ckpt.state
        self.resumed_at = ckpt.state.finished

    def _refresh_metrics(self) -> dict[str, Any]:
        """metrics.json from the checkpoint, rewritten only if it is missing or behind."""
        metrics = self.metrics()
        try:
            current = read_metrics(self.run_dir)
        except ReportError:
            current = None
        if current != metrics:
            write_metrics(self.run_dir, metrics)
        return metrics

    # ---- the loop ------------------------------------------------------------------------
    def _loop(self) -> dict[str, Any]:
        self.epoch_log = EpochLog(self.run_dir, self.state.finished)
        epochs = max(1, self.cfg.train.epochs)
        self.tracking = open_tracking(self.cfg.tracking, self.run_dir, self.run_id,
                                      self.cfg.name, epochs, self.state.finished * epochs)
        self.collector = Collector()
        ok = False
        try:
            self.tracking.params(self.state.config)
            if self.state.finished < len(self.tasks):
                work = self.run_dir / WORK
                p = self.progress
                with SearchService(log_file=self.run_dir / RAY_LOG, on_start=p.on_search_start,
                                   on_child=p.on_search_child,
                                   on_end=p.on_search_end) as self.searcher, \
                        self.strategy.session(work):
                    for i in range(self.state.finished, len(self.tasks)):
                        self._learn(i)
            metrics = self.metrics()  # also when a kill fell between checkpoint and this
            write_metrics(self.run_dir, metrics)
            self._hand_over()
            ok = True
        finally:
            self.tracking.close(ok)
        return metrics

    def _hand_over(self) -> None:
        """The finished run's files (and its report) to MLflow and W&B."""
        t = self.cfg.tracking
        if not (t.artifacts and (t.mlflow is not None or t.wandb is not None)):
            return
        if self.report is not None:
            try:
                self.report(self.run_dir)
            except Exception as exc:  # noqa: BLE001 (the run is done; its report is extra)
                log.warning("the report for the trackers failed (%s: %s); `growth report %s` "
                            "writes it", type(exc).__name__, exc, self.run_dir)
        self.tracking.finish(self.run_dir)

    def _ctx(self, task: Task) -> Context:
        seen = [t for t in self.tasks if t.index < task.index]
        return Context(self.model, task, seen, self.head_of, self.label_of, self.device,
                       seed=task_seed(self.cfg.seed, task.index),
                       workdir=self.run_dir / WORK / f"task_{task.index:03d}",
                       searcher=self.searcher, scenario=self.cfg.scenario)

    def _learn(self, i: int) -> None:
        task = self.tasks[i]
        reset_peak_rss()
        self.progress.on_task_start(i, task)
        log.info("task %d (%s): %d train / %d val / %d test samples", i, task.name,
                 len(task.train[1]), len(task.val[1]), len(task.test[1]))
        ctx = self._ctx(task)
        torch.manual_seed(ctx.seed)  # dropout and any hook's draws start from the task's seed
        self._val_time = 0.0
        start = time.perf_counter()
        losses = learn_task(ctx, self.strategy, self.cfg.train, seed=ctx.seed,
                            on_epoch=lambda e, loss: self._epoch(ctx, e, loss))
        wall = time.perf_counter() - start - self._val_time  # training time only
        if len(task.val[1]):
            log.info("task %d validation accuracy %.4f", i, evaluate(ctx, task, "val",
                                                                     strategy=self.strategy))
        for j, other in enumerate(self.tasks):
            self.state.R.record(i + 1, j, evaluate(ctx, other, self.split,
                                                   strategy=self.strategy))
        self.state.wall_time_s.append(wall)
        self.state.sizes.append({"task": i, **self._size(), **self._memory()})
        self.state.peak_rss_bytes.append(peak_rss_bytes())
        self.save_checkpoint(i)
        self.collector.between_tasks()  # tasks' garbage in reference cycles
        metrics = self.metrics()
        write_metrics(self.run_dir, metrics)
        log.info("task %d done in %.1fs, final loss %.4f; R[%d] = %s; ACC so far %.4f", i,
                 wall, losses[-1] if losses else float("nan"), i + 1,
                 self.state.R.row(i + 1).round(4).tolist(), metrics["acc"] or float("nan"))
        self.tracking.task_done(i, metrics)
        self.progress.on_task_end(i, metrics)

    def save_checkpoint(self, task: int) -> Saved:
        """The checkpoint after `task`; then the strategy reads its per-task tensors from the
        files just written (`Strategy.offload`), and checkpoints beyond `checkpoints.keep`
        go with the tensor files only they named."""
        saved = write_checkpoint(self.run_dir, task, self.model.graph, self.strategy,
                                 self.state, self.run_id)
        self.strategy.offload(saved.tensors)
        removed = apply_retention(self.run_dir, self.cfg.checkpoints.keep, saved)
        if removed:
            folders = sum(1 for p in removed if p.is_relative_to(self.run_dir / CHECKPOINTS))
            log.info("checkpoints.keep %d: removed %d checkpoint(s) and %d tensor file(s)",
                     self.cfg.checkpoints.keep, folders, len(removed) - folders)
        return saved

    def _epoch(self, ctx: Context, epoch: int, loss: float) -> None:
        """After each epoch: log the loss and the validation accuracy of the network as it
        trains (the task's head; every module's train/eval mode is put back as it was)."""
        start = time.perf_counter()
        task = ctx.task
        val = float("nan")
        if len(task.val[1]):
            modes = [(m, m.training) for m in ctx.model.module.modules()]
            try:
                val = evaluate(ctx, task, "val")
            finally:
                for m, mode in modes:
                    m.train(mode)
        self.epoch_log.epoch(task.index, task.name, epoch, loss, val)
        self.tracking.epoch(task.index, epoch, loss, val)
        self._val_time += time.perf_counter() - start
        self.progress.on_epoch(task.index, epoch, loss)

    def _size(self) -> dict[str, Any]:
        """Trunk, heads and the strategy's stored parts (masks, adapters), relative to the
        base network (`Strategy.size_parts`)."""
        if self._base_bytes is None:
            self._base_bytes = sum(p.numel() * p.element_size()
                                   for p in compile_graph(self.base).parameters())
        return size_report(self.strategy.size_parts(self.model), self.state.base_params,
                           self._base_bytes)

    def _memory(self) -> dict[str, int]:
        """Old data the strategy keeps (replay memory, generator): memory_samples,
        memory_bytes, ...; apart from model size, absent for strategies that keep none."""
        report = self.strategy.memory_report()
        return {f"memory_{k}": v for k, v in (report or {}).items()}

    def metrics(self) -> dict[str, Any]:
        run = {"name": self.cfg.name, "strategy": self.cfg.strategy.name, "seed": self.cfg.seed,
               "stream": self.cfg.data.stream, "dataset": self.cfg.data.dataset,
               "scenario": self.cfg.scenario}
        if self.split != "test":
            run["evaluated_on"] = self.split
        report = self.strategy.run_report()
        metrics = make_metrics(run, [t.name for t in self.tasks], self.state.R,
                               self.state.sizes, self.state.wall_time_s,
                               peak_rss_bytes=self.state.peak_rss_bytes,
                               search=report.get("search"), config=self.state.config)
        if report.get("details"):
            metrics["details"] = report["details"]
        metrics["storage"] = self._storage()
        return metrics

    def _storage(self) -> dict[str, int]:
        """What the run takes on disk: all of it but the files being rewritten (metrics, the
        lock), its newest checkpoint (folder and the tensor files it names), the checkpoints
        kept and the tensor files."""
        folders = checkpoint_folders(self.run_dir)
        newest = folders[max(folders)] if folders else None
        busy = sum(disk_bytes(self.run_dir / n) for n in (METRICS_JSON, METRICS_CSV, LOCK))
        return {"run_bytes": disk_bytes(self.run_dir) - busy,
                "checkpoint_bytes": checkpoint_bytes(newest) if newest else 0,
                "checkpoints": len(folders),
                "tensor_files": len(tensor_store(self.run_dir).files())}

    def _check_same_config(self, ckpt: Checkpoint) -> None:
        """Every key but the trackers' and retention's (they do not change results; runs
        started before `tracking:` existed hold a top-level `tensorboard`)."""
        now = self._resolved().to_dict()
        old = {k: v for k, v in ckpt.state.config.items() if k not in UNCHECKED}
        now = {k: v for k, v in now.items() if k not in UNCHECKED}
        changed = sorted(_diff(old, now))
        if changed:
            raise ConfigError(f"{self.run_dir / CONFIG} changed since the run started "
                              f"(keys: {', '.join(changed)}; the checkpoint {ckpt.path.name} "
                              "has the old values); put them back to resume, or start a new "
                              "run with the new config")

    def _resolved(self) -> Config:
        """The config with the strategy's defaults written out."""
        data = self.cfg.to_dict()
        data["strategy"] = {"name": self.cfg.strategy.name,
                            **self.strategy.params.model_dump(mode="json", by_alias=True)}
        return Config.model_validate(data)


def without_test(task: Task) -> Task:
    """The task with an empty test split, made from its validation split (the test split is
    not touched)."""
    x, y = task.val
    none = torch.zeros(0, dtype=torch.int64)
    return replace(task, test=(take(x, none), y[none]))


def _diff(a: Any, b: Any, prefix: str = "") -> set[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: set[str] = set()
        for k in set(a) | set(b):
            out |= _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return set() if a == b else {prefix.rstrip(".")}


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"--out {path}: cannot create the folder ({exc.strerror})") from None


def run_config(path: str | Path, out: str | Path, overrides: list[str] | None = None,
               progress: Progress | None = None,
               report: Callable[[Path], Any] | None = None) -> dict[str, Any]:
    """Load a config and run it into `out` (`report`: see Campaign)."""
    return Campaign(load_config(path, overrides), out, progress, report).start()


def run_config_of(run_dir: str | Path) -> Config:
    """The config a run directory was started with."""
    check_run_dir(Path(run_dir))
    return load_config(Path(run_dir) / CONFIG)


def resume_run(run_dir: str | Path, progress: Progress | None = None,
               report: Callable[[Path], Any] | None = None) -> dict[str, Any]:
    """Continue a run from its last finished task, with the config it was started with."""
    return Campaign(run_config_of(run_dir), run_dir, progress, report).resume()
