"""Architecture search on Ray, on both Ray backends (`ray`: the pool's actors, `tune`: Ray
Tune trials): trials in parallel, children that start from their parent's weights, failures
recorded while the search goes on (one search per backend serves these), a SIGKILLed driver
resumed, and a two-node cluster that loses a node. Ray is the test session's
(`ray_session`), except in the two-node test (its own cluster, in a subprocess)."""

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
from growth.controllers import Proposal, make_controller
from growth.controllers.driver import Budget, Resources, SearchResult, run_search
from growth.controllers.records import read_records
from growth.controllers.trial import TrialSpec
from searchkit import (
    CHILD_TRAIN,
    accuracy,
    digits_task,
    search_config,
    small_space,
    trained_base,
)

from growth.graph import NetGraph

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]
ROOT = Path(__file__).resolve().parents[1]


class BreakingController:
    """A real random controller whose first generation ends with a child whose action no
    operator accepts (its trial raises) and one whose training diverges (NaN loss)."""

    name = "random"

    def __init__(self, inner: Any) -> None:
        self.inner, self.seen = inner, []

    def propose(self, parent: NetGraph, n: int, exclude: Any = ()) -> list[Any]:
        out = self.inner.propose(parent, n, exclude)
        if not self.seen:
            out[-2] = Proposal(({"op": "net2wider", "node": "no_such_layer", "width": 64},),
                               "raises", {})
            out[-1] = Proposal(({"op": "net2wider", "node": "fc1", "width": 24,
                                 "noise": 1e30},), "diverges", {})
        return out

    def observe(self, results: Any) -> None:
        self.seen.append([(p.arch, acc) for p, acc in results])
        self.inner.observe(results)

    def state_dict(self) -> Any:
        return self.inner.state_dict()

    def load_state_dict(self, tensors: Any, extra: Any) -> None:
        self.inner.load_state_dict(tensors, extra)


@pytest.fixture(scope="module", params=["ray", "tune"])
def digits_search(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                  ray_session: Any) -> tuple[SearchResult, Any, float, Any, str]:
    """One small search per Ray backend: 2 generations of 4 children, 2 trials at a time;
    two children of the first generation fail (see BreakingController)."""
    tmp = tmp_path_factory.mktemp(f"search-{request.param}")
    task = digits_task()
    base, base_acc = trained_base(task, tmp / "base", hidden=(16, 16))
    space = small_space(base)
    controller = BreakingController(make_controller(
        "random", space, {"wider_actions": 2, "deeper_actions": 1}, seed=3))
    train = CHILD_TRAIN.model_copy(update={"epochs": 5})
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGUSR1)
    result = run_search(tmp / "run", tmp / "base", controller, space, task,
                        TrialSpec(train=train), Budget(children=4, generations=2),
                        Resources(concurrency=2, max_failures=0), seed=3, parent_acc=base_acc,
                        backend=request.param)
    # Tune's own Ctrl-C handler is gone with its experiment: the caller's next Ctrl-C is heard
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGUSR1)) == handlers
    return result, task, base_acc, controller, request.param


def test_search_on_digits_finishes_through_tune_with_trials_in_parallel(digits_search) -> None:
    result, task, _, controller, backend = digits_search
    assert result.done and result.generations == 2
    ok = [r for r in result.records if r.ok]
    assert len(ok) == len(result.records) - 2, [r.error for r in result.records]
    assert {r.generation for r in result.records} == {0, 1}  # this seed trains in both
    exp = result.directory / "tune" / "gen000-a0"
    if backend == "tune":
        # Tune ran them: one experiment for both generations, holding every trial's folder
        assert (sorted(p.name.split("-")[0] for p in exp.iterdir() if p.is_dir()) ==
                [r.key for r in result.records])
    else:  # the pool's actors ran them: Tune's storage holds only the parents they read
        assert sorted(p.name for p in (result.directory / "tune").iterdir()) == ["parents"]
    # at least two children trained at the same time
    spans = [(r.start, r.end) for r in ok]
    assert any(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(spans) for b in spans[i + 1:])
    # each child's saved graph scores what its record says; the controller saw every result
    for r in ok:
        graph = NetGraph.load(result.path(r))
        assert accuracy(graph, task) == pytest.approx(r.val_acc, abs=1e-9)
        assert r.params == graph.param_count()
        assert dict(sum(controller.seen, []))[r.arch] == pytest.approx(r.val_acc)
    accs = [r.val_acc for r in result.leaderboard]
    assert accs == sorted(accs, reverse=True)
    rows = json.loads((result.directory / "leaderboard.json").read_text())
    assert [row["key"] for row in rows] == [r.key for r in result.leaderboard]


