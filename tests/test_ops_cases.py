"""Hand-checkable cases: change records, residual groups, concat offsets, flatten expansion,
BatchNorm gathering and statistics, pruning."""

from __future__ import annotations

import contextlib
import signal

import pytest
import torch
from graphgen import (  # noqa: F401 (single_thread is a fixture)
    assert_unchanged,
    concat_net,
    max_rel_error,
    mlp,
    outputs,
    randomize,
    residual,
    single_thread,
    snapshot,
)

from growth.compile import compile_graph
from growth.errors import OperatorError
from growth.graph import NetGraph
from growth.ops import apply_index, find_group, net2deeper, net2wider, prune_units

TOL = 1e-5


pytestmark = pytest.mark.usefixtures("single_thread")


def x_for(graph: NetGraph, batch: int = 6) -> torch.Tensor:
    shape = graph.shape(graph.input_node())
    return torch.randn((batch, *shape), generator=torch.Generator().manual_seed(5))


def assert_preserved(parent: NetGraph, child: NetGraph) -> None:
    x = x_for(parent)
    assert max_rel_error(outputs(parent, x), outputs(child, x)) <= TOL


# ---- net2wider -------------------------------------------------------------------------------
def test_widening_record_and_tensors_on_a_small_mlp() -> None:
    g = mlp(hidden=3)
    result = net2wider(g, "l1", 5, seed=4)
    rec = result.record
    assert rec.op == "net2wider" and rec.params == {"node": "l1", "width": 5, "noise": 0.0,
                                                    "seed": 4}
    assert rec.resized == {"l1.weight": ((3, 2), (5, 2)), "l1.bias": ((3,), (5,)),
                           "l2.weight": ((2, 3), (2, 5))}
    idx = rec.index_maps["l1.weight"][0]
    assert idx[:3] == [0, 1, 2] and all(0 <= i < 3 for i in idx[3:])
    assert rec.index_maps == {"l1.weight": {0: idx}, "l1.bias": {0: idx}, "l2.weight": {1: idx}}
    assert rec.added == rec.removed == rec.added_nodes == rec.removed_nodes == []
    old, new = g.node("l1").tensors, result.graph.node("l1").tensors
    assert torch.equal(new["weight"], old["weight"][idx]) and torch.equal(new["bias"],
                                                                          old["bias"][idx])
    w2_old, w2_new = g.node("l2").tensors["weight"], result.graph.node("l2").tensors["weight"]
    for j, src in enumerate(idx):  # each copy carries 1/count of the old column
        count = idx.count(src)
        assert torch.allclose(w2_new[:, j] * count, w2_old[:, src])
    assert result.graph.node("l1").attrs["out_features"] == 5
    assert result.graph.node("l2").attrs["in_features"] == 5
    assert_preserved(g, result.graph)


def test_widening_with_chosen_copies_duplicates_those_units_exactly() -> None:
    g = mlp(hidden=3)
    result = net2wider(g, "l1", 6, copies=[2, 0, 2])
    rec = result.record
    assert rec.params["copies"] == [2, 0, 2]
    assert rec.index_maps["l1.weight"][0] == [0, 1, 2, 2, 0, 2]
    old, new = g.node("l1").tensors["weight"], result.graph.node("l1").tensors["weight"]
    assert torch.equal(new, old[[0, 1, 2, 2, 0, 2]])
    w2 = g.node("l2").tensors["weight"]
    divided = w2[:, [0, 1, 2, 2, 0, 2]] / torch.tensor([2.0, 1, 3, 3, 2, 3])
    assert torch.equal(result.graph.node("l2").tensors["weight"], divided)
    assert_preserved(g, result.graph)
    for bad in ([3, 0, 0], [0, 1], [0, 1, 2, 0], "012", [0.0, 1, 2], [True, 0, 1]):
        with pytest.raises(OperatorError, match="copies must list 3 unit indices in 0..2"):
            net2wider(g, "l1", 6, copies=bad)


def test_widening_to_the_same_width_is_a_noop_record() -> None:
    g = mlp()
    result = net2wider(g, "l1", 3)
    assert result.record.is_noop and result.graph is not g
    assert result.record.op == "net2wider"
    assert result.record.params == {"node": "l1", "width": 3, "noise": 0.0, "seed": 0}
    assert result.graph.to_dict() == g.to_dict()


