"""Import a traceable torch module (a user's MLP or CNN, torchvision models) into a NetGraph.

`torch.fx` records the forward pass as a list of calls; each call becomes one graph node holding
a copy of the layer's tensors (the rules are in `growth.converters`), so the imported graph
compiles (with `compile_graph`) to a module that computes the same function. Size arithmetic and
the model's own shape checks are evaluated at import time. Anything the graph cannot express
fails loudly with one `UnsupportedModuleError` that names every such layer, never with a
silently different network.
"""

from __future__ import annotations

import inspect
import keyword
import operator
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from growth import converters as cv
from growth.converters import BATCH, UNKNOWN, Layer, Param, Ref, Unsupported
from growth.errors import GraphError, ShapeError, UnsupportedModuleError
from growth.graph import _RESERVED, NetGraph
from growth.layers import kind_of


class _Failed:
    """The value of a call that could not be imported (its users are skipped, not reported)."""


_FAILED = _Failed()
_TORCH_DIR = str(Path(torch.__file__).parent) + os.sep  # frames in torch are not the model's


def import_module(module: nn.Module, input_shape: tuple[int, ...],
                  head_names: list[str] | None = None) -> NetGraph:
    """Trace `module` with torch.fx into a validated NetGraph holding copies of its tensors.

    input_shape: the shape of one sample, without the batch dim, e.g. (3, 32, 32).
    head_names: names for the output heads, in output order; default "out" for a single tensor,
    "out0", "out1", ... for a tuple or list, and the keys for a dict.
    The module is traced in its current mode: call `.eval()` first to import what inference
    computes (e.g. GoogLeNet and Inception-v3 add auxiliary heads in training mode).
    Raises UnsupportedModuleError when the module cannot be traced, or naming every layer,
    function or method that has no node kind.
    """
    traced = _trace(module)
    out_node = next(n for n in traced.graph.nodes if n.op == "output")
    heads = _head_names(out_node.args[0], head_names)
    importer = _Importer(module, traced, set(heads))
    importer.add_input(input_shape)
    for node in traced.graph.nodes:
        if node.op not in ("placeholder", "output"):
            importer.convert(node)
    importer.raise_failures()
    for head, value in zip(heads, _flat_outputs(out_node.args[0])):
        importer.graph.add_output(head, importer.output_source(head, value))
    _prune(importer.graph)
    _fuse_channel_shuffles(importer.graph)
    importer.graph.validate()
    return importer.graph


class _Tracer(fx.Tracer):
    """fx's tracer, with the layers that are one node kind kept whole (torchvision's attention
    and stochastic depth), and source lines recorded so errors can point at the model code."""

    def __init__(self, stack_traces: bool = False) -> None:
        super().__init__()
        self.record_stack_traces = stack_traces
        self.leaves = tuple(cv.torchvision_rules()[0])

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return type(m) in self.leaves or super().is_leaf_module(m, module_qualified_name)


def _trace(module: nn.Module, stack_traces: bool = False) -> fx.GraphModule:
    try:
        tracer = _Tracer(stack_traces)
        graph = tracer.trace(module)
        return fx.GraphModule(tracer.root, graph, type(module).__name__)
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


def _contains(value: Any, kinds: tuple[type, ...]) -> bool:
    found = False

    def visit(v: Any) -> Any:
        nonlocal found
        found = found or isinstance(v, kinds)
        return v

    fx.node.map_aggregate(value, visit)
    return found


