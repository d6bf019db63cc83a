"""One search trial: rebuild a child from its parent by reference, train it, save it.

Everything a trial receives is a reference or plain JSON: the parent is a graph folder
(`NetGraph.save`), the calling strategy is a name, its settings and a folder with its saved
state, and the child is the list of actions that build it from the parent (`SearchSpace.apply`).
A parent folder may also hold the strategy's state in the parent's shapes (STRATEGY_TENSORS,
STRATEGY_JSON) and the optimizer's moments (MOMENTS): a child then starts from both, carried
through its actions' change records, and saves its own beside its weights, so a later
generation that grows from it starts from its state, not the first parent's.
The only data a trial sees is the current task's training and validation splits (shared once
through Ray's object store); earlier tasks reach it as metadata, never as data.

`train_child` is the body, also called in-process (benchmarks, tests); `tune_trial` is the
Ray Tune function trainable around it, which reports the child's weights as the trial's
checkpoint. A child that cannot be built or trained (an operator refuses an action, the loss
diverges, a strategy raises) is reported as failed with its error, not raised, so one bad
child never costs a retry or stops the search; retries are left for failures of the trial's
process or node.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from growth.data import Task
from growth.devices import DEVICE_PATTERN, resolve_device
from growth.errors import CheckpointError, DivergedError
from growth.graph import NetGraph
from growth.io import atomic_write_text, load_tensors
from growth.model import Model
from growth.optim import load_moments, moments
from growth.scenarios import labelers
from growth.strategies import Context, Strategy, make_strategy
from growth.train import TrainConfig, evaluate, fit, make_optimizer

CHILD_FILE = "child.json"  # a child folder's record (next to structure.json, weights.safetensors)
STRATEGY_TENSORS = "strategy.safetensors"
STRATEGY_JSON = "strategy.json"
MOMENTS = "optimizer.safetensors"  # the optimizer's moments by parameter (growth.optim.moments)


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StrategyRef(_Spec):
    """The loss a child trains with: a strategy by name and settings, its state by path."""

    name: str = "finetune"
    params: dict[str, Any] = Field(default_factory=dict)
    state: str | None = None  # folder written by save_strategy_state (None: a fresh strategy)


class TaskMeta(_Spec):
    """What a trial knows of an earlier task: its identity and classes, never its data."""

    index: int
    name: str
    classes: list[int]
    n_classes: int
    class_offset: int
    input_shape: list[int]

    @classmethod
    def of(cls, task: Task) -> TaskMeta:
        return cls(index=task.index, name=task.name, classes=list(task.classes),
                   n_classes=task.n_classes, class_offset=task.class_offset,
                   input_shape=list(task.input_shape))

    def task(self) -> Task:
        """A Task with these fields and empty splits."""
        shape = tuple(self.input_shape)
        empty = (torch.zeros((0, *shape)), torch.zeros(0, dtype=torch.int64))
        return Task(self.index, self.name, empty, empty, empty, list(self.classes),
                    self.n_classes, self.class_offset, shape)


class TrialSpec(_Spec):
    """How every child of one search is trained (plain JSON; travels in each trial's config)."""

    train: TrainConfig = Field(default_factory=TrainConfig)
    strategy: StrategyRef = Field(default_factory=StrategyRef)
    scenario: Literal["task", "class", "domain"] = "task"  # growth.scenarios
    seen: list[TaskMeta] = Field(default_factory=list)  # earlier tasks, oldest first
    device: str = Field("cpu", pattern=DEVICE_PATTERN)  # cpu | cuda | cuda:N | auto
    threads: int = Field(1, ge=1)  # torch threads: the trial's CPUs
    sample_size: int = Field(256, ge=1)  # training inputs given to actions that need a batch


def save_strategy_state(strategy: Strategy, folder: str | Path) -> Path:
    """Write a strategy's state where trials read it (`StrategyRef.state`)."""
    from safetensors.torch import save_file

    from growth.io import atomic_write

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, extra = strategy.state_dict()
    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(folder / STRATEGY_TENSORS, lambda p: save_file(flat, str(p)))
    atomic_write_text(folder / STRATEGY_JSON, json.dumps({"name": strategy.name,
                                                          "extra": extra}))
    return folder


def save_moments(optimizer: torch.optim.Optimizer | None,
                 params: Mapping[str, torch.nn.Parameter], folder: str | Path) -> None:
    """Write an optimizer's moments beside a graph folder (nothing without an optimizer)."""
    if optimizer is None:
        return
    from safetensors.torch import save_file

    from growth.io import atomic_write

    flat = {k: v.detach().cpu().contiguous() for k, v in moments(optimizer, params).items()}
    atomic_write(Path(folder) / MOMENTS, lambda p: save_file(flat, str(p)))


def load_strategy(ref: StrategyRef, parent: Path | None = None) -> Strategy:
    """The strategy a reference names, with its saved state loaded: the state in the parent's
    folder when it holds one (a child of a later generation), else the reference's."""
    strategy = make_strategy(ref.name, ref.params)
    if parent is not None and (parent / STRATEGY_JSON).is_file():
        return _load_state(strategy, ref.name, parent, str(parent))
    if ref.state is None:
        return strategy
    with local_folder(ref.state) as folder:
        return _load_state(strategy, ref.name, folder, ref.state)


def _load_state(strategy: Strategy, name: str, folder: Path, shown: str) -> Strategy:
    try:
        saved = json.loads((folder / STRATEGY_JSON).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{shown}/{STRATEGY_JSON} is missing or corrupt ({exc})"
                              ) from None
    if saved.get("name") != name:
        raise CheckpointError(f"{shown} holds the state of strategy {saved.get('name')!r}, "
                              f"not {name!r}")
    strategy.load_state_dict(load_tensors(folder / STRATEGY_TENSORS), saved.get("extra", {}))
    return strategy


@contextmanager
def local_folder(ref: str | Path) -> Iterator[Path]:
    """A folder named by a path, or by a URI (s3://, gs://, ...) fetched into a temporary one."""
    if "://" not in str(ref):
        yield Path(ref)
        return
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(str(ref))
    with tempfile.TemporaryDirectory(prefix="growth-ref-") as tmp:
        pafs.copy_files(path, tmp, source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())
        yield Path(tmp)


def child_seed(seed: int, generation: int, index: int) -> int:
    """Each child's own seed, so its training does not depend on where or when it runs."""
    return (seed * 1_000_003 + generation * 7919 + index * 104_729 + 11) % (2**31 - 1)


def trial_data(task: Task) -> Task:
    """The part of a task that trials receive: training and validation splits only."""
    x, y = task.test
    return replace(task, test=(x[:0], y[:0]))


def train_child(config: Mapping[str, Any], task: Task, space: Any, out: str | Path,
                node: str | None = None) -> dict[str, Any]:
    """Rebuild the child `config` describes, train it on `task`, save it into folder `out`.

    config: key, generation, index, attempt, parent (graph folder), actions, arch, seed and
    spec (a TrialSpec as JSON). Returns flat metrics: status ("ok" | "failed"), val_acc,
    val_acc_before (the child before training: its parent's accuracy when the actions keep
    the function), params, train_time_s, steps, epochs, start, end, error, node (where it
    ran). On success `out` holds the child's graph and CHILD_FILE (these metrics with the
    config's identity).
    """
    spec = TrialSpec.model_validate(config["spec"])
    torch.set_num_threads(spec.threads)
    start = time.time()
    metrics: dict[str, Any] = {"status": "failed", "val_acc": float("nan"),
                               "val_acc_before": float("nan"), "params": 0,
                               "train_time_s": 0.0, "steps": 0, "epochs": 0, "error": ""}
    try:
        metrics.update(_build_and_train(config, spec, task, space, Path(out)))
        metrics["status"] = "ok"
    except Exception as exc:  # a bad child is a result, not a crash (see module docstring)
        metrics["error"] = _one_line(exc)
    metrics.update(start=start, end=time.time(), node=node, key=config["key"])
    if metrics["status"] == "ok":
        record = {**identity(config), **metrics}
        atomic_write_text(Path(out) / CHILD_FILE, json.dumps(record, indent=1))
    return metrics


def identity(config: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a trial config that name the child (they go into its record)."""
    out = {k: config[k] for k in ("key", "generation", "index", "attempt", "arch", "actions")}
    out["lineage"] = [*config.get("lineage", []), list(config["actions"])]
    return out


def _build_and_train(config: Mapping[str, Any], spec: TrialSpec, task: Task, space: Any,
                     out: Path) -> dict[str, Any]:
    device = resolve_device(spec.device)
    seed = int(config["seed"])
    with local_folder(config["parent"]) as folder:
        parent = NetGraph.load(folder)
        strategy = load_strategy(spec.strategy, folder)
        saved_moments = load_tensors(folder / MOMENTS) if (folder / MOMENTS).is_file() else None
    torch.manual_seed(seed)
    child, records = space.apply(parent, list(config["actions"]),
                                 sample=task.train[0][:spec.sample_size])
    head_of, label_of = labelers(spec.scenario)
    ctx = Context(Model(parent, device), task, [m.task() for m in spec.seen], head_of,
                  label_of, device, seed=seed, strategy=strategy, train_config=spec.train)
    if saved_moments is not None:  # go on from the parent's moments (they follow the records)
        params = ctx.model.named_parameters()
        ctx.optimizer = make_optimizer(list(params.values()), spec.train)
        load_moments(ctx.optimizer, params, saved_moments)
    ctx.replace_graph(child, records)  # the strategy's state and the moments follow
    before = evaluate(ctx, task, "val", strategy=strategy)
    _warm_up()
    t0 = time.perf_counter()
    losses = fit(ctx, strategy, spec.train, seed=seed, optimizer=ctx.optimizer)
    train_time = time.perf_counter() - t0
    acc = evaluate(ctx, task, "val", strategy=strategy)
    if not math.isfinite(acc):
        raise DivergedError(f"the child's validation accuracy is {acc} (an empty validation "
                            "split? set data.val_fraction above 0)")
    graph = ctx.model.graph
    graph.save(out)
    save_strategy_state(strategy, out)  # a later generation grows from this child's state
    save_moments(ctx.optimizer, ctx.model.named_parameters(), out)
    batches = sum(math.ceil(len(t.train[1]) / spec.train.batch_size)
                  for t in strategy.train_sets(ctx))
    return {"val_acc": acc, "val_acc_before": before, "params": graph.param_count(),
            "train_time_s": train_time, "steps": batches * len(losses), "epochs": len(losses)}


def _warm_up() -> None:
    """Pay a process's one-time cost of building its first optimizer (torch imports its
    compiler stack then, seconds) before the training clock starts, so `train_time_s` is
    training alone in every trial, the first on a fresh worker included."""
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


def _one_line(exc: BaseException) -> str:
    where = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    at = f" (at {Path(where[0].filename).name}:{where[0].lineno})" if where else ""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}{at}"


def tune_trial(config: dict[str, Any], task: Task | None = None, space: Any = None) -> None:
    """The Ray Tune function trainable: train_child, then report the metrics with the child's
    graph folder as the trial's checkpoint (none for a failed child). `task` and `space` come
    once through the object store (`tune.with_parameters`)."""
    import ray
    from ray import tune

    with tempfile.TemporaryDirectory(prefix="growth-child-") as tmp:
        metrics = train_child(config, task, space, tmp,
                              node=ray.get_runtime_context().get_node_id())
        checkpoint = (tune.Checkpoint.from_directory(tmp) if metrics["status"] == "ok"
                      else None)
        tune.report(metrics, checkpoint=checkpoint)
