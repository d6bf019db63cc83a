"""Piggyback: the straight-through mask against a hand computation, a fixed backbone, earlier
tasks' outputs bitwise identical through real campaigns (an imported torchvision network
included), masks stored as bits, resume gives the same R matrix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from growth.search_spaces.networks import add_head, mlp
from maskruns import resumed_after_first_task
from test_masks import Recorder, _check_bitwise, config

from growth.config import validate_config
from growth.data.containers import Task
from growth.errors import ConfigError
from growth.model import Model
from growth.strategies import Context, make_strategy

PIGGYBACK = {"name": "piggyback", "score_lr": 1e-3}  # masks move within 36 steps


def test_the_forward_pass_uses_the_thresholded_mask_and_scores_get_the_masked_gradient() -> None:
    """Inside a fit the trunk weights are W * [score > threshold]; after backward a score's
    gradient is the masked weight's gradient times W, W gets none; W comes back exactly."""
    torch.manual_seed(0)
    model = Model(add_head(add_head(mlp((6,), [5]), "a", 3), "b", 3))
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    task = Task(1, "t1", (x, y), (x, y), (x, y), [0, 1, 2], 3, 0, (6,))
    ctx = Context(model, task, [], lambda t: "b", lambda t, y: y, torch.device("cpu"))
    s = make_strategy("piggyback", {"threshold": 0.004, "score_init": 0.01})
    s.extra["tasks"] = [0]  # the backbone is fixed after task 0
    s.before_task(ctx)
    with torch.no_grad():
        s._scores["fc1.weight"][0] = 0.003  # row 0: below the threshold
        s._scores["fc1.weight"][1, 2] = -1.0
    w = model.module.fc1.weight
    true = w.detach().clone()
    mask = torch.ones(5, 6)
    mask[0], mask[1, 2] = 0, 0
    with s.training(ctx):
        assert torch.equal(w.detach(), true * mask)
        eff = (true * mask).requires_grad_(True)
        out = torch.func.functional_call(model.head("b"), {"fc1.weight": eff}, (x,))
        torch.nn.functional.cross_entropy(out, y).backward()
        torch.nn.functional.cross_entropy(model.head("b")(x), y).backward()
        s.after_backward(ctx)
        torch.testing.assert_close(s._scores["fc1.weight"].grad, eff.grad * true)
        assert w.grad is None and model.module.head_b.weight.grad is not None
        assert not model.module.fc1.bias.requires_grad  # shared tensors frozen after task 0
        with torch.no_grad():
            w.add_(1.0)  # whatever a step does to the parameter
    assert torch.equal(w.detach(), true)


def test_a_step_moves_the_scores_with_adam_and_rewrites_the_masked_weights() -> None:
    torch.manual_seed(0)
    model = Model(add_head(add_head(mlp((6,), [5]), "a", 3), "b", 3))
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    task = Task(1, "t1", (x, y), (x, y), (x, y), [0, 1, 2], 3, 0, (6,))
    ctx = Context(model, task, [], lambda t: "b", lambda t, y: y, torch.device("cpu"))
    s = make_strategy("piggyback", {"score_lr": 0.006, "score_init": 0.01,
                                    "backbone": "fixed"})
    s.before_task(ctx)
    w = model.module.fc1.weight
    true = w.detach().clone()
    with s.training(ctx):
        torch.nn.functional.cross_entropy(model.head("b")(x), y).backward()
        s.after_backward(ctx)
        g = s._scores["fc1.weight"].grad.clone()
        s.after_step(ctx)
        # Adam's first step moves every score by lr * sign(gradient) (up to eps)
        moved = 0.01 - 0.006 * torch.sign(g)
        torch.testing.assert_close(s._scores["fc1.weight"].detach(), moved)
        assert torch.equal(w.detach(), true * (moved > 0.005))
        assert bool((moved <= 0.005).any())


def test_the_backbone_never_changes_after_the_first_task(tmp_path: Path) -> None:
    rec = Recorder(config(PIGGYBACK), tmp_path / "run")
    metrics = rec.run()
    _check_bitwise(rec, 3)
    assert metrics["bwt"] == 0.0
    assert min(metrics["R"][3]) > 0.4  # masks of a backbone trained on another permutation
    first = rec.weights[0]
    for later in rec.weights[1:]:
        for n in ("fc1.weight", "fc1.bias", "head_t0.weight"):
            assert torch.equal(later[n], first[n]), n
    assert not torch.equal(rec.weights[2]["head_t2.weight"], first["head_t2.weight"])
    s = rec.campaign.strategy
    assert bool(s.state["mask/0/fc1.weight"].all())  # task 0 trained the backbone itself
    assert not bool(s.state["mask/1/fc1.weight"].all())


