"""Operator plug-ins end to end: the example package (examples/operator_plugin) installed as
pip would install it, listed by `growth ops list`, proposed by a search space that names it
(`space.operators`), trained through `growth search` and REC's search, and called by name
from a strategy."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from growth.controllers import make_controller
from growth.search_spaces.networks import add_head, mlp, small_cnn
from growth.search_spaces.space import SearchSpace, make_space
from runfiles import EXAMPLE_PLUGIN, install_example, write_config

from growth.campaign import Campaign
from growth.cli import main
from growth.compile import compile_graph
from growth.config import load_config
from growth.errors import ConfigError
from growth.ops import get_operator
from growth.strategies import Strategy, register

EXAMPLE = EXAMPLE_PLUGIN.parent / "operator_plugin"


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "site"
    path.mkdir()
    monkeypatch.syspath_prepend(str(path))
    install_example(path, EXAMPLE)
    before = set(sys.modules)
    yield path
    for name in set(sys.modules) - before:
        if name.startswith("growth_residual"):
            del sys.modules[name]


def test_ops_list_marks_the_plugin_and_every_search_role(site: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    assert main(["ops", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    mine = next(line for line in lines if line.startswith("residual_deeper"))
    assert mine.endswith("(search role: deeper)  [plug-in from growth_residual]")
    assert next(line for line in lines if line.startswith("net2wider")).endswith(
        "(search role: wider)")
    assert not any("plug-in" in line for line in lines if not line.startswith("residual"))


@pytest.mark.parametrize("build", [lambda: mlp((6,), [5, 4]), lambda: small_cnn((1, 8, 8), [3, 4])],
                         ids=["mlp", "cnn"])
def test_the_example_operator_keeps_the_function_and_its_layer_learns(site: Path, build) -> None:
    torch.manual_seed(0)  # weights and inputs from a fixed seed, whatever ran before
    graph = add_head(build(), "t0", 3)
    op = get_operator("residual_deeper")
    x = torch.randn(5, *graph.shape(graph.input_node()))
    for after in ("act1", "features"):
        result = op(graph, after=after, kernel_size=3)
        net = compile_graph(result.graph)
        torch.testing.assert_close(net.eval()(x), compile_graph(graph).eval()(x), rtol=0,
                                   atol=0)
        layer = result.record.added_nodes[0]
        net.train()(x).square().sum().backward()
        grad = dict(net.named_parameters())[f"{layer}.weight"].grad
        assert grad is not None and grad.abs().sum() > 0
        assert result.record.added == [f"{layer}.weight", f"{layer}.bias"]


def test_a_space_proposes_the_plugin_where_it_accepts(site: Path) -> None:
    graph = add_head(mlp((6,), [5, 4]), "t0", 3)
    space = make_space({"operators": ["net2wider", "residual_deeper"]}, graph)
    options = space.deeper_options(graph)
    assert options and {o.action["op"] for o in options} == {"residual_deeper"}
    assert {o.action["after"] for o in options} == {"act1", "act2"}  # after each unit
    controller = make_controller("random", space, {"wider_actions": 0, "deeper_actions": 1},
                                 seed=0)
    child, records = space.apply(graph, controller.propose(graph, 1)[0].actions)
    assert records[0].op == "residual_deeper"
    x = torch.randn(4, 6)
    torch.testing.assert_close(compile_graph(child).eval()(x), compile_graph(graph).eval()(x),
                               rtol=0, atol=0)


def test_one_operator_per_role_rolls_out_as_the_default_space_does(site: Path) -> None:
    """Naming the default operators changes nothing: a single operator is used without a
    draw, so the generator gives the same children."""
    graph = add_head(mlp((6,), [5, 4]), "t0", 3)
    settings = {"wider_actions": 1, "deeper_actions": 2}

    def archs(spec: dict) -> list[str]:
        space = make_space(spec, graph)
        return [p.arch for p in make_controller("random", space, settings,
                                                seed=3).propose(graph, 6)]

    assert archs({}) == archs({"operators": ["net2wider", "net2deeper"]})


@pytest.mark.parametrize("build", [lambda: mlp((6,), [5, 4]), lambda: small_cnn((1, 8, 8), [3, 4])],
                         ids=["mlp", "cnn"])
def test_each_drawn_operator_builds_the_rolled_out_child_and_actions_are_seeded_by_index(
        site: Path, build) -> None:
    """With two operators of each role, every one is drawn, and where both deeper operators
    fit an insertion (its kernel included, on images) either may be drawn there. A
    proposal's architecture is the one its own actions build (the rollout continues from the
    child the drawn operator built), each action's seed is its index in the proposal, and
    the draws come from the controller's generator alone."""
    torch.manual_seed(0)
    graph = add_head(build(), "t0", 3)
    ops = ["net2wider", "widen_private", "net2deeper", "residual_deeper"]
    space = make_space({"operators": ops}, graph)
    settings = {"wider_actions": 1, "deeper_actions": 2}

    def proposals(global_seed: int) -> list:
        torch.manual_seed(global_seed)
        return make_controller("random", space, settings, seed=3).propose(graph, 8)

    first = proposals(0)
    assert {a["op"] for p in first for a in p.actions} == set(ops)
    for p in first:
        assert space.arch(space.apply(graph, p.actions)[0]) == p.arch
        assert [a["seed"] for a in p.actions] == list(range(len(p.actions)))
    assert [p.actions for p in proposals(1)] == [p.actions for p in first]
    menu = space.deeper_menu(graph)  # the insertions (kernel included) both deeper ops fit
    both = {(o.action["after"], o.action.get("kernel_size")) for o in space.deeper_options(graph)
            if len(menu.operators(o.block, o.position, o.kernel)) == 2}
    one = make_controller("random", space, {"wider_actions": 0, "deeper_actions": 1},
                          seed=3).propose(graph, 8)
    assert {a["op"] for p in one for a in p.actions
            if (a["after"], a.get("kernel_size")) in both} == {"net2deeper", "residual_deeper"}


