"""Layers whose output depends on the mode (dropout, BatchNorm) compile to what torch computes
in that mode: dropout draws its mask in training and is the identity in evaluation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from growth.search_spaces.networks import mlp

from growth.compile import compile_graph
from growth.graph import NetGraph


def dropout_net(kind: str, p: float, shape: tuple[int, ...]) -> NetGraph:
    g = NetGraph()
    g.add_input("x", list(shape))
    g.add("drop", kind, ["x"], p=p)
    g.add_output("out", "drop")
    return g


@pytest.mark.parametrize("kind,shape,fn", [("dropout", (64,), F.dropout),
                                           ("dropout2d", (8, 3, 3), F.dropout2d)])
def test_dropout_draws_its_mask_in_training_and_passes_inputs_in_evaluation(kind, shape, fn):
    net = compile_graph(dropout_net(kind, 0.5, shape))
    x = torch.rand(4, *shape) + 1.0  # no zero inputs: a zero in the output is dropped
    net.train()
    torch.manual_seed(11)
    got = net(x)
    torch.manual_seed(11)
    expect = fn(x, 0.5, training=True)
    assert torch.equal(got, expect)
    dropped = (got == 0).float().mean()
    assert 0.2 < float(dropped) < 0.8
    torch.testing.assert_close(got[got != 0], 2 * x[got != 0])  # kept values scaled by 1/(1-p)
    net.eval()
    assert torch.equal(net(x), x)


def test_an_mlp_with_dropout_differs_between_two_training_passes_only():
    torch.manual_seed(0)
    g = mlp((6,), [32], dropout=0.5)
    g.add("head", "linear", ["features"], out_features=3)
    g.add_output("out", "head")
    net = compile_graph(g)
    x = torch.randn(5, 6)
    net.train()
    assert not torch.equal(net(x), net(x))
    net.eval()
    assert torch.equal(net(x), net(x))
    kinds = [g.node(n).kind for n in g.topo_order()]
    assert "dropout" in kinds
