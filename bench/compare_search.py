"""EAS against random search: the same base network, space and budget, three seeds, two tasks.

    python bench/compare_search.py [--seeds 0 1 2] [--out runs/compare_search]

Runs `growth search` for each task config, controller and seed (each an ordinary run
directory under --out; a finished one is reused, an interrupted one resumed), then prints a
markdown table: the best child's validation accuracy and its test accuracy, the mean
validation accuracy per trained child, the number of children trained (a known architecture
is not trained again, so it costs nothing), and wall time. Mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TASKS = {"digits": "experiments/search_compare_digits.yaml",
         "variations (rotated background)": "experiments/search_compare_variations.yaml"}
CONTROLLERS = ("eas", "random")


def run(config: str, controller: str, seed: int, out: Path) -> Path:
    """One search (reused when finished, resumed when interrupted)."""
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


def children(out: Path) -> list[dict]:
    lines = (out / "children.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, filter(None, lines)) if r["status"] == "ok"
            and r["val_acc"] is not None]


def test_accuracy(out: Path, checkpoint: str) -> float:
    """The test accuracy of a saved child, on the run's own task."""
    from growth.campaign import labelers
    from growth.config import load_config
    from growth.data import build_stream
    from growth.graph import NetGraph
    from growth.model import Model
    from growth.strategies import Context
    from growth.train import evaluate

    cfg = load_config(out / "config.yaml")
    task = build_stream({**cfg.data.model_dump(), "seed": cfg.seed})[cfg.search.task]
    head_of, label_of = labelers(cfg.scenario)
    ctx = Context(Model(NetGraph.load(out / checkpoint)), task, [], head_of, label_of,
                  torch.device("cpu"))
    return evaluate(ctx, task, "test")


def summarise(out: Path) -> dict[str, float]:
    kids = children(out)
    best = max(kids, key=lambda r: (r["val_acc"], -r["params"]))
    metrics = json.loads((out / "search_metrics.json").read_text())
    return {"best_val": best["val_acc"], "best_test": test_accuracy(out, best["checkpoint"]),
            "mean_val": statistics.fmean(r["val_acc"] for r in kids), "trained": len(kids),
            "base_val": metrics["base"]["val_acc"], "wall": metrics["wall_time_s"]}


def fmt(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "compare_search")
    args = ap.parse_args()
    rows, last = [], []
    for task, config in TASKS.items():
        for controller in CONTROLLERS:
            got = [summarise(run(config, controller, s, args.out / Path(config).stem /
                                 f"{controller}_s{s}")) for s in args.seeds]
            col = {k: [g[k] for g in got] for k in got[0]}
            rows.append(f"| {task} | {controller} | {fmt(col['best_val'])} | "
                        f"{fmt(col['best_test'])} | {fmt(col['mean_val'])} | "
                        f"{fmt(col['trained'], 1)} | {fmt(col['base_val'])} | "
                        f"{fmt(col['wall'], 0)} |")
            key = f"{task.split()[0]}_{controller}"
            last.append(f"{key}_best={statistics.fmean(col['best_val']):.3f} "
                        f"{key}_mean={statistics.fmean(col['mean_val']):.3f}")
    print()
    print("| task | controller | best child val acc | its test acc | val acc per trained child "
          "| children trained | base val acc | wall time (s) |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print()
    print("compare_search: " + " ".join(last))


if __name__ == "__main__":
    sys.exit(main())