def test_widening_one_residual_member_widens_all_with_one_mapping() -> None:
    g = residual()
    group = find_group(g, "c1")
    assert group.producers == ("c0", "c1", "c2")
    assert set(group.consumers) == {"c1", "inner", "fc"}
    result = net2wider(g, "c2", 7, seed=1)
    maps = result.record.index_maps
    idx = maps["c2.weight"][0]
    for p in ("c0", "c1", "c2"):
        assert result.graph.shape(p)[0] == 7 and maps[f"{p}.weight"][0] == idx
    for t in ("weight", "bias", "running_mean", "running_var"):  # BN gathered with the mapping
        assert maps[f"bn0.{t}"] == {0: idx}
        assert torch.equal(result.graph.node("bn1").tensors[t], g.node("bn1").tensors[t][idx])
    assert maps["c1.weight"] == {0: idx, 1: idx}  # c1 reads and writes the space
    assert maps["inner.weight"] == {1: idx} and maps["fc.weight"] == {1: idx}
    assert "inner.bias" not in maps and "ri" not in {k.split(".")[0] for k in maps}
    assert_preserved(g, result.graph)


def test_widening_an_inner_conv_of_a_block_leaves_the_group_alone() -> None:
    g = residual()
    result = net2wider(g, "inner", 6, seed=2)
    assert set(result.record.resized) == {"inner.weight", "inner.bias", "c2.weight"}
    assert_preserved(g, result.graph)


@pytest.mark.parametrize("node,width", [("a", 5), ("b", 4)])
def test_concat_consumers_see_the_widened_space_at_its_offset(node: str, width: int) -> None:
    g = concat_net()
    result = net2wider(g, node, width, seed=3)
    maps = result.record.index_maps
    idx = maps[f"{node}.weight"][0]
    expect = idx + [3, 4] if node == "a" else [0, 1, 2] + [3 + i for i in idx]
    assert maps["c.weight"] == {1: expect}
    for t in ("weight", "bias", "running_mean", "running_var"):  # BN after concat: concat level
        assert maps[f"bn.{t}"] == {0: expect}
    assert result.graph.node("bn").attrs["num_features"] == len(expect)
    assert "fc.weight" not in maps  # c's outputs did not change
    assert_preserved(g, result.graph)


def test_conv_flatten_linear_expands_the_index_over_positions() -> None:
    g = NetGraph()
    g.add_input("x", (1, 3, 3))
    g.add("c", "conv2d", ["x"], out_channels=2, kernel_size=1)
    g.add("r", "relu", ["c"])
    g.add("flat", "flatten", ["r"])
    g.add("fc", "linear", ["flat"], out_features=3)
    g.add_output("out", "fc")
    randomize(g, 3)
    result = net2wider(g, "c", 4, seed=5)
    idx = result.record.index_maps["c.weight"][0]
    cols = result.record.index_maps["fc.weight"][1]
    assert cols == [i * 9 + s for i in idx for s in range(9)]
    assert result.graph.node("fc").attrs["in_features"] == 36
    assert_preserved(g, result.graph)


def test_widening_a_trunk_layer_feeds_every_head() -> None:
    g = NetGraph()
    g.add_input("x", (3,))
    g.add("trunk", "linear", ["x"], out_features=4)
    g.add("act", "tanh", ["trunk"])
    for h in ("t0", "t1"):
        g.add(f"{h}_fc", "linear", ["act"], out_features=2)
        g.add_output(h, f"{h}_fc")
    randomize(g, 4)
    result = net2wider(g, "trunk", 6)
    assert set(result.record.index_maps) == {"trunk.weight", "trunk.bias", "t0_fc.weight",
                                             "t1_fc.weight"}
    assert_preserved(g, result.graph)


# ---- net2deeper ------------------------------------------------------------------------------
def test_deeper_after_relu_adds_identity_conv_and_relu() -> None:
    g = residual()
    result = net2deeper(g, "r1", kernel_size=3)
    new = result.graph
    assert result.record.added_nodes == ["r1_deep1", "r1_deep1_relu"]
    assert result.record.added == ["r1_deep1.weight", "r1_deep1.bias"]
    assert set(new.consumers("r1")) == {"r1_deep1"}
    assert set(new.consumers("r1_deep1_relu")) == {"inner", "add2"}
    w = new.node("r1_deep1").tensors["weight"]
    assert w.shape == (4, 4, 3, 3) and float(w.sum()) == 4.0
    assert torch.equal(w[:, :, 1, 1], torch.eye(4))
    assert_preserved(g, new)
    again = net2deeper(new, "r1", kernel_size=1)
    assert again.record.added_nodes == ["r1_deep2", "r1_deep2_relu"]


def test_deeper_adds_no_relu_after_a_non_relu_in_auto_mode() -> None:
    g = mlp()
    result = net2deeper(g, "l1")
    assert result.record.added_nodes == ["l1_deep1"]
    assert torch.equal(result.graph.node("l1_deep1").tensors["weight"], torch.eye(3))
    assert_preserved(g, result.graph)


