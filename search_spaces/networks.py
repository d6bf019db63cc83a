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


__all__ = ["BENCHMARKS", "FEATURES", "add_head", "benchmark_network", "mlp", "small_cnn"]
