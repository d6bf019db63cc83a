"""EAS against random search: does the controller learn, and does it beat random search?

    python bench/compare_search.py [--seeds 10] [--episodes 40] [--children 8]
    python bench/compare_search.py --digits [--digit-seeds 0 1 2 3 4] [--out runs/compare_search]

Part 1 (default), a reward landscape whose optimum is known. The real controllers propose
children of a real network through the real space (`propose`, `observe`); instead of training,
each child is scored by a tabulated reward that stands in for validation accuracy, so hundreds
of episodes cost seconds of rollouts. The base network is a 64-16-16-16 MLP on digits' inputs,
too small for its task; the landscape rewards capacity at the top of the network and penalises
it at the bottom:

    reward = 0.4 + 0.1 log2(w_last / 16) - 0.08 log2(w_first / 16) + 0.05 [a layer was inserted
             after the last hidden layer]

over the hidden widths w (16 .. 256) of the child, clipped to [0, 0.99]; its optimum (0.75)
follows from the space's rules (`optimum`). Each episode, a controller proposes `--children`
distinct children of the base and observes their rewards (REINFORCE for EAS). Reported per
controller: the mean reward of the last 10 episodes' children (what the learned policy earns),
over `--seeds` seeds;
the seeds pair the controllers (same seed, same space), and a Wilcoxon signed-rank test on the
per-seed differences gives p. The learning curves (mean reward per episode, mean and 95%
interval over seeds) go to `--out`/landscape.png.

Last line: `search: eas=A random=B p=P episodes=N`.

Part 2 (`--digits`), the real thing: `growth search` with EAS and with random search, on the
undersized digits networks (experiments/search_undersized_mlp.yaml: a 64-16 MLP;
experiments/search_undersized_cnn.yaml: a 4-channel CNN), same budget, paired seeds. Prints a
markdown table: the parent's and the best child's test accuracy, mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SPACE = {"widths": {"fc": [16, 32, 64, 128, 256]}, "noise": 0.0, "deeper_noise": 0.0}
CONTROLLER = {"wider_actions": 3, "deeper_actions": 1, "draws": 4}
UNDERSIZED = {"MLP 64-16": "experiments/search_undersized_mlp.yaml",
              "CNN 4 channels": "experiments/search_undersized_cnn.yaml"}


# ---- part 1: the landscape ----------------------------------------------------------------------
def hidden_widths(arch: str) -> list[int]:
    """The hidden layers' widths, in order, from a canonical architecture string (the last
    `fc` token is the head)."""
    return [int(w) for w in re.findall(r"\bfc(\d+)\b", arch)][:-1]


def reward(arch: str) -> float:
    h = hidden_widths(arch)
    top = len(h) > 2 and h[-1] == h[-2]  # the inserted layer is an identity of the last one
    r = 0.4 + 0.1 * math.log2(h[-1] / 16) - 0.08 * math.log2(h[0] / 16) + 0.05 * top
    return min(max(r, 0.0), 0.99)


def base_and_space():
    from growth.search_spaces import make_space
    from growth.search_spaces.networks import add_head, mlp

    base = add_head(mlp((64,), [16, 16, 16]), "t0", 10)
    return base, make_space(SPACE, base)


def optimum() -> float:
    """The best reward the space holds: wider steps widen a layer one width at a time, so the
    last hidden layer reaches 16 x 2^wider_actions, the first stays at 16, and the one
    inserted layer goes after the last."""
    top = 16 * 2 ** CONTROLLER["wider_actions"]
    return reward(f"in64 fc16 relu fc16 relu fc{top} relu fc{top} relu fc10")


def learning_curve(name: str, seed: int, episodes: int, children: int, lr: float | None
                   ) -> list[float]:
    from growth.controllers import make_controller

    base, space = base_and_space()
    settings = dict(CONTROLLER)
    if name == "eas" and lr is not None:
        settings["lr"] = lr
    controller = make_controller(name, space, settings, seed=seed)
    curve = []
    for _ in range(episodes):
        proposals = controller.propose(base, children)
        rewards = [reward(p.arch) for p in proposals]
        controller.observe(list(zip(proposals, rewards)))
        curve.append(statistics.fmean(rewards))
    return curve


def plot(curves: dict[str, list[list[float]]], best: float, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for name, runs in curves.items():
        n = len(runs)
        mean = [statistics.fmean(c[e] for c in runs) for e in range(len(runs[0]))]
        half = [1.96 * statistics.stdev(c[e] for c in runs) / math.sqrt(n) if n > 1 else 0.0
                for e in range(len(runs[0]))]
        xs = list(range(1, len(mean) + 1))
        ax.plot(xs, mean, label=f"{name} (mean of {n} seeds)")
        ax.fill_between(xs, [m - h for m, h in zip(mean, half)],
                        [m + h for m, h in zip(mean, half)], alpha=0.2)
    ax.axhline(best, color="0.4", ls="--", lw=0.8, label="optimum")
    ax.set(xlabel="episode", ylabel="mean reward of the episode's children",
           title="controllers on a landscape with a known optimum")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def landscape(args: argparse.Namespace) -> None:
    from scipy.stats import wilcoxon

    torch.set_num_threads(1)
    best = optimum()
    print(f"landscape: children of a 64-16-16-16 MLP; optimum reward {best:.3f}")
    start = time.perf_counter()
    curves = {name: [learning_curve(name, s, args.episodes, args.children, args.lr)
                     for s in range(args.seeds)] for name in ("eas", "random")}
    final = {name: [statistics.fmean(c[-10:]) for c in runs] for name, runs in curves.items()}
    diffs = [a - b for a, b in zip(final["eas"], final["random"])]
    p = float(wilcoxon(diffs).pvalue) if any(diffs) else 1.0
    plot(curves, best, args.out / "landscape.png")
    for name, runs in curves.items():
        first = statistics.fmean(statistics.fmean(c[:5]) for c in runs)
        print(f"{name}: first 5 episodes {first:.3f}, last 10 {statistics.fmean(final[name]):.3f}"
              f" ± {statistics.stdev(final[name]):.3f} (seeds {args.seeds})")
    print(f"paired differences (eas - random): mean {statistics.fmean(diffs):+.3f}, "
          f"{sum(d > 0 for d in diffs)}/{len(diffs)} seeds above; "
          f"{time.perf_counter() - start:.0f}s; curves in {args.out / 'landscape.png'}")
    print(f"search: eas={statistics.fmean(final['eas']):.3f} "
          f"random={statistics.fmean(final['random']):.3f} p={p:.2g} "
          f"episodes={args.episodes}")


# ---- part 2: undersized digits networks ---------------------------------------------------------
def search(config: str, controller: str, seed: int, out: Path) -> Path:
    """One `growth search` (reused when finished, resumed when interrupted)."""
    metrics = out / "search_metrics.json"
    if metrics.is_file() and json.loads(metrics.read_text()).get("done"):
        return out
    if (out / "config.yaml").is_file():
        cmd = ["growth", "resume", str(out), "--quiet"]
    else:
        cmd = ["growth", "search", str(ROOT / config), "--out", str(out), "--quiet",
               "--set", f"seed={seed}", "--set", f"search.controller.name={controller}"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return out


def fmt(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def digits(args: argparse.Namespace) -> None:
    rows = []
    for network, config in UNDERSIZED.items():
        for controller in ("eas", "random"):
            got = []
            for s in args.digit_seeds:
                out = search(config, controller, s, args.out / Path(config).stem /
                             f"{controller}_s{s}")
                got.append(json.loads((out / "search_metrics.json").read_text()))
            col = lambda f, got=got: [f(m) for m in got]  # noqa: E731
            rows.append(
                f"| {network} | {controller} | {fmt(col(lambda m: m['base']['test_acc']))} | "
                f"{fmt(col(lambda m: m['best']['test_acc']))} | "
                f"{fmt(col(lambda m: m['best']['test_acc'] - m['base']['test_acc']))} | "
                f"{fmt(col(lambda m: m['best']['params'] / m['base']['params']), 2)} | "
                f"{fmt(col(lambda m: float(m['trials'])), 1)} | "
                f"{fmt(col(lambda m: float(m['parent_kept'])), 1)} | "
                f"{fmt(col(lambda m: m['wall_time_s']), 0)} |")
    print()
    print("| network | controller | parent test acc | best child test acc | gain | size vs "
          "parent | children | generations the parent was kept | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--episodes", type=int, default=40)
    ap.add_argument("--children", type=int, default=8)
    ap.add_argument("--lr", type=float, default=None, help="EAS's Adam learning rate "
                    "(default: the controller's, 2e-3 as in the paper)")
    ap.add_argument("--digits", action="store_true", help="part 2: growth search on digits")
    ap.add_argument("--digit-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "compare_search")
    args = ap.parse_args()
    digits(args) if args.digits else landscape(args)


if __name__ == "__main__":
    sys.exit(main())
