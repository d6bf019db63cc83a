"""Growth operators on imported torchvision networks keep the function (eval mode)."""

from __future__ import annotations

import pytest
import torch
from graphgen import max_rel_error, outputs, single_thread  # noqa: F401 (fixture)

from growth.graph import NetGraph
from growth.ops import find_group, net2deeper, net2wider

torchvision = pytest.importorskip("torchvision")
trace = pytest.importorskip("growth.trace")
pytestmark = pytest.mark.usefixtures("single_thread")
TOL = 1e-5


def _randomize_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BN statistics, so a wrongly gathered BN tensor shows in the output."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def resnet() -> tuple[torch.nn.Module, NetGraph, torch.Tensor]:
    torch.manual_seed(0)
    model = _randomize_bn(torchvision.models.resnet18(weights=None))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return model, trace.import_module(model, (3, 32, 32)), x


def _check(model: torch.nn.Module, graph: NetGraph, x: torch.Tensor) -> None:
    with torch.no_grad():
        want = {graph.heads[0]: model(x)}
    assert max_rel_error(want, outputs(graph, x)) <= TOL


def test_imported_resnet_matches_its_module(resnet) -> None:
    _check(*resnet)


def test_resnet_widen_inner_conv_of_a_block(resnet) -> None:
    model, graph, x = resnet
    assert find_group(graph, "layer1_0_conv1").producers == ("layer1_0_conv1",)
    result = net2wider(graph, "layer1_0_conv1", 80, seed=1)
    assert result.graph.shape("layer1_0_conv1")[0] == 80
    _check(model, result.graph, x)


def test_resnet_widen_conv2_widens_its_residual_group(resnet) -> None:
    model, graph, x = resnet
    group = find_group(graph, "layer2_0_conv2")
    assert set(group.producers) == {"layer2_0_conv2", "layer2_0_downsample_0", "layer2_1_conv2"}
    result = net2wider(graph, "layer2_0_conv2", 150, seed=2)
    for p in group.producers:
        assert result.graph.shape(p)[0] == 150
    assert result.graph.node("layer3_0_downsample_0").attrs["in_channels"] == 150
    _check(model, result.graph, x)


@pytest.mark.parametrize("after,bn", [("layer2_0_relu", False), ("layer1_1_relu_1", True)])
def test_resnet_deepen_after_a_relu(resnet, after: str, bn: bool) -> None:
    model, graph, x = resnet
    result = net2deeper(graph, after, kernel_size=3, batchnorm=bn, sample=x)
    assert result.record.added_nodes[-1] == f"{after}_deep1_relu"
    _check(model, result.graph, x)


def test_resnet_chain_of_operators(resnet) -> None:
    model, graph, x = resnet
    g = net2wider(graph, "layer1_1_conv2", 72, seed=3).graph
    deeper = net2deeper(g, "layer3_0_relu", kernel_size=1)
    g = net2wider(deeper.graph, deeper.record.added_nodes[0], 260, seed=4).graph
    g = net2wider(g, "layer3_0_conv2", 300, seed=5).graph
    _check(model, g, x)


@pytest.mark.slow
def test_vgg11_bn_widen_and_deepen() -> None:
    torch.manual_seed(0)
    model = _randomize_bn(torchvision.models.vgg11_bn(weights=None))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    graph = trace.import_module(model, (3, 32, 32))
    convs = [n for n in graph.topo_order() if graph.node(n).kind == "conv2d"]
    relus = [n for n in graph.topo_order() if graph.node(n).kind == "relu"]
    g = net2wider(graph, convs[0], 80, seed=1).graph
    g = net2wider(g, convs[2], 300, seed=2).graph
    g = net2deeper(g, relus[1], kernel_size=3, batchnorm=True, sample=x).graph
    _check(model, g, x)
