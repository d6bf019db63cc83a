"""Property tests: chains of exact growth operators preserve the function of random networks,
never change their input graph, and noisy widening stays within its documented bound."""

from __future__ import annotations

import pytest
import torch
from graphgen import (  # noqa: F401 (single_thread is a fixture)
    assert_unchanged,
    cnns,
    concat_nets,
    max_rel_error,
    mlps,
    multi_head_nets,
    networks,
    outputs,
    random_input,
    residual_nets,
    single_thread,
    snapshot,
)
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from growth.graph import NetGraph
from growth.ops import NOISE_BOUND, OpResult, deepenable, net2deeper, net2wider, resizable

TOL = 1e-5
FAST = settings(deadline=None, derandomize=True, max_examples=25,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


pytestmark = pytest.mark.usefixtures("single_thread")


def random_step(data: st.DataObject, graph: NetGraph, sample: torch.Tensor) -> OpResult:
    """One exact-mode widen or deepen on a node where it is valid."""
    widen = resizable(graph)
    if widen and data.draw(st.booleans(), label="widen"):
        node = data.draw(st.sampled_from(widen), label="widen node")
        width = graph.shape(node)[0] + data.draw(st.integers(1, 3), label="extra units")
        return net2wider(graph, node, width, seed=data.draw(st.integers(0, 99), label="seed"))
    after = data.draw(st.sampled_from(deepenable(graph)), label="deepen after")
    shape = graph.shape(after)
    kernels = [k for k in (1, 3, 5) if len(shape) == 1 or k <= min(shape[1:])]
    return net2deeper(graph, after, kernel_size=data.draw(st.sampled_from(kernels), label="k"),
                      batchnorm=data.draw(st.booleans(), label="bn"), sample=sample)


def check_chain(graph: NetGraph, data: st.DataObject, max_steps: int = 20) -> None:
    x = random_input(graph, batch=4, seed=1)
    before = outputs(graph, x)
    current = graph
    for _ in range(data.draw(st.integers(1, max_steps), label="steps")):
        snap = snapshot(current)
        result = random_step(data, current, x)
        assert_unchanged(current, snap)
        result.graph.validate()
        current = result.graph
    assert max_rel_error(before, outputs(current, x)) <= TOL


@FAST
@given(networks(), st.data())
def test_chains_of_exact_operators_preserve_any_network(graph: NetGraph, data) -> None:
    check_chain(graph, data)


@pytest.mark.parametrize("strategy", [mlps, cnns, residual_nets, concat_nets, multi_head_nets],
                         ids=lambda s: s.__name__)
def test_chains_preserve_each_network_family(strategy) -> None:
    @settings(FAST, max_examples=10)
    @given(strategy(), st.data())
    def run(graph: NetGraph, data) -> None:
        check_chain(graph, data, max_steps=8)

    run()


@FAST
@given(networks(), st.data(), st.sampled_from([1e-3, 1e-2, 1e-1]))
def test_noisy_widening_stays_within_documented_bound_and_breaks_symmetry(graph, data, noise):
    nodes = resizable(graph)
    assume(nodes)  # a network with nothing to widen is replaced, never counted as a pass
    node = data.draw(st.sampled_from(nodes))
    old = graph.shape(node)[0]
    x = random_input(graph, batch=8, seed=2)
    result = net2wider(graph, node, old + data.draw(st.integers(1, 4)), noise=noise, seed=3)
    assert max_rel_error(outputs(graph, x), outputs(result.graph, x)) <= NOISE_BOUND * noise
    exact = net2wider(graph, node, result.graph.shape(node)[0], seed=3).graph
    weight, copy = result.graph.node(node).tensors["weight"], exact.node(node).tensors["weight"]
    assert torch.equal(weight[:old], copy[:old]), "noise must leave the original units alone"
    new, twin = weight[old:], copy[old:]
    moved = (new != twin).flatten(1).any(1) | (twin == 0).flatten(1).all(1)
    assert bool(moved.all()), "every new copy must differ from the unit it copies"
