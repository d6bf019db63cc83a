"""SI, synaptic intelligence (Zenke, Poole, Ganguli 2017).

During a task, each step adds omega_i += -g_i * delta_i (g: the gradient seen after backward,
penalty included; delta: the step's parameter change). At the task's end
Omega_i += omega_i / (Delta_i^2 + xi), Delta_i the parameter's total change over the task, and
the next tasks pay c * sum_i Omega_i (theta_i - theta*_i)^2, theta* the parameters after the
last task. State: omega/all/ (Omega) and anchor/latest/. The per-step path sums live only
during a task (campaigns checkpoint between tasks); if the graph changes mid-task
(`Context.replace_graph`), they follow it through the change records (`growth.remap`: start
values like weights, path sums as PATH; new units start from zero at that step).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from pydantic import Field
from torch import Tensor

from growth.errors import GraphError
from growth.regularizers import Component, PathIntegral, stored, task_view
from growth.remap import IMPORTANCE, PATH, WEIGHT, remap
from growth.strategies.base import Context, StrategyParams
from growth.strategies.ewc import QuadraticStrategy
from growth.strategies.spec import TensorSpec

if TYPE_CHECKING:
    from growth.ops.registry import ChangeRecord


class SIParams(StrategyParams):
    """SI settings.

    c: 1, xi: 0.1. On the quickstart (experiments/quickstart.yaml: permuted digits, 5 tasks,
    MLP 64-100-100, SGD lr 0.05 momentum 0.9, batch 32, 10 epochs; mean of seeds 0-2, where
    finetune gets ACC 0.78, BWT -0.24 and joint ACC 0.98) it gives ACC 0.935, BWT -0.024. At c
    10, or with xi 1e-3 (Omega of weights that barely moved explodes), the penalty is too stiff
    for SGD at lr 0.05 and training diverges.
    """

    c: float = Field(1.0, ge=0, description="penalty strength")
    xi: float = Field(0.1, gt=0, description="damping of Omega's denominator")


class SI(QuadraticStrategy):
    name = "si"
    description = "synaptic intelligence: path-integral importance, quadratic pull"
    Params = SIParams
    params: SIParams
    state_roles: ClassVar[dict[str, str]] = {"anchor": WEIGHT, "omega": IMPORTANCE}
    _module: torch.nn.Module | None = None

    def state_spec(self) -> dict[str, TensorSpec]:
        return {"omega": TensorSpec(("all",), "same"), "anchor": TensorSpec(("latest",), "same")}

    def before_task(self, ctx: Context) -> None:
        super().before_task(ctx)
        self._track(ctx, {}, {})

    def tracked(self, ctx: Context) -> list[str]:
        """Names of the parameters whose path is integrated: every one the task trains."""
        return task_view(ctx, ctx.task)[1]

    def _track(self, ctx: Context, start: dict[str, Tensor], omega: dict[str, Tensor]) -> None:
        """Follow the current task's parameters, with the sums `start`/`omega` carried through a
        graph change (parameters without them start from now)."""
        self._names = self.tracked(ctx)
        params = ctx.model.named_parameters()
        self._module = ctx.model.module
        self._path = PathIntegral({n: params[n] for n in self._names}, start, omega)

    def follow(self, ctx: Context, records: list[ChangeRecord]) -> None:
        """Omega and anchors by their roles; during a task, the live sums too: the start values
        like weights, the path sums omega as PATH (growth.remap)."""
        super().follow(ctx, records)
        if self._module is None:
            return
        path = self._path
        start = {n: remap(t, n, records, WEIGHT) for n, t in zip(path.names, path.start)}
        omega = {n: remap(t, n, records, PATH) for n, t in zip(path.names, path.omega)}
        self._track(ctx, {n: t for n, t in start.items() if t is not None},
                    {n: t for n, t in omega.items() if t is not None})

    def after_backward(self, ctx: Context) -> None:
        if self._module is None:  # a fit outside learn_task: start the sums here
            self._track(ctx, {}, {})
        elif ctx.model.module is not self._module:
            raise GraphError("SI: the model was recompiled during a task without "
                             "Context.replace_graph, so the path sums cannot follow it; replace "
                             "the graph through the task's context with the operators' records")
        self._path.read_grads()

    def after_step(self, ctx: Context) -> None:
        self._path.step()

    def components(self, ctx: Context) -> list[Component]:
        if not self.finished():
            return []
        return [(self.params.c, stored(self.state, "omega", "all"),
                 stored(self.state, "anchor", "latest"))]

    @torch.no_grad()
    def consolidate(self, ctx: Context) -> None:
        self.update_running(ctx, "omega", self.importance())
        self.mark_finished(ctx.task)
        self._module = None

    @torch.no_grad()
    def importance(self) -> dict[str, Tensor]:
        """This task's omega / (Delta^2 + xi), Delta each parameter's change over the task."""
        path = self._path
        return {n: (omega / (delta.square() + self.params.xi)).cpu()
                for n, omega, delta in zip(path.names, path.omega, path.moved())}
