"""Training-loop overhead: growth's one loop (strategy hooks, head views) against a bare PyTorch
loop training the same network on the same data, interleaved epoch by epoch in one run.

    python bench/bench_loop.py [--repeats 7] [--samples 10000]

Last line: `loop overhead ratio: R` (median of per-repeat ratios; target <= 1.10).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from growth.data.containers import Task
from growth.graph import NetGraph
from growth.model import Model
from growth.strategies import Context, Strategy
from growth.train import TrainConfig, fit


def network(features: int, hidden: int, classes: int) -> NetGraph:
    g = NetGraph()
    g.add_input("x", (features,))
    g.add("fc1", "linear", ["x"], out_features=hidden)
    g.add("relu1", "relu", ["fc1"])
    g.add("fc2", "linear", ["relu1"], out_features=hidden)
    g.add("relu2", "relu", ["fc2"])
    g.add("head_t0", "linear", ["relu2"], out_features=classes)
    g.add_output("t0", "head_t0")
    return g


def bare_epoch(net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               batch: int, gen: torch.Generator) -> None:
    net.train()
    for idx in torch.randperm(len(y), generator=gen).split(batch):
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--samples", type=int, default=10000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.rand(args.samples, 784)
    y = torch.randint(0, 10, (args.samples,))
    task = Task(0, "bench", (x, y), (x[:10], y[:10]), (x[:10], y[:10]), list(range(10)), 10, 0,
                (784,))
    model = Model(network(784, 256, 10))
    bare = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 10))
    bare.load_state_dict({k.replace("fc1", "0").replace("fc2", "2").replace("head_t0", "4"): v
                          for k, v in copy.deepcopy(model.module.state_dict()).items()})
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.01)
    bare_opt = torch.optim.SGD(bare.parameters(), lr=0.01, momentum=0.9)
    ctx = Context(model, task, [], lambda t: "t0", lambda t, y: y, torch.device("cpu"))
    strategy = Strategy()
    gen = torch.Generator().manual_seed(0)

    def ours() -> float:
        start = time.perf_counter()
        fit(ctx, strategy, cfg, seed=1)
        return time.perf_counter() - start

    def theirs() -> float:
        start = time.perf_counter()
        bare_epoch(bare, bare_opt, x, y, 64, gen)
        return time.perf_counter() - start

    ours(), theirs()  # warm-up
    ratios = []
    for r in range(args.repeats):
        a, b = (ours(), theirs()) if r % 2 == 0 else tuple(reversed((theirs(), ours())))
        ratios.append(a / b)
        print(f"repeat {r}: growth loop {a * 1e3:.1f} ms/epoch, bare loop {b * 1e3:.1f} ms/epoch,"
              f" ratio {a / b:.3f}")
    print(f"{args.samples} samples, batch 64, MLP 784-256-256-10, {args.threads} thread(s)")
    print(f"loop overhead ratio: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
