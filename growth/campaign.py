"""A campaign: one strategy over one task stream, with a run directory that survives a crash.

Run directory:
  config.yaml            the resolved config (defaults filled in)
  log.txt                what happened, task by task
  metrics.json / .csv    R matrix, ACC/BWT/FWT, sizes, wall times (rewritten after every task)
  checkpoints/task_NNN/  graph (structure.json + weights.safetensors), strategy state,
                         campaign state, and a manifest of SHA-256 sums checked on resume

Each task starts from a seed derived from (config seed, task index), never from the random
state the previous task left behind, so a resumed run ends with the same R matrix as an
uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from growth.config import Config, dump_config, load_config
from growth.data import Task, build_stream
from growth.errors import CheckpointError, ConfigError, GraphError
from growth.graph import NetGraph
from growth.io import atomic_write_text, load_tensors, sha256
from growth.metrics import RMatrix, make_metrics, size_report, write_metrics
from growth.model import Model
from growth.strategies import Context, Strategy, make_strategy
from growth.train import evaluate, learn_task

log = logging.getLogger("growth.campaign")
CHECKPOINTS = "checkpoints"


@dataclass
class Progress:
    """Callbacks a front end (the CLI's progress bar) can hook into; all optional."""

    on_task_start: Callable[[int, Task], None] = lambda i, t: None
    on_epoch: Callable[[int, int, float], None] = lambda task, epoch, loss: None
    on_task_end: Callable[[int, dict[str, Any]], None] = lambda i, m: None


@dataclass
class CampaignState:
    """What a checkpoint must restore besides the graph and the strategy."""

    R: RMatrix
    sizes: list[dict[str, Any]] = field(default_factory=list)
    wall_time_s: list[float] = field(default_factory=list)
    base_params: int = 0
    config: dict[str, Any] = field(default_factory=dict)  # resolved config the run began with

    @property
    def finished(self) -> int:
        """Tasks learned so far (each finished task records its wall time)."""
        return len(self.wall_time_s)


def task_seed(seed: int, task: int) -> int:
    return (seed * 1_000_003 + task * 7919 + 17) % (2**31 - 1)


def build_base_graph(cfg: Config, tasks: list[Task]) -> NetGraph:
    """The base network with its heads: one per task, or one shared head (class scenario)."""
    from search_spaces.networks import add_head, mlp, small_cnn

    m = cfg.model
    shape = tasks[0].input_shape
    if m.kind == "mlp":
        g = mlp(shape, m.hidden, activation=m.activation, batchnorm=m.batchnorm,
                dropout=m.dropout)
    else:
        g = small_cnn(shape, m.channels, batchnorm=m.batchnorm, activation=m.activation,
                      fc=m.fc, dropout=m.dropout)
    if cfg.scenario == "class":
        total = max(t.class_offset + t.n_classes for t in tasks)
        return add_head(g, "all", total)
    for t in tasks:
        g = add_head(g, head_name(t), t.n_classes)
    return g


def head_name(task: Task) -> str:
    return f"t{task.index}"


def _labelers(cfg: Config) -> tuple[Callable[[Task], str], Callable[[Task, torch.Tensor],
                                                                    torch.Tensor]]:
    if cfg.scenario == "class":
        return (lambda t: "all"), (lambda t, y: y + t.class_offset)
    return head_name, (lambda t, y: y)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but no CUDA device is available; "
                          "use device: cpu or auto")
    return torch.device(name)


