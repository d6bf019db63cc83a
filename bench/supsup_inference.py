"""SupSup's task inference on finished class-incremental runs: how often the one-shot entropy
gradient finds an input's task, against the mask whose own output has the lowest entropy (k
forward passes instead of one), and the accuracy with the task given.

Run by hand (never a test), after the comparison:
    growth compare experiments/compare/masks_split_digits_class.yaml --out runs/masks_class
    python bench/supsup_inference.py runs/masks_class/supsup-infer-example-s*

Reads each run's last checkpoint and its tasks' test splits; prints one line per run and the
mean ± std over runs. Last line: `supsup inference: one_shot=R lowest_entropy=R given=ACC`.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from growth.campaign import Campaign, latest_checkpoint, run_config_of
from growth.checkpoint import read_checkpoint
from growth.model import Model
from growth.regularizers import stored
from growth.rundir import read_run_id
from growth.strategies.supsup import infer_task


def rates(run: Path) -> tuple[float, float, float]:
    """(one-shot inference rate, lowest-entropy inference rate, accuracy with the task given)
    over every test input of the run's tasks."""
    campaign = Campaign(run_config_of(run), run)
    path = latest_checkpoint(run)
    assert path is not None, f"{run} has no checkpoint"
    ckpt = read_checkpoint(path, read_run_id(run), len(campaign.tasks), campaign.strategy)
    model = Model(ckpt.graph)
    model.eval()
    strategy = campaign.strategy
    strategy.load_state_dict(ckpt.tensors, ckpt.extra)
    head = model.head(campaign.head_of(campaign.tasks[0]))
    params = model.named_parameters()
    learned = strategy.finished()
    names = list(stored(strategy.state, "mask", learned[0]))
    weights = {n: params[n].detach() for n in names}
    masks = {n: torch.stack([strategy.state[f"mask/{k}/{n}"] for k in learned]).float()
             for n in names}
    one_shot = lowest = given = total = 0
    with torch.no_grad():
        for task in campaign.tasks:
            x, y = task.test
            entropies = []
            for k in learned:
                logits = torch.func.functional_call(head, {n: weights[n] * masks[n][k]
                                                           for n in names}, (x,))
                logp = F.log_softmax(logits, 1)
                entropies.append(-(logp.exp() * logp).sum(1))
                if k == task.index:
                    given += int((logits.argmax(1) == campaign.label_of(task, y)).sum())
            picked = infer_task(head, weights, masks, x, per_example=True)
            one_shot += int((picked == task.index).sum())
            lowest += int((torch.stack(entropies, 1).argmin(1) == task.index).sum())
            total += len(y)
    return one_shot / total, lowest / total, given / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="finished SupSup run directories")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for run in args.runs:
        rows.append(rates(run))
        print(f"{run}: one-shot {rows[-1][0]:.3f}, lowest entropy {rows[-1][1]:.3f}, "
              f"task given {rows[-1][2]:.3f}", flush=True)

    def agg(i: int) -> str:
        values = [r[i] for r in rows]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f}±{spread:.3f}"

    print(f"supsup inference: one_shot={agg(0)} lowest_entropy={agg(1)} given={agg(2)}")


if __name__ == "__main__":
    main()
