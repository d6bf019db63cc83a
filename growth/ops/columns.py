"""Columns of a progressive network (Rusu et al. 2016), built from graph operations.

Column 0 is the base trunk: every node the trunk's end node (`trunk`, "features" in the
project's networks) reads, except the network input. `add_column` adds column k, a copy of
that trunk with freshly initialised tensors (nodes `c<k>_<name>`), and gives every dense
producer (linear, or conv2d with groups=1) of the copy that comes after the first layer a
lateral adapter reading the same layer input in each earlier column j < k:

    h_i^(k) = f(W_i^(k) h_{i-1}^(k) + U_i^(k) f(V_i^(k) [alpha_j * h_{i-1}^(j)]_{j<k}))

alpha_j: one `scale` node per earlier column (initialised small); V: a width-reducing
projection of the joined inputs (linear on the last dim for a linear layer, so vectors and
tokens alike; 1x1 conv2d for a convolution); f: an activation; U: into the layer's output
(linear, or conv2d with the layer's kernel, stride, padding and dilation; no bias); the sum
replaces the layer's output in the column, before its BatchNorm and activation. Producers
whose input has no producer before it (the first layer, or a layer reading the network input)
get no adapter, and neither do grouped or depthwise convolutions (a dense U there would
outweigh the layer many times over; the pointwise layer after them gets the lateral). Heads
named in `heads` are moved onto the new column's end; every other head reads exactly what it
read before, so old heads compute the same function. `freeze` marks nodes frozen (no
gradient; every layer computes as in eval mode), which is how earlier columns stay fixed
while a later one trains.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from growth.errors import GraphError, OperatorError
from growth.graph import NetGraph
from growth.layers import ACTIVATIONS, FROZEN
from growth.ops.channels import PRODUCERS
from growth.ops.registry import ChangeRecord, OpResult

LATERAL = "lat"  # the sum node of a layer's adapter is `c<k>_<layer>_lat`


def column_name(k: int, node: str) -> str:
    """The name of base-trunk node `node` in column k (column 0 is the base trunk itself)."""
    return node if k == 0 else f"c{k}_{node}"


def base_column(graph: NetGraph, trunk: str = "features") -> list[str]:
    """Column 0, the template of every column: `trunk` and all it reads but the input nodes,
    in topological order."""
    if trunk not in graph:
        raise OperatorError(f"the trunk's end node {trunk!r} is not in the graph; name the node "
                            "every head reads (e.g. 'features')")
    keep = graph.ancestors([trunk])
    return [n for n in graph.topo_order() if n in keep and graph.node(n).kind != "input"]


def column_count(graph: NetGraph, trunk: str = "features") -> int:
    """How many columns the graph holds (1: the base trunk only)."""
    k = 1
    while column_name(k, trunk) in graph:
        k += 1
    return k


def lateral_layers(graph: NetGraph, base: Sequence[str]) -> list[str]:
    """The producers of `base` that get adapters: dense ones (grouped and depthwise convolutions
    get none: the pointwise layer that follows them does) whose input has a producer before
    it."""
    members = set(base)
    out = []
    for n in base:
        node = graph.node(n)
        if node.kind not in PRODUCERS or node.attrs.get("groups", 1) != 1:
            continue
        before = graph.ancestors(graph.inputs(n)) & members
        if any(graph.node(b).kind in PRODUCERS for b in before):
            out.append(n)
    return out


def column_value(graph: NetGraph, k: int, node: str) -> str:
    """The node holding base node `node`'s value in column k (after its lateral sum, if any)."""
    lateral = f"{column_name(k, node)}_{LATERAL}"
    return lateral if k > 0 and lateral in graph else column_name(k, node)


def column_members(graph: NetGraph, k: int, trunk: str = "features"
                   ) -> tuple[list[str], list[str]]:
    """Nodes of column k: (its copy of the trunk, its lateral adapters)."""
    base = base_column(graph, trunk)
    nodes = [column_name(k, n) for n in base]
    if k == 0:
        return nodes, []
    adapters = [a for p in lateral_layers(graph, base) for a in _adapter_names(graph, k, p)]
    return nodes, adapters


def _adapter_names(graph: NetGraph, k: int, layer: str) -> list[str]:
    stem = f"{column_name(k, layer)}_{LATERAL}"
    names = [*(f"{stem}_a{j}" for j in range(k)), f"{stem}_cat", f"{stem}_v", f"{stem}_f",
             f"{stem}_u", stem]
    return [n for n in names if n in graph]


