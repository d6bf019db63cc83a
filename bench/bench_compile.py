"""Compile overhead: forward+backward time of a compiled NetGraph over the same network by hand.

Run by hand (never a test):  python bench/bench_compile.py [--repeats 200] [--threads 1]

Both sides hold the same weights (checked: equal outputs before timing). Each repeat times a
block of training steps of each side, alternating which goes first, so drift in machine load
hits both alike; the reported ratio is the median of the per-repeat ratios (compiled / hand).
Two more pairs compare with torchvision's own code: MobileNetV3-Small (depthwise convs,
squeeze-and-excitation gates, hardswish) and a small ViT (class token, positional embedding,
self-attention, token MLPs), each imported with `growth.trace.import_module`.
The last line is `compile overhead ratio: mlp=R cnn=R mobilenet=R vit=R`; the target is at most
1.05.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision
from growth.search_spaces.networks import add_head, mlp, small_cnn
from torch import nn

from growth.compile import compile_graph
from growth.graph import NetGraph
from growth.trace import import_module

CNN_CHANNELS = (16, 32, 64, 128)


class HandMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(784, 1000), nn.Linear(1000, 1000), \
            nn.Linear(1000, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class HandCNN(nn.Module):
    def __init__(self, channels: tuple[int, ...] = CNN_CHANNELS) -> None:
        super().__init__()
        ins = (3, *channels[:-1])
        self.convs = nn.ModuleList(nn.Conv2d(i, o, 3, padding=1) for i, o in zip(ins, channels))
        self.bns = nn.ModuleList(nn.BatchNorm2d(o) for o in channels)
        self.fc = nn.Linear(channels[-1] * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, bn in zip(self.convs, self.bns):
            x = F.max_pool2d(torch.relu(bn(conv(x))), 2)
        return self.fc(torch.flatten(x, 1))


def _copy(dst: nn.Module, graph: NetGraph, node: str) -> None:
    dst.load_state_dict(graph.node(node).tensors)


def mlp_pair() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    graph = add_head(mlp((784,), [1000, 1000]), "out", 10)
    hand = HandMLP()
    for layer, node in ((hand.fc1, "fc1"), (hand.fc2, "fc2"), (hand.fc3, "head_out")):
        _copy(layer, graph, node)
    return hand, compile_graph(graph), torch.randn(256, 784)


def cnn_pair() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    graph = add_head(small_cnn((3, 32, 32), channels=CNN_CHANNELS), "out", 10)
    hand = HandCNN()
    for i in range(4):
        _copy(hand.convs[i], graph, f"conv{i + 1}")
        _copy(hand.bns[i], graph, f"bn{i + 1}")
    _copy(hand.fc, graph, "head_out")
    return hand, compile_graph(graph), torch.randn(64, 3, 32, 32)


def imported_pair(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """torchvision's module and the graph imported from it (same weights, bit-identical)."""
    model.eval()
    return model, compile_graph(import_module(model, tuple(x.shape[1:]))), x


def mobilenet_pair() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    return imported_pair(torchvision.models.mobilenet_v3_small(num_classes=10),
                         torch.randn(32, 3, 64, 64))


def vit_pair() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    model = torchvision.models.VisionTransformer(32, 4, 4, 4, 64, 128, num_classes=10)
    return imported_pair(model, torch.randn(32, 3, 32, 32))


def _step(model: nn.Module, x: torch.Tensor) -> None:
    model(x).square().mean().backward()
    model.zero_grad(set_to_none=True)


def _block(model: nn.Module, x: torch.Tensor, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        _step(model, x)
    return (time.perf_counter() - start) / iters


def measure(pair: Callable[[], tuple[nn.Module, nn.Module, torch.Tensor]], repeats: int,
            iters: int, warmup: int) -> dict[str, float]:
    """Median seconds per step for each side and the median paired ratio."""
    torch.manual_seed(0)
    hand, compiled, x = pair()
    with torch.no_grad():
        assert torch.allclose(hand.eval()(x), compiled.eval()(x), atol=1e-5), "weights differ"
    hand.train(), compiled.train()
    for _ in range(warmup):
        _step(hand, x), _step(compiled, x)
    t_hand, t_comp, ratios = [], [], []
    for r in range(repeats):
        if r % 2:
            c, h = _block(compiled, x, iters), _block(hand, x, iters)
        else:
            h, c = _block(hand, x, iters), _block(compiled, x, iters)
        t_hand.append(h), t_comp.append(c), ratios.append(c / h)
    return {"hand": statistics.median(t_hand), "compiled": statistics.median(t_comp),
            "hand_min": min(t_hand), "compiled_min": min(t_comp),
            "ratio": statistics.median(ratios)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--iters", type=int, default=1, help="training steps per timed block")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads; 1 is least disturbed by other load on the machine")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.repeats} repeats x "
          f"{args.iters} steps, forward+backward, train mode")
    ratios = {}
    for name, pair in (("mlp", mlp_pair), ("cnn", cnn_pair), ("mobilenet", mobilenet_pair),
                       ("vit", vit_pair)):
        res = measure(pair, args.repeats, args.iters, args.warmup)
        ratios[name] = res["ratio"]
        print(f"{name}: median ms/step hand {res['hand'] * 1e3:.2f} compiled "
              f"{res['compiled'] * 1e3:.2f}; min ms/step hand {res['hand_min'] * 1e3:.2f} "
              f"compiled {res['compiled_min'] * 1e3:.2f} (ratio of mins "
              f"{res['compiled_min'] / res['hand_min']:.3f}); median paired ratio "
              f"{res['ratio']:.3f}")
    print("compile overhead ratio: " + " ".join(f"{k}={v:.3f}" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
