"""DEN: proximal sparsity steps, the breadth-first selection, expansion when the loss stays
high, removal of dead new units, split of drifting units, timestamps (by hand), bounded
forgetting, campaigns that resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rivalkit import (
    CFG,
    cnn_net,
    ctx_for,
    digit_net,
    digit_tasks,
    learn_all,
    mlp_net,
    resumed_equals_full,
    tasks_for,
)

from growth.config import validate_config
from growth.errors import ConfigError
from growth.model import Model
from growth.strategies import make_strategy
from growth.strategies.den import group_shrink_, soft_threshold_, widen
from growth.train import fit

pytestmark = pytest.mark.usefixtures("one_thread")


def started(params: dict, n_tasks: int = 2, hidden: tuple[int, ...] = (6, 5)):
    """Task 0 learned, task 1's context ready (its training set up, not run)."""
    graph = mlp_net(n_tasks, hidden)
    tasks = tasks_for(graph, n_tasks)
    model, s, _ = learn_all("den", graph, tasks, params=params, upto=1)
    ctx = ctx_for(model, tasks, 1, s)
    ctx.train_config = CFG
    ctx.train_fit = lambda **kw: fit(ctx, s, CFG, **{"seed": 1, **kw})
    return model, s, tasks, ctx


def test_proximal_steps_match_a_hand_computation() -> None:
    w = torch.tensor([[0.3, -0.05, 0.0], [-0.2, 0.1, 0.02]])
    where = torch.tensor([[True, True, False], [True, False, True]])
    got = w.clone()
    soft_threshold_(got, where, 0.08)
    assert torch.allclose(got, torch.tensor([[0.22, 0.0, 0.0], [-0.12, 0.1, 0.0]]))
    rows = torch.tensor([True, False])
    got = w.clone()
    group_shrink_(got, rows, 0.1)
    norm = (0.3 ** 2 + 0.05 ** 2) ** 0.5
    torch.testing.assert_close(got[0], w[0] * (1 - 0.1 / norm))
    assert torch.equal(got[1], w[1])
    got = w.clone()
    group_shrink_(got, torch.tensor([True, True]), 0.5)  # a norm below the step: the unit dies
    assert torch.equal(got, torch.zeros_like(w))


def test_selection_is_a_breadth_first_search_of_the_nonzero_connections() -> None:
    model, s, tasks, ctx = started({"select_epochs": 1})
    params = model.named_parameters()
    with torch.no_grad():
        head = params["head_t1.weight"]
        head.zero_()
        head[0, 1], head[2, 3] = 0.5, -0.4  # fc2 units 1 and 3 are read
        fc2 = params["fc2.weight"]
        fc2.zero_()
        fc2[1, 0], fc2[3, 4], fc2[2, 5] = 1.0, -1.0, 1.0  # units 1, 3 read fc1 units 0, 4
    selected = s.select(ctx)
    assert selected["fc2"].tolist() == [False, True, False, True, False]
    assert selected["fc1"].tolist() == [True, False, False, False, True, False]
    sub = s._subnetwork(ctx, selected)
    want = torch.zeros(5, 6, dtype=torch.bool)
    want[1, [0, 4]] = want[3, [0, 4]] = True
    assert torch.equal(sub["fc2.weight"], want)
    assert torch.equal(sub["fc1.weight"], selected["fc1"][:, None].expand(6, 16))
    assert torch.equal(sub["fc2.bias"], selected["fc2"])


def test_selective_retraining_moves_only_the_selected_subnetwork() -> None:
    model, s, tasks, ctx = started({"select_epochs": 1})
    s.before_task(ctx)
    assert s._mode == "retrain" and set(s._trainable) == {"fc1.weight", "fc1.bias",
                                                          "fc2.weight", "fc2.bias"}
    chosen = {"fc1": torch.tensor([True, False, True, False, False, True]),
              "fc2": torch.tensor([False, True, True, False, False])}
    sub = s._trainable = s._subnetwork(ctx, chosen)
    before = {n: p.detach().clone() for n, p in model.named_parameters().items()}
    held = []

    def still(epoch: int, loss: float) -> None:  # during the fit, not only at its end
        now = model.named_parameters()
        held.append(all(torch.equal(now[n][~m], before[n][~m]) for n, m in sub.items()))

    fit(ctx, s, CFG, seed=1, on_epoch=still)
    assert held == [True] * CFG.epochs
    after = model.named_parameters()
    for n, m in sub.items():
        assert torch.equal(after[n][~m], before[n][~m]), n
        assert not torch.equal(after[n][m], before[n][m]), n


