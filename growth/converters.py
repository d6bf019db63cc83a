"""How the importer maps each traced call (module, function, tensor method) to a node kind.

Converters mirror torch's own signatures, so positional and keyword arguments bind the way they
do in torch. Each returns a `_Layer` (a node to add; its inputs may be `_Layer`s too, added
first), a tuple of them (e.g. `chunk`), an existing `_Ref` (a call that changes nothing, such as
`contiguous`), or a plain Python value (sizes, shape checks). A call the graph cannot express
raises `_Unsupported` with the reason; the importer names the layer.
"""

from __future__ import annotations

import math
import operator
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from growth.layers import Attrs, Shape, module_tensors


@dataclass(frozen=True)
class Batch:
    """The batch size, `x.size(0)` of the tensor `ref`: the first dim of a view or expand."""

    ref: Ref | Lazy

    def __repr__(self) -> str:
        return "<batch size>"


@dataclass(frozen=True)
class Ref:
    """A tensor value during import: the graph node that holds it and its per-sample shape."""

    name: str
    shape: Shape


@dataclass(frozen=True)
class Param:
    """A parameter or buffer the forward reads directly (`self.w`), not inside a layer; a view
    of one (`self.gamma.reshape(1, -1, 1, 1)`) keeps its target (it owns the same values)."""

    target: str
    tensor: torch.Tensor = field(repr=False, compare=False)
    trainable: bool = field(default=True, compare=False)
    shared: bool = field(default=False, compare=False)  # read by more than one call
    views: tuple = field(default=(), compare=False)  # (method, args, kwargs) from the target


@dataclass(frozen=True)
class Expanded:
    """`param.expand(batch, -1, -1)`: learned tokens repeated over the batch (a class token)."""

    param: Param
    batch: Batch
    shared: bool = False  # read by more than one call: no single class_token node holds it


@dataclass(eq=False)
class Lazy:
    """A call no node kind computes (named in `growth.program.FUNCTIONS`), kept as a value
    until a node needs it: a layer reading it (or the network's output) turns it, with every
    Lazy it reads, into one program node. Values that are not batch-first tensors (a permute
    moving the batch dim, windows folded into the batch, a size computed from the batch, a
    parameter's arithmetic) only ever live inside programs.

    vals: the traced values (growth.fxtrace); ref: the program node once made; users: how
    many calls read it (read by several, it is made into a node of its own when a program
    reads it, if it can be one)."""

    fn: str
    args: tuple
    kwargs: dict
    vals: tuple | None = None
    ref: Ref | None = None
    users: int = 1

    @property
    def shared(self) -> bool:
        return self.users > 1

    def __repr__(self) -> str:  # the arguments nest: never print them
        return f"<the value of {self.fn}>"


@dataclass
class Layer:
    """A node to add: what a converter returns for a call that computes a new tensor."""

    kind: str
    inputs: list[Ref | Layer]
    attrs: Attrs = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] | None = None
    inplace: bool = False
    params: list[Param] = field(default_factory=list)  # Params this node takes over
    wrap: Callable[[Ref], Any] | None = None  # what the call returns, given the new node


class Unsupported(Exception):
    """Raised by a converter; the importer turns it into an error naming the layer."""


def is_batch(value: Any) -> bool:
    return isinstance(value, Batch)


def tensor(value: Any, what: str = "input") -> Ref:
    if isinstance(value, Param):
        raise Unsupported(f"its {what} is the tensor {value.target!r} read directly from the "
                          "model, which this call cannot hold as a node's weight")
    if not isinstance(value, Ref):
        raise Unsupported(f"its {what} must be a tensor computed by the network, got {value!r}")
    return value


def require(ok: bool, reason: str) -> None:
    if not ok:
        raise Unsupported(reason)


def _cpu(t: torch.Tensor, what: str) -> torch.Tensor:
    require(not t.is_meta, f"{what} is on the meta device and holds no values; materialise the "
            "model (e.g. to_empty() and an init) first")
    return t.detach().to("cpu", copy=True)


def _weights(m: nn.Module) -> dict[str, torch.Tensor]:
    """A private CPU copy: the graph's tensors must not change when the user trains `m`, and a
    graph always holds CPU tensors, wherever the model lives."""
    return {k: _cpu(v, f"its tensor {k!r}") for k, v in module_tensors(m).items()}


def _pdim(d: int, rank: int, what: str = "dim") -> int:
    """A dim of the batched tensor as a per-sample dim (the batch dim itself is refused)."""
    full = rank + 1
    require(-full <= d < full, f"{what}={d} is out of range for a tensor of rank {full}")
    d %= full
    require(d != 0, f"{what}={d} is the batch dim; only per-sample dims can be used")
    return d - 1


# ---- activations and dropout ------------------------------------------------------------------
def _act(kind: str, **fixed: Any) -> Callable[..., Layer]:
    def convert(input: Any, inplace: bool = False) -> Layer:
        return Layer(kind, [tensor(input)], dict(fixed), inplace=inplace)

    return convert


