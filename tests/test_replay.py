"""Replay strategies (ER, GEM, A-GEM, MIR, ...) checked against hand computations."""

from __future__ import annotations

import json
import math
import shutil
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from safetensors.torch import load, save
from scipy.optimize import minimize
from test_campaign import run, write_config
from test_strategies import class_incremental, context, mlp, synthetic

from growth.campaign import resume_run
from growth.memory import EpisodicMemory
from growth.model import Model
from growth.strategies import make_strategy
from growth.strategies.agem import agem_project
from growth.strategies.gem import gem_project
from growth.strategies.mir import virtual_steps
from growth.strategies.rehearsal import replay_losses
from growth.train import TrainConfig, learn_task

CFG = TrainConfig(epochs=2, batch_size=16, lr=0.05, momentum=0.9)
REPLAY = ["er", "gem", "agem", "mir"]


pytestmark = pytest.mark.usefixtures("one_thread")


def learn(name: str, params: dict, tasks, model: Model, upto: int, single_head: bool = False):
    s = make_strategy(name, params)
    for i in range(upto):
        learn_task(context(model, tasks, i, single_head), s, CFG, seed=i)
    return s


def grads_of(loss: torch.Tensor, model: Model) -> torch.Tensor:
    params = [p for p in model.module.parameters() if p.requires_grad]
    g = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(a if a is not None else torch.zeros_like(p)).flatten()
                      for a, p in zip(g, params)])


def current_grads(model: Model) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                      for p in model.module.parameters() if p.requires_grad])


def backward_current(ctx, x, y) -> torch.Tensor:
    """The loop's backward of a current batch; returns its plain gradient."""
    ctx.model.module.zero_grad(set_to_none=True)
    F.cross_entropy(ctx.model.head(ctx.head_of(ctx.task))(x), y).backward()
    return current_grads(ctx.model)


# ---- shared pieces ---------------------------------------------------------------------------
def test_replayed_samples_go_through_their_own_tasks_heads():
    tasks, model = synthetic(3), mlp()
    s = learn("er", {"memory": 30}, tasks, model, upto=2)
    ctx = context(model, tasks, 2)
    assert set(s.memory.task.tolist()) == {0, 1}
    x, y, t = s.memory.batch(s.memory.rows())
    got = replay_losses(ctx, x, y, t)
    for i in range(len(y)):
        head = model.head(f"out{int(t[i])}")
        expect = F.cross_entropy(head(x[i:i + 1]), y[i:i + 1])
        assert float(got[i].detach()) == pytest.approx(float(expect.detach()), rel=1e-5)


def test_memory_holds_the_tasks_training_samples_with_head_labels():
    tasks = class_incremental(3)
    model = mlp(n_heads=1, classes=6)
    s = learn("er", {"memory": 1000}, tasks, model, upto=3, single_head=True)
    assert len(s.memory) == sum(len(t.train[1]) for t in tasks)  # room for all
    for t in tasks:
        rows = s.memory.rows(t.index)
        x, y = t.train
        pairs = {(tuple(a.flatten().tolist()), int(b) + t.class_offset) for a, b in zip(x, y)}
        got = {(tuple(a.flatten().tolist()), int(b)) for a, b in zip(s.memory.x[rows],
                                                                   s.memory.y[rows])}
        assert got == pairs


def test_er_adds_alpha_times_the_replayed_batchs_cross_entropy():
    tasks, model = synthetic(3), mlp()
    s = learn("er", {"memory": 20, "replay_batch": 8, "alpha": 0.7}, tasks, model, upto=2)
    ctx = context(model, tasks, 2)
    s.before_task(ctx)
    state = s.gen.get_state()
    x, y = tasks[2].train
    got = s.penalty(ctx, x[:4], y[:4], None)
    s.gen.set_state(state)
    rows = torch.randperm(len(s.memory), generator=s.gen)[:8]  # the draw, made again
    mx, my, mt = s.memory.batch(rows)
    expect = sum(F.cross_entropy(model.head(f"out{int(mt[i])}")(mx[i:i + 1]), my[i:i + 1])
                 for i in range(8)) / 8
    assert float(got.detach()) == pytest.approx(0.7 * float(expect.detach()), rel=1e-5)


