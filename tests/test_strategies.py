"""Regularisation strategies (EWC, SI, MAS, L2, LwF, MWC) checked against hand computations."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from safetensors.torch import load, save

from growth.data.containers import Task
from growth.graph import NetGraph
from growth.model import Model
from growth.ops import net2wider
from growth.regularizers import (
    build_quadratic,
    fisher_diagonal,
    kd_loss,
    mas_importance,
    stored,
    task_fisher,
)
from growth.strategies import Context, make_strategy, state_key
from growth.train import TrainConfig, evaluate, learn_task

REGULARISERS = ["ewc", "si", "mas", "l2", "lwf", "mwc", "rwalk", "scp"]
CFG = TrainConfig(epochs=2, batch_size=16, lr=0.05, momentum=0.9)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny networks run fastest (and steadiest on a busy machine) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- builders ----------------------------------------------------------------------------------
def mlp(n_heads: int = 3, hidden: int = 12, classes: int = 4, seed: int = 0,
        in_shape: tuple[int, ...] = (1, 4, 4)) -> Model:
    """input -> flatten -> fc1 -> relu -> features -> relu -> one linear head per task."""
    torch.manual_seed(seed)
    g = NetGraph()
    g.add_input("x", in_shape)
    g.add("flat", "flatten", ["x"])
    g.add("fc1", "linear", ["flat"], out_features=hidden)
    g.add("r1", "relu", ["fc1"])
    g.add("features", "linear", ["r1"], out_features=hidden)
    g.add("r2", "relu", ["features"])
    for i in range(n_heads):
        g.add(f"head{i}", "linear", ["r2"], out_features=classes)
        g.add_output(f"out{i}", f"head{i}")
    return Model(g)


def make_task(i: int, x: torch.Tensor, y: torch.Tensor, classes: int, offset: int = 0) -> Task:
    n = len(y) * 3 // 4
    return Task(i, f"t{i}", (x[:n], y[:n]), (x[n:], y[n:]), (x[n:], y[n:]),
                list(range(offset, offset + classes)), classes, offset, tuple(x.shape[1:]))


def synthetic(n_tasks: int = 3, n: int = 48, classes: int = 4, seed: int = 0) -> list[Task]:
    """Each task: Gaussian inputs [n, 1, 4, 4] labelled by its own random linear teacher."""
    gen = torch.Generator().manual_seed(seed)
    tasks = []
    for i in range(n_tasks):
        x = torch.randn(n, 1, 4, 4, generator=gen)
        teacher = torch.randn(16, classes, generator=gen)
        tasks.append(make_task(i, x, (x.flatten(1) @ teacher).argmax(1), classes))
    return tasks


def context(model: Model, tasks: list[Task], i: int, single_head: bool = False) -> Context:
    if single_head:
        return Context(model, tasks[i], tasks[:i], lambda t: "out0",
                       lambda t, y: y + t.class_offset, torch.device("cpu"))
    return Context(model, tasks[i], tasks[:i], lambda t: f"out{t.index}", lambda t, y: y,
                   torch.device("cpu"))


def run(name: str, params: dict, tasks: list[Task], model: Model, upto: int | None = None,
        cfg: TrainConfig = CFG):
    """Learn tasks[0..upto) with a fresh strategy; returns it and the context of the last."""
    s = make_strategy(name, params)
    ctx = None
    for i in range(len(tasks) if upto is None else upto):
        ctx = context(model, tasks, i)
        learn_task(ctx, s, cfg, seed=i)
    return s, ctx


@torch.no_grad()
def perturb(model: Model, seed: int, scale: float = 0.1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.module.parameters():
        p.add_(scale * torch.randn(p.shape, generator=gen))


def trained(ctx: Context) -> set[str]:
    """Parameters the current task can move: the trunk and its own head."""
    return {n for n, _ in ctx.model.head(ctx.head_of(ctx.task)).named_parameters()}


def value(s, ctx) -> float:
    out = s.penalty(ctx, None, None, None)
    return 0.0 if out is None else float(out.detach())


# ---- shared pieces -------------------------------------------------------------------------------
def tiny_linear(seed: int = 0) -> Model:
    torch.manual_seed(seed)
    g = NetGraph()
    g.add_input("x", [3])
    g.add("fc", "linear", ["x"], out_features=2)
    g.add_output("out", "fc")
    return Model(g)


def test_fisher_is_the_per_sample_mean_of_squared_log_likelihood_gradients():
    model = tiny_linear()
    w, b = model.module.fc.weight.detach(), model.module.fc.bias.detach()
    x = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.7, -1.0]])
    y = torch.tensor([1, 0])
    fw, fb = torch.zeros_like(w), torch.zeros_like(b)
    for i in range(2):  # d log softmax(Wx+b)_y / dW = (onehot(y) - p) x^T
        p = torch.softmax(w @ x[i] + b, 0)
        err = F.one_hot(y[i], 2).float() - p
        for r in range(2):
            fb[r] += err[r] ** 2 / 2
            for c in range(3):
                fw[r, c] += (err[r] * x[i, c]) ** 2 / 2
    got = fisher_diagonal(model.head("out"), ["fc.weight", "fc.bias"], x, y)
    torch.testing.assert_close(got["fc.weight"], fw)
    torch.testing.assert_close(got["fc.bias"], fb)


def test_mas_importance_is_the_mean_absolute_gradient_of_the_squared_output_norm():
    model = tiny_linear(1)
    w, b = model.module.fc.weight.detach(), model.module.fc.bias.detach()
    x = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.7, -1.0], [-1.0, 0.0, 2.0]])
    iw, ib = torch.zeros_like(w), torch.zeros_like(b)
    for i in range(3):  # d ||Wx+b||^2 / dW = 2 f x^T
        f = w @ x[i] + b
        for r in range(2):
            ib[r] += abs(2 * f[r]) / 3
            for c in range(3):
                iw[r, c] += abs(2 * f[r] * x[i, c]) / 3
    got = mas_importance(model.head("out"), ["fc.weight", "fc.bias"], x)
    torch.testing.assert_close(got["fc.weight"], iw)
    torch.testing.assert_close(got["fc.bias"], ib)


def test_importance_runs_batchnorm_and_dropout_nets_in_eval_mode_and_restores_modes():
    torch.manual_seed(0)
    g = NetGraph()
    g.add_input("x", [5])
    g.add("fc", "linear", ["x"], out_features=4)
    g.add("bn", "batchnorm1d", ["fc"])
    g.add("drop", "dropout", ["bn"])
    g.add("head", "linear", ["drop"], out_features=3)
    g.add_output("out", "head")
    model = Model(g)
    x, y = torch.randn(7, 5), torch.randint(0, 3, (7,))
    model.train()
    names = [n for n, _ in model.module.named_parameters()]
    a = fisher_diagonal(model.head("out"), names, x, y)
    b = fisher_diagonal(model.head("out"), names, x, y)
    assert all(torch.equal(a[n], b[n]) for n in names)  # deterministic: dropout off
    assert all(m.training for m in model.module.modules())
    running = model.module.bn.running_mean.clone()
    fisher_diagonal(model.head("out"), names, x, y)
    assert torch.equal(running, model.module.bn.running_mean)


def test_quadratic_refuses_state_of_another_shape_than_its_parameter():
    from growth.errors import ShapeError

    lin = torch.nn.Linear(3, 6)
    with pytest.raises(ShapeError, match="'weight'.*Context.replace_graph"):
        build_quadratic(lin, [(0.5, {"weight": torch.rand(4, 3)}, {"weight": torch.rand(4, 3)})])


def test_merged_terms_equal_the_sum_of_separate_terms():
    lin = torch.nn.Linear(4, 5)
    gen = torch.Generator().manual_seed(3)
    comps = [(s, {"weight": torch.rand(5, 4, generator=gen)},
              {"weight": torch.randn(5, 4, generator=gen)}) for s in (0.5, 2.0, 1.5)]
    by_hand = sum(s * (w["weight"] * (lin.weight.detach() - a["weight"]) ** 2).sum()
                  for s, w, a in comps)
    assert float(build_quadratic(lin, comps)().detach()) == pytest.approx(float(by_hand), rel=1e-5)


def test_kd_loss_is_zero_for_equal_outputs_and_positive_otherwise():
    a = torch.randn(5, 4)
    assert float(kd_loss(a, a.clone(), 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(kd_loss(a, a + torch.randn(5, 4), 2.0)) > 0


# ---- EWC -----------------------------------------------------------------------------------------
def test_ewc_separate_penalty_is_half_lambda_sum_fisher_times_squared_distance():
    tasks, model = synthetic(), mlp()
    s, _ = run("ewc", {"lambda": 7.0}, tasks, model, upto=2)
    assert s.finished() == [0, 1]
    ctx = context(model, tasks, 2)
    s.before_task(ctx)
    params = model.named_parameters()
    for seed in range(3):
        perturb(model, seed)
        by_hand = sum(
            3.5 * (s.state[state_key("fisher", k, n)]
                   * (params[n].detach() - s.state[state_key("anchor", k, n)]) ** 2).sum()
            for k in (0, 1) for n in stored(s.state, "fisher", k) if n in trained(ctx))
        assert value(s, ctx) == pytest.approx(float(by_hand), rel=1e-5)


@pytest.mark.parametrize("name", ["ewc", "si", "mas", "l2", "mwc", "rwalk", "scp"])
def test_penalties_leave_other_tasks_heads_without_gradients(name):
    tasks, model = synthetic(), mlp()
    s, _ = run(name, {}, tasks, model, upto=2)
    ctx = context(model, tasks, 2)
    s.before_task(ctx)
    perturb(model, 0)
    model.module.zero_grad(set_to_none=True)
    s.penalty(ctx, None, None, None).backward()
    graded = {n for n, p in model.named_parameters().items() if p.grad is not None}
    assert graded == {"fc1.weight", "fc1.bias", "features.weight", "features.bias"}

def test_ewc_stores_each_tasks_fisher_through_its_own_head():
    tasks, model = synthetic(), mlp()
    s, ctx = run("ewc", {"fisher_samples": None}, tasks, model, upto=2)
    expect = task_fisher(ctx, tasks[1], None)  # the model is as after_task left it
    assert set(stored(s.state, "fisher", 1)) == {"fc1.weight", "fc1.bias", "features.weight",
                                                 "features.bias", "head1.weight", "head1.bias"}
    for n, f in expect.items():
        torch.testing.assert_close(s.state[state_key("fisher", 1, n)], f)


def test_online_ewc_keeps_a_running_fisher_gamma_old_plus_new_and_one_anchor():
    tasks, model = synthetic(), mlp()
    s, ctx = run("ewc", {"mode": "online", "gamma": 0.7}, tasks, model, upto=1)
    old = {n: t.clone() for n, t in stored(s.state, "fisher", "all").items()}
    ctx = context(model, tasks, 1)
    learn_task(ctx, s, CFG, seed=1)
    new = task_fisher(ctx, tasks[1], 1000)
    running = stored(s.state, "fisher", "all")
    for n in new:
        torch.testing.assert_close(running[n], 0.7 * old.get(n, 0) + new[n])
    torch.testing.assert_close(running["head0.weight"], 0.7 * old["head0.weight"])
    params = model.named_parameters()
    for n, a in stored(s.state, "anchor", "latest").items():
        assert torch.equal(a, params[n].detach())
    assert not any(k.startswith("fisher/0/") for k in s.state)


# ---- MWC -----------------------------------------------------------------------------------------
def test_mwc_with_beta_zero_is_ewc_with_one_term_per_task():
    tasks = synthetic(4)
    ewc, ctx_e = run("ewc", {"lambda": 3.0}, tasks, model_e := mlp(n_heads=4), upto=3)
    mwc, ctx_m = run("mwc", {"lambda": 3.0, "beta": 0.0}, tasks, model_m := mlp(n_heads=4),
                     upto=3)
    assert mwc.extra["relatedness"]["2"]["w"] == pytest.approx([1.0, 1.0])
    for key, t in ewc.state.items():  # same Fisher, same anchors
        torch.testing.assert_close(mwc.state[key], t)
    ctx_e, ctx_m = context(model_e, tasks, 3), context(model_m, tasks, 3)
    ewc.before_task(ctx_e)
    mwc.before_task(ctx_m)
    assert mwc.extra["relatedness"]["3"]["w"] == pytest.approx([1.0, 1.0, 1.0])
    for seed in range(4):
        perturb(model_e, seed)
        perturb(model_m, seed)
        assert value(mwc, ctx_m) == pytest.approx(value(ewc, ctx_e), rel=1e-6, abs=1e-6)
        assert value(ewc, ctx_e) > 0


def test_mwc_weights_are_a_scaled_softmax_of_fisher_cosines_on_the_trunk():
    tasks, model = synthetic(4), mlp(n_heads=4)
    beta, lam = 5.0, 2.0
    s, _ = run("mwc", {"lambda": lam, "beta": beta}, tasks, model, upto=3)
    ctx = context(model, tasks, 3)
    new = task_fisher(ctx, tasks[3], 1000)  # F^_t: the new task's Fisher before training it
    s.before_task(ctx)
    trunk = ["fc1.weight", "fc1.bias", "features.weight", "features.bias"]
    assert sorted(model.trunk_parameter_names()) == sorted(trunk)
    r = []
    for k in range(3):
        a = torch.cat([s.state[state_key("fisher", k, n)].flatten() for n in trunk]).double()
        b = torch.cat([new[n].flatten() for n in trunk]).double()
        r.append(float(a @ b / (a.norm() * b.norm())))
    e = [math.exp(beta * v) for v in r]
    w = [3 * v / sum(e) for v in e]
    rec = s.extra["relatedness"]["3"]
    assert rec["tasks"] == [0, 1, 2]
    assert rec["r"] == pytest.approx(r, rel=1e-6)
    assert rec["w"] == pytest.approx(w, rel=1e-6)
    assert sum(rec["w"]) == pytest.approx(3.0)
    assert len(set(round(v, 6) for v in rec["w"])) == 3  # beta > 0: unequal weights
    perturb(model, 0)
    params = model.named_parameters()
    by_hand = sum(
        lam / 2 * w[k] * (s.state[state_key("fisher", k, n)]
                          * (params[n].detach() - s.state[state_key("anchor", k, n)]) ** 2).sum()
        for k in range(3) for n in stored(s.state, "fisher", k) if n in trained(ctx))
    assert value(s, ctx) == pytest.approx(float(by_hand), rel=1e-5)


def test_grown_parameters_carry_no_penalty_until_their_task_ends():
    tasks = synthetic(3)
    model = mlp(hidden=4)
    s, _ = run("mwc", {"lambda": 5.0}, tasks, model, upto=2)
    ctx = context(model, tasks, 2)
    ctx.strategy = s
    grown = net2wider(model.graph, "fc1", 6, seed=3)  # fc1 rows 4 -> 6, features columns 4 -> 6
    ctx.replace_graph(grown.graph, grown.record)
    s.before_task(ctx)
    before = value(s, ctx)
    new = [j for j in range(4, 6)]
    with torch.no_grad():  # the copies (rows 4, 5 of fc1, columns 4, 5 of features) are free
        model.module.fc1.weight[new] += 1.0
        model.module.fc1.bias[new] -= 1.0
        model.module.features.weight[:, new] += 1.0
    assert value(s, ctx) == pytest.approx(before, rel=1e-6, abs=1e-7)
    with torch.no_grad():
        model.module.fc1.weight[:4] += 0.1
    assert value(s, ctx) > before
    learn_task(ctx, s, CFG, seed=2)  # after the task ends, its Fisher covers the new units
    assert s.state[state_key("fisher", 2, "fc1.weight")].shape == (6, 16)
    assert s.state[state_key("fisher", 0, "fc1.weight")].shape == (6, 16)
    assert torch.all(s.state[state_key("fisher", 0, "fc1.weight")][new] == 0)
    assert torch.any(s.state[state_key("fisher", 2, "fc1.weight")][new] != 0)


# ---- SI, MAS, L2 ---------------------------------------------------------------------------------
def sgd_steps(s, ctx, batches: list[tuple[torch.Tensor, torch.Tensor]], lr: float):
    """Plain SGD steps through the strategy's hooks; returns the gradients it saw."""
    view = ctx.model.head(ctx.head_of(ctx.task))
    opt = torch.optim.SGD(ctx.model.module.parameters(), lr=lr)
    grads = []
    for x, y in batches:
        logits = view(x)
        loss = F.cross_entropy(logits, y)
        extra = s.penalty(ctx, x, y, logits)
        if extra is not None:
            loss = loss + extra
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in ctx.model.named_parameters().items()
                      if p.grad is not None})
        s.after_backward(ctx)
        opt.step()
        s.after_step(ctx)
    return grads


