"""NetGraph -> torch module by torch.fx code generation, and trained weights back into a graph.

The compiled module is an `fx.GraphModule`: its forward is generated Python source that calls
the layers directly, so it runs like the same network written by hand. Submodules are named
after graph nodes, so `module.state_dict()` keys equal `graph.named_tensors()` keys.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from growth.errors import CheckpointError, GraphError
from growth.graph import NetGraph
from growth.layers import FROZEN, PARAMETRIC, build_module, decode_index, kind_of

Heads = str | Sequence[str] | None


def compile_graph(graph: NetGraph, head: Heads = None,
                  modules: nn.Module | None = None) -> fx.GraphModule:
    """Compile `graph` into a module.

    head: None returns every head (a tensor if there is one, else a dict head -> tensor);
    a head name returns only that head's tensor; a list of names returns a dict of those
    heads. Only the layers the chosen heads need run, and shared layers run once.
    modules: reuse this module's layers (shared parameters) instead of building new ones:
    how per-head views of one network share weights.
    """
    heads = graph.heads
    wanted = heads if head is None else [head] if isinstance(head, str) else list(head)
    unknown = [h for h in wanted if h not in heads]
    if unknown or not wanted:
        missing = ", ".join(repr(h) for h in unknown) or repr(head)
        raise GraphError(f"no head named {missing}; the graph's heads are {heads}")
    root = modules if modules is not None else _build_layers(graph)
    g = fx.Graph()
    env: dict[str, fx.Node] = {}
    needed = graph.ancestors(wanted)
    for name in (n for n in graph.topo_order() if n in needed):
        node = graph.node(name)
        args = [env[i] for i in graph.inputs(name)]
        env[name] = _emit(g, name, node.kind, node.attrs, args)
    if isinstance(head, str) or (head is None and len(heads) == 1):
        g.output(env[wanted[0]])
    else:
        g.output({h: env[h] for h in wanted})
    return fx.GraphModule(root, g, class_name="CompiledNet")


def head_view(module: fx.GraphModule, graph: NetGraph, head: Heads) -> fx.GraphModule:
    """A module computing one head (or a dict of several) sharing every parameter with
    `module`."""
    return compile_graph(graph, head, modules=module)


def _build_layers(graph: NetGraph) -> nn.Module:
    root = nn.Module()
    for name in graph.topo_order():
        node = graph.node(name)
        if not _has_layer(node.kind):
            continue
        if node.kind in PARAMETRIC and node.tensors:
            with torch.device("meta"):  # no random init: the graph's tensors are copied in
                layer = build_module(node.kind, node.attrs)
            dtype = next((t.dtype for t in node.tensors.values() if t.is_floating_point()),
                         torch.get_default_dtype())
            layer = layer.to_empty(device="cpu").to(dtype)  # the graph's precision
            _load_layer(layer, name, node.tensors)
        else:
            layer = build_module(node.kind, node.attrs)
        if node.attrs.get(FROZEN):
            layer.requires_grad_(False)
        root.add_module(name, layer)
    return root


def _load_layer(layer: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
    own = layer.state_dict()
    missing = sorted(set(own) - set(tensors))
    if missing:
        raise GraphError(f"node {name!r} lacks tensors {missing}")
    with torch.no_grad():
        for key, value in own.items():
            src = tensors[key]
            if src.shape != value.shape:
                raise GraphError(
                    f"node {name!r}: tensor {key!r} has shape {tuple(src.shape)}, the layer "
                    f"needs {tuple(value.shape)}"
                )
            value.copy_(src)


def _emit(g: fx.Graph, name: str, kind: str, attrs: dict, args: list[fx.Node]) -> fx.Node:
    if attrs.get(FROZEN) and _has_layer(kind):  # frozen: as in eval mode, always
        return g.call_function(_run_frozen, (g.get_attr(name), *args))
    if kind == "input":
        return g.placeholder(name)
    if kind in ("output", "identity"):
        return args[0]
    if kind == "flatten":
        return g.call_function(torch.flatten, (args[0], 1))
    if kind == "add":
        out = args[0]
        for a in args[1:]:
            out = g.call_function(operator.add, (out, a))
        return out
    if kind == "concat":
        return g.call_function(torch.cat, (tuple(args), _batched(attrs["dim"])))
    plumbing = _PLUMBING.get(kind)
    if plumbing is not None:
        return plumbing(g, attrs, args)
    return g.call_module(name, tuple(args))


def _batched(dim: int) -> int:
    """A per-sample dim as a dim of the batched tensor."""
    return dim if dim < 0 else dim + 1


# Functional kinds: the torch call the model itself makes, with the batch dim put back.
_PLUMBING: dict[str, Callable[[fx.Graph, dict, list[fx.Node]], fx.Node]] = {
    "mul": lambda g, a, x: g.call_function(operator.mul, tuple(x)),
    "permute": lambda g, a, x: g.call_function(
        torch.permute, (x[0], (0, *(d + 1 for d in a["dims"])))),
    "reshape": lambda g, a, x: g.call_method("reshape", (x[0], -1, *a["shape"])),
    "getitem": lambda g, a, x: g.call_function(
        operator.getitem, (x[0], (slice(None), *decode_index(a["index"])))),
    "mean": lambda g, a, x: g.call_function(
        torch.mean, (x[0], [_batched(d) for d in a["dims"]], a["keepdim"])),
    "sum": lambda g, a, x: g.call_function(
        torch.sum, (x[0], [_batched(d) for d in a["dims"]], a["keepdim"])),
    "pad": lambda g, a, x: g.call_function(F.pad, (x[0], list(a["pad"]), "constant",
                                                   a["value"])),
    "interpolate": lambda g, a, x: g.call_function(F.interpolate, (x[0],), {
        k: tuple(v) if isinstance(v, list) else v for k, v in a.items()
        if k in ("size", "scale_factor", "mode", "align_corners", "recompute_scale_factor",
                 "antialias")}),
}


def _has_layer(kind: str) -> bool:
    """Whether nodes of `kind` compile to a submodule of their own."""
    return kind_of(kind).module is not None and kind != "identity"


def _run_frozen(layer: nn.Module, *args: torch.Tensor) -> torch.Tensor:
    """A frozen layer computes exactly what it computes in eval mode, whatever mode the model
    is in: BatchNorm uses (and never updates) its running statistics; dropout and stochastic
    depth are off."""
    if not layer.training:
        return layer(*args)
    layer.train(False)
    try:
        return layer(*args)
    finally:
        layer.train(True)


def graph_with_weights(graph: NetGraph, module: nn.Module | Mapping[str, torch.Tensor]
                       ) -> NetGraph:
    """The way back: a copy of `graph` holding the trained tensors of `module` (a module
    compiled from this graph, or its state dict); tensors come back detached, on the CPU."""
    state = module.state_dict() if isinstance(module, nn.Module) else module
    out = graph.copy()
    for name in out.topo_order():
        node = out.node(name)
        if node.kind not in PARAMETRIC:
            continue
        fresh = {}
        for key, old in node.tensors.items():
            full = f"{name}.{key}"
            if full not in state:
                raise CheckpointError(f"module has no tensor {full!r}; was it compiled from "
                                      "this graph?")
            new = state[full].detach().to("cpu", copy=True)
            if new.shape != old.shape:
                raise CheckpointError(f"{full}: module holds shape {tuple(new.shape)}, graph "
                                      f"expects {tuple(old.shape)}")
            fresh[key] = new
        node.tensors = fresh
    return out
