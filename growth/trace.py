"""Import a traceable torch module (a user's MLP or CNN, torchvision models) into a NetGraph.

`torch.fx` records the forward pass as a list of calls; each call becomes one graph node holding
a copy of the layer's tensors (the rules are in `growth.converters`), so the imported graph
compiles (with `compile_graph`) to a module that computes the same function. Size arithmetic and
the model's own shape checks are evaluated at import time. Anything the graph cannot express
fails loudly with one `UnsupportedModuleError` that names every such layer, never with a
silently different network.
"""

from __future__ import annotations

import copy
import inspect
import keyword
import math
import operator
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from growth import converters as cv
from growth import program
from growth.converters import Batch, Expanded, Layer, Lazy, Param, Ref, Unsupported
from growth.errors import GraphError, ShapeError, UnsupportedModuleError
from growth.fxtrace import BATCHES, VALUES, ShapeTracer, is_batch_first, optional_defaults
from growth.graph import _RESERVED, NetGraph
from growth.layers import complete_attrs, kind_of


class _Failed:
    """The value of a call that could not be imported (its users are skipped, not reported)."""


class _Constant:
    """A forward argument bound to its default (fx's checks of it are skipped)."""


_FAILED, _CONSTANT = _Failed(), _Constant()
_CASTS = {"Tensor.float": torch.float32, "Tensor.double": torch.float64,
          "Tensor.half": torch.float16, "Tensor.bfloat16": torch.bfloat16}
_VIEWS = frozenset({"reshape", "view", "unsqueeze", "squeeze", "permute", "transpose",
                    "flatten", "contiguous", "t"})
_TORCH_DIR = str(Path(torch.__file__).parent) + os.sep  # frames in torch are not the model's
_OWN_DIR = str(Path(__file__).parent) + os.sep  # nor are the tracer's


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
    traced = _trace(module, input_shape)
    out_node = next(n for n in traced.graph.nodes if n.op == "output")
    heads = _head_names(out_node.args[0], head_names)
    importer = _Importer(module, traced, set(heads), input_shape)
    importer.add_input()
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


def _trace(module: nn.Module, input_shape: tuple[int, ...], stack_traces: bool = False
           ) -> fx.GraphModule:
    """The fx trace of `module` on inputs of `input_shape` (see `growth.fxtrace`): layers with a
    node kind kept whole, every value's shape known. A copy is traced: models that cache values
    in forward (attention biases, relative indices) would otherwise keep the tracer's proxies."""
    root = copy.deepcopy(module)
    try:
        split: frozenset[str] = frozenset()
        while True:  # once more if a layer kept whole is called twice: trace into it
            tracer = ShapeTracer(input_shape, cv.keeps_whole, frozenset(cv.rules()[1]),
                                 stack_traces, split)
            graph = tracer.trace(root)
            calls = [str(n.target) for n in graph.nodes if n.op == "call_module"]
            again = {t for t in calls if calls.count(t) > 1 and _holds_tensors(root, t)}
            if not again:
                return fx.GraphModule(tracer.root, graph, type(module).__name__)
            split |= again
            root = copy.deepcopy(module)
    except AssertionError as exc:  # the model's own check, evaluated on the traced shapes
        raise ShapeError(f"input shape {tuple(input_shape)} fails the model's own check in "
                         f"{_culprit(root, exc, with_file=False)}{_site(exc)}: {exc}; import "
                         "it at an input size the model accepts") from None
    except Exception as exc:  # fx raises many types (TraceError, TypeError, ...) on bad code
        raise UnsupportedModuleError(
            f"cannot trace {_culprit(root, exc)} with torch.fx: {type(exc).__name__}: {exc}. "
            "Only code whose calls do not depend on tensor values can be imported: move "
            "data-dependent control flow out of forward, or build the NetGraph by hand"
        ) from exc


def _holds_tensors(root: nn.Module, path: str) -> bool:
    m = root.get_submodule(path)
    return any(True for _ in m.parameters()) or any(True for _ in m.buffers())


