"""REC with its search on: children trained (search backend `auto`) on the new task only, the
best one kept and compressed, the search cost recorded, and resume after a SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from growth.campaign import Campaign, resume_run
from growth.config import load_config

CONFIG = {
    "name": "rec", "seed": 1, "threads": 1,
    "data": {"dataset": "digits", "stream": "permuted", "n_tasks": 3,
             "max_train_per_task": 300},
    "model": {"kind": "mlp", "hidden": [24]},
    "train": {"epochs": 2, "batch_size": 32, "lr": 0.05},
    "strategy": {"name": "rec", "compress": {"epochs": 1},
                 "search": {"controller": "random", "children": 2, "generations": 1,
                            "epochs": 1, "concurrency": 2,
                            "controller_params": {"wider_actions": 1, "deeper_actions": 1},
                            "space": {"widths": {"fc": [24, 32, 48]}}}},
}
BASE_TRUNK = 64 * 24 + 24


def write(tmp: Path, **strategy: object) -> Path:
    cfg = json.loads(json.dumps(CONFIG))
    cfg["strategy"].update(strategy)
    path = tmp / "rec.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_rec_campaign_searches_keeps_the_best_and_compresses(tmp_path: Path,
                                                            ray_session: object) -> None:
    m = Campaign(load_config(write(tmp_path)), tmp_path / "run").start()
    details = m["details"]["rec"]
    for t in ("1", "2"):
        d = details[t]
        assert d["children"] >= 1 and d["child_time_s"] > 0
        assert isinstance(d["expansion"], list) and d["expansion"]  # the chosen actions
        c = d["compression"]
        assert c["trunk_before"] > BASE_TRUNK and c["trunk_after"] == BASE_TRUNK
        assert set(c["accuracy_before"]) == set(c["accuracy_after"]) == {"val", "test"}
        assert d["trunk_params"] == BASE_TRUNK  # the size invariant, after every task
    assert m["search"]["children"] == details["1"]["children"] + details["2"]["children"]
    assert m["search"]["child_time_s"] == pytest.approx(
        details["1"]["child_time_s"] + details["2"]["child_time_s"])
    assert all(s["relative"] == 1.0 for s in m["sizes"])
    # every child of task t trained on task t only: its records name the task's search
    for t in (1, 2):
        folder = tmp_path / "run" / "work" / f"task_{t:03d}" / "search"
        lines = (folder / "children.jsonl").read_text().splitlines()
        assert len(lines) == details[str(t)]["children"]
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "expansion [" in log and "compressed trunk" in log


def _kill_when(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    start = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {path} appeared")
        if time.time() - start > timeout:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout}s")
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory: pytest.TempPathFactory, ray_session: object
              ) -> tuple[Path, dict]:
    """A two-task REC config and its uninterrupted run."""
    tmp = tmp_path_factory.mktemp("rec2")
    cfg = json.loads(json.dumps(CONFIG))
    cfg["data"]["n_tasks"] = 2
    path = tmp / "rec2.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, Campaign(load_config(path), tmp / "full").start()


@pytest.mark.slow
@pytest.mark.parametrize("where", ["campaign", "search"])
def test_resume_after_sigkill_gives_the_same_R(tmp_path: Path, ray_session: object,
                                               two_tasks: tuple[Path, dict],
                                               where: str) -> None:
    """Killed after task 0's checkpoint (mid-campaign) or once task 1's first child is
    recorded (mid-search): resuming ends with the uninterrupted run's R matrix; a child
    finished before the kill is kept, not trained again."""
    cfg, full = two_tasks
    run = tmp_path / "part"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path),
           "RAY_ADDRESS": ray_session.address}  # the run joins the session's Ray
    proc = subprocess.Popen([sys.executable, "-m", "growth", "run", str(cfg), "--out",
                             str(run), "--quiet"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = run / "work" / "task_001" / "search" / "children.jsonl"
    _kill_when(run / "checkpoints" / "task_000" if where == "campaign" else records, proc)
    kept = records.read_text().splitlines() if records.exists() else []
    resumed = resume_run(run)
    assert resumed["R"] == full["R"]
    after = records.read_text().splitlines()
    assert after[:len(kept)] == kept  # finished children kept, in order
    keys = [json.loads(line)["key"] for line in after]
    assert len(keys) == len(set(keys))  # none trained twice
    assert resumed["search"]["children"] == full["search"]["children"]


@pytest.mark.slow
def test_rec_grows_and_compresses_a_tiny_vit(tmp_path: Path, ray_session: object) -> None:
    """REC end to end on the built-in ViT (patches of 4 on 8x8 digits, one block of width 8):
    each later task's search widens the embedding (through its LayerNorms), the MLP, or
    inserts a layer, and the network is compressed back to the base trunk's size."""
    cfg = json.loads(json.dumps(CONFIG))
    cfg["model"] = {"kind": "vit", "patch": 4, "dim": 8, "depth": 1, "heads": 2, "mlp_dim": 16}
    cfg["data"]["n_tasks"] = 2
    cfg["train"].update(optimizer="adam", lr=0.01)  # SGD at 0.05 barely moves a ViT in 2 epochs
    cfg["strategy"]["search"]["space"] = {"widths": {"conv": [8, 16], "fc": [16, 24, 32]}}
    path = tmp_path / "vit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    m = Campaign(load_config(path), tmp_path / "run").start()
    base = m["details"]["rec"]["0"]["trunk_params"]
    d = m["details"]["rec"]["1"]
    assert d["children"] >= 1 and d["expansion"]  # a child was trained and kept
    assert {a["op"] for a in d["expansion"]} <= {"net2wider", "net2deeper"}
    c = d["compression"]
    assert c["trunk_before"] > base and c["trunk_after"] == base == d["trunk_params"]
    assert all(0.0 <= acc <= 1.0 for row in m["R"] for acc in row if acc is not None)
    assert m["R"][1][0] > 0.2 and m["R"][2][1] > 0.2  # each task learned (chance: 0.1)
