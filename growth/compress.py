"""Compression: bring a grown network back to a size budget, then distil it from itself.

Two steps, one function (`compress`), the same for REC and for `growth compress`:

1. Shrink (`shrink`): the student is the *base* architecture. Every channel group of an original
   layer keeps its most important units (`prune_units`), as many as the base had (times a
   common factor below 1 when the budget is smaller than the base); layers that are not in the
   base (Net2Deeper's insertions) are first cut to their input's width, keeping the units that
   their (near-identity) weights tie to the kept inputs, then dropped with `remove_layer`. The
   trunk's parameter count ends at or under the budget.
2. Distil (`distill`): the one training loop (`growth.train.fit`, with the hooks of
   `growth.distillation.Distillation`) trains the student on a task's data with
   cross-entropy on the task plus, per head (the task's and every old head, old heads' outputs
   on new data as in LwF), KL at temperature T to the teacher (the expanded network, frozen;
   optionally another network for the old heads), plus an optional penalty (REC passes MWC's).

Unit importance (config `importance`): "magnitude" = L1 norm of each unit's incoming weights
over the group's producers; "fisher" = the diagonal Fisher of the unit's own parameters
(incoming weights and bias of every producer, per-channel BatchNorm parameters) measured through
the task's head on the task's data, plus any importance the caller adds (REC: old tasks'
Fisher, carried into the expanded network's shapes). Scores are computed once on the teacher:
pruning one group never changes another group's units, only their columns.

The budget counts *trunk* parameters (nodes feeding more than one head; the whole network when
it has one head): heads keep their classes, so only the trunk can shrink.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from growth.compile import compile_graph
from growth.distillation import Distillation
from growth.errors import OperatorError
from growth.graph import NetGraph
from growth.ops.channels import PRODUCERS, ChannelGroup, find_group, units
from growth.ops.prune_units import prune_units
from growth.ops.registry import ChangeRecord
from growth.ops.remove_layer import remove_layer
from growth.regularizers import task_fisher

if TYPE_CHECKING:
    from growth.context import Context, Hooks, TrainConfig
    from growth.data import Task

Penalty = Callable[["Context", Tensor, Tensor, Tensor], "Tensor | None"]
_SEARCH_STEPS = 20  # bisection steps on the width factor when the budget is below the base


class CompressParams(BaseModel):
    """Compression settings (validated; unknown keys are errors).

    budget: trunk parameters the student may have; a value <= 1 is a fraction of the base
    network's trunk; None means the base trunk's size (REC's "back to the base size").
    """

    model_config = ConfigDict(extra="forbid")
    budget: float | None = Field(None, gt=0, description="trunk parameters, or a fraction <= 1")
    importance: Literal["magnitude", "fisher"] = Field(
        "magnitude", description="how the units each layer keeps are chosen")
    epochs: int = Field(5, ge=0, description="distillation epochs on the task's data")
    kd_weight: float = Field(1.0, ge=0, description="weight of the KL terms (one per head)")
    mix: float | None = Field(
        None, ge=0, le=1, description="alpha: the loss is alpha CE + (1 - alpha) T^2 KL on "
        "each head (kd_weight then unused); None: CE + kd_weight T^2 KL")
    temperature: float = Field(2.0, gt=0, description="softening of the distilled outputs")
    patience: int | None = Field(
        None, ge=1, description="stop once the task's validation accuracy has not improved for "
        "this many epochs, keeping the best epoch's student (None: every epoch)")
    fisher_samples: int | None = Field(
        500, ge=1, description="training samples that estimate the Fisher (None: all)")


@dataclass
class CompressReport:
    """What one compression did: sizes, accuracies (on the task) and the operator records."""

    graph: NetGraph
    records: list[ChangeRecord]
    budget: int
    trunk_before: int
    trunk_after: int
    params_before: int
    params_after: int
    accuracy_before: dict[str, float] = field(default_factory=dict)
    accuracy_after: dict[str, float] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    widths: dict[str, int] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    wall_time_s: float = 0.0
    # test accuracy per task the network serves, before and after (`growth compress` fills it)
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-able figures (no graph, no records)."""
        return {"budget": self.budget, "trunk_before": self.trunk_before,
                "trunk_after": self.trunk_after, "params_before": self.params_before,
                "params_after": self.params_after, "accuracy_before": self.accuracy_before,
                "accuracy_after": self.accuracy_after, "dropped": self.dropped,
                "widths": self.widths, "losses": self.losses,
                "wall_time_s": self.wall_time_s, "tasks": self.tasks}


# ---- sizes -----------------------------------------------------------------------------------
def trunk_params(graph: NetGraph) -> int:
    """Trainable parameters of the trunk (all of them in a one-head network)."""
    return sum(graph.param_count(n) for n in graph.trunk_nodes())


def budget_params(budget: float | None, base: NetGraph) -> int:
    """The budget in parameters: a fraction (<= 1) of the base trunk, or a count."""
    if budget is None:
        return trunk_params(base)
    if budget <= 0:
        raise OperatorError(f"compression budget must be positive, got {budget}")
    return int(math.floor(budget * trunk_params(base))) if budget <= 1 else int(budget)


# ---- step 1: the student's structure -----------------------------------------------------------
def _in_width(graph: NetGraph, node: str) -> int:
    n = graph.node(node)
    return int(n.attrs["in_features" if n.kind == "linear" else "in_channels"])


@dataclass(frozen=True)
class _Plan:
    """Original channel groups (representative -> base width, unit scores) and inserted nodes."""

    groups: dict[str, tuple[int, Tensor | None]]
    inserted: list[str]


def _plan(teacher: NetGraph, base: NetGraph, importance: dict[str, Tensor] | None) -> _Plan:
    missing = [n for n in base.topo_order() if n not in teacher]
    if missing:
        raise OperatorError(f"compress: the network lacks base nodes {missing[:5]}; it is not "
                            "an expansion of the base network given")
    for n in base.topo_order():
        if teacher.node(n).kind != base.node(n).kind:
            raise OperatorError(f"compress: node {n!r} is a {teacher.node(n).kind} in the "
                                f"network but a {base.node(n).kind} in the base")
    shapes = teacher.shapes()
    groups: dict[str, tuple[int, Tensor | None]] = {}
    seen: set[frozenset[str]] = set()
    for n in base.topo_order():
        if base.node(n).kind not in PRODUCERS:
            continue
        try:
            group = find_group(teacher, n, shapes)
        except OperatorError:  # reaches a head, grouped conv, ...: must already be base-sized
            if units(teacher, n) != units(base, n):
                raise OperatorError(
                    f"compress: {n!r} has {units(teacher, n)} units against {units(base, n)} "
                    "in the base, and its units cannot be pruned") from None
            continue
        key = frozenset(group.producers)
        if key in seen:
            continue
        seen.add(key)
        groups[n] = (units(base, n), _unit_scores(teacher, group, importance))
    inserted = [n for n in teacher.topo_order() if n not in base]
    return _Plan(groups, inserted)


def _unit_scores(graph: NetGraph, group: ChannelGroup, importance: dict[str, Tensor] | None
                 ) -> Tensor:
    """One importance per unit of the group (see the module docstring)."""
    total = torch.zeros(group.width, dtype=torch.float64)
    if importance is None:
        for p in group.producers:
            total += graph.node(p).tensors["weight"].detach().abs().flatten(1).sum(1).double()
        return total
    for p in (*group.producers, *group.region):
        for key in ("weight", "bias"):
            t = importance.get(f"{p}.{key}")
            if t is None or t.shape[0] != group.width:
                continue  # a region node behind a flatten/concat holds other positions
            total += t.detach().double().cpu().reshape(group.width, -1).sum(1)
    return total


def _student(teacher: NetGraph, base: NetGraph, plan: _Plan, factor: float
             ) -> tuple[NetGraph, list[ChangeRecord], dict[str, int]]:
    """The base architecture at `factor` times the base widths, cut out of the teacher."""
    g, records, widths = teacher, [], {}
    for rep, (base_width, scores) in plan.groups.items():
        target = max(1, min(units(g, rep), int(math.floor(factor * base_width + 1e-9))))
        widths[rep] = target
        if target < units(g, rep):
            result = prune_units(g, rep, target, scores=scores)
            g, records = result.graph, [*records, result.record]
    for n in plan.inserted:  # topological: an insertion's input is final when it is reached
        if g.node(n).kind in PRODUCERS and units(g, n) > _in_width(g, n):
            result = prune_units(g, n, _in_width(g, n))  # L1 of incoming weights: alignment
            g, records = result.graph, [*records, result.record]
    for n in plan.inserted:
        try:
            result = remove_layer(g, n)
        except OperatorError as exc:
            raise OperatorError(f"compress: layer {n!r} is not in the base and cannot be "
                                f"dropped: {exc}") from None
        g, records = result.graph, [*records, result.record]
    _check_structure(g, base)
    return g, records, widths


def _check_structure(student: NetGraph, base: NetGraph) -> None:
    for n in base.topo_order():
        if student.inputs(n) != base.inputs(n):
            raise OperatorError(f"compress: after dropping the inserted layers, {n!r} reads "
                                f"{student.inputs(n)} instead of the base's {base.inputs(n)}")


def shrink(teacher: NetGraph, budget: int, base: NetGraph | None = None,
           importance: dict[str, Tensor] | None = None
           ) -> tuple[NetGraph, list[ChangeRecord], dict[str, int]]:
    """The student: `base`'s architecture (default: the teacher's own) cut out of `teacher`
    with at most `budget` trunk parameters. Returns (student, operator records in order,
    width kept per original channel group).

    importance: per-parameter importance in the teacher's shapes (units are then scored by
    it), or None for magnitude.
    """
    base = teacher if base is None else base
    plan = _plan(teacher, base, importance)
    student, records, widths = _student(teacher, base, plan, 1.0)
    if trunk_params(student) <= budget:
        return student, records, widths
    lo, hi = 0.0, 1.0
    best = None
    for _ in range(_SEARCH_STEPS):
        mid = (lo + hi) / 2
        candidate = _student(teacher, base, plan, mid)
        if trunk_params(candidate[0]) <= budget:
            lo, best = mid, candidate
        else:
            hi = mid
    if best is None:
        smallest = _student(teacher, base, plan, 0.0)[0]
        if trunk_params(smallest) > budget:
            raise OperatorError(f"compress: a budget of {budget:,} trunk parameters is below the "
                                f"smallest student ({trunk_params(smallest):,} with one unit "
                                "per layer); raise the budget")
        best = _student(teacher, base, plan, 0.0)
    return best


# ---- step 2: distillation ------------------------------------------------------------------------
def _frozen(graph: NetGraph, heads: list[str], ctx: Context) -> nn.Module:
    """The graph compiled for `heads` (always a dict of them), frozen, in eval mode."""
    module = compile_graph(graph, head=list(heads)).to(ctx.device)
    return module.eval().requires_grad_(False)


def default_heads(ctx: Context) -> list[str]:
    """The task's head and the heads of every task seen before (deduplicated, in order)."""
    return list(dict.fromkeys([ctx.head_of(ctx.task), *(ctx.head_of(t) for t in ctx.seen)]))


def split_accuracies(ctx: Context, task: Task, splits: tuple[str, ...]) -> dict[str, float]:
    """The model's accuracy on each of the task's splits that holds samples (a campaign
    evaluated on validation data has empty test splits: they are left out, not NaN)."""
    from growth.train import evaluate

    return {s: evaluate(ctx, task, s) for s in splits if len(getattr(task, s)[1])}


def compress(ctx: Context, params: CompressParams, train: TrainConfig,
             base: NetGraph | None = None, heads: list[str] | None = None,
             penalty: Penalty | None = None, importance: dict[str, Tensor] | None = None,
             seed: int = 0, splits: tuple[str, ...] = ("val", "test"),
             old_teacher: NetGraph | None = None) -> CompressReport:
    """Compress `ctx.model` (the teacher) to `params.budget` and distil it on `ctx.task`.

    After the call `ctx.model` is the student (through `ctx.replace_graph`, so whatever follows
    the graph, such as a strategy's state, is carried along the operator records).
    base: the architecture the student takes (default: the teacher's own; then only widths
    shrink). heads: heads to distil (default: the task's and the seen tasks'). penalty: added
    to the distillation loss on every batch (called like a strategy's `penalty`).
    importance: extra per-parameter importance in the teacher's shapes, added to the task's
    Fisher when `params.importance` is "fisher". splits: the task's splits whose accuracy is
    reported before and after. old_teacher: a network (with the same heads) that the heads
    other than the task's are distilled from instead of the teacher (REC: the network as it
    was before this task's expansion).
    """
    start = time.perf_counter()
    teacher = ctx.model.graph
    reference = teacher if base is None else base
    budget = budget_params(params.budget, reference)
    heads = default_heads(ctx) if heads is None else list(heads)
    before = split_accuracies(ctx, ctx.task, splits)
    scores = None
    if params.importance == "fisher":
        scores = task_fisher(ctx, ctx.task, params.fisher_samples)
        for name, extra in (importance or {}).items():
            if name in scores and extra.shape == scores[name].shape:
                scores[name] = scores[name] + extra.to(scores[name])
    student, records, widths = shrink(teacher, budget, base, scores)
    ctx.replace_graph(student, records)
    losses = distill(ctx, teacher, params, train, heads, penalty, seed, old_teacher)
    final = ctx.model.graph
    return CompressReport(
        graph=final, records=records, budget=budget, trunk_before=trunk_params(teacher),
        trunk_after=trunk_params(final), params_before=teacher.param_count(),
        params_after=final.param_count(), accuracy_before=before,
        accuracy_after=split_accuracies(ctx, ctx.task, splits),
        dropped=[n for n in teacher.topo_order() if n not in final], widths=widths,
        losses=losses, wall_time_s=time.perf_counter() - start)


def distill(ctx: Context, teacher: NetGraph, params: CompressParams, train: TrainConfig,
            heads: list[str], penalty: Penalty | None = None, seed: int = 0,
            old_teacher: NetGraph | None = None, hold: Hooks | None = None) -> list[float]:
    """Train `ctx.model` (the student) with the one loop: cross-entropy on `ctx.task` plus
    KL(T) to `teacher` on `heads` (to `old_teacher` on all but the task's own head, if given)
    plus `penalty`; `params.epochs` epochs; `hold`'s hooks keep the entries it holds still
    (growth.distillation). Returns the loss of each epoch."""
    from growth.train import fit

    own = ctx.head_of(ctx.task)
    others = [h for h in heads if h != own]
    split = old_teacher is not None and bool(others)
    teachers = [(_frozen(teacher, [own] if split else heads, ctx), [own] if split else heads)]
    if split:
        teachers.append((_frozen(old_teacher, others, ctx), others))
    weight = params.kd_weight if params.mix is None else 1.0 - params.mix
    distiller = Distillation(teachers, params.temperature, weight, penalty, ce=params.mix,
                             hold=hold)
    return fit(ctx, distiller, train.model_copy(update={"epochs": params.epochs,
                                                        "patience": params.patience}),
               seed=seed)