class Campaign:
    """Runs (or resumes) one config into one run directory."""

    def __init__(self, cfg: Config, run_dir: str | Path, progress: Progress | None = None
                 ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.progress = progress or Progress()
        self.device = resolve_device(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.tasks = build_stream(self._stream_args())
        if cfg.scenario == "class" and cfg.data.stream != "split":
            raise ConfigError("scenario: class needs data.stream: split (disjoint classes); "
                              "use scenario: task for permuted or variations streams")
        self.head_of, self.label_of = _labelers(cfg)
        self.strategy: Strategy = make_strategy(cfg.strategy.name, cfg.strategy.settings())
        torch.manual_seed(cfg.seed)  # the base network's initial weights
        try:  # a model section the data cannot feed is a config error, found before any write
            self.base = build_base_graph(cfg, self.tasks)
        except GraphError as exc:
            raise ConfigError(f"model: {exc} (input shape {self.tasks[0].input_shape})"
                              ) from None
        if self.device.type == "cuda":  # bitwise-equal resumes need deterministic kernels
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False

    def _stream_args(self) -> dict[str, Any]:
        return {**self.cfg.data.model_dump(), "seed": self.cfg.seed}

    # ---- entry points ----------------------------------------------------------------------
    def start(self) -> dict[str, Any]:
        if latest_checkpoint(self.run_dir) is not None:
            raise ConfigError(f"{self.run_dir} already holds a run; continue it with "
                              f"`growth resume {self.run_dir}` or choose another --out")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resolved = self._resolved()
        atomic_write_text(self.run_dir / "config.yaml", dump_config(resolved))
        self.model = Model(self.base, self.device)
        base = self.base.param_count()
        self.state = CampaignState(RMatrix(len(self.tasks)), base_params=base,
                                   config=resolved.to_dict())
        log.info("campaign %r: strategy %s on %s/%s, %d tasks, %s scenario; base network %d "
                 "parameters", self.cfg.name, self.cfg.strategy.name, self.cfg.data.dataset,
                 self.cfg.data.stream, len(self.tasks), self.cfg.scenario, base)
        for j, task in enumerate(self.tasks):
            self.state.R.record(0, j, evaluate(self._ctx(task), task,
                                                strategy=self.strategy))
        log.info("R[0] (random init): %s", self.state.R.row(0).round(4).tolist())
        return self._loop()

    def resume(self) -> dict[str, Any]:
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            log.info("no finished task in %s; starting from the beginning", self.run_dir)
            return self.start()
        graph, tensors, extra, state = read_checkpoint(ckpt)
        self._check_same_config(state.config)
        self.model = Model(graph, self.device)
        self.strategy.load_state_dict(tensors, extra)
        self.state = state
        log.info("resuming after task %d from %s", state.finished - 1, ckpt)
        return self._loop()

    # ---- the loop ------------------------------------------------------------------------
    def _loop(self) -> dict[str, Any]:
        for i in range(self.state.finished, len(self.tasks)):
            self._learn(i)
        metrics = self.metrics()
        write_metrics(self.run_dir, metrics)  # also when a kill fell between checkpoint and this
        return metrics

    def _ctx(self, task: Task) -> Context:
        seen = [t for t in self.tasks if t.index < task.index]
        return Context(self.model, task, seen, self.head_of, self.label_of, self.device,
                       seed=task_seed(self.cfg.seed, task.index))

    def _learn(self, i: int) -> None:
        task = self.tasks[i]
        self.progress.on_task_start(i, task)
        log.info("task %d (%s): %d train / %d val / %d test samples", i, task.name,
                 len(task.train[1]), len(task.val[1]), len(task.test[1]))
        ctx = self._ctx(task)
        torch.manual_seed(ctx.seed)  # dropout and any hook's draws start from the task's seed
        start = time.perf_counter()
        losses = learn_task(ctx, self.strategy, self.cfg.train, seed=ctx.seed,
                            on_epoch=lambda e, loss: self.progress.on_epoch(i, e, loss))
        wall = time.perf_counter() - start
        if len(task.val[1]):
            log.info("task %d validation accuracy %.4f", i, evaluate(ctx, task, "val",
                                                                     strategy=self.strategy))
        for j, other in enumerate(self.tasks):
            self.state.R.record(i + 1, j, evaluate(ctx, other, strategy=self.strategy))
        self.state.wall_time_s.append(wall)
        self.state.sizes.append({"task": i, **self._size()})
        write_checkpoint(self.run_dir, i, self.model.graph, self.strategy, self.state)
        metrics = self.metrics()
        write_metrics(self.run_dir, metrics)
        log.info("task %d done in %.1fs, final loss %.4f; R[%d] = %s; ACC so far %.4f", i,
                 wall, losses[-1] if losses else float("nan"), i + 1,
                 self.state.R.row(i + 1).round(4).tolist(), metrics["acc"] or float("nan"))
        self.progress.on_task_end(i, metrics)

    def _size(self) -> dict[str, Any]:
        params = self.model.named_parameters()
        trunk = set(self.model.trunk_parameter_names())
        groups = {
            "trunk": [p for n, p in params.items() if n in trunk],
            "heads": [p for n, p in params.items() if n not in trunk],
            "extra": list(self.strategy.size_tensors()),
        }
        return size_report(groups, self.state.base_params)

    def metrics(self) -> dict[str, Any]:
        run = {"name": self.cfg.name, "strategy": self.cfg.strategy.name, "seed": self.cfg.seed,
               "stream": self.cfg.data.stream, "dataset": self.cfg.data.dataset,
               "scenario": self.cfg.scenario}
        return make_metrics(run, [t.name for t in self.tasks], self.state.R, self.state.sizes,
                            self.state.wall_time_s)

    def _check_same_config(self, started: dict[str, Any]) -> None:
        now = self._resolved().to_dict()
        changed = sorted(_diff(started, now))
        if started and changed:
            raise ConfigError(f"{self.run_dir / 'config.yaml'} changed since the run started "
                              f"(keys: {', '.join(changed)}); put the old values back to resume,"
                              " or start a new run with the new config")

    def _resolved(self) -> Config:
        """The config with the strategy's defaults written out."""
        data = self.cfg.to_dict()
        data["strategy"] = {"name": self.cfg.strategy.name,
                            **self.strategy.params.model_dump(mode="json", by_alias=True)}
        return Config.model_validate(data)


def _diff(a: Any, b: Any, prefix: str = "") -> set[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: set[str] = set()
        for k in set(a) | set(b):
            out |= _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return set() if a == b else {prefix.rstrip(".")}


# ---- checkpoints --------------------------------------------------------------------------
def latest_checkpoint(run_dir: Path) -> Path | None:
    folder = run_dir / CHECKPOINTS
    if not folder.is_dir():
        return None
    done = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("task_"))
    return done[-1] if done else None


def write_checkpoint(run_dir: Path, task: int, graph: NetGraph, strategy: Strategy,
                     state: CampaignState) -> Path:
    """Write the checkpoint into a temp folder, then rename it into place (atomic)."""
    from safetensors.torch import save_file

    final = run_dir / CHECKPOINTS / f"task_{task:03d}"
    tmp = run_dir / CHECKPOINTS / f".tmp_task_{task:03d}"
    shutil.rmtree(tmp, ignore_errors=True)
    graph.save(tmp / "graph")
    tensors, extra = strategy.state_dict()
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
              str(tmp / "strategy.safetensors"))
    campaign = {"R": state.R.to_list(), "sizes": state.sizes,
                "wall_time_s": state.wall_time_s, "base_params": state.base_params,
                "config": state.config, "strategy_extra": extra}
    (tmp / "state.json").write_text(json.dumps(campaign, indent=1))
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {str(p.relative_to(tmp)): sha256(p) for p in files}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def read_checkpoint(ckpt: Path) -> tuple[NetGraph, dict[str, torch.Tensor], dict[str, Any],
                                         CampaignState]:
    """Load and verify a checkpoint; any damage is a CheckpointError naming the file."""
    manifest_path = ckpt / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{manifest_path} is missing or corrupt ({exc}); the checkpoint "
                              f"{ckpt} cannot be trusted") from None
    for rel, digest in manifest.items():
        path = ckpt / rel
        if not path.is_file():
            raise CheckpointError(f"{path} is missing from the checkpoint")
        if sha256(path) != digest:
            raise CheckpointError(f"{path} is corrupt (its SHA-256 does not match the manifest)")
    graph = NetGraph.load(ckpt / "graph")
    tensors = load_tensors(ckpt / "strategy.safetensors")
    data = json.loads((ckpt / "state.json").read_text())
    state = CampaignState(RMatrix.from_list(data["R"]), data["sizes"], data["wall_time_s"],
                          data["base_params"], data.get("config", {}))
    return graph, tensors, data.get("strategy_extra", {}), state


def run_config(path: str | Path, out: str | Path, overrides: list[str] | None = None,
               progress: Progress | None = None) -> dict[str, Any]:
    """Load a config and run it into `out`."""
    return Campaign(load_config(path, overrides), out, progress).start()


def run_config_of(run_dir: str | Path) -> Config:
    """The config a run directory was started with."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml)")
    return load_config(path)


def resume_run(run_dir: str | Path, progress: Progress | None = None) -> dict[str, Any]:
    """Continue a run from its last finished task, with the config it was started with."""
    return Campaign(run_config_of(run_dir), run_dir, progress).resume()