def test_replay_draws_come_from_the_tasks_seed_under_the_methods_replay_key():
    """A resumed run draws the same batches: the generator is seeded from the task's seed
    and the key "<method>/replay/<task index>" (growth.data.sampling's mixing, by hand)."""
    tasks, model = synthetic(3), mlp()
    s = make_strategy("er", {})
    ctx = context(model, tasks, 2)
    ctx.seed = 7
    s.before_task(ctx)
    seed = (7 * 0x9E3779B1 + zlib.crc32(b"er/replay/2")) % (2**63 - 1)
    want = torch.randperm(50, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(torch.randperm(50, generator=s.gen), want)


def test_no_replay_on_the_first_task():
    tasks, model = synthetic(2), mlp()
    for name in REPLAY:
        s = make_strategy(name, {})
        ctx = context(model, tasks, 0)
        s.before_task(ctx)
        assert len(s.memory) == 0 and s.replay_batch(4) is None


# ---- A-GEM ---------------------------------------------------------------------------------
def test_agem_projection_on_hand_computed_vectors():
    g, ref = torch.tensor([1.0, -2.0, 0.0]), torch.tensor([0.0, 1.0, 1.0])
    # g.ref = -2, ref.ref = 2: g - (-1) ref = (1, -1, 1), orthogonal to ref
    assert agem_project(g, ref).tolist() == [1.0, -1.0, 1.0]
    for agree in ([1.0, 2.0, 0.0], [1.0, 0.5, 0.0], [1.0, 0.0, 0.0]):  # g.ref = 2, 0.5, 0
        g = torch.tensor(agree)
        assert agem_project(g, ref) is g


def test_agem_writes_the_projected_gradient_of_the_memory_batch():
    tasks, model = synthetic(3), mlp()
    s = learn("agem", {"memory": 24, "replay_batch": 10}, tasks, model, upto=2)
    ctx = context(model, tasks, 2)
    s.before_task(ctx)
    x, y = tasks[2].train
    g = backward_current(ctx, x[:16], y[:16])
    state = s.gen.get_state()
    mx, my, mt = s.memory.batch(torch.randperm(24, generator=s.gen)[:10])  # the draw, again
    s.gen.set_state(state)
    ref = grads_of(replay_losses(ctx, mx, my, mt).mean(), model)
    dot = float(g @ ref)
    s.after_backward(ctx)
    assert dot < 0  # the memory disagrees: the step is projected
    expect = g - dot / float(ref @ ref) * ref
    torch.testing.assert_close(current_grads(model), expect, rtol=1e-4, atol=1e-6)


# ---- GEM -----------------------------------------------------------------------------------
def closest_feasible(g: np.ndarray, G: np.ndarray) -> np.ndarray:
    """min ||z - g||^2 s.t. G z >= 0, by a general-purpose solver (independent of quadprog)."""
    res = minimize(lambda z: ((z - g) ** 2).sum(), g, jac=lambda z: 2 * (z - g),
                   constraints=[{"type": "ineq", "fun": lambda z: G @ z, "jac": lambda z: G}],
                   method="SLSQP", options={"ftol": 1e-12, "maxiter": 500})
    return res.x


def dual_step(g: np.ndarray, G: np.ndarray, margin: float) -> np.ndarray:
    """G'v + g for min_v 1/2 v'GG'v + g'G'v subject to v >= margin (bounded L-BFGS-B)."""
    P, q = G @ G.T, G @ g
    res = minimize(lambda v: 0.5 * v @ P @ v + q @ v, np.full(len(G), margin),
                   jac=lambda v: P @ v + q, bounds=[(margin, None)] * len(G),
                   method="L-BFGS-B", options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 1000})
    return res.x @ G + g


