"""A torch.fx tracer that knows every value's shape, so model code may compute with sizes.

Plain `torch.fx` records `x.shape[-1]` as a graph node: Python arithmetic on it (`math.ceil`,
`int`, `if h % window:`) fails, which is why libraries mark such code untraceable. Here each
traced value also carries a shape-only copy (a meta tensor, or a Python value) computed at two
batch sizes at once, and `x.size(d)`, `x.shape`, `x.dim()`, `x.dtype` and `x.device` are
answered with plain Python values wherever the two agree, i.e. wherever they do not depend on
the batch. Only the batch size stays symbolic: it is recorded as a `size` call, as before.
Data-dependent control flow (`if x.sum() > 0`) still fails: values are never exposed.

The two evaluations also tell the importer which values are batch-first tensors (dim 0 is the
batch at both sizes, the rest equal): those can be graph nodes; anything else (a permute moving
the batch dim, windows folded into the batch) is kept as part of a larger exactly-evaluated
call (`growth.program`).

Layers are kept whole (one `call_module` node) where a converter maps them to a node kind and
their inputs are batch-first; other torch.nn layers are traced into the functions they call
(`nn.Upsample` -> `F.interpolate`), as are functions libraries mark with `torch.fx.wrap` only
because of shape arithmetic.
"""

from __future__ import annotations

import contextlib
import inspect
import operator
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import fx, nn
from torch.fx import _symbolic_trace

VALUES = "growth_values"  # node.meta key: the value at each batch size in BATCHES, or None
BATCHES = (2, 3)
# tensor constructors that take sizes, patched while tracing so a batch-sized call is recorded
_CONSTRUCTORS = ("zeros", "ones", "empty", "full", "arange", "eye", "rand", "randn")
# methods of constant tensors, patched while tracing so a batch-sized argument is recorded
_SIZED_METHODS = ("expand", "repeat", "reshape", "view", "tile", "narrow", "new_zeros",
                  "new_ones", "new_full", "new_empty")
_ATTRS = frozenset({"shape", "ndim", "dtype", "device", "is_cuda"})
_KEEP_LEAVES = (nn.RNNBase,)  # torch.nn layers with no traceable forward: stay whole


class ShapedProxy(fx.Proxy):
    """A proxy answering size questions with Python values where they do not depend on the
    batch (see the module docstring)."""

    def size(self, dim: int | None = None) -> Any:
        return self.tracer.size_of(self, dim)  # type: ignore[attr-defined]

    def dim(self) -> Any:
        return self.tracer.rank_of(self)  # type: ignore[attr-defined]

    def numel(self) -> Any:
        return self.tracer.count_of(self)  # type: ignore[attr-defined]

    def __getattr__(self, k: str) -> Any:
        if k in _ATTRS:
            return self.tracer.attribute_of(self, k)  # type: ignore[attr-defined]
        return super().__getattr__(k)

    def __setitem__(self, index: Any, value: Any) -> None:
        """`x[i] = v`: recorded as a call (the importer reads x as written afterwards)."""
        self.tracer.create_proxy("call_function", operator.setitem, (self, index, value), {})

    def __len__(self) -> int:
        first = self.size(0)
        if isinstance(first, int):
            return first
        return super().__len__()


