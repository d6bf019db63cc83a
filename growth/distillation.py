"""Distillation as hooks on the one training loop: the student learns its task (the loop's
cross-entropy) while matching frozen teachers' tempered outputs on their heads (KL at T, times
T^2), plus an optional penalty. Not a strategy: it keeps no state and is never checkpointed;
`growth.compress.distill` builds one for each compression, REC's included, and hands it to
`fit`, which knows it as `growth.context.Hooks`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from growth.context import Context, Hooks
from growth.data import Task
from growth.regularizers import kd_loss

Penalty = Callable[[Context, Tensor, Tensor, Tensor], Tensor | None]


class Distillation:
    """Hooks for `fit`: KL(T) to frozen teachers, each on its heads, plus an optional penalty
    (cross-entropy on the task is the loop's own)."""

    fitting = "distillation"  # named by the loop if the fit diverges, with this advice
    diverged_advice = ("lower the learning rate it runs at (train.lr; --lr for growth "
                       "compress) or compress.kd_weight")

    def __init__(self, teachers: list[tuple[nn.Module, list[str]]], temperature: float = 2.0,
                 weight: float = 1.0, extra: Penalty | None = None,
                 ce: float | None = None, hold: Hooks | None = None) -> None:
        """ce: the weight of the task's cross-entropy (None: the loop's own, weight 1).
        hold: a strategy whose `training`, `after_backward` and `after_step` hooks keep some
        entries still through the fit (REC's owned weights)."""
        self.ce, self.hold = ce, hold
        self.teachers = [(t, list(h)) for t, h in teachers if h]
        self.heads = [h for _, hs in self.teachers for h in hs]
        self.temperature, self.weight, self.extra = temperature, weight, extra

    def overridden(self) -> set[str]:
        own = {"penalty"} if self.ce is None else {"loss", "penalty"}
        if self.hold is not None:
            own |= {"training", "after_backward", "after_step"} & self.hold.overridden()
        return own

    @contextmanager
    def training(self, ctx: Context) -> Iterator[None]:
        with self.hold.training(ctx) if self.hold is not None else nullcontext():
            yield

    def after_backward(self, ctx: Context) -> None:
        self.hold.after_backward(ctx)

    def after_step(self, ctx: Context) -> None:
        self.hold.after_step(ctx)

    def loss(self, ctx: Context, x: Tensor, y: Tensor, logits: Tensor) -> Tensor:
        return (1.0 if self.ce is None else self.ce) * F.cross_entropy(logits, y)

    def train_sets(self, ctx: Context) -> list[Task]:
        return [ctx.task]

    def extra_heads(self, ctx: Context) -> list[str]:
        own = ctx.head_of(ctx.task)
        return [h for h in self.heads if h != own]

    def penalty(self, ctx: Context, x: Tensor, y: Tensor, logits: Tensor) -> Tensor | None:
        target: dict[str, Tensor] = {}
        with torch.no_grad():
            for teacher, heads in self.teachers:
                out = teacher(x)
                target.update(out if isinstance(out, dict) else {heads[0]: out})
        current = ctx.outputs if ctx.outputs is not None else {ctx.head_of(ctx.task): logits}
        loss = self.weight * sum(kd_loss(current[h], target[h], self.temperature)
                                 for h in self.heads)
        if self.extra is not None:
            term = self.extra(ctx, x, y, logits)
            if term is not None:
                loss = loss + term
        return loss
