"""The evaluation seam: a strategy that overrides `evaluation` decides how every split is
scored, in `evaluate` and in a campaign's R matrix; the others are scored by their head."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from growth.campaign import Campaign
from growth.config import validate_config
from growth.data.containers import Task
from growth.graph import NetGraph
from growth.model import Model
from growth.strategies import STRATEGIES, Context, Strategy
from growth.train import evaluate


def _task() -> Task:
    x = torch.arange(12, dtype=torch.float32).view(6, 2)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    return Task(0, "t0", (x, y), (x, y), (x, y), [0, 1, 2], 3, 0, (2,))


def _ctx(task: Task) -> Context:
    torch.manual_seed(0)
    g = NetGraph()
    g.add_input("x", [2])
    g.add("fc", "linear", ["x"], out_features=3)
    g.add_output("t0", "fc")
    return Context(Model(g), task, [], lambda t: "t0", lambda t, y: y, torch.device("cpu"))


class Oracle(Strategy):
    """Scores each input by its true label (known here from the input), and counts set-ups."""

    name = "oracle_for_seam_test"
    entered = 0
    exited = 0

    @contextmanager
    def evaluation(self, ctx: Context, task: Task) -> Iterator:
        type(self).entered += 1
        try:
            yield lambda x: torch.nn.functional.one_hot((x[:, 0] / 2).long() % 3, 3).float()
        finally:
            type(self).exited += 1


def test_evaluate_uses_the_strategys_scorer_once_per_split_and_tears_it_down() -> None:
    task = _task()
    ctx = _ctx(task)
    logits = ctx.model.head("t0")(task.test[0])
    plain = int((logits.argmax(1) == task.test[1]).sum()) / len(task.test[1])
    assert evaluate(ctx, task) == plain  # no strategy: the head
    assert evaluate(ctx, task, strategy=Strategy()) == plain  # not overridden: the head
    Oracle.entered = Oracle.exited = 0
    assert evaluate(ctx, task, batch_size=2, strategy=Oracle()) == 1.0  # 3 batches, 1 set-up
    assert (Oracle.entered, Oracle.exited) == (1, 1)
    assert "evaluation" in Oracle().overridden() and "evaluation" not in Strategy().overridden()


def test_a_campaign_scores_every_r_matrix_entry_through_the_seam(tmp_path: Path) -> None:
    STRATEGIES[Oracle.name] = Oracle
    try:
        cfg = validate_config({
            "seed": 0, "threads": 1,
            "data": {"dataset": "digits", "stream": "permuted", "n_tasks": 2,
                     "max_train_per_task": 60},
            "model": {"kind": "mlp", "hidden": [8]},
            "train": {"epochs": 1},
            "strategy": {"name": Oracle.name},
        })
        campaign = Campaign(cfg, tmp_path / "run")
        scored: list[int] = []

        @contextmanager
        def evaluation(self: Strategy, ctx: Context, task: Task) -> Iterator:
            scored.append(task.index)
            yield lambda x: torch.zeros(len(x), 10).index_fill_(1, torch.tensor([7]), 1.0)

        campaign.strategy.evaluation = evaluation.__get__(campaign.strategy)
        m = campaign.start()
    finally:
        del STRATEGIES[Oracle.name]
    # R[0] (2 tasks), then after each task: the validation split once, every task's test split
    assert scored == [0, 1, 0, 0, 1, 1, 0, 1]
    digits_sevens = [int((t.test[1] == 7).sum()) / len(t.test[1]) for t in campaign.tasks]
    for row in m["R"]:
        assert row == digits_sevens  # every entry is what the strategy's scorer predicts
