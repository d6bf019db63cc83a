"""The `ray` backend's pool of actors (controllers/pool.py): a child's result is the same on
every backend, one campaign's searches share the same actors (stopped when it ends), and an
actor that dies is replaced, its child trained again or, past `max_failures`, recorded as
failed. Ray is the test session's (`ray_session`) in the slow tests; the fast ones drive the
pool's bookkeeping and the driver's `ray` backend through a stand-in for Ray's API (every call
finished at once) and actors that train children with the trials' own body in this
process."""

from __future__ import annotations

import itertools
import json
import os
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from growth.controllers import make_controller
from growth.controllers.driver import Budget, Resources, SearchProgress, run_search
from growth.controllers.pool import READY, WorkerPool
from growth.controllers.service import SearchService
from growth.controllers.trial import TrialSpec
from growth.search_spaces import make_space
from growth.search_spaces.networks import add_head, mlp
from searchkit import (
    CHILD_TRAIN,
    all_children_reported,
    digits_task,
    small_space,
    trained_base,
)

from growth.campaign import Campaign
from growth.config import load_config
from growth.data import build_stream
from growth.train import TrainConfig


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any, float]:
    tmp = tmp_path_factory.mktemp("pool")
    task = digits_task()
    graph, acc = trained_base(task, tmp / "base", epochs=2)
    return tmp / "base", task, small_space(graph), acc


def _search(folder: Path, base: tuple[Path, Any, Any, float], backend: str, children: int = 3,
            generations: int = 2, concurrency: int = 2, max_failures: int = 1,
            pool: WorkerPool | None = None, progress: SearchProgress | None = None) -> Any:
    parent, task, space, acc = base
    controller = make_controller("random", space, {"wider_actions": 2, "deeper_actions": 1},
                                 seed=5)
    return run_search(folder, parent, controller, space, task, TrialSpec(train=CHILD_TRAIN),
                      Budget(children=children, generations=generations),
                      Resources(concurrency=concurrency, max_failures=max_failures), seed=5,
                      parent_acc=acc, backend=backend, pool=pool, progress=progress)


def _outcome(result: Any) -> list[tuple[Any, ...]]:
    return [(r.key, r.arch, r.status, r.val_acc, r.val_acc_before, r.params, r.steps)
            for r in result.records]


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_children_are_the_same_on_every_backend(tmp_path: Path, base: Any) -> None:
    """Same seeds, same threads: the pool's actors, Tune's trials and this process train
    every child to the same record, bit for bit, and the searches end alike."""
    results = {b: _search(tmp_path / b, base, b) for b in ("local", "ray", "tune")}
    local = _outcome(results["local"])
    assert {r.generation for r in results["local"].records} == {0, 1}
    assert all(r.ok for r in results["local"].records)
    for backend in ("ray", "tune"):
        assert _outcome(results[backend]) == local, backend
        assert results[backend].lineage == results["local"].lineage
    import ray

    node = ray.get_runtime_context().get_node_id()
    assert {r.node for r in results["ray"].records} == {node}  # trained by Ray's workers
    assert {r.node for r in results["local"].records} == {"local"}


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_a_dead_actor_is_replaced_and_its_child_trained_again(tmp_path: Path, base: Any
                                                               ) -> None:
    """The actor's process is SIGKILLed once the first child is recorded: the next child's
    call fails, a new actor takes its place and trains it (max_failures 1) to the record an
    uninterrupted search gives; with max_failures 0 that child is recorded as failed and the
    search goes on."""
    reference = _outcome(_search(tmp_path / "ref", base, "local", generations=1))
    for retries in (1, 0):
        pool = WorkerPool()
        killed: list[tuple[str, int]] = []

        def on_child(record: Any, board: Any, pool: WorkerPool = pool,
                     killed: list[tuple[str, int]] = killed) -> None:
            if not killed:
                slot = pool.slots[0]
                killed.append((slot.actor_id, slot.where["pid"]))
                os.kill(slot.where["pid"], signal.SIGKILL)

        try:
            result = _search(tmp_path / f"r{retries}", base, "ray", generations=1,
                             concurrency=1, max_failures=retries, pool=pool,
                             progress=SearchProgress(on_child=on_child))
            assert killed and pool.actor_ids() != [killed[0][0]]  # a new actor
            assert pool.slots[0].where["pid"] != killed[0][1]
        finally:
            pool.close()
        got = _outcome(result)
        if retries:
            assert got == reference
        else:
            assert got[0] == reference[0] and got[2] == reference[2]
            failed = result.records[1]
            assert failed.status == "failed" and failed.val_acc is None
            assert "the trial's process failed" in failed.error
            assert result.done


