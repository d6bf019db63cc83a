"""Probe: SIGKILL a `growth search` driver and a `growth compare` driver mid-run, and list every
process of theirs still alive 10 s later (the answer should be: none).

A driver's processes are taken just before the kill: every descendant of its pid (the local
Ray's keeper, GCS, raylet, dashboard and runtime-env agents, Tune's trial workers, the Ray
tasks running `growth compare`'s campaigns and their own search trials). Each is recognised
afterwards by its pid and start time, so a recycled pid is not mistaken for a survivor.

    python bench/probe_kills.py            # both probes, in a temporary folder
    python bench/probe_kills.py --keep DIR # leave the run folders in DIR

Exit status 1 if any process survived.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
Tree = dict[int, tuple[str, str]]  # pid -> (start time in clock ticks, command line)


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) of a live process, None if it is gone (or a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if fields[0] == "Z":  # dead, waiting for its parent to read its status
        return None
    return int(fields[1]), fields[19]


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:110]


def processes_of(pid: int) -> Tree:
    """Every live descendant of `pid` (not `pid` itself), with its start time and command."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            children.setdefault(st[0], []).append(int(entry.name))
    out: Tree = {}
    todo = list(children.get(pid, []))
    while todo:
        p = todo.pop()
        st = _stat(p)
        if st is not None:
            out[p] = (st[1], _cmdline(p))
        todo += children.get(p, [])
    return out


def survivors(tree: Tree, wait_s: float = 10.0) -> list[tuple[int, str]]:
    """The processes of `tree` still alive (same pid, same start) `wait_s` seconds later; the
    answer is known sooner once none is alive (a process that ended never comes back), so
    the wait ends there."""
    deadline = time.monotonic() + wait_s
    while True:
        alive = [(pid, cmd) for pid, (start, cmd) in sorted(tree.items())
                 if (st := _stat(pid)) is not None and st[1] == start]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.2)


def _cli(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "growth", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)


def _kill_when(proc: subprocess.Popen[str], ready: object, what: str,
               timeout: float = 900) -> Tree:
    deadline = time.monotonic() + timeout
    while not ready():  # type: ignore[operator]
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{what}: the driver ended (status {proc.returncode}) or timed "
                             "out before the kill")
        time.sleep(0.05)
    tree = processes_of(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return tree


TASK = {"seed": 0, "threads": 1, "model": {"kind": "mlp", "hidden": [16]},
        "train": {"epochs": 3, "batch_size": 32, "lr": 0.05}}


def probe_search(folder: Path) -> tuple[Tree, list[tuple[int, str]]]:
    """`growth search` on Ray Tune (2 trials at once), killed once its first child is
    recorded (the others are training in Tune's workers)."""
    cfg = {**TASK, "name": "probe_search",
           "data": {"dataset": "digits", "stream": "split", "n_tasks": 1, "val_fraction": 0.2},
           "train": {**TASK["train"], "epochs": 20},
           "search": {"controller": {"name": "random", "wider_actions": 1,
                                     "deeper_actions": 1},
                      "space": {"widths": {"fc": [16, 24, 32, 48, 64]}}, "children": 4,
                      "base_epochs": 2, "budget": {"generations": 2}, "concurrency": 2,
                      "backend": "ray"}}
    path = folder / "search.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = folder / "search_run"
    records = run / "children.jsonl"
    proc = _cli(["search", str(path), "--out", str(run), "--quiet"], folder)
    tree = _kill_when(proc, lambda: records.is_file() and records.read_text().strip(),
                      "growth search")
    return tree, survivors(tree)


def probe_compare(folder: Path) -> tuple[Tree, list[tuple[int, str]]]:
    """`growth compare` of finetune and REC (whose search trains children on the same Ray),
    killed once a run has finished its first task."""
    base = {**TASK, "name": "probe",
            "data": {"dataset": "digits", "stream": "permuted", "n_tasks": 4,
                     "max_train_per_task": 300}}
    (folder / "base.yaml").write_text(yaml.safe_dump(base))
    rec = {"name": "rec", "compress": {"epochs": 1},
           "search": {"controller": "random", "children": 2, "epochs": 2, "backend": "ray",
                      "controller_params": {"wider_actions": 1, "deeper_actions": 0},
                      "space": {"widths": {"fc": [16, 24, 32]}}}}
    path = folder / "compare.yaml"
    path.write_text(yaml.safe_dump({"name": "probe_compare", "base": "base.yaml",
                                    "seeds": [0, 1], "strategies": ["finetune", rec]}))
    out = folder / "compare_out"
    proc = _cli(["compare", str(path), "--out", str(out)], folder)
    tree = _kill_when(proc, lambda: any(out.glob("*/checkpoints/task_000")), "growth compare")
    return tree, survivors(tree)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keep", help="folder for the runs (default: a temporary one)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="probe-kills-") as tmp:
        folder = Path(args.keep) if args.keep else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        left = 0
        for name, probe in (("growth search", probe_search), ("growth compare", probe_compare)):
            tree, alive = probe(folder)
            print(f"{name}: SIGKILLed its driver with {len(tree)} processes below it; "
                  f"alive 10 s later: {len(alive)}")
            for pid, cmd in alive:
                print(f"  {pid}  {cmd}")
            left += len(alive)
            for pid, _ in alive:  # leave the machine as it was found
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
