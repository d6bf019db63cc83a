"""HAT: the gates, the annealed slope, the mask product on gradients, the compensated embedding
gradient and the sparsity regulariser against hand computations; earlier tasks' outputs stay
bitwise identical through real campaigns; resume gives the same R matrix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from growth.search_spaces.networks import add_head, mlp, small_cnn
from maskruns import resumed_after_first_task
from test_masks import Recorder, _check_bitwise, config

from growth.config import validate_config
from growth.data.containers import Task
from growth.errors import ConfigError, GraphError
from growth.graph import NetGraph
from growth.model import Model
from growth.strategies import Context, make_strategy
from growth.train import TrainConfig

HAT = {"name": "hat"}
MLP = {"kind": "mlp", "hidden": [64]}  # HAT's sparsity pressure needs some units to spare


def _setup(graph: NetGraph, attention: dict[str, list[int]] | None = None, n: int = 8,
           batch: int = 8, **params: Any) -> tuple[Context, Any, torch.Tensor, torch.Tensor]:
    """A model with heads a and b, HAT at task 1 (task 0's attention as given), before the
    fit."""
    torch.manual_seed(0)
    model = Model(graph)
    shape = graph.shape("x")
    x, y = torch.randn(n, *shape), torch.randint(0, 3, (n,))
    task = Task(1, "t1", (x, y), (x, y), (x, y), [0, 1, 2], 3, 0, tuple(shape))
    ctx = Context(model, task, [], lambda t: "b", lambda t, y: y, torch.device("cpu"), seed=3,
                  train_config=TrainConfig(batch_size=batch, lr=0.1, momentum=0.0))
    s = make_strategy("hat", params)
    if attention:
        for node, used in attention.items():
            s.state[f"attention/0/{node}"] = torch.tensor(used, dtype=torch.bool)
        s.extra["tasks"] = [0]
    s.before_task(ctx)
    return ctx, s, x, y


def _two_heads(build: Any, *args: Any, **kwargs: Any) -> NetGraph:
    """`build(*args, **kwargs)` with heads a and b, its weights drawn from seed 0 (not from
    whatever random state earlier tests left)."""
    torch.manual_seed(0)
    return add_head(add_head(build(*args, **kwargs), "a", 3), "b", 3)


def test_gates_multiply_each_unit_by_the_annealed_sigmoid_of_its_embedding() -> None:
    ctx, s, x, _ = _setup(_two_heads(mlp, (6,), [5]))
    p = ctx.model.named_parameters()
    with torch.no_grad():  # two near 0: sigmoid(s_max e) is far from the step there
        s._emb["fc1"].copy_(torch.tensor([0.5, 0.001, -0.001, -1.0, 2.0]))
    e = s._emb["fc1"].detach()
    with s.training(ctx):
        s._s = 2.5
        out = ctx.model.head("b")(x)
    hidden = torch.relu(x @ p["fc1.weight"].T + p["fc1.bias"]) * torch.sigmoid(2.5 * e)
    expect = hidden @ p["head_b.weight"].T + p["head_b.bias"]  # by hand
    torch.testing.assert_close(out, expect)
    assert torch.equal(ctx.model.head("b")(x), torch.relu(x @ p["fc1.weight"].T + p["fc1.bias"])
                       @ p["head_b.weight"].T + p["head_b.bias"])  # no hook outside a fit
    with s.training(ctx):  # in eval mode (validation during a fit): the test-time step
        ctx.model.eval()
        binary = ctx.model.head("b")(x)
        ctx.model.train()
    hidden = torch.relu(x @ p["fc1.weight"].T + p["fc1.bias"]) * (e > 0)
    torch.testing.assert_close(binary, hidden @ p["head_b.weight"].T + p["head_b.bias"])


def test_the_slope_anneals_from_1_over_s_max_to_s_max_over_each_epochs_batches() -> None:
    ctx, s, _, _ = _setup(_two_heads(mlp, (6,), [5]), n=40, batch=10, s_max=50.0)
    seen: list[float] = []
    original = s.penalty

    def spy(*args: Any) -> Any:
        seen.append(s._s)
        return original(*args)

    s.penalty = spy
    ctx.train_fit = None
    from growth.train import fit

    fit(ctx, s, TrainConfig(epochs=2, batch_size=10, lr=0.1, momentum=0.0))
    by_hand = [1 / 50 + (50 - 1 / 50) * b / 3 for b in range(4)]
    assert seen == pytest.approx(by_hand * 2, rel=1e-12)
    assert seen[3] == 50.0


def test_a_fit_without_the_tasks_training_settings_is_refused_naming_them() -> None:
    """The slope's schedule counts an epoch's batches, so HAT needs the batch size."""
    ctx, s, _, _ = _setup(_two_heads(mlp, (6,), [5]))
    ctx.train_config = None
    with pytest.raises(ValueError, match="Context.train_config"), s.training(ctx):
        pass


def test_gradients_of_used_units_are_scaled_by_one_minus_the_mask_product() -> None:
    """conv1 (3 channels) -> relu -> pool -> flatten -> fc2 (4 units): task 0 used conv channels
    0 and 2 and fc units 1 and 3. fc2's weight from feature f (channel f // 4) to unit i trains
    by 1 - min(a_i, a_channel); biases by 1 - a_i; conv1 (reading the input) by 1 - a_i."""
    graph = _two_heads(small_cnn, (1, 4, 4), [3], fc=[4])
    ctx, s, x, y = _setup(graph, {"conv1": [1, 0, 1], "fc2": [0, 1, 0, 1]})
    p = ctx.model.named_parameters()
    with s.training(ctx):
        out = ctx.model.head("b")(x)
        torch.nn.functional.cross_entropy(out, y).backward()
        raw = {n: t.grad.clone() for n, t in p.items() if t.grad is not None}
        s.after_backward(ctx)
        post_fc = torch.tensor([0.0, 1, 0, 1])
        pre_fc = torch.tensor([1.0, 0, 1]).repeat_interleave(4)  # 2x2 map per channel
        factor = 1 - torch.minimum(post_fc.view(-1, 1), pre_fc.view(1, -1))
        torch.testing.assert_close(p["fc2.weight"].grad, raw["fc2.weight"] * factor)
        torch.testing.assert_close(p["fc2.bias"].grad, raw["fc2.bias"] * (1 - post_fc))
        post_conv = torch.tensor([1.0, 0, 1])
        torch.testing.assert_close(p["conv1.weight"].grad,
                                   raw["conv1.weight"] * (1 - post_conv).view(3, 1, 1, 1))
        torch.testing.assert_close(p["conv1.bias"].grad, raw["conv1.bias"] * (1 - post_conv))
        assert torch.equal(p["head_b.weight"].grad, raw["head_b.weight"])  # heads: untouched
        assert bool((raw["fc2.weight"] * factor != raw["fc2.weight"]).any())


def test_the_embedding_gradient_is_compensated_for_the_annealing() -> None:
    """d L / d e after compensation = d L / d a * s_max * sigmoid'(e): what the gradient through
    sigmoid(s e), times s_max (cosh(s e) + 1) / (s (cosh(e) + 1)), comes to."""
    ctx, s, x, y = _setup(_two_heads(mlp, (6,), [5]), s_max=400.0, c=0.0)
    p = ctx.model.named_parameters()
    with torch.no_grad():
        s._emb["fc1"].copy_(torch.tensor([0.5, -0.02, 0.1, -1.5, 0.03]))
    e = s._emb["fc1"].detach().clone()
    with s.training(ctx):
        s._s = 5.0  # |s e| small: float32 keeps sigmoid' accurate (it is amplified here)
        torch.nn.functional.cross_entropy(ctx.model.head("b")(x), y).backward()
        s.after_backward(ctx)
    a = torch.sigmoid(5.0 * e).requires_grad_()  # the same forward, written by hand
    hidden = torch.relu(x @ p["fc1.weight"].T + p["fc1.bias"]) * a
    loss = torch.nn.functional.cross_entropy(hidden @ p["head_b.weight"].T + p["head_b.bias"], y)
    (d_a,) = torch.autograd.grad(loss, a)
    sig = torch.sigmoid(e)
    torch.testing.assert_close(s._emb["fc1"].grad, d_a * 400.0 * sig * (1 - sig))


def test_embeddings_are_clamped_after_each_step() -> None:
    ctx, s, x, y = _setup(_two_heads(mlp, (6,), [5]), n=8, batch=8)
    with torch.no_grad():
        s._emb["fc1"].copy_(torch.tensor([20.0, -20.0, 0.3, -9.0, 6.5]))
    from growth.train import fit

    fit(ctx, s, TrainConfig(epochs=1, batch_size=8, lr=0.1, momentum=0.0))
    e = s._emb["fc1"].detach()
    assert e[[0, 4]].tolist() == [6.0, 6.0] and e[[1, 3]].tolist() == [-6.0, -6.0]
    assert -6 < float(e[2]) < 6


def test_the_sparsity_regulariser_on_attention_not_used_before() -> None:
    ctx, s, x, y = _setup(_two_heads(mlp, (6,), [5, 4]),
                          {"fc1": [1, 0, 0, 1, 0], "fc2": [0, 0, 1, 1]}, c=3.0)
    with s.training(ctx):
        s._s = 7.0
        reg = s.penalty(ctx, x, y, ctx.model.head("b")(x))
    a1, a2 = torch.sigmoid(7.0 * s._emb["fc1"]), torch.sigmoid(7.0 * s._emb["fc2"])
    num = a1[[1, 2, 4]].sum() + a2[[0, 1]].sum()  # units no earlier task used
    torch.testing.assert_close(reg, 3.0 * num / 5)
    ctx0, s0, x0, y0 = _setup(_two_heads(mlp, (6,), [5, 4]), c=1.0)  # task 0: every unit free
    with s0.training(ctx0):
        s0._s = 7.0
        reg0 = s0.penalty(ctx0, x0, y0, ctx0.model.head("b")(x0))
    expect = (torch.sigmoid(7.0 * s0._emb["fc1"]).sum() + torch.sigmoid(7.0 * s0._emb["fc2"])
              .sum()) / 9
    torch.testing.assert_close(reg0, expect)


@pytest.mark.parametrize("model", [MLP, {"kind": "cnn", "channels": [8, 8], "batchnorm": True}])
def test_earlier_tasks_outputs_are_bitwise_identical_after_later_tasks(model: Any,
                                                                       tmp_path: Path) -> None:
    rec = Recorder(config(HAT, model=model), tmp_path / "run")
    metrics = rec.run()
    _check_bitwise(rec, 3)
    assert metrics["bwt"] == 0.0
    if model is MLP:  # and it learned every task (the small CNN learns little in 4 epochs)
        assert min(metrics["R"][3]) > 0.4
    used = metrics["details"]["hat"]["units_used"]
    assert 0 < used["0"] <= used["1"] <= used["2"] <= 1  # cumulative attention only grows


def test_finished_tasks_store_attention_bits_and_evaluate_with_them(tmp_path: Path) -> None:
    rec = Recorder(config(HAT, model=MLP), tmp_path / "run")
    c, s = rec.campaign, rec.campaign.strategy
    trained: list[torch.Tensor] = []
    original = s.after_task

    def keep(ctx: Context) -> None:
        trained.append(s._emb["fc1"].detach().clone())
        original(ctx)

    s.after_task = keep
    metrics = rec.run()
    att = s.state["attention/1/fc1"]
    assert torch.equal(att, trained[1] > 0)  # the step sigmoid(s_max e) tends to
    assert att.dtype == torch.bool and att.shape == (64,) and 0 < int(att.sum()) < 64
    task = c.tasks[1]
    p = c.model.named_parameters()
    x = task.test[0].flatten(1)
    hidden = torch.relu(x @ p["fc1.weight"].T + p["fc1.bias"]) * att
    expect = hidden @ p["head_t1.weight"].T + p["head_t1.bias"]  # by hand: MLP 64-64, relu
    torch.testing.assert_close(rec.outputs[(2, 1)], expect)
    sizes = metrics["sizes"]
    assert [size["masks_bytes"] for size in sizes] == [8 * (k + 1) for k in range(3)]  # 64 bits
    assert all(size["relative"] == 1.0 for size in sizes)


def test_resume_gives_the_same_r_matrix(tmp_path: Path) -> None:
    full, resumed = resumed_after_first_task(config(HAT, model=MLP), tmp_path)
    assert resumed == full


def test_settings_and_networks_it_cannot_gate_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="s_max"):
        validate_config(config({"name": "hat", "s_max": 1.0}))
    assert make_strategy("hat", {}).params.c == 0.75
    g = NetGraph()
    g.add_input("x", (4,))
    g.add("fc1", "linear", ["x"], out_features=4)
    g.add("fc2", "linear", ["x"], out_features=4)
    g.add("sum", "add", ["fc1", "fc2"])
    g.add("fc3", "linear", ["sum"], out_features=4)
    with pytest.raises(GraphError, match="'fc3' reads 'sum'"):
        _setup(_two_heads(_as_features, g, "fc3"))


def _as_features(g: NetGraph, node: str) -> NetGraph:
    g.add("features", "identity", [node])
    return g


def test_checkpointed_attention_is_checked_against_the_graph() -> None:
    s = make_strategy("hat", {})
    graph = {"fc1.weight": torch.zeros(24, 64)}
    ok = {"attention/0/fc1": torch.zeros(24, dtype=torch.bool)}
    assert s.check_state(ok, {"tasks": [0]}, graph, 1) == []
    assert any("24 units" in p for p in s.check_state(
        {"attention/0/fc1": torch.zeros(5, dtype=torch.bool)}, {"tasks": [0]}, graph, 1))
    assert any("not a linear or conv" in p for p in s.check_state(
        {**ok, "attention/0/nope": torch.zeros(5, dtype=torch.bool)}, {"tasks": [0]}, graph, 1))
    assert any("tasks" in p for p in s.check_state(ok, {"tasks": []}, graph, 1))
