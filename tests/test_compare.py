"""`growth compare`: configs checked up front, runs in parallel on Ray (REC's own search trials
on the same cluster), one table of mean ± std over seeds, plots, and a resumable command."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from growth.cli import main
from growth.commands.compare import load_compare, run_compare
from growth.errors import ConfigError

BASE = {
    "name": "tiny", "seed": 0, "threads": 1,
    "data": {"dataset": "digits", "stream": "permuted", "n_tasks": 2,
             "max_train_per_task": 200},
    "model": {"kind": "mlp", "hidden": [16]},
    "train": {"epochs": 1, "batch_size": 32, "lr": 0.05},
    "strategy": {"name": "finetune"},
}
REC = {"name": "rec", "compress": {"epochs": 1},
       "search": {"controller": "random", "children": 2, "epochs": 1,
                  "controller_params": {"wider_actions": 1, "deeper_actions": 0},
                  "space": {"widths": {"fc": [16, 24]}}}}


def write(tmp: Path, strategies: list, **extra: object) -> Path:
    (tmp / "base.yaml").write_text(yaml.safe_dump(BASE))
    cfg = {"name": "cmp", "base": "base.yaml", "seeds": [0, 1], "strategies": strategies,
           **extra}
    path = tmp / "compare.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("strategies, extra, words", [
    (["ewc", "ewc"], {}, "'ewc' appears twice; give one a `label`"),
    (["ewc", {"name": "nosuch"}], {}, "unknown strategy 'nosuch'"),
    (["ewc", {"name": "ewc", "label": "e2", "lambda": -1}], {}, "strategy.lambda"),
    (["ewc"], {"seedz": [1]}, "seedz"),
    ([], {}, "strategies"),
])
def test_comparison_configs_are_checked_before_anything_runs(tmp_path: Path, strategies: list,
                                                             extra: dict, words: str) -> None:
    path = write(tmp_path, strategies, **extra)
    with pytest.raises(ConfigError, match="compare.yaml|--set") as err:
        load_compare(path)
    assert words in str(err.value)
    assert not (tmp_path / "runs").exists()


def test_plan_names_one_run_per_strategy_and_seed(tmp_path: Path) -> None:
    plan = load_compare(write(tmp_path, ["finetune", {"name": "rec", "label": "r0",
                                                      "search": "off"}]))
    assert list(plan.runs) == ["finetune-s0", "finetune-s1", "r0-s0", "r0-s1"]
    spec = plan.runs["r0-s1"]
    assert spec.label == "r0" and spec.seed == 1 and "seed=1" in spec.overrides
    assert spec.order == "given" and not any(o.startswith("data.order") for o in spec.overrides)


@pytest.mark.slow
def test_compare_runs_in_parallel_and_tabulates(tmp_path: Path, ray_session: object,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, ["finetune", REC])
    out = tmp_path / "out"
    assert main(["compare", str(path), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    # one progress line per finished run, counting up to the total
    progress = [ln for ln in captured.err.splitlines() if ln.startswith("[")]
    assert sorted(ln.split("]")[0] for ln in progress) == ["[1/4", "[2/4", "[3/4", "[4/4"]
    runs = {p.name: json.loads((p / "metrics.json").read_text())
            for p in out.iterdir() if (p / "metrics.json").is_file()}
    assert sorted(runs) == ["finetune-s0", "finetune-s1", "rec-s0", "rec-s1"]
    rows = {r["strategy"]: r for r in csv.DictReader((out / "compare.csv").open())}
    for label in ("finetune", "rec"):
        accs = [runs[f"{label}-s{s}"]["acc"] for s in (0, 1)]
        assert float(rows[label]["acc_mean"]) == pytest.approx(np.mean(accs))
        assert float(rows[label]["acc_std"]) == pytest.approx(np.std(accs, ddof=1))
        sizes = [runs[f"{label}-s{s}"]["sizes"][-1]["relative"] for s in (0, 1)]
        assert float(rows[label]["size_relative_mean"]) == pytest.approx(np.mean(sizes))
        nbytes = [runs[f"{label}-s{s}"]["sizes"][-1]["relative_bytes"] for s in (0, 1)]
        assert float(rows[label]["bytes_relative_mean"]) == pytest.approx(np.mean(nbytes))
    rec_children = [runs[f"rec-s{s}"]["search"]["children"] for s in (0, 1)]
    assert float(rows["rec"]["children_mean"]) == pytest.approx(np.mean(rec_children))
    assert min(rec_children) > 0
    assert float(rows["finetune"]["children_mean"]) == 0
    for name in ("compare.md", "accuracy.png", "size.png", "acc_vs_size.png"):
        assert (out / name).is_file(), name
    assert "| rec | 2 |" in printed and "| finetune | 2 |" in printed
    # the command is resumable: finished runs are reused, not trained again
    def stamps() -> dict[str, list[int]]:
        return {n: sorted(p.stat().st_mtime_ns for p in (out / n / "checkpoints").rglob("*"))
                for n in runs}

    before = stamps()
    run_compare(path, out)
    assert stamps() == before
