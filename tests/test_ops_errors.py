"""Operators refuse impossible requests with typed errors that name the node and say what to do."""

from __future__ import annotations

import re

import pytest
import torch
from graphgen import assert_unchanged, concat_net, mlp, randomize, residual, snapshot

from growth.errors import GraphError, OperatorError
from growth.graph import NetGraph
from growth.ops import get_operator, net2deeper, net2wider, prune_units


def raises(exc: type[Exception], *words: str):
    """pytest.raises whose message must contain every word (in any order)."""
    return pytest.raises(exc, match="".join(f"(?=[\\s\\S]*{re.escape(w)})" for w in words))


def test_widening_to_a_smaller_width_says_current_width_and_prune_units() -> None:
    with raises(OperatorError, "'l1'", "current width 5", "prune_units"):
        net2wider(mlp(hidden=5), "l1", 3)


def test_widening_a_layer_feeding_an_output_head_is_refused() -> None:
    with raises(OperatorError, "'l2'", "output head 'out'", "inner layer"):
        net2wider(mlp(), "l2", 4)


def test_widening_a_node_without_units_names_it() -> None:
    with raises(OperatorError, "'r1'", "relu", "linear or conv2d"):
        net2wider(mlp(), "r1", 4)


def test_widening_when_the_input_is_in_the_residual_group() -> None:
    g = NetGraph()
    g.add_input("x", (2, 4, 4))
    g.add("c", "conv2d", ["x"], out_channels=2, kernel_size=1)
    g.add("s", "add", ["c", "x"])
    g.add("f", "flatten", ["s"])
    g.add("fc", "linear", ["f"], out_features=2)
    g.add_output("out", "fc")
    with raises(OperatorError, "'c'", "network input 'x'", "projection"):
        net2wider(g, "c", 3)


def test_widening_when_a_concat_feeds_the_residual_group() -> None:
    g = concat_net()
    g.add("side", "conv2d", ["r"], out_channels=5, kernel_size=1)
    g.add("join", "add", ["side", "cat"])
    g.add("f2", "flatten", ["join"])
    g.add("fc2", "linear", ["f2"], out_features=2)
    g.add_output("out2", "fc2")
    with raises(OperatorError, "'side'", "concat node 'cat'"):
        net2wider(g, "side", 6)
    with raises(OperatorError, "'a'", "add 'join' after a concat"):
        net2wider(g, "a", 4)


def test_grouped_convolutions_change_in_whole_groups() -> None:
    g = NetGraph()
    g.add_input("x", (4, 4, 4))
    g.add("c", "conv2d", ["x"], out_channels=4, kernel_size=1)
    g.add("gc", "conv2d", ["c"], out_channels=4, kernel_size=3, padding=1, groups=2)
    g.add("f", "flatten", ["gc"])
    g.add("fc", "linear", ["f"], out_features=2)
    g.add_output("out", "fc")
    with raises(OperatorError, "net2wider('c')", "groups hold 2 channels", "steps of 2",
                "use width 6 or 8 instead of 7"):
        net2wider(g, "c", 7)
    with raises(OperatorError, "prune_units('c')", "steps of 2", "use width 2 or 4 instead of 3"):
        prune_units(g, "c", 3)
    with raises(OperatorError, "prune_units('gc')", "grouped convolution (groups=2)",
                "resize the layer that produces 'c' instead"):
        prune_units(g, "gc", 2)


def test_unknown_nodes_are_graph_errors_naming_them() -> None:
    g = mlp()
    for call in (lambda: net2wider(g, "nope", 4), lambda: net2deeper(g, "nope"),
                 lambda: prune_units(g, "nope", 1)):
        with raises(GraphError, "'nope'"):
            call()


def test_deepening_with_relu_after_a_non_relu_explains_why() -> None:
    with raises(OperatorError, "'l1'", "identity", "activation='none'"):
        net2deeper(mlp(), "l1", activation="relu")


