"""Divergence guards on every optimisation the engine runs: a non-finite or exploding loss
(above EXPLODING times the loss the fit started from) or weights broken by the last step
stop the fit with one line naming what diverged and what to lower, and nothing diverged is
kept: a distillation (REC's compression, `growth compress`), DGR's generator, a child."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from growth.search_spaces.networks import add_head, mlp
from test_loop import ctx_of, linear_model, one_task

from growth.cli import main
from growth.compress import CompressParams, compress
from growth.errors import DivergedError
from growth.graph import NetGraph
from growth.model import Model
from growth.strategies import Context, Strategy
from growth.train import EXPLODING, TrainConfig, fit


class Growing(Strategy):
    """A finite penalty multiplied by `factor` every epoch (an EWC gone wrong: 1e23 and on)."""

    name = "growing"

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def penalty(self, ctx, x, y, logits):
        return torch.tensor(self.factor ** ctx.epoch) + 0.0 * logits.sum()


def blobs(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=gen)
    x = torch.randn(n, 3, generator=gen) + 2.0 * y[:, None].float()
    return x, y


def test_an_exploding_but_finite_loss_stops_the_fit() -> None:
    """Epoch e adds 1e3^e: epoch 2's 1e6 is past EXPLODING (1e4) times the start (about 1.7,
    so the floor 1e4 applies); the loop used to let every finite loss through."""
    x, y = blobs()
    ctx = ctx_of(linear_model(), one_task(x, y, 2))
    seen: list[float] = []
    with pytest.raises(DivergedError) as err:
        fit(ctx, Growing(1e3), TrainConfig(epochs=4, lr=0.01),
            on_epoch=lambda e, loss: seen.append(loss))
    text = str(err.value)
    assert "epoch 3" in text and "exploded" in text and "lower train.lr" in text, text
    assert len(text.splitlines()) == 1
    assert len(seen) == 2 and seen[1] < EXPLODING  # epochs 1 and 2 were fine; 3 is not


def test_a_loss_that_grows_within_bounds_is_left_alone() -> None:
    """x10 per epoch for 4 epochs ends at 1e3 times the start: below the limit, no error."""
    x, y = blobs()
    ctx = ctx_of(linear_model(), one_task(x, y, 2))
    losses = fit(ctx, Growing(10.0), TrainConfig(epochs=4, lr=0.01))
    assert len(losses) == 4 and losses[-1] > 500


class BreaksLastStep(Strategy):
    """Writes NaN into the weights after the fit's very last step (the loss was measured
    before it, so it stays finite)."""

    name = "breaks"

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.steps, self.done = steps, 0

    def after_step(self, ctx):
        self.done += 1
        if self.done == self.steps:
            with torch.no_grad():
                ctx.model.module.fc.weight.fill_(math.nan)


def test_weights_broken_by_the_last_step_are_a_divergence() -> None:
    x, y = blobs(n=64)
    ctx = ctx_of(linear_model(), one_task(x, y, 2))
    cfg = TrainConfig(epochs=2, lr=0.01, batch_size=32)
    with pytest.raises(DivergedError, match="weights hold NaN"):
        fit(ctx, BreaksLastStep(steps=4), cfg)


def _network() -> NetGraph:
    torch.manual_seed(0)
    return add_head(mlp((1, 8, 8), [16]), "t0", 10)


def test_an_exploding_distillation_is_not_kept() -> None:
    """REC's compression distils with MWC's penalty: one that explodes (finite) stops the
    compression instead of returning a student at chance as a success."""
    from growth.data import build_stream
    from growth.scenarios import labelers

    task = build_stream({"dataset": "digits", "stream": "split", "n_tasks": 1, "seed": 0,
                         "max_train_per_task": 200})[0]
    head_of, label_of = labelers("task")
    ctx = Context(Model(_network()), task, [], head_of, label_of, torch.device("cpu"))

    def penalty(ctx, x, y, logits):
        return torch.tensor(1e30 if ctx.epoch >= 1 else 0.0) + 0.0 * logits.sum()

    with pytest.raises(DivergedError) as err:
        compress(ctx, CompressParams(budget=0.5, epochs=3), TrainConfig(lr=0.05), penalty=penalty)
    assert str(err.value).startswith("distillation diverged") and "epoch 2" in str(err.value)


def test_growth_compress_names_its_flag_and_writes_nothing(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    """A rate that blows the first epoch up to ~1e18 (the student ends at chance) is refused
    naming --lr, and no folder is written."""
    _network().save(tmp_path / "net")
    args = ["compress", str(tmp_path / "net"), "--budget", "0.5", "--data", "digits",
            "--epochs", "1", "--out", str(tmp_path / "small")]
    assert main([*args, "--lr", "1e6"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "distillation diverged" in err and "lower --lr (now 1e+06)" in err, err
    assert not (tmp_path / "small").exists()


def test_a_diverging_generator_names_its_own_rate(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from runfiles import write_config

    cfg = write_config(tmp_path / "c.yaml", strategy={"name": "dgr", "gen_lr": 1e4,
                                                      "gen_epochs": 2},
                       data={"dataset": "digits", "stream": "split", "n_tasks": 2,
                             "max_train_per_task": 100}, scenario="class", train__epochs=1)
    assert main(["run", str(cfg), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "DGR's generator diverged" in err and "strategy.gen_lr" in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing of task 0 was kept


def test_diverged_cpg_picks_stop_the_task(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    """CPG's picks train by their own Adam, outside the loss: at pick_lr 1e308 two steps make
    them infinite while the binarised picks keep the loss finite. The run used to finish at
    chance with exit 0; now task 1 stops naming the picks' rate and is not kept."""
    from runfiles import write_config

    cfg = write_config(tmp_path / "c.yaml", strategy={"name": "cpg", "prune_epochs": 1,
                                                      "ratios": [0.5], "pick_lr": 1e308},
                       data__n_tasks=2, data__max_train_per_task=100, model__hidden=[16],
                       train__epochs=1)
    assert main(["run", str(cfg), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "CPG's picks diverged on task 'perm-1'" in err and "strategy.pick_lr" in err, err
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "task_000").is_dir() and not (checkpoints / "task_001").exists()
