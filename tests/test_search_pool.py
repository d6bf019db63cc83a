"""The `ray` backend's pool of actors (controllers/pool.py): a child's result is the same on
every backend, one campaign's searches share the same actors (stopped when it ends), and an
actor that dies is replaced, its child trained again or, past `max_failures`, recorded as
failed. Ray is the test session's (`ray_session`)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from growth.controllers import make_controller
from growth.controllers.driver import Budget, Resources, SearchProgress, run_search
from growth.controllers.pool import WorkerPool
from growth.controllers.service import SearchService
from growth.controllers.trial import TrialSpec
from searchkit import CHILD_TRAIN, digits_task, small_space, trained_base

from growth.campaign import Campaign
from growth.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]


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


def _config(tmp: Path, backend: str) -> Path:
    import yaml

    cfg = json.loads(json.dumps(CAMPAIGN))
    cfg["strategy"]["search"]["backend"] = backend
    path = tmp / f"{backend}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _campaign(tmp: Path, backend: str) -> dict[str, Any]:
    return Campaign(load_config(_config(tmp, backend)), tmp / backend).start()


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
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.ready.remote(), timeout=60)
    monkeypatch.undo()
    here = _campaign(tmp_path, "local")
    assert on_ray["R"] == here["R"]


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
        with pytest.raises(ray.exceptions.RayActorError):  # ... and dead
            ray.get(gone[0].ready.remote(), timeout=60)
        assert ray.get(left[0].actor.ready.remote(), timeout=60) == left[0].where
        result = _search(tmp_path / "run", base, "ray", children=2, generations=1, pool=pool)
    finally:
        pool.close()
    assert _outcome(result) == reference


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
