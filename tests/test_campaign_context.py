"""What a campaign hands each task: the tasks seen before it (and only those), its own seed
(from the run's seed and the task's index), and the random state that seed starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_campaign import run, write_config

from growth import strategies
from growth.campaign import task_seed
from growth.strategies import Strategy


class Probe(Strategy):
    """Fine-tuning that writes down what each task's context holds."""

    name = "probe"
    log: list[dict] = []

    def before_task(self, ctx):
        Probe.log.append({"task": ctx.task.index, "seen": [t.index for t in ctx.seen],
                          "seed": ctx.seed, "draw": float(torch.rand(()))})


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    monkeypatch.setitem(strategies.STRATEGIES, "probe", Probe)
    monkeypatch.setattr(Probe, "log", [])
    return Probe.log


def probe_run(tmp_path: Path, name: str, seed: int) -> list[dict]:
    cfg = write_config(tmp_path / f"{name}.yaml", strategy={"name": "probe"}, seed=seed,
                       train={"epochs": 1, "batch_size": 64, "lr": 0.05},
                       data__max_train_per_task=64)
    start = len(Probe.log)
    run(cfg, tmp_path / name)
    return Probe.log[start:]


def test_each_task_sees_exactly_the_tasks_before_it(tmp_path: Path, probe: list[dict]) -> None:
    log = probe_run(tmp_path, "a", seed=3)
    assert [e["task"] for e in log] == [0, 1, 2]
    assert [e["seen"] for e in log] == [[], [0], [0, 1]]


def test_each_task_gets_its_own_seed_and_random_state(tmp_path: Path,
                                                      probe: list[dict]) -> None:
    a = probe_run(tmp_path, "a", seed=3)
    b = probe_run(tmp_path, "b", seed=4)
    again = probe_run(tmp_path, "again", seed=3)
    seeds = [e["seed"] for e in a + b]
    assert len(set(seeds)) == 6  # per task and per run seed
    assert [e["seed"] for e in a] == [task_seed(3, i) for i in range(3)]
    for e in a:  # the task's draws start from its seed, not from what earlier tasks left
        gen = torch.Generator().manual_seed(e["seed"])
        assert e["draw"] == float(torch.rand((), generator=gen))
    assert [(e["seed"], e["draw"]) for e in again] == [(e["seed"], e["draw"]) for e in a]


def test_task_seeds_differ_across_tasks_and_run_seeds() -> None:
    seeds = [task_seed(s, t) for s in range(6) for t in range(40)]
    assert len(set(seeds)) == len(seeds)
    assert all(isinstance(v, int) and 0 <= v < 2**31 - 1 for v in seeds)
    assert task_seed(0, 1) != task_seed(1, 0)  # index and seed are not interchangeable