@pytest.mark.parametrize("operators,message", [
    (["net2wider", "no_such_op"], "unknown operator 'no_such_op'"),
    (["prune_units"], "operator 'prune_units' has no search role"),
    (["net2wider", "net2wider"], "listed twice"),
])
def test_a_space_naming_an_operator_it_cannot_call_is_a_config_error(operators, message
                                                                     ) -> None:
    graph = add_head(mlp((6,), [5]), "t0", 3)
    with pytest.raises(ConfigError, match=rf"search.space.operators: .*{message}"):
        make_space({"operators": operators}, graph)


def test_growth_search_trains_children_the_plugin_built(site: Path, tmp_path: Path) -> None:
    out = tmp_path / "search"
    config = Path(__file__).resolve().parents[1] / "experiments" / "search_digits.yaml"
    code = main(["search", str(config), "--out", str(out), "--quiet",
                 "--set", "search.space.operators=[net2wider, residual_deeper]",
                 "--set", "search.backend=local", "--set", "search.children=2",
                 "--set", "search.budget={generations: 1}", "--set", "search.base_epochs=2",
                 "--set", "train.epochs=1", "--set", "data.max_train_per_task=300",
                 "--set", "search.controller={name: random, wider_actions: 0, "
                 "deeper_actions: 1}"])
    assert code == 0
    records = [json.loads(line) for line in (out / "children.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["status"] == "ok" for r in records)
    assert all(a["op"] == "residual_deeper" for r in records for a in r["actions"])
    base = json.loads((out / "base" / "base.json").read_text())
    for r in records:  # the inherited function: the base's accuracy before training
        assert r["val_acc_before"] == pytest.approx(base["val_acc"], abs=1e-12)


class ResidualGrowth(Strategy):
    """Grows the trunk by the plug-in operator, called by name, before every later task."""

    name = "residual_growth"
    description = "test strategy: a residual layer before each later task"

    def before_task(self, ctx) -> None:
        if ctx.seen:
            result = get_operator("residual_deeper")(ctx.model.graph, after="features")
            ctx.replace_graph(result.graph, result.record)


def test_a_strategy_calls_the_plugin_by_name(site: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from growth import strategies

    monkeypatch.setattr(strategies, "STRATEGIES", dict(strategies.STRATEGIES))
    register(ResidualGrowth)
    cfg = load_config(write_config(tmp_path / "c.yaml", strategy={"name": "residual_growth"},
                                   train__epochs=1))
    campaign = Campaign(cfg, tmp_path / "run")
    metrics = campaign.start()
    graph = campaign.model.graph
    assert {"features_res1", "features_res2"} <= set(graph.nx.nodes)
    assert metrics["sizes"][-1]["params"] > metrics["sizes"][0]["params"]


@pytest.mark.slow
def test_rec_searches_with_the_plugin(site: Path, tmp_path: Path) -> None:
    """REC's search space (strategy.search.space) names the plug-in like a built-in."""
    cfg = load_config(write_config(
        tmp_path / "c.yaml", data__n_tasks=2, train__epochs=1, data__max_train_per_task=150,
        model__hidden=[16],
        strategy={"name": "rec", "compress": "off", "expansion": "shared", "owners": "off",
                  "search": {"backend": "local", "children": 2, "epochs": 1,
                             "space": {"operators": ["residual_deeper"]},
                             "controller_params": {"wider_actions": 0,
                                                   "deeper_actions": 1}}}))
    Campaign(cfg, tmp_path / "run").start()
    lines = (tmp_path / "run" / "work" / "task_001" / "search" / "children.jsonl").read_text()
    records = [json.loads(line) for line in lines.splitlines()]
    assert records and all(a["op"] == "residual_deeper" for r in records for a in r["actions"])


def test_the_default_space_lists_the_builtin_roles() -> None:
    space = SearchSpace()
    assert space.wider_ops == ["net2wider"] and space.deeper_ops == ["net2deeper"]
    private = SearchSpace({"private": True})
    assert private.wider_ops == ["widen_private"] and private.deeper_ops == []
