"""Continual-learning metrics: the R matrix, ACC/BWT/FWT, model size and the run's metrics files.

Conventions (used by the campaign, the metrics files and the report):

- Tasks are indexed 0..T-1: the columns of R and the positions in ``metrics["tasks"]``.
- R has shape (T+1, T). Row 0 holds the accuracies of the random initial model; row i (1..T)
  holds the accuracies after training the i-th task, ``tasks[i-1]``. An entry that was not
  measured yet (a run in progress) is NaN in memory and ``null`` in JSON.
- docs/methods.md writes the formulas with 1-based tasks: its R[i][j] is ``R[i, j-1]`` here, so its
  diagonal R[i][i] (task i just after training it) is ``R[i, i-1]``.
- ``metrics["sizes"][k]`` and ``metrics["wall_time_s"][k]`` describe the run after training
  ``tasks[k]``; ``sizes[k]["task"]`` is that 0-based index k. ``metrics["peak_rss_bytes"][k]``
  is the process's peak resident memory while it learned and evaluated ``tasks[k]`` (null
  where not measured), and ``metrics["storage"]`` the run's bytes on disk.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from growth.errors import ReportError
from growth.io import atomic_write_text

METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
REQUIRED_KEYS = ("run", "tasks", "R")


# --------------------------------------------------------------------------- R matrix metrics


def as_matrix(R: Any) -> np.ndarray:
    """Return R as a float (T+1, T) array with None turned into NaN; reject other shapes."""
    if isinstance(R, RMatrix):
        return R.values.copy()
    rows = [[np.nan if v is None else v for v in row] for row in R]
    try:
        arr = np.asarray(rows, dtype=float)
    except ValueError as exc:
        raise ReportError(f"R matrix rows are ragged or not numeric: {exc}") from exc
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] + 1 or arr.shape[1] < 1:
        raise ReportError(f"R matrix must have shape (T+1, T) with T >= 1, got {arr.shape}")
    return arr


def acc(R: Any) -> float:
    """ACC: mean accuracy over all tasks after the last one (row T)."""
    m = as_matrix(R)
    return float(np.mean(m[-1]))


def bwt(R: Any) -> float:
    """BWT: mean over tasks i < T of final accuracy minus accuracy just after training i.

    Negative means forgetting. NaN when T = 1 (no earlier task to forget).
    """
    m = as_matrix(R)
    T = m.shape[1]
    if T < 2:
        return math.nan
    # 1-based i = 1..T-1 -> column i-1, "just trained" entry R[i, i-1].
    return float(np.mean([m[T, i - 1] - m[i, i - 1] for i in range(1, T)]))


def fwt(R: Any) -> float:
    """FWT: mean over tasks i >= 2 of accuracy before training i minus the initial model's.

    Positive means earlier tasks helped task i before it was seen. NaN when T = 1.
    """
    m = as_matrix(R)
    T = m.shape[1]
    if T < 2:
        return math.nan
    # 1-based i = 2..T -> column i-1, "after task i-1" row i-1.
    return float(np.mean([m[i - 1, i - 1] - m[0, i - 1] for i in range(2, T + 1)]))


def average_accuracy(R: Any, upto: int | None = None) -> list[float]:
    """Mean accuracy over the tasks seen so far, after each of the first `upto` tasks
    (default: all finished): element i-1 is the mean of R[i, :i], i = 1..upto."""
    m = as_matrix(R)
    k = finished_tasks(m) if upto is None else upto
    return [float(np.mean(m[i, :i])) for i in range(1, k + 1)]


def finished_tasks(R: Any) -> int:
    """Number of trained tasks: the last row after row 0 holding any measured value."""
    m = as_matrix(R)
    done = [i for i in range(1, m.shape[0]) if not np.all(np.isnan(m[i]))]
    return max(done, default=0)


def summarize(R: Any, upto: int | None = None) -> dict[str, float]:
    """ACC/BWT/FWT of the first ``upto`` tasks (default: all finished), as a finished run.

    A run in progress after k tasks is scored on R[:k+1, :k], so its numbers are comparable
    with a k-task run. With no finished task every value is NaN.
    """
    m = as_matrix(R)
    k = finished_tasks(m) if upto is None else upto
    if not 0 <= k <= m.shape[1]:
        raise ReportError(f"upto must be between 0 and T={m.shape[1]}, got {k}")
    if k == 0:
        return {"acc": math.nan, "bwt": math.nan, "fwt": math.nan}
    sub = m[: k + 1, :k]
    return {"acc": acc(sub), "bwt": bwt(sub), "fwt": fwt(sub)}


class RMatrix:
    """R matrix filled in as the campaign evaluates; NaN marks what is not measured yet."""

    def __init__(self, num_tasks: int) -> None:
        if num_tasks < 1:
            raise ReportError(f"a run needs at least one task, got num_tasks={num_tasks}")
        self.values = np.full((num_tasks + 1, num_tasks), np.nan)

    @property
    def num_tasks(self) -> int:
        return self.values.shape[1]

    def record(self, after_task: int, task: int, accuracy: float) -> None:
        """Store the accuracy on ``task`` (0-based) after ``after_task`` tasks (0 = init)."""
        if not 0 <= after_task <= self.num_tasks:
            raise ReportError(f"after_task must be in 0..{self.num_tasks}, got {after_task}")
        if not 0 <= task < self.num_tasks:
            raise ReportError(f"task must be in 0..{self.num_tasks - 1}, got {task}")
        self.values[after_task, task] = float(accuracy)

    def row(self, i: int) -> np.ndarray:
        """Accuracies on every task after ``i`` tasks (row 0 = initial model); a copy."""
        return self.values[i].copy()

    def to_list(self) -> list[list[float | None]]:
        """JSON-ready nested lists, NaN written as None."""
        return [[_finite_or_none(v) for v in row] for row in self.values]

    @classmethod
    def from_list(cls, rows: Sequence[Sequence[float | None]]) -> RMatrix:
        """Rebuild from ``to_list`` output (or a metrics.json "R")."""
        m = as_matrix(rows)
        out = cls(m.shape[1])
        out.values = m
        return out

    def summarize(self, upto: int | None = None) -> dict[str, float]:
        return summarize(self.values, upto)


# --------------------------------------------------------------------------- model size


@dataclass(frozen=True)
class Stored:
    """A piece of the deployed model as it is stored: `entries` values of `bits` bits each.
    `parameters`: learned weights (counted in params and bytes) or side data such as owner
    indices and binary masks (counted in bytes only)."""

    entries: int
    bits: int
    parameters: bool = True

    @property
    def bytes(self) -> int:
        return -(-self.entries * self.bits // 8)


def index_bits(values: int) -> int:
    """Bits that store an index taking `values` distinct values (an owner index 0..T: T + 1)."""
    return max(1, math.ceil(math.log2(max(values, 2))))


def tensor_bytes(t: Any) -> int:
    """Bytes the tensor's elements take in memory (bool = 1 byte, float16 = 2, ...)."""
    if isinstance(t, Stored):
        return t.bytes
    if hasattr(t, "element_size"):  # torch.Tensor
        return int(t.numel()) * int(t.element_size())
    return int(np.asarray(t).nbytes)


