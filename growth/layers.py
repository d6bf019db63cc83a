"""The node kinds a NetGraph may hold: shape rules, tensor shapes and the torch module for each.

A kind is data, not a class hierarchy: one `Kind` record per layer type, looked up by name.
Shapes are per sample (no batch dimension): (features,) for vectors, (C, H, W) for images.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from growth.errors import GraphError, ShapeError

Shape = tuple[int, ...]
Attrs = dict[str, Any]


@dataclass(frozen=True)
class Kind:
    """How one node kind behaves. `module` builds the torch layer; None means a functional node."""

    name: str
    infer: Callable[[str, Attrs, list[Shape]], Shape]
    arity: tuple[int, int] = (1, 1)  # min, max inputs (max -1 = unbounded)
    module: Callable[[Attrs], nn.Module] | None = None
    defaults: Attrs = field(default_factory=dict)
    # How the kind treats the channel axis (axis 0 of the per-sample shape):
    #   "produce": computes new channels from its input (linear, conv2d)
    #   "pass": channel i of the output depends only on channel i of the input (BN, ReLU, pools)
    #   "merge": add / concat; "none": input, output, flatten handled specially.
    channels: str = "pass"
    per_channel_tensors: tuple[str, ...] = ()  # tensors indexed by channel for "pass" kinds


def _pair(v: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _one(name: str, a: Attrs, shapes: list[Shape]) -> Shape:
    return shapes[0]


def _need_rank(name: str, shape: Shape, rank: int, kind: str) -> None:
    if len(shape) != rank:
        what = "a vector (features,)" if rank == 1 else "an image (C, H, W)"
        raise ShapeError(f"node {name!r} ({kind}) expects {what} but its input has shape {shape}")


def _linear(name: str, a: Attrs, shapes: list[Shape]) -> Shape:
    (s,) = shapes
    if not s or s[-1] != a["in_features"]:
        raise ShapeError(
            f"node {name!r} (linear) has in_features={a['in_features']} but its input has shape "
            f"{s}; insert a flatten node or set in_features={s[-1] if s else '?'}"
        )
    return (*s[:-1], a["out_features"])


def _spatial(size: int, k: int, s: int, p: int, d: int = 1, ceil: bool = False) -> int:
    span = size + 2 * p - d * (k - 1) - 1
    out = (math.ceil(span / s) if ceil else span // s) + 1
    if ceil and (out - 1) * s >= size + p:  # torch's rule: last window must start inside input
        out -= 1
    return out


def _conv(name: str, a: Attrs, shapes: list[Shape]) -> Shape:
    (s,) = shapes
    _need_rank(name, s, 3, "conv2d")
    if s[0] != a["in_channels"]:
        raise ShapeError(
            f"node {name!r} (conv2d) has in_channels={a['in_channels']} but its input has "
            f"{s[0]} channels (shape {s})"
        )
    k, st, p, d = (_pair(a[x]) for x in ("kernel_size", "stride", "padding", "dilation"))
    h, w = (_spatial(s[1 + i], k[i], st[i], p[i], d[i]) for i in range(2))
    if h < 1 or w < 1:
        raise ShapeError(f"node {name!r} (conv2d) turns input {s} into an empty map ({h}x{w})")
    return (a["out_channels"], h, w)


def _bn(rank: int) -> Callable[[str, Attrs, list[Shape]], Shape]:
    def infer(name: str, a: Attrs, shapes: list[Shape]) -> Shape:
        (s,) = shapes
        kind = "batchnorm1d" if rank == 1 else "batchnorm2d"
        if rank == 2 or len(s) not in (1, 2):
            _need_rank(name, s, 3 if rank == 2 else 1, kind)
        if s[0] != a["num_features"]:
            raise ShapeError(
                f"node {name!r} ({kind}) has num_features={a['num_features']} but its input "
                f"has {s[0]} channels (shape {s})"
            )
        return s

    return infer


def _pool(name: str, a: Attrs, shapes: list[Shape]) -> Shape:
    (s,) = shapes
    _need_rank(name, s, 3, "pool")
    k = _pair(a["kernel_size"])
    st = _pair(a["stride"] if a.get("stride") is not None else a["kernel_size"])
    p = _pair(a.get("padding", 0))
    d = _pair(a.get("dilation", 1))
    ceil = bool(a.get("ceil_mode", False))
    if any(p[i] > k[i] // 2 for i in range(2)):
        raise ShapeError(f"node {name!r} (pool) has padding {p} over half its kernel {k}; "
                         "torch refuses that")
    h, w = (_spatial(s[1 + i], k[i], st[i], p[i], d[i], ceil) for i in range(2))
    if h < 1 or w < 1:
        raise ShapeError(f"node {name!r} (pool) turns input {s} into an empty map ({h}x{w})")
    return (s[0], h, w)


def _adaptive(name: str, a: Attrs, shapes: list[Shape]) -> Shape:
    (s,) = shapes
    _need_rank(name, s, 3, "adaptive_avgpool2d")
    o = a["output_size"]
    oh, ow = (o, o) if isinstance(o, int) or o is None else o
    return (s[0], s[1] if oh is None else int(oh), s[2] if ow is None else int(ow))


def _flatten(name: str, a: Attrs, shapes: list[Shape]) -> Shape:
    return (math.prod(shapes[0]),)


def _add(name: str, a: Attrs, shapes: list[Shape]) -> Shape:
    if any(s != shapes[0] for s in shapes):
        raise ShapeError(f"node {name!r} (add) adds tensors of different shapes {shapes}")
    return shapes[0]


def _concat(name: str, a: Attrs, shapes: list[Shape]) -> Shape:
    rest = {s[1:] for s in shapes}
    if len(rest) != 1 or any(not s for s in shapes):
        raise ShapeError(
            f"node {name!r} (concat) joins along channels, so all other dims must match: {shapes}"
        )
    return (sum(s[0] for s in shapes), *shapes[0][1:])


def _input(name: str, a: Attrs, shapes: list[Shape]) -> Shape:
    return tuple(int(v) for v in a["shape"])


def _act(factory: Callable[[Attrs], nn.Module], **defaults: Any) -> dict[str, Any]:
    return {"infer": _one, "module": factory, "defaults": defaults}


KINDS: dict[str, Kind] = {}


def _register(kind: Kind) -> None:
    KINDS[kind.name] = kind


_register(Kind("input", _input, arity=(0, 0), channels="none"))
_register(Kind("output", _one, channels="none"))
_register(
    Kind(
        "linear",
        _linear,
        module=lambda a: nn.Linear(a["in_features"], a["out_features"], bias=a["bias"]),
        defaults={"bias": True},
        channels="produce",
    )
)
_register(
    Kind(
        "conv2d",
        _conv,
        module=lambda a: nn.Conv2d(
            a["in_channels"], a["out_channels"], a["kernel_size"], stride=a["stride"],
            padding=a["padding"], dilation=a["dilation"], groups=a["groups"], bias=a["bias"],
        ),
        defaults={"stride": 1, "padding": 0, "dilation": 1, "groups": 1, "bias": True},
        channels="produce",
    )
)
_BN_TENSORS = ("weight", "bias", "running_mean", "running_var")
for _rank, _cls in ((1, nn.BatchNorm1d), (2, nn.BatchNorm2d)):
    _register(
        Kind(
            f"batchnorm{_rank}d",
            _bn(_rank),
            module=lambda a, c=_cls: c(
                a["num_features"], eps=a["eps"], momentum=a["momentum"], affine=a["affine"],
                track_running_stats=a["track_running_stats"],
            ),
            defaults={"eps": 1e-5, "momentum": 0.1, "affine": True, "track_running_stats": True},
            per_channel_tensors=_BN_TENSORS,
        )
    )
_register(Kind("relu", **_act(lambda a: nn.ReLU())))
_register(Kind("leaky_relu", **_act(lambda a: nn.LeakyReLU(a["negative_slope"]),
                                    negative_slope=0.01)))
_register(Kind("elu", **_act(lambda a: nn.ELU(a["alpha"]), alpha=1.0)))
_register(Kind("gelu", **_act(lambda a: nn.GELU())))
_register(Kind("silu", **_act(lambda a: nn.SiLU())))
_register(Kind("tanh", **_act(lambda a: nn.Tanh())))
_register(Kind("sigmoid", **_act(lambda a: nn.Sigmoid())))
_register(Kind("identity", **_act(lambda a: nn.Identity())))
_register(Kind("dropout", **_act(lambda a: nn.Dropout(a["p"]), p=0.5)))
_register(
    Kind(
        "maxpool2d",
        _pool,
        module=lambda a: nn.MaxPool2d(a["kernel_size"], a["stride"], a["padding"], a["dilation"],
                                      ceil_mode=a["ceil_mode"]),
        defaults={"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False},
    )
)
_register(
    Kind(
        "avgpool2d",
        _pool,
        module=lambda a: nn.AvgPool2d(a["kernel_size"], a["stride"], a["padding"],
                                      ceil_mode=a["ceil_mode"],
                                      count_include_pad=a["count_include_pad"]),
        defaults={"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True},
    )
)
_register(
    Kind(
        "adaptive_avgpool2d",
        _adaptive,
        module=lambda a: nn.AdaptiveAvgPool2d(a["output_size"]),
        defaults={"output_size": 1},
    )
)
_register(Kind("flatten", _flatten, channels="none"))
_register(Kind("add", _add, arity=(2, -1), channels="merge"))
_register(Kind("concat", _concat, arity=(2, -1), channels="merge"))

ACTIVATIONS = frozenset({"relu", "leaky_relu", "elu", "gelu", "silu", "tanh", "sigmoid"})
# Kinds whose layers hold tensors (weights, BN statistics); every other kind is stateless.
PARAMETRIC = frozenset({"linear", "conv2d", "batchnorm1d", "batchnorm2d"})


def kind_of(name: str) -> Kind:
    """The Kind record for `name`, or a GraphError listing the known kinds."""
    try:
        return KINDS[name]
    except KeyError:
        raise GraphError(f"unknown node kind {name!r}; known kinds: {sorted(KINDS)}") from None


def complete_attrs(kind: str, attrs: Attrs, in_shapes: list[Shape]) -> Attrs:
    """Fill defaults and the input-derived sizes (in_features, in_channels, num_features)."""
    out = {**kind_of(kind).defaults, **attrs}
    if in_shapes and in_shapes[0]:
        first = in_shapes[0]
        if kind == "linear":
            out.setdefault("in_features", first[-1])
        elif kind == "conv2d":
            out.setdefault("in_channels", first[0])
        elif kind.startswith("batchnorm"):
            out.setdefault("num_features", first[0])
    return out


def build_module(kind: str, attrs: Attrs) -> nn.Module:
    """A freshly initialised torch layer for a parametric kind."""
    factory = kind_of(kind).module
    if factory is None:
        raise GraphError(f"kind {kind!r} has no module")
    return factory(attrs)


def module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers of one layer, detached, in a stable order."""
    return {k: v.detach() for k, v in module.state_dict(keep_vars=False).items()}
