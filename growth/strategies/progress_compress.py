"""Progress & Compress (Schwarz et al., ICML 2018): an active column learns each task, then a
knowledge base of fixed size is distilled from it under online EWC.

The network holds two columns of the base trunk: the knowledge base (KB, column 0, read by the
tasks' heads t<k>) and the active column (column 1, added once with `growth.ops.add_column`:
lateral adapters from the KB into every layer after the first, as in Progressive Nets), with one
head of its own per task (`<head>_active`). Each task k runs two phases through the one loop:

1. Progress: the KB and every head but task k's active head are frozen (`freeze`: no gradient,
   BatchNorm as in eval mode); the active column, its adapters and its head for task k learn the
   task with cross-entropy (`progress_epochs`). With `reset_active` the active column and its
   adapters start each task from fresh weights (drawn from the task's seed).
2. Compress (the campaign's training of the task): the active side is frozen and the KB and
   head t<k> learn
       KL(active || KB) at temperature T (T^2-scaled) + (lambda / 2) sum_i F*_i (theta_i -
       theta*_i)^2,
   the distillation target being a frozen snapshot of the active column's outputs on the task's
   inputs (no labels), F* the online Fisher and theta* the KB after the previous task.
After compressing, the Fisher F_k of the KB on task k (empirical, through head t<k>) updates
F* <- gamma F* + F_k and theta* <- the KB now (state fisher/all/, anchor/latest/). The model
keeps a constant size: two trunks, the adapters and two heads per task. Evaluation uses the
KB's head of each task.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from growth.compile import compile_graph
from growth.errors import ConfigError, OperatorError
from growth.graph import NetGraph
from growth.layers import ACTIVATIONS, build_module
from growth.ops.columns import add_column, column_count, column_members, column_value, freeze
from growth.ops.registry import ChangeRecord
from growth.regularizers import Component, kd_loss, stored, task_fisher
from growth.strategies.base import Context, Strategy, StrategyParams
from growth.strategies.ewc import QuadraticStrategy
from growth.strategies.spec import TensorSpec

if TYPE_CHECKING:
    from growth.model import Model

ACTIVE = 1  # the active column's index (column 0 is the knowledge base)


class PCParams(StrategyParams):
    """Progress & Compress settings.

    lambda, gamma, fisher_samples: online EWC on the knowledge base (lambda 50 and gamma 1 are
    EWC's defaults here). temperature: of the distillation from the active column (1: the
    plain KL of the two predictive distributions). progress_epochs: the active column's
    training per task (None: train.epochs; the compress phase takes train.epochs).
    adapter_reduction, alpha_init, adapter_activation: the lateral adapters (as `pnn`).
    """

    trunk: str = Field("features", min_length=1, description="the node every head reads")
    lam: float = Field(50.0, alias="lambda", ge=0, description="online EWC strength")
    gamma: float = Field(1.0, ge=0, le=1, description="decay of the running Fisher")
    fisher_samples: int | None = Field(
        1000, ge=1, description="training samples that estimate a Fisher (None: all)")
    temperature: float = Field(1.0, gt=0, description="distillation temperature")
    progress_epochs: int | None = Field(
        None, ge=1, description="active column's epochs per task (None: train.epochs)")
    reset_active: bool = Field(True, description="fresh active column at every task")
    adapter_reduction: float = Field(2.0, ge=1, description="V's width = input width / this")
    alpha_init: float = Field(0.01, allow_inf_nan=False,
                              description="initial value of each lateral scale alpha")
    adapter_activation: Literal[tuple(sorted(ACTIVATIONS))] = Field(  # type: ignore[valid-type]
        "relu", description="non-linearity between V and U")


def active_head(head: str) -> str:
    """The output node of the active column's head serving `head`'s task."""
    return f"{head}_active"


class ProgressCompress(QuadraticStrategy):
    name = "progress_compress"
    description = "progress & compress: an active column learns each task (lateral " \
                  "adapters from the knowledge base), then the knowledge base is distilled " \
                  "from it under online EWC"
    Params = PCParams
    params: PCParams
    scenarios: ClassVar[tuple[str, ...]] = ("task",)

    def __init__(self, params: PCParams | None = None) -> None:
        super().__init__(params)
        self._teacher: nn.Module | None = None

    # ---- phases ------------------------------------------------------------------------------
    def before_task(self, ctx: Context) -> None:
        super().before_task(ctx)
        head = ctx.head_of(ctx.task)
        if head in (ctx.head_of(t) for t in ctx.seen):
            raise ConfigError(f"strategy progress_compress needs one head per task, but task "
                              f"{ctx.task.name!r} shares head {head!r}; use scenario: task")
        if self.params.trunk not in ctx.model.graph:
            raise ConfigError(f"strategy.trunk: the graph has no node {self.params.trunk!r}; "
                              "name the node the heads read (e.g. 'features')")
        start = time.perf_counter()
        self.progress(ctx)
        self._set_phase(ctx, "compress")
        self._teacher = compile_graph(ctx.model.graph, head=active_head(head)) \
            .to(ctx.device).eval().requires_grad_(False)
        entry = self._entry(ctx)
        entry["progress_s"] = time.perf_counter() - start

    def progress(self, ctx: Context) -> None:
        """Build (or reset) the active column and its head for the task, then train them on
        the task with the knowledge base frozen."""
        from growth.train import evaluate, fit  # the loop imports strategies: import late

        graph, records = self._active_side(ctx)
        ctx.replace_graph(graph, records)
        self._set_phase(ctx, "progress")
        head = ctx.head_of(ctx.task)
        mine = ctx.task.index
        progress = dataclasses.replace(
            ctx, head_of=lambda t: active_head(head) if t.index == mine else ctx.head_of(t))
        cfg = ctx.train_config
        fit(progress, Strategy(), cfg, seed=ctx.seed + 1, epochs=self.params.progress_epochs)
        entry = self._entry(ctx)
        split = "val" if len(ctx.task.val[1]) else "train"
        entry["active_acc"] = evaluate(progress, ctx.task, split)

    def _active_side(self, ctx: Context) -> tuple[NetGraph, list[ChangeRecord]]:
        """The graph with the active column (added once, reset on later tasks when asked) and
        task k's active head."""
        p = self.params
        graph = ctx.model.graph
        records: list[ChangeRecord] = []
        if column_count(graph, p.trunk) == 1:
            try:
                result = add_column(graph, [], trunk=p.trunk, reduction=p.adapter_reduction,
                                    alpha=p.alpha_init, activation=p.adapter_activation,
                                    seed=ctx.seed)
            except OperatorError as exc:
                raise ConfigError(f"strategy progress_compress cannot add the active column: "
                                  f"{exc}") from None
            graph, records = result.graph, [result.record]
        elif p.reset_active:
            graph = _fresh(graph, sum(column_members(graph, ACTIVE, p.trunk), []), ctx.seed)
        name = active_head(ctx.head_of(ctx.task))
        if name not in graph:
            graph = graph.copy()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(ctx.seed)
                layer = graph.add(f"head_{name}", "linear",
                                  [column_value(graph, ACTIVE, p.trunk)],
                                  out_features=ctx.task.n_classes)
            graph.add_output(name, layer)
            tensors = [f"head_{name}.{t}" for t in graph.node(layer).tensors]
            records.append(ChangeRecord("add_head", {"head": name}, added=tensors,
                                        added_nodes=[layer, name]))
        return graph, records

    def _set_phase(self, ctx: Context, phase: str) -> None:
        """Freeze everything but what the phase trains: the active column, its adapters and
        task k's active head (progress), or the knowledge base and head t<k> (compress)."""
        graph = ctx.model.graph
        p = self.params
        head = ctx.head_of(ctx.task)
        if phase == "progress":
            nodes, adapters = column_members(graph, ACTIVE, p.trunk)
            train = {*nodes, *adapters, *graph.ancestors([active_head(head)])} - \
                set(column_members(graph, 0, p.trunk)[0])
        else:
            train = graph.ancestors([head])
        others = [n for n in graph.topo_order() if n not in train
                  and graph.node(n).kind != "input"]
        frozen = freeze(graph, others)
        thawed = freeze(frozen.graph, sorted(train - set(graph.input_nodes())), frozen=False)
        ctx.replace_graph(thawed.graph, [frozen.record, thawed.record])
        self._quad = None

    # ---- compress: distillation plus online EWC ------------------------------------------------
    def loss(self, ctx: Context, x: Tensor, y: Tensor, logits: Tensor) -> Tensor:
        """KL(active || knowledge base) on the batch, T^2-scaled; the labels are not used."""
        if self._teacher is None:
            raise ConfigError("progress_compress: the compress phase has no teacher; learn "
                              "the task through the training loop (learn_task)")
        with torch.no_grad():
            target = self._teacher(x)
        return kd_loss(logits, target, self.params.temperature)

    def components(self, ctx: Context) -> list[Component]:
        if not self.finished():
            return []
        return [(self.params.lam / 2, stored(self.state, "fisher", "all"),
                 stored(self.state, "anchor", "latest"))]

    def consolidate(self, ctx: Context) -> None:
        """F* <- gamma F* + F_k (the KB's Fisher on task k), theta* <- the KB now."""
        fisher = task_fisher(ctx, ctx.task, self.params.fisher_samples)
        self.update_running(ctx, "fisher", fisher, self.params.gamma)
        self.mark_finished(ctx.task)
        self._teacher = None

    def _entry(self, ctx: Context) -> dict[str, Any]:
        return self.extra.setdefault("phases", {}).setdefault(str(ctx.task.index), {})

    # ---- state and size --------------------------------------------------------------------
    def state_spec(self) -> dict[str, TensorSpec]:
        return {"fisher": TensorSpec(("all",), "same"), "anchor": TensorSpec(("latest",), "same")}

    def run_report(self) -> dict[str, Any]:
        return {"details": {"progress_compress": self.extra.get("phases", {})}}

    def size_parts(self, model: Model) -> dict[str, list[Any]]:
        """"trunk": the knowledge base; "heads": its heads; "active": the active column and
        its heads; "adapters": the lateral adapters."""
        graph = model.graph
        params = model.named_parameters()
        trunk = self.params.trunk
        kb = column_members(graph, 0, trunk)[0]
        active, adapters = (column_members(graph, ACTIVE, trunk)
                            if column_count(graph, trunk) > 1 else ([], []))
        heads = [h for h in graph.heads if not h.endswith("_active")]
        active += [n for h in graph.heads if h.endswith("_active")
                   for n in graph.ancestors([h]) if n.startswith("head_")]

        def of(nodes: list[str]) -> list[Tensor]:
            return [params[f"{n}.{t}"] for n in nodes for t in graph.node(n).tensors
                    if f"{n}.{t}" in params]

        kb_heads = [n for h in heads for n in graph.ancestors([h]) if n.startswith("head_")]
        return {"trunk": of(kb), "heads": of(sorted(set(kb_heads))), "active": of(active),
                "adapters": of(adapters)}


def _fresh(graph: NetGraph, nodes: list[str], seed: int) -> NetGraph:
    """A copy of `graph` whose `nodes` hold fresh tensors, drawn as torch initialises each
    layer kind from a generator seeded with `seed`, in the graph's precision."""
    out = graph.copy()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        for n in nodes:
            node = out.node(n)
            if not node.tensors:
                continue
            fresh = build_module(node.kind, node.attrs).state_dict()
            node.tensors = {k: fresh[k].to(v.dtype) for k, v in node.tensors.items()}
    return out


__all__ = ["PCParams", "ProgressCompress", "active_head"]