def _numel(t: Any) -> int:
    if isinstance(t, Stored):
        return t.entries if t.parameters else 0
    return int(t.numel()) if hasattr(t, "numel") and callable(t.numel) else int(np.size(t))


def size_report(groups: dict[str, Iterable[Any]], base_params: int | None = None,
                base_bytes: int | None = None) -> dict:
    """Parameter and byte counts per group (trunk, heads, masks, ...) and in total.

    A group lists tensors (every element a parameter, bytes as held in memory) or `Stored`
    pieces (as stored: masks in bits, owner indices in the bits they need).
    ``relative`` is total params over the base network's params, so growth is visible at a
    glance, ``relative_bytes`` total bytes over the base's (masks and owner indices show
    there); None without a base. Every tensor is counted each time a group lists it.
    """
    out: dict[str, Any] = {"params": 0, "bytes": 0}
    for name, tensors in groups.items():
        tensors = list(tensors)
        n = sum(_numel(t) for t in tensors)
        b = sum(tensor_bytes(t) for t in tensors)
        out[f"{name}_params"], out[f"{name}_bytes"] = n, b
        out["params"] += n
        out["bytes"] += b
    out["relative"] = out["params"] / base_params if base_params else None
    if base_bytes is not None:
        out["relative_bytes"] = out["bytes"] / base_bytes if base_bytes else None
    return out


