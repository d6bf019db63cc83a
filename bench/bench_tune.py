"""Tune benchmark: what two trials at once buy over one at a time.

    python bench/bench_tune.py [--trials 4] [--seeds 2] [--repeats 1]

`growth tune` (the Python entry point `growth.commands.tune.tune_config`) runs a config of EWC
on permuted digits (the quickstart's stream, network and training: about 10 s per campaign on
one thread) with `--trials` settings of lambda, each trial one campaign per seed (`--seeds`),
the default setting left out, FIFO scheduling. A local Ray of 2 CPUs is started once, before
anything is timed; each tune is timed from the call to its return (the plan, Tune's
experiment, every trial, the report and the preset), with concurrency 1 and then 2 (trials of
one CPU each), `--repeats` times in turn.

- parallel_speedup: the wall time at concurrency 1 over the wall time at concurrency 2
  (medians over the repeats). Target >= 1.6 with 2 concurrent trials on 2 cores.

Both tunes choose the same setting with the same scores (checked): a trial's campaigns do not
depend on where or beside what they run.

Last line: `tune: trials=N wall_s=S parallel_speedup=R` (S: the tune with 2 trials at once).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from growth.cluster import ray_cluster
from growth.commands.tune import read_records, tune_config

ROOT = Path(__file__).resolve().parents[1]
LAMBDAS = [10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10.0e3, 30.0e3]


def write_config(folder: Path, trials: int, seeds: int, concurrency: int) -> Path:
    cfg = yaml.safe_load((ROOT / "experiments" / "quickstart.yaml").read_text())
    cfg.update(name=f"bench-tune-c{concurrency}", strategy={"name": "ewc"},
               tune={"space": {"strategy.lambda": {"grid": LAMBDAS[:trials]}},
                     "include_default": False, "seeds": list(range(seeds)),
                     "concurrency": concurrency, "cpus_per_trial": 1})
    path = folder / f"tune-c{concurrency}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def timed(path: Path, out: Path) -> tuple[float, dict]:
    start = time.perf_counter()
    summary = tune_config(path, out)
    return time.perf_counter() - start, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=4, choices=range(2, len(LAMBDAS) + 1))
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    walls: dict[int, list[float]] = {1: [], 2: []}
    scores: dict[int, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-tune-") as tmp, ray_cluster(num_cpus=2):
        folder = Path(tmp)
        for r in range(args.repeats):
            for c in (1, 2):
                path = write_config(folder, args.trials, args.seeds, c)
                out = folder / f"run-c{c}-r{r}"
                wall, summary = timed(path, out)
                walls[c].append(wall)
                records = read_records(out / "trials.jsonl")
                scores[c] = {k: (v.setting, v.score) for k, v in records.items()}
                print(f"concurrency {c}, repeat {r}: {wall:.1f} s for {summary['trials']} "
                      f"trials ({summary['finished']} finished); chosen "
                      f"{json.dumps(summary['best'] and summary['best']['setting'])}",
                      flush=True)
    assert scores[1] == scores[2], "the two tunes scored their trials differently"
    one, two = statistics.median(walls[1]), statistics.median(walls[2])
    print(f"one at a time {one:.1f} s, two at once {two:.1f} s (medians of {args.repeats})")
    print(f"tune: trials={args.trials} wall_s={two:.1f} parallel_speedup={one / two:.2f}")


if __name__ == "__main__":
    main()