class _Importer:
    """Walks fx nodes in program order, mapping each to NetGraph nodes or a helper value."""

    def __init__(self, module: nn.Module, traced: fx.GraphModule, heads: set[str]) -> None:
        self.module, self.traced = module, traced
        self.graph = NetGraph()
        self.env: dict[fx.Node, Any] = {}
        self.taken = set(heads)
        self.owned: set[str] = set()  # layers and parameters some node holds already
        self.failures: list[tuple[str, str]] = []  # (what, why)
        self.modules, self.functions = cv.torchvision_rules()

    def add_input(self, shape: tuple[int, ...]) -> None:
        used = [n for n in self.traced.graph.nodes if n.op == "placeholder" and n.users]
        if len(used) > 1:
            raise UnsupportedModuleError(
                f"the module's forward reads {len(used)} inputs {[n.name for n in used]}; "
                "a NetGraph has exactly one input tensor")
        placeholder = used[0] if used else next(
            n for n in self.traced.graph.nodes if n.op == "placeholder")
        name = self.graph.add_input(self._fresh(placeholder.name), shape)
        self.env[placeholder] = Ref(name, self.graph.shape(name))

    def _fresh(self, base: str) -> str:
        def ok(n: str) -> bool:
            return (n.isidentifier() and not keyword.iskeyword(n) and n not in _RESERVED
                    and n not in self.taken and n not in self.graph)

        name, i = base, 1
        while not ok(name):
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name

    # ---- one call --------------------------------------------------------------------------
    def convert(self, node: fx.Node) -> None:
        args = fx.node.map_arg(node.args, self.env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, self.env.__getitem__)
        if _contains((args, kwargs), (_Failed,)):  # a consequence of an earlier failure
            self.env[node] = _FAILED
            return
        try:
            result = self._dispatch(node, args, kwargs)
            self.env[node] = self._materialise(node, result)
        except Unsupported as exc:
            self.failures.append((node, str(exc)))
            self.env[node] = _FAILED
        except cv.CheckFailed as exc:
            shape = self.graph.shape(self.graph.input_node())
            raise ShapeError(f"input shape {shape} fails the model's own check at "
                             f"{self._describe(node, _source_lines(self.module))}: {exc}; "
                             "import it at an input size the model accepts") from None

    def _dispatch(self, node: fx.Node, args: tuple, kwargs: dict) -> Any:
        if node.op == "get_attr":
            return self._param(str(node.target))
        if node.op == "call_module":
            return self._module(node, args, kwargs)
        if node.op == "call_function" and node.target in cv.PY_OPS and not _contains(
                (args, kwargs), (Ref, Param)):
            return _python(node.target, args, kwargs)
        if node.op == "call_function":
            convert = cv.FUNCTIONS.get(node.target) or self.functions.get(node.target)
        else:
            convert = cv.METHODS.get(str(node.target))
        cv.require(convert is not None, "no node kind computes it")
        result = _call(convert, args, kwargs)
        if cv.fn_name(node.target).endswith("_") and isinstance(result, Layer):
            result.inplace = True  # relu_, add_, torch.relu_ ...
        if node.target is cv.torch._assert and node.args and not isinstance(args[0], bool):
            warnings.warn(f"{self._describe(node)}: a check that depends on the batch or on "
                          "tensor values was dropped", stacklevel=3)
        return result

    def _param(self, target: str) -> Param:
        value = operator.attrgetter(target)(self.traced)
        cv.require(isinstance(value, cv.torch.Tensor), f"attribute {target!r} is not a tensor")
        return Param(target, value)

    def _module(self, node: fx.Node, args: tuple, kwargs: dict) -> Any:
        m = self.traced.get_submodule(str(node.target))
        convert = cv.MODULES.get(type(m)) or self.modules.get(type(m))
        cv.require(convert is not None, "no node kind computes it")
        if any(True for _ in m.parameters()) or any(True for _ in m.buffers()):
            self._own(str(node.target), "it is called more than once")
        layer = _call(convert, (m, *args), kwargs)
        if isinstance(layer, Layer):
            layer.inplace = bool(getattr(m, "inplace", False))
        return layer

    def _own(self, what: str, reason: str) -> None:
        cv.require(what not in self.owned,
                   f"{reason}, which shares its weights between calls; a NetGraph node owns its "
                   "weights (use one layer per call)")
        self.owned.add(what)

    def _materialise(self, node: fx.Node, result: Any) -> Any:
        """Add the nodes a converter returned; the env value is what the call returns."""
        if isinstance(result, Layer):
            return self._add(node.name, result)
        if isinstance(result, tuple) and result and all(isinstance(r, Layer) for r in result):
            return tuple(self._add(f"{node.name}_{i}", r) for i, r in enumerate(result))
        return result

    def _add(self, base: str, layer: Layer) -> Any:
        for p in layer.params:
            self._own(p.target, f"parameter {p.target!r} is read more than once")
        inputs = [self._add(f"{base}_in{i}", x) if isinstance(x, Layer) else x
                  for i, x in enumerate(layer.inputs)]
        name = self._fresh(base)
        shapes = [r.shape for r in inputs]
        self.graph.add_known(name, layer.kind, [r.name for r in inputs], shapes, layer.tensors,
                             layer.attrs)
        attrs = self.graph.node(name).attrs  # completed by add_known()
        ref = Ref(name, kind_of(layer.kind).infer(name, attrs, shapes))
        if layer.inplace:  # later reads of the overwritten tensor (and its aliases) see `ref`
            old = inputs[0]
            self.env.update({k: ref for k, v in self.env.items() if v == old})
        return layer.wrap(ref) if layer.wrap is not None else ref

    # ---- messages --------------------------------------------------------------------------
    def _describe(self, node: fx.Node, lines: dict[str, str] | None = None) -> str:
        if node.op == "call_module":
            m = self.traced.get_submodule(str(node.target))
            return f"layer {node.target!r} ({type(m).__name__})"
        stack = node.meta.get("nn_module_stack") or {}
        if stack:
            path, cls = list(stack.values())[-1]
            inside = f" inside layer {path!r} ({getattr(cls, '__name__', cls)})"
        else:
            inside = f" in the forward of {type(self.traced).__name__}"
        where = (lines or {}).get(node.name, "")
        if node.op == "call_function":
            what = f"function {cv.fn_name(node.target)}"
        elif node.op == "call_method":
            what = f"tensor method .{node.target}()"
        else:
            what = f"attribute {node.target!r}"
        return f"{what} (fx node {node.name!r}){inside}{where}"

    def raise_failures(self) -> None:
        """One error naming every call that could not be imported, grouped by reason."""
        if not self.failures:
            return
        lines = _source_lines(self.module)
        by_reason: dict[str, list[str]] = {}
        for node, why in self.failures:
            by_reason.setdefault(why, []).append(self._describe(node, lines))
        parts = [f"{', '.join(whats)}: {why}" for why, whats in by_reason.items()]
        n = len(self.failures)
        raise UnsupportedModuleError(
            f"cannot import {type(self.module).__name__}: {n} call{'s' if n > 1 else ''} cannot be "
            "imported. " + "; ".join(f"[{i + 1}] {p}" for i, p in enumerate(parts))
            + f". {cv.supported()}")

    def output_source(self, head: str, value: Any) -> str:
        ref = self.env.get(value) if isinstance(value, fx.Node) else value
        if not isinstance(ref, Ref):
            raise UnsupportedModuleError(
                f"output {head!r} of the module is {ref!r}, not a tensor; every output of "
                "forward must be a tensor (or a tuple, list or dict of tensors)")
        return ref.name