# --------------------------------------------------------------------------- metrics files


def _finite_or_none(v: Any) -> Any:
    """Turn NaN/inf into None and numpy scalars into Python ones so JSON stays strict."""
    if isinstance(v, (np.floating, float)):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    return v


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, RMatrix):
        return obj.to_list()
    return _finite_or_none(obj)


def make_metrics(
    run: dict,
    tasks: Sequence[str],
    R: Any,
    sizes: Sequence[dict] = (),
    wall_time_s: Sequence[float] = (),
    search: dict | None = None,
    finished: int | None = None,
    config: dict | None = None,
    peak_rss_bytes: Sequence[int | None] = (),
) -> dict:
    """Assemble a metrics.json dict, computing ACC/BWT/FWT over the finished tasks of R.

    ``finished`` defaults to the last row of R with a measured value; pass it while a row is
    being filled so the scores cover whole rows only. ``config`` (the run's resolved config)
    lets a report group runs by what they ran.
    """
    m = as_matrix(R)
    done = finished_tasks(m) if finished is None else finished
    if m.shape[1] != len(tasks):
        raise ReportError(f"R has {m.shape[1]} task columns but {len(tasks)} task names")
    return _jsonable(
        {
            "run": dict(run),
            "tasks": list(tasks),
            "R": m,
            **summarize(m, done),
            "sizes": list(sizes),
            "wall_time_s": list(wall_time_s),
            "peak_rss_bytes": list(peak_rss_bytes),
            "search": dict(search or {"children": 0, "child_time_s": 0.0}),
            "finished_tasks": done,
            **({"config": dict(config)} if config is not None else {}),
        }
    )


def metrics_csv(metrics: dict) -> str:
    """CSV text, one row per measured (after_task, task) entry of R."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["after_task", "task", "task_name", "accuracy"])
    for i, row in enumerate(metrics["R"]):
        for j, v in enumerate(row):
            if v is not None and math.isfinite(v):
                w.writerow([i, j, metrics["tasks"][j], repr(float(v))])
    return buf.getvalue()


def write_metrics(run_dir: str | Path, metrics: dict) -> Path:
    """Write metrics.json and metrics.csv into run_dir atomically; return the JSON path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = _jsonable(metrics)
    _check_metrics(data, run_dir / METRICS_JSON)
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    atomic_write_text(run_dir / METRICS_JSON, text)
    atomic_write_text(run_dir / METRICS_CSV, metrics_csv(data))
    return run_dir / METRICS_JSON


def read_metrics(run_dir: str | Path) -> dict:
    """Load and check a run's metrics.json; a missing or corrupt file is a ReportError."""
    path = Path(run_dir) / METRICS_JSON
    if not path.is_file():
        raise ReportError(f"{path}: no metrics file; is {run_dir} a run directory?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_refuse_constant)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path}: cannot read metrics ({exc})") from None
    except ValueError as exc:
        raise ReportError(f"{path}: {exc}") from None
    _check_metrics(data, path)
    _check_finite(data, path)
    return data


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number; metrics hold finite numbers or null")


