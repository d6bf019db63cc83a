"""torchvision's classification families: import equals the module, growth keeps the function.

Each family is built from torchvision's own classes at a small configuration (the same code
paths as the full builders, seconds instead of minutes); the full builders run in the slow
test at the end. Chains of operators run in float64, so any error above float noise is a real
change of the function, measured against the output's input-dependent scale (how much the
outputs differ between inputs): a network whose output barely depends on its input would
hide any error, so BatchNorm statistics are first set from a batch (calibrated) and zero-init
layers re-initialised.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import torch
import torchvision.models as tvm
from graphgen import single_thread  # noqa: F401 (fixture)
from torch import nn
from torchvision.models import convnext, efficientnet, maxvit, mobilenetv3, regnet, resnet
from torchvision.models import swin_transformer as swin

from growth.compile import compile_graph
from growth.graph import NetGraph
from growth.ops import deepenable, feature_axes, find_group, net2deeper, net2wider, resizable
from growth.trace import import_module

pytestmark = pytest.mark.usefixtures("single_thread")
TOL = 1e-5


def _resnext() -> nn.Module:
    down = nn.Sequential(resnet.conv1x1(16, 32, 2), nn.BatchNorm2d(32))
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        resnet.Bottleneck(16, 4, groups=2, base_width=64),
        resnet.Bottleneck(16, 8, stride=2, downsample=down, groups=4, base_width=32),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def _efficientnet_v2() -> nn.Module:
    setting = [efficientnet.FusedMBConvConfig(1, 3, 1, 8, 8, 1),
               efficientnet.FusedMBConvConfig(4, 3, 2, 8, 16, 1),
               efficientnet.MBConvConfig(4, 3, 2, 16, 24, 2)]
    return efficientnet.EfficientNet(setting, 0.2, 0.2, num_classes=10, last_channel=64)


def _swin(v2: bool) -> nn.Module:
    extra = {"block": swin.SwinTransformerBlockV2, "downsample_layer": swin.PatchMergingV2} \
        if v2 else {}
    return swin.SwinTransformer([4, 4], 8, [2, 1], [1, 2], [2, 2], stochastic_depth_prob=0.1,
                                num_classes=10, **extra)


# name -> (builder, what a widening must pass through, where a deepening goes)
FAMILIES: dict[str, tuple[Callable[[], nn.Module], str, str]] = {
    "resnext": (_resnext, "grouped", "relu"),
    "densenet": (lambda: tvm.DenseNet(8, (2, 2), 16, 2, num_classes=10), "concat", "relu"),
    "mobilenet_v2": (lambda: tvm.MobileNetV2(10, 0.25, [[1, 16, 1, 1], [6, 24, 2, 2],
                                                        [6, 32, 1, 2]]), "depthwise", "depthwise"),
    "mobilenet_v3": (lambda: tvm.MobileNetV3(*mobilenetv3._mobilenet_v3_conf(
        "mobilenet_v3_small", width_mult=0.25), num_classes=10), "mul", "depthwise"),
    "efficientnet": (lambda: tvm.EfficientNet(
        [efficientnet.MBConvConfig(1, 3, 1, 16, 8, 1), efficientnet.MBConvConfig(4, 3, 2, 8, 16, 2),
         efficientnet.MBConvConfig(4, 5, 2, 16, 24, 1)], 0.2, 0.2, num_classes=10), "mul",
        "depthwise"),
    "efficientnet_v2": (_efficientnet_v2, "stochastic_depth", "silu"),
    "mnasnet": (lambda: tvm.MNASNet(0.25, num_classes=10), "depthwise", "depthwise"),
    "regnet": (lambda: tvm.RegNet(regnet.BlockParams.from_init_params(
        depth=3, w_0=8, w_a=8.0, w_m=2.0, group_width=4, se_ratio=0.25), num_classes=10,
        stem_width=8), "mul", "relu"),
    "shufflenet": (lambda: tvm.ShuffleNetV2([2, 1, 1], [8, 16, 32, 64, 128], num_classes=10),
                   "depthwise", "depthwise"),
    "squeezenet": (lambda: tvm.squeezenet1_1(num_classes=10), "concat", "relu"),
    "convnext": (lambda: tvm.ConvNeXt([convnext.CNBlockConfig(8, 16, 2),
                                       convnext.CNBlockConfig(16, None, 1)], 0.1, 0.5,
                                      num_classes=10), "gelu", "tokens"),
    "vit": (lambda: tvm.VisionTransformer(32, 8, 2, 2, 16, 32, num_classes=10), "gelu",
            "tokens"),
    "swin": (lambda: _swin(False), "gelu", "tokens"),
    "swin_v2": (lambda: _swin(True), "gelu", "tokens"),
    "maxvit": (lambda: maxvit.MaxVit((32, 32), 8, 2, [8, 16], [1, 1], 4, 0.1, num_classes=10),
               "mul", "tokens"),
}


def calibrated(model: nn.Module, size: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Re-initialise all-zero layers and set BN statistics from one batch, so the output
    depends on the input clearly (otherwise every error would look small, or huge)."""
    torch.manual_seed(0)
    model = model.to(dtype)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and not m.weight.any():
                nn.init.normal_(m.weight, std=m.weight[0].numel() ** -0.5)
        model.eval()  # auxiliary heads and dropout stay off; BN takes this batch's statistics
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = 1.0
                m.train()
        model(torch.randn(8, 3, size, size, dtype=dtype))
    return model.eval()


def _inputs(size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=dtype)


