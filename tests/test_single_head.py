"""SI, MAS and L2 in a single-head (class-incremental) stream: one head shared by every task,
labels shifted by the task's class offset, the shared head protected like the trunk. Each is
checked against a replay of the method by hand through the same batches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_strategies import class_incremental, context, mlp, perturb

from growth.regularizers import mas_importance, stored
from growth.strategies import make_strategy, state_key
from growth.train import TrainConfig, learn_task

# one batch per epoch (30 training samples): SGD without momentum steps by -lr * gradient
FULL = TrainConfig(epochs=3, batch_size=30, lr=0.05, momentum=0.0)
ALL = ["fc1.weight", "fc1.bias", "features.weight", "features.bias", "head0.weight",
       "head0.bias"]


def value(s, ctx) -> float:
    out = s.penalty(ctx, None, None, None)
    return 0.0 if out is None else float(out.detach())


def test_si_in_a_single_head_stream_matches_sgd_replayed_by_hand():
    tasks = class_incremental(2)
    model, twin = mlp(n_heads=1, classes=4), mlp(n_heads=1, classes=4)
    s = make_strategy("si", {"c": 0.3, "xi": 0.2})
    theta = {n: p.detach().clone() for n, p in twin.named_parameters().items()}
    big_omega: dict[str, torch.Tensor] = {}
    anchor: dict[str, torch.Tensor] = {}
    for i, task in enumerate(tasks):
        learn_task(context(model, tasks, i, single_head=True), s, FULL, seed=i)
        x, y = task.train
        start = {n: t.clone() for n, t in theta.items()}
        omega = {n: torch.zeros_like(t) for n, t in theta.items()}
        for _ in range(FULL.epochs):
            p = {n: t.clone().requires_grad_(True) for n, t in theta.items()}
            out = torch.func.functional_call(twin.head("out0"), p, (x,))
            loss = F.cross_entropy(out, y + task.class_offset)  # the shared head's labels
            loss = loss + sum((0.3 * big_omega[n] * (p[n] - anchor[n]) ** 2).sum()
                              for n in big_omega)
            grads = dict(zip(p, torch.autograd.grad(loss, list(p.values()))))
            for n in theta:
                omega[n] += FULL.lr * grads[n] ** 2  # -g * step, step = -lr g
                theta[n] = theta[n] - FULL.lr * grads[n]
        for n in theta:
            big_omega[n] = big_omega.get(n, 0) + omega[n] / ((theta[n] - start[n]) ** 2 + 0.2)
        anchor = {n: t.clone() for n, t in theta.items()}
    assert sorted(stored(s.state, "omega", "all")) == sorted(ALL)
    for n in ALL:
        torch.testing.assert_close(model.named_parameters()[n].detach(), theta[n])
        torch.testing.assert_close(s.state[state_key("omega", "all", n)], big_omega[n],
                                   rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(s.state[state_key("anchor", "latest", n)], anchor[n])


def test_mas_in_a_single_head_stream_sums_importances_through_the_shared_head():
    tasks = class_incremental(2)
    model = mlp(n_heads=1, classes=4)
    s = make_strategy("mas", {"lambda": 0.2, "samples": None})
    expect: dict[str, torch.Tensor] = {}
    for i, task in enumerate(tasks):
        learn_task(context(model, tasks, i, single_head=True), s, FULL, seed=i)
        new = mas_importance(model.head("out0"), ALL, task.train[0])
        expect = {n: expect.get(n, 0) + new[n] for n in ALL}
    assert sorted(stored(s.state, "importance", "all")) == sorted(ALL)
    for n in ALL:
        torch.testing.assert_close(s.state[state_key("importance", "all", n)], expect[n])
    ctx = context(model, [*tasks, tasks[1]], 2, single_head=True)
    s.before_task(ctx)
    anchors = {n: p.detach().clone() for n, p in model.named_parameters().items()}
    perturb(model, 3)
    params = model.named_parameters()
    by_hand = sum((0.2 * expect[n] * (params[n].detach() - anchors[n]) ** 2).sum() for n in ALL)
    assert value(s, ctx) == pytest.approx(float(by_hand), rel=1e-5)
    assert float(by_hand) > 0


def test_l2_in_a_single_head_stream_pulls_the_shared_head_too():
    tasks = class_incremental(2)
    model = mlp(n_heads=1, classes=4)
    s = make_strategy("l2", {"lambda": 0.4})
    for i in range(2):
        learn_task(context(model, tasks, i, single_head=True), s, FULL, seed=i)
    after = {n: p.detach().clone() for n, p in model.named_parameters().items()}
    assert sorted(stored(s.state, "anchor", "latest")) == sorted(ALL)
    for n in ALL:
        assert torch.equal(s.state[state_key("anchor", "latest", n)], after[n])
        assert torch.equal(s.state[state_key("importance", "latest", n)],
                           torch.ones_like(after[n]))
    ctx = context(model, [*tasks, tasks[1]], 2, single_head=True)
    s.before_task(ctx)
    perturb(model, 4)
    params = model.named_parameters()
    by_hand = sum((0.4 * (params[n].detach() - after[n]) ** 2).sum() for n in ALL)
    assert value(s, ctx) == pytest.approx(float(by_hand), rel=1e-5)
    model.module.zero_grad(set_to_none=True)
    s.penalty(ctx, None, None, None).backward()
    grad = model.module.head0.weight.grad
    torch.testing.assert_close(grad, 0.8 * (params["head0.weight"].detach()
                                            - after["head0.weight"]))