def test_si_path_integral_and_importance_match_a_hand_computation():
    tasks, model = synthetic(2), mlp(n_heads=2)
    s = make_strategy("si", {"c": 0.5, "xi": 0.2})
    lr = 0.1
    omega_all = {}
    for i in range(2):
        ctx = context(model, tasks, i)
        x, y = tasks[i].train
        s.before_task(ctx)
        start = {n: p.detach().clone() for n, p in model.named_parameters().items()}
        grads = sgd_steps(s, ctx, [(x[:12], y[:12]), (x[12:24], y[12:24])], lr)
        s.after_task(ctx)
        end = model.named_parameters()
        for n in s._names:
            # plain SGD: each step moves by -lr g, so -g * delta = lr g^2
            omega = sum(lr * g[n] ** 2 for g in grads)
            delta = end[n].detach() - start[n]
            omega_all[n] = omega_all.get(n, 0) + omega / (delta ** 2 + 0.2)
        for n, t in omega_all.items():
            torch.testing.assert_close(s.state[state_key("omega", "all", n)], t)
    ctx = context(model, tasks, 1)
    s.before_task(ctx)
    perturb(model, 5)
    params = model.named_parameters()
    by_hand = sum((0.5 * t * (params[n].detach() - s.state[state_key("anchor", "latest", n)])
                   ** 2).sum() for n, t in omega_all.items() if n in trained(ctx))
    assert value(s, ctx) == pytest.approx(float(by_hand), rel=1e-5)


