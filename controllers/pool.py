"""Long-lived Ray actors that train search children: the `ray` backend's workers.

A Tune experiment starts fresh trial processes, and a process that imports torch and the
engine costs seconds (bench/bench_search.py: a generation of one-step children cost about 5 s
beyond its training on Tune, an experiment of two trivial trials 2.8-4.1 s; starting two
actors that import torch and growth, 6-8 s on a loaded 2-core machine; a call on a started
actor, milliseconds). So children train on a `WorkerPool`: one actor per child trained at
once, each holding `cpus_per_trial` CPUs and `gpus_per_trial` GPUs, with torch and the engine
imported once. The pool outlives a search: a campaign's search service holds one for the
whole campaign (a search without one holds its own for its duration), so from the second
search on a generation costs what the work needs.

Each actor trains a child with the trials' own body (`growth.controllers.trial.train_child`),
so a child's result does not depend on the backend. The task's data and the search space go
to the object store once per search; an actor reads them once, on its first child of that
search. An actor never writes into the search directory: it trains into a temporary folder
on its own node and returns the child's files, which the driver records
(`controllers/driver.py`). An actor that dies (its process or node) is replaced by a new one,
placed by Ray wherever the cluster has room.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

READY = "ready"  # an actor answered its first call: it holds its resources, its imports done


class ChildWorker:
    """The actor's body (made remote by `WorkerPool` with the pool's resource shape)."""

    def __init__(self) -> None:
        import growth.controllers.trial  # noqa: F401 (torch and the engine, imported once)

        self.inputs: tuple[str, Any] | None = None

    def ready(self) -> dict[str, Any]:
        """Where this actor runs: its node and process (answered once it is placed)."""
        import os

        import ray

        return {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def train(self, config: Mapping[str, Any], inputs: list[Any]
              ) -> tuple[dict[str, Any], dict[str, bytes]]:
        """Train one child (`train_child`); returns its metrics and, if it finished, the files
        of its folder by relative path. `inputs` is `[ref]`, the object store's (task, space)
        of the search (in a list so that Ray hands over the reference, read once here)."""
        import ray
        from growth.controllers.trial import train_child

        ref = inputs[0]
        if self.inputs is None or self.inputs[0] != ref.hex():
            self.inputs = (ref.hex(), ray.get(ref))
        task, space = self.inputs[1]
        node = ray.get_runtime_context().get_node_id()
        with tempfile.TemporaryDirectory(prefix="growth-child-") as tmp:
            metrics = train_child(config, task, space, tmp, node=node)
            files = ({p.relative_to(tmp).as_posix(): p.read_bytes()
                      for p in sorted(Path(tmp).rglob("*")) if p.is_file()}
                     if metrics["status"] == "ok" else {})
        return metrics, files


_REMOTE: Any = None


def _remote() -> Any:
    """ChildWorker as a Ray actor class (made once per process; no restarts: the pool
    replaces a dead actor itself, and retries its child)."""
    global _REMOTE
    if _REMOTE is None:
        import ray

        _REMOTE = ray.remote(max_restarts=0)(ChildWorker)
    return _REMOTE


@dataclass
class Slot:
    """One actor of the pool and what it is doing."""

    actor: Any
    ready: Any  # the ObjectRef of its `ready` call until it answers, then READY
    where: dict[str, Any] | None = None  # its node and pid, once ready

    @property
    def actor_id(self) -> str:
        return self.actor._actor_id.hex()


class WorkerPool:
    """Actors that train children, `start`ed with a resource shape and kept until `close`.

    Only actors that have answered their first call are given work, so an actor Ray cannot
    place yet (the cluster's CPUs held by others) delays nothing that a placed one can do.
    The pool does its bookkeeping (which actor holds which place, which are placed, which are
    replaced) through `ray`, the Ray API it calls (`kill`, `get`, `wait`, `put`,
    `is_initialized`, `exceptions.RayError`; None: Ray itself, imported when first needed),
    and makes its actors from `worker` (None: ChildWorker as a Ray actor): the driver calls
    Ray through the pool too, so the `ray` backend's logic runs on stand-ins for Ray.
    """

    def __init__(self, ray: Any = None, worker: Any = None) -> None:
        self.slots: list[Slot] = []
        self.shape: tuple[float, float] | None = None
        self._ray = ray
        self._worker = worker

    @property
    def ray(self) -> Any:
        if self._ray is None:
            import ray

            self._ray = ray
        return self._ray

    def start(self, size: int, cpus: float, gpus: float) -> None:
        """Hold `size` actors of `cpus` CPUs and `gpus` GPUs each (a different shape replaces
        the actors; a larger size adds to them)."""
        if self.shape != (cpus, gpus):
            self.close()
            self.shape = (cpus, gpus)
        while len(self.slots) < size:
            self.slots.append(self._new())

    def _new(self) -> Slot:
        assert self.shape is not None
        cpus, gpus = self.shape
        worker = self._worker if self._worker is not None else _remote()
        actor = worker.options(num_cpus=cpus, num_gpus=gpus).remote()
        return Slot(actor, actor.ready.remote())

    def replace(self, slot: Slot) -> Slot:
        """Kill `slot`'s actor (dead already, or abandoned mid-child) and start another."""
        self.ray.kill(slot.actor, no_restart=True)
        new = self._new()
        self.slots[self.slots.index(slot)] = new
        return new

    def discard(self, slot: Slot) -> None:
        """Kill `slot`'s actor and leave its place empty (`start` fills it)."""
        self.ray.kill(slot.actor, no_restart=True)
        self.slots.remove(slot)

    def waiting(self) -> list[Any]:
        """The `ready` calls of actors not yet placed."""
        return [s.ready for s in self.slots if s.ready is not READY]

    def placed(self, ref: Any) -> Slot | None:
        """The slot whose `ready` call `ref` is, marked ready (None if it is no such call)."""
        ray = self.ray
        for slot in self.slots:
            if slot.ready is not READY and slot.ready.hex() == ref.hex():
                try:
                    slot.where = ray.get(ref)
                except ray.exceptions.RayError:  # it died before it answered: a fresh one
                    self.replace(slot)
                    return None
                slot.ready = READY
                return slot
        return None

    def actor_ids(self) -> list[str]:
        return [s.actor_id for s in self.slots]

    def close(self) -> None:
        """Kill every actor (their resources go back to the cluster)."""
        if not self.slots:  # never started: Ray is not even imported
            self.shape = None
            return
        if self.ray.is_initialized():
            for slot in self.slots:
                self.ray.kill(slot.actor, no_restart=True)
        self.slots = []
        self.shape = None
