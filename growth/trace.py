"""Import a traceable torch module (a user's MLP or CNN, torchvision models) into a NetGraph.

`torch.fx.symbolic_trace` records the forward pass as a list of calls; each call becomes one
graph node holding a copy of the layer's tensors, so the imported graph compiles (with
`compile_graph`) to a module that computes the same function. Anything the graph cannot
express fails loudly with an `UnsupportedModuleError` naming the layer, never with a silently
different network.

Converters below mirror torch's own signatures, so positional and keyword arguments bind the
same way they do in torch; each returns a `_Layer` (a new node) or a helper value (a shape).
"""

from __future__ import annotations

import inspect
import keyword
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from growth.errors import GraphError, UnsupportedModuleError
from growth.graph import _RESERVED, NetGraph
from growth.layers import Attrs, Shape, kind_of, module_tensors


class _Batch:
    """The batch size, `x.size(0)`: only meaningful as the first dim of a flattening view."""

    def __repr__(self) -> str:
        return "<batch size>"


_BATCH = _Batch()


@dataclass(frozen=True)
class _Ref:
    """A tensor value during import: the graph node that holds it and its per-sample shape."""

    name: str
    shape: Shape


@dataclass
class _Layer:
    """A node to add: what a converter returns for a call that computes a new tensor."""

    kind: str
    inputs: list[_Ref]
    attrs: Attrs = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] | None = None
    inplace: bool = False


class _Unsupported(Exception):
    """Raised by a converter; the importer turns it into an error naming the layer."""


def _tensor(value: Any, what: str = "input") -> _Ref:
    if not isinstance(value, _Ref):
        raise _Unsupported(f"its {what} must be a tensor computed by the network, got {value!r}")
    return value


def _require(ok: bool, reason: str) -> None:
    if not ok:
        raise _Unsupported(reason)


# ---- call_function / call_method converters (signatures mirror torch) ----------------------
def _relu(input: Any, inplace: bool = False) -> _Layer:
    return _Layer("relu", [_tensor(input)], inplace=inplace)


def _unary(kind: str) -> Callable[[Any], _Layer]:
    def convert(input: Any) -> _Layer:
        return _Layer(kind, [_tensor(input)])

    return convert


def _silu(input: Any, inplace: bool = False) -> _Layer:
    return _Layer("silu", [_tensor(input)], inplace=inplace)


def _gelu(input: Any, approximate: str = "none") -> _Layer:
    _require(approximate == "none", f"gelu(approximate={approximate!r}) has no node kind")
    return _Layer("gelu", [_tensor(input)])


def _leaky_relu(input: Any, negative_slope: float = 0.01, inplace: bool = False) -> _Layer:
    return _Layer("leaky_relu", [_tensor(input)], {"negative_slope": negative_slope},
                  inplace=inplace)


def _elu(input: Any, alpha: float = 1.0, inplace: bool = False) -> _Layer:
    return _Layer("elu", [_tensor(input)], {"alpha": alpha}, inplace=inplace)


def _dropout(input: Any, p: float = 0.5, training: bool = True, inplace: bool = False
             ) -> _Layer:
    if not training:  # traced with training=False: a no-op in every mode
        return _Layer("identity", [_tensor(input)])
    return _Layer("dropout", [_tensor(input)], {"p": p}, inplace=inplace)


def _max_pool2d(input: Any, kernel_size: Any, stride: Any = None, padding: Any = 0,
                dilation: Any = 1, ceil_mode: bool = False, return_indices: bool = False
                ) -> _Layer:
    _require(not return_indices, "return_indices=True has no node kind")
    attrs = {"kernel_size": kernel_size, "stride": stride or None, "padding": padding,
             "dilation": dilation, "ceil_mode": ceil_mode}
    return _Layer("maxpool2d", [_tensor(input)], attrs)


def _avg_pool2d(input: Any, kernel_size: Any, stride: Any = None, padding: Any = 0,
                ceil_mode: bool = False, count_include_pad: bool = True,
                divisor_override: Any = None) -> _Layer:
    _require(divisor_override is None, "divisor_override has no node kind")
    attrs = {"kernel_size": kernel_size, "stride": stride or None, "padding": padding,
             "ceil_mode": ceil_mode, "count_include_pad": count_include_pad}
    return _Layer("avgpool2d", [_tensor(input)], attrs)


