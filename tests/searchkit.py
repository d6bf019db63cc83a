"""What the search tests share: a trained base network on digits, its space, a config."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from growth.search_spaces import SearchSpace, make_space
from growth.search_spaces.networks import add_head, mlp

from growth.data import Task, build_stream
from growth.graph import NetGraph
from growth.model import Model
from growth.scenarios import labelers
from growth.strategies import Context, make_strategy
from growth.train import TrainConfig, evaluate, fit

CHILD_TRAIN = TrainConfig(epochs=2, lr=0.02, batch_size=32)


def digits_task() -> Task:
    """All ten digit classes as one task (a fifth of the training pool for validation)."""
    return build_stream({"dataset": "digits", "stream": "split", "n_tasks": 1, "seed": 0,
                         "val_fraction": 0.2})[0]


def accuracy(graph: NetGraph, task: Task, split: str = "val") -> float:
    head_of, label_of = labelers("task")
    ctx = Context(Model(graph), task, [], head_of, label_of, torch.device("cpu"))
    return evaluate(ctx, task, split)


def trained_base(task: Task, folder: Path, hidden: tuple[int, ...] = (16,), epochs: int = 5
                 ) -> tuple[NetGraph, float]:
    """A small MLP trained on the task, saved into `folder`; returns it and its val acc."""
    torch.manual_seed(0)
    graph = add_head(mlp(task.input_shape, list(hidden)), "t0", task.n_classes)
    head_of, label_of = labelers("task")
    ctx = Context(Model(graph), task, [], head_of, label_of, torch.device("cpu"))
    fit(ctx, make_strategy("finetune"), TrainConfig(epochs=epochs, lr=0.05))
    graph = ctx.model.graph
    graph.save(folder)
    return graph, accuracy(graph, task)


def small_space(graph: NetGraph, exact: bool = True) -> SearchSpace:
    """Widths 16..64 on the MLP; exact: the operators keep the parent's function (no noise)."""
    noise = {"noise": 0.0, "deeper_noise": 0.0} if exact else {}
    return make_space({"widths": {"fc": [16, 24, 32, 48, 64]}, **noise}, graph)


def search_config(tmp: Path, **search: object) -> Path:
    """A `growth search` config on digits with a tiny network and budget."""
    import yaml

    cfg = {"name": "s", "seed": 0, "threads": 1,
           "data": {"dataset": "digits", "stream": "split", "n_tasks": 1, "val_fraction": 0.2},
           "model": {"kind": "mlp", "hidden": [16]},
           "train": {"epochs": 2, "lr": 0.02},
           "search": {"controller": {"name": "random", "wider_actions": 1,
                                     "deeper_actions": 1},
                      "space": {"widths": {"fc": [16, 24, 32, 48, 64]}},
                      "children": 3, "base_epochs": 5, "budget": {"generations": 2},
                      "concurrency": 2, **search}}
    path = tmp / "search.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@contextmanager
def all_children_reported() -> Iterator[None]:
    """A search that ends a generation with children unreported raises KeyboardInterrupt (a
    resume trains them), which would stop the test run rather than fail the test: inside
    this block it fails the test instead."""
    try:
        yield
    except KeyboardInterrupt as exc:
        if "unreported" not in str(exc):
            raise
        pytest.fail(f"the search stopped: {exc}")