def test_deeper_with_batchnorm_uses_sample_statistics_and_preserves_the_function() -> None:
    g = residual()
    x = x_for(g, batch=8)
    result = net2deeper(g, "r0", kernel_size=3, batchnorm=True, sample=x)
    assert result.record.added_nodes == ["r0_deep1", "r0_deep1_bn", "r0_deep1_relu"]
    probe = g.copy()
    probe.add_output("probe", "r0")
    with torch.no_grad():  # statistics as training sees them (upstream BN on batch stats)
        h = compile_graph(probe, head="probe").train()(x)
    mean, var = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False)
    bn = result.graph.node("r0_deep1_bn").tensors
    assert torch.allclose(bn["running_mean"], mean, atol=1e-6)
    assert torch.allclose(bn["running_var"], var, atol=1e-6)
    assert torch.allclose(bn["weight"], torch.sqrt(var + 1e-5)) and torch.equal(bn["bias"],
                                                                                bn["running_mean"])
    assert_preserved(g, result.graph)
    with torch.no_grad():  # on the sample batch itself, train-mode BN is the identity too
        before = compile_graph(g).train()(x)
        after = compile_graph(result.graph).train()(x)
    assert float((after - before).abs().max()) <= TOL * float(before.abs().max())


def test_deeper_on_vectors_with_batchnorm1d() -> None:
    g = mlp(hidden=4)
    x = x_for(g, batch=16)
    result = net2deeper(g, "r1", batchnorm=True, sample=x)
    assert result.graph.node("r1_deep1_bn").kind == "batchnorm1d"
    assert_preserved(g, result.graph)


# ---- prune_units -----------------------------------------------------------------------------
def test_prune_keeps_the_top_scoring_units_in_original_order() -> None:
    g = mlp(hidden=5)
    scores = torch.tensor([0.1, 5.0, 3.0, 0.2, 4.0])
    result = prune_units(g, "l1", 3, scores=scores)
    assert result.record.index_maps["l1.weight"] == {0: [1, 2, 4]}
    assert torch.equal(result.graph.node("l1").tensors["weight"],
                       g.node("l1").tensors["weight"][[1, 2, 4]])
    assert torch.equal(result.graph.node("l2").tensors["weight"],  # no division when pruning
                       g.node("l2").tensors["weight"][:, [1, 2, 4]])
    assert result.record.resized["l2.weight"] == ((2, 5), (2, 3))


def test_prune_default_scores_are_incoming_l1_norms() -> None:
    g = mlp(hidden=4)
    node = g.node("l1")
    node.tensors = {**node.tensors, "weight": torch.tensor([[1.0, 1], [0, -3], [0.5, 0], [2, 2]])}
    result = prune_units(g, "l1", 2)
    assert result.record.index_maps["l1.weight"] == {0: [1, 3]}  # norms 2, 3, 0.5, 4


def test_pruning_dead_units_preserves_the_function_exactly() -> None:
    g = mlp(hidden=5)
    node = g.node("l2")
    w = node.tensors["weight"].clone()
    w[:, [0, 3]] = 0.0
    node.tensors = {**node.tensors, "weight": w}
    result = prune_units(g, "l1", 3, scores=w.abs().sum(0))
    assert result.record.index_maps["l1.bias"] == {0: [1, 2, 4]}
    x = x_for(g, batch=32)
    assert max_rel_error(outputs(g, x), outputs(result.graph, x)) <= 1e-6


def test_pruning_a_residual_group_shrinks_every_member() -> None:
    g = residual()
    result = prune_units(g, "c1", 2)
    for p in ("c0", "c1", "c2"):
        assert result.graph.shape(p)[0] == 2
    assert result.graph.node("bn0").attrs["num_features"] == 2
    result.graph.validate()


# ---- purity ----------------------------------------------------------------------------------
@pytest.mark.parametrize("apply", [
    lambda g: net2wider(g, "c1", 6, noise=0.1),
    lambda g: net2deeper(g, "r0", batchnorm=True, sample=x_for(g)),
    lambda g: prune_units(g, "c2", 2),
    lambda g: net2wider(g, "inner", 5),
], ids=["wider-noisy", "deeper-bn", "prune", "wider-inner"])
def test_operators_never_change_their_input(apply) -> None:
    g = residual()
    snap = snapshot(g)
    result = apply(g)
    assert_unchanged(g, snap)
    assert result.graph is not g