def _source_lines(module: nn.Module) -> dict[str, str]:
    """fx node name -> ' (file.py:123, in fn)' of the model code that made the call: a second
    trace, recording stack traces, run only when there is an error to explain."""
    out = {}
    for node in _trace(module, stack_traces=True).graph.nodes:
        frames = [ln.strip() for ln in (node.stack_trace or "").splitlines()
                  if ln.strip().startswith("File ") and _TORCH_DIR not in ln]
        if frames:  # File "/path/file.py", line 123, in fn
            parts = [p.strip() for p in frames[-1][5:].split(",", 2)]
            if len(parts) == 3:
                path, line, fn = parts
                out[node.name] = f" ({path.strip(chr(34)).rsplit('/', 1)[-1]}:" \
                                 f"{line.split()[-1]}, {fn})"
    return out


def _python(fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """Size arithmetic at import time; anything computed from the batch size stays unknown."""
    if fn is not operator.getitem and _contains((args, kwargs), (type(BATCH), type(UNKNOWN))):
        return UNKNOWN
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # the model's own arithmetic failed on these sizes
        raise Unsupported(f"evaluating it on sizes {args} failed: {exc}") from None


def _call(convert: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    try:
        bound = inspect.signature(convert).bind(*args, **kwargs)
    except TypeError as exc:
        raise Unsupported(f"unexpected arguments ({exc})") from None
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


def _fuse_channel_shuffles(graph: NetGraph) -> None:
    """reshape (C,H,W)->(g,C/g,H,W), swap the first two dims, reshape back: one
    channel_shuffle node (ShuffleNet's channel_shuffle function, as fx records it)."""
    shapes = graph.shapes()
    for name in list(shapes):
        chain = _shuffle_chain(graph, name, shapes) if name in graph else None
        if chain is None:
            continue
        first, _, last = chain
        fused, i = f"{last}_shuffle", 1
        while fused in graph:
            fused, i = f"{last}_shuffle{i}", i + 1
        graph.add(fused, "channel_shuffle", graph.inputs(first),
                  groups=graph.node(first).attrs["shape"][0])
        for reader in graph.consumers(last):
            graph.rewire(reader, last, fused)
        for n in chain:
            graph.remove(n)


def _shuffle_chain(graph: NetGraph, first: str, shapes: dict[str, tuple[int, ...]]
                   ) -> tuple[str, str, str] | None:
    node = graph.node(first)
    if node.kind != "reshape":
        return None
    shape, split = shapes[graph.inputs(first)[0]], tuple(node.attrs["shape"])
    if len(shape) != 3 or len(split) != 4 or split[0] * split[1] != shape[0] \
            or split[2:] != shape[1:] or len(graph.consumers(first)) != 1:
        return None
    swap = graph.consumers(first)[0]
    if graph.node(swap).kind != "permute" or list(graph.node(swap).attrs["dims"]) != [1, 0, 2, 3] \
            or len(graph.consumers(swap)) != 1:
        return None
    back = graph.consumers(swap)[0]
    if graph.node(back).kind != "reshape" or tuple(graph.node(back).attrs["shape"]) != shape:
        return None
    return first, swap, back


__all__ = ["import_module"]
