"""Import a model zoo and check the graphs compute the same functions (run by hand).

`--zoo torchvision` (default): every torchvision classification builder. `--zoo timm`: every
timm model family (a module of `timm.models`), represented by its smallest member (fewest
parameters with 10 classes, counted on the meta device), built with random weights
(`pip install 'growth[timm]'`). Each model is built with fresh weights, in eval mode, with BN
statistics set from one batch so the output depends on the input, at the smallest input size
it accepts (timm models that fix their size are rebuilt with `img_size`).

For each: import, compile, and compare with the module on two random inputs. Prints whether it
imported (or the refusal), the max error relative to the output's scale, whether the outputs are
bit-identical, how many layers `net2wider` can widen (`resizable`), after how many nodes
`net2deeper` can insert a layer (`deepenable`, kernel 1, default size guard), how many nodes
are programs (calls replayed exactly, which no growth rule crosses) and the import time. With
`--chain N`, N random exact operators follow (widenings, deepenings, and on transformers added
heads and identity blocks). Their error is shown relative to the output's scale, as the
import's, twice: `grow_err`, the grown graph against the imported one with the same weights both
evaluated in float64 (what is left is a change of the function: the figure the summary line
reports), and `err32`, the grown graph in float32 against the model (float32 rounding, which
grows with depth, width and the size of the activations of a randomly initialised network).
`--double` builds the models in float64 too. `--csv PATH` also writes one row per model as it
finishes (a refusal's reason included), for a coverage table or a plot.
Ends with one line: `import: ok=N/M max_err=E` (and ` chain_err=C` with `--chain`).

    python bench/bench_import.py [--models resnet vit_b_16 ...] [--chain 0] [--double]
    python bench/bench_import.py --zoo timm --chain 4 [--models vision_transformer ...]
        [--csv zoo.csv]
"""

from __future__ import annotations

import argparse
import csv
import gc
import inspect
import random
import time
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import nn

from growth.compile import compile_graph
from growth.errors import GrowthError
from growth.graph import NetGraph, output_scale
from growth.ops import (
    add_block,
    add_heads,
    attention_nodes,
    blockable,
    deepenable,
    find_group,
    net2deeper,
    net2wider,
    resizable,
)
from growth.trace import import_module

Case = tuple[str, str, Callable[[], tuple[nn.Module, int]]]  # family, model, build
COLUMNS = ("family", "model", "ok", "why", "size", "nodes", "params", "seconds", "err", "bits",
           "widen", "deepen", "programs", "ops", "grow_err", "grow_err32")


# ---- torchvision -------------------------------------------------------------------------------
def torchvision_cases(prefixes: list[str] | None) -> Iterator[Case]:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    for name in names:
        if prefixes and not any(name.startswith(m) for m in prefixes):
            continue
        yield name, name, lambda name=name: _torchvision(name)


def _torchvision(name: str) -> tuple[nn.Module, int]:
    """The smallest input each builder comfortably allows, and the model built for it."""
    import torchvision

    kwargs = {}
    if name.startswith("vit_"):
        size = 2 * int(name.rsplit("_", 1)[1])  # 2x2 patches
        kwargs = {"image_size": size}
    else:
        size = {"maxvit_t": 224, "inception_v3": 75}.get(name, 64)
    return torchvision.models.get_model(name, weights=None, **kwargs), size


# ---- timm -------------------------------------------------------------------------------------
SIZES = (32, 48, 64, 96, 128, 160, 192, 224, 256)


def timm_cases(families: list[str] | None) -> Iterator[Case]:
    import timm

    for family in sorted(timm.list_modules()):
        if families and family not in families:
            continue
        name = smallest_member(family)
        if name is None:
            continue
        yield family, name, lambda name=name: _timm(name)


def smallest_member(family: str) -> str | None:
    """The family's model with the fewest parameters at 10 classes (built on the meta device,
    so no memory and no initialisation)."""
    import timm

    best: tuple[int, str] | None = None
    for name in timm.list_models(module=family):
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = timm.create_model(name, pretrained=False, num_classes=10)
        except Exception:  # a model that cannot be built without its weights or extras
            continue
        count = sum(p.numel() for p in model.parameters())
        if best is None or count < best[0]:
            best = (count, name)
    return None if best is None else best[1]


def _timm(name: str) -> tuple[nn.Module, int]:
    """The model at the smallest square input (of SIZES, up to its default) it accepts."""
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    default = int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    smaller = [s for s in SIZES if s < default]
    for size in smaller:
        if _runs(model, size):
            return model, size
    resizable_input = "img_size" in inspect.signature(type(model).__init__).parameters
    for size in smaller if resizable_input else ():
        try:
            small = timm.create_model(name, pretrained=False, num_classes=10, img_size=size)
        except Exception:  # sizes the architecture cannot be built for
            continue
        if _runs(small.eval(), size):
            return small, size
    return model, default


def _runs(model: nn.Module, size: int) -> bool:
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(torch.randn(2, 3, size, size))
        return True
    except Exception:  # the model refuses this size
        return False


# ---- one model -------------------------------------------------------------------------------
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


