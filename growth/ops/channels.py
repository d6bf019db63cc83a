"""Channel groups: every tensor that must change when one layer's output units change.

Resizing the outputs of a producer (linear `out_features`, conv2d `out_channels`) touches the
whole channel space it writes: producers whose outputs meet it through `add` or `mul` (a
residual group, a squeeze-and-excitation gate: all change with one mapping), the nodes
downstream that keep channels apart (BN tensors, activations, pools, depthwise convolutions,
layer scales, permutes and reshapes that leave the channel axis whole) and the input columns of
every linear/conv2d that reads the space, also through `flatten` (each channel becomes many
features) and `concat` (the space sits at an offset). The channel axis of each node comes from
`growth.ops.layout`. Net2Wider and pruning are the same walk with a different index vector, so
both live on `find_group` + `apply_index`. Attention layers (`attention`, `self_attention`)
read a token space through their qkv projection and write one through their output projection,
like a linear layer. A LayerNorm or GroupNorm over the channels is crossed only by copying
every unit the same number of times (the group's `tile`): its mean and variance are then those
of the original units. A node where no mapping keeps the function (windowed attention, channel
shuffles, programs) stops the walk with an OperatorError that names it and says why.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from growth.errors import OperatorError
from growth.graph import NetGraph, Node
from growth.layers import Shape, buffer_names, kind_of
from growth.ops.layout import Axis, feature_axes, indexed_dims, kept_axis

PRODUCERS = frozenset({"linear", "conv2d"})
ATTENTION = frozenset({"attention", "self_attention"})  # qkv reads a space, proj writes one
LAYERS = PRODUCERS | ATTENTION
_SIZE_ATTR = {"linear": ("in_features", "out_features"), "conv2d": ("in_channels", "out_channels"),
              "attention": ("dim", "dim_out"), "self_attention": ("embed_dim", "embed_dim")}
_ROWS = {"attention": ("proj.weight", "proj.bias"),
         "self_attention": ("out_proj.weight", "out_proj.bias")}  # default: weight, bias
_COLUMNS = {"attention": "qkv.weight", "self_attention": "in_proj_weight"}  # default: weight


def row_weight(kind: str) -> str:
    """The tensor whose rows are a producer's output units (an attention layer's output
    projection, else its weight)."""
    return _ROWS.get(kind, ("weight", "bias"))[0]


@dataclass(frozen=True, eq=False)
class ChannelGroup:
    """The producers, downstream nodes and consumers of one channel space (topological order)."""

    node: str  # the producer asked for
    producers: tuple[str, ...]  # write the space: output rows follow the index
    region: tuple[str, ...]  # pass/add/concat/flatten nodes whose output follows the index
    consumers: tuple[str, ...]  # linear/conv2d reading the space: input columns follow it
    width: int
    shapes: Mapping[str, Shape] = field(repr=False)  # per-sample shapes before the change
    axes: Mapping[str, Axis] = field(repr=False, default_factory=dict)  # channel axis per node
    block: int = 1  # channels change in whole aligned blocks of this size (grouped convs)
    tile: str | None = None  # a norm over the channels: widening copies every unit equally


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
def find_group(graph: NetGraph, node: str, shapes: Mapping[str, Shape] | None = None,
               op: str = "resize") -> ChannelGroup:
    """The channel group of producer `node`; an OperatorError naming the operator `op`, the node
    and the reason if its channels cannot change without changing the function."""
    shapes = graph.shapes() if shapes is None else shapes
    return _Walk(graph, node, shapes, feature_axes(graph, shapes), op).run()


class _Walk:
    """One walk over a channel space, from the producer asked for."""

    def __init__(self, graph: NetGraph, node: str, shapes: Mapping[str, Shape],
                 axes: Mapping[str, Axis], op: str) -> None:
        self.graph, self.node, self.shapes, self.axes, self.op = graph, node, shapes, axes, op
        self.block = 1  # lcm of the input group widths of the grouped convs on the way
        self.tile: str | None = None  # the first norm over the channels on the way

    def refuse(self, why: str) -> OperatorError:
        return OperatorError(f"{self.op}({self.node!r}): cannot resize {self.node!r}: {why}")

    def run(self) -> ChannelGroup:
        self.check_producer(self.node)
        producers, region, consumers = {self.node}, {}, set()
        stack: list[tuple[str, bool]] = [(self.node, True)]  # (in the space, index unchanged)
        while stack:
            src, plain = stack.pop()
            for c in self.graph.consumers(src):
                role = self.role(c, src)
                if role == "consumer":
                    consumers.add(c)
                elif role == "merge" and not plain:  # checked before `in region`: order-free
                    raise self.refuse(
                        f"its channels reach {self.kind(c)} {c!r} after a concat or flatten, "
                        "where the other operands would need a different mapping; resize a "
                        "layer outside that path")
                elif c in region:
                    continue
                elif role == "merge":
                    region[c] = True
                    stack.append((c, True))
                    for member in self.members(c, producers, region):
                        producers.add(member)
                        stack.append((member, True))
                else:  # "pass" keeps the index, "moved" offsets or expands it
                    self.grouped_reads(c, plain)
                    self.norm_reads(c, src, plain)
                    region[c] = plain and role == "pass"
                    stack.append((c, region[c]))
        for n in (*producers, *consumers):  # its in and out width is one (embed_dim)
            if self.kind(n) == "self_attention" and (n in producers) != (n in consumers):
                raise self.refuse(f"self_attention {n!r} reads and writes one width "
                                  "(embed_dim), but only its "
                                  f"{'output' if n in producers else 'input'} is in this group")
        order = {n: i for i, n in enumerate(self.shapes)}
        ranked = lambda names: tuple(sorted(names, key=order.__getitem__))  # noqa: E731
        return ChannelGroup(self.node, ranked(producers), ranked(region), ranked(consumers),
                            self.shapes[self.node][self.axes[self.node]], self.shapes, self.axes,
                            self.block, self.tile)

    def grouped_reads(self, c: str, plain: bool) -> None:
        """A grouped conv reading the space: its groups grow with whole copied groups of
        channels, so the space changes in blocks of its group width (aligned, hence plain)."""
        node = self.graph.node(c)
        if not _grouped(node):
            return
        width = group_width(node)
        if width > 1 and not plain:
            raise self.refuse(f"its channels reach grouped convolution {c!r} after a concat, "
                              "flatten or channel expansion, so its groups could not stay whole")
        self.block = math.lcm(self.block, width)

    def norm_reads(self, c: str, src: str, plain: bool) -> None:
        """A LayerNorm or GroupNorm over the channels: its statistics stay those of the original
        units only if every unit is copied the same number of times (tiling), which needs the
        whole space, unmoved."""
        if self.kind(c) not in ("layernorm", "groupnorm") or not _normalises(
                self.graph.node(c), self.shapes[src], self.axes[src]):
            return
        if not plain:
            raise self.refuse(f"its channels reach {self.kind(c)} {c!r} after a concat, flatten "
                              "or channel expansion, where copying every unit equally would not "
                              "keep its mean and variance")
        if self.tile is None:
            self.tile = c

    def kind(self, name: str) -> str:
        return self.graph.node(name).kind

    # ---- what a node does to the space it reads -----------------------------------------------
    def role(self, c: str, src: str) -> str:
        """"consumer", "merge" (operands share the mapping), "pass" (same index, maybe on another
        axis) or "moved" (an offset or expanded index); raises where no mapping can follow."""
        node, kind = self.graph.node(c), self.graph.node(c).kind
        axis, shape = self.axes[src], self.shapes[src]
        if kind == "output":
            raise self.refuse(f"its channels reach output head {c!r} (through {src!r}), so the "
                              "network's output would change size; resize an inner layer")
        if axis is None:
            raise self.refuse(f"its channels are split or merged with another axis at {src!r} "
                              f"({self.kind(src)}), where no mapping can follow them")
        if kind == "conv2d" and _grouped(node):
            self.need(axis == 0, c, "a grouped convolution reads channels along axis 0")
            return "pass" if node.attrs["out_channels"] == node.attrs["in_channels"] else "moved"
        if kind in LAYERS:
            self.check_layer(c, src)
            return "consumer"
        if kind in ("add", "mul"):
            self.need_full(c, src)
            return "merge"
        if kind == "concat":
            if node.attrs["dim"] % len(shape) == axis:
                return "moved"
            self.need_full(c, src)
            return "merge"
        if kind == "flatten":
            return "moved"
        if kind in _AXIS_ZERO:
            self.need(axis == 0, c, f"{kind} works on channels along axis 0")
            return "pass"
        check = _CHECKS.get(kind)
        if check is not None:
            why = check(node, shape, axis)
            if why:
                raise self.refuse(f"its channels reach {kind} {c!r}, which {why}")
            return "pass"
        if kind_of(kind).channels == "pass":
            return "pass"
        raise self.refuse(f"its channels reach {c!r} ({kind}), which the channel-group walk "
                          "does not know how to resize")

    def need(self, ok: bool, c: str, why: str) -> None:
        if not ok:
            raise self.refuse(f"{self.kind(c)} {c!r}: {why}, but the channels lie along another "
                              "axis there")

    def need_full(self, merge: str, src: str) -> None:
        """A space broadcast along its channels at a merge cannot grow: its one channel is
        shared by all the channels of the other operands."""
        axis, merged = self.axes[src], self.axes[merge]
        if merged is None:  # the operands' layouts differ: refused where the walk goes on
            return
        if self.shapes[src][axis] == 1 and self.shapes[merge][merged] > 1:
            raise self.refuse(
                f"its single channel is broadcast over the {self.shapes[merge][axis]} channels "
                f"of {self.kind(merge)} {merge!r}; more channels would no longer broadcast")

    def members(self, merge: str, producers: set[str], region: dict[str, bool]) -> list[str]:
        """Producers feeding `merge` that are not in the group yet (walking back through nodes
        that keep channels apart): every operand must change with the same mapping."""
        found: list[str] = []
        stack = self.operands(merge)
        seen: set[str] = set()  # a node reached again by another path answers the same
        while stack:
            n = stack.pop()
            if n in producers or n in region or n in seen:
                continue
            seen.add(n)
            kind = self.kind(n)
            if kind in LAYERS and not _grouped(self.graph.node(n)):
                self.check_producer(n)
                found.append(n)
                continue
            if kind in ("add", "mul") or (kind == "concat" and self.role(n, self.graph.inputs(
                    n)[0]) == "merge"):
                stack.extend(self.operands(n))
                continue
            try:
                role = self.role(n, self.graph.inputs(n)[0]) if kind != "input" else None
            except OperatorError:
                role = None
            if role != "pass":
                what = "the network input" if kind == "input" else f"{kind} node"
                raise self.refuse(
                    f"its output meets, at {self.kind(merge)} {merge!r}, {what} {n!r}, whose "
                    "channels cannot change with it; resize a layer outside this group or give "
                    "that operand a projection layer")
            stack.extend(self.graph.inputs(n))
        return found

    def operands(self, merge: str) -> list[str]:
        """The inputs of a merge that carry channels (a gate broadcast over them does not)."""
        axis = self.axes[merge]
        out = self.shapes[merge]
        return [i for i in self.graph.inputs(merge)
                if axis is None or out[axis] == 1 or self.shapes[i][axis] != 1]

    # ---- layers that write or read the space ---------------------------------------------------
    def check_producer(self, name: str) -> None:
        n = self.graph.node(name)
        if n.kind == "conv2d" and _grouped(n):
            what = "depthwise" if group_width(n) == 1 else "grouped"
            src = self.graph.inputs(name)[0]
            raise self.refuse(f"{name!r} is a {what} convolution (groups={n.attrs['groups']}): "
                              f"its channels follow its input's groups; resize the layer that "
                              f"produces {src!r} instead, and its groups grow with it")
        if n.kind not in LAYERS:
            raise self.refuse(f"node {name!r} is a {n.kind} node, which has no output units to "
                              "resize; pick a linear or conv2d node")

    def check_layer(self, name: str, src: str) -> None:
        """A linear/conv2d reading the space: it must read along the channel axis."""
        n = self.graph.node(name)
        axis, shape = self.axes[src], self.shapes[src]
        who = f"{name!r}" if name == self.node else \
            f"{name!r} (in the channel group of {self.node!r})"
        if n.kind in ATTENTION and axis != len(shape) - 1:
            raise self.refuse(f"node {who} is an attention layer reading the features of tokens "
                              f"(the last axis of {shape}), but the channels lie along axis "
                              f"{axis}")
        if n.kind == "linear" and axis != len(shape) - 1:
            raise self.refuse(f"node {who} is a linear layer reading the last axis of a {shape} "
                              f"input whose channels lie along axis {axis}; insert a flatten "
                              "before it to resize its channels")
        if n.kind == "conv2d" and axis != 0:
            raise self.refuse(f"node {who} is a convolution reading axis 0 of a {shape} input "
                              f"whose channels lie along axis {axis}")


def _grouped(node: Node) -> bool:
    """A convolution with groups (depthwise ones included): its groups grow with its input."""
    return node.kind == "conv2d" and node.attrs.get("groups", 1) > 1


def units(graph: NetGraph, node: str) -> int:
    """A producer's units, read off its settings: a linear layer over a transformer's tokens
    has the tokens, not its units, on its output's first axis."""
    n = graph.node(node)
    return int(n.attrs["out_features" if n.kind == "linear" else "out_channels"])


