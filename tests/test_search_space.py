"""Search spaces: layer tokens and blocks, what may widen and where a layer may go, limits,
children rebuilt from JSON actions, canonical architecture strings, declared specs."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from graphgen import max_rel_error, outputs, randomize, residual, single_thread  # noqa: F401
from growth.search_spaces import SearchSpace, arch_string, make_space
from growth.search_spaces.networks import (
    BENCHMARKS,
    add_head,
    benchmark_network,
    mlp,
    small_cnn,
    vit,
)

from growth.errors import ConfigError, GraphError, OperatorError
from growth.graph import NetGraph
from growth.ops import MAX_NEW_PARAMS, net2deeper, net2wider

pytestmark = pytest.mark.usefixtures("single_thread")

EXACT = {"noise": 0.0, "deeper_noise": 0.0}  # the exact mode: children keep the function


def _mlp() -> NetGraph:
    return randomize(add_head(mlp((6,), [5, 7]), "t0", 3), 0)


def _cnn() -> NetGraph:  # 8x8 -> conv1 8x8 -> pool 4x4 -> conv2 4x4 -> pool 2x2
    return randomize(add_head(small_cnn((1, 8, 8), [3, 4]), "t0", 3), 0)


def test_an_mlp_with_batchnorm_and_dropout_chains_its_blocks_in_order() -> None:
    """Each hidden block is fc{i} -> bn{i} -> act{i} -> drop{i}, each fed by the one before,
    the first by the input and "features" by the last."""
    g = mlp((4,), [3, 5], batchnorm=True, dropout=0.25)  # not the dropout kind's default 0.5
    chain = [(n["name"], n["kind"], n["inputs"]) for n in g.to_dict()["nodes"]]
    assert chain == [("x", "input", []), ("fc1", "linear", ["x"]),
                     ("bn1", "batchnorm1d", ["fc1"]), ("act1", "relu", ["bn1"]),
                     ("drop1", "dropout", ["act1"]), ("fc2", "linear", ["drop1"]),
                     ("bn2", "batchnorm1d", ["fc2"]), ("act2", "relu", ["bn2"]),
                     ("drop2", "dropout", ["act2"]), ("features", "identity", ["drop2"])]
    assert g.node("bn2").attrs["num_features"] == 5
    assert g.node("drop1").attrs["p"] == g.node("drop2").attrs["p"] == 0.25


# ---- layers as tokens -------------------------------------------------------------------------
def test_mlp_layers_are_fc_tokens_in_one_block_heads_excluded() -> None:
    space = SearchSpace()
    layers = space.layers(_mlp())
    assert [(x.node, x.kind, x.width, x.block, x.position, x.after) for x in layers] == [
        ("fc1", "fc", 5, 0, 0, "act1"), ("fc2", "fc", 7, 0, 1, "act2")]


def test_cnn_blocks_end_at_pools_and_tokens_encode_width_and_kernel() -> None:
    space = SearchSpace({"widths": {"conv": [4, 8], "fc": [16]}, "kernel_sizes": [1, 3]})
    layers = space.layers(_cnn())
    assert [(x.node, x.kind, x.block, x.position) for x in layers] == [
        ("conv1", "conv", 0, 0), ("pool1", "pool", 0, None),
        ("conv2", "conv", 1, 0), ("pool2", "pool", 1, None)]
    # conv: bucket (widths below) x kernel (index, or "other"); fc after; pool last
    # conv1 width 3 -> bucket 0, kernel 3 -> index 1; conv2 width 4 -> bucket 0 (4 is in list)
    assert space.tokens(layers) == [0 * 3 + 1, space.vocab_size - 1, 0 * 3 + 1,
                                    space.vocab_size - 1]
    assert space.vocab_size == 3 * 3 + 2 + 1
    wide = net2wider(_cnn(), "conv2", 5).graph  # 5 > 4: bucket 1
    assert space.tokens(space.layers(wide))[2] == 1 * 3 + 1


@pytest.mark.parametrize("stride", [2, [2, 1]])  # [2, 1]: only the height halves
def test_residual_stages_are_blocks_by_resolution(stride: int | list[int]) -> None:
    g = NetGraph()
    g.add_input("x", (2, 8, 8))
    g.add("c1", "conv2d", ["x"], out_channels=3, kernel_size=3, padding=1)
    g.add("r1", "relu", ["c1"])
    g.add("c2", "conv2d", ["r1"], out_channels=3, kernel_size=3, padding=1, stride=stride)
    g.add("r2", "relu", ["c2"])
    g.add("c3", "conv2d", ["r2"], out_channels=3, kernel_size=3, padding=1)
    g.add("flat", "flatten", ["c3"])
    g.add("fc", "linear", ["flat"], out_features=2)
    g.add_output("out", "fc")
    layers = SearchSpace().layers(g)
    assert [(x.node, x.block, x.position) for x in layers] == [("c1", 0, 0), ("c2", 1, 0),
                                                              ("c3", 1, 1)]


def test_a_pool_before_any_layer_does_not_end_an_empty_block() -> None:
    """x -> pool0 -> conv1 -> pool1 -> conv2: pool0 closes nothing (its block has no layer
    yet), so conv1 is block 0 and conv2, after pool1, block 1."""
    g = NetGraph()
    g.add_input("x", (1, 8, 8))
    g.add("pool0", "maxpool2d", ["x"], kernel_size=2)
    g.add("conv1", "conv2d", ["pool0"], out_channels=2, kernel_size=3, padding=1)
    g.add("act1", "relu", ["conv1"])
    g.add("pool1", "maxpool2d", ["act1"], kernel_size=2)
    g.add("conv2", "conv2d", ["pool1"], out_channels=2, kernel_size=3, padding=1)
    g.add("act2", "relu", ["conv2"])
    g.add("flat", "flatten", ["act2"])
    g.add("features", "identity", ["flat"])
    g = add_head(g, "t0", 2)
    assert [(x.node, x.block, x.position) for x in SearchSpace().layers(g)] == [
        ("pool0", 0, None), ("conv1", 0, 0), ("pool1", 0, None), ("conv2", 1, 0)]


# ---- what may widen ------------------------------------------------------------------------
def test_widening_follows_the_operators_check_and_jumps_to_the_next_width() -> None:
    g = residual()  # c0, c1, c2 form one residual group; inner is a plain layer
    space = SearchSpace({"widths": {"conv": [4, 6, 8], "fc": [16]}})
    layers = {x.node: x for x in space.layers(g)}
    assert space.widenable(g) == {"c0", "c1", "c2", "inner"}
    action = space.wider_option(g, layers["c0"])
    assert action == {"op": "net2wider", "node": "c0", "width": 6, "seed": 0}  # 4 -> next 6
    # widening c0 widened its whole group: c2 now jumps from 6 to 8, not from 4 to 6
    g6 = space.step(g, action)
    assert space.wider_option(g6, layers["c2"])["width"] == 8
    g8 = space.step(g6, space.wider_option(g6, layers["c2"]))
    assert space.wider_option(g8, layers["c1"]) is None  # at the end of the width list
    assert space.wider_option(g, layers["gap"]) is None  # pools never widen


def test_layers_the_operators_cannot_resize_are_not_offered() -> None:
    g = NetGraph()  # a residual add with the network input: the group cannot change
    g.add_input("x", (2, 4, 4))
    g.add("c", "conv2d", ["x"], out_channels=2, kernel_size=1)
    g.add("a", "add", ["c", "x"])
    g.add("c2", "conv2d", ["a"], out_channels=3, kernel_size=1)
    g.add("r", "relu", ["c2"])
    g.add("flat", "flatten", ["r"])
    g.add("fc", "linear", ["flat"], out_features=2)
    g.add_output("out", "fc")
    space = SearchSpace()
    layers = {x.node: x for x in space.layers(g)}
    with pytest.raises(OperatorError):
        net2wider(g, "c", 4)
    assert space.wider_option(g, layers["c"]) is None
    assert space.wider_option(g, layers["c2"]) is not None


def test_excluded_and_per_layer_widths() -> None:
    g = _mlp()
    space = make_space({"exclude": ["fc1"], "layer_widths": {"fc2": [9, 30]}}, g)
    layers = {x.node: x for x in space.layers(g)}
    assert space.wider_option(g, layers["fc1"]) is None
    assert space.wider_option(g, layers["fc2"])["width"] == 9
    assert all(o.action["after"] != "act1" for o in space.deeper_options(g))


def test_the_callers_widenable_set_decides_what_may_widen() -> None:
    """A controller passes the set it read once (`widenable`): a layer outside it is not
    offered, by the width list or by a count, though the graph could widen it."""
    g = _mlp()  # 6 -> fc1 5 -> fc2 7 -> head 3
    space = SearchSpace()
    fc1, _ = space.layers(g)
    assert space.wider_options(g, fc1) == [{"op": "net2wider", "node": "fc1", "width": 64,
                                            "seed": 0}]
    assert space.wider_options(g, fc1, widenable={"fc2"}) == []
    assert space.widen_by(g, fc1, 2) is not None
    assert space.widen_by(g, fc1, 2, widenable={"fc2"}) is None


def test_widen_by_offers_count_more_units_with_seed_0_and_nothing_for_no_units() -> None:
    g = _mlp()
    space = SearchSpace()
    fc1, _ = space.layers(g)
    assert space.widen_by(g, fc1, 2) == {"op": "net2wider", "node": "fc1", "width": 5 + 2,
                                         "seed": 0}
    assert space.widen_by(g, fc1, 0) is None  # not a widening to the same 5 units
    assert space.widen_by(g, fc1, -1) is None


def test_a_pool_is_never_widened_even_in_the_callers_set_nor_given_a_next_width() -> None:
    space = SearchSpace({"widths": {"conv": [4, 8], "fc": [16]}})
    g = _cnn()
    layers = {x.node: x for x in space.layers(g)}
    pool = layers["pool1"]
    assert space.wider_options(g, pool, widenable={"pool1"}) == []
    assert space.widen_by(g, pool, 2, widenable={"pool1"}) is None
    assert space.next_width(layers["conv1"], 5) == 8
    assert space.next_width(pool, 5) is None  # not the fc list's 16


# ---- where a layer may go ----------------------------------------------------------------------
def test_kernels_follow_the_operator_and_vectors_get_no_kernel_choice() -> None:
    g = _cnn()
    options = SearchSpace().deeper_options(g)
    got = {(o.block, o.position, o.action["after"], o.action.get("kernel_size"))
           for o in options}
    # act1 sees 8x8 (kernels 1, 3, 5); act2 sees 4x4 (5 is larger than the map)
    assert got == {(0, 0, "act1", 1), (0, 0, "act1", 3), (0, 0, "act1", 5),
                   (1, 0, "act2", 1), (1, 0, "act2", 3)}
    with pytest.raises(OperatorError):
        net2deeper(g, "act2", kernel_size=5)
    mlp_options = SearchSpace().deeper_options(_mlp())
    assert [(o.kernel, o.action) for o in mlp_options] == [
        (None, {"op": "net2deeper", "after": "act1", "seed": 0}),
        (None, {"op": "net2deeper", "after": "act2", "seed": 0})]


def test_block_and_position_capacity() -> None:
    g = _cnn()
    space = SearchSpace({"max_blocks": 1})
    assert {o.block for o in space.deeper_options(g)} == {0}
    menu = space.deeper_menu(g)
    assert menu.block_mask() == [1]
    assert menu.position_mask(0) == [1] + [0] * 31
    assert menu.kernel_mask(0, 0) == [1, 1, 1]


def test_a_block_without_candidates_masks_every_position() -> None:
    menu = SearchSpace().deeper_menu(_mlp())  # one block: block 1 has no layer
    assert menu.block_mask() == [1] + [0] * 7
    assert menu.position_mask(1) == [0] * 32
    assert menu.position_mask(0) == [1, 1] + [0] * 30


def test_a_menus_child_takes_seed_0_by_default_as_its_action_does() -> None:
    """The child is the operator's call with the action's seed (the identity's noise): the
    default seed 0, as `action` gives, not another."""
    g = _mlp()
    space = SearchSpace()  # deeper_noise 1e-3: the seed shows in the new weights
    menu = space.deeper_menu(g)
    assert menu.action(0, 0, None) == {"op": "net2deeper", "after": "act1", "seed": 0}
    new = menu.child(0, 0, None).node("act1_deep1").tensors["weight"]
    assert torch.equal(new, net2deeper(g, "act1", noise=1e-3, seed=0).graph.node(
        "act1_deep1").tensors["weight"])
    assert not torch.equal(new, net2deeper(g, "act1", noise=1e-3, seed=1).graph.node(
        "act1_deep1").tensors["weight"])


def test_a_menus_child_with_batchnorm_is_reproducible_and_leaves_torchs_generator_alone() -> None:
    """A BN insertion's dry run draws its stand-in batch from its own generator: the same
    BN statistics on every call, and torch's global random stream is not advanced."""
    g = _mlp()
    menu = SearchSpace({"deeper_batchnorm": True}).deeper_menu(g)
    torch.manual_seed(123)
    first = menu.child(0, 0, None).node("act1_deep1_bn").tensors
    second = menu.child(0, 0, None).node("act1_deep1_bn").tensors
    drawn = torch.rand(3)
    assert torch.equal(first["running_mean"], second["running_mean"])
    assert torch.equal(first["running_var"], second["running_var"])
    torch.manual_seed(123)
    assert torch.equal(drawn, torch.rand(3))  # the children drew nothing from it


def test_insertion_is_offered_only_after_the_layers_the_caller_passes() -> None:
    g = _mlp()
    space = SearchSpace()
    layers = space.layers(g)
    _, fc2 = layers
    assert [o.action["after"] for o in space.deeper_options(g)] == ["act1", "act2"]
    assert [o.action["after"] for o in space.deeper_options(g, [fc2])] == ["act2"]
    assert space.deeper_menu(g, [fc2]).candidates == {0: {1: "act2"}}
    assert [o.action["after"] for o in space.deeper_options(g, layers[1:])] == ["act2"]
    assert [o.action["after"] for o in space.deeper_options(g, layers[:1])] == ["act1"]


def _plug_in(monkeypatch, fn, role: str) -> None:
    """Register `fn` as an operator of `role` under its own name, for this test only (as a
    plug-in that is not built in)."""
    from growth.ops import Operator, registry

    monkeypatch.setitem(registry._BUILTIN, fn.__name__,
                        Operator(fn.__name__, fn.__doc__ or fn.__name__, fn, role))


def _register_k1_only(monkeypatch) -> None:
    """A deeper plug-in, "k1_only", that inserts 1x1 layers and refuses other kernels."""

    def k1_only(graph, after, kernel_size=3, seed=0):
        """inserts 1x1 layers only"""
        if kernel_size != 1:
            raise OperatorError(f"k1_only: kernel {kernel_size} refused")
        return net2deeper(graph, after, kernel_size=1, noise=0.0, seed=seed)

    _plug_in(monkeypatch, k1_only, "deeper")


def test_a_deeper_plugin_is_asked_per_kernel_and_the_operators_after_it_still_are(
        monkeypatch) -> None:
    """A deeper plug-in that accepts only 1x1 layers is dry-run with each kernel size: it is
    listed at kernel 1 only, with net2deeper (listed after it) at every kernel that fits the
    map; where nothing accepts (5x5 on act2's 4x4 map) the list is empty. An action names
    the first operator that accepts it: k1_only at 1x1, net2deeper at 3x3."""
    _register_k1_only(monkeypatch)
    g = _cnn()  # act1: 3 channels on 8x8; act2: 4 channels on 4x4
    space = SearchSpace({"operators": ["net2wider", "k1_only", "net2deeper"]})
    menu = space.deeper_menu(g)
    assert [menu.operators(0, 0, k) for k in range(3)] == [
        ["k1_only", "net2deeper"], ["net2deeper"], ["net2deeper"]]
    assert [menu.operators(1, 0, k) for k in range(3)] == [
        ["k1_only", "net2deeper"], ["net2deeper"], []]
    assert menu.kernel_mask(1, 0) == [1, 1, 0]
    assert [menu.action(0, 0, k)["op"] for k in (0, 1)] == ["k1_only", "net2deeper"]


def test_an_unaccepted_insertions_action_names_the_spaces_own_deeper_operator(
        monkeypatch) -> None:
    """A space whose only deeper operator is a plug-in: the action of an insertion no operator
    accepts (3x3 after act1, refused by k1_only) still names k1_only, never net2deeper,
    which the space does not list."""
    _register_k1_only(monkeypatch)
    menu = SearchSpace({"operators": ["net2wider", "k1_only"]}).deeper_menu(_cnn())
    assert menu.operators(0, 0, 1) == []
    assert menu.action(0, 0, 1) == {"op": "k1_only", "after": "act1", "kernel_size": 3,
                                    "seed": 0}
    assert menu.action(0, 0, 0)["op"] == "k1_only"


def test_a_lifted_size_guard_offers_an_identity_above_the_operators_default() -> None:
    """A 5x5 identity on 1,132 channels has 25 x 1132^2 + 1132 = 32,036,732 parameters, over
    the operators' default guard of 32,000,000 (1x1 and 3x3 ones are under it): offered once
    the space lifts the guard, not under the default. Counted on shapes: nothing is built."""
    assert MAX_NEW_PARAMS == 32_000_000
    g = NetGraph()
    g.add_input("x", (1, 5, 5))
    g.add("conv1", "conv2d", ["x"], out_channels=1132, kernel_size=1)
    g.add("act1", "relu", ["conv1"])
    g.add("flat", "flatten", ["act1"])
    g.add("features", "identity", ["flat"])
    g = add_head(g, "t0", 2)
    kernels = {None: [], MAX_NEW_PARAMS: []}
    for guard in kernels:
        space = SearchSpace({"max_new_params": guard})
        kernels[guard] = [o.action["kernel_size"] for o in space.deeper_options(g)]
    assert kernels == {None: [1, 3, 5], MAX_NEW_PARAMS: [1, 3]}


# ---- size limits -----------------------------------------------------------------------------
def test_parameter_limit_masks_what_would_exceed_it() -> None:
    g = _mlp()  # 6 -> 5 -> 7 -> 3
    base = g.param_count()
    # fc1 5 -> 64: 64*6+64 + (64-5)*7 more in fc2's columns; fc2 7 -> 64 changes fc2 and head
    widen_fc1 = net2wider(g, "fc1", 64).graph.param_count()
    widen_fc2 = net2wider(g, "fc2", 64).graph.param_count()
    assert widen_fc1 == base + (64 - 5) * (6 + 1) + (64 - 5) * 7
    limit = (widen_fc1 + widen_fc2) // 2
    lo, hi = sorted([widen_fc1, widen_fc2])
    assert lo <= limit < hi
    space = SearchSpace({"max_params": limit})
    layers = {x.node: x for x in space.layers(g)}
    offered = {n for n in ("fc1", "fc2") if space.wider_option(g, layers[n]) is not None}
    assert offered == {"fc1" if widen_fc1 <= limit else "fc2"}
    # inserting a 5x5 or 7x7 identity: only the one that fits
    deep1 = net2deeper(g, "act1").graph.param_count()
    deep2 = net2deeper(g, "act2").graph.param_count()
    assert (deep1, deep2) == (base + 30, base + 56)
    tight = SearchSpace({"max_params": base + 40})
    assert [o.action["after"] for o in tight.deeper_options(g)] == ["act1"]
    with pytest.raises(OperatorError, match="above the space's limit"):
        tight.apply(g, [{"op": "net2deeper", "after": "act2"}])
    # a parent already above the limit: nothing is offered, and it may stay as it is
    below = SearchSpace({"max_params": base - 1})
    assert below.deeper_options(g) == []
    assert all(below.wider_option(g, x) is None for x in below.layers(g))
    assert below.apply(g, [])[0].param_count() == base


def test_a_child_exactly_at_the_parameter_limit_is_offered_and_built() -> None:
    """The limit is inclusive, in the offer and in `apply` alike: a 5x5 identity after act1
    adds 5 x 5 + 5 = 30 parameters; at base + 30 it is offered and built, at base + 29
    refused."""
    g = _mlp()
    base, action = g.param_count(), {"op": "net2deeper", "after": "act1"}
    at = SearchSpace({"max_params": base + 30, **EXACT})
    assert [o.action for o in at.deeper_options(g)] == [action]
    assert at.apply(g, [action])[0].param_count() == base + 30
    with pytest.raises(OperatorError, match="above the space's limit"):
        SearchSpace({"max_params": base + 29, **EXACT}).apply(g, [action])


def test_an_insertion_with_batchnorm_is_held_to_the_limit_with_the_bns_parameters() -> None:
    """After act1 (5 units) a linear identity adds 5 x 5 + 5 = 30 parameters and its
    BatchNorm 2 x 5 more: 40 in all, offered at base + 40, not at base + 39."""
    g = _mlp()
    base = g.param_count()
    for extra, offered in ((40, ["act1"]), (39, [])):
        space = SearchSpace({"max_params": base + extra, "deeper_batchnorm": True, **EXACT})
        assert [o.action["after"] for o in space.deeper_options(g)] == offered, extra
    menu = SearchSpace({"max_params": base + 40, "deeper_batchnorm": True}).deeper_menu(g)
    assert menu.child(0, 0, None).param_count() == base + 40


def test_the_operators_size_guard_is_respected_and_can_be_lifted() -> None:
    g = _cnn()  # widening to 16 adds 624 parameters to conv1's group, 504 to conv2's
    guard = 550
    space = SearchSpace({"widths": {"conv": [16]}, "max_new_params": guard})
    layers = {x.node: x for x in space.layers(g)}
    for name in ("conv1", "conv2"):  # offered exactly where the operator accepts the call
        try:
            net2wider(g, name, 16, max_new_params=guard)
            accepted = True
        except OperatorError:
            accepted = False
        assert (space.wider_option(g, layers[name]) is not None) == accepted == (
            name == "conv2")
    with pytest.raises(OperatorError, match="action 0: .*over the limit of 550"):
        space.apply(g, [{"op": "net2wider", "node": "conv1", "width": 16}])
    # insertions: a 3x3 identity on 3 channels has 84 parameters, on 4 channels 148
    insert = {(o.action["after"], o.action["kernel_size"])
              for o in SearchSpace({"max_new_params": 100}).deeper_options(g)}
    assert insert == {("act1", 1), ("act1", 3), ("act2", 1)}
    lifted = SearchSpace({"widths": {"conv": [16]}, "max_new_params": None})
    assert lifted.wider_option(g, layers["conv1"]) is not None
    lifted.apply(g, [{"op": "net2wider", "node": "conv1", "width": 16}])
    assert SearchSpace().spec.max_new_params == MAX_NEW_PARAMS
    assert make_space(yaml.safe_load("max_new_params: null"), g).spec.max_new_params is None


def test_kernel_list_without_1_still_deepens_vectors() -> None:
    options = SearchSpace({"kernel_sizes": [3, 5], **EXACT}).deeper_options(_mlp())
    assert [o.action for o in options] == [{"op": "net2deeper", "after": "act1"},
                                           {"op": "net2deeper", "after": "act2"}]


def test_growth_limit_is_relative_to_the_base_network() -> None:
    g = _mlp()
    space = make_space({"max_growth": 1.5, "max_params": 10**9}, g)
    assert space.max_params == int(1.5 * g.param_count())
    assert make_space({"max_growth": 2.0, "max_params": 10}, g).max_params == 10


# ---- children from JSON actions ---------------------------------------------------------------
def test_apply_rebuilds_the_child_with_the_operators_and_keeps_the_function() -> None:
    g = _cnn()
    space = SearchSpace({"deeper_batchnorm": True, **EXACT})
    actions = [{"op": "net2wider", "node": "conv1", "width": 16, "seed": 0},
               {"op": "net2deeper", "after": "act2", "kernel_size": 3, "batchnorm": True},
               {"op": "net2wider", "node": "act2_deep1", "width": 32, "seed": 2}]
    actions = json.loads(json.dumps(actions))  # what travels in a trial config
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    child, records = space.apply(g, actions, sample=x)
    again, _ = space.apply(g, actions, sample=x)
    assert [r.op for r in records] == ["net2wider", "net2deeper", "net2wider"]
    assert child.shape("conv1")[0] == 16 and child.shape("act2_deep1")[0] == 32
    assert max_rel_error(outputs(g, x), outputs(child, x)) <= 1e-5
    assert all(torch.equal(a, b) for a, b in zip(child.named_tensors().values(),
                                                 again.named_tensors().values()))
    with pytest.raises(OperatorError, match="needs `sample`"):
        space.apply(g, actions)


def test_apply_names_the_refused_action() -> None:
    g = _mlp()
    with pytest.raises(OperatorError, match=r"action 1: .*below the current width"):
        SearchSpace().apply(g, [{"op": "net2wider", "node": "fc1", "width": 64},
                                {"op": "net2wider", "node": "fc1", "width": 8}])
    with pytest.raises(OperatorError, match="action 0: unknown operator 'widen'"):
        SearchSpace().apply(g, [{"op": "widen", "node": "fc1"}])
    with pytest.raises(OperatorError, match="action 0: .* does not fit operator"):
        SearchSpace().apply(g, [{"op": "net2wider", "node": "fc1", "units": 8}])
    with pytest.raises(OperatorError, match="'op' key"):
        SearchSpace().apply(g, [["net2wider", "fc1"]])
    with pytest.raises(OperatorError, match="action 0: .* is not a JSON object with an 'op'"):
        SearchSpace().apply(g, [{"node": "fc1", "width": 8}])  # a mapping without "op"


# ---- canonical architecture strings -----------------------------------------------------------
def test_arch_string_ignores_names_but_not_structure() -> None:
    a = _mlp()
    b = NetGraph()  # the same network with other names, built in another order
    b.add_input("inp", (6,))
    b.add("zz_first", "linear", ["inp"], out_features=5)
    b.add("a_relu", "relu", ["zz_first"])
    b.add("m", "linear", ["a_relu"], out_features=7)
    b.add("q", "relu", ["m"])
    b.add("feat", "identity", ["q"])
    b.add("h", "linear", ["feat"], out_features=3)
    b.add_output("t0", "h")
    assert arch_string(a) == arch_string(b) == (
        "in6 fc5 relu fc7 relu identity fc3 out:t0")
    assert arch_string(net2wider(a, "fc1", 6).graph) != arch_string(a)
    # widening in two orders gives one architecture
    one = net2wider(net2wider(a, "fc1", 9).graph, "fc2", 9).graph
    two = net2wider(net2wider(a, "fc2", 9).graph, "fc1", 9).graph
    assert arch_string(one) == arch_string(two)


def _two_branches(wide: str, narrow: str) -> NetGraph:
    """A 3x3 branch named `wide` and a 1x1 branch named `narrow`, added (3x3 first)."""
    g = NetGraph()
    g.add_input("x", (2, 5, 5))
    g.add(wide, "conv2d", ["x"], out_channels=3, kernel_size=3, padding=1)
    g.add(f"{wide}_r", "relu", [wide])
    g.add(narrow, "conv2d", ["x"], out_channels=3, kernel_size=1)
    g.add(f"{narrow}_r", "tanh", [narrow])
    g.add("sum", "add", [f"{wide}_r", f"{narrow}_r"])
    g.add("flat", "flatten", ["sum"])
    g.add("fc", "linear", ["flat"], out_features=2)
    g.add_output("out", "fc")
    return g


def test_arch_string_of_branches_does_not_depend_on_names() -> None:
    a, b = _two_branches("a", "b"), _two_branches("b", "a")
    assert arch_string(a) == arch_string(b)
    assert arch_string(a) == ("in2x5x5 conv1x1-3 conv3x3-3(padding=1)<0 relu tanh<1 add<3,4 "
                              "flatten fc2 out:out")


def _like_branches(wide_tail: str, narrow_tail: str) -> NetGraph:
    """_two_branches with a ReLU on both branches, named `wide_tail` and `narrow_tail`."""
    g = NetGraph()
    g.add_input("x", (2, 5, 5))
    g.add("w", "conv2d", ["x"], out_channels=3, kernel_size=3, padding=1)
    g.add(wide_tail, "relu", ["w"])
    g.add("n", "conv2d", ["x"], out_channels=3, kernel_size=1)
    g.add(narrow_tail, "relu", ["n"])
    g.add("sum", "add", [wide_tail, narrow_tail])
    g.add("flat", "flatten", ["sum"])
    g.add("fc", "linear", ["flat"], out_features=2)
    g.add_output("out", "fc")
    return g


def test_like_nodes_ready_together_go_in_the_order_of_their_inputs_not_their_names() -> None:
    """Both ReLUs are ready after both convolutions (the 1x1 at position 1, the 3x3 at 2): the
    one reading position 1 goes first (position 3), whatever the two are called; the sum reads
    the 3x3's ReLU, then the 1x1's."""
    a, b = _like_branches("zz", "aa"), _like_branches("aa", "zz")
    assert arch_string(a) == arch_string(b) == (
        "in2x5x5 conv1x1-3 conv3x3-3(padding=1)<0 relu<1 relu<2 add<4,3 flatten fc2 out:out")


def test_a_cycle_has_no_canonical_order() -> None:
    from growth.search_spaces.space import canonical_order

    g = _mlp()
    g.rewire("fc2", "act1", "act2")  # fc2 now reads its own consumer's output
    with pytest.raises(GraphError, match="cycle"):
        canonical_order(g)


def test_arch_string_names_a_pools_kernel() -> None:
    """A pool's label carries its kernel: maxpool2d(k=2)."""
    g = add_head(small_cnn((1, 8, 8), [3, 4]), "t0", 3)
    assert arch_string(g) == (
        "in1x8x8 conv3x3-3(padding=1) batchnorm2d relu maxpool2d(k=2) conv3x3-4(padding=1) "
        "batchnorm2d relu maxpool2d(k=2) flatten identity fc3 out:t0")


def test_arch_string_of_a_branching_network_lists_inputs() -> None:
    s = arch_string(residual())
    assert "add<" in s and s.startswith("in3x6x6 conv3x3-4(padding=1) batchnorm2d relu")


# ---- declared specs ---------------------------------------------------------------------------
SPEC = """
search:
  space:
    widths: {conv: [32, 64, 128], fc: [128, 256]}
    kernel_sizes: [3, 5]
    exclude: [fc2]
    max_params: 50000
"""


def test_a_space_from_yaml() -> None:
    raw = yaml.safe_load(SPEC)["search"]["space"]
    space = make_space(raw, _mlp())
    assert space.spec.widths.fc == [128, 256] and space.spec.kernel_sizes == [3, 5]
    assert space.max_params == 50000 and space.spec.exclude == ["fc2"]


@pytest.mark.parametrize("raw,message", [
    ({"widths": {"fc": [256, 128]}}, "search.space.widths.fc: a width list must increase "
                                     "strictly"),
    ({"widths": {"fc": [0, 128]}}, "search.space.widths.fc.0: Input should be greater than 0"),
    ({"kernel_sizes": [2, 3]}, "search.space.kernel_sizes: kernel sizes must be odd"),
    ({"max_growth": 0.5}, "search.space.max_growth: Input should be greater than 1"),
    ({"widht": {}}, "search.space.widht: unknown key (check the spelling)"),
    ({"exclude": ["fc9"]}, "search.space.exclude: no conv/linear layer named 'fc9' in the "
                           "network; its layers are ['fc1', 'fc2', 'head_t0']"),
    ({"layer_widths": {"act1": [5]}}, "search.space.layer_widths: no conv/linear layer named "
                                      "'act1'"),
    ({"layer_widths": {"fc1": [9, 8]}}, "search.space.layer_widths: the width list of layer "
                                        "'fc1' must increase strictly"),
    ({"widths": {"conv": [16, 16]}}, "search.space.widths.conv: a width list must increase "
                                     "strictly"),  # a repeat is not an increase
    ({"layer_widths": {"fc1": [9, 9]}}, "search.space.layer_widths: the width list of layer "
                                        "'fc1' must increase strictly"),
    ([1, 2], "search.space: expected a mapping of keys, got list"),
])
def test_bad_specs_are_one_line_config_errors(raw, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_space(raw, _mlp())
    assert str(info.value).startswith(message), str(info.value)


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_benchmark_networks_have_a_search_space(name: str) -> None:
    g = benchmark_network(name, n_classes=4, heads=("a", "b"))
    assert sorted(g.heads) == ["a", "b"]
    space = make_space(None, g)
    layers = space.layers(g)
    assert layers and all(x.node not in ("head_a", "head_b") for x in layers)
    assert space.widenable(g) == {x.node for x in layers if x.kind != "pool"}
    assert space.deeper_options(g)
    with pytest.raises(GraphError, match="unknown benchmark network 'vgg'"):
        benchmark_network("vgg")


# ---- grouped convolutions and token layers ------------------------------------------------------
def _grouped() -> NetGraph:
    """c1 (6 ch) -> grouped conv g (groups 3: channels of c1 change in blocks of 2) -> pool."""
    g = NetGraph()
    g.add_input("x", (2, 6, 6))
    g.add("c1", "conv2d", ["x"], out_channels=6, kernel_size=3, padding=1)
    g.add("r1", "relu", ["c1"])
    g.add("g", "conv2d", ["r1"], out_channels=6, kernel_size=3, padding=1, groups=3)
    g.add("r2", "relu", ["g"])
    g.add("gap", "adaptive_avgpool2d", ["r2"], output_size=1)
    g.add("features", "flatten", ["gap"])
    return randomize(add_head(g, "t0", 3), 0)


def test_widening_through_a_grouped_conv_rounds_up_to_whole_groups_and_keeps_the_function() -> None:
    g = _grouped()
    space = SearchSpace({"widths": {"conv": [6, 7, 12], "fc": [16]}, **EXACT})
    layers = {x.node: x for x in space.layers(g)}
    action = space.wider_option(g, layers["c1"])
    assert action["width"] == 8  # next width 7 is off the 2-channel blocks: 6 + 1 block
    child, _ = space.apply(g, [action])
    assert child.node("g").attrs["groups"] == 4
    x = torch.randn(5, 2, 6, 6)
    assert max_rel_error(outputs(g, x), outputs(child, x)) < 1e-5
    capped = SearchSpace({"widths": {"conv": [6, 7], "fc": [16]}})
    assert capped.wider_option(g, layers["c1"]) is None  # rounding would pass the list's end


def test_linear_layers_on_tokens_are_sized_by_their_units_not_their_token_count() -> None:
    g = NetGraph()
    g.add_input("x", (5, 4))  # 5 tokens of 4 features
    g.add("fc1", "linear", ["x"], out_features=6)
    g.add("a1", "relu", ["fc1"])
    g.add("fc2", "linear", ["a1"], out_features=4)
    g.add("flat", "flatten", ["fc2"])
    g.add("features", "identity", ["flat"])
    g = randomize(add_head(g, "t0", 3), 0)
    space = SearchSpace({"widths": {"conv": [8], "fc": [6, 8, 16]}, **EXACT})
    layers = {x.node: x for x in space.layers(g)}
    assert layers["fc1"].width == 6
    action = space.wider_option(g, layers["fc1"])
    assert action["width"] == 8
    child, _ = space.apply(g, [action])
    x = torch.randn(3, 5, 4)
    assert max_rel_error(outputs(g, x), outputs(child, x)) < 1e-5


# ---- transformers ------------------------------------------------------------------------------
def _vit() -> NetGraph:
    return randomize(add_head(vit((1, 8, 8), patch=4, dim=8, depth=2, heads=2, mlp_dim=12),
                              "t0", 3), 1)


def test_a_vit_offers_its_embedding_mlp_heads_and_blocks_and_each_keeps_the_function() -> None:
    g = _vit()
    space = make_space({"widths": {"conv": [8, 16, 64], "fc": [12, 16, 64]}, **EXACT}, g)
    layers = {x.node: x for x in space.layers(g)}
    assert set(layers) == {"patch", "block1_fc1", "block1_fc2", "block2_fc1", "block2_fc2"}
    # the embedding width crosses every LayerNorm: it doubles (64 would be 8 copies; the next
    # width on the list, 16, is the first multiple of 8 above 8)
    assert space.wider_option(g, layers["patch"]) == {"op": "net2wider", "node": "patch",
                                                      "width": 16, "seed": 0}
    assert space.wider_option(g, layers["block1_fc1"])["width"] == 16  # MLP: the next width
    # a count of units (RCL's widening) is rounded up to whole copies the same way
    assert space.widen_by(g, layers["patch"], 3)["width"] == 16
    assert space.widen_by(g, layers["block1_fc1"], 3)["width"] == 15
    heads = space.head_options(g)
    assert heads == [{"op": "add_heads", "node": "block1_attn", "heads": 3},
                     {"op": "add_heads", "node": "block2_attn", "heads": 3}]
    blocks = space.block_options(g)
    assert {"op": "add_block", "after": "block2_add2"} in blocks and len(blocks) == 4
    deeper = [o.action for o in space.deeper_options(g)]
    assert {"op": "net2deeper", "after": "block1_act"} in deeper  # a linear on the tokens
    actions = [space.wider_option(g, layers["patch"]), heads[1], blocks[-1], deeper[0],
               space.wider_option(g, layers["block2_fc1"])]
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    child = g
    for action in actions:  # each move alone, and all in a row, as SearchSpace.apply does
        alone, records = space.apply(g, [action])
        assert max_rel_error(outputs(g, x), outputs(alone, x)) <= 1e-5, action
        assert len(records) == 1 and not records[0].is_noop
    child, records = space.apply(g, actions)
    assert max_rel_error(outputs(g, x), outputs(child, x)) <= 1e-5
    assert [r.op for r in records] == ["net2wider", "add_heads", "add_block", "net2deeper",
                                       "net2wider"]


def test_a_private_space_widens_a_vits_mlp_but_not_its_normalised_embedding() -> None:
    g = _vit()
    space = make_space({"widths": {"conv": [8, 16], "fc": [12, 16]}, "private": True, **EXACT},
                       g)
    layers = {x.node: x for x in space.layers(g)}
    assert space.wider_options(g, layers["patch"]) == []  # LayerNorm reads the embedding
    assert space.wider_options(g, layers["block1_fc1"]) == [
        {"op": "widen_private", "node": "block1_fc1", "width": 16, "seed": 0}]


def test_a_normalised_layer_skips_widen_private_but_still_asks_the_next_wider_operator() -> None:
    """With operators [widen_private, net2wider], the embedding (read by LayerNorms) gets
    net2wider's widening alone; the MLP's hidden layer gets both, in the space's order."""
    g = _vit()
    space = make_space({"operators": ["widen_private", "net2wider"],
                        "widths": {"conv": [8, 16], "fc": [12, 16]}}, g)
    layers = {x.node: x for x in space.layers(g)}
    assert space.wider_options(g, layers["patch"]) == [
        {"op": "net2wider", "node": "patch", "width": 16, "seed": 0}]
    assert [a["op"] for a in space.wider_options(g, layers["block1_fc1"])] == [
        "widen_private", "net2wider"]


def test_a_space_naming_add_block_draws_identity_blocks_in_its_deeper_steps() -> None:
    from growth.controllers import make_controller

    g = _vit()
    space = make_space({"operators": ["net2wider", "net2deeper", "add_block"], **EXACT}, g)
    menu = space.deeper_menu(g)
    by_op: dict[str, set[str]] = {"net2deeper": set(), "add_block": set()}
    for o in space.deeper_options(g):
        for op in menu.operators(o.block, o.position, o.kernel):
            by_op[op].add(o.action["after"])
    # a block goes after any token sequence (the stream, or the MLP's hidden units), never on
    # the patch embedding's image map; a linear or conv layer anywhere
    assert by_op["add_block"] == {"block1_act", "block1_fc2", "block2_act", "block2_fc2"}
    assert by_op["net2deeper"] == by_op["add_block"] | {"patch"}
    controller = make_controller("random", space, {"wider_actions": 0, "deeper_actions": 2},
                                 seed=0)
    proposals = controller.propose(g, 6)
    blocks = [p for p in proposals if any(a["op"] == "add_block" for a in p.actions)]
    assert blocks  # the rollout draws among the deeper operators
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    for proposal in blocks:
        child, records = space.apply(g, proposal.actions)
        assert max_rel_error(outputs(g, x), outputs(child, x)) <= 1e-5
        assert len(child) > len(g)


def test_a_vits_moves_respect_the_parameter_limit() -> None:
    g = _vit()
    space = make_space({"max_params": g.param_count() + 200}, g)
    assert space.head_options(g) == [
        {"op": "add_heads", "node": n, "heads": 3} for n in ("block1_attn", "block2_attn")]
    assert space.block_options(g) == []  # a block holds 3 + 1 layers: over the limit
    space = make_space({"max_params": g.param_count() + 100, "exclude": ["block1_fc1"]}, g)
    assert space.head_options(g) == []  # one head adds 4 x (3 x 8 + 3 + 8) = 140


@pytest.mark.parametrize(("name", "shape", "widths"), [
    ("digits_mlp", (1, 8, 8), [100, 100]), ("mnist_mlp", (1, 28, 28), [256, 256]),
    ("cifar_cnn", (3, 32, 32), [32, 64])])
def test_a_benchmark_network_reads_its_datasets_images(name: str, shape: tuple[int, ...],
                                                       widths: list[int]) -> None:
    """Each benchmark network takes its dataset's image shape and has the documented widths."""
    g = benchmark_network(name)
    assert tuple(g.shape(g.input_node())) == shape
    assert [x.width for x in make_space(None, g).layers(g) if x.kind != "pool"] == widths


def test_a_default_vit_has_two_blocks_of_32_features_in_4x4_patches() -> None:
    """vit's defaults: patch 4, dim 32, depth 2, 2 heads, an MLP of 2 x dim."""
    g = vit((3, 8, 8))
    blocks = sorted({n.split("_")[0] for n in g.nx.nodes if n.startswith("block")})
    assert blocks == ["block1", "block2"]
    assert g.shape("pos") == (5, 32)  # 2 x 2 patches and the class token
    assert g.shape("block2_fc1") == (5, 64)


def test_every_layernorm_of_a_vit_has_vits_eps_of_1e_6() -> None:
    """ViT's LayerNorms take eps 1e-6 (torch's default is 1e-5): both of each block's and the
    final one."""
    g = vit((3, 8, 8))
    eps = {n: g.node(n).attrs["eps"] for n in g.topo_order() if g.node(n).kind == "layernorm"}
    assert eps == {n: 1e-6 for n in ("block1_norm1", "block1_norm2", "block2_norm1",
                                     "block2_norm2", "norm")}


def test_a_head_is_named_by_an_identifier_and_has_at_least_one_class() -> None:
    """A head's name must be a Python identifier and it needs a class or more: one class is
    enough. The graph it is added to is left as it was."""
    g = mlp((4,), [3])
    for bad in ("1st", "t-0", "", 5):
        with pytest.raises(GraphError, match="must be a Python identifier"):
            add_head(g, bad, 2)
    with pytest.raises(GraphError, match="needs n_classes >= 1, got 0"):
        add_head(g, "t0", 0)
    one = add_head(g, "t0", 1)
    assert one.heads == ["t0"] and one.shape("t0") == (1,)
    assert g.heads == [] and "head_t0" not in g


def test_an_mlp_flattens_any_input_of_more_than_one_dimension() -> None:
    """A (4, 6) input (tokens by features) is flattened to 24 features as an image is."""
    g = mlp((4, 6), [5])
    assert g.topo_order() == ["x", "flatten", "fc1", "act1", "features"]
    assert g.shape("flatten") == (24,) and g.shape("features") == (5,)
    assert mlp((6,), [5]).topo_order() == ["x", "fc1", "act1", "features"]


def test_a_vits_features_are_its_class_token_after_the_final_norm() -> None:
    """With no blocks nothing mixes the tokens: the features are read at the class token
    (index 0), LayerNorm(cls + pos[0]) by hand, the same for every image."""
    g = randomize(add_head(vit((1, 8, 8), patch=4, dim=8, depth=0, heads=2), "t0", 3), 0)
    cls, pos = g.node("cls").tensors["weight"], g.node("pos").tensors["weight"]
    norm, head = g.node("norm").tensors, g.node("head_t0").tensors
    token = cls[0, 0] + pos[0, 0]
    normed = (token - token.mean()) / torch.sqrt(token.var(unbiased=False) + 1e-6)
    want = (normed * norm["weight"] + norm["bias"]) @ head["weight"].T + head["bias"]
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    got = outputs(g, x)["t0"]
    assert torch.allclose(got, want.expand(2, 3), atol=1e-5)


def test_a_vit_refuses_an_image_whose_width_alone_does_not_split_into_patches() -> None:
    with pytest.raises(GraphError, match="the 8x6 input does not split into 4x4 patches"):
        vit((1, 8, 6), patch=4)
    with pytest.raises(GraphError, match="the 6x8 input does not split into 4x4 patches"):
        vit((1, 6, 8), patch=4)


def test_a_small_cnn_and_the_cifar_benchmark_have_batchnorm_and_ten_classes_by_default() -> None:
    """small_cnn's blocks are conv -> bn -> act -> pool unless told otherwise, named by
    position after the input "x" as the other builders' nodes, and its dense blocks have no
    dropout unless asked; cifar_cnn is that with 32 and 64 channels; a benchmark network's
    head has 10 classes by default."""
    block = ["conv2d", "batchnorm2d", "relu", "maxpool2d"]
    g = small_cnn((3, 8, 8), (4,), fc=(5,))
    assert [g.node(n).kind for n in g.topo_order()] == [
        "input", *block, "flatten", "linear", "relu", "identity"]
    assert g.topo_order() == ["x", "conv1", "bn1", "act1", "pool1", "flatten", "fc2", "act2",
                              "features"]
    assert small_cnn((3, 8, 8), (4,), kernel_size=5).shape("conv1") == (4, 8, 8)  # same pad
    g = benchmark_network("cifar_cnn")
    assert [g.node(n).kind for n in g.topo_order()][:9] == ["input", *block, *block]
    assert [g.node(f"conv{i}").attrs["out_channels"] for i in (1, 2)] == [32, 64]
    for name in sorted(BENCHMARKS):
        assert benchmark_network(name).node("head_t0").attrs["out_features"] == 10, name


def test_fc_tokens_follow_the_conv_tokens_one_per_width_bucket() -> None:
    """Vocabulary by hand: (conv widths + 1) x (kernel sizes + 1) conv ids, then one id per fc
    width bucket (a width goes to the first listed width at or above it), then the pool."""
    from growth.search_spaces.space import Layer

    widths = [4, 8, 16]
    space = make_space({"widths": {"fc": widths}}, _mlp())
    s = space.spec
    conv_ids = (len(s.widths.conv) + 1) * (len(s.kernel_sizes) + 1)
    for width, bucket in ((4, 0), (5, 1), (8, 1), (16, 2), (17, 3)):
        layer = Layer("fc1", "fc", width, None, 0, 0, "fc1")
        assert space.token(layer) == conv_ids + bucket < space.vocab_size


def test_an_fc_layers_label_lists_its_settings_apart_from_the_defaults() -> None:
    from growth.search_spaces.space import _label

    g = NetGraph()
    g.add_input("x", [6])
    g.add("fc1", "linear", ["x"], out_features=8, bias=False)
    g.add("fc2", "linear", ["fc1"], out_features=3)
    assert (_label(g, "fc1"), _label(g, "fc2")) == ("fc8(bias=False)", "fc3")


def test_an_mlps_layers_are_one_block_numbered_in_order() -> None:
    g = randomize(add_head(mlp((6,), [5, 7, 9]), "t0", 3), 0)
    layers = make_space(None, g).layers(g)
    assert [(la.kind, la.width, la.block, la.position) for la in layers] == [
        ("fc", 5, 0, 0), ("fc", 7, 0, 1), ("fc", 9, 0, 2)]


def test_a_bad_space_setting_is_named_under_the_key_the_caller_gives() -> None:
    g = _mlp()
    with pytest.raises(ConfigError, match=r"^strategy\.search\.space\.nosuch: "):
        make_space({"nosuch": 1}, g, where="strategy.search.space")
    with pytest.raises(ConfigError, match=r"^search\.space\.nosuch: "):  # the default key
        SearchSpace({"nosuch": 1})


def test_errors_described_under_no_key_name_the_bare_keys() -> None:
    """describe_errors with `where` "" (a document's top level): "widths.fc.0", not
    ".widths.fc.0"."""
    from growth.search_spaces.space import SpaceSpec, describe_errors
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as info:
        SpaceSpec.model_validate({"widths": {"fc": [0, 5]}, "widht": {}})
    assert describe_errors(info.value, "").splitlines() == [
        "widths.fc.0: Input should be greater than 0 (got 0)",
        "widht: unknown key (check the spelling)"]


def test_a_block_is_offered_only_where_its_parameters_fit_the_limit() -> None:
    """The block's cost is what inserting it adds (applied by the operator and counted):
    offered at a limit of exactly that, not one below (the cost of the block on the
    network's features, not on its tokens)."""
    g = add_head(vit((1, 8, 8)), "t0", 3)
    free = make_space({"max_new_params": None}, g)
    [first, *_] = free.block_options(g)
    child, _ = free.apply(g, [first])
    cost = child.param_count() - g.param_count()
    assert g.shapes()[first["after"]][-2] < g.shapes()[first["after"]][-1]  # tokens < dim
    for limit, offered in ((cost, True), (cost - 1, False)):
        space = make_space({"max_new_params": None, "max_params": g.param_count() + limit}, g)
        assert (first in space.block_options(g)) is offered, limit


def test_a_block_on_tokens_without_attention_gets_one_head_per_64_features_of_full_width() -> None:
    """A residual token network with no attention layer (nothing to copy the head count or
    head width from): the block offered has max(1, 130 // 64) = 2 heads of 130 // 2 = 65
    features, an MLP of 4 x 130, and costs, counted by hand, 2 LayerNorms 2 x 2 x 130 +
    qkv 131 x 3 x 130 + proj 131 x 130 + fc1 131 x 520 + fc2 521 x 130 = 204,490; offered at
    that limit, not one below, and inserting it adds exactly that."""
    dim, cost = 130, 4 * 130 + 131 * 3 * 130 + 131 * 130 + 131 * 520 + 521 * 130
    g = NetGraph()
    g.add_input("x", (2, dim))
    g.add("fc", "linear", ["x"], out_features=dim)
    g.add("res", "add", ["x", "fc"])
    g.add("pool", "getitem", ["res"], index=[0])
    g.add("features", "identity", ["pool"])
    g = add_head(g, "t0", 3)
    for limit, offered in ((cost, [{"op": "add_block", "after": "res"}]), (cost - 1, [])):
        space = make_space({"max_new_params": None, "max_params": g.param_count() + limit}, g)
        assert space.block_options(g) == offered, limit
    child, _ = make_space({"max_new_params": None}, g).apply(g, [{"op": "add_block",
                                                                  "after": "res"}])
    assert child.param_count() - g.param_count() == cost == 204_490


def test_a_square_kernel_given_as_a_pair_is_one_size_and_an_oblong_one_none() -> None:
    """An imported convolution's kernel may be a pair: (3, 3) reads as 3, (1, 3) as -1 (no
    size of the space), and a label lists each list-valued setting joined by "x", settings
    in sorted order and apart by commas."""
    g = NetGraph()
    g.add_input("x", (1, 8, 8))
    g.add("c1", "conv2d", ["x"], out_channels=4, kernel_size=[3, 3], stride=[2, 2],
          padding=[1, 1])
    g.add("c2", "conv2d", ["c1"], out_channels=4, kernel_size=[1, 3], padding=[0, 1])
    g.add("flatten", "flatten", ["c2"])
    g.add("features", "identity", ["flatten"])
    g = add_head(g, "t0", 2)
    assert [(la.node, la.kernel) for la in make_space(None, g).layers(g)] == [
        ("c1", 3), ("c2", -1)]
    assert arch_string(g).split()[1:3] == ["conv3x3-4(padding=1x1,stride=2x2)",
                                           "conv1x3-4(padding=0x1)"]


def test_a_private_widening_takes_the_spaces_noise() -> None:
    """`widen_private` (a private space's wider step) gets the space's noise, as net2wider
    does: the child is the operator's own call with that noise, not its default (0)."""
    from growth.ops import get_operator

    g = _mlp()
    action = {"op": "widen_private", "node": "fc1", "width": 7, "seed": 3}
    child = make_space({"private": True, "noise": 0.3}, g).step(g, action)
    want = get_operator("widen_private")(g, "fc1", 7, noise=0.3, seed=3).graph
    exact = get_operator("widen_private")(g, "fc1", 7, noise=0.0, seed=3).graph
    w = child.node("fc1").tensors["weight"]
    assert torch.equal(w, want.node("fc1").tensors["weight"])
    assert not torch.equal(w, exact.node("fc1").tensors["weight"])


def test_a_net2wider_step_takes_the_spaces_noise() -> None:
    """An action without "noise" gets the space's: the child is net2wider's own call with
    noise 0.3, not with the operator's default (0, exact)."""
    g = _mlp()
    action = {"op": "net2wider", "node": "fc1", "width": 7, "seed": 3}
    w = make_space({"noise": 0.3}, g).step(g, action).node("fc1").tensors["weight"]
    want = net2wider(g, "fc1", 7, noise=0.3, seed=3).graph.node("fc1").tensors["weight"]
    exact = net2wider(g, "fc1", 7, noise=0.0, seed=3).graph.node("fc1").tensors["weight"]
    assert torch.equal(w, want) and not torch.equal(w, exact)


def test_a_wider_plugin_is_offered_where_it_accepts_within_the_limit(monkeypatch) -> None:
    """A wider operator that is not built in is asked (a dry run): offered on fc1, which it
    accepts, not on fc2, which it refuses; and only while its child's growth, 2 units of
    fc1 (2 x (6 + 1)) and 2 more inputs of fc2 (2 x 7), 28 parameters, fits the limit."""
    def fc1_only(graph, node, width, seed=0):
        """widens fc1 only"""
        if node != "fc1":
            raise OperatorError(f"{node} refused")
        return net2wider(graph, node, width, noise=0.0, seed=seed)

    _plug_in(monkeypatch, fc1_only, "wider")
    g = _mlp()  # 6 -> fc1 5 -> fc2 7 -> head 3
    spec = {"operators": ["fc1_only"], "widths": {"fc": [5, 7, 9]}}
    space = make_space(spec, g)
    fc1, fc2 = space.layers(g)
    assert space.wider_options(g, fc1) == [{"op": "fc1_only", "node": "fc1", "width": 7,
                                            "seed": 0}]
    assert space.wider_options(g, fc2) == []
    for extra, offered in ((28, True), (27, False)):
        limited = make_space({**spec, "max_params": g.param_count() + extra}, g)
        assert bool(limited.wider_options(g, fc1)) is offered, extra


def test_a_spec_with_several_problems_names_each_on_a_line_with_the_value_given() -> None:
    """One line per problem, in the spec's key order: a value that is not a mapping is shown
    as given, a mapping (here the kernel sizes given as one) is not, and an unknown key is
    named as a spelling to check."""
    with pytest.raises(ConfigError) as info:
        make_space({"max_growth": 0.5, "kernel_sizes": {"a": 1}, "widht": {}}, _mlp())
    assert str(info.value).split("\n") == [
        "search.space.kernel_sizes: Input should be a valid list",
        "search.space.max_growth: Input should be greater than 1 (got 0.5)",
        "search.space.widht: unknown key (check the spelling)"]


def test_an_excluded_attention_layer_gets_no_head_and_the_next_one_still_does() -> None:
    """A config may name an attention layer in `exclude` (not in `layer_widths`: it has no
    unit width), and a name that is no layer is refused with the network's layers."""
    g = _vit()
    space = make_space({"exclude": ["block1_attn"]}, g)
    assert space.head_options(g) == [{"op": "add_heads", "node": "block2_attn", "heads": 3}]
    with pytest.raises(ConfigError, match=r"^search\.space\.layer_widths: no conv/linear layer "
                       r"named 'block1_attn'"):
        make_space({"layer_widths": {"block1_attn": [8]}}, g)
    with pytest.raises(ConfigError, match=r"^search\.space\.exclude: no conv/linear/attention "
                       r"layer named 'attn9'.*'block1_attn'"):
        make_space({"exclude": ["attn9"]}, g)


def test_a_widening_is_offered_only_for_the_widenable_layers_given_and_carries_the_seed() -> None:
    """`widenable`, when given, is the set of layers that may widen (a caller's cached
    `space.widenable(graph)`); the seed travels in the action."""
    g = _mlp()
    space = SearchSpace({"widths": {"fc": [5, 7, 9]}})
    fc1, _ = space.layers(g)
    assert space.wider_option(g, fc1, widenable={"fc2"}) is None
    assert space.wider_option(g, fc1, widenable={"fc1"}, seed=5) == {
        "op": "net2wider", "node": "fc1", "width": 7, "seed": 5}


def test_a_menus_child_is_built_by_the_operator_named() -> None:
    """Where net2deeper and add_block both accept an insertion, the child is the named
    operator's (a whole transformer block, or one identity layer); by default the space's
    first deeper operator's."""
    g = _vit()
    space = make_space({"operators": ["net2wider", "net2deeper", "add_block"], **EXACT}, g)
    menu = space.deeper_menu(g)
    [(block, position)] = [(b, p) for b, ps in menu.candidates.items() for p in ps
                           if ps[p] == "block1_fc2"]
    assert menu.operators(block, position, None) == ["net2deeper", "add_block"]
    by_op = {op: arch_string(space.step(g, {"op": op, "after": "block1_fc2"}))
             for op in ("net2deeper", "add_block")}
    assert by_op["net2deeper"] != by_op["add_block"]
    assert arch_string(menu.child(block, position, None, op="add_block")) == by_op["add_block"]
    assert arch_string(menu.child(block, position, None)) == by_op["net2deeper"]


def test_a_block_on_one_feature_has_heads_of_one_feature() -> None:
    """One feature, no attention layer: one head of 1 // 1 = 1 feature and an MLP of 4, so
    the block costs 2 x 2 x 1 + 2 x 3 + 2 x 1 + 2 x 4 + 5 x 1 = 25 parameters: offered at
    that limit, not one below, and inserting it adds exactly that."""
    g = NetGraph()
    g.add_input("x", (2, 1))
    g.add("fc", "linear", ["x"], out_features=1)
    g.add("res", "add", ["x", "fc"])
    g.add("pool", "getitem", ["res"], index=[0])
    g.add("features", "identity", ["pool"])
    g = add_head(g, "t0", 3)
    for limit, offered in ((25, [{"op": "add_block", "after": "res"}]), (24, [])):
        space = make_space({"max_new_params": None, "max_params": g.param_count() + limit}, g)
        assert space.block_options(g) == offered, limit
    child, _ = make_space({"max_new_params": None}, g).apply(g, [{"op": "add_block",
                                                                  "after": "res"}])
    assert child.param_count() - g.param_count() == 25


def test_a_deeper_action_names_its_operator_kernel_seed_and_batchnorm() -> None:
    """By default net2deeper with seed 0; a kernel only on images; `batchnorm: true` where
    the space inserts BatchNorms, and the child then holds one after the new layer."""
    assert SearchSpace().deeper_action("act1", None) == {"op": "net2deeper", "after": "act1",
                                                         "seed": 0}
    space = SearchSpace({"deeper_batchnorm": True})
    action = space.deeper_action("act1", 3, seed=2)
    assert action == {"op": "net2deeper", "after": "act1", "kernel_size": 3,
                      "batchnorm": True, "seed": 2}
    g = _cnn()
    child = space.step(g, action, sample=torch.randn(4, 1, 8, 8))
    assert sorted(child.node(n).kind for n in child.nx.nodes if n.startswith("act1_deep")) == [
        "batchnorm2d", "conv2d", "relu"]


def test_insertion_stops_at_the_last_position_a_block_allows() -> None:
    g = _mlp()  # one block, fc1 at position 0 and fc2 at position 1
    assert [o.action["after"] for o in SearchSpace({"max_layers_per_block": 1})
            .deeper_options(g)] == ["act1"]
    assert [o.action["after"] for o in SearchSpace({"max_layers_per_block": 2})
            .deeper_options(g)] == ["act1", "act2"]


def test_an_insertion_on_tokens_is_costed_on_the_features_not_the_tokens() -> None:
    """5 tokens of 6 features after fc1: the identity linear layer has 6 x 6 + 6 = 42
    parameters (on the token count it would be 30): offered at a guard of 42, not 41."""
    g = NetGraph()
    g.add_input("x", (5, 4))
    g.add("fc1", "linear", ["x"], out_features=6)
    g.add("a1", "relu", ["fc1"])
    g.add("flat", "flatten", ["a1"])
    g.add("features", "identity", ["flat"])
    g = add_head(g, "t0", 3)
    for guard, offered in ((42, ["a1"]), (41, [])):
        options = SearchSpace({"max_new_params": guard}).deeper_options(g)
        assert [o.action["after"] for o in options] == offered, guard
    child = SearchSpace().step(g, {"op": "net2deeper", "after": "a1"})
    assert child.param_count() - g.param_count() == 42


def test_a_deeper_plugin_is_asked_with_each_kernel_size(monkeypatch) -> None:
    """A deeper operator that is not built in gets the kernel of each insertion it is asked
    about: one that accepts only 3 x 3 layers is offered only those."""
    def three_only(graph, after, kernel_size=None, seed=0):
        """inserts 3x3 layers only"""
        if kernel_size != 3:
            raise OperatorError(f"kernel {kernel_size} refused")
        return net2deeper(graph, after, kernel_size=3, noise=0.0, seed=seed)

    _plug_in(monkeypatch, three_only, "deeper")
    g = _cnn()
    space = make_space({"operators": ["net2wider", "three_only"]}, g)
    got = {(o.action["after"], o.action["kernel_size"]) for o in space.deeper_options(g)}
    assert got == {("act1", 3), ("act2", 3)}
    # with net2deeper after it, each insertion is built by the first operator that accepts it
    menu = make_space({"operators": ["net2wider", "three_only", "net2deeper"]}, g).deeper_menu(g)
    assert [menu.action(0, 0, k)["op"] for k in range(3)] == ["net2deeper", "three_only",
                                                              "net2deeper"]


def test_an_insertion_with_batchnorm_is_costed_with_the_norm() -> None:
    """After fc1's 5 units: a 5 x 5 + 5 identity and a BatchNorm of 2 x 5, 40 parameters:
    offered at a guard of 40, not 39."""
    g = _mlp()
    for guard, offered in ((40, ["act1"]), (39, [])):
        space = SearchSpace({"deeper_batchnorm": True, "max_new_params": guard})
        assert [o.action["after"] for o in space.deeper_options(g)] == offered, guard
    child = SearchSpace({"deeper_batchnorm": True}).step(
        g, {"op": "net2deeper", "after": "act1", "batchnorm": True}, sample=torch.randn(4, 6))
    assert child.param_count() - g.param_count() == 40


def test_the_next_width_is_above_the_layers_own_width_or_the_one_given() -> None:
    g = _cnn()
    space = SearchSpace({"widths": {"conv": [3, 4, 8, 16], "fc": [16]}})
    conv1, pool1, *_ = space.layers(g)  # conv1 has 3 filters
    assert space.next_width(conv1) == 4
    assert space.next_width(conv1, 8) == 16 and space.next_width(conv1, 16) is None
    assert space.next_width(pool1) is None and space.next_width(pool1, 3) is None


def test_a_space_is_made_from_a_spec_object_as_from_its_mapping() -> None:
    from growth.search_spaces import SpaceSpec

    g = _mlp()
    spec = SpaceSpec(exclude=["fc1"], max_growth=2.0)
    space = make_space(spec, g)
    assert space.spec == spec and space.max_params == 2 * g.param_count()


def test_a_refused_step_is_named_as_action_0() -> None:
    """One step is an action list of one: its error names it as action 0, as `apply` would."""
    with pytest.raises(OperatorError, match=r"^action 0: .*below the current width"):
        SearchSpace().step(_mlp(), {"op": "net2wider", "node": "fc1", "width": 2})


@pytest.mark.parametrize("action", [
    {"op": "net2wider", "node": "fc1", "width": 7},
    {"op": "widen_private", "node": "fc1", "width": 7},
    {"op": "net2deeper", "after": "act1"},
    {"op": "add_heads", "node": "block1_attn", "heads": 3},
    {"op": "add_block", "after": "block1_add2"},
])
def test_every_built_in_step_is_held_to_the_spaces_size_guard(action) -> None:
    """Each operator gets the space's `max_new_params` (here 10, below what any of these
    adds), not its own default."""
    g = _vit() if action["op"].startswith("add_") else _mlp()
    with pytest.raises(OperatorError, match="action 0: .*over the limit of 10"):
        SearchSpace({"max_new_params": 10}).step(g, action)


def test_an_insertion_takes_the_spaces_deeper_noise() -> None:
    """net2deeper gets the space's `deeper_noise`: the child is the operator's own call with
    that noise, not with the operator's default."""
    g = _mlp()
    action = {"op": "net2deeper", "after": "act1", "seed": 3}
    child = SearchSpace({"deeper_noise": 0.3}).step(g, action)
    want = net2deeper(g, "act1", noise=0.3, seed=3).graph
    default = net2deeper(g, "act1", seed=3).graph
    new = [n for n in child.nx.nodes if child.node(n).kind == "linear" and n not in g.nx.nodes]
    [name] = new
    w = child.node(name).tensors["weight"]
    assert torch.equal(w, want.node(name).tensors["weight"])
    assert not torch.equal(w, default.node(name).tensors["weight"])