# ---- noisy widening --------------------------------------------------------------------------
def test_noise_scales_each_new_incoming_weight_by_one_plus_uniform() -> None:
    g = mlp(hidden=3)
    noise = 0.5
    noisy = net2wider(g, "l1", 203, noise=noise, seed=6).graph.node("l1").tensors
    exact = net2wider(g, "l1", 203, seed=6).graph.node("l1").tensors  # same mapping, no noise
    assert torch.equal(noisy["weight"][:3], exact["weight"][:3])
    assert torch.equal(noisy["bias"], exact["bias"])  # biases are copied exactly
    u = (noisy["weight"][3:] / exact["weight"][3:] - 1) / noise  # 400 draws of U(-1, 1)
    assert float(u.abs().max()) <= 1 + 1e-5
    assert float(u.min()) < -0.9 and float(u.max()) > 0.9 and abs(float(u.mean())) < 0.1


def test_noisy_widening_is_reproducible_from_its_seed() -> None:
    g = mlp(hidden=3)
    first, again, other = (net2wider(g, "l1", 9, noise=0.1, seed=s).graph.node("l1")
                           .tensors["weight"] for s in (2, 2, 3))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_noisy_widening_keeps_the_graphs_dtype() -> None:
    g = mlp(hidden=3)
    for name in ("l1", "l2"):
        node = g.node(name)
        node.tensors = {k: v.to(torch.bfloat16) for k, v in node.tensors.items()}
    new = net2wider(g, "l1", 6, noise=0.1, seed=1).graph
    assert {t.dtype for t in new.named_tensors().values()} == {torch.bfloat16}


def test_prune_ties_keep_the_earlier_units() -> None:
    g = mlp(hidden=64)  # 64 equal scores: an unstable sort would keep any 32 of them
    result = prune_units(g, "l1", 32, scores=torch.ones(64))
    assert result.record.index_maps["l1.weight"] == {0: list(range(32))}


def test_prune_records_its_call() -> None:
    g = mlp(hidden=5)
    given = prune_units(g, "l1", 3, scores=torch.arange(5.0)).record
    assert given.op == "prune_units" and given.params == {"node": "l1", "keep": 3,
                                                          "scores": "given"}
    assert prune_units(g, "l1", 2).record.params == {"node": "l1", "keep": 2, "scores": "l1"}
    assert given.divisors == {}  # pruning removes units, it divides nothing


