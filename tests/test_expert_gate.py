"""Expert Gate: autoencoder gates choose the expert by the lowest reconstruction error, new
experts start from the most related one, earlier experts stay bitwise, campaigns resume."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from rivalkit import CFG, ctx_for, learn_all, mlp_net, resumed_equals_full, tasks_for

from growth.config import validate_config
from growth.errors import ConfigError
from growth.model import Model
from growth.ops.columns import column_count
from growth.strategies import make_strategy
from growth.strategies.expert_gate import (
    _to_task,
    gate_graph,
    gate_probabilities,
    reconstruction_error,
    relatedness,
)
from growth.train import learn_task

pytestmark = pytest.mark.usefixtures("one_thread")


FAST = {"gate_epochs": 5, "code": 4}


def set_gate(strategy, k: int, shape: tuple[int, ...], code: int, seed: int) -> dict:
    """Gate k with random tensors of our own, written into the strategy's state."""
    gen = torch.Generator().manual_seed(seed)
    size = int(torch.Size(shape).numel())
    t = {"encoder.weight": torch.randn(code, size, generator=gen),
         "encoder.bias": torch.randn(code, generator=gen),
         "decoder.weight": torch.randn(size, code, generator=gen),
         "decoder.bias": torch.randn(size, generator=gen)}
    for name, value in t.items():
        strategy.state[f"gate/{k}/{name}"] = value
    return t


def by_hand(t: dict, x: torch.Tensor) -> torch.Tensor:
    """Mean over features of (sigmoid(D relu(E x + e) + d) - x)^2, per sample."""
    flat = x.flatten(1)
    h = torch.relu(flat @ t["encoder.weight"].T + t["encoder.bias"])
    out = torch.sigmoid(h @ t["decoder.weight"].T + t["decoder.bias"])
    return ((out - flat) ** 2).mean(1)


def test_the_gate_with_the_lowest_reconstruction_error_picks_the_expert() -> None:
    graph = mlp_net(3)
    tasks = tasks_for(graph, 3)
    model, s, _ = learn_all("expert_gate", graph, tasks, params=FAST, upto=2)
    shape = tuple(tasks[0].input_shape)
    gates = {k: set_gate(s, k, shape, 4, seed=10 + k) for k in (0, 1)}
    s._gates = {}
    x = torch.cat([tasks[0].test[0], tasks[1].test[0]])
    errors = torch.stack([by_hand(gates[k], x) for k in (0, 1)])
    for k in (0, 1):
        torch.testing.assert_close(reconstruction_error(s.gate(k, torch.device("cpu"), shape),
                                                        x), errors[k])
    pick = errors.argmin(0)
    assert 0 < int(pick.sum()) < len(x)  # both gates win somewhere: the choice matters
    ctx = ctx_for(model, tasks, 1)
    model.eval()
    with torch.no_grad():
        experts = {k: model.head(f"t{k}")(x).argmax(1) for k in (0, 1)}
        with s.evaluation(ctx, tasks[1]) as score:
            got = score(x)
    want = torch.where(pick == 0, experts[0], experts[1])
    assert got.shape == (len(x), 4)  # 3 classes and "none of this task's classes"
    assert torch.equal(got.argmax(1), want)  # permuted-like tasks share their classes
    routed = float((pick == 1).float().mean())
    assert s.extra["routing"]["1"] == pytest.approx(routed)


def test_gate_probabilities_are_a_softmax_of_minus_error_over_temperature() -> None:
    errors = torch.tensor([[0.2, 1.0], [0.6, 0.4]])
    for t in (1.0, 2.0):
        e = torch.exp(-errors / t)
        torch.testing.assert_close(gate_probabilities(errors, t), e / e.sum(0))
    assert gate_probabilities(errors, 2.0).argmax(0).tolist() == [0, 1]


def test_relatedness_is_one_minus_the_relative_excess_error() -> None:
    assert relatedness(0.5, 0.75) == pytest.approx(0.5)
    assert relatedness(0.2, 0.2) == pytest.approx(1.0)
    assert relatedness(0.4, 0.3) == pytest.approx(1.25)


def test_a_new_expert_starts_as_a_copy_of_the_most_related_one() -> None:
    graph = mlp_net(3)
    tasks = tasks_for(graph, 3)
    model, s, _ = learn_all("expert_gate", graph, tasks, params=FAST, upto=2)
    shape = tuple(tasks[0].input_shape)
    x = tasks[2].val[0]
    gates = {0: set_gate(s, 0, shape, 4, seed=20), 1: set_gate(s, 1, shape, 4, seed=21)}
    gates[0]["decoder.bias"] = s.state["gate/0/decoder.bias"] = torch.full((16,), -10.0)
    s._gates = {}  # gate 0 outputs about 0 everywhere: far worse than gate 1
    s.train_gate = lambda ctx: set_gate(s, 2, shape, 4, seed=21)  # the new task's own gate
    own = float(by_hand(set_gate(s, 2, shape, 4, seed=21), x).mean())
    rel = {k: 1 - (float(by_hand(gates[k], x).mean()) - own) / own for k in (0, 1)}
    best = max(rel, key=rel.get)
    assert best == 1  # not the first column: the copy's source matters
    before = {n: t.clone() for n, t in model.graph.named_tensors().items()}
    ctx = ctx_for(model, tasks, 2, s)
    s.before_task(ctx)
    assert s.extra["related"]["2"]["task"] == best
    assert s.extra["related"]["2"]["relatedness"] == pytest.approx({str(k): v
                                                                     for k, v in rel.items()})
    source = "" if best == 0 else f"c{best}_"
    after = model.graph.named_tensors()
    for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
        assert torch.equal(after[f"c2_{name}"], before[f"{source}{name}"]), name
    assert model.graph.inputs("head_t2") == ["c2_features"]


