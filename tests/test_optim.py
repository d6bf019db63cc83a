"""Optimizer state follows the parameters when the graph grows."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from growth.search_spaces.networks import add_head, mlp

from growth.errors import ShapeError
from growth.model import Model
from growth.ops import net2wider
from growth.optim import follow


def _trained_model() -> tuple[Model, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Model(add_head(mlp((1, 4, 4), [6, 5]), "t0", 3))
    opt = torch.optim.Adam(model.module.parameters(), lr=0.01)
    x, y = torch.rand(16, 1, 4, 4), torch.randint(0, 3, (16,))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model.head("t0")(x), y).backward()
        opt.step()
    return model, opt


def test_adam_state_follows_a_widening() -> None:
    model, opt = _trained_model()
    old = model.named_parameters()
    first = next(n for n in model.graph.topo_order() if model.graph.node(n).kind == "linear")
    result = net2wider(model.graph, first, 9)
    model.replace_graph(result.graph)
    new = model.named_parameters()
    opt2 = follow(opt, old, new, result.record)
    assert set(opt2.state) == set(new.values())  # every parameter has state, none stale
    for name, p in new.items():
        before = opt.state[old[name]]
        after = opt2.state[p]
        assert after["exp_avg"].shape == p.shape
        assert torch.equal(after["step"], before["step"])
        maps = result.record.index_maps.get(name)
        if not maps:  # untouched parameters keep their moments exactly
            assert torch.equal(after["exp_avg"], before["exp_avg"])
            continue
        assert after["exp_avg_sq"].shape == p.shape  # values: tests/test_remap.py
    # the optimizer really trains the new parameters
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 3, (8,))
    snap = {n: p.detach().clone() for n, p in new.items()}
    opt2.zero_grad()
    F.cross_entropy(model.head("t0")(x), y).backward()
    opt2.step()
    assert all(not torch.equal(snap[n], p) for n, p in new.items())


def test_a_resize_without_its_record_is_an_error_not_a_slice() -> None:
    model, opt = _trained_model()
    old = model.named_parameters()
    first = next(n for n in model.graph.topo_order() if model.graph.node(n).kind == "linear")
    model.replace_graph(net2wider(model.graph, first, 9).graph)
    try:
        follow(opt, old, model.named_parameters())
    except ShapeError as exc:
        assert "no change record" in str(exc) and f"{first}.weight" in str(exc)
    else:
        raise AssertionError("follow carried moments of a resized parameter without a record")


def test_training_goes_on_after_growth_with_the_followed_optimizer() -> None:
    from growth.data.containers import Task
    from growth.strategies import Context, Strategy
    from growth.train import TrainConfig, fit

    torch.manual_seed(1)
    x, y = torch.rand(64, 1, 4, 4), torch.randint(0, 3, (64,))
    task = Task(0, "t", (x, y), (x, y), (x, y), [0, 1, 2], 3, 0, (1, 4, 4))
    model = Model(add_head(mlp((1, 4, 4), [6]), "t0", 3))
    ctx = Context(model, task, [], lambda t: "t0", lambda t, y: y, torch.device("cpu"))
    cfg = TrainConfig(epochs=3, optimizer="adam", lr=0.01)
    first = fit(ctx, Strategy(), cfg)
    result = net2wider(model.graph, "fc1", 12)
    ctx.replace_graph(result.graph, result.record)
    params = set(model.named_parameters().values())
    assert set(ctx.optimizer.state) == params  # no stale parameters, every new one has state
    with torch.no_grad():  # the grown network computes the same function
        assert torch.allclose(model.head("t0")(x), Model(result.graph).head("t0")(x))
    more = fit(ctx, Strategy(), cfg, optimizer=ctx.optimizer)
    assert more[-1] < first[0]
    assert model.named_parameters()["fc1.weight"].shape == (12, 16)
