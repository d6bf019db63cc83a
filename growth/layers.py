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

from growth import modules, program
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
    buffers: tuple[str, ...] = ()  # tensors that are state, not trainable parameters


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
    g = a["groups"]
    if g < 1 or a["in_channels"] % g or a["out_channels"] % g:
        raise ShapeError(f"node {name!r} (conv2d) has groups={g}, which must divide in_channels="
                         f"{a['in_channels']} and out_channels={a['out_channels']}")
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


def _input(name: str, a: Attrs, shapes: list[Shape]) -> Shape:
    return tuple(int(v) for v in a["shape"])


def _dim(name: str, kind: str, d: int, rank: int) -> int:
    """A per-sample dim (negative counts from the end) as a non-negative index."""
    if not -rank <= d < rank:
        raise ShapeError(f"node {name!r} ({kind}) names dim {d}, outside a per-sample shape of "
                         f"rank {rank}")
    return d % rank


def _concat(name: str, a: Attrs, shapes: list[Shape]) -> Shape:
    rank = len(shapes[0])
    d = _dim(name, "concat", a["dim"], max(rank, 1))
    rest = {s[:d] + s[d + 1:] for s in shapes}
    if len(rest) != 1 or any(len(s) != rank or not s for s in shapes):
        raise ShapeError(
            f"node {name!r} (concat) joins along dim {d}, so all other dims must match: {shapes}"
        )
    return (*shapes[0][:d], sum(s[d] for s in shapes), *shapes[0][d + 1:])


def _broadcast(name: str, kind: str, shapes: list[Shape]) -> Shape:
    """numpy broadcasting of per-sample shapes of one rank (the batch dims line up)."""
    if len({len(s) for s in shapes}) != 1:
        raise ShapeError(f"node {name!r} ({kind}) combines tensors of different ranks {shapes}; "
                         "give them one rank (e.g. (C, 1, 1) for a per-channel gate)")
    out = []
    for dims in zip(*shapes):
        big = {d for d in dims if d != 1}
        if len(big) > 1:
            raise ShapeError(f"node {name!r} ({kind}) cannot broadcast shapes {shapes}")
        out.append(big.pop() if big else 1)
    return tuple(out)


def _mul(name: str, a: Attrs, shapes: list[Shape]) -> Shape:
    return _broadcast(name, "mul", shapes)


def _param_shape(kind: str) -> Callable[[str, Attrs, list[Shape]], Shape]:
    """x (op) weight, where weight (attr `shape`, the parameter's own shape) broadcasts onto
    the batch (1, *x) without growing it."""
    def infer(name: str, a: Attrs, shapes: list[Shape]) -> Shape:
        (s,) = shapes
        w = tuple(int(v) for v in a["shape"])
        full = (1, *s)
        ok = len(w) <= len(full) and all(
            d in (1, full[len(full) - len(w) + i]) for i, d in enumerate(w))
        if not ok:
            raise ShapeError(f"node {name!r} ({kind}) holds a tensor of shape {w}, which does not "
                             f"broadcast onto its input {s} (batch dim first)")
        return s

    return infer


def _class_token(name: str, a: Attrs, shapes: list[Shape]) -> Shape:
    (s,) = shapes
    w = tuple(a["shape"])
    if len(s) != 2 or len(w) != 3 or w[0] != 1 or w[2] != s[1]:
        raise ShapeError(f"node {name!r} (class_token) prepends tokens of shape {w} (1, T, D) to "
                         f"sequences (L, D); its input has shape {s}")
    return (w[1] + s[0], s[1])


def _layernorm(name: str, a: Attrs, shapes: list[Shape]) -> Shape:
    (s,) = shapes
    norm = tuple(a["normalized_shape"])
    if not norm or s[len(s) - len(norm):] != norm or len(norm) > len(s):
        raise ShapeError(f"node {name!r} (layernorm) normalises the last dims {norm}, but its "
                         f"input has shape {s}")
    return s


def _permute(name: str, a: Attrs, shapes: list[Shape]) -> Shape:
    (s,) = shapes
    dims = tuple(a["dims"])
    if sorted(dims) != list(range(len(s))):
        raise ShapeError(f"node {name!r} (permute) has dims {dims}, not a permutation of the "
                         f"{len(s)} per-sample dims of its input {s}")
    return tuple(s[d] for d in dims)