def test_the_network_expands_by_k_units_only_when_the_loss_stays_above_the_threshold() -> None:
    for threshold, grown in ((1e6, False), (0.0, True)):
        graph = mlp_net(2)
        tasks = tasks_for(graph, 2)
        model, s, _ = learn_all("den", graph, tasks,
                                params={"threshold": threshold, "k": 3, "group": 0.0,
                                        "l1": 0.0, "split": 1e6})
        entry = s.extra["den"]["1"]
        assert ("expanded" in entry) == grown
        assert entry["loss"] > 0
        widths = {n: int(st.numel()) for n, st in s.stamps(model).items()}
        assert widths == ({"fc1": 9, "fc2": 8} if grown else {"fc1": 6, "fc2": 5})
        stamps = s.stamps(model)
        if grown:
            assert stamps["fc1"].tolist() == [1] * 6 + [2] * 3
            assert entry["expanded"] == {"added": {"fc1": 3, "fc2": 3},
                                         "kept": {"fc1": 3, "fc2": 3}}


def test_widening_keeps_every_old_weight_and_gives_new_units_fresh_rows_and_zero_columns(
        ) -> None:
    graph = mlp_net(2)
    out, record = widen(graph, "fc1", [0, 1], seed=5, fresh=True, keep={"fc2.weight"})
    old, new = graph.named_tensors(), out.named_tensors()
    assert torch.equal(new["fc1.weight"][:6], old["fc1.weight"])
    assert torch.equal(new["fc2.weight"][:, :6], old["fc2.weight"])
    assert torch.equal(new["fc2.weight"][:, 6:], torch.zeros(5, 2))
    torch.manual_seed(5)
    drawn = torch.nn.Linear(16, 2)
    assert torch.equal(new["fc1.weight"][6:], drawn.weight.detach())
    assert torch.equal(new["fc1.bias"][6:], drawn.bias.detach())
    copied, _ = widen(graph, "fc2", [3], seed=0, fresh=False, keep={"head_t1.weight"})
    t = copied.named_tensors()
    for head in ("head_t0.weight", "head_t1.weight"):
        assert torch.equal(t[head][:, :5], graph.named_tensors()[head])  # undivided
    assert torch.equal(t["head_t1.weight"][:, 5], graph.named_tensors()["head_t1.weight"][:, 3])
    assert torch.equal(t["head_t0.weight"][:, 5], torch.zeros(3))
    assert torch.equal(t["fc2.weight"][5], graph.named_tensors()["fc2.weight"][3])


def test_new_units_left_without_incoming_weights_are_removed() -> None:
    graph = mlp_net(2)
    tasks = tasks_for(graph, 2)
    model, s, _ = learn_all("den", graph, tasks, params={"threshold": 0.0, "k": 3,
                                                         "group": 1e4, "split": 1e6})
    assert s.extra["den"]["1"]["expanded"]["kept"] == {"fc1": 0, "fc2": 0}
    assert {n: int(st.numel()) for n, st in s.stamps(model).items()} == {"fc1": 6, "fc2": 5}
    assert model.named_parameters()["fc2.weight"].shape == (5, 6)