def _site(exc: BaseException) -> str:
    """' (file.py:123, in fn)' of the innermost model frame where `exc` was raised."""
    found = ""
    tb = exc.__traceback__
    while tb is not None:
        path = tb.tb_frame.f_code.co_filename
        if not path.startswith((_TORCH_DIR, _OWN_DIR)):
            found = f" ({Path(path).name}:{tb.tb_lineno}, in {tb.tb_frame.f_code.co_name})"
        tb = tb.tb_next
    return found


def _culprit(module: nn.Module, exc: BaseException, with_file: bool = True) -> str:
    """The innermost layer of `module` whose forward was running when tracing failed."""
    paths = {id(m): (p, m) for p, m in module.named_modules()}
    found = f"the model ({type(module).__name__})"
    tb = exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        hit = paths.get(id(owner))
        if hit is not None and hit[1] is owner:
            path = hit[0]
            where = f", {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if with_file else ""
            found = (f"layer {path!r} ({type(owner).__name__}{where})" if path else
                     f"the model ({type(owner).__name__}{where})")
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

    def __init__(self, module: nn.Module, traced: fx.GraphModule, heads: set[str],
                 input_shape: tuple[int, ...]) -> None:
        self.module, self.traced, self.input_shape = module, traced, tuple(input_shape)
        self.graph = NetGraph()
        self.env: dict[fx.Node, Any] = {}
        self.taken = set(heads)
        self.owned: set[str] = set()  # layers and parameters some node holds already
        self.failures: list[tuple[str, str]] = []  # (what, why)
        self.modules, self.functions = cv.rules()
        self.dtype = next((t.dtype for t in module.parameters() if t.is_floating_point()),
                          cv.torch.get_default_dtype())  # the precision the model runs in
        self.expanded: dict[int, Ref] = {}
        self.lifted: dict[str, Ref] = {}
        self.live: set[fx.Node] | None = None

    def add_input(self) -> None:
        """The first argument of forward is the input; the others are bound to their defaults
        (`growth.fxtrace.optional_defaults`), so only fx's checks of them read them."""
        holders = [n for n in self.traced.graph.nodes if n.op == "placeholder"]
        bound = {f"{k}_1" for k in optional_defaults(self.module)}
        used = [n for n in holders[1:] if n.users and str(n.target) not in bound]
        if used:
            raise UnsupportedModuleError(
                f"the module's forward reads {len(used) + 1} inputs "
                f"{[n.name for n in (holders[0], *used)]}; a NetGraph has exactly one input "
                "tensor")
        placeholder = holders[0]
        name = self.graph.add_input(self._fresh(placeholder.name), self.input_shape)
        self.env[placeholder] = Ref(name, self.graph.shape(name))
        for n in holders[1:]:
            self.env[n] = _CONSTANT

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
        if _contains((args, kwargs), (_Constant,)):  # fx's check of a bound argument
            self.env[node] = _CONSTANT
            return
        try:
            try:
                stand_ins: dict[str, Lazy] = {}
                result = self._dispatch(node, *_stand_in((args, kwargs), stand_ins))
                self.env[node] = self._materialise(node, self._resolve(result, stand_ins))
            except Unsupported as exc:  # no node kind: replay the call exactly, if it may
                self.env[node] = self._generic(node, args, kwargs, exc)
        except Unsupported as exc:
            self.failures.append((node, str(exc)))
            self.env[node] = _FAILED
        except cv.CheckFailed as exc:
            shape = self.graph.shape(self.graph.input_node())
            raise ShapeError(f"input shape {shape} fails the model's own check at "
                             f"{self._describe(node, self._lines())}: {exc}; "
                             "import it at an input size the model accepts") from None

    def _dispatch(self, node: fx.Node, args: tuple, kwargs: dict) -> Any:
        if node.op == "get_attr":
            return self._param(str(node.target), len(node.users) > 1)
        if node.op == "call_module":
            return self._module(node, args, kwargs)
        if node.op == "call_function" and node.target in cv.PY_OPS and not _contains(
                (args, kwargs), (Ref, Param, Lazy, Batch, Expanded)):
            return _python(node.target, args, kwargs)
        view = _param_view(node, args, kwargs)
        if view is not None:
            return view
        if node.op == "call_function":
            convert = cv.FUNCTIONS.get(node.target) or self.functions.get(node.target)
        else:
            convert = cv.METHODS.get(str(node.target))
        cv.require(convert is not None, "no node kind computes it")
        result = _call(convert, args, kwargs)
        if isinstance(result, Expanded) and len(node.users) > 1:
            result = Expanded(result.param, result.batch, shared=True)
        if cv.fn_name(node.target).endswith("_") and isinstance(result, Layer):
            result.inplace = True  # relu_, add_, torch.relu_ ...
        if node.target in (cv.torch._assert, cv.torch._assert_async) and node.args and \
                not isinstance(args[0], bool):
            warnings.warn(f"{self._describe(node)}: a check that depends on the batch or on "
                          "tensor values was dropped", stacklevel=3)
        return result

    def _param(self, target: str, shared: bool = False) -> Param:
        value = operator.attrgetter(target)(self.traced)
        cv.require(isinstance(value, cv.torch.Tensor), f"attribute {target!r} is not a tensor")
        return Param(target, value, isinstance(value, nn.Parameter), shared)

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
        """Add the nodes a converter returned; the env value is what the call returns. A node
        whose shape is not the traced value's (e.g. a reshape that folds the batch) is not
        added: the call goes to `_generic`."""
        vals = node.meta.get(VALUES)
        if isinstance(result, Layer):
            return self._add(node.name, result, _traced_shape(vals))
        if isinstance(result, tuple) and result and all(isinstance(r, Layer) for r in result):
            parts = vals[0] if vals is not None and isinstance(vals[0], (tuple, list)) else None
            if parts is not None:
                for i, r in enumerate(result):
                    self._check_shape(r, _traced_shape(tuple(v[i] for v in vals)))
            return tuple(self._add(f"{node.name}_{i}", r) for i, r in enumerate(result))
        if isinstance(result, Lazy):  # passed on: its readers are this call's
            result.users += self._readers(node) - 1
        if isinstance(result, Ref) and vals is not None:
            cv.require(_traced_shape(vals) in (None, result.shape),
                       f"it returns its input unchanged, but the traced value has shape "
                       f"{_traced_shape(vals)}")
        return result

    def _check_shape(self, layer: Layer, want: tuple[int, ...] | None) -> None:
        if want is None:
            return
        shapes = [x.shape if isinstance(x, Ref) else None for x in layer.inputs]
        if any(s is None for s in shapes):  # nested layers: checked as they are added
            return
        attrs = complete_attrs(layer.kind, layer.attrs, shapes)
        try:
            got = kind_of(layer.kind).infer("?", attrs, shapes)
        except ShapeError as exc:  # the model computes it, so a program can
            raise Unsupported(str(exc).replace("'?' ", "")) from None
        cv.require(tuple(got) == tuple(want), f"its {layer.kind} node would compute per-sample "
                   f"shape {tuple(got)}, but the model's value has {tuple(want)}")

    def _add(self, base: str, layer: Layer, want: tuple[int, ...] | None = None) -> Any:
        inputs = [self._add(f"{base}_in{i}", x) if isinstance(x, Layer) else x
                  for i, x in enumerate(layer.inputs)]
        shapes = [r.shape for r in inputs]
        if want is not None:
            self._check_shape(Layer(layer.kind, inputs, layer.attrs), want)
        shared = [p.target for p in layer.params if p.shared and p.trainable]
        cv.require(not shared, f"parameter {shared[0] if shared else ''!r} is read by other "
                   "calls too")  # the calls become programs reading one node that holds it
        for p in layer.params:
            self._own(p.target, f"parameter {p.target!r} is read more than once")
        tensors = self._with_counter(layer)
        name = self._fresh(base)
        self.graph.add_known(name, layer.kind, [r.name for r in inputs], shapes, tensors,
                             layer.attrs)
        attrs = self.graph.node(name).attrs  # completed by add_known()
        ref = Ref(name, kind_of(layer.kind).infer(name, attrs, shapes))
        if layer.inplace:  # later reads of the overwritten tensor (and its aliases) see `ref`
            self._alias(inputs[0], ref)
        return layer.wrap(ref) if layer.wrap is not None else ref

    def _with_counter(self, layer: Layer) -> dict[str, cv.torch.Tensor] | None:
        """A BatchNorm made from F.batch_norm's tensors also holds its layer's batch counter."""
        tensors = layer.tensors
        if not layer.kind.startswith("batchnorm") or tensors is None or "running_mean" not in \
                tensors or "num_batches_tracked" in tensors:
            return tensors
        owner = next(p.target for p in layer.params if p.target.endswith("running_mean"))
        try:
            count = operator.attrgetter(owner.rsplit(".", 1)[0] + ".num_batches_tracked")(
                self.module)
        except AttributeError:
            count = cv.torch.tensor(0)
        return {**tensors, "num_batches_tracked": count.detach().to("cpu", copy=True)}

    def _alias(self, old: Any, new: Any) -> None:
        self.env.update({k: new for k, v in self.env.items() if v is old or (
            isinstance(old, Ref) and v == old)})

    # ---- calls no node kind computes -----------------------------------------------------------
    def _generic(self, node: fx.Node, args: tuple, kwargs: dict, why: Unsupported) -> Any:
        """The call replayed exactly (`growth.program`): a program node when its value is a
        batch-first tensor, else a Lazy value the next such call takes in."""
        if node.op not in ("call_function", "call_method"):
            raise why
        name = program.function_name(node.op, node.target)
        if name is None:
            raise why
        vals = node.meta.get(VALUES)
        if name == "setitem":  # x[i] = v: the value is x, written
            vals = node.args[0].meta.get(VALUES) if isinstance(node.args[0], fx.Node) else None
        if vals is None:
            raise Unsupported(f"{why} (and its result's shape could not be traced, so it "
                              "cannot be replayed either)")
        lazy = Lazy(name, args, kwargs, vals, users=self._readers(node))
        if program.is_inplace(name) and args and isinstance(args[0], (Ref, Lazy)):
            self._alias(args[0], lazy)
        return lazy

    def _readers(self, node: fx.Node) -> int:
        """How many calls whose results matter read `node` (a shape query whose result goes
        unused is no reader)."""
        if self.live is None:
            self.live = _live(self.traced.graph)
        return sum(u in self.live for u in node.users)

    def _resolve(self, result: Any, stand_ins: dict[str, Lazy]) -> Any:
        """A converter's result with the stand-ins for batch-first Lazy values replaced: by
        program nodes where a layer reads them, by the Lazy value itself where the call
        returns it unchanged (or reads only its batch size)."""
        if isinstance(result, Ref) and result.name in stand_ins:
            return stand_ins[result.name]
        if isinstance(result, Layer):
            read = [stand_ins[x.name] for x in result.inputs
                    if isinstance(x, Ref) and x.name in stand_ins]
            self._separable(read)
            result.inputs = [self._realise(stand_ins[x.name]) if isinstance(x, Ref)
                             and x.name in stand_ins else self._resolve(x, stand_ins)
                             for x in result.inputs]
            return result
        if isinstance(result, Batch):
            return Batch(self._resolve(result.ref, stand_ins))
        if isinstance(result, Expanded):
            return Expanded(result.param, self._resolve(result.batch, stand_ins), result.shared)
        if isinstance(result, (tuple, list)):
            items = [self._resolve(x, stand_ins) for x in result]
            return tuple(items) if isinstance(result, tuple) else items
        return result

    def _separable(self, values: list[Lazy]) -> None:
        """Unsupported if these Lazy values cannot each become a program node: they read a
        parameter in common (a gate shared by two branches) or one another node holds. The
        call then stays Lazy too, and one program later holds them all."""
        seen: set[str] = set()
        for lazy in values:
            needs, entangled = _parameters(lazy)
            clash = needs & (seen | self.owned)
            if clash:
                raise Unsupported(f"its inputs read parameter {sorted(clash)[0]!r} in common")
            if entangled:
                raise Unsupported("its input shares a computation with parameters with other "
                                  "calls (no node holds it yet)")
            seen |= needs

    def _realise(self, lazy: Lazy) -> Ref:
        """The program node computing a batch-first Lazy value (made once)."""
        if lazy.ref is None:
            lazy.ref = self._program(_base(lazy), lazy, lazy.vals)
        return lazy.ref

    def _program(self, base: str, lazy: Lazy, vals: tuple[Any, ...], lifting: bool = False
                 ) -> Ref:
        builder = _ProgramBuilder(self, lifting)
        try:
            attrs, tensors, inputs = builder.build(lazy)
        except program.Unstorable as exc:
            raise Unsupported(f"it passes {exc}, which a program node cannot hold") from None
        for target in builder.claims:
            self._own(target, f"parameter {target!r} is read more than once")
        shapes = [r.shape for r in inputs]
        attrs.update(in_shapes=[list(s) for s in shapes], shape=list(vals[0].shape[1:]))
        attrs["elementwise"] = _elementwise(attrs, shapes)
        name = self._fresh(base)
        self.graph.add_known(name, "program", [r.name for r in inputs], shapes, tensors, attrs)
        return Ref(name, tuple(vals[0].shape[1:]))

    def _lifted(self, value: Param | Lazy) -> Ref:
        """A parameter, or a value computed from parameters alone, that several programs read:
        one node holds it, repeated over the batch (a view, no copy), and each program reads
        sample 0 of that node, which is the value itself (its gradients add up there)."""
        if isinstance(value, Param):  # the parameter itself; programs apply their views
            value = self._param(value.target, shared=False)
        key = value.target if isinstance(value, Param) else str(id(value))
        ref = self.lifted.get(key)
        if ref is None:
            shape = tuple(value.tensor.shape if isinstance(value, Param) else value.vals[0].shape)
            source = Ref(self.graph.input_node(), self.input_shape)
            vals = tuple(cv.torch.empty((b, *shape), device="meta") for b in BATCHES)
            one = Lazy("Tensor.unsqueeze", (value, 0), {})
            lazy = Lazy("Tensor.expand", (one, Batch(source), *([-1] * len(shape))), {}, vals)
            ref = self._program("shared", lazy, vals, lifting=True)
            self.lifted[key] = ref
        return ref

    def _unfolded(self, lazy: Lazy, folded: int) -> Ref:
        """A value with the batch folded into its dim 0 (B * k windows, patches) that several
        calls read: one node holds it as (B, k, ...), which each program folds back (views of
        the same values, in the same order)."""
        ref = self.lifted.get(str(id(lazy)))
        if ref is None:
            rest = tuple(lazy.vals[0].shape[1:])
            vals = tuple(cv.torch.empty((b, folded, *rest), device="meta") for b in BATCHES)
            unfold = Lazy("Tensor.reshape", (Lazy(lazy.fn, lazy.args, lazy.kwargs, lazy.vals),
                                             -1, folded, *rest), {}, vals)
            ref = self._program(_base(lazy), unfold, vals)
            self.lifted[str(id(lazy))] = ref
        return ref

    def _expanded(self, tokens: Expanded) -> Ref:
        """Learned tokens repeated over the batch, as one program node (batch-first)."""
        ref = self.expanded.get(id(tokens))
        if ref is None:
            shape = (1, *tokens.param.tensor.shape[1:])
            vals = tuple(cv.torch.empty((b, *shape[1:]), device="meta") for b in BATCHES)
            lazy = Lazy("Tensor.expand", (tokens.param, tokens.batch, -1, -1), {}, vals)
            ref = self._program(tokens.param.target.replace(".", "_"), lazy, vals)
            self.expanded[id(tokens)] = ref
        return ref

    # ---- messages --------------------------------------------------------------------------
    def _lines(self) -> dict[str, str]:
        return _source_lines(self.module, self.input_shape)

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
        lines = self._lines()
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
        where = f" ({self._describe(value, self._lines())})" if isinstance(value, fx.Node) else ""
        if isinstance(ref, Lazy) and ref.vals is not None and is_batch_first(ref.vals):
            try:
                ref = self._realise(ref)
            except Unsupported as exc:
                raise UnsupportedModuleError(f"cannot import {type(self.module).__name__}: "
                                             f"output {head!r}{where}: {exc}") from None
        if isinstance(ref, Lazy):
            raise UnsupportedModuleError(
                f"output {head!r} of the module{where} is not a batch of per-sample values (its "
                "first dim is not the batch, or its samples were mixed); a NetGraph's outputs "
                "are batch-first tensors")
        if not isinstance(ref, Ref):
            raise UnsupportedModuleError(
                f"output {head!r} of the module is {ref!r}, not a tensor; every output of "
                "forward must be a tensor (or a tuple, list or dict of tensors)")
        return ref.name