class ShapeTracer(fx.Tracer):
    """See the module docstring. `whole`: whether a layer is kept whole (one node) when its
    inputs are batch-first; `keep_wrapped`: functions wrapped with `torch.fx.wrap` that stay
    one call; `split`: paths of layers traced into their calls even so (a layer called more
    than once shares its weights between the calls: no single node can hold it)."""

    def __init__(self, input_shape: tuple[int, ...], whole: Callable[[nn.Module], bool],
                 keep_wrapped: frozenset[Callable[..., Any]], stack_traces: bool = False,
                 split: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.record_stack_traces = stack_traces
        self.proxy_buffer_attributes = True  # buffers are read by name, like parameters
        self.input_shape = tuple(int(s) for s in input_shape)
        self.whole = whole
        self.split = split  # layers called more than once: traced into their calls
        self.keep_wrapped = keep_wrapped
        self._call: tuple[tuple, dict] = ((), {})
        self._meta_state: dict[int, dict[str, torch.Tensor]] = {}
        self._inputs = 0
        self._evaluating = False  # running a layer on shapes: fx's patches stand aside
        self.dtype, self.device = torch.get_default_dtype(), torch.device("cpu")

    # ---- tracing ----------------------------------------------------------------------------
    def trace(self, root: nn.Module, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        first = next((t for t in root.parameters() if t.is_floating_point()), None)
        if first is not None:
            self.dtype, self.device = first.dtype, first.device
        if concrete_args is None:
            concrete_args = optional_defaults(root)
        with _unwrapped(self.keep_wrapped), _patched_constructors(self):
            return super().trace(root, concrete_args)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ShapedProxy(node, self)

    def create_node(self, kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                    name: str | None = None, type_expr: Any = None) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        node.meta[VALUES] = self._evaluate(node)  # constants (get_attr) come this way too
        return node

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        if self._evaluating:
            return forward(*args, **kwargs)
        self._call = (args, kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if self._evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, _KEEP_LEAVES):
            return True
        if self.whole(m) and module_qualified_name not in self.split:
            # a node kind: whole, if it sees batch-first tensors
            found = _proxies(self._call)  # constants only: traced into (no batch to hold)
            return bool(found) and all(batch_first(p.node) for p in found)
        return False  # every other layer, torch.nn's included, is traced into its calls

    # ---- answers about values -----------------------------------------------------------------
    def size_of(self, proxy: fx.Proxy, dim: int | None) -> Any:
        vals = proxy.node.meta.get(VALUES)
        if vals is None or not all(isinstance(v, torch.Tensor) for v in vals):
            args = (proxy,) if dim is None else (proxy, dim)
            return self.create_proxy("call_method", "size", args, {})
        if dim is None:
            return tuple(self.size_of(proxy, d) for d in range(vals[0].dim()))
        a, b = (v.size(dim) for v in vals)
        return a if a == b else self.create_proxy("call_method", "size", (proxy, dim), {})

    def rank_of(self, proxy: fx.Proxy) -> Any:
        vals = proxy.node.meta.get(VALUES)
        if vals is None or not isinstance(vals[0], torch.Tensor):
            return self.create_proxy("call_method", "dim", (proxy,), {})
        return vals[0].dim()

    def count_of(self, proxy: fx.Proxy) -> Any:
        vals = proxy.node.meta.get(VALUES)
        if vals is None or not all(isinstance(v, torch.Tensor) for v in vals) or len(
                {v.numel() for v in vals}) > 1:
            return self.create_proxy("call_method", "numel", (proxy,), {})
        return vals[0].numel()

    def attribute_of(self, proxy: fx.Proxy, name: str) -> Any:
        vals = proxy.node.meta.get(VALUES)
        if vals is None or not isinstance(vals[0], torch.Tensor):
            return fx.proxy.Attribute(proxy, name)
        if name == "shape":
            return self.size_of(proxy, None)
        if name == "ndim":
            return vals[0].dim()
        if name == "dtype":
            return vals[0].dtype
        if name == "device":  # where the model lives: constants made on it become buffers
            return self.device
        return self.device.type == "cuda"  # is_cuda

    # ---- shape-only evaluation ----------------------------------------------------------------
    def _evaluate(self, node: fx.Node) -> tuple[Any, ...] | None:
        if node.op == "placeholder":
            if self._inputs:  # only the first input is traced with values
                return None
            self._inputs += 1
            return tuple(torch.empty((b, *self.input_shape), dtype=self.dtype, device="meta")
                         for b in BATCHES)
        if node.op == "get_attr":
            self._evaluating = True
            try:
                value = operator.attrgetter(str(node.target))(self.root)
            finally:
                self._evaluating = False
            return (_meta(value),) * len(BATCHES) if isinstance(value, torch.Tensor) else None
        if node.op not in ("call_function", "call_method", "call_module"):
            return None
        out = []
        for i in range(len(BATCHES)):
            inputs = _values_at(node, i)
            if inputs is None:
                return None
            self._evaluating = True
            try:
                with torch.no_grad():
                    out.append(self._run(node, *inputs))
            except Exception:  # an op without a shape rule: its value stays unknown
                return None
            finally:
                self._evaluating = False
        return tuple(out)

    def _run(self, node: fx.Node, args: tuple, kwargs: dict) -> Any:
        if node.op == "call_function":
            if node.target in _CONSTRUCTOR_FNS:
                kwargs = {**kwargs, "device": "meta"}
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], str(node.target))(*args[1:], **kwargs)
        m = self.root.get_submodule(str(node.target))
        state = self._meta_state.get(id(m))
        if state is None:
            state = {k: _meta(v) for k, v in (*m.named_parameters(), *m.named_buffers())}
            self._meta_state[id(m)] = state
        return torch.func.functional_call(m, state, args, kwargs)


