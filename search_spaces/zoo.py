"""Base networks imported from torch modules: torchvision's classification architectures by
name, or a user's own module (`module_trunk`, for `model: {kind: python, factory: ...}`).

`torchvision_trunk("resnet18", (3, 64, 64))` builds the architecture (no download: weights come
only from a local file, for pretrained starts), imports it with `growth.trace.import_module`,
and replaces its classifier, the last linear layer, by an identity node named "features", where
a campaign puts one head per task (`growth.search_spaces.networks.add_head`). Whatever precedes that
layer (VGG's hidden classifier layers, dropout) stays in the trunk.

Inputs with another number of channels than the architecture's (1-channel digits or MNIST for
an RGB network) are accepted by adapting the first convolution: each of its filters becomes the
sum over its RGB input channels divided by the new channel count, repeated once per input
channel, so an image whose channels are all equal gives the output the original network gives
on that grey image repeated over RGB.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from growth.search_spaces.networks import FEATURES
from torch import nn

from growth.errors import ConfigError, GraphError
from growth.graph import NetGraph


def classification_models() -> list[str]:
    """Names of torchvision's classification architectures (`torchvision.models`)."""
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def build_model(arch: str, weights: str | Path | None = None) -> nn.Module:
    """torchvision's `arch` with fresh weights, or with those of a local state-dict file."""
    import torchvision

    names = classification_models()
    if arch not in names:
        near = [n for n in names if arch.lower()[:4] in n][:8]
        hint = f"; similar: {near}" if near else ""
        raise ConfigError(f"model.arch: {arch!r} is not a torchvision classification "
                          f"architecture{hint}; see torchvision.models.list_models()")
    model = torchvision.models.get_model(arch, weights=None)
    if weights is not None:
        load_weights(model, Path(weights), arch)
    return model.eval()


def load_weights(model: nn.Module, path: Path, arch: str) -> None:
    """Load a state dict (.safetensors, or a torch file holding one, possibly under "state_dict"
    or "model") into `model`; every mismatch is a ConfigError naming the file."""
    if not path.is_file():
        raise ConfigError(f"model.weights: {path} not found; give the path of a local weights "
                          f"file for {arch} (nothing is downloaded)")
    try:
        if path.suffix == ".safetensors":
            from growth.io import load_tensors

            state: Any = load_tensors(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types on a foreign or corrupt file
        raise ConfigError(f"model.weights: cannot read {path}: {type(exc).__name__}: {exc}"
                          ) from None
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise ConfigError(f"model.weights: {path} does not hold a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = [f"{what} {keys[:4]}{' ...' if len(keys) > 4 else ''}" for what, keys in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                 if keys]
        raise ConfigError(f"model.weights: {path} does not fit {arch}: {'; '.join(parts)}")
    model.load_state_dict(state)


def torchvision_trunk(arch: str, input_shape: tuple[int, ...],
                      weights: str | Path | None = None) -> NetGraph:
    """The architecture as a trunk ending at "features" (its classifier removed)."""
    from growth.trace import import_module

    if len(input_shape) != 3:
        raise ConfigError(f"model.kind: torchvision needs image inputs (C, H, W); the data "
                          f"gives {tuple(input_shape)}")
    model = build_model(arch, weights)
    stem = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = stem.in_channels if stem is not None else input_shape[0]
    graph = import_module(model, (channels, *input_shape[1:]))
    if channels != input_shape[0]:
        graph = _adapt_input(graph, input_shape[0])
    return _cut_classifier(graph, arch)


def _adapt_input(graph: NetGraph, channels: int) -> NetGraph:
    """The same graph reading `channels` input channels (see the module docstring)."""
    data = graph.to_dict()
    tensors = graph.named_tensors()
    inp = graph.input_node()
    for item in data["nodes"]:
        if item["name"] == inp:
            item["attrs"]["shape"] = [channels, *item["attrs"]["shape"][1:]]
        elif inp in item["inputs"]:
            if item["kind"] != "conv2d" or item["attrs"].get("groups", 1) != 1:
                raise GraphError(f"cannot adapt {item['name']!r} ({item['kind']}) to "
                                 f"{channels} input channels; give the data the network's "
                                 "channels")
            key = f"{item['name']}.weight"
            w = tensors[key]
            grey = w.sum(1, keepdim=True) / channels
            tensors[key] = grey.repeat(1, channels, 1, 1).contiguous()
            item["attrs"]["in_channels"] = channels
    return NetGraph.from_dict(data, tensors)


def _cut_classifier(graph: NetGraph, arch: str) -> NetGraph:
    heads = graph.heads
    if len(heads) != 1:
        raise GraphError(f"{arch} has {len(heads)} outputs {heads}; a base network needs one")
    head = heads[0]
    last = graph.inputs(head)[0]
    if graph.node(last).kind != "linear":
        raise GraphError(f"{arch} ends in {last!r} ({graph.node(last).kind}), not a linear "
                         "classifier that per-task heads can replace; pick an architecture "
                         "whose last layer is nn.Linear (resnet*, vgg*, alexnet, ...)")
    if FEATURES in graph:
        raise GraphError(f"{arch} already has a node named {FEATURES!r}")
    source = graph.inputs(last)[0]
    out = graph.copy()
    out.remove(head)
    out.remove(last)
    out.add(FEATURES, "identity", [source])
    return out


def module_trunk(model: nn.Module, input_shape: tuple[int, ...], output: str = "features",
                 name: str = "the model") -> NetGraph:
    """A user's torch module as a trunk ending at "features": its output is the features the
    heads read (`output="features"`), or its last layer is a linear classifier that the heads
    replace (`output="classifier"`). Imported with `growth.trace.import_module`, so the
    trunk computes what the module computes."""
    from growth.trace import import_module

    if not isinstance(model, nn.Module):
        raise ConfigError(f"{name} returned {type(model).__name__}, not a torch.nn.Module")
    graph = import_module(model.eval(), tuple(input_shape))
    if output == "classifier":
        return _cut_classifier(graph, name)
    heads = graph.heads
    if len(heads) != 1:
        raise GraphError(f"{name} has {len(heads)} outputs {heads}; a base network needs one")
    if FEATURES in graph:
        raise GraphError(f"{name} already has a node named {FEATURES!r}")
    source = graph.inputs(heads[0])[0]
    out = graph.copy()
    out.remove(heads[0])
    out.add(FEATURES, "identity", [source])
    return out


__all__ = ["build_model", "classification_models", "load_weights", "module_trunk",
           "torchvision_trunk"]