def test_si_follows_a_model_grown_in_the_middle_of_a_task():
    tasks, model = synthetic(2), mlp(n_heads=2, hidden=4)
    s = make_strategy("si", {"xi": 1e-3})  # small: Delta, not xi, sets Omega
    ctx = context(model, tasks, 0)
    ctx.strategy = s
    x, y = tasks[0].train
    s.before_task(ctx)
    start = {n: p.detach().clone() for n, p in model.named_parameters().items()}
    (g1,) = sgd_steps(s, ctx, [(x[:12], y[:12])], 0.1)
    grown = net2wider(model.graph, "fc1", 7, seed=1)
    idx = grown.record.index_maps["fc1.weight"][0]
    copies = [idx.count(i) for i in idx]  # c of each new unit's old unit
    ctx.replace_graph(grown.graph, grown.record)
    (g2,) = sgd_steps(s, ctx, [(x[12:24], y[12:24])], 0.1)
    s.after_task(ctx)
    end = model.named_parameters()
    # path sums of SGD at lr 0.1: -g * step = 0.1 g^2. Along the parent's path, a unit's row
    # (gradient / c) and its consumer column (value / c, gradient as before) each gained
    # 1/c of the parent's sum; copies start from zero. Start values follow like weights.
    omega_rows = 0.1 * g2["fc1.weight"] ** 2
    first_rows = start["fc1.weight"][idx].clone()
    omega_cols = 0.1 * g2["features.weight"] ** 2
    first_cols = start["features.weight"][:, idx] / torch.tensor(copies, dtype=torch.float32)
    for j in range(4):
        omega_rows[j] += 0.1 * g1["fc1.weight"][j] ** 2 / copies[j]
        omega_cols[:, j] += 0.1 * g1["features.weight"][:, j] ** 2 / copies[j]
    for n, omega, first in (("fc1.weight", omega_rows, first_rows),
                            ("features.weight", omega_cols, first_cols)):
        expect = omega / ((end[n].detach() - first) ** 2 + 1e-3)
        torch.testing.assert_close(s.state[state_key("omega", "all", n)], expect)
    omega = 0.1 * (g1["head0.weight"] ** 2 + g2["head0.weight"] ** 2)  # untouched by the change
    expect = omega / ((end["head0.weight"].detach() - start["head0.weight"]) ** 2 + 1e-3)
    torch.testing.assert_close(s.state[state_key("omega", "all", "head0.weight")], expect)