CAMPAIGN = {
    "name": "pool", "seed": 3, "threads": 1,
    "data": {"dataset": "digits", "stream": "permuted", "n_tasks": 3,
             "max_train_per_task": 240},
    "model": {"kind": "mlp", "hidden": [16]},
    "train": {"epochs": 2, "batch_size": 32, "lr": 0.05},
    "strategy": {"name": "rec", "compress": False, "search": {
        "controller": "eas", "children": 2, "generations": 1, "epochs": 1, "concurrency": 2,
        "controller_params": {"wider_actions": 1, "deeper_actions": 1},
        "space": {"widths": {"fc": [16, 24, 32, 48]}}}},
}


def _dies(ray: Any, actor: Any, deadline_s: float = 60.0) -> bool:
    """Whether `actor` stops answering within `deadline_s`: `ray.kill` is asynchronous, so a
    call sent right after it may still be served by the actor it kills."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            ray.get(actor.ready.remote(), timeout=deadline_s)
        except ray.exceptions.RayActorError:
            return True
        time.sleep(0.2)
    return False


def _config(tmp: Path, backend: str) -> Path:
    import yaml

    cfg = json.loads(json.dumps(CAMPAIGN))
    cfg["strategy"]["search"]["backend"] = backend
    path = tmp / f"{backend}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _campaign(tmp: Path, backend: str) -> dict[str, Any]:
    return Campaign(load_config(_config(tmp, backend)), tmp / backend).start()


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_a_campaigns_searches_share_one_pool(tmp_path: Path, base: Any,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """REC on 3 tasks searches twice through the campaign's SearchService: both searches run
    on the same actors (same ids, same processes), which stop when the campaign ends; the
    run's R is the one the local backend gives."""
    import ray

    import growth.campaign

    seen: list[list[tuple[str, int]]] = []
    actors: list[Any] = []

    class Watched(SearchService):
        def search(self, ctx: Any, request: Any) -> Any:
            out = super().search(ctx, request)
            seen.append([(s.actor_id, s.where["pid"]) for s in self.pool.slots])
            actors.extend(s.actor for s in self.pool.slots)
            return out

    monkeypatch.setattr(growth.campaign, "SearchService", Watched)
    on_ray = _campaign(tmp_path, "ray")
    assert len(seen) == 2 and len(seen[0]) == 2 and seen[0] == seen[1]
    assert len({pid for _, pid in seen[0]}) == 2
    for actor in actors:  # the campaign's end stopped them
        assert _dies(ray, actor)
    monkeypatch.undo()
    here = _campaign(tmp_path, "local")
    assert on_ray["R"] == here["R"]


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_ctrl_c_kills_the_actors_still_training_and_the_search_resumes(tmp_path: Path,
                                                                        base: Any) -> None:
    """Ctrl-C as the first of two children running at once is recorded: KeyboardInterrupt
    reaches the caller, the actor that still trains the other child is killed (nothing goes
    on training for a search that stopped), nothing else is recorded, and the search resumes
    on the same pool to the records of an uninterrupted one."""
    import ray

    reference = _outcome(_search(tmp_path / "ref", base, "local", children=2, generations=1))
    pool = WorkerPool()
    seen: list[Any] = []

    def on_child(record: Any, board: Any) -> None:
        seen.append([s.actor for s in pool.slots])
        os.kill(os.getpid(), signal.SIGINT)

    try:
        with pytest.raises(KeyboardInterrupt):
            _search(tmp_path / "run", base, "ray", children=2, generations=1, pool=pool,
                    progress=SearchProgress(on_child=on_child))
        lines = (tmp_path / "run" / "children.jsonl").read_text().splitlines()
        assert len(lines) == 1 and len(seen) == 1
        left = pool.slots
        assert len(left) == 1  # the busy actor is gone from the pool ...
        gone = [a for a in seen[0] if a is not left[0].actor]
        assert _dies(ray, gone[0])  # ... and dead
        assert ray.get(left[0].actor.ready.remote(), timeout=60) == left[0].where
        result = _search(tmp_path / "run", base, "ray", children=2, generations=1, pool=pool)
    finally:
        pool.close()
    assert _outcome(result) == reference


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_a_campaign_in_a_ray_task_gives_its_actors_back_after_each_search(tmp_path: Path
                                                                          ) -> None:
    """A campaign run as a Ray task (as `growth compare` runs them, holding no CPU) holds its
    pool's actors only while a search runs: after each of its two searches the pool is
    empty, and its R is the one the same campaign gives outside Ray."""
    import ray

    from growth.cluster import driver_task_options

    @ray.remote(**driver_task_options())
    def campaign(path: Path, out: Path) -> tuple[list[int], Any]:
        from growth.controllers.service import SearchService

        import growth.campaign

        sizes: list[int] = []

        class Watched(SearchService):
            def search(self, ctx: Any, request: Any) -> Any:
                out = super().search(ctx, request)
                sizes.append(len(self.pool.slots))
                return out

        saved = growth.campaign.SearchService
        growth.campaign.SearchService = Watched
        try:
            run = growth.campaign.Campaign(growth.campaign.load_config(path), out)
            return sizes, run.start()["R"]
        finally:
            growth.campaign.SearchService = saved

    sizes, r = ray.get(campaign.remote(_config(tmp_path, "ray"), tmp_path / "ray"),
                       timeout=600)
    assert sizes == [0, 0]
    assert r == _campaign(tmp_path, "local")["R"]


