"""Checkpoints of a campaign: written atomically, read back as untrusted data.

checkpoints/task_NNN/ (the run after task NNN):
  manifest.json             format, run id, task, the SHA-256 of every file below, and the
                            file of every strategy tensor (`tensors`: key -> file digest)
  graph/structure.json      the network (NetGraph.save)
  graph/weights.safetensors
  state.json                R so far, sizes, wall times, base size, resolved config, the
                            strategy's JSON-able extra, run id and task
tensors/<sha256>.safetensors (in the run directory, shared by every checkpoint)
                            the strategy's tensors (checked against its `state_spec`), one
                            file per kind and slot a checkpoint wrote, named by its SHA-256
                            and never rewritten: a finished task's Fisher, anchors, masks or
                            picks are written once, when the task ends, and every later
                            checkpoint names the same file (growth.tensorfiles)

Reading checks every file against the manifest (the tensor files too: each one's bytes
against its name), every field of state.json against its schema and the run (task count, R
shape, finished rows), the weights' dtypes and values, and the strategy's tensors against the
strategy and the graph. Any problem is one CheckpointError naming the file and what is wrong
(a tensor's problem names the file that holds it); nothing is repaired or skipped, and there
is no fallback to an older checkpoint. The strategy gets its tensors as references to their
files (`StateDict`), read again when it uses them.

Retention (`checkpoints: {keep: N}`) removes all but the newest N checkpoint folders after a
write, then every tensor file that no remaining checkpoint names; the newest checkpoint and
what it names are never removed. Version 1 checkpoints (the strategy's tensors in
task_NNN/strategy.safetensors) are still read.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr, ValidationError

from growth.errors import CheckpointError
from growth.graph import NetGraph
from growth.io import file_mode, load_tensors, sha256
from growth.layers import buffer_names
from growth.metrics import RMatrix
from growth.resources import disk_bytes
from growth.rundir import CHECKPOINTS, TENSORS, TMP_PREFIX
from growth.strategies import Strategy
from growth.tensorfiles import StateDict, TensorRef, TensorStore

FORMAT = "growth.checkpoint"
VERSION = 2
STATE_VERSION = 1  # state.json's own format
FILES = ("graph/structure.json", "graph/weights.safetensors", "state.json")
# everything the reader loads from the folder, so everything the manifest must list; version
# 1 also held the strategy's tensors in the folder
FILES_V1 = ("graph/structure.json", "graph/weights.safetensors", "strategy.safetensors",
            "state.json")
COUNTERS = {"num_batches_tracked"}  # integer tensors of a graph, besides index buffers
_NAME = re.compile(r"task_(\d{3,})$")
_SHA = re.compile(r"[0-9a-f]{64}$")
_TENSOR_PROBLEM = re.compile(r"tensor '([^']+)'")  # how a problem names the tensor it is about
log = logging.getLogger("growth.checkpoint")


@dataclass
class CampaignState:
    """What a checkpoint must restore besides the graph and the strategy."""

    R: RMatrix
    sizes: list[dict[str, Any]] = field(default_factory=list)
    wall_time_s: list[float] = field(default_factory=list)
    base_params: int = 0
    config: dict[str, Any] = field(default_factory=dict)  # resolved config the run began with
    peak_rss_bytes: list[int | None] = field(default_factory=list)  # per task, measured

    @property
    def finished(self) -> int:
        """Tasks learned so far (each finished task records its wall time)."""
        return len(self.wall_time_s)


@dataclass
class Checkpoint:
    """A checkpoint read and checked: everything a resume needs."""

    path: Path
    graph: NetGraph
    tensors: StateDict  # the strategy's tensors, as references to their files
    extra: dict[str, Any]
    state: CampaignState


@dataclass
class Saved:
    """A checkpoint just written: its folder and where each strategy tensor lies."""

    path: Path
    tensors: dict[str, TensorRef]


def tensor_store(run_dir: Path) -> TensorStore:
    return TensorStore(Path(run_dir) / TENSORS)


# ---- where ----------------------------------------------------------------------------------
def checkpoint_folders(run_dir: Path) -> dict[int, Path]:
    """Every checkpoint folder by task; anything in checkpoints/ that is not a checkpoint
    folder (or a temp folder of an interrupted write) is an error, so a damaged newest
    checkpoint is never skipped in favour of an older one."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.exists():
        return {}
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; the run's checkpoints are gone")
    done: dict[int, Path] = {}
    for p in folder.iterdir():
        if p.name.startswith(TMP_PREFIX):
            continue
        m = _NAME.match(p.name)
        if m is None:
            raise CheckpointError(f"{p} does not belong in {folder} (expected task_NNN "
                                  "folders only); move it away to continue")
        if not p.is_dir():
            raise CheckpointError(f"{p} is not a folder; the checkpoint is damaged")
        done[int(m.group(1))] = p
    return done


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint folder, or None before the first (see `checkpoint_folders`)."""
    done = checkpoint_folders(run_dir)
    return done[max(done)] if done else None


# ---- writing --------------------------------------------------------------------------------
def write_checkpoint(run_dir: Path, task: int, graph: NetGraph, strategy: Strategy,
                     state: CampaignState, run_id: str) -> Saved:
    """Write the checkpoint into a temp folder, then rename it into place (atomic). The
    strategy's tensors go to the run's tensor files first; those already there are named,
    not written again."""
    final = Path(run_dir) / CHECKPOINTS / f"task_{task:03d}"
    tmp = Path(run_dir) / CHECKPOINTS / f"{TMP_PREFIX}task_{task:03d}"
    shutil.rmtree(tmp, ignore_errors=True)
    graph.save(tmp / "graph")
    tensors, extra = strategy.state_dict()
    refs = tensor_store(run_dir).save(tensors)
    campaign = {"format": "growth.campaign-state", "version": STATE_VERSION, "run_id": run_id,
                "task": task, "strategy": strategy.name, "R": state.R.to_list(),
                "sizes": state.sizes, "wall_time_s": state.wall_time_s,
                "peak_rss_bytes": state.peak_rss_bytes,
                "base_params": state.base_params, "config": state.config,
                "strategy_extra": extra}
    # compact JSON: Python's C encoder (an indented dump runs the pure-Python one, whose time
    # grows with R, the tensor list and a strategy's per-task extra)
    (tmp / "state.json").write_text(json.dumps(campaign, allow_nan=False), encoding="utf-8")
    manifest = {"format": FORMAT, "version": VERSION, "run_id": run_id, "task": task,
                "files": {rel: sha256(tmp / rel) for rel in FILES},
                "tensors": {k: refs[k].digest for k in sorted(refs)}}
    (tmp / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    mode = file_mode()  # safetensors writes 0600: every file gets what open() gives instead
    for p in tmp.rglob("*"):
        if p.is_file():
            os.chmod(p, mode)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return Saved(final, refs)


def apply_retention(run_dir: Path, keep: int | None, newest: Saved) -> list[Path]:
    """Remove all but the newest `keep` checkpoint folders (None: keep all), then the tensor
    files no remaining checkpoint names; return what was removed. The newest checkpoint and
    its files are always kept. Folders go first, so a kill in between leaves only unnamed
    files (removed by the next resume), never a checkpoint without its tensors; a folder is
    renamed to a temp name before its files go, so a kill while they go leaves a temp folder
    (removed by the next resume), never a checkpoint folder with some of its files."""
    removed: list[Path] = []
    if keep is None:
        return removed
    folders = checkpoint_folders(run_dir)
    for task in sorted(folders)[:-keep]:
        folder = folders[task]
        if folder != newest.path:
            gone = folder.with_name(f"{TMP_PREFIX}removed_{folder.name}")
            shutil.rmtree(gone, ignore_errors=True)  # left by a kill; not a checkpoint
            os.replace(folder, gone)
            shutil.rmtree(gone)
            removed.append(folder)
    if removed:
        removed += remove_unnamed_tensors(run_dir, {r.path for r in newest.tensors.values()})
    return removed


def remove_unnamed_tensors(run_dir: Path, named: set[Path] | None = None) -> list[Path]:
    """Remove the tensor files that no checkpoint of the run names (left by a removed
    checkpoint or an interrupted write). If a checkpoint's manifest cannot be read, nothing
    is removed: what it names is unknown. `named`: files known to be named (kept always)."""
    store = tensor_store(run_dir)
    keep = {p.resolve() for p in named or set()}
    for folder in checkpoint_folders(run_dir).values():
        digests = _named_digests(folder / "manifest.json")
        if digests is None:
            log.warning("%s cannot be read; no tensor file is removed", folder / "manifest.json")
            return []
        keep |= {store.path(d).resolve() for d in digests}
    gone = [p for p in store.files() if p.resolve() not in keep]
    for p in gone:
        p.unlink()
    return gone


def _named_digests(path: Path) -> set[str] | None:
    """The tensor files a manifest names (none for version 1), or None if it is unreadable."""
    try:
        manifest = _Manifest.model_validate(_load_json(path))
    except (CheckpointError, ValidationError):
        return None
    return set(manifest.tensors.values())


def checkpoint_bytes(path: Path) -> int:
    """Bytes on disk of one checkpoint: its folder and the tensor files it names."""
    digests = _named_digests(Path(path) / "manifest.json") or set()
    store = tensor_store(Path(path).parent.parent)
    return disk_bytes(path) + sum(disk_bytes(store.path(d)) for d in digests)


# ---- reading --------------------------------------------------------------------------------
class _Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["growth.checkpoint"]
    version: Literal[1, 2]
    run_id: StrictStr
    task: StrictInt
    files: dict[StrictStr, StrictStr]
    tensors: dict[StrictStr, StrictStr] = {}  # strategy tensor -> digest of its file (v2)


class _State(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    format: Literal["growth.campaign-state"]
    version: Literal[1]
    run_id: StrictStr
    task: StrictInt
    strategy: StrictStr
    R: list[list[float | None]]
    sizes: list[dict[StrictStr, float | int | None]]
    wall_time_s: list[float]
    peak_rss_bytes: list[StrictInt | None] | None = None  # absent before it was measured
    base_params: StrictInt
    config: dict[str, Any]
    strategy_extra: dict[str, Any]


def read_checkpoint(ckpt: Path, run_id: str, n_tasks: int, strategy: Strategy) -> Checkpoint:
    """Load and check a checkpoint of run `run_id` (n_tasks tasks) for `strategy`."""
    ckpt = Path(ckpt)
    task = int(_NAME.match(ckpt.name).group(1))  # type: ignore[union-attr]
    manifest = _check_manifest(ckpt, run_id, task)
    state, extra = _read_state(ckpt / "state.json", run_id, task, n_tasks, strategy.name)
    graph = _read_graph(ckpt / "graph")
    if manifest.version == 1:
        tensors = StateDict(load_tensors(ckpt / "strategy.safetensors"))
        where = dict.fromkeys(tensors, ckpt / "strategy.safetensors")
    else:
        tensors = _tensor_refs(ckpt, manifest.tensors)
        where = {k: tensors.ref(k).path for k in tensors}  # type: ignore[union-attr]
    problems = strategy.check_state(tensors, extra, graph.named_tensors(), state.finished)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        named = _TENSOR_PROBLEM.match(problems[0])
        path = where.get(named.group(1), ckpt) if named else ckpt
        raise CheckpointError(f"{path}: {problems[0]}{more}")
    return Checkpoint(ckpt, graph, tensors, extra, state)


def _tensor_refs(ckpt: Path, named: dict[str, str]) -> StateDict:
    """The strategy's tensors as references, after checking that each file (its digest was
    checked with the manifest) is a safetensors file holding the tensors named in it."""
    from safetensors import SafetensorError, safe_open

    store = tensor_store(ckpt.parent.parent)
    by_file: dict[str, list[str]] = {}
    for key, digest in named.items():
        by_file.setdefault(digest, []).append(key)
    out = StateDict()
    for digest, keys in sorted(by_file.items()):
        path = store.path(digest)
        try:
            with safe_open(str(path), framework="pt") as f:
                held = set(f.keys())
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{path} is corrupt or not a safetensors file ({exc})") from None
        absent = sorted(set(keys) - held)
        if absent:
            raise CheckpointError(f"{path} does not hold the tensor {absent[0]!r} that "
                                  f"{ckpt / 'manifest.json'} names it for")
        for key in keys:
            out.refer(key, TensorRef(path, key))
    return out


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constant)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path} is corrupt: not JSON text ({exc})") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _schema_error(path: Path, exc: ValidationError) -> CheckpointError:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "the top level"
    more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
    return CheckpointError(f"{path}: {key}: {err['msg']}{more}")


def _check_manifest(ckpt: Path, run_id: str, task: int) -> _Manifest:
    path = ckpt / "manifest.json"
    try:
        manifest = _Manifest.model_validate(_load_json(path))
    except ValidationError as exc:
        raise _schema_error(path, exc) from None
    if manifest.run_id != run_id:
        raise CheckpointError(f"{path}: the checkpoint belongs to run {manifest.run_id}, not "
                              f"to this run ({run_id}); it was copied from another run")
    if manifest.task != task:
        raise CheckpointError(f"{path}: says task {manifest.task}, but the folder is "
                              f"{ckpt.name}")
    files = FILES if manifest.version == VERSION else FILES_V1
    listed = set(manifest.files)
    if listed != set(files):
        missing, unknown = sorted(set(files) - listed), sorted(listed - set(files))
        what = f"does not list {missing}" if missing else f"lists unknown files {unknown}"
        raise CheckpointError(f"{path}: {what}; a checkpoint holds exactly {list(files)}")
    if manifest.version == 1 and manifest.tensors:
        raise CheckpointError(f"{path}: a version 1 checkpoint names no tensor files")
    store = tensor_store(ckpt.parent.parent)
    checks = [(f"files.{rel}", ckpt / rel, digest) for rel, digest in manifest.files.items()]
    checks += [(f"tensors.{key}", store.path(digest), digest)
               for key, digest in manifest.tensors.items()]
    checks.sort(key=lambda c: c[0])
    for what, _, digest in checks:
        if not _SHA.match(digest):
            raise CheckpointError(f"{path}: {what}: not a SHA-256 digest")
    seen: set[Path] = set()
    for what, p, digest in checks:
        if p in seen:
            continue
        seen.add(p)
        if not p.exists():
            named = "" if what.startswith("files.") else f" ({path} names it for {what})"
            raise CheckpointError(f"{p} is missing from the checkpoint{named}")
        if not p.is_file():
            raise CheckpointError(f"{p} is not a file; the checkpoint is damaged")
        if sha256(p) != digest:
            raise CheckpointError(f"{p} is corrupt (its SHA-256 does not match the manifest)")
    return manifest


def _read_state(path: Path, run_id: str, task: int, n_tasks: int, strategy: str
                ) -> tuple[CampaignState, dict[str, Any]]:
    try:
        s = _State.model_validate(_load_json(path))
    except ValidationError as exc:
        raise _schema_error(path, exc) from None
    finished = task + 1

    def bad(msg: str) -> CheckpointError:
        return CheckpointError(f"{path}: {msg}")

    if s.run_id != run_id:
        raise bad(f"run_id {s.run_id} is not this run's ({run_id}); copied from another run?")
    if s.task != task:
        raise bad(f"task is {s.task}, but the folder is task_{task:03d}")
    if s.strategy != strategy:
        raise bad(f"strategy is {s.strategy!r}, but the run uses {strategy!r}")
    if not 1 <= finished <= n_tasks:
        raise bad(f"task {task} is beyond the run's {n_tasks} tasks")
    if len(s.R) != n_tasks + 1 or any(len(row) != n_tasks for row in s.R):
        raise bad(f"R must be {n_tasks + 1} rows of {n_tasks} (the run has {n_tasks} tasks)")
    for i, row in enumerate(s.R):
        measured = [v for v in row if v is not None]
        if i <= finished and len(measured) != n_tasks:
            raise bad(f"R[{i}] has unmeasured entries, but task {task} is finished")
        if i > finished and measured:
            raise bad(f"R[{i}] has values for a task not trained yet")
        if any(not 0.0 <= v <= 1.0 for v in measured):
            raise bad(f"R[{i}] holds an accuracy outside [0, 1]")
    if len(s.wall_time_s) != finished or any(not w >= 0 for w in s.wall_time_s):
        raise bad(f"wall_time_s must be {finished} non-negative seconds, one per finished task")
    peak = [None] * finished if s.peak_rss_bytes is None else s.peak_rss_bytes
    if len(peak) != finished or any(b is not None and b < 0 for b in peak):
        raise bad(f"peak_rss_bytes must be {finished} byte counts (or null), one per finished "
                  "task")
    if len(s.sizes) != finished or any(z.get("task") != k for k, z in enumerate(s.sizes)):
        raise bad(f"sizes must be {finished} entries with task 0..{task}")
    if s.base_params < 1:
        raise bad(f"base_params must be positive, got {s.base_params}")
    state = CampaignState(RMatrix.from_list(s.R), [dict(z) for z in s.sizes],
                          list(s.wall_time_s), s.base_params, s.config, list(peak))
    return state, s.strategy_extra


def _read_graph(folder: Path) -> NetGraph:
    graph = NetGraph.load(folder)
    weights = folder / "weights.safetensors"
    tensors = graph.named_tensors()
    floats = {str(t.dtype) for t in tensors.values() if t.is_floating_point()}
    if len(floats) > 1:
        raise CheckpointError(f"{weights}: mixed dtypes {sorted(floats)}; a network is "
                              "stored in one precision")
    if floats - {str(torch.float32)}:  # the loop trains float32 networks on float32 data
        raise CheckpointError(f"{weights}: the weights are {floats.pop()}, but runs store "
                              "float32; the checkpoint was altered")
    for name, t in tensors.items():
        owner, key = name.split(".", 1)
        node = graph.node(owner)
        counter = key.rsplit(".", 1)[-1] in COUNTERS
        index = key in buffer_names(node.kind, node.attrs)  # state, e.g. relative positions
        constant = index and node.kind == "program"  # a model's constant: masks may be -inf
        if counter and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
            raise CheckpointError(f"{weights}: {name} has dtype {t.dtype}, expected an integer")
        if not (counter or index) and not t.is_floating_point():
            raise CheckpointError(f"{weights}: {name} has dtype {t.dtype}, expected floating "
                                  "point")
        if t.is_floating_point() and not constant and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{weights}: {name} holds NaN or infinite values")
    return graph