class _ProgramBuilder:
    """Turns a Lazy value and everything it reads into a program node's calls, tensors and
    inputs (graph nodes); it owns the parameters it holds."""

    def __init__(self, importer: _Importer, lifting: bool = False) -> None:
        self.importer, self.lifting = importer, lifting
        self.calls: list[dict[str, Any]] = []
        self.inputs: list[Ref] = []
        self.tensors: dict[str, cv.torch.Tensor] = {}
        self.specs: dict[str, dict[str, Any]] = {}
        self.done: dict[int, program.Call] = {}
        self.held: dict[str, program.Tensor] = {}
        self.claims: list[str] = []

    def build(self, lazy: Lazy) -> tuple[dict[str, Any], dict[str, cv.torch.Tensor], list[Ref]]:
        self.visit(lazy)
        return {"calls": self.calls, "held": self.specs}, self.tensors, self.inputs

    def add(self, fn: str, args: list[Any], kwargs: dict[str, Any]) -> program.Call:
        self.calls.append({"fn": fn, "args": program.encode(args),
                           "kwargs": program.encode(kwargs)})
        return program.Call(len(self.calls) - 1)

    def visit(self, lazy: Lazy) -> program.Call:
        key = id(lazy)
        if key not in self.done:
            args = [self.value(a) for a in lazy.args]
            kwargs = {k: self.value(v) for k, v in lazy.kwargs.items()}
            if program.is_inplace(lazy.fn) and args and isinstance(args[0], program.Input):
                args[0] = self.add("Tensor.clone", [args[0]], {})  # never write into a node
            fn = lazy.fn
            if fn == "Tensor.view" and not any(isinstance(a, cv.torch.dtype) for a in args):
                fn = "Tensor.reshape"  # its input may be a node's non-contiguous output
            if _CASTS.get(fn) == self.importer.dtype:  # x.float() in a float model: its
                fn, args = "Tensor.to", [*args[:1], program.NETWORK_DTYPE]  # precision
            self.done[key] = self.add(fn, args, kwargs)
        return self.done[key]

    def value(self, v: Any) -> Any:
        if isinstance(v, Lazy):
            if v.ref is None and v.shared and v.vals is not None and is_batch_first(v.vals):
                self.importer._realise(v)  # other calls read it too: a node of its own
            if v.ref is None and v.shared and not self.lifting and _liftable(v):
                return self.add("operator.getitem", [self.value(self.importer._lifted(v)), 0],
                                {})
            folded = _folded(v)
            if v.ref is None and v.shared and folded is not None:  # a node of its own, unfolded
                rest = list(v.vals[0].shape[1:])
                return self.add("Tensor.reshape",
                                [self.value(self.importer._unfolded(v, folded)), -1, *rest], {})
            return self.value(v.ref) if v.ref is not None else self.visit(v)
        if isinstance(v, Ref):
            if v not in self.inputs:
                self.inputs.append(v)
            return program.Input(self.inputs.index(v))
        if isinstance(v, Param):
            if v.trainable and v.shared and not self.lifting:  # read by other calls too
                call = self.add("operator.getitem", [self.value(self.importer._lifted(v)), 0],
                                {})
                for name, args, kwargs in v.views:
                    call = self.add(f"Tensor.{name}", [call, *args], kwargs)
                return call
            return self.tensor(v)
        if isinstance(v, Batch):
            return self.add("Tensor.size", [self.value(v.ref), 0], {})
        if isinstance(v, Expanded):  # its own node: several calls may read the same tokens
            return self.value(self.importer._expanded(v))
        if isinstance(v, (list, tuple)):
            items = [self.value(x) for x in v]
            return items if isinstance(v, list) else tuple(items)
        if isinstance(v, dict):
            return {k: self.value(x) for k, x in v.items()}
        if isinstance(v, slice):
            return slice(self.value(v.start), self.value(v.stop), self.value(v.step))
        if isinstance(v, (Layer, _Failed, _Constant)):
            raise program.Unstorable(repr(v))
        if isinstance(v, cv.torch.dtype) and v == self.importer.dtype:
            return program.NETWORK_DTYPE
        return v

    def tensor(self, p: Param) -> program.Tensor:
        if p.target not in self.held:
            if p.trainable:  # constants and indices are copied; a parameter has one owner
                cv.require(p.target not in self.importer.owned,
                           f"parameter {p.target!r} is read more than once, which shares its "
                           "weights between calls; a NetGraph node owns its weights (use one "
                           "layer per call)")
                self.claims.append(p.target)  # owned once the program is made
            t = p.tensor
            buffer = not p.trainable
            name = f"{'b' if buffer else 'p'}{len(self.held)}"
            self.tensors[name] = cv._cpu(t, repr(p.target))
            self.specs[name] = {"shape": list(t.shape), "buffer": buffer,
                                "dtype": None if t.is_floating_point() else
                                str(t.dtype).removeprefix("torch.")}
            self.held[p.target] = program.Tensor(name)
        return self.held[p.target]


