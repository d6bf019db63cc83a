"""What a run costs the machine: peak resident memory per task, and bytes on disk; and the
collections that keep a long run's memory from building up.

Peak memory is the process's high-water mark of resident memory (Linux: VmHWM in
/proc/self/status, which `reset_peak_rss` sets back to the current resident size through
/proc/self/clear_refs, so each task gets its own peak). Where that reset is not available the
peak is the process's since it started (getrusage), and `reset_peak_rss` returns False.
"""

from __future__ import annotations

import gc
import resource
import sys
import time
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_rss() -> bool:
    """Start a new peak from the current resident memory; False where the system cannot."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    """Peak resident memory of this process since the last reset (or since it started)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # macOS: bytes


class Collector:
    """Full garbage collections between tasks, taking at most `share` of the run's time.

    A task leaves garbage in reference cycles (its context and optimizer, graph copies held
    by networkx's views), which Python's own collector frees only at its rare full
    collections, so a long stream's memory would build up by a copy of the weights and
    optimizer per task in between. A full collection scans every object of the process (a
    second in a process that imported much), so one runs only once `min_wait_s` and 1/share
    times the last one's duration have passed since it.
    """

    def __init__(self, share: float = 0.05, min_wait_s: float = 10.0) -> None:
        self.share, self.min_wait_s = share, min_wait_s
        self.last = time.perf_counter()
        self.cost = 0.0

    def between_tasks(self) -> bool:
        """Collect if it is time; True if it did."""
        if time.perf_counter() - self.last < max(self.min_wait_s, self.cost / self.share):
            return False
        start = time.perf_counter()
        gc.collect()
        self.last = time.perf_counter()
        self.cost = self.last - start
        return True


def disk_bytes(path: Path) -> int:
    """Bytes a file, or a folder with everything in it, takes on disk: allocated blocks, as
    `du` counts them (folders' own blocks included)."""
    path = Path(path)
    if not path.exists():
        return 0
    total = 0
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        try:
            st = p.lstat()
        except OSError:  # removed while counting
            continue
        total += st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size
    return total