def _reshape(name: str, a: Attrs, shapes: list[Shape]) -> Shape:
    (s,) = shapes
    out = tuple(int(v) for v in a["shape"])
    if math.prod(out) != math.prod(s) or any(d < 0 for d in out):
        raise ShapeError(f"node {name!r} (reshape) turns {s} ({math.prod(s)} values per sample) "
                         f"into {out}; the sizes must match")
    return out


def decode_index(index: list[Any]) -> tuple[Any, ...]:
    """A `getitem` node's index (JSON: ints, and [start, stop, step] for slices) as Python."""
    return tuple(slice(*i) if isinstance(i, (list, tuple)) else i for i in index)


def _getitem(name: str, a: Attrs, shapes: list[Shape]) -> Shape:
    (s,) = shapes
    index = decode_index(a["index"])
    if len(index) > len(s) or not all(isinstance(i, (int, slice)) for i in index):
        raise ShapeError(f"node {name!r} (getitem) indexes {a['index']} into a per-sample shape "
                         f"{s}; give at most one int or [start, stop, step] per dim")
    try:
        out = tuple(torch.empty(s, device="meta")[index].shape)
    except IndexError as exc:
        raise ShapeError(f"node {name!r} (getitem): {exc} (per-sample shape {s})") from None
    if 0 in out:
        raise ShapeError(f"node {name!r} (getitem) selects nothing from {s} with {a['index']}")
    return out


def _mean(name: str, a: Attrs, shapes: list[Shape]) -> Shape:
    (s,) = shapes
    dims = {_dim(name, "mean", d, len(s)) for d in a["dims"]}
    if a["keepdim"]:
        return tuple(1 if i in dims else d for i, d in enumerate(s))
    return tuple(d for i, d in enumerate(s) if i not in dims)


def _pad(name: str, a: Attrs, shapes: list[Shape]) -> Shape:
    (s,) = shapes
    pad = list(a["pad"])
    if len(pad) % 2 or len(pad) // 2 > len(s):
        raise ShapeError(f"node {name!r} (pad) pads {pad}: one (before, after) pair per trailing "
                         f"dim, at most {len(s)} for its input {s}")
    out = list(s)
    for i in range(len(pad) // 2):
        out[len(s) - 1 - i] += pad[2 * i] + pad[2 * i + 1]
    if min(out) < 1:
        raise ShapeError(f"node {name!r} (pad) turns {s} into an empty shape {tuple(out)}")
    return tuple(out)


def _interpolate(name: str, a: Attrs, shapes: list[Shape]) -> Shape:
    (s,) = shapes
    _need_rank(name, s, 3, "interpolate")
    if a.get("size") is not None:
        size = a["size"]
        h, w = (size, size) if isinstance(size, int) else size
    else:
        f = a["scale_factor"]
        fh, fw = (f, f) if isinstance(f, (int, float)) else f
        h, w = math.floor(s[1] * fh), math.floor(s[2] * fw)
    if h < 1 or w < 1:
        raise ShapeError(f"node {name!r} (interpolate) turns {s} into an empty map ({h}x{w})")
    return (s[0], int(h), int(w))


def _groupnorm(name: str, a: Attrs, shapes: list[Shape]) -> Shape:
    (s,) = shapes
    if len(s) < 1 or s[0] != a["num_channels"] or a["num_channels"] % a["num_groups"]:
        raise ShapeError(f"node {name!r} (groupnorm) has num_channels={a['num_channels']} in "
                         f"num_groups={a['num_groups']} groups, which must divide them and "
                         f"match the channels of its input {s}")
    return s


def _attention(name: str, a: Attrs, shapes: list[Shape]) -> Shape:
    (s,) = shapes
    if len(s) != 2 or s[-1] != a["dim"]:
        raise ShapeError(f"node {name!r} (attention) needs token sequences (L, dim={a['dim']}); "
                         f"its input has shape {s}")
    return (s[0], a["dim_out"])


def _program(name: str, a: Attrs, shapes: list[Shape]) -> Shape:
    want = [tuple(int(d) for d in s) for s in a["in_shapes"]]
    if [tuple(s) for s in shapes] != want:
        raise ShapeError(f"node {name!r} (program) was recorded for inputs of shapes {want}; "
                         f"its inputs have shapes {[tuple(s) for s in shapes]}")
    return tuple(int(d) for d in a["shape"])


def _shuffle(name: str, a: Attrs, shapes: list[Shape]) -> Shape:
    (s,) = shapes
    _need_rank(name, s, 3, "channel_shuffle")
    if s[0] % a["groups"]:
        raise ShapeError(f"node {name!r} (channel_shuffle) has groups={a['groups']}, which must "
                         f"divide its {s[0]} channels")
    return s


def _last_dim(kind: str, attr: str, rank: int | None = None
              ) -> Callable[[str, Attrs, list[Shape]], Shape]:
    """Same shape out; the last dim must equal attr `attr` (and the rank `rank`, if given)."""
    def infer(name: str, a: Attrs, shapes: list[Shape]) -> Shape:
        (s,) = shapes
        if not s or s[-1] != a[attr] or (rank is not None and len(s) != rank):
            want = f"rank {rank}, " if rank is not None else ""
            raise ShapeError(f"node {name!r} ({kind}) needs inputs of {want}last dim {attr}="
                             f"{a[attr]}; its input has shape {s}")
        return s

    return infer


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
            buffers=("running_mean", "running_var", "num_batches_tracked"),
        )
    )
