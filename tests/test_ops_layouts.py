"""Operators on the kinds of modern networks, on small hand-made graphs: depthwise convolutions,
squeeze-and-excitation gates, channels-last and token layouts, layer scales, class tokens and
positional embeddings, norms over the channels; the refusals (attention that reads a width it
does not write, shuffles) and the size guards."""

from __future__ import annotations

import random

import pytest
import torch
from graphgen import (  # noqa: F401 (single_thread is a fixture)
    assert_unchanged,
    max_rel_error,
    mlp,
    modern_nets,
    outputs,
    random_input,
    randomize,
    residual,
    single_thread,
    snapshot,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from growth.errors import OperatorError
from growth.graph import NetGraph
from growth.ops import (
    deepenable,
    deepening_cost,
    feature_axes,
    find_group,
    net2deeper,
    net2wider,
    not_resizable,
    prune_units,
    resizable,
    widening_cost,
)

pytestmark = pytest.mark.usefixtures("single_thread")
TOL = 1e-5


def preserved(parent: NetGraph, child: NetGraph) -> float:
    shape = parent.shape(parent.input_node())
    x = torch.randn((6, *shape), generator=torch.Generator().manual_seed(3))
    return max_rel_error(outputs(parent, x), outputs(child, x))


def _head(g: NetGraph, src: str) -> None:
    g.add("flat", "flatten", [src])
    g.add("fc", "linear", ["flat"], out_features=3)
    g.add_output("out", "fc")


def depthwise_net(multiplier: int = 1) -> NetGraph:
    g = NetGraph()
    g.add_input("x", (2, 5, 5))
    g.add("c", "conv2d", ["x"], out_channels=3, kernel_size=1)
    g.add("bn", "batchnorm2d", ["c"])
    g.add("r", "relu6", ["bn"])
    g.add("dw", "conv2d", ["r"], out_channels=3 * multiplier, kernel_size=3, padding=1, groups=3)
    g.add("dw_bn", "batchnorm2d", ["dw"])
    g.add("dw_act", "hardswish", ["dw_bn"])
    g.add("p", "conv2d", ["dw_act"], out_channels=2, kernel_size=1)
    _head(g, "p")
    return randomize(g, 4)


@pytest.mark.parametrize("multiplier", [1, 2])
def test_widening_through_a_depthwise_conv_grows_its_groups(multiplier: int) -> None:
    g = depthwise_net(multiplier)
    group = find_group(g, "c")
    assert group.region == ("bn", "r", "dw", "dw_bn", "dw_act") and group.consumers == ("p",)
    result = net2wider(g, "c", 5, seed=2)
    idx = result.record.index_maps["c.weight"][0]
    dw = result.graph.node("dw")
    assert dw.attrs["groups"] == dw.attrs["in_channels"] == 5
    assert dw.attrs["out_channels"] == 5 * multiplier
    rows = [src * multiplier + k for src in idx for k in range(multiplier)]  # by hand
    assert result.record.index_maps["dw.weight"] == {0: rows}
    assert torch.equal(dw.tensors["weight"], g.node("dw").tensors["weight"][rows])
    assert result.record.index_maps["dw_bn.running_var"] == {0: rows}
    assert preserved(g, result.graph) <= TOL


def test_pruning_through_a_depthwise_conv() -> None:
    g = depthwise_net()
    result = prune_units(g, "c", 2, scores=torch.tensor([3.0, 1.0, 2.0]))
    assert result.graph.node("dw").attrs["groups"] == 2
    assert result.record.index_maps["dw.weight"] == {0: [0, 2]}
    result.graph.validate()


def grouped_net(out_per_group: int = 4) -> NetGraph:
    """ResNeXt's bottleneck core: a 1x1 conv feeding a grouped 3x3 conv (2 groups of 4)."""
    g = NetGraph()
    g.add_input("x", (3, 5, 5))
    g.add("c", "conv2d", ["x"], out_channels=8, kernel_size=1)
    g.add("bn", "batchnorm2d", ["c"])
    g.add("r", "relu", ["bn"])
    g.add("gc", "conv2d", ["r"], out_channels=2 * out_per_group, kernel_size=3, padding=1,
          groups=2)
    g.add("gc_bn", "batchnorm2d", ["gc"])
    g.add("gc_act", "relu", ["gc_bn"])
    g.add("p", "conv2d", ["gc_act"], out_channels=2, kernel_size=1)
    _head(g, "p")
    return randomize(g, 11)


@pytest.mark.parametrize("out_per_group", [4, 6])
def test_widening_through_a_grouped_conv_copies_whole_groups(out_per_group: int) -> None:
    g = grouped_net(out_per_group)
    assert find_group(g, "c").block == 4
    result = net2wider(g, "c", 16, seed=3)  # two more groups of 4
    idx = result.record.index_maps["c.weight"][0]
    assert idx[:8] == list(range(8))
    copied = [idx[8] // 4, idx[12] // 4]  # the old group each new group copies
    assert idx[8:] == [q * 4 + k for q in copied for k in range(4)]
    gc = result.graph.node("gc")
    assert (gc.attrs["groups"], gc.attrs["in_channels"]) == (4, 16)
    rows = list(range(2 * out_per_group)) + [q * out_per_group + k for q in copied
                                             for k in range(out_per_group)]
    assert result.record.index_maps["gc.weight"] == {0: rows}
    assert preserved(g, result.graph) <= TOL


def test_pruning_through_a_grouped_conv_drops_whole_groups() -> None:
    g = grouped_net()
    result = prune_units(g, "c", 4, scores=torch.tensor([1.0, 1, 1, 1, 2, 2, 2, 0]))
    assert result.record.index_maps["c.weight"] == {0: [4, 5, 6, 7]}
    assert result.graph.node("gc").attrs["groups"] == 1
    result.graph.validate()


def test_a_depthwise_conv_is_not_a_layer_to_resize_itself() -> None:
    with pytest.raises(OperatorError, match="net2wider\\('dw'\\).*depthwise.*produces 'r' instead"):
        net2wider(depthwise_net(), "dw", 6)


def se_net(spatial_gate: bool = False) -> NetGraph:
    """c -> relu -> (avgpool -> f1 -> relu -> f2 -> sigmoid) * features -> p: an SE block."""
    g = NetGraph()
    g.add_input("x", (2, 4, 4))
    g.add("c", "conv2d", ["x"], out_channels=4, kernel_size=3, padding=1)
    g.add("r", "relu", ["c"])
    g.add("pool", "adaptive_avgpool2d", ["r"], output_size=1)
    g.add("f1", "conv2d", ["pool"], out_channels=2, kernel_size=1)
    g.add("f1_act", "silu", ["f1"])
    g.add("f2", "conv2d", ["f1_act"], out_channels=4, kernel_size=1)
    g.add("gate", "hardsigmoid", ["f2"])
    g.add("se", "mul", ["gate", "r"])
    src = "se"
    if spatial_gate:  # a (1, H, W) map broadcast over every channel
        g.add("s", "conv2d", ["se"], out_channels=1, kernel_size=1)
        g.add("s_act", "sigmoid", ["s"])
        src = g.add("sp", "mul", ["se", "s_act"])
    g.add("p", "conv2d", [src], out_channels=3, kernel_size=1)
    _head(g, "p")
    return randomize(g, 5)


@pytest.mark.parametrize("node", ["c", "f2"])
def test_a_gate_and_the_features_it_scales_widen_with_one_mapping(node: str) -> None:
    g = se_net()
    group = find_group(g, node)
    assert group.producers == ("c", "f2") and set(group.consumers) == {"f1", "p"}
    result = net2wider(g, node, 7, seed=3)
    maps = result.record.index_maps
    assert maps["c.weight"][0] == maps["f2.weight"][0] == maps["p.weight"][1]
    assert preserved(g, result.graph) <= TOL


def test_a_gate_broadcast_over_the_channels_does_not_change() -> None:
    g = se_net(spatial_gate=True)
    group = find_group(g, "c")
    assert group.producers == ("c", "f2") and set(group.consumers) == {"f1", "s", "p"}
    result = net2wider(g, "c", 6, seed=1)
    assert result.graph.node("s").attrs == {**g.node("s").attrs, "in_channels": 6}
    assert preserved(g, result.graph) <= TOL
    with pytest.raises(OperatorError, match="single channel is broadcast over the 4 channels "
                       "of mul 'sp'"):
        net2wider(g, "s", 2)


def test_pruning_dead_units_through_a_gate_keeps_the_function() -> None:
    g = se_net()
    p = g.node("p")
    p.tensors = {**p.tensors, "weight": p.tensors["weight"].clone()}
    p.tensors["weight"][:, 1] = 0  # unit 1 of the gated features feeds nothing
    f1 = g.node("f1")
    f1.tensors = {**f1.tensors, "weight": f1.tensors["weight"].clone()}
    f1.tensors["weight"][:, 1] = 0
    result = prune_units(g, "c", 3, scores=torch.tensor([1.0, 0.0, 1.0, 1.0]))
    assert result.record.index_maps["f2.weight"] == {0: [0, 2, 3]}
    assert preserved(g, result.graph) <= TOL


def convnext_block() -> NetGraph:
    """ConvNeXt's block: depthwise conv, channels-last MLP, layer scale, residual add."""
    g = NetGraph()
    g.add_input("x", (3, 4, 4))
    g.add("stem", "conv2d", ["x"], out_channels=4, kernel_size=1)
    g.add("dw", "conv2d", ["stem"], out_channels=4, kernel_size=3, padding=1, groups=4)
    g.add("last", "permute", ["dw"], dims=[1, 2, 0])
    g.add("l1", "linear", ["last"], out_features=8)
    g.add("act", "gelu", ["l1"])
    g.add("l2", "linear", ["act"], out_features=4)
    g.add("first", "permute", ["l2"], dims=[2, 0, 1])
    g.add("gamma", "scale", ["first"], shape=[4, 1, 1])
    g.add("drop", "stochastic_depth", ["gamma"], p=0.1)
    g.add("res", "add", ["drop", "stem"])
    g.add("tail", "conv2d", ["res"], out_channels=2, kernel_size=1)
    g.add("mean", "mean", ["tail"], dims=[1, 2])
    g.add("fc", "linear", ["mean"], out_features=3)
    g.add_output("out", "fc")
    return randomize(g, 6)


def test_channels_last_mlp_and_a_residual_through_layer_scale_widen_exactly() -> None:
    g = convnext_block()
    axes = feature_axes(g)
    assert (axes["dw"], axes["last"], axes["l1"], axes["first"], axes["mean"]) == (0, 2, 2, 0, 0)
    hidden = net2wider(g, "l1", 11, seed=1)
    assert hidden.graph.shape("act") == (4, 4, 11)
    assert preserved(g, hidden.graph) <= TOL
    group = find_group(g, "stem")
    assert group.producers == ("stem", "l2") and set(group.consumers) == {"l1", "tail"}
    result = net2wider(g, "stem", 6, seed=2)
    idx = result.record.index_maps["stem.weight"][0]
    assert result.record.index_maps["gamma.weight"] == {0: idx}
    assert torch.equal(result.graph.node("gamma").tensors["weight"],
                       g.node("gamma").tensors["weight"][idx])
    assert preserved(g, result.graph) <= TOL


def test_deepening_inside_channels_last_blocks_inserts_a_linear_layer() -> None:
    g = convnext_block()
    result = net2deeper(g, "act")
    assert result.graph.node("act_deep1").kind == "linear"
    assert result.graph.shape("act_deep1") == (4, 4, 8)
    assert preserved(g, result.graph) <= TOL
    conv = net2deeper(g, "dw", kernel_size=3, batchnorm=True,
                      sample=torch.randn(4, 3, 4, 4))
    assert conv.graph.node("dw_deep1").kind == "conv2d"
    assert preserved(g, conv.graph) <= TOL
    with pytest.raises(OperatorError, match="net2deeper after 'act'.*batchnorm.*last axis"):
        net2deeper(g, "act", batchnorm=True, sample=torch.randn(4, 3, 4, 4))


def vit_like(norm: bool = False, attention: bool = False) -> NetGraph:
    """Patch embedding, reshape to tokens, class token, positional embedding, token MLP."""
    g = NetGraph()
    g.add_input("x", (3, 4, 4))
    g.add("patch", "conv2d", ["x"], out_channels=6, kernel_size=2, stride=2)
    g.add("seq", "reshape", ["patch"], shape=[6, 4])
    g.add("tokens", "permute", ["seq"], dims=[1, 0])
    g.add("cls", "class_token", ["tokens"], shape=[1, 1, 6])
    src = g.add("pos", "offset", ["cls"], shape=[1, 5, 6])
    if norm:
        src = g.add("ln", "layernorm", [src], normalized_shape=[6])
    if attention:
        src = g.add("attn", "self_attention", [src], embed_dim=6, num_heads=2)
    g.add("mlp", "linear", [src], out_features=8)
    g.add("act", "gelu", ["mlp"])
    g.add("first", "getitem", ["act"], index=[0])
    g.add("head", "linear", ["first"], out_features=3)
    g.add_output("out", "head")
    return randomize(g, 7)


def test_tokens_keep_their_class_token_and_embedding_per_channel() -> None:
    g = vit_like()
    result = net2wider(g, "patch", 9, seed=4)
    idx = result.record.index_maps["patch.weight"][0]
    assert result.graph.node("seq").attrs["shape"] == [9, 4]
    assert result.record.index_maps["cls.weight"] == {2: idx}
    assert result.record.index_maps["pos.weight"] == {2: idx}
    assert torch.equal(result.graph.node("pos").tensors["weight"],
                       g.node("pos").tensors["weight"][:, :, idx])
    assert preserved(g, result.graph) <= TOL
    mlp = net2wider(g, "mlp", 12, seed=5)
    assert mlp.record.index_maps["head.weight"] == {1: mlp.record.index_maps["mlp.weight"][0]}
    assert preserved(g, mlp.graph) <= TOL
    deeper = net2deeper(g, "pos")
    assert deeper.graph.node("pos_deep1").attrs["in_features"] == 6
    assert preserved(g, deeper.graph) <= TOL


def test_a_norm_over_the_channels_widens_by_whole_copies_of_every_unit() -> None:
    g = vit_like(norm=True)
    with pytest.raises(OperatorError, match="net2wider\\('patch'\\): its channels reach 'ln', "
                       "which normalises over them.*multiple of 6: use 12 instead of 8"):
        net2wider(g, "patch", 8)
    result = net2wider(g, "patch", 18, seed=3)
    tiled = list(range(6)) * 3  # every unit copied twice, whatever the seed
    assert result.record.index_maps["patch.weight"] == {0: tiled}
    assert result.record.index_maps["ln.weight"] == {0: tiled}
    assert result.graph.node("ln").attrs["normalized_shape"] == [18]
    assert result.record.divisors["mlp.weight"] == {1: [3.0] * 18}
    assert preserved(g, result.graph) <= TOL
    pruned = prune_units(g, "patch", 4)  # pruning changes the function anyway: any units
    assert pruned.graph.node("ln").attrs["normalized_shape"] == [4]
    assert "patch" in resizable(g) and "mlp" in resizable(g)


def test_attention_reading_a_width_it_does_not_write_refuses_naming_it() -> None:
    g = vit_like(attention=True)
    for op, call in (("net2wider", lambda: net2wider(g, "patch", 8)),
                     ("prune_units", lambda: prune_units(g, "patch", 4))):
        with pytest.raises(OperatorError) as info:
            call()
        assert str(info.value) == (f"{op}('patch'): cannot resize 'patch': self_attention "
                                   "'attn' reads and writes one width (embed_dim), but only its "
                                   "input is in this group")
    assert "patch" in not_resizable(g) and "patch" not in resizable(g)
    assert "mlp" in resizable(g)


def test_flatten_of_channels_last_maps_expands_each_channel_where_it_lies() -> None:
    g = NetGraph()
    g.add_input("x", (2, 3, 3))
    g.add("t", "permute", ["x"], dims=[1, 2, 0])
    g.add("l", "linear", ["t"], out_features=4)
    g.add("r", "relu", ["l"])
    g.add("f", "flatten", ["r"])
    g.add("fc", "linear", ["f"], out_features=2)
    g.add_output("out", "fc")
    randomize(g, 8)
    result = net2wider(g, "l", 5, seed=0)
    idx = result.record.index_maps["l.weight"][0]
    cols = [p * 4 + c for p in range(9) for c in idx]  # flat position of (h, w, c) is p*C + c
    assert result.record.index_maps["fc.weight"] == {1: cols}
    assert preserved(g, result.graph) <= TOL


def test_concat_along_a_spatial_dim_makes_its_operands_one_group() -> None:
    g = NetGraph()
    g.add_input("x", (2, 4, 4))
    g.add("a", "conv2d", ["x"], out_channels=3, kernel_size=1)
    g.add("b", "conv2d", ["x"], out_channels=3, kernel_size=3, padding=1)
    g.add("cat", "concat", ["a", "b"], dim=1)  # (3, 8, 4): stacked along H
    g.add("c", "conv2d", ["cat"], out_channels=2, kernel_size=1)
    _head(g, "c")
    randomize(g, 9)
    assert find_group(g, "a").producers == ("a", "b")
    assert preserved(g, net2wider(g, "b", 5, seed=1).graph) <= TOL


def test_shuffles_grouped_convs_and_split_channels_are_refused_with_the_reason() -> None:
    g = NetGraph()
    g.add_input("x", (4, 4, 4))
    g.add("a", "conv2d", ["x"], out_channels=4, kernel_size=1)
    g.add("sh", "channel_shuffle", ["a"], groups=2)
    g.add("b", "conv2d", ["x"], out_channels=4, kernel_size=1)
    g.add("part", "getitem", ["b"], index=[[0, 2, None]])
    g.add("d", "conv2d", ["x"], out_channels=4, kernel_size=1)
    g.add("split", "reshape", ["d"], shape=[2, 2, 4, 4])
    g.add("join", "reshape", ["split"], shape=[4, 4, 4])
    g.add("cat", "concat", ["sh", "part", "join"])
    _head(g, "cat")
    reasons = not_resizable(randomize(g, 1))
    assert "interleaves the channels" in reasons["a"] and "'sh'" in reasons["a"]
    assert "slices the channels" in reasons["b"]
    assert "splits the channel axis" in reasons["d"]
    assert set(resizable(g)) == set()
    assert "d" not in deepenable(g) or feature_axes(g)["split"] is None
    with pytest.raises(OperatorError, match="net2deeper after 'split'.*no single axis"):
        net2deeper(g, "split")


def test_eligibility_lists_agree_with_the_operators() -> None:
    for g in (depthwise_net(2), se_net(True), convnext_block(), vit_like(True, True)):
        shapes = g.shapes()
        producers = [n for n in shapes if g.node(n).kind in ("linear", "conv2d")
                     and not (g.node(n).attrs.get("groups", 1) > 1)]
        ok, refused = resizable(g), not_resizable(g)
        assert set(ok) | set(refused) >= set(producers) and not set(ok) & set(refused)
        for n in ok:
            assert preserved(g, net2wider(g, n, find_group(g, n).width + 2).graph) <= TOL
        for n, why in refused.items():  # the operator refuses with the listed reason
            with pytest.raises(OperatorError) as info:
                net2wider(g, n, 99)
            assert str(info.value).replace("net2wider(", "resize(", 1) == why
        for n in random.Random(0).sample(deepenable(g), 4):
            assert preserved(g, net2deeper(g, n, kernel_size=1).graph) <= TOL


def test_an_identity_layer_after_a_huge_flatten_needs_permission() -> None:
    g = NetGraph()
    g.add_input("x", (512, 7, 7))
    g.add("flat", "flatten", ["x"])
    g.add("fc", "linear", ["flat"], out_features=10)
    g.add_output("out", "fc")
    want = 25088 * 25088 + 25088  # an identity matrix and a bias
    assert deepening_cost(25088) == want
    with pytest.raises(OperatorError, match=f"net2deeper after 'flat'.*{want:,} parameters.*"
                       "limit of 32,000,000.*max_new_params"):
        net2deeper(g, "flat")  # refused before any tensor is built
    assert "flat" not in deepenable(g) and "x" in deepenable(g)
    assert "flat" in deepenable(g, max_new_params=None)


def test_a_widening_over_the_limit_is_refused_until_allowed() -> None:
    g = NetGraph()
    g.add_input("x", (3, 7, 7))
    g.add("c", "conv2d", ["x"], out_channels=8, kernel_size=3, padding=1)
    g.add("bn", "batchnorm2d", ["c"])
    g.add("flat", "flatten", ["bn"])
    g.add("fc", "linear", ["flat"], out_features=100)
    g.add("out_fc", "linear", ["fc"], out_features=2)
    g.add_output("out", "out_fc")
    randomize(g, 2)
    added = 8 * (3 * 9 + 1) + 8 * 2 + 8 * 49 * 100  # conv rows, BN affine, fc columns
    assert widening_cost(g, "c", 16) == added
    with pytest.raises(OperatorError, match=f"net2wider\\('c', width=16\\) would add {added:,}"):
        net2wider(g, "c", 16, max_new_params=added - 1)
    result = net2wider(g, "c", 16, max_new_params=added)
    assert result.graph.param_count() - g.param_count() == added
    assert widening_cost(g, "c", 4) == -added // 2


@settings(deadline=None, derandomize=True, max_examples=20,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(graph=modern_nets(), data=st.data())
def test_random_modern_networks_keep_their_function_under_chains(graph: NetGraph,
                                                                 data: st.DataObject) -> None:
    """Widenings (whole groups where grouped convs read the channels), deepenings and prunings
    of random depthwise / gated / grouped / channels-last networks: every step is pure, and the
    exact ones keep the function."""
    x = random_input(graph, batch=4, seed=1)
    before, current = outputs(graph, x), graph
    for _ in range(data.draw(st.integers(1, 6), label="steps")):
        snap = snapshot(current)
        wide = resizable(current)
        if wide and data.draw(st.booleans(), label="widen"):
            group = find_group(current, data.draw(st.sampled_from(wide), label="node"))
            width = group.width + group.block * data.draw(st.integers(1, 2), label="blocks")
            result = net2wider(current, group.node, width, seed=data.draw(st.integers(0, 9)))
        else:
            after = data.draw(st.sampled_from(deepenable(current)), label="after")
            result = net2deeper(current, after, kernel_size=1)
        assert_unchanged(current, snap)
        result.graph.validate()
        current = result.graph
    assert max_rel_error(before, outputs(current, x)) <= TOL
    wide = resizable(current)
    if wide:  # pruning a block away leaves a valid, runnable network
        group = find_group(current, data.draw(st.sampled_from(wide), label="prune node"))
        if group.width > group.block:
            pruned = prune_units(current, group.node, group.width - group.block).graph
            pruned.validate()
            assert outputs(pruned, x)[current.heads[0]].shape == before[graph.heads[0]].shape


# ---- nodes the walk crosses or refuses, one kind at a time ----------------------------------
def _refusal(g: NetGraph, node: str) -> str:
    with pytest.raises(OperatorError) as info:
        net2wider(g, node, 5)
    return str(info.value)


def _walk_through(kind: str, **attrs) -> NetGraph:
    """x (2, 3, 3) -> c (3 channels) -> one `kind` node -> p -> head."""
    g = NetGraph()
    g.add_input("x", (2, 3, 3))
    g.add("c", "conv2d", ["x"], out_channels=3, kernel_size=1)
    g.add("k", kind, ["c"], **attrs)
    if len(g.shape("k")) == 3:
        g.add("p", "conv2d", ["k"], out_channels=2, kernel_size=1)
        _head(g, "p")
    else:
        _head(g, "k")
    return randomize(g, 12)


@pytest.mark.parametrize("kind,attrs", [
    ("pad", {"pad": [1, 0, 0, 2], "value": 0.5}),  # W before by 1, H after by 2
    ("mean", {"dims": [-2, -1]}),  # a global average pool written as a mean
    ("mean", {"dims": [2], "keepdim": True}),
    ("getitem", {"index": [[None, None, None], [1, 3, None]]}),  # channels taken whole
    ("getitem", {"index": [[None, None, None], 2]}),  # one row, H = 2: (C, W)
    ("scale", {"shape": [1, 1, 1]}),  # one gate shared by every channel
    ("scale", {"shape": [3]}),  # one value per column: broadcast along W, not the channels
], ids=["pad-spatial", "mean-spatial", "mean-keepdim", "getitem-whole", "getitem-row",
        "scale-scalar", "scale-per-column"])
def test_nodes_that_leave_the_channels_whole_are_crossed_exactly(kind: str, attrs) -> None:
    g = _walk_through(kind, **attrs)
    group = find_group(g, "c")
    assert group.region[0] == "k" and group.consumers == (("p",) if "p" in g else ("fc",))
    result = net2wider(g, "c", 5, seed=1)
    assert result.graph.shape("k")[0] == 5
    assert not any(name.startswith("k.") for name in result.record.resized)  # nothing to gather
    assert preserved(g, result.graph) <= TOL


@pytest.mark.parametrize("kind,attrs,why", [
    ("pad", {"pad": [0, 0, 0, 0, 0, 1]}, "pads along the channels"),
    ("pad", {"pad": [0, 0, 0, 0, 1, 0]}, "pads along the channels"),
    ("mean", {"dims": [-3], "keepdim": True}, "averages over the channels"),
    ("getitem", {"index": [1]}, "slices the channels"),
    ("getitem", {"index": [[0, 2, None]]}, "slices the channels"),
], ids=["pad-after", "pad-before", "mean-channels", "getitem-pick", "getitem-slice"])
def test_nodes_that_change_the_channel_axis_refuse_with_the_whole_reason(kind, attrs, why):
    g = _walk_through(kind, **attrs)
    assert _refusal(g, "c") == f"net2wider('c'): cannot resize 'c': its channels reach {kind} " \
        f"'k', which {why}"


def test_a_class_token_prepended_along_the_channels_is_refused() -> None:
    g = NetGraph()
    g.add_input("x", (3, 4, 4))
    g.add("patch", "conv2d", ["x"], out_channels=6, kernel_size=2, stride=2)
    g.add("seq", "reshape", ["patch"], shape=[6, 4])  # channels stay on axis 0
    g.add("cls", "class_token", ["seq"], shape=[1, 1, 4])  # (7, 4): a token row per channel
    g.add("mlp", "linear", ["cls"], out_features=5)
    g.add("first", "getitem", ["mlp"], index=[0])
    g.add("head", "linear", ["first"], out_features=2)
    g.add_output("out", "head")
    randomize(g, 3)
    assert _refusal(g, "patch") == ("net2wider('patch'): cannot resize 'patch': its channels "
                                    "reach class_token 'cls', which prepends tokens along the "
                                    "channel axis")


def test_reshapes_that_split_channels_give_their_whole_reason() -> None:
    g = _walk_through("reshape", shape=[3, 9])
    assert feature_axes(g)["k"] == 0
    g = NetGraph()
    g.add_input("x", (2, 3, 3))
    g.add("c", "conv2d", ["x"], out_channels=4, kernel_size=1)
    g.add("k", "reshape", ["c"], shape=[2, 18])
    g.add("fc", "linear", ["k"], out_features=2)
    g.add_output("out", "fc")
    assert _refusal(g, "c") == ("net2wider('c'): cannot resize 'c': its channels reach reshape "
                                "'k', which splits the channel axis or merges it with another")


def test_indexing_moves_or_drops_the_feature_axis_by_hand() -> None:
    g = NetGraph()
    g.add_input("x", (2, 3, 3))
    g.add("c", "conv2d", ["x"], out_channels=4, kernel_size=1)  # (4, 3, 3), channels on 0
    index = {"whole": [[None, None, None], [1, 3, None]], "row": [[0, 4, 1], 2],
             "sliced": [[0, 2, None]], "stepped": [[0, 4, 2]], "picked": [1],
             "shifted": [[1, 4, 1]]}
    for name, idx in index.items():
        g.add(name, "getitem", ["c"], index=idx)
    g.add("t", "permute", ["c"], dims=[1, 2, 0])  # (3, 3, 4), channels last
    g.add("t_row", "getitem", ["t"], index=[1])  # (3, 4): channels move to axis 1
    g.add("t_cut", "getitem", ["t"], index=[1, [None, None, None], [0, 3, None]])
    axes = feature_axes(g)
    assert {n: axes[n] for n in (*index, "t", "t_row", "t_cut")} == {
        "whole": 0, "row": 0, "sliced": None, "stepped": None, "picked": None, "shifted": None,
        "t": 2, "t_row": 1, "t_cut": None}


def test_the_cost_of_widening_through_a_grouped_conv_by_hand() -> None:
    g = grouped_net()
    # c: 8 -> 16 rows of 3 weights + bias; bn: 8 more gammas and betas (running stats are
    # buffers); gc: 2 more groups of 4 filters of 4 x 3 x 3 + bias; gc_bn: 8 more affine pairs;
    # p: 8 more input columns of its 2 filters
    added = 8 * (3 + 1) + 8 * 2 + 8 * (4 * 9 + 1) + 8 * 2 + 2 * 8
    assert widening_cost(g, "c", 16) == added
    assert net2wider(g, "c", 16, seed=0).graph.param_count() - g.param_count() == added
    with pytest.raises(OperatorError) as info:
        widening_cost(g, "c", 7)
    assert str(info.value).startswith("resize('c'): its channels feed grouped convolutions")


@pytest.mark.parametrize("index", [[[0, 3, 1]], [[0, 3, None], [1, 3, None]], [[None, 3, None]],
                                   [[None, None, None], 2]])
def test_a_whole_channel_slice_with_explicit_bounds_spans_the_new_width(index) -> None:
    g = _walk_through("getitem", index=index)  # 0:3 of 3 channels takes them all
    for width in (5, 2):
        result = (net2wider(g, "c", width, seed=2) if width > 3 else
                  prune_units(g, "c", width, scores=torch.tensor([3.0, 1.0, 2.0])))
        result.graph.validate()
        assert result.graph.shape("k") == (width, *g.shape("k")[1:])
        if width > 3:
            assert preserved(g, result.graph) <= TOL


def test_one_channel_operands_of_a_merge_grow_together() -> None:
    g = NetGraph()
    g.add_input("x", (2, 3, 3))
    g.add("a", "conv2d", ["x"], out_channels=1, kernel_size=1)
    g.add("b", "conv2d", ["x"], out_channels=1, kernel_size=3, padding=1)
    g.add("s", "add", ["a", "b"])  # (1, 3, 3): no broadcast, both operands hold the channel
    g.add("p", "conv2d", ["s"], out_channels=2, kernel_size=1)
    _head(g, "p")
    randomize(g, 4)
    assert find_group(g, "a").producers == ("a", "b")
    result = net2wider(g, "a", 3, seed=0)
    assert result.graph.shape("s") == (3, 3, 3)
    assert preserved(g, result.graph) <= TOL
    stacked = NetGraph()  # one channel each, stacked along H: still one group
    stacked.add_input("x", (2, 3, 3))
    stacked.add("a", "conv2d", ["x"], out_channels=1, kernel_size=1)
    stacked.add("b", "conv2d", ["x"], out_channels=1, kernel_size=1)
    stacked.add("cat", "concat", ["a", "b"], dim=1)
    _head(stacked, "cat")
    randomize(stacked, 5)
    assert find_group(stacked, "a").producers == ("a", "b")
    assert preserved(stacked, net2wider(stacked, "a", 2, seed=0).graph) <= TOL


def test_a_one_channel_gate_over_two_channels_cannot_grow() -> None:
    g = NetGraph()
    g.add_input("x", (2, 3, 3))
    g.add("c", "conv2d", ["x"], out_channels=2, kernel_size=1)
    g.add("gate", "conv2d", ["x"], out_channels=1, kernel_size=1)
    g.add("m", "mul", ["c", "gate"])  # (2, 3, 3): the gate's channel is broadcast
    g.add("p", "conv2d", ["m"], out_channels=2, kernel_size=1)
    _head(g, "p")
    randomize(g, 4)
    assert find_group(g, "c").producers == ("c",)
    with pytest.raises(OperatorError, match="single channel is broadcast over the 2 channels of "
                       "mul 'm'"):
        net2wider(g, "gate", 2)


@pytest.mark.parametrize("join", ["add3", "gated", "stacked"])
def test_every_producer_behind_a_merge_joins_the_group(join: str) -> None:
    """A three-input add, a gated branch (mul) and an H-stacked pair (concat on a spatial dim)
    added to another branch: widening `c` must widen a, b and c with one mapping."""
    g = NetGraph()
    g.add_input("x", (2, 4, 4))
    g.add("a", "conv2d", ["x"], out_channels=3, kernel_size=1)
    g.add("b", "conv2d", ["x"], out_channels=3, kernel_size=3, padding=1)
    if join != "stacked":
        g.add("c", "conv2d", ["x"], out_channels=3, kernel_size=1)
    if join == "add3":
        g.add("s", "add", ["a", "b", "c"])
    elif join == "gated":
        g.add("gate", "sigmoid", ["b"])
        g.add("m", "mul", ["a", "gate"])
        g.add("s", "add", ["m", "c"])
    else:
        g.add("xx", "concat", ["x", "x"], dim=1)  # (2, 8, 4)
        g.add("c", "conv2d", ["xx"], out_channels=3, kernel_size=1)
        g.add("ab", "concat", ["a", "b"], dim=1)  # (3, 8, 4): stacked along H
        g.add("s", "add", ["ab", "c"])
    g.add("p", "conv2d", ["s"], out_channels=2, kernel_size=1)
    _head(g, "p")
    randomize(g, 6)
    assert find_group(g, "c").producers == ("a", "b", "c")
    result = net2wider(g, "c", 5, seed=3)
    maps = result.record.index_maps
    assert maps["a.weight"][0] == maps["b.weight"][0] == maps["c.weight"][0] == maps[
        "p.weight"][1]
    assert preserved(g, result.graph) <= TOL


def test_deepenable_lists_every_node_that_fits_the_kernel_and_the_limit() -> None:
    g = residual()
    maps = ["x", "c0", "bn0", "r0", "c1", "bn1", "add1", "r1", "inner", "ri", "c2", "add2", "r2"]
    assert deepenable(g, kernel_size=3) == maps + ["flat", "fc"]  # gap's 1x1 map is too small
    assert deepenable(g, kernel_size=1) == deepenable(g) == maps + ["gap", "flat", "fc"]
    # a 3x3 identity on 4 channels holds 16 * 9 + 4 = 148 parameters, on 3 channels 84; the
    # vectors get linear identities: 4 * 4 + 4 = 20 (flat) and 3 * 3 + 3 = 12 (fc)
    assert deepenable(g, kernel_size=3, max_new_params=100) == ["x", "inner", "ri", "flat", "fc"]
    assert deepenable(g, kernel_size=3, max_new_params=148) == maps + ["flat", "fc"]
    assert deepenable(g, kernel_size=3, max_new_params=20) == ["flat", "fc"]  # kernel 1 there
    with pytest.raises(OperatorError, match="would add 148 parameters, over the limit of 147"):
        net2deeper(g, "r1", kernel_size=3, max_new_params=147)
    assert net2deeper(g, "r1", kernel_size=3, max_new_params=148).graph.param_count() == \
        g.param_count() + 148


def test_deepening_cost_by_hand() -> None:
    assert deepening_cost(4) == 4 * 4 + 4
    assert deepening_cost(4, 3) == 4 * 4 * 9 + 4
    assert deepening_cost(4, 3, batchnorm=True) == 4 * 4 * 9 + 4 + 2 * 4
    assert deepening_cost(3, 1, True) == 9 + 3 + 6


def test_the_size_guard_counts_the_new_batchnorm() -> None:
    g = mlp(hidden=3)
    x = torch.randn(4, 2)
    with pytest.raises(OperatorError, match=r"would add 18 parameters, over the limit of 12;"):
        net2deeper(g, "r1", batchnorm=True, sample=x, max_new_params=12)  # 9 + 3 + BN's 6
    result = net2deeper(g, "r1", batchnorm=True, sample=x, max_new_params=18)
    assert result.graph.param_count() - g.param_count() == 18


def test_deepenable_goes_on_past_nodes_without_a_single_feature_axis() -> None:
    g = NetGraph()
    g.add_input("x", (4, 3, 3))
    g.add("a", "conv2d", ["x"], out_channels=4, kernel_size=1)
    g.add("split", "reshape", ["a"], shape=[2, 2, 3, 3])  # no single feature axis
    g.add("f", "flatten", ["split"])
    g.add("fc", "linear", ["f"], out_features=2)
    g.add_output("out", "fc")
    assert deepenable(g) == ["x", "a", "f", "fc"]


def test_deepenable_prices_token_identities_on_their_features() -> None:
    g = NetGraph()
    g.add_input("x", (5, 2))  # 5 tokens of 2 features
    g.add("l", "linear", ["x"], out_features=3)
    g.add("first", "getitem", ["l"], index=[0])
    g.add("fc", "linear", ["first"], out_features=2)
    g.add_output("out", "fc")
    assert feature_axes(g)["x"] == 1 and feature_axes(mlp())["x"] == 0
    # identities of 2 * 2 + 2 = 6 (x), 3 * 3 + 3 = 12 (l, first), 2 * 2 + 2 = 6 (fc)
    assert deepenable(g, max_new_params=6) == ["x", "fc"]
    assert deepenable(g, max_new_params=12) == ["x", "l", "first", "fc"]
    assert net2deeper(g, "x", max_new_params=6).record.added_nodes == ["x_deep1"]


def test_a_kernel_taller_than_the_map_is_refused() -> None:
    g = NetGraph()
    g.add_input("x", (2, 2, 5))
    g.add("c", "conv2d", ["x"], out_channels=2, kernel_size=1)
    _head(g, "c")
    assert deepenable(g, kernel_size=3) == ["flat", "fc"]
    with pytest.raises(OperatorError) as info:
        net2deeper(g, "c", kernel_size=3)
    assert str(info.value) == ("net2deeper after 'c': kernel_size 3 is larger than its 2x5 map; "
                               "use kernel_size <= 2")


def test_merges_of_different_layouts_have_no_single_feature_axis() -> None:
    g = NetGraph()
    g.add_input("x", (4, 4, 4))
    g.add("a", "conv2d", ["x"], out_channels=4, kernel_size=1)  # channels on axis 0
    g.add("t", "permute", ["x"], dims=[1, 2, 0])
    g.add("l", "linear", ["t"], out_features=4)  # features on axis 2, same shape
    g.add("s", "add", ["a", "l"])
    g.add("m", "mul", ["a", "l"])
    g.add("cat", "concat", ["a", "l"], dim=1)
    g.add("same", "mul", ["a", "a"])
    g.add("part", "add", ["s", "a"])  # one operand without an axis
    axes = feature_axes(g)
    assert {n: axes[n] for n in ("s", "m", "cat", "same", "part")} == {
        "s": None, "m": None, "cat": None, "same": 0, "part": None}


def test_depthwise_convs_read_a_concat_and_several_group_widths_give_one_block() -> None:
    g = NetGraph()
    g.add_input("x", (2, 4, 4))
    g.add("a", "conv2d", ["x"], out_channels=2, kernel_size=1)
    g.add("b", "conv2d", ["x"], out_channels=2, kernel_size=1)
    g.add("cat", "concat", ["a", "b"])
    g.add("dw", "conv2d", ["cat"], out_channels=4, kernel_size=3, padding=1, groups=4)
    _head(g, "dw")
    randomize(g, 2)
    assert find_group(g, "a").block == 1  # one channel per group: any index keeps them whole
    assert preserved(g, net2wider(g, "a", 3, seed=1).graph) <= TOL
    g = NetGraph()
    g.add_input("x", (2, 4, 4))
    g.add("c", "conv2d", ["x"], out_channels=6, kernel_size=1)
    g.add("g2", "conv2d", ["c"], out_channels=3, kernel_size=1, groups=3)  # groups of 2
    g.add("g3", "conv2d", ["c"], out_channels=2, kernel_size=1, groups=2)  # groups of 3
    g.add("cat", "concat", ["g2", "g3"])
    _head(g, "cat")
    randomize(g, 3)
    assert find_group(g, "c").block == 6  # lcm(2, 3)
    result = net2wider(g, "c", 12, seed=4)
    assert preserved(g, result.graph) <= TOL


def test_widening_copies_every_group_of_a_grouped_conv_uniformly() -> None:
    g = grouped_net()
    idx = net2wider(g, "c", 8 + 4 * 20, seed=5).record.index_maps["c.weight"][0]
    copied = [idx[j] // 4 for j in range(8, len(idx), 4)]
    assert set(copied) == {0, 1} and 5 <= copied.count(0) <= 15


def test_means_move_or_drop_the_feature_axis_by_hand() -> None:
    g = NetGraph()
    g.add_input("x", (2, 3, 3))
    g.add("t", "permute", ["x"], dims=[1, 2, 0])  # (3, 3, 2): features last
    g.add("pool", "mean", ["t"], dims=[0, 1])  # (2,)
    g.add("rows", "mean", ["t"], dims=[0], keepdim=True)  # (1, 3, 2)
    g.add("cols", "mean", ["t"], dims=[-2])  # (3, 2)
    g.add("feats", "mean", ["t"], dims=[-1])  # (3, 3): averages the features away
    axes = feature_axes(g)
    assert {n: axes[n] for n in ("pool", "rows", "cols", "feats")} == {
        "pool": 0, "rows": 2, "cols": 1, "feats": None}


def test_a_depthwise_conv_keeps_the_space_plain_only_without_a_multiplier() -> None:
    def block(multiplier: int) -> NetGraph:
        g = NetGraph()
        g.add_input("x", (2, 4, 4))
        g.add("c", "conv2d", ["x"], out_channels=3, kernel_size=1)
        g.add("dw", "conv2d", ["c"], out_channels=3 * multiplier, kernel_size=3, padding=1,
              groups=3)
        g.add("e", "conv2d", ["x"], out_channels=3 * multiplier, kernel_size=1)
        g.add("s", "add", ["dw", "e"])
        g.add("p", "conv2d", ["s"], out_channels=2, kernel_size=1)
        _head(g, "p")
        return randomize(g, 8)

    g = block(1)  # dw's channels are c's channels: e joins the group, all change together
    assert find_group(g, "c").producers == ("c", "e")
    assert preserved(g, net2wider(g, "c", 5, seed=2).graph) <= TOL
    with pytest.raises(OperatorError) as info:  # two channels per input channel: no mapping
        net2wider(block(2), "c", 5)
    assert str(info.value) == ("net2wider('c'): cannot resize 'c': its channels reach add 's' "
                               "after a concat or flatten, where the other operands would need "
                               "a different mapping; resize a layer outside that path")


def test_deepenable_prices_channels_last_identities_on_their_channels() -> None:
    g = NetGraph()
    g.add_input("x", (2, 3, 5))
    g.add("t", "permute", ["x"], dims=[1, 2, 0])  # (3, 5, 2)
    g.add("l", "linear", ["t"], out_features=4)  # (3, 5, 4): 4 * 4 + 4 = 20
    g.add("f", "flatten", ["l"])
    g.add("fc", "linear", ["f"], out_features=2)
    g.add_output("out", "fc")
    # x and t: 2 channels (6); f: 60 features (3,660); fc: 2 features (6)
    assert deepenable(g, max_new_params=20) == ["x", "t", "l", "fc"]
