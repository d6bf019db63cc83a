"""growth's CWR*, AR1 and RWalk beside Avalanche 0.6's, on the same stream, network and seeds.

    python bench/compare_avalanche.py                         # 5 seeds, cwr ar1 rwalk
    python bench/compare_avalanche.py --seeds 0 1 --methods rwalk --out runs/avalanche

Stream: class-incremental split digits (experiments/split_digits_class.yaml: 5 tasks of 2
classes, one shared 10-way head), the same training and test tensors for both libraries (the
campaign's own stream, labels in the shared head's space). Network: the campaign's base
network itself (the MLP 64-100-100-10 compiled from its graph, with the campaign's initial
weights, copied for each library). Training: 10 epochs of SGD (lr 0.05, momentum 0.9, batch
32, a fresh optimiser per task) in both. Accuracy: the same R matrix (test accuracy on every
task after each task), scored by the same plain argmax code for both; ACC is the mean of its
last row. Time per epoch: training time over the run's epochs, on one torch thread.

Methods with the same settings on both sides:
- cwr: Avalanche's `CWRStar` strategy (consolidated layer `head_all`, the rest frozen after the
  first experience) against `strategy: cwr`;
- ar1: Avalanche's `AR1` strategy builds a pretrained MobileNet (a download) with latent replay
  and Batch Renormalization, so the same method on the same network is its two parts:
  `CWRStarPlugin(freeze_remaining_model=False)` plus `SynapticIntelligencePlugin` on every
  parameter but the head, with its lambda and eps; Avalanche's SI scales Omega by 0.0015, clips
  it at 0.001 and pays lambda/2, so `strategy: ar1` runs with c = lambda * 0.0015 / 2,
  clip = 0.001 / 0.0015 and xi = eps (the same penalty);
- rwalk: Avalanche's `RWalkPlugin` (ewc_lambda, ewc_alpha, delta_t) against `strategy: rwalk`
  with lambda, alpha, interval.

Skips with a message (exit 0) when Avalanche is not installed
(`pip install --no-deps avalanche-lib==0.6.0` and the few light packages it imports).
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from growth.campaign import Campaign
from growth.compile import compile_graph
from growth.config import load_config

CONFIG = "experiments/split_digits_class.yaml"
SI_LAMBDA, SI_EPS = 1000.0, 0.1  # Avalanche's SI: penalty (lambda/2) * clip(0.0015 w/(D^2+eps))
RWALK = {"lambda": 1.0, "alpha": 0.9, "interval": 10}


def ours_settings(method: str) -> dict:
    if method == "ar1":
        return {"name": "ar1", "c": SI_LAMBDA * 0.0015 / 2, "xi": SI_EPS,
                "clip": 0.001 / 0.0015}
    if method == "rwalk":
        return {"name": "rwalk", **RWALK}
    return {"name": method}


def run_ours(method: str, seed: int, epochs: int, out: Path) -> dict:
    settings = ", ".join(f"{k}: {v}" for k, v in ours_settings(method).items())
    cfg = load_config(CONFIG, [f"seed={seed}", f"train.epochs={epochs}",
                               f"strategy={{{settings}}}", "threads=1"])
    m = Campaign(cfg, out / f"{method}-s{seed}").start()
    return {"acc": m["acc"], "epoch_s": sum(m["wall_time_s"]) / (len(m["tasks"]) * epochs)}


def run_avalanche(method: str, seed: int, epochs: int, out: Path) -> dict:
    from avalanche.benchmarks.scenarios.deprecated.generic_benchmark_creation import (
        create_generic_benchmark_from_tensor_lists,
    )
    from avalanche.training.plugins import (
        CWRStarPlugin,
        EvaluationPlugin,
        RWalkPlugin,
        SynapticIntelligencePlugin,
    )
    from avalanche.training.supervised import CWRStar, Naive

    cfg = load_config(CONFIG, [f"seed={seed}", f"train.epochs={epochs}", "threads=1"])
    campaign = Campaign(cfg, out / f"avalanche-{method}-s{seed}")  # its stream and base network
    tasks, label = campaign.tasks, campaign.label_of
    model = copy.deepcopy(compile_graph(campaign.base))  # the campaign's initial weights
    torch.manual_seed(seed)
    bench = create_generic_benchmark_from_tensor_lists(
        train_tensors=[[t.train[0], label(t, t.train[1])] for t in tasks],
        test_tensors=[[t.test[0], label(t, t.test[1])] for t in tasks],
        task_labels=[0] * len(tasks))
    train = cfg.train
    opt = torch.optim.SGD(model.parameters(), lr=train.lr, momentum=train.momentum)
    common = {"train_mb_size": train.batch_size, "train_epochs": epochs, "eval_mb_size": 1024,
              "device": "cpu", "evaluator": EvaluationPlugin(loggers=[])}
    loss = torch.nn.CrossEntropyLoss()
    if method == "cwr":
        strategy = CWRStar(model=model, optimizer=opt, criterion=loss, cwr_layer_name="head_all",
                           **common)
    elif method == "ar1":
        plugins = [CWRStarPlugin(model, cwr_layer_name="head_all", freeze_remaining_model=False),
                   SynapticIntelligencePlugin(SI_LAMBDA, eps=SI_EPS,
                                              excluded_parameters=["head_all"])]
        strategy = Naive(model=model, optimizer=opt, criterion=loss, plugins=plugins, **common)
    else:
        plugins = [RWalkPlugin(ewc_lambda=RWALK["lambda"], ewc_alpha=RWALK["alpha"],
                               delta_t=RWALK["interval"])]
        strategy = Naive(model=model, optimizer=opt, criterion=loss, plugins=plugins, **common)
    seconds, last = 0.0, []
    for exp in bench.train_stream:
        start = time.perf_counter()
        strategy.train(exp)
        seconds += time.perf_counter() - start
        last = [accuracy(model, t.test[0], label(t, t.test[1])) for t in tasks]
    return {"acc": statistics.fmean(last), "epoch_s": seconds / (len(tasks) * epochs)}


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    mode = model.training
    model.eval()
    try:
        return float((model(x).argmax(1) == y).float().mean())
    finally:
        model.train(mode)


def interval(diffs: list[float]) -> tuple[float, float]:
    """Mean and half-width of a 95% t interval of paired differences."""
    from scipy import stats

    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, math.nan
    half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, half


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["cwr", "ar1", "rwalk"],
                    choices=["cwr", "ar1", "rwalk"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--out", default=None, help="folder for our run directories (default: a "
                    "temporary one)")
    args = ap.parse_args()
    try:
        import avalanche
    except ImportError as exc:
        print(f"Avalanche is not installed ({exc}); skipped. Install it with `pip install "
              "--no-deps avalanche-lib==0.6.0` plus the light packages it imports.")
        return 0
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        for method in args.methods:
            ours, theirs = [], []
            for seed in args.seeds:
                ours.append(run_ours(method, seed, args.epochs, out))
                theirs.append(run_avalanche(method, seed, args.epochs, out))
                print(f"{method} seed {seed}: growth ACC {ours[-1]['acc']:.4f} "
                      f"({ours[-1]['epoch_s']:.3f} s/epoch), Avalanche {avalanche.__version__} "
                      f"ACC {theirs[-1]['acc']:.4f} ({theirs[-1]['epoch_s']:.3f} s/epoch)",
                      flush=True)
            rows.append((method, ours, theirs))
    print("\n| method | growth ACC | Avalanche ACC | growth - Avalanche (95% CI) | "
          "growth s/epoch | Avalanche s/epoch | within 0.5 points |")
    print("|---|---|---|---|---|---|---|")
    for method, ours, theirs in rows:
        a, b = [r["acc"] for r in ours], [r["acc"] for r in theirs]
        diff, half = interval([x - y for x, y in zip(a, b)])
        print(f"| {method} | {_ms(a)} | {_ms(b)} | {diff:+.3f} ± {half:.3f} | "
              f"{statistics.fmean(r['epoch_s'] for r in ours):.3f} | "
              f"{statistics.fmean(r['epoch_s'] for r in theirs):.3f} | "
              f"{'yes' if statistics.fmean(a) >= statistics.fmean(b) - 0.005 else 'no'} |")
    print(f"seeds {args.seeds}, {args.epochs} epochs per task")
    return 0


def _ms(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


if __name__ == "__main__":
    sys.exit(main())
