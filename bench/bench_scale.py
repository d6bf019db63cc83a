"""A long stream of tiny tasks: does a run's cost grow with its work, or with its square?

    python bench/bench_scale.py [--tasks 50] [--strategies mwc ewc si packnet] [--out DIR]

Each strategy runs one campaign in its own process (so its memory is its own): permuted
digits, `--tasks` tasks of 64 training samples, one epoch of batch 32 (2 steps), on an MLP
64-800-800 with a head per task (1.09M parameters at 50 tasks: a trunk of 693k and 50 heads
of 8k). Every checkpoint is kept (`checkpoints.keep` unset). Measured per task, from the run
itself: the run directory's bytes on disk after the task (as `du` counts them), the time of
the checkpoint step (`Campaign.save_checkpoint`: writing the checkpoint and its new tensor
files, handing the strategy references to them, retention), and the process's peak resident
memory during the task (`peak_rss_bytes[k]` in metrics.json).

Per strategy:
  D = run disk after the last task / (T x the first checkpoint's bytes: its folder and the
      tensor files it names, i.e. one task's network and strategy state)
  R = peak resident memory during the last task / during task 5
  C = checkpoint time at the last task / at task 5, wall-clock: after the run, the checkpoint
      step is taken again from the run's own states after task 5 and after the last task
      (each read back from its checkpoint into a scratch run directory whose tensor files are
      hard links to the run's; each write stores the files that task's checkpoint wrote new
      and names the others, as in the run), alternating between the two states 9 times, and
      C is the ratio of the medians. One write of a few MB takes tens of milliseconds and the
      load of a shared machine changes over the minutes between task 5 and the last task, so
      alternating lets both states see the same load. C_cpu: the same with the process's CPU
      time. C_run and C_run_cpu: the times measured in the run itself (medians of five
      neighbouring tasks, T-5..T-1 and 3..7), printed beside them.
It also prints the disk a run would take if every checkpoint held all of its state itself
(the sum of every checkpoint's bytes), which is what checkpoints cost before tensor files
were shared.

Last line: `scale: tasks=T disk_ratio=D rss_ratio=R ckpt_time_ratio=C`, each the largest
over the strategies (targets: D <= 2, R <= 1.2, C <= 1.5).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from growth.config import Config

HIDDEN = [800, 800]
TRAIN = 64
REPLAYS = 9  # checkpoint steps taken again from each of the two states


def config(strategy: str, tasks: int) -> dict:
    return {"name": f"scale-{strategy}", "seed": 0, "threads": 1,
            "data": {"dataset": "digits", "stream": "permuted", "n_tasks": tasks,
                     "max_train_per_task": TRAIN},
            "model": {"kind": "mlp", "hidden": HIDDEN},
            "train": {"epochs": 1, "batch_size": 32, "lr": 0.05},
            "strategy": {"name": strategy}}


def run_one(strategy: str, tasks: int, out: Path) -> dict:
    """One campaign in this process; per-task figures."""
    from growth.campaign import Campaign, Progress
    from growth.checkpoint import checkpoint_bytes
    from growth.config import Config
    from growth.resources import disk_bytes

    cfg = Config.model_validate(config(strategy, tasks))
    disk: list[int] = []
    ckpt_s: list[float] = []
    ckpt_cpu: list[float] = []
    first: list[int] = []

    def task_end(i: int, _metrics: dict) -> None:
        disk.append(disk_bytes(out))
        if i == 0:
            first.append(checkpoint_bytes(out / "checkpoints" / "task_000"))

    campaign = Campaign(cfg, out, Progress(on_task_end=task_end))
    save = campaign.save_checkpoint

    def timed(task: int):  # type: ignore[no-untyped-def]
        start, cpu = time.perf_counter(), time.process_time()
        try:
            return save(task)
        finally:
            ckpt_s.append(time.perf_counter() - start)
            ckpt_cpu.append(time.process_time() - cpu)

    campaign.save_checkpoint = timed  # type: ignore[method-assign]
    start = time.perf_counter()
    metrics = campaign.start()
    wall = time.perf_counter() - start
    folders = sorted((out / "checkpoints").iterdir())
    unshared = sum(checkpoint_bytes(f) for f in folders)
    params = sum(int(s["params"]) for s in metrics["sizes"][-1:])
    replay = replayed_checkpoint_times(cfg, out, campaign.run_id, (min(5, tasks - 1), tasks - 1))
    return {"replay": replay, "strategy": strategy, "tasks": tasks, "params": params, "disk": disk,
            "ckpt_s": ckpt_s, "ckpt_cpu": ckpt_cpu, "rss": metrics["peak_rss_bytes"],
            "first_ckpt": first[0], "unshared": unshared, "wall_s": wall,
            "storage": metrics["storage"], "acc": metrics["acc"]}


def replayed_checkpoint_times(cfg: Config, out: Path, run_id: str, tasks: tuple[int, int]
                              ) -> dict[str, dict[str, list[float]]]:
    """The checkpoint step (`Campaign.save_checkpoint`) taken again from the run's states after
    each of `tasks`, alternating between them: per task, the wall and CPU seconds of each."""
    from growth.campaign import Campaign
    from growth.checkpoint import checkpoint_folders, read_checkpoint, tensor_store

    folders = checkpoint_folders(out)
    states = {}
    for k in tasks:
        scratch = out.parent / f"{out.name}-replay-{k}"
        shutil.copytree(folders[k], scratch / "checkpoints" / folders[k].name)
        (scratch / "tensors").mkdir()
        for f in tensor_store(out).files():
            os.link(f, scratch / "tensors" / f.name)
        shutil.copy(out / "run.json", scratch / "run.json")
        campaign = Campaign(cfg, scratch)
        campaign.run_id = run_id
        ckpt = read_checkpoint(scratch / "checkpoints" / folders[k].name, run_id,
                               len(campaign.tasks), campaign.strategy)
        campaign._restore(ckpt)
        before = set(json.loads((folders[k - 1] / "manifest.json").read_text())["tensors"]
                     .values()) if k else set()
        new = [key for key, ref in ckpt.tensors.refs().items() if ref.digest not in before]
        states[k] = (campaign, new, {ckpt.tensors.ref(key).path for key in new})
    times: dict[str, dict[str, list[float]]] = {str(k): {"wall": [], "cpu": []} for k in tasks}
    for _ in range(REPLAYS):
        for k, (campaign, new, files) in states.items():
            state = campaign.strategy.state
            for key in new:  # in memory again, as after the task; its files not written yet
                state[key] = state[key]
            for f in files:
                f.unlink()
            shutil.rmtree(campaign.run_dir / "checkpoints" / f"task_{k:03d}")
            gc.collect()
            start, cpu = time.perf_counter(), time.process_time()
            campaign.save_checkpoint(k)
            times[str(k)]["cpu"].append(time.process_time() - cpu)
            times[str(k)]["wall"].append(time.perf_counter() - start)
    for k in tasks:
        shutil.rmtree(out.parent / f"{out.name}-replay-{k}")
    return times


def ratios(r: dict) -> dict[str, float]:
    T = r["tasks"]
    ref = min(5, T - 1)

    def late_over_early(times: list[float]) -> float:
        late, early = times[max(0, T - 5):], times[max(0, ref - 2):ref + 3]
        return statistics.median(late) / statistics.median(early)

    def replayed(clock: str) -> float:
        late, early = r["replay"][str(T - 1)][clock], r["replay"][str(ref)][clock]
        return statistics.median(late) / statistics.median(early)

    return {"D": r["disk"][-1] / (T * r["first_ckpt"]),
            "R": r["rss"][-1] / r["rss"][ref],
            "C": replayed("wall"), "C_cpu": replayed("cpu"),
            "C_run": late_over_early(r["ckpt_s"]), "C_run_cpu": late_over_early(r["ckpt_cpu"]),
            "D_unshared": r["unshared"] / (T * r["first_ckpt"])}


def mb(n: float) -> str:
    return f"{n / 2**20:.1f} MB"


def ms(seconds: list[float]) -> str:
    return f"{1000 * statistics.median(seconds):.0f} ms"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=50)
    ap.add_argument("--strategies", nargs="+", default=["mwc", "ewc", "si", "packnet"])
    ap.add_argument("--out", help="folder for the run directories (default: a temporary one)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child process: run this strategy
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.tasks, Path(args.out))))
        return
    tmp = tempfile.TemporaryDirectory(prefix="bench-scale-") if args.out is None else None
    root = Path(tmp.name if tmp else args.out)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    worst = {"D": 0.0, "R": 0.0, "C": 0.0}
    for strategy in args.strategies:
        out = root / strategy
        proc = subprocess.run([sys.executable, __file__, "--one", strategy, "--tasks",
                               str(args.tasks), "--out", str(out)], env=env, check=True,
                              capture_output=True, text=True)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        q = ratios(r)
        T, ref = r["tasks"], min(5, r["tasks"] - 1)
        print(f"{strategy}: {T} tasks, {r['params']:,} parameters, {r['wall_s']:.0f} s, "
              f"ACC {r['acc']:.3f}")
        print(f"  disk: run {mb(r['disk'][-1])} (after task 5: {mb(r['disk'][ref])}), newest "
              f"checkpoint {mb(r['storage']['checkpoint_bytes'])}, first checkpoint "
              f"{mb(r['first_ckpt'])}, {r['storage']['tensor_files']} tensor files; "
              f"D = {q['D']:.2f} (every checkpoint holding all its state: "
              f"{mb(r['unshared'])}, D = {q['D_unshared']:.2f})")
        print(f"  peak resident memory: task 5 {mb(r['rss'][ref])}, last task "
              f"{mb(r['rss'][-1])}, largest {mb(max(r['rss']))}; R = {q['R']:.3f}")
        early, late = r["replay"][str(ref)], r["replay"][str(T - 1)]
        print(f"  checkpoint time, taken again {REPLAYS} times from each state: task 5 "
              f"{ms(early['wall'])} ({ms(early['cpu'])} CPU), last task {ms(late['wall'])} "
              f"({ms(late['cpu'])} CPU); C = {q['C']:.2f}, C_cpu = {q['C_cpu']:.2f}")
        print(f"  checkpoint time in the run: task 5 {1000 * r['ckpt_s'][ref]:.0f} ms "
              f"({1000 * r['ckpt_cpu'][ref]:.0f} ms CPU), last task "
              f"{1000 * r['ckpt_s'][-1]:.0f} ms ({1000 * r['ckpt_cpu'][-1]:.0f} ms CPU); "
              f"C_run = {q['C_run']:.2f}, C_run_cpu = {q['C_run_cpu']:.2f} (medians of 5)")
        for k in worst:
            worst[k] = max(worst[k], q[k])
    print(f"scale: tasks={args.tasks} disk_ratio={worst['D']:.2f} rss_ratio={worst['R']:.3f} "
          f"ckpt_time_ratio={worst['C']:.2f}")


if __name__ == "__main__":
    main()
