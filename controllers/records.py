"""The product's own record of a search: one JSON line per finished child, and the leaderboard.

`children.jsonl` in the search directory is the source of truth about what was trained: a
line is appended (and flushed to disk) as soon as a child finishes, after its graph folder is
in place. Ray Tune's experiment state is never read back to learn what finished, so a
truncated Tune checkpoint or a restarted driver cannot lose or repeat a child.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

RECORDS = "children.jsonl"


@dataclass
class ChildRecord:
    """One trained child. `checkpoint` is its graph folder, relative to the search directory
    (None for a failed child); `val_acc` is None when it failed."""

    key: str  # "g003c07": generation 3, child 7
    generation: int
    index: int
    arch: str
    actions: list[dict[str, Any]]
    status: str  # "ok" | "failed"
    val_acc: float | None = None
    val_acc_before: float | None = None  # before training: the inherited function's accuracy
    params: int = 0
    train_time_s: float = 0.0
    steps: int = 0
    epochs: int = 0
    start: float = 0.0  # wall-clock time (time.time()) the trial began and ended
    end: float = 0.0
    node: str | None = None  # Ray node id the trial ran on
    attempt: int = 0  # the driver's attempt at this generation (0, then 1 after a resume...)
    error: str = ""
    checkpoint: str | None = None
    # the actions of every generation from the search's first parent to this child, in order
    lineage: list[list[dict[str, Any]]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.val_acc is not None

    def to_json(self) -> dict[str, Any]:
        return {k: _finite(v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ChildRecord:
        names = {f.name for f in fields(cls)}
        known = {k: v for k, v in data.items() if k in names}
        rec = cls(**known)
        rec.val_acc = _finite(rec.val_acc)
        rec.val_acc_before = _finite(rec.val_acc_before)
        return rec


def _finite(v: Any) -> Any:
    """NaN and infinities as None (JSON has no NaN)."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


def child_key(generation: int, index: int) -> str:
    return f"g{generation:03d}c{index:02d}"


def append_record(path: Path, record: ChildRecord) -> None:
    """Append one line and force it to disk before returning."""
    line = json.dumps(record.to_json(), sort_keys=True) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_records(path: Path) -> list[ChildRecord]:
    """Every complete line; a torn last line (a kill in the middle of a write) is ignored, and
    a key seen twice keeps its first record."""
    if not path.is_file():
        return []
    out: dict[str, ChildRecord] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = ChildRecord.from_json(json.loads(line))
        except (json.JSONDecodeError, TypeError):
            continue
        out.setdefault(rec.key, rec)
    return list(out.values())


def leaderboard(records: list[ChildRecord]) -> list[ChildRecord]:
    """Finished children, best first: validation accuracy, then fewer parameters, then key."""
    done = [r for r in records if r.ok]
    return sorted(done, key=lambda r: (-float(r.val_acc or 0.0), r.params, r.key))


def board_rows(board: list[ChildRecord], top: int | None = None) -> list[dict[str, Any]]:
    """The leaderboard as plain rows (what `leaderboard.json` holds and the CLI prints)."""
    rows = []
    for rank, r in enumerate(board[:top] if top else board, start=1):
        rows.append({"rank": rank, "key": r.key, "val_acc": r.val_acc, "params": r.params,
                     "train_time_s": round(r.train_time_s, 3), "generation": r.generation,
                     "arch": r.arch, "checkpoint": r.checkpoint})
    return rows