# ---- fast: the pool's bookkeeping and the `ray` backend on a stand-in for Ray's API ----------
class FakeRayError(Exception):
    """Stands for ray.exceptions.RayError (an actor's process or node died)."""


class FakeRef:
    """A finished call: its value, or the error `get` raises; numbered in call order."""

    counter = itertools.count()

    def __init__(self, value: Any = None, error: Exception | None = None, kind: str = "") -> None:
        self.n, self.value, self.error, self.kind = next(FakeRef.counter), value, error, kind

    def hex(self) -> str:
        return f"ref{self.n:06d}"


class FakeRay:
    """Ray's API as the pool and the driver call it: every call has finished, and `wait`
    returns the oldest call (so actors answer `ready` in the order they were made)."""

    exceptions = SimpleNamespace(RayError=FakeRayError)

    def __init__(self) -> None:
        self.initialized = True
        self.killed: list[tuple[Any, bool]] = []
        self.puts: list[Any] = []
        self.training: list[int] = []  # children in training at each wait

    def kill(self, actor: Any, *, no_restart: bool = True) -> None:
        self.killed.append((actor, no_restart))

    def get(self, ref: FakeRef) -> Any:
        if ref.error is not None:
            raise ref.error
        return ref.value

    def wait(self, refs: list[FakeRef], num_returns: int = 1) -> tuple[list[Any], list[Any]]:
        assert num_returns == 1
        self.training.append(sum(r.kind == "train" for r in refs))
        first = min(refs, key=lambda r: r.n)
        return [first], [r for r in refs if r is not first]

    def put(self, value: Any) -> FakeRef:
        self.puts.append(value)
        return FakeRef(value)

    def is_initialized(self) -> bool:
        return self.initialized


class FakeActor:
    """A pool actor in this process: the real actor body (`ChildWorker`) behind calls that
    have finished at once. `fate` of its first child: "dies" (its process fails: RayError
    with `message`), "fails" (the child fails by itself), "drops" (the child's graph is
    missing from what it returns); None: it trains every child."""

    def __init__(self, number: int, options: dict[str, float], fate: str | None,
                 message: str, unplaced: bool) -> None:
        from growth.controllers.pool import ChildWorker

        self.number, self.options, self.fate, self.message = number, options, fate, message
        self.unplaced = unplaced
        self.body = ChildWorker()
        self.trained: list[str] = []
        self._actor_id = SimpleNamespace(hex=lambda: f"actor{number}")
        self.ready = SimpleNamespace(remote=self._ready)
        self.train = SimpleNamespace(remote=self._train)

    def _ready(self) -> FakeRef:
        if self.unplaced:
            return FakeRef(error=FakeRayError(f"actor {self.number} died before it started"))
        return FakeRef(self.body.ready())

    def _train(self, config: dict[str, Any], inputs: list[Any]) -> FakeRef:
        self.trained.append(config["key"])
        fate, self.fate = self.fate, None
        if fate == "dies":
            return FakeRef(error=FakeRayError(self.message), kind="train")
        if fate == "fails":
            return FakeRef(({"status": "failed", "error": "the child failed by itself",
                             "start": 1.0, "end": 2.0, "node": "node-1"}, {}), kind="train")
        metrics, files = self.body.train(config, inputs)
        if fate == "drops":
            files = {k: v for k, v in files.items() if not k.startswith("structure")}
        return FakeRef((metrics, files), kind="train")


