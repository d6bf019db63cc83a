"""Piggyback (Mallya, Davis & Lazebnik 2018): one fixed backbone, a learned binary mask per task.

The backbone's trunk weights (linear and conv weights) never change once it is fixed. Each task
learns a real-valued score per weight, initialised `score_init`; the forward pass uses
W * [score > threshold], and the scores train through that step with the straight-through
estimator (a score's gradient is its masked weight's gradient times W), with their own Adam
(`score_lr`). The task's head trains as usual. After the task its binary mask is stored, one
bit per weight (state mask/<task>/<param>); evaluating task k swaps W * mask_k in for the split.

backbone: "fixed" masks the network as it starts (an imported torchvision network with its
pretrained weights, as the paper's ImageNet backbone, or the random initialisation) from the
first task on; "first_task" (default, for streams without a pretrained network) trains the
backbone on task 0 as fine-tuning does (its mask is all ones) and fixes it from task 1 on.
Biases and BatchNorm (`shared`): "frozen" (default) trains them only with the backbone (never
with "fixed"), BatchNorm in eval mode afterwards; "per_task" trains them with every task and
stores a copy per task that evaluation swaps in. Task-incremental only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from growth.masks import (
    ScoredMasks,
    frozen_shared,
    masked_names,
    score_optimizer,
    shared_copy,
    swapped,
)
from growth.metrics import Stored
from growth.regularizers import stored
from growth.remap import MASK as MASK_ROLE
from growth.remap import WEIGHT
from growth.strategies.base import Context, Scorer, Strategy, StrategyParams, state_key
from growth.strategies.spec import TensorSpec

if TYPE_CHECKING:
    from growth.data import Task
    from growth.model import Model

MASK = "mask"
SHARED = "shared"


class PiggybackParams(StrategyParams):
    """Piggyback settings (the paper's mask initialisation, threshold and Adam rate)."""

    backbone: Literal["first_task", "fixed"] = Field(
        "first_task", description="fixed: mask the network as it starts; first_task: train it "
                                  "on task 0, then fix it")
    score_init: float = Field(1e-2, gt=0, description="initial value of every mask score")
    threshold: float = Field(5e-3, ge=0, description="a weight is used where its score > this")
    score_lr: float = Field(1e-4, gt=0, description="Adam learning rate of the mask scores")
    shared: Literal["frozen", "per_task"] = Field(
        "frozen", description="biases and BatchNorm: trained with the backbone only, or per task")

    @model_validator(mode="after")
    def _starts_whole(self) -> PiggybackParams:
        if self.threshold >= self.score_init:
            raise ValueError(f"threshold ({self.threshold}) must lie below score_init "
                             f"({self.score_init}): every task starts from the whole backbone")
        return self


class Piggyback(Strategy):
    name = "piggyback"
    description = "a learned binary mask per task over one fixed backbone (straight-through " \
                  "scores), evaluated masked"
    Params = PiggybackParams
    params: PiggybackParams
    scenarios: ClassVar[tuple[str, ...]] = ("task",)
    state_roles: ClassVar[dict[str, str]] = {MASK: MASK_ROLE, SHARED: WEIGHT}

    def __init__(self, params: PiggybackParams | None = None) -> None:
        super().__init__(params)
        self._scores: dict[str, Tensor] = {}
        self._scored: ScoredMasks | None = None

    def finished(self) -> list[int]:
        return list(self.extra.get("tasks", []))

    def _trains_backbone(self) -> bool:
        return self.params.backbone == "first_task" and not self.finished()

    # ---- hooks -----------------------------------------------------------------------------
    def before_task(self, ctx: Context) -> None:
        """Fresh scores for every trunk weight, unless this task trains the backbone."""
        self._scored = None
        if self._trains_backbone():
            self._scores = {}
            return
        params = ctx.model.named_parameters()
        self._scores = {n: torch.full(params[n].shape, self.params.score_init,
                                      device=params[n].device, requires_grad=True)
                        for n in masked_names(ctx.model)}
        threshold = self.params.threshold
        self._scored = ScoredMasks(
            self._scores, lambda n, s, out: torch.gt(s, threshold, out=out),
            score_optimizer(list(self._scores.values()), "adam", self.params.score_lr))

    @contextmanager
    def training(self, ctx: Context) -> Iterator[None]:
        with ExitStack() as stack:
            if self.params.shared == "frozen" and not self._trains_backbone():
                stack.enter_context(frozen_shared(ctx.model))
            if self._scored is not None:
                stack.enter_context(self._scored.applied(ctx.model.named_parameters()))
            yield

    def after_backward(self, ctx: Context) -> None:
        if self._scored is not None:
            self._scored.move_grads()

    def after_step(self, ctx: Context) -> None:
        if self._scored is not None:
            self._scored.step()

    def after_task(self, ctx: Context) -> None:
        k = ctx.task.index
        params = ctx.model.named_parameters()
        for n in masked_names(ctx.model):
            score = self._scores.get(n)
            self.state[state_key(MASK, k, n)] = (
                torch.ones(params[n].shape, dtype=torch.bool) if score is None
                else score.detach().cpu() > self.params.threshold)
        if self.params.shared == "per_task":
            for n, t in shared_copy(ctx.model).items():
                self.state[state_key(SHARED, k, n)] = t
        self.extra["tasks"] = [*self.finished(), k]
        self._scores, self._scored = {}, None

    # ---- evaluation ------------------------------------------------------------------------
    def task_values(self, ctx: Context, task: Task) -> dict[str, Tensor]:
        """What task `task` sees: the backbone times its mask, and its own shared tensors in
        per_task mode; nothing to swap for a task not learned yet (the whole backbone)."""
        if task.index not in self.finished():
            return {}
        params = ctx.model.named_parameters()
        values = {n: params[n].detach() * m.to(params[n].device)
                  for n, m in stored(self.state, MASK, task.index).items()}
        if self.params.shared == "per_task":
            values.update(stored(self.state, SHARED, task.index))
        return values

    @contextmanager
    def evaluation(self, ctx: Context, task: Task) -> Iterator[Scorer]:
        tensors = dict(ctx.model.module.state_dict(keep_vars=True))
        with swapped(tensors, self.task_values(ctx, task)):
            yield ctx.model.head(ctx.head_of(task))

    # ---- state and size --------------------------------------------------------------------
    def state_spec(self) -> dict[str, TensorSpec]:
        spec = {MASK: TensorSpec("tasks", "same", "bool")}
        if self.params.shared == "per_task":
            spec[SHARED] = TensorSpec("tasks", "same", "any")
        return spec

    def check_state(self, tensors: Any, extra: Any, graph_tensors: Any, finished: int
                    ) -> list[str]:
        problems = super().check_state(tensors, extra, graph_tensors, finished)
        if extra.get("tasks", []) != list(range(finished)):
            problems.append(f"extra 'tasks' is {extra.get('tasks')!r}, expected the "
                            f"{finished} finished tasks {list(range(finished))}")
        return problems

    def size_parts(self, model: Model) -> dict[str, list[Any]]:
        """Backbone and heads, plus one bit per trunk weight per task, plus (per_task mode)
        the stored biases and BatchNorm copies."""
        parts = super().size_parts(model)
        parts["masks"] = [Stored(t.numel(), 1, parameters=False)
                          for k, t in self.state.items() if k.startswith(f"{MASK}/")]
        if self.params.shared == "per_task":
            parts["per_task"] = [t for k, t in self.state.items()
                                 if k.startswith(f"{SHARED}/") and t.is_floating_point()]
        return parts
