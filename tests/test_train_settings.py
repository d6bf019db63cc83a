"""`train:` learning-rate schedules (warm-up, cosine, step decay) as the loop applies them, and
`device: cuda:N` as configs and the machine check it."""

from __future__ import annotations

import math

import pytest
import torch
from test_loop import ctx_of, linear_model, one_task

from growth.config import validate_config
from growth.context import TrainConfig
from growth.devices import resolve_device
from growth.errors import ConfigError
from growth.strategies import Strategy
from growth.train import fit

N, BATCH = 10, 4  # 3 steps per epoch (4 + 4 + 2)


class LearningRates(Strategy):
    """Records the learning rate each optimizer step used."""

    name = "lr_probe"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[float] = []

    def after_step(self, ctx) -> None:
        self.seen.append(ctx.optimizer.param_groups[0]["lr"])


def rates(**train) -> list[float]:
    torch.manual_seed(0)
    task = one_task(torch.randn(N, 3), torch.randint(0, 2, (N,)), 2)
    probe = LearningRates()
    fit(ctx_of(linear_model(), task), probe, TrainConfig(batch_size=BATCH, lr=0.3, **train))
    return probe.seen


def test_constant_is_the_optimizers_own_rate() -> None:
    assert rates(epochs=2) == [0.3] * 6


def test_step_decay_multiplies_by_gamma_at_each_milestone_epoch() -> None:
    got = rates(epochs=4, schedule="step", milestones=[1, 3], gamma=0.5)
    want = [0.3] * 3 + [0.15] * 6 + [0.075] * 3  # epochs 0 | 1, 2 | 3
    assert got == pytest.approx(want, rel=1e-12)


def test_warm_up_rises_linearly_then_cosine_falls_over_the_rest() -> None:
    got = rates(epochs=3, schedule="cosine", warmup_epochs=1)
    warm = [0.3 * 1 / 3, 0.3 * 2 / 3, 0.3]  # (step + 1) / 3 of lr over epoch 0
    rest = [0.3 * 0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(6)]
    assert got == pytest.approx(warm + rest, rel=1e-12)


def test_warm_up_alone_then_constant() -> None:
    got = rates(epochs=2, warmup_epochs=1)
    assert got == pytest.approx([0.1, 0.2, 0.3, 0.3, 0.3, 0.3], rel=1e-12)


def test_schedule_keys_are_checked_where_they_apply() -> None:
    with pytest.raises(ConfigError, match=r"train.milestones: applies only to train.schedule"):
        validate_config({"train": {"milestones": [2]}}, "c.yaml")
    with pytest.raises(ConfigError, match="milestones must increase"):
        validate_config({"train": {"schedule": "step", "milestones": [3, 2]}}, "c.yaml")
    cfg = validate_config({"train": {"schedule": "step", "milestones": [2, 4], "gamma": 0.2,
                                     "warmup_epochs": 1}}, "c.yaml")
    assert cfg.train.milestones == [2, 4] and "gamma" in cfg.to_dict()["train"]
    assert "milestones" not in validate_config({"name": "x"}, "c.yaml").to_dict()["train"]


@pytest.mark.parametrize("device", ["cuda:0", "cuda:3", "cpu", "auto", "cuda"])
def test_configs_accept_a_gpu_index(device: str) -> None:
    assert validate_config({"device": device}, "c.yaml").device == device


@pytest.mark.parametrize("device", ["cuda:", "gpu", "cuda:-1", "cuda:x", "CPU"])
def test_configs_refuse_other_device_names(device: str) -> None:
    with pytest.raises(ConfigError, match=r"c.yaml: device"):
        validate_config({"device": device}, "c.yaml")


def test_a_gpu_index_the_machine_lacks_is_a_config_error() -> None:
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"run.yaml: device: cuda:1 was asked for but no "
                                              "CUDA device"):
            resolve_device("cuda:1", "run.yaml")
        return
    count = torch.cuda.device_count()
    assert resolve_device(f"cuda:{count - 1}") == torch.device("cuda", count - 1)
    with pytest.raises(ConfigError, match=rf"device: cuda:{count}, but this machine has {count}"):
        resolve_device(f"cuda:{count}", "run.yaml")


def test_cpu_and_auto_resolve_on_any_machine() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
