"""Progressive Nets in the reference setting, beside an independent plain-PyTorch MLP per task.

    python bench/bench_pnn.py                        # seeds 0 1 2, 10% of training data held out
    python bench/bench_pnn.py --val-fraction 0       # every training image used

Setting (experiments/pnn_permuted_digits.yaml): permuted digits, 5 tasks, one hidden layer of
128, 10 epochs of plain SGD (lr 0.05, momentum 0), batch 32. With one hidden layer a column
has no layer after its first, so PNN's columns are independent networks; the plain baseline
trains `nn.Sequential(Flatten, Linear(64, 128), ReLU, Linear(128, 10))` per task on the same
task data with a hand-written loop, an independent check of what the setting allows. Last
line: `pnn reference: pnn=ACC±std plain=ACC±std`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from growth.campaign import Campaign
from growth.config import load_config
from growth.data import build_stream

CONFIG = "experiments/pnn_permuted_digits.yaml"


def plain_acc(tasks: list, seed: int, epochs: int, lr: float, batch: int) -> float:
    """Mean test accuracy of one fresh MLP per task, trained on that task alone."""
    accs = []
    for t in tasks:
        torch.manual_seed(seed * 1000 + t.index)
        net = nn.Sequential(nn.Flatten(), nn.Linear(t.train[0][0].numel(), 128), nn.ReLU(),
                            nn.Linear(128, t.n_classes))
        opt = torch.optim.SGD(net.parameters(), lr=lr)
        x, y = t.train
        gen = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            for idx in torch.randperm(len(y), generator=gen).split(batch):
                opt.zero_grad()
                F.cross_entropy(net(x[idx]), y[idx]).backward()
                opt.step()
        with torch.no_grad():
            xt, yt = t.test
            accs.append(float((net(xt).argmax(1) == yt).float().mean()))
    return statistics.fmean(accs)


def fmt(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3f}±{statistics.stdev(values):.3f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--val-fraction", type=float, default=0.1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    pnn, plain = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            cfg = load_config(CONFIG, [f"seed={seed}", f"data.val_fraction={args.val_fraction}"])
            m = Campaign(cfg, Path(tmp) / f"pnn_s{seed}").start()
            tasks = build_stream({**cfg.data.model_dump(), "seed": seed})
            t = cfg.train
            plain.append(plain_acc(tasks, seed, t.epochs, t.lr, t.batch_size))
            pnn.append(m["acc"])
            print(f"seed {seed}: pnn ACC {pnn[-1]:.4f} (BWT {m['bwt']:.4f}, "
                  f"{m['sizes'][-1]['relative']:.2f}x base)  plain per-task MLP ACC "
                  f"{plain[-1]:.4f}", flush=True)
    print(f"pnn reference: pnn={fmt(pnn)} plain={fmt(plain)}")


if __name__ == "__main__":
    main()
