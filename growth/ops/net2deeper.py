"""Net2Deeper: insert an identity layer after a node without changing the function.

The new layer is a conv2d (1 at the centre tap of matching channels, same padding) on
channels-first images (C, H, W), or a linear layer (identity matrix, zero bias) mixing the last
axis where the features lie there: vectors, token sequences (L, D), channels-last maps
(H, W, C). It is optionally followed by BatchNorm set to undo its own normalisation, and by ReLU
only where ReLU(x) = x, i.e. where the node's output cannot be negative.
"""

from __future__ import annotations

import torch

from growth.compile import compile_graph
from growth.errors import OperatorError
from growth.graph import NetGraph
from growth.layers import Shape
from growth.ops.guards import MAX_NEW_PARAMS, check_size
from growth.ops.layout import feature_axes
from growth.ops.registry import ChangeRecord, OpResult

_NONNEG = frozenset({"relu", "relu6"})
_NONNEG_PASS = frozenset({"maxpool2d", "avgpool2d", "adaptive_avgpool2d", "dropout", "dropout2d",
                          "stochastic_depth", "identity", "flatten", "concat", "permute",
                          "reshape", "getitem", "mean", "channel_shuffle"})
_ACTIVATIONS = ("auto", "relu", "none")


def net2deeper(graph: NetGraph, after: str, kernel_size: int = 3, activation: str = "auto",
               batchnorm: bool = False, sample: torch.Tensor | None = None,
               max_new_params: int | None = MAX_NEW_PARAMS, noise: float = 0.0,
               seed: int = 0) -> OpResult:
    """Insert an identity block after node `after`; every consumer of `after` reads the block.

    kernel_size: odd, for image outputs (ignored on vectors, still checked to be odd).
    activation: "auto" adds ReLU iff `after`'s output is non-negative (a relu, or pools/flatten/
    concat of relus), "relu" demands it (an error elsewhere, since identity would not hold),
    "none" adds none.
    batchnorm: add BN after the new layer whose running stats are the mean/var of `after`'s
    output on `sample` (a batch of network inputs, BNs in training mode) and whose affine part
    undoes them: eval mode is unchanged, and a training step on that batch starts from the
    identity too.
    max_new_params: refuse an insertion with more parameters (None: no limit); see
    `growth.ops.guards`.
    noise: 0 keeps the function exact. noise > 0 adds u ~ Uniform(-noise, noise) to every
    weight of the new layer (drawn from a generator seeded with `seed`), so its units start
    apart and the layer can learn more than a rescaled identity (EAS uses 1e-3); the output
    then moves by at most about noise x (fan-in) x (input scale) at the new layer.
    """
    node = graph.node(after)
    shape, conv = _check(graph, after, node.kind, kernel_size, activation, batchnorm, sample)
    check_size(f"net2deeper after {after!r} (kernel_size={kernel_size})",
               deepening_cost(shape[0] if conv else shape[-1], kernel_size if conv else 1,
                              batchnorm), max_new_params)
    relu = _wants_relu(graph, after, activation)
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0:
        raise OperatorError(f"net2deeper after {after!r}: noise must be a number >= 0, got "
                            f"{noise!r}")
    params = {"after": after, "kernel_size": kernel_size, "activation": activation,
              "batchnorm": batchnorm,
              "sample_shape": None if sample is None else list(sample.shape),
              "noise": float(noise), "seed": int(seed)}
    dtype = _dtype(graph)
    stats = _statistics(graph, after, sample, dtype) if batchnorm else None
    out = graph.copy()
    consumers = out.consumers(after)
    base = _fresh_name(out, after)
    kind, tensors, attrs = _identity_layer(shape, kernel_size if conv else None, dtype)
    if noise > 0:
        gen = torch.Generator().manual_seed(int(seed))
        w = tensors["weight"]
        tensors["weight"] = w + noise * (torch.rand(w.shape, generator=gen, dtype=w.dtype) * 2 - 1)
    names = [out.add(base, kind, [after], tensors=tensors, **attrs)]
    if stats is not None:
        names.append(out.add(f"{base}_bn", f"batchnorm{2 if conv else 1}d",
                             [names[-1]], tensors=_undo_bn(*stats)))
    if relu:
        names.append(out.add(f"{base}_relu", "relu", [names[-1]]))
    for c in consumers:
        out.rewire(c, after, names[-1])
    added = [f"{n}.{k}" for n in names for k in out.node(n).tensors]
    return OpResult(out, ChangeRecord("net2deeper", params, added=added, added_nodes=names))


