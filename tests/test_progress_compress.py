"""Progress & Compress: the active column learns with the knowledge base frozen, then the
knowledge base is distilled from it under online EWC (by hand), old tasks drift within a bound,
campaigns resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rivalkit import (
    CFG,
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
from growth.ops.columns import column_members
from growth.regularizers import stored, task_fisher
from growth.strategies import make_strategy
from growth.train import fit, learn_task

pytestmark = pytest.mark.usefixtures("one_thread")


def kb_names(model: Model) -> set[str]:
    nodes = set(column_members(model.graph, 0)[0])
    return {n for n in model.named_parameters() if n.split(".")[0] in nodes}


def active_names(model: Model) -> set[str]:
    nodes, adapters = column_members(model.graph, 1)
    return {n for n in model.named_parameters() if n.split(".")[0] in {*nodes, *adapters}}


def test_progress_trains_the_active_side_only_and_compress_the_knowledge_base_only() -> None:
    graph = mlp_net(2)
    tasks = tasks_for(graph, 2)
    s = make_strategy("progress_compress", {"lambda": 10.0, "reset_active": False})
    model = Model(graph)
    learn_task(ctx_for(model, tasks, 0), s, CFG, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters().items()}
    ctx = ctx_for(model, tasks, 1)
    ctx.train_config, ctx.strategy = CFG, s
    ctx.train_fit = lambda **kw: fit(ctx, s, CFG, **{"seed": 1, **kw})
    s.before_task(ctx)  # progress, then the compress phase's set-up
    after = model.named_parameters()
    for n in kb_names(model) | {"head_t0.weight", "head_t1.weight"}:
        assert torch.equal(after[n], before[n]), n
    assert all(not torch.equal(after[n], before[n]) for n in active_names(model)
               if n.endswith("weight") and "_lat_a" not in n)
    progressed = {n: p.detach().clone() for n, p in after.items()}
    fit(ctx, s, CFG, seed=1)  # compress
    after = model.named_parameters()
    for n in active_names(model) | {"head_t1_active.weight", "head_t0.weight"}:
        assert torch.equal(after[n], progressed[n]), n
    assert all(not torch.equal(after[n], progressed[n]) for n in kb_names(model))


def test_compress_loss_is_the_kl_to_the_active_column_plus_online_ewc_by_hand() -> None:
    graph = mlp_net(2)
    tasks = tasks_for(graph, 2)
    lam, t = 30.0, 2.0
    s = make_strategy("progress_compress", {"lambda": lam, "temperature": t, "gamma": 0.5})
    model = Model(graph)
    learn_task(ctx_for(model, tasks, 0), s, CFG, seed=0)
    ctx = ctx_for(model, tasks, 1)
    ctx.train_config, ctx.strategy = CFG, s
    s.before_task(ctx)
    fit(ctx, s, CFG, seed=1, epochs=1)  # move the knowledge base away from its anchor
    x, y = tasks[1].train[0][:8], tasks[1].train[1][:8]
    logits = model.head("t1")(x)
    with torch.no_grad():
        teacher = model.head("t1_active")(x)
    p = torch.softmax(teacher / t, 1)
    kl = (p * (torch.log(p) - torch.log_softmax(logits / t, 1))).sum(1).mean() * t * t
    fisher, anchor = stored(s.state, "fisher", "all"), stored(s.state, "anchor", "latest")
    params = model.named_parameters()
    trained = {n for n, _ in model.head("t1").named_parameters()}
    quad = sum((fisher[n] * (params[n] - anchor[n]) ** 2).sum() for n in fisher if n in trained)
    want = kl + lam / 2 * quad
    got = s.loss(ctx, x, y, logits) + s.penalty(ctx, x, y, logits)
    torch.testing.assert_close(got, want)
    assert float(quad.detach()) > 0 and float(kl.detach()) > 0


def test_the_online_fisher_is_gamma_old_plus_the_new_tasks_and_the_anchor_the_kb_now() -> None:
    graph = mlp_net(2)
    tasks = tasks_for(graph, 2)
    s = make_strategy("progress_compress", {"gamma": 0.7})
    model = Model(graph)
    learn_task(ctx_for(model, tasks, 0), s, CFG, seed=0)
    old = {n: f.clone() for n, f in stored(s.state, "fisher", "all").items()}
    ctx = ctx_for(model, tasks, 1)
    learn_task(ctx, s, CFG, seed=1)
    new = task_fisher(ctx, tasks[1], 1000)
    running = stored(s.state, "fisher", "all")
    assert set(new) == kb_names(model) | {"head_t1.weight", "head_t1.bias"}
    for n in new:
        torch.testing.assert_close(running[n], 0.7 * old.get(n, 0) + new[n])
    torch.testing.assert_close(running["head_t0.weight"], 0.7 * old["head_t0.weight"])
    params = model.named_parameters()
    for n, a in stored(s.state, "anchor", "latest").items():
        assert torch.equal(a, params[n].detach())


def test_the_knowledge_base_learns_the_task_from_the_active_column_without_labels() -> None:
    graph = mlp_net(1)
    tasks = tasks_for(graph, 1, n=400)
    model, s, scores = learn_all("progress_compress", graph, tasks,
                                 params={"progress_epochs": 8},
                                 cfg=CFG.model_copy(update={"epochs": 8}))
    x, y = tasks[0].test
    with torch.no_grad():
        active = model.head("t0_active")(x)
        start = Model(graph).head("t0")(x)  # the knowledge base before the task

    def kl(kb: torch.Tensor) -> float:
        p = torch.softmax(active, 1)
        return float((p * (torch.log(p) - torch.log_softmax(kb, 1))).sum(1).mean())

    assert float((active.argmax(1) == y).float().mean()) > 0.6
    assert kl(scores[0][0]) < 0.5 * kl(start)  # the KB took on the active column's outputs
    ctx = ctx_for(model, tasks, 0, s)
    s._teacher = model.head("t0_active")
    logits = model.head("t0")(x[:4])
    a = s.loss(ctx, x[:4], torch.tensor([0, 0, 0, 0]), logits)
    b = s.loss(ctx, x[:4], torch.tensor([2, 1, 2, 1]), logits)
    assert torch.equal(a, b)  # the labels never reach the compress loss


def test_old_tasks_drift_within_a_bound_that_online_ewc_tightens() -> None:
    graph = digit_net(3)
    tasks = digit_tasks(3, 300)
    cfg = CFG.model_copy(update={"epochs": 8, "batch_size": 16})
    y = tasks[0].test[1]
    drop = {}
    for lam in (0.0, 100.0):
        _, _, scores = learn_all("progress_compress", graph, tasks, cfg=cfg,
                                 params={"lambda": lam, "fisher_samples": 300})
        acc = [float((scores[i][0].argmax(1) == y).float().mean()) for i in range(3)]
        assert acc[0] > 0.6
        drop[lam] = acc[0] - min(acc[1:])
    assert drop[100.0] < 0.1 < 0.2 < drop[0.0]


def test_size_is_two_trunks_adapters_and_two_heads_per_task(tmp_path: Path) -> None:
    full, resumed = resumed_equals_full(tmp_path, {"name": "progress_compress"})
    assert resumed["R"] == full["R"]
    trunk = 64 * 16 + 16 + 16 * 12 + 12
    heads = 12 * 10 + 10
    adapters = 1 + (16 * 8 + 8) + 8 * 12  # alpha, V (16 -> 8, bias), U (8 -> 12, no bias)
    for k, size in enumerate(full["sizes"]):
        assert size["trunk_params"] == trunk
        assert size["heads_params"] == 3 * heads
        assert size["active_params"] == trunk + (k + 1) * heads
        assert size["adapters_params"] == adapters
    assert set(full["details"]["progress_compress"]) == {"0", "1", "2"}


@pytest.mark.parametrize("settings,key", [({"lambda": -1}, "strategy.lambda"),
                                          ({"gamma": 1.5}, "strategy.gamma"),
                                          ({"temperature": 0}, "strategy.temperature"),
                                          ({"progress_epochs": 0}, "strategy.progress_epochs")])
def test_bad_settings_are_refused_naming_the_key(settings: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config({"strategy": {"name": "progress_compress", **settings}}, "c.yaml")


def test_a_reset_active_column_starts_each_task_fresh_from_the_tasks_seed() -> None:
    graph = mlp_net(2)
    tasks = tasks_for(graph, 2)
    for reset in (True, False):
        s = make_strategy("progress_compress", {"reset_active": reset, "progress_epochs": 1})
        model = Model(graph)
        learn_task(ctx_for(model, tasks, 0), s, CFG, seed=0)
        trained = model.named_parameters()["c1_fc1.weight"].detach().clone()
        ctx = ctx_for(model, tasks, 1)
        ctx.train_config, ctx.strategy = CFG, s
        graph1, _ = s._active_side(ctx)
        start = graph1.node("c1_fc1").tensors["weight"]
        assert torch.equal(start, trained) != reset