def test_mas_accumulates_importance_over_tasks_without_labels():
    tasks, model = synthetic(), mlp()
    s, ctx = run("mas", {"lambda": 0.3, "samples": None}, tasks, model, upto=1)
    first = {n: t.clone() for n, t in stored(s.state, "importance", "all").items()}
    ctx = context(model, tasks, 1)
    learn_task(ctx, s, CFG, seed=1)
    view = model.head("out1")
    names = [n for n, _ in view.named_parameters()]
    x = tasks[1].train[0]
    new = mas_importance(view, names, x)
    for n in new:
        torch.testing.assert_close(s.state[state_key("importance", "all", n)],
                                   first.get(n, 0) + new[n])
    ctx = context(model, tasks, 2)
    s.before_task(ctx)
    perturb(model, 1)
    params = model.named_parameters()
    by_hand = sum((0.3 * t * (params[n].detach() - s.state[state_key("anchor", "latest", n)])
                   ** 2).sum() for n, t in stored(s.state, "importance", "all").items()
                  if n in trained(ctx))
    assert value(s, ctx) == pytest.approx(float(by_hand), rel=1e-5)


def test_l2_penalty_is_lambda_sum_squared_distance_to_the_last_weights():
    tasks, model = synthetic(), mlp()
    s, ctx = run("l2", {"lambda": 0.4}, tasks, model, upto=2)
    ctx = context(model, tasks, 2)
    s.before_task(ctx)
    assert value(s, ctx) == pytest.approx(0.0, abs=1e-7)
    anchors = {n: p.detach().clone() for n, p in model.named_parameters().items()
               if n in stored(s.state, "anchor", "latest")}
    assert set(anchors) >= {"fc1.weight", "features.bias", "head0.weight", "head1.weight"}
    perturb(model, 2)
    params = model.named_parameters()
    by_hand = sum((0.4 * (params[n].detach() - a) ** 2).sum() for n, a in anchors.items()
                  if n in trained(ctx))
    assert value(s, ctx) == pytest.approx(float(by_hand), rel=1e-5)