def _check(graph: NetGraph, after: str, kind: str, kernel_size: int, activation: str,
           batchnorm: bool, sample: torch.Tensor | None) -> tuple[Shape, bool]:
    """The output shape of `after`, and whether the identity is a conv (else a linear)."""
    call = f"net2deeper after {after!r}"
    if kind == "output":
        raise OperatorError(f"net2deeper: {after!r} is an output head; deepen after the node it "
                            f"reads ({graph.inputs(after)[0]!r}) instead")
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 \
            or kernel_size % 2 == 0:
        raise OperatorError(f"{call}: kernel_size must be a positive odd int "
                            f"(an identity needs a centre tap), got {kernel_size!r}; use 1, 3 or 5")
    if activation not in _ACTIVATIONS:
        raise OperatorError(f"{call}: activation must be one of "
                            f"{_ACTIVATIONS}, got {activation!r}")
    shapes = graph.shapes()  # one pass over the graph: cheaper than walking ancestors
    shape, axis = shapes[after], feature_axes(graph, shapes)[after]
    conv = len(shape) == 3 and axis == 0
    if not conv and (axis is None or axis != len(shape) - 1):
        raise OperatorError(
            f"{call}: its output has shape {shape} with the features along "
            f"{'no single axis' if axis is None else f'axis {axis}'}; an identity layer needs "
            "channels-first images (C, H, W) or features on the last axis (vectors, tokens, "
            "channels-last maps)")
    if conv and kernel_size > min(shape[1:]):
        raise OperatorError(f"{call}: kernel_size {kernel_size} is larger than "
                            f"its {shape[1]}x{shape[2]} map; use kernel_size <= {min(shape[1:])}")
    if batchnorm and not (conv or len(shape) == 1):
        raise OperatorError(f"{call}: batchnorm=True needs vectors or channels-first images, "
                            f"but its output {shape} has the features on its last axis")
    if batchnorm and sample is None:
        raise OperatorError(f"{call}: batchnorm=True needs `sample`, a batch "
                            "of network inputs, to set the new BatchNorm's statistics")
    return shape, conv


def deepening_cost(channels: int, kernel_size: int = 1, batchnorm: bool = False) -> int:
    """Trainable parameters of an identity layer on `channels` features (a conv when
    kernel_size > 1) and of its BN."""
    c = channels
    return c * c * kernel_size * kernel_size + c + (2 * c if batchnorm else 0)


def _wants_relu(graph: NetGraph, after: str, activation: str) -> bool:
    nonneg = _nonnegative(graph, after)
    if activation == "relu" and not nonneg:
        raise OperatorError(
            f"net2deeper after {after!r} ({graph.node(after).kind}): a ReLU here would clip its "
            "negative outputs, so the new block could not be an identity; deepen after a relu "
            "node or use activation='none' (or 'auto')")
    return activation == "relu" or (activation == "auto" and nonneg)


def _nonnegative(graph: NetGraph, name: str) -> bool:
    """True if the node's output is >= 0 for every input (a relu, or pools/concat of relus)."""
    kind = graph.node(name).kind
    if kind in _NONNEG:
        return True
    if kind in _NONNEG_PASS:
        return all(_nonnegative(graph, i) for i in graph.inputs(name))
    return False


def _dtype(graph: NetGraph) -> torch.dtype:
    for name in graph.nx.nodes:
        for t in graph.node(name).tensors.values():
            if t.is_floating_point():
                return t.dtype
    return torch.get_default_dtype()


def _fresh_name(graph: NetGraph, after: str) -> str:
    k = 1
    while any(n in graph for n in (f"{after}_deep{k}", f"{after}_deep{k}_bn",
                                   f"{after}_deep{k}_relu")):
        k += 1
    return f"{after}_deep{k}"


