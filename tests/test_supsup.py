"""SupSup: the exact top-k (radix select and the band search around the last threshold), the
straight-through supermask against a hand computation, the fixed signed-constant weights, the
one-shot task inference against an independent gradient and on a constructed case, earlier
tasks' outputs bitwise identical, the class scenario with the task inferred, resume."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from growth.search_spaces.networks import add_head, mlp
from maskruns import resumed_after_first_task
from test_masks import Recorder, _check_bitwise, config

from growth.campaign import Campaign
from growth.config import validate_config
from growth.data.containers import Task
from growth.errors import ConfigError
from growth.graph import NetGraph
from growth.masks import TopK, kth_largest
from growth.model import Model
from growth.strategies import Context, make_strategy
from growth.strategies.supsup import infer_task

SUPSUP = {"name": "supsup"}
MLP = {"kind": "mlp", "hidden": [64]}  # supermasks of a 24-unit random layer learn little
CLASS = {"scenario": "class", "model": {"kind": "mlp", "hidden": [64]},
         "data": {"dataset": "digits", "stream": "split", "n_tasks": 2, "max_train_per_task": 200}}


def _by_sorting(values: torch.Tensor, k: int) -> float:
    return float(values.flatten().sort(descending=True).values[k - 1])


@pytest.mark.parametrize("n", [7, 4096, 5000, 100_000])
def test_kth_largest_is_exact(n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    for values in (torch.rand(n, generator=gen), torch.randn(n, generator=gen).abs() * 1e-3,
                   torch.randint(0, 4, (n,), generator=gen).float()):  # ties, zeros
        for k in (1, 2, n // 3 + 1, n // 2, n - 1, n):
            assert kth_largest(values, k) == _by_sorting(values, k), (n, k)
    with pytest.raises(ValueError, match="k must lie"):
        kth_largest(torch.rand(5), 6)


def test_top_k_stays_exact_as_scores_move_a_little_or_a_lot() -> None:
    """Small steps (the band around the last threshold holds the new one), large ones (it does
    not: the radix select), and a step that moves nothing."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(300, 200, generator=gen)
    top = TopK(scores, 0.3)
    assert top.k == 60000 - int(0.7 * 60000)
    out = torch.empty_like(scores)
    radix = []
    import growth.masks as masks

    def counting(*args: Any) -> float:
        radix.append(1)
        return kth_largest(*args)

    masks.kth_largest = counting  # type: ignore[assignment]
    try:
        _steps(top, scores, out, radix)
    finally:
        masks.kth_largest = kth_largest  # type: ignore[assignment]


def test_top_k_of_a_tiny_fraction_keeps_the_single_largest() -> None:
    """10 scores at keep 0.1: k = 10 - floor(0.9 * 10) = 1, the one largest |score|, as 1.0 in
    the scores' dtype in the buffer given."""
    scores = torch.tensor([0.5, -3.0, 1.0, 2.0, -0.1, 0.0, 2.5, -1.5, 0.2, 1.2])
    top = TopK(scores, 0.1)
    out = torch.empty_like(scores)
    mask = top(scores, out)
    assert top.k == 1
    assert mask.dtype == torch.float32 and torch.equal(out, mask)  # written into `out`
    assert torch.equal(mask, (torch.arange(10) == 1).float())


def _steps(top: TopK, scores: torch.Tensor, out: torch.Tensor, radix: list[int]) -> None:
    gen = torch.Generator().manual_seed(1)
    calls = 0
    for step in range(12):
        scale = 1e-3 if step % 4 else 1.0
        if step != 5:
            scores = scores + scale * torch.randn(scores.shape, generator=gen)
        mask = top(scores, out)
        threshold = _by_sorting(scores.abs(), top.k)
        assert top.threshold == threshold
        assert torch.equal(mask, (scores.abs() >= threshold).float())
        assert int(mask.sum()) == top.k  # continuous scores: no ties
        if step in (2, 3, 6, 7):  # after a small step the band held the new threshold
            assert len(radix) == calls
        calls = len(radix)


def _net(hidden: int = 5) -> NetGraph:
    return add_head(add_head(mlp((6,), [hidden]), "a", 3), "b", 3)


