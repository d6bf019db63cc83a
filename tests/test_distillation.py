"""Knowledge distillation and LwF against hand computations: the T^2 factor, the temperature
setting, the weight lambda_o and the old heads' columns."""

from __future__ import annotations

import math

import pytest
import torch
from test_strategies import CFG, class_incremental, context, mlp, perturb, run, synthetic

from growth.regularizers import kd_loss
from growth.strategies import make_strategy
from growth.train import learn_task


def kl_by_hand(student: list[float], teacher: list[float], t: float) -> float:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)) of one sample, with math only."""
    def soft(v: list[float]) -> list[float]:
        e = [math.exp(a / t) for a in v]
        return [a / sum(e) for a in e]

    p, q = soft(teacher), soft(student)
    return t * t * sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))


def kd_by_formula(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """The batch mean of T^2 * sum_c p_c (log p_c - log q_c), p = softmax(teacher / T)."""
    p = torch.softmax(teacher / t, dim=1)
    q = torch.softmax(student / t, dim=1)
    return t * t * (p * (p.log() - q.log())).sum(1).mean()


@pytest.mark.parametrize("t", [1.0, 2.0, 3.0, 0.5])
def test_kd_loss_is_t_squared_times_the_kl_of_softened_outputs(t):
    student, teacher = [0.0, 0.0, 1.0], [2.0, 0.0, -1.0]
    got = float(kd_loss(torch.tensor([student]), torch.tensor([teacher]), t))
    assert got == pytest.approx(kl_by_hand(student, teacher, t), rel=1e-5)


def test_kd_loss_is_the_mean_over_the_batch_and_its_direction_is_teacher_to_student():
    rows = [([0.0, 0.0, 1.0], [2.0, 0.0, -1.0]), ([1.0, -1.0, 0.5], [0.0, 0.3, 0.0])]
    s = torch.tensor([r[0] for r in rows])
    t = torch.tensor([r[1] for r in rows])
    expect = sum(kl_by_hand(a, b, 2.0) for a, b in rows) / 2
    assert float(kd_loss(s, t, 2.0)) == pytest.approx(expect, rel=1e-5)
    swapped = sum(kl_by_hand(b, a, 2.0) for a, b in rows) / 2
    assert abs(swapped - expect) > 1e-3  # KL is not symmetric: the direction is checked


def test_kd_loss_default_temperature_is_two():
    s, t = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.5, -0.5]])
    assert float(kd_loss(s, t)) == pytest.approx(kl_by_hand([0.0, 1.0], [1.5, -0.5], 2.0),
                                                 rel=1e-5)


def test_kd_loss_sends_no_gradient_to_the_teacher():
    s = torch.tensor([[0.0, 1.0, 2.0]], requires_grad=True)
    t = torch.tensor([[1.0, 0.0, 0.0]], requires_grad=True)
    kd_loss(s, t, 3.0).backward()
    assert t.grad is None
    # d/ds of T^2 KL at temperature T is T (q - p), the softened probabilities' difference
    p, q = torch.softmax(t.detach() / 3.0, 1), torch.softmax(s.detach() / 3.0, 1)
    torch.testing.assert_close(s.grad, 3.0 * (q - p))


@pytest.mark.parametrize("temperature,lambda_o", [(4.0, 0.5), (1.0, 2.0), (0.7, 1.0)])
def test_lwf_penalty_uses_its_temperature_and_weight(temperature, lambda_o):
    tasks, model = synthetic(), mlp()
    s, _ = run("lwf", {"lambda_o": lambda_o, "temperature": temperature}, tasks, model, upto=2)
    ctx = context(model, tasks, 2)
    s.before_task(ctx)
    x = tasks[2].train[0]
    with torch.no_grad():
        teacher = {h: model.head(h)(x) for h in ("out0", "out1")}
    perturb(model, 4, scale=0.3)
    with torch.no_grad():
        student = {h: model.head(h)(x) for h in ("out0", "out1")}
    expect = lambda_o * sum(kd_by_formula(student[h], teacher[h], temperature)
                            for h in teacher)
    got = float(s.penalty(ctx, x).detach())
    assert got > 1e-4
    assert got == pytest.approx(float(expect), rel=1e-5)


def test_lwf_distils_only_the_old_classes_of_a_shared_head():
    tasks = class_incremental(3)  # 2 classes per task, offsets 0, 2, 4
    model = mlp(n_heads=1, classes=6)
    s = make_strategy("lwf", {"lambda_o": 1.0, "temperature": 3.0})
    for i in range(2):
        learn_task(context(model, tasks, i, single_head=True), s, CFG, seed=i)
    ctx = context(model, tasks, 2, single_head=True)
    s.before_task(ctx)
    x = tasks[2].train[0]
    with torch.no_grad():
        teacher = model.head("out0")(x)
    perturb(model, 6, scale=0.3)
    with torch.no_grad():
        student = model.head("out0")(x)
    old = [0, 1, 2, 3]  # the classes of tasks 0 and 1; task 2's (4, 5) are new
    expect = kd_by_formula(student[:, old], teacher[:, old], 3.0)
    assert float(s.penalty(ctx, x).detach()) == pytest.approx(float(expect), rel=1e-5)
