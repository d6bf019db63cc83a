"""Per-epoch training logs of a run: RUNDIR/epochs.csv, and TensorBoard event files on request.

epochs.csv has one row per epoch of every task: the task (index and name), the epoch (from
0), the epoch's mean training loss, and the validation accuracy of the network as it trains
(through the task's head; empty without a validation split). With `tensorboard: true` the same
numbers go to RUNDIR/tensorboard/ through torch's SummaryWriter, one step per epoch of the
whole run (task * epochs + epoch), plus the R matrix's average accuracy after each task.

On resume, rows and events of a task that was not finished are dropped before it is learned
again, so the logs read as one uninterrupted run.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from growth.errors import ConfigError
from growth.io import atomic_write_text

EPOCHS_CSV = "epochs.csv"
TENSORBOARD = "tensorboard"
HEADER = ["task", "task_name", "epoch", "train_loss", "val_accuracy"]


class EpochLog:
    """Appends per-epoch rows (and TensorBoard scalars) for one run or resume."""

    def __init__(self, run_dir: Path, epochs_per_task: int, tensorboard: bool = False,
                 finished: int = 0) -> None:
        self.path = Path(run_dir) / EPOCHS_CSV
        self.epochs = max(1, epochs_per_task)
        self._keep_finished(finished)
        self.writer = _writer(Path(run_dir) / TENSORBOARD, finished * self.epochs) \
            if tensorboard else None

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
        if self.writer is not None:
            step = task * self.epochs + epoch
            self.writer.add_scalar(f"train_loss/task_{task}", loss, step)
            if not math.isnan(val):
                self.writer.add_scalar(f"val_accuracy/task_{task}", val, step)

    def task_done(self, task: int, metrics: dict[str, Any]) -> None:
        if self.writer is None:
            return
        row = [v for v in metrics["R"][task + 1][: task + 1] if v is not None]
        step = (task + 1) * self.epochs - 1
        if row:
            self.writer.add_scalar("average_accuracy", sum(row) / len(row), step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _writer(folder: Path, purge_step: int) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("tensorboard: true needs the tensorboard package: pip install "
                          "'growth[tensorboard]' (or pip install tensorboard)") from None
    # purge_step drops events a killed run wrote at or after the step this run starts from
    return SummaryWriter(str(folder), purge_step=purge_step or None)


def _int(text: Any) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        return 1 << 60  # an unreadable row is dropped