def test_fresh_init_does_not_copy_an_expert() -> None:
    graph = mlp_net(2)
    tasks = tasks_for(graph, 2)
    model, s, _ = learn_all("expert_gate", graph, tasks, params={**FAST, "init": "fresh"})
    g = model.graph.named_tensors()
    assert not torch.equal(g["c1_fc1.weight"], g["fc1.weight"])


def test_earlier_experts_outputs_are_bitwise_identical_after_later_tasks() -> None:
    graph = mlp_net(3)
    tasks = tasks_for(graph, 3)
    model, s, _ = learn_all("expert_gate", graph, tasks, params=FAST, upto=1)
    x = tasks[0].test[0]
    model.eval()
    first = model.head("t0")(x).detach().clone()
    for i in (1, 2):
        learn_task(ctx_for(model, tasks, i), s, CFG, seed=i)
        model.eval()
        assert torch.equal(model.head("t0")(x), first)
    assert first.std(0).min() > 1e-4
    assert column_count(model.graph) == 3


def test_a_sample_routed_to_an_expert_of_other_classes_counts_as_none() -> None:
    graph = mlp_net(2, classes=2)
    tasks = tasks_for(graph, 2, classes=2)
    tasks[1] = dataclasses.replace(tasks[1], classes=[2, 3], class_offset=2)
    model, s, _ = learn_all("expert_gate", graph, tasks, params=FAST)
    shape = tuple(tasks[0].input_shape)
    set_gate(s, 0, shape, 4, seed=1)
    set_gate(s, 1, shape, 4, seed=2)
    s._gates = {}
    x = tasks[0].test[0]
    errors = torch.stack([reconstruction_error(s.gate(k, torch.device("cpu"), shape), x)
                          for k in (0, 1)])
    pick = errors.argmin(0)
    model.eval()
    with torch.no_grad(), s.evaluation(ctx_for(model, tasks, 1), tasks[0]) as score:
        got = score(x).argmax(1)
    assert bool((pick == 1).any())
    assert bool((got[pick == 1] == 2).all())  # the extra column: never a task-0 label
    assert bool((got[pick == 0] < 2).all())


def test_a_prediction_maps_to_the_same_dataset_class_in_the_evaluated_task() -> None:
    expert = tasks_for(mlp_net(1), 1)[0]
    expert = dataclasses.replace(expert, classes=[5, 3, 9], n_classes=3)
    task = dataclasses.replace(expert, classes=[3, 5, 7], n_classes=3)
    got = _to_task(expert, task, torch.tensor([0, 1, 2, 1]))
    assert got.tolist() == [1, 0, 3, 0]  # class 9 is none of the task's: the extra column


def test_a_gate_is_trained_on_the_task_to_reconstruct_it() -> None:
    graph = mlp_net(1)
    task = tasks_for(graph, 1, n=400)[0]
    gen = torch.Generator().manual_seed(3)  # inputs on a 2-d sheet: an autoencoder learns it
    x = torch.sigmoid(torch.randn(400, 2, generator=gen) @ torch.randn(2, 16, generator=gen))
    x = x.view(400, 1, 4, 4)
    task = dataclasses.replace(task, train=(x[:200], task.train[1][:200].repeat(2)[:200]),
                               test=(x[300:], task.test[1].repeat(2)[:100]))
    s = make_strategy("expert_gate", {"code": 4, "gate_epochs": 40, "gate_lr": 0.01})
    s.train_gate(ctx_for(Model(graph), [task], 0, s))
    shape = tuple(task.input_shape)
    trained = s.gate(0, torch.device("cpu"), shape)
    torch.manual_seed(0)
    fresh = Model(gate_graph(shape, 4)).module.eval().requires_grad_(False)
    assert float(reconstruction_error(trained, task.test[0]).mean()) < \
        0.2 * float(reconstruction_error(fresh, task.test[0]).mean())


def test_expert_gate_campaign_resumes_to_the_same_R(tmp_path: Path) -> None:
    full, resumed = resumed_equals_full(tmp_path, {"name": "expert_gate", "gate_epochs": 3})
    assert resumed["R"] == full["R"]
    assert full["details"]["expert_gate"]["routing"] == resumed["details"]["expert_gate"][
        "routing"]
    sizes = full["sizes"]
    base_trunk = 64 * 16 + 16 + 16 * 12 + 12
    gate = 64 * 32 + 32 + 32 * 64 + 64
    for k, size in enumerate(sizes):
        assert size["trunk_params"] == base_trunk * (k + 1)
        assert size["gates_params"] == gate * (k + 1)


@pytest.mark.parametrize("settings,key", [({"code": 0}, "strategy.code"),
                                          ({"temperature": 0}, "strategy.temperature"),
                                          ({"init": "best"}, "strategy.init")])
def test_bad_settings_are_refused_naming_the_key(settings: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config({"strategy": {"name": "expert_gate", **settings}}, "c.yaml")


def test_an_overcomplete_gate_is_refused() -> None:
    graph = mlp_net(1)
    tasks = tasks_for(graph, 1)
    s = make_strategy("expert_gate", {"code": 16})
    with pytest.raises(ConfigError, match="undercomplete"):
        s.before_task(ctx_for(Model(graph), tasks, 0, s))
