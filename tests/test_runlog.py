"""Per-epoch logs: epochs.csv in every run directory, TensorBoard event files on request, both
reading as one uninterrupted run after a resume."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
from runfiles import write_config

from growth.campaign import Campaign, Progress, resume_run
from growth.cli import main
from growth.config import load_config
from growth.errors import ConfigError


def rows(run: Path) -> list[dict[str, str]]:
    with (run / "epochs.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_epochs_csv_has_every_epoch_with_loss_and_validation(tmp_path: Path) -> None:
    seen: list[tuple[int, int, float]] = []
    cfg = load_config(write_config(tmp_path / "c.yaml", train__epochs=3))
    Campaign(cfg, tmp_path / "run", Progress(on_epoch=lambda t, e, loss: seen.append(
        (t, e, loss)))).start()
    table = rows(tmp_path / "run")
    assert [(int(r["task"]), r["task_name"], int(r["epoch"])) for r in table] == [
        (t, f"perm-{t}", e) for t in range(3) for e in range(3)]
    assert [float(r["train_loss"]) for r in table] == [loss for _, _, loss in seen]
    # the last epoch's validation accuracy is what the log reports after the task (finetune
    # scores through the task's head, as the per-epoch check does)
    log = (tmp_path / "run" / "log.txt").read_text()
    for t in range(3):
        reported = float(re.search(rf"task {t} validation accuracy ([0-9.]+)", log).group(1))
        last = next(r for r in reversed(table) if int(r["task"]) == t)
        assert float(last["val_accuracy"]) == pytest.approx(reported, abs=5e-5)
    assert all(0.0 <= float(r["val_accuracy"]) <= 1.0 for r in table)
    losses = [float(r["train_loss"]) for r in table if r["task"] == "0"]
    assert losses[-1] < losses[0]  # it learns


def test_a_resumed_run_logs_as_an_uninterrupted_one(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", train__epochs=2,
                       model={"kind": "mlp", "hidden": [16], "dropout": 0.2})
    full, part = tmp_path / "full", tmp_path / "part"
    for out in (full, part):
        Campaign(load_config(cfg), out).start()
    shutil.rmtree(part / "checkpoints" / "task_002")
    with (part / "epochs.csv").open() as f:  # killed in the middle of task 2, epoch 1
        kept = [line for line in f if not line.startswith("2,")]
    (part / "epochs.csv").write_text("".join(kept) + "2,perm-2,0,9.99,0.01\n")
    resume_run(part)
    assert (part / "epochs.csv").read_text() == (full / "epochs.csv").read_text()


def test_tensorboard_event_files(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = write_config(tmp_path / "c.yaml", train__epochs=2, tensorboard=True)
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    table = rows(out)
    for t in range(3):
        loss = events.Scalars(f"train_loss/task_{t}")
        assert [e.step for e in loss] == [2 * t, 2 * t + 1]
        mine = [float(r["train_loss"]) for r in table if int(r["task"]) == t]
        assert [e.value for e in loss] == pytest.approx(mine, rel=1e-6)
        assert len(events.Scalars(f"val_accuracy/task_{t}")) == 2
    metrics = json.loads((out / "metrics.json").read_text())
    avg = [e.value for e in events.Scalars("average_accuracy")]
    R = metrics["R"]
    assert avg == pytest.approx([sum(R[i][:i]) / i for i in (1, 2, 3)], rel=1e-6)


def test_tensorboard_without_the_package_is_a_config_error(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real(name, *a))
    cfg = write_config(tmp_path / "c.yaml", tensorboard=True)
    with pytest.raises(ConfigError, match=r"c.yaml: tracking.tensorboard needs the tensorboard "
                       r"package; pip install 'growth\[tensorboard\]'"):
        load_config(cfg)
