"""remove_layer: drop a one-input layer and reconnect its consumers to its input.

The inverse of Net2Deeper's insertion: while an inserted layer is still the identity, removing
it gives back exactly the network before the insertion. Removal is refused wherever it would
change a shape (the layer's output must have its input's shape), so the rest of the graph is
never touched: no tensor is resized, only the layer's own tensors disappear.
"""

from __future__ import annotations

from growth.errors import OperatorError
from growth.graph import NetGraph
from growth.ops.registry import ChangeRecord, OpResult


def remove_layer(graph: NetGraph, node: str) -> OpResult:
    """Remove `node` (one input, same output shape as its input); its consumers read its input."""
    layer = graph.node(node)
    if layer.kind in ("input", "output"):
        raise OperatorError(f"remove_layer({node!r}): {layer.kind} nodes cannot be removed; "
                            "remove a layer between the input and the heads")
    inputs = graph.inputs(node)
    if len(inputs) != 1:
        raise OperatorError(f"remove_layer({node!r}): a {layer.kind} node reads {len(inputs)} "
                            f"inputs {inputs}, so no single input can take its place; only "
                            "one-input layers can be removed")
    src = inputs[0]
    before, after = graph.shape(src), graph.shape(node)
    if before != after:
        raise OperatorError(
            f"remove_layer({node!r}): its output shape {after} differs from its input's "
            f"({src!r}, {before}); removing it would change the shapes its consumers read. "
            "Resize it first (e.g. prune_units to the input's width) or keep it")
    out = graph.copy()
    for consumer in out.consumers(node):
        out.rewire(consumer, node, src)
    out.remove(node)
    removed = [f"{node}.{k}" for k in layer.tensors]
    return OpResult(out, ChangeRecord("remove_layer", {"node": node}, removed=removed,
                                      removed_nodes=[node]))
