"""What the one training loop and every strategy share: the task's training settings and the
context hooks see.

Both `growth.train` (the loop) and `growth.strategies` (the hooks) read these, so they live
below both: the loop imports the strategies' base class and the strategies never import the
loop's settings from the loop. `Context.searcher` is the search seam (`growth.searching`): a
strategy that grows by search asks it for a search, whoever provides it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from growth.errors import ShapeError
from growth.optim import follow
from growth.remap import as_records

if TYPE_CHECKING:
    from pathlib import Path

    from growth.data import Task
    from growth.graph import NetGraph
    from growth.model import Model
    from growth.ops.registry import ChangeRecord
    from growth.searching import Searcher


class TrainConfig(BaseModel):
    """Optimisation settings for one task (validated; unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    epochs: int = Field(5, ge=0)
    batch_size: int = Field(32, ge=1)
    optimizer: str = Field("sgd", pattern="^(sgd|adam)$")
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"  # cosine: lr to 0 over the fit's steps


@dataclass
class Context:
    """What hooks see: the model, the task being learned and what came before."""

    model: Model
    task: Task
    seen: list[Task]  # tasks learned before this one, in order
    head_of: Callable[[Task], str]  # head name serving a task
    label_of: Callable[[Task, torch.Tensor], torch.Tensor]  # local labels -> head labels
    device: torch.device
    optimizer: torch.optim.Optimizer | None = None
    seed: int = 0  # the task's seed: draw any randomness a hook needs from it
    outputs: dict[str, torch.Tensor] | None = None  # this batch's heads, with extra_heads
    epoch: int = 0
    train_fit: Callable[..., Any] | None = None  # the loop itself, for strategies that retrain
    info: dict[str, Any] = field(default_factory=dict)  # per-task scratch (not checkpointed)
    strategy: Any = None  # the Strategy whose state follows graph changes (set by learn_task)
    train_config: TrainConfig | None = None  # the task's training settings (set by learn_task)
    workdir: Path | None = None  # a folder for this task's artefacts (REC's search), if any
    searcher: Searcher | None = None  # who runs architecture searches (growth.searching)
    scenario: str = "task"  # "task" (a head per task) or "class" (one head); see scenarios.py

    def replace_graph(self, graph: NetGraph,
                      records: ChangeRecord | Iterable[ChangeRecord] | None = None) -> None:
        """Swap in a grown or compressed graph; the optimizer's and the strategy's state follow.

        records: the change record of every operator that led from the current graph to
        `graph`, in order (one record, or a list for a chain such as widen, widen, prune).
        Call it between fits (before_task, after_task, or between `train_fit` calls); then
        `train_fit(optimizer=ctx.optimizer)` goes on with the carried moments instead of a
        fresh optimizer. A parameter whose shape changed with no record saying how is a
        ShapeError, before any state is touched.
        """
        records = as_records(records)
        old = self.model.named_parameters()
        shapes = {n: tuple(p.shape) for n, p in old.items()}
        self.model.replace_graph(graph)
        new = self.model.named_parameters()
        _check_covered(shapes, new, records)
        if self.optimizer is not None:
            self.optimizer = follow(self.optimizer, old, new, records)
        if self.strategy is not None:
            self.strategy.follow(self, records)


def _check_covered(old: dict[str, tuple[int, ...]], new: dict[str, torch.nn.Parameter],
                   records: list[ChangeRecord]) -> None:
    mapped = {n for r in records for n in r.index_maps}
    for name, p in new.items():
        if name in old and old[name] != tuple(p.shape) and name not in mapped:
            raise ShapeError(f"parameter {name!r} changed from {old[name]} to {tuple(p.shape)} "
                             "but no change record passed to Context.replace_graph maps it; "
                             "pass the record of every operator applied, in order")
