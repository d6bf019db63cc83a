"""Channel groups: every tensor that must change when one layer's output units change.

Resizing the outputs of a producer (linear `out_features`, conv2d `out_channels`) touches the
whole channel space it writes: producers whose outputs meet it through `add` (a residual group
changes with one mapping), per-channel nodes downstream (BN tensors, activations, pools) and the
input columns of every linear/conv2d that reads the space, also through `flatten` (each channel
becomes H*W features) and `concat` (the space sits at an offset). Net2Wider and pruning are the
same walk with a different index vector, so both live on `find_group` + `apply_index`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from growth.errors import OperatorError
from growth.graph import NetGraph, Node
from growth.layers import Shape, kind_of

PRODUCERS = frozenset({"linear", "conv2d"})
_SIZE_ATTR = {"linear": ("in_features", "out_features"), "conv2d": ("in_channels", "out_channels")}


@dataclass(frozen=True, eq=False)
class ChannelGroup:
    """The producers, downstream nodes and consumers of one channel space (topological order)."""

    node: str  # the producer asked for
    producers: tuple[str, ...]  # write the space: output rows follow the index
    region: tuple[str, ...]  # pass/add/concat/flatten nodes whose output follows the index
    consumers: tuple[str, ...]  # linear/conv2d reading the space: input columns follow it
    width: int
    shapes: Mapping[str, Shape] = field(repr=False)  # per-sample shapes before the change


@dataclass
class Changes:
    """Resized tensors and their index maps, accumulated while a group is rewritten."""

    resized: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    index_maps: dict[str, dict[int, list[int]]] = field(default_factory=dict)
    divisors: dict[str, dict[int, list[float]]] = field(default_factory=dict)

    def put(self, node: Node, key: str, new: torch.Tensor, dim: int, index: torch.Tensor) -> None:
        name = f"{node.name}.{key}"
        old_shape = self.resized.get(name, (tuple(node.tensors[key].shape),))[0]
        self.resized[name] = (old_shape, tuple(new.shape))
        self.index_maps.setdefault(name, {})[dim] = index.tolist()
        node.tensors[key] = new


# ---- finding a group ------------------------------------------------------------------------
def find_group(graph: NetGraph, node: str, shapes: Mapping[str, Shape] | None = None
               ) -> ChannelGroup:
    """The channel group of producer `node`; OperatorError (naming the node) if it cannot change."""
    shapes = graph.shapes() if shapes is None else shapes
    _check_producer(graph, node, shapes, node)
    producers, region, consumers = {node}, {}, set()
    stack: list[tuple[str, bool]] = [(node, True)]  # (node in the space, at the producers' index)
    while stack:
        src, plain = stack.pop()
        for c in graph.consumers(src):
            kind = graph.node(c).kind
            if kind in PRODUCERS:
                _check_layer(graph, c, shapes, node)
                consumers.add(c)
            elif kind == "add" and not plain:  # checked before `in region`: order-independent
                raise OperatorError(
                    f"cannot resize {node!r}: its channels reach add {c!r} after a concat or "
                    "flatten, where the other operands would need a different mapping; resize a "
                    "layer outside that path")
            elif c in region:
                continue
            elif kind == "add":
                region[c] = True
                stack.append((c, True))
                for member in _members(graph, c, producers, region, node):
                    _check_producer(graph, member, shapes, node)
                    producers.add(member)
                    stack.append((member, True))
            elif kind_of(kind).channels == "pass":
                region[c] = plain
                stack.append((c, plain))
            elif kind in ("concat", "flatten"):
                region[c] = False
                stack.append((c, False))
            elif kind == "output":
                raise OperatorError(
                    f"cannot resize {node!r}: its channels reach output head {c!r} (through "
                    f"{src!r}), so the network's output would change size; resize an inner layer")
            else:
                raise OperatorError(f"cannot resize {node!r}: its channels reach {c!r} ({kind}), "
                                    "which the channel-group walk does not know how to resize")
    order = {n: i for i, n in enumerate(shapes)}
    ranked = lambda names: tuple(sorted(names, key=order.__getitem__))  # noqa: E731
    return ChannelGroup(node, ranked(producers), ranked(region), ranked(consumers),
                        shapes[node][0], shapes)


def _members(graph: NetGraph, add: str, producers: set[str], region: dict[str, bool],
             node: str) -> list[str]:
    """Producers feeding `add` that are not in the group yet (walking back through pass nodes)."""
    found: list[str] = []
    stack = list(graph.inputs(add))
    while stack:
        n = stack.pop()
        if n in producers or n in region or n in found:
            continue
        kind = graph.node(n).kind
        if kind in PRODUCERS:
            found.append(n)
        elif kind == "add" or kind_of(kind).channels == "pass":
            stack.extend(graph.inputs(n))
        else:
            what = "the network input" if kind == "input" else f"{kind} node"
            raise OperatorError(
                f"cannot resize {node!r}: its output is added at {add!r} to {what} {n!r}, whose "
                "channels cannot change with it; resize a layer outside this residual group or "
                "give the shortcut a projection layer")
    return found


def _check_producer(graph: NetGraph, name: str, shapes: Mapping[str, Shape], node: str) -> None:
    n = graph.node(name)
    if n.kind not in PRODUCERS:
        raise OperatorError(f"node {name!r} is a {n.kind} node, which has no output units to "
                            "resize; pick a linear or conv2d node")
    _check_layer(graph, name, shapes, node)


def _check_layer(graph: NetGraph, name: str, shapes: Mapping[str, Shape], node: str) -> None:
    n = graph.node(name)
    who = f"{name!r}" if name == node else f"{name!r} (in the channel group of {node!r})"
    if n.kind == "conv2d" and n.attrs.get("groups", 1) != 1:
        raise OperatorError(f"node {who} is a grouped convolution (groups={n.attrs['groups']}); "
                            "resizing channels through grouped convolutions is not supported")
    if n.kind == "linear" and len(shapes[graph.inputs(name)[0]]) != 1:
        raise OperatorError(f"node {who} is a linear layer applied to a "
                            f"{shapes[graph.inputs(name)[0]]} input (not a vector); insert a "
                            "flatten before it to resize its channels")


# ---- applying an index ----------------------------------------------------------------------
def apply_index(graph: NetGraph, group: ChannelGroup, idx: torch.Tensor,
                divide: bool = False) -> Changes:
    """Rewrite `group` in `graph` (a copy: its nodes are replaced, tensors never written in place)
    so new channel j is old channel idx[j]. divide=True splits each consumer's input column among
    the copies of its old channel (Net2Wider), which keeps the function unchanged."""
    idx = torch.as_tensor(idx, dtype=torch.long)
    changes = Changes()
    local: dict[str, torch.Tensor] = {p: idx for p in group.producers}
    for n in group.region:
        local[n] = _local_index(graph, n, local, group.shapes)
    for p in group.producers:
        _resize_rows(graph.node(p), idx, changes)
    for c in group.consumers:
        _resize_columns(graph.node(c), local[graph.inputs(c)[0]], divide, changes)
    for n in group.region:
        _resize_channelwise(graph.node(n), local[n], changes)
    return changes


def _local_index(graph: NetGraph, name: str, local: dict[str, torch.Tensor],
                 shapes: Mapping[str, Shape]) -> torch.Tensor:
    """The index as seen at `name`'s output (offset by concat, expanded by flatten)."""
    kind = graph.node(name).kind
    inputs = graph.inputs(name)
    if kind == "flatten":
        src = inputs[0]
        hw = math.prod(shapes[src][1:])
        return (local[src][:, None] * hw + torch.arange(hw)).flatten()
    if kind == "concat":
        parts, offset = [], 0
        for src in inputs:
            width = shapes[src][0]
            parts.append(local[src] + offset if src in local else torch.arange(offset,
                                                                               offset + width))
            offset += width
        return torch.cat(parts)
    return local[inputs[0]]  # pass nodes and add (all operands share the producers' index)