class FakeWorker:
    """The actor class: `options(num_cpus=, num_gpus=).remote()` makes a FakeActor; actor
    number i has fate `fates.get(i)`; those in `unplaced` die before they answer `ready`."""

    def __init__(self, fates: dict[int, str] | None = None, message: str = "",
                 unplaced: tuple[int, ...] = ()) -> None:
        self.fates, self.message, self.unplaced = fates or {}, message, unplaced
        self.actors: list[FakeActor] = []

    def options(self, **options: float) -> Any:
        def remote() -> FakeActor:
            n = len(self.actors)
            self.actors.append(FakeActor(n, options, self.fates.get(n), self.message,
                                         n in self.unplaced))
            return self.actors[-1]

        return SimpleNamespace(remote=remote)


@pytest.fixture
def fake_ray(monkeypatch: pytest.MonkeyPatch) -> FakeRay:
    """The stand-in for Ray, also answering the actor body's own calls (`ray.get` of the
    search's inputs, the node it runs on)."""
    import ray

    fake = FakeRay()
    monkeypatch.setattr(ray, "get", fake.get)
    monkeypatch.setattr(ray, "get_runtime_context",  # this process runs no Ray task, also
                        lambda: SimpleNamespace(get_node_id=lambda: "node-1",  # beside a
                                                get_task_id=lambda: None))  # session of Ray
    return fake


def test_the_pool_holds_its_size_in_one_resource_shape_and_a_new_shape_replaces_it(
        fake_ray: FakeRay) -> None:
    """start(n, cpus, gpus) makes n actors of that shape; a larger n adds actors, a smaller
    one keeps them; another shape kills them all and makes n of the new one; close kills
    every actor and forgets the shape."""
    ray, worker = fake_ray, FakeWorker()
    pool = WorkerPool(ray, worker)
    pool.start(2, 1.0, 0.0)
    assert [a.options for a in worker.actors] == [{"num_cpus": 1.0, "num_gpus": 0.0}] * 2
    assert [s.actor for s in pool.slots] == worker.actors and pool.shape == (1.0, 0.0)
    assert pool.waiting() == [s.ready for s in pool.slots]  # none placed yet
    assert all(s.ready is not READY and s.where is None for s in pool.slots)
    pool.start(3, 1.0, 0.0)
    assert [s.actor for s in pool.slots] == worker.actors[:3] and ray.killed == []
    pool.start(1, 1.0, 0.0)
    assert len(pool.slots) == 3 and ray.killed == []
    pool.start(2, 2.0, 1.0)
    assert ray.killed == [(a, True) for a in worker.actors[:3]]
    assert [s.actor for s in pool.slots] == worker.actors[3:]
    assert [a.options for a in worker.actors[3:]] == [{"num_cpus": 2.0, "num_gpus": 1.0}] * 2
    assert pool.actor_ids() == ["actor3", "actor4"] and pool.shape == (2.0, 1.0)
    pool.close()
    assert ray.killed[3:] == [(a, True) for a in worker.actors[3:]]
    assert pool.slots == [] and pool.shape is None
    pool.start(1, 2.0, 1.0)  # the shape was forgotten: a fresh actor of the same shape
    assert [s.actor for s in pool.slots] == worker.actors[5:] and len(ray.killed) == 5


def test_the_pool_marks_an_actor_placed_when_it_answers_and_replaces_one_that_died(
        fake_ray: FakeRay) -> None:
    """placed(ref) marks the slot whose `ready` call ref is (matched by id) ready, with where
    it runs; an actor that died before answering is killed and a new one takes its place;
    replace and discard kill the actor and put a new one in its place or leave none."""
    ray, worker = fake_ray, FakeWorker(unplaced=(1,))
    pool = WorkerPool(ray, worker)
    pool.start(3, 1.0, 0.0)
    a, b, c = pool.slots
    ref_c = c.ready
    assert pool.placed(FakeRef()) is None  # no actor's call
    handle = FakeRef(ref_c.value)
    handle.n = ref_c.n
    assert pool.placed(handle) is c  # the same call through another handle
    assert c.ready is READY and c.where == {"node": "node-1", "pid": os.getpid()}
    assert pool.waiting() == [a.ready, b.ready]
    assert pool.placed(ref_c) is None  # placed already
    assert pool.placed(b.ready) is None  # actor 1 died before it answered
    assert ray.killed == [(worker.actors[1], True)]
    assert pool.slots[0] is a and pool.slots[2] is c and pool.slots[1].actor is worker.actors[3]
    new = pool.slots[1]
    assert pool.waiting() == [a.ready, new.ready]
    assert pool.placed(new.ready) is new and pool.placed(a.ready) is a and pool.waiting() == []
    fresh = pool.replace(c)
    assert ray.killed[1:] == [(worker.actors[2], True)] and pool.slots == [a, new, fresh]
    assert fresh.actor is worker.actors[4] and fresh.ready is not READY
    pool.discard(a)
    assert ray.killed[2:] == [(worker.actors[0], True)] and pool.slots == [new, fresh]
    assert pool.actor_ids() == ["actor3", "actor4"]