def test_gem_projection_solves_the_primal_problem():
    g = torch.tensor([-1.0, 1.0])
    assert gem_project(g, torch.tensor([[1.0, 0.0]])).tolist() == [0.0, 1.0]
    assert gem_project(torch.tensor([-1.0]), torch.tensor([[1.0]])).tolist() == [0.0]
    # g . g_1 = 0 violates nothing: g is kept, not raised along g_1 by the margin
    g0 = torch.tensor([1.0, 0.0])
    assert gem_project(g0, torch.tensor([[0.0, 1.0], [1.0, 1.0]]), margin=0.5) is g0
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        G = torch.randn(3, 6, generator=gen, dtype=torch.float64)
        g = -G.sum(0) + 0.3 * torch.randn(6, generator=gen, dtype=torch.float64)
        assert bool((G @ g < 0).any())
        got = gem_project(g, G)
        np.testing.assert_allclose(got.numpy(), closest_feasible(g.numpy(), G.numpy()),
                                   atol=1e-5)
        assert bool((G @ got >= -1e-9).all())


def test_gem_projection_with_linearly_dependent_memory_gradients_adds_a_small_ridge():
    """G = s [[1, 0], [2, 0]]: GG' = s^2 [[1, 2], [2, 4]] is singular; with the ridge
    r = 1e-6 * trace / t = 2.5e-6 s^2 the dual's solution is v = s (1, 2) / (5 s^2 + r), so
    g~ = g + G'v = (-r / (5 s^2 + r), 1) = (-2.5e-6 / (5 + 2.5e-6), 1) at any scale s."""
    g = torch.tensor([-1.0, 1.0])
    for scale in (1.0, 0.01):  # gradients of norm below 1 too
        got = gem_project(g, scale * torch.tensor([[1.0, 0.0], [2.0, 0.0]]))
        assert float(got[0]) == pytest.approx(-2.5e-6 / (5 + 2.5e-6), rel=1e-3), scale
        assert float(got[1]) == 1.0


def test_gem_step_never_raises_an_old_tasks_memory_loss_to_first_order():
    tasks, model = synthetic(4), mlp(n_heads=4)
    s = learn("gem", {"memory": 30}, tasks, model, upto=3)
    ctx = context(model, tasks, 3)
    s.before_task(ctx)
    x, y = tasks[3].train
    violated = 0
    for start in range(0, 36, 6):
        g = backward_current(ctx, x[start:start + 6], y[start:start + 6])
        mx, my, mt = s.memory.batch(s.memory.rows())
        G = torch.stack([grads_of(replay_losses(ctx, mx[mt == k], my[mt == k], mt[mt == k])
                                  .mean(), model) for k in (0, 1, 2)])
        violated += int((G @ g < 0).any())
        s.after_backward(ctx)
        new = current_grads(model)
        assert bool((G @ new >= -1e-6 * G.norm(dim=1) * g.norm()).all()), G @ new
        if bool((G @ g >= 0).all()):
            assert torch.equal(new, g)  # nothing violated: the plain gradient
        else:  # the dual's solution with v >= 0.5, by a general-purpose solver
            np.testing.assert_allclose(new.numpy(), dual_step(g.double().numpy(),
                                                              G.double().numpy(), 0.5),
                                       atol=1e-4 * float(g.norm()))
    assert violated  # the batches did conflict with the memory


def test_gem_keeps_the_plain_gradient_when_the_memory_agrees():
    tasks, model = synthetic(2), mlp()
    s = learn("gem", {"memory": 200}, tasks, model, upto=1)
    ctx = context(model, [tasks[0], tasks[0]], 1)  # the current batch is old task 0's data
    ctx.head_of = lambda t: "out0"
    s.before_task(ctx)
    mx, my, _ = s.memory.batch(s.memory.rows())
    g = backward_current(ctx, mx, my)
    s.after_backward(ctx)
    assert torch.equal(current_grads(model), g)