# ---- net2deeper statistics -------------------------------------------------------------------
def test_batchnorm_statistics_need_two_samples_and_take_any_float_dtype() -> None:
    g = mlp(hidden=4)
    x = x_for(g, batch=2)
    two = net2deeper(g, "r1", batchnorm=True, sample=x).graph.node("r1_deep1_bn").tensors
    h = torch.relu(x @ g.node("l1").tensors["weight"].T + g.node("l1").tensors["bias"])
    assert torch.allclose(two["running_mean"], h.mean(0), atol=1e-6)
    assert torch.allclose(two["running_var"], h.var(0, unbiased=False), atol=1e-6)
    wide = net2deeper(g, "r1", batchnorm=True, sample=x.double()).graph.node("r1_deep1_bn")
    assert wide.tensors["running_var"].dtype == torch.float32  # the graph's dtype
    assert torch.allclose(wide.tensors["running_var"], two["running_var"], atol=1e-6)
    with pytest.raises(OperatorError, match="sample has 1 input; batch statistics need at least 2"):
        net2deeper(g, "r1", batchnorm=True, sample=x[:1])


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging: a SIGALRM raises in the main thread after `seconds`."""
    def stop(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_batchnorm_statistics_when_the_probe_head_name_is_taken() -> None:
    g = NetGraph()
    g.add_input("x", (2,))
    g.add("probe_out", "linear", ["x"], out_features=3)
    g.add("_", "relu", ["probe_out"])
    g.add("probe_out_", "linear", ["_"], out_features=3)
    g.add("r", "relu", ["probe_out_"])
    g.add("fc", "linear", ["r"], out_features=2)
    g.add_output("out", "fc")
    randomize(g, 2)
    with deadline(20):
        result = net2deeper(g, "r", batchnorm=True, sample=x_for(g, batch=8))
    assert result.record.added_nodes == ["r_deep1", "r_deep1_bn", "r_deep1_relu"]
    assert_preserved(g, result.graph)


# ---- negative concat dims, index forms -------------------------------------------------------
@pytest.mark.parametrize("channels_last", [False, True])
def test_a_concat_along_a_negative_dim_offsets_the_later_operand(channels_last: bool) -> None:
    g = NetGraph()
    g.add_input("x", (2, 4, 4))
    src = "x"
    if channels_last:
        src = g.add("t", "permute", ["x"], dims=[1, 2, 0])
    kind, attrs = ("linear", "out_features") if channels_last else ("conv2d", "out_channels")
    extra = {} if channels_last else {"kernel_size": 1}
    g.add("a", kind, [src], **{attrs: 3}, **extra)
    g.add("b", kind, [src], **{attrs: 2}, **extra)
    g.add("cat", "concat", ["a", "b"], dim=-1 if channels_last else -3)
    g.add("c", kind, ["cat"], **{attrs: 2}, **extra)
    g.add("flat", "flatten", ["c"])
    g.add("fc", "linear", ["flat"], out_features=3)
    g.add_output("out", "fc")
    randomize(g, 5)
    result = net2wider(g, "b", 4, seed=1)
    idx = result.record.index_maps["b.weight"][0]
    assert result.record.index_maps["c.weight"] == {1: [0, 1, 2] + [3 + i for i in idx]}
    assert_preserved(g, result.graph)


def test_apply_index_takes_an_index_of_whole_numbers_in_any_form() -> None:
    g = mlp(hidden=3)
    want = [0, 1, 2, 1]
    for idx in (want, torch.tensor(want, dtype=torch.int32), torch.tensor(want, dtype=torch.float)):
        out = g.copy()
        changes = apply_index(out, find_group(out, "l1"), idx, divide=True)
        assert changes.index_maps["l1.weight"] == {0: want}
        assert changes.divisors["l2.weight"] == {1: [1.0, 2.0, 1.0, 2.0]}
        assert torch.equal(out.node("l1").tensors["weight"], g.node("l1").tensors["weight"][want])


# ---- net2deeper: records, dtypes, names ------------------------------------------------------
def test_deeper_records_its_call() -> None:
    g = residual()
    x = x_for(g)
    rec = net2deeper(g, "r0", kernel_size=3, batchnorm=True, sample=x).record
    assert rec.op == "net2deeper" and rec.params == {
        "after": "r0", "kernel_size": 3, "activation": "auto", "batchnorm": True,
        "sample_shape": [6, 3, 6, 6], "noise": 0.0, "seed": 0}
    assert rec.added == ["r0_deep1.weight", "r0_deep1.bias", "r0_deep1_bn.weight",
                         "r0_deep1_bn.bias", "r0_deep1_bn.running_mean",
                         "r0_deep1_bn.running_var", "r0_deep1_bn.num_batches_tracked"]
    assert net2deeper(g, "c0", kernel_size=1, activation="none").record.params == {
        "after": "c0", "kernel_size": 1, "activation": "none", "batchnorm": False,
        "sample_shape": None, "noise": 0.0, "seed": 0}


@pytest.mark.parametrize("after,kernel", [("r1", 3), ("flat", 1)])
def test_deeper_builds_its_identity_in_the_graphs_dtype(after: str, kernel: int) -> None:
    g = residual()
    for name in g.topo_order():
        node = g.node(name)
        node.tensors = {k: v.double() if v.is_floating_point() else v
                        for k, v in node.tensors.items()}
    new = net2deeper(g, after, kernel_size=kernel).graph
    assert {t.dtype for n in new.topo_order() for t in new.node(n).tensors.values()
            if t.is_floating_point()} == {torch.float64}
    x = x_for(g).double()
    with torch.no_grad():
        assert torch.allclose(compile_graph(new).eval()(x), compile_graph(g).eval()(x),
                              rtol=0, atol=1e-12)


def test_deepening_the_same_node_again_picks_the_next_free_name() -> None:
    g = mlp()
    with deadline(20):
        once = net2deeper(g, "l1").graph
        twice = net2deeper(once, "l1").graph
        thrice = net2deeper(twice, "l1").graph
    assert [n for n in thrice.topo_order() if "_deep" in n] == ["l1_deep3", "l1_deep2",
                                                               "l1_deep1"]


def test_widening_draws_from_seed_zero_by_default() -> None:
    g = mlp(hidden=3)
    default, zero = net2wider(g, "l1", 9), net2wider(g, "l1", 9, seed=0)
    assert default.record.params["seed"] == 0
    assert default.record.index_maps == zero.record.index_maps


def test_apply_index_copies_columns_unscaled_by_default() -> None:
    g = mlp(hidden=3)
    out = g.copy()
    changes = apply_index(out, find_group(out, "l1"), [0, 1, 2, 1])
    assert changes.divisors == {}
    assert torch.equal(out.node("l2").tensors["weight"],
                       g.node("l2").tensors["weight"][:, [0, 1, 2, 1]])