def test_children_start_from_their_parents_weights(digits_search) -> None:
    """A child before training computes its parent's function: the same validation accuracy
    as the parent it was built from (measured here, independently of the trial)."""
    result, task, base_acc, _, _ = digits_search
    parents = json.loads((result.directory / "search.json").read_text())["parents"]
    assert parents["0"]["parent_acc"] == base_acc
    for r in (r for r in result.records if r.ok):
        parent = NetGraph.load(parents[str(r.generation)]["parent"])
        assert r.val_acc_before == pytest.approx(accuracy(parent, task), abs=1e-12), r.key


def test_failed_children_are_recorded_and_the_search_goes_on(digits_search) -> None:
    result, _, _, controller, _ = digits_search
    by_arch = {r.arch: r for r in result.records}
    raised, diverged = by_arch["raises"], by_arch["diverges"]
    assert raised.status == diverged.status == "failed"
    assert "OperatorError" in raised.error and "no_such_layer" in raised.error
    assert "DivergedError" in diverged.error
    assert raised.checkpoint is None and raised.val_acc is None
    # the controller was told they failed (None), and the search went on to generation 1
    first = dict(controller.seen[0])
    assert first["raises"] is None and first["diverges"] is None
    assert len(controller.seen) == 2 and result.done
    assert any(r.ok and r.generation == 1 for r in result.records)


def test_searches_driven_from_ray_tasks_share_the_cluster_without_deadlock(
        tmp_path: Path) -> None:
    """Two searches driven from Ray tasks at once on the session's 2 CPUs, as campaigns run
    in parallel on a cluster: run_search inside a task uses the task's own connection, the
    drivers hold no CPU (driver_task_options), the trials of both share the CPUs, and both
    searches finish."""
    import ray

    from growth.cluster import driver_task_options

    task = digits_task()
    base, acc = trained_base(task, tmp_path / "base")
    space = small_space(base)

    @ray.remote(**driver_task_options())
    def drive(i: int, task: Any, space: Any) -> list[str]:
        from growth.controllers import make_controller
        from growth.controllers.driver import Budget, Resources, run_search
        from growth.controllers.trial import TrialSpec

        controller = make_controller("random", space, {"wider_actions": 1,
                                                       "deeper_actions": 1}, seed=i)
        result = run_search(tmp_path / f"run{i}", tmp_path / "base", controller, space, task,
                            TrialSpec(train=CHILD_TRAIN), Budget(children=2, generations=1),
                            Resources(concurrency=1, max_failures=0), parent_acc=acc)
        return [r.key for r in result.records if r.ok]

    done = ray.get([drive.remote(i, task, space) for i in range(2)], timeout=300)
    assert all(done), done


