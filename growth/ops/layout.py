"""Where the channels (features) lie in each node's output: the layout the operators follow.

A linear layer mixes the last axis, a convolution the first of (C, H, W); pass-through kinds
keep their input's axis, permutes move it, reshapes keep it when they leave that axis whole.
Images start channels-first (axis 0), other inputs features-last. `None` means the channels
are split or merged with another axis there (e.g. (G, C/G, H, W) inside a channel shuffle),
so no operator can follow them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from growth.graph import NetGraph
from growth.layers import Attrs, Shape, decode_index

Axis = int | None

_LAST = frozenset({"linear", "layernorm", "self_attention", "attention", "window_attention",
                   "relative_attention"})
_FIRST = frozenset({"conv2d", "batchnorm1d", "batchnorm2d", "maxpool2d", "avgpool2d",
                    "adaptive_avgpool2d", "channel_shuffle", "flatten"})


def feature_axes(graph: NetGraph, shapes: Mapping[str, Shape] | None = None
                 ) -> dict[str, Axis]:
    """The feature axis of every node's (per-sample) output, in topological order."""
    shapes = graph.shapes() if shapes is None else shapes
    axes: dict[str, Axis] = {}
    for name, shape in shapes.items():
        node = graph.node(name)
        inputs = graph.inputs(name)
        axes[name] = output_axis(node.kind, node.attrs, [shapes[i] for i in inputs],
                                 [axes[i] for i in inputs], shape)
    return axes


def output_axis(kind: str, attrs: Attrs, in_shapes: list[Shape], in_axes: list[Axis],
                out: Shape) -> Axis:
    """The feature axis of one node's output, from its inputs'."""
    if kind == "input":
        return 0 if len(out) == 3 else len(out) - 1
    if kind in _LAST:
        return len(out) - 1
    if kind in _FIRST:
        return 0
    if not in_axes:
        return None
    axis = in_axes[0]
    if kind in ("add", "mul", "concat"):
        known = {a for a in in_axes if a is not None}
        return known.pop() if len(known) == 1 and None not in in_axes else None
    if axis is None:
        return None
    if kind == "permute":
        return list(attrs["dims"]).index(axis)
    if kind == "reshape":
        return kept_axis(in_shapes[0], out, axis)
    if kind == "getitem":
        return _indexed_axis(attrs["index"], in_shapes[0], axis)
    if kind == "program":  # opaque, unless it maps every value on its own
        return axis if attrs.get("elementwise") else None
    if kind in ("mean", "sum"):
        rank = len(in_shapes[0])
        dims = {d % rank for d in attrs["dims"]}
        if axis in dims:
            return None
        return axis if attrs["keepdim"] else axis - sum(d < axis for d in dims)
    return axis  # activations, normalisation-free pass-through, pad, scale, tokens, output


def kept_axis(src: Shape, out: Shape, axis: int) -> Axis:
    """Where a reshape from `src` to `out` puts axis `axis`, if it keeps that axis whole: the
    same size, after the same number of values."""
    before = math.prod(src[:axis])
    for j, size in enumerate(out):
        if size == src[axis] and math.prod(out[:j]) == before:
            return j
    return None


def _indexed_axis(index: list, shape: Shape, axis: int) -> Axis:
    """Where indexing leaves axis `axis`: None if it slices or picks along it."""
    items = list(decode_index(index))
    items += [slice(None)] * (len(shape) - len(items))
    item = items[axis]
    if not isinstance(item, slice) or item.indices(shape[axis]) != (0, shape[axis], 1):
        return None
    return axis - sum(isinstance(i, int) for i in items[:axis])


def indexed_dims(index: list, shape: Shape) -> list[int]:
    """The per-sample dims an index slices or picks along (not taken whole)."""
    items = list(decode_index(index))
    return [d for d, item in enumerate(items) if not (
        isinstance(item, slice) and item.indices(shape[d]) == (0, shape[d], 1))]
