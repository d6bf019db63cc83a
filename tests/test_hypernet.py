"""Task-conditioned hypernetworks: the generated weights, the output regulariser against a hand
computation, evaluation per task, checkpoints and resume."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load, save
from test_strategies import context, mlp, synthetic

from growth.campaign import Campaign, resume_run
from growth.config import load_config
from growth.errors import GraphError
from growth.regularizers import stored
from growth.strategies import make_strategy, state_key
from growth.train import TrainConfig, evaluate, learn_task

CFG = TrainConfig(epochs=2, batch_size=16, lr=0.05, momentum=0.9)
TRUNK = ["fc1.weight", "fc1.bias", "features.weight", "features.bias"]
SETTINGS = {"embedding": 4, "chunk_embedding": 3, "chunk": 50, "hidden": [6]}


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def written(hnet: dict[str, torch.Tensor], e: torch.Tensor) -> dict[str, torch.Tensor]:
    """The trunk h writes for embedding e, by hand: chunk i = W2 relu(W1 [e, c_i] + b1) + b2,
    the chunks joined and cut to the trunk's size, each tensor times 1 / sqrt(3 fan_in)."""
    rows = []
    for c in hnet["chunks"]:
        h = torch.relu(hnet["layers.0.weight"] @ torch.cat([e, c]) + hnet["layers.0.bias"])
        rows.append(hnet["layers.1.weight"] @ h + hnet["layers.1.bias"])
    flat = torch.cat(rows)
    shapes = {"fc1.weight": (12, 16), "fc1.bias": (12,), "features.weight": (12, 12),
              "features.bias": (12,)}
    fan_in = {"fc1": 16, "features": 12}
    out, at = {}, 0
    for n, shape in shapes.items():
        k = math.prod(shape)
        out[n] = flat[at:at + k].view(shape) / math.sqrt(3 * fan_in[n.split(".")[0]])
        at += k
    return out


def hnet_state(s) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in s._net.state_dict().items()}


def test_the_output_regulariser_is_beta_over_old_tasks_times_the_squared_drift():
    tasks, model = synthetic(3), mlp()
    beta = 0.3
    s = make_strategy("hnet", {**SETTINGS, "beta": beta})
    for i in range(2):
        learn_task(context(model, tasks, i), s, CFG, seed=i)
    ctx = context(model, tasks, 2)
    s.before_task(ctx)
    start = hnet_state(s)  # phi*
    old = [s.state[state_key("embedding", k, "vector")] for k in (0, 1)]
    with s.training(ctx):
        assert value_of(s, ctx) == pytest.approx(0.0, abs=1e-12)  # phi = phi*: no drift
        with torch.no_grad():
            for p in s._net.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        s._opt.zero_grad(set_to_none=True)
        s.after_step(ctx)  # no gradients: Adam leaves phi; h runs again
        now = hnet_state(s)
        drift = sum(((written(now, e)[n] - written(start, e)[n]) ** 2).sum()
                    for e in old for n in TRUNK)
        paid = s.penalty(ctx, None, None, None)
        assert float(paid.detach()) == pytest.approx(beta / 2 * float(drift), rel=1e-5)
        paid.backward()
        assert s._net.layers[0].weight.grad.any()  # it trains phi ...
        assert not s._embedding.grad.any()  # ... not the new embedding, nor the old ones
        assert all(not e.requires_grad for e in old)


def value_of(s, ctx) -> float:
    out = s.penalty(ctx, None, None, None)
    return float(out.detach())


def test_every_step_runs_the_weights_of_the_current_hypernetwork():
    tasks, model = synthetic(2), mlp(n_heads=2)
    s = make_strategy("hnet", SETTINGS)
    ctx = context(model, tasks, 0)
    s.before_task(ctx)
    x, y = tasks[0].train
    view = model.head("out0")
    with s.training(ctx):
        assert {n for n, _ in model.module.named_parameters()} == {
            "head0.weight", "head0.bias", "head1.weight", "head1.bias"}  # the loop trains heads
        for _ in range(3):
            e = s._embedding.detach().clone()
            want = written(hnet_state(s), e)
            layer = model.module.fc1
            torch.testing.assert_close(layer.weight.detach(), want["fc1.weight"])
            loss = F.cross_entropy(view(x[:8]), y[:8])
            loss.backward()
            assert s._embedding.grad is not None and s._net.chunks.grad is not None
            s.after_step(ctx)
            assert not torch.equal(s._embedding.detach(), e)  # Adam stepped e_T and phi
    # the parameters come back, holding h(e_T)
    params = model.named_parameters()
    assert set(TRUNK) <= set(params)
    want = written(hnet_state(s), s._embedding.detach())
    for n in TRUNK:
        torch.testing.assert_close(params[n].detach(), want[n])


def test_each_task_is_evaluated_with_the_weights_its_embedding_writes():
    tasks, model = synthetic(2), mlp(n_heads=2)
    s = make_strategy("hnet", SETTINGS)
    for i in range(2):
        learn_task(context(model, tasks, i), s, CFG, seed=i)
    ctx = context(model, tasks, 1)
    before = {n: p.detach().clone() for n, p in model.named_parameters().items()}
    w = written(hnet_state(s), s.state[state_key("embedding", 0, "vector")])
    x, y = tasks[0].test
    h = torch.relu(x.flatten(1) @ w["fc1.weight"].T + w["fc1.bias"])
    h = torch.relu(h @ w["features.weight"].T + w["features.bias"])
    logits = h @ model.module.head0.weight.detach().T + model.module.head0.bias.detach()
    with torch.no_grad(), s.evaluation(ctx, tasks[0]) as score:
        torch.testing.assert_close(score(x), logits)
    by_hand = float((logits.argmax(1) == y).float().mean())
    assert evaluate(ctx, tasks[0], strategy=s) == pytest.approx(by_hand)
    after = model.named_parameters()
    assert all(torch.equal(before[n], after[n]) for n in before)  # swapped back exactly