# ---- LwF -----------------------------------------------------------------------------------------
def test_lwf_distillation_is_zero_for_the_frozen_model_and_grows_as_the_model_moves():
    tasks, model = synthetic(), mlp()
    s, _ = run("lwf", {"lambda_o": 2.0}, tasks, model, upto=2)
    ctx = context(model, tasks, 2)
    s.before_task(ctx)
    x = tasks[2].train[0]
    assert float(s.penalty(ctx, x).detach()) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        teacher = {h: model.head(h)(x) for h in ("out0", "out1")}
    perturb(model, 3)
    expect = 2.0 * sum(kd_loss(model.head(h)(x), teacher[h], 2.0) for h in teacher)
    got = s.penalty(ctx, x)
    assert float(got.detach()) > 0
    assert float(got.detach()) == pytest.approx(float(expect.detach()), rel=1e-5)
    got.backward()
    assert model.module.head0.weight.grad is not None  # old heads learn to match the copy
    assert model.module.head2.weight.grad is None  # the new head is not distilled


def test_lwf_has_no_penalty_on_the_first_task():
    tasks, model = synthetic(), mlp()
    s = make_strategy("lwf")
    ctx = context(model, tasks, 0)
    s.before_task(ctx)
    assert s.penalty(ctx, tasks[0].train[0]) is None