def _adaptive_avg_pool2d(input: Any, output_size: Any) -> _Layer:
    return _Layer("adaptive_avgpool2d", [_tensor(input)], {"output_size": output_size})


def _flatten(input: Any, start_dim: int = 0, end_dim: int = -1) -> _Layer:
    _require(start_dim == 1 and end_dim == -1,
             f"only flatten(x, 1) is supported (start_dim=1, end_dim=-1), got "
             f"start_dim={start_dim}, end_dim={end_dim}")
    return _Layer("flatten", [_tensor(input)])


def _add(input: Any, other: Any, alpha: Any = 1) -> _Layer:
    _require(alpha == 1, f"add with alpha={alpha} has no node kind")
    return _Layer("add", [_tensor(input), _tensor(other, "second operand")])


def _cat(tensors: Any, dim: int = 0) -> _Layer:
    refs = [_tensor(t, "list item") for t in tensors]
    _require(len(refs) >= 2, "cat needs at least two tensors")
    rank = len(refs[0].shape) + 1  # with the batch dim
    _require(dim % rank == 1, f"only cat along dim=1 (channels/features) is supported, got "
             f"dim={dim}")
    return _Layer("concat", refs)


def _reshape(input: Any, *shape: Any) -> _Layer | _Ref:
    """view/reshape: only flattening each sample (or a no-op) is a graph node."""
    x = _tensor(input)
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = tuple(shape[0])
    hint = "only x.view(x.size(0), -1), x.view(-1, N) or a no-op reshape is supported"
    _require(len(shape) >= 1 and (shape[0] is _BATCH or shape[0] == -1), hint)
    rest = tuple(shape[1:])
    _require(all(isinstance(d, int) for d in rest), hint)
    if rest == x.shape:
        return x
    flat = rest == (math.prod(x.shape),) or (rest == (-1,) and shape[0] is _BATCH)
    _require(flat, f"{hint}; got shape {shape} for a per-sample input of shape {x.shape}")
    return _Layer("flatten", [x])


def _size(input: Any, dim: int | None = None) -> Any:
    full = (_BATCH, *_tensor(input).shape)
    return full if dim is None else full[dim]


def _getattr(obj: Any, name: str) -> Any:
    _require(isinstance(obj, _Ref) and name == "shape", f"reading attribute {name!r}")
    return (_BATCH, *obj.shape)


def _getitem(obj: Any, index: Any) -> Any:
    _require(isinstance(obj, tuple), "indexing or slicing a tensor has no node kind")
    return obj[index]


def _contiguous(input: Any, memory_format: Any = None) -> _Ref:
    return _tensor(input)


_FUNCTIONS: dict[Any, Callable[..., Any]] = {
    F.relu: _relu, torch.relu: _relu, torch.relu_: _relu, F.relu_: _relu,
    F.gelu: _gelu, F.silu: _silu, F.elu: _elu, F.leaky_relu: _leaky_relu,
    torch.sigmoid: _unary("sigmoid"), F.sigmoid: _unary("sigmoid"),
    torch.tanh: _unary("tanh"), F.tanh: _unary("tanh"),
    F.dropout: _dropout, F.max_pool2d: _max_pool2d, F.avg_pool2d: _avg_pool2d,
    F.adaptive_avg_pool2d: _adaptive_avg_pool2d, torch.flatten: _flatten,
    torch.reshape: _reshape, operator.add: _add, operator.iadd: _add, torch.add: _add,
    torch.cat: _cat, torch.concat: _cat, operator.getitem: _getitem, getattr: _getattr,
}
_METHODS: dict[str, Callable[..., Any]] = {
    "relu": _relu, "relu_": _relu, "sigmoid": _unary("sigmoid"), "sigmoid_": _unary("sigmoid"),
    "tanh": _unary("tanh"), "tanh_": _unary("tanh"), "add": _add, "add_": _add,
    "flatten": _flatten, "view": _reshape, "reshape": _reshape, "size": _size,
    "contiguous": _contiguous,
}