def _resize_rows(node: Node, idx: torch.Tensor, changes: Changes) -> None:
    for key in ("weight", "bias"):
        if key in node.tensors:
            changes.put(node, key, node.tensors[key].index_select(0, idx), 0, idx)
    node.attrs[_SIZE_ATTR[node.kind][1]] = len(idx)


def _resize_columns(node: Node, cols: torch.Tensor, divide: bool, changes: Changes) -> None:
    weight = node.tensors["weight"].index_select(1, cols)
    counts = None
    if divide:
        counts = torch.bincount(cols)[cols]
        weight = weight / counts.to(weight.dtype).view(1, -1, *([1] * (weight.dim() - 2)))
    changes.put(node, "weight", weight, 1, cols)
    if counts is not None:
        changes.divisors.setdefault(f"{node.name}.weight", {})[1] = counts.double().tolist()
    node.attrs[_SIZE_ATTR[node.kind][0]] = len(cols)


def _resize_channelwise(node: Node, idx: torch.Tensor, changes: Changes) -> None:
    for key in kind_of(node.kind).per_channel_tensors:
        if key in node.tensors:
            changes.put(node, key, node.tensors[key].index_select(0, idx), 0, idx)
    if "num_features" in node.attrs:
        node.attrs["num_features"] = len(idx)


def resizable(graph: NetGraph) -> list[str]:
    """Producers whose units can be widened or pruned (their group reaches no output head)."""
    shapes = graph.shapes()
    out = []
    for name in shapes:
        if graph.node(name).kind in PRODUCERS:
            try:
                find_group(graph, name, shapes)
            except OperatorError:
                continue
            out.append(name)
    return out
