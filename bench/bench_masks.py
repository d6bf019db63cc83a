"""Mask overhead: training-step time of PackNet-, CPG-, HAT-, Piggyback- and SupSup-masked
networks over the same network unmasked, through the one training loop, interleaved in one run.

Run by hand (never a test):  python bench/bench_masks.py [--repeats 30] [--threads 1]
                             [--strategies packnet cpg hat piggyback supsup]

Networks: the MLP 784-1000-1000 (batch 256) and the small CNN of bench_compile.py (3x32x32,
conv 16-32-64-128 with BatchNorm, batch 64), one 10-way head. Each strategy is set up as for
its second task: half of every trunk weight matrix owned by the first task (PackNet: the free
half trains, a guard zeroes the others' gradients; CPG: the free half trains through the
effective weights, with picks over the owned half and their Adam); HAT: half of every layer's
units used by the first task (their weights protected, attention gates on every layer, the
embeddings trained and compensated, the sparsity regulariser); Piggyback: the backbone fixed
after the first task, every trunk weight masked by its score (Adam on the scores); SupSup: a
top-k supermask over every weight, head included (Adam on the scores). SGD with momentum, no
weight decay. Each repeat times one epoch of `--steps` steps of each variant, rotating which
goes first; the ratio is the median of per-repeat ratios (masked / unmasked).
Last line: `mask overhead ratio: packnet=R cpg=R hat=R piggyback=R supsup=R` (the worse of the
two networks; target <= 1.3).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from growth.search_spaces.networks import add_head, mlp, small_cnn

from growth.data.containers import Task
from growth.graph import NetGraph
from growth.masks import masked_names
from growth.model import Model
from growth.strategies import Context, Strategy, make_strategy
from growth.train import TrainConfig, fit

CNN_CHANNELS = (16, 32, 64, 128)
STRATEGIES = ("packnet", "cpg", "hat", "piggyback", "supsup")


def networks() -> dict[str, tuple[NetGraph, tuple[int, ...], int]]:
    return {"mlp": (add_head(mlp((784,), [1000, 1000]), "out", 10), (784,), 256),
            "cnn": (add_head(small_cnn((3, 32, 32), channels=CNN_CHANNELS), "out", 10),
                    (3, 32, 32), 64)}


def variant(name: str, graph: NetGraph, task: Task, cfg: TrainConfig) -> tuple[Context, Strategy]:
    """A model and strategy as at the start of the second task."""
    model = Model(graph)
    ctx = Context(model, task, [], lambda t: "out", lambda t, y: y, torch.device("cpu"), seed=1,
                  train_config=cfg)
    if name == "plain":
        return ctx, Strategy()
    strategy = make_strategy(name, {})
    gen = torch.Generator().manual_seed(0)
    params = model.named_parameters()
    strategy.extra["tasks"] = [0]
    if name in ("packnet", "cpg"):  # half of every trunk weight owned by the first task
        for n in masked_names(model):
            owned = torch.rand(params[n].shape, generator=gen) < 0.5
            strategy.state[f"owner/all/{n}"] = owned.to(torch.uint8)
    if name == "cpg":
        strategy.extra["goals"] = {str(task.index): 0.0}  # no model trained alone here
    if name == "hat":  # half of every layer's units used by the first task
        for n in masked_names(model):
            node = n.rsplit(".", 1)[0]
            strategy.state[f"attention/0/{node}"] = torch.rand(params[n].shape[0],
                                                               generator=gen) < 0.5
    strategy.before_task(ctx)
    return ctx, strategy


def measure(graph: NetGraph, shape: tuple[int, ...], batch: int, steps: int, repeats: int,
            names: list[str]) -> dict[str, list[float]]:
    torch.manual_seed(0)
    n = batch * steps
    x, y = torch.randn(n, *shape), torch.randint(0, 10, (n,))
    task = Task(1, "bench", (x, y), (x[:2], y[:2]), (x[:2], y[:2]), list(range(10)), 10, 0, shape)
    cfg = TrainConfig(epochs=1, batch_size=batch, lr=0.01, momentum=0.9)
    runs = {name: variant(name, graph, task, cfg) for name in ("plain", *names)}
    times: dict[str, list[float]] = {name: [] for name in runs}

    def one(name: str) -> float:
        ctx, strategy = runs[name]
        start = time.perf_counter()
        fit(ctx, strategy, cfg, seed=1)
        return (time.perf_counter() - start) / steps

    for name in runs:  # warm-up
        one(name)
    order = list(runs)
    for r in range(repeats):
        turn = order[r % len(order):] + order[:r % len(order)]
        for name in turn:
            times[name].append(one(name))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--steps", type=int, default=4, help="training steps per timed epoch")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.repeats} repeats x "
          f"{args.steps} steps per variant, SGD momentum 0.9")
    worst = dict.fromkeys(args.strategies, 0.0)
    for net, (graph, shape, batch) in networks().items():
        times = measure(graph, shape, batch, args.steps, args.repeats, args.strategies)
        plain = times["plain"]
        line = [f"{net} (batch {batch}): plain {statistics.median(plain) * 1e3:.1f} ms/step"]
        for name in args.strategies:
            ratio = statistics.median(t / p for t, p in zip(times[name], plain))
            worst[name] = max(worst[name], ratio)
            line.append(f"{name} {statistics.median(times[name]) * 1e3:.1f} ms/step "
                        f"(ratio {ratio:.3f})")
        print(", ".join(line), flush=True)
    print("mask overhead ratio: " + " ".join(f"{n}={r:.3f}" for n, r in worst.items()))


if __name__ == "__main__":
    main()
