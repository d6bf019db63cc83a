"""Benchmark the growth operators on an imported torchvision ResNet-18 (run by hand).

Latency of net2wider and net2deeper (median over nodes and repeats) divided by the time of
`copy.deepcopy` of the torch model, the floor for producing any new model; and the largest
function error after a chain of operators, relative to the output's scale. Ends with one line:
`ops: widen_ratio=R deepen_ratio=R max_err=E` (targets: ratios <= 2, error <= 1e-5).

    python bench/bench_ops.py [--size 224] [--repeats 5] [--chain 20] [--seed 0]
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
from collections.abc import Callable

import torch
import torchvision

from growth.compile import compile_graph
from growth.graph import NetGraph, output_scale
from growth.ops import deepenable, net2deeper, net2wider, resizable
from growth.trace import import_module


def median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def deepen_targets(graph: NetGraph, kernel: int) -> list[str]:
    return [n for n in deepenable(graph) if graph.node(n).kind == "relu"
            and min(graph.shape(n)[1:] or (kernel,)) >= kernel]


def chain(graph: NetGraph, steps: int, sample: torch.Tensor, seed: int) -> NetGraph:
    """`steps` random exact-mode widen/deepen operators, each on a valid node."""
    rng = random.Random(seed)
    for step in range(steps):
        if rng.random() < 0.5:
            node = rng.choice(resizable(graph))
            width = graph.shape(node)[0] + rng.randint(1, 16)
            graph = net2wider(graph, node, width, seed=step).graph
        else:
            kernel = rng.choice([1, 3])
            after = rng.choice(deepen_targets(graph, kernel))
            graph = net2deeper(graph, after, kernel_size=kernel, batchnorm=rng.random() < 0.5,
                               sample=sample).graph
    return graph


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chain", type=int, default=20, help="operators in the chained run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model = torchvision.models.resnet18(weights=None).eval()
    graph = import_module(model, (3, args.size, args.size))

    floor = median_time(lambda: copy.deepcopy(model), args.repeats)
    widen_nodes = resizable(graph)
    widen = statistics.median(
        median_time(lambda n=n: net2wider(graph, n, graph.shape(n)[0] + 16), args.repeats)
        for n in widen_nodes)
    deepen_nodes = deepen_targets(graph, 3)
    deepen = statistics.median(
        median_time(lambda n=n: net2deeper(graph, n, kernel_size=3), args.repeats)
        for n in deepen_nodes)

    x = torch.randn(2, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    grown = chain(graph, args.chain, x, args.seed)
    with torch.no_grad():
        before = model(x)
        after = compile_graph(grown).eval()(x)
    err = float((after - before).abs().max()) / output_scale(before)

    print(f"ResNet-18 graph at {args.size}x{args.size}: {len(graph)} nodes, "
          f"{graph.param_count():,} parameters; torch threads {torch.get_num_threads()}")
    print(f"deepcopy(model)          {floor * 1e3:8.2f} ms (median of {args.repeats})")
    print(f"net2wider (+16 units)    {widen * 1e3:8.2f} ms (median over {len(widen_nodes)} nodes)")
    print(f"net2deeper (3x3, no BN)  {deepen * 1e3:8.2f} ms (median over {len(deepen_nodes)} "
          "relu nodes)")
    print(f"after {args.chain} chained operators: {len(grown)} nodes, {grown.param_count():,} "
          f"parameters, max relative error {err:.2e}")
    print(f"ops: widen_ratio={widen / floor:.2f} deepen_ratio={deepen / floor:.2f} "
          f"max_err={err:.2e}")


if __name__ == "__main__":
    main()
