"""Progress of a campaign whose strategy searches (REC): the search's children are reported
apart from the task's epochs (before or after them, as the strategy searches), and the CLI
shows them on a bar of their own."""

from __future__ import annotations

from pathlib import Path

import pytest
from runfiles import write_config

from growth.campaign import Campaign, Progress
from growth.cli import main
from growth.config import load_config

REC = {"name": "rec", "compress": "off", "expansion": "shared", "owners": "off",
       "search": {"backend": "local", "children": 2, "epochs": 1,
                  "controller_params": {"wider_actions": 1, "deeper_actions": 1}}}


def _config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "c.yaml", data__n_tasks=2, train__epochs=2,
                        data__max_train_per_task=150, model__hidden=[16], strategy=REC)


def test_a_tasks_search_is_reported_before_its_epochs_and_apart(tmp_path: Path) -> None:
    events: list[tuple] = []
    progress = Progress(
        on_task_start=lambda i, t: events.append(("task", i)),
        on_epoch=lambda i, e, loss: events.append(("epoch", i, e)),
        on_task_end=lambda i, m: events.append(("end", i)),
        on_search_start=lambda i, n: events.append(("search", i, n)),
        on_search_child=lambda i, r: events.append(("child", i, r.status)),
        on_search_end=lambda i: events.append(("searched", i)))
    Campaign(load_config(_config(tmp_path)), tmp_path / "run", progress).start()
    assert events[:4] == [("task", 0), ("epoch", 0, 0), ("epoch", 0, 1), ("end", 0)]
    start = events.index(("search", 1, 2))
    assert events[start:start + 4] == [("search", 1, 2), ("child", 1, "ok"),
                                       ("child", 1, "ok"), ("searched", 1)]
    epochs = [e for e in events if e[0] == "epoch" and e[1] == 1]
    assert epochs == [("epoch", 1, 0), ("epoch", 1, 1)]  # children are not epochs
    assert events[4] == ("task", 1) and events[-1] == ("end", 1)


def test_the_cli_shows_the_search_on_its_own_bar(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(_config(tmp_path)), "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "task 1 search" in err and "2/2" in err and "child" in err
    assert "task 0 search" not in err  # the first task trains the base, no search
