"""Live progress of a comparison, read from its run directories while the runs go on.

Every run rewrites its `metrics.json` after each task (finished tasks out of the stream's) and
holds `.lock` with its pid while it writes (growth.rundir). From those files alone `RunsWatch`
tells how many runs are done, running and waiting, how far the whole comparison is (the mean
over runs of their finished share of tasks) and an ETA from the pace since the watch began:
what a comparison of many minutes shows between its runs' result lines.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from growth.errors import GrowthError
from growth.metrics import read_metrics
from growth.rundir import LOCK


@dataclass(frozen=True)
class Status:
    done: int
    running: int
    waiting: int
    fraction: float  # of the comparison's tasks, finished (0..1)
    eta_s: float | None  # None until the pace is known

    def line(self) -> str:
        eta = "ETA n/a" if self.eta_s is None else f"ETA {_duration(self.eta_s)}"
        total = self.done + self.running + self.waiting
        return (f"[compare] runs {self.done}/{total} done, {self.running} running, "
                f"{self.waiting} waiting; {100 * self.fraction:.0f}% of tasks; {eta}")


class RunsWatch:
    """Status of the runs `names` under `folder` (see the module docstring)."""

    def __init__(self, folder: Path, names: Sequence[str],
                 clock: Callable[[], float] = time.monotonic, out: TextIO | None = None
                 ) -> None:
        self.folder, self.names, self.clock = Path(folder), list(names), clock
        self.out = out
        self.finished: set[str] = set()
        self.start = clock()
        self.start_fraction = self._fraction()
        self._last = ""

    def done(self, name: str) -> None:
        """A run's task returned (finished or failed)."""
        self.finished.add(name)

    def status(self) -> Status:
        running = sum(1 for n in self.names if n not in self.finished and self._locked(n))
        waiting = len(self.names) - len(self.finished) - running
        fraction = self._fraction()
        gained, elapsed = fraction - self.start_fraction, self.clock() - self.start
        eta = elapsed * (1 - fraction) / gained if gained > 0 else None
        return Status(len(self.finished), running, waiting, fraction, eta)

    def report(self) -> None:
        """Print the status line if it changed (runs or whole percents), on stderr."""
        line = self.status().line()
        if line.split("; ETA")[0] != self._last:
            self._last = line.split("; ETA")[0]
            print(line, file=self.out or sys.stderr, flush=True)

    def _locked(self, name: str) -> bool:
        try:
            return bool((self.folder / name / LOCK).read_text().strip())
        except OSError:
            return False

    def _share(self, name: str) -> float:
        if name in self.finished:
            return 1.0
        try:
            m = read_metrics(self.folder / name)
        except (GrowthError, OSError):
            return 0.0
        tasks = len(m.get("tasks") or []) or 1
        return min(1.0, int(m.get("finished_tasks") or 0) / tasks)

    def _fraction(self) -> float:
        return sum(self._share(n) for n in self.names) / max(len(self.names), 1)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
