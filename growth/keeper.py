"""The keeper: a local Ray that lives and dies with the process that asked for it.

`growth.cluster.ray_cluster` starts a local Ray through this module, run as a child process
(`python -m growth.keeper --parent PID`) in a session of its own:

- it makes itself a child subreaper (Linux `prctl(PR_SET_CHILD_SUBREAPER)`), so every process
  Ray starts (GCS, raylet, agents, workers) stays among its descendants even when the one that
  started it dies;
- it starts Ray (`ray.init(address="local")`), hands the GCS address to its parent through a
  pipe, and then watches: its stdin closing (the parent is done with Ray) stops Ray in order,
  and its parent dying (SIGKILL included: its parent pid changes) or a line on its stdin (the
  parent was interrupted) kills every descendant at once (Ray's own SIGTERM handler takes
  over signals in a process that started Ray, so the keeper is told by its stdin);
- Ray's console output goes where the keeper's does: the run's `ray.log`.

So a driver killed with SIGKILL takes its trials, Ray tasks and agents with it within a second
or two, and a terminal's Ctrl-C reaches only the driver (which then stops Ray itself), never
Ray's workers behind its back.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import select
import signal
import sys
import threading
import time
from pathlib import Path

POLL_S = 0.2  # how often the keeper looks at its parent
SHUTDOWN_S = 20.0  # how long Ray may take to stop in order before it is killed
PR_SET_CHILD_SUBREAPER = 36


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (read from /proc), children first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo += children.get(p, [])
    return out


def kill_all(pid: int, timeout_s: float = 10.0) -> None:
    """SIGKILL every descendant of `pid` until none is left (orphans of the killed come back to
    a subreaper, so they are found on the next round), reaping the keeper's own children."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = descendants(pid)
        _reap()
        if not found:
            return
        for p in found:
            try:
                os.kill(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.05)
        _reap()


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _subreaper() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the parent watch alone remains
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m growth.keeper")
    p.add_argument("--parent", type=int, required=True)
    p.add_argument("--address-fd", type=int, required=True)
    p.add_argument("--num-cpus", type=int)
    p.add_argument("--num-gpus", type=int)
    args = p.parse_args(argv)
    me = os.getpid()
    _subreaper()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when Ray stops

    import ray

    try:
        ray.init(address="local", num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                 include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        with os.fdopen(args.address_fd, "w") as out:
            # the address, and the authentication mode the parent must connect with
            out.write(f"{ray.get_runtime_context().gcs_address} "
                      f"{os.environ.get('RAY_AUTH_MODE', 'disabled')}\n")
    except BaseException:  # Ray did not start, or the parent is gone: leave nothing behind
        kill_all(me)
        raise
    while os.getppid() == args.parent:
        ready, _, _ = select.select([sys.stdin], [], [], POLL_S)
        if not ready:
            continue
        if os.read(sys.stdin.fileno(), 64):  # a line: stop now (the parent was interrupted)
            break
        # stdin closed: the parent is done with Ray, which stops in order (within a bound)
        stopping = threading.Thread(target=ray.shutdown, daemon=True)
        stopping.start()
        stopping.join(SHUTDOWN_S)
        kill_all(me)
        os._exit(0)
    kill_all(me)  # the parent died (or asked): its work goes with it, now
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
