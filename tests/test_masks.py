"""PackNet and CPG through real campaigns: earlier tasks' outputs stay bitwise identical, every
weight has one owner, pruned weights stay zero, resume after a kill gives the same R matrix."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from growth.campaign import Campaign, Progress, latest_checkpoint
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


@pytest.mark.parametrize("key", ["packnet", "packnet_per_task"])
def test_a_cnn_with_batchnorm_keeps_earlier_outputs(key: str, tmp_path: Path) -> None:
    rec = Recorder(config(STRATEGIES[key], model=CNN), tmp_path / "run")
    rec.run()
    _check_bitwise(rec, 3)


@pytest.mark.parametrize("key", ["packnet"])
def test_one_owner_per_weight_owned_weights_fixed_and_free_weights_zero(key: str,
                                                                        tmp_path: Path) -> None:
    rec = Recorder(config(STRATEGIES[key]), tmp_path / "run")
    rec.run()
    for i in range(1, 3):
        for n, owner in rec.owners[i].items():
            before = rec.owners[i - 1][n]
            kept = before > 0  # an owned weight keeps its owner and its exact value
            assert torch.equal(owner[kept], before[kept])
            assert torch.equal(rec.weights[i][n][kept], rec.weights[i - 1][n][kept])
            assert set(owner[~kept].unique().tolist()) <= {0, i + 1}  # new owners: this task
    for i, owners in enumerate(rec.owners):
        for n, owner in owners.items():  # pruned or never used: exactly zero, despite decay
            assert torch.all(rec.weights[i][n][owner == 0] == 0)
            assert bool((owner == i + 1).any())


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
@pytest.mark.parametrize("key", ["packnet"])
def test_resume_after_a_real_kill_gives_the_same_r_matrix(key: str, tmp_path: Path) -> None:
    import yaml

    cfg = config(STRATEGIES[key], data__n_tasks=4, data__max_train_per_task=400, train__epochs=3)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "growth.cli", "run", str(path), "--out",
                             str(out), "--quiet"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while latest_checkpoint(out) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = latest_checkpoint(out)
    assert done is not None, proc.stderr.read().decode() if proc.stderr else ""
    assert done.name != "task_003", "the run finished before it could be killed"
    from growth.cli import main

    assert main(["resume", str(out), "--quiet"]) == 0
    resumed = json.loads((out / "metrics.json").read_text())
    full = Campaign(validate_config(cfg), tmp_path / "full").start()
    assert resumed["R"] == full["R"]


@pytest.mark.parametrize("decay", [0.0, 0.01])
def test_no_step_moves_a_weight_the_task_does_not_own(decay: float, tmp_path: Path) -> None:
    """Not only at the end of a fit: after every single step (the task trains against the
    exact weights earlier tasks own), with momentum and with or without weight decay."""
    cfg = config(STRATEGIES["packnet"], data__n_tasks=2, train__weight_decay=decay)
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
@pytest.mark.parametrize("key", ["packnet"])
def test_an_imported_torchvision_resnet18_keeps_earlier_outputs(key: str, tmp_path: Path) -> None:
    pytest.importorskip("torchvision")
    cfg = config(STRATEGIES[key], model={"kind": "torchvision", "arch": "resnet18"},
                 data__n_tasks=2, data__max_train_per_task=64, train__epochs=1)
    rec = Recorder(cfg, tmp_path / "run")
    metrics = rec.run()
    _check_bitwise(rec, 2)
    assert metrics["sizes"][-1]["masks_bytes"] > 0
