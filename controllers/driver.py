"""The search driver: generations of children, trained on Ray or here; resumable.

`run_search` is the Python entry point for every architecture search (`growth search`, and
REC's expand stage): from a parent graph folder, a controller proposes a generation of
children, a backend trains them with one body (`growth.controllers.trial.train_child`), the
controller observes their validation accuracies, and the best child so far becomes the next
generation's parent. It returns the leaderboard, each child with its graph folder and
training time. Backends: `ray`, Ray actors that outlive generations and (held by the
caller) searches (`growth.controllers.pool`), driven here with ray.wait; `tune`, Ray Tune
trials (a Tune `Searcher` feeds them); `local`, this process; `auto`, local or ray by
measurement (`choose_backend`).

Search directory (given by the caller; a `growth search` run directory is one):
  search.json            where the search stands: generation, parent (and each generation's),
                         time used, attempts
  controller/gen_NNN.*   the controller's state before proposing generation NNN
  children.jsonl         one line per finished child: the source of truth (records.py)
  children/<key>/        each finished child's graph (structure.json, weights.safetensors)
                         and its record (child.json)
  leaderboard.json       finished children, best first (rewritten as children finish)
  tune/                  the parents Ray's workers read (parents/genNNN, strategy/) and Ray
                         Tune's experiments, genNNN-aK named after their first generation and
                         its attempt (the default storage; a shared path or URI for
                         multi-node clusters instead)

Resume: calling `run_search` again on the same directory (after a crash, a SIGKILL of the
driver, `growth resume`) reloads the controller as it was before the interrupted generation,
which therefore proposes the same children; those recorded as finished are not trained again,
and children that finished in Tune's storage before the driver could record them are adopted
from there. Each child trains from its own seed with the trial's thread count, so on the CPU
the resumed search ends with the same leaderboard as an uninterrupted one.

On the `ray` backend a child that finished on an actor but was not recorded before the driver
died is trained again on resume (same seed: same result). On `tune`, one experiment runs
several generations on the same trial actors (no start-up between generations); a new one
starts every GENERATIONS_PER_FIT trials, so the driver's memory stays bounded (Tune's driver
memory grows with the trials of an experiment).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from growth.controllers.pool import READY, Slot, WorkerPool
from growth.controllers.records import (
    RECORDS,
    ChildRecord,
    append_record,
    board_rows,
    child_key,
    leaderboard,
    read_records,
)
from growth.controllers.searcher import METRIC, ControllerSearcher, Generation
from growth.controllers.trial import CHILD_FILE, TrialSpec, train_child, trial_data, tune_trial
from ray.tune import Callback

from growth.data import Task
from growth.errors import CheckpointError, ConfigError, RunDirError
from growth.graph import NetGraph
from growth.io import atomic_write_text, load_tensors, name_problem, resolve_under
from growth.searching import score

log = logging.getLogger("growth.search")
STATE = "search.json"
LEADERBOARD = "leaderboard.json"
GENERATIONS_PER_FIT = 256  # trials one Tune experiment may hold (in generations of children)


@dataclass(frozen=True)
class Budget:
    """How much to search: generations of `children`, at most `trials` trained children in
    all, and no generation started after `wall_time_s` seconds of search."""

    children: int = 4
    generations: int = 2
    trials: int | None = None
    wall_time_s: float | None = None


@dataclass(frozen=True)
class Resources:
    """How children run on Ray: at most `concurrency` at once, each holding `cpus_per_trial`
    CPUs (its torch thread count) and `gpus_per_trial` GPUs; a child whose process or node
    fails (a Tune trial, or a pool actor, which is replaced) is retried `max_failures` times
    (a child that fails by itself is not retried)."""

    concurrency: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_failures: int = 1


@dataclass
class SearchProgress:
    """Hooks for a progress display; all optional. Called in the driver."""

    on_generation: Callable[[int, int], None] = lambda generation, trials: None
    on_child: Callable[[ChildRecord, list[ChildRecord]], None] = lambda record, board: None
    on_generation_end: Callable[[int, list[ChildRecord]], None] = lambda gen, board: None


@dataclass
class SearchResult:
    """What a search produced. Child graph folders: `result.path(record)`."""

    directory: Path
    records: list[ChildRecord]  # every trained child (failed ones too), by key
    leaderboard: list[ChildRecord]  # finished children, best first
    generations: int  # generations completed
    parent: Path  # the parent the next generation would start from
    parent_acc: float | None
    elapsed_s: float
    done: bool = True
    root: Path | None = None  # the first parent (the network the search started from)
    lineage: list[list[dict[str, Any]]] = field(default_factory=list)  # root -> parent actions
    kept: int = 0  # generations after which the parent stayed (no child beat it)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def replaced(self) -> bool:
        """True if a child became the parent (the search's outcome is not its first parent)."""
        return bool(self.lineage)

    @property
    def best(self) -> ChildRecord | None:
        return self.leaderboard[0] if self.leaderboard else None

    def path(self, record: ChildRecord) -> Path:
        if record.checkpoint is None:
            raise CheckpointError(f"child {record.key} failed ({record.error}); it has no graph")
        return resolve_under(self.directory, self.directory / record.checkpoint,
                             f"child {record.key}'s folder")


class SearchDir:
    """Paths and state of one search directory (see the module docstring)."""

    def __init__(self, root: str | Path, storage: str | None = None, name: str | None = None
                 ) -> None:
        self.root = Path(root).resolve()
        if name is not None and name_problem(name) is not None:
            raise ConfigError(f"search name: {name_problem(name)}")
        self.records = self.root / RECORDS
        self.children = self.root / "children"
        self.controller = self.root / "controller"
        self.state_file = self.root / STATE
        if storage is None:
            self.storage = str(self.root / "tune")
        elif "://" in storage:
            self.storage = f"{storage.rstrip('/')}/{name or self.root.name}"
        else:
            self.storage = str(Path(storage).resolve() / (name or self.root.name))

    def read_state(self) -> dict[str, Any] | None:
        if not self.state_file.is_file():
            return None
        try:
            return json.loads(self.state_file.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{self.state_file} is corrupt ({exc})") from None

    def write_state(self, state: dict[str, Any]) -> None:
        atomic_write_text(self.state_file, json.dumps(state, indent=1))

    def save_controller(self, controller: Any, generation: int) -> None:
        from safetensors.torch import save_file

        from growth.io import atomic_write

        tensors, extra = controller.state_dict()
        flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        base = self.controller / f"gen_{generation:03d}"
        atomic_write(base.with_suffix(".safetensors"), lambda p: save_file(flat, str(p)))
        atomic_write_text(base.with_suffix(".json"), json.dumps(extra))

    def load_controller(self, controller: Any, generation: int) -> None:
        base = self.controller / f"gen_{generation:03d}"
        try:
            extra = json.loads(base.with_suffix(".json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{base.with_suffix('.json')} is missing or corrupt ({exc}); "
                                  "the search cannot resume its controller") from None
        controller.load_state_dict(load_tensors(base.with_suffix(".safetensors")), extra)

    def add(self, record: ChildRecord) -> None:
        append_record(self.records, record)

    def child_folder(self, name: str) -> Path:
        """children/<name>, if `name` is a plain name and the folder resolves inside the search
        directory (a link out of it is refused): keys come from records and trial configs,
        which a damaged or forged search directory controls."""
        problem = name_problem(name)
        if problem is not None:
            raise RunDirError(f"{self.root}: child key {problem}")
        return resolve_under(self.root, self.children / name, "child folder")

    def write_leaderboard(self, board: list[ChildRecord]) -> None:
        atomic_write_text(self.root / LEADERBOARD, json.dumps(board_rows(board), indent=1))


# ---- recording finished trials (a Tune callback, in the driver) ----------------------------
class Recorder(Callback):
    """Copies each finished child into the search directory and appends its record; then
    tells `on_child` (the driver's bookkeeping and progress display)."""

    def __init__(self, search: SearchDir, on_child: Callable[[ChildRecord], None] | None
                 ) -> None:
        self.search = search
        self.on_child = on_child

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles callbacks into tuner.pkl: the live hook (a progress bar) stays behind
        return {**self.__dict__, "on_child": None}

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any
                          ) -> None:
        result = trial.last_result or {}
        if result.get("status") == "ok" and trial.checkpoint is not None:
            record = _adopt(self.search, trial.config["key"],
                            lambda tmp: trial.checkpoint.to_directory(str(tmp)))
        else:
            record = _failed(trial.config, result.get("error") or "the trial reported no "
                             "result", result)
        if record is not None:
            self._add(record)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        lines = [ln for ln in str(trial.get_error() or "").splitlines() if ln.strip()]
        self._add(_failed(trial.config, "the trial's process failed: " +
                          (lines[-1].strip() if lines else "no error text"), {}))

    def _add(self, record: ChildRecord) -> None:
        self.search.add(record)
        if self.on_child is not None:
            self.on_child(record)


def _adopt(search: SearchDir, key: str, fetch: Callable[[Path], Any]) -> ChildRecord | None:
    """Bring a finished child's folder into children/<key> and read its record; None if the
    folder is incomplete or its key cannot name a folder inside the search directory (then the
    child is trained again)."""
    try:
        dest = search.child_folder(key)
        tmp = search.child_folder(f".tmp-{key}")
    except RunDirError as exc:
        log.warning("child %r is not adopted: %s", key, exc)
        return None
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fetch(tmp)
        record = ChildRecord.from_json(json.loads((tmp / CHILD_FILE).read_text()))
        if record.key != key:
            raise CheckpointError(f"its record names child {record.key!r}")
        NetGraph.load(tmp)  # complete and consistent, or not adopted
    except (OSError, json.JSONDecodeError, TypeError, CheckpointError) as exc:
        log.warning("child %s: its folder is incomplete (%s); it will be trained again", key,
                    exc)
        shutil.rmtree(tmp, ignore_errors=True)
        return None
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    record.checkpoint = f"children/{key}"
    return record


def _failed(config: dict[str, Any], error: str, result: dict[str, Any]) -> ChildRecord:
    return ChildRecord(
        key=config["key"], generation=config["generation"], index=config["index"],
        arch=config["arch"], actions=config["actions"], status="failed",
        lineage=[*config.get("lineage", []), list(config["actions"])],
        attempt=config.get("attempt", 0), error=error,
        start=float(result.get("start", 0.0) or 0.0), end=float(result.get("end", 0.0) or 0.0),
        node=result.get("node"))


# ---- storage: what trials on any node can read ---------------------------------------------
def _filesystem(ref: str) -> tuple[Any, str]:
    import pyarrow.fs as pafs

    if "://" in ref:
        return pafs.FileSystem.from_uri(ref)
    return pafs.LocalFileSystem(), ref


def publish(folder: Path, storage: str, name: str) -> str:
    """Copy a local folder (a parent graph, a strategy state) into the search's storage, where
    every node's trials can read it; returns its reference (a path or a URI)."""
    import pyarrow.fs as pafs

    fs, root = _filesystem(storage)
    dest = f"{root.rstrip('/')}/{name}"
    fs.create_dir(dest, recursive=True)
    pafs.copy_files(str(folder), dest, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)
    return f"{storage.rstrip('/')}/{name}"


def _orphans(search: SearchDir, generation: int, recorded: set[str]) -> list[ChildRecord]:
    """Children of `generation` whose trials finished and saved their checkpoint in Tune's
    storage but were never recorded (the driver died first): adopted, not retrained."""
    import pyarrow.fs as pafs

    fs, root = _filesystem(search.storage)
    found: list[ChildRecord] = []
    for exp in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if exp.type != pafs.FileType.Directory or not exp.base_name.startswith("gen"):
            continue
        for info in fs.get_file_info(pafs.FileSelector(exp.path, recursive=True)):
            if info.base_name != CHILD_FILE:
                continue
            folder = info.path.rsplit("/", 1)[0]
            try:
                with fs.open_input_stream(info.path) as f:
                    data = json.loads(f.readall())
                key, gen = data["key"], data["generation"]
                named = key == child_key(int(gen), int(data["index"]))
            except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
            if not named:  # a key that is not the child's own name is never a folder's name
                log.warning("%s names child %r, not a child of this search; ignored",
                            info.path, key)
                continue
            if gen != generation or key in recorded:
                continue
            record = _adopt(search, key, lambda tmp, src=folder: pafs.copy_files(
                src, str(tmp), source_filesystem=fs,
                destination_filesystem=pafs.LocalFileSystem()))
            if record is not None:
                recorded.add(key)
                found.append(record)
    return found


# ---- the driver ----------------------------------------------------------------------------
Backend = Literal["local", "ray", "tune", "auto"]
# What a generation costs on the `ray` backend beyond its children's training with the
# pool's actors started (bench/bench_search.py's fixed_s: 0.13 s on a loaded 2-core machine,
# rounded up), and what starting the actors (torch and the engine imported in each) costs
# once per pool (the bench's first search: 11.5 s beyond training under that load, 4-8 s
# when two actors start alone): "auto" trains children on Ray only when running them at once
# is expected to save more than that.
RAY_FIXED_S = 0.5
RAY_START_S = 10.0


def in_ray_task() -> bool:
    """Whether this process runs a Ray task (a campaign of `growth compare`): its CPUs are
    held already, and trials of its own could wait forever for others'."""
    if "ray" not in sys.modules:
        return False
    import ray

    return ray.is_initialized() and ray.get_runtime_context().get_task_id() is not None


def choose_backend(backend: str, child_s: float | None, children: int, concurrency: int,
                   cpus: int | None = None, started: bool = False) -> str:
    """The backend for a generation. "auto": this process until a child's training time is
    known (a first generation, or `child_s` from an earlier search), then the `ray` pool when
    the time running `children` at once saves, (1 - 1 / parallel) of their training, exceeds
    RAY_FIXED_S, plus RAY_START_S unless the pool's actors are `started` already; never from
    inside a Ray task. Which backend trains a child never changes its result."""
    if backend != "auto":
        return backend
    parallel = min(concurrency, os.cpu_count() or 1 if cpus is None else cpus)
    if parallel < 2 or child_s is None or in_ray_task():
        return "local"
    saved = child_s * children * (1.0 - 1.0 / parallel)
    return "ray" if saved > RAY_FIXED_S + (0.0 if started else RAY_START_S) else "local"


def run_search(directory: str | Path, parent: str | Path, controller: Any, space: Any,
               task: Task, spec: TrialSpec | None = None, budget: Budget | None = None,
               resources: Resources | None = None, *, seed: int = 0,
               parent_acc: float | None = None, policy: Literal["best", "fixed"] = "best",
               margin: float = 0.0, cost: float = 0.0, backend: Backend = "ray",
               child_s: float | None = None,
               storage: str | None = None,
               name: str | None = None, ray_address: str | None = None,
               progress: SearchProgress | None = None, log_file: Path | None = None,
               connect: Callable[[], AbstractContextManager[Any]] | None = None,
               callbacks: Sequence[Callback] = (), pool: WorkerPool | None = None
               ) -> SearchResult:
    """Search from the graph folder `parent` into `directory` (or resume the search there).

    controller: a Controller (propose/observe/state_dict/load_state_dict) over `space`; its
    state is saved before each generation and reloaded on resume. task: the current task (its
    training and validation splits go to the trials, once). spec: how children train: the
    loss (a strategy by reference), train settings, earlier tasks as metadata. parent_acc: the
    parent's validation accuracy. A network's score is its validation accuracy minus `cost` x
    the parameters it adds to the first parent, relative to the first parent's
    (`growth.searching.score`; cost 0: accuracy alone). Under policy "best" the best-scoring
    child becomes the next generation's parent only if it beats the current parent's score by
    more than `margin` (parent_acc None: the best child always does); under policy "fixed"
    every generation grows from the first parent, and the result's parent is the
    best-scoring child of the whole search if it beats the first parent by the margin. The
    parent folder may hold the strategy's state and the optimizer's moments (see
    growth.controllers.trial). backend: "ray" trains children on Ray actors that outlive a
    generation (`pool`; Ray is started, or joined, only when a generation has children to
    train); "tune" trains them as Ray Tune trials, one experiment per run of generations;
    "local" trains them in this process, one after another; "auto" chooses between "local"
    and "ray" per generation (`choose_backend`; child_s: a child's training time measured
    before, e.g. by an earlier search of the same campaign). storage: where parents and Tune's
    experiments go (default `directory/tune`; a shared path or URI for multi-node clusters;
    `name` names this search in it). ray_address: see growth.cluster.ray_cluster. connect: how
    the search gets Ray when it needs it (default: `ray_cluster(ray_address)` for the search's
    duration; a campaign's searcher passes one that holds Ray for the whole run). pool: the
    `ray` backend's actors (controllers/pool.py), held by the caller across searches (a
    campaign's searcher); None: the search starts its own and stops them at its end.
    callbacks: more Tune callbacks for the "tune" backend's experiments (e.g. Ray's MLflow or
    W&B loggers: one tracked run per child); the other backends have no Tune to call them.
    """
    spec = spec or TrialSpec()
    budget = budget or Budget()
    resources = resources or Resources()
    search = SearchDir(directory, storage, name)
    search.root.mkdir(parents=True, exist_ok=True)
    state = _begin(search, Path(parent), controller, seed, parent_acc, policy, cost)
    driver = _Driver(search, state, controller, space, task, spec, budget, resources,
                     progress or SearchProgress(), backend=backend, margin=margin,
                     child_s=child_s,
                     connect=connect or (lambda: _ray(ray_address, log_file)),
                     callbacks=callbacks, pool=pool)
    return driver.run()


def _check_fits(resources: Resources, cluster: Any) -> None:
    """A trial that no node of a local Ray can hold would wait forever: say so instead (a
    joined cluster may grow, so its trials are left to wait for nodes)."""
    if not cluster.started:
        return
    for what, need, have in (("cpus_per_trial", resources.cpus_per_trial, cluster.cpus),
                             ("gpus_per_trial", resources.gpus_per_trial, cluster.gpus)):
        if need > have:
            raise ConfigError(f"search.{what}: {need:g}, but the local Ray has {have:g}; "
                              f"lower it, or join a cluster that has them (--ray-address)")


def _begin(search: SearchDir, parent: Path, controller: Any, seed: int,
           parent_acc: float | None, policy: str, cost: float = 0.0) -> dict[str, Any]:
    state = search.read_state()
    if state is None:
        # a parent that cannot load is the caller's error, found now
        size = NetGraph.load(parent).param_count()
        state = {"version": 2, "controller": controller.name, "seed": seed, "policy": policy,
                 "cost": float(cost), "generation": 0, "root": str(parent.resolve()),
                 "root_params": size, "parent": str(parent.resolve()),
                 "parent_acc": parent_acc, "parent_params": size, "lineage": [], "kept": 0,
                 "elapsed_s": 0.0, "attempts": {}, "done": False}
        search.save_controller(controller, 0)
        search.write_state(state)
        return state
    state.setdefault("cost", 0.0)  # searches started before costs existed ranked by accuracy
    for key, now in (("controller", controller.name), ("seed", seed), ("policy", policy),
                     ("cost", float(cost))):
        if state.get(key) != now:
            raise ConfigError(f"{search.state_file}: this search was started with {key} "
                              f"{state.get(key)!r}, not {now!r}; resume it with the same "
                              "settings or use another directory")
    search.load_controller(controller, int(state["generation"]))
    return state


class _Driver:
    """Runs generations (on the pool's actors, as Tune experiments, or in this process); the
    searcher's source of generations."""

    def __init__(self, search: SearchDir, state: dict[str, Any], controller: Any, space: Any,
                 task: Task, spec: TrialSpec, budget: Budget, resources: Resources,
                 progress: SearchProgress, backend: Backend = "ray", margin: float = 0.0,
                 connect: Callable[[], AbstractContextManager[Any]] | None = None,
                 child_s: float | None = None, callbacks: Sequence[Callback] = (),
                 pool: WorkerPool | None = None) -> None:
        self.search, self.state, self.controller = search, state, controller
        self.budget, self.resources, self.progress = budget, resources, progress
        self.space, self.task = space, task
        self.backend, self.margin, self.child_s = backend, float(margin), child_s
        self.current = "local" if backend == "auto" else backend  # this generation's
        self.connect = connect or (lambda: _ray(None, None))
        self.callbacks = list(callbacks)
        self.spec = spec.model_copy(update={
            "threads": max(1, int(resources.cpus_per_trial)),
            "device": "cuda" if resources.gpus_per_trial > 0 else spec.device})
        self.clock = time.monotonic()
        self.elapsed0 = float(state.get("elapsed_s", 0.0))
        self.records = read_records(search.records)
        self.in_fit = 0  # generations planned for the current experiment
        self.trainable: Any = None
        self.cluster: Any = None
        self.pool = pool
        self.inputs: list[Any] | None = None  # [ref] of (task data, space) in the object store
        self.stack = ExitStack()

    def elapsed(self) -> float:
        return self.elapsed0 + time.monotonic() - self.clock

    def run(self) -> SearchResult:
        with self.stack:
            while not self.state["done"]:
                self.in_fit = 0
                searcher = ControllerSearcher(self.controller, self,
                                              seed=int(self.state["seed"]))
                if searcher.advance():  # a generation with children to train
                    if self.current == "local":
                        self._run_here(searcher)
                    elif self.current == "tune":
                        self._fit(searcher)
                    else:
                        self._run_pool(searcher)
                if not searcher.finish():  # Tune stopped before every child reported
                    raise KeyboardInterrupt(
                        f"generation {searcher.generation}: the Tune experiment stopped with "
                        f"children {searcher.to_train} unreported; a resume trains them")
        board = leaderboard(self.records)
        self.search.write_leaderboard(board)
        parent, acc = Path(self.state["parent"]), self.state["parent_acc"]
        lineage = list(self.state.get("lineage", []))
        pick = self._pick(board) if self.state.get("policy") == "fixed" else None
        if pick is not None:  # "fixed": the best child of the whole search
            parent, acc, lineage = self.search.root / str(pick.checkpoint), pick.val_acc, \
                list(pick.lineage)
        return SearchResult(self.search.root, sorted(self.records, key=lambda r: r.key), board,
                            int(self.state["generation"]), parent, acc, self.elapsed(),
                            bool(self.state["done"]),
                            root=Path(self.state.get("root", self.state["parent"])),
                            lineage=lineage, kept=int(self.state.get("kept", 0)))

    # ---- the searcher's source of generations ------------------------------------------------
    def next_generation(self) -> Generation | None:
        g = int(self.state["generation"])
        n = 0 if self.state["done"] else self._generation_size(g)
        if n <= 0:
            self.state["done"] = True
            self._save_state()
            return None
        if self.in_fit >= max(1, GENERATIONS_PER_FIT // max(1, n)):
            return None  # a fresh experiment for the next ones: the driver's memory is bounded
        self.in_fit += 1
        if self.in_fit == 1:  # a new experiment, or in-process run: choose where it trains
            self.current = choose_backend(self.backend, self.measured_child_s(),
                                          n, self.resources.concurrency,
                                          started=self._pool_started())
        attempts = self.state.setdefault("attempts", {})
        attempt = int(attempts.get(str(g), -1)) + 1
        attempts[str(g)] = attempt
        self.state.setdefault("parents", {})[str(g)] = {
            "parent": self.state["parent"], "parent_acc": self.state["parent_acc"]}
        self._save_state()
        if attempt > 0:
            for record in _orphans(self.search, g, {r.key for r in self.records}):
                self.search.add(record)
            self.records = read_records(self.search.records)
        parent = (self.state["parent"] if self.current == "local" else
                  publish(Path(self.state["parent"]), self.search.storage, f"parents/gen{g:03d}"))
        base = {"spec": self._spec_json(), "attempt": attempt,
                "lineage": list(self.state.get("lineage", []))}
        return Generation(g, n, parent, base,
                          {r.index: r.val_acc for r in self.records if r.generation == g},
                          frozenset(r.arch for r in self.records if r.generation < g))

    def measured_child_s(self) -> float | None:
        """Mean training time of this search's finished children, else the caller's hint."""
        times = [r.train_time_s for r in self.records if r.ok]
        return sum(times) / len(times) if times else self.child_s

    def began(self, searcher: ControllerSearcher) -> None:
        g, todo = searcher.generation, searcher.to_train
        log.info("generation %s: %d children, %d to train", g, len(searcher.proposals),
                 len(todo))
        self.progress.on_generation(int(g or 0), len(todo))

    def ended(self, searcher: ControllerSearcher) -> None:
        g = int(searcher.generation or 0)
        self.records = read_records(self.search.records)
        board = leaderboard(self.records)
        self._next_parent(board)
        if not searcher.proposals:  # the space has no child left to propose
            self.state["done"] = True
        self.search.save_controller(self.controller, g + 1)
        self.state["generation"] = g + 1
        self._save_state()
        self.search.write_leaderboard(board)
        self.progress.on_generation_end(g, board)

    # ---- helpers -----------------------------------------------------------------------------
    def _generation_size(self, g: int) -> int:
        b = self.budget
        if g >= b.generations:
            return 0
        if b.wall_time_s is not None and self.elapsed() >= b.wall_time_s:
            log.info("search: wall-time budget of %.0fs used; no generation %d", b.wall_time_s,
                     g)
            return 0
        if b.trials is None:
            return b.children
        before = sum(1 for r in self.records if r.generation < g)
        return min(b.children, b.trials - before)

    def _spec_json(self) -> dict[str, Any]:
        spec = self.spec
        if (self.current != "local" and spec.strategy.state is not None
                and "://" not in spec.strategy.state):
            ref = publish(Path(spec.strategy.state), self.search.storage, "strategy")
            spec = spec.model_copy(update={"strategy": spec.strategy.model_copy(
                update={"state": ref})})
        return spec.model_dump(mode="json")

    def _on_child(self, record: ChildRecord) -> None:
        self.records.append(record)
        board = leaderboard(self.records)
        self.search.write_leaderboard(board)
        self.progress.on_child(record, board)

    def _run_here(self, searcher: ControllerSearcher) -> None:
        """The local backend: every child of the generation in this process, in order (the
        caller's threads and random state are left as they were); then the next generations,
        unless "auto" now expects Ray to save time (run() then starts them on Tune)."""
        data = trial_data(self.task)
        threads = torch.get_num_threads()
        while True:
            while searcher.pending:
                index = searcher.pending.pop(0)
                config = searcher.trial_config(index)
                with torch.random.fork_rng(devices=[]):
                    try:
                        record = _train_here(self.search, config, data, self.space)
                    finally:
                        torch.set_num_threads(threads)
                self.search.add(record)
                self._on_child(record)
                searcher.result(index, record.val_acc if record.ok else None)
            if choose_backend(self.backend, self.measured_child_s(), self.budget.children,
                              self.resources.concurrency,
                              started=self._pool_started()) == "ray":
                return
            if not searcher.advance():
                return

    def _connect_ray(self) -> None:
        """Ray, asked for once a generation has children to train (and checked to hold a
        child's resources)."""
        if self.cluster is None:
            self.cluster = self.stack.enter_context(self.connect())
            _check_fits(self.resources, self.cluster)

    def _pool_started(self) -> bool:
        return self.pool is not None and any(s.ready is READY for s in self.pool.slots)

    def _run_pool(self, searcher: ControllerSearcher) -> None:
        """The `ray` backend: every child of this and the next generations on the pool's
        actors, at most `concurrency` at once, each given to the first placed actor that is
        free; the driver records each as it returns (ray.wait). An actor that dies is
        replaced and its child tried again, `max_failures` times, then recorded as failed.
        On an interrupt the actors still training are killed (their children unrecorded).
        Ray is called through the pool (`WorkerPool.ray`)."""
        if self.callbacks:
            log.warning("search: Tune callbacks (per-child MLflow/W&B runs) apply to the "
                        "'tune' backend only; the 'ray' backend does not call them")
        self._connect_ray()
        if self.pool is None:  # no caller's pool: this search's own, stopped at its end
            self.pool = WorkerPool()
            self.stack.callback(self.pool.close)
        ray, r = self.pool.ray, self.resources
        self.pool.start(r.concurrency, r.cpus_per_trial, r.gpus_per_trial)
        if self.inputs is None:  # the task's data and the space, once per search
            self.inputs = [ray.put((trial_data(self.task), self.space))]
        running: dict[Any, tuple[Slot, int, dict[str, Any]]] = {}
        tries: dict[int, int] = {}
        try:
            while True:
                busy = {id(slot) for slot, _, _ in running.values()}
                free = [s for s in self.pool.slots if s.ready is READY and id(s) not in busy]
                while searcher.pending and free and len(running) < r.concurrency:
                    slot, index = free.pop(0), searcher.pending.pop(0)
                    config = searcher.trial_config(index)
                    running[slot.actor.train.remote(config, self.inputs)] = (slot, index,
                                                                             config)
                if not running and not searcher.pending:
                    if not searcher.advance():  # the next generation, if any
                        return
                    continue
                done, _ = ray.wait([*running, *self.pool.waiting()], num_returns=1)
                for ref in done:
                    if ref in running:
                        self._collect(searcher, ref, *running.pop(ref), tries)
                    else:
                        self.pool.placed(ref)
        except BaseException:
            for slot, _, _ in running.values():  # abandoned mid-child: nothing goes on
                self.pool.discard(slot)
            raise

    def _collect(self, searcher: ControllerSearcher, ref: Any, slot: Slot, index: int,
                 config: dict[str, Any], tries: dict[int, int]) -> None:
        """Record what an actor returned for child `index`, or retry it on a new actor."""
        ray = self.pool.ray
        try:
            metrics, files = ray.get(ref)
        except ray.exceptions.RayError as exc:  # the actor's process or node failed
            self.pool.replace(slot)
            tries[index] = tries.get(index, 0) + 1
            lines = [ln for ln in str(exc).splitlines() if ln.strip()]
            why = lines[0].strip() if lines else type(exc).__name__
            if tries[index] <= self.resources.max_failures:
                log.warning("child %s: its actor failed (%s); trying again", config["key"],
                            why)
                searcher.pending.insert(0, index)
                return
            record = _failed(config, f"the trial's process failed: {why}", {})
        else:
            record = None
            if metrics["status"] == "ok":
                record = _adopt(self.search, config["key"],
                                lambda tmp: _write_files(tmp, files))
            if record is None:
                record = _failed(config, metrics.get("error") or
                                 "the child's folder is incomplete", metrics)
        self.search.add(record)
        self._on_child(record)
        searcher.result(index, record.val_acc if record.ok else None)

    def _fit(self, searcher: ControllerSearcher) -> None:
        from ray import tune
        from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

        from growth.cluster import quiet_ray_env, signals_kept

        quiet_ray_env()  # Ctrl-C interrupts the command (Tune's own SIGINT handler is off)

        self._connect_ray()
        if self.trainable is None:  # the task's data goes to the object store once
            trainable = tune.with_parameters(tune_trial, task=trial_data(self.task),
                                             space=self.space)
            self.trainable = tune.with_resources(trainable, {
                "cpu": self.resources.cpus_per_trial, "gpu": self.resources.gpus_per_trial})
        g = int(searcher.generation or 0)
        attempt = self.state["attempts"][str(g)]
        tuner = tune.Tuner(
            self.trainable,
            tune_config=tune.TuneConfig(
                search_alg=searcher, metric=METRIC, mode="max", num_samples=-1,
                max_concurrent_trials=self.resources.concurrency, reuse_actors=True,
                trial_dirname_creator=_trial_dirname, trial_name_creator=_trial_dirname),
            run_config=tune.RunConfig(
                name=f"gen{g:03d}-a{attempt}", storage_path=self.search.storage, verbose=0,
                failure_config=tune.FailureConfig(max_failures=self.resources.max_failures),
                callbacks=[Recorder(self.search, self._on_child), CSVLoggerCallback(),
                           JsonLoggerCallback(),  # no TensorBoard writer (cluster.py)
                           *self.callbacks]))
        with signals_kept():  # Tune's handlers do not outlive its run (SIGTERM's included)
            tuner.fit()
        del tuner  # the experiment's trials leave the driver's memory

    def _next_parent(self, board: list[ChildRecord]) -> None:
        """The best-scoring child so far becomes the parent if it beats the parent by the
        margin; else the parent is kept (counted)."""
        if self.state.get("policy") != "best":
            return
        best = self._pick(board)
        if best is not None:
            self.state["parent"] = str(resolve_under(
                self.search.root, self.search.root / str(best.checkpoint), "the best child"))
            self.state["parent_acc"] = best.val_acc
            self.state["parent_params"] = best.params
            self.state["lineage"] = list(best.lineage)
        else:
            self.state["kept"] = int(self.state.get("kept", 0)) + 1

    def _pick(self, board: list[ChildRecord]) -> ChildRecord | None:
        """The best-scoring finished child (ties: leaderboard order) if its score beats the
        current parent's by more than the margin, else None."""
        cost, root = float(self.state.get("cost", 0.0)), self.state.get("root_params")
        best = max(board, key=lambda r: score(r.val_acc, r.params, root, cost), default=None)
        current = self.state.get("parent_acc")
        if best is None or best.checkpoint is None or best.val_acc is None:
            return None
        if current is None:
            return best
        parent = score(current, self.state.get("parent_params"), root, cost)
        return best if score(best.val_acc, best.params, root, cost) > parent + self.margin \
            else None

    def _save_state(self) -> None:
        self.state["elapsed_s"] = self.elapsed()
        self.search.write_state(self.state)


def _ray(address: str | None, log_file: Path | None) -> AbstractContextManager[Any]:
    from growth.cluster import ray_cluster

    return ray_cluster(address, log_file=log_file)


def _train_here(search: SearchDir, config: dict[str, Any], task: Task, space: Any
                ) -> ChildRecord:
    """Train one child in this process into children/<key> and return its record."""
    tmp = search.child_folder(f".train-{config['key']}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    metrics = train_child(config, task, space, tmp, node="local")
    if metrics["status"] == "ok":
        record = _adopt(search, config["key"], lambda dest: _move_into(tmp, dest))
        if record is not None:
            return record
    shutil.rmtree(tmp, ignore_errors=True)
    return _failed(config, metrics.get("error") or "the child's folder is incomplete", metrics)


def _write_files(folder: Path, files: dict[str, bytes]) -> None:
    """Write a child's files (relative path -> bytes, from a pool actor) into `folder`."""
    for name, data in files.items():
        path = resolve_under(folder, folder / name, "a child's file")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _move_into(src: Path, dest: Path) -> None:
    for item in src.iterdir():
        os.replace(item, dest / item.name)
    src.rmdir()


def _trial_dirname(trial: Any) -> str:
    return f"{trial.config.get('key', 'trial')}-{trial.trial_id}"
