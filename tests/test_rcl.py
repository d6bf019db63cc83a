"""RCL as a strategy: a later task trains only its head, its new units and their connections
(the network it grew from frozen, BatchNorm statistics included), earlier tasks' outputs stay
bitwise identical, a child must beat the network trained as long as a child, the controller
persists across tasks, sizes and search cost are reported, campaigns resume (after a kill
too) to the same R and controller. Searches run in this process (the local backend)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from growth.controllers.service import SearchService
from growth.search_spaces.networks import small_cnn
from rivalkit import (
    CFG,
    digit_tasks,
    evaluate_all,
    resumed_equals_full,
    with_heads,
    write_config,
)

from growth.campaign import Campaign, resume_run
from growth.checkpoint import latest_checkpoint, read_checkpoint
from growth.config import load_config, validate_config
from growth.data import build_stream
from growth.errors import ConfigError
from growth.graph import NetGraph
from growth.model import Model
from growth.ops import widen_private
from growth.rundir import read_run_id
from growth.strategies import Context, make_strategy
from growth.strategies.rcl import cut_to, layer_widths
from growth.train import evaluate, learn_task

SEARCH = {"backend": "local", "children": 2, "generations": 2, "epochs": 2,
          "controller_params": {"counts": [0, 3, 6], "hidden": 16}}
TRAIN = {"epochs": 3, "batch_size": 16, "lr": 0.05, "momentum": 0.9}  # campaigns that learn


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def grown(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Three permuted-digits tasks on a small CNN with BatchNorm, with RCL's real search (no
    complexity cost, so added units pay): the graph, the strategy's state and every learned
    task's test scores after each task."""
    tmp = tmp_path_factory.mktemp("rcl")
    tasks = digit_tasks(3, 120)
    torch.manual_seed(0)
    model = Model(with_heads(small_cnn((1, 8, 8), [4, 6], batchnorm=True, fc=[12]), 3, 10))
    s = make_strategy("rcl", {"alpha": 0.0, "search": {**SEARCH, "epochs": 1}})
    out: dict = {"graphs": [], "scores": [], "extra": [], "tasks": tasks, "strategy": s}
    with SearchService() as service:
        for i in range(3):
            ctx = Context(model, tasks[i], tasks[:i], lambda t: f"t{t.index}", lambda t, y: y,
                          torch.device("cpu"), seed=100 + i, searcher=service,
                          workdir=tmp / f"task_{i}")
            learn_task(ctx, s, CFG.model_copy(update={"batch_size": 16}), seed=ctx.seed)
            out["graphs"].append(model.graph)
            out["scores"].append(evaluate_all(model, s, tasks, i))
            out["extra"].append(json.loads(json.dumps(s.extra)))
    return out


