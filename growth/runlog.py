"""Per-epoch training log of a run: RUNDIR/epochs.csv.

epochs.csv has one row per epoch of every task: the task (index and name), the epoch (from
0), the epoch's mean training loss, and the validation accuracy of the network as it trains
(through the task's head; empty without a validation split). The same numbers go to the
experiment trackers a config switches on (growth.tracking: TensorBoard, MLflow, W&B).

On resume, rows of a task that was not finished are dropped before it is learned again, so
the log reads as one uninterrupted run.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from growth.io import atomic_write_text

EPOCHS_CSV = "epochs.csv"
HEADER = ["task", "task_name", "epoch", "train_loss", "val_accuracy"]


class EpochLog:
    """Appends per-epoch rows for one run or resume."""

    def __init__(self, run_dir: Path, finished: int = 0) -> None:
        self.path = Path(run_dir) / EPOCHS_CSV
        self._keep_finished(finished)

    def _keep_finished(self, finished: int) -> None:
        """Start the file, or keep only the rows of the tasks finished before a resume."""
        rows = []
        if self.path.is_file():
            with self.path.open(newline="", encoding="utf-8") as f:
                rows = [r for r in csv.DictReader(f) if _int(r.get("task")) < finished]
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(HEADER)
        w.writerows([r.get(k, "") for k in HEADER] for r in rows)
        atomic_write_text(self.path, buf.getvalue())

    def epoch(self, task: int, name: str, epoch: int, loss: float, val: float) -> None:
        cells = [task, name, epoch, repr(float(loss)), "" if math.isnan(val) else repr(val)]
        with self.path.open("a", newline="", encoding="utf-8") as f:
            csv.writer(f, lineterminator="\n").writerow(cells)


def _int(text: Any) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        return 1 << 60  # an unreadable row is dropped
