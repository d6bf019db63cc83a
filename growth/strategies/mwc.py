"""MWC, multi-task weight consolidation (the project's definition, docs/methods.md).

After task k: store theta*_k and the diagonal Fisher F_k (as EWC "separate"). At the start of
task t: measure F^_t on the new task's training data (through its head, before training),
r_k = cosine(F_k, F^_t) over the trunk parameters, w_{k,t} = (t-1) softmax_k(beta r_k), and train
with CE_t + (lambda/2) sum_{k<t} w_{k,t} sum_i F_{k,i} (theta_i - theta*_{k,i})^2.
beta = 0 gives every w = 1: EWC with one penalty per task. The r and w of each task are kept in
`extra["relatedness"]["<t>"]` for reports (and so a restored run reuses them).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from pydantic import Field

from growth.regularizers import Component, same_shape, stored, task_fisher
from growth.strategies.base import Context, StrategyParams
from growth.strategies.ewc import QuadraticStrategy, separate_components, store_task_fisher
from growth.strategies.spec import TensorSpec


class MWCParams(StrategyParams):
    """MWC settings.

    lambda: 50, as EWC (at beta = 0 the two coincide, to the last digit). beta: 1. On the
    quickstart (experiments/quickstart.yaml: permuted digits, 5 tasks, MLP 64-100-100, SGD lr
    0.05 momentum 0.9, batch 32, 10 epochs; mean of seeds 0-2, where finetune gets ACC 0.78,
    BWT -0.24 and joint ACC 0.98) it gives ACC 0.947, BWT -0.013 against EWC's 0.942, -0.014.
    There the cosines r of the tasks' Fishers lie within 0.15..0.27, so at beta 1 every w stays
    within 5% of 1; beta 30 spreads w from 0.1 to 2.4 and gives the same result (0.946,
    -0.014).
    """

    lam: float = Field(50.0, alias="lambda", ge=0, description="penalty strength")
    beta: float = Field(1.0, description="sharpness of the relatedness softmax (0: EWC)")
    fisher_samples: int | None = Field(
        1000, ge=1, description="training samples that estimate a Fisher (None: all)")


def fisher_cosine(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                  names: list[str]) -> float:
    """Cosine of two diagonal Fishers over `names`. A stored Fisher has followed every graph
    change since its task (units it never saw are 0), so both have the parameter's shape."""
    xs, ys = [], []
    for n in names:
        if n in a and n in b:
            same_shape(a[n], b[n], n)
            xs.append(a[n].double().flatten().cpu())
            ys.append(b[n].double().flatten().cpu())
    if not xs:
        return 0.0
    x, y = torch.cat(xs), torch.cat(ys)
    return float(torch.nn.functional.cosine_similarity(x, y, dim=0, eps=1e-30))


def relatedness_weights(r: list[float], beta: float) -> list[float]:
    """w_k = (t-1) softmax_k(beta r_k), with t-1 = len(r)."""
    if not r:
        return []
    soft = torch.softmax(beta * torch.tensor(r, dtype=torch.float64), dim=0)
    return (len(r) * soft).tolist()


class MWC(QuadraticStrategy):
    name = "mwc"
    description = "multi-task weight consolidation: EWC terms weighted by task relatedness"
    Params = MWCParams
    params: MWCParams

    def state_spec(self) -> dict[str, TensorSpec]:
        return {"fisher": TensorSpec(shape="same"), "anchor": TensorSpec(shape="same")}

    def before_task(self, ctx: Context) -> None:
        super().before_task(ctx)
        self.relatedness(ctx)

    def relatedness(self, ctx: Context) -> dict[str, list[float]]:
        """r and w of the current task against every finished one (measured once per task)."""
        table = self.extra.setdefault("relatedness", {})
        key = str(ctx.task.index)
        tasks = self.finished()
        rec = table.get(key)
        if rec is None or rec["tasks"] != tasks:
            rec = table[key] = self._measure(ctx, tasks)
        return rec

    def _measure(self, ctx: Context, tasks: list[int]) -> dict[str, list[float]]:
        if not tasks:
            return {"tasks": [], "r": [], "w": []}
        new = task_fisher(ctx, ctx.task, self.params.fisher_samples)
        trunk = ctx.model.trunk_parameter_names()
        r = [fisher_cosine(stored(self.state, "fisher", k), new, trunk) for k in tasks]
        return {"tasks": tasks, "r": r, "w": relatedness_weights(r, self.params.beta)}

    def components(self, ctx: Context) -> Iterable[Component]:
        rec = self.relatedness(ctx)
        return separate_components(self, self.params.lam / 2, dict(zip(rec["tasks"], rec["w"])))

    def consolidate(self, ctx: Context) -> None:
        store_task_fisher(self, ctx, self.params.fisher_samples)