def _values_at(node: fx.Node, i: int) -> tuple[tuple, dict] | None:
    """The node's arguments as they were at batch size BATCHES[i] (meta tensors); None if one
    of them is unknown."""
    missing = False

    def pick(n: fx.Node) -> Any:
        nonlocal missing
        vals = n.meta.get(VALUES)
        missing = missing or vals is None
        return None if vals is None else vals[i]

    args = fx.node.map_aggregate(fx.node.map_arg(node.args, pick), _to_meta)
    kwargs = fx.node.map_aggregate(fx.node.map_arg(node.kwargs, pick), _to_meta)
    return None if missing else (args, kwargs)


def batch_first(node: fx.Node) -> bool:
    """Whether the traced value is a tensor whose dim 0 is the batch (at every batch size)
    and whose other dims do not depend on it; True where the value is unknown (nothing says
    otherwise)."""
    vals = node.meta.get(VALUES)
    if vals is None:
        return True
    return is_batch_first(vals)


def is_batch_first(vals: tuple[Any, ...]) -> bool:
    if not all(isinstance(v, torch.Tensor) and v.dim() >= 1 for v in vals):
        return False
    return all(v.shape[0] == b and v.shape[1:] == vals[0].shape[1:]
               for v, b in zip(vals, BATCHES))


def optional_defaults(module: nn.Module) -> dict[str, Any]:
    """forward's arguments after the first that have defaults, bound to them: a ViT block's
    `attn_mask=None, is_causal=False` are constants, not inputs."""
    params = list(inspect.signature(module.forward).parameters.values())
    return {p.name: p.default for p in params[1:]
            if p.default is not inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _proxies(value: Any) -> list[fx.Proxy]:
    found: list[fx.Proxy] = []

    def visit(v: Any) -> Any:
        if isinstance(v, fx.Proxy):
            found.append(v)
        return v

    torch.utils._pytree.tree_map(visit, value)
    return found


def _meta(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("meta")


def _to_meta(v: Any) -> Any:
    if isinstance(v, torch.Tensor) and not v.is_meta:
        return _meta(v)
    if isinstance(v, torch.device):
        return torch.device("meta")
    return v


_CONSTRUCTOR_FNS = frozenset(getattr(torch, n) for n in _CONSTRUCTORS)


@contextlib.contextmanager
def _patched_constructors(tracer: ShapeTracer) -> Iterator[None]:
    """torch.zeros(B, ...) and constant.expand(B, -1) with a batch-sized argument become
    recorded calls (plain torch refuses a proxy as a size); calls on constant sizes still run
    at once."""
    originals = {n: getattr(torch, n) for n in _CONSTRUCTORS}
    methods = {n: getattr(torch.Tensor, n) for n in _SIZED_METHODS}

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if _proxies((args, kwargs)):
                return tracer.create_proxy("call_function", fn, args, kwargs)
            return fn(*args, **kwargs)

        return call

    def wrap_method(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if _proxies((args, kwargs)):
                return tracer.create_proxy("call_method", name, (self, *args), kwargs)
            return fn(self, *args, **kwargs)

        return call

    try:
        for n, fn in originals.items():
            setattr(torch, n, wrap(fn))
        for n, fn in methods.items():
            setattr(torch.Tensor, n, wrap_method(n, fn))
        yield
    finally:
        for n, fn in originals.items():
            setattr(torch, n, fn)
        for n, fn in methods.items():
            setattr(torch.Tensor, n, fn)


@contextlib.contextmanager
def _unwrapped(keep: frozenset[Callable[..., Any]]) -> Iterator[None]:
    """Trace into functions registered with `torch.fx.wrap` (libraries wrap code that does
    arithmetic on sizes, which this tracer can follow), except fx's own and `keep`."""
    table = _symbolic_trace._wrapped_fns_to_patch
    dropped = {}
    for key, frame in list(table.items()):
        fn = frame.get(key[1])
        if fn is not None and fn not in keep and frame.get("__name__") != _symbolic_trace.__name__:
            dropped[key] = table.pop(key)
    try:
        yield
    finally:
        table.update(dropped)


__all__ = ["BATCHES", "VALUES", "ShapeTracer", "ShapedProxy", "batch_first", "is_batch_first",
           "optional_defaults"]
