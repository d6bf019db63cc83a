"""LwF, learning without forgetting (Li & Hoiem 2016).

Before a task, freeze a copy of the model (compiled from its synced graph, eval mode). Training
adds lambda_o * sum over old heads of KD(T) between the frozen copy's and the current model's
outputs on the new task's data. In a single-head (class-incremental) stream the old "head" is
the shared one, restricted to the old tasks' classes. Nothing outlives a task: the frozen copy
is rebuilt from the model at every task start, so the strategy has no state to checkpoint.
Deviation: no warm-up phase training the new head alone.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from growth.compile import compile_graph
from growth.regularizers import kd_loss
from growth.strategies.base import Context, Strategy, StrategyParams


class LwFParams(StrategyParams):
    """LwF settings.

    lambda_o: 0.5, temperature: 2 (the paper's). On the quickstart
    (experiments/quickstart.yaml: permuted digits, 5 tasks, MLP 64-100-100, SGD lr 0.05
    momentum 0.9, batch 32, 10 epochs; mean of seeds 0-2, where finetune gets ACC 0.78, BWT
    -0.24 and joint ACC 0.98) it gives ACC 0.90, BWT -0.084 (0.3 and 1.0: the same ACC). The KD
    terms are summed over old heads and scaled by T^2, so their weight grows with the stream;
    at 1.5 training turned unstable (ACC 0.79, BWT -0.22): lower lambda_o for long streams.
    """

    lambda_o: float = Field(0.5, ge=0, description="weight of the distillation on old heads")
    temperature: float = Field(2.0, gt=0, description="softening of the distilled outputs")


def old_outputs(ctx: Context) -> dict[str, Tensor]:
    """Head name -> output columns of the tasks seen before (their labels in that head)."""
    cols: dict[str, list[Tensor]] = {}
    for t in ctx.seen:
        cols.setdefault(ctx.head_of(t), []).append(ctx.label_of(t, torch.arange(t.n_classes)))
    return {h: torch.cat(c).unique().to(ctx.device) for h, c in cols.items()}


class LwF(Strategy):
    name = "lwf"
    description = "learning without forgetting: distil old heads from a frozen copy"
    Params = LwFParams
    params: LwFParams

    def __init__(self, params: LwFParams | None = None) -> None:
        super().__init__(params)
        self._teacher: nn.Module | None = None
        self._old: dict[str, Tensor] = {}

    def before_task(self, ctx: Context) -> None:
        self._old = old_outputs(ctx)
        self._teacher = None
        if self._old:  # the frozen copy computes only the old heads
            teacher = compile_graph(ctx.model.graph, head=list(self._old)).to(ctx.device)
            self._teacher = teacher.eval().requires_grad_(False)

    def extra_heads(self, ctx: Context) -> list[str]:
        return list(old_outputs(ctx))

    def penalty(self, ctx: Context, x: Tensor, y: Tensor | None = None,
                logits: Tensor | None = None) -> Tensor | None:
        if self._teacher is None:
            return None
        with torch.no_grad():
            target = self._teacher(x)
        current = ctx.outputs  # the old heads, from the training forward pass itself
        if current is None:  # called outside the training loop
            current = ctx.model.head(tuple(self._old))(x)
        t = self.params.temperature
        loss = sum(kd_loss(current[h][:, c], target[h][:, c], t) for h, c in self._old.items())
        return self.params.lambda_o * loss
