"""The search as a service REC asks through `ctx.searcher`, and growth that adds capacity:
symmetry-breaking noise, one controller per campaign (checkpointed, resumed), generations
that grow from the best child with the state following, the parent as a candidate, and
children that go on from the parent's moments. Children run in this process (the local
backend), so no test here needs Ray."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from graphgen import single_thread  # noqa: F401 (fixture)
from growth.controllers.driver import RAY_FIXED_S, RAY_START_S, choose_backend
from growth.controllers.records import read_records
from growth.search_spaces import make_space
from growth.search_spaces.networks import add_head, mlp
from searchkit import all_children_reported

from growth.campaign import Campaign, resume_run
from growth.checkpoint import latest_checkpoint, read_checkpoint
from growth.config import load_config
from growth.data import build_stream
from growth.graph import NetGraph
from growth.io import load_tensors
from growth.model import Model
from growth.rundir import read_run_id
from growth.scenarios import labelers
from growth.searching import SearchOutcome, SearchRequest
from growth.strategies import Context, make_strategy
from growth.train import TrainConfig, evaluate, fit, learn_task

pytestmark = pytest.mark.usefixtures("single_thread")

SEARCH = {"controller": "eas", "children": 2, "generations": 1, "epochs": 1,
          "backend": "local", "controller_params": {"wider_actions": 1, "deeper_actions": 1},
          "space": {"widths": {"fc": [16, 24, 32, 48]}}}
CONFIG = {
    "name": "svc", "seed": 3, "threads": 1,
    "data": {"dataset": "digits", "stream": "permuted", "n_tasks": 3,
             "max_train_per_task": 240},
    "model": {"kind": "mlp", "hidden": [16]},
    "train": {"epochs": 2, "batch_size": 32, "lr": 0.05},
    "strategy": {"name": "rec", "compress": False, "search": SEARCH, "expansion": "shared",
                 "owners": False},  # the search machinery on Net2Net children, every weight
}


def write(tmp: Path, name: str = "c", n_tasks: int = 3, data: dict | None = None,
          **search: Any) -> Path:
    cfg = json.loads(json.dumps(CONFIG))
    cfg["data"].update(n_tasks=n_tasks, **(data or {}))
    cfg["strategy"]["search"].update(search)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(tmp: Path, name: str, n_tasks: int = 3, data: dict | None = None, **search: Any
        ) -> dict[str, Any]:
    return Campaign(load_config(write(tmp, name, n_tasks, data, **search)), tmp / name).start()


def checkpoint(run_dir: Path, task: int | None = None) -> Any:
    """A run's checkpoint (the newest, or task `task`'s), read as resume reads it."""
    path = latest_checkpoint(run_dir) if task is None else \
        run_dir / "checkpoints" / f"task_{task:03d}"
    n = len(json.loads((run_dir / "metrics.json").read_text())["tasks"])
    return read_checkpoint(path, read_run_id(run_dir), n, make_strategy("rec", {"owners": False}))


def controller_state(run_dir: Path, task: int | None = None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    ckpt = checkpoint(run_dir, task)
    return ({k: v for k, v in ckpt.tensors.items() if k.startswith("controller/")},
            ckpt.extra.get("controller", {}))


def final_val(run_dir: Path, task: int) -> float:
    """The validation accuracy on task `task` of the network its checkpoint holds."""
    tasks = build_stream({**CONFIG["data"], "seed": CONFIG["seed"]})
    graph = checkpoint(run_dir, task).graph
    ctx = Context(Model(graph), tasks[task], [], *labelers("task"), torch.device("cpu"))
    return evaluate(ctx, tasks[task], "val")


# ---- growth that adds capacity ---------------------------------------------------------------
def _copies_after_steps(noise: float, steps: int) -> float:
    """Largest gap between a widened unit's copy and its original (incoming weights) after
    `steps` SGD steps with momentum on digits, through the space's own widening."""
    torch.manual_seed(0)
    task = build_stream({"dataset": "digits", "stream": "split", "n_tasks": 1, "seed": 0})[0]
    g = add_head(mlp(task.input_shape, [8]), "t0", task.n_classes)
    space = make_space({"widths": {"fc": [8, 16]}, "noise": noise}, g)
    child, [record] = space.apply(g, [{"op": "net2wider", "node": "fc1", "width": 16,
                                       "seed": 0}])
    origin = record.index_maps["fc1.weight"][0]
    ctx = Context(Model(child), task, [], *labelers("task"), torch.device("cpu"))
    fit(ctx, make_strategy("finetune"), TrainConfig(epochs=1, lr=0.05, batch_size=8), seed=1,
        epochs=max(1, steps // 100))
    w = ctx.model.graph.node("fc1").tensors["weight"]
    return max(float((w[j] - w[origin[j]]).abs().max()) for j in range(8, 16))


def test_copies_stay_equal_without_noise_and_separate_with_the_default() -> None:
    assert make_space(None, add_head(mlp((4,), [3]), "t0", 2)).spec.noise == 1e-2  # EAS
    assert _copies_after_steps(0.0, 200) == 0.0  # identical gradients forever: no capacity
    spread = _copies_after_steps(1e-2, 200)
    assert spread > 1e-2  # apart by more than the initial noise: they learn different things


def test_deepening_noise_starts_the_inserted_layer_near_the_identity() -> None:
    g = add_head(mlp((6,), [5]), "t0", 3)
    space = make_space(None, g)
    assert space.spec.deeper_noise == 1e-3
    [option] = space.deeper_options(g)
    child, _ = space.apply(g, [option.action])
    w = child.node(f"{option.action['after']}_deep1").tensors["weight"]
    gap = (w - torch.eye(5)).abs()
    assert 0 < float(gap.max()) <= 1e-3 and float(gap.min()) < 1e-3


# ---- the seam, with a searcher that stands in for the controllers ------------------------------
class Scripted:
    """A searcher that returns what it is told and keeps every request."""

    def __init__(self, widen: bool) -> None:
        self.widen, self.requests = widen, []

    def search(self, ctx: Context, request: SearchRequest) -> SearchOutcome:
        from growth.ops import net2wider

        self.requests.append((request, ctx.model.graph, ctx.task))
        state = ({"rng": torch.tensor([len(self.requests)], dtype=torch.uint8)},
                 {"updates": len(self.requests)})
        if not self.widen:
            return SearchOutcome(None, [], {"expansion": "parent", "children": 1}, state)
        result = net2wider(ctx.model.graph, "fc1", 24, noise=0.01, seed=0)
        return SearchOutcome(result.graph, [result.record],
                             {"expansion": [{"op": "net2wider"}], "children": 1}, state)


@pytest.mark.parametrize("widen", [False, True])
def test_rec_asks_the_searcher_from_the_trained_network_and_keeps_its_controller(
        widen: bool) -> None:
    tasks = build_stream({"dataset": "digits", "stream": "permuted", "n_tasks": 3,
                          "max_train_per_task": 160, "seed": 1})
    torch.manual_seed(0)
    g = mlp((1, 8, 8), [16])
    for t in tasks:
        g = add_head(g, f"t{t.index}", t.n_classes)
    model = Model(g)
    rec = make_strategy("rec", {"compress": False, "search": {"margin": 0.02}})
    searcher = Scripted(widen)
    cfg = TrainConfig(epochs=1, lr=0.05)
    vals = []
    for t in tasks:
        ctx = Context(model, t, tasks[:t.index], *labelers("task"), torch.device("cpu"),
                      seed=t.index, searcher=searcher)
        learn_task(ctx, rec, cfg, seed=t.index)
        vals.append(evaluate(ctx, t, "val"))
    assert len(searcher.requests) == 2  # tasks 1 and 2, never the first
    first, second = (r for r, _, _ in searcher.requests)
    assert first.controller_state is None  # a fresh controller at the first search ...
    tensors, extra = second.controller_state  # ... then the one the first search returned
    assert torch.equal(tensors["rng"], torch.tensor([1], dtype=torch.uint8))
    assert extra == {"updates": 1}
    assert rec.extra["controller"] == {"updates": 2}
    assert torch.equal(rec.state["controller/all/rng"], torch.tensor([2], dtype=torch.uint8))
    assert first.settings.margin == 0.02 and first.train is cfg
    name, params = first.child_strategy  # children pay REC's own loss, without searching
    assert name == "rec" and params["search"] is False and params["compress"] is False
    assert params["lambda"] == rec.params.lam
    for request, parent, task in searcher.requests:  # from the network trained on the task
        ctx = Context(Model(parent), task, [], *labelers("task"), torch.device("cpu"))
        assert request.parent_acc == evaluate(ctx, task, "val")
    assert (model.graph.shape("fc1")[0] == 24) is widen
    fisher = {k: v for k, v in rec.state.items() if k.startswith("fisher/0/")}
    params = model.named_parameters()
    assert all(v.shape == params[k.split("/", 2)[2]].shape for k, v in fisher.items())


def test_rec_refuses_to_search_without_a_searcher() -> None:
    task = build_stream({"dataset": "digits", "stream": "permuted", "n_tasks": 2,
                         "max_train_per_task": 64, "seed": 0})
    g = add_head(add_head(mlp((1, 8, 8), [8]), "t0", 10), "t1", 10)
    model, rec = Model(g), make_strategy("rec", {"compress": False})
    learn_task(Context(model, task[0], [], *labelers("task"), torch.device("cpu")), rec,
               TrainConfig(epochs=1))
    with pytest.raises(Exception, match="needs a searcher"):
        learn_task(Context(model, task[1], task[:1], *labelers("task"), torch.device("cpu")),
                   rec, TrainConfig(epochs=1))


# ---- the service in a campaign (children in this process) ---------------------------------------
def test_one_controller_learns_across_tasks_and_its_state_is_checkpointed(tmp_path: Path
                                                                           ) -> None:
    m = run(tmp_path, "a")
    tensors, extra = controller_state(tmp_path / "a")
    assert any(k.startswith("controller/all/policy/") for k in tensors)
    assert extra["updates"] == 2  # one REINFORCE update per task's generation, one controller
    details = m["details"]["rec"]
    assert [details[t]["children"] for t in ("1", "2")] == [2, 2]
    after_task_1, _ = controller_state(tmp_path / "a", 1)
    moved = [k for k, v in tensors.items() if k.startswith("controller/all/policy/")
             and not torch.equal(v, after_task_1[k])]
    assert moved  # task 2's update changed the policy task 1 left behind


def test_a_resumed_campaign_gives_the_same_R_and_controller(tmp_path: Path) -> None:
    full = run(tmp_path, "full")
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    shutil.rmtree(part / "checkpoints" / "task_002")  # as if killed after task 2's search
    resumed = resume_run(part)
    assert resumed["R"] == full["R"]
    a, b = controller_state(tmp_path / "full"), controller_state(part)
    assert a[1] == b[1] and sorted(a[0]) == sorted(b[0])
    assert all(torch.equal(a[0][k], b[0][k]) for k in a[0])


# a campaign process SIGKILLed mid-search: 28 s on a loaded machine; the in-process resume
# above checks the same R and controller in the fast suite
@pytest.mark.slow
def test_a_kill_mid_search_resumes_to_the_same_R_and_controller(tmp_path: Path) -> None:
    cfg = write(tmp_path, "k")
    full = Campaign(load_config(cfg), tmp_path / "full").start()
    run_dir = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "growth", "run", str(cfg), "--out",
                             str(run_dir), "--quiet"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = run_dir / "work" / "task_002" / "search" / "children.jsonl"
    start = time.time()
    while not records.exists() and proc.poll() is None and time.time() - start < 120:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = resume_run(run_dir)
    assert resumed["R"] == full["R"]
    a, b = controller_state(tmp_path / "full"), controller_state(run_dir)
    assert a[1] == b[1] and all(torch.equal(a[0][k], b[0][k]) for k in a[0])


def test_later_generations_grow_from_the_best_child_with_its_state(tmp_path: Path) -> None:
    """Generation 1 grows from generation 0's winner: its children's lineage starts with the
    winner's actions; the kept network is the last winner rebuilt from the first parent, and
    REC's state follows it (the campaign's checkpoint checks every shape)."""
    m = run(tmp_path, "g", n_tasks=2, data={"max_train_per_task": 600}, generations=2,
            controller="random", epochs=2, lr_scale=1.0,
            controller_params={"wider_actions": 2, "deeper_actions": 1})
    folder = tmp_path / "g" / "work" / "task_001" / "search"
    state = json.loads((folder / "search.json").read_text())
    records = read_records(folder / "children.jsonl")
    gen1 = [r for r in records if r.generation == 1]
    assert len(gen1) == 2
    winner = state["parents"]["1"]
    assert winner["parent"] != state["root"], "generation 0 had no child beating the parent"
    prefix = [r for r in records if Path(winner["parent"]).name == r.key][0].lineage
    assert all(r.lineage[:-1] == prefix for r in gen1)
    assert all(r.lineage[-1] == r.actions for r in records)
    expansion = m["details"]["rec"]["1"]["expansion"]
    assert expansion == [a for step in state["lineage"] for a in step]
    graph = checkpoint(tmp_path / "g", 1).graph
    chosen = NetGraph.load(state["parent"])
    assert graph.to_dict() == chosen.to_dict()


def test_the_parent_stays_when_no_child_beats_it_by_the_margin(tmp_path: Path) -> None:
    m = run(tmp_path, "kept", margin=1.0)  # no accuracy beats the parent's by 1
    details = m["details"]["rec"]
    for t in ("1", "2"):
        assert details[t]["expansion"] == "parent" and details[t]["parent_kept"] == 1
        assert details[t]["children"] == 2
    assert m["search"]["parent_kept"] == 2 and m["search"]["searches"] == 2
    base = checkpoint(tmp_path / "kept", 0).graph
    last = checkpoint(tmp_path / "kept", 2).graph
    assert last.to_dict() == base.to_dict()


def test_search_never_lowers_the_new_tasks_validation_accuracy(tmp_path: Path) -> None:
    off = Campaign(load_config(write(tmp_path, "off", n_tasks=2, enabled=False)),
                   tmp_path / "off").start()
    on = Campaign(load_config(write(tmp_path, "on", n_tasks=2)), tmp_path / "on").start()
    assert on["R"][1] == off["R"][1]  # task 0 alike in both
    assert final_val(tmp_path / "on", 1) >= final_val(tmp_path / "off", 1)
    detail = on["details"]["rec"]["1"]
    assert detail["parent_acc"] == pytest.approx(final_val(tmp_path / "off", 1), abs=1e-12)


def test_children_go_on_from_the_parents_moments(tmp_path: Path) -> None:
    """The parent folder holds the optimizer's moments; a child built with no actions'
    effect on a layer starts that layer's momentum where the parent left it."""
    from growth.controllers.trial import MOMENTS

    run(tmp_path, "mo", n_tasks=2)
    parent = tmp_path / "mo" / "work" / "task_001" / "search" / "parent"
    moments = load_tensors(parent / MOMENTS)
    assert "fc1.weight/momentum_buffer" in moments
    assert float(moments["fc1.weight/momentum_buffer"].abs().sum()) > 0


def test_auto_backend_runs_children_here_until_ray_would_save_time() -> None:
    """(1 - 1/parallel) of the children's training, against RAY_FIXED_S (plus RAY_START_S
    while the pool's actors are not started): 4 children of t s on 2 CPUs save 2t s;
    nothing known yet: here."""
    fixed, start = RAY_FIXED_S, RAY_FIXED_S + RAY_START_S
    assert choose_backend("auto", None, 4, 2, cpus=2) == "local"
    assert choose_backend("auto", None, 4, 2, cpus=2, started=True) == "local"
    assert choose_backend("auto", start / 2 + 0.1, 4, 2, cpus=2) == "ray"
    assert choose_backend("auto", start / 2 - 0.1, 4, 2, cpus=2) == "local"
    assert choose_backend("auto", fixed / 2 + 0.1, 4, 2, cpus=2, started=True) == "ray"
    assert choose_backend("auto", fixed / 2 - 0.1, 4, 2, cpus=2, started=True) == "local"
    assert choose_backend("auto", 100.0, 4, 1, cpus=8) == "local"  # nothing runs at once
    assert choose_backend("auto", 100.0, 4, 2, cpus=1) == "local"
    assert choose_backend("local", 100.0, 4, 2, cpus=8) == "local"
    assert choose_backend("ray", None, 4, 2, cpus=8) == "ray"
    assert choose_backend("auto", start / 2, 4, 2, cpus=2) == "local"  # saves just the cost


def test_run_search_hands_the_driver_its_defaults_storage_name_and_callbacks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `run_search` builds for its driver (a stand-in that records it): the backend
    "ray" and seed 0 by default, the search directory in the storage under the given name,
    and the caller's Tune callbacks."""
    from growth.controllers import driver as drv

    made: dict[str, Any] = {}

    class Recorded:
        def __init__(self, search, state, *args: Any, **kwargs: Any) -> None:
            made.update(search=search, state=state, **kwargs)

        def run(self) -> str:
            return "ran"

    monkeypatch.setattr(drv, "_Driver", Recorded)
    parent = _tiny_parent(tmp_path)
    marker = object()
    assert drv.run_search(tmp_path / "s", parent, Fixed(), None, None,
                          storage=str(tmp_path / "shared"), name="mine",
                          callbacks=[marker]) == "ran"
    assert made["backend"] == "ray" and made["state"]["seed"] == 0
    assert made["search"].storage == str(tmp_path.resolve() / "shared" / "mine")
    assert made["callbacks"] == [marker]


def test_auto_counts_the_machines_cpus_and_one_where_it_cannot_tell(monkeypatch) -> None:
    """Without `cpus`, "auto" runs as many children at once as os.cpu_count() gives (at most
    `concurrency`), and one where it gives None: then nothing runs at once, so here."""
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert choose_backend("auto", 100.0, 4, 8) == "ray"
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert choose_backend("auto", 100.0, 4, 8) == "local"


def test_a_finished_search_starts_no_ray_when_resumed(tmp_path: Path) -> None:
    from growth.controllers import make_controller
    from growth.controllers.driver import Budget, run_search
    from growth.controllers.trial import TrialSpec
    from searchkit import digits_task, small_space, trained_base

    task = digits_task()
    base, acc = trained_base(task, tmp_path / "base", hidden=(16,), epochs=1)
    space = small_space(base)
    args = (tmp_path / "s", tmp_path / "base", make_controller("random", space, seed=0), space,
            task, TrialSpec(train=TrainConfig(epochs=1)), Budget(children=2, generations=1))
    first = run_search(*args, parent_acc=acc, backend="local")

    def no_ray() -> Any:
        raise AssertionError("Ray was asked for with nothing left to train")

    again = run_search(*args, parent_acc=acc, backend="ray", connect=no_ray)
    assert [r.key for r in again.records] == [r.key for r in first.records] == [
        "g000c00", "g000c01"]


def test_a_private_expansion_trains_new_units_and_leaves_the_old_heads_where_they_were(
        tmp_path: Path) -> None:
    """REC with `expansion: private`: every child adds units only the new task's head reads
    (widen_private) and trains them with the new head, the network it grew from frozen; on
    fixed inputs each trained child's old head computes the parent's outputs (to float
    summation order: the new units' zero columns join the sums), while its new head moved."""
    from growth.compile import compile_graph

    cfg = write(tmp_path, "p", n_tasks=2, controller="random")
    data = yaml.safe_load(cfg.read_text())
    data["strategy"]["expansion"] = "private"
    cfg.write_text(yaml.safe_dump(data))
    Campaign(load_config(cfg), tmp_path / "p").start()
    folder = tmp_path / "p" / "work" / "task_001" / "search"
    parent = NetGraph.load(folder / "parent")
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    before = compile_graph(parent).eval()(x)
    records = [r for r in read_records(folder / "children.jsonl") if r.ok]
    assert records and all(a["op"] == "widen_private" for r in records for a in r.actions)
    for r in records:
        child = NetGraph.load(folder / r.checkpoint)
        assert child.param_count() > parent.param_count()
        after = compile_graph(child).eval()(x)
        assert torch.allclose(after["t0"], before["t0"], rtol=0, atol=1e-6), r.key  # still
        assert float((after["t1"] - before["t1"]).abs().max()) > 1e-3, r.key  # it learned


class Scored:
    """A controller that proposes fixed children and records what it observes; the
    children's accuracies come from training, so the test reads which one was best."""

    name = "scored"

    def __init__(self, inner: Any) -> None:
        self.inner, self.parents = inner, []

    def propose(self, parent: NetGraph, n: int, exclude: Any = ()) -> list[Any]:
        self.parents.append(parent.to_dict())
        return self.inner.propose(parent, n, exclude)

    def observe(self, results: Any) -> None:
        self.inner.observe(results)

    def state_dict(self) -> Any:
        return self.inner.state_dict()

    def load_state_dict(self, tensors: Any, extra: Any) -> None:
        self.inner.load_state_dict(tensors, extra)


def test_the_next_generation_grows_from_the_best_child_not_another(tmp_path: Path) -> None:
    """Generation 1's parent is generation 0's child with the highest validation accuracy
    (read from the records, independently of the driver's choice), and the controller was
    asked for children of exactly that network."""
    from growth.controllers import make_controller
    from growth.controllers.driver import Budget, run_search
    from growth.controllers.trial import TrialSpec
    from searchkit import digits_task, small_space, trained_base

    task = digits_task()
    base, acc = trained_base(task, tmp_path / "base", hidden=(16,), epochs=1)
    space = small_space(base, exact=False)
    controller = Scored(make_controller("random", space, {"wider_actions": 2,
                                                          "deeper_actions": 1}, seed=4))
    result = run_search(tmp_path / "s", tmp_path / "base", controller, space, task,
                        TrialSpec(train=TrainConfig(epochs=2, lr=0.05)),
                        Budget(children=3, generations=2), seed=4, parent_acc=0.0,
                        backend="local")
    first = [r for r in result.records if r.generation == 0 and r.ok]
    best = max(first, key=lambda r: (r.val_acc, -r.params))
    worst = min(first, key=lambda r: r.val_acc)
    assert best.val_acc > worst.val_acc  # a real choice was made
    state = json.loads((tmp_path / "s" / "search.json").read_text())
    assert state["parents"]["1"]["parent"] == str(tmp_path / "s" / best.checkpoint)
    assert controller.parents[1] == NetGraph.load(tmp_path / "s" / best.checkpoint).to_dict()


def _digits_parent(tmp_path: Path) -> tuple[Any, Path, Any]:
    """One split-digits task (40 training samples) and its MLP parent (16 units: 64x16+16 +
    16x10+10 = 1210 parameters), saved at tmp_path/parent: (task, folder, graph)."""
    task = build_stream({"dataset": "digits", "stream": "split", "n_tasks": 1,
                         "max_train_per_task": 40})[0]
    graph = add_head(mlp(task.input_shape, [16]), "t0", task.n_classes)
    graph.save(tmp_path / "parent")
    return task, tmp_path / "parent", graph


def _record_generation(folder: Path, accs: tuple[float, ...],
                       params: tuple[int, ...] | None = None) -> None:
    """Generation 0's children as a resumed search finds them: recorded `ok`, child i widening
    fc1 to 20 + 4i (its lineage that one step), of accuracy accs[i] and params[i] (else
    100 + i) parameters."""
    from growth.controllers.records import RECORDS, ChildRecord, append_record, child_key

    folder.mkdir(parents=True, exist_ok=True)
    for i, acc in enumerate(accs):
        key = child_key(0, i)
        actions = [{"op": "net2wider", "node": "fc1", "width": 20 + 4 * i}]
        append_record(folder / RECORDS, ChildRecord(
            key, 0, i, f"fc1={20 + 4 * i}", actions, "ok", val_acc=acc,
            params=params[i] if params else 100 + i, checkpoint=f"children/{key}",
            lineage=[actions]))


class Fixed:
    """A controller that proposes three fixed children and keeps what it observes."""

    name = "fixed"

    def __init__(self) -> None:
        self.observed: list[list[float | None]] = []
        self.asked: list[tuple[dict[str, Any], set[str]]] = []  # (parent, exclude) per call

    def propose(self, parent: NetGraph, n: int, exclude: Any = ()) -> list[Any]:
        from growth.controllers.base import Proposal

        self.asked.append((parent.to_dict(), set(exclude)))
        return [Proposal(({"op": "net2wider", "node": "fc1", "width": w},), f"fc1={w}")
                for w in (20, 24, 28)][:n]

    def observe(self, results: Any) -> None:
        self.observed.append([acc for _, acc in results])

    def state_dict(self) -> Any:
        return {}, {"controller": self.name}

    def load_state_dict(self, tensors: Any, extra: Any) -> None:
        pass


@pytest.mark.parametrize(("accs", "margin", "chosen"), [
    ((0.6, 0.9, 0.7), 0.0, 1),  # the best child, not the first, last or worst
    ((0.8, 0.55, 0.65), 0.0, 0),
    ((0.6, 0.9, 0.7), 0.5, None),  # 0.9 does not beat the parent's 0.5 by 0.5: kept
    ((0.6, 0.75, 0.7), 0.25, None),  # 0.75 only equals 0.5 + 0.25: kept
])
def test_the_driver_continues_from_the_best_child_of_a_finished_generation(
        tmp_path: Path, accs: tuple[float, ...], margin: float, chosen: int | None) -> None:
    """A generation whose children are already recorded (as a resumed search finds them)
    trains nothing; the driver then takes the child of highest validation accuracy as the next
    parent, with its accuracy and lineage, if it beats the parent by more than the margin."""
    from growth.controllers.driver import Budget, run_search
    from growth.controllers.records import child_key

    task, parent, _ = _digits_parent(tmp_path)
    folder = tmp_path / "s"
    _record_generation(folder, accs)
    controller = Fixed()
    result = run_search(folder, parent, controller, None, task, budget=Budget(3, 1), seed=0,
                        parent_acc=0.5, margin=margin, backend="local")
    assert controller.observed == [list(accs)]  # in proposal order, nothing trained
    if chosen is None:
        assert result.parent == parent.resolve() and result.parent_acc == 0.5
        assert result.kept == 1 and result.lineage == [] and not result.replaced
    else:
        key = child_key(0, chosen)
        assert result.parent == folder.resolve() / "children" / key
        assert result.parent_acc == accs[chosen] and result.kept == 0
        assert result.lineage == [[{"op": "net2wider", "node": "fc1", "width": 20 + 4 * chosen}]]
        state = json.loads((folder / "search.json").read_text())
        assert state["parent_params"] == 100 + chosen  # the new parent's size, for its score


def test_a_best_child_whose_checkpoint_lies_outside_the_search_is_refused(tmp_path: Path
                                                                          ) -> None:
    """A forged record whose checkpoint points out of the search directory cannot become the
    parent: the error names it as the best child."""
    from growth.controllers.driver import Budget, run_search
    from growth.controllers.records import RECORDS, ChildRecord, append_record

    from growth.errors import RunDirError

    task, parent, _ = _digits_parent(tmp_path)
    folder = tmp_path / "s"
    _record_generation(folder, (0.6, 0.7))
    append_record(folder / RECORDS, ChildRecord("g000c02", 0, 2, "fc1=28", [], "ok",
                                                val_acc=0.9, params=102, checkpoint="../parent"))
    with pytest.raises(RunDirError, match=r"^the best child .*parent resolves to"):
        run_search(folder, parent, Fixed(), None, task, budget=Budget(3, 1), seed=0,
                   parent_acc=0.5, backend="local")


class FixedAndBroken(Fixed):
    """Fixed's three children and a fourth that widens a layer the parent lacks (it fails)."""

    def propose(self, parent: NetGraph, n: int, exclude: Any = ()) -> list[Any]:
        from growth.controllers.base import Proposal

        return [*super().propose(parent, n, exclude),
                Proposal(({"op": "net2wider", "node": "nope", "width": 20},), "nope=20")][:n]


def test_children_trained_here_give_the_controller_their_recorded_accuracies(
        tmp_path: Path) -> None:
    """The local backend hands the controller each child's validation accuracy as its record
    holds it, in proposal order, and None for the child that failed (recorded with its error,
    its training folder removed)."""
    from growth.controllers.driver import Budget, run_search
    from growth.controllers.trial import TrialSpec

    torch.manual_seed(0)  # the parent's initial weights
    task, parent, graph = _digits_parent(tmp_path)
    space = make_space({"widths": {"fc": [16, 20, 24, 28]}, "noise": 0.0}, graph)
    controller = FixedAndBroken()
    result = run_search(tmp_path / "s", parent, controller, space, task,
                        TrialSpec(train=TrainConfig(epochs=1, batch_size=32, lr=0.05)),
                        Budget(4, 1), seed=0, parent_acc=0.5, backend="local")
    records = sorted(result.records, key=lambda r: r.index)
    assert [r.ok for r in records] == [True, True, True, False]
    assert "no node named 'nope'" in records[3].error  # the trial's own error
    assert controller.observed == [[r.val_acc for r in records[:3]] + [None]]
    assert sorted(p.name for p in (tmp_path / "s" / "children").iterdir()) == [
        r.key for r in records[:3]]


def test_each_child_trains_from_a_seed_drawn_from_the_searchs_seed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Search seed 5: child i of generation 0 trains from (5 x 1000003 + i x 104729 + 11)
    mod (2^31 - 1), the trial's own formula, not from seed 0's."""
    from growth.controllers import driver as drv
    from growth.controllers.driver import Budget, run_search

    seeds: list[int] = []
    real = drv.train_child

    def recorded(config: Any, *args: Any, **kwargs: Any) -> Any:
        seeds.append(config["seed"])
        return real(config, *args, **kwargs)

    monkeypatch.setattr(drv, "train_child", recorded)
    task, parent, graph = _digits_parent(tmp_path)
    space = make_space({"widths": {"fc": [16, 20, 24]}}, graph)
    run_search(tmp_path / "s", parent, Fixed(), space, task, budget=Budget(2, 1), seed=5,
               backend="local")
    assert seeds == [(5 * 1_000_003 + i * 104_729 + 11) % (2**31 - 1) for i in range(2)]


def test_a_local_search_ends_with_every_child_reported(tmp_path: Path) -> None:
    """One child trained here: the search returns its record (a generation left with
    children unreported fails the test)."""
    from growth.controllers.driver import Budget, run_search

    task, parent, graph = _digits_parent(tmp_path)
    space = make_space({"widths": {"fc": [16, 20]}}, graph)
    with all_children_reported():
        result = run_search(tmp_path / "s", parent, Fixed(), space, task, budget=Budget(1, 1),
                            backend="local")
    [record] = result.records
    assert record.key == "g000c00" and record.ok and result.generations == 1
    saved = json.loads((tmp_path / "s" / "search.json").read_text())["elapsed_s"]
    assert 0.0 < saved <= result.elapsed_s  # the clock is saved, for a resume to go on from


def test_the_progress_hears_each_child_with_the_leaderboard_so_far(tmp_path: Path) -> None:
    """Each generation's start is told its number and children to train; after each child
    the progress display gets its record and the leaderboard of the children so far, best
    validation accuracy first (what the bar's "best" shows); after the generation, its
    number and the whole leaderboard."""
    from growth.controllers.driver import Budget, SearchProgress, run_search

    heard: list[tuple[str, list[str]]] = []
    seen: dict[str, float] = {}

    def on_child(record: Any, board: list[Any]) -> None:
        seen[record.key] = record.val_acc
        heard.append((record.key, [r.key for r in board]))

    task, parent, graph = _digits_parent(tmp_path)
    space = make_space({"widths": {"fc": [16, 20, 24, 28]}}, graph)
    starts: list[tuple[int, int]] = []
    ends: list[tuple[int, list[str]]] = []
    run_search(tmp_path / "s", parent, Fixed(), space, task, budget=Budget(3, 2),
               backend="local", progress=SearchProgress(
                   on_child=on_child, on_generation=lambda g, n: starts.append((g, n)),
                   on_generation_end=lambda g, board: ends.append((g, [r.key for r in board]))))
    assert starts == [(0, 3), (1, 3)]
    assert ends == [(0, heard[2][1]), (1, heard[-1][1])]
    assert [k for k, _ in heard] == [f"g00{g}c0{i}" for g in (0, 1) for i in range(3)]
    for n, (_, board) in enumerate(heard, start=1):
        so_far = list(seen)[:n]
        assert sorted(board) == sorted(so_far)
        assert seen[board[0]] == max(seen[k] for k in so_far)


def test_a_search_whose_controller_proposes_nothing_ends_after_that_generation(
        tmp_path: Path) -> None:
    """A space with no child left (the controller proposes none) ends the search at once: one
    generation, done, though the budget allows three."""
    from growth.controllers.driver import Budget, run_search

    class Empty(Fixed):
        def propose(self, parent: NetGraph, n: int, exclude: Any = ()) -> list[Any]:
            self.asked.append((parent.to_dict(), set(exclude)))
            return []

    task, parent, graph = _digits_parent(tmp_path)
    controller = Empty()
    result = run_search(tmp_path / "s", parent, controller, make_space({}, graph), task,
                        budget=Budget(2, 3), backend="local")
    assert result.done and result.generations == 1 and result.records == []
    assert len(controller.asked) == 1
    assert json.loads((tmp_path / "s" / "search.json").read_text())["done"] is True


def test_a_child_trains_here_over_the_folder_an_interrupted_driver_left(tmp_path: Path
                                                                       ) -> None:
    """A driver killed mid-child leaves children/.train-<key> (training) and .tmp-<key>
    (adopting): the resumed child trains and is adopted in fresh folders, and nothing left
    there reaches its graph folder."""
    from growth.controllers.driver import Budget, run_search

    task, parent, graph = _digits_parent(tmp_path)
    stale = [tmp_path / "s" / "children" / f".{stage}-g000c00" for stage in ("train", "tmp")]
    for folder in stale:
        folder.mkdir(parents=True)
        (folder / "leftover.txt").write_text("from the killed driver")
    result = run_search(tmp_path / "s", parent, Fixed(), make_space(
        {"widths": {"fc": [16, 20]}}, graph), task, budget=Budget(1, 1), backend="local")
    [record] = result.records
    assert record.ok and not any(folder.exists() for folder in stale)
    assert not (tmp_path / "s" / "children" / "g000c00" / "leftover.txt").exists()


def test_a_later_generation_excludes_what_earlier_ones_trained(tmp_path: Path) -> None:
    """Two generations already recorded: the second is asked for children of the first's best
    child (its saved graph), excluding every architecture the first trained."""
    from growth.controllers.driver import Budget, run_search
    from growth.controllers.records import RECORDS, ChildRecord, append_record, child_key

    from growth.ops import net2wider

    task, parent, base = _digits_parent(tmp_path)
    folder = tmp_path / "s"
    for g, accs in enumerate(((0.6, 0.9, 0.7), (0.8, 0.85, 0.7))):
        for i, acc in enumerate(accs):
            key = child_key(g, i)
            net2wider(base, "fc1", 20 + 4 * i + g).graph.save(folder / "children" / key)
            append_record(folder / RECORDS, ChildRecord(
                key, g, i, f"g{g}:fc1={20 + 4 * i}", [], "ok", val_acc=acc,
                checkpoint=f"children/{key}"))
    controller = Fixed()
    run_search(folder, parent, controller, None, task, budget=Budget(3, 2), seed=0,
               parent_acc=0.5, backend="local")
    (first, before), (second, trained) = controller.asked
    assert first == base.to_dict() and before == set()
    assert second == net2wider(base, "fc1", 24).graph.to_dict()  # child 1 of generation 0
    assert trained == {"g0:fc1=20", "g0:fc1=24", "g0:fc1=28"}


def test_the_service_reports_each_search_to_its_hooks_and_chooses_a_backend(tmp_path: Path
                                                                          ) -> None:
    """`SearchService.search` on the "auto" backend (this process: no child's time is known
    yet) calls on_start(task index, children x generations), on_child(task index, record) per
    finished child in key order and on_end(task index), and keeps the children's mean
    training time for the next search's backend choice."""
    from growth.controllers.records import RECORDS
    from growth.controllers.service import SearchService

    from growth.searching import SearchSettings

    task = build_stream({"dataset": "digits", "stream": "split", "n_tasks": 2,
                         "max_train_per_task": 40})[1]
    torch.manual_seed(0)
    model = Model(add_head(mlp(task.input_shape, [8]), "t1", task.n_classes))
    calls: list[tuple[Any, ...]] = []
    service = SearchService(on_start=lambda i, n: calls.append(("start", i, n)),
                            on_child=lambda i, r: calls.append(("child", i, r.key)),
                            on_end=lambda i: calls.append(("end", i)))
    ctx = Context(model, task, [], lambda t: f"t{t.index}", lambda t, y: y,
                  torch.device("cpu"), seed=0, workdir=tmp_path)
    settings = SearchSettings(controller="random", children=2, generations=1, epochs=1,
                              backend="auto", concurrency=2,
                              space={"widths": {"fc": [8, 12, 16]}})
    with service:
        outcome = service.search(ctx, SearchRequest(settings, TrainConfig(epochs=1)))
    assert calls == [("start", 1, 2), ("child", 1, "g000c00"), ("child", 1, "g000c01"),
                     ("end", 1)]
    records = read_records(tmp_path / "search" / RECORDS)
    assert service.child_s == pytest.approx(sum(r.train_time_s for r in records) / 2)
    assert outcome.summary["children"] == 2


# ---- the driver's pieces that need no Ray: storage, adoption, resume checks, Tune's callback --
def _child_folder(folder: Path, key: str, generation: int, index: int) -> NetGraph:
    """A finished child's folder as a trial leaves it: its graph and its record."""
    from growth.controllers.records import ChildRecord
    from growth.controllers.trial import CHILD_FILE

    graph = add_head(mlp((1, 8, 8), [4 + index]), "t0", 10)
    graph.save(folder)
    record = ChildRecord(key, generation, index, f"fc{4 + index}", [], "ok", val_acc=0.5,
                         params=graph.param_count())
    (folder / CHILD_FILE).write_text(json.dumps(record.to_json()))
    return graph


def test_a_search_directory_keeps_tune_storage_under_itself_or_names_itself_in_shared_storage(
        tmp_path: Path) -> None:
    """Default storage: <dir>/tune; a shared path or URI gets a folder named for the search
    (its `name`, else the directory's name), with no doubled slash; a name that cannot name a
    folder is refused."""
    from growth.controllers.driver import SearchDir

    from growth.errors import ConfigError

    root = (tmp_path / "s").resolve()
    search = SearchDir(tmp_path / "s")
    assert search.root == root and search.storage == str(root / "tune")
    assert (search.records, search.children, search.controller, search.state_file) == (
        root / "children.jsonl", root / "children", root / "controller", root / "search.json")
    assert SearchDir(tmp_path / "s", "s3://bucket/runs/", "n1").storage == "s3://bucket/runs/n1"
    assert SearchDir(tmp_path / "s", "s3://bucket/runs").storage == "s3://bucket/runs/s"
    assert SearchDir(tmp_path / "s", "s3://bucket/runX/", "n1").storage == "s3://bucket/runX/n1"
    assert SearchDir(tmp_path / "s", str(tmp_path / "shared"), "n1").storage == str(
        (tmp_path / "shared").resolve() / "n1")
    assert SearchDir(tmp_path / "s", str(tmp_path / "shared")).storage == str(
        (tmp_path / "shared").resolve() / "s")
    with pytest.raises(ConfigError, match="search name"):
        SearchDir(tmp_path / "s", name="../up")


def test_publish_copies_a_folder_into_storage_and_answers_its_reference(tmp_path: Path
                                                                        ) -> None:
    """A parent published to a local path or a file:// URI lands under storage/<name> with
    every file (a trailing slash aside, the storage's path as given), and its reference is
    the storage's own spelling plus the name."""
    from growth.controllers.driver import _filesystem, publish

    src = tmp_path / "parent"
    (src / "sub").mkdir(parents=True)
    (src / "a.json").write_text("{}")
    (src / "sub" / "b.bin").write_bytes(b"\x00\x01")
    store = tmp_path / "store"
    ref = publish(src, str(store) + "/", "parents/gen000")
    assert ref == f"{store}/parents/gen000"
    assert (store / "parents" / "gen000" / "a.json").read_text() == "{}"
    assert (store / "parents" / "gen000" / "sub" / "b.bin").read_bytes() == b"\x00\x01"
    spaced = tmp_path / "store "  # only slashes are trimmed: a folder may end in a space
    assert publish(src, str(spaced), "p") == f"{spaced}/p"
    assert (spaced / "p" / "a.json").is_file()
    uri = f"file://{tmp_path / 'remote'}"
    assert publish(src, uri, "strategy") == f"{uri}/strategy"
    assert (tmp_path / "remote" / "strategy" / "a.json").is_file()
    fs, path = _filesystem(uri)
    assert path == str(tmp_path / "remote") and fs.type_name == "local"


def _bucket(monkeypatch, path: str) -> Any:
    """pyarrow's in-memory filesystem, standing in for a bucket: every storage reference the
    driver resolves names it, at `path`."""
    from datetime import datetime

    import growth.controllers.driver as driver
    import pyarrow.fs as pafs

    remote = pafs._MockFileSystem(datetime(2020, 1, 1))
    monkeypatch.setattr(driver, "_filesystem", lambda ref: (remote, path))
    return remote


def test_publish_writes_into_a_storage_on_another_filesystem_whatever_its_name_ends_with(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Storage on another filesystem (pyarrow's in-memory one stands in for a bucket): the
    folder is copied there, not to a local path of that name; a storage whose name ends in a
    letter other than "/" keeps it."""
    from growth.controllers.driver import publish

    monkeypatch.chdir(tmp_path)  # a wrong copy to a local relative path would land here
    src = tmp_path / "parent"
    src.mkdir()
    (src / "a.json").write_text("{}")
    remote = _bucket(monkeypatch, "bucketX/")
    assert publish(src, "mock://bucketX/", "parents/gen000") == "mock://bucketX/parents/gen000"
    with remote.open_input_stream("bucketX/parents/gen000/a.json") as f:
        assert f.readall() == b"{}"
    assert not (tmp_path / "bucketX").exists()


def test_orphans_adopt_only_this_generations_unrecorded_children_from_tune_storage(
        tmp_path: Path) -> None:
    """Tune's storage after a driver died: the experiments' (gen*) trial folders of the
    generation that are not recorded yet are adopted into children/<key> (graph and record);
    another generation's, a recorded one, a record whose key is not its own name, a torn
    record and folders outside the experiments are left."""
    from growth.controllers.driver import SearchDir, _orphans
    from growth.controllers.trial import CHILD_FILE

    search = SearchDir(tmp_path / "s")
    store = Path(search.storage)
    graph = _child_folder(store / "gen000-a0" / "g000c01-t1" / "checkpoint_000000",
                          "g000c01", 0, 1)
    _child_folder(store / "gen000-a1" / "g000c02-t2" / "checkpoint_000000", "g000c02", 0, 2)
    _child_folder(store / "gen000-a0" / "g001c00-t3" / "checkpoint_000000", "g001c00", 1, 0)
    _child_folder(store / "gen000-a0" / "g000c00-t4" / "checkpoint_000000", "g000c00", 0, 0)
    _child_folder(store / "gen000-a0" / "forged" / "checkpoint_000000", "g000c03", 0, 4)
    _child_folder(store / "parents" / "g000c05", "g000c05", 0, 5)
    torn = store / "gen000-a0" / "g000c06-t6"
    torn.mkdir(parents=True)
    (torn / CHILD_FILE).write_text('{"key": "g000c06", "generation"')
    (store / "gen-notes").write_text("not an experiment")
    recorded = {"g000c00"}
    found = _orphans(search, 0, recorded)
    assert sorted(r.key for r in found) == ["g000c01", "g000c02"]
    assert recorded == {"g000c00", "g000c01", "g000c02"}
    assert all(r.checkpoint == f"children/{r.key}" and r.val_acc == 0.5 for r in found)
    assert NetGraph.load(search.root / "children" / "g000c01").to_dict() == graph.to_dict()
    assert sorted(p.name for p in search.children.iterdir()) == ["g000c01", "g000c02"]
    assert _orphans(SearchDir(tmp_path / "empty"), 0, set()) == []  # no storage yet


def test_orphans_are_adopted_from_a_remote_storage_past_a_forged_record(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tune's storage on another filesystem (pyarrow's in-memory one stands in for a bucket;
    it lists in name order): a trial folder whose record is not its own child is skipped,
    and the experiment's next trial folder is still read and copied from that filesystem."""
    import pyarrow.fs as pafs
    from growth.controllers.driver import SearchDir, _orphans

    remote = _bucket(monkeypatch, "bucket/s")
    search = SearchDir(tmp_path / "s", storage="mock://bucket")
    for trial, key, index in (("a-forged", "g000c03", 4), ("g000c01-t1", "g000c01", 1)):
        local = tmp_path / "local" / trial
        graph = _child_folder(local, key, 0, index)
        dest = f"bucket/s/gen000-a0/{trial}/checkpoint_000000"
        remote.create_dir(dest, recursive=True)
        pafs.copy_files(str(local), dest, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=remote)
    [record] = _orphans(search, 0, set())
    assert record.key == "g000c01" and record.checkpoint == "children/g000c01"
    assert NetGraph.load(search.root / "children" / "g000c01").to_dict() == graph.to_dict()


def test_an_incomplete_or_misnamed_child_folder_is_not_adopted(tmp_path: Path) -> None:
    """A folder whose graph is missing, or whose record names another child, is not adopted
    (its temporary copy removed, nothing in children/); a complete one replaces what
    children/<key> held, past a temporary copy an interrupted adoption left."""
    from growth.controllers.driver import SearchDir, _adopt

    search = SearchDir(tmp_path / "s")
    src = tmp_path / "src"
    _child_folder(src, "g000c01", 0, 1)
    (search.children / "g000c01").mkdir(parents=True)
    (search.children / "g000c01" / "stale.txt").write_text("old")

    def copy(dest: Path) -> None:
        shutil.copytree(src, dest, dirs_exist_ok=True)

    assert _adopt(search, "g000c02", copy) is None  # its record names g000c01
    (search.children / ".tmp-g000c01").mkdir()  # an adoption an interrupted driver left
    (search.children / ".tmp-g000c01" / "partial.bin").write_bytes(b"\x00")
    record = _adopt(search, "g000c01", copy)
    assert record is not None and record.checkpoint == "children/g000c01"
    assert not (search.children / "g000c01" / "stale.txt").exists()
    assert not (search.children / "g000c01" / "partial.bin").exists()
    (src / "structure.json").unlink()
    assert _adopt(search, "g000c01", copy) is None
    assert sorted(p.name for p in search.children.iterdir()) == ["g000c01"]
    assert (search.children / "g000c01" / "structure.json").is_file()  # the adopted one kept
    assert _adopt(search, "../g000c01", copy) is None


def test_the_tune_recorder_adopts_finished_trials_and_records_failed_ones(tmp_path: Path
                                                                          ) -> None:
    """Tune's callback: a trial that reported ok with a checkpoint is adopted; one that
    reported a failure is recorded failed with its error (or "the trial reported no result"),
    and one whose process failed with the last line of its error; each goes to children.jsonl
    and to `on_child`; pickled, the callback leaves the live hook behind."""
    import pickle
    from types import SimpleNamespace

    from growth.controllers.driver import Recorder, SearchDir

    search = SearchDir(tmp_path / "s")
    search.root.mkdir()
    src = tmp_path / "src"
    _child_folder(src, "g000c01", 0, 1)
    seen: list[Any] = []
    recorder = Recorder(search, seen.append)

    def trial(key: str, index: int, result: Any, checkpoint: Any = None, error: str = ""
              ) -> Any:
        config = {"key": key, "generation": 0, "index": index, "arch": f"a{index}",
                  "actions": [{"op": "x"}], "attempt": 1, "lineage": [[{"op": "y"}]]}
        return SimpleNamespace(config=config, last_result=result, checkpoint=checkpoint,
                               get_error=lambda: error)

    ckpt = SimpleNamespace(to_directory=lambda d: shutil.copytree(src, d, dirs_exist_ok=True))
    recorder.on_trial_complete(0, [], trial("g000c01", 1, {"status": "ok"}, ckpt))
    recorder.on_trial_complete(0, [], trial("g000c02", 2, {
        "status": "failed", "error": "boom", "start": 3.0, "end": 4.0, "node": "n"}))
    recorder.on_trial_complete(0, [], trial("g000c03", 3, None))
    recorder.on_trial_complete(0, [], trial("g000c04", 4, {"status": "ok"}))  # no checkpoint
    recorder.on_trial_error(0, [], trial("g000c05", 5, None,
                                         error="Traceback\n  x\nOSError: disk\n\n"))
    recorder.on_trial_error(0, [], trial("g000c06", 6, None))
    records = read_records(search.records)
    assert [r.key for r in seen] == [r.key for r in records] == [
        "g000c01", "g000c02", "g000c03", "g000c04", "g000c05", "g000c06"]
    ok, *failed = records
    assert ok.ok and ok.checkpoint == "children/g000c01" and ok.val_acc == 0.5
    assert [r.error for r in failed] == [
        "boom", "the trial reported no result", "the trial reported no result",
        "the trial's process failed: OSError: disk",
        "the trial's process failed: no error text"]
    assert all(r.status == "failed" and r.attempt == 1 and r.arch == f"a{r.index}"
               and r.generation == 0 and r.actions == [{"op": "x"}]
               and r.lineage == [[{"op": "y"}], [{"op": "x"}]]
               for r in failed)
    assert (failed[0].start, failed[0].end, failed[0].node) == (3.0, 4.0, "n")
    assert pickle.loads(pickle.dumps(recorder)).on_child is None
    assert recorder.on_child is not None
    Recorder(search, None).on_trial_error(0, [], trial("g000c07", 7, None))  # no hook: recorded
    assert read_records(search.records)[-1].key == "g000c07"


def test_a_failed_trial_with_a_bare_config_and_no_result_is_recorded_with_defaults(
        tmp_path: Path) -> None:
    """A trial config without lineage or attempt, whose process failed before any result:
    recorded failed at attempt 0, its lineage its own actions, started and ended at 0.0."""
    from types import SimpleNamespace

    from growth.controllers.driver import Recorder, SearchDir

    search = SearchDir(tmp_path / "s")
    search.root.mkdir()
    config = {"key": "g001c02", "generation": 1, "index": 2, "arch": "a2",
              "actions": [{"op": "x"}]}
    Recorder(search, None).on_trial_error(0, [], SimpleNamespace(
        config=config, last_result=None, checkpoint=None, get_error=lambda: None))
    [record] = read_records(search.records)
    assert (record.key, record.generation, record.index, record.status) == (
        "g001c02", 1, 2, "failed")
    assert record.actions == [{"op": "x"}] and record.arch == "a2"
    assert record.lineage == [[{"op": "x"}]] and record.attempt == 0
    assert (record.start, record.end, record.node) == (0.0, 0.0, None)


def test_a_trial_that_no_node_of_a_local_ray_can_hold_is_refused() -> None:
    """cpus_per_trial or gpus_per_trial above what the local Ray has is a ConfigError naming
    the setting and both figures; equal is fine; a joined cluster is not checked."""
    from types import SimpleNamespace

    from growth.controllers.driver import Resources, _check_fits

    from growth.errors import ConfigError

    local = SimpleNamespace(started=True, cpus=2.0, gpus=1.0)
    _check_fits(Resources(cpus_per_trial=2.0, gpus_per_trial=1.0), local)
    with pytest.raises(ConfigError, match=r"search\.cpus_per_trial: 3, but the local Ray has 2"):
        _check_fits(Resources(cpus_per_trial=3.0), local)
    with pytest.raises(ConfigError, match=r"search\.gpus_per_trial: 2, but the local Ray has 1"):
        _check_fits(Resources(gpus_per_trial=2.0), local)
    _check_fits(Resources(cpus_per_trial=64.0, gpus_per_trial=8.0),
                SimpleNamespace(started=False, cpus=2.0, gpus=0.0))


def test_a_search_starts_its_state_from_the_parent_and_resumes_only_with_its_settings(
        tmp_path: Path) -> None:
    """A new search's state: generation 0 from the parent (its parameter count, 64x4+4 +
    4x10+10 = 310, as the root's and the parent's), the controller saved as generation 0's;
    the same call again reads it back; another controller, seed, policy or cost is refused;
    a state from before costs existed resumes at cost 0."""
    from growth.controllers.driver import SearchDir, _begin

    from growth.errors import ConfigError

    search = SearchDir(tmp_path / "s")
    search.root.mkdir()
    parent = _tiny_parent(tmp_path)
    state = _begin(search, parent, Fixed(), 3, 0.25, "best", 0.5)
    where = str(parent.resolve())
    assert state == {"version": 2, "controller": "fixed", "seed": 3, "policy": "best",
                     "cost": 0.5, "generation": 0, "root": where, "root_params": 310,
                     "parent": where, "parent_acc": 0.25, "parent_params": 310, "lineage": [],
                     "kept": 0, "elapsed_s": 0.0, "attempts": {}, "done": False}
    assert json.loads(search.state_file.read_text()) == state
    assert json.loads((search.controller / "gen_000.json").read_text()) == {
        "controller": "fixed"}
    assert _begin(search, parent, Fixed(), 3, 0.9, "best", 0.5) == state
    other = Fixed()
    other.name = "eas"
    for args, what in (((other, 3, None, "best", 0.5), "controller 'fixed', not 'eas'"),
                       ((Fixed(), 4, None, "best", 0.5), "seed 3, not 4"),
                       ((Fixed(), 3, None, "fixed", 0.5), "policy 'best', not 'fixed'"),
                       ((Fixed(), 3, None, "best", 0.0), "cost 0.5, not 0.0")):
        with pytest.raises(ConfigError, match=f"started with {what}"):
            _begin(search, parent, *args)
    del state["cost"]
    search.write_state(state)
    assert _begin(search, parent, Fixed(), 3, None, "best")["cost"] == 0.0


def _driver(tmp_path: Path, state: dict[str, Any] | None = None, budget: Any = None,
            spec: Any = None, **kwargs: Any) -> Any:
    """The driver of a search in tmp_path/s, from `state` (a fresh one: empty), with Fixed as
    its controller, no space or task, and the default resources and progress."""
    from growth.controllers.driver import Budget, Resources, SearchDir, SearchProgress, _Driver
    from growth.controllers.trial import TrialSpec

    return _Driver(SearchDir(tmp_path / "s"), {} if state is None else state, Fixed(), None,
                   None, spec or TrialSpec(), budget or Budget(), Resources(), SearchProgress(),
                   **kwargs)


def _tiny_parent(tmp_path: Path) -> Path:
    """A tiny MLP (64 -> 4 -> 10) saved at tmp_path/parent, for searches that train nothing."""
    parent = tmp_path / "parent"
    add_head(mlp((1, 8, 8), [4]), "t0", 10).save(parent)
    return parent


def _state_at(tmp_path: Path, **more: Any) -> dict[str, Any]:
    """A search state at generation 0 whose parent is a tiny MLP saved at tmp_path/parent."""
    parent = _tiny_parent(tmp_path)
    return {"generation": 0, "done": False, "parent": str(parent), "parent_acc": None, **more}


def test_a_generations_size_follows_the_trial_and_wall_time_budgets(tmp_path: Path) -> None:
    """Children per generation: `children` until `generations`; with a trial budget, what is
    left of it after the earlier generations' children (6 - 2 - 3 = 1 for generation 2);
    none once the wall-time budget is used."""
    from growth.controllers.driver import Budget
    from growth.controllers.records import ChildRecord, child_key

    def driver(budget: Budget, elapsed: float = 0.0) -> Any:
        d = _driver(tmp_path, {"elapsed_s": elapsed}, budget)
        d.records = [ChildRecord(child_key(g, i), g, i, "a", [], "ok")
                     for g, n in ((0, 2), (1, 3)) for i in range(n)]
        return d

    trials = driver(Budget(children=4, generations=3, trials=6))
    assert [trials._generation_size(g) for g in range(4)] == [4, 4, 1, 0]
    plain = driver(Budget(children=4, generations=3))
    assert [plain._generation_size(g) for g in range(4)] == [4, 4, 4, 0]
    assert driver(Budget(children=4, wall_time_s=10.0), elapsed=10.0)._generation_size(0) == 0
    assert driver(Budget(children=4, wall_time_s=10.0), elapsed=9.0)._generation_size(0) == 4
    with pytest.MonkeyPatch.context() as frozen:  # no time passes: the budget just used up
        frozen.setattr(time, "monotonic", lambda: 5.0)
        assert driver(Budget(children=4, wall_time_s=10.0), elapsed=10.0
                      )._generation_size(0) == 0
        assert _driver(tmp_path).elapsed() == 0.0  # a state without elapsed time starts at 0


def test_a_strategy_state_goes_to_storage_only_for_children_trained_elsewhere(tmp_path: Path
                                                                             ) -> None:
    """The trial spec a generation hands out: on Tune or the pool, a strategy state on local
    disk is first copied into the search's storage and named there; on the local backend, or
    when it is already a URI, the reference stays as it is."""
    from growth.controllers.trial import TrialSpec

    state = tmp_path / "state"
    state.mkdir()
    (state / "strategy.json").write_text("{}")

    def spec_json(backend: str, ref: str) -> dict[str, Any]:
        spec = TrialSpec(strategy={"name": "l2", "state": ref})
        return _driver(tmp_path, spec=spec, backend=backend)._spec_json()

    def spec_state(backend: str, ref: str) -> str:
        return spec_json(backend, ref)["strategy"]["state"]

    assert spec_state("local", str(state)) == str(state)
    spec = TrialSpec(strategy={"name": "l2", "state": str(state)})
    assert spec_json("local", str(state)) == json.loads(spec.model_dump_json())  # plain JSON
    storage = _driver(tmp_path).search.storage
    assert spec_state("tune", "s3://bucket/state") == "s3://bucket/state"
    assert spec_state("tune", str(state)) == f"{storage}/strategy"
    assert (Path(storage) / "strategy" / "strategy.json").read_text() == "{}"


def test_the_search_reports_the_mean_training_time_of_its_finished_children(tmp_path: Path
                                                                            ) -> None:
    """What "auto" weighs Ray's start-up against: the mean of the finished children's training
    times ((1 + 2 + 6) / 3 = 3; a failed child's time is not counted), else the caller's
    hint."""
    from growth.controllers.records import ChildRecord

    d = _driver(tmp_path, child_s=7.5)
    assert d.measured_child_s() == 7.5
    d.records = [ChildRecord(f"g000c0{i}", 0, i, "a", [], status, val_acc=acc, train_time_s=t)
                 for i, (status, acc, t) in enumerate((
                     ("ok", 0.5, 1.0), ("ok", 0.5, 2.0), ("failed", None, 50.0),
                     ("ok", 0.5, 6.0)))]
    assert d.measured_child_s() == 3.0


@pytest.mark.parametrize(("children", "limit"), [(1, 6), (2, 3), (4, 1), (8, 1)])
def test_one_experiment_holds_at_most_generations_per_fit_trials(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, children: int, limit: int) -> None:
    """With GENERATIONS_PER_FIT 6, one run of generations (a Tune experiment) holds 6 // n of
    them for n children each, at least one; then the driver hands out none until a fresh
    experiment starts. A finished search hands out none at all."""
    from growth.controllers import driver as drv
    from growth.controllers.driver import Budget

    monkeypatch.setattr(drv, "GENERATIONS_PER_FIT", 6)
    d = _driver(tmp_path, _state_at(tmp_path), Budget(children=children, generations=10),
                backend="local")
    handed = 0
    while d.next_generation() is not None:
        handed += 1
        assert handed <= 10
    assert handed == limit
    assert d.state["attempts"] == {"0": limit - 1}  # each hand-out of generation 0 counted
    d.in_fit, d.state["done"] = 0, True
    assert d.next_generation() is None


def test_a_generations_second_attempt_adopts_children_tune_finished_unrecorded(
        tmp_path: Path) -> None:
    """Generation 0 handed out once before (attempt 0, then the driver died): its second
    attempt first adopts the child Tune's storage holds finished but unrecorded, so the
    generation knows it is trained."""
    from growth.controllers.driver import Budget

    d = _driver(tmp_path, _state_at(tmp_path, attempts={"0": 0}), Budget(3, 1),
                backend="local")
    _child_folder(Path(d.search.storage) / "gen000-a0" / "g000c01-t1" / "checkpoint_000000",
                  "g000c01", 0, 1)
    generation = d.next_generation()
    assert generation is not None and generation.base_config["attempt"] == 1
    assert [r.key for r in d.records] == ["g000c01"] and generation.known == {1: 0.5}
    assert generation.parent == str(tmp_path / "parent")  # trained here: where it lies


def test_a_generation_for_trials_elsewhere_grows_from_a_copy_of_its_parent_in_storage(
        tmp_path: Path) -> None:
    """On Tune (or the pool) the generation's parent is first copied into the search's
    storage, under parents/gen000, and the generation names that copy."""
    from growth.controllers.driver import Budget

    d = _driver(tmp_path, _state_at(tmp_path), Budget(3, 1), backend="tune")
    generation = d.next_generation()
    assert generation is not None
    assert generation.parent == f"{d.search.storage}/parents/gen000"
    assert (NetGraph.load(Path(generation.parent)).to_dict() ==
            NetGraph.load(tmp_path / "parent").to_dict())


def test_a_child_that_fails_here_is_recorded_with_the_trials_error_and_times(tmp_path: Path
                                                                            ) -> None:
    """On the local backend a child whose actions cannot apply (no node "nope") is recorded
    failed with the trial's own error line, its start and end times and node "local", and
    leaves no folder; the search goes on."""
    from growth.controllers.base import Proposal
    from growth.controllers.driver import Budget, run_search

    class Broken(Fixed):
        def propose(self, parent: NetGraph, n: int, exclude: Any = ()) -> list[Any]:
            return [Proposal(({"op": "net2wider", "node": "nope", "width": 20},), "nope=20")]

    task, parent, graph = _digits_parent(tmp_path)
    space = make_space({"widths": {"fc": [16, 20]}}, graph)
    before = time.time()
    result = run_search(tmp_path / "s", parent, Broken(), space, task, budget=Budget(1, 1),
                        backend="local")
    [record] = result.records
    assert record.status == "failed" and record.node == "local" and "nope" in record.error
    assert record.error.startswith("OperatorError: ")  # the trial's line: type, message
    assert before <= record.start <= record.end <= time.time()
    assert not (tmp_path / "s" / "children" / record.key).exists() and result.done
    assert not any((tmp_path / "s" / "children").iterdir())  # its training folder removed


def test_a_child_trained_here_whose_folder_is_incomplete_is_recorded_failed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A trainer that reports ok but leaves only the child's record (no graph): the folder,
    moved out for adoption, is not adopted; the child is recorded failed ("the child's
    folder is incomplete", with the trainer's times) and no folder is left behind."""
    import growth.controllers.driver as driver
    from growth.controllers.driver import Budget, run_search
    from growth.controllers.records import ChildRecord
    from growth.controllers.trial import CHILD_FILE

    def record_only(config: dict[str, Any], task: Any, space: Any, out: Path, node: str
                    ) -> dict[str, Any]:
        record = ChildRecord(config["key"], config["generation"], config["index"],
                             config["arch"], config["actions"], "ok", val_acc=0.5)
        (Path(out) / CHILD_FILE).write_text(json.dumps(record.to_json()))
        return {"status": "ok", "error": "", "val_acc": 0.5, "start": 1.0, "end": 2.0,
                "node": node}

    monkeypatch.setattr(driver, "train_child", record_only)
    task, parent, _ = _digits_parent(tmp_path)
    result = run_search(tmp_path / "s", parent, Fixed(), None, task, budget=Budget(1, 1),
                        backend="local")
    [record] = result.records
    assert record.status == "failed" and record.error == "the child's folder is incomplete"
    assert (record.start, record.end, record.node) == (1.0, 2.0, "local")
    assert not any((tmp_path / "s" / "children").iterdir())


def test_a_childs_files_from_an_actor_are_written_in_nested_folders_and_never_outside(
        tmp_path: Path) -> None:
    """What a pool actor returns (relative path -> bytes) is written under the folder, its
    subfolders made as needed; a path that leads outside is refused, naming a child's file,
    and nothing is written there."""
    from growth.controllers.driver import _write_files

    from growth.errors import RunDirError

    folder = tmp_path / "child"
    folder.mkdir()
    _write_files(folder, {"structure.json": b"{}", "state/optim/moments.bin": b"\x01\x02"})
    assert (folder / "structure.json").read_bytes() == b"{}"
    assert (folder / "state" / "optim" / "moments.bin").read_bytes() == b"\x01\x02"
    with pytest.raises(RunDirError, match="^a child's file "):
        _write_files(folder, {"../escaped.bin": b"x"})
    assert not (tmp_path / "escaped.bin").exists()


def test_a_process_that_runs_a_ray_task_is_told_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    """in_ray_task: Ray initialised and a task id (a `growth compare` campaign); then "auto"
    stays in this process whatever a child costs."""
    from types import SimpleNamespace

    import ray
    from growth.controllers.driver import in_ray_task

    task_id: list[Any] = ["t1"]
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_runtime_context",
                        lambda: SimpleNamespace(get_task_id=lambda: task_id[0]))
    assert in_ray_task()
    assert choose_backend("auto", 1000.0, 8, 4, cpus=4) == "local"
    task_id[0] = None  # the driver process of a Ray job: no task
    assert not in_ray_task()
    assert choose_backend("auto", 1000.0, 8, 4, cpus=4) == "ray"
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    task_id[0] = "t1"
    assert not in_ray_task()


def test_the_search_cost_is_kept_in_its_state_and_ranks_its_children(tmp_path: Path) -> None:
    """cost 0.5 on a parent of 64x16+16 + 16x10+10 = 1210 parameters: a child of accuracy 0.9
    that doubles them scores 0.9 - 0.5 x 1210/1210 = 0.4, one of 0.8 that adds none 0.8, so
    the second continues (it beats the parent's 0.5); search.json keeps the cost."""
    from growth.controllers.driver import Budget, run_search
    from growth.controllers.records import child_key

    task, parent, _ = _digits_parent(tmp_path)
    folder = tmp_path / "s"
    _record_generation(folder, (0.9, 0.8), params=(2420, 1210))
    result = run_search(folder, parent, Fixed(), None, task, budget=Budget(2, 1), seed=0,
                        parent_acc=0.5, cost=0.5, backend="local")
    assert json.loads((folder / "search.json").read_text())["cost"] == 0.5
    assert result.parent == folder.resolve() / "children" / child_key(0, 1)


@pytest.mark.parametrize(("parent", "child", "replaced"), [
    ((0.8, 2420), (0.7, 1210), True),  # 0.7 - 0 beats 0.8 - 0.5 x 1210/1210 = 0.3
    ((0.5, 1210), (0.9, 2420), False),  # 0.9 - 0.5 = 0.4 does not beat 0.5
])
def test_a_child_must_beat_the_parents_score_with_both_charged_for_their_size(
        tmp_path: Path, parent: tuple[float, int], child: tuple[float, int], replaced: bool
        ) -> None:
    """With cost 0.5 and a root of 1210 parameters, the current parent (accuracy, size) and
    the one recorded child are each scored as accuracy - 0.5 x added / 1210."""
    from growth.controllers.driver import Budget, run_search

    root = tmp_path / "root"
    add_head(mlp((1, 8, 8), [16]), "t0", 10).save(root)  # 64x16+16 + 16x10+10 = 1210
    folder = tmp_path / "s"
    run_search(folder, root, Fixed(), None, None, budget=Budget(1, 0), cost=0.5,
               backend="local")
    state = json.loads((folder / "search.json").read_text())
    assert state["root_params"] == 1210
    state.update(done=False, parent_acc=parent[0], parent_params=parent[1])
    (folder / "search.json").write_text(json.dumps(state))
    _record_generation(folder, (child[0],), params=(child[1],))
    result = run_search(folder, root, Fixed(), None, None, budget=Budget(1, 1), cost=0.5,
                        backend="local")
    assert (result.parent == folder.resolve() / "children" / "g000c00") is replaced


def test_a_finished_child_without_a_checkpoint_never_becomes_the_parent(tmp_path: Path
                                                                        ) -> None:
    """A record that says ok but names no checkpoint (a damaged search directory) is not
    taken as the parent, however well it scored: the parent stays."""
    from growth.controllers.driver import Budget, run_search
    from growth.controllers.records import RECORDS, ChildRecord, append_record

    task, parent, _ = _digits_parent(tmp_path)
    folder = tmp_path / "s"
    folder.mkdir()
    append_record(folder / RECORDS, ChildRecord("g000c00", 0, 0, "fc1=20", [], "ok",
                                                val_acc=0.9, params=1300, checkpoint=None))
    result = run_search(folder, parent, Fixed(), None, task, budget=Budget(1, 1), seed=0,
                        parent_acc=0.5, backend="local")
    assert result.parent == parent.resolve() and result.kept == 1


def test_a_child_folder_is_a_plain_name_under_children(tmp_path: Path) -> None:
    """children/<key> for a plain key; a key with a path in it (even one that stays inside
    the search directory) is refused."""
    from growth.controllers.driver import SearchDir

    from growth.errors import RunDirError

    search = SearchDir(tmp_path / "s")
    assert search.child_folder("g000c01") == search.root / "children" / "g000c01"
    for bad in ("../g000c01", "a/b", "."):
        with pytest.raises(RunDirError, match="child key"):
            search.child_folder(bad)
    (search.root / "children").mkdir(parents=True)
    (search.root / "children" / "g000c02").symlink_to(tmp_path)  # a plain name, linked out
    with pytest.raises(RunDirError, match=r"^child folder .*g000c02 resolves to"):
        search.child_folder("g000c02")


def test_a_finished_search_resumed_from_an_older_state_reports_its_generations_and_kept(
        tmp_path: Path) -> None:
    """A search whose budget is spent reports its folder, the generations it ran and the
    generations after which the parent stayed, its time so far, an empty leaderboard and
    the network it started from; a state written before `kept`, `root` and `lineage`
    existed reports 0, its parent as the root and no lineage."""
    from growth.controllers.driver import Budget, run_search

    parent = _tiny_parent(tmp_path)
    folder = tmp_path / "s"
    first = run_search(folder, parent, Fixed(), None, None, budget=Budget(2, 0),
                       backend="local")
    assert (first.generations, first.kept, first.done) == (0, 0, True)
    assert first.directory == folder.resolve() and first.leaderboard == []
    assert first.root == parent.resolve() and first.lineage == []
    state = json.loads((folder / "search.json").read_text())
    state.update(generation=3, kept=2, elapsed_s=100.0, parent=str(tmp_path / "grown"))
    (folder / "search.json").write_text(json.dumps(state))
    (folder / "controller" / "gen_003.json").write_text(json.dumps({"controller": "fixed"}))
    shutil.copy(folder / "controller" / "gen_000.safetensors",
                folder / "controller" / "gen_003.safetensors")
    again = run_search(folder, parent, Fixed(), None, None, budget=Budget(2, 0),
                       backend="local")
    assert (again.generations, again.kept) == (3, 2)
    assert isinstance(again.elapsed_s, float) and 100.0 <= again.elapsed_s < 160.0
    assert again.root == parent.resolve() and again.parent == tmp_path / "grown"
    for key in ("kept", "root", "lineage"):
        del state[key]
    state["parent"] = str(tmp_path / "elsewhere")
    (folder / "search.json").write_text(json.dumps(state))
    old = run_search(folder, parent, Fixed(), None, None, budget=Budget(2, 0), backend="local")
    assert old.kept == 0 and old.root == tmp_path / "elsewhere" and old.lineage == []


@pytest.mark.parametrize(("kept", "after"), [(None, 1), (2, 3)])
def test_a_generation_that_keeps_the_parent_counts_from_an_older_state(
        tmp_path: Path, kept: int | None, after: int) -> None:
    """A state written before `kept` existed (or one that kept the parent twice), resumed
    into a generation whose recorded children (best 0.9) do not beat the parent's 0.95: the
    parent stays and kept is 1 (3)."""
    from growth.controllers.driver import Budget, run_search

    parent = _tiny_parent(tmp_path)
    folder = tmp_path / "s"
    run_search(folder, parent, Fixed(), None, None, budget=Budget(3, 0), backend="local")
    state = json.loads((folder / "search.json").read_text())
    del state["kept"]
    if kept is not None:
        state["kept"] = kept
    state.update(done=False, parent_acc=0.95)
    (folder / "search.json").write_text(json.dumps(state))
    _record_generation(folder, (0.6, 0.9, 0.7))
    result = run_search(folder, parent, Fixed(), None, None, budget=Budget(3, 1),
                        backend="local")
    assert result.kept == after and result.parent == parent.resolve()
    assert result.parent_acc == 0.95


def test_a_new_search_adopts_nothing_from_shared_storage_that_holds_an_older_ones(
        tmp_path: Path) -> None:
    """Only a resumed generation (attempt 1 on) looks for unrecorded children in Tune's
    storage: a new search whose shared storage and name hold an older search's finished
    g000c00 trains its own g000c00 here."""
    from growth.controllers.driver import Budget, run_search

    task, parent, graph = _digits_parent(tmp_path)
    _child_folder(tmp_path / "shared" / "n" / "gen000-a0" / "g000c00-t0" / "checkpoint",
                  "g000c00", 0, 0)
    result = run_search(tmp_path / "s", parent, Fixed(), make_space(
        {"widths": {"fc": [16, 20]}}, graph), task, budget=Budget(1, 1), backend="local",
        storage=str(tmp_path / "shared"), name="n")
    [record] = result.records
    assert record.ok and record.node == "local" and record.arch == "fc1=20"
    assert NetGraph.load(tmp_path / "s" / "children" / "g000c00").node("fc1").tensors[
        "weight"].shape[0] == 20


def test_the_tune_backend_hands_tune_one_experiment_of_the_generation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the "tune" backend gives Ray Tune, read from a stand-in Tuner that stops the
    search when asked to run: the trial function with the task's data and the space, each
    trial holding cpus_per_trial and gpus_per_trial; the searcher as the search algorithm
    maximising the metric, trials without end until it finishes, at most `concurrency` at
    once on reused actors, named by the child's key; the experiment gen000-a0 in the search's
    storage, retrying a trial max_failures times, the recorder first among its callbacks."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    from growth.controllers.driver import Budget, Recorder, Resources, _trial_dirname, run_search
    from growth.controllers.records import ChildRecord
    from growth.controllers.searcher import METRIC, ControllerSearcher
    from growth.controllers.trial import tune_trial

    given = _stand_in_tuner(monkeypatch)
    task, parent, graph = _digits_parent(tmp_path)
    space = make_space({"widths": {"fc": [16, 20, 24]}}, graph)
    with pytest.raises(_Stop):
        run_search(tmp_path / "s", parent, Fixed(), space, task, budget=Budget(2, 1),
                   resources=Resources(concurrency=3, cpus_per_trial=2.0, max_failures=2),
                   backend="tune", connect=lambda: nullcontext(SimpleNamespace(started=False)))
    kind, inner, resources = given["trainable"]
    assert kind == "resources" and resources == {"cpu": 2.0, "gpu": 0.0}
    assert inner[:2] == ("parameters", tune_trial) and inner[2]["space"] is space
    assert torch.equal(inner[2]["task"].train[0], task.train[0])
    tc, rc = given["tc"], given["rc"]
    assert isinstance(tc.search_alg, ControllerSearcher)
    assert (tc.metric, tc.mode, tc.num_samples, tc.max_concurrent_trials) == (METRIC, "max",
                                                                             -1, 3)
    assert tc.reuse_actors is True
    assert tc.trial_dirname_creator is _trial_dirname and tc.trial_name_creator is _trial_dirname
    assert (rc.name, rc.verbose, rc.failure_config.max_failures) == ("gen000-a0", 0, 2)
    assert Path(rc.storage_path) == (tmp_path / "s" / "tune").resolve()
    recorder = rc.callbacks[0]
    assert isinstance(recorder, Recorder) and recorder.search.root == (tmp_path / "s").resolve()
    recorder.on_child(ChildRecord("g000c01", 0, 1, "fc1=24", [], "ok", val_acc=0.75))
    assert [row["key"] for row in json.loads((tmp_path / "s" / "leaderboard.json").read_text())
            ] == ["g000c01"]  # the driver's bookkeeping hears of each recorded child


def test_a_tune_experiment_that_starts_at_a_later_generation_is_named_after_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A resumed search whose generation 0 is recorded already trains nothing there: its
    first Tune experiment starts at generation 1 and is named gen001-a0."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    from growth.controllers.driver import Budget, run_search

    from growth.ops import net2wider

    given = _stand_in_tuner(monkeypatch)
    task, parent, graph = _digits_parent(tmp_path)
    _record_generation(tmp_path / "s", (0.6, 0.9, 0.7))
    net2wider(graph, "fc1", 24).graph.save(tmp_path / "s" / "children" / "g000c01")  # the best
    with pytest.raises(_Stop):
        run_search(tmp_path / "s", parent, Fixed(), None, task, budget=Budget(3, 2),
                   parent_acc=0.5, backend="tune",
                   connect=lambda: nullcontext(SimpleNamespace(started=False)))
    assert given["names"] == ["gen001-a0"]


def test_a_tune_trial_is_named_by_its_childs_key_and_a_trial_without_one_by_trial() -> None:
    from types import SimpleNamespace

    from growth.controllers.driver import _trial_dirname

    assert _trial_dirname(SimpleNamespace(config={"key": "g001c02"}, trial_id="7f3a")) == \
        "g001c02-7f3a"
    assert _trial_dirname(SimpleNamespace(config={}, trial_id="7f3a")) == "trial-7f3a"


def test_a_search_without_connect_joins_ray_at_its_address_logging_to_its_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver's default Ray: `ray_cluster` given the search's address and log file."""
    from growth.controllers.driver import _ray

    import growth.cluster

    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(growth.cluster, "ray_cluster",
                        lambda *args, **kwargs: calls.append((args, kwargs)) or "cluster")
    assert _ray("10.0.0.1:6379", tmp_path / "ray.log") == "cluster"
    assert calls == [(("10.0.0.1:6379",), {"log_file": tmp_path / "ray.log"})]


class _Stop(Exception):
    """Raised by a stand-in (Tune's Tuner, the driver's `run_search`) once it has recorded
    its call."""


def _stand_in_tuner(monkeypatch) -> dict[str, Any]:
    """Replace Ray Tune's Tuner with one that records what it is given (`trainable`, `tc`,
    `rc`, and every experiment's name in `names`) in the returned dict and raises _Stop when
    asked to run; `with_parameters` and
    `with_resources` return tuples that show what they wrapped. The cluster environment
    variables are cleared for the test."""
    from ray import tune

    from growth.cluster import FORCED_ENV, QUIET_ENV

    for key in {**QUIET_ENV, **FORCED_ENV}:
        monkeypatch.delenv(key, raising=False)  # put back after the test
    given: dict[str, Any] = {}

    class Tuner:
        def __init__(self, trainable: Any, tune_config: Any, run_config: Any) -> None:
            given.update(trainable=trainable, tc=tune_config, rc=run_config)
            given.setdefault("names", []).append(run_config.name)

        def fit(self) -> None:
            raise _Stop

    monkeypatch.setattr(tune, "Tuner", Tuner)
    monkeypatch.setattr(tune, "with_parameters", lambda fn, **kw: ("parameters", fn, kw))
    monkeypatch.setattr(tune, "with_resources", lambda fn, res: ("resources", fn, res))
    return given


def _record_run_search(monkeypatch) -> dict[str, Any]:
    """Replace the driver's `run_search` with a recorder that stops the search: the returned
    dict gets its `args` and `kwargs`."""
    import growth.controllers.driver as driver

    seen: dict[str, Any] = {}

    def fake_run_search(*args: Any, **kwargs: Any) -> Any:
        seen.update(args=args, kwargs=kwargs)
        raise _Stop

    monkeypatch.setattr(driver, "run_search", fake_run_search)
    return seen


def _service_ctx(tmp_path: Path) -> Context:
    """Task 1 of a two-task split of 40 digits, an MLP of 8 hidden units, workdir tmp_path."""
    task = build_stream({"dataset": "digits", "stream": "split", "n_tasks": 2,
                         "max_train_per_task": 40})[1]
    torch.manual_seed(0)
    model = Model(add_head(mlp(task.input_shape, [8]), "t1", task.n_classes))
    return Context(model, task, [], lambda t: f"t{t.index}", lambda t, y: y,
                   torch.device("cpu"), seed=0, workdir=tmp_path)


def test_the_service_hands_the_driver_its_context_hooks_and_ray(tmp_path: Path,
                                                                monkeypatch) -> None:
    """The rest of what `SearchService.search` passes on, read off a stand-in for `run_search`:
    the scenario, the earlier tasks and the device for every child, one thread per CPU a trial
    has, the budget's child count to `on_start`, the last search's mean child time, the Ray log
    file, the worker pool, and a `connect` that joins Ray at the search's own address."""
    from growth.controllers.service import SearchService
    from growth.controllers.trial import TaskMeta

    from growth.searching import SearchSettings

    seen = _record_run_search(monkeypatch)
    ctx = _service_ctx(tmp_path)
    earlier = build_stream({"dataset": "digits", "stream": "split", "n_tasks": 2,
                            "max_train_per_task": 40})[0]
    ctx.seen, ctx.scenario, ctx.device = [earlier], "class", torch.device("cuda", 1)
    settings = SearchSettings(controller="random", children=3, generations=2, epochs=1,
                              backend="local", cpus_per_trial=2.0, ray_address="ray://head:1",
                              space={"widths": {"fc": [8, 12]}})
    started: list[tuple[int, int]] = []
    joined: list[str | None] = []
    with SearchService(log_file=tmp_path / "ray.log",
                       on_start=lambda *a: started.append(a)) as service, pytest.raises(_Stop):
        service.child_s = 1.5  # a mean child time measured by an earlier search
        monkeypatch.setattr(service, "_connect", joined.append)
        service.search(ctx, SearchRequest(settings, TrainConfig(epochs=1)))
    spec, kw = seen["args"][5], seen["kwargs"]
    assert (spec.scenario, spec.seen, spec.device, spec.threads) == (
        "class", [TaskMeta.of(earlier)], "cuda:1", 2)
    assert started == [(1, 6)]  # 3 children x 2 generations
    assert (kw["child_s"], kw["log_file"], kw["pool"]) == (1.5, tmp_path / "ray.log",
                                                           service.pool)
    kw["connect"]()
    assert joined == ["ray://head:1"]


def test_a_search_that_keeps_the_parent_returns_no_graph_no_records_and_its_costs(
        tmp_path: Path, monkeypatch) -> None:
    """A search whose driver kept the parent: no graph, an empty list of records (not None),
    the summary counted from the driver's records, and the mean child time kept for the next
    search."""
    from types import SimpleNamespace

    import growth.controllers.driver as driver
    from growth.controllers.service import SearchService

    from growth.searching import SearchSettings

    records = [SimpleNamespace(ok=True, train_time_s=2.0), SimpleNamespace(ok=False,
                                                                          train_time_s=0.5),
               SimpleNamespace(ok=True, train_time_s=4.0)]
    result = SimpleNamespace(records=records, generations=1, kept=1, best=None,
                             replaced=False)
    monkeypatch.setattr(driver, "run_search", lambda *a, **k: result)
    settings = SearchSettings(controller="random", children=3, generations=1, epochs=1,
                              backend="local", space={"widths": {"fc": [8, 12]}})
    with SearchService() as service:
        out = service.search(_service_ctx(tmp_path), SearchRequest(
            settings, TrainConfig(epochs=1), parent_acc=0.5))
        assert service.child_s == 3.0  # the mean of the children that finished
    assert out.graph is None and out.records == []
    assert {k: out.summary[k] for k in ("children", "failed", "child_time_s", "generations",
                                        "parent_kept", "parent_acc", "best_child_val",
                                        "expansion")} == {
        "children": 3, "failed": 1, "child_time_s": 6.5, "generations": 1, "parent_kept": 1,
        "parent_acc": 0.5, "best_child_val": None, "expansion": "parent"}


def test_a_kept_child_is_rebuilt_from_its_actions_on_a_batch_of_the_tasks_inputs(
        tmp_path: Path, monkeypatch) -> None:
    """The chosen child is rebuilt from the parent by its actions; a deeper layer with
    BatchNorm needs a batch of network inputs to set its statistics, and the service gives
    it the task's training inputs (not its labels, not nothing)."""
    from types import SimpleNamespace

    import growth.controllers.driver as driver
    from growth.controllers.service import SearchService
    from growth.search_spaces.space import make_space

    from growth.searching import SearchSettings

    ctx = _service_ctx(tmp_path)
    space_settings = {"deeper_batchnorm": True, "widths": {"fc": [8, 12]}}
    actions = [{"op": "net2deeper", "after": "act1", "batchnorm": True}]
    child = make_space(space_settings, ctx.model.graph).apply(
        ctx.model.graph, actions, sample=ctx.task.train[0][:256])[0]
    child.save(tmp_path / "child")
    result = SimpleNamespace(records=[], generations=1, kept=0, replaced=True,
                             best=SimpleNamespace(val_acc=0.9), parent=tmp_path / "child",
                             lineage=[actions], parent_acc=0.9)
    monkeypatch.setattr(driver, "run_search", lambda *a, **k: result)
    settings = SearchSettings(controller="random", children=1, generations=1, epochs=1,
                              backend="local", space=space_settings)
    with SearchService() as service:
        out = service.search(ctx, SearchRequest(settings, TrainConfig(epochs=1)))
    assert out.graph.to_dict() == child.to_dict()
    assert [r.op for r in out.records] == ["net2deeper"]
    assert (out.summary["expansion"], out.summary["val_acc"]) == (actions, 0.9)


def test_a_search_asked_again_keeps_the_parent_it_wrote_first(tmp_path: Path) -> None:
    """The parent is written once: asked again in the same folder (a resumed task), the
    service goes on from the parent it saved, not from the network as it is now."""
    from growth.controllers.service import PARENT, SearchService

    from growth.searching import SearchSettings

    ctx = _service_ctx(tmp_path)
    before = ctx.model.graph.node("fc1").tensors["weight"].clone()
    settings = SearchSettings(controller="random", children=1, generations=1, epochs=1,
                              backend="local", space={"widths": {"fc": [8, 12]}})
    with SearchService() as service:
        service.search(ctx, SearchRequest(settings, TrainConfig(epochs=1)))
        with torch.no_grad():
            ctx.model.named_parameters()["fc1.weight"].add_(1.0)
        service.search(ctx, SearchRequest(settings, TrainConfig(epochs=1)))
    saved = NetGraph.load(tmp_path / "search" / PARENT).node("fc1").tensors["weight"]
    assert torch.equal(saved, before)


def test_a_bad_space_in_a_search_names_the_strategys_search_key(tmp_path: Path) -> None:
    """The service builds the space and the controller under `strategy.search`: an error
    names the key to fix."""
    from growth.controllers.service import SearchService

    from growth.errors import ConfigError
    from growth.searching import SearchSettings

    settings = SearchSettings(controller="random", children=1, generations=1, epochs=1,
                              backend="local", space={"exclude": ["nope"]})
    with SearchService() as service, pytest.raises(
            ConfigError, match=r"^strategy\.search\.space\.exclude: no conv/linear layer named "
                               r"'nope'"):
        service.search(_service_ctx(tmp_path), SearchRequest(settings, TrainConfig(epochs=1)))
    settings = SearchSettings(controller="random", controller_params={"nope": 1}, children=1,
                              generations=1, epochs=1, backend="local")
    with SearchService() as service, pytest.raises(
            ConfigError, match=r"^strategy\.search\.controller\.nope"):
        service.search(_service_ctx(tmp_path), SearchRequest(settings, TrainConfig(epochs=1)))


def test_a_controller_without_settings_passes_the_config_check(monkeypatch) -> None:
    """A plug-in controller need not declare a `Settings` model: the config check then looks
    only at its name."""
    import growth.controllers as controllers
    from growth.controllers.service import check_search_settings

    from growth.errors import ConfigError
    from growth.searching import SearchSettings

    class Bare:
        name = "bare"

    monkeypatch.setattr(controllers, "available_controllers", lambda: {"bare": Bare})
    check_search_settings(SearchSettings(controller="bare", controller_params={"x": 1}),
                          "strategy.search")
    with pytest.raises(ConfigError, match="unknown controller 'eas'"):
        check_search_settings(SearchSettings(controller="eas"), "strategy.search")


def test_the_service_starts_ray_once_with_its_address_and_log_and_stops_it_on_close(
        tmp_path: Path, monkeypatch) -> None:
    """`_connect` enters `ray_cluster` on the first search that needs Ray (a search's own
    address first, else the service's, with the service's log file) and hands the same
    cluster to every later search; `close` leaves it. Ray itself is replaced by a recorder."""
    from contextlib import contextmanager

    from growth.controllers.service import SearchService

    import growth.cluster

    calls: list[tuple[Any, ...]] = []

    @contextmanager
    def fake_cluster(address=None, num_cpus=None, num_gpus=None, log_file=None):
        calls.append(("start", address, log_file))
        yield f"cluster@{address}"
        calls.append(("stop", address))

    monkeypatch.setattr(growth.cluster, "ray_cluster", fake_cluster)
    log = tmp_path / "ray.log"
    service = SearchService(log_file=log, ray_address="head:1")
    with service._connect(None) as first:
        assert first == "cluster@head:1"
    with service._connect("other:2") as again:
        assert again == "cluster@head:1"  # joined once, kept
    assert calls == [("start", "head:1", log)]
    service.close()
    assert calls[1:] == [("stop", "head:1")] and service.cluster is None
    with SearchService(ray_address="head:1") as other, other._connect("other:2") as got:
        assert got == "cluster@other:2"
    assert calls[2:] == [("start", "other:2", None), ("stop", "other:2")]


def test_the_service_hands_the_driver_the_settings_of_its_search(tmp_path: Path,
                                                                monkeypatch) -> None:
    """What `SearchService.search` asks of the driver, read off a stand-in for `run_search`
    that records its call and stops: the children's training (epochs, lr x lr_scale, the
    schedule, no warm-up), each child's threads (cpus_per_trial rounded down, at least 1), the
    budget, the resources and every choice of the settings; `on_end` is called all the same."""
    from growth.controllers.driver import Budget, Resources
    from growth.controllers.service import SearchService

    from growth.searching import SearchSettings

    seen = _record_run_search(monkeypatch)
    ctx = _service_ctx(tmp_path)
    ctx.seed = 4
    settings = SearchSettings(controller="random", children=3, generations=2, epochs=1,
                              lr_scale=0.25, schedule="constant", margin=0.1, cost=0.5,
                              parent="fixed", backend="local", concurrency=3,
                              cpus_per_trial=0.5, space={"widths": {"fc": [8, 12]}})
    ended: list[int] = []
    with SearchService(on_end=ended.append) as service, pytest.raises(_Stop):
        service.search(ctx, SearchRequest(settings, TrainConfig(epochs=5, lr=0.2,
                                                                warmup_epochs=2),
                                          ("l2", {"lambda": 2.0}), parent_acc=0.75))
    folder, parent, _, _, task, spec, budget, resources = seen["args"]
    assert (folder, parent, task) == (tmp_path / "search", tmp_path / "search" / "parent",
                                      ctx.task)
    assert (spec.train.epochs, spec.train.lr, spec.train.schedule,
            spec.train.warmup_epochs) == (1, 0.05, "constant", 0)
    assert spec.threads == 1 and spec.device == "cpu"
    assert (spec.strategy.name, spec.strategy.params) == ("l2", {"lambda": 2.0})
    assert budget == Budget(children=3, generations=2)
    assert resources == Resources(concurrency=3, cpus_per_trial=0.5)
    kw = seen["kwargs"]
    assert {k: kw[k] for k in ("seed", "parent_acc", "policy", "margin", "cost", "backend",
                               "child_s")} == {
        "seed": 4, "parent_acc": 0.75, "policy": "fixed", "margin": 0.1, "cost": 0.5,
        "backend": "local", "child_s": None}
    assert ended == [1]
