"""EWC (Kirkpatrick et al. 2017): L = CE_t + (lambda/2) sum_i F_i (theta_i - theta*_i)^2.

The diagonal Fisher F of a task is measured through its head on its training data after the
task ends (empirical Fisher: the task's own labels). Two modes:
- separate: one term per finished task k, with F_k and theta*_k (state fisher/<k>/, anchor/<k>/);
- online (Schwarz et al. 2018): one running F <- gamma * F + F_new and one anchor, the
  parameters after the last task (state fisher/all/, anchor/latest/).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from growth.regularizers import Component, QuadraticStrategy, stored, task_fisher
from growth.strategies.base import Context, StrategyParams, state_key


class EWCParams(StrategyParams):
    """EWC settings.

    lambda: 50. On the quickstart (permuted digits, 5 tasks, MLP 64-100-100, SGD lr 0.05
    momentum 0.9, batch 32, 10 epochs; mean of 3 seeds; finetune ACC 0.74 BWT -0.29, joint ACC
    0.97) it gives ACC 0.93, BWT -0.014 (online, gamma 1: 0.92, -0.023). Larger values buy
    little and the penalty's curvature lambda * F adds over tasks: from about 200, SGD at lr
    0.05 with momentum diverges (keep lr * lambda * max F * tasks well under 2).
    """

    lam: float = Field(50.0, alias="lambda", ge=0, description="penalty strength")
    mode: Literal["separate", "online"] = Field(
        "separate", description="one term per task, or one running Fisher and anchor")
    gamma: float = Field(1.0, ge=0, le=1, description="online mode: decay of the old Fisher")
    fisher_samples: int | None = Field(
        1000, ge=1, description="training samples that estimate a Fisher (None: all)")


def store_task_fisher(strategy: QuadraticStrategy, ctx: Context, samples: int | None) -> None:
    """fisher/<task>/ and anchor/<task>/ for the task just learned (separate terms)."""
    k = ctx.task.index
    fisher = task_fisher(ctx, ctx.task, samples)
    for n, f in fisher.items():
        strategy.state[state_key("fisher", k, n)] = f
    strategy.set_anchors(ctx, k, list(fisher))
    strategy.mark_finished(ctx.task)


def separate_components(strategy: QuadraticStrategy, scale: float,
                        weights: dict[int, float] | None = None) -> list[Component]:
    """One (scale * w_k, F_k, theta*_k) term per finished task (w_k = 1 unless given)."""
    w = weights or {}
    return [(scale * w.get(k, 1.0), stored(strategy.state, "fisher", k),
             stored(strategy.state, "anchor", k)) for k in strategy.finished()]


class EWC(QuadraticStrategy):
    name = "ewc"
    description = "elastic weight consolidation: Fisher-weighted pull to old tasks' weights"
    Params = EWCParams
    params: EWCParams

    def components(self, ctx: Context) -> list[Component]:
        scale = self.params.lam / 2
        if self.params.mode == "separate":
            return separate_components(self, scale)
        if not self.finished():
            return []
        return [(scale, stored(self.state, "fisher", "all"), stored(self.state, "anchor",
                                                                     "latest"))]

    def consolidate(self, ctx: Context) -> None:
        if self.params.mode == "separate":
            store_task_fisher(self, ctx, self.params.fisher_samples)
            return
        fisher = task_fisher(ctx, ctx.task, self.params.fisher_samples)
        self.update_running(ctx, "fisher", fisher, self.params.gamma)
        self.mark_finished(ctx.task)
