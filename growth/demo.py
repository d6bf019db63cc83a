"""The foundation demo: import a small PyTorch CNN, grow it, show it computes the same function.

Run with `growth demo`. It uses the bundled 8x8 digits as inputs, so it needs no download.
"""

from __future__ import annotations

import torch
from torch import nn

from growth.compile import compile_graph
from growth.graph import NetGraph, output_scale


def _user_network() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10),
    )


def _digits(n: int = 256) -> torch.Tensor:
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().images[:n], dtype=torch.float32) / 16.0
    return x.unsqueeze(1)


def _nodes(graph: NetGraph, kind: str) -> list[str]:
    return [n for n in graph.topo_order() if graph.node(n).kind == kind]


def run_demo(seed: int = 0) -> str:
    """Import, widen a conv and a linear layer, deepen after a ReLU; report the error."""
    from growth.ops import get_operator
    from growth.trace import import_module

    torch.manual_seed(seed)
    net = _user_network().eval()
    x = _digits()
    graph = import_module(net, (1, 8, 8))
    lines = ["imported network:", graph.summary(), ""]
    conv, hidden = _nodes(graph, "conv2d")[0], _nodes(graph, "linear")[0]
    relu = _nodes(graph, "relu")[-1]
    steps = [("net2wider", {"node": conv, "width": 16}),
             ("net2wider", {"node": hidden, "width": 64}),
             ("net2deeper", {"after": relu})]
    grown = graph
    for name, kwargs in steps:
        grown = get_operator(name)(grown, **kwargs).graph
        lines.append(f"applied {name}({', '.join(f'{k}={v}' for k, v in kwargs.items())})")
    with torch.no_grad():
        before = net(x)
        after = compile_graph(grown).eval()(x)
    err = float((after - before).abs().max()) / output_scale(before)
    lines += ["", "grown network:", grown.summary(), "",
              f"parameters: {graph.param_count():,} -> {grown.param_count():,}",
              f"max relative output difference on {len(x)} digits: {err:.2e} "
              f"({'function preserved' if err < 1e-5 else 'NOT preserved'})"]
    return "\n".join(lines)