def _cli(*args: str, ray_address: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "growth.cli", *args, "--ray-address",
                             ray_address, "--quiet"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _trials_of(run: Path, key: str) -> list[str]:
    """The Tune experiments (run/tune/gen<g>-a<attempt>) holding a finished trial of `key`,
    one entry per trial; the ray backend keeps no trial folders."""
    return [path.relative_to(run / "tune").parts[0]
            for path in (run / "tune").glob("gen*-a*/*/checkpoint_*/child.json")
            if json.loads(path.read_text())["key"] == key]


@pytest.mark.parametrize("backend", ["ray", "tune"])
def test_a_killed_search_resumes_to_the_same_leaderboard(tmp_path: Path, ray_session: Any,
                                                         backend: str) -> None:
    """SIGKILL the driver while generation 1 runs; `growth resume` keeps every finished
    child (none trained again) and ends where an uninterrupted search ends (trained here,
    in-process: test_search_pool shows every backend trains the same children). The killed
    driver's actors or trials go with it (Ray ends an owner's actors), so the resume finds
    the session's CPUs free."""
    from growth.commands.search import search_config as run_search_config

    cfg = search_config(tmp_path, children=3, backend=backend)
    (tmp_path / "local").mkdir()  # the reference in this process: every backend's children
    local = search_config(tmp_path / "local", children=3, backend="local")  # are the same
    reference = run_search_config(local, tmp_path / "reference")
    ref = {r.key: r for r in read_records(tmp_path / "reference" / "children.jsonl")}

    run = tmp_path / "killed"
    records = run / "children.jsonl"
    proc = _cli("search", str(cfg), "--out", str(run), ray_address=ray_session.address)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if any(r.generation == 1 for r in read_records(records)):
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()[0]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = records.read_text().splitlines()
    killed_experiments = {p.name for p in (run / "tune").glob("gen*-a*")}
    done_before = {json.loads(line)["key"] for line in before}
    assert len(done_before) < len(ref), "the kill came after the last child"

    resumed = _cli("resume", str(run), ray_address=ray_session.address)
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out
    after = records.read_text().splitlines()
    assert after[:len(before)] == before  # what finished before the kill is kept as it was
    keys = [json.loads(line)["key"] for line in after]
    assert len(keys) == len(set(keys)) == len(ref)  # nothing trained twice, nothing missing
    for line in after[len(before):]:  # trained once: by the resume (attempt 1), or by a
        key, attempt = json.loads(line)["key"], json.loads(line)["attempt"]  # trial of the
        if backend == "ray":  # killed driver that finished unrecorded (adopted, attempt 0)
            assert attempt == 1, key
            continue
        trials = _trials_of(run, key)
        assert len(trials) == 1 and (attempt == 0) == (trials[0] in killed_experiments), (
            key, attempt, trials, killed_experiments)
    final = {r.key: r for r in read_records(records)}
    for key, r in ref.items():
        assert (final[key].arch, final[key].val_acc, final[key].params) == (r.arch, r.val_acc,
                                                                         r.params), key
    board = json.loads((run / "leaderboard.json").read_text())
    ref_board = json.loads((tmp_path / "reference" / "leaderboard.json").read_text())
    assert [(b["key"], b["val_acc"]) for b in board] == [(b["key"], b["val_acc"])
                                                         for b in ref_board]
    summary = json.loads((run / "search_metrics.json").read_text())
    assert summary["best"] == reference["best"]


TWO_NODES = r"""
import json, sys
from pathlib import Path
from ray.cluster_utils import Cluster
sys.path.insert(0, sys.argv[2])
from searchkit import CHILD_TRAIN, digits_task, small_space, trained_base
from growth.controllers import make_controller
from growth.controllers.driver import Budget, Resources, SearchProgress, run_search
from growth.controllers.pool import WorkerPool
from growth.controllers.trial import TrialSpec

tmp, backend = Path(sys.argv[1]), sys.argv[3]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
worker = cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
nodes = {"head": cluster.head_node.node_id, "worker": worker.node_id}
task = digits_task()
base, acc = trained_base(task, tmp / "base")
space = small_space(base)
controller = make_controller("random", space, {"wider_actions": 1, "deeper_actions": 1})
removed = {}

def on_child(record, board):
    if record.generation == 1 and not removed:  # the worker goes while generation 1 runs
        removed["after"] = [r.key for r in board] + ([] if record.ok else [record.key])
        cluster.remove_node(worker)

pool = None
if backend == "ray":  # a pool started and placed by an earlier search, as a campaign holds it
    import ray
    ray.init(address=cluster.address)
    pool = WorkerPool()
    pool.start(2, 1.0, 0.0)
    for ref in pool.waiting():
        ray.wait([ref])
        pool.placed(ref)
result = run_search(tmp / "run", tmp / "base", controller, space, task,
                    TrialSpec(train=CHILD_TRAIN), Budget(children=2, generations=3),
                    Resources(concurrency=2, max_failures=2), parent_acc=acc,
                    ray_address=cluster.address, progress=SearchProgress(on_child=on_child),
                    backend=backend, pool=pool)
if pool is not None:
    pool.close()
    ray.shutdown()
print(json.dumps({"nodes": nodes, "removed_after": removed.get("after"),
                  "done": result.done,
                  "records": [r.to_json() for r in result.records]}))
cluster.shutdown()
"""


@pytest.mark.parametrize("backend", ["ray"])  # the default Ray backend (Tune's placement: Ray's)
def test_two_node_cluster_places_trials_on_both_and_survives_losing_one(tmp_path: Path,
                                                                        backend: str) -> None:
    """Children of 1 CPU on two nodes of 1 CPU: the first generation trains one child on each
    (on `ray`, the pool's two actors, placed one per node); the worker node goes while
    generation 1 runs, and the search ends on the head (a lost child retried there; on
    `ray`, its actor replaced by one that waits for room and gets no work)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", TWO_NODES, str(tmp_path),
                           str(ROOT / "tests"), backend], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    records = {r["key"]: r for r in out["records"]}
    first = [r for r in records.values() if r["generation"] == 0]
    assert {r["node"] for r in first} == set(out["nodes"].values())  # one trial on each node
    assert out["done"] and out["removed_after"]
    for key in out["removed_after"]:  # every child finished before the loss is still there
        assert records[key]["status"] == "ok"
        NetGraph.load(tmp_path / "run" / records[key]["checkpoint"])
    later = [r for r in records.values() if r["generation"] == 2]
    assert later and all(r["node"] == out["nodes"]["head"] for r in later)
    on_disk = {r.key for r in read_records(tmp_path / "run" / "children.jsonl")}
    assert on_disk == set(records)