def add_column(graph: NetGraph, heads: Iterable[str] = (), trunk: str = "features",
               reduction: float = 2.0, alpha: float = 0.01, activation: str = "relu",
               seed: int = 0, lateral: bool = True, init_from: int | None = None) -> OpResult:
    """Add the next column (with lateral adapters from every earlier one) and move `heads`
    onto it.

    reduction: V's width is ceil(w / reduction), w the width (channels or features) of one
    column's input to the layer. alpha: the initial lateral scale. activation: the adapter's
    non-linearity (a node kind). seed: the new tensors are drawn as torch initialises each
    layer kind, from a generator state seeded with `seed` (the global state is left as it was).
    lateral: False adds an independent copy of the trunk (no adapters, no reads from earlier
    columns). init_from: start the column's trunk tensors as copies of column `init_from`'s
    (an expert initialised from a related one) instead of fresh ones; adapters stay fresh.
    """
    heads = list(heads)
    _check_settings(reduction, alpha, activation)
    base = base_column(graph, trunk)
    k = column_count(graph, trunk)
    _check_source(init_from, k)
    moved = _head_inputs(graph, heads, trunk, base)
    params = {"column": k, "heads": heads, "trunk": trunk, "reduction": float(reduction),
              "alpha": float(alpha), "activation": activation, "seed": int(seed),
              "lateral": bool(lateral), "init_from": init_from}
    shapes = graph.shapes()
    dtype = _dtype(graph)
    out = graph.copy()
    members = set(base)
    laterals = set(lateral_layers(graph, base)) if lateral else set()
    added: list[str] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        for n in base:  # topological: a node's column inputs (and their adapters) exist
            added.append(_copy_node(graph, out, k, n, members, dtype))
            if init_from is not None and graph.node(n).tensors:
                source = graph.node(column_name(init_from, n)).tensors
                out.node(added[-1]).tensors = dict(source)
            if n in laterals:
                added.extend(_adapter(graph, out, k, n, shapes, reduction, alpha, activation,
                                      dtype))
    for consumer in moved:
        out.rewire(consumer, trunk, column_value(out, k, trunk))
    tensors = [f"{n}.{t}" for n in added for t in out.node(n).tensors]
    return OpResult(out, ChangeRecord("add_column", params, added=tensors, added_nodes=added))


