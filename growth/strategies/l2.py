"""L2 to the previous task's weights: lambda * sum_i (theta_i - theta*_i)^2.

Every weight counts the same (no importance): the baseline that shows what the importance
estimates of EWC, SI and MAS buy. State: anchor/latest/ and importance/latest/, the unit
weights (ones when a task ends). They are stored so that they follow a graph change as
importances do (new units free, rows of copied units at 1/c^2, docs/methods.md) until the
next task ends and every weight counts 1 again.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from growth.regularizers import Component, stored, task_view
from growth.remap import IMPORTANCE, WEIGHT
from growth.strategies.base import Context, StrategyParams, state_key
from growth.strategies.ewc import QuadraticStrategy
from growth.strategies.spec import TensorSpec


class L2Params(StrategyParams):
    """L2 settings.

    lambda: 0.05. On the quickstart (experiments/quickstart.yaml: permuted digits, 5 tasks, MLP
    64-100-100, SGD lr 0.05 momentum 0.9, batch 32, 10 epochs; mean of seeds 0-2, where
    finetune gets ACC 0.78, BWT -0.24 and joint ACC 0.98) it gives ACC 0.83, BWT -0.089; 0.03
    protects too little (0.80, -0.14), and from 0.1 (0.77, -0.083; 0.2: 0.77, -0.034) every
    weight is held alike, so new tasks learn less and ACC falls back toward finetune's.
    """

    lam: float = Field(0.05, alias="lambda", ge=0, description="penalty strength")


class L2(QuadraticStrategy):
    name = "l2"
    description = "uniform quadratic pull to the weights after the previous task"
    Params = L2Params
    params: L2Params
    state_roles: ClassVar[dict[str, str]] = {"anchor": WEIGHT, "importance": IMPORTANCE}

    def state_spec(self) -> dict[str, TensorSpec]:
        return {"anchor": TensorSpec(("latest",), "same"),
                "importance": TensorSpec(("latest",), "same")}

    def components(self, ctx: Context) -> list[Component]:
        if not self.finished():
            return []
        return [(self.params.lam, stored(self.state, "importance", "latest"),
                 stored(self.state, "anchor", "latest"))]

    def consolidate(self, ctx: Context) -> None:
        _, names = task_view(ctx, ctx.task)
        old = set(stored(self.state, "anchor", "latest"))
        self.set_anchors(ctx, "latest", sorted(old | set(names)))
        for n, a in stored(self.state, "anchor", "latest").items():
            self.state[state_key("importance", "latest", n)] = torch.ones_like(a)
        self.mark_finished(ctx.task)