def _live(graph: fx.Graph) -> set[fx.Node]:
    """The nodes whose results reach the output, or that write into a tensor or check one."""
    live: set[fx.Node] = set()
    for node in reversed(graph.nodes):
        name = str(node.target) if node.op == "call_method" else cv.fn_name(node.target)
        effect = node.op == "output" or program.is_inplace(name) or "assert" in name \
            or name == "operator.setitem"
        if effect or any(u in live for u in node.users):
            live.add(node)
    return live


def _stand_in(value: Any, stand_ins: dict[str, Lazy]) -> Any:
    """`value` with each batch-first Lazy value (not yet a node) replaced by a Ref of its
    shape, so a converter can try it without making its program node."""
    def visit(v: Any) -> Any:
        if isinstance(v, Lazy) and v.vals is not None and is_batch_first(v.vals):
            if v.ref is not None:
                return v.ref
            name = f"\0lazy{id(v)}"
            stand_ins[name] = v
            return Ref(name, tuple(v.vals[0].shape[1:]))
        return v

    return fx.node.map_aggregate(value, visit)


def _parameters(lazy: Lazy) -> tuple[set[str], bool]:
    """The trainable parameters a Lazy value's program would hold, and whether it would hold
    a computation with parameters that other calls read too (a shared value no node can hold
    alone: a qkv projection folded with windows into the batch, whose q and k one program
    reads and v another). Shared parameters and values of parameters alone are lifted into
    nodes of their own (`_Importer._lifted`), so they count for neither."""
    held: dict[int, set[str]] = {}
    nodes: dict[int, Lazy] = {}
    readers: dict[int, int] = {}  # how many values of this program read each Lazy value
    stack: list[tuple[Lazy, bool]] = [(lazy, False)]
    while stack:  # post-order, without recursion: Lazy chains can be long
        v, done = stack.pop()
        if done:
            found: set[str] = set()
            for x in _reads(v):
                if isinstance(x, Param):
                    found.add(x.target)
                else:
                    found |= held[id(x)]
            held[id(v)] = found
            continue
        if id(v) in nodes:
            continue
        nodes[id(v)] = v
        stack.append((v, True))
        inner = {id(x): x for x in _reads(v) if isinstance(x, Lazy)}
        for key, x in inner.items():
            readers[key] = readers.get(key, 0) + 1
            stack.append((x, False))
    entangled = any(held[k] and readers.get(k, 0) < v.users and not (
        v.vals is not None and is_batch_first(v.vals)) for k, v in nodes.items() if v is not lazy)
    return held[id(lazy)], entangled