def _check_settings(reduction: float, alpha: float, activation: str) -> None:
    if isinstance(reduction, bool) or not isinstance(reduction, (int, float)) \
            or not math.isfinite(reduction) or reduction < 1:
        raise OperatorError(f"add_column: reduction must be a number >= 1 (V's width is the "
                            f"layer input's width / reduction), got {reduction!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise OperatorError(f"add_column: alpha must be a finite number, got {alpha!r}")
    if activation not in ACTIVATIONS:
        raise OperatorError(f"add_column: activation {activation!r} is not an activation kind; "
                            f"use one of {sorted(ACTIVATIONS)}")


def _check_source(init_from: int | None, k: int) -> None:
    if init_from is None:
        return
    if isinstance(init_from, bool) or not isinstance(init_from, int) or not 0 <= init_from < k:
        raise OperatorError(f"add_column: init_from must be an existing column 0..{k - 1}, got "
                            f"{init_from!r}")


def _head_inputs(graph: NetGraph, heads: list[str], trunk: str, base: list[str]) -> list[str]:
    """The nodes reading `trunk` that serve only `heads`: what moves to the new column."""
    unknown = [h for h in heads if h not in graph.heads]
    if unknown:
        raise OperatorError(f"add_column: no head named {unknown}; the graph's heads are "
                            f"{graph.heads}")
    others = graph.ancestors(h for h in graph.heads if h not in heads)
    column0 = set(base)
    moved = []
    for h in heads:
        mine = [c for c in graph.consumers(trunk) if c in graph.ancestors([h])
                and c not in column0]
        if not mine:
            raise OperatorError(f"add_column: head {h!r} does not read the base trunk's end "
                                f"{trunk!r} (it may read another column already)")
        shared = [c for c in mine if c in others]
        if shared:
            raise OperatorError(f"add_column: head {h!r} reads {trunk!r} through {shared}, which "
                                "other heads read too; move those heads with it or give each "
                                "head its own layers")
        moved.extend(c for c in mine if c not in moved)
    return moved


def _add_fresh(out: NetGraph, name: str, kind: str, inputs: list[str], dtype: torch.dtype,
               **attrs: object) -> str:
    """Add a node whose tensors are initialised as torch initialises its kind (drawn from the
    global generator, which `add_column` seeds), in the precision `dtype`."""
    out.add(name, kind, inputs, **attrs)
    node = out.node(name)
    node.tensors = {k: v.to(dtype) if v.is_floating_point() else v
                    for k, v in node.tensors.items()}
    return name


def _copy_node(graph: NetGraph, out: NetGraph, k: int, node: str, members: set[str],
               dtype: torch.dtype) -> str:
    """Add column k's copy of base node `node`, reading column k's values (inputs outside the
    trunk, such as the network input, stay shared)."""
    src = graph.node(node)
    inputs = [column_value(out, k, i) if i in members else i for i in graph.inputs(node)]
    attrs = {a: v for a, v in src.attrs.items() if a != FROZEN}
    try:
        return _add_fresh(out, column_name(k, node), src.kind, inputs, dtype, **attrs)
    except GraphError as exc:
        raise OperatorError(f"add_column: cannot copy {node!r} into column {k}: {exc}") from None


def _adapter(graph: NetGraph, out: NetGraph, k: int, layer: str, shapes: dict, reduction: float,
             alpha: float, activation: str, dtype: torch.dtype) -> list[str]:
    """Column k's lateral adapter into `layer` (whose copy is in `out`); returns the new nodes,
    the sum that stands for the layer's output in column k last."""
    source = graph.inputs(layer)[0]
    shape = shapes[source]
    spec = graph.node(layer)
    dense = spec.kind == "linear"  # reads features on its last dim (vectors, tokens)
    width = max(1, math.ceil(shape[-1 if dense else 0] / reduction))
    stem = f"{column_name(k, layer)}_{LATERAL}"
    names: list[str] = []

    def add(suffix: str, kind: str, inputs: list[str], **attrs: object) -> str:
        try:
            names.append(_add_fresh(out, f"{stem}_{suffix}" if suffix else stem, kind, inputs,
                                    dtype, **attrs))
        except GraphError as exc:
            raise OperatorError(f"add_column: cannot add the adapter of {layer!r} in column "
                                f"{k}: {exc}") from None
        return names[-1]

    scaled = [add(f"a{j}", "scale", [column_value(out, j, source)], init=float(alpha))
              for j in range(k)]
    joined = scaled[0] if k == 1 else add("cat", "concat", scaled, dim=-1 if dense else 0)
    if dense:
        v = add("v", "linear", [joined], out_features=width)
    else:
        v = add("v", "conv2d", [joined], out_channels=width, kernel_size=1)
    f = add("f", activation, [v])
    if dense:
        u = add("u", "linear", [f], out_features=spec.attrs["out_features"], bias=False)
    else:
        u = add("u", "conv2d", [f], out_channels=spec.attrs["out_channels"], bias=False,
                **{a: spec.attrs[a] for a in ("kernel_size", "stride", "padding", "dilation")})
    add("", "add", [column_name(k, layer), u])
    return names


def _dtype(graph: NetGraph) -> torch.dtype:
    for t in graph.named_tensors().values():
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


def freeze(graph: NetGraph, nodes: Iterable[str], frozen: bool = True) -> OpResult:
    """Mark `nodes` frozen (or, with frozen=False, trainable again). A frozen node's parameters
    get no gradient (so no optimizer state, weight decay or momentum moves them) and its
    BatchNorm and dropout run as in eval mode even while the rest of the network trains."""
    names = sorted(set(nodes))
    for n in names:
        graph.node(n)  # a GraphError naming a missing node
    out = graph.copy()
    for n in names:
        attrs = out.node(n).attrs
        if frozen:
            attrs[FROZEN] = True
        else:
            attrs.pop(FROZEN, None)
    return OpResult(out, ChangeRecord("freeze", {"nodes": names, "frozen": bool(frozen)}))


def frozen_nodes(graph: NetGraph) -> list[str]:
    """The nodes marked frozen, in topological order."""
    return [n for n in graph.topo_order() if graph.node(n).attrs.get(FROZEN)]
