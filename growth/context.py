"""What the one training loop and every strategy share: the task's training settings, the
context hooks see, and the hooks the loop calls.

Both `growth.train` (the loop) and `growth.strategies` (the hooks) read these, so they live
below both: the loop knows a strategy only as `Hooks` (growth.strategies.base.Strategy gives
every hook a no-op default; `growth.distillation` implements the few it needs), and the
strategies never import the loop's settings from the loop. `Context.searcher` is the search
seam (`growth.searching`): a strategy that grows by search asks it for a search, whoever
provides it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator

from growth.errors import ShapeError
from growth.optim import follow
from growth.remap import as_records

if TYPE_CHECKING:
    from pathlib import Path

    from growth.data import Task
    from growth.graph import NetGraph
    from growth.model import Model
    from growth.ops.registry import ChangeRecord


class TrainConfig(BaseModel):
    """Optimisation settings for one task (validated; unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    epochs: int = Field(5, ge=0)
    batch_size: int = Field(32, ge=1)
    optimizer: str = Field("sgd", pattern="^(sgd|adam)$")
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    # learning rate per step (growth.train): constant; cosine (to 0 over the fit's steps); step
    # (times gamma at each epoch of `milestones`); after `warmup_epochs` of linear warm-up
    schedule: Literal["constant", "cosine", "step"] = "constant"
    milestones: list[PositiveInt] = Field(default_factory=list)  # step: epochs (from 0)
    gamma: float = Field(0.1, gt=0, le=1)  # step: the factor at each milestone
    warmup_epochs: int = Field(0, ge=0)  # lr rises linearly from lr / steps to lr
    # early stopping: stop once the task's validation accuracy has not improved for this many
    # epochs, and keep the best epoch's weights (None: every epoch, the last weights)
    patience: int | None = Field(None, ge=1)

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError(f"milestones must increase strictly, e.g. [30, 60]; got {v}")
        return v


HOOKS = ("before_task", "training", "loss", "penalty", "after_backward", "after_step",
         "after_task", "evaluation")
Scorer = Callable[[torch.Tensor], torch.Tensor]  # inputs -> class scores (argmax = prediction)


class Hooks(Protocol):
    """What the loop calls on a strategy. The loop calls a hook of HOOKS only if it is in
    `overridden()`; `train_sets` and `extra_heads` are always asked."""

    def overridden(self) -> set[str]: ...
    def train_sets(self, ctx: Context) -> list[Task]: ...
    def extra_heads(self, ctx: Context) -> list[str]: ...
    def before_task(self, ctx: Context) -> None: ...
    def training(self, ctx: Context) -> AbstractContextManager[None]: ...
    def loss(self, ctx: Context, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor
             ) -> torch.Tensor: ...
    def penalty(self, ctx: Context, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor
                ) -> torch.Tensor | None: ...
    def after_backward(self, ctx: Context) -> None: ...
    def after_step(self, ctx: Context) -> None: ...
    def after_task(self, ctx: Context) -> None: ...
    def evaluation(self, ctx: Context, task: Task) -> AbstractContextManager[Scorer]: ...


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
    searcher: Any = None  # who runs architecture searches: a growth.searching.Searcher
    scenario: str = "task"  # "task" (a head per task), "class" or "domain" (one head); see
    # growth.scenarios

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