# ---- call_module converters ------------------------------------------------------------------
def _weights(m: nn.Module) -> dict[str, torch.Tensor]:
    """A private CPU copy: the graph's tensors must not change when the user trains `m`, and a
    graph always holds CPU tensors, wherever the model lives."""
    tensors = module_tensors(m)
    meta = [k for k, v in tensors.items() if v.is_meta]
    _require(not meta, f"its tensors {', '.join(meta)} are on the meta device and hold no "
                       "values; materialise the model (e.g. to_empty() and an init) first")
    return {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}


def _m_linear(m: nn.Linear, x: _Ref) -> _Layer:
    attrs = {"in_features": m.in_features, "out_features": m.out_features,
             "bias": m.bias is not None}
    return _Layer("linear", [x], attrs, _weights(m))


def _m_conv2d(m: nn.Conv2d, x: _Ref) -> _Layer:
    _require(m.groups == 1, f"groups={m.groups} (only groups=1 convolutions are supported)")
    _require(m.padding_mode == "zeros", f"padding_mode={m.padding_mode!r} (only 'zeros')")
    _require(not isinstance(m.padding, str), f"padding={m.padding!r} (give padding as ints)")
    attrs = {"in_channels": m.in_channels, "out_channels": m.out_channels,
             "kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding,
             "dilation": m.dilation, "groups": 1, "bias": m.bias is not None}
    return _Layer("conv2d", [x], attrs, _weights(m))


def _m_batchnorm(m: nn.modules.batchnorm._BatchNorm, x: _Ref) -> _Layer:
    kind = "batchnorm1d" if isinstance(m, nn.BatchNorm1d) else "batchnorm2d"
    attrs = {"num_features": m.num_features, "eps": m.eps, "momentum": m.momentum,
             "affine": m.affine, "track_running_stats": m.track_running_stats}
    return _Layer(kind, [x], attrs, _weights(m))


def _m_gelu(m: nn.GELU, x: _Ref) -> _Layer:
    return _gelu(x, m.approximate)


def _m_max_pool2d(m: nn.MaxPool2d, x: _Ref) -> _Layer:
    return _max_pool2d(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode,
                       m.return_indices)


def _m_avg_pool2d(m: nn.AvgPool2d, x: _Ref) -> _Layer:
    return _avg_pool2d(x, m.kernel_size, m.stride, m.padding, m.ceil_mode,
                       m.count_include_pad, m.divisor_override)


def _m_simple(kind: str) -> Callable[[nn.Module, _Ref], _Layer]:
    return lambda m, x: _Layer(kind, [x])


_MODULES: dict[type, Callable[[Any, _Ref], _Layer]] = {
    nn.Linear: _m_linear, nn.Conv2d: _m_conv2d,
    nn.BatchNorm1d: _m_batchnorm, nn.BatchNorm2d: _m_batchnorm,
    nn.ReLU: _m_simple("relu"), nn.GELU: _m_gelu, nn.SiLU: _m_simple("silu"),
    nn.LeakyReLU: lambda m, x: _leaky_relu(x, m.negative_slope),
    nn.ELU: lambda m, x: _elu(x, m.alpha),
    nn.Tanh: _m_simple("tanh"), nn.Sigmoid: _m_simple("sigmoid"),
    nn.Identity: _m_simple("identity"),
    nn.Dropout: lambda m, x: _Layer("dropout", [x], {"p": m.p}),
    nn.MaxPool2d: _m_max_pool2d, nn.AvgPool2d: _m_avg_pool2d,
    nn.AdaptiveAvgPool2d: lambda m, x: _adaptive_avg_pool2d(x, m.output_size),
    nn.Flatten: lambda m, x: _flatten(x, m.start_dim, m.end_dim),
}


def _fn_name(fn: Any) -> str:
    if isinstance(fn, str):
        return fn
    mod = getattr(fn, "__module__", None) or ""
    name = getattr(fn, "__name__", None) or repr(fn)
    mod = {"torch._C._VariableFunctions": "torch", "torch._C._nn": "torch.nn.functional",
           "_operator": "operator"}.get(mod, mod)
    return f"{mod}.{name}" if mod else name


