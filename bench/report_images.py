"""Make the report images shown in the README (docs/images/) from real runs.

    python bench/report_images.py            # runs under runs/report-images, images to docs/images

Runs the quickstart config with finetune, EWC, MWC and PackNet over seeds 0, 1, 2, plus MWC
with 2 epochs per task (a group whose config differs), then `growth report` of all of them
and of one MWC run, and copies the PNGs. A finished run is reused, a killed one resumed. The
last line lists the images written.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from growth.campaign import Campaign, latest_checkpoint, resume_run
from growth.config import load_config
from growth.metrics import read_metrics
from growth.report import write_report

RUNS = [(s, seed, []) for s in ("finetune", "ewc", "mwc", "packnet") for seed in (0, 1, 2)] + [
    ("mwc", seed, ["train.epochs=2"]) for seed in (0, 1, 2)]


def run_one(config: str, strategy: str, seed: int, extra: list[str], out: Path) -> Path:
    if (out / "metrics.json").is_file():
        m = read_metrics(out)
        if m["finished_tasks"] == len(m["tasks"]):
            return out
    if latest_checkpoint(out) is not None:
        resume_run(out)
        return out
    sets = [f"strategy={{name: {strategy}}}", f"seed={seed}", f"name={strategy}-s{seed}", *extra]
    Campaign(load_config(config, sets), out).start()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="experiments/quickstart.yaml")
    ap.add_argument("--out", default="runs/report-images")
    ap.add_argument("--images", default="docs/images")
    args = ap.parse_args()
    root, images = Path(args.out), Path(args.images)
    dirs = []
    for strategy, seed, extra in RUNS:
        tag = f"{strategy}-s{seed}" + ("-e2" if extra else "")
        dirs.append(run_one(args.config, strategy, seed, extra, root / tag))
        m = read_metrics(dirs[-1])
        print(f"{tag:14s} ACC {m['acc']:.4f} BWT {m['bwt']:.4f}", flush=True)
    compare = write_report(dirs, root / "report").parent
    single = write_report([root / "mwc-s0"], root / "report-mwc-s0").parent
    images.mkdir(parents=True, exist_ok=True)
    written = []
    for src, name in [(compare / "average_accuracy.png", "compare_average_accuracy.png"),
                      (compare / "acc.png", "compare_acc.png"),
                      (compare / "bwt.png", "compare_bwt.png"),
                      (compare / "model_size.png", "compare_model_size.png"),
                      (single / "accuracy_curves.png", "run_accuracy_curves.png")]:
        shutil.copyfile(src, images / name)
        written.append(str(images / name))
    print(f"report: {compare / 'report.md'}")
    print("images: " + " ".join(written))


if __name__ == "__main__":
    main()
