"""growth-residual: a zero-initialised residual layer as a growth operator (an example
operator plug-in for growth).

`residual_deeper(graph, after)` makes every consumer of node `after` read
`after + layer(after)`, where the new layer (a linear layer on feature vectors, a same-padded
convolution on channels-first images) starts with every weight at zero. The network computes
exactly what it did, whatever activation follows `after` (Net2Deeper needs a ReLU after
non-negative outputs), and the new layer still learns: the gradient of its weight is the
gradient at the sum times the layer's input, which is not zero.

Its role is "deeper": a search space that lists it in `operators` calls it as
`residual_deeper(graph, after=..., kernel_size=..., seed=...)` wherever it accepts to insert.
"""

from __future__ import annotations

import torch

from growth.errors import OperatorError
from growth.graph import NetGraph
from growth.ops import ChangeRecord, Operator, OpResult, feature_axes


def residual_deeper(graph: NetGraph, after: str, kernel_size: int = 3, seed: int = 0
                    ) -> OpResult:
    """Insert `after + layer(after)` with the layer at zero (see the module docstring).
    `seed` is accepted for the search role's call; a zero layer draws nothing."""
    if after not in graph or graph.node(after).kind in ("input", "output"):
        raise OperatorError(f"residual_deeper: {after!r} is not an inner node of the graph")
    consumers = graph.consumers(after)
    if not consumers:
        raise OperatorError(f"residual_deeper: nothing reads {after!r}")
    shape = graph.shape(after)
    if len(shape) == 1:
        kind, attrs, weight = "linear", {"out_features": shape[0]}, (shape[0], shape[0])
    elif len(shape) == 3 and feature_axes(graph)[after] == 0:
        if kernel_size % 2 == 0:
            raise OperatorError(f"residual_deeper: kernel_size must be odd, got {kernel_size}")
        c = shape[0]
        kind, weight = "conv2d", (c, c, kernel_size, kernel_size)
        attrs = {"out_channels": c, "kernel_size": kernel_size, "padding": kernel_size // 2}
    else:
        raise OperatorError(f"residual_deeper: {after!r} gives {tuple(shape)}; the layer goes "
                            "after feature vectors or channels-first image maps")
    dtype = next((t.dtype for n in graph for t in graph.node(n).tensors.values()
                  if t.is_floating_point()), torch.get_default_dtype())
    tensors = {"weight": torch.zeros(weight, dtype=dtype),
               "bias": torch.zeros(weight[0], dtype=dtype)}
    out = graph.copy()
    k = 1
    while f"{after}_res{k}" in out or f"{after}_res{k}_add" in out:
        k += 1
    layer = out.add(f"{after}_res{k}", kind, [after], tensors=tensors, **attrs)
    total = out.add(f"{layer}_add", "add", [after, layer])
    for c in consumers:
        out.rewire(c, after, total)
    record = ChangeRecord("residual_deeper", {"after": after, "kernel_size": kernel_size},
                          added=[f"{layer}.weight", f"{layer}.bias"],
                          added_nodes=[layer, total])
    return OpResult(out, record)


RESIDUAL = Operator("residual_deeper", "insert after + layer(after) with the layer at zero "
                    "(function-preserving after any activation)", residual_deeper,
                    role="deeper")
