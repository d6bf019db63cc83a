"""Model: a NetGraph with its compiled module and cached per-head views.

Strategies train `model.module`'s parameters; the graph is brought up to date from the module
(`model.graph`) whenever a graph operation or a checkpoint needs it. Replacing the graph
(after growth or compression) recompiles; `growth.optim.follow` moves optimizer state along.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from growth.compile import compile_graph, graph_with_weights, head_view
from growth.graph import NetGraph


class Model:
    """The network a strategy trains: graph (structure + last synced weights) and module."""

    def __init__(self, graph: NetGraph, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.replace_graph(graph)

    def replace_graph(self, graph: NetGraph) -> None:
        """Take `graph` (the first, or a grown or compressed one) and compile it."""
        graph.validate()
        self._graph = graph
        self.module: fx.GraphModule = compile_graph(graph).to(self.device)
        self._views: dict[str | tuple[str, ...], fx.GraphModule] = {}

    @property
    def heads(self) -> list[str]:
        return self._graph.heads

    def head(self, name: str | tuple[str, ...]) -> fx.GraphModule:
        """A module computing head `name` (or a dict of the heads in a tuple of names),
        sharing every parameter with `module`."""
        view = self._views.get(name)
        if view is None:
            view = self._views[name] = head_view(self.module, self._graph, name)
        return view

    @property
    def graph(self) -> NetGraph:
        """The structure with the module's current weights (a new graph; CPU tensors)."""
        return graph_with_weights(self._graph, self.module)

    def named_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self.module.named_parameters())

    def trunk_parameter_names(self) -> list[str]:
        """Parameters shared by all heads (or all of them, in a single-head network)."""
        trunk = set(self._graph.trunk_nodes())
        return [n for n in self.named_parameters() if n.split(".", 1)[0] in trunk]

    def train(self, mode: bool = True) -> Model:
        self.module.train(mode)
        return self

    def eval(self) -> Model:
        return self.train(False)