# ---- MIR -----------------------------------------------------------------------------------
@pytest.mark.parametrize("momentum,decay", [(0.0, 0.0), (0.9, 0.0), (0.0, 0.5)])
def test_mir_replays_the_candidates_a_virtual_step_hurts_most(momentum, decay):
    tasks, model = synthetic(3), mlp()
    s = learn("mir", {"memory": 40, "candidates": 20, "replay_batch": 5}, tasks, model, upto=2)
    ctx = context(model, tasks, 2)
    s.before_task(ctx)
    ctx.optimizer = torch.optim.SGD(model.module.parameters(), lr=0.3, momentum=momentum,
                                    weight_decay=decay)
    x, y = tasks[2].train
    F.cross_entropy(model.head("out2")(x[8:16]), y[8:16]).backward()
    ctx.optimizer.step()  # a step before: the momentum buffers hold something
    ctx.optimizer.zero_grad()
    logits = model.head("out2")(x[:8])
    mx, my, mt = s.memory.batch(s.memory.sample(20, torch.Generator().manual_seed(5)))
    chosen = s.retrieve(ctx, logits, y[:8], mx, my, mt)
    # the virtual step by hand: a copy of the model and of the optimizer takes the real step
    twin = mlp()
    twin.module.load_state_dict(model.module.state_dict())
    opt = torch.optim.SGD(twin.module.parameters(), lr=0.3, momentum=momentum,
                          weight_decay=decay)
    opt.load_state_dict(ctx.optimizer.state_dict())
    F.cross_entropy(twin.head("out2")(x[:8]), y[:8]).backward()
    opt.step()
    with torch.no_grad():
        before = [float(F.cross_entropy(model.head(f"out{int(t)}")(a[None]), b[None]))
                  for a, b, t in zip(mx, my, mt)]
        after = [float(F.cross_entropy(twin.head(f"out{int(t)}")(a[None]), b[None]))
                 for a, b, t in zip(mx, my, mt)]
    rise = torch.tensor(after) - torch.tensor(before)
    assert sorted(chosen.tolist()) == sorted(torch.topk(rise, 5).indices.tolist())


def test_mir_adds_alpha_times_the_chosen_candidates_cross_entropy():
    tasks, model = synthetic(3), mlp()
    s = make_strategy("mir", {"memory": 30, "candidates": 12, "replay_batch": 4, "alpha": 0.6})
    for i in (0, 1):  # the memory of two old tasks, without training
        s.memory.reservoir(*tasks[i].train, i, torch.Generator().manual_seed(i))
    ctx = context(model, tasks, 2)
    s.before_task(ctx)
    ctx.optimizer = torch.optim.SGD(model.module.parameters(), lr=0.3)
    x, y = tasks[2].train
    logits = model.head("out2")(x[:8])
    state = s.gen.get_state()
    got = s.penalty(ctx, x[:8], y[:8], logits)
    s.gen.set_state(state)
    mx, my, mt = s.memory.batch(torch.randperm(30, generator=s.gen)[:12])  # the candidates
    chosen = s.retrieve(ctx, logits, y[:8], mx, my, mt).tolist()
    assert len(chosen) == 4
    expect = sum(F.cross_entropy(model.head(f"out{int(mt[i])}")(mx[i:i + 1]), my[i:i + 1])
                 for i in chosen) / 4
    assert float(got.detach()) == pytest.approx(0.6 * float(expect.detach()), rel=1e-5)


