"""MAS, memory-aware synapses (Aljundi et al. 2018).

After each task, Omega_i += mean over its training data of |d ||f(x)||_2^2 / d theta_i|, f the
task head's outputs (no labels needed); the next tasks pay lambda * sum_i Omega_i
(theta_i - theta*_i)^2, theta* the parameters after the last task.
State: importance/all/ (Omega) and anchor/latest/.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from growth.regularizers import (
    Component,
    mas_importance,
    stored,
    task_sample,
    task_view,
)
from growth.remap import IMPORTANCE, WEIGHT
from growth.strategies.base import Context, StrategyParams
from growth.strategies.ewc import QuadraticStrategy
from growth.strategies.spec import TensorSpec


class MASParams(StrategyParams):
    """MAS settings.

    lambda: 0.01. On the quickstart (experiments/quickstart.yaml: permuted digits, 5 tasks, MLP
    64-100-100, SGD lr 0.05 momentum 0.9, batch 32, 10 epochs; mean of seeds 0-2, where
    finetune gets ACC 0.78, BWT -0.24 and joint ACC 0.98) it gives ACC 0.915, BWT -0.020. Omega
    is large (gradients of a squared output norm, up to ~60 here), so at 0.3 SGD at lr 0.05
    diverges.
    """

    lam: float = Field(0.01, alias="lambda", ge=0, description="penalty strength")
    samples: int | None = Field(
        1000, ge=1, description="training samples that estimate the importance (None: all)")


class MAS(QuadraticStrategy):
    name = "mas"
    description = "memory-aware synapses: output-sensitivity importance, quadratic pull"
    Params = MASParams
    params: MASParams
    state_roles: ClassVar[dict[str, str]] = {"anchor": WEIGHT, "importance": IMPORTANCE}

    def state_spec(self) -> dict[str, TensorSpec]:
        return {"importance": TensorSpec(("all",), "same"),
                "anchor": TensorSpec(("latest",), "same")}

    def components(self, ctx: Context) -> list[Component]:
        if not self.finished():
            return []
        return [(self.params.lam, stored(self.state, "importance", "all"),
                 stored(self.state, "anchor", "latest"))]

    def consolidate(self, ctx: Context) -> None:
        view, names = task_view(ctx, ctx.task)
        x, _ = task_sample(ctx, ctx.task, self.params.samples)
        new = {n: t.cpu() for n, t in mas_importance(view, names, x).items()}
        self.update_running(ctx, "importance", new)
        self.mark_finished(ctx.task)