SUPPORTED = (
    "supported modules: " + ", ".join(sorted(t.__name__ for t in _MODULES)) + "; functions: "
    + ", ".join(sorted({_fn_name(f) for f in _FUNCTIONS})) + "; tensor methods: "
    + ", ".join(sorted(_METHODS))
)


# ---- the importer ----------------------------------------------------------------------------
def import_module(module: nn.Module, input_shape: tuple[int, ...],
                  head_names: list[str] | None = None) -> NetGraph:
    """Trace `module` with torch.fx into a validated NetGraph holding copies of its tensors.

    input_shape: the shape of one sample, without the batch dim, e.g. (3, 32, 32).
    head_names: names for the output heads, in output order; default "out" for a single tensor,
    "out0", "out1", ... for a tuple or list, and the keys for a dict.
    Raises UnsupportedModuleError naming the layer when the module cannot be traced or uses
    a layer, function or method that has no node kind.
    """
    traced = _trace(module)
    out_node = next(n for n in traced.graph.nodes if n.op == "output")
    heads = _head_names(out_node.args[0], head_names)
    importer = _Importer(traced, set(heads))
    importer.add_input(input_shape)
    for node in traced.graph.nodes:
        if node.op not in ("placeholder", "output"):
            importer.convert(node)
    for head, value in zip(heads, _flat_outputs(out_node.args[0])):
        importer.graph.add_output(head, importer.output_source(head, value))
    _prune(importer.graph)
    importer.graph.validate()
    return importer.graph


def _trace(module: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(module)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, ...) on bad code
        raise UnsupportedModuleError(
            f"cannot trace {_culprit(module, exc)} with torch.fx: {type(exc).__name__}: {exc}. "
            "Only code whose calls do not depend on tensor values can be imported: move "
            "data-dependent control flow out of forward, or build the NetGraph by hand"
        ) from exc


def _culprit(module: nn.Module, exc: BaseException) -> str:
    """The innermost layer of `module` whose forward was running when tracing failed."""
    paths = {id(m): (p, m) for p, m in module.named_modules()}
    found = f"the model ({type(module).__name__})"
    tb = exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        hit = paths.get(id(owner))
        if hit is not None and hit[1] is owner:
            path = hit[0] or "<root>"
            found = (f"layer {path!r} ({type(owner).__name__}, "
                     f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno})")
        tb = tb.tb_next
    return found