def _unary(kind: str) -> Callable[[Any], Layer]:
    return lambda input: Layer(kind, [tensor(input)])


def _gelu(input: Any, approximate: str = "none") -> Layer:
    require(approximate in ("none", "tanh"), f"gelu(approximate={approximate!r})")
    return Layer("gelu", [tensor(input)], {"approximate": approximate})


def _leaky_relu(input: Any, negative_slope: float = 0.01, inplace: bool = False) -> Layer:
    return Layer("leaky_relu", [tensor(input)], {"negative_slope": negative_slope},
                 inplace=inplace)


def _elu(input: Any, alpha: float = 1.0, inplace: bool = False) -> Layer:
    return Layer("elu", [tensor(input)], {"alpha": alpha}, inplace=inplace)


def _hardtanh(input: Any, min_val: float = -1.0, max_val: float = 1.0, inplace: bool = False
              ) -> Layer:
    return Layer("hardtanh", [tensor(input)], {"min_val": min_val, "max_val": max_val},
                 inplace=inplace)


def _softplus(input: Any, beta: float = 1.0, threshold: float = 20.0) -> Layer:
    return Layer("softplus", [tensor(input)], {"beta": beta, "threshold": threshold})


def _dropout(kind: str) -> Callable[..., Layer]:
    def convert(input: Any, p: float = 0.5, training: bool = True, inplace: bool = False
                ) -> Layer:
        if not training:  # traced with training=False: a no-op in every mode
            return Layer("identity", [tensor(input)])
        return Layer(kind, [tensor(input)], {"p": p}, inplace=inplace)

    return convert


def _stochastic_depth(input: Any, p: float, mode: str, training: bool = True) -> Layer:
    if not training or p == 0.0:  # what torchvision's function returns then: its input
        return Layer("identity", [tensor(input)])
    return Layer("stochastic_depth", [tensor(input)], {"p": p, "mode": mode})


# ---- pooling, normalisation, layers called as functions ---------------------------------------
def _max_pool2d(input: Any, kernel_size: Any, stride: Any = None, padding: Any = 0,
                dilation: Any = 1, ceil_mode: bool = False, return_indices: bool = False
                ) -> Layer:
    require(not return_indices, "return_indices=True has no node kind")
    attrs = {"kernel_size": kernel_size, "stride": stride or None, "padding": padding,
             "dilation": dilation, "ceil_mode": ceil_mode}
    return Layer("maxpool2d", [tensor(input)], attrs)


def _avg_pool2d(input: Any, kernel_size: Any, stride: Any = None, padding: Any = 0,
                ceil_mode: bool = False, count_include_pad: bool = True,
                divisor_override: Any = None) -> Layer:
    require(divisor_override is None, "divisor_override has no node kind")
    attrs = {"kernel_size": kernel_size, "stride": stride or None, "padding": padding,
             "ceil_mode": ceil_mode, "count_include_pad": count_include_pad}
    return Layer("avgpool2d", [tensor(input)], attrs)


def _adaptive_avg_pool2d(input: Any, output_size: Any) -> Layer:
    return Layer("adaptive_avgpool2d", [tensor(input)], {"output_size": output_size})


def _own(value: Any, what: str) -> Param | None:
    require(value is None or isinstance(value, Param),
            f"its {what} must be a parameter of the model (or None), got {value!r}")
    return value


def _layer_norm(input: Any, normalized_shape: Any, weight: Any = None, bias: Any = None,
                eps: float = 1e-5) -> Layer:
    w, b = _own(weight, "weight"), _own(bias, "bias")
    require(w is not None or b is None, "layer_norm with a bias but no weight has no node kind")
    shape = [int(d) for d in (normalized_shape if isinstance(normalized_shape, (list, tuple,
                                                                                 torch.Size))
                              else [normalized_shape])]
    tensors = {k: _cpu(p.tensor, repr(p.target)) for k, p in (("weight", w), ("bias", b)) if p}
    attrs = {"normalized_shape": shape, "eps": eps, "elementwise_affine": w is not None,
             "bias": b is not None}
    return Layer("layernorm", [tensor(input)], attrs, tensors, params=[p for p in (w, b) if p])


def _linear(input: Any, weight: Any, bias: Any = None) -> Layer:
    w, b = _own(weight, "weight"), _own(bias, "bias")
    require(w is not None and w.tensor.dim() == 2, "linear needs a 2-D weight parameter")
    tensors = {k: _cpu(p.tensor, repr(p.target)) for k, p in (("weight", w), ("bias", b)) if p}
    attrs = {"in_features": w.tensor.shape[1], "out_features": w.tensor.shape[0],
             "bias": b is not None}
    return Layer("linear", [tensor(input)], attrs, tensors, params=[p for p in (w, b) if p])