def test_a_pool_closed_after_ray_stopped_kills_nothing_and_an_unused_one_calls_no_ray(
        fake_ray: FakeRay) -> None:
    """Ray gone (its actors with it): close only forgets the actors; a pool never started
    closes without calling Ray at all."""
    ray = fake_ray
    pool = WorkerPool(ray, FakeWorker())
    ray.initialized = False
    pool.start(2, 1.0, 0.0)
    pool.close()
    assert ray.killed == [] and pool.slots == [] and pool.shape is None
    unused = WorkerPool(SimpleNamespace())  # any call to it would fail
    unused.shape = (1.0, 0.0)
    unused.close()
    assert unused.shape is None


def test_the_actor_class_is_made_once_without_restarts(monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    """Ray must not restart a dead actor by itself (the pool replaces it and retries its
    child): ChildWorker is made remote once per process, with max_restarts=0."""
    import growth.controllers.pool as pool_module
    import ray

    made: list[tuple[dict[str, Any], Any]] = []

    def remote(**options: Any) -> Any:
        return lambda cls: made.append((options, cls)) or ("remote", cls)

    monkeypatch.setattr(ray, "remote", remote)
    monkeypatch.setattr(pool_module, "_REMOTE", None)
    first = pool_module._remote()
    assert pool_module._remote() is first
    assert made == [({"max_restarts": 0}, pool_module.ChildWorker)]
    assert first == ("remote", pool_module.ChildWorker)


def test_a_pool_given_no_actor_class_makes_its_actors_from_the_remote_child_worker(
        fake_ray: FakeRay, monkeypatch: pytest.MonkeyPatch) -> None:
    """WorkerPool() as the driver and the search service make it: its actors come from
    ChildWorker's remote class (`_remote()`)."""
    import growth.controllers.pool as pool_module

    worker = FakeWorker()
    monkeypatch.setattr(pool_module, "_REMOTE", worker)
    pool = WorkerPool(fake_ray)
    pool.start(1, 1.0, 0.0)
    assert [s.actor for s in pool.slots] == worker.actors and len(worker.actors) == 1


def _tiny(tmp: Path) -> tuple[Path, Any, Any]:
    """An untrained MLP on 40 digits per class split (a parent), its task and space."""
    task = build_stream({"dataset": "digits", "stream": "split", "n_tasks": 1,
                         "max_train_per_task": 40})[0]
    graph = add_head(mlp(task.input_shape, [8]), "t0", task.n_classes)
    graph.save(tmp / "parent")
    space = make_space({"widths": {"fc": [8, 12, 16, 24]}, "noise": 0.0,
                        "deeper_noise": 0.0}, graph)
    return tmp / "parent", task, space


def _tiny_search(folder: Path, tiny: tuple[Path, Any, Any], backend: str, pool: Any = None,
                 children: int = 3, concurrency: int = 2, max_failures: int = 1,
                 progress: SearchProgress | None = None, generations: int = 1, **more: Any
                 ) -> Any:
    parent, task, space = tiny
    more.setdefault("connect", lambda: nullcontext(SimpleNamespace(started=False)))
    controller = make_controller("random", space, {"wider_actions": 2, "deeper_actions": 1},
                                 seed=2)
    return run_search(folder, parent, controller, space, task,
                      TrialSpec(train=TrainConfig(epochs=1, batch_size=32, lr=0.05)),
                      Budget(children=children, generations=generations),
                      Resources(concurrency=concurrency, max_failures=max_failures), seed=2,
                      parent_acc=0.1, backend=backend, pool=pool, progress=progress, **more)


def test_the_ray_backend_gives_each_child_to_the_first_free_placed_actor(
        tmp_path: Path, fake_ray: FakeRay) -> None:
    """A caller's pool of three actors, concurrency 2: the search's data goes to the object
    store once; child 0 goes to actor 0 once it is placed, child 1 to actor 1, and child 2
    waits (two train already, though actor 2 is placed) until actor 0 is free again; every
    child's record is the one this process trains."""
    tiny = _tiny(tmp_path)
    reference = _tiny_search(tmp_path / "local", tiny, "local")
    worker = FakeWorker()
    pool = WorkerPool(fake_ray, worker)
    pool.start(3, 1.0, 0.0)
    result = _tiny_search(tmp_path / "ray", tiny, "ray", pool)
    assert [a.trained for a in worker.actors] == [["g000c00", "g000c02"], ["g000c01"], []]
    assert max(fake_ray.training) == 2 and fake_ray.killed == []
    assert len(fake_ray.puts) == 1 and fake_ray.puts[0][1] is tiny[2]
    assert all(s.ready is READY for s in pool.slots) and len(pool.slots) == 3
    assert _outcome(result) == _outcome(reference)
    assert all(r.ok and r.node == "node-1" for r in result.records)
    for r in result.records:
        assert (tmp_path / "ray" / r.checkpoint / "structure.json").is_file()


@pytest.mark.parametrize(("retries", "message", "why"), [
    (1, "", ""),
    (0, "\n  the actor died unexpectedly  \nits node was lost\n", "the actor died unexpectedly"),
    (0, "", "FakeRayError"),
])
def test_a_child_whose_actor_dies_is_retried_on_a_new_actor_then_recorded_failed(
        tmp_path: Path, fake_ray: FakeRay, retries: int, message: str, why: str) -> None:
    """Actor 0 dies training child 0: it is killed and actor 1 takes its place; with
    max_failures 1 child 0 trains again there (to the record this process gives), with 0 it
    is recorded as failed with the error's first line (the error's type if it has no text)
    and the search goes on with child 1."""
    tiny = _tiny(tmp_path)
    reference = _outcome(_tiny_search(tmp_path / "local", tiny, "local", children=2))
    worker = FakeWorker({0: "dies"}, message)
    pool = WorkerPool(fake_ray, worker)
    result = _tiny_search(tmp_path / "ray", tiny, "ray", pool, children=2, concurrency=1,
                          max_failures=retries)
    assert fake_ray.killed == [(worker.actors[0], True)]
    assert [s.actor for s in pool.slots] == [worker.actors[1]]
    got = _outcome(result)
    if retries:
        assert [a.trained for a in worker.actors] == [["g000c00"], ["g000c00", "g000c01"]]
        assert got == reference
    else:
        assert [a.trained for a in worker.actors] == [["g000c00"], ["g000c01"]]
        failed = result.records[0]
        assert failed.status == "failed" and failed.val_acc is None and failed.key == "g000c00"
        assert failed.error == f"the trial's process failed: {why}"
        assert got[1] == reference[1] and result.done


def test_a_child_whose_actors_die_more_than_max_failures_times_is_recorded_failed(
        tmp_path: Path, fake_ray: FakeRay) -> None:
    """max_failures 1: child 0's actor dies, its replacement dies too; the child is then
    recorded failed, and the third actor (the second replacement) trains nothing."""
    worker = FakeWorker({0: "dies", 1: "dies"}, "node lost")
    result = _tiny_search(tmp_path / "ray", _tiny(tmp_path), "ray",
                          WorkerPool(fake_ray, worker), children=1, concurrency=1)
    assert [a.trained for a in worker.actors] == [["g000c00"], ["g000c00"], []]
    [failed] = result.records
    assert failed.status == "failed" and failed.error == "the trial's process failed: node lost"


def test_no_child_goes_to_an_actor_that_has_not_answered_ready(tmp_path: Path,
                                                              fake_ray: FakeRay) -> None:
    """Two actors, actor 0 dying before it answers `ready`: the child waits for a placed
    actor and trains on actor 1, never on actor 0 (which is replaced)."""
    worker = FakeWorker(unplaced=(0,))
    result = _tiny_search(tmp_path / "ray", _tiny(tmp_path), "ray",
                          WorkerPool(fake_ray, worker), children=1, concurrency=2)
    assert [a.trained for a in worker.actors][:2] == [[], ["g000c00"]]
    assert fake_ray.killed[0] == (worker.actors[0], True)
    [record] = result.records
    assert record.ok


@pytest.mark.parametrize(("fate", "error"), [
    ("fails", "the child failed by itself"),
    ("drops", "the child's folder is incomplete"),
])
def test_a_child_that_fails_on_its_actor_is_recorded_failed_not_retried(
        tmp_path: Path, fake_ray: FakeRay, fate: str, error: str) -> None:
    """A child that fails by itself, or returns an incomplete folder, is a result: recorded
    failed with its error (with its times and node), not trained again, its actor kept."""
    tiny = _tiny(tmp_path)
    worker = FakeWorker({0: fate})
    pool = WorkerPool(fake_ray, worker)
    result = _tiny_search(tmp_path / "ray", tiny, "ray", pool, children=2, concurrency=1)
    assert [a.trained for a in worker.actors] == [["g000c00", "g000c01"]]
    assert fake_ray.killed == []
    failed, ok = result.records
    assert failed.status == "failed" and failed.error == error and ok.ok
    assert failed.checkpoint is None and not (tmp_path / "ray" / "children" / "g000c00").exists()
    if fate == "fails":
        assert (failed.start, failed.end, failed.node) == (1.0, 2.0, "node-1")


def test_an_interrupt_kills_the_actors_still_training_and_records_nothing_more(
        tmp_path: Path, fake_ray: FakeRay) -> None:
    """KeyboardInterrupt as child 0 is recorded, child 1 still training on actor 1: actor 1
    is killed and leaves the pool, actor 0 stays, and only child 0 is recorded."""
    tiny = _tiny(tmp_path)
    worker = FakeWorker()
    pool = WorkerPool(fake_ray, worker)

    def on_child(record: Any, board: Any) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _tiny_search(tmp_path / "ray", tiny, "ray", pool, children=2,
                     progress=SearchProgress(on_child=on_child))
    assert [a.trained for a in worker.actors] == [["g000c00"], ["g000c01"]]
    assert fake_ray.killed == [(worker.actors[1], True)]
    assert [s.actor for s in pool.slots] == [worker.actors[0]]
    lines = (tmp_path / "ray" / "children.jsonl").read_text().splitlines()
    assert [json.loads(line)["key"] for line in lines] == ["g000c00"]


def test_a_ray_backend_search_ends_with_every_child_reported(tmp_path: Path,
                                                             fake_ray: FakeRay) -> None:
    """Two generations of one child on the pool: the search returns both records (a
    generation left with children unreported fails the test)."""
    with all_children_reported():
        result = _tiny_search(tmp_path / "ray", _tiny(tmp_path), "ray",
                              WorkerPool(fake_ray, FakeWorker()), children=1, generations=2)
    assert [(r.key, r.ok) for r in result.records] == [("g000c00", True), ("g001c00", True)]
    assert result.generations == 2 and result.done


def test_a_search_on_a_started_local_ray_too_small_for_a_child_starts_no_actor(
        tmp_path: Path, fake_ray: FakeRay) -> None:
    """The search's own local Ray (started, 0.5 CPUs) cannot hold a child of one CPU: the
    search says so before the pool makes any actor."""
    from growth.errors import ConfigError

    worker = FakeWorker()
    small = SimpleNamespace(started=True, cpus=0.5, gpus=0.0)
    with pytest.raises(ConfigError, match="cpus_per_trial"):
        _tiny_search(tmp_path / "ray", _tiny(tmp_path), "ray", WorkerPool(fake_ray, worker),
                     connect=lambda: nullcontext(small))
    assert worker.actors == []


def test_the_controller_observes_the_accuracies_of_children_trained_on_the_pool(
        tmp_path: Path, fake_ray: FakeRay, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each child an actor returns is observed with its validation accuracy, the same values
    as the records."""
    from growth.controllers.random_search import RandomController

    observed: list[list[float | None]] = []
    monkeypatch.setattr(RandomController, "observe",
                        lambda self, results: observed.append([acc for _, acc in results]))
    result = _tiny_search(tmp_path / "ray", _tiny(tmp_path), "ray",
                          WorkerPool(fake_ray, FakeWorker()), children=2)
    assert observed == [[r.val_acc for r in result.records]]
    assert all(acc is not None for acc in observed[0])


def test_a_search_without_a_pool_starts_its_own_and_closes_it(
        tmp_path: Path, fake_ray: FakeRay, monkeypatch: pytest.MonkeyPatch) -> None:
    """No caller's pool: the search makes one (of `concurrency` actors) and kills its actors
    when it ends; with no caller's `connect`, Ray is the cluster at `ray_address`, logging
    to `log_file`."""
    import growth.controllers.driver as driver

    worker = FakeWorker()
    made: list[WorkerPool] = []
    clusters: list[tuple[Any, Any]] = []

    def own_pool() -> WorkerPool:
        made.append(WorkerPool(fake_ray, worker))
        return made[-1]

    def cluster(address: Any, log_file: Any) -> Any:
        clusters.append((address, log_file))
        return nullcontext(SimpleNamespace(started=False))

    monkeypatch.setattr(driver, "WorkerPool", own_pool)
    monkeypatch.setattr(driver, "_ray", cluster)
    result = _tiny_search(tmp_path / "ray", _tiny(tmp_path), "ray", children=2, connect=None,
                          ray_address="10.0.0.1:6379", log_file=tmp_path / "ray.log")
    assert clusters == [("10.0.0.1:6379", tmp_path / "ray.log")]
    assert len(made) == 1 and all(r.ok for r in result.records)
    assert fake_ray.killed == [(a, True) for a in worker.actors] and len(worker.actors) == 2
    assert made[0].slots == []


def test_the_actor_body_reads_a_searchs_inputs_once_and_returns_its_childs_files(
        fake_ray: FakeRay, monkeypatch: pytest.MonkeyPatch) -> None:
    """ChildWorker.train reads the object store's (task, space) on its first child of a
    search and again only for another search's; it trains in a temporary folder on its node
    and returns the metrics and every file by relative path (none for a failed child)."""
    import growth.controllers.trial as trial
    from growth.controllers.pool import ChildWorker

    gets: list[Any] = []
    seen: list[tuple[Any, ...]] = []

    def get(ref: FakeRef) -> Any:
        gets.append(ref)
        return ref.value

    def fake_train(config: Any, task: Any, space: Any, out: str, node: Any = None) -> Any:
        seen.append((config["key"], task, space, node))
        (Path(out) / "sub").mkdir()
        (Path(out) / "a.txt").write_text(config["key"])
        (Path(out) / "sub" / "b.bin").write_bytes(b"\x01")
        return {"status": config["status"], "key": config["key"]}

    import ray

    monkeypatch.setattr(ray, "get", get)
    monkeypatch.setattr(trial, "train_child", fake_train)
    body = ChildWorker()
    first, second = FakeRef(("task1", "space1")), FakeRef(("task2", "space2"))
    metrics, files = body.train({"key": "c0", "status": "ok"}, [first])
    assert metrics == {"status": "ok", "key": "c0"}
    assert files == {"a.txt": b"c0", "sub/b.bin": b"\x01"}
    assert body.train({"key": "c1", "status": "failed"}, [first])[1] == {}
    body.train({"key": "c2", "status": "ok"}, [second])
    assert gets == [first, second]
    assert seen == [("c0", "task1", "space1", "node-1"), ("c1", "task1", "space1", "node-1"),
                    ("c2", "task2", "space2", "node-1")]


def test_auto_moves_to_a_started_pool_after_a_generation_trained_here(
        tmp_path: Path, fake_ray: FakeRay, monkeypatch: pytest.MonkeyPatch) -> None:
    """"auto", no child time known: generation 0 trains here. Its measured time then decides
    generation 1, and a caller's pool whose actors are started already costs no start (here
    every start is made prohibitive and the fixed cost nothing): generation 1 trains on the
    pool's actors."""
    import growth.controllers.driver as driver

    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(driver, "RAY_FIXED_S", 0.0)
    monkeypatch.setattr(driver, "RAY_START_S", 1e9)
    worker = FakeWorker()
    pool = WorkerPool(fake_ray, worker)
    tiny = _tiny(tmp_path)
    _tiny_search(tmp_path / "warm", tiny, "ray", pool, children=1)  # the actors start
    trained = [list(a.trained) for a in worker.actors]
    result = _tiny_search(tmp_path / "auto", tiny, "auto", pool, children=2, generations=2)
    nodes = {g: [r.node for r in result.records if r.generation == g] for g in (0, 1)}
    assert nodes[0] == ["local", "local"] and nodes[1] and set(nodes[1]) == {"node-1"}
    assert sum(len(a.trained) for a in worker.actors) == sum(map(len, trained)) + len(nodes[1])


def test_auto_trains_on_the_pool_when_a_known_child_time_makes_it_worth_it(
        tmp_path: Path, fake_ray: FakeRay, monkeypatch: pytest.MonkeyPatch) -> None:
    """"auto" with a child known to take 100 s, two at once on 4 CPUs: running the
    generation's three saves 100 x 3 x (1 - 1/2) = 150 s, more than the pool's start, so
    its children train on the pool's actors; with no time known they train here."""
    worker = FakeWorker()
    pool = WorkerPool(fake_ray, worker)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    tiny = _tiny(tmp_path)
    here = _tiny_search(tmp_path / "here", tiny, "auto", pool)
    assert worker.actors == [] and {r.node for r in here.records} == {"local"}
    result = _tiny_search(tmp_path / "ray", tiny, "auto", pool, child_s=100.0)
    assert sorted(k for a in worker.actors for k in a.trained) == ["g000c00", "g000c01",
                                                                   "g000c02"]
    assert {r.node for r in result.records} == {"node-1"}
    assert _outcome(result) == _outcome(here)
