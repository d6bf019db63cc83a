"""Progressive Nets (Rusu et al. 2016): one column per task, lateral adapters, nothing forgotten.

Task 0 trains the base trunk (column 0) and its head. Before each later task k, the strategy
freezes everything the earlier tasks' heads read (their columns, adapters and heads), adds
column k with `growth.ops.add_column` (a copy of the base trunk, freshly initialised from the
task's seed as torch initialises each layer kind, with lateral adapters from every earlier
column) and moves task k's head onto it. The loop then trains only what is not frozen; a
task's forward pass runs its own column and the columns it reads, never later ones.

Frozen nodes are marked in the graph itself (`frozen` attribute: no gradient, so no optimizer
state, weight decay or momentum; BatchNorm and dropout as in eval mode), so the columns, the
marks and the adapters travel in every checkpoint with the graph, and `growth resume` needs no
strategy state (`size_parts` reads columns and adapters off the graph). Earlier tasks'
outputs are therefore bitwise identical after any later task (CPU), and BWT is exactly 0.

Deviations: the adapters are graph layers (trained by the one loop, saved with the graph)
rather than strategy-state tensors; heads have no lateral inputs (a task's head reads its own
column's features only), so a trunk with a single hidden layer has no adapters at all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from growth.errors import ConfigError, OperatorError
from growth.graph import NetGraph
from growth.layers import ACTIVATIONS
from growth.ops.columns import add_column, column_count, column_members, freeze
from growth.strategies.base import Context, Strategy, StrategyParams

if TYPE_CHECKING:
    from growth.model import Model


class PNNParams(StrategyParams):
    """Progressive Nets settings.

    trunk: the node every head reads (the end of the base trunk, copied for each column).
    adapter_reduction: V projects the joined earlier columns' inputs of a layer to
    ceil(w / adapter_reduction) units, w the width of one column's input to that layer.
    alpha_init: the lateral scales' initial value (small, as in the paper).
    adapter_activation: the adapter's non-linearity between V and U.
    """

    trunk: str = Field("features", min_length=1, description="the node every head reads")
    adapter_reduction: float = Field(2.0, ge=1, description="V's width = input width / this")
    alpha_init: float = Field(0.01, allow_inf_nan=False,
                              description="initial value of each lateral scale alpha")
    adapter_activation: Literal[tuple(sorted(ACTIVATIONS))] = Field(  # type: ignore[valid-type]
        "relu", description="non-linearity between V and U")


class ProgressiveNets(Strategy):
    name = "pnn"
    description = "progressive nets: a new column per task with lateral adapters, old frozen"
    Params = PNNParams
    params: PNNParams
    scenarios = ("task",)  # a task's column is chosen by its task id

    def before_task(self, ctx: Context) -> None:
        head = ctx.head_of(ctx.task)
        seen = [ctx.head_of(t) for t in ctx.seen]
        if head in seen:
            raise ConfigError(f"strategy pnn needs one head per task, but task {ctx.task.name!r} "
                              f"shares head {head!r} with an earlier task; use scenario: task")
        graph = ctx.model.graph
        trunk = self.params.trunk
        if trunk not in graph:
            raise ConfigError(f"strategy.trunk: the graph has no node {trunk!r}; name the node "
                              "the heads read (e.g. 'features')")
        if not seen:  # task 0 trains the base trunk, column 0
            return
        frozen = freeze(graph, graph.ancestors(seen) - set(graph.input_nodes()))
        try:
            result = add_column(frozen.graph, [head], trunk=trunk,
                                reduction=self.params.adapter_reduction,
                                alpha=self.params.alpha_init,
                                activation=self.params.adapter_activation, seed=ctx.seed)
        except OperatorError as exc:
            raise ConfigError(f"strategy pnn cannot add a column for task {ctx.task.name!r}: "
                              f"{exc}") from None
        ctx.replace_graph(result.graph, [frozen.record, result.record])

    def size_parts(self, model: Model) -> dict[str, list[Any]]:
        """Model size by part: "trunk" (every column's copy of the base trunk), "heads" and
        "adapters" (the lateral adapters)."""
        params = model.named_parameters()
        return {part: [params[n] for n in names]
                for part, names in self.parameter_groups(model.graph).items()}

    def parameter_groups(self, graph: NetGraph) -> dict[str, list[str]]:
        """Parameter names by part ("trunk": all columns, "heads", "adapters"), read off the
        graph's structure."""
        names = {n: [f"{n}.{t}" for t in graph.node(n).tensors if t in ("weight", "bias")]
                 for n in graph.topo_order()}
        columns: list[str] = []
        adapters: list[str] = []
        for k in range(column_count(graph, self.params.trunk)):
            nodes, lateral = column_members(graph, k, self.params.trunk)
            columns += [p for n in nodes for p in names[n]]
            adapters += [p for n in lateral for p in names[n]]
        taken = set(columns) | set(adapters)
        heads = [p for ps in names.values() for p in ps if p not in taken]
        return {"trunk": columns, "heads": heads, "adapters": adapters}


__all__ = ["PNNParams", "ProgressiveNets"]