def grow(graph: NetGraph, steps: int, seed: int) -> tuple[NetGraph, int]:
    """`steps` random exact operators (each move kind chosen uniformly among those the network
    offers); returns the grown graph and how many were applied."""
    rng = random.Random(seed)
    done = 0
    for step in range(steps):
        moves = {"wider": resizable(graph), "deeper": deepenable(graph),
                 "heads": attention_nodes(graph), "block": blockable(graph)}
        moves = {k: v for k, v in moves.items() if v}
        if not moves:
            break
        kind = rng.choice(sorted(moves))
        node = rng.choice(moves[kind])
        try:
            graph = _move(graph, kind, node, rng, step)
            done += 1
        except GrowthError:  # a size guard: this move is too large here
            continue
    return graph, done


def _move(graph: NetGraph, kind: str, node: str, rng: random.Random, step: int) -> NetGraph:
    if kind == "wider":
        group = find_group(graph, node)
        if group.tile is not None:  # a norm over the channels: whole copies of every unit
            width = 2 * group.width
        else:  # grouped convs: whole groups
            width = group.width + group.block * rng.randint(1, max(1, 8 // group.block))
        return net2wider(graph, group.node, width, seed=step).graph
    if kind == "deeper":
        return net2deeper(graph, node, kernel_size=1).graph
    if kind == "heads":
        return add_heads(graph, node, graph.node(node).attrs["num_heads"] + 1, seed=step).graph
    return add_block(graph, node, seed=step).graph


def run(build: Callable[[], tuple[nn.Module, int]], chain: int, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    try:
        model, size = build()
    except Exception as exc:  # the zoo's own failure to build the model
        return {"ok": False, "why": f"cannot build it: {type(exc).__name__}: {exc}"[:300]}
    model = calibrate(model, size).to(dtype)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
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
           "widen": len(resizable(graph)), "deepen": len(deepenable(graph)),
           "programs": sum(graph.node(n).kind == "program" for n in graph)}
    if chain:
        grown, out["ops"] = grow(graph, chain, seed=0)
        with torch.no_grad():
            after = compile_graph(grown).eval()(x)
            wide = x.double()  # the same weights, evaluated in float64: no rounding to hide in
            ref = compile_graph(graph).double().eval()(wide)
            after64 = compile_graph(grown).double().eval()(wide)
        out["grow_err32"] = float((after - want).abs().max()) / output_scale(want)
        out["grow_err"] = float((after64 - ref).abs().max()) / output_scale(ref)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", choices=("torchvision", "timm"), default="torchvision")
    parser.add_argument("--models", nargs="*", default=None,
                        help="torchvision: builder names or prefixes; timm: family names "
                             "(default: all)")
    parser.add_argument("--chain", type=int, default=0, help="random exact operators after import")
    parser.add_argument("--double", action="store_true", help="models and inputs in float64")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--csv", default=None, help="also write one row per model to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.zoo == "timm":
        import timm

        version = f"timm {timm.__version__}"
        cases = timm_cases(args.models)
    else:
        import torchvision

        version = f"torchvision {torchvision.__version__}"
        cases = torchvision_cases(args.models)
    print(f"torch {torch.__version__}, {version}, {args.threads} threads"
          f"{', float64' if args.double else ''}", flush=True)
    print(f"{'family':26} {'model':30} {'input':>5} {'nodes':>5} {'params':>12} {'import s':>8} "
          f"{'max_err':>8} {'bits':>4} {'widen':>5} {'deepen':>6} {'progs':>5}"
          + (f" {'ops':>3} {'grow_err':>8} {'err32':>8}" if args.chain else ""), flush=True)
    table = open(args.csv, "w", newline="") if args.csv else None  # noqa: SIM115 (whole run)
    rows = csv.DictWriter(table, COLUMNS) if table else None
    if rows:
        rows.writeheader()
    ok, total, worst, worst_chain = 0, 0, 0.0, 0.0
    for family, name, build in cases:
        total += 1
        try:
            res = run(build, args.chain, torch.float64 if args.double else torch.float32)
        except Exception as exc:  # a graph that imported but does not run: a failure too
            res = {"ok": False, "why": f"fails after import: {type(exc).__name__}: {exc}"[:300]}
        gc.collect()
        if rows:
            rows.writerow({"family": family, "model": name, **res})
            table.flush()  # an interrupted run keeps the rows it finished
        if not res["ok"]:
            print(f"{family:26} {name:30} refused: {res['why']}", flush=True)
            continue
        ok += 1
        worst = max(worst, res["err"])
        worst_chain = max(worst_chain, res.get("grow_err", 0.0))
        print(f"{family:26} {name:30} {res['size']:>5} {res['nodes']:>5} {res['params']:>12,} "
              f"{res['seconds']:>8.2f} {res['err']:>8.1e} {'yes' if res['bits'] else 'no':>4} "
              f"{res['widen']:>5} {res['deepen']:>6} {res['programs']:>5}"
              + (f" {res['ops']:>3} {res['grow_err']:>8.1e} {res['grow_err32']:>8.1e}"
                 if args.chain else ""), flush=True)
    if table:
        table.close()
    print(f"import: ok={ok}/{total} max_err={worst:.1e}"
          + (f" chain_err={worst_chain:.1e}" if args.chain else ""))


if __name__ == "__main__":
    main()
