"""Operators refuse impossible requests with typed errors that name the node and say what to do."""

from __future__ import annotations

import re

import pytest
import torch
from graphgen import assert_unchanged, concat_net, mlp, randomize, residual, snapshot

from growth.errors import GraphError, OperatorError
from growth.graph import NetGraph
from growth.ops import apply_index, find_group, get_operator, net2deeper, net2wider, prune_units
from growth.ops.guards import check_size


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


# ---- the whole text of each refusal ----------------------------------------------------------
def _net(*layers: tuple, shape=(2, 3, 3)) -> NetGraph:
    """x of `shape`, then `layers` as (name, kind, inputs, attrs), then flatten -> fc -> out."""
    g = NetGraph()
    g.add_input("x", shape)
    for name, kind, inputs, attrs in layers:
        g.add(name, kind, inputs, **attrs)
    g.add("f", "flatten", [layers[-1][0]])
    g.add("fc", "linear", ["f"], out_features=2)
    g.add_output("out", "fc")
    return randomize(g, 0)


def conv(name: str, src: str, out: int, **attrs) -> tuple:
    return (name, "conv2d", [src], {"out_channels": out, "kernel_size": 1, **attrs})


REFUSALS = {
    "output-head": (lambda: net2wider(mlp(), "l2", 4),
                    "net2wider('l2'): cannot resize 'l2': its channels reach output head 'out' "
                    "(through 'l2'), so the network's output would change size; resize an inner "
                    "layer"),
    "no-units": (lambda: prune_units(mlp(), "r1", 1),
                 "prune_units('r1'): cannot resize 'r1': node 'r1' is a relu node, which has no "
                 "output units to resize; pick a linear or conv2d node"),
    "input-operand": (lambda: net2wider(_net(conv("c", "x", 2), ("s", "add", ["c", "x"], {}),
                                             shape=(2, 4, 4)), "c", 3),
                      "net2wider('c'): cannot resize 'c': its output meets, at add 's', the "
                      "network input 'x', whose channels cannot change with it; resize a layer "
                      "outside this group or give that operand a projection layer"),
    "shuffled-operand": (lambda: net2wider(_net(conv("c", "x", 2), conv("b", "x", 2),
                                                ("sh", "channel_shuffle", ["b"], {"groups": 2}),
                                                ("s", "add", ["c", "sh"], {})), "c", 3),
                         "net2wider('c'): cannot resize 'c': its output meets, at add 's', "
                         "channel_shuffle node 'sh', whose channels cannot change with it; resize "
                         "a layer outside this group or give that operand a projection layer"),
    "mixed-axes": (lambda: net2wider(_net(conv("a", "x", 4), ("t", "permute", ["x"],
                                                              {"dims": [1, 2, 0]}),
                                          ("l", "linear", ["t"], {"out_features": 4}),
                                          ("s", "add", ["a", "l"], {}), conv("p", "s", 2),
                                          shape=(4, 4, 4)), "a", 5),
                   "net2wider('a'): cannot resize 'a': its channels are split or merged with "
                   "another axis at 's' (add), where no mapping can follow them"),
    "mixed-layout-concat": (  # a (channels-first) and l (channels-last) stacked along W
        lambda: net2wider(_net(conv("a", "x", 4), ("t", "permute", ["x"], {"dims": [1, 2, 0]}),
                               ("l", "linear", ["t"], {"out_features": 4}),
                               ("cat", "concat", ["a", "l"], {"dim": 2}),
                               ("xx", "concat", ["x", "x"], {"dim": 2}), conv("c", "xx", 4),
                               ("s", "add", ["c", "cat"], {}), shape=(4, 4, 4)), "c", 5),
        "net2wider('c'): cannot resize 'c': its channels are split or merged with another axis "
        "at 'cat' (concat), where no mapping can follow them"),
    "grouped-after-concat": (
        lambda: net2wider(_net(conv("a", "x", 2), conv("b", "x", 2),
                               ("cat", "concat", ["a", "b"], {}), conv("gc", "cat", 4, groups=2)),
                          "a", 3),
        "net2wider('a'): cannot resize 'a': its channels reach grouped convolution 'gc' after a "
        "concat, flatten or channel expansion, so its groups could not stay whole"),
    "grouped-itself": (
        lambda: net2wider(_net(conv("a", "x", 4), conv("gc", "a", 4, groups=2)), "gc", 6),
        "net2wider('gc'): cannot resize 'gc': 'gc' is a grouped convolution (groups=2): its "
        "channels follow its input's groups; resize the layer that produces 'a' instead, and its "
        "groups grow with it"),
    "depthwise-itself": (
        lambda: prune_units(_net(conv("a", "x", 2), conv("dw", "a", 2, groups=2)), "dw", 1),
        "prune_units('dw'): cannot resize 'dw': 'dw' is a depthwise convolution (groups=2): its "
        "channels follow its input's groups; resize the layer that produces 'a' instead, and its "
        "groups grow with it"),
    "grouped-channels-last": (
        lambda: net2wider(_net(("t", "permute", ["x"], {"dims": [1, 2, 0]}),
                               ("l", "linear", ["t"], {"out_features": 4}),
                               conv("dw", "l", 4, groups=4), shape=(4, 4, 4)), "l", 5),
        "net2wider('l'): cannot resize 'l': conv2d 'dw': a grouped convolution reads channels "
        "along axis 0, but the channels lie along another axis there"),
    "linear-on-maps": (
        lambda: net2wider(_net(conv("c", "x", 2), ("l", "linear", ["c"], {"out_features": 4})),
                          "c", 3),
        "net2wider('c'): cannot resize 'c': node 'l' (in the channel group of 'c') is a linear "
        "layer reading the last axis of a (2, 3, 3) input whose channels lie along axis 0; "
        "insert a flatten before it to resize its channels"),
    # 'p1' reads its group partner 'p2' (they meet at the add) along W: the refused layer is
    # the resized node itself, named plainly
    "linear-reading-its-partner": (
        lambda: net2wider(_net(conv("p2", "x", 3), ("p1", "linear", ["p2"], {"out_features": 3}),
                               ("s", "add", ["p1", "p2"], {})), "p1", 4),
        "net2wider('p1'): cannot resize 'p1': node 'p1' is a linear layer reading the last axis "
        "of a (3, 3, 3) input whose channels lie along axis 0; insert a flatten before it to "
        "resize its channels"),
    "conv-on-tokens": (
        lambda: net2wider(_net(("l", "linear", ["x"], {"out_features": 3}), conv("c", "l", 2),
                               shape=(3, 3, 2)), "l", 4),
        "net2wider('l'): cannot resize 'l': node 'c' (in the channel group of 'l') is a "
        "convolution reading axis 0 of a (3, 3, 3) input whose channels lie along axis 2"),
    "bn-on-tokens": (
        lambda: net2wider(_net(("l", "linear", ["x"], {"out_features": 3}),
                               ("bn", "batchnorm2d", ["l"], {}), shape=(3, 3, 2)), "l", 4),
        "net2wider('l'): cannot resize 'l': batchnorm2d 'bn': batchnorm2d works on channels "
        "along axis 0, but the channels lie along another axis there"),
    "shuffle": (
        lambda: net2wider(_net(conv("a", "x", 4), ("sh", "channel_shuffle", ["a"],
                                                   {"groups": 2})), "a", 6),
        "net2wider('a'): cannot resize 'a': its channels reach channel_shuffle 'sh', which "
        "interleaves the channels of its groups; copies of a channel would land in other groups"),
    "attention": (
        lambda: net2wider(_net(("l", "linear", ["x"], {"out_features": 4}),
                               ("at", "self_attention", ["l"], {"embed_dim": 4, "num_heads": 2}),
                               shape=(3, 2)), "l", 6),
        "net2wider('l'): cannot resize 'l': self_attention 'at' reads and writes one width "
        "(embed_dim), but only its input is in this group"),
    "window-attention": (
        lambda: net2wider(_net(("l", "linear", ["x"], {"out_features": 4}),
                               ("at", "window_attention", ["l"], {
                                   "dim": 4, "window_size": [2, 2], "shift_size": [0, 0],
                                   "num_heads": 2}), shape=(2, 2, 3)), "l", 6),
        "net2wider('l'): cannot resize 'l': its channels reach window_attention 'at', which "
        "mixes all features of a token (heads split them), so copied units would change its "
        "output; resize layers inside its MLP instead"),
    "deeper-head": (lambda: net2deeper(mlp(), "out"),
                    "net2deeper: 'out' is an output head; deepen after the node it reads ('l2') "
                    "instead"),
    "deeper-kernel": (lambda: net2deeper(mlp(), "r1", kernel_size=2),
                      "net2deeper after 'r1': kernel_size must be a positive odd int (an "
                      "identity needs a centre tap), got 2; use 1, 3 or 5"),
    "deeper-activation": (lambda: net2deeper(mlp(), "r1", activation="gelu"),
                          "net2deeper after 'r1': activation must be one of ('auto', 'relu', "
                          "'none'), got 'gelu'"),
    "deeper-map": (lambda: net2deeper(residual(), "gap", kernel_size=3),
                   "net2deeper after 'gap': kernel_size 3 is larger than its 1x1 map; use "
                   "kernel_size <= 1"),
    "deeper-no-sample": (lambda: net2deeper(mlp(), "r1", batchnorm=True),
                         "net2deeper after 'r1': batchnorm=True needs `sample`, a batch of "
                         "network inputs, to set the new BatchNorm's statistics"),
    "deeper-sample-shape": (lambda: net2deeper(mlp(), "r1", batchnorm=True,
                                               sample=torch.zeros(4, 3)),
                            "net2deeper after 'r1': sample has shape (4, 3); expected a batch "
                            "of inputs (B, 2)"),
    "deeper-meta-sample": (lambda: net2deeper(mlp(), "r1", batchnorm=True,
                                              sample=torch.zeros(4, 2, device="meta")),
                           "net2deeper after 'r1': sample is on the meta device and holds no "
                           "values; pass a batch of real inputs (on any device)"),
    "deeper-relu": (lambda: net2deeper(mlp(), "l1", activation="relu"),
                    "net2deeper after 'l1' (linear): a ReLU here would clip its negative "
                    "outputs, so the new block could not be an identity; deepen after a relu node "
                    "or use activation='none' (or 'auto')"),
    "deeper-size": (lambda: net2deeper(mlp(), "r1", max_new_params=5),  # 3 x 3 + 3 on vectors
                    "net2deeper after 'r1' (kernel_size=3) would add 12 parameters, over the "
                    "limit of 5; pass max_new_params=12 (or None) to allow it, or pick a smaller "
                    "change"),
    "deeper-axis": (lambda: net2deeper(_net(("t", "permute", ["x"], {"dims": [2, 0, 1]}),
                                            shape=(3, 4, 2)), "t"),
                    "net2deeper after 't': its output has shape (2, 3, 4) with the features "
                    "along axis 1; an identity layer needs channels-first images (C, H, W) or "
                    "features on the last axis (vectors, tokens, channels-last maps)"),
    "wider-size": (lambda: net2wider(mlp(), "l1", 5, max_new_params=5),  # 2 rows of 3, 2 cols
                   "net2wider('l1', width=5) would add 10 parameters, over the limit of 5; pass "
                   "max_new_params=10 (or None) to allow it, or pick a smaller change"),
    "wider-limit": (lambda: net2wider(mlp(), "l1", 5, max_new_params=-1),
                    "net2wider('l1', width=5): max_new_params must be a non-negative int or "
                    "None, got -1"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_each_refusal_reads_in_full(case: str) -> None:
    call, message = REFUSALS[case]
    with pytest.raises(OperatorError) as info:
        call()
    assert str(info.value) == message


def test_the_size_guard_takes_a_non_negative_int_or_none() -> None:
    check_size("op", 0, 0)  # nothing added fits any limit, 0 included
    check_size("op", 7, 7)
    check_size("op", 10**12, None)
    with pytest.raises(OperatorError) as info:
        check_size("op", 8, 7)
    assert str(info.value) == ("op would add 8 parameters, over the limit of 7; pass "
                               "max_new_params=8 (or None) to allow it, or pick a smaller change")
    for limit in (True, 1.5, 7.0, "10", -1):
        with pytest.raises(OperatorError) as info:
            check_size("op", 0, limit)
        assert str(info.value) == ("op: max_new_params must be a non-negative int or None, got "
                                   f"{limit!r}")


@pytest.mark.parametrize("limit", ["10", 100.5, True, -1])
def test_widening_refuses_a_malformed_size_limit_whatever_the_change(limit) -> None:
    for width in (5, 3):  # 3: no change at all
        with pytest.raises(OperatorError) as info:
            net2wider(mlp(), "l1", width, max_new_params=limit)
        assert str(info.value) == (f"net2wider('l1', width={width}): max_new_params must be a "
                                   f"non-negative int or None, got {limit!r}")


def test_find_group_names_the_generic_resize_by_default() -> None:
    with pytest.raises(OperatorError) as info:
        find_group(mlp(), "l2")
    assert str(info.value).startswith("resize('l2'): cannot resize 'l2': its channels reach "
                                      "output head 'out'")


@pytest.mark.parametrize("width", [5.0, True, "5"])
def test_widening_needs_an_int_width(width) -> None:
    with raises(OperatorError, "net2wider('l1')", "width must be an int", repr(width)):
        net2wider(mlp(), "l1", width)


@pytest.mark.parametrize("k", [True, 3.0])
def test_deepening_needs_an_int_kernel(k) -> None:
    with raises(OperatorError, "'r1'", "kernel_size must be a positive odd int", repr(k)):
        net2deeper(residual(), "r1", kernel_size=k)


def test_an_index_that_splits_the_groups_of_a_grouped_conv_is_refused() -> None:
    g = _net(conv("c", "x", 4), conv("gc", "c", 4, groups=2), shape=(2, 3, 3))
    out = g.copy()
    with raises(OperatorError, "does not keep whole groups of 2 channels", "'gc'"):
        apply_index(out, find_group(out, "c"), torch.tensor([0, 1, 2, 3, 1, 0]))
    with raises(OperatorError, "does not keep whole groups of 2 channels", "'gc'"):
        apply_index(out, find_group(out, "c"), torch.tensor([0, 1, 2, 3, 2, 2]))


def test_widening_without_a_limit_and_with_a_zero_limit() -> None:
    """None lifts the limit (the same widening as under the default one); 0 lets a no-op
    widening through, since it adds nothing, and refuses any real one."""
    free = net2wider(mlp(), "l1", 5, max_new_params=None)
    capped = net2wider(mlp(), "l1", 5)
    assert free.graph.node("l1").tensors["weight"].shape[0] == 5
    for key in ("weight", "bias"):
        assert torch.equal(free.graph.node("l1").tensors[key], capped.graph.node("l1").tensors[key])
    same = net2wider(mlp(), "l1", 3, max_new_params=0)
    assert same.record.op == "net2wider" and same.record.params["width"] == 3
    with raises(OperatorError, "net2wider('l1', width=5) would add", "over the limit of 0"):
        net2wider(mlp(), "l1", 5, max_new_params=0)
