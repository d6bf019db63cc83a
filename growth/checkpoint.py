"""Checkpoints of a campaign: written atomically, read back as untrusted data.

checkpoints/task_NNN/ (the run after task NNN):
  manifest.json             format, run id, task, and the SHA-256 of every file below
  graph/structure.json      the network (NetGraph.save)
  graph/weights.safetensors
  strategy.safetensors      the strategy's tensors (checked against its `state_spec`)
  state.json                R so far, sizes, wall times, base size, resolved config, the
                            strategy's JSON-able extra, run id and task

Reading checks every file against the manifest, every field of state.json against its schema
and the run (task count, R shape, finished rows), the weights' dtypes and values, and the
strategy's tensors against the strategy and the graph. Any problem is one CheckpointError
naming the file and what is wrong; nothing is repaired or skipped, and there is no fallback to
an older checkpoint.
"""

from __future__ import annotations

import json
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
from growth.io import load_tensors, sha256
from growth.layers import buffer_names
from growth.metrics import RMatrix
from growth.rundir import CHECKPOINTS, TMP_PREFIX
from growth.strategies import Strategy

FORMAT = "growth.checkpoint"
VERSION = 1
FILES = ("graph/structure.json", "graph/weights.safetensors", "strategy.safetensors",
         "state.json")  # everything the reader loads, so everything the manifest must list
COUNTERS = {"num_batches_tracked"}  # integer tensors of a graph, besides index buffers
_NAME = re.compile(r"task_(\d{3,})$")
_SHA = re.compile(r"[0-9a-f]{64}$")


@dataclass
class CampaignState:
    """What a checkpoint must restore besides the graph and the strategy."""

    R: RMatrix
    sizes: list[dict[str, Any]] = field(default_factory=list)
    wall_time_s: list[float] = field(default_factory=list)
    base_params: int = 0
    config: dict[str, Any] = field(default_factory=dict)  # resolved config the run began with

    @property
    def finished(self) -> int:
        """Tasks learned so far (each finished task records its wall time)."""
        return len(self.wall_time_s)


@dataclass
class Checkpoint:
    """A checkpoint read and checked: everything a resume needs."""

    path: Path
    graph: NetGraph
    tensors: dict[str, torch.Tensor]
    extra: dict[str, Any]
    state: CampaignState


# ---- where ----------------------------------------------------------------------------------
def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint folder, or None before the first; anything in checkpoints/ that
    is not a checkpoint folder (or a temp folder of an interrupted write) is an error, so a
    damaged newest checkpoint is never skipped in favour of an older one."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.exists():
        return None
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
    return done[max(done)] if done else None


# ---- writing --------------------------------------------------------------------------------
def write_checkpoint(run_dir: Path, task: int, graph: NetGraph, strategy: Strategy,
                     state: CampaignState, run_id: str) -> Path:
    """Write the checkpoint into a temp folder, then rename it into place (atomic)."""
    from safetensors.torch import save_file

    final = Path(run_dir) / CHECKPOINTS / f"task_{task:03d}"
    tmp = Path(run_dir) / CHECKPOINTS / f"{TMP_PREFIX}task_{task:03d}"
    shutil.rmtree(tmp, ignore_errors=True)
    graph.save(tmp / "graph")
    tensors, extra = strategy.state_dict()
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
              str(tmp / "strategy.safetensors"))
    campaign = {"format": "growth.campaign-state", "version": VERSION, "run_id": run_id,
                "task": task, "strategy": strategy.name, "R": state.R.to_list(),
                "sizes": state.sizes, "wall_time_s": state.wall_time_s,
                "base_params": state.base_params, "config": state.config,
                "strategy_extra": extra}
    (tmp / "state.json").write_text(json.dumps(campaign, indent=1, allow_nan=False),
                                    encoding="utf-8")
    manifest = {"format": FORMAT, "version": VERSION, "run_id": run_id, "task": task,
                "files": {rel: sha256(tmp / rel) for rel in FILES}}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    for p in tmp.rglob("*"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


# ---- reading --------------------------------------------------------------------------------
class _Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["growth.checkpoint"]
    version: Literal[1]
    run_id: StrictStr
    task: StrictInt
    files: dict[StrictStr, StrictStr]


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
    base_params: StrictInt
    config: dict[str, Any]
    strategy_extra: dict[str, Any]


def read_checkpoint(ckpt: Path, run_id: str, n_tasks: int, strategy: Strategy) -> Checkpoint:
    """Load and check a checkpoint of run `run_id` (n_tasks tasks) for `strategy`."""
    ckpt = Path(ckpt)
    task = int(_NAME.match(ckpt.name).group(1))  # type: ignore[union-attr]
    _check_manifest(ckpt, run_id, task)
    state, extra = _read_state(ckpt / "state.json", run_id, task, n_tasks, strategy.name)
    graph = _read_graph(ckpt / "graph")
    path = ckpt / "strategy.safetensors"
    tensors = load_tensors(path)
    problems = strategy.check_state(tensors, extra, graph.named_tensors(), state.finished)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise CheckpointError(f"{path}: {problems[0]}{more}")
    return Checkpoint(ckpt, graph, tensors, extra, state)


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


def _check_manifest(ckpt: Path, run_id: str, task: int) -> None:
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
    listed = set(manifest.files)
    if listed != set(FILES):
        missing, unknown = sorted(set(FILES) - listed), sorted(listed - set(FILES))
        what = f"does not list {missing}" if missing else f"lists unknown files {unknown}"
        raise CheckpointError(f"{path}: {what}; a checkpoint holds exactly {list(FILES)}")
    for rel, digest in sorted(manifest.files.items()):
        p = ckpt / rel
        if not _SHA.match(digest):
            raise CheckpointError(f"{path}: files.{rel}: not a SHA-256 digest")
        if not p.is_file():
            raise CheckpointError(f"{p} is missing from the checkpoint" if not p.exists() else
                                  f"{p} is not a file; the checkpoint is damaged")
        if sha256(p) != digest:
            raise CheckpointError(f"{p} is corrupt (its SHA-256 does not match the manifest)")


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
    if len(s.sizes) != finished or any(z.get("task") != k for k, z in enumerate(s.sizes)):
        raise bad(f"sizes must be {finished} entries with task 0..{task}")
    if s.base_params < 1:
        raise bad(f"base_params must be positive, got {s.base_params}")
    state = CampaignState(RMatrix.from_list(s.R), [dict(z) for z in s.sizes],
                          list(s.wall_time_s), s.base_params, s.config)
    return state, s.strategy_extra


def _read_graph(folder: Path) -> NetGraph:
    graph = NetGraph.load(folder)
    weights = folder / "weights.safetensors"
    tensors = graph.named_tensors()
    floats = {str(t.dtype) for t in tensors.values() if t.is_floating_point()}
    if len(floats) > 1:
        raise CheckpointError(f"{weights}: mixed dtypes {sorted(floats)}; a network is "
                              "stored in one precision")
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