def test_mir_replays_every_candidate_in_memory_order_when_they_are_no_more_than_its_batch():
    """replay_batch 4 of 4 candidates: all of them, as drawn (no virtual step to rank them)."""
    tasks, model = synthetic(3), mlp()
    s = make_strategy("mir", {"memory": 30, "candidates": 4, "replay_batch": 4})
    s.memory.reservoir(*tasks[0].train, 0, torch.Generator().manual_seed(0))
    ctx = context(model, tasks, 1)
    ctx.optimizer = torch.optim.SGD(model.module.parameters(), lr=0.3)
    x, y = tasks[1].train
    mx, my, mt = s.memory.batch(torch.arange(4))
    chosen = s.retrieve(ctx, model.head("out1")(x[:8]), y[:8], mx, my, mt)
    assert chosen.tolist() == [0, 1, 2, 3]


def test_mir_virtual_steps_by_hand():
    """lr (momentum * buffer + g + weight_decay * p) per parameter; a parameter without a
    gradient or outside the optimizer is skipped, and the ones after it still step."""
    a, b, c, d = (torch.nn.Parameter(torch.tensor([v, -v])) for v in (1.0, 2.0, 3.0, 4.0))
    opt = torch.optim.SGD([{"params": [a, b]}, {"params": [d], "lr": 0.5, "weight_decay": 0.1,
                                                 "momentum": 0.9}], lr=0.2)
    opt.state[d]["momentum_buffer"] = torch.tensor([1.0, 1.0])
    g = torch.tensor([0.5, 0.25])
    steps = virtual_steps(opt, {"a": a, "b": b, "c": c, "d": d}, (g, None, g, g))
    assert set(steps) == {"a", "d"}
    torch.testing.assert_close(steps["a"], torch.tensor([0.1, 0.05]))
    # 0.5 * (0.9 * 1 + 0.5 + 0.1 * 4), 0.5 * (0.9 * 1 + 0.25 - 0.1 * 4)
    torch.testing.assert_close(steps["d"], torch.tensor([0.9, 0.375]))


def test_mir_virtual_step_of_an_optimizer_without_weight_decay_is_lr_times_the_gradient():
    """Groups with no weight_decay or momentum setting at all (Rprop's): lr g, by hand; a
    state entry named momentum_buffer is no momentum without the setting."""
    a = torch.nn.Parameter(torch.tensor([3.0, -1.0]))
    opt = torch.optim.Rprop([a], lr=0.2)
    assert "weight_decay" not in opt.param_groups[0] and "momentum" not in opt.param_groups[0]
    opt.state[a]["momentum_buffer"] = torch.tensor([1.0, 1.0])
    steps = virtual_steps(opt, {"a": a}, (torch.tensor([0.5, 0.25]),))
    torch.testing.assert_close(steps["a"], torch.tensor([0.1, 0.05]))


def test_the_memory_is_offered_the_tasks_samples_in_their_seeded_order():
    """Order from the key "stream/<task>", reservoir draws from "reservoir/<task>" (the
    task's seed mixed as growth.data.sampling does, by hand)."""
    tasks, model = synthetic(3), mlp()
    s = make_strategy("er", {"memory": 5})
    ctx = context(model, tasks, 1)
    ctx.seed = 3

    def gen(key: bytes) -> torch.Generator:
        return torch.Generator().manual_seed((3 * 0x9E3779B1 + zlib.crc32(key)) % (2**63 - 1))

    s.remember(ctx)
    x, y = tasks[1].train
    order = torch.randperm(len(y), generator=gen(b"stream/1"))
    want = EpisodicMemory(5)
    want.reservoir(x[order], y[order], 1, gen(b"reservoir/1"))
    assert torch.equal(s.memory.x, want.x) and torch.equal(s.memory.y, want.y)