# ---- single-head (class-incremental) -------------------------------------------------------------
def class_incremental(n_tasks: int = 2, classes: int = 2) -> list[Task]:
    gen = torch.Generator().manual_seed(4)
    tasks = []
    for i in range(n_tasks):
        x = torch.randn(40, 1, 4, 4, generator=gen) + i
        y = (x.flatten(1).sum(1) > 16 * i).long()
        tasks.append(make_task(i, x, y, classes, offset=classes * i))
    return tasks


@pytest.mark.parametrize("name", REGULARISERS)
def test_single_head_streams_use_the_shared_head_and_global_labels(name):
    tasks = class_incremental()
    model = mlp(n_heads=1, classes=4)
    s = make_strategy(name, {})
    for i in range(2):
        ctx = context(model, tasks, i, single_head=True)
        losses = learn_task(ctx, s, CFG, seed=i)
        assert all(math.isfinite(v) for v in losses)
    if name in ("ewc", "mwc"):
        view = model.head("out0")
        names = [n for n, _ in view.named_parameters()]
        x, y = tasks[1].train
        expect = fisher_diagonal(view, names, x, y + 2)
        for n in names:
            torch.testing.assert_close(s.state[state_key("fisher", 1, n)], expect[n])
    if name == "lwf":
        ctx = context(model, [*tasks, tasks[1]], 2, single_head=True)
        s.before_task(ctx)
        assert s._old["out0"].tolist() == [0, 1, 2, 3]