def spread(y: torch.Tensor) -> float:
    """The output's input-dependent scale: how far outputs stray from their batch mean."""
    return float((y - y.mean(0)).abs().max())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_import_is_bit_identical_and_survives_save_and_load(family: str) -> None:
    model = calibrated(FAMILIES[family][0](), 32)
    graph = import_module(model, (3, 32, 32))
    x = _inputs(32)
    with torch.no_grad():
        want = model(x)
        assert torch.equal(compile_graph(graph).eval()(x), want)
        back = NetGraph.from_dict(graph.to_dict(), graph.named_tensors())
        assert torch.equal(compile_graph(back).eval()(x), want)
    assert spread(want) > 1e-3 * float(want.abs().max())  # the check above means something
    assert graph.param_count() == sum(p.numel() for p in model.parameters())


def _touched(graph: NetGraph, node: str) -> set[str]:
    """Kinds a widening of `node` passes through ('depthwise' and 'grouped' convs apart)."""
    group = find_group(graph, node)
    kinds = set()
    for n in (*group.region, *group.producers):
        kind = graph.node(n).kind
        groups = graph.node(n).attrs.get("groups", 1)
        if kind == "conv2d" and groups > 1:
            kind = "depthwise" if groups == graph.node(n).attrs["in_channels"] else "grouped"
        kinds.add(kind)
    return kinds


def _deepen_target(graph: NetGraph, where: str, rng: random.Random) -> str:
    axes, shapes = feature_axes(graph), graph.shapes()
    if where == "tokens":
        found = [n for n in deepenable(graph) if axes[n] == len(shapes[n]) - 1
                 and len(shapes[n]) >= 2]
    elif where == "depthwise":
        found = [n for n in deepenable(graph) if graph.node(n).kind == "conv2d"
                 and graph.node(n).attrs["groups"] > 1]
    else:
        found = [n for n in deepenable(graph) if graph.node(n).kind == where]
    assert found, f"no deepening target of kind {where}"
    return rng.choice(found)


def grow(graph: NetGraph, family: str, steps: int, seed: int) -> tuple[NetGraph, list[str]]:
    """A widening through the family's special node, a deepening inside its blocks, then
    random exact widenings and deepenings of eligible nodes."""
    rng = random.Random(seed)
    _, through, where = FAMILIES[family]
    special = [n for n in resizable(graph) if through in _touched(graph, n)]
    assert special, f"no resizable layer passes through {through}"
    log = []
    for step in range(steps):
        if step == 0 or (step > 1 and rng.random() < 0.5):
            node = rng.choice(special if step == 0 else resizable(graph))
            group = find_group(graph, node)  # grouped convs: whole groups at a time
            width = group.width + group.block * rng.randint(1, max(1, 5 // group.block))
            if group.tile is not None:  # a norm over the channels: whole copies of every unit
                width = 2 * group.width
            graph = net2wider(graph, node, width, seed=step).graph
            log.append(f"net2wider({node}, {width})")
        else:
            after = _deepen_target(graph, where, rng) if step == 1 else rng.choice(
                deepenable(graph))
            graph = net2deeper(graph, after, kernel_size=1).graph
            log.append(f"net2deeper({after})")
    return graph, log


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_random_growth_keeps_the_function(family: str) -> None:
    model = calibrated(FAMILIES[family][0](), 32, torch.float64)
    graph = import_module(model, (3, 32, 32))
    x = _inputs(32, torch.float64)
    grown, log = grow(graph, family, steps=6, seed=sum(map(ord, family)))
    with torch.no_grad():
        want, got = model(x), compile_graph(grown).eval()(x)
    assert grown.param_count() > graph.param_count()
    assert float((got - want).abs().max()) <= TOL * spread(want), log


FULL = {  # builder -> input size (the smallest each model comfortably allows)
    "resnet50": 64, "resnext50_32x4d": 64, "wide_resnet50_2": 64, "vgg11_bn": 32,
    "alexnet": 64, "squeezenet1_0": 64, "densenet121": 64, "googlenet": 64,
    "inception_v3": 75, "mobilenet_v2": 64, "mobilenet_v3_large": 64, "efficientnet_b0": 64,
    "efficientnet_v2_s": 64, "mnasnet1_0": 64, "regnet_x_400mf": 64, "regnet_y_400mf": 64,
    "shufflenet_v2_x1_0": 64, "convnext_tiny": 64, "vit_b_16": 32, "swin_t": 64,
    "swin_v2_t": 64, "maxvit_t": 224,
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FULL))
def test_full_builders_import_bit_identical_and_grow_exactly(name: str) -> None:
    size = FULL[name]
    extra = {"image_size": size} if name.startswith("vit") else {}
    model = calibrated(tvm.get_model(name, weights=None, **extra), size)
    graph = import_module(model, (3, size, size))
    x = _inputs(size)[:2]
    with torch.no_grad():
        assert torch.equal(compile_graph(graph).eval()(x), model(x))
    rng = random.Random(0)
    group = find_group(graph, rng.choice(resizable(graph)))
    width = 2 * group.width if group.tile is not None else group.width + group.block
    grown = net2wider(graph, group.node, width, seed=1, max_new_params=None).graph
    grown = net2deeper(grown, rng.choice(deepenable(grown)), kernel_size=1).graph
    with torch.no_grad():
        want, got = model(x), compile_graph(grown).eval()(x)
    assert float((got - want).abs().max()) <= 1e-4 * spread(want) + 1e-6 * float(
        want.abs().max())