def _identity_layer(shape: Shape, kernel_size: int | None, dtype: torch.dtype
                    ) -> tuple[str, dict[str, torch.Tensor], dict[str, int]]:
    """Kind, tensors and attrs of a layer computing the identity on outputs of `shape`: a conv
    with `kernel_size` on channels-first images, else (kernel_size None) a linear layer on the
    last axis."""
    if kernel_size is None:
        c = shape[-1]
        tensors = {"weight": torch.eye(c, dtype=dtype), "bias": torch.zeros(c, dtype=dtype)}
        return "linear", tensors, {"out_features": c}
    c = shape[0]
    weight = torch.zeros(c, c, kernel_size, kernel_size, dtype=dtype)
    centre = kernel_size // 2
    weight[torch.arange(c), torch.arange(c), centre, centre] = 1.0
    tensors = {"weight": weight, "bias": torch.zeros(c, dtype=dtype)}
    return "conv2d", tensors, {"out_channels": c, "kernel_size": kernel_size, "padding": centre}


def _statistics(graph: NetGraph, after: str, sample: torch.Tensor, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (biased) variance of `after`'s output on `sample` as training sees
    it: upstream BNs use batch statistics (on a compiled copy), dropout is off."""
    want = tuple(graph.shape(graph.input_node()))
    if sample.is_meta:
        raise OperatorError(f"net2deeper after {after!r}: sample is on the meta device and holds "
                            "no values; pass a batch of real inputs (on any device)")
    if sample.dim() != len(want) + 1 or tuple(sample.shape[1:]) != want:
        raise OperatorError(f"net2deeper after {after!r}: sample has shape {tuple(sample.shape)}; "
                            f"expected a batch of inputs (B, {', '.join(map(str, want))})")
    if sample.shape[0] < 2:
        raise OperatorError(f"net2deeper after {after!r}: sample has {sample.shape[0]} input; "
                            "batch statistics need at least 2")
    module = compile_graph(_truncate(graph, after)).eval()
    for m in module.modules():  # the statistics the new BN will see when training on `sample`
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.train()
    with torch.no_grad():  # the graph, and so the compiled copy, lives on the CPU
        y = module(sample.detach().to("cpu", dtype))
    dims = [0] if y.dim() == 2 else [0, 2, 3]
    return y.mean(dims), y.var(dims, unbiased=False)


def _truncate(graph: NetGraph, after: str) -> NetGraph:
    """A graph computing only `after` (its ancestors and one output), cheap to compile."""
    keep = graph.ancestors([after])
    out = graph.copy()
    for n in list(out.nx.nodes):
        if n not in keep:
            out.remove(n)
    name = "probe_out"
    while name in out:
        name += "_"
    out.add_output(name, after)
    return out


def _undo_bn(mean: torch.Tensor, var: torch.Tensor, eps: float = 1e-5
             ) -> dict[str, torch.Tensor]:
    """BN tensors with running stats = (mean, var) and affine part that adds them back."""
    return {"weight": torch.sqrt(var + eps), "bias": mean.clone(), "running_mean": mean.clone(),
            "running_var": var.clone(), "num_batches_tracked": torch.tensor(0)}


def deepenable(graph: NetGraph, kernel_size: int = 1,
               max_new_params: int | None = MAX_NEW_PARAMS) -> list[str]:
    """Nodes after which `net2deeper(graph, node, kernel_size)` inserts an identity layer within
    the size guard: non-output nodes with channels-first images (whose maps fit the kernel) or
    features on the last axis."""
    shapes = graph.shapes()
    axes = feature_axes(graph, shapes)
    out = []
    for n, shape in shapes.items():
        axis = axes[n]
        if graph.node(n).kind == "output" or axis is None:
            continue
        conv = len(shape) == 3 and axis == 0
        if not conv and axis != len(shape) - 1:
            continue
        if conv and kernel_size > min(shape[1:]):
            continue
        cost = deepening_cost(shape[0] if conv else shape[-1], kernel_size if conv else 1)
        if max_new_params is None or cost <= max_new_params:
            out.append(n)
    return out
