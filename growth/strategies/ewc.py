"""EWC (Kirkpatrick et al. 2017): L = CE_t + (lambda/2) sum_i F_i (theta_i - theta*_i)^2.

The diagonal Fisher F of a task is measured through its head on its training data after the
task ends (empirical Fisher: the task's own labels). Two modes:
- separate: one term per finished task k, with F_k and theta*_k (state fisher/<k>/, anchor/<k>/);
- online (Schwarz et al. 2018): one running F <- gamma * F + F_new and one anchor, the
  parameters after the last task (state fisher/all/, anchor/latest/).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field
from torch import Tensor

from growth.regularizers import (
    Component,
    Quadratic,
    build_quadratic,
    same_shape,
    stored,
    task_fisher,
)
from growth.remap import IMPORTANCE, WEIGHT
from growth.strategies.base import Context, Strategy, StrategyParams, state_key
from growth.strategies.spec import TensorSpec

if TYPE_CHECKING:
    from growth.data import Task
    from growth.ops.registry import ChangeRecord


def trained_parameters(strategy: Strategy, ctx: Context) -> set[str]:
    """Names of the parameters the current training can move: those of its tasks' heads."""
    return {n for t in strategy.train_sets(ctx)
            for n, _ in ctx.model.head(ctx.head_of(t)).named_parameters()}


class QuadraticStrategy(Strategy):
    """Base of EWC, MWC, SI, MAS and L2: the penalty is `build_quadratic(components(ctx))`.

    The merged terms are built lazily on the first batch of a task, and again whenever the
    model was recompiled (growth swaps parameters) or the state changed. Terms of parameters
    the task cannot move (other tasks' heads) are constants and left out: that keeps the hot
    loop short and leaves those parameters without gradients, so weight decay or momentum
    never touch them.
    """

    _quad: Quadratic | None = None
    state_roles: ClassVar[dict[str, str]] = {"anchor": WEIGHT, "fisher": IMPORTANCE}

    def components(self, ctx: Context) -> Iterable[Component]:
        """(scale, weights, anchors) of every quadratic term the current task pays; an
        iterable, so terms read from files are merged one at a time (build_quadratic)."""
        raise NotImplementedError

    def before_task(self, ctx: Context) -> None:
        self._quad = None

    def penalty(self, ctx: Context, x: Tensor | None = None, y: Tensor | None = None,
                logits: Tensor | None = None) -> Tensor | None:
        q = self._quad
        if q is None or q.module is not ctx.model.module:
            q = self._quad = build_quadratic(ctx.model.module, self.components(ctx),
                                             trained_parameters(self, ctx))
        return q()

    def after_task(self, ctx: Context) -> None:
        self.consolidate(ctx)
        self._quad = None

    def consolidate(self, ctx: Context) -> None:
        """Store what protects the task just learned (importance, anchors)."""
        raise NotImplementedError

    def load_state_dict(self, tensors: dict[str, Tensor], extra: dict[str, Any]) -> None:
        super().load_state_dict(tensors, extra)
        self._quad = None

    def check_state(self, tensors: Mapping[str, Tensor], extra: Mapping[str, Any],
                    graph_tensors: Mapping[str, Tensor], finished: int) -> list[str]:
        problems = super().check_state(tensors, extra, graph_tensors, finished)
        if extra.get("tasks", []) != list(range(finished)):
            problems.append(f"extra 'tasks' is {extra.get('tasks')!r}, expected the "
                            f"{finished} finished tasks {list(range(finished))}")
        return problems

    def follow(self, ctx: Context, records: list[ChangeRecord]) -> None:
        super().follow(ctx, records)
        self._quad = None

    def finished(self) -> list[int]:
        """Indices of the tasks consolidated so far, in order."""
        return list(self.extra.get("tasks", []))

    def mark_finished(self, task: Task) -> None:
        self.extra["tasks"] = [*self.finished(), task.index]

    def update_running(self, ctx: Context, what: str, new: dict[str, Tensor],
                       decay: float = 1.0) -> None:
        """what/all <- decay * what/all + new, anchor/latest <- theta now. The old sums have
        followed every graph change since, so they have their parameters' shapes."""
        old = stored(self.state, what, "all")
        merged = {n: decay * t for n, t in old.items()}
        for n, t in new.items():
            if n in old:
                same_shape(old[n], t, n)
                t = t + decay * old[n].to(t)
            merged[n] = t
        for n, t in merged.items():
            self.state[state_key(what, "all", n)] = t
        self.set_anchors(ctx, "latest", list(merged))

    def set_anchors(self, ctx: Context, task: int | str, names: list[str]) -> None:
        """anchor/<task>/<name> <- the parameter's current value (names gone from the model
        keep their previous anchor)."""
        params = ctx.model.named_parameters()
        for n in names:
            if n in params:
                self.state[state_key("anchor", task, n)] = params[n].detach().cpu().clone()


class EWCParams(StrategyParams):
    """EWC settings.

    lambda: 50. On the quickstart (experiments/quickstart.yaml: permuted digits, 5 tasks, MLP
    64-100-100, SGD lr 0.05 momentum 0.9, batch 32, 10 epochs; mean of seeds 0-2, where
    finetune gets ACC 0.78, BWT -0.24 and joint ACC 0.98) it gives ACC 0.94, BWT -0.014 (online
    mode, gamma 1: 0.93, -0.022). 100 and 200 give the same ACC; the penalty's curvature lambda
    * F adds up over tasks, and at 500 SGD at lr 0.05 with momentum diverged on 2 of 3 seeds,
    so 50 keeps a wide margin (keep lr * lambda * max F * tasks well under 2).
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
                        weights: dict[int, float] | None = None) -> Iterator[Component]:
    """One (scale * w_k, F_k, theta*_k) term per finished task (w_k = 1 unless given), each
    read when it is merged, so a penalty build holds one task's tensors at a time."""
    w = weights or {}
    return ((scale * w.get(k, 1.0), stored(strategy.state, "fisher", k),
             stored(strategy.state, "anchor", k)) for k in strategy.finished())


class EWC(QuadraticStrategy):
    name = "ewc"
    description = "elastic weight consolidation: Fisher-weighted pull to old tasks' weights"
    Params = EWCParams
    params: EWCParams

    def state_spec(self) -> dict[str, TensorSpec]:
        if self.params.mode == "separate":
            return {"fisher": TensorSpec(shape="same"), "anchor": TensorSpec(shape="same")}
        return {"fisher": TensorSpec(("all",), "same"), "anchor": TensorSpec(("latest",), "same")}

    def components(self, ctx: Context) -> Iterable[Component]:
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