def _reads(lazy: Lazy) -> list[Param | Lazy]:
    """The trainable parameters and the Lazy values a program holding `lazy` would take in
    with it (not those held by nodes already, nor shared ones lifted into nodes)."""
    out: list[Param | Lazy] = []

    def visit(x: Any) -> Any:
        if isinstance(x, Batch):
            x = x.ref
        if isinstance(x, Param) and x.trainable and not x.shared:
            out.append(x)
        elif isinstance(x, Lazy) and x.ref is None and not (x.shared and (
                _liftable(x) or _folded(x) is not None)):
            out.append(x)
        return x

    fx.node.map_aggregate((lazy.args, lazy.kwargs), visit)
    return out


def _folded(lazy: Lazy) -> int | None:
    """k, if the value is a tensor with the batch folded into dim 0 as B * k."""
    vals = lazy.vals
    if vals is None or not all(isinstance(v, cv.torch.Tensor) and v.dim() >= 1 for v in vals):
        return None
    k, rem = divmod(vals[0].shape[0], BATCHES[0])
    ok = not rem and k > 1 and all(v.shape[0] == b * k and v.shape[1:] == vals[0].shape[1:]
                                   for v, b in zip(vals, BATCHES))
    return k if ok else None


def _liftable(lazy: Lazy) -> bool:
    """A tensor computed from parameters and constants alone (see `_Importer._lifted`)."""
    return (lazy.vals is not None and isinstance(lazy.vals[0], cv.torch.Tensor)
            and _parameters_only(lazy))


