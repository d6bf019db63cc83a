"""PackNet and CPG through real campaigns: earlier tasks' outputs stay bitwise identical, every
weight has one owner, pruned weights stay zero, resume after a kill gives the same R matrix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from runfiles import kill_after_first_checkpoint

from growth.campaign import Campaign, Progress
from growth.config import validate_config
from growth.errors import ConfigError
from growth.masks import prune_smallest
from growth.metrics import index_bits
from growth.strategies import Context, make_strategy

BASE: dict[str, Any] = {
    "seed": 1, "threads": 1,
    "data": {"dataset": "digits", "stream": "permuted", "n_tasks": 3, "max_train_per_task": 300},
    "model": {"kind": "mlp", "hidden": [24]},
    "train": {"epochs": 4, "batch_size": 32, "lr": 0.1, "momentum": 0.9, "weight_decay": 0.01},
}
CNN = {"kind": "cnn", "channels": [4, 6], "batchnorm": True}
STRATEGIES = {
    "packnet": {"name": "packnet", "retrain_epochs": 1},
    "packnet_per_task": {"name": "packnet", "retrain_epochs": 1, "shared": "per_task"},
    "cpg": {"name": "cpg", "prune_epochs": 1, "ratios": [0.5, 0.75]},
}


def config(strategy: dict[str, Any], **changes: Any) -> dict[str, Any]:
    cfg = json.loads(json.dumps(BASE))
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            cfg[section][name] = value
        else:
            cfg[section] = value
    cfg["strategy"] = dict(strategy)
    return cfg


class Recorder:
    """A campaign whose every task end records each finished task's test outputs (through the
    strategy's evaluation seam) and the strategy's owner state and weights."""

    def __init__(self, cfg: dict[str, Any], out: Path) -> None:
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        self.owners: list[dict[str, torch.Tensor]] = []
        self.weights: list[dict[str, torch.Tensor]] = []
        self.campaign = Campaign(validate_config(cfg), out, Progress(on_task_end=self.record))

    def record(self, i: int, _metrics: dict) -> None:
        c = self.campaign
        for task in c.tasks[:i + 1]:
            ctx = Context(c.model, task, [], c.head_of, c.label_of, c.device)
            c.model.eval()
            with torch.no_grad(), c.strategy.evaluation(ctx, task) as score:
                self.outputs[(i, task.index)] = score(task.test[0])
            c.model.train()
        self.owners.append({k.split("/", 2)[2]: v.clone() for k, v in c.strategy.state.items()
                            if k.startswith("owner/")})
        self.weights.append({n: p.detach().clone() for n, p in
                             c.model.named_parameters().items()})

    def run(self) -> dict:
        return self.campaign.start()


def _check_bitwise(rec: Recorder, tasks: int) -> None:
    for k in range(tasks):
        first = rec.outputs[(k, k)]
        for i in range(k + 1, tasks):
            assert torch.equal(rec.outputs[(i, k)], first), f"task {k} changed after task {i}"


@pytest.mark.parametrize("key", list(STRATEGIES))
def test_earlier_tasks_outputs_are_bitwise_identical_after_later_tasks(key: str,
                                                                       tmp_path: Path) -> None:
    rec = Recorder(config(STRATEGIES[key]), tmp_path / "run")
    metrics = rec.run()
    _check_bitwise(rec, 3)
    assert metrics["bwt"] == 0.0
    assert min(metrics["R"][3]) > 0.5  # and it learned every task


def test_finetune_outputs_do_change(tmp_path: Path) -> None:
    rec = Recorder(config({"name": "finetune"}), tmp_path / "run")
    rec.run()
    assert not torch.equal(rec.outputs[(2, 0)], rec.outputs[(0, 0)])


@pytest.mark.parametrize("key", ["packnet", "packnet_per_task", "cpg"])
def test_a_cnn_with_batchnorm_keeps_earlier_outputs(key: str, tmp_path: Path) -> None:
    rec = Recorder(config(STRATEGIES[key], model=CNN), tmp_path / "run")
    rec.run()
    _check_bitwise(rec, 3)


@pytest.mark.parametrize("key", ["packnet", "cpg", "cpg_growing"])
def test_one_owner_per_weight_owned_weights_fixed_and_free_weights_zero(key: str,
                                                                        tmp_path: Path) -> None:
    rec = Recorder(config(STRATEGIES[key.removesuffix("_growing")]), tmp_path / "run")
    if key.endswith("_growing"):  # task 1 misses its goal: the network grows during it
        rec.campaign.strategy._goal = lambda ctx: 1.01 if ctx.task.index == 1 else 0.0
    rec.run()
    for i in range(1, 3):
        for n, owner in rec.owners[i].items():
            before = rec.owners[i - 1][n]
            old = tuple(slice(0, d) for d in before.shape)  # net2wider appends new units
            kept = before > 0  # an owned weight keeps its owner and its exact value
            assert torch.equal(owner[old][kept], before[kept])
            assert torch.equal(rec.weights[i][n][old][kept], rec.weights[i - 1][n][kept])
            fresh = torch.ones_like(owner, dtype=torch.bool)
            fresh[old] = ~kept
            assert set(owner[fresh].unique().tolist()) <= {0, i + 1}  # new owners: this task
    for i, owners in enumerate(rec.owners):
        for n, owner in owners.items():  # pruned or never used: exactly zero, despite decay
            assert torch.all(rec.weights[i][n][owner == 0] == 0)
            # every task owns some weights (but the growing task kept all it had: it missed
            # its goal, so the last task learns through its picks and head alone)
            assert bool((owner == i + 1).any()) or (key == "cpg_growing" and i == 2)


def test_packnet_prunes_its_fraction_of_each_layer(tmp_path: Path) -> None:
    strategy = {"name": "packnet", "prune": [0.5, 0.75], "retrain_epochs": 1}
    rec = Recorder(config(strategy), tmp_path / "run")
    rec.run()
    for owner in rec.owners[0].values():
        assert int((owner == 1).sum()) == owner.numel() - round(0.5 * owner.numel())
    for n, owner in rec.owners[1].items():
        free = int((rec.owners[0][n] == 0).sum())
        assert int((owner == 2).sum()) == free - round(0.75 * free)


def test_prune_smallest_takes_the_smallest_candidates_by_magnitude() -> None:
    w = torch.tensor([[0.5, -0.1, 3.0], [-2.0, 0.2, 0.05]])
    cand = torch.tensor([[True, True, True], [False, True, True]])
    assert prune_smallest(w, cand, 0.4).tolist() == [[False, True, False], [False, False, True]]
    assert not prune_smallest(w, cand, 0.0).any()


def test_sizes_count_owner_indices_in_bits(tmp_path: Path) -> None:
    metrics = Recorder(config(STRATEGIES["packnet"]), tmp_path / "run").run()
    weights = 64 * 24  # the trunk's one masked weight matrix (digits: 8x8 inputs)
    for k, size in enumerate(metrics["sizes"]):
        assert size["masks_params"] == 0
        assert size["masks_bytes"] == -(-weights * index_bits(k + 2) // 8)
        assert size["relative"] == 1.0  # no parameter added
        assert size["relative_bytes"] > 1.0


def test_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="prune"):
        validate_config(config({"name": "packnet", "prune": 1.0}))
    with pytest.raises(ConfigError, match="shared"):
        validate_config(config({"name": "packnet", "shared": "sometimes"}))
    with pytest.raises(ConfigError, match="scenario"):
        Campaign(validate_config({**config({"name": "packnet"}), "scenario": "class",
                                  "data": {**BASE["data"], "stream": "split", "n_tasks": 2}}),
                 "unused")
    assert make_strategy("packnet", {}).params.prune == 0.75


@pytest.mark.slow
@pytest.mark.parametrize("key", ["packnet", "cpg"])
def test_resume_after_a_real_kill_gives_the_same_r_matrix(key: str, tmp_path: Path) -> None:
    import yaml

    cfg = config(STRATEGIES[key], data__n_tasks=4, data__max_train_per_task=400, train__epochs=3)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "killed"
    kill_after_first_checkpoint(path, out, last_task=3)
    from growth.cli import main

    assert main(["resume", str(out), "--quiet"]) == 0
    resumed = json.loads((out / "metrics.json").read_text())
    full = Campaign(validate_config(cfg), tmp_path / "full").start()
    assert resumed["R"] == full["R"]


@pytest.mark.parametrize("key", ["packnet", "cpg"])
@pytest.mark.parametrize("decay", [0.0, 0.01])
def test_no_step_moves_a_weight_the_task_does_not_own(key: str, decay: float,
                                                      tmp_path: Path) -> None:
    """Not only at the end of a fit: after every single step (the task trains against the
    exact weights earlier tasks own; CPG: times its current binarised picks), with momentum
    and with or without weight decay."""
    from growth.strategies.cpg import PICK_THRESHOLD

    cfg = config(STRATEGIES[key], data__n_tasks=2, train__weight_decay=decay)
    campaign = Campaign(validate_config(cfg), tmp_path / "run")
    s = campaign.strategy
    frozen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    steps = []
    original = s.after_step

    def spy(ctx: Context) -> None:
        original(ctx)
        params = ctx.model.named_parameters()
        if not frozen:  # first step of a fit: what the task may not touch, as it was
            for n, t in s._trainable.items():
                frozen[n] = (~t, s._guard.values[n])
        for n, (keep, values) in frozen.items():
            pick = getattr(s, "_picks", {}).get(n)
            if pick is not None:  # CPG: the old weights it picks, zero where it does not
                values = values * ((pick.detach() > PICK_THRESHOLD) & (values != 0))
            assert torch.equal(params[n].detach()[keep], values[keep]), n
        steps.append(1)

    original_training = s.training

    def training(ctx: Context):
        frozen.clear()
        return original_training(ctx)

    s.after_step, s.training = spy, training
    campaign.start()
    assert len(steps) > 20


@pytest.mark.slow
@pytest.mark.parametrize("key", ["packnet", "cpg"])
def test_an_imported_torchvision_resnet18_keeps_earlier_outputs(key: str, tmp_path: Path) -> None:
    pytest.importorskip("torchvision")
    cfg = config(STRATEGIES[key], model={"kind": "torchvision", "arch": "resnet18"},
                 data__n_tasks=2, data__max_train_per_task=64, train__epochs=1)
    rec = Recorder(cfg, tmp_path / "run")
    metrics = rec.run()
    _check_bitwise(rec, 2)
    assert metrics["sizes"][-1]["masks_bytes"] > 0


# ---- CPG -------------------------------------------------------------------------------------
def _cpg(tmp_path: Path, goal, **strategy: Any) -> tuple[Recorder, Any]:
    rec = Recorder(config({**STRATEGIES["cpg"], **strategy}), tmp_path / "run")
    rec.campaign.strategy._goal = goal
    return rec, rec.campaign.strategy


def test_cpg_never_grows_when_every_goal_is_met(tmp_path: Path) -> None:
    rec, s = _cpg(tmp_path, lambda ctx: 0.0)
    metrics = rec.run()
    assert s.extra["grown"] == {"0": 0, "1": 0, "2": 0}
    assert all(size["relative"] == 1.0 for size in metrics["sizes"])


def test_cpg_grows_while_the_goal_is_missed_and_stops_at_the_budget(tmp_path: Path) -> None:
    rec, s = _cpg(tmp_path, lambda ctx: 1.01 if ctx.task.index == 0 else 0.0)
    metrics = rec.run()
    # MLP 64-24 with three 10-way heads: 64*24+24 + 3*(24*10+10) = 2310 parameters. Each step
    # adds ceil(0.25 * 24) = 6 units: 30 units 2880 (1.25x), 36 units 3450 (1.49x), 42 units
    # 4020 (1.74x, past the 1.5x budget): task 0 grows twice, the others never.
    assert s.extra["grown"] == {"0": 2, "1": 0, "2": 0}
    assert [size["params"] for size in metrics["sizes"]] == [3450, 3450, 3450]
    assert max(size["relative"] for size in metrics["sizes"]) <= 1.5
    _check_bitwise(rec, 3)


def test_cpg_growth_keeps_every_function_and_frees_the_new_units(tmp_path: Path) -> None:
    rec, s = _cpg(tmp_path, lambda ctx: 1.01 if ctx.task.index == 1 else 0.0, max_grow=1)
    rec.run()
    assert s.extra["grown"] == {"0": 0, "1": 1, "2": 0}
    _check_bitwise(rec, 3)
    before, after = rec.owners[0]["fc1.weight"], rec.owners[1]["fc1.weight"]
    assert before.shape == (24, 64) and after.shape == (30, 64)
    assert not bool((after[24:] == 1).any())  # new units never belong to an earlier task


def test_cpg_keeps_the_largest_ratio_that_meets_the_goal(tmp_path: Path) -> None:
    checks = iter([1.0, 1.0, 0.0])  # task 0: no growth, stage 0.5 passes, stage 0.75 fails
    rec, s = _cpg(tmp_path, lambda ctx: 0.5)
    s._accuracy = lambda ctx: next(checks, 1.0)
    rec.run()
    assert s.extra["pruned"] == {"0": 0.5, "1": 0.75, "2": 0.75}
    owner = rec.owners[0]["fc1.weight"]
    assert int((owner == 1).sum()) == owner.numel() - round(0.5 * owner.numel())
    free = rec.owners[0]["fc1.weight"] == 0
    taken = int((rec.owners[1]["fc1.weight"] == 2).sum())
    assert taken == int(free.sum()) - round(0.75 * int(free.sum()))


def test_cpg_evaluates_a_task_with_its_own_and_picked_weights(tmp_path: Path) -> None:
    rec, s = _cpg(tmp_path, lambda ctx: 0.0)
    rec.run()
    c = rec.campaign
    owner = s.state["owner/all/fc1.weight"]
    pick = s.state["pick/2/fc1.weight"]
    assert pick.dtype == torch.bool and bool(pick.any())  # task 2 picked old weights
    assert not bool((pick & ((owner == 0) | (owner == 3))).any())  # only earlier tasks' ones
    task = c.tasks[2]
    x = task.test[0]
    w = c.model.named_parameters()["fc1.weight"].detach()
    b = c.model.named_parameters()["fc1.bias"].detach()
    head = c.model.named_parameters()["head_t2.weight"].detach()
    hb = c.model.named_parameters()["head_t2.bias"].detach()
    eff = w * ((owner == 3) | pick)
    expect = torch.relu(x.flatten(1) @ eff.T + b) @ head.T + hb  # by hand: MLP 64-24, relu
    torch.testing.assert_close(rec.outputs[(2, 2)], expect, rtol=1e-5, atol=1e-5)
    sizes = json.loads((tmp_path / "run" / "metrics.json").read_text())["sizes"]
    earlier = int(((owner > 0) & (owner <= 2)).sum())
    assert sizes[-1]["masks_bytes"] == (-(-owner.numel() * 2 // 8) + -(-earlier // 8)
                                        + -(-int((owner == 1).sum()) // 8))


def test_cpg_trains_through_its_effective_weights_with_straight_through_picks() -> None:
    """Inside a fit the masked weights are W * own + W_old * [pick > 5e-3]; a pick's gradient
    is the effective weight's gradient times the old weight; the values come back exactly."""
    from growth.graph import NetGraph
    from growth.model import Model
    from growth.strategies.cpg import PICK_THRESHOLD

    torch.manual_seed(0)
    g = NetGraph()
    g.add_input("x", (6,))
    g.add("fc1", "linear", ["x"], out_features=5)
    g.add("r1", "relu", ["fc1"])
    for h in ("a", "b"):
        g.add(f"head_{h}", "linear", ["r1"], out_features=3)
        g.add_output(h, f"head_{h}")
    model = Model(g)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    task = __import__("growth.data.containers", fromlist=["Task"]).Task(
        1, "t1", (x, y), (x, y), (x, y), [0, 1, 2], 3, 0, (6,))
    ctx = Context(model, task, [], lambda t: "b", lambda t, y: y, torch.device("cpu"))
    s = make_strategy("cpg", {})
    owned = torch.rand(5, 6, generator=torch.Generator().manual_seed(1)) < 0.5
    s.state["owner/all/fc1.weight"] = owned.to(torch.uint8)
    s.extra.update({"tasks": [0], "goals": {"1": 0.0}})
    s.before_task(ctx)
    with torch.no_grad():
        s._picks["fc1.weight"][0] = 0.001  # row 0: below the threshold, not picked
    w = model.module.fc1.weight
    true = w.detach().clone()
    picked = owned & (s._picks["fc1.weight"] > PICK_THRESHOLD)
    with s.training(ctx):
        assert torch.equal(w.detach(), torch.where(owned, true * picked, true))
        eff = w.detach().clone().requires_grad_(True)
        out = torch.func.functional_call(model.head("b"), {"fc1.weight": eff}, (x,))
        torch.nn.functional.cross_entropy(out, y).backward()
        torch.nn.functional.cross_entropy(model.head("b")(x), y).backward()
        s.after_backward(ctx)
        torch.testing.assert_close(s._picks["fc1.weight"].grad, eff.grad * true * owned)
        assert torch.equal(w.grad, eff.grad * ~owned)
        with torch.no_grad():
            w.add_(1.0)  # whatever a step does to the entries the task does not own
    assert torch.equal(w.detach()[owned], true[owned])


