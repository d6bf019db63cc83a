"""Base networks as NetGraphs: a trunk that ends at a node named "features", plus linear heads.

Builders return a trunk without heads: a continual-learning run adds one head per task with
`add_head`. The trunk always ends at an `identity` node named "features" (not at the last
activation) so that its name stays fixed while growth operators deepen or widen the layers
before it, and every head reads the same stable node. Node names are short and positional
(`fc1`, `bn1`, `act1`, `conv2`, `pool2`, ...) so search spaces can address them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from growth.errors import GraphError
from growth.graph import NetGraph
from growth.layers import ACTIVATIONS

FEATURES = "features"


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise GraphError(f"activation {activation!r} is not a node kind; use one of "
                         f"{sorted(ACTIVATIONS)}")


def _dense_block(g: NetGraph, src: str, i: int, width: int, activation: str,
                 batchnorm: bool, dropout: float) -> str:
    """linear -> [batchnorm1d] -> activation -> [dropout]; returns the last node."""
    src = g.add(f"fc{i}", "linear", [src], out_features=int(width))
    if batchnorm:
        src = g.add(f"bn{i}", "batchnorm1d", [src])
    src = g.add(f"act{i}", activation, [src])
    if dropout > 0:
        src = g.add(f"drop{i}", "dropout", [src], p=float(dropout))
    return src


def mlp(input_shape: Sequence[int], hidden: Sequence[int], activation: str = "relu",
        batchnorm: bool = False, dropout: float = 0.0) -> NetGraph:
    """A multilayer perceptron trunk: input x -> [flatten] -> hidden blocks -> "features".

    Each hidden block is fc{i} -> [bn{i}] -> act{i} -> [drop{i}] (i from 1). Images are
    flattened first (node "flatten"). With `hidden=[]` the features are the (flat) input.
    """
    _check_activation(activation)
    g = NetGraph()
    src = g.add_input("x", input_shape)
    if len(input_shape) > 1:
        src = g.add("flatten", "flatten", [src])
    for i, width in enumerate(hidden, start=1):
        src = _dense_block(g, src, i, width, activation, batchnorm, dropout)
    g.add(FEATURES, "identity", [src])
    return g


def small_cnn(input_shape: Sequence[int], channels: Sequence[int] = (32, 64),
              kernel_size: int = 3, batchnorm: bool = True, activation: str = "relu",
              fc: Sequence[int] = (), dropout: float = 0.0) -> NetGraph:
    """A small convolutional trunk for (C, H, W) inputs.

    Each block i (from 1) is conv{i} (same padding) -> [bn{i}] -> act{i} -> pool{i} (2x2 max),
    halving the map; then "flatten" and optional dense blocks fc{j} -> act{j} -> [drop{j}]
    numbered after the conv blocks, then "features". The map must stay at least 1x1.
    """
    _check_activation(activation)
    if len(input_shape) != 3:
        raise GraphError(f"small_cnn needs an image shape (C, H, W), got {tuple(input_shape)}")
    g = NetGraph()
    src = g.add_input("x", input_shape)
    for i, width in enumerate(channels, start=1):
        src = g.add(f"conv{i}", "conv2d", [src], out_channels=int(width),
                    kernel_size=kernel_size, padding=kernel_size // 2)
        if batchnorm:
            src = g.add(f"bn{i}", "batchnorm2d", [src])
        src = g.add(f"act{i}", activation, [src])
        src = g.add(f"pool{i}", "maxpool2d", [src], kernel_size=2)
    src = g.add("flatten", "flatten", [src])
    for j, width in enumerate(fc, start=len(channels) + 1):
        src = _dense_block(g, src, j, width, activation, False, dropout)
    g.add(FEATURES, "identity", [src])
    return g


def vit(input_shape: Sequence[int], patch: int = 4, dim: int = 32, depth: int = 2,
        heads: int = 2, mlp_dim: int | None = None) -> NetGraph:
    """A small Vision Transformer trunk for (C, H, W) inputs (pre-norm blocks, as ViT's).

    "patch" (conv2d, kernel and stride `patch`) -> "tokens" (reshape to (dim, N)) -> "seq"
    (permute to (N, dim)) -> "cls" (class token) -> "pos" (positional embedding); then blocks
    i = 1..depth: block{i}_norm1 -> block{i}_attn (heads of dim // heads features) ->
    block{i}_add1 (residual) -> block{i}_norm2 -> block{i}_fc1 (mlp_dim, default 2 * dim) ->
    block{i}_act (gelu) -> block{i}_fc2 -> block{i}_add2; then "norm" (LayerNorm), "pool" (the
    class token) and "features". H and W must be multiples of `patch`.
    """
    if len(input_shape) != 3:
        raise GraphError(f"vit needs an image shape (C, H, W), got {tuple(input_shape)}")
    c, h, w = (int(v) for v in input_shape)
    if h % patch or w % patch:
        raise GraphError(f"vit: the {h}x{w} input does not split into {patch}x{patch} patches; "
                         f"pick a patch size dividing both")
    if dim % heads:
        raise GraphError(f"vit: dim {dim} does not split into {heads} heads")
    hidden = 2 * dim if mlp_dim is None else int(mlp_dim)
    tokens = (h // patch) * (w // patch)
    g = NetGraph()
    g.add_input("x", (c, h, w))
    g.add("patch", "conv2d", ["x"], out_channels=dim, kernel_size=patch, stride=patch)
    g.add("tokens", "reshape", ["patch"], shape=[dim, tokens])
    g.add("seq", "permute", ["tokens"], dims=[1, 0])
    g.add("cls", "class_token", ["seq"], shape=[1, 1, dim])
    src = g.add("pos", "offset", ["cls"], shape=[1, tokens + 1, dim])
    for i in range(1, depth + 1):
        b = f"block{i}"
        g.add(f"{b}_norm1", "layernorm", [src], normalized_shape=[dim], eps=1e-6)
        g.add(f"{b}_attn", "attention", [f"{b}_norm1"], dim=dim, num_heads=heads,
              head_dim=dim // heads, dim_out=dim)
        g.add(f"{b}_add1", "add", [src, f"{b}_attn"])
        g.add(f"{b}_norm2", "layernorm", [f"{b}_add1"], normalized_shape=[dim], eps=1e-6)
        g.add(f"{b}_fc1", "linear", [f"{b}_norm2"], out_features=hidden)
        g.add(f"{b}_act", "gelu", [f"{b}_fc1"])
        g.add(f"{b}_fc2", "linear", [f"{b}_act"], out_features=dim)
        src = g.add(f"{b}_add2", "add", [f"{b}_add1", f"{b}_fc2"])
    g.add("norm", "layernorm", [src], normalized_shape=[dim], eps=1e-6)
    g.add("pool", "getitem", ["norm"], index=[0])
    g.add(FEATURES, "identity", ["pool"])
    return g


def add_head(graph: NetGraph, name: str, n_classes: int, source: str = FEATURES) -> NetGraph:
    """A new graph with a linear head `head_<name>` on `source` and an output node `<name>`.

    The input graph is left unchanged (tensors are shared, as with every graph copy).
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise GraphError(f"head name {name!r} must be a Python identifier (e.g. 'task1')")
    if int(n_classes) < 1:
        raise GraphError(f"head {name!r} needs n_classes >= 1, got {n_classes}")
    shape = graph.shape(source)
    if len(shape) != 1:
        raise GraphError(f"head {name!r} reads {source!r} of shape {shape}; a linear head needs "
                         f"a vector (flatten it first, {math.prod(shape)} features)")
    out = graph.copy()
    out.add(f"head_{name}", "linear", [source], out_features=int(n_classes))
    out.add_output(name, f"head_{name}")
    return out


# The base networks of the benchmarks: the starting points of searches and campaigns.
BENCHMARKS = {
    "digits_mlp": "MLP 64-100-100 for 8x8 digits (permuted, variations, split streams)",
    "mnist_mlp": "MLP 784-256-256 for MNIST-sized images (permuted, variations)",
    "cifar_cnn": "small CNN for 32x32 RGB: conv 32 and 64, BatchNorm, 2x2 max pools",
}


def benchmark_network(name: str, n_classes: int = 10, heads: Sequence[str] = ("t0",)
                      ) -> NetGraph:
    """A benchmark's base network (see BENCHMARKS) with one `n_classes` head per name."""
    if name == "digits_mlp":
        g = mlp((1, 8, 8), [100, 100])
    elif name == "mnist_mlp":
        g = mlp((1, 28, 28), [256, 256])
    elif name == "cifar_cnn":
        g = small_cnn((3, 32, 32), (32, 64), batchnorm=True)
    else:
        raise GraphError(f"unknown benchmark network {name!r}; known: {sorted(BENCHMARKS)}")
    for head in heads:
        g = add_head(g, head, n_classes)
    return g


__all__ = ["BENCHMARKS", "FEATURES", "add_head", "benchmark_network", "mlp", "small_cnn",
           "vit"]