# ---- state, scenarios, settings --------------------------------------------------------------
@pytest.mark.parametrize("name", REPLAY)
@pytest.mark.parametrize("single_head", [False, True])
def test_a_restored_replay_strategy_continues_identically(name, single_head):
    tasks = class_incremental(3) if single_head else synthetic(3)
    heads, classes = (1, 6) if single_head else (3, 4)
    model_a, model_b = mlp(n_heads=heads, classes=classes), mlp(n_heads=heads, classes=classes)
    s = learn(name, {"memory": 20}, tasks, model_a, upto=2, single_head=single_head)
    tensors, extra = s.state_dict()
    assert {"memory/all/x", "memory/all/y", "memory/all/task"} <= set(tensors)
    fresh = make_strategy(name, {"memory": 20})
    fresh.load_state_dict(load(save({k: v.contiguous() for k, v in tensors.items()})),
                          json.loads(json.dumps(extra)))
    model_b.module.load_state_dict(model_a.module.state_dict())
    learn_task(context(model_a, tasks, 2, single_head), s, CFG, seed=2)
    learn_task(context(model_b, tasks, 2, single_head), fresh, CFG, seed=2)
    for (n, p), q in zip(model_a.module.named_parameters(), model_b.module.parameters()):
        assert torch.equal(p, q), n
    assert torch.equal(s.memory.x, fresh.memory.x) and s.memory.seen == fresh.memory.seen
    assert s.memory_report() == fresh.memory_report()


def test_saved_memory_rows_are_checked_before_loading():
    """Integer label and task vectors, one length for x, y and task, finished tasks only."""
    s = make_strategy("er", {"memory": 10})
    x, y, t = torch.zeros(3, 2), torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1])
    rows = {"memory/all/x": x, "memory/all/y": y, "memory/all/task": t}
    assert s.check_state(rows, {}, {}, 2) == []
    assert s.check_state({"memory/all/x": x}, {}, {}, 2) == []  # labels and tasks absent
    assert s.check_state({"memory/all/y": y[:0], "memory/all/task": t[:0]}, {}, {}, 0) == []
    bad = s.check_state({**rows, "memory/all/y": y.float(), "memory/all/task": t[:, None]},
                        {}, {}, 2)
    assert bad == ["tensor 'memory/all/y' must be a vector of integers, got torch.float32 of "
                   "shape (3,)", "tensor 'memory/all/task' must be a vector of integers, got "
                   "torch.int64 of shape (3, 1)"]
    assert s.check_state({**rows, "memory/all/y": y[:2]}, {}, {}, 2) == [
        "the memory's tensors memory/all/x, y and task differ in length ([2, 3])"]
    assert s.check_state(rows, {}, {}, 1) == [
        "tensor 'memory/all/task' names task 1, which is not finished (0..0)"]
    assert s.check_state({**rows, "memory/all/x": x[:2]}, {}, {}, 2) == [  # the inputs too
        "the memory's tensors memory/all/x, y and task differ in length ([2, 3])"]
    assert s.check_state({}, {}, {}, 1) == [  # a finished task leaves a memory, if empty
        "no 'memory' tensors for slot(s) all: strategy 'er' stores them after every finished "
        "task (1)"]


@pytest.mark.parametrize("name,bad,key", [
    ("er", {"memory": 0}, "memory"), ("er", {"alpha": -1}, "alpha"),
    ("gem", {"margin": -0.1}, "margin"), ("agem", {"replay_batch": 0}, "replay_batch"),
    ("mir", {"candidates": 0}, "candidates"), ("mir", {"memroy": 10}, "memroy"),
])
def test_bad_replay_settings_are_refused_naming_the_key(name, bad, key):
    with pytest.raises(ValidationError) as err:
        make_strategy(name, bad)
    assert key in str(err.value)


def test_replay_losses_are_finite_in_both_scenarios():
    for single_head in (False, True):
        tasks = class_incremental(3) if single_head else synthetic(3)
        for name in REPLAY:
            model = mlp(n_heads=1 if single_head else 3, classes=6 if single_head else 4)
            s = make_strategy(name, {"memory": 15})
            for i in range(3):
                losses = learn_task(context(model, tasks, i, single_head), s, CFG, seed=i)
                assert all(math.isfinite(v) for v in losses), (name, single_head)
            assert len(s.memory) == 15


