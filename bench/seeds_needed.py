"""How many paired seeds a comparison needs to tell apart a 1-point difference in ACC.

    python bench/seeds_needed.py CONFIG OUT [CONFIG OUT ...] [--delta 0.01] [--exclude LABEL ...]

For each finished `growth compare` (its config and its output folder), every strategy's runs
are paired with every other strategy's by seed (and task order); the standard deviation of the
per-pair differences in ACC is what a paired test has to see through. With
`growth.stats.seeds_needed`, each pair's sd gives the seeds with which a paired t-test at 5%
detects a true difference of `--delta` with probability 0.8. Pairs of runs that are identical
(two labels with the same settings: sd 0) are left out, and so are the labels in `--exclude`.

Prints one line per pair of strategies and ends with
`seeds: pairs=P sd_median=S sd_p90=Q needed_median=N needed_p90=M` (p90: the 90th percentile
over the pairs of strategies).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from pathlib import Path

from growth.commands.compare import finished, load_compare
from growth.stats import mean_sd, seeds_needed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pairs", nargs="+", metavar="CONFIG OUT")
    ap.add_argument("--delta", type=float, default=0.01)
    ap.add_argument("--exclude", nargs="*", default=[], metavar="LABEL")
    args = ap.parse_args()
    if len(args.pairs) % 2:
        ap.error("give a comparison config and its output folder, as pairs")
    sds: list[float] = []
    for config, out in zip(args.pairs[::2], args.pairs[1::2]):
        plan = load_compare(config)
        acc: dict[str, dict[tuple[int, str], float]] = {}
        for name, m in finished(plan, Path(out)).items():
            acc.setdefault(plan.runs[name].label, {})[plan.pair_key(name)] = float(m["acc"])
        labels = sorted(set(acc) - set(args.exclude))
        for a, b in itertools.combinations(labels, 2):
            keys = sorted(set(acc[a]) & set(acc[b]))
            if len(keys) < 3:
                continue
            sd = mean_sd([acc[a][k] - acc[b][k] for k in keys])[1]
            if sd == 0.0:  # the same settings: identical runs
                continue
            sds.append(sd)
            print(f"{plan.config.name}: {a} - {b}: {len(keys)} pairs, sd {sd:.4f}, "
                  f"seeds for {args.delta:g}: {seeds_needed(sd, args.delta)}")
    if not sds:
        raise SystemExit("no pair of strategies with 3 or more finished pairs of runs")
    sds.sort()
    p90 = sds[min(len(sds) - 1, int(0.9 * len(sds)))]
    med = statistics.median(sds)
    print(f"seeds: pairs={len(sds)} sd_median={med:.4f} sd_p90={p90:.4f} "
          f"needed_median={seeds_needed(med, args.delta)} "
          f"needed_p90={seeds_needed(p90, args.delta)}")


if __name__ == "__main__":
    main()
