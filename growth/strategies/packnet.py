"""PackNet (Mallya & Lazebnik 2018): one network packs every task by iterative pruning.

Every trunk weight (linear and conv weights) has an owner index, 0 = free, k + 1 = task k
(state owner/all/<param>). Task t trains only the free weights: their gradients pass, the
others' are zeroed and their values are written back after the fit (and after every step when
the optimizer decays weights), so no optimizer state, momentum or weight decay moves a weight
another task owns, nor a pruned one. Then the task takes the free weights, gives back the
`prune` fraction of them with the smallest magnitude in each layer (zeroed, free for later
tasks), and retrains the rest for `retrain_epochs`. Evaluating task k uses the weights owned
by tasks 0..k only (the others zeroed for the split, restored after).

Biases and BatchNorm (`shared`): "frozen" (default, as the paper) trains them with task 0 and
freezes them afterwards (later tasks train with BatchNorm in eval mode); "per_task" trains
them with every task and stores a copy per task (state shared/<k>/<tensor>) that evaluation
swaps in. Heads are per task. Task-incremental only: a shared head would change old outputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor

from growth.masks import (
    Guard,
    decays,
    frozen_shared,
    prune_smallest,
    shared_copy,
    swapped,
)
from growth.regularizers import stored
from growth.remap import MASK, WEIGHT
from growth.strategies.base import Context, Scorer, Strategy, StrategyParams, state_key
from growth.strategies.owned import mask_sizes, owner_table, visible
from growth.strategies.spec import TensorSpec

if TYPE_CHECKING:
    from growth.data import Task
    from growth.model import Model

OWNER = "owner"
SHARED = "shared"


class PackNetParams(StrategyParams):
    """PackNet settings.

    prune: the fraction of a task's weights given back after it (per layer, by magnitude); a
    list gives one per task, its last value repeating. 0.75 leaves each task a quarter of what
    was free and the next tasks the rest. retrain_epochs: training after pruning.
    """

    prune: float | list[float] = Field(
        0.75, description="fraction of the task's weights pruned after it (a list: per task)")
    retrain_epochs: int = Field(2, ge=0, description="epochs of retraining after pruning")
    shared: Literal["frozen", "per_task"] = Field(
        "frozen", description="biases and BatchNorm: frozen after task 0, or stored per task")

    @field_validator("prune")
    @classmethod
    def _ratios(cls, v: float | list[float]) -> float | list[float]:
        values = v if isinstance(v, list) else [v]
        if not values or any(not 0 <= r < 1 for r in values):
            raise ValueError(f"prune ratios must lie in [0, 1), got {v}")
        return v


class PackNet(Strategy):
    name = "packnet"
    description = "iterative pruning: each task owns the weights it keeps, evaluated masked"
    Params = PackNetParams
    params: PackNetParams
    scenarios: ClassVar[tuple[str, ...]] = ("task",)
    state_roles: ClassVar[dict[str, str]] = {OWNER: MASK, SHARED: WEIGHT}

    def __init__(self, params: PackNetParams | None = None) -> None:
        super().__init__(params)
        self._trainable: dict[str, Tensor] = {}

    # ---- ownership -----------------------------------------------------------------------
    def finished(self) -> list[int]:
        return list(self.extra.get("tasks", []))

    def owners(self, model: Model) -> dict[str, Tensor]:
        """owner/all/<param> for every masked parameter (created free where missing)."""
        return owner_table(self.state, model, len(self.finished()))

    def ratio(self, task: int) -> float:
        r = self.params.prune
        return r if isinstance(r, float) else r[min(task, len(r) - 1)]

    def _frozen_shared(self, ctx: Context) -> bool:
        return self.params.shared == "frozen" and bool(self.finished())

    # ---- hooks -----------------------------------------------------------------------------
    def before_task(self, ctx: Context) -> None:
        self._trainable = {n: o == 0 for n, o in self.owners(ctx.model).items()}

    @contextmanager
    def training(self, ctx: Context) -> Iterator[None]:
        with ExitStack() as stack:
            stack.enter_context(self._shared_frozen(ctx))
            guard = self._guard = Guard(ctx.model.named_parameters(), self._trainable)
            stack.callback(guard.restore)
            yield

    @contextmanager
    def _shared_frozen(self, ctx: Context) -> Iterator[None]:
        """After task 0 in "frozen" mode: biases and BN parameters train no more, BN in eval."""
        if not self._frozen_shared(ctx):
            yield
            return
        with frozen_shared(ctx.model):
            yield

    def after_backward(self, ctx: Context) -> None:
        self._guard.mask_grads()

    def after_step(self, ctx: Context) -> None:
        if decays(ctx.optimizer):
            self._guard.restore()

    def after_task(self, ctx: Context) -> None:
        k = ctx.task.index
        owners = self.owners(ctx.model)
        params = ctx.model.named_parameters()
        with torch.no_grad():
            for n, own in self._trainable.items():
                owners[n][own.cpu()] = k + 1
                cut = prune_smallest(params[n], own.to(params[n].device), self.ratio(k))
                params[n][cut] = 0
                owners[n][cut.cpu()] = 0
        if self.params.retrain_epochs:
            self._trainable = {n: o == k + 1 for n, o in owners.items()}
            ctx.train_fit(epochs=self.params.retrain_epochs)
        self.store_shared(ctx, k)
        self.extra["tasks"] = [*self.finished(), k]

    def store_shared(self, ctx: Context, k: int) -> None:
        """per_task mode: a copy of the task's biases and BatchNorm tensors."""
        if self.params.shared != "per_task":
            return
        for n, t in shared_copy(ctx.model).items():
            self.state[state_key(SHARED, k, n)] = t

    # ---- evaluation ------------------------------------------------------------------------
    def task_weights(self, ctx: Context, task: Task) -> dict[str, Tensor]:
        """The masked parameters as task `task` sees them."""
        params = ctx.model.named_parameters()
        return {n: params[n].detach() * visible(o, task.index).to(params[n].device)
                for n, o in self.owners(ctx.model).items()}

    def task_shared(self, ctx: Context, task: Task) -> dict[str, Tensor]:
        """per_task mode: the task's stored biases and BatchNorm tensors (none before it ends)."""
        if self.params.shared != "per_task":
            return {}
        return stored(self.state, SHARED, task.index)

    @contextmanager
    def evaluation(self, ctx: Context, task: Task) -> Iterator[Scorer]:
        tensors = dict(ctx.model.module.state_dict(keep_vars=True))
        values = {**self.task_weights(ctx, task), **self.task_shared(ctx, task)}
        with swapped(tensors, values):
            yield ctx.model.head(ctx.head_of(task))

    # ---- state and size --------------------------------------------------------------------
    def state_spec(self) -> dict[str, TensorSpec]:
        spec = {OWNER: TensorSpec(("all",), "same", "int")}
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
        """Trunk and heads, plus the owner indices in the bits the finished tasks need, plus
        (per_task mode) the stored biases and BatchNorm copies."""
        parts = super().size_parts(model)
        parts["masks"] = mask_sizes(self.owners(model), len(self.finished()))
        if self.params.shared == "per_task":
            parts["per_task"] = [t for k, t in self.state.items()
                                 if k.startswith(f"{SHARED}/") and t.is_floating_point()]
        return parts
