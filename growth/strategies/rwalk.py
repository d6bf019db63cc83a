"""RWalk, Riemannian walk (Chaudhry, Dokania, Ajanthan, Torr 2018).

Two importances, both measured along the training path, summed after normalisation:
- EWC++: an online Fisher, after every step F <- alpha g^2 + (1 - alpha) F, g the gradient of
  the task's loss alone (the loop's gradient minus the penalty's, known in closed form); it
  runs on across tasks;
- the path score: every `interval` steps (and at the task's end, for the steps left),
  s += sum_steps(-g * delta) / (1/2 F (theta - theta_start)^2 + eps), the loss change over the
  interval (SI's path integral, `growth.regularizers.PathIntegral`) over its Fisher-weighted
  squared distance, theta_start the parameters when the interval began, F the Fisher at its
  end, eps float32's machine epsilon. At the task's end the stored score becomes the task's
  (first task, or a parameter scored for the first time) or the mean of the stored and the
  task's.
The next tasks pay lambda sum_i (F_i / max F + max(s_i, 0) / max s) (theta_i - theta*_i)^2,
theta* the parameters after the last task, the maxima over every stored entry.
State: fisher/all/, score/all/, anchor/latest/.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, ClassVar

import torch
from pydantic import Field
from torch import Tensor

from growth.errors import GraphError
from growth.regularizers import Component, PathIntegral, stored, task_view
from growth.remap import IMPORTANCE, WEIGHT
from growth.strategies.base import Context, StrategyParams, state_key
from growth.strategies.ewc import QuadraticStrategy
from growth.strategies.spec import TensorSpec

if TYPE_CHECKING:
    from growth.ops.registry import ChangeRecord

EPS = torch.finfo(torch.float32).eps


class RWalkParams(StrategyParams):
    """RWalk settings.

    lambda: 1, alpha: 0.9, interval: 10 (alpha and interval as Avalanche's RWalk). The
    importance is normalised (each part's maximum is 1), so lambda is on another scale than
    EWC's. On the quickstart (experiments/quickstart.yaml: permuted digits, 5 tasks, MLP
    64-100-100, SGD lr 0.05 momentum 0.9, batch 32, 10 epochs; mean of seeds 0-2, where
    finetune gets ACC 0.78, BWT -0.24 and joint ACC 0.98) it gives ACC 0.933, BWT -0.029; the
    result is flat from 0.3 to 10 (ACC 0.928 to 0.937, every difference within one standard
    deviation over seeds), and 1 keeps the penalty's curvature (at most 4 lambda) far from
    what SGD at lr 0.05 with momentum 0.9 tolerates.
    """

    lam: float = Field(1.0, alias="lambda", ge=0, description="penalty strength")
    alpha: float = Field(0.9, gt=0, le=1,
                         description="EWC++: weight of the newest step's squared gradient")
    interval: int = Field(10, ge=1, description="steps between updates of the path score")


def rwalk_importance(fisher: dict[str, Tensor], score: dict[str, Tensor]) -> dict[str, Tensor]:
    """F / max F + max(s, 0) / max s per parameter, the maxima over every entry (a part whose
    maximum is 0 adds nothing)."""
    pos = {n: s.clamp(min=0) for n, s in score.items()}
    top_f, top_s = _largest(fisher.values()), _largest(pos.values())
    return {n: _over(fisher[n], top_f) + _over(pos[n], top_s) for n in fisher if n in pos}


def _largest(tensors: Iterable[Tensor]) -> float:
    return max((float(t.max()) for t in tensors if t.numel()), default=0.0)


def _over(t: Tensor, top: float) -> Tensor:
    return t / top if top > 0 else torch.zeros_like(t)


class RWalk(QuadraticStrategy):
    name = "rwalk"
    description = "Riemannian walk: EWC++ online Fisher plus a normalised path score"
    Params = RWalkParams
    params: RWalkParams
    state_roles: ClassVar[dict[str, str]] = {"anchor": WEIGHT, "fisher": IMPORTANCE,
                                             "score": IMPORTANCE}
    _module: torch.nn.Module | None = None

    def state_spec(self) -> dict[str, TensorSpec]:
        return {"fisher": TensorSpec(("all",), "same"), "score": TensorSpec(("all",), "same"),
                "anchor": TensorSpec(("latest",), "same")}

    def before_task(self, ctx: Context) -> None:
        super().before_task(ctx)
        self._track(ctx)

    def _track(self, ctx: Context) -> None:
        """The current task's parameters: the running Fisher from the stored one, the task's
        score from zero, a path interval from here."""
        _, names = task_view(ctx, ctx.task)
        params = ctx.model.named_parameters()
        fisher = stored(self.state, "fisher", "all")
        self._module = ctx.model.module
        self._path = PathIntegral({n: params[n] for n in names})
        self._fisher = [fisher[n].to(params[n]).clone() if n in fisher
                        else torch.zeros_like(params[n]) for n in names]
        self._score = [torch.zeros_like(params[n]) for n in names]
        self._steps = 0

    def follow(self, ctx: Context, records: list[ChangeRecord]) -> None:
        if self._module is not None:
            raise GraphError("RWalk cannot follow a graph change in the middle of a task (its "
                             "running Fisher and path score are not carried); change the graph "
                             "between tasks")
        super().follow(ctx, records)

    def after_backward(self, ctx: Context) -> None:
        """g = the task loss's gradient (the penalty's taken out); F <- alpha g^2 + (1-alpha) F."""
        if self._module is None:  # a fit outside learn_task
            self._track(ctx)
        elif ctx.model.module is not self._module:
            raise GraphError("RWalk: the model was recompiled during a task; change the graph "
                             "between tasks")
        quad = self._quad.gradient() if self._quad is not None else {}
        grads = []
        alpha = self.params.alpha
        for p, f in zip(self._path.params, self._fisher):
            g = p.grad
            if g is not None:
                g = g - quad[p] if p in quad else g
                f.mul_(1 - alpha).add_(alpha * g.square())
            grads.append(g)
        self._path.read_grads(grads)

    def after_step(self, ctx: Context) -> None:
        self._path.step()
        self._steps += 1
        if self._steps % self.params.interval == 0:
            self._close_interval()

    @torch.no_grad()
    def _close_interval(self) -> None:
        """s += (loss change over the interval) / (1/2 F (theta - theta_start)^2 + eps)."""
        path = self._path
        for s, omega, moved, f in zip(self._score, path.omega, path.moved(), self._fisher):
            s.add_(omega / (0.5 * f * moved.square() + EPS))
        path.restart()

    def components(self, ctx: Context) -> list[Component]:
        if not self.finished():
            return []
        importance = rwalk_importance(stored(self.state, "fisher", "all"),
                                      stored(self.state, "score", "all"))
        return [(self.params.lam, importance, stored(self.state, "anchor", "latest"))]

    @torch.no_grad()
    def consolidate(self, ctx: Context) -> None:
        if self._steps % self.params.interval:
            self._close_interval()  # the steps since the last full interval
        old = stored(self.state, "score", "all")
        for n, f, s in zip(self._path.names, self._fisher, self._score):
            s = s.cpu()
            self.state[state_key("fisher", "all", n)] = f.cpu()
            self.state[state_key("score", "all", n)] = (old[n] + s) / 2 if n in old else s
        self.set_anchors(ctx, "latest", sorted(set(stored(self.state, "anchor", "latest"))
                                               | set(self._path.names)))
        self.mark_finished(ctx.task)
        self._module = None
