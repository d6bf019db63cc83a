"""The Net2Net action space: which layers may widen (and to what), where a layer may be
inserted (and with which kernel), and how large a child may grow.

A space never decides on its own whether an operator accepts a change: widening is offered
only for layers in `growth.ops.resizable`, insertion only after nodes that
`growth.ops.deepenable` lists for the kernel size, and sizes are the operators' own counts
(`widening_cost`, `deepening_cost`), held to the operators' size guard (`max_new_params`).
So the space follows the operators when they learn new layer kinds. What the space adds is
policy: width lists (a widened layer jumps to the next value), kernel sizes, excluded layers
and a parameter limit.

Layers are read off the graph as the EAS controller sees them: a sequence of tokens
(`conv-filters-kernel`, `fc-units`, `pool`) in a canonical order, cut into blocks at pooling
layers and wherever the resolution changes (stages of a residual network).
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator

from growth.errors import ConfigError, GraphError, OperatorError
from growth.graph import NetGraph
from growth.layers import ACTIVATIONS, kind_of
from growth.ops import (
    MAX_NEW_PARAMS,
    ChangeRecord,
    ChannelGroup,
    attention_nodes,
    block_cost,
    blockable,
    deepenable,
    deepening_cost,
    feature_axes,
    find_group,
    get_operator,
    heads_cost,
    resizable,
    widening_cost,
)
from growth.ops.blocks import block_defaults

# The paper's width lists (Cai et al. 2018, CIFAR-10 search).
CONV_WIDTHS = (16, 32, 64, 96, 128, 192, 256, 320, 384, 448, 512, 576, 640)
FC_WIDTHS = (64, 128, 256, 384, 512, 640, 768, 896, 1024, 1152, 1280)
KERNEL_SIZES = (1, 3, 5)
POOLS = frozenset({"maxpool2d", "avgpool2d", "adaptive_avgpool2d"})
PRODUCERS = frozenset({"linear", "conv2d"})
# what a layer's unit ends with: its normalisation and element-wise activation
_UNIT_TAIL = ACTIVATIONS | {"batchnorm1d", "batchnorm2d", "relu6", "hardswish", "hardsigmoid",
                            "hardtanh", "mish", "softplus"}
Action = dict[str, Any]
DEFAULT_OPERATORS = ("net2wider", "net2deeper")
BUILTIN_ROLES = frozenset({"net2wider", "widen_private", "net2deeper"})  # checked by their costs


# ---- the declared space (YAML `search.space`, or Python) -----------------------------------
def _increasing(values: list[int], what: str) -> list[int]:
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"{what} must increase strictly, e.g. [64, 128, 256]; got {values}")
    return values


class Widths(BaseModel):
    """Width lists by layer type; a widened layer jumps to the next value above its width."""

    model_config = ConfigDict(extra="forbid")
    conv: list[PositiveInt] = Field(default_factory=lambda: list(CONV_WIDTHS), min_length=1)
    fc: list[PositiveInt] = Field(default_factory=lambda: list(FC_WIDTHS), min_length=1)

    @field_validator("conv", "fc")
    @classmethod
    def _strict(cls, v: list[int]) -> list[int]:
        return _increasing(v, "a width list")


class SpaceSpec(BaseModel):
    """A search space as declared by a user; `make_space` checks it against the network."""

    model_config = ConfigDict(extra="forbid")
    widths: Widths = Field(default_factory=Widths)
    layer_widths: dict[str, list[PositiveInt]] = Field(default_factory=dict)  # per-layer lists
    kernel_sizes: list[PositiveInt] = Field(default_factory=lambda: list(KERNEL_SIZES),
                                            min_length=1)
    exclude: list[str] = Field(default_factory=list)  # layers never widened nor deepened after
    deeper_batchnorm: bool = False  # inserted conv/fc layers get a BatchNorm (needs a sample)
    # private: widenings add units no consumer reads yet (`widen_private`), and no layer is
    # inserted (an inserted layer would sit on every head's path)
    private: bool = False
    # symmetry-breaking noise (EAS's defaults): a widened unit's copies start apart and an
    # inserted layer's units too, so growth adds capacity; 0 keeps the function exact
    noise: float = Field(1e-2, ge=0)  # net2wider: copies' incoming weights x (1 + U(-n, n))
    deeper_noise: float = Field(1e-3, ge=0)  # net2deeper: identity weights + U(-n, n)
    max_params: PositiveInt | None = None  # no child above this many parameters
    max_growth: float | None = Field(None, gt=1)  # ... nor above this times the base network
    # the operators' size guard: no single call adds more (None lifts it; see growth.ops.guards)
    max_new_params: int | None = Field(MAX_NEW_PARAMS, ge=0)
    # the operators the space proposes, by name, each by its role (growth.ops.Operator.role):
    # "wider" ones widen a layer to the next width, "deeper" ones insert a layer; plug-ins
    # (the "growth.ops" entry points) too. With several of a role, a rollout draws one of
    # those that accept the step, uniformly.
    operators: list[str] = Field(default_factory=lambda: list(DEFAULT_OPERATORS), min_length=1)
    max_blocks: PositiveInt = 8  # insertion is offered in the first max_blocks blocks
    max_layers_per_block: PositiveInt = 32  # ... and the first positions of each block

    @field_validator("kernel_sizes")
    @classmethod
    def _odd(cls, v: list[int]) -> list[int]:
        if any(k % 2 == 0 for k in v):
            raise ValueError(f"kernel sizes must be odd (an identity needs a centre tap); got {v}")
        if len(set(v)) != len(v):
            raise ValueError(f"kernel sizes must be distinct; got {v}")
        return v

    @field_validator("operators")
    @classmethod
    def _known_operators(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"operators are listed twice: {v}")
        for name in v:
            try:
                op = get_operator(name)
            except OperatorError as exc:
                raise ValueError(str(exc)) from None
            if op.role is None:
                raise ValueError(f"operator {name!r} has no search role (wider or deeper); a "
                                 "search space calls only operators that declare one")
        return v

    @field_validator("layer_widths")
    @classmethod
    def _layer_lists(cls, v: dict[str, list[int]]) -> dict[str, list[int]]:
        for name, widths in v.items():
            if not widths:
                raise ValueError(f"the width list of layer {name!r} is empty")
            _increasing(widths, f"the width list of layer {name!r}")
        return v


def describe_errors(exc: ValidationError, where: str) -> str:
    """One line per problem, each naming the dotted key under `where` (e.g. search.space)."""
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in (where, *err["loc"]) if p != "")
        if err["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key (check the spelling)")
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{key}: {err['msg'].removeprefix('Value error, ')}{shown}")
    return "\n".join(lines)


# ---- layers as the controllers see them -----------------------------------------------------
@dataclass(frozen=True)
class Layer:
    """One token of the layer sequence.

    node: the graph node (a linear/conv2d producer, or a pool); kind: "conv", "fc" or "pool";
    width and kernel for conv/fc; block and position (index among the block's conv/fc layers,
    None for pools); after: where net2deeper inserts a layer behind this one (the end of its
    unit: BN and activation included), None for pools.
    """

    node: str
    kind: Literal["conv", "fc", "pool"]
    width: int | None
    kernel: int | None
    block: int
    position: int | None
    after: str | None


@dataclass(frozen=True)
class DeeperOption:
    """One insertion the space offers: block, position in it, kernel index (None on vectors)."""

    block: int
    position: int
    kernel: int | None
    action: Action


class SearchSpace:
    """A Net2Net action space over NetGraphs; see the module docstring."""

    def __init__(self, spec: SpaceSpec | Mapping[str, Any] | None = None,
                 base_params: int | None = None) -> None:
        self.spec = spec if isinstance(spec, SpaceSpec) else _validate(spec or {})
        limits = [self.spec.max_params]
        if self.spec.max_growth is not None and base_params is not None:
            limits.append(int(self.spec.max_growth * base_params))
        limits = [v for v in limits if v is not None]
        self.max_params: int | None = min(limits) if limits else None
        s = self.spec
        roles = {name: get_operator(name).role for name in s.operators}
        # private: widenings add units no consumer reads yet, and nothing is inserted
        self.wider_ops = [("widen_private" if s.private and n == "net2wider" else n)
                          for n in s.operators if roles[n] == "wider"]
        self.deeper_ops = [] if s.private else [n for n in s.operators if roles[n] == "deeper"]
        self._conv_tokens = (len(s.widths.conv) + 1) * (len(s.kernel_sizes) + 1)
        self.vocab_size = self._conv_tokens + len(s.widths.fc) + 1 + 1  # conv, fc, pool

    def __repr__(self) -> str:
        return f"SearchSpace(max_params={self.max_params}, spec={self.spec!r})"

    # ---- reading a graph ------------------------------------------------------------------
    def layers(self, graph: NetGraph) -> list[Layer]:
        """The token sequence: conv/fc layers (output heads excluded) and pools, in canonical
        order, with blocks cut at pools and at changes of resolution."""
        shapes = graph.shapes()
        out: list[Layer] = []
        block, position, last_res = 0, 0, None
        for name in canonical_order(graph):
            node = graph.node(name)
            if node.kind in POOLS:  # a pool ends its block (EAS), unless the block is empty
                out.append(Layer(name, "pool", None, None, block, None, None))
                if position > 0:
                    block, position = block + 1, 0
                last_res = None
                continue
            if node.kind not in PRODUCERS or _feeds_output(graph, name):
                continue
            res = shapes[name][1:]
            if last_res is not None and res != last_res:
                block, position = block + 1, 0
            last_res = res
            kind = "conv" if node.kind == "conv2d" else "fc"
            k = node.attrs.get("kernel_size") if kind == "conv" else None
            k = k if isinstance(k, int) or k is None else (k[0] if k[0] == k[1] else -1)
            width = node.attrs["out_channels" if kind == "conv" else "out_features"]
            out.append(Layer(name, kind, width, k, block, position,
                             _unit_end(graph, name)))
            position += 1
        return out

    def token(self, layer: Layer) -> int:
        """The layer's vocabulary id: conv (width bucket x kernel), fc (width bucket), pool."""
        s = self.spec
        if layer.kind == "pool":
            return self.vocab_size - 1
        if layer.kind == "fc":
            return self._conv_tokens + bisect_left(s.widths.fc, layer.width)
        ks = s.kernel_sizes
        k = ks.index(layer.kernel) if layer.kernel in ks else len(ks)
        return bisect_left(s.widths.conv, layer.width) * (len(ks) + 1) + k

    def tokens(self, layers: Sequence[Layer]) -> list[int]:
        return [self.token(layer) for layer in layers]

    def widths_of(self, layer: Layer) -> list[int]:
        own = self.spec.layer_widths.get(layer.node)
        if own is not None:
            return own
        return self.spec.widths.conv if layer.kind == "conv" else self.spec.widths.fc

    def next_width(self, layer: Layer, width: int | None = None) -> int | None:
        """The next value of the layer's width list above `width` (default: the layer's);
        None at the limit and for pools."""
        width = layer.width if width is None else width
        if layer.kind == "pool" or width is None:
            return None
        widths = self.widths_of(layer)
        i = bisect_right(widths, width)
        return widths[i] if i < len(widths) else None

    # ---- what may be done -----------------------------------------------------------------
    def widenable(self, graph: NetGraph) -> set[str]:
        """Layers the operators can widen and the space does not exclude."""
        return set(resizable(graph)) - set(self.spec.exclude)

    def wider_option(self, graph: NetGraph, layer: Layer, widenable: set[str] | None = None,
                     seed: int = 0) -> Action | None:
        """The widening of `layer` to the next width above its width in `graph` (which may
        have changed since `layer` was read: a residual group widens together), or None if the
        space does not offer it (pooling, width limit, a layer the operators cannot resize,
        an excluded layer, the size guard, the parameter limit); with several wider
        operators, the first that accepts it."""
        options = self.wider_options(graph, layer, widenable, seed)
        return options[0] if options else None

    def wider_options(self, graph: NetGraph, layer: Layer, widenable: set[str] | None = None,
                      seed: int = 0) -> list[Action]:
        """The widening of `layer` by each wider operator of the space that accepts it."""
        if not self._may_widen(graph, layer, widenable):
            return []
        group = find_group(graph, layer.node)
        width = self.next_width(layer, group.width)
        if width is None:
            return []
        width = _whole_blocks(group, width)
        if width > self.widths_of(layer)[-1]:
            return []
        return self._widenings(graph, layer.node, width, group, seed)

    def widen_by(self, graph: NetGraph, layer: Layer, count: int,
                 widenable: set[str] | None = None, seed: int = 0) -> Action | None:
        """The widening of `layer` by `count` units (RCL's choice: no width list), rounded up
        to whole blocks of a grouped convolution (whole copies of the units where a norm
        reads them), by the first wider operator that accepts it,
        or None if the space does not offer it (pooling, a layer the operators cannot resize,
        an excluded layer, the size guard, the parameter limit) or `count` is 0."""
        if count <= 0 or not self._may_widen(graph, layer, widenable):
            return None
        group = find_group(graph, layer.node)
        width = _whole_blocks(group, group.width + count)
        options = self._widenings(graph, layer.node, width, group, seed)
        return options[0] if options else None

    def _may_widen(self, graph: NetGraph, layer: Layer, widenable: set[str] | None) -> bool:
        return bool(self.wider_ops) and layer.kind != "pool" and layer.node in (
            self.widenable(graph) if widenable is None else widenable)

    def _widenings(self, graph: NetGraph, node: str, width: int, group: ChannelGroup,
                   seed: int) -> list[Action]:
        """The actions widening `node` (its group) to `width`, one per wider operator of the
        space that accepts it within the size guard and the parameter limit."""
        out = []
        for op in self.wider_ops:
            if op == "widen_private" and group.tile is not None:  # a norm would read them
                continue
            action: Action = {"op": op, "node": node, "width": width, "seed": seed}
            if op in BUILTIN_ROLES:
                ok = self.fits(graph, widening_cost(graph, node, width, group))
            else:
                ok = self._tried(graph, action)
            if ok:
                out.append(action)
        return out

    def _tried(self, graph: NetGraph, action: Action) -> bool:
        """Does a plug-in operator accept `action` on `graph`, within the space's limits? (It
        is the authority on where it applies, so the space asks it.)"""
        try:
            child = self.step(graph, action, sample=probe_sample(graph, action))
        except OperatorError:
            return False
        return self.fits(graph, child.param_count() - graph.param_count())

    def fits(self, graph: NetGraph, added: int) -> bool:
        """May one operator call add `added` parameters to `graph`? (The operators' size guard
        and the space's parameter limit.)"""
        guard = self.spec.max_new_params
        if guard is not None and added > guard:
            return False
        return self.max_params is None or graph.param_count() + added <= self.max_params

    def deeper_menu(self, graph: NetGraph, layers: Sequence[Layer] | None = None
                    ) -> DeeperMenu:
        """The insertions the space offers on `graph`, checked lazily (see DeeperMenu)."""
        return DeeperMenu(self, graph, self.layers(graph) if layers is None else layers)

    def deeper_options(self, graph: NetGraph, layers: Sequence[Layer] | None = None
                       ) -> list[DeeperOption]:
        """Every insertion the space offers on `graph` (all of DeeperMenu, enumerated)."""
        menu = self.deeper_menu(graph, layers)
        out = []
        for block, positions in menu.candidates.items():
            for position in positions:
                for k in menu.kernels(block, position):
                    if menu.accepts(block, position, k):
                        out.append(DeeperOption(block, position, k,
                                                menu.action(block, position, k)))
        return out

    def head_options(self, graph: NetGraph) -> list[Action]:
        """One more head for each attention layer (`add_heads`: the new head's output
        projection is zero), where it fits the size guard and the parameter limit and the
        layer is not excluded."""
        out = []
        for node in attention_nodes(graph):
            if node in self.spec.exclude:
                continue
            heads = graph.node(node).attrs["num_heads"] + 1
            if self.fits(graph, heads_cost(graph, node, heads)):
                out.append({"op": "add_heads", "node": node, "heads": heads})
        return out

    def block_options(self, graph: NetGraph) -> list[Action]:
        """An identity transformer block after each transformer block's residual add
        (`add_block`: sizes as the network's own blocks), where it fits the size guard and
        the parameter limit."""
        shapes = graph.shapes()
        out = []
        for node in blockable(graph):
            d = block_defaults(graph, shapes[node][-1])
            head_dim = d["head_dim"] or max(1, shapes[node][-1] // int(d["heads"]))
            cost = block_cost(shapes[node][-1], int(d["heads"]), int(head_dim), int(d["hidden"]))
            if node not in self.spec.exclude and self.fits(graph, cost):
                out.append({"op": "add_block", "after": node})
        return out

    def deeper_action(self, after: str, kernel: int | None, seed: int = 0,
                      op: str = "net2deeper") -> Action:
        action: Action = {"op": op, "after": after}
        if kernel is not None:
            action["kernel_size"] = kernel
        if op not in BUILTIN_ROLES:  # a plug-in gets the role's call: after, kernel_size, seed
            action["seed"] = seed
            return action
        if self.spec.deeper_batchnorm:
            action["batchnorm"] = True
        if self.spec.deeper_noise > 0:
            action["seed"] = seed
        return action

    # ---- building children ----------------------------------------------------------------
    def step(self, graph: NetGraph, action: Mapping[str, Any],
             sample: torch.Tensor | None = None) -> NetGraph:
        """Apply one action with its registered operator (see `apply`)."""
        return self._call(graph, action, sample, 0)[0]

    def apply(self, parent: NetGraph, actions: Sequence[Mapping[str, Any]],
              sample: torch.Tensor | None = None) -> tuple[NetGraph, list[ChangeRecord]]:
        """Rebuild a child from `parent` and its JSON actions, in order, with the registered
        operators (`growth.ops.get_operator`); deterministic given the actions (and `sample`,
        the batch of inputs that actions with batchnorm need). The parent is not changed.
        Raises OperatorError naming the action that the operators or the space refuse."""
        graph, records = parent, []
        for i, action in enumerate(actions):
            graph, record = self._call(graph, action, sample, i)
            records.append(record)
        size = graph.param_count()
        if self.max_params is not None and size > self.max_params and size > \
                parent.param_count():  # growth past the limit (a parent above it may stay)
            raise OperatorError(f"the child has {size:,} parameters, above the space's limit "
                                f"of {self.max_params:,}; drop actions or raise "
                                "search.space.max_params / max_growth")
        return graph, records

    def _call(self, graph: NetGraph, action: Mapping[str, Any], sample: torch.Tensor | None,
              index: int) -> tuple[NetGraph, ChangeRecord]:
        if not isinstance(action, Mapping) or "op" not in action:
            raise OperatorError(f"action {index}: {action!r} is not a JSON object with an "
                                "'op' key, e.g. {'op': 'net2wider', 'node': 'fc1', "
                                "'width': 128}")
        kwargs = {k: v for k, v in action.items() if k != "op"}
        op = action["op"]
        if op in ("net2wider", "widen_private", "net2deeper", "add_heads", "add_block"):
            kwargs.setdefault("max_new_params", self.spec.max_new_params)
        if op in ("net2wider", "widen_private"):
            kwargs.setdefault("noise", self.spec.noise)
        elif op == "net2deeper":
            kwargs.setdefault("noise", self.spec.deeper_noise)
        if op == "net2deeper" and kwargs.get("batchnorm"):
            if sample is None:
                raise OperatorError(f"action {index} ({op} after {kwargs.get('after')!r}) adds a "
                                    "BatchNorm and needs `sample`, a batch of network inputs")
            kwargs["sample"] = sample
        try:
            result = get_operator(op)(graph, **kwargs)
        except TypeError as exc:
            raise OperatorError(f"action {index}: {dict(action)!r} does not fit operator "
                                f"{op!r}: {exc}") from None
        except OperatorError as exc:
            raise OperatorError(f"action {index}: {exc}") from None
        except GraphError as exc:
            raise OperatorError(f"action {index}: {exc}") from None
        return result.graph, result.record

    # ---- identity -------------------------------------------------------------------------
    @staticmethod
    def arch(graph: NetGraph) -> str:
        """The canonical architecture string (the cache key of trained children)."""
        return arch_string(graph)


class DeeperMenu:
    """Where a layer may be inserted on one graph: after each conv/fc layer's unit in the
    first max_blocks blocks and max_layers_per_block positions, with each kernel size on
    images (no kernel choice on vectors), where `growth.ops.deepenable` lists the node for that
    kernel and the identity layer (`deepening_cost`, BatchNorm included) fits the operators'
    size guard and the parameter limit. No child is built until one is chosen (`child`).
    """

    def __init__(self, space: SearchSpace, graph: NetGraph, layers: Sequence[Layer]) -> None:
        self.space, self.graph = space, graph
        spec = space.spec
        shapes = graph.shapes()
        axes = feature_axes(graph, shapes)
        ks = spec.kernel_sizes
        allowed: dict[int, set[str]] = {}  # kernel size -> nodes deepenable with it
        self.candidates: dict[int, dict[int, str]] = {}
        self._ok: dict[str, list[int | None]] = {}  # kernel indices accepted after a node
        self._ops: dict[tuple[str, int | None], list[str]] = {}  # ... and by which operators
        self._vector: dict[str, bool] = {}
        for layer in layers:
            if (not space.deeper_ops or layer.after is None or layer.node in spec.exclude
                    or layer.after in spec.exclude or layer.block >= spec.max_blocks
                    or layer.position >= spec.max_layers_per_block):
                continue
            shape = shapes[layer.after]
            conv = len(shape) == 3 and axes[layer.after] == 0
            channels = shape[0] if conv else shape[-1]
            kernels: list[int | None] = list(range(len(ks))) if conv else [None]
            ok = []
            for i in kernels:
                k = 1 if i is None else ks[i]
                accepted = []
                for op in space.deeper_ops:
                    if op not in BUILTIN_ROLES:
                        action = space.deeper_action(layer.after, None if i is None else k, 0, op)
                        if space._tried(graph, action):
                            accepted.append(op)
                        continue
                    if k not in allowed:  # the size guard is checked below, with the BN's cost
                        allowed[k] = set(deepenable(graph, k, max_new_params=None))
                    if layer.after in allowed[k] and space.fits(
                            graph, deepening_cost(channels, k, spec.deeper_batchnorm)):
                        accepted.append(op)
                if accepted:
                    ok.append(i)
                    self._ops[(layer.after, i)] = accepted
            self.candidates.setdefault(layer.block, {})[layer.position] = layer.after
            self._ok[layer.after] = ok
            self._vector[layer.after] = not conv

    def kernels(self, block: int, position: int) -> list[int | None]:
        """Kernel indices into spec.kernel_sizes to choose from here ([None] on vectors)."""
        after = self.candidates[block][position]
        return [None] if self._vector[after] else list(range(len(self.space.spec.kernel_sizes)))

    def operators(self, block: int, position: int, kernel: int | None) -> list[str]:
        """The deeper operators that accept this insertion (in the space's order)."""
        return list(self._ops.get((self.candidates[block][position], kernel), []))

    def action(self, block: int, position: int, kernel: int | None, seed: int = 0,
               op: str | None = None) -> Action:
        """The insertion's action, by `op` (default: the first operator that accepts it)."""
        k = None if kernel is None else self.space.spec.kernel_sizes[kernel]
        after = self.candidates[block][position]
        if op is None:
            op = (self._ops.get((after, kernel)) or self.space.deeper_ops or ["net2deeper"])[0]
        return self.space.deeper_action(after, k, seed, op)

    def accepts(self, block: int, position: int, kernel: int | None) -> bool:
        return kernel in self._ok[self.candidates[block][position]]

    def child(self, block: int, position: int, kernel: int | None, seed: int = 0,
              op: str | None = None) -> NetGraph:
        """The graph with this insertion (built with the operator)."""
        action = self.action(block, position, kernel, seed, op)
        return self.space.step(self.graph, action, sample=probe_sample(self.graph, action))

    def position_ok(self, block: int, position: int) -> bool:
        return bool(self._ok[self.candidates[block][position]])

    def block_ok(self, block: int) -> bool:
        return any(self.position_ok(block, p) for p in self.candidates.get(block, {}))

    def block_mask(self) -> list[int]:
        return [int(self.block_ok(b)) for b in range(self.space.spec.max_blocks)]

    def position_mask(self, block: int) -> list[int]:
        positions = self.candidates.get(block, {})
        return [int(p in positions and self.position_ok(block, p))
                for p in range(self.space.spec.max_layers_per_block)]

    def kernel_mask(self, block: int, position: int) -> list[int] | None:
        """Accepted kernels at this position, or None on vectors (no kernel decision)."""
        if self.kernels(block, position) == [None]:
            return None
        return [int(self.accepts(block, position, k))
                for k in range(len(self.space.spec.kernel_sizes))]


def make_space(spec: SpaceSpec | Mapping[str, Any] | None, graph: NetGraph,
               where: str = "search.space") -> SearchSpace:
    """A space for `graph` (the base network): validates `spec` (a YAML `search.space`
    section, a dict or a SpaceSpec; None gives the defaults for MLPs and CNNs) and checks the
    layer names it mentions. Every problem is a ConfigError naming the key."""
    spec = spec if isinstance(spec, SpaceSpec) else _validate(spec or {}, where)
    layers = {n for n in graph.nx.nodes if graph.node(n).kind in PRODUCERS}
    # an attention layer may be excluded too (it then gets no head); only units have widths
    excludable = layers | set(attention_nodes(graph))
    for key, names, known, kinds in (
            ("exclude", spec.exclude, excludable,
             "conv/linear/attention" if excludable != layers else "conv/linear"),
            ("layer_widths", list(spec.layer_widths), layers, "conv/linear")):
        missing = [n for n in names if n not in known]
        if missing:
            raise ConfigError(f"{where}.{key}: no {kinds} layer named {missing[0]!r} in the "
                              f"network; its layers are {sorted(known)}")
    return SearchSpace(spec, base_params=graph.param_count())


def _validate(raw: Mapping[str, Any], where: str = "search.space") -> SpaceSpec:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(raw).__name__}")
    try:
        return SpaceSpec.model_validate(dict(raw))
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc, where)) from None