def test_beta_holds_the_old_tasks_weights():
    tasks = synthetic(2)
    moved = {}
    for beta in (0.0, 10.0):
        model = mlp(n_heads=2)
        s = make_strategy("hnet", {**SETTINGS, "beta": beta})
        learn_task(context(model, tasks, 0), s, CFG, seed=0)
        e0 = s.state[state_key("embedding", 0, "vector")]
        first = written(hnet_state(s), e0)
        learn_task(context(model, tasks, 1), s, CFG, seed=1)
        later = written(hnet_state(s), e0)
        moved[beta] = sum(float((later[n] - first[n]).abs().sum()) for n in TRUNK)
    assert moved[10.0] < 0.2 * moved[0.0]


def test_a_restored_hypernetwork_continues_identically():
    tasks = synthetic(3)
    model_a, model_b = mlp(), mlp()
    s = make_strategy("hnet", SETTINGS)
    for i in range(2):
        learn_task(context(model_a, tasks, i), s, CFG, seed=i)
    tensors, extra = s.state_dict()
    fresh = make_strategy("hnet", SETTINGS)
    fresh.load_state_dict(load(save({k: v.contiguous() for k, v in tensors.items()})),
                          json.loads(json.dumps(extra)))
    model_b.module.load_state_dict(model_a.module.state_dict())
    learn_task(context(model_a, tasks, 2), s, CFG, seed=2)
    learn_task(context(model_b, tasks, 2), fresh, CFG, seed=2)
    assert all(torch.equal(s.state[k], fresh.state[k]) for k in s.state)
    for (n, p), q in zip(model_a.module.named_parameters(), model_b.module.parameters()):
        assert torch.equal(p, q), n


def test_size_counts_the_hypernetwork_embeddings_and_heads_not_the_trunk():
    tasks, model = synthetic(2), mlp(n_heads=2)
    s = make_strategy("hnet", SETTINGS)
    for i in range(2):
        learn_task(context(model, tasks, i), s, CFG, seed=i)
    parts = s.size_parts(model)
    # chunks: ceil(360 trunk weights / 50) = 8 rows of 3; layers (4 + 3) * 6 + 6 and 6 * 50 + 50
    assert sum(t.numel() for t in parts["hypernetwork"]) == 8 * 3 + 48 + 350
    assert sum(t.numel() for t in parts["embeddings"]) == 2 * 4
    assert sum(t.numel() for t in parts["heads"]) == 2 * (12 * 4 + 4)
    assert set(parts) == {"heads", "hypernetwork", "embeddings"}
    assert set(stored(s.state, "hnet", "all")) == {"chunks", "layers.0.weight", "layers.0.bias",
                                                   "layers.1.weight", "layers.1.bias"}


def test_batchnorm_and_growth_are_refused_naming_why():
    from growth.graph import NetGraph
    from growth.model import Model

    g = NetGraph()
    g.add_input("x", (1, 4, 4))
    g.add("flat", "flatten", ["x"])
    g.add("fc", "linear", ["flat"], out_features=8)
    g.add("bn", "batchnorm1d", ["fc"])
    g.add("features", "relu", ["bn"])
    for i in range(2):
        g.add(f"head{i}", "linear", ["features"], out_features=4)
        g.add_output(f"out{i}", f"head{i}")
    s = make_strategy("hnet", SETTINGS)
    with pytest.raises(GraphError, match="BatchNorm"):
        s.before_task(context(Model(g), synthetic(2), 0))
    with pytest.raises(GraphError, match="graph change"):
        s.follow(context(mlp(), synthetic(2), 0), [])


def test_a_campaign_resumes_to_the_same_R(tmp_path: Path):
    cfg = load_config("experiments/split_digits_task.yaml",
                      ["strategy={name: hnet, chunk: 500, hidden: [20]}", "train.epochs=1",
                       "data.max_train_per_task=60"])
    full = Campaign(cfg, tmp_path / "full").start()
    part = tmp_path / "part"
    Campaign(cfg, part).start()
    for task in ("task_002", "task_003", "task_004"):
        shutil.rmtree(part / "checkpoints" / task)
    assert resume_run(part)["R"] == full["R"]


@pytest.mark.parametrize("bad,key", [({"hidden": [0]}, "hidden"), ({"beta": -1}, "beta"),
                                     ({"lr": 0}, "lr"), ({"chunk": 0}, "chunk"),
                                     ({"betta": 1}, "betta")])
def test_bad_settings_are_refused_naming_the_key(bad, key):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=key):
        make_strategy("hnet", bad)


def test_a_checkpointed_state_is_checked_against_its_declaration():
    tasks, model = synthetic(2), mlp(n_heads=2)
    s = make_strategy("hnet", SETTINGS)
    for i in range(2):
        learn_task(context(model, tasks, i), s, CFG, seed=i)
    tensors, extra = s.state_dict()
    graph = model.graph.named_tensors()
    assert s.check_state(tensors, extra, graph, 2) == []
    missing = {k: v for k, v in tensors.items() if k != state_key("embedding", 1, "vector")}
    assert any("'embedding'" in p and "1" in p for p in s.check_state(missing, extra, graph, 2))
    assert any("extra 'tasks'" in p for p in s.check_state(tensors, {"tasks": [0]}, graph, 2))
