"""`scenario: domain`: one head sees every task's inputs with the labels as the task gives
them (no class offset, no task id), through the campaign, search trials and strategies."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from runfiles import write_config

from growth.campaign import Campaign, build_base_graph
from growth.checkpoint import latest_checkpoint, read_checkpoint
from growth.compile import compile_graph
from growth.config import load_config, validate_config
from growth.data import Task
from growth.errors import ConfigError
from growth.scenarios import heads, labelers
from growth.strategies import available_strategies, make_strategy


def _task(index: int, n: int, offset: int) -> Task:
    empty = (torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    return Task(index, f"t{index}", empty, empty, empty, list(range(offset, offset + n)), n,
                offset, (4,))


def test_domain_labels_go_unshifted_to_one_shared_head() -> None:
    tasks = [_task(0, 2, 0), _task(1, 2, 2), _task(2, 3, 4)]
    y = torch.tensor([0, 1, 1])
    head_of, label_of = labelers("domain")
    assert [head_of(t) for t in tasks] == ["all"] * 3
    assert label_of(tasks[2], y).tolist() == [0, 1, 1]  # the class scenario adds 4
    assert labelers("class")[1](tasks[2], y).tolist() == [4, 5, 5]
    assert heads("domain", tasks) == {"all": 3}
    assert heads("class", tasks) == {"all": 7}
    assert heads("task", tasks) == {"t0": 2, "t1": 2, "t2": 3}


def test_every_strategy_says_whether_it_runs_without_a_task_id() -> None:
    """Methods that pick masks, columns or generated weights by the task id run only in the
    task scenario; the rest (regularisers, replay, REC) also in domain."""
    task_only = {"packnet", "cpg", "hat", "piggyback", "pnn", "hnet", "den", "learn_to_grow",
                 "expert_gate", "progress_compress", "rcl"}
    for name, cls in available_strategies().items():
        scenarios = (make_strategy(name).scenarios if name == "supsup" else
                     make_strategy(name, {"owners": False}).scenarios if name == "rec" else
                     cls.scenarios)
        if name in task_only:
            assert "domain" not in scenarios, name
        elif name in ("cwr", "ar1", "dgr_negative", "icarl"):
            assert "domain" not in scenarios, name
        elif name in ("finetune", "joint", "ewc", "mwc", "si", "lwf", "er", "rec", "gdumb"):
            assert "domain" in scenarios, name
    assert make_strategy("supsup", {"infer_task": "batch"}).scenarios == ("class", "domain")
    assert make_strategy("rec").scenarios == ("task",)  # its owner masks need the task id


def test_a_domain_campaign_scores_every_task_through_the_one_head(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path / "c.yaml", scenario="domain", data__n_tasks=2,
                                   train__epochs=1, data__max_train_per_task=200))
    campaign = Campaign(cfg, tmp_path / "run")
    assert campaign.base.heads == ["all"]
    assert campaign.base.shape("all") == (10,)  # the digits' 10 classes, not 2 x 10
    metrics = campaign.start()
    ckpt = read_checkpoint(latest_checkpoint(tmp_path / "run"), campaign.run_id, 2,
                           campaign.strategy)
    net = compile_graph(ckpt.graph).eval()
    for j, task in enumerate(campaign.tasks):  # the final row of R, by hand
        x, y = task.test
        with torch.no_grad():
            acc = int((net(x).argmax(1) == y).sum()) / len(y)
        assert metrics["R"][2][j] == pytest.approx(acc, abs=1e-12)
    assert metrics["run"]["scenario"] == "domain"


def test_a_method_that_needs_the_task_id_is_refused_in_domain(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path / "c.yaml", scenario="domain",
                                   strategy={"name": "packnet"}))
    with pytest.raises(ConfigError, match="runs only in scenario task, not 'domain'"):
        Campaign(cfg, tmp_path / "run")
    rec = load_config(write_config(tmp_path / "r.yaml", scenario="domain",
                                   strategy={"name": "rec"}))
    with pytest.raises(ConfigError, match="not 'domain' .*strategy.owners=off runs it in"):
        Campaign(rec, tmp_path / "rec")


def test_a_split_stream_in_domain_shares_a_head_of_the_groups_size(tmp_path: Path) -> None:
    """Split digits in the domain scenario: "first or second digit of the pair"."""
    cfg = validate_config({"scenario": "domain", "data": {"stream": "split", "n_tasks": 5}},
                          "c.yaml")
    campaign = Campaign(cfg, tmp_path / "run")
    graph = build_base_graph(cfg, campaign.tasks)
    assert graph.heads == ["all"] and graph.shape("all") == (2,)


@pytest.mark.slow
def test_rec_searches_in_domain_with_trials_on_the_shared_head(tmp_path: Path) -> None:
    """A search trial reads the scenario from its spec (TrialSpec.scenario): the children of
    a domain campaign train and score through the shared head."""
    cfg = load_config(write_config(
        tmp_path / "c.yaml", scenario="domain", data__n_tasks=2, train__epochs=1,
        data__max_train_per_task=150, model__hidden=[16],
        strategy={"name": "rec", "search": {"backend": "local", "children": 1, "epochs": 1},
                  "compress": "off", "owners": "off"}))
    metrics = Campaign(cfg, tmp_path / "run").start()
    search = metrics["search"]
    assert search["children"] == 1
    record = next((tmp_path / "run" / "work" / "task_001" / "search").glob("children.jsonl"))
    assert '"status": "ok"' in record.read_text()