# ---- helpers ---------------------------------------------------------------------------------
def _whole_blocks(group: ChannelGroup, target: int) -> int:
    """`target` rounded up so that the group's width grows by whole steps: grouped
    convolutions change channels in aligned blocks of `group.block`, and a norm over the
    channels widens by whole copies of every unit."""
    step = group.width if group.tile is not None else group.block
    return group.width + -(-(target - group.width) // step) * step


def _feeds_output(graph: NetGraph, name: str) -> bool:
    return any(graph.node(c).kind == "output" for c in graph.consumers(name))


def _unit_end(graph: NetGraph, name: str) -> str:
    """The last node of a layer's unit: follow single-consumer BN/activation nodes."""
    end = name
    while True:
        consumers = graph.consumers(end)
        if len(consumers) != 1 or graph.node(consumers[0]).kind not in _UNIT_TAIL:
            return end
        if len(graph.inputs(consumers[0])) != 1:
            return end
        end = consumers[0]


def probe_sample(graph: NetGraph, action: Action) -> torch.Tensor | None:
    """A stand-in batch for dry runs of BN insertions: the structure (all a dry run looks at)
    does not depend on the statistics, and eval-mode function is exact for any of them."""
    if not action.get("batchnorm"):
        return None
    shape = graph.shape(graph.input_node())
    return torch.randn((4, *shape), generator=torch.Generator().manual_seed(0))


# ---- canonical architecture strings --------------------------------------------------------
_DERIVED = frozenset({"in_features", "in_channels", "num_features"})


def _label(graph: NetGraph, name: str) -> str:
    node = graph.node(name)
    kind, a = node.kind, node.attrs
    if kind == "output":
        return f"out:{name}"
    if kind == "input":
        return "in" + "x".join(map(str, a["shape"]))
    defaults = kind_of(kind).defaults
    extra = {k: v for k, v in sorted(a.items()) if k not in _DERIVED and defaults.get(k) != v
             and k not in ("out_features", "out_channels", "kernel_size")}
    rest = "".join(f",{k}={_short(v)}" for k, v in extra.items())
    if kind == "linear":
        return f"fc{a['out_features']}{rest and '(' + rest[1:] + ')'}"
    if kind == "conv2d":
        k = a["kernel_size"]
        k = f"{k}x{k}" if isinstance(k, int) else "x".join(map(str, k))
        return f"conv{k}-{a['out_channels']}{rest and '(' + rest[1:] + ')'}"
    if "kernel_size" in a:
        rest = f",k={_short(a['kernel_size'])}" + rest
    return f"{kind}{rest and '(' + rest[1:] + ')'}"


def _short(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "x".join(map(str, v))
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def canonical_order(graph: NetGraph) -> list[str]:
    """A topological order that depends on the structure, not on node names: among ready
    nodes, the one with the smallest (label, input positions) goes first (names break ties
    between nodes that are identical so far)."""
    labels = {n: _label(graph, n) for n in graph.nx.nodes}
    inputs = {n: graph.inputs(n) for n in graph.nx.nodes}
    waiting = {n: len(set(v)) for n, v in inputs.items()}
    pos: dict[str, int] = {}
    ready = [(labels[n], (), n) for n, k in waiting.items() if k == 0]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        _, _, n = heapq.heappop(ready)
        pos[n] = len(order)
        order.append(n)
        for c in graph.consumers(n):
            waiting[c] -= 1
            if waiting[c] == 0:
                heapq.heappush(ready, (labels[c], tuple(pos[i] for i in inputs[c]), c))
    if len(order) != len(labels):
        graph.topo_order()  # raises the GraphError naming the cycle
    return order


def arch_string(graph: NetGraph) -> str:
    """Nodes in canonical order, space-separated; a node reading anything but the previous
    node lists its inputs' positions, e.g. `add<3,7`."""
    order = canonical_order(graph)
    pos = {n: i for i, n in enumerate(order)}
    parts = []
    for i, n in enumerate(order):
        ins = [pos[s] for s in graph.inputs(n)]
        ref = "" if ins == ([i - 1] if i else []) else "<" + ",".join(map(str, ins))
        parts.append(_label(graph, n) + ref)
    return " ".join(parts)


__all__ = ["CONV_WIDTHS", "FC_WIDTHS", "KERNEL_SIZES", "DeeperMenu", "DeeperOption", "Layer",
           "SearchSpace", "SpaceSpec", "Widths", "arch_string", "canonical_order",
           "describe_errors", "make_space"]