def _conv2d(input: Any, weight: Any, bias: Any = None, stride: Any = 1, padding: Any = 0,
            dilation: Any = 1, groups: int = 1) -> Layer:
    w, b = _own(weight, "weight"), _own(bias, "bias")
    require(w is not None and w.tensor.dim() == 4, "conv2d needs a 4-D weight parameter")
    tensors = {k: _cpu(p.tensor, repr(p.target)) for k, p in (("weight", w), ("bias", b)) if p}
    out_c, in_per_group, kh, kw = w.tensor.shape
    x, padding = _padded(tensor(input), padding, (kh, kw), stride, dilation)
    attrs = {"in_channels": in_per_group * groups, "out_channels": out_c, "kernel_size": (kh, kw),
             "stride": stride, "padding": padding, "dilation": dilation, "groups": groups,
             "bias": b is not None}
    return Layer("conv2d", [x], attrs, tensors, params=[p for p in (w, b) if p])


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _padded(x: Ref, padding: Any, kernel: Any, stride: Any, dilation: Any
            ) -> tuple[Ref | Layer, Any]:
    """A conv's input and int padding for padding="same"/"valid": symmetric "same" padding is
    the conv's own; an odd total puts the extra row and column after, as torch does, in a pad
    node before the conv."""
    if not isinstance(padding, str):
        return x, padding
    require(padding in ("same", "valid"), f"padding={padding!r}")
    if padding == "valid":
        return x, 0
    require(_pair(stride) == (1, 1), "padding='same' needs stride 1")
    total = [d * (k - 1) for d, k in zip(_pair(dilation), _pair(kernel))]
    before = [t // 2 for t in total]
    extra = [t - 2 * b for t, b in zip(total, before)]
    if not any(extra):
        return x, tuple(before)
    pad = Layer("pad", [x], {"pad": [0, extra[1], 0, extra[0]], "value": 0.0})
    return pad, tuple(before)


def _batch_norm(input: Any, running_mean: Any, running_var: Any, weight: Any = None,
                bias: Any = None, training: bool = False, momentum: float = 0.1,
                eps: float = 1e-5) -> Layer:
    """F.batch_norm over the channels (axis 0 of (C,) (C, L) or (C, H, W)): a BatchNorm node,
    as the fused norm-and-activation layers call it."""
    x = tensor(input)
    stats = [_own(v, n) for v, n in ((running_mean, "running_mean"), (running_var, "running_var"))]
    w, b = _own(weight, "weight"), _own(bias, "bias")
    require((stats[0] is None) == (stats[1] is None), "batch_norm with only one running statistic")
    require((w is None) == (b is None), "batch_norm with only one of weight and bias")
    require(stats[0] is not None or training, "batch_norm without running statistics in eval "
            "mode")
    require(len(x.shape) in (1, 2, 3), f"batch_norm of a per-sample shape {x.shape}")
    held = (("weight", w), ("bias", b), ("running_mean", stats[0]), ("running_var", stats[1]))
    tensors = {k: _cpu(p.tensor, repr(p.target)) for k, p in held if p}
    attrs = {"num_features": x.shape[0], "eps": eps, "momentum": momentum,
             "affine": w is not None, "track_running_stats": stats[0] is not None}
    kind = "batchnorm2d" if len(x.shape) == 3 else "batchnorm1d"
    return Layer(kind, [x], attrs, tensors, params=[p for _, p in held if p])


def _group_norm(input: Any, num_groups: int, weight: Any = None, bias: Any = None,
                eps: float = 1e-5) -> Layer:
    x = tensor(input)
    w, b = _own(weight, "weight"), _own(bias, "bias")
    require((w is None) == (b is None), "group_norm with only one of weight and bias")
    tensors = {k: _cpu(p.tensor, repr(p.target)) for k, p in (("weight", w), ("bias", b)) if p}
    attrs = {"num_groups": int(num_groups), "num_channels": x.shape[0], "eps": eps,
             "affine": w is not None}
    return Layer("groupnorm", [x], attrs, tensors, params=[p for p in (w, b) if p])


def _interpolate(input: Any, size: Any = None, scale_factor: Any = None, mode: str = "nearest",
                 align_corners: Any = None, recompute_scale_factor: Any = None,
                 antialias: bool = False) -> Layer:
    """F.interpolate (nn.Upsample calls it) of (C, H, W) maps: resampling keeps channels."""
    x = tensor(input)
    require(len(x.shape) == 3, f"interpolate of a per-sample shape {x.shape} (only (C, H, W))")
    norm = lambda v: list(v) if isinstance(v, (tuple, list)) else v  # noqa: E731
    attrs = {"size": norm(size), "scale_factor": norm(scale_factor), "mode": mode,
             "align_corners": align_corners, "recompute_scale_factor": recompute_scale_factor,
             "antialias": antialias}
    return Layer("interpolate", [x], attrs)


# ---- arithmetic --------------------------------------------------------------------------------
def _add(input: Any, other: Any, alpha: Any = 1) -> Layer:
    require(alpha == 1, f"add with alpha={alpha} has no node kind")
    if isinstance(other, Param) or isinstance(input, Param):
        x, p = (input, other) if isinstance(other, Param) else (other, input)
        require(p.trainable, f"{p.target!r} is a buffer (an offset node would train it)")
        return Layer("offset", [tensor(x)], {"shape": list(p.tensor.shape)},
                     {"weight": _cpu(p.tensor, repr(p.target))}, params=[p])
    return Layer("add", [tensor(input), tensor(other, "second operand")])


def _mul(input: Any, other: Any) -> Layer:
    if isinstance(other, Param) or isinstance(input, Param):
        x, p = (input, other) if isinstance(other, Param) else (other, input)
        require(p.trainable, f"{p.target!r} is a buffer (a scale node would train it)")
        return Layer("scale", [tensor(x)], {"shape": list(p.tensor.shape)},
                     {"weight": _cpu(p.tensor, repr(p.target))}, params=[p])
    require(isinstance(input, Ref) and isinstance(other, Ref),
            f"multiplying a tensor by {other if isinstance(input, Ref) else input!r} (a number) "
            "has no node kind; multiply by a parameter (a learned scale) or a tensor (a gate)")
    return Layer("mul", [input, other])


# ---- joining, splitting, indexing ----------------------------------------------------------------
def _cat(tensors: Any, dim: int = 0) -> Layer | Ref:
    items = list(tensors)
    if len(items) == 2 and isinstance(items[0], Expanded) and not items[0].shared:
        # torch.cat([cls.expand(n, -1, -1), x])
        p, x = items[0].param, tensor(items[1], "list item")
        require(_pdim(dim, len(x.shape)) == 0, "class tokens must be joined along dim 1")
        return Layer("class_token", [x], {"shape": list(p.tensor.shape)},
                     {"weight": _cpu(p.tensor, repr(p.target))}, params=[p])
    refs = [tensor(t, "list item") for t in items]
    require(len(refs) >= 1, "cat of an empty list")
    if len(refs) == 1:  # torch.cat([x]) is a copy of x
        return refs[0]
    return Layer("concat", refs, {"dim": _pdim(dim, len(refs[0].shape))})


def _slices(x: Ref, dim: int, sizes: list[int]) -> tuple[Layer, ...]:
    """One getitem node per piece of `x` along per-sample dim `dim`."""
    out, start = [], 0
    for size in sizes:
        index: list[Any] = [[None, None, None]] * dim + [[start, start + size, None]]
        out.append(Layer("getitem", [x], {"index": index}))
        start += size
    return tuple(out)


def _chunk(input: Any, chunks: int, dim: int = 0) -> tuple[Layer, ...]:
    x = tensor(input)
    d = _pdim(dim, len(x.shape))
    size = math.ceil(x.shape[d] / chunks)
    sizes = [min(size, x.shape[d] - i) for i in range(0, x.shape[d], size)]
    return _slices(x, d, sizes)


def _split(tensor_: Any, split_size_or_sections: Any, dim: int = 0) -> tuple[Layer, ...]:
    x = tensor(tensor_)
    d = _pdim(dim, len(x.shape))
    if isinstance(split_size_or_sections, int):
        s = split_size_or_sections
        sizes = [min(s, x.shape[d] - i) for i in range(0, x.shape[d], s)]
    else:
        sizes = [int(v) for v in split_size_or_sections]
    return _slices(x, d, sizes)


def _index_items(x: Ref, index: Any) -> list[Any]:
    """A batched index (batch dim kept whole) as per-sample JSON items."""
    items = list(index) if isinstance(index, tuple) else [index]
    if Ellipsis in items:
        at = items.index(Ellipsis)
        fill = len(x.shape) + 1 - (len(items) - 1)
        items = items[:at] + [slice(None)] * fill + items[at + 1:]
    require(bool(items) and items[0] == slice(None),
            "indexing must keep the whole batch (x[:, ...])")
    out = []
    for item in items[1:]:
        if isinstance(item, slice):
            require(all(v is None or isinstance(v, int) for v in (item.start, item.stop,
                                                                   item.step)),
                    f"slice {item} needs int bounds")
            out.append([item.start, item.stop, item.step])
        else:
            require(isinstance(item, int) and not isinstance(item, bool),
                    f"index item {item!r}: only ints, slices and ... can index a tensor")
            out.append(item)
    while out and out[-1] == [None, None, None]:
        out.pop()
    return out


def _getitem(obj: Any, index: Any) -> Any:
    if isinstance(obj, Ref):
        items = _index_items(obj, index)
        return Layer("getitem", [obj], {"index": items}) if items else obj
    require(isinstance(obj, (tuple, list)), f"indexing {obj!r}")
    return obj[index]


# ---- shapes and layouts -------------------------------------------------------------------------
def _flatten(input: Any, start_dim: int = 0, end_dim: int = -1) -> Layer | Ref:
    x = tensor(input)
    rank = len(x.shape)
    start, end = _pdim(start_dim, rank, "start_dim"), _pdim(end_dim, rank, "end_dim")
    if start == 0 and end == rank - 1:
        return Layer("flatten", [x])
    merged = math.prod(x.shape[start:end + 1])
    return _view(x, (*x.shape[:start], merged, *x.shape[end + 1:]))


def _view(x: Ref, shape: tuple[int, ...]) -> Layer | Ref:
    if shape == x.shape:
        return x
    if shape == (math.prod(x.shape),):
        return Layer("flatten", [x])
    return Layer("reshape", [x], {"shape": list(shape)})


def _reshape(input: Any, *shape: Any) -> Layer | Ref:
    """view/reshape: the batch dim stays first; the per-sample dims may take any shape."""
    x = tensor(input)
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = tuple(shape[0])
    require(len(shape) >= 1, "reshape to a scalar")
    first, rest = shape[0], list(shape[1:])
    require(is_batch(first) or first == -1,
            f"reshape to {shape} fixes the batch size; start the shape with x.size(0) or -1")
    require(all(isinstance(d, int) and not isinstance(d, bool) for d in rest),
            f"reshape to {shape}: every per-sample size must be an int")
    numel = math.prod(x.shape)
    if rest.count(-1) == 1 and is_batch(first):
        known = math.prod(d for d in rest if d != -1)
        require(known > 0 and numel % known == 0, f"reshape of {x.shape} to {shape}")
        rest[rest.index(-1)] = numel // known
    require(-1 not in rest and math.prod(rest) == numel,
            f"reshape of a per-sample shape {x.shape} to {shape} must keep the batch dim")
    return _view(x, tuple(rest))


def _unsqueeze(input: Any, dim: int) -> Layer | Ref:
    x = tensor(input)
    d = _pdim(dim if dim < 0 else dim, len(x.shape) + 1)
    return _view(x, (*x.shape[:d], 1, *x.shape[d:]))


def _squeeze(input: Any, dim: Any = None) -> Layer | Ref:
    x = tensor(input)
    dims = range(len(x.shape)) if dim is None else [
        _pdim(d, len(x.shape)) for d in (dim if isinstance(dim, (list, tuple)) else [dim])]
    return _view(x, tuple(s for i, s in enumerate(x.shape) if not (i in dims and s == 1)))


def _permute(input: Any, *dims: Any) -> Layer | Ref:
    x = tensor(input)
    if len(dims) == 1 and isinstance(dims[0], (tuple, list, torch.Size)):
        dims = tuple(dims[0])
    rank = len(x.shape) + 1
    require(len(dims) == rank, f"permute{dims} of a tensor of rank {rank}")
    full = [d % rank for d in dims]
    require(full[0] == 0, f"permute{dims} moves the batch dim; keep it first")
    per = [d - 1 for d in full[1:]]
    return x if per == list(range(rank - 1)) else Layer("permute", [x], {"dims": per})


def _transpose(input: Any, dim0: int, dim1: int) -> Layer | Ref:
    x = tensor(input)
    dims = list(range(len(x.shape)))
    a, b = _pdim(dim0, len(x.shape)), _pdim(dim1, len(x.shape))
    dims[a], dims[b] = dims[b], dims[a]
    return _permute(x, [0, *(d + 1 for d in dims)])


def _reduce(kind: str) -> Callable[..., Layer]:
    """mean / sum over per-sample dims (a reduction over the batch has no node kind)."""
    def convert(input: Any, dim: Any = None, keepdim: bool = False, dtype: Any = None) -> Layer:
        x = tensor(input)
        require(dim is not None, f"{kind} over every dim (the batch too) has no node kind")
        require(dtype is None, f"{kind} with a dtype has no node kind")
        dims = [_pdim(d, len(x.shape)) for d in (dim if isinstance(dim, (list, tuple))
                                                 else [dim])]
        return Layer(kind, [x], {"dims": dims, "keepdim": bool(keepdim)})

    return convert


_mean = _reduce("mean")


def _pad(input: Any, pad: Any, mode: str = "constant", value: Any = None) -> Layer | Ref:
    require(mode == "constant", f"pad(mode={mode!r}): only constant padding has a node kind")
    pad = [int(p) for p in pad]
    if not any(pad):
        return tensor(input)
    return Layer("pad", [tensor(input)], {"pad": pad, "value": float(value or 0.0)})


def _patch_merging_pad(x: Any) -> Layer:
    """Swin's patch merging: pad H and W to even sizes, then stack the four 2x2 phases of
    (H, W, C) along channels -- as plain pad, getitem and concat nodes."""
    x = tensor(x)
    h, w = x.shape[-3], x.shape[-2]
    src: Ref | Layer = x
    if h % 2 or w % 2:
        src = Layer("pad", [x], {"pad": [0, 0, 0, w % 2, 0, h % 2], "value": 0.0})
    lead = [[None, None, None]] * (len(x.shape) - 3)
    phases = [Layer("getitem", [src], {"index": [*lead, [i, None, 2], [j, None, 2]]})
              for i, j in ((0, 0), (1, 0), (0, 1), (1, 1))]
    return Layer("concat", phases, {"dim": len(x.shape) - 1})


def _contiguous(input: Any, memory_format: Any = None) -> Ref:
    return tensor(input)


def _expand(input: Any, *sizes: Any) -> Expanded:
    require(isinstance(input, Param), "expand of a computed tensor has no node kind")
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = tuple(sizes[0])
    require(input.tensor.dim() == 3 and input.tensor.shape[0] == 1 and len(sizes) == 3
            and is_batch(sizes[0]) and sizes[1:] == (-1, -1),
            "only param.expand(batch, -1, -1) of a (1, T, D) parameter (class tokens) is "
            "supported")
    return Expanded(input, sizes[0])


def _size(input: Any, dim: int | None = None) -> Any:
    x = tensor(input)
    full = (Batch(x), *x.shape)
    return full if dim is None else full[dim]


def _dim(input: Any) -> int:
    return len(tensor(input).shape) + 1


def _getattr(obj: Any, name: str) -> Any:
    if isinstance(obj, Ref) and name == "shape":
        return (Batch(obj), *obj.shape)
    if isinstance(obj, Ref) and name == "ndim":
        return len(obj.shape) + 1
    if isinstance(obj, Param) and name in ("shape", "ndim"):  # a parameter's own size
        return tuple(obj.tensor.shape) if name == "shape" else obj.tensor.dim()
    require(False, f"reading attribute {name!r} of {obj!r}")


class CheckFailed(Exception):
    """The model's own shape check (torch._assert) fails for the input shape being imported."""


def _assert(condition: Any, message: Any = "") -> None:
    """torch._assert: evaluated at import time; a failed check is the model's own refusal."""
    if isinstance(condition, (Lazy, Ref)):
        return None  # depends on the batch or on values: the importer drops it with a warning
    if not condition:
        raise CheckFailed(str(message))
    return None


# ---- layers (call_module) -----------------------------------------------------------------------
def _m_linear(m: nn.Linear, x: Any) -> Layer:
    attrs = {"in_features": m.in_features, "out_features": m.out_features,
             "bias": m.bias is not None}
    return Layer("linear", [tensor(x)], attrs, _weights(m))


def _m_conv2d(m: nn.Conv2d, x: Any) -> Layer:
    require(m.padding_mode == "zeros", f"padding_mode={m.padding_mode!r} (only 'zeros')")
    src, padding = _padded(tensor(x), m.padding, m.kernel_size, m.stride, m.dilation)
    attrs = {"in_channels": m.in_channels, "out_channels": m.out_channels,
             "kernel_size": m.kernel_size, "stride": m.stride, "padding": padding,
             "dilation": m.dilation, "groups": m.groups, "bias": m.bias is not None}
    return Layer("conv2d", [src], attrs, _weights(m))


def _m_batchnorm(m: nn.modules.batchnorm._BatchNorm, x: Any) -> Layer:
    kind = "batchnorm1d" if isinstance(m, nn.BatchNorm1d) else "batchnorm2d"
    attrs = {"num_features": m.num_features, "eps": m.eps, "momentum": m.momentum,
             "affine": m.affine, "track_running_stats": m.track_running_stats}
    return Layer(kind, [tensor(x)], attrs, _weights(m))


def _m_layernorm(m: nn.LayerNorm, x: Any) -> Layer:
    attrs = {"normalized_shape": list(m.normalized_shape), "eps": m.eps,
             "elementwise_affine": m.elementwise_affine,
             "bias": m.elementwise_affine and m.bias is not None}
    return Layer("layernorm", [tensor(x)], attrs, _weights(m))


def _m_attention(m: nn.MultiheadAttention, query: Any, key: Any, value: Any,
                 key_padding_mask: Any = None, need_weights: bool = True, attn_mask: Any = None,
                 average_attn_weights: bool = True, is_causal: bool = False) -> Layer:
    x = tensor(query, "query")
    require(key is query and value is query,
            "only self-attention (query, key and value the same tensor) has a node kind")
    require(key_padding_mask is None and attn_mask is None and not is_causal,
            "attention masks have no node kind")
    require(m.batch_first, "batch_first=False puts the batch dim second; a NetGraph needs it "
            "first (build the layer with batch_first=True)")
    require(m.bias_k is None and not m.add_zero_attn and m._qkv_same_embed_dim,
            "add_bias_kv, add_zero_attn and kdim/vdim have no node kind")
    attrs = {"embed_dim": m.embed_dim, "num_heads": m.num_heads, "dropout": m.dropout,
             "bias": m.in_proj_bias is not None, "need_weights": bool(need_weights)}
    return Layer("self_attention", [x], attrs, _weights(m), wrap=lambda ref: (ref, None))


def _m_window_attention(m: nn.Module, x: Any) -> Layer:
    from torchvision.models.swin_transformer import ShiftedWindowAttentionV2

    attrs = {"dim": m.qkv.in_features, "window_size": list(m.window_size),
             "shift_size": list(m.shift_size), "num_heads": m.num_heads,
             "qkv_bias": m.qkv.bias is not None, "proj_bias": m.proj.bias is not None,
             "attention_dropout": m.attention_dropout, "dropout": m.dropout,
             "version": 2 if isinstance(m, ShiftedWindowAttentionV2) else 1}
    return Layer("window_attention", [tensor(x)], attrs, _weights(m))


def _m_relative_attention(m: nn.Module, x: Any) -> Layer:
    attrs = {"feat_dim": m.merge.out_features, "head_dim": m.head_dim,
             "max_seq_len": m.max_seq_len}
    return Layer("relative_attention", [tensor(x)], attrs, _weights(m))


def _m_simple(kind: str) -> Callable[[nn.Module, Any], Layer]:
    return lambda m, x: Layer(kind, [tensor(x)])


def _m_max_pool2d(m: nn.MaxPool2d, x: Any) -> Layer:
    return _max_pool2d(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode,
                       m.return_indices)


def _m_avg_pool2d(m: nn.AvgPool2d, x: Any) -> Layer:
    return _avg_pool2d(x, m.kernel_size, m.stride, m.padding, m.ceil_mode,
                       m.count_include_pad, m.divisor_override)


MODULES: dict[type, Callable[..., Layer]] = {
    nn.Linear: _m_linear, nn.Conv2d: _m_conv2d,
    nn.BatchNorm1d: _m_batchnorm, nn.BatchNorm2d: _m_batchnorm, nn.LayerNorm: _m_layernorm,
    nn.MultiheadAttention: _m_attention,
    nn.ReLU: _m_simple("relu"), nn.ReLU6: _m_simple("relu6"), nn.SiLU: _m_simple("silu"),
    nn.GELU: lambda m, x: _gelu(x, m.approximate),
    nn.Hardswish: _m_simple("hardswish"), nn.Hardsigmoid: _m_simple("hardsigmoid"),
    nn.Hardtanh: lambda m, x: _hardtanh(x, m.min_val, m.max_val),
    nn.Mish: _m_simple("mish"), nn.Softplus: lambda m, x: _softplus(x, m.beta, m.threshold),
    nn.LeakyReLU: lambda m, x: _leaky_relu(x, m.negative_slope),
    nn.ELU: lambda m, x: _elu(x, m.alpha),
    nn.Tanh: _m_simple("tanh"), nn.Sigmoid: _m_simple("sigmoid"),
    nn.Identity: _m_simple("identity"),
    nn.Dropout: lambda m, x: Layer("dropout", [tensor(x)], {"p": m.p}),
    nn.Dropout2d: lambda m, x: Layer("dropout2d", [tensor(x)], {"p": m.p}),
    nn.ChannelShuffle: lambda m, x: Layer("channel_shuffle", [tensor(x)], {"groups": m.groups}),
    nn.MaxPool2d: _m_max_pool2d, nn.AvgPool2d: _m_avg_pool2d,
    nn.AdaptiveAvgPool2d: lambda m, x: _adaptive_avg_pool2d(x, m.output_size),
    nn.Flatten: lambda m, x: _flatten(x, m.start_dim, m.end_dim),
}
# Python arithmetic on sizes (shape checks, window counts): evaluated at import time.
PY_OPS = frozenset({
    operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
    operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod,
    operator.neg, operator.pos, operator.and_, operator.or_, operator.not_, operator.truth,
    operator.getitem, len, int, float, min, max, math.sqrt,
})

FUNCTIONS: dict[Any, Callable[..., Any]] = {
    F.relu: _act("relu"), torch.relu: _act("relu"), torch.relu_: _act("relu", ),
    F.relu_: _act("relu"), F.relu6: _act("relu6"), F.hardswish: _act("hardswish"),
    F.hardsigmoid: _act("hardsigmoid"), F.hardtanh: _hardtanh, F.mish: _act("mish"),
    F.softplus: _softplus, F.gelu: _gelu, F.silu: _act("silu"), F.elu: _elu,
    F.leaky_relu: _leaky_relu,
    torch.sigmoid: _unary("sigmoid"), F.sigmoid: _unary("sigmoid"),
    torch.tanh: _unary("tanh"), F.tanh: _unary("tanh"),
    F.dropout: _dropout("dropout"), F.dropout2d: _dropout("dropout2d"),
    F.max_pool2d: _max_pool2d, F.avg_pool2d: _avg_pool2d,
    F.adaptive_avg_pool2d: _adaptive_avg_pool2d, F.layer_norm: _layer_norm, F.linear: _linear,
    F.conv2d: _conv2d, F.pad: _pad, torch.flatten: _flatten, torch.reshape: _reshape,
    torch.permute: _permute, torch.transpose: _transpose, torch.swapaxes: _transpose,
    torch.swapdims: _transpose, torch.unsqueeze: _unsqueeze, torch.squeeze: _squeeze,
    torch.mean: _mean, torch.sum: _reduce("sum"), torch.chunk: _chunk, torch.split: _split,
    F.batch_norm: _batch_norm, F.group_norm: _group_norm, F.interpolate: _interpolate,
    operator.add: _add, operator.iadd: _add, torch.add: _add,
    operator.mul: _mul, operator.imul: _mul, torch.mul: _mul,
    torch.cat: _cat, torch.concat: _cat, operator.getitem: _getitem, getattr: _getattr,
    torch._assert: _assert, torch._assert_async: lambda *args, **kwargs: None,
    F.channel_shuffle: lambda input, groups: Layer(
        "channel_shuffle", [tensor(input)], {"groups": groups}),
}
METHODS: dict[str, Callable[..., Any]] = {
    "relu": _act("relu"), "relu_": _act("relu"), "sigmoid": _unary("sigmoid"),
    "sigmoid_": _unary("sigmoid"), "tanh": _unary("tanh"), "tanh_": _unary("tanh"),
    "add": _add, "add_": _add, "mul": _mul, "mul_": _mul, "flatten": _flatten,
    "view": _reshape, "reshape": _reshape, "permute": _permute, "transpose": _transpose,
    "swapaxes": _transpose, "swapdims": _transpose, "unsqueeze": _unsqueeze,
    "squeeze": _squeeze, "mean": _mean, "sum": _reduce("sum"), "chunk": _chunk, "split": _split,
    "size": _size,
    "dim": _dim, "contiguous": _contiguous, "expand": _expand,
}


@cache
def torchvision_rules() -> tuple[dict[type, Callable[..., Layer]], dict[Any, Callable[..., Any]]]:
    """Layers torchvision defines that become one node each (traced as leaves), and its
    fx-wrapped functions; loaded on first use so importing growth stays light."""
    from torchvision.models import maxvit, swin_transformer
    from torchvision.ops.stochastic_depth import StochasticDepth, stochastic_depth

    modules: dict[type, Callable[..., Layer]] = {
        StochasticDepth: lambda m, x: _stochastic_depth(x, m.p, m.mode),
        swin_transformer.ShiftedWindowAttention: _m_window_attention,
        swin_transformer.ShiftedWindowAttentionV2: _m_window_attention,
        maxvit.RelativePositionalMultiHeadAttention: _m_relative_attention,
    }
    functions = {stochastic_depth: _stochastic_depth,
                 swin_transformer._patch_merging_pad: _patch_merging_pad}
    return modules, functions


def _m_timm_attention(m: nn.Module, x: Any, attn_mask: Any = None, is_causal: bool = False
                      ) -> Layer:
    """timm's `Attention` (ViT, DeiT and their relatives) as one attention node."""
    require(attn_mask is None and not is_causal, "attention masks have no node kind")
    require(_plain_timm_attention(m), "qk or scale norms and gates have no node kind")
    attrs = {"dim": m.qkv.in_features, "num_heads": m.num_heads, "head_dim": m.head_dim,
             "dim_out": m.proj.out_features, "qkv_bias": m.qkv.bias is not None,
             "proj_bias": m.proj.bias is not None, "attn_drop": float(m.attn_drop.p),
             "proj_drop": float(m.proj_drop.p)}
    return Layer("attention", [tensor(x)], attrs, _weights(m))


def _plain_timm_attention(m: nn.Module) -> bool:
    return all(isinstance(getattr(m, k, nn.Identity()), nn.Identity)
               for k in ("q_norm", "k_norm", "norm")) and getattr(m, "gate", None) is None


def timm_rules() -> dict[type, Callable[..., Layer]]:
    """timm's layers that become one node each, once timm is loaded (a timm model's classes
    imply it; growth never imports timm itself)."""
    attention = sys.modules.get("timm.layers.attention")
    if attention is None or not hasattr(attention, "Attention"):
        return {}
    return {attention.Attention: _m_timm_attention}


def keeps_whole(m: nn.Module) -> bool:
    """Whether layer `m` becomes one node (in the configurations its node kind covers);
    otherwise the importer traces into the calls it makes."""
    modules, _ = rules()
    kind = type(m)
    if kind not in MODULES and kind not in modules:
        return False
    if kind is nn.MultiheadAttention:
        return bool(m.batch_first and m._qkv_same_embed_dim and m.bias_k is None
                    and not m.add_zero_attn)
    if kind in timm_rules():
        return _plain_timm_attention(m)
    return True


def rules() -> tuple[dict[type, Callable[..., Layer]], dict[Any, Callable[..., Any]]]:
    """Every layer and function rule beyond the built-in tables: torchvision's, timm's."""
    modules, functions = torchvision_rules()
    return {**modules, **timm_rules()}, functions


def fn_name(fn: Any) -> str:
    if isinstance(fn, str):
        return fn
    mod = getattr(fn, "__module__", None) or ""
    name = getattr(fn, "__name__", None) or repr(fn)
    mod = {"torch._C._VariableFunctions": "torch", "torch._C._nn": "torch.nn.functional",
           "_operator": "operator"}.get(mod, mod)
    return f"{mod}.{name}" if mod else name


def supported() -> str:
    """The calls the importer knows, for error messages."""
    mods, fns = rules()
    return ("supported modules: " + ", ".join(sorted({t.__name__ for t in (*MODULES, *mods)}))
            + "; functions: " + ", ".join(sorted({fn_name(f) for f in (*FUNCTIONS, *fns)}))
            + "; tensor methods: " + ", ".join(sorted(METHODS)))