def _parameters_only(lazy: Lazy) -> bool:
    """Whether a Lazy value is computed from parameters and constants alone (no input)."""
    stack, seen, pure = [lazy], set(), True
    while stack and pure:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))

        def visit(x: Any) -> Any:
            nonlocal pure
            if isinstance(x, (Ref, Batch, Expanded)):
                pure = False
            elif isinstance(x, Lazy):
                stack.append(x)
            return x

        fx.node.map_aggregate((v.args, v.kwargs), visit)
    return pure


def _base(lazy: Lazy) -> str:
    """A node name for a program: its last call's function."""
    return lazy.fn.rsplit(".", 1)[-1].strip("_") or "program"


def _elementwise(attrs: dict[str, Any], shapes: list[tuple[int, ...]]) -> bool:
    """A program that maps each value of its one input on its own (scalars, elementwise
    functions, scalar tensors): channels pass through it unchanged."""
    if len(shapes) != 1 or list(shapes[0]) != list(attrs["shape"]):
        return False
    if any(math.prod(spec["shape"]) != 1 for spec in attrs["held"].values()):
        return False
    return all(call["fn"] in program.ELEMENTWISE for call in attrs["calls"])


def _traced_shape(vals: tuple[Any, ...] | None) -> tuple[int, ...] | None:
    """The per-sample shape of a traced batch-first tensor (None when unknown)."""
    if vals is None or not all(isinstance(v, cv.torch.Tensor) for v in vals):
        return None
    return tuple(vals[0].shape[1:]) if is_batch_first(vals) else (-1,)


