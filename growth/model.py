"""Model: a NetGraph with its compiled module and cached per-head views.

Strategies train `model.module`'s parameters; the graph is brought up to date from the module
(`model.graph`) whenever a graph operation or a checkpoint needs it. Replacing the graph
(after growth or compression) recompiles; `growth.optim.follow` moves optimizer state along.
Besides heads, views compute any node's activation (`node_view`) or run the layers above a
node from a given activation (`view_above`), sharing the same parameters.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from growth.compile import compile_graph, graph_with_weights, head_view
from growth.errors import GraphError
from growth.graph import NetGraph

ViewKey = str | tuple[str, ...]


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
        self._views: dict[ViewKey, fx.GraphModule] = {}

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

    def node_view(self, node: str) -> fx.GraphModule:
        """A module computing the activation of `node` (e.g. the trunk's "features"), sharing
        every parameter with `module`."""
        key = ("@node", node)
        view = self._views.get(key)
        if view is None:
            g = self._graph.copy()
            g.add_output("node_view_output", node)
            view = self._views[key] = compile_graph(g, "node_view_output", modules=self.module)
        return view

    def view_above(self, node: str, heads: str | tuple[str, ...]) -> fx.GraphModule:
        """A module from `node`'s activation to `heads` (one tensor, or a dict for a tuple): the
        layers above `node`, sharing every parameter with `module`."""
        key = ("@above", node, *((heads,) if isinstance(heads, str) else heads))
        view = self._views.get(key)
        if view is None:
            above = graph_above(self._graph, node)
            view = compile_graph(above, heads if isinstance(heads, str) else list(heads),
                                 modules=self.module)
            self._views[key] = view
        return view

    def head_layer(self, head: str) -> str:
        """The node an output head reads: the layer computing the head's scores."""
        if head not in self._graph.heads:
            raise GraphError(f"no head named {head!r}; the graph's heads are {self._graph.heads}")
        return self._graph.inputs(head)[0]

    def nodes_below(self, node: str) -> set[str]:
        """`node` and every node it reads from: the layers that compute its activation."""
        return self._graph.ancestors([node])

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


def graph_above(graph: NetGraph, node: str) -> NetGraph:
    """The part of `graph` above `node`, whose input is `node`'s activation (an input node of
    the same name and shape). `node` must cut the network: no layer above it may read a layer
    below it."""
    below = graph.ancestors([node])
    out = NetGraph()
    out.add_input(node, graph.shape(node))
    for name in graph.topo_order():
        if name in below:
            continue
        inputs = graph.inputs(name)
        skip = [i for i in inputs if i in below and i != node]
        if skip:
            raise GraphError(f"node {name!r} reads {skip[0]!r}, below {node!r}: {node!r} does not "
                             "cut the network; choose a node every path to the heads goes through")
        n = graph.node(name)
        out.add(name, n.kind, inputs, tensors=n.tensors, **n.attrs)
    return out
