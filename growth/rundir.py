"""The run directory as a resource: paths checked before use, one writer at a time, a run id,
leftovers of interrupted writes cleaned up, and the run's log file.

Layout (see growth.campaign for what the files hold):
  run.json        the run id (written once at start; every checkpoint carries it)
  config.yaml     the resolved config
  .lock           held (an OS file lock) by the process writing the run; holds its pid
  log.txt, metrics.json, metrics.csv, checkpoints/task_NNN/, tensors/ (the checkpoints'
  strategy tensors, growth.checkpoint)
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from growth.errors import RunDirError
from growth.io import atomic_write_text

CONFIG = "config.yaml"
RUN_JSON = "run.json"
LOCK = ".lock"
LOG = "log.txt"
CHECKPOINTS = "checkpoints"
TMP_PREFIX = ".tmp_"  # checkpoints/.tmp_task_NNN: a checkpoint being written (.tmp_removed_
#                      task_NNN: one that retention is removing)
TENSORS = "tensors"  # tensors/<sha256>.safetensors: strategy tensors the checkpoints name
log = logging.getLogger("growth.rundir")


# ---- paths ----------------------------------------------------------------------------------
def check_writable_dir(path: Path, what: str = "--out") -> None:
    """One-line RunDirError unless `path` is, or can be created as, a writable folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{what} {path} is a file, not a folder; choose another path")
    probe = path
    while not probe.exists():  # the nearest existing ancestor decides
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise RunDirError(f"{what} {path}: {probe} is a file, not a folder; choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "" if probe == path else f" (cannot create folders in {probe})"
        raise RunDirError(f"{what} {path} is not writable{where}; choose another path or "
                          "change its permissions")


def check_run_dir(path: Path) -> None:
    """A run directory that exists, holds a run, and whose files can be written."""
    path = Path(path)
    if not path.is_dir():
        raise RunDirError(f"{path} is not a folder" if path.exists() else
                          f"{path}: no such run directory")
    if not (path / CONFIG).is_file():
        raise RunDirError(f"{path} is not a run directory (no {CONFIG})")
    check_writable_dir(path, "run directory")
    for name in (CHECKPOINTS, TENSORS, LOG, LOCK, "metrics.json", "metrics.csv"):
        p = path / name
        if p.exists() and not os.access(p, os.W_OK | (os.X_OK if p.is_dir() else 0)):
            raise RunDirError(f"{p} is not writable; change its permissions to continue the run")


def holds_run(path: Path) -> bool:
    """Whether a run was started in `path` (its run id, config or checkpoints are there)."""
    return any((Path(path) / name).exists() for name in (RUN_JSON, CONFIG, CHECKPOINTS))


# ---- the lock -------------------------------------------------------------------------------
class RunLock:
    """An exclusive OS lock on RUNDIR/.lock for one run or resume.

    flock(2) locks die with their process, so a killed run never blocks the next one; the pid
    it left in the file is reported as a stale lock. A second writer is refused with the
    holder's pid. The file is emptied on release, so a refused or failed command leaves the run
    directory as it found it.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK
        self.fd: int | None = None
        self.stale_pid: int | None = None  # pid of a dead holder whose lock was taken over

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            pid = f"pid {holder}" if holder else "a process starting up"
            raise RunDirError(f"{self.path.parent} is in use by another growth process ({pid});"
                              " wait for it to finish or stop it, then try again") from None
        previous = _holder(fd)
        if previous and previous != os.getpid():
            self.stale_pid = previous
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def note_stale(self) -> None:
        """Log the stale lock this one replaced (call once the run's log is attached)."""
        if self.stale_pid is not None:
            alive = _alive(self.stale_pid)
            log.warning("took over a stale lock of pid %d (%s)", self.stale_pid,
                        "that pid now belongs to another program" if alive else
                        "the process is gone")


def _holder(fd: int) -> int | None:
    text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- run id ---------------------------------------------------------------------------------
def new_run_id(run_dir: Path) -> str:
    """Write RUNDIR/run.json with a fresh run id and return it."""
    from growth import __version__

    run_id = uuid.uuid4().hex
    atomic_write_text(Path(run_dir) / RUN_JSON, json.dumps(
        {"format": "growth.run", "run_id": run_id, "growth": __version__}, indent=1) + "\n")
    return run_id


def read_run_id(run_dir: Path) -> str:
    """The run id in RUNDIR/run.json; a missing or malformed file is a RunDirError."""
    path = Path(run_dir) / RUN_JSON
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunDirError(f"{path} is missing; {run_dir} was not started by `growth run` (or "
                          "its run id was deleted)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunDirError(f"{path} is corrupt ({exc})") from None
    run_id = data.get("run_id") if isinstance(data, dict) else None
    if not (isinstance(run_id, str) and len(run_id) == 32 and
            all(c in "0123456789abcdef" for c in run_id)):
        raise RunDirError(f"{path}: 'run_id' must be 32 hex digits, got {run_id!r}")
    return run_id


# ---- leftovers and log ----------------------------------------------------------------------
def clean_leftovers(run_dir: Path) -> list[Path]:
    """Remove temp files of writes (and removals) a kill interrupted; return what was removed."""
    run_dir = Path(run_dir)
    gone = [p for p in [*run_dir.glob(".*.tmp"), *(run_dir / TENSORS).glob(".*.tmp")]
            if p.is_file()]
    folder = run_dir / CHECKPOINTS
    if folder.is_dir():
        gone += [p for p in folder.iterdir() if p.name.startswith(TMP_PREFIX)]
    for p in gone:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    return gone


@contextmanager
def logging_to(run_dir: Path) -> Iterator[None]:
    """Log the engine's messages to RUNDIR/log.txt for the duration of one run or resume."""
    handler = logging.FileHandler(Path(run_dir) / LOG, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("growth")
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield
    except KeyboardInterrupt:
        root.error("interrupted; `growth resume %s` continues from the last finished task",
                   run_dir)
        raise
    except Exception as exc:
        root.error("stopped: %s: %s", type(exc).__name__, exc)
        raise
    finally:
        root.removeHandler(handler)
        handler.close()
