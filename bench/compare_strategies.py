"""Run several strategies over several seeds on one config and print a comparison table.

    python bench/compare_strategies.py          # permuted digits, 11 strategies, 3 seeds
    python bench/compare_strategies.py --config experiments/split_digits_task.yaml \\
        --out runs/compare_split                # split digits, one head per task
    python bench/compare_strategies.py --strategies ewc mwc --seeds 0 1 --out runs/compare
    python bench/compare_strategies.py --config experiments/split_digits_class.yaml \\
        --strategies finetune ewc er icarl gdumb --memory 100 500 --set gdumb:train.epochs=30

Each (strategy, memory budget, seed) is an ordinary run directory under --out (a finished one
is reused, a killed one resumed); the side-by-side report goes to <out>/report. Strategies with
a `memory` setting run once per budget in --memory; the others once. `--set STRATEGY:KEY=VALUE`
overrides a config key for one strategy only. The last lines are a markdown table of mean ± std
over seeds; sizes are means over seeds after the last task: parameters, parameters relative to
the base network, and stored bytes relative to the base's (owner indices and masks count there,
in the bits they need); "old data kept" says what a method keeps of old tasks' data (stored
samples, a generator, or none), apart from model size.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from growth.campaign import Campaign, latest_checkpoint, resume_run
from growth.config import load_config
from growth.metrics import read_metrics
from growth.report import mean_std, write_report
from growth.strategies import get_strategy

DEFAULT = ["finetune", "joint", "ewc", "si", "mas", "l2", "lwf", "mwc", "pnn", "packnet", "cpg"]


def run_one(config: str, strategy: str, seed: int, out: Path, budget: int | None = None,
            sets: list[str] | None = None) -> dict:
    if (out / "metrics.json").is_file():
        m = read_metrics(out)
        if m["finished_tasks"] == len(m["tasks"]):
            return m
    if latest_checkpoint(out) is not None:
        return resume_run(out)
    memory = "" if budget is None else f", memory: {budget}"
    name = strategy if budget is None else f"{strategy}-m{budget}"
    cfg = load_config(config, [f"strategy={{name: {strategy}{memory}}}", f"seed={seed}",
                               f"name={name}", *(sets or [])])
    return Campaign(cfg, out).start()


def _mean(sizes: list[dict], key: str) -> float:
    """Mean of a size entry over seeds (runs written before bytes were reported: params)."""
    return statistics.fmean(s.get(key) or s["relative"] for s in sizes)


def old_data(m: dict, strategy: str) -> str:
    """What a run keeps of old tasks' data, from its last size entry."""
    size = m["sizes"][-1]
    if strategy == "joint":
        return "all seen data"
    if size.get("memory_generator_params"):
        return (f"generator: {size['memory_generator_params']:,} params "
                f"({size['memory_bytes'] / 1024:.0f} KB)")
    if size.get("memory_samples"):
        return f"{size['memory_samples']:,} samples ({size['memory_bytes'] / 1024:.0f} KB)"
    return "none"


def overrides(items: list[str]) -> dict[str, list[str]]:
    by: dict[str, list[str]] = {}
    for item in items:
        strategy, sep, assignment = item.partition(":")
        if not sep or "=" not in assignment:
            raise SystemExit(f"--set {item!r}: expected STRATEGY:KEY=VALUE")
        by.setdefault(strategy, []).append(assignment)
    return by


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="experiments/quickstart.yaml")
    ap.add_argument("--strategies", nargs="+", default=DEFAULT)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--memory", nargs="+", type=int, default=[500],
                    help="memory budgets (samples) for strategies that keep a memory")
    ap.add_argument("--set", dest="sets", action="append", default=[],
                    metavar="STRATEGY:KEY=VALUE", help="a config override for one strategy")
    ap.add_argument("--out", default="runs/compare")
    args = ap.parse_args()
    root = Path(args.out)
    sets = overrides(args.sets)
    rows, dirs = [], []
    for strategy in args.strategies:
        keeps = "memory" in get_strategy(strategy).Params.model_fields
        for budget in args.memory if keeps else [None]:
            results = []
            tag = strategy if budget is None else f"{strategy}-m{budget}"
            for seed in args.seeds:
                out = root / f"{tag}-s{seed}"
                results.append(run_one(args.config, strategy, seed, out, budget,
                                       sets.get(strategy, [])))
                dirs.append(out)
                m = results[-1]
                print(f"{tag:18s} seed {seed}: ACC {m['acc']:.4f} BWT {m['bwt']:.4f} "
                      f"time {sum(m['wall_time_s']):.1f}s", flush=True)
            last = [m["sizes"][-1] for m in results]
            rows.append((strategy, "-" if budget is None else str(budget),
                         mean_std([m["acc"] for m in results], 3),
                         mean_std([m["bwt"] for m in results], 3),
                         mean_std([m["fwt"] for m in results], 3),
                         f"{round(_mean(last, 'params')):,}", f"{_mean(last, 'relative'):.2f}",
                         f"{_mean(last, 'relative_bytes'):.2f}", old_data(results[0], strategy),
                         f"{statistics.fmean(sum(m['wall_time_s']) for m in results):.1f}"))
    report = write_report(dirs, root / "report")
    print(f"\nreport: {report}\n")
    extra = "".join(f" --set {k}:{v}" for k, vs in sets.items() for v in vs)
    print(f"{args.config}, seeds {args.seeds}{extra}: mean ± std over seeds\n")
    print("| strategy | memory | ACC | BWT | FWT | params | params vs base | bytes vs base | "
          "old data kept | train time (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
