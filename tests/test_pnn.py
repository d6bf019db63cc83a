"""Progressive Nets: the column operator, frozen nodes and the strategy, on MLPs, CNNs with
BatchNorm, residual CNNs and an imported torchvision ResNet-18."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from growth.search_spaces.networks import add_head, mlp, small_cnn
from runfiles import kill_after_first_checkpoint

from growth.campaign import Campaign, resume_run
from growth.compile import compile_graph
from growth.config import load_config, validate_config
from growth.data.containers import Task
from growth.errors import ConfigError, GraphError, OperatorError
from growth.graph import NetGraph
from growth.model import Model
from growth.ops import add_column, freeze, get_operator
from growth.ops.columns import (
    base_column,
    column_count,
    column_members,
    column_value,
    frozen_nodes,
    lateral_layers,
)
from growth.strategies import Context, make_strategy
from growth.train import TrainConfig, fit, learn_task

CFG = TrainConfig(epochs=2, batch_size=8, lr=0.05, momentum=0.9)


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- networks: a trunk ending at "features", one head per task -----------------------------------
def with_heads(trunk: NetGraph, n: int = 3, classes: int = 3) -> NetGraph:
    for i in range(n):
        trunk = add_head(trunk, f"t{i}", classes)
    return trunk


def mlp_net(n: int = 3, bn: bool = False, dropout: float = 0.0) -> NetGraph:
    torch.manual_seed(0)
    return with_heads(mlp((1, 4, 4), [6, 5], batchnorm=bn, dropout=dropout), n)


def cnn_net(n: int = 3) -> NetGraph:
    torch.manual_seed(0)
    return with_heads(small_cnn((2, 8, 8), [3, 4], batchnorm=True, fc=[6], dropout=0.2), n)


def residual_net(n: int = 3) -> NetGraph:
    """conv -> bn -> relu, then a residual block (identity shortcut) and a projection block."""
    torch.manual_seed(0)
    g = NetGraph()
    g.add_input("x", (2, 6, 6))
    g.add("c0", "conv2d", ["x"], out_channels=4, kernel_size=3, padding=1)
    g.add("bn0", "batchnorm2d", ["c0"])
    g.add("r0", "relu", ["bn0"])
    g.add("c1", "conv2d", ["r0"], out_channels=4, kernel_size=3, padding=1)
    g.add("bn1", "batchnorm2d", ["c1"])
    g.add("add1", "add", ["bn1", "r0"])
    g.add("r1", "relu", ["add1"])
    g.add("c2", "conv2d", ["r1"], out_channels=6, kernel_size=3, stride=2, padding=1)
    g.add("proj", "conv2d", ["r1"], out_channels=6, kernel_size=1, stride=2)
    g.add("add2", "add", ["c2", "proj"])
    g.add("r2", "relu", ["add2"])
    g.add("gap", "adaptive_avgpool2d", ["r2"], output_size=1)
    g.add("flat", "flatten", ["gap"])
    g.add("features", "identity", ["flat"])
    return with_heads(g, n)


def resnet18_net(n: int = 2, size: int = 16) -> NetGraph:
    """torchvision's ResNet-18, imported, its classifier replaced by one head per task."""
    torchvision = pytest.importorskip("torchvision")
    from growth.trace import import_module

    torch.manual_seed(0)
    g = import_module(torchvision.models.resnet18(weights=None).eval(), (3, size, size))
    source = g.inputs("fc")[0]
    g.remove("out")
    g.remove("fc")
    g.add("features", "identity", [source])
    return with_heads(g, n)