_register(Kind("relu", **_act(lambda a: nn.ReLU())))
_register(Kind("leaky_relu", **_act(lambda a: nn.LeakyReLU(a["negative_slope"]),
                                    negative_slope=0.01)))
_register(Kind("elu", **_act(lambda a: nn.ELU(a["alpha"]), alpha=1.0)))
_register(Kind("gelu", **_act(lambda a: nn.GELU(a["approximate"]), approximate="none")))
_register(Kind("silu", **_act(lambda a: nn.SiLU())))
_register(Kind("tanh", **_act(lambda a: nn.Tanh())))
_register(Kind("sigmoid", **_act(lambda a: nn.Sigmoid())))
_register(Kind("identity", **_act(lambda a: nn.Identity())))
_register(Kind("relu6", **_act(lambda a: nn.ReLU6())))
_register(Kind("hardswish", **_act(lambda a: nn.Hardswish())))
_register(Kind("hardsigmoid", **_act(lambda a: nn.Hardsigmoid())))
_register(Kind("hardtanh", **_act(lambda a: nn.Hardtanh(a["min_val"], a["max_val"]),
                                  min_val=-1.0, max_val=1.0)))
_register(Kind("mish", **_act(lambda a: nn.Mish())))
_register(Kind("softplus", **_act(lambda a: nn.Softplus(a["beta"], a["threshold"]), beta=1.0,
                                  threshold=20.0)))
_register(Kind("dropout", **_act(lambda a: nn.Dropout(a["p"]), p=0.5)))
_register(Kind("dropout2d", **_act(lambda a: nn.Dropout2d(a["p"]), p=0.5)))
_register(Kind("stochastic_depth", **_act(lambda a: modules.stochastic_depth(a["p"], a["mode"]),
                                          p=0.0, mode="row")))
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
_register(Kind("concat", _concat, arity=(2, -1), channels="merge", defaults={"dim": 0}))
_register(Kind("mul", _mul, arity=(2, 2), channels="merge"))
# Tensor plumbing: how the importer keeps layouts (channels-last, token sequences, windows).
_register(Kind("permute", _permute, channels="none"))
_register(Kind("reshape", _reshape, channels="none"))
_register(Kind("getitem", _getitem, channels="none"))
_register(Kind("mean", _mean, channels="none", defaults={"keepdim": False}))
_register(Kind("sum", _mean, channels="none", defaults={"keepdim": False}))
_register(Kind("interpolate", _interpolate, defaults={
    "size": None, "scale_factor": None, "mode": "nearest", "align_corners": None,
    "recompute_scale_factor": None, "antialias": False}))
_register(Kind("pad", _pad, channels="none", defaults={"value": 0.0}))
_register(Kind("channel_shuffle", _shuffle, module=lambda a: nn.ChannelShuffle(a["groups"]),
               channels="none"))