def test_a_task_is_scored_with_the_backbone_times_its_mask(tmp_path: Path) -> None:
    rec = Recorder(config({**PIGGYBACK, "backbone": "fixed"}), tmp_path / "run")
    c, s = rec.campaign, rec.campaign.strategy
    last: dict[int, torch.Tensor] = {}  # the weights the last step of each task trained with
    original = s.after_step

    def spy(ctx: Context) -> None:
        original(ctx)
        last[ctx.task.index] = ctx.model.module.fc1.weight.detach().clone()

    s.after_step = spy
    metrics = rec.run()
    mask = s.state["mask/1/fc1.weight"]
    assert mask.dtype == torch.bool and 0 < int(mask.sum()) < mask.numel()
    w = c.model.module.fc1.weight.detach()
    assert torch.equal(w * mask, last[1])  # the task keeps the mask it trained with
    p = c.model.named_parameters()
    x = c.tasks[1].test[0].flatten(1)
    hidden = torch.relu(x @ (p["fc1.weight"] * mask).T + p["fc1.bias"])
    expect = hidden @ p["head_t1.weight"].T + p["head_t1.bias"]  # by hand: MLP 64-24, relu
    torch.testing.assert_close(rec.outputs[(2, 1)], expect)
    weights = 64 * 24
    assert [size["masks_bytes"] for size in metrics["sizes"]] == \
        [-(-weights // 8) * (k + 1) for k in range(3)]  # one bit per weight and task
    assert all(size["relative"] == 1.0 for size in metrics["sizes"])


@pytest.mark.parametrize("shared", ["frozen", "per_task"])
def test_a_cnn_with_batchnorm_keeps_earlier_outputs(shared: str, tmp_path: Path) -> None:
    cnn = {"kind": "cnn", "channels": [4, 6], "batchnorm": True}
    rec = Recorder(config({**PIGGYBACK, "shared": shared}, model=cnn), tmp_path / "run")
    metrics = rec.run()
    _check_bitwise(rec, 3)
    if shared == "per_task":
        assert metrics["sizes"][-1]["per_task_bytes"] > 0


@pytest.mark.slow
def test_an_imported_torchvision_resnet18_is_the_fixed_backbone(tmp_path: Path) -> None:
    pytest.importorskip("torchvision")
    cfg = config({**PIGGYBACK, "backbone": "fixed"},
                 model={"kind": "torchvision", "arch": "resnet18"},
                 data__n_tasks=2, data__max_train_per_task=64, train__epochs=1)
    rec = Recorder(cfg, tmp_path / "run")
    metrics = rec.run()
    _check_bitwise(rec, 2)
    trunk = [n for n in rec.weights[0] if n.startswith("layer") and n.endswith("conv1.weight")]
    assert trunk and all(torch.equal(rec.weights[1][n], rec.weights[0][n]) for n in trunk)
    convs = [n for n, t in rec.weights[0].items() if t.dim() == 4]
    masks = rec.campaign.strategy.state
    assert len(convs) == 20 and all(f"mask/1/{n}" in masks for n in convs)  # every conv masked
    assert metrics["sizes"][-1]["masks_bytes"] > 0


def test_resume_gives_the_same_r_matrix(tmp_path: Path) -> None:
    full, resumed = resumed_after_first_task(config(PIGGYBACK), tmp_path)
    assert resumed == full


def test_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="threshold"):
        validate_config(config({"name": "piggyback", "threshold": 0.02}))
    with pytest.raises(ConfigError, match="backbone"):
        validate_config(config({"name": "piggyback", "backbone": "pretrained"}))
    with pytest.raises(ConfigError, match="scenario"):
        from growth.campaign import Campaign

        Campaign(validate_config({**config(PIGGYBACK), "scenario": "class",
                                  "data": {"dataset": "digits", "stream": "split",
                                           "n_tasks": 2}}), "unused")
    p: Any = make_strategy("piggyback", {}).params
    assert (p.score_init, p.threshold, p.score_lr) == (1e-2, 5e-3, 1e-4)