def _flat_outputs(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return list(value.values())
    if isinstance(value, (tuple, list)):
        return list(value)
    return [value]


def _head_names(value: Any, given: list[str] | None) -> list[str]:
    if isinstance(value, dict):
        default = [str(k) for k in value]
    elif isinstance(value, (tuple, list)):
        default = [f"out{i}" for i in range(len(value))]
    else:
        default = ["out"]
    if given is None:
        return default
    if len(given) != len(default) or len(set(given)) != len(given):
        raise GraphError(f"head_names {given} must be {len(default)} distinct names, one per "
                         f"output of the module (default {default})")
    return list(given)


class _Importer:
    """Walks fx nodes in program order, mapping each to a NetGraph node or a helper value."""

    def __init__(self, traced: fx.GraphModule, heads: set[str]) -> None:
        self.traced = traced
        self.graph = NetGraph()
        self.env: dict[fx.Node, Any] = {}
        self.taken = set(heads)
        self.used_parametric: set[str] = set()

    def add_input(self, shape: tuple[int, ...]) -> None:
        used = [n for n in self.traced.graph.nodes if n.op == "placeholder" and n.users]
        if len(used) > 1:
            raise UnsupportedModuleError(
                f"the module's forward reads {len(used)} inputs {[n.name for n in used]}; "
                "a NetGraph has exactly one input tensor")
        placeholder = used[0] if used else next(
            n for n in self.traced.graph.nodes if n.op == "placeholder")
        name = self.graph.add_input(self._fresh(placeholder.name), shape)
        self.env[placeholder] = _Ref(name, self.graph.shape(name))

    def _fresh(self, base: str) -> str:
        def ok(n: str) -> bool:
            return (n.isidentifier() and not keyword.iskeyword(n) and n not in _RESERVED
                    and n not in self.taken and n not in self.graph)

        name, i = base, 1
        while not ok(name):
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name

    def convert(self, node: fx.Node) -> None:
        args = fx.node.map_arg(node.args, self.env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, self.env.__getitem__)
        try:
            result = self._dispatch(node, args, kwargs)
        except _Unsupported as exc:
            raise UnsupportedModuleError(
                f"cannot import {self._describe(node)}: {exc}. {SUPPORTED}") from None
        if isinstance(result, _Layer):
            result = self._add(node, result)
        self.env[node] = result

    def _dispatch(self, node: fx.Node, args: tuple, kwargs: dict) -> Any:
        if node.op == "call_module":
            return self._module(node, args, kwargs)
        if node.op == "call_function":
            convert = _FUNCTIONS.get(node.target)
        elif node.op == "call_method":
            convert = _METHODS.get(node.target)
        else:  # get_attr: a parameter or buffer read outside a layer
            raise _Unsupported("tensors used outside a supported layer cannot be imported")
        _require(convert is not None, "no node kind computes it")
        layer = _call(convert, args, kwargs)
        if isinstance(layer, _Layer) and _fn_name(node.target).endswith("_"):
            layer.inplace = True
        return layer

    def _module(self, node: fx.Node, args: tuple, kwargs: dict) -> _Layer:
        m = self.traced.get_submodule(str(node.target))
        convert = _MODULES.get(type(m))
        _require(convert is not None, "no node kind computes it")
        _require(len(args) == 1 and not kwargs, "a layer must be called on one tensor")
        if any(True for _ in m.parameters()) or any(True for _ in m.buffers()):
            _require(node.target not in self.used_parametric,
                     "it is called more than once, which shares its weights between calls; "
                     "a NetGraph node owns its weights (use one layer per call)")
            self.used_parametric.add(str(node.target))
        layer = convert(m, _tensor(args[0]))
        layer.inplace = bool(getattr(m, "inplace", False))
        return layer

    def _add(self, node: fx.Node, layer: _Layer) -> _Ref:
        name = self._fresh(node.name)
        self.graph.add(name, layer.kind, [r.name for r in layer.inputs], tensors=layer.tensors,
                       **layer.attrs)
        attrs = self.graph.node(name).attrs  # completed by add()
        shape = kind_of(layer.kind).infer(name, attrs, [r.shape for r in layer.inputs])
        ref = _Ref(name, shape)
        if layer.inplace:  # later reads of the overwritten tensor (and its aliases) see `ref`
            old = layer.inputs[0]
            self.env.update({k: ref for k, v in self.env.items() if v == old})
        return ref

    def _describe(self, node: fx.Node) -> str:
        if node.op == "call_module":
            m = self.traced.get_submodule(str(node.target))
            return f"layer {node.target!r} ({type(m).__name__})"
        stack = node.meta.get("nn_module_stack") or {}
        inside = ""
        if stack:
            path, cls = list(stack.values())[-1]
            inside = f" inside layer {path!r} ({getattr(cls, '__name__', cls)})"
        if node.op == "call_function":
            return f"function {_fn_name(node.target)} (fx node {node.name!r}){inside}"
        if node.op == "call_method":
            return f"tensor method .{node.target}() (fx node {node.name!r}){inside}"
        return f"attribute {node.target!r} (fx node {node.name!r}){inside}"

    def output_source(self, head: str, value: Any) -> str:
        ref = self.env.get(value) if isinstance(value, fx.Node) else value
        if not isinstance(ref, _Ref):
            raise UnsupportedModuleError(
                f"output {head!r} of the module is {ref!r}, not a tensor; every output of "
                "forward must be a tensor (or a tuple, list or dict of tensors)")
        return ref.name


def _call(convert: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    try:
        bound = inspect.signature(convert).bind(*args, **kwargs)
    except TypeError as exc:
        raise _Unsupported(f"unexpected arguments ({exc})") from None
    return convert(*bound.args, **bound.kwargs)


def _prune(graph: NetGraph) -> None:
    """Drop nodes nothing reads (an fx trace keeps calls whose results are unused)."""
    while True:
        dead = [n for n in graph.topo_order()
                if graph.node(n).kind not in ("input", "output") and not graph.consumers(n)]
        if not dead:
            return
        for n in dead:
            graph.remove(n)


__all__ = ["SUPPORTED", "import_module"]
