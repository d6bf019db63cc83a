"""`growth compress`: compress a saved network on a task of a config's stream or a dataset.

The command reads files (the network, an optional base network, a campaign config or a
dataset name) and writes the student beside the network; the compression itself is the
library's `growth.compress.compress`, which knows no file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from growth.compress import CompressParams, CompressReport, compress
from growth.context import Context, TrainConfig
from growth.data import DATASETS, Task, build_stream, load_dataset, make_stream
from growth.errors import ConfigError
from growth.graph import NetGraph
from growth.io import atomic_write_text
from growth.model import Model
from growth.scenarios import labelers


@dataclass
class _Source:
    """The task to distil on, how it maps to the network's heads, and the training settings."""

    task: Task
    seen: list[Task]
    head_of: Callable[[Task], str]
    label_of: Callable[[Task, Tensor], Tensor]
    train: TrainConfig
    seed: int


def _source(data: str, graph: NetGraph, task_index: int | None, root: str) -> _Source:
    """A campaign config (its stream, scenario and train section) or a dataset name (one task
    with every class, trained with the default settings)."""
    if Path(data).suffix in (".yaml", ".yml") or Path(data).is_file():
        from growth.config import load_config

        cfg = load_config(data)
        tasks = build_stream({**cfg.data.model_dump(), "seed": cfg.seed})
        head_of, label_of = labelers(cfg.scenario)
        train, seed = cfg.train, cfg.seed
    elif data.lower().replace("-", "_") in DATASETS:
        tasks = make_stream(load_dataset(data, root=root), "split", n_tasks=1)
        head_of, label_of = (lambda t: graph.heads[0]), (lambda t, y: y)
        train, seed = TrainConfig(lr=0.05), 0
    else:
        raise ConfigError(f"--data {data!r} is neither a config file (.yaml) nor a dataset "
                          f"name ({', '.join(DATASETS)})")
    k = len(tasks) - 1 if task_index is None else task_index
    if not 0 <= k < len(tasks):
        raise ConfigError(f"--task {task_index}: the data has tasks 0..{len(tasks) - 1}")
    if len(graph.heads) == 1 and head_of(tasks[k]) not in graph.heads:
        only = graph.heads[0]
        head_of = lambda t: only  # noqa: E731 (a one-head network serves every task)
    if head_of(tasks[k]) not in graph.heads:
        raise ConfigError(f"the network has heads {graph.heads} but task {k} needs head "
                          f"{head_of(tasks[k])!r}; pass the config the network was trained with")
    want = tuple(graph.shape(graph.input_node()))
    if tuple(tasks[k].input_shape) != want:
        raise ConfigError(f"the data's inputs have shape {tuple(tasks[k].input_shape)} but the "
                          f"network reads {want}")
    seen = [t for t in tasks[:k] if head_of(t) in graph.heads]
    return _Source(tasks[k], seen, head_of, label_of, train, seed)


def _tasks_accuracy(ctx: Context, src: _Source) -> dict[str, float]:
    """Test accuracy of every task the network serves (those before the distilled one, and
    it), through their heads: what compression keeps of each."""
    from growth.train import evaluate

    return {t.name: evaluate(ctx, t) for t in [*src.seen, src.task]}


def compress_saved(network: str, data: str, params: CompressParams, out: str | None = None,
                   base: str | None = None, task: int | None = None, root: str = "data",
                   train: dict[str, Any] | None = None) -> tuple[CompressReport, str]:
    """Load a saved network (NetGraph.save format), compress it on a task of `data` and save
    the student next to it (or to `out`) with `compress.json`; returns (report, folder)."""
    graph = NetGraph.load(network)
    base_graph = NetGraph.load(base) if base is not None else None
    src = _source(data, graph, task, root)
    cfg = src.train.model_copy(update=train or {})
    ctx = Context(Model(graph), src.task, src.seen, src.head_of, src.label_of,
                  torch.device("cpu"), seed=src.seed)
    heads = list(dict.fromkeys([src.head_of(src.task), *(src.head_of(t) for t in src.seen)]))
    before = _tasks_accuracy(ctx, src)
    torch.manual_seed(src.seed)
    report = compress(ctx, params, cfg, base=base_graph, heads=heads, seed=src.seed)
    report.tasks = {name: {"before": acc, "after": after} for (name, acc), after in
                    zip(before.items(), _tasks_accuracy(ctx, src).values())}
    folder = Path(out) if out else Path(f"{str(network).rstrip('/')}-compressed")
    report.graph.save(folder)
    summary = {"network": str(network), "base": base, "data": data, "task": src.task.name,
               "settings": params.model_dump(), **report.summary()}
    atomic_write_text(folder / "compress.json", json.dumps(summary, indent=1))
    return report, str(folder)