# Learned tensors applied to activations (layer scale, gates, positional embeddings, tokens).
_register(Kind("scale", _param_shape("scale"),
               module=lambda a: modules.Scale(a["shape"], a["init"]),
               defaults={"shape": [1], "init": 1.0}))
_register(Kind("offset", _param_shape("offset"), module=lambda a: modules.Offset(a["shape"])))
_register(Kind("class_token", _class_token, module=lambda a: modules.ClassToken(a["shape"]),
               channels="none"))
_register(
    Kind(
        "layernorm",
        _layernorm,
        module=lambda a: nn.LayerNorm(a["normalized_shape"], eps=a["eps"],
                                      elementwise_affine=a["elementwise_affine"], bias=a["bias"]),
        defaults={"eps": 1e-5, "elementwise_affine": True, "bias": True},
        channels="none",
    )
)
_register(
    Kind(
        "groupnorm",
        _groupnorm,
        module=lambda a: nn.GroupNorm(a["num_groups"], a["num_channels"], eps=a["eps"],
                                      affine=a["affine"]),
        defaults={"eps": 1e-5, "affine": True},
        channels="none",
        per_channel_tensors=("weight", "bias"),
    )
)
# Attention: one node per attention layer, computed by torch's or torchvision's own module.
_register(
    Kind(
        "self_attention",
        _last_dim("self_attention", "embed_dim", rank=2),
        module=lambda a: modules.SelfAttention(a["embed_dim"], a["num_heads"], a["dropout"],
                                               a["bias"], a["need_weights"], a["head_dim"]),
        defaults={"dropout": 0.0, "bias": True, "need_weights": False, "head_dim": None},
        channels="none",
    )
)
_register(
    Kind(
        "window_attention",
        _last_dim("window_attention", "dim", rank=3),
        module=lambda a: modules.window_attention(
            a["dim"], a["window_size"], a["shift_size"], a["num_heads"], a["qkv_bias"],
            a["proj_bias"], a["attention_dropout"], a["dropout"], a["version"]),
        defaults={"qkv_bias": True, "proj_bias": True, "attention_dropout": 0.0, "dropout": 0.0,
                  "version": 1},
        channels="none",
        buffers=("relative_position_index", "relative_coords_table"),
    )
)
_register(
    Kind(
        "relative_attention",
        _last_dim("relative_attention", "feat_dim", rank=3),
        module=lambda a: modules.relative_attention(a["feat_dim"], a["head_dim"],
                                                    a["max_seq_len"]),
        channels="none",
        buffers=("relative_position_index",),
    )
)

_register(
    Kind(
        "attention",
        _attention,
        module=lambda a: modules.Attention(a["dim"], a["num_heads"], a["head_dim"],
                                           a["dim_out"], a["qkv_bias"], a["proj_bias"],
                                           a["attn_drop"], a["proj_drop"]),
        defaults={"qkv_bias": True, "proj_bias": True, "attn_drop": 0.0, "proj_drop": 0.0},
        channels="none",
    )
)
# The generic node (growth.program): calls replayed exactly; no growth rule crosses it.
_register(Kind("program", _program, arity=(1, -1),
               module=lambda a: program.Program(a["calls"], a["held"]),
               defaults={"held": {}, "elementwise": False}, channels="none"))

ACTIVATIONS = frozenset({"relu", "leaky_relu", "elu", "gelu", "silu", "tanh", "sigmoid"})
# Kinds whose layers hold tensors (weights, BN statistics); every other kind is stateless.
PARAMETRIC = frozenset({"linear", "conv2d", "batchnorm1d", "batchnorm2d", "layernorm", "scale",
                        "offset", "class_token", "self_attention", "window_attention",
                        "relative_attention", "groupnorm", "attention", "program"})
# A node attribute every kind accepts: a frozen node's parameters get no gradient and its layer
# computes as in eval mode in every mode (BatchNorm statistics fixed, dropout off; growth.compile).
FROZEN = "frozen"


def buffer_names(kind: str, attrs: Attrs) -> frozenset[str]:
    """The tensors of a node that are state, not trainable parameters (a program lists its
    own)."""
    if kind == "program":
        return frozenset(k for k, v in attrs.get("held", {}).items() if v.get("buffer"))
    return frozenset(kind_of(kind).buffers)


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