def _ctx(model: Model, head: str = "b") -> tuple[Context, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    task = Task(0, "t0", (x, y), (x, y), (x, y), [0, 1, 2], 3, 0, (6,))
    return Context(model, task, [], lambda t: head, lambda t, y: y, torch.device("cpu"),
                   seed=4), x, y


def test_weights_become_signed_constants_and_never_train() -> None:
    torch.manual_seed(0)
    model = Model(_net())
    ctx, x, y = _ctx(model)
    s = make_strategy("supsup", {})
    before = {n: p.detach().clone() for n, p in model.named_parameters().items()}
    s.before_task(ctx)
    p = model.named_parameters()
    for name, fan_in in (("fc1", 6), ("head_a", 5), ("head_b", 5)):
        expect = torch.sign(before[f"{name}.weight"]) * math.sqrt(2 / fan_in)
        assert torch.equal(p[f"{name}.weight"].detach(), expect)
        assert not bool(p[f"{name}.bias"].any())
    assert set(s._scores) == {"fc1.weight", "head_b.weight"}  # the trunk and its own head
    from growth.train import TrainConfig, fit

    fixed = {n: t.detach().clone() for n, t in p.items()}
    fit(ctx, s, TrainConfig(epochs=3, batch_size=4, lr=0.5))
    for n, t in model.named_parameters().items():
        assert torch.equal(t.detach(), fixed[n]), n


def test_the_forward_pass_uses_the_top_k_mask_and_scores_get_the_straight_through_gradient(
) -> None:
    """W * [|s| among the top half]; a score's gradient = masked weight's gradient * W *
    sign(s) (through |s|); no parameter keeps a gradient."""
    torch.manual_seed(0)
    model = Model(_net())
    ctx, x, y = _ctx(model)
    s = make_strategy("supsup", {"keep": 0.5})
    s.before_task(ctx)
    w = model.module.fc1.weight
    true = w.detach().clone()
    score = s._scores["fc1.weight"].detach().clone()
    mask = (score.abs() >= score.abs().flatten().sort().values[15]).float()  # 15 of 30 off
    assert int(mask.sum()) == 15
    with s.training(ctx):
        assert torch.equal(w.detach(), true * mask)
        eff = (true * mask).requires_grad_(True)
        out = torch.func.functional_call(model.head("b"), {"fc1.weight": eff}, (x,))
        torch.nn.functional.cross_entropy(out, y).backward()
        torch.nn.functional.cross_entropy(model.head("b")(x), y).backward()
        s.after_backward(ctx)
        torch.testing.assert_close(s._scores["fc1.weight"].grad,
                                   eff.grad * true * torch.sign(score))
        assert all(p.grad is None for p in model.module.parameters())
        assert s._scores["head_b.weight"].grad is not None  # the head is masked too
    assert torch.equal(w.detach(), true)


W = torch.tensor([[3.0, -3.0, 2.0, -1.0], [-3.0, 3.0, -2.0, 1.0]])
MASKS = torch.tensor([[[1.0, 1, 0, 0], [1, 1, 0, 0]],   # task 0: inputs 0, 1
                      [[0.0, 0, 1, 1], [0, 0, 1, 1]]])  # task 1: inputs 2, 3
X = torch.tensor([[0.0, 0.0, 1.0, -1.0], [0.1, 0.0, 2.0, 0.0], [1.0, -1.0, 0.0, 0.0]])
B = torch.tensor([1.5, -1.5])  # a fixed bias: the point alpha = 1/k matters, not only its ray


def _linear_head() -> Model:
    g = NetGraph()
    g.add_input("x", (4,))
    g.add("head", "linear", ["x"], out_features=2)
    g.add_output("all", "head")
    model = Model(g)
    with torch.no_grad():
        model.module.head.weight.copy_(W)
        model.module.head.bias.copy_(B)
    return model


def _entropy_gradient(row: torch.Tensor) -> list[float]:
    """d H / d alpha_i at alpha = (1/2, 1/2) by central differences of a hand-written
    entropy, in float64."""
    def entropy(alpha: torch.Tensor) -> torch.Tensor:
        weight = W.double() * (alpha[0] * MASKS[0].double() + alpha[1] * MASKS[1].double())
        p = torch.softmax(row.double() @ weight.T + B.double(), -1)
        return -(p * p.log()).sum()

    half = torch.tensor([0.5, 0.5], dtype=torch.float64)
    return [float(entropy(half + 1e-6 * e) - entropy(half - 1e-6 * e)) / 2e-6
            for e in torch.eye(2, dtype=torch.float64)]


def test_one_shot_inference_follows_the_entropy_gradient_and_finds_the_task() -> None:
    """A linear head over 4 inputs, 2 classes; task i's mask keeps only the columns that read
    input pair i, so on inputs that light up pair 1, mask 1 sharpens the output and mask 0
    does nothing: the entropy falls fastest along alpha_1."""
    head = _linear_head().head("all")
    picked = infer_task(head, {"head.weight": W}, {"head.weight": MASKS}, X, per_example=True)
    assert picked.tolist() == [1, 1, 0]
    rows = torch.cat([X, torch.randn(20, 4, generator=torch.Generator().manual_seed(0))])
    picked = infer_task(head, {"head.weight": W}, {"head.weight": MASKS}, rows, True)
    for i, row in enumerate(rows):
        grad = _entropy_gradient(row)
        assert picked[i] == min(range(2), key=lambda j: grad[j])
    batch = X[[2, 0, 1]]  # its first row alone points to task 0, the sum to task 1
    summed = [sum(_entropy_gradient(r)[j] for r in batch) for j in range(2)]
    assert summed[1] < summed[0] and _entropy_gradient(batch[0])[0] < _entropy_gradient(
        batch[0])[1]
    assert infer_task(head, {"head.weight": W}, {"head.weight": MASKS}, batch,
                      per_example=False).tolist() == [1, 1, 1]


def test_an_inferred_input_is_scored_with_its_tasks_mask() -> None:
    model = _linear_head()
    s = make_strategy("supsup", {"infer_task": "example"})
    for k in (0, 1):
        s.state[f"mask/{k}/head.weight"] = MASKS[k].bool()
    s.extra["tasks"] = [0, 1]
    task = Task(1, "t1", (X, torch.zeros(3)), (X, torch.zeros(3)), (X, torch.zeros(3)),
                [0, 1], 2, 0, (4,))
    ctx = Context(model, task, [], lambda t: "all", lambda t, y: y, torch.device("cpu"))
    with s.evaluation(ctx, task) as score:
        out = score(X)
    expect = torch.stack([X[i] @ (W * MASKS[k]).T + B for i, k in enumerate([1, 1, 0])])
    torch.testing.assert_close(out, expect)
    assert s.extra["task_inference"] == {"1": 2 / 3}  # two of three inputs were task 1's
    assert torch.equal(model.module.head.weight.detach(), W)  # nothing swapped in for good


def test_earlier_tasks_outputs_are_bitwise_identical_after_later_tasks(tmp_path: Path) -> None:
    rec = Recorder(config(SUPSUP, model=MLP), tmp_path / "run")
    metrics = rec.run()
    _check_bitwise(rec, 3)
    assert metrics["bwt"] == 0.0
    assert min(metrics["R"][3]) > 0.5
    for later in rec.weights[1:]:  # the random weights never move
        assert all(torch.equal(later[n], rec.weights[0][n]) for n in later)
    s, c = rec.campaign.strategy, rec.campaign
    mask = s.state["mask/2/fc1.weight"]
    p = c.model.named_parameters()
    x = c.tasks[2].test[0].flatten(1)
    hidden = torch.relu(x @ (p["fc1.weight"] * mask).T + p["fc1.bias"])
    expect = hidden @ (p["head_t2.weight"] * s.state["mask/2/head_t2.weight"]).T \
        + p["head_t2.bias"]  # by hand
    torch.testing.assert_close(rec.outputs[(2, 2)], expect)
    assert int(mask.sum()) == mask.numel() // 2
    # one bit per weight a task masks: its trunk and its own head
    per_task = -(-64 * 64 // 8) + -(-64 * 10 // 8)
    assert [size["masks_bytes"] for size in metrics["sizes"]] == [per_task * (k + 1)
                                                                  for k in range(3)]


@pytest.mark.parametrize("mode", ["example", "batch"])
def test_class_scenario_infers_the_task_of_each_input(mode: str, tmp_path: Path) -> None:
    cfg = {**config({"name": "supsup", "infer_task": mode}), **CLASS}
    campaign = Campaign(validate_config(cfg), tmp_path / "run")
    seen: list[tuple[int, list[int]]] = []
    import growth.strategies.supsup as module

    original = module.infer_task

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = original(*args, **kwargs)
        seen.append((len(args[3]), out.tolist()))
        return out

    module.infer_task = spy
    try:
        metrics = campaign.start()
    finally:
        module.infer_task = original
    assert seen and all(n == len(picks) for n, picks in seen)
    if mode == "batch":
        assert all(len(set(picks)) == 1 for _, picks in seen)
    rates = metrics["details"]["supsup"]["task_inference"]
    assert set(rates) == {"0", "1"} and all(0 <= r <= 1 for r in rates.values())
    assert metrics["R"][1][0] > 0.4  # one task learned: inference can only pick it


def test_resume_gives_the_same_r_matrix(tmp_path: Path) -> None:
    full, resumed = resumed_after_first_task(config(SUPSUP, model=MLP), tmp_path)
    assert resumed == full


def test_resume_with_the_task_inferred_gives_the_same_r_matrix(tmp_path: Path) -> None:
    cfg = {**config({"name": "supsup", "infer_task": "example"}), **CLASS}
    full, resumed = resumed_after_first_task(cfg, tmp_path)
    assert resumed == full


def test_settings_and_scenarios_are_checked() -> None:
    with pytest.raises(ConfigError, match="keep"):
        validate_config(config({"name": "supsup", "keep": 0.0}))
    with pytest.raises(ConfigError, match="only in scenario task, not 'class'"):
        Campaign(validate_config({**config(SUPSUP), **CLASS}), "unused")
    with pytest.raises(ConfigError, match="only in scenario class or domain, not 'task'"):
        Campaign(validate_config(config({"name": "supsup", "infer_task": "batch"})), "unused")
    p: Any = make_strategy("supsup", {}).params
    assert (p.keep, p.weights, p.infer_task) == (0.5, "signed_constant", "never")