def test_cpg_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="ratios"):
        validate_config(config({"name": "cpg", "ratios": [0.75, 0.5]}))
    with pytest.raises(ConfigError, match="budget"):
        validate_config(config({"name": "cpg", "budget": 0.9}))
    assert make_strategy("cpg", {}).params.budget == 1.5


def test_cpg_old_tasks_are_scored_on_the_network_they_had_after_growth(tmp_path: Path) -> None:
    """Wide enough that zero-weight new units would change the floating-point sums of the
    layers reading them (a 512- against a 640-wide matrix product): old tasks are scored on
    the network cut back to their widths, so their outputs stay bitwise identical."""
    cfg = config({**STRATEGIES["cpg"], "ratios": [0.5], "max_grow": 1},
                 model={"kind": "mlp", "hidden": [512, 256]}, train__epochs=1)
    rec = Recorder(cfg, tmp_path / "run")
    s = rec.campaign.strategy
    s._goal = lambda ctx: 1.01 if ctx.task.index == 1 else 0.0
    rec.run()
    assert s.extra["grown"]["1"] == 1 and s.extra["widths"]["0"] == {"fc1": 512, "fc2": 256}
    _check_bitwise(rec, 3)


# ---- PackNet's retraining and CPG's goal, one task at a time on tiny networks ----------------
def _tiny(strategy: str, params: dict[str, Any]) -> tuple[Any, Any, Any, list]:
    from rivalkit import mlp_net, tasks_for

    from growth.model import Model

    graph = mlp_net(2)
    return make_strategy(strategy, params), Model(graph), graph, tasks_for(graph, 2)