def _old_part(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The entries of `t` at positions an earlier tensor of `shape` had (units are appended)."""
    return t[tuple(slice(0, n) for n in shape)]


def test_earlier_tasks_outputs_are_bitwise_identical_after_later_tasks(grown: dict) -> None:
    scores = grown["scores"]
    widths = [layer_widths(g) for g in grown["graphs"]]
    assert widths[1] != widths[0] and widths[2] != widths[1]  # both later tasks added units
    assert scores[0][0].std(0).min() > 1e-4
    for i in (1, 2):
        assert torch.equal(scores[i][0], scores[0][0])
    assert torch.equal(scores[2][1], scores[1][1])
    details = grown["extra"][2]["rcl"]
    assert {t: d["widths"] for t, d in details.items()} == {
        str(i): w for i, w in enumerate(widths)}


def test_a_later_task_moves_only_its_head_its_units_and_their_connections(grown: dict) -> None:
    """Every entry (BatchNorm statistics included) the network had after task t-1 is bitwise
    where it was after task t; the task's head moved, and the old units' connections from the
    new units (zero when widen_private adds them) were trained."""
    for t in (1, 2):
        old, new = grown["graphs"][t - 1].named_tensors(), grown["graphs"][t].named_tensors()
        read_new = 0
        for name, before in old.items():
            after = new[name]
            if not before.is_floating_point():  # BatchNorm's batch counter: not a value
                continue
            if name.startswith(f"head_t{t}."):
                assert not torch.equal(_old_part(after, before.shape), before), name
                continue
            assert torch.equal(_old_part(after, before.shape), before), (t, name)
            if after.dim() > 1 and after.shape[1] > before.shape[1] and \
                    not name.startswith("head_"):
                read_new += int(after[:before.shape[0], before.shape[1]:].count_nonzero())
        assert read_new > 0


def test_each_task_records_what_it_added_and_its_reward(grown: dict) -> None:
    details = grown["extra"][2]["rcl"]
    widths = [layer_widths(g) for g in grown["graphs"]]
    assert "expansion" not in details["0"]  # task 0 trains the base
    for t in (1, 2):
        d = details[str(t)]
        assert d["added"] == {n: widths[t][n] - widths[t - 1][n] for n in widths[t]}
        assert d["expansion"] != "parent" and d["children"] == 4
        assert d["child_reward"] > d["zero_acc"]  # alpha 0: the reward is the accuracy
        assert d["reward"] == d["child_reward"] == d["val_acc"]
        assert all(a["op"] == "widen_private" for a in d["expansion"])
    controller = grown["extra"][2]["controller"]
    assert controller["controller"] == "rcl" and controller["updates"] == 4  # 2 x 2 generations


def test_cut_to_gives_back_the_network_before_private_widening() -> None:
    torch.manual_seed(0)
    g = with_heads(small_cnn((1, 8, 8), [4, 6], batchnorm=True, fc=[12]), 2, 10)
    wide = widen_private(widen_private(g, "conv1", 7, noise=0.1, seed=1).graph, "fc3", 15,
                         noise=0.1, seed=2).graph
    cut = cut_to(wide, layer_widths(g))
    assert cut.to_dict() == g.to_dict()
    a, b = cut.named_tensors(), g.named_tensors()
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_a_child_must_beat_the_network_trained_as_long_as_a_child(tmp_path: Path) -> None:
    """With the margin at 1 no child is kept: the network stays (its widths), its head trained
    on as a child trains (so it differs from the head `search: off` leaves, and its validation
    accuracy is the zero_acc it was compared by); the choice follows child_reward > zero_acc +
    margin."""
    runs = {}
    for name, search in (("kept", {**SEARCH, "margin": 1.0}), ("off", "off")):
        cfg = write_config(tmp_path / f"{name}.yaml", {"name": "rcl", "search": search},
                           train=TRAIN)
        runs[name] = (Campaign(load_config(cfg), tmp_path / name).start(), load_config(cfg))
    m, cfg = runs["kept"]
    details = m["details"]["rcl"]
    tasks = build_stream({**cfg.data.model_dump(), "seed": cfg.seed})
    for t in ("1", "2"):
        d = details[t]
        assert d["expansion"] == "parent" and d["reward"] == d["zero_acc"]
        assert d["widths"] == details["0"]["widths"]
        assert d["child_reward"] is not None and d["children"] == 4
        graphs = {k: NetGraph.load(tmp_path / k / "checkpoints" / f"task_00{t}" / "graph")
                  for k in runs}
        head = f"head_t{t}.weight"
        assert not torch.equal(graphs["kept"].named_tensors()[head],
                               graphs["off"].named_tensors()[head])
        ctx = Context(Model(graphs["kept"]), tasks[int(t)], [], lambda k: f"t{k.index}",
                      lambda k, y: y, torch.device("cpu"))
        assert evaluate(ctx, tasks[int(t)], "val") == d["zero_acc"]
    assert m["search"]["parent_kept"] == 2 and m["search"]["searches"] == 2
    assert [s["params"] for s in m["sizes"]] == [m["sizes"][0]["params"]] * 3


def _controller(run: Path) -> tuple[dict, dict]:
    ckpt = read_checkpoint(latest_checkpoint(run), read_run_id(run), 3, make_strategy("rcl"))
    return ({k: v for k, v in ckpt.tensors.items() if k.startswith("controller/")},
            ckpt.extra["controller"])


def _untimed(value: object) -> object:
    """`value` without times in seconds (each run measures its own)."""
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if not k.endswith("_s")}
    return value


def test_rcl_campaign_resumes_to_the_same_R_controller_and_sizes(tmp_path: Path) -> None:
    full, resumed = resumed_equals_full(tmp_path, {"name": "rcl", "alpha": 0.0,
                                                   "search": SEARCH}, train=TRAIN)
    assert resumed["R"] == full["R"] and resumed["sizes"] == full["sizes"]
    assert _untimed(resumed["details"]) == _untimed(full["details"])
    assert _untimed(resumed["search"]) == _untimed(full["search"])
    a, b = _controller(tmp_path / "full"), _controller(tmp_path / "part")
    assert a[1] == b[1] and sorted(a[0]) == sorted(b[0])
    assert all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert any(k.startswith("controller/all/value/") for k in a[0])
    # sizes: the base trunk, the units added to it, the heads (64-16-12 MLP, 3 heads of 10)
    widths = full["details"]["rcl"]["2"]["widths"]
    last = full["sizes"][-1]
    assert last["trunk_params"] == 64 * 16 + 16 + 16 * 12 + 12
    assert last["added_params"] == (64 * widths["fc1"] + widths["fc1"]
                                    + widths["fc1"] * widths["fc2"] + widths["fc2"]
                                    - last["trunk_params"]) > 0
    assert last["heads_params"] == 3 * (widths["fc2"] * 10 + 10)
    search = full["search"]
    assert search["children"] == 8 and search["searches"] == 2 and search["child_time_s"] > 0
    assert full["bwt"] == 0.0


@pytest.mark.slow
def test_a_kill_mid_search_resumes_to_the_same_R_and_controller(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", {"name": "rcl", "alpha": 0.0, "search": SEARCH},
                       train=TRAIN)
    full = Campaign(load_config(cfg), tmp_path / "full").start()
    run = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "growth", "run", str(cfg), "--out",
                             str(run), "--quiet"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = run / "work" / "task_002" / "search" / "children.jsonl"
    start = time.time()
    while not records.exists() and proc.poll() is None and time.time() - start < 300:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert records.exists() and not (run / "checkpoints" / "task_002").exists()
    kept = records.read_text().splitlines()
    resumed = resume_run(run)
    assert resumed["R"] == full["R"]
    assert _untimed(resumed["details"]) == _untimed(full["details"])
    assert records.read_text().splitlines()[:len(kept)] == kept  # not trained again
    a, b = _controller(tmp_path / "full"), _controller(run)
    assert a[1] == b[1] and all(torch.equal(a[0][k], b[0][k]) for k in a[0])


def test_search_off_trains_a_head_per_task_on_the_frozen_base(tmp_path: Path) -> None:
    m = Campaign(load_config(write_config(tmp_path / "c.yaml", {"name": "rcl",
                                                                "search": "off"})),
                 tmp_path / "r").start()
    assert m["bwt"] == 0.0 and not (m.get("search") or {}).get("children")
    base = NetGraph.load(tmp_path / "r" / "checkpoints" / "task_000" / "graph")
    last = NetGraph.load(tmp_path / "r" / "checkpoints" / "task_002" / "graph")
    a, b = base.named_tensors(), last.named_tensors()
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith(("head_t1", "head_t2")))


@pytest.mark.parametrize("settings,key", [
    ({"search": {"cost": 0.1}}, "strategy.search"),
    ({"search": {"controller_params": {"alpha": 0.1}}}, "strategy.search"),
    ({"alpha": -1}, "strategy.alpha"),
    ({"search": {"controller_params": {"counts": [2, 4]}}}, "strategy.search.controller_params"),
])
def test_bad_settings_are_refused_naming_the_key(settings: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config({"strategy": {"name": "rcl", **settings}}, "c.yaml")


def test_the_search_it_asks_for_is_private_with_alpha_as_its_cost() -> None:
    s = make_strategy("rcl", {"alpha": 0.2, "search": {"children": 3}})
    settings = s.search_settings()
    assert settings.space.private and settings.cost == 0.2 and settings.parent == "fixed"
    assert settings.controller == "rcl" and settings.controller_params["alpha"] == 0.2
    assert settings.children == 3 and settings.generations == 3  # RCL's defaults kept
    assert s.params.search.controller_params == {}  # its own settings are left as given