def test_relu_is_allowed_after_pooled_relu_outputs() -> None:
    g = residual()
    result = net2deeper(g, "gap", kernel_size=1, activation="relu")
    assert result.record.added_nodes == ["gap_deep1", "gap_deep1_relu"]


@pytest.mark.parametrize("k", [2, 4, 0, -1])
def test_deepening_with_an_even_or_empty_kernel_is_refused(k: int) -> None:
    with raises(OperatorError, "'r1'", "odd", "1, 3 or 5"):
        net2deeper(residual(), "r1", kernel_size=k)


def test_deepening_with_a_kernel_larger_than_the_map() -> None:
    with raises(OperatorError, "'gap'", "1x1 map", "kernel_size <= 1"):
        net2deeper(residual(), "gap", kernel_size=3)


def test_deepening_after_an_output_head_points_to_its_source() -> None:
    with raises(OperatorError, "'out'", "output head", "'l2'"):
        net2deeper(mlp(), "out")


def test_batchnorm_deepening_needs_a_sample_of_the_right_shape() -> None:
    g = mlp()
    with raises(OperatorError, "'r1'", "sample"):
        net2deeper(g, "r1", batchnorm=True)
    with raises(OperatorError, "'r1'", "(B, 2)"):
        net2deeper(g, "r1", batchnorm=True, sample=torch.zeros(4, 3))


def test_unknown_activation() -> None:
    with raises(OperatorError, "'r1'", "'auto'"):
        net2deeper(mlp(), "r1", activation="gelu")


@pytest.mark.parametrize("keep", [0, 5, 7])
def test_prune_keep_out_of_range(keep: int) -> None:
    with raises(OperatorError, "'l1'", "1..4", "net2wider"):
        prune_units(mlp(hidden=5), "l1", keep)


def test_prune_scores_of_the_wrong_length() -> None:
    with raises(OperatorError, "'l1'", "(5,)"):
        prune_units(mlp(hidden=5), "l1", 2, scores=torch.ones(4))


def test_unknown_operator_lists_the_available_ones() -> None:
    with raises(OperatorError, "'grow_fast'", "net2wider", "net2deeper", "prune_units"):
        get_operator("grow_fast")


def test_a_refused_operator_leaves_the_graph_intact() -> None:
    g = randomize(mlp(hidden=5), 3)
    snap = snapshot(g)
    with pytest.raises(OperatorError):
        net2wider(g, "l1", 2)
    assert_unchanged(g, snap)


@pytest.mark.parametrize("keep", [True, 2.0, "2"])
def test_prune_keep_must_be_an_int(keep) -> None:
    with raises(OperatorError, "'l1'", "keep must be an int in 1..4", repr(keep)):
        prune_units(mlp(hidden=5), "l1", keep)


def test_a_flattened_space_meeting_its_own_mean_names_the_flatten_as_the_cause() -> None:
    """c's (3, 1, 1) maps reach `m` flattened (positions moved) and, through their mean, `m2`
    (plain, which brings v into the group): the walk back from `m` must not be what refuses."""
    g = NetGraph()
    g.add_input("x", (2, 1, 1))
    g.add("c", "conv2d", ["x"], out_channels=3, kernel_size=1)
    g.add("flat", "flatten", ["c"])
    g.add("z_avg", "mean", ["c"], dims=[1, 2])  # walked first: consumers pop in reverse
    g.add("xf", "flatten", ["x"])
    g.add("v", "linear", ["xf"], out_features=3)
    g.add("m2", "add", ["z_avg", "v"])
    g.add("vr", "relu", ["v"])
    g.add("m", "add", ["flat", "vr"])
    g.add("s", "add", ["m", "m2"])
    g.add("fc", "linear", ["s"], out_features=2)
    g.add_output("out", "fc")
    with pytest.raises(OperatorError) as info:
        net2wider(randomize(g, 1), "c", 4)
    assert str(info.value) == (
        "net2wider('c'): cannot resize 'c': its channels reach add 'm' after a concat or "
        "flatten, where the other operands would need a different mapping; resize a layer "
        "outside that path")