# ---- checkpoints ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name,params", [
    ("ewc", {}), ("ewc", {"mode": "online", "gamma": 0.5}), ("si", {}), ("mas", {}),
    ("l2", {}), ("mwc", {"beta": 2.0}), ("lwf", {}), ("rwalk", {"interval": 3}),
    ("scp", {"slices": 5}),
])
def test_a_restored_strategy_pays_the_same_penalty_and_continues_identically(name, params):
    tasks = synthetic(3)
    model_a, model_b = mlp(), mlp()
    s, _ = run(name, params, tasks, model_a, upto=2)
    tensors, extra = s.state_dict()
    fresh = make_strategy(name, params)
    fresh.load_state_dict(load(save({k: v.contiguous() for k, v in tensors.items()})),
                          json.loads(json.dumps(extra)))
    model_b.module.load_state_dict(model_a.module.state_dict())
    ctx_a, ctx_b = context(model_a, tasks, 2), context(model_b, tasks, 2)
    learn_task(ctx_a, s, CFG, seed=2)
    learn_task(ctx_b, fresh, CFG, seed=2)
    for (n, p), q in zip(model_a.module.named_parameters(), model_b.module.parameters()):
        assert torch.equal(p, q), n
    assert set(s.state) == set(fresh.state)
    assert all(torch.equal(s.state[k], fresh.state[k]) for k in s.state)
    assert s.extra == json.loads(json.dumps(fresh.extra))
    ctx_a, ctx_b = context(model_a, tasks, 2), context(model_b, tasks, 2)
    if name != "lwf":
        perturb(model_a, 9)
        perturb(model_b, 9)
        assert value(fresh, ctx_b) == value(s, ctx_a)


# ---- behaviour -----------------------------------------------------------------------------------
def permuted_digits(n_tasks: int = 3) -> list[Task]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(y), generator=gen)[:800]
    x, y = x[idx], y[idx]
    tasks = []
    for i in range(n_tasks):
        perm = torch.arange(64) if i == 0 else torch.randperm(64, generator=gen)
        tasks.append(make_task(i, x[:, perm].view(-1, 1, 8, 8), y, 10))
    return tasks


def test_ewc_forgets_less_than_finetuning_on_permuted_digits():
    tasks = permuted_digits()
    cfg = TrainConfig(epochs=5, batch_size=32, lr=0.05, momentum=0.9)
    final = {}
    for name in ("finetune", "ewc"):
        model = mlp(hidden=64, classes=10, in_shape=(1, 8, 8))
        run(name, {}, tasks, model, cfg=cfg)  # default lambda
        final[name] = [evaluate(context(model, tasks, 2), t) for t in tasks]
    # measured: finetune [0.77, 0.715, 0.93], ewc [0.865, 0.83, 0.87]
    ewc, finetune = final["ewc"], final["finetune"]
    assert ewc[0] > finetune[0] + 0.05 and ewc[1] > finetune[1] + 0.05, final
    assert sum(ewc) > sum(finetune), final


