"""Helpers for the tests of the architecture-changing strategies (Learn to Grow, DEN, Progress &
Compress, Expert Gate, RCL): tiny networks with one head per task, synthetic tasks, contexts, a
learning loop over tasks and a tiny campaign config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from growth.search_spaces.networks import add_head, mlp, small_cnn

from growth.campaign import Campaign, resume_run
from growth.config import load_config
from growth.data.containers import Task
from growth.graph import NetGraph
from growth.model import Model
from growth.strategies import Context, Strategy, make_strategy
from growth.train import TrainConfig, learn_task

CFG = TrainConfig(epochs=2, batch_size=8, lr=0.05, momentum=0.9)


def with_heads(trunk: NetGraph, n: int = 3, classes: int = 3) -> NetGraph:
    for i in range(n):
        trunk = add_head(trunk, f"t{i}", classes)
    return trunk


def mlp_net(n: int = 3, hidden: tuple[int, ...] = (6, 5), classes: int = 3,
            shape: tuple[int, ...] = (1, 4, 4), seed: int = 0) -> NetGraph:
    torch.manual_seed(seed)
    return with_heads(mlp(shape, list(hidden)), n, classes)


def cnn_net(n: int = 3) -> NetGraph:
    torch.manual_seed(0)
    return with_heads(small_cnn((2, 8, 8), [3, 4], batchnorm=True, fc=[6]), n)


def tasks_for(graph: NetGraph, n_tasks: int = 3, n: int = 48, seed: int = 0,
              classes: int = 3) -> list[Task]:
    """Inputs in [0, 1] labelled by a random linear teacher per task; train, val and test
    splits of n/2, n/4 and n/4 samples."""
    gen = torch.Generator().manual_seed(seed)
    shape = graph.shape(graph.input_node())
    out = []
    for i in range(n_tasks):
        x = torch.rand((n, *shape), generator=gen)
        w = torch.randn(x[0].numel(), classes, generator=gen)
        y = ((x.flatten(1) - 0.5) @ w).argmax(1)
        a, b = n // 2, 3 * n // 4
        out.append(Task(i, f"t{i}", (x[:a], y[:a]), (x[a:b], y[a:b]), (x[b:], y[b:]),
                        list(range(classes)), classes, 0, tuple(shape)))
    return out


def digit_tasks(n_tasks: int = 3, per_task: int = 300, stream: str = "permuted",
                seed: int = 0) -> list[Task]:
    """A stream of the bundled 8x8 digits (no download), `per_task` training images a task."""
    from growth.data import build_stream

    return build_stream({"dataset": "digits", "stream": stream, "n_tasks": n_tasks,
                         "max_train_per_task": per_task, "seed": seed})


def digit_net(n: int = 3, hidden: tuple[int, ...] = (32, 16), classes: int = 10,
              seed: int = 0) -> NetGraph:
    return mlp_net(n, hidden, classes, (1, 8, 8), seed)


def ctx_for(model: Model, tasks: list[Task], i: int, strategy: Strategy | None = None
            ) -> Context:
    ctx = Context(model, tasks[i], tasks[:i], lambda t: f"t{t.index}", lambda t, y: y,
                  torch.device("cpu"), seed=100 + i)
    ctx.strategy = strategy
    return ctx


def learn_all(strategy: Strategy | str, graph: NetGraph, tasks: list[Task],
              cfg: TrainConfig = CFG, params: dict | None = None,
              upto: int | None = None) -> tuple[Model, Strategy, list[dict[int, torch.Tensor]]]:
    """Learn the tasks in turn (through `learn_task`); returns the model, the strategy and,
    after each task, every finished task's test scores through the strategy's evaluation."""
    s = make_strategy(strategy, params) if isinstance(strategy, str) else strategy
    model = Model(graph)
    scores: list[dict[int, torch.Tensor]] = []
    for i in range(len(tasks) if upto is None else upto):
        ctx = ctx_for(model, tasks, i)
        torch.manual_seed(ctx.seed)
        learn_task(ctx, s, cfg, seed=ctx.seed)
        scores.append(evaluate_all(model, s, tasks, i))
    return model, s, scores


def evaluate_all(model: Model, s: Strategy, tasks: list[Task], i: int
                 ) -> dict[int, torch.Tensor]:
    """Test scores of tasks 0..i through the strategy's evaluation, in eval mode."""
    out = {}
    model.eval()
    for task in tasks[:i + 1]:
        ctx = ctx_for(model, tasks, i)
        with torch.no_grad(), s.evaluation(ctx, task) as score:
            out[task.index] = score(task.test[0]).clone()
    model.train()
    return out


TINY: dict[str, Any] = {
    "name": "rivals", "seed": 1, "threads": 1,
    "data": {"dataset": "digits", "stream": "permuted", "n_tasks": 3, "max_train_per_task": 200},
    "model": {"kind": "mlp", "hidden": [16, 12]},
    "train": {"epochs": 2, "batch_size": 32, "lr": 0.05},
}


def write_config(path: Path, strategy: dict[str, Any], **changes: Any) -> Path:
    cfg = json.loads(json.dumps(TINY))
    cfg.update(changes)
    cfg["strategy"] = strategy
    path.write_text(yaml.safe_dump(cfg))
    return path


def resumed_equals_full(tmp_path: Path, strategy: dict[str, Any], **changes: Any
                        ) -> tuple[dict, dict]:
    """Run a tiny campaign to the end, and again with its last two checkpoints removed and
    resumed; returns both metrics."""
    cfg = write_config(tmp_path / "c.yaml", strategy, **changes)
    full = Campaign(load_config(cfg), tmp_path / "full").start()
    part = tmp_path / "part"
    Campaign(load_config(cfg), part).start()
    for name in ("task_001", "task_002"):
        shutil.rmtree(part / "checkpoints" / name)
    return full, resume_run(part)