def eval_outputs(graph: NetGraph, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return compile_graph(graph).eval()(x)


def x_for(graph: NetGraph, batch: int = 5, seed: int = 0) -> torch.Tensor:
    shape = graph.shape(graph.input_node())
    return torch.randn((batch, *shape), generator=torch.Generator().manual_seed(seed))


def randomize_bn(graph: NetGraph, seed: int = 0) -> NetGraph:
    """Non-trivial BN statistics, so a BN that ran in the wrong mode shows in the outputs."""
    gen = torch.Generator().manual_seed(seed)
    for n in graph.topo_order():
        node = graph.node(n)
        if node.kind.startswith("batchnorm"):
            c = node.attrs["num_features"]
            node.tensors = {**node.tensors, "running_mean": torch.randn(c, generator=gen) * 0.3,
                            "running_var": torch.rand(c, generator=gen) + 0.5}
    return graph


def modules_run_by(module: torch.fx.GraphModule) -> set[str]:
    return {str(n.target) for n in module.graph.nodes if n.op in ("call_module", "get_attr")}


def column_of(name: str) -> int:
    """c3_fc1 -> 3; fc1 -> 0 (no column prefix); head_t2 -> -1."""
    if name.startswith("head_"):
        return -1
    head, _, rest = name.partition("_")
    return int(head[1:]) if head[:1] == "c" and head[1:].isdigit() and rest else 0


NETS = {"mlp": lambda: mlp_net(4, bn=True, dropout=0.3), "cnn": lambda: cnn_net(4),
        "residual": lambda: residual_net(4)}


# ---- the column operator -------------------------------------------------------------------------
@pytest.mark.parametrize("net", list(NETS))
def test_columns_copy_the_trunk_keep_old_heads_and_feed_new_heads_only_from_earlier_columns(
        net: str) -> None:
    graph = randomize_bn(NETS[net]())
    x = x_for(graph)
    first = eval_outputs(graph, x)
    base_nodes, _ = column_members(graph, 0)
    shapes0 = graph.shapes()
    for k in (1, 2, 3):
        before = eval_outputs(graph, x)
        result = add_column(graph, [f"t{k}"], seed=k)
        new = result.graph
        assert column_count(new) == k + 1 and column_count(graph) == k
        nodes, adapters = column_members(new, k)
        assert set(result.record.added_nodes) == set(nodes) | set(adapters)
        shapes = new.shapes()
        for n in base_nodes:  # the copy has the trunk's structure, node by node
            assert new.node(f"c{k}_{n}").kind == graph.node(n).kind
            assert shapes[f"c{k}_{n}"] == shapes0[n]
        after = eval_outputs(new, x)
        for h in after:  # every other head computes exactly what it computed before
            assert torch.equal(after[h], before[h]) == (h != f"t{k}"), h
        view = compile_graph(new, f"t{k}")
        seen = {column_of(m) for m in modules_run_by(view)} - {-1}
        assert seen == set(range(k + 1)), f"head t{k} runs columns {seen}"
        assert {column_of(m) for m in modules_run_by(compile_graph(new, "t0"))} <= {0, -1}
        graph = new
    assert torch.equal(eval_outputs(graph, x)["t0"], first["t0"])
    for h, y in eval_outputs(graph, x).items():
        assert torch.isfinite(y).all() and y.shape == (5, 3), h


@pytest.mark.parametrize("net", list(NETS))
def test_every_layer_after_the_first_gets_one_adapter_of_the_reduced_width(net: str) -> None:
    graph = NETS[net]()
    base, _ = column_members(graph, 0)
    producers = [n for n in base if graph.node(n).kind in ("linear", "conv2d")]
    first = producers[0]
    layers = lateral_layers(graph, base)
    assert first not in layers and set(layers) == set(producers) - {first}
    new = add_column(add_column(graph, ["t1"]).graph, ["t2"], reduction=3.0, alpha=0.25).graph
    shapes = new.shapes()
    for layer in layers:
        stem = f"c2_{layer}_lat"
        source = graph.inputs(layer)[0]
        width = shapes[source][0]
        assert new.inputs(f"{stem}_a0") == [source]
        assert new.inputs(f"{stem}_a1") == [f"c1_{source}" if f"c1_{source}_lat" not in new
                                            else f"c1_{source}_lat"]
        assert new.inputs(f"{stem}_cat") == [f"{stem}_a0", f"{stem}_a1"]
        assert shapes[f"{stem}_cat"][0] == 2 * width
        assert shapes[f"{stem}_v"][0] == math.ceil(width / 3)
        assert shapes[f"{stem}_u"] == shapes[layer]
        assert new.inputs(stem) == [f"c2_{layer}", f"{stem}_u"]
        assert [c for c in new.consumers(f"c2_{layer}")] == [stem]
        for j in (0, 1):
            assert new.node(f"{stem}_a{j}").tensors["weight"].tolist() == [0.25]
        if len(shapes[source]) == 3:
            assert new.node(f"{stem}_v").attrs["kernel_size"] in (1, (1, 1), [1, 1])
            for a in ("kernel_size", "stride", "padding"):
                assert new.node(f"{stem}_u").attrs[a] == graph.node(layer).attrs[a]


def separable_net() -> NetGraph:
    """conv -> depthwise conv -> pointwise conv, MobileNet style."""
    torch.manual_seed(0)
    g = NetGraph()
    g.add_input("x", (3, 6, 6))
    g.add("stem", "conv2d", ["x"], out_channels=8, kernel_size=3, padding=1)
    g.add("r0", "relu", ["stem"])
    g.add("dw", "conv2d", ["r0"], out_channels=8, kernel_size=3, padding=1, groups=8)
    g.add("r1", "relu", ["dw"])
    g.add("pw", "conv2d", ["r1"], out_channels=12, kernel_size=1)
    g.add("r2", "relu", ["pw"])
    g.add("gap", "adaptive_avgpool2d", ["r2"], output_size=1)
    g.add("flat", "flatten", ["gap"])
    g.add("features", "identity", ["flat"])
    return with_heads(g, 3)


def token_net() -> NetGraph:
    """Linear layers over the last dim of (tokens, features) inputs, then a mean over tokens."""
    torch.manual_seed(0)
    g = NetGraph()
    g.add_input("x", (5, 4))
    g.add("embed", "linear", ["x"], out_features=6)
    g.add("r0", "relu", ["embed"])
    g.add("mix", "linear", ["r0"], out_features=8)
    g.add("r1", "relu", ["mix"])
    g.add("pool", "mean", ["r1"], dims=[0])
    g.add("features", "identity", ["pool"])
    return with_heads(g, 3)


def test_depthwise_layers_get_no_adapter_and_token_layers_get_one_on_their_features() -> None:
    graph = separable_net()
    assert lateral_layers(graph, column_members(graph, 0)[0]) == ["pw"]
    g = add_column(add_column(graph, ["t1"]).graph, ["t2"]).graph
    shapes = g.shapes()
    assert shapes["c2_pw_lat_cat"] == (16, 6, 6) and shapes["c2_pw_lat_v"] == (4, 6, 6)
    tokens = token_net()
    t = add_column(add_column(tokens, ["t1"]).graph, ["t2"]).graph
    shapes = t.shapes()
    assert lateral_layers(tokens, column_members(tokens, 0)[0]) == ["mix"]
    assert shapes["c2_mix_lat_cat"] == (5, 12) and shapes["c2_mix_lat_v"] == (5, 3)
    assert shapes["c2_mix_lat_u"] == shapes["mix"] == (5, 8)
    for net, grown in ((graph, g), (tokens, t)):
        x = x_for(net)
        before, after = eval_outputs(net, x), eval_outputs(grown, x)
        assert torch.equal(before["t0"], after["t0"])
        assert torch.isfinite(after["t2"]).all()


def test_lateral_adapters_compute_the_progressive_net_formula_by_hand() -> None:
    graph = mlp_net(3)
    g = add_column(add_column(graph, ["t1"], seed=1).graph, ["t2"], seed=2).graph
    gen = torch.Generator().manual_seed(5)
    for n in g.topo_order():  # alphas away from their init, so each alpha must be applied
        if g.node(n).kind == "scale":
            g.node(n).tensors = {"weight": torch.rand(1, generator=gen) + 0.5}
    T = {k: v for k, v in g.named_tensors().items()}  # noqa: N806

    def lin(name: str, h: torch.Tensor) -> torch.Tensor:
        return h @ T[f"{name}.weight"].T + (T[f"{name}.bias"] if f"{name}.bias" in T else 0)

    x = x_for(g).flatten(1)
    h1 = {j: torch.relu(lin(f"{p}fc1", x)) for j, p in enumerate(["", "c1_", "c2_"])}
    h2 = {0: torch.relu(lin("fc2", h1[0]))}
    for k in (1, 2):
        stem = f"c{k}_fc2_lat"
        joined = torch.cat([T[f"{stem}_a{j}.weight"] * h1[j] for j in range(k)], 1)
        lateral = lin(f"{stem}_u", torch.relu(lin(f"{stem}_v", joined)))
        h2[k] = torch.relu(lin(f"c{k}_fc2", h1[k]) + lateral)
    got = eval_outputs(g, x_for(g))
    for k in (0, 1, 2):
        torch.testing.assert_close(got[f"t{k}"], lin(f"head_t{k}", h2[k]))


def test_an_adapter_reads_the_earlier_columns_value_after_its_own_lateral_sum() -> None:
    """fc2 feeds fc3 with no activation between: column 2's adapter into fc3 reads column 1's
    fc2 value with column 1's lateral already added (and column 2's fc3 its own summed fc2),
    by the progressive net formula computed by hand."""
    torch.manual_seed(0)
    g = NetGraph()
    g.add_input("x", (6,))
    g.add("fc1", "linear", ["x"], out_features=5)
    g.add("act1", "relu", ["fc1"])
    g.add("fc2", "linear", ["act1"], out_features=4)
    g.add("fc3", "linear", ["fc2"], out_features=4)
    g.add("features", "identity", ["fc3"])
    # tanh: a relu adapter this small can be dead on every sample, hiding what it reads
    g = add_column(with_heads(g, 3), ["t1"], seed=1, activation="tanh").graph
    g = add_column(g, ["t2"], seed=2, activation="tanh").graph
    gen = torch.Generator().manual_seed(5)
    for n in g.topo_order():  # alphas away from their init, so each alpha must be applied
        if g.node(n).kind == "scale":
            g.node(n).tensors = {"weight": torch.rand(1, generator=gen) + 0.5}
    T = g.named_tensors()  # noqa: N806

    def lin(name: str, h: torch.Tensor) -> torch.Tensor:
        return h @ T[f"{name}.weight"].T + (T[f"{name}.bias"] if f"{name}.bias" in T else 0)

    def lateral(stem: str, inputs: list[torch.Tensor]) -> torch.Tensor:
        joined = torch.cat([T[f"{stem}_a{j}.weight"] * h for j, h in enumerate(inputs)], 1)
        return lin(f"{stem}_u", torch.tanh(lin(f"{stem}_v", joined)))

    x = x_for(g, batch=16)
    h1, z2, z3 = [], [], []
    for k, p in enumerate(["", "c1_", "c2_"]):
        h1.append(torch.relu(lin(f"{p}fc1", x)))
        z2.append(lin(f"{p}fc2", h1[k]) + (lateral(f"c{k}_fc2_lat", h1[:k]) if k else 0))
        z3.append(lin(f"{p}fc3", z2[k]) + (lateral(f"c{k}_fc3_lat", z2[:k]) if k else 0))
    got = eval_outputs(g, x)
    for k in (0, 1, 2):
        torch.testing.assert_close(got[f"t{k}"], lin(f"head_t{k}", z3[k]))


def test_the_strategy_draws_a_new_column_from_the_tasks_seed() -> None:
    """Column 1's layers and adapter hold what torch's own layers draw, in the column's order,
    from a generator seeded with the task's seed (not another seed, not the global state)."""
    graph = mlp_net(2)
    tasks = tasks_for(graph, 2)
    for seed in (101, 7):
        model = Model(graph)
        ctx = ctx_for(model, tasks, 1)
        ctx.seed = seed
        torch.manual_seed(0)
        make_strategy("pnn").before_task(ctx)
        torch.manual_seed(seed)  # by hand: fc1, fc2, then fc2's adapter (V 6 -> 3, U 3 -> 5)
        want = {"c1_fc1": torch.nn.Linear(16, 6), "c1_fc2": torch.nn.Linear(6, 5),
                "c1_fc2_lat_v": torch.nn.Linear(6, 3),
                "c1_fc2_lat_u": torch.nn.Linear(3, 5, bias=False)}
        params = model.named_parameters()
        for node, layer in want.items():
            for key, value in layer.state_dict().items():
                assert torch.equal(params[f"{node}.{key}"].detach(), value), (seed, node, key)


def test_a_column_is_freshly_initialised_from_its_seed_and_leaves_the_global_generator() -> None:
    graph = cnn_net()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = add_column(graph, ["t1"], seed=7).graph
    assert torch.equal(torch.get_rng_state(), state)
    b = add_column(graph, ["t1"], seed=7).graph
    c = add_column(graph, ["t1"], seed=8).graph
    for n in ("conv1", "conv2", "fc3"):
        w0, wa = graph.node(n).tensors["weight"], a.node(f"c1_{n}").tensors["weight"]
        assert not torch.equal(w0, wa)  # fresh, not a copy of column 0
        assert torch.equal(wa, b.node(f"c1_{n}").tensors["weight"])
        assert not torch.equal(wa, c.node(f"c1_{n}").tensors["weight"])
        bound = 1 / math.sqrt(w0[0].numel())  # torch's default init for the kind
        assert wa.abs().max() <= bound and wa.std() > bound / 4
    bn = a.node("c1_bn1").tensors
    assert torch.equal(bn["running_mean"], torch.zeros(3)) and torch.equal(bn["weight"],
                                                                          torch.ones(3))


def test_columns_keep_the_graphs_precision_and_survive_save_and_load(tmp_path: Path) -> None:
    graph = cnn_net()
    for n in graph.topo_order():
        node = graph.node(n)
        node.tensors = {k: v.double() if v.is_floating_point() else v
                        for k, v in node.tensors.items()}
    frozen = freeze(graph, ["conv1", "bn1"]).graph
    new = add_column(frozen, ["t1"]).graph
    assert {t.dtype for t in new.named_tensors().values() if t.is_floating_point()} == \
        {torch.float64}
    new.save(tmp_path / "g")
    loaded = NetGraph.load(tmp_path / "g")
    assert frozen_nodes(loaded) == ["conv1", "bn1"]
    assert not loaded.node("c1_conv1").attrs.get("frozen")  # a copy starts trainable
    module = compile_graph(loaded)
    grads = {n: p.requires_grad for n, p in module.named_parameters()}
    assert not grads["conv1.weight"] and not grads["bn1.weight"] and grads["c1_conv1.weight"]


@pytest.mark.parametrize("net", list(NETS))
def test_a_column_without_laterals_is_an_independent_copy_started_from_another_column(
        net: str) -> None:
    graph = randomize_bn(NETS[net]())
    first = add_column(graph, ["t1"], seed=1).graph
    new = add_column(first, ["t2"], seed=2, lateral=False, init_from=1)
    nodes, adapters = column_members(new.graph, 2)
    assert adapters == [] and set(new.record.added_nodes) == set(nodes)
    assert new.record.params["lateral"] is False and new.record.params["init_from"] == 1
    for n in column_members(graph, 0)[0]:
        for key in graph.node(n).tensors:
            assert torch.equal(new.graph.node(f"c2_{n}").tensors[key],
                               first.node(f"c1_{n}").tensors[key]), (n, key)
    view = compile_graph(new.graph, "t2")
    assert {column_of(m) for m in modules_run_by(view)} - {-1} == {2}  # reads no other column
    x = x_for(graph)
    before, after = eval_outputs(first, x), eval_outputs(new.graph, x)
    assert torch.equal(before["t0"], after["t0"]) and torch.equal(before["t1"], after["t1"])
    fresh = add_column(first, ["t2"], seed=2, lateral=False).graph
    assert not torch.equal(fresh.node("c2_" + column_members(graph, 0)[0][0]).tensors.get(
        "weight", torch.zeros(1)), first.node("c1_" + column_members(graph, 0)[0][0]).tensors.get(
        "weight", torch.ones(1)))
    for bad in (2, -1, 1.0, True):
        with pytest.raises(OperatorError, match="init_from must be an existing column 0..1"):
            add_column(first, ["t2"], init_from=bad)


def test_operator_errors_name_what_to_fix() -> None:
    graph = mlp_net()
    with pytest.raises(OperatorError, match="reduction must be a number >= 1"):
        add_column(graph, ["t1"], reduction=0.5)
    with pytest.raises(OperatorError, match="alpha must be a finite number"):
        add_column(graph, ["t1"], alpha=float("nan"))
    with pytest.raises(OperatorError, match="'softmax' is not an activation"):
        add_column(graph, ["t1"], activation="softmax")
    with pytest.raises(OperatorError, match="no head named"):
        add_column(graph, ["t9"])
    with pytest.raises(OperatorError, match="trunk's end node 'feat'"):
        add_column(graph, ["t1"], trunk="feat")
    moved = add_column(graph, ["t1"]).graph
    with pytest.raises(OperatorError, match="head 't1' does not read the base trunk"):
        add_column(moved, ["t1"])
    assert get_operator("add_column").fn is add_column and get_operator("freeze").fn is freeze


def test_a_columns_record_names_its_settings_and_every_new_tensor() -> None:
    """With the defaults: alpha 0.01, seed 0, V half the input's width, U without a bias, one
    earlier column read without a concat; the record lists the settings and each new tensor."""
    graph = mlp_net(3)
    assert base_column(graph) == ["flatten", "fc1", "act1", "fc2", "act2", "features"]
    result = add_column(graph, ["t1"])
    new, record = result.graph, result.record
    assert record.op == "add_column"
    assert record.params == {"column": 1, "heads": ["t1"], "trunk": "features",
                             "reduction": 2.0, "alpha": 0.01, "activation": "relu", "seed": 0,
                             "lateral": True, "init_from": None}
    stem = "c1_fc2_lat"
    assert column_members(new, 1)[1] == [f"{stem}_a0", f"{stem}_v", f"{stem}_f", f"{stem}_u",
                                         stem]
    assert sorted(record.added) == sorted([
        "c1_fc1.weight", "c1_fc1.bias", "c1_fc2.weight", "c1_fc2.bias", f"{stem}_a0.weight",
        f"{stem}_v.weight", f"{stem}_v.bias", f"{stem}_u.weight"])
    assert new.node(f"{stem}_a0").tensors["weight"].tolist() == [pytest.approx(0.01)]
    assert new.node(f"{stem}_f").kind == "relu"
    torch.manual_seed(0)  # by hand: seed 0 draws fc1's copy first
    want = torch.nn.Linear(16, 6)
    assert torch.equal(new.node("c1_fc1").tensors["weight"], want.weight.detach())
    assert column_value(new, 1, "fc2") == stem and column_value(new, 1, "fc1") == "c1_fc1"
    cnn = add_column(cnn_net(), ["t1"]).graph  # U of a convolution has no bias either
    for layer in ("conv2", "fc3"):
        assert set(cnn.node(f"c1_{layer}_lat_u").tensors) == {"weight"}, layer
        assert set(cnn.node(f"c1_{layer}_lat_v").tensors) == {"weight", "bias"}, layer
    assert cnn.node("c1_bn1").tensors["num_batches_tracked"].dtype == torch.long  # not a float


def test_column_settings_at_their_edges_are_taken_or_refused() -> None:
    graph = mlp_net(3)  # fc2 reads 6 features
    for reduction, width in ((1, 6), (1.5, 4), (100.0, 1)):
        g = add_column(graph, ["t1"], reduction=reduction).graph
        assert g.shape("c1_fc2_lat_v") == (width,), reduction
    tokens = add_column(token_net(), ["t1"], reduction=1).graph  # 5 tokens of 6 features
    assert tokens.shape("c1_mix_lat_v") == (5, 6)
    g = add_column(graph, ["t1"], alpha=-0.5, activation="tanh").graph
    assert g.node("c1_fc2_lat_a0").tensors["weight"].tolist() == [-0.5]
    assert g.node("c1_fc2_lat_f").kind == "tanh"
    for bad in (True, "2", 0.99, float("inf"), float("nan")):
        with pytest.raises(OperatorError, match="reduction must be a number >= 1"):
            add_column(graph, ["t1"], reduction=bad)
    for bad in (True, "0.1", float("inf"), -float("inf")):
        with pytest.raises(OperatorError, match="alpha must be a finite number"):
            add_column(graph, ["t1"], alpha=bad)
    first = add_column(graph, ["t1"], seed=1).graph
    new = add_column(first, ["t2"], seed=2, init_from=0).graph
    for n in ("fc1", "fc2"):
        for key, value in graph.node(n).tensors.items():
            assert torch.equal(new.node(f"c2_{n}").tensors[key], value), (n, key)


def test_columns_of_a_trunk_with_another_end_name() -> None:
    """A trunk ending at `body` (no `features` node) whose base holds a node named `fc1_lat`:
    column 0's value of fc1 is fc1 itself, and columns are counted and listed on `body`."""
    torch.manual_seed(0)
    g = NetGraph()
    g.add_input("x", (4,))
    g.add("fc1", "linear", ["x"], out_features=5)
    g.add("fc1_lat", "relu", ["fc1"])  # fc1 is the first layer: it never gets an adapter
    g.add("fc2", "linear", ["fc1_lat"], out_features=3)
    g.add("body", "identity", ["fc2"])
    for i in range(3):
        g = add_head(g, f"t{i}", 2, "body")
    assert column_value(g, 0, "fc1") == "fc1"
    new = add_column(add_column(g, ["t1"], trunk="body").graph, ["t2"], trunk="body").graph
    assert column_count(new, "body") == 3
    assert column_members(new, 2, "body") == (
        ["c2_fc1", "c2_fc1_lat", "c2_fc2", "c2_body"],
        ["c2_fc2_lat_a0", "c2_fc2_lat_a1", "c2_fc2_lat_cat", "c2_fc2_lat_v", "c2_fc2_lat_f",
         "c2_fc2_lat_u", "c2_fc2_lat"])
    assert new.inputs("c2_fc2_lat_a0") == ["fc1_lat"] and new.inputs("head_t2") == ["c2_body"]


def test_freeze_and_thaw_name_their_nodes_in_order_and_leave_the_input_graph() -> None:
    graph = mlp_net(3)
    frozen = freeze(graph, ["fc2", "fc1", "fc2"])
    assert frozen.record.op == "freeze"
    assert frozen.record.params == {"nodes": ["fc1", "fc2"], "frozen": True}
    assert frozen_nodes(frozen.graph) == ["fc1", "fc2"] and frozen_nodes(graph) == []
    thawed = freeze(frozen.graph, ["fc1", "act1"], frozen=False)
    assert thawed.record.params == {"nodes": ["act1", "fc1"], "frozen": False}
    assert frozen_nodes(thawed.graph) == ["fc2"] and frozen_nodes(frozen.graph) == ["fc1", "fc2"]
    with pytest.raises(GraphError, match="nope"):
        freeze(graph, ["fc1", "nope"])


def test_a_head_sharing_a_layer_with_a_head_left_behind_is_refused() -> None:
    graph = mlp_net(0)
    graph.add("shared", "linear", ["features"], out_features=4)
    for name in ("t0", "t1"):
        graph = add_head(graph, name, 3, "shared")
    with pytest.raises(OperatorError, match=r"head 't1' reads 'features' through \['shared'\]"):
        add_column(graph, ["t1"])
    moved = add_column(graph, ["t0", "t1"]).graph  # moved together, the layer moves with them
    assert moved.inputs("shared") == ["c1_features"]


# ---- frozen nodes --------------------------------------------------------------------------------
def tasks_for(graph: NetGraph, n_tasks: int = 3, n: int = 32, seed: int = 0) -> list[Task]:
    """Gaussian inputs labelled by a random linear teacher per task (3 classes)."""
    gen = torch.Generator().manual_seed(seed)
    shape = graph.shape(graph.input_node())
    out = []
    for i in range(n_tasks):
        x = torch.randn((n, *shape), generator=gen)
        y = (x.flatten(1) @ torch.randn(x[0].numel(), 3, generator=gen)).argmax(1)
        k = n * 3 // 4
        out.append(Task(i, f"t{i}", (x[:k], y[:k]), (x[k:], y[k:]), (x[k:], y[k:]),
                        [0, 1, 2], 3, 0, tuple(shape)))
    return out


def ctx_for(model: Model, tasks: list[Task], i: int) -> Context:
    return Context(model, tasks[i], tasks[:i], lambda t: f"t{t.index}", lambda t, y: y,
                   torch.device("cpu"), seed=100 + i)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_frozen_nodes_get_no_update_even_with_weight_decay_and_momentum(optimizer: str) -> None:
    graph = randomize_bn(cnn_net(1))
    frozen = ["conv1", "bn1", "conv2", "bn2", "drop3"]
    model = Model(freeze(graph, frozen).graph)
    tasks = tasks_for(graph, 1)
    x = tasks[0].train[0]
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    ctx = ctx_for(model, tasks, 0)
    cfg = TrainConfig(epochs=2, batch_size=8, optimizer=optimizer, lr=0.1, momentum=0.9,
                      weight_decay=0.5)
    fit(ctx, make_strategy("finetune"), cfg)
    after = model.module.state_dict()
    for key, value in before.items():
        moved = not torch.equal(after[key], value)
        assert moved == (key.split(".")[0] in ("fc3", "head_t0")), key
    held = {id(p) for p in ctx.optimizer.state}
    for name, p in model.named_parameters().items():
        assert (id(p) in held) == (name.split(".")[0] in ("fc3", "head_t0")), name
    model.train()  # frozen BN and dropout behave as in eval mode even in train mode
    train_out = model.head("t0")(x)
    model.eval()
    assert torch.equal(train_out, model.head("t0")(x))


@pytest.mark.parametrize("kind,attrs", [("dropout", {"p": 0.5}), ("dropout2d", {"p": 0.5}),
                                        ("stochastic_depth", {"p": 0.5, "mode": "row"})])
def test_frozen_random_layers_are_off_in_training_mode(kind: str, attrs: dict) -> None:
    g = NetGraph()
    g.add_input("x", (8, 4, 4))
    g.add("d", kind, ["x"], **attrs)
    g.add_output("out", "d")
    x = torch.ones(16, 8, 4, 4)
    torch.manual_seed(0)
    assert not torch.equal(compile_graph(g).train()(x), x)
    module = compile_graph(freeze(g, ["d"]).graph).train()
    assert torch.equal(module(x), x) and module.training and module.d.training


def test_a_carried_optimizer_moves_no_frozen_parameter() -> None:
    graph = mlp_net(2, bn=True)
    model = Model(graph)
    tasks = tasks_for(graph, 2)
    ctx = ctx_for(model, tasks, 0)
    cfg = TrainConfig(epochs=1, batch_size=8, lr=0.1, momentum=0.9, weight_decay=0.5)
    fit(ctx, make_strategy("finetune"), cfg)  # momentum now held for every parameter
    frozen = freeze(model.graph, ["fc1", "bn1", "fc2", "bn2"])
    ctx.replace_graph(frozen.graph, frozen.record)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    fit(ctx, make_strategy("finetune"), cfg, optimizer=ctx.optimizer)
    for key, value in before.items():
        if key.split(".")[0] in ("fc1", "bn1", "fc2", "bn2"):
            assert torch.equal(model.module.state_dict()[key], value), key


# ---- the strategy --------------------------------------------------------------------------------
def learn_all(name: str, graph: NetGraph, tasks: list[Task], cfg: TrainConfig = CFG,
              params: dict | None = None) -> tuple[Model, list[torch.Tensor]]:
    """Learn the tasks in turn; returns the model and task 0's test logits after each task."""
    strategy = make_strategy(name, params)
    model = Model(graph)
    logits = []
    for i in range(len(tasks)):
        ctx = ctx_for(model, tasks, i)
        learn_task(ctx, strategy, cfg, seed=ctx.seed)
        model.eval()
        with torch.no_grad():
            logits.append(model.head("t0")(tasks[0].test[0]).clone())
    return model, logits


@pytest.mark.parametrize("net", ["mlp", "cnn", "residual"])
def test_earlier_tasks_outputs_are_bitwise_identical_after_later_tasks(net: str) -> None:
    graph = NETS[net]()
    tasks = tasks_for(graph, 3)
    model, logits = learn_all("pnn", graph, tasks)
    assert logits[0].std(0).min() > 1e-3  # a live network: outputs depend on the input
    assert all(torch.equal(logits[0], later) for later in logits[1:])
    assert column_count(model.graph) == 3
    _, tuned = learn_all("finetune", graph, tasks)
    assert not torch.equal(tuned[0], tuned[-1])


def test_each_task_trains_only_its_column_adapters_and_head() -> None:
    graph = mlp_net(3)
    tasks = tasks_for(graph, 3)
    strategy = make_strategy("pnn")
    model = Model(graph)
    for i in range(2):
        learn_task(ctx_for(model, tasks, i), strategy, CFG, seed=i)
    ctx = ctx_for(model, tasks, 2)
    strategy.before_task(ctx)
    trainable = {n.split(".")[0] for n, p in model.named_parameters().items()
                 if p.requires_grad}
    nodes, adapters = column_members(model.graph, 2)
    assert trainable == ({n for n in nodes + adapters if model.graph.node(n).tensors}
                         | {"head_t2"})
    groups = strategy.parameter_groups(model.graph)
    assert set(groups["heads"]) == {f"head_t{i}.{p}" for i in range(3) for p in ("weight",
                                                                                   "bias")}
    assert all(n.split(".")[0].startswith(("c1_", "c2_")) and "_lat" in n
               for n in groups["adapters"])
    total = sum(len(v) for v in groups.values())
    assert total == len(model.named_parameters())


def test_pnn_refuses_a_shared_head_and_a_missing_trunk() -> None:
    graph = mlp_net(2)
    tasks = tasks_for(graph, 2)
    model = Model(graph)
    shared = Context(model, tasks[1], tasks[:1], lambda t: "t0", lambda t, y: y,
                     torch.device("cpu"))
    with pytest.raises(ConfigError, match="one head per task.*scenario: task"):
        make_strategy("pnn").before_task(shared)
    with pytest.raises(ConfigError, match="strategy.trunk: the graph has no node 'body'"):
        make_strategy("pnn", {"trunk": "body"}).before_task(ctx_for(model, tasks, 1))


def test_pnn_builds_each_column_with_its_settings_and_groups_it_on_its_trunk() -> None:
    """Every setting reaches the column: trunk `body` (no `features` node), V as wide as its
    input (reduction 1: 5 units, not the default 3), alpha 0.5 and a tanh adapter; the size
    groups are read off the same trunk."""
    torch.manual_seed(0)
    g = NetGraph()
    g.add_input("x", (6,))
    g.add("fc1", "linear", ["x"], out_features=5)
    g.add("act1", "relu", ["fc1"])
    g.add("fc2", "linear", ["act1"], out_features=4)
    g.add("body", "identity", ["fc2"])
    for i in range(2):
        g = add_head(g, f"t{i}", 3, "body")
    model = Model(g)
    strategy = make_strategy("pnn", {"trunk": "body", "adapter_reduction": 1,
                                     "alpha_init": 0.5, "adapter_activation": "tanh"})
    strategy.before_task(ctx_for(model, tasks_for(g, 2), 1))
    new = model.graph
    assert new.inputs("head_t1") == ["c1_body"] and new.inputs("head_t0") == ["body"]
    assert new.node("c1_fc2_lat_v").attrs["out_features"] == 5
    assert torch.equal(new.node("c1_fc2_lat_a0").tensors["weight"], torch.tensor([0.5]))
    assert new.node("c1_fc2_lat_f").kind == "tanh"
    groups = strategy.parameter_groups(new)
    assert sorted(groups["trunk"]) == sorted(
        f"{p}{n}.{t}" for p in ("", "c1_") for n in ("fc1", "fc2") for t in ("weight", "bias"))
    assert sorted(groups["adapters"]) == ["c1_fc2_lat_a0.weight", "c1_fc2_lat_u.weight",
                                          "c1_fc2_lat_v.bias", "c1_fc2_lat_v.weight"]
    assert sorted(groups["heads"]) == ["head_t0.bias", "head_t0.weight", "head_t1.bias",
                                       "head_t1.weight"]


def test_a_class_incremental_campaign_is_refused_before_any_write(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", scenario="class",
                       data={**TINY["data"], "stream": "split", "n_tasks": 5})
    with pytest.raises(ConfigError, match="strategy 'pnn' runs only in scenario task"):
        Campaign(load_config(cfg), tmp_path / "r")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("settings,key", [
    ({"adapter_reduction": 0.5}, "strategy.adapter_reduction"),
    ({"alpha_init": "nan"}, "strategy.alpha_init"),
    ({"adapter_activation": "softmax"}, "strategy.adapter_activation"),
    ({"trunk": ""}, "strategy.trunk"),
    ({"alpha": 0.1}, "unknown key 'strategy.alpha'"),
])
def test_bad_settings_are_refused_naming_the_key(settings: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config({"strategy": {"name": "pnn", **settings}}, "c.yaml")


def test_a_column_on_an_imported_resnet18_has_adapters_into_every_conv_but_the_first() -> None:
    graph = randomize_bn(resnet18_net(2, size=16))
    x = x_for(graph, 3)
    before = eval_outputs(graph, x)
    new = add_column(graph, ["t1"]).graph
    after = eval_outputs(new, x)
    assert torch.equal(after["t0"], before["t0"]) and not torch.equal(after["t1"],
                                                                      before["t1"])
    layers = lateral_layers(graph, column_members(graph, 0)[0])
    convs = [n for n in column_members(graph, 0)[0] if graph.node(n).kind == "conv2d"]
    assert len(convs) == 20 and set(layers) == set(convs) - {"conv1"}
    assert new.node("c1_layer2_0_downsample_0_lat_u").attrs["stride"] in (2, (2, 2), [2, 2])


@pytest.mark.slow
def test_pnn_trains_on_an_imported_resnet18_and_keeps_old_outputs() -> None:
    graph = resnet18_net(2, size=16)
    for n in graph.topo_order():  # running statistics that average every batch: after a
        if graph.node(n).kind == "batchnorm2d":  # few steps, eval mode is already sensible
            graph.node(n).attrs["momentum"] = None
    tasks = tasks_for(graph, 2, n=16)
    cfg = TrainConfig(epochs=1, batch_size=4, lr=1e-3, momentum=0.9, weight_decay=1e-4)
    model, logits = learn_all("pnn", graph, tasks, cfg)
    assert torch.isfinite(logits[0]).all() and torch.equal(logits[0], logits[1])
    assert column_count(model.graph) == 2


# ---- campaigns: sizes, resume after a real kill --------------------------------------------------
TINY = {
    "name": "pnn", "seed": 1, "threads": 1,
    "data": {"dataset": "digits", "stream": "permuted", "n_tasks": 3, "max_train_per_task": 200},
    "model": {"kind": "mlp", "hidden": [16, 12]},
    "train": {"epochs": 2, "batch_size": 32, "lr": 0.05},
    "strategy": {"name": "pnn"},
}


def write_config(path: Path, **changes: object) -> Path:
    cfg = json.loads(json.dumps(TINY))
    cfg.update(changes)
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_campaign_bwt_is_exactly_zero_and_size_grows_a_column_per_task(tmp_path: Path) -> None:
    m = Campaign(load_config(write_config(tmp_path / "c.yaml")), tmp_path / "r").start()
    R = m["R"]  # noqa: N806
    for j in range(3):
        assert all(R[i][j] == R[j + 1][j] for i in range(j + 1, 4))
    assert m["bwt"] == 0.0
    trunk = (64 * 16 + 16) + (16 * 12 + 12)  # digits: 64 inputs; hidden 16, 12
    heads = 3 * (12 * 10 + 10)
    # column k's adapter into fc2: k scales, V (k*16 -> 8, bias), U (8 -> 12, no bias)
    adapters = [0] + [k + (k * 16 * 8 + 8) + 8 * 12 for k in (1, 2)]
    want = [trunk * (k + 1) + heads + sum(adapters[:k + 1]) for k in range(3)]
    assert [s["params"] for s in m["sizes"]] == want
    assert m["sizes"][-1]["relative"] == pytest.approx(want[-1] / (trunk + heads))
    for k, size in enumerate(m["sizes"]):  # the breakdown: columns, heads, adapters
        assert size["trunk_params"] == trunk * (k + 1)
        assert size["heads_params"] == heads
        assert size["adapters_params"] == sum(adapters[:k + 1])


def test_cnn_campaign_resumes_in_process_to_the_same_R(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", model={"kind": "cnn", "channels": [4, 6],
                                                   "batchnorm": True, "fc": [12],
                                                   "dropout": 0.2})
    full = Campaign(load_config(cfg), tmp_path / "full").start()
    part = tmp_path / "part"
    Campaign(load_config(cfg), part).start()
    for name in ("task_001", "task_002"):
        shutil.rmtree(part / "checkpoints" / name)
    assert resume_run(part)["R"] == full["R"]


@pytest.mark.slow
def test_resume_after_a_real_kill_gives_the_same_R(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", data={**TINY["data"], "n_tasks": 4,
                                                  "max_train_per_task": None},
                       train={**TINY["train"], "epochs": 8})
    out = tmp_path / "killed"
    kill_after_first_checkpoint(cfg, out, last_task=3)
    resumed = resume_run(out)
    full = Campaign(load_config(cfg), tmp_path / "full").start()
    assert resumed["R"] == full["R"] and resumed["bwt"] == 0.0