def _param_view(node: fx.Node, args: tuple, kwargs: dict) -> Param | None:
    """A view of a parameter read directly (`self.gamma.reshape(1, -1, 1, 1)`): the same
    parameter, reshaped, so a node can still hold it."""
    if not args or not isinstance(args[0], Param) or _contains(
            (args[1:], kwargs), (Ref, Param, Lazy, Batch, Expanded)):
        return None
    name = str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")
    if name not in _VIEWS or (node.op == "call_function" and getattr(
            cv.torch, name, None) is not node.target):
        return None
    p = args[0]
    view = getattr(p.tensor.detach(), name)(*args[1:], **kwargs)
    return Param(p.target, view, p.trainable, p.shared or len(node.users) > 1,
                 (*p.views, (name, tuple(args[1:]), dict(kwargs))))


def _source_lines(module: nn.Module, input_shape: tuple[int, ...]) -> dict[str, str]:
    """fx node name -> ' (file.py:123, in fn)' of the model code that made the call: a second
    trace, recording stack traces, run only when there is an error to explain."""
    out = {}
    for node in _trace(module, input_shape, stack_traces=True).graph.nodes:
        frames = [ln.strip() for ln in (node.stack_trace or "").splitlines()
                  if ln.strip().startswith("File ") and _TORCH_DIR not in ln
                  and _OWN_DIR not in ln]
        if frames:  # File "/path/file.py", line 123, in fn
            parts = [p.strip() for p in frames[-1][5:].split(",", 2)]
            if len(parts) == 3:
                path, line, fn = parts
                out[node.name] = f" ({path.strip(chr(34)).rsplit('/', 1)[-1]}:" \
                                 f"{line.split()[-1]}, {fn})"
    return out


def _python(fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """Size arithmetic at import time."""
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