def _check_finite(data: Any, path: Path, key: str = "") -> None:
    """Refuse numbers that JSON reads as infinite (1e999): the report would show them."""
    if isinstance(data, dict):
        for k, v in data.items():
            _check_finite(v, path, f"{key}[{k!r}]")
    elif isinstance(data, list):
        for i, v in enumerate(data):
            _check_finite(v, path, f"{key}[{i}]")
    elif isinstance(data, float) and not math.isfinite(data):
        raise ReportError(f"{path}: {key or 'value'} is {data}, not a finite number")


def _check_metrics(data: Any, path: Path) -> None:
    """Reject metrics that the report could not render, naming the file and the key."""
    if not isinstance(data, dict):
        raise ReportError(f"{path}: metrics must be a JSON object, got {type(data).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ReportError(f"{path}: missing key(s) {', '.join(missing)}")
    _expect(path, "'run'", data["run"], dict)
    _expect(path, "'tasks'", data["tasks"], list)
    if data.get("config") is not None:
        _expect(path, "'config' (the resolved config)", data["config"], dict)
    _check_entries(path, data)
    try:
        m = as_matrix(data["R"])
    except (ReportError, TypeError) as exc:
        raise ReportError(f"{path}: bad 'R': {exc}") from exc
    if m.shape[1] != len(data["tasks"]):
        raise ReportError(
            f"{path}: 'R' has {m.shape[1]} columns but 'tasks' has {len(data['tasks'])} names"
        )


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _expect(path: Path, what: str, value: Any, kind: type) -> None:
    if not isinstance(value, kind):
        name = "an object" if kind is dict else "a list"
        raise ReportError(f"{path}: {what} must be {name}, got {_json_type(value)}")


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if _is_number(value):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value!r}"
    return "an object" if isinstance(value, dict) else "a list"


def _check_entries(path: Path, data: dict) -> None:
    """sizes: a list of objects of numbers (or null); wall_time_s: a list of numbers;
    peak_rss_bytes: a list of numbers or nulls; storage: an object of numbers; search: an
    object whose counts are numbers. Each may be absent or null (nothing recorded)."""
    sizes = data.get("sizes")
    if sizes is not None:
        _expect(path, "'sizes' (one object per finished task)", sizes, list)
        for k, entry in enumerate(sizes):
            _expect(path, f"'sizes'[{k}]", entry, dict)
            for key, v in entry.items():
                if v is not None and not _is_number(v):
                    raise ReportError(f"{path}: 'sizes'[{k}][{key!r}] must be a number or null, "
                                      f"got {_json_type(v)}")
    wall = data.get("wall_time_s")
    if wall is not None:
        _expect(path, "'wall_time_s' (seconds per finished task)", wall, list)
        for k, v in enumerate(wall):
            if not _is_number(v):
                raise ReportError(f"{path}: 'wall_time_s'[{k}] must be a number of seconds, "
                                  f"got {_json_type(v)}")
    storage = data.get("storage")
    if storage is not None:
        _expect(path, "'storage' (the run's bytes on disk)", storage, dict)
        for key, v in storage.items():
            if v is not None and not _is_number(v):
                raise ReportError(f"{path}: 'storage'[{key!r}] must be a number or null, "
                                  f"got {_json_type(v)}")
    peak = data.get("peak_rss_bytes")
    if peak is not None:
        _expect(path, "'peak_rss_bytes' (bytes per finished task)", peak, list)
        for k, v in enumerate(peak):
            if v is not None and not _is_number(v):
                raise ReportError(f"{path}: 'peak_rss_bytes'[{k}] must be a number of bytes or "
                                  f"null, got {_json_type(v)}")
    search = data.get("search")
    if search is not None:
        _expect(path, "'search'", search, dict)
        for key in ("children", "child_time_s"):  # what the report reads
            v = search.get(key)
            if v is not None and not _is_number(v):
                raise ReportError(f"{path}: 'search'[{key!r}] must be a number or null, "
                                  f"got {_json_type(v)}")