def group_width(node: Node) -> int:
    """Input channels per group of a convolution (1 for depthwise ones)."""
    return node.attrs["in_channels"] // node.attrs.get("groups", 1)


# Kinds that keep channels apart only where the channels lie along axis 0 of their input.
_AXIS_ZERO = frozenset({"batchnorm1d", "batchnorm2d", "maxpool2d", "avgpool2d",
                        "adaptive_avgpool2d", "interpolate"})
_ATTENTION = ("mixes all features of a token (heads split them), so copied units would change "
              "its output; resize layers inside its MLP instead")


def _normalises(node: Node, shape: Shape, axis: int) -> bool:
    """Whether a layernorm/groupnorm computes its statistics over the channel axis."""
    if node.kind == "groupnorm":
        return axis == 0
    return axis >= len(shape) - len(node.attrs["normalized_shape"])


def _pad_check(node: Node, shape: Shape, axis: int) -> str | None:
    pad = list(node.attrs["pad"])
    padded = {len(shape) - 1 - i for i in range(len(pad) // 2) if pad[2 * i] or pad[2 * i + 1]}
    return "pads along the channels" if axis in padded else None


def _mean_check(node: Node, shape: Shape, axis: int) -> str | None:
    dims = {d % len(shape) for d in node.attrs["dims"]}
    return "averages over the channels" if axis in dims else None


def _index_check(node: Node, shape: Shape, axis: int) -> str | None:
    return "slices the channels" if axis in indexed_dims(node.attrs["index"], shape) else None


def _reshape_check(node: Node, shape: Shape, axis: int) -> str | None:
    if kept_axis(shape, tuple(node.attrs["shape"]), axis) is None:
        return "splits the channel axis or merges it with another"
    return None


def _token_check(node: Node, shape: Shape, axis: int) -> str | None:
    return None if axis == len(shape) - 1 else "prepends tokens along the channel axis"


_CHECKS = {
    "layernorm": lambda node, shape, axis: None,  # see _Walk.norm_reads
    "groupnorm": lambda node, shape, axis: (
        None if axis == 0 else "normalises groups of channels along axis 0"),
    "sum": lambda node, shape, axis: _mean_check(node, shape, axis) and "sums over the channels",
    "program": lambda node, shape, axis: (
        None if node.attrs.get("elementwise") else
        "replays calls the model makes (growth.program) that no growth rule crosses"),
    "pad": _pad_check,
    "mean": _mean_check,
    "getitem": _index_check,
    "reshape": _reshape_check,
    "class_token": _token_check,
    "permute": lambda node, shape, axis: None,
    "scale": lambda node, shape, axis: None,
    "offset": lambda node, shape, axis: None,
    "channel_shuffle": lambda node, shape, axis: (
        "interleaves the channels of its groups; copies of a channel would land in other "
        "groups"),
    "window_attention": lambda node, shape, axis: _ATTENTION,
    "relative_attention": lambda node, shape, axis: _ATTENTION,
}


# ---- applying an index ----------------------------------------------------------------------
def apply_index(graph: NetGraph, group: ChannelGroup, idx: torch.Tensor,
                divide: bool = False, fresh: bool = False) -> Changes:
    """Rewrite `group` in `graph` (a copy: its nodes are replaced, tensors never written in place)
    so new channel j is old channel idx[j]. divide=True splits each consumer's input column among
    the copies of its old channel (Net2Wider), which keeps the function unchanged. fresh=True
    gives every copy beyond an old channel's first a zero consumer column (recorded as fresh,
    -1): no consumer reads the copies, which keeps the function unchanged too."""
    idx = torch.as_tensor(idx, dtype=torch.long)
    changes = Changes()
    local: dict[str, torch.Tensor] = {p: idx for p in group.producers}
    for n in group.region:
        local[n] = _local_index(graph, n, local, group)
    for p in group.producers:
        _resize_rows(graph.node(p), idx, changes)
    for c in group.consumers:
        _resize_columns(graph.node(c), local[graph.inputs(c)[0]], divide, changes, fresh)
    for n in group.region:
        _resize_region(graph, n, local, group, changes)
    return changes


def _local_index(graph: NetGraph, name: str, local: dict[str, torch.Tensor],
                 group: ChannelGroup) -> torch.Tensor:
    """The index as seen at `name`'s output (offset by concat, expanded by flatten and by
    depthwise channel multipliers)."""
    node, inputs = graph.node(name), graph.inputs(name)
    shapes, axes = group.shapes, group.axes
    src = next(i for i in inputs if i in local)
    if node.kind == "flatten":  # the flat positions of each kept channel's values
        positions = torch.arange(math.prod(shapes[src])).view(shapes[src])
        return positions.index_select(axes[src], local[src]).flatten()
    if node.kind == "concat" and node.attrs["dim"] % len(shapes[src]) == axes[src]:
        parts, offset = [], 0
        for i in inputs:
            width = shapes[i][axes[src]]
            parts.append(local[i] + offset if i in local else torch.arange(offset,
                                                                           offset + width))
            offset += width
        return torch.cat(parts)
    if node.kind == "conv2d":  # grouped: new group q copies old group g[q], filters and all
        n_in, groups = group_width(node), node.attrs["groups"]
        n_out = node.attrs["out_channels"] // groups
        blocks = local[src].view(-1, n_in)
        old = blocks[:, 0] // n_in
        if bool((blocks[:, 0] % n_in).any()) or not torch.equal(
                blocks, old[:, None] * n_in + torch.arange(n_in)):
            raise OperatorError(f"the index does not keep whole groups of {n_in} channels of "
                                f"grouped convolution {name!r}; copy or drop whole groups")
        return (old[:, None] * n_out + torch.arange(n_out)).flatten()
    return local[src]  # pass nodes and merges (all operands share the producers' index)


def _resize_region(graph: NetGraph, name: str, local: dict[str, torch.Tensor],
                   group: ChannelGroup, changes: Changes) -> None:
    """Gather the tensors (and fix the attrs) of a node the space passes through."""
    node, idx = graph.node(name), local[name]
    if node.kind == "conv2d":  # grouped: each group's filters follow their channels
        for key in ("weight", "bias"):
            if key in node.tensors:
                changes.put(node, key, node.tensors[key].index_select(0, idx), 0, idx)
        width = len(local[graph.inputs(name)[0]])
        node.attrs.update(in_channels=width, out_channels=len(idx),
                          groups=width // group_width(node))
    elif node.kind in ("scale", "offset", "class_token"):
        _resize_param(node, idx, group.axes[name], len(group.shapes[name]), changes)
    elif node.kind == "layernorm":
        _resize_norm(node, idx, group.axes[name], len(group.shapes[name]), changes)
    elif node.kind == "groupnorm":
        _resize_group_norm(node, idx, changes)
    elif node.kind == "program":  # elementwise: only its recorded shapes change
        axis = group.axes[name]
        for shape in (*node.attrs["in_shapes"], node.attrs["shape"]):
            shape[axis] = len(idx)
    elif node.kind == "reshape":
        shape = list(node.attrs["shape"])
        shape[group.axes[name]] = len(idx)
        node.attrs["shape"] = shape
    elif node.kind == "getitem":  # a whole-axis slice written with bounds (0:C) must span C'
        index, axis = list(node.attrs["index"]), group.axes[graph.inputs(name)[0]]
        if axis < len(index):
            index[axis] = [None, None, None]
            node.attrs["index"] = index
    else:
        _resize_channelwise(node, idx, changes)


def _resize_param(node: Node, idx: torch.Tensor, axis: int, rank: int, changes: Changes
                  ) -> None:
    """A learned tensor broadcast onto the activations: gather its channel dim, unless it is
    1 there (one value shared by every channel, e.g. a scalar gate)."""
    weight = node.tensors["weight"]
    dim = axis + weight.dim() - rank  # right-aligned with the per-sample shape
    if dim < 0 or weight.shape[dim] == 1:
        return
    changes.put(node, "weight", weight.index_select(dim, idx), dim, idx)
    node.attrs["shape"] = list(node.tensors["weight"].shape)


def _resize_norm(node: Node, idx: torch.Tensor, axis: int, rank: int, changes: Changes) -> None:
    """A LayerNorm's affine tensors (shaped like its normalised dims) along the channel axis."""
    norm = list(node.attrs["normalized_shape"])
    dim = axis - (rank - len(norm))
    if dim < 0:  # normalises other dims: its tensors do not follow the channels
        return
    for key in ("weight", "bias"):
        if key in node.tensors:
            changes.put(node, key, node.tensors[key].index_select(dim, idx), dim, idx)
    norm[dim] = len(idx)
    node.attrs["normalized_shape"] = norm


def _resize_group_norm(node: Node, idx: torch.Tensor, changes: Changes) -> None:
    """GroupNorm: a tiling of its channels (each copy of the whole set) keeps every group's
    statistics with as many more groups; any other index would regroup the channels."""
    old = node.attrs["num_channels"]
    if len(idx) % old or not torch.equal(idx, torch.arange(len(idx)) % old):
        raise OperatorError(f"groupnorm {node.name!r}: its groups can only grow by whole copies "
                            "of all its channels (net2wider to a multiple of the width); "
                            "pruning through a GroupNorm would regroup its channels")
    _resize_channelwise(node, idx, changes)
    node.attrs.update(num_channels=len(idx),
                      num_groups=node.attrs["num_groups"] * len(idx) // old)


def _resize_rows(node: Node, idx: torch.Tensor, changes: Changes) -> None:
    weight, bias = _ROWS.get(node.kind, ("weight", "bias"))
    for key in (weight, bias):
        if key in node.tensors:
            changes.put(node, key, node.tensors[key].index_select(0, idx), 0, idx)
    _keep_head_dim(node)
    node.attrs[_SIZE_ATTR[node.kind][1]] = len(idx)


def _resize_columns(node: Node, cols: torch.Tensor, divide: bool, changes: Changes,
                    fresh: bool = False) -> None:
    key = _COLUMNS.get(node.kind, "weight")
    weight = node.tensors[key].index_select(1, cols)
    counts = None
    if divide:
        counts = torch.bincount(cols)[cols]
        weight = weight / counts.to(weight.dtype).view(1, -1, *([1] * (weight.dim() - 2)))
    if fresh:  # copies beyond each old column's first: zero, and fresh in the record
        first = first_occurrences(cols)
        weight = weight * first.to(weight.dtype).view(1, -1, *([1] * (weight.dim() - 2)))
        cols = torch.where(first, cols, torch.full_like(cols, -1))
    changes.put(node, key, weight, 1, cols)
    if counts is not None:
        changes.divisors.setdefault(f"{node.name}.{key}", {})[1] = counts.double().tolist()
    _keep_head_dim(node)
    node.attrs[_SIZE_ATTR[node.kind][0]] = len(cols)


def _keep_head_dim(node: Node) -> None:
    """A self_attention's heads keep their width when its embed_dim changes."""
    if node.kind == "self_attention" and node.attrs.get("head_dim") is None:
        node.attrs["head_dim"] = node.attrs["embed_dim"] // node.attrs["num_heads"]


def first_occurrences(index: torch.Tensor) -> torch.Tensor:
    """True where an entry of `index` appears for the first time (an old unit itself, not a
    copy of it)."""
    seen: set[int] = set()
    first = []
    for i in index.tolist():
        first.append(i not in seen)
        seen.add(i)
    return torch.tensor(first, dtype=torch.bool)


def _resize_channelwise(node: Node, idx: torch.Tensor, changes: Changes) -> None:
    for key in kind_of(node.kind).per_channel_tensors:
        if key in node.tensors:
            changes.put(node, key, node.tensors[key].index_select(0, idx), 0, idx)
    if "num_features" in node.attrs:
        node.attrs["num_features"] = len(idx)


def resizable(graph: NetGraph) -> list[str]:
    """Producers whose units can be widened or pruned exactly (see `not_resizable` for why the
    others cannot)."""
    shapes = graph.shapes()
    refused = not_resizable(graph, shapes)
    return [n for n in shapes if graph.node(n).kind in PRODUCERS and n not in refused]


def not_resizable(graph: NetGraph, shapes: Mapping[str, Shape] | None = None) -> dict[str, str]:
    """linear/conv2d nodes that cannot be widened or pruned, each with the reason."""
    shapes = graph.shapes() if shapes is None else shapes
    axes = feature_axes(graph, shapes)
    out = {}
    for name in shapes:
        if graph.node(name).kind in PRODUCERS:
            try:
                _Walk(graph, name, shapes, axes, "resize").run()
            except OperatorError as exc:
                out[name] = str(exc)
    return out


def widening_cost(graph: NetGraph, node: str, width: int,
                  group: ChannelGroup | None = None) -> int:
    """Trainable parameters that resizing `node` to `width` units adds (negative: removes),
    counted on shapes alone: no tensor is built, however large."""
    group = find_group(graph, node) if group is None else group
    check_blocks(group, width, "resize")
    probe = graph.copy()
    for n in (*group.producers, *group.region, *group.consumers):
        held = probe.node(n)
        held.tensors = {k: v.to("meta") for k, v in held.tensors.items()}
    idx = torch.arange(width) % group.width
    changes = apply_index(probe, group, idx)
    total = 0
    for name, (old, new) in changes.resized.items():
        owner, key = name.split(".", 1)
        node = graph.node(owner)
        if key not in buffer_names(node.kind, node.attrs):
            total += math.prod(new) - math.prod(old)
    return total


def widening_bound(graph: NetGraph, group: ChannelGroup, width: int) -> int:
    """An upper bound of `widening_cost`, from tensor sizes alone: every tensor of the group
    grows at most in proportion to the width (a concat's other inputs do not grow at all)."""
    total = sum(t.numel() for n in (*group.producers, *group.region, *group.consumers)
                for k, t in graph.node(n).tensors.items()
                if k not in buffer_names(graph.node(n).kind, graph.node(n).attrs))
    return math.ceil(total * max(width - group.width, 0) / group.width)


def check_tiles(group: ChannelGroup, width: int, op: str) -> None:
    """OperatorError unless `width` is a multiple of the group's (a norm over the channels is
    crossed: every unit must be copied the same number of times)."""
    if group.tile is not None and width % group.width:
        lo = width // group.width * group.width
        near = [w for w in (lo, lo + group.width) if w > group.width]
        raise OperatorError(
            f"{op}({group.node!r}): its channels reach {group.tile!r}, which normalises over "
            f"them; a widening keeps its mean and variance only when every unit is copied the "
            f"same number of times, so the width must be a multiple of {group.width}: use "
            f"{' or '.join(map(str, near))} instead of {width}")


def check_blocks(group: ChannelGroup, width: int, op: str) -> None:
    """OperatorError unless `width` differs from the group's by whole blocks (grouped convs)."""
    if (width - group.width) % group.block:
        lo = group.width + (width - group.width) // group.block * group.block
        raise OperatorError(
            f"{op}({group.node!r}): its channels feed grouped convolutions whose groups hold "
            f"{group.block} channels, so its width changes in steps of {group.block} (from "
            f"{group.width}); use width {lo} or {lo + group.block} instead of {width}")
