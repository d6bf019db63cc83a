"""RWalk: the EWC++ Fisher, the path score and the penalty against a hand computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_strategies import context, mlp, perturb, sgd_steps, synthetic, value

from growth.strategies import make_strategy, state_key

EPS = torch.finfo(torch.float32).eps


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def by_hand(start, grads, task_grads, lr, alpha, interval, fisher, names):
    """Plain SGD from `start` with the loop's gradients `grads`; F <- alpha g^2 + (1-alpha) F
    and the path sum -g delta with the task's gradients `task_grads`; an interval closes every
    `interval` steps and at the end: s += omega / (F/2 (theta - theta_start)^2 + eps)."""
    theta = {n: start[n].clone() for n in names}
    fisher = {n: fisher[n].clone() for n in names}
    score = {n: torch.zeros_like(theta[n]) for n in names}
    omega = {n: torch.zeros_like(theta[n]) for n in names}
    began = {n: t.clone() for n, t in theta.items()}
    for k, (g, gt) in enumerate(zip(grads, task_grads)):
        for n in names:
            fisher[n] = alpha * gt[n] ** 2 + (1 - alpha) * fisher[n]
            new = theta[n] - lr * g[n]
            omega[n] += -gt[n] * (new - theta[n])
            theta[n] = new
        if (k + 1) % interval == 0 or k + 1 == len(grads):
            for n in names:
                score[n] += omega[n] / (0.5 * fisher[n] * (theta[n] - began[n]) ** 2 + EPS)
                omega[n] = torch.zeros_like(omega[n])
                began[n] = theta[n].clone()
    return fisher, score


def test_fisher_score_and_penalty_match_a_hand_computation():
    tasks, model = synthetic(2), mlp(n_heads=2)
    lam, alpha, every, lr = 2.0, 0.7, 2, 0.1
    s = make_strategy("rwalk", {"lambda": lam, "alpha": alpha, "interval": every})
    ctx = context(model, tasks, 0)
    x, y = tasks[0].train
    s.before_task(ctx)
    names = [n for n, _ in model.head("out0").named_parameters()]
    start = {n: p.detach().clone() for n, p in model.named_parameters().items()}
    batches = [(x[i:i + 6], y[i:i + 6]) for i in range(0, 30, 6)]  # 5 steps: 2 + 2 + 1
    grads = sgd_steps(s, ctx, batches, lr)
    s.after_task(ctx)
    zero = {n: torch.zeros_like(start[n]) for n in names}
    fisher0, score0 = by_hand(start, grads, grads, lr, alpha, every, zero, names)  # no penalty
    for n in names:
        torch.testing.assert_close(s.state[state_key("fisher", "all", n)], fisher0[n])
        # a score divides by small squared moves: float32 rounding of the steps shows at 1e-6
        torch.testing.assert_close(s.state[state_key("score", "all", n)], score0[n], rtol=1e-4,
                                   atol=1e-5)
        assert torch.equal(s.state[state_key("anchor", "latest", n)],
                           model.named_parameters()[n].detach())

    # task 1 pays lambda sum (F / max F + max(s, 0) / max s) (theta - theta*)^2
    ctx = context(model, tasks, 1)
    s.before_task(ctx)
    perturb(model, 3)
    top_f = max(float(f.max()) for f in fisher0.values())
    top_s = max(float(v.clamp(min=0).max()) for v in score0.values())
    params = model.named_parameters()
    trunk = ["fc1.weight", "fc1.bias", "features.weight", "features.bias"]
    imp = {n: fisher0[n] / top_f + score0[n].clamp(min=0) / top_s for n in names}
    anchors = {n: s.state[state_key("anchor", "latest", n)] for n in names}
    paid = sum((lam * imp[n] * (params[n].detach() - anchors[n]) ** 2).sum() for n in trunk)
    assert value(s, ctx) == pytest.approx(float(paid), rel=1e-5)

    # one step of task 1 from here: the Fisher and the score read the task loss's gradient alone
    s.before_task(ctx)
    view = model.head("out1")
    xb, yb = tasks[1].train[0][:8], tasks[1].train[1][:8]
    now = {n: p.detach().clone() for n, p in model.named_parameters().items()}
    ce = F.cross_entropy(view(xb), yb)
    task_grad = dict(zip([n for n, _ in view.named_parameters()],
                         torch.autograd.grad(ce, list(view.parameters()))))
    grads1 = sgd_steps(s, ctx, [(xb, yb)], lr)
    for n in trunk:  # the loop's gradient holds the penalty's: 2 lambda imp (theta - theta*)
        penalty = 2 * lam * imp[n] * (now[n] - anchors[n])
        torch.testing.assert_close(grads1[0][n], task_grad[n] + penalty)
    s.after_task(ctx)
    names1 = list(task_grad)
    old = {n: fisher0[n] if n in fisher0 else torch.zeros_like(now[n]) for n in names1}
    fisher1, score1 = by_hand(now, grads1, [task_grad], lr, alpha, every, old, names1)
    for n in names1:
        torch.testing.assert_close(s.state[state_key("fisher", "all", n)], fisher1[n])
        want = (score0[n] + score1[n]) / 2 if n in score0 else score1[n]  # mean with the old
        torch.testing.assert_close(s.state[state_key("score", "all", n)], want, rtol=1e-4,
                                   atol=1e-5)
    for n in ("head0.weight", "head0.bias"):  # not trained by task 1: kept as they were
        torch.testing.assert_close(s.state[state_key("fisher", "all", n)], fisher0[n])
        torch.testing.assert_close(s.state[state_key("score", "all", n)], score0[n])


def test_negative_scores_add_nothing_and_each_part_is_scaled_by_its_largest_entry():
    from growth.strategies.rwalk import rwalk_importance

    fisher = {"a": torch.tensor([1.0, 4.0]), "b": torch.tensor([2.0])}
    score = {"a": torch.tensor([-3.0, 1.0]), "b": torch.tensor([0.5])}
    got = rwalk_importance(fisher, score)
    torch.testing.assert_close(got["a"], torch.tensor([0.25 + 0.0, 1.0 + 1.0]))
    torch.testing.assert_close(got["b"], torch.tensor([0.5 + 0.5]))
    zero = rwalk_importance({"a": torch.zeros(2)}, {"a": torch.tensor([-1.0, -2.0])})
    torch.testing.assert_close(zero["a"], torch.zeros(2))  # nothing learned: no pull


def test_the_running_fisher_carries_over_between_tasks_and_the_score_interval_restarts():
    tasks, model = synthetic(2), mlp(n_heads=2)
    s = make_strategy("rwalk", {"interval": 3})
    ctx = context(model, tasks, 0)
    x, y = tasks[0].train
    s.before_task(ctx)
    sgd_steps(s, ctx, [(x[:8], y[:8])] * 4, 0.05)
    assert s._steps == 4
    s.after_task(ctx)
    ctx = context(model, tasks, 1)
    s.before_task(ctx)
    assert s._steps == 0
    live = dict(zip(s._path.names, s._fisher))
    for n in ("fc1.weight", "features.bias"):
        torch.testing.assert_close(live[n], s.state[state_key("fisher", "all", n)])
    assert not live["head1.weight"].any()
