"""Run several strategies over several seeds on one config and print a comparison table.

    python bench/compare_strategies.py          # permuted digits, 11 strategies, 3 seeds
    python bench/compare_strategies.py --config experiments/split_digits_task.yaml \
        --out runs/compare_split                # split digits, one head per task
    python bench/compare_strategies.py --strategies ewc mwc --seeds 0 1 --out runs/compare

Each (strategy, seed) is an ordinary run directory under --out (a finished one is reused, a
killed one resumed); the side-by-side report goes to <out>/report. The last lines are a
markdown table of mean ± std over seeds; sizes are means over seeds after the last task:
parameters, parameters relative to the base network, and stored bytes relative to the base's
(owner indices and masks count there, in the bits they need).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from growth.campaign import Campaign, latest_checkpoint, resume_run
from growth.config import load_config
from growth.metrics import read_metrics
from growth.report import mean_std, write_report

DEFAULT = ["finetune", "joint", "ewc", "si", "mas", "l2", "lwf", "mwc", "pnn", "packnet", "cpg"]


def run_one(config: str, strategy: str, seed: int, out: Path) -> dict:
    if (out / "metrics.json").is_file():
        m = read_metrics(out)
        if m["finished_tasks"] == len(m["tasks"]):
            return m
    if latest_checkpoint(out) is not None:
        return resume_run(out)
    cfg = load_config(config, [f"strategy={{name: {strategy}}}", f"seed={seed}",
                               f"name={strategy}"])
    return Campaign(cfg, out).start()


def _mean(sizes: list[dict], key: str) -> float:
    """Mean of a size entry over seeds (runs written before bytes were reported: params)."""
    return statistics.fmean(s.get(key) or s["relative"] for s in sizes)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="experiments/quickstart.yaml")
    ap.add_argument("--strategies", nargs="+", default=DEFAULT)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--out", default="runs/compare")
    args = ap.parse_args()
    root = Path(args.out)
    rows, dirs = [], []
    for strategy in args.strategies:
        results = []
        for seed in args.seeds:
            out = root / f"{strategy}-s{seed}"
            results.append(run_one(args.config, strategy, seed, out))
            dirs.append(out)
            m = results[-1]
            print(f"{strategy:9s} seed {seed}: ACC {m['acc']:.4f} BWT {m['bwt']:.4f} "
                  f"time {sum(m['wall_time_s']):.1f}s", flush=True)
        last = [m["sizes"][-1] for m in results]
        rows.append((strategy, mean_std([m["acc"] for m in results], 3),
                     mean_std([m["bwt"] for m in results], 3),
                     mean_std([m["fwt"] for m in results], 3),
                     f"{round(_mean(last, 'params')):,}", f"{_mean(last, 'relative'):.2f}",
                     f"{_mean(last, 'relative_bytes'):.2f}",
                     f"{statistics.fmean(sum(m['wall_time_s']) for m in results):.1f}"))
    report = write_report(dirs, root / "report")
    print(f"\nreport: {report}\n")
    print(f"{args.config}, seeds {args.seeds}: mean ± std over seeds\n")
    print("| strategy | ACC | BWT | FWT | params | params vs base | bytes vs base | "
          "train time (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
