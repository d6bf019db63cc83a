"""SCP: the sliced importance and the penalty against a hand computation."""

from __future__ import annotations

import pytest
import torch
from test_strategies import context, mlp, perturb, synthetic, tiny_linear, trained, value

from growth.data.sampling import generator
from growth.regularizers import sliced_importance
from growth.strategies import make_strategy, state_key
from growth.train import TrainConfig, learn_task


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def per_slice(view, names, x, slices):
    """The definition, slice by slice: (1/L) sum_l (d xi_l . mean_n f(x_n) / d theta)^2."""
    params = dict(view.named_parameters())
    out = {n: torch.zeros_like(params[n]) for n in names}
    view.eval()
    for xi in slices:
        proj = (xi.float() * view(x).mean(0)).sum()
        for n, g in zip(names, torch.autograd.grad(proj, [params[n] for n in names])):
            out[n] += g ** 2 / len(slices)
    view.train()
    return out


def test_a_linear_layers_importance_in_closed_form():
    """f = W x + b: d xi . mean f / d W[c, j] = xi_c mean x_j, so Gamma_W[c, j] = M_cc (mean
    x_j)^2 and Gamma_b[c] = M_cc, M = xi' xi / L."""
    model = tiny_linear()
    x = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.7, -1.0], [2.0, 0.0, 1.0]])
    xi = torch.tensor([[0.6, 0.8], [1.0, 0.0], [0.0, -1.0]])
    m = [(0.36 + 1.0) / 3, (0.64 + 1.0) / 3]  # M_00, M_11
    mean = x.mean(0)
    got = sliced_importance(model.head("out"), ["fc.weight", "fc.bias"], x, xi, chunk=2)
    torch.testing.assert_close(got["fc.weight"], torch.stack([m[0] * mean ** 2,
                                                              m[1] * mean ** 2]))
    torch.testing.assert_close(got["fc.bias"], torch.tensor(m))


def test_sliced_importance_is_the_mean_over_slices_of_squared_projected_gradients():
    tasks, model = synthetic(1), mlp(n_heads=1)
    view = model.head("out0")
    names = [n for n, _ in view.named_parameters()]
    x = tasks[0].train[0]
    xi = torch.randn(7, 4, generator=torch.Generator().manual_seed(2))
    xi = xi / xi.norm(dim=1, keepdim=True)
    want = per_slice(view, names, x, xi)
    got = sliced_importance(view, names, x, xi, chunk=5)  # the mean is taken over all chunks
    for n in names:
        torch.testing.assert_close(got[n], want[n])


def test_scp_sums_each_tasks_importance_from_its_own_slices_and_pays_lambda_times_it():
    tasks, model = synthetic(3), mlp()
    lam = 4.0
    s = make_strategy("scp", {"lambda": lam, "slices": 5, "samples": None})
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.05)
    total = {}
    for i in range(2):
        ctx = context(model, tasks, i)
        learn_task(ctx, s, cfg, seed=i)
        view = model.head(f"out{i}")
        names = [n for n, _ in view.named_parameters()]
        xi = torch.randn(5, 4, generator=generator(ctx.seed, "scp-slices", i),
                         dtype=torch.float64)
        xi = xi / xi.norm(dim=1, keepdim=True)
        for n, g in per_slice(view, names, tasks[i].train[0], xi).items():
            total[n] = total.get(n, 0) + g
    for n, g in total.items():
        torch.testing.assert_close(s.state[state_key("importance", "all", n)], g)
    ctx = context(model, tasks, 2)
    s.before_task(ctx)
    perturb(model, 1)
    params = model.named_parameters()
    paid = sum((lam * g * (params[n].detach() - s.state[state_key("anchor", "latest", n)]) ** 2)
               .sum() for n, g in total.items() if n in trained(ctx))
    assert value(s, ctx) == pytest.approx(float(paid), rel=1e-5)


def test_another_seed_draws_other_slices():
    tasks = synthetic(1)
    got = []
    for seed in (0, 1):
        model = mlp(n_heads=1)
        s = make_strategy("scp", {"slices": 3})
        ctx = context(model, tasks, 0)
        ctx.seed = seed
        learn_task(ctx, s, TrainConfig(epochs=0), seed=0)
        got.append(s.state[state_key("importance", "all", "head0.bias")])
    assert not torch.allclose(got[0], got[1])