def test_packnet_retrains_the_weights_it_kept_for_retrain_epochs_after_pruning() -> None:
    """After a task, the half of each layer's weights with the smallest magnitude is zeroed and
    the kept half trains again for `retrain_epochs`, the pruned ones held at zero: the same as
    pruning the trained weights by hand and training the rest with a plain fit whose gradients
    are zeroed at the pruned entries."""
    from rivalkit import ctx_for

    from growth.model import Model
    from growth.strategies.base import Strategy
    from growth.train import TrainConfig, fit

    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.05, momentum=0.9)
    s, model, _, tasks = _tiny("packnet", {"prune": 0.5, "retrain_epochs": 2})
    ctx = ctx_for(model, tasks, 0, s)
    calls: list[dict[str, Any]] = []

    def train_fit(**kw: Any) -> list[float]:
        calls.append(kw)
        return fit(ctx, s, cfg, **{"seed": 5, **kw})

    ctx.train_fit = train_fit
    s.before_task(ctx)
    fit(ctx, s, cfg, seed=4)
    trained = model.graph
    pruned: dict[str, torch.Tensor] = {}
    for name in ("fc1.weight", "fc2.weight"):  # the trunk's weight matrices
        node, key = name.split(".")
        w = trained.node(node).tensors[key]
        order = torch.sort(w.abs().flatten(), stable=True).indices
        cut = torch.zeros(w.numel(), dtype=torch.bool)
        cut[order[:w.numel() // 2]] = True
        pruned[name] = cut.view_as(w)
        trained.node(node).tensors[key] = w.masked_fill(pruned[name], 0.0)

    class HeldAtZero(Strategy):
        def after_backward(self, ctx: Context) -> None:
            params = ctx.model.named_parameters()
            for n, cut in pruned.items():
                params[n].grad[cut] = 0

    by_hand = Model(trained)
    fit(ctx_for(by_hand, tasks, 0), HeldAtZero(), cfg, seed=5, epochs=2)
    s.after_task(ctx)
    assert calls == [{"epochs": 2}]
    got, want = model.named_parameters(), by_hand.named_parameters()
    for n in want:
        assert torch.equal(got[n].detach(), want[n].detach()), n
    for n, cut in pruned.items():
        assert torch.equal(s.state[f"owner/all/{n}"], (~cut).to(torch.uint8))
        assert not torch.equal(got[n].detach()[~cut], trained.named_tensors()[n][~cut])


def test_cpg_goal_is_the_accuracy_alone_minus_the_margin() -> None:
    """The goal is the validation accuracy of a fresh copy of the network trained on the task
    alone, minus `margin`: two margins differ by exactly their difference, and the network's
    own weights do not enter it (all zero, they could not learn the task)."""
    from rivalkit import ctx_for, digit_net, digit_tasks

    from growth.model import Model
    from growth.train import TrainConfig

    cfg = TrainConfig(epochs=4, batch_size=16, lr=0.1, momentum=0.9)
    tasks = digit_tasks(2, per_task=200)
    goals = {}
    for margin, zeroed in ((0.0, False), (0.25, False), (0.0, True)):
        s, model = make_strategy("cpg", {"margin": margin}), Model(digit_net(2, (16,)))
        ctx = ctx_for(model, tasks, 1, s)
        ctx.train_config = cfg
        if zeroed:
            with torch.no_grad():
                for p in model.named_parameters().values():
                    p.zero_()
        s.before_task(ctx)
        goals[margin, zeroed] = s.goal(1)
    alone, n = goals[0.0, False], len(tasks[1].val[1])
    assert 0.5 < alone <= 1.0  # ten classes: a trained network, far above chance
    assert alone * n == pytest.approx(round(alone * n))  # an accuracy on the validation split
    assert goals[0.25, False] == pytest.approx(alone - 0.25, abs=1e-12)
    assert goals[0.0, True] == alone


# ---- scored masks (Piggyback, SupSup) ----------------------------------------------------------
@pytest.mark.parametrize("fused", [True, False])
def test_score_optimizers_step_as_sgd_with_momentum_or_adam(
        fused: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two steps on the gradient g = (0.5, -0.25) at lr 0.1. SGD with momentum 0.9: the second
    step moves by 1.9 lr g. Adam: each of the first steps moves by lr sign(g) (up to eps), also
    where torch has no fused Adam (an Adam that refuses fused=True stands for that torch)."""
    from growth.masks import score_optimizer

    if not fused:
        adam = torch.optim.Adam

        def unfused(*args, **kwargs):
            if kwargs.get("fused"):
                raise RuntimeError("fused Adam is not available here")
            return adam(*args, **kwargs)

        monkeypatch.setattr(torch.optim, "Adam", unfused)

    g = torch.tensor([0.5, -0.25])
    for kind, first, second in (("sgd", 0.1 * g, 0.19 * g),
                                ("adam", 0.1 * g.sign(), 0.1 * g.sign())):
        score = torch.tensor([1.0, -2.0], requires_grad=True)
        opt = score_optimizer([score], kind, 0.1)
        if kind == "adam":  # one fused pass over each tensor wherever torch has one
            assert bool(opt.defaults.get("fused")) is fused
        start = score.detach().clone()
        score.grad = g.clone()
        opt.step()
        after = score.detach().clone()
        assert torch.allclose(start - after, first, atol=1e-6), kind
        score.grad = g.clone()
        opt.step()
        assert torch.allclose(after - score.detach(), second, atol=1e-6), kind


def test_a_scores_gradient_is_the_weights_gradient_times_w_and_its_sign_only_by_magnitude(
        ) -> None:
    """Effective weight W * mask; a score's gradient is dL/d(effective) * W, times sign(score)
    only where the mask ranks |score| (SupSup), not where it thresholds the score (Piggyback)."""
    from growth.masks import ScoredMasks, score_optimizer

    w = torch.nn.Parameter(torch.tensor([2.0, -3.0, 4.0]))
    for magnitude in (False, True):
        score = torch.tensor([0.5, -0.5, 0.2], requires_grad=True)
        kwargs = {"magnitude": True} if magnitude else {}
        scored = ScoredMasks({"w": score}, lambda n, s, out: torch.gt(s, 0.0, out=out).float(),
                             score_optimizer([score], "sgd", 0.1), **kwargs)
        with scored.applied({"w": w}):
            assert torch.equal(w.detach(), torch.tensor([2.0, 0.0, 4.0]))
            (w * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
            scored.move_grads()
            assert w.grad is None
            want = torch.tensor([1.0 * 2, 2.0 * -3, 3.0 * 4])
            if magnitude:
                want = want * torch.tensor([1.0, -1.0, 1.0])
            assert torch.equal(score.grad, want)
        assert torch.equal(w.detach(), torch.tensor([2.0, -3.0, 4.0]))


def test_shared_tensors_of_a_transformer_include_its_attentions_biases() -> None:
    """ViT's attention nodes hold their parameters one module down (block1_attn.qkv.bias):
    every one-dimensional trunk parameter is shared, nested or not."""
    from growth.search_spaces.networks import add_head, vit

    from growth.masks import masked_names, shared_names
    from growth.model import Model

    model = Model(add_head(add_head(vit((1, 8, 8)), "a", 3), "b", 3))
    params = model.named_parameters()
    trunk = model.trunk_parameter_names()
    assert sorted(shared_names(model)) == sorted(n for n in trunk if params[n].dim() < 2)
    assert "block1_attn.qkv.bias" in shared_names(model)
    assert sorted(masked_names(model)) == sorted(n for n in trunk if params[n].dim() >= 2)


def test_the_single_smallest_candidate_and_k_zero() -> None:
    from growth.masks import smallest

    w = torch.tensor([[0.5, -0.1, 3.0], [-2.0, 0.2, 0.05]])
    cand = torch.tensor([[True, True, True], [False, True, True]])
    assert smallest(w, cand, 1).tolist() == [[False, False, False], [False, False, True]]
    assert smallest(w, cand, 2).tolist() == [[False, True, False], [False, False, True]]
    assert not smallest(w, cand, 0).any()
    # ties go to the earlier entries, also where a sort would reorder equal keys (large inputs)
    many = torch.tensor([1.0, 0, 1, 0, 0, 1, 0] * 5000)
    picked = smallest(many, torch.ones_like(many, dtype=torch.bool), 50)
    assert picked.nonzero().flatten().tolist() == (many == 0).nonzero().flatten()[:50].tolist()


def test_only_an_optimizer_with_weight_decay_decays() -> None:
    from growth.masks import decays

    p = [torch.nn.Parameter(torch.zeros(2))]
    assert not decays(None)
    assert not decays(torch.optim.SGD(p, lr=0.1))
    assert decays(torch.optim.SGD(p, lr=0.1, weight_decay=1e-4))
    assert decays(torch.optim.AdamW(p, lr=0.1))  # AdamW decays by default (0.01)


def test_owner_indices_take_the_smallest_integer_type_that_holds_them() -> None:
    from growth.masks import owner_dtype

    assert owner_dtype(1) == owner_dtype(200) == torch.uint8
    assert owner_dtype(300) == owner_dtype(30000) == torch.int16
    assert owner_dtype(40000) == torch.int32
    # at the edges: uint8 holds 0..255 and int16 0..32767 (the types' own limits)
    assert torch.iinfo(torch.uint8).max == 255 and torch.iinfo(torch.int16).max == 32767
    assert (owner_dtype(255), owner_dtype(256)) == (torch.uint8, torch.int16)
    assert (owner_dtype(32767), owner_dtype(32768)) == (torch.int16, torch.int32)


def test_batchnorms_are_the_trunks_only() -> None:
    """A BatchNorm in one head's branch is that head's, not the trunk's: not frozen with it."""
    from growth.search_spaces.networks import add_head, mlp

    from growth.masks import batchnorms
    from growth.model import Model

    g = add_head(mlp((4,), [6], batchnorm=True), "a", 3)
    g.add("head_bn", "batchnorm1d", ["features"])
    g.add("head_b", "linear", ["head_bn"], out_features=3)
    g.add_output("b", "head_b")
    model = Model(g)
    norms = batchnorms(model)
    assert len(norms) == 1 and norms[0] is model.module.get_submodule("bn1")


def test_packnet_checks_its_saved_task_list_and_owner_tensors() -> None:
    """A saved state fits after `finished` tasks when its task list is exactly 0..finished-1
    (none saved before any task) and its owner tensors fit the graph's."""
    from rivalkit import cnn_net, ctx_for, tasks_for

    from growth.model import Model

    s, model, graph, tasks = _tiny("packnet", {})
    s.before_task(ctx_for(model, tasks, 0, s))
    owners, weights = dict(s.state), graph.named_tensors()
    assert sorted(owners) == ["owner/all/fc1.weight", "owner/all/fc2.weight"]
    assert s.check_state(owners, {}, weights, 0) == []
    assert s.check_state(owners, {"tasks": [0, 1]}, weights, 2) == []
    assert s.check_state(owners, {"tasks": [0]}, weights, 2) == [
        "extra 'tasks' is [0], expected the 2 finished tasks [0, 1]"]
    assert s.check_state(owners, {}, weights, 1) == [
        "extra 'tasks' is None, expected the 1 finished tasks [0]"]
    bad = {**owners, "owner/all/fc1.weight": torch.zeros(2, 2, dtype=torch.uint8)}
    (problem,) = s.check_state(bad, {"tasks": [0]}, weights, 1)
    assert "owner/all/fc1.weight" in problem and "(2, 2)" in problem, problem
    graph = cnn_net(2)  # BatchNorm: its per-task copies hold an integer counter
    per_task, model = make_strategy("packnet", {"shared": "per_task"}), Model(graph)
    ctx = ctx_for(model, tasks_for(graph, 2), 0, per_task)
    per_task.before_task(ctx)
    per_task.store_shared(ctx, 0)  # task 0's biases and BatchNorm: the second task's missing
    weights = graph.named_tensors()
    assert per_task.state["shared/0/bn1.num_batches_tracked"].dtype == torch.int64
    assert per_task.check_state(per_task.state, {"tasks": [0]}, weights, 1) == []
    (problem,) = per_task.check_state(per_task.state, {"tasks": [0, 1]}, weights, 2)
    assert problem.startswith("no 'shared' tensors for slot(s) 1:"), problem
    bad = {**per_task.state, "shared/0/conv1.bias": torch.zeros(2)}
    (problem,) = per_task.check_state(bad, {"tasks": [0]}, weights, 1)
    assert "shared/0/conv1.bias" in problem and "(2,)" in problem, problem


def test_packnet_sizes_count_per_task_copies_of_floating_tensors_only() -> None:
    """per_task mode adds a "per_task" part: the stored biases and BatchNorm parameters and
    statistics (integer batch counters not counted); "frozen" mode has no such part."""
    from rivalkit import cnn_net, ctx_for, tasks_for

    from growth.model import Model

    graph = cnn_net(2)
    tasks = tasks_for(graph, 2)
    frozen = make_strategy("packnet", {})
    model = Model(graph)
    frozen.before_task(ctx_for(model, tasks, 0, frozen))
    assert sorted(frozen.size_parts(model)) == ["extra", "heads", "masks", "trunk"]
    per_task = make_strategy("packnet", {"shared": "per_task"})
    ctx = ctx_for(model, tasks, 0, per_task)
    per_task.before_task(ctx)
    per_task.store_shared(ctx, 0)
    parts = per_task.size_parts(model)
    assert sorted(parts) == ["extra", "heads", "masks", "per_task", "trunk"]
    want = [f"shared/0/{n}" for n in (
        "conv1.bias", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
        "conv2.bias", "bn2.weight", "bn2.bias", "bn2.running_mean", "bn2.running_var",
        "fc3.bias")]
    assert [id(t) for t in parts["per_task"]] == [id(per_task.state[k]) for k in want]


def test_cpg_grows_every_trunk_layer_by_its_base_width_and_records_the_task() -> None:
    """Goal 1.01 (never met), one growth step: each of three trunk layers grows by
    ceil(0.25 x its base width) (6, 5, 4 -> 8, 7, 5), the task records one growth, the grown
    network's size by hand (4*8+8 + 8*7+7 + 7*5+5 + 2*(5*3+3) = 179, the budget exactly:
    179/119 of the base's 4*6+6 + 6*5+5 + 5*4+4 + 2*(4*3+3) = 119), no pruning kept (the
    goal is missed at 0.5 too) and the widths it ends with."""
    from rivalkit import ctx_for, tasks_for, with_heads

    from growth.graph import NetGraph
    from growth.model import Model
    from growth.train import TrainConfig, fit

    torch.manual_seed(0)
    g = NetGraph()
    g.add_input("x", (4,))
    for i, (w, src) in enumerate(((6, "x"), (5, "r1"), (4, "r2")), 1):
        g.add(f"fc{i}", "linear", [src], out_features=w)
        g.add(f"r{i}", "relu", [f"fc{i}"])
    g.add("features", "identity", ["r3"])
    graph = with_heads(g, 2)
    model = Model(graph)
    s = make_strategy("cpg", {"grow": 0.25, "noise": 0.0, "budget": 179 / 119, "max_grow": 1,
                              "ratios": [0.5], "prune_epochs": 1})
    s.extra["goals"] = {"0": 1.01}
    ctx = ctx_for(model, tasks_for(graph, 2, n=16), 0, s)
    cfg = TrainConfig(epochs=1, batch_size=8, lr=0.05)
    ctx.train_fit = lambda **kw: fit(ctx, s, cfg, **{"seed": 1, **kw})
    s.before_task(ctx)
    s.after_task(ctx)
    assert {n: model.graph.shape(n)[0] for n in ("fc1", "fc2", "fc3")} == {
        "fc1": 8, "fc2": 7, "fc3": 5}
    assert s.extra["grown"] == {"0": 1} and s.extra["size"] == {"0": 179}
    assert s.extra["pruned"] == {"0": 0.0}
    assert s.extra["widths"] == {"0": {"fc1": 8, "fc2": 7, "fc3": 5}}


def test_cpg_prunes_by_the_cubic_schedule_one_epoch_at_a_time() -> None:
    """Stage 0.5 over two epochs from nothing pruned: s = 0.5 + (0 - 0.5)(1 - e/2)^3 gives
    0.4375 after the first epoch and 0.5 after the second, of each layer's own weights (fc1:
    96 -> 42 then 48 released; fc2: 30 -> 13 then 15), one epoch per step, released weights
    zero; the goal met, the stage is kept."""
    from rivalkit import ctx_for

    from growth.train import TrainConfig, fit

    s, model, _, tasks = _tiny("cpg", {"ratios": [0.5], "prune_epochs": 2})
    s.extra["goals"] = {"0": 0.0}
    ctx = ctx_for(model, tasks, 0, s)
    cfg = TrainConfig(epochs=1, batch_size=8, lr=0.05)
    calls: list[tuple[dict[str, Any], dict[str, int]]] = []

    def train_fit(**kw: Any) -> list[float]:
        calls.append((kw, {n: int(own.sum()) for n, own in s._trainable.items()}))
        params = model.named_parameters()
        assert all(bool((params[n][~own] == 0).all()) for n, own in s._trainable.items())
        return fit(ctx, s, cfg, **{"seed": 1, **kw})

    ctx.train_fit = train_fit
    s.before_task(ctx)
    assert s._compact(ctx) == 0.5
    assert calls == [({"epochs": 1}, {"fc1.weight": 54, "fc2.weight": 17}),
                     ({"epochs": 1}, {"fc1.weight": 48, "fc2.weight": 15})]


def test_cpg_evaluates_the_task_in_training_with_its_live_picks() -> None:
    """Before task 1 starts it is scored with every weight owned so far; while it trains, with
    the free weights plus the old ones whose pick is above 5e-3 (row 0's picks set below it,
    row 1's at it: their old weights read as zero)."""
    from rivalkit import ctx_for

    from growth.strategies.cpg import PICK_THRESHOLD

    s, model, _, tasks = _tiny("cpg", {})
    owned = torch.rand(6, 16, generator=torch.Generator().manual_seed(1)) < 0.5
    s.state["owner/all/fc1.weight"] = owned.to(torch.uint8)
    s.state["owner/all/fc2.weight"] = torch.zeros(5, 6, dtype=torch.uint8)
    s.extra.update({"tasks": [0], "goals": {"1": 0.0}})
    w = model.named_parameters()["fc1.weight"].detach()
    # before it starts, a task not learned yet sees every weight owned so far; a finished
    # task without stored picks, its own weights alone
    assert torch.equal(s.task_weights(ctx_for(model, tasks, 1, s), tasks[1])["fc1.weight"],
                       w * owned)
    assert torch.equal(s.task_weights(ctx_for(model, tasks, 1, s), tasks[0])["fc1.weight"],
                       w * owned)
    ctx = ctx_for(model, tasks, 1, s)
    s.before_task(ctx)
    with torch.no_grad():
        s._picks["fc1.weight"][0] = 0.001
        s._picks["fc1.weight"][1] = PICK_THRESHOLD
    kept = ~owned
    kept[2:] = True  # free everywhere, old weights picked but in rows 0 and 1
    assert torch.equal(s.task_weights(ctx, tasks[1])["fc1.weight"], w * kept)


def test_cpg_checks_its_stored_picks_as_boolean_tensors_per_finished_task() -> None:
    from rivalkit import ctx_for

    s, model, graph, tasks = _tiny("cpg", {})
    s.extra["goals"] = {"0": 0.0}
    s.before_task(ctx_for(model, tasks, 0, s))
    weights = graph.named_tensors()
    state = {**s.state, "pick/0/fc1.weight": torch.zeros(6, 16, dtype=torch.bool)}
    assert s.check_state(state, {"tasks": [0]}, weights, 1) == []
    state["pick/0/fc1.weight"] = torch.zeros(6, 16, dtype=torch.uint8)
    (problem,) = s.check_state(state, {"tasks": [0]}, weights, 1)
    assert "pick/0/fc1.weight" in problem and "bool" in problem, problem


def test_cpg_scores_a_task_without_a_validation_split_on_its_training_split() -> None:
    """No validation samples: the goal and the accuracy checks use the training split (an
    accuracy over its 24 samples, not NaN), the accuracy as counted by hand."""
    import dataclasses

    from rivalkit import ctx_for

    from growth.train import TrainConfig

    s, model, _, tasks = _tiny("cpg", {"margin": 0.0})
    x, y = tasks[0].train
    tasks[0] = dataclasses.replace(tasks[0], val=(x[:0], y[:0]))
    ctx = ctx_for(model, tasks, 0, s)
    ctx.train_config = TrainConfig(epochs=1, batch_size=8, lr=0.05)
    s.before_task(ctx)
    goal = s.goal(0)
    assert 0.0 <= goal <= 1.0 and goal * 24 == round(goal * 24), goal
    with torch.no_grad():
        by_hand = int((model.head("t0")(x).argmax(1) == y).sum()) / 24
    assert s._accuracy(ctx) == pytest.approx(by_hand, abs=1e-12)


def _cpg_at_task_1(settings: dict[str, Any]) -> tuple[Any, Any, Any]:
    """CPG before its second task, half of fc1's weights owned by task 0 (seeded), fc2 free."""
    from rivalkit import ctx_for

    s, model, _, tasks = _tiny("cpg", settings)
    owned = torch.rand(6, 16, generator=torch.Generator().manual_seed(1)) < 0.5
    s.state["owner/all/fc1.weight"] = owned.to(torch.uint8)
    s.state["owner/all/fc2.weight"] = torch.zeros(5, 6, dtype=torch.uint8)
    s.extra.update({"tasks": [0], "goals": {"1": 0.0}})
    ctx = ctx_for(model, tasks, 1, s)
    s.before_task(ctx)
    return s, model, ctx


def test_cpg_picks_take_adam_steps_of_their_own() -> None:
    """One training step: every pick whose gradient g is not zero moves from 0.01 by Adam's
    first step, pick_lr * g / (|g| + 1e-8)."""
    s, model, ctx = _cpg_at_task_1({"pick_lr": 1e-3})
    x, y = ctx.task.train
    with s.training(ctx):
        torch.nn.functional.cross_entropy(model.head("t1")(x), y).backward()
        s.after_backward(ctx)
        grad = s._picks["fc1.weight"].grad.clone()
        s.after_step(ctx)
    moved = grad != 0
    assert int(moved.sum()) > 10
    want = 0.01 - 1e-3 * grad / (grad.abs() + 1e-8)
    torch.testing.assert_close(s._picks["fc1.weight"].detach()[moved], want[moved],
                               rtol=0, atol=1e-9)
    assert torch.equal(s._picks["fc1.weight"].detach()[~moved], torch.full((6, 16), 0.01)[~moved])


def test_cpg_stores_each_tasks_biases_in_per_task_mode_and_checks_pick_shapes() -> None:
    """shared: per_task: after task 0, CPG holds a copy of the trunk's biases under
    shared/0/ (the values the model ends the task with); a stored pick of another shape than
    its weight is a problem naming both shapes."""
    from rivalkit import ctx_for

    from growth.train import TrainConfig, fit

    s, model, graph, tasks = _tiny("cpg", {"shared": "per_task", "ratios": [0.5],
                                           "prune_epochs": 1, "max_grow": 0})
    s.extra["goals"] = {"0": 0.0}
    ctx = ctx_for(model, tasks, 0, s)
    cfg = TrainConfig(epochs=1, batch_size=8, lr=0.05)
    ctx.train_fit = lambda **kw: fit(ctx, s, cfg, **{"seed": 1, **kw})
    s.before_task(ctx)
    s.after_task(ctx)
    params = model.named_parameters()
    stored = {k: v for k, v in s.state.items() if k.startswith("shared/")}
    assert sorted(stored) == ["shared/0/fc1.bias", "shared/0/fc2.bias"]
    for k, v in stored.items():
        assert torch.equal(v, params[k.split("/", 2)[2]].detach())
    bad = {**s.state, "pick/0/fc1.weight": torch.zeros(2, 2, dtype=torch.bool)}
    (problem,) = s.check_state(bad, {"tasks": [0]}, graph.named_tensors(), 1)
    assert "pick/0/fc1.weight" in problem and "(2, 2)" in problem, problem


def test_cpg_growth_adds_noisy_copies_and_its_picks_go_on_training() -> None:
    """Growth with noise 0.5: each new unit's incoming row is an old row plus noise (equal to
    none of them); after growth the picks, remapped, still take Adam steps."""
    s, model, ctx = _cpg_at_task_1({"grow": 0.5, "noise": 0.5, "budget": 10})
    assert s._grow(ctx, 0)
    w = model.named_parameters()["fc1.weight"].detach()
    assert w.shape == (9, 16)
    for row in w[6:]:
        assert not any(torch.equal(row, old) for old in w[:6])
    x, y = ctx.task.train
    with s.training(ctx):
        torch.nn.functional.cross_entropy(model.head("t1")(x), y).backward()
        s.after_backward(ctx)
        s.after_step(ctx)
    assert bool((s._picks["fc1.weight"].detach()[:6] != 0.01).any())  # the old units' picks


def test_cpg_keeps_a_stage_whose_accuracy_equals_the_goal() -> None:
    """The goal is met at equality: accuracy 0.5 against goal 0.5 neither grows the network
    (room for it in the budget) nor undoes stage 0.5."""
    from rivalkit import ctx_for

    from growth.train import TrainConfig, fit

    s, model, _, tasks = _tiny("cpg", {"ratios": [0.5], "prune_epochs": 1, "budget": 10})
    s.extra["goals"] = {"0": 0.5}
    ctx = ctx_for(model, tasks, 0, s)
    cfg = TrainConfig(epochs=1, batch_size=8, lr=0.05)
    ctx.train_fit = lambda **kw: fit(ctx, s, cfg, **{"seed": 1, **kw})
    s._accuracy = lambda ctx: 0.5  # type: ignore[method-assign]
    s.before_task(ctx)
    s.after_task(ctx)
    assert s.extra["grown"] == {"0": 0} and s.extra["pruned"] == {"0": 0.5}


def test_cpg_goal_draws_and_trains_its_solo_copy_from_the_tasks_seed() -> None:
    """The solo copy's fresh weights and its batches' order both come from the task's seed
    (ctx_for gives task 1 seed 101): the goal is the validation accuracy of a copy drawn and
    trained by hand with that seed, and the campaign's random stream is left where it was."""
    from rivalkit import ctx_for, tasks_for

    from growth.model import Model
    from growth.strategies.base import Strategy
    from growth.train import TrainConfig, evaluate, fit

    s, model, graph, _ = _tiny("cpg", {"margin": 0.0})
    tasks = tasks_for(graph, 2, n=96)  # 24 validation samples: batches' order shows
    ctx = ctx_for(model, tasks, 1, s)
    cfg = ctx.train_config = TrainConfig(epochs=2, batch_size=4, lr=0.2)
    torch.manual_seed(3)
    stream = torch.random.get_rng_state()
    s.before_task(ctx)
    assert torch.equal(torch.random.get_rng_state(), stream)
    alone = Model(graph)
    torch.manual_seed(101)
    for m in alone.module.modules():
        if m is not alone.module and hasattr(m, "reset_parameters"):
            m.reset_parameters()
    solo = ctx_for(alone, tasks, 1)
    fit(solo, Strategy(), cfg, seed=101)
    assert s.goal(1) == evaluate(solo, tasks[1], "val")


def test_cpg_grows_a_residual_group_once_and_the_layers_after_it() -> None:
    """fc2's output is added to fc1's (one channel group of base width 6, widened once by
    ceil(0.25 x 6) = 2 with fc1), and fc3 after the group grows by its own ceil(0.25 x 4) = 1:
    6, 6, 4 -> 8, 8, 5."""
    from rivalkit import ctx_for, tasks_for, with_heads

    from growth.graph import NetGraph
    from growth.model import Model

    torch.manual_seed(0)
    g = NetGraph()
    g.add_input("x", (4,))
    g.add("fc1", "linear", ["x"], out_features=6)
    g.add("r1", "relu", ["fc1"])
    g.add("fc2", "linear", ["r1"], out_features=6)
    g.add("sum", "add", ["r1", "fc2"])
    g.add("fc3", "linear", ["sum"], out_features=4)
    g.add("r3", "relu", ["fc3"])
    g.add("features", "identity", ["r3"])
    graph = with_heads(g, 2)
    model = Model(graph)
    s = make_strategy("cpg", {"grow": 0.25, "noise": 0.0, "budget": 10})
    s.extra["goals"] = {"0": 0.0}
    ctx = ctx_for(model, tasks_for(graph, 2, n=16), 0, s)
    s.before_task(ctx)
    assert s._grow(ctx, 0)
    assert {n: model.graph.node(n).attrs["out_features"] for n in ("fc1", "fc2", "fc3")} == {
        "fc1": 8, "fc2": 8, "fc3": 5}


def test_cpg_grows_a_transformer_by_units_and_scores_old_tasks_on_its_old_widths() -> None:
    """A ViT trunk (5 tokens of 4 features, MLP hidden 6): a linear layer's units are its
    output's last axis, not the tokens. Task 0 ends with widths patch 4, fc1 6, fc2 4 (fc2
    adds into patch's channels: one group); task 1 misses its goal and doubles them (grow 1.0)
    to 8, 12, 8. Task 0 is then scored on the network cut back to its widths (the attention's
    nested `qkv.weight` and `proj.weight` keys included) and its outputs stay bitwise equal."""
    from growth.search_spaces.networks import vit
    from rivalkit import learn_all, tasks_for, with_heads

    from growth.train import TrainConfig

    torch.manual_seed(0)
    graph = with_heads(vit((1, 4, 4), patch=2, dim=4, depth=1, heads=1, mlp_dim=6), 2)
    s = make_strategy("cpg", {"grow": 1.0, "noise": 0.0, "budget": 10, "max_grow": 1,
                              "ratios": [0.5], "prune_epochs": 1})
    s._goal = lambda ctx: 1.01 if ctx.task.index == 1 else 0.0  # type: ignore[method-assign]
    cfg = TrainConfig(epochs=1, batch_size=8, lr=0.05)
    model, s, scores = learn_all(s, graph, tasks_for(graph, 2, n=16), cfg)
    assert s.extra["grown"] == {"0": 0, "1": 1}
    assert s.extra["widths"] == {"0": {"patch": 4, "block1_fc1": 6, "block1_fc2": 4},
                                 "1": {"patch": 8, "block1_fc1": 12, "block1_fc2": 8}}
    assert torch.equal(scores[1][0], scores[0][0])



def test_cpg_growth_step_draws_each_layers_noise_from_the_task_seed_step_and_layer() -> None:
    """Growth step 2 of task 1 (seed 101) widens fc1 (6 -> 9) with net2wider's noise drawn
    from seed 101 + 1000 x 2 + 0 and fc2 (5 -> 8) from 101 + 2000 + 1, after fc1's new
    columns in fc2 were set to zero and its old ones kept: the same weights built by hand."""
    from growth.ops import net2wider

    s, model, ctx = _cpg_at_task_1({"grow": 0.5, "noise": 0.5, "budget": 10})
    before = model.graph
    assert s._grow(ctx, 2)
    first = net2wider(before, "fc1", 9, noise=0.5, seed=2101).graph
    old = before.node("fc2").tensors["weight"]
    first.node("fc2").tensors["weight"] = torch.cat([old, torch.zeros(5, 3)], 1)
    second = net2wider(first, "fc2", 8, noise=0.5, seed=2102).graph
    got = model.named_parameters()
    assert torch.equal(got["fc1.weight"].detach(), first.node("fc1").tensors["weight"])
    assert torch.equal(got["fc2.weight"].detach(), second.node("fc2").tensors["weight"])


def test_cpg_checks_its_goal_and_stores_its_picks_through_the_picks_above_the_threshold() -> None:
    """Task 1's goal check scores its effective weights (free ones plus the picked old ones:
    none picked here, so task 0's half of fc1 reads as zero; biases zeroed, so that the head's
    bias alone does not decide), and the task stores as picked only task 0's weights whose
    pick is above 5e-3 (row 0 at exactly 5e-3 is not; a pick_lr of 1e-12 leaves the picks
    where they are through the pruning's retraining)."""
    from rivalkit import tasks_for

    from growth.strategies.cpg import PICK_THRESHOLD
    from growth.train import TrainConfig, fit

    s, model, ctx = _cpg_at_task_1({"pick_lr": 1e-12, "ratios": [0.5], "prune_epochs": 1,
                                    "max_grow": 0})
    ctx.task = tasks_for(model.graph, 2, n=400)[1]  # 100 validation samples
    owned = s.state["owner/all/fc1.weight"] == 1
    x, y = ctx.task.val
    w = model.named_parameters()["fc1.weight"].detach()
    with torch.no_grad():
        for n, p in model.named_parameters().items():  # else the head's bias decides alone
            if n.endswith(".bias"):
                p.zero_()
        s._picks["fc1.weight"].fill_(0.001)
        out = torch.func.functional_call(model.head("t1"), {"fc1.weight": w * ~owned}, (x,))
        assert s._accuracy(ctx) == float((out.argmax(1) == y).sum()) / 100
        s._picks["fc1.weight"].fill_(0.01)
        s._picks["fc1.weight"][0] = PICK_THRESHOLD
    cfg = TrainConfig(epochs=1, batch_size=8, lr=0.05)
    ctx.train_fit = lambda **kw: fit(ctx, s, cfg, **{"seed": 1, **kw})
    s.after_task(ctx)
    picked = owned.clone()
    picked[0] = False
    assert torch.equal(s.state["pick/1/fc1.weight"], picked)
