"""Learn to Grow: the supernet mixes every option by the softmax of its architecture weights,
their gradient goes through the softmax (by hand), the argmax path is built sharing what earlier
paths compute, old paths stay bitwise, sizes count each version once, campaigns resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from growth.search_spaces.networks import add_head
from rivalkit import (
    CFG,
    cnn_net,
    ctx_for,
    learn_all,
    mlp_net,
    resumed_equals_full,
    tasks_for,
)

from growth.config import validate_config
from growth.errors import ConfigError
from growth.graph import NetGraph
from growth.model import Model
from growth.ops.columns import freeze
from growth.strategies import make_strategy
from growth.strategies.learn_to_grow import SEARCH, Relaxation, option_names
from growth.train import learn_task

pytestmark = pytest.mark.usefixtures("one_thread")


def after_first(n_tasks: int = 3, params: dict | None = None):
    graph = mlp_net(n_tasks)
    tasks = tasks_for(graph, n_tasks)
    model, s, _ = learn_all("learn_to_grow", graph, tasks, params=params, upto=1)
    return model, s, tasks


def supernet_of(model: Model, s, head: str = "t1"):
    frozen = freeze(model.graph, model.graph.ancestors(["t0"]) - {"x"}).graph
    net, scales, costs = s.supernet(frozen, head, seed=3)
    gen = torch.Generator().manual_seed(7)
    for n in net.topo_order():  # adapters away from their zero start, so each one counts
        if n.endswith("_u"):
            node = net.node(n)
            node.tensors = {k: torch.randn(t.shape, generator=gen) * 0.3
                            for k, t in node.tensors.items()}
    return net, scales, costs


def by_hand(net: NetGraph, x: torch.Tensor, s: dict[str, torch.Tensor]) -> torch.Tensor:
    """The supernet of an MLP 16-6-5 by hand: each layer sum_c s_c o_c(input), o_c = reuse
    (W_0 h + b_0), adapt (W_0 h + b_0 + U V h), new (W h + b)."""
    t = net.named_tensors()

    def lin(name: str, h: torch.Tensor) -> torch.Tensor:
        return h @ t[f"{name}.weight"].T + (t[f"{name}.bias"] if f"{name}.bias" in t else 0)

    h = x.flatten(1)
    for layer in ("fc1", "fc2"):
        options = [lin(f"s_{layer}_reuse0", h),
                   lin(f"s_{layer}_adapt0", h) + lin(f"s_{layer}_adapt0_u",
                                                     lin(f"s_{layer}_adapt0_v", h)),
                   lin(f"s_{layer}_new", h)]
        h = torch.relu(sum(w * o for w, o in zip(s[layer], options)))
    return lin("s_head", h)


def test_the_supernet_mixes_every_option_by_the_softmax_of_its_weights() -> None:
    model, s, tasks = after_first()
    net, scales, costs = supernet_of(model, s)
    assert [list(v) for v in scales.values()] == [
        [f"s_{n}_w{c}" for c in range(3)] for n in ("fc1", "fc2")]
    supernet = Model(net)
    relax = Relaxation(scales, costs, 0.0, 0.1, tasks[1].val, 4, torch.Generator())
    relax.beta = {"fc1": torch.tensor([0.3, -1.0, 0.8]), "fc2": torch.tensor([1.5, 0.2, -0.4])}
    ctx = ctx_for(supernet, tasks, 1)
    relax.write(ctx)
    x = tasks[1].test[0]
    weights = {n: torch.softmax(b, 0) for n, b in relax.beta.items()}
    with torch.no_grad():
        got = supernet.head(SEARCH)(x)
    torch.testing.assert_close(got, by_hand(net, x, weights))
    reuse, new = net.node("s_fc1_reuse0"), net.node("s_fc1_new")
    assert reuse.attrs.get("frozen") and not new.attrs.get("frozen")
    assert torch.equal(reuse.tensors["weight"], model.graph.node("fc1").tensors["weight"])
    fc1 = 16 * 6 + 6
    torch.testing.assert_close(costs["fc1"], torch.tensor([0.0, (16 * 1 + 1 * 6) / fc1, 1.0]))


def test_the_architecture_gradient_goes_through_the_softmax() -> None:
    model, s, tasks = after_first()
    net, scales, costs = supernet_of(model, s)
    supernet = Model(net)
    complexity = 0.7
    relax = Relaxation(scales, costs, complexity, 0.1, tasks[1].val, 4, torch.Generator())
    relax.beta = {"fc1": torch.tensor([0.3, -1.0, 0.8]), "fc2": torch.tensor([1.5, 0.2, -0.4])}
    ctx = ctx_for(supernet, tasks, 1)
    relax.write(ctx)
    x, y = tasks[1].train[0][:8], tasks[1].train[1][:8]
    got = relax.gradient(ctx, x, y)
    weights = {n: torch.softmax(b, 0).requires_grad_(True) for n, b in relax.beta.items()}
    loss = F.cross_entropy(by_hand(net, x, weights), y)
    g = dict(zip(weights, torch.autograd.grad(loss, list(weights.values()))))
    for layer, beta in relax.beta.items():
        p = torch.softmax(beta, 0)
        jacobian = torch.diag(p) - torch.outer(p, p)
        want = jacobian @ (g[layer] + complexity * costs[layer])
        torch.testing.assert_close(got[layer], want)
        assert float(want.abs().max()) > 1e-4


def test_a_search_step_moves_the_weights_towards_a_helpful_option() -> None:
    model, s, tasks = after_first()
    net, scales, costs = supernet_of(model, s)
    supernet = Model(net)
    relax = Relaxation(scales, costs, 0.0, 0.1, tasks[1].val, 4, torch.Generator())
    ctx = ctx_for(supernet, tasks, 1)
    relax.write(ctx)
    x, y = tasks[1].train[0][:8], tasks[1].train[1][:8]
    before = {n: b.clone() for n, b in relax.beta.items()}
    grads = relax.gradient(ctx, x, y)
    relax.arch_step(ctx, x, y)
    for layer in before:  # Adam's first step: lr times the sign of the gradient
        torch.testing.assert_close(relax.beta[layer], before[layer] - 0.1 * grads[layer].sign(),
                                   atol=1e-6, rtol=0)
    p = supernet.named_parameters()
    assert float(p["s_fc1_w0.weight"].detach()) == pytest.approx(float(torch.softmax(
        relax.beta["fc1"].detach(), 0)[0]))


def test_option_order_and_argmax_choices() -> None:
    assert option_names(2) == [("reuse", 0), ("reuse", 1), ("adapt", 0), ("adapt", 1),
                               ("new", None)]
    relax = Relaxation({"a": ["x", "y", "z"]}, {"a": torch.zeros(3)}, 0, 0.1,
                       (torch.zeros(1), torch.zeros(1)), 1, torch.Generator())
    relax.beta = {"a": torch.tensor([0.1, 0.9, 0.9])}
    assert relax.choice() == {"a": 1}


def test_a_chosen_path_shares_what_earlier_paths_compute_and_copies_reuse_elsewhere() -> None:
    model, s, tasks = after_first(3)
    net, *_ = supernet_of(model, s)
    ctx = ctx_for(model, tasks, 1, s)
    frozen = freeze(model.graph, model.graph.ancestors(["t0"]) - {"x"})
    grown, record = s.grow(frozen.graph, net, ctx, {"fc1": ["new", None], "fc2": ["reuse", 0]})
    assert grown.inputs("g1_fc1") == ["flatten"] and grown.inputs("g1_fc2") == ["g1_act1"]
    assert grown.node("g1_fc2").attrs["frozen"]  # version 0 on a new input: a frozen copy
    assert torch.equal(grown.node("g1_fc2").tensors["weight"], grown.node("fc2").tensors["weight"])
    assert torch.equal(grown.node("g1_fc1").tensors["weight"], net.node("s_fc1_new").tensors[
        "weight"])
    assert grown.inputs("head_t1") == ["g1_features"]
    assert torch.equal(grown.node("head_t1").tensors["weight"], net.node("s_head").tensors[
        "weight"])
    assert set(record.added_nodes) == {"g1_fc1", "g1_act1", "g1_fc2", "g1_act2", "g1_features"}
    ctx.replace_graph(grown, [frozen.record, record])
    s._record()["paths"]["1"] = {"fc1": ["new", None], "fc2": ["reuse", 0]}
    net2, *_ = supernet_of(model, s, "t2")
    ctx2 = ctx_for(model, tasks, 2, s)
    grown2, record2 = s.grow(model.graph, net2, ctx2, {"fc1": ["reuse", 1],
                                                       "fc2": ["adapt", 0]})
    assert set(record2.added_nodes) == {"g2_fc2_v", "g2_fc2_u", "g2_fc2_sum", "g2_act2",
                                        "g2_features"}  # fc1 v1 and the copy of fc2: shared
    assert grown2.inputs("g2_fc2_sum") == ["g1_fc2", "g2_fc2_u"]
    assert grown2.inputs("g2_fc2_v") == ["g1_act1"]
    assert grown2.inputs("head_t2") == ["g2_features"]
    sizes = s.size_parts(Model(grown2))
    counted = {id(t) for t in sizes["trunk"]}
    params = Model(grown2).named_parameters()
    assert id(params["g1_fc2.weight"]) not in counted  # a copy: the version is counted once
    assert sum(t.numel() for t in sizes["adapters"]) == 6 * 1 + 1 * 5
    assert sum(t.numel() for t in sizes["trunk"]) == 2 * (16 * 6 + 6) + (6 * 5 + 5)


@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_earlier_tasks_outputs_are_bitwise_identical_after_later_tasks(net: str) -> None:
    graph = mlp_net(3) if net == "mlp" else cnn_net(3)
    tasks = tasks_for(graph, 3)
    model, s, scores = learn_all("learn_to_grow", graph, tasks,
                                 params={"search_epochs": 1})
    assert scores[0][0].std(0).min() > 1e-4
    for i in (1, 2):
        assert torch.equal(scores[i][0], scores[0][0])
    assert torch.equal(scores[2][1], scores[1][1])
    paths = s.extra["ltg"]["paths"]
    assert set(paths) == {"0", "1", "2"} and all(len(p) == (2 if net == "mlp" else 3)
                                                 for p in paths.values())


def test_task_zero_trains_the_base_and_later_tasks_train_only_their_path() -> None:
    graph = mlp_net(2)
    tasks = tasks_for(graph, 2)
    model, s, _ = learn_all("learn_to_grow", graph, tasks, params={"search_epochs": 1},
                            upto=1)
    ctx = ctx_for(model, tasks, 1)
    learn_task(ctx, s, CFG, seed=1)
    trainable = {n.split(".")[0] for n, p in model.named_parameters().items() if p.requires_grad}
    path = set(model.graph.ancestors(["t1"]))
    assert trainable <= path | {"head_t0"} - set(model.graph.ancestors(["t0"])) | {"head_t1"}
    assert "fc1" not in trainable and "fc2" not in trainable


def test_learn_to_grow_campaign_resumes_and_reports_its_search(tmp_path: Path) -> None:
    full, resumed = resumed_equals_full(tmp_path, {"name": "learn_to_grow", "search_epochs": 1})
    assert resumed["R"] == full["R"]
    a, b = (m["details"]["learn_to_grow"] for m in (full, resumed))
    assert a["paths"] == b["paths"]
    assert [x["weights"] for x in a["search"].values()] == [x["weights"] for x in
                                                          b["search"].values()]
    search = full["search"]
    assert search["children"] == 2 and search["child_time_s"] > 0
    options = full["details"]["learn_to_grow"]["search"]
    assert options["1"]["architectures"] == 9  # 3 options x 3 options
    moved = [abs(w - 1 / 3) for w in options["1"]["weights"]["fc1"]]
    assert max(moved) > 1e-3  # the architecture weights took their steps
    assert search["architectures"] == sum(o["architectures"] for o in options.values())
    assert full["bwt"] == 0.0


def test_a_trunk_that_is_not_a_chain_is_refused() -> None:
    g = NetGraph()
    g.add_input("x", (4,))
    g.add("a", "linear", ["x"], out_features=4)
    g.add("b", "linear", ["a"], out_features=4)
    g.add("sum", "add", ["a", "b"])
    g.add("features", "identity", ["sum"])
    g = add_head(add_head(g, "t0", 2), "t1", 2)
    tasks = tasks_for(g, 2)
    s = make_strategy("learn_to_grow")
    model = Model(g)
    with pytest.raises(ConfigError, match="chain trunk"):
        s.before_task(ctx_for(model, tasks, 0, s))


@pytest.mark.parametrize("settings,key", [({"search_epochs": 0}, "strategy.search_epochs"),
                                          ({"arch_lr": 0}, "strategy.arch_lr"),
                                          ({"complexity": -1}, "strategy.complexity"),
                                          ({"adapter_reduction": 0.5},
                                           "strategy.adapter_reduction")])
def test_bad_settings_are_refused_naming_the_key(settings: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config({"strategy": {"name": "learn_to_grow", **settings}}, "c.yaml")