# ---- campaigns -----------------------------------------------------------------------------
def test_metrics_report_the_memory_apart_from_model_size(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", scenario="class", train__epochs=1,
                       data={"dataset": "digits", "stream": "split", "n_tasks": 2},
                       strategy={"name": "er", "memory": 40})
    m = run(cfg, tmp_path / "er")
    plain = run(write_config(tmp_path / "f.yaml", scenario="class", train__epochs=1,
                             data={"dataset": "digits", "stream": "split", "n_tasks": 2}),
                tmp_path / "finetune")
    per_sample = 1 * 8 * 8 * 4 + 8 + 8  # an 8x8 float32 image, its label, its task
    for k, size in enumerate(m["sizes"]):
        assert size["memory_samples"] == 40
        assert size["memory_bytes"] == 40 * per_sample
        assert size["bytes"] == plain["sizes"][k]["bytes"]  # not part of model size
    assert "memory_samples" not in plain["sizes"][0]


@pytest.mark.parametrize("name", REPLAY)
@pytest.mark.parametrize("scenario", ["task", "class"])
def test_replay_campaigns_resume_to_the_same_R(tmp_path, name, scenario):
    data = {"dataset": "digits", "stream": "split" if scenario == "class" else "permuted",
            "n_tasks": 5 if scenario == "class" else 3, "max_train_per_task": 120}
    cfg = write_config(tmp_path / "c.yaml", scenario=scenario, data=data, train__epochs=2,
                       strategy={"name": name, "memory": 60},
                       model={"kind": "mlp", "hidden": [32], "batchnorm": True, "dropout": 0.2})
    full = run(cfg, tmp_path / "full")
    part = tmp_path / "part"
    run(cfg, part)
    for folder in sorted((part / "checkpoints").iterdir())[1:]:
        shutil.rmtree(folder)
    resumed = resume_run(part)
    assert resumed["R"] == full["R"]
    assert resumed["sizes"] == full["sizes"]


def test_a_replay_strategys_own_state_and_its_memory_load_apart():
    """The memory's rows and counter go to the memory, everything else to the strategy; a
    state saved without a memory entry loads as an empty counter."""
    s = make_strategy("er", {"memory": 10})
    rows = {"memory/all/x": torch.ones(2, 3), "memory/all/y": torch.tensor([1, 0]),
            "memory/all/task": torch.tensor([0, 0])}
    own = {"anchor/0/fc1.weight": torch.zeros(2)}
    s.load_state_dict({**rows, **own}, {"memory": {"seen": 7}, "note": 1})
    assert set(s.state) == set(own) and s.extra == {"note": 1}
    assert s.memory.seen == 7 and s.memory.y.tolist() == [1, 0] and len(s.memory) == 2
    s.load_state_dict(rows, {"note": 2})
    assert s.memory.seen == 0 and s.extra == {"note": 2} and len(s.memory) == 2


def test_class_keys_put_each_heads_labels_2_to_the_20_apart():
    from growth.strategies.rehearsal import as_tasks, class_keys

    tasks, model = synthetic(3), mlp()
    ctx = context(model, tasks, 2)  # task-incremental: task i on head out{i}
    pos = [model.heads.index(f"out{i}") for i in range(3)]
    key = class_keys(ctx)
    got = key(torch.tensor([0, 1, 2, 1]), torch.tensor([3, 3, 0, 1], dtype=torch.int32))
    assert got.tolist() == [pos[0] * 2 ** 20 + 3, pos[1] * 2 ** 20 + 3, pos[2] * 2 ** 20,
                            pos[1] * 2 ** 20 + 1]
    # rows grouped by head: a head with a single row is a training set of that row
    x, y = torch.arange(3.0)[:, None].expand(3, 16).reshape(3, 1, 4, 4), torch.tensor([2, 0, 1])
    sets = as_tasks(ctx, x, y, torch.tensor([1, 0, 1]))
    assert sorted((t.index, t.train[1].tolist(), t.class_offset) for t in sets) == [
        (0, [0], 0), (1, [2, 1], 0)]
