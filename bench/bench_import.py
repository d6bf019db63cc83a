"""Import every torchvision classification builder and check the graph computes the same (run
by hand).

For each builder (fresh weights, eval mode, BN statistics set from one batch so the output
depends on the input): import at a small input size, compile, and compare with the module on
two random inputs. Prints whether it imported (or the refusal), the max error relative to the
output's scale, whether the outputs are bit-identical, how many layers `net2wider` can widen
(`resizable`) and after how many nodes `net2deeper` can insert a layer (`deepenable`, kernel 1,
default size guard), and the import time. With `--chain N`, N random exact widenings and
deepenings follow, and their error relative to the output's input-dependent scale is shown
(float32 rounding grows with depth; `--double` runs everything in float64, where what is left
is a change of the function).
Ends with one line: `import: ok=N/M max_err=E`.

    python bench/bench_import.py [--models resnet vit_b_16 ...] [--chain 0] [--double]
"""

from __future__ import annotations

import argparse
import gc
import random
import time

import torch
import torchvision
from torch import nn

from growth.compile import compile_graph
from growth.errors import GrowthError
from growth.graph import NetGraph, output_scale
from growth.ops import deepenable, find_group, net2deeper, net2wider, resizable
from growth.trace import import_module


def input_size(name: str) -> tuple[int, dict]:
    """The smallest input each builder comfortably allows, and the builder arguments for it."""
    if name.startswith("vit_"):
        size = 2 * int(name.rsplit("_", 1)[1])  # 2x2 patches
        return size, {"image_size": size}
    return {"maxvit_t": 224, "inception_v3": 75}.get(name, 64), {}


def calibrate(model: nn.Module, size: int) -> nn.Module:
    """Re-initialise all-zero layers (ViT's head) and set BN statistics from one batch."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and not m.weight.any():
                nn.init.normal_(m.weight, std=m.weight[0].numel() ** -0.5)
        model.eval()
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):  # only BN sees the batch
                m.momentum = 1.0
                m.train()
        model(torch.randn(4, 3, size, size))
    return model.eval()


def grow(graph: NetGraph, steps: int, seed: int) -> NetGraph:
    rng = random.Random(seed)
    for step in range(steps):
        wide = resizable(graph)
        if wide and rng.random() < 0.5:
            group = find_group(graph, rng.choice(wide))  # grouped convs: whole groups
            width = group.width + group.block * rng.randint(1, max(1, 8 // group.block))
            graph = net2wider(graph, group.node, width, seed=step).graph
        else:
            graph = net2deeper(graph, rng.choice(deepenable(graph)), kernel_size=1).graph
    return graph


def run(name: str, chain: int, dtype: torch.dtype) -> dict:
    size, kwargs = input_size(name)
    torch.manual_seed(0)
    model = calibrate(torchvision.models.get_model(name, weights=None, **kwargs), size)
    model = model.to(dtype)
    start = time.perf_counter()
    try:
        graph = import_module(model, (3, size, size))
    except GrowthError as exc:
        return {"ok": False, "why": f"{type(exc).__name__}: {exc}"[:300]}
    seconds = time.perf_counter() - start
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=dtype)
    with torch.no_grad():
        want = model(x)
        got = compile_graph(graph).eval()(x)
    out = {"ok": True, "size": size, "nodes": len(graph), "params": graph.param_count(),
           "seconds": seconds, "bits": torch.equal(want, got),
           "err": float((got - want).abs().max()) / output_scale(want),
           "widen": len(resizable(graph)), "deepen": len(deepenable(graph))}
    if chain:
        with torch.no_grad():
            grown = compile_graph(grow(graph, chain, seed=0)).eval()(x)
        out["grow_err"] = float((grown - want).abs().max()) / float((want - want.mean(0))
                                                                     .abs().max())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=None,
                        help="builder names or prefixes (default: every classification builder)")
    parser.add_argument("--chain", type=int, default=0, help="random exact operators after import")
    parser.add_argument("--double", action="store_true", help="models and inputs in float64")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = torchvision.models.list_models(module=torchvision.models)
    if args.models:
        names = [n for n in names if any(n.startswith(m) for m in args.models)]
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {args.threads} "
          f"threads; {len(names)} builders{', float64' if args.double else ''}")
    print(f"{'builder':22} {'input':>5} {'nodes':>5} {'params':>12} {'import s':>8} "
          f"{'max_err':>8} {'bits':>4} {'widen':>5} {'deepen':>6}"
          + (f" {'grow_err':>8}" if args.chain else ""))
    ok, worst = 0, 0.0
    for name in names:
        res = run(name, args.chain, torch.float64 if args.double else torch.float32)
        gc.collect()
        if not res["ok"]:
            print(f"{name:22} refused: {res['why']}", flush=True)
            continue
        ok += 1
        worst = max(worst, res["err"])
        print(f"{name:22} {res['size']:>5} {res['nodes']:>5} {res['params']:>12,} "
              f"{res['seconds']:>8.2f} {res['err']:>8.1e} {'yes' if res['bits'] else 'no':>4} "
              f"{res['widen']:>5} {res['deepen']:>6}"
              + (f" {res['grow_err']:>8.1e}" if args.chain else ""), flush=True)
    print(f"import: ok={ok}/{len(names)} max_err={worst:.1e}")


if __name__ == "__main__":
    main()