# ---- settings ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,bad,key", [
    ("ewc", {"lambda": -1.0}, "lambda"), ("ewc", {"lamda": 1.0}, "lamda"),
    ("ewc", {"mode": "both"}, "mode"), ("ewc", {"gamma": 1.5}, "gamma"),
    ("si", {"c": -0.1}, "c"), ("si", {"xi": 0.0}, "xi"), ("mas", {"lambda": -2}, "lambda"),
    ("l2", {"fisher_samples": 10}, "fisher_samples"), ("lwf", {"temperature": 0}, "temperature"),
    ("mwc", {"lambda": -1}, "lambda"), ("mwc", {"fisher_samples": 0}, "fisher_samples"),
    ("rwalk", {"alpha": 0.0}, "alpha"), ("rwalk", {"interval": 0}, "interval"),
    ("scp", {"slices": 0}, "slices"), ("scp", {"lambda": -1}, "lambda"),
])
def test_bad_settings_are_refused_naming_the_key(name, bad, key):
    with pytest.raises(ValidationError) as err:
        make_strategy(name, bad)
    assert key in str(err.value)


DEFAULTS = {  # the settings each regulariser documents, by their user-facing keys
    "ewc": {"lambda": 50.0, "mode": "separate", "gamma": 1.0, "fisher_samples": 1000},
    "mwc": {"lambda": 50.0, "beta": 1.0, "fisher_samples": 1000},
    "si": {"c": 1.0, "xi": 0.1},
    "mas": {"lambda": 0.01, "samples": 1000},
    "l2": {"lambda": 0.05},
    "lwf": {"lambda_o": 0.5, "temperature": 2.0},
    "rwalk": {"lambda": 1.0, "alpha": 0.9, "interval": 10},
    "scp": {"lambda": 3.0, "slices": 100, "samples": 1000},
}


@pytest.mark.parametrize("name", REGULARISERS)
def test_lambda_is_the_user_facing_key_and_defaults_are_documented(name):
    params = make_strategy(name).params
    assert params.model_dump(by_alias=True) == DEFAULTS[name]
    doc = " ".join(type(params).__doc__.split())
    assert "quickstart" in doc
    for key, v in DEFAULTS[name].items():  # the docstring states the strength defaults
        if key in ("lambda", "c", "xi", "lambda_o", "temperature", "beta"):
            assert f"{key}: {v:g}" in doc, (key, v)
    for key, v in DEFAULTS[name].items():  # each key is taken as the user writes it
        other = 0.5 if isinstance(v, float) else ("online" if key == "mode" else 7)
        assert make_strategy(name, {key: other}).params.model_dump(by_alias=True)[key] == other


@pytest.mark.parametrize("name", ["ewc", "mas", "l2", "mwc", "rwalk", "scp"])
def test_the_lambda_key_sets_the_strength_of_the_penalty(name):
    tasks = synthetic()
    paid = {}
    for lam in (1.0, 3.0):
        model = mlp()
        s, _ = run(name, {"lambda": lam}, tasks, model, upto=1)
        ctx = context(model, tasks, 1)
        s.before_task(ctx)
        perturb(model, 0)
        paid[lam] = value(s, ctx)
    assert paid[1.0] > 0
    assert paid[3.0] == pytest.approx(3 * paid[1.0], rel=1e-5)


def test_lwf_trains_with_one_forward_pass_per_batch():
    """BN statistics move once per batch: the old heads come from the training forward."""
    from growth.graph import NetGraph

    g = NetGraph()
    g.add_input("x", (1, 4, 4))
    g.add("flat", "flatten", ["x"])
    g.add("fc", "linear", ["flat"], out_features=8)
    g.add("bn", "batchnorm1d", ["fc"])
    g.add("features", "relu", ["bn"])
    for i in range(3):
        g.add(f"head{i}", "linear", ["features"], out_features=4)
        g.add_output(f"out{i}", f"head{i}")
    model = Model(g)
    tasks = synthetic(3)
    s = make_strategy("lwf", {})
    for i in range(2):
        learn_task(context(model, tasks, i), s, CFG, seed=i)
    batches = sum(math.ceil(len(t.train[1]) / CFG.batch_size) for t in tasks[:2]) * CFG.epochs
    assert int(model.module.bn.num_batches_tracked) == batches