def test_units_that_drift_beyond_the_threshold_are_split_with_their_old_weights_back() -> None:
    model, s, tasks, ctx = started({"split": 0.5, "split_epochs": 0, "threshold": 1e6})
    s.before_task(ctx)
    old = {n: p.detach().clone() for n, p in model.named_parameters().items()}
    with torch.no_grad():
        w = model.named_parameters()["fc1.weight"]
        w[0] += 1.0 / 4  # rho = ||(0.25,) * 16||_2 = 1.0 > 0.5: split
        w[3] += 0.2 / 4  # rho = 0.2: kept
    drifted = model.named_parameters()["fc1.weight"].detach().clone()
    rho = s.drift(ctx)["fc1"]
    torch.testing.assert_close(rho[[0, 3]], torch.tensor([1.0, 0.2]))
    split = s.split_units(ctx)
    assert split == {"fc1": [0]}
    t = model.named_parameters()
    assert t["fc1.weight"].shape == (7, 16)
    assert torch.equal(t["fc1.weight"][0], old["fc1.weight"][0])  # the original: as before
    assert torch.equal(t["fc1.weight"][6], drifted[0])  # the copy: the drifted weights
    assert torch.equal(t["fc1.weight"][3], drifted[3])
    assert torch.equal(t["fc2.weight"][:, 6], old["fc2.weight"][:, 0])
    s.after_task(ctx)
    assert s.stamps(model)["fc1"].tolist() == [1] * 6 + [2]


def test_an_earlier_task_sees_only_the_units_stamped_up_to_it() -> None:
    graph = mlp_net(2)
    tasks = tasks_for(graph, 2)
    model, s, scores = learn_all("den", graph, tasks, params={"threshold": 0.0, "k": 3,
                                                              "group": 0.0, "split": 0.01})
    stamps = s.stamps(model)
    assert bool((stamps["fc1"] == 2).any()) and bool((stamps["fc2"] == 2).any())
    p = {n: t.detach() for n, t in model.named_parameters().items()}
    r1, r2 = stamps["fc1"] == 1, stamps["fc2"] == 1
    x = tasks[0].test[0].flatten(1)
    h1 = torch.relu(x @ p["fc1.weight"][r1].T + p["fc1.bias"][r1])
    h2 = torch.relu(h1 @ p["fc2.weight"][r2][:, r1].T + p["fc2.bias"][r2])
    want = h2 @ p["head_t0.weight"][:, r2].T + p["head_t0.bias"]
    torch.testing.assert_close(scores[1][0], want)
    model.eval()
    with torch.no_grad():
        full = model.head("t1")(tasks[1].test[0])
    torch.testing.assert_close(scores[1][1], full)  # the latest task sees every unit


def test_old_tasks_forget_within_the_l2_pull_and_the_split() -> None:
    graph = digit_net(3)
    tasks = digit_tasks(3, 300)
    cfg = CFG.model_copy(update={"epochs": 8, "batch_size": 16})
    y = tasks[0].test[1]
    drop = {}
    for l2 in (0.0, 1.0):
        _, _, scores = learn_all("den", graph, tasks, cfg=cfg, params={"l2": l2})
        acc = [float((scores[i][0].argmax(1) == y).float().mean()) for i in range(3)]
        assert acc[0] > 0.7
        drop[l2] = acc[0] - min(acc[1:])
    assert drop[1.0] < 0.1 and drop[0.0] > 2 * drop[1.0], drop


def test_den_campaign_resumes_to_the_same_R_and_counts_a_timestamp_per_unit(
        tmp_path: Path) -> None:
    full, resumed = resumed_equals_full(tmp_path, {"name": "den", "threshold": 0.0, "k": 4})
    assert resumed["R"] == full["R"]
    assert resumed["details"] == full["details"]
    last = full["sizes"][-1]
    widths = full["details"]["den"]["2"]["widths"]
    assert last["masks_bytes"] == sum(-(-w * 2 // 8) for w in widths.values())  # 2 bits: 0..3
    assert last["trunk_params"] == (64 + 1) * widths["fc1"] + (widths["fc1"] + 1) * widths["fc2"]


@pytest.mark.parametrize("settings,key", [({"k": 0}, "strategy.k"),
                                          ({"split": 0}, "strategy.split"),
                                          ({"l1": -1}, "strategy.l1"),
                                          ({"split_epochs": -1}, "strategy.split_epochs")])
def test_bad_settings_are_refused_naming_the_key(settings: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config({"strategy": {"name": "den", **settings}}, "c.yaml")


def test_a_convolutional_trunk_is_refused_naming_the_layer() -> None:
    graph = cnn_net(2)
    tasks = tasks_for(graph, 2)
    s = make_strategy("den")
    with pytest.raises(ConfigError, match="MLP trunks.*'conv1', a conv2d"):
        s.before_task(ctx_for(Model(graph), tasks, 0, s))
