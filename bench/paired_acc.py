"""Paired differences of final ACC between strategies of one `growth compare` folder.

    python bench/paired_acc.py runs/regularisers_split_task hnet:lwf scp:mas rwalk:ewc

Each pair A:B is compared on the seeds both ran (run folders `<label>-s<seed>`): the mean of
ACC(A) - ACC(B) over seeds with a 95% t interval, and how many seeds A won. A difference whose
interval holds 0 is not a result.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
from pathlib import Path

from growth.metrics import read_metrics


def accs(folder: Path, label: str) -> dict[int, float]:
    out = {}
    for run in folder.glob(f"{label}-s*"):
        m = re.fullmatch(rf"{re.escape(label)}-s(\d+)", run.name)
        if m and (run / "metrics.json").is_file():
            metrics = read_metrics(run)
            if metrics.get("acc") is not None:
                out[int(m.group(1))] = metrics["acc"]
    return out


def paired(a: dict[int, float], b: dict[int, float]) -> tuple[float, float, int, int]:
    """Mean difference, 95% half-width, seeds won by a, seeds compared."""
    from scipy import stats

    seeds = sorted(a.keys() & b.keys())
    diffs = [a[s] - b[s] for s in seeds]
    if len(diffs) < 2:
        return (diffs[0] if diffs else math.nan), math.nan, sum(d > 0 for d in diffs), len(diffs)
    half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return statistics.fmean(diffs), half, sum(d > 0 for d in diffs), len(diffs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("pairs", nargs="+", help="A:B, two strategy labels of the comparison")
    args = ap.parse_args()
    print("| A | B | ACC(A) - ACC(B) | 95% interval | seeds A won |")
    print("|---|---|---|---|---|")
    for pair in args.pairs:
        left, _, right = pair.partition(":")
        mean, half, won, n = paired(accs(args.folder, left), accs(args.folder, right))
        if n == 0:
            print(f"no seed has both {left!r} and {right!r} in {args.folder}", file=sys.stderr)
            return 2
        print(f"| {left} | {right} | {mean:+.4f} | [{mean - half:+.4f}, {mean + half:+.4f}] "
              f"| {won}/{n} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
