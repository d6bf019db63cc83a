"""`growth compare`: configs checked up front, runs in parallel on Ray (REC's own search trials
on the same cluster), one table of mean ± std over seeds, plots, and a resumable command."""

from __future__ import annotations

import csv
import json
import math
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
    # one progress line per finished run, counting up to the total (a slow machine adds
    # "[compare] runs ..." lines with an ETA while none finishes)
    progress = [ln for ln in captured.err.splitlines()
                if ln.startswith("[") and not ln.startswith("[compare]")]
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


# ---- paired seeds, differences and task orders ------------------------------------------------
def test_paired_seeds_train_task_one_alike_across_strategies(tmp_path: Path) -> None:
    """Strategies that train the first task alike (no old task to protect yet) end it with
    the same R row for one seed: same initial network, data and batch order. Another seed
    gives another row."""
    from growth.commands.compare import run_one

    alike = ["finetune", "ewc", "mwc", "si", "mas", "l2", "lwf"]
    path = write(tmp_path, alike)
    plan = load_compare(path)
    rows: dict[tuple[str, int], list] = {}
    for name, spec in plan.runs.items():
        out = tmp_path / "out" / name
        run_one(str(plan.base), spec.overrides, str(out))
        m = json.loads((out / "metrics.json").read_text())
        rows[(spec.label, spec.seed)] = m["R"]
    for seed in (0, 1):
        first = rows[("finetune", seed)]
        for label in alike[1:]:
            assert rows[(label, seed)][0] == first[0], label  # the same initial network
            assert rows[(label, seed)][1] == first[1], label  # task 1 trained alike
    assert rows[("finetune", 0)][1] != rows[("finetune", 1)][1]
    assert rows[("ewc", 0)][2] != rows[("finetune", 0)][2]  # task 2 is where they part


def _metrics(folder: Path, name: str, label: str, seed: int, acc: float,
             tasks: list[str]) -> None:
    """A finished run's metrics.json whose final row averages to `acc`."""
    from growth.metrics import make_metrics, write_metrics

    T = len(tasks)
    R = [[0.1] * T] + [[acc] * T for _ in range(T)]
    write_metrics(folder / name, make_metrics(
        {"name": label, "strategy": label, "seed": seed, "stream": "s", "dataset": "d"},
        tasks, R, [{"task": k, "params": 10, "relative": 1.0} for k in range(T)], [1.0] * T))


def test_differences_and_order_spread_by_hand(tmp_path: Path) -> None:
    """Three seeds, two orders; ewc's ACC is finetune's plus 0.02, 0.01, 0.03 (given order) and
    0.01, 0.02, 0.03 (random-1): six pairs, mean 0.02, sd sqrt(0.0004 / 5); si's differences
    are 0.01, -0.01, 0.02, -0.02, 0.0, 0.0: not significant."""
    path = write(tmp_path, ["finetune", "ewc", {"name": "si", "reference": "ewc"}],
                 seeds=[0, 1, 2], orders=1)
    plan = load_compare(path)
    assert sorted(plan.runs)[:6] == ["ewc-s0", "ewc-s0-random-1", "ewc-s1", "ewc-s1-random-1",
                                     "ewc-s2", "ewc-s2-random-1"]
    assert "data.order=random-1" in plan.runs["si-s2-random-1"].overrides
    base = {("given", 0): 0.80, ("given", 1): 0.70, ("given", 2): 0.90,
            ("random-1", 0): 0.60, ("random-1", 1): 0.75, ("random-1", 2): 0.85}
    plus = {("given", 0): 0.02, ("given", 1): 0.01, ("given", 2): 0.03,
            ("random-1", 0): 0.01, ("random-1", 1): 0.02, ("random-1", 2): 0.03}
    si = {("given", 0): 0.01, ("given", 1): -0.01, ("given", 2): 0.02,
          ("random-1", 0): -0.02, ("random-1", 1): 0.0, ("random-1", 2): 0.0}
    out = tmp_path / "out"
    for name, spec in plan.runs.items():
        key = (spec.order, spec.seed)
        acc = {"finetune": base[key], "ewc": base[key] + plus[key],
               "si": base[key] + plus[key] + si[key]}[spec.label]
        _metrics(out, name, spec.label, spec.seed, acc, ["a", "b"] if spec.order == "given"
                 else ["b", "a"])
    from growth.commands.compare import write_comparison

    text = write_comparison(plan, out).read_text()
    rows = {r["strategy"]: r for r in csv.DictReader((out / "differences.csv").open())}
    assert set(rows) == {"ewc", "si"}
    d = rows["ewc"]
    assert d["reference"] == "finetune" and int(d["pairs"]) == 6
    assert float(d["acc_diff"]) == pytest.approx(0.02, abs=1e-12)
    sd = math.sqrt(sum((x - 0.02) ** 2 for x in plus.values()) / 5)
    half = 2.5705818366147395 * sd / math.sqrt(6)  # t(0.975, 5)
    # (the differences come back from sums of floats: equal to about 1e-15 each)
    assert float(d["low"]) == pytest.approx(0.02 - half, abs=1e-9)
    assert float(d["high"]) == pytest.approx(0.02 + half, abs=1e-9)
    assert d["significant"] == "True"
    s = rows["si"]
    assert s["reference"] == "ewc" and float(s["acc_diff"]) == pytest.approx(0.0, abs=1e-12)
    assert s["significant"] == "False"
    assert "| si | ewc | 6 | +0.0000 |" in text and text.count("n.s.") == 2  # legend + si
    # order sensitivity: per-order means over seeds, per-seed spread across orders
    orders = {r["strategy"]: r for r in csv.DictReader((out / "orders.csv").open())}
    f = orders["finetune"]
    assert float(f["acc_given"]) == pytest.approx(0.8)
    assert float(f["acc_random-1"]) == pytest.approx((0.60 + 0.75 + 0.85) / 3)
    per_seed = [abs(base[("given", k)] - base[("random-1", k)]) / math.sqrt(2) for k in range(3)]
    assert float(f["spread"]) == pytest.approx(np.mean(per_seed), abs=1e-12)
    assert float(f["range"]) == pytest.approx(0.8 - (0.60 + 0.75 + 0.85) / 3, abs=1e-12)
    assert "- random-1: b, a" in text
    assert (out / "orders.png").is_file()
    assert "Not every run finished" not in text
    # a run that did not finish (a failed one) leaves its pair out, and the table says so
    (out / "si-s1" / "metrics.json").unlink()
    text = write_comparison(plan, out).read_text()
    assert "Not every run finished" in text and "si (5 of 6)" in text
    assert "| si | ewc | 5 |" in text


def test_paired_differences_from_a_folder_against_a_named_reference(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Final rows by hand, seeds 0-2 (2 tasks: ACC the final row's mean, BWT its first entry
    minus 0.9, the first task's accuracy when learned). Against si: ewc's ACC differs by
    +0.02, +0.04, +0.06 (mean 0.04, sd 0.02), its BWT by +0.1, 0, +0.2 (mean 0.1, sd 0.1);
    finetune's seed 2 never ran, so finetune has two pairs."""
    from growth.commands.compare import differences_table, paired_differences
    from growth.errors import GrowthError
    from growth.metrics import make_metrics, write_metrics

    path = write(tmp_path, ["finetune", "ewc", {"name": "si", "reference": "ewc"}],
                 seeds=[0, 1, 2])
    final = {("si", 0): [0.80, 0.90], ("si", 1): [0.70, 0.90], ("si", 2): [0.60, 0.90],
             ("ewc", 0): [0.90, 0.84], ("ewc", 1): [0.70, 0.98], ("ewc", 2): [0.80, 0.82],
             ("finetune", 0): [0.50, 0.90], ("finetune", 1): [0.60, 0.90]}
    out = tmp_path / "out"
    for (label, seed), row in final.items():
        write_metrics(out / f"{label}-s{seed}", make_metrics(
            {"name": label, "strategy": label, "seed": seed}, ["a", "b"],
            [[0.1, 0.1], [0.9, 0.1], row], [{"task": k, "params": 10, "relative": 1.0}
                                             for k in range(2)], [1.0, 1.0]))
    t2 = 4.302652729911275  # t(0.975, 2)
    diffs = paired_differences(path, out, reference="si")
    assert set(diffs) == {"finetune", "ewc"}  # every label against si; si has no entry
    ref, d = diffs["ewc"]
    assert ref == "si" and d is not None and d.n == 3
    assert d.diff == pytest.approx(0.04, abs=1e-12)
    assert (d.low, d.high) == pytest.approx((0.04 - t2 * 0.02 / math.sqrt(3),
                                             0.04 + t2 * 0.02 / math.sqrt(3)), abs=1e-9)
    assert diffs["finetune"][1] is not None and diffs["finetune"][1].n == 2
    assert diffs["finetune"][1].diff == pytest.approx(-0.10, abs=1e-12)  # -0.15, -0.05
    bwt = paired_differences(path, out, reference="si", metric="bwt")["ewc"][1]
    assert bwt is not None and bwt.diff == pytest.approx(0.1, abs=1e-12)
    assert bwt.high == pytest.approx(0.1 + t2 * 0.1 / math.sqrt(3), abs=1e-9)
    # without a named reference, the config's: si against ewc, the others against finetune
    own = paired_differences(path, out)
    assert {k: v[0] for k, v in own.items()} == {"ewc": "finetune", "si": "ewc"}
    assert own["si"][1] is not None and own["si"][1].diff == pytest.approx(-0.04, abs=1e-12)
    assert "| ewc | si | 3 | +0.0400 |" in differences_table(diffs)
    with pytest.raises(ConfigError, match="reference 'nosuch' is not a label.*finetune, ewc"):
        paired_differences(path, out, reference="nosuch")
    with pytest.raises(ConfigError, match="metric 'size'"):
        paired_differences(path, out, metric="size")
    with pytest.raises(GrowthError, match="no such comparison folder"):
        paired_differences(path, tmp_path / "elsewhere")
    # the command: the tables from the runs there, nothing run (finetune-s2 stays missing)
    assert main(["compare", str(path), "--out", str(out), "--reference", "si",
                 "--tables-only"]) == 0
    printed = capsys.readouterr().out
    assert "| ewc | si | 3 | +0.0400 |" in printed and "| finetune | si | 2 | -0.1000 |" in printed
    assert not (out / "finetune-s2").exists()
    rows = {r["strategy"]: r for r in csv.DictReader((out / "differences.csv").open())}
    assert rows["ewc"]["reference"] == "si"
    assert main(["compare", str(path), "--out", str(tmp_path / "none"), "--tables-only"]) == 2
    assert "no such comparison folder" in capsys.readouterr().err


def _run_plan(tmp_path: Path, seeds: list[int]) -> tuple[object, Path]:
    """A comparison's runs, each run in this process (no Ray), then its table."""
    from growth.commands.compare import run_one, write_comparison

    path = write(tmp_path, ["finetune"], seeds=seeds)
    plan = load_compare(path)
    out = tmp_path / "out"
    for name, spec in plan.runs.items():
        run_one(str(plan.base), spec.overrides, str(out / name))
    write_comparison(plan, out)
    return plan, out


def test_a_row_of_one_run_shows_its_values_without_a_spread(tmp_path: Path) -> None:
    _, out = _run_plan(tmp_path, [0])
    acc = json.loads((out / "finetune-s0" / "metrics.json").read_text())["acc"]
    row = next(ln for ln in (out / "compare.md").read_text().splitlines()
               if ln.startswith("| finetune |"))
    assert "±" not in row and f"| {acc:.4f} |" in row
    csv_row = next(csv.DictReader((out / "compare.csv").open()))
    assert float(csv_row["acc_mean"]) == pytest.approx(acc) and csv_row["acc_std"] == ""


def test_the_watch_counts_runs_and_times_the_rest_from_the_pace(tmp_path: Path) -> None:
    import io

    from growth.commands.watch import RunsWatch
    from growth.metrics import read_metrics, write_metrics

    _, out = _run_plan(tmp_path, [0])
    finished = read_metrics(out / "finetune-s0")  # 2 of 2 tasks
    now = [0.0]
    names = ["a", "b", "c"]
    printed = io.StringIO()
    watch = RunsWatch(out, names, clock=lambda: now[0], out=printed)  # nothing there yet
    write_metrics(out / "a", finished)
    half = {**finished, "finished_tasks": 1}
    write_metrics(out / "b", half)
    (out / "b" / ".lock").write_text("4242\n")  # b's writer holds the lock
    (out / "c").mkdir()
    (out / "c" / ".lock").write_text("")  # c: a lock released (emptied), nothing running
    watch.done("a")
    now[0] = 100.0
    status = watch.status()
    assert (status.done, status.running, status.waiting) == (1, 1, 1)
    assert status.fraction == pytest.approx((1 + 0.5 + 0) / 3)
    assert status.eta_s == pytest.approx(100.0)  # half done in 100 s: 100 s to go
    watch.report()
    watch.report()  # unchanged: printed once
    assert printed.getvalue() == ("[compare] runs 1/3 done, 1 running, 1 waiting; 50% of "
                                  "tasks; ETA 1m40s\n")


def _fabricated(acc: float, size: float, wall: list[float], finished: int = 2,
                children: int | None = None) -> dict:
    """A run's metrics.json as a campaign writes it, with chosen figures (two tasks)."""
    return {"run": {"name": "tiny"}, "tasks": ["t0", "t1"],
            "R": [[0.1, 0.1], [0.9, 0.1], [0.5, 0.8]],
            "finished_tasks": finished, "acc": acc, "bwt": -0.4, "fwt": None,
            "sizes": [{"relative": 1.0, "relative_bytes": 1.0},
                      {"relative": size, "relative_bytes": 2 * size}],
            "wall_time_s": wall,
            "search": None if children is None else {"children": children,
                                                     "child_time_s": 1.5 * children}}


def test_the_table_gives_mean_and_sample_std_over_the_finished_runs(tmp_path: Path) -> None:
    """Fabricated runs (no training): each row holds the finished runs of its strategy, mean
    and sample std (n - 1) of each figure, skipping what a run did not measure."""
    from growth.commands.compare import write_comparison

    plan = load_compare(write(tmp_path, ["finetune", {"name": "rec", "label": "r"}],
                              seeds=[0, 1, 2]))
    out = tmp_path / "out"
    runs = {"finetune-s0": _fabricated(0.50, 1.0, [1.0, 2.0]),
            "finetune-s1": _fabricated(0.60, 1.0, [2.0, 2.0]),
            "finetune-s2": _fabricated(0.90, 1.0, [3.0, 3.0]),
            "r-s0": _fabricated(0.70, 1.2, [4.0, 6.0], children=2),
            "r-s1": _fabricated(0.80, 1.6, [5.0, 5.0], children=4),
            "r-s2": _fabricated(0.10, 9.0, [1.0], finished=1, children=9)}  # unfinished
    for name, m in runs.items():
        (out / name).mkdir(parents=True)
        (out / name / "metrics.json").write_text(json.dumps(m))
    write_comparison(plan, out)
    rows = {r["strategy"]: r for r in csv.DictReader((out / "compare.csv").open())}
    # finetune: acc 0.5, 0.6, 0.9: mean 2/3, squared deviations sum 0.08667 / 2
    assert float(rows["finetune"]["runs"]) == 3
    assert float(rows["finetune"]["acc_mean"]) == pytest.approx(2 / 3)
    assert float(rows["finetune"]["acc_std"]) == pytest.approx((0.26 / 3 / 2) ** 0.5)
    assert float(rows["finetune"]["wall_time_s_mean"]) == pytest.approx(13 / 3)
    assert float(rows["finetune"]["wall_time_s_std"]) == pytest.approx((14 / 3 / 2) ** 0.5)
    assert float(rows["finetune"]["size_relative_std"]) == 0.0
    assert rows["finetune"]["fwt_mean"] == rows["finetune"]["children_mean"] == ""
    # r: the unfinished run is left out; two runs: the std is |a - b| / sqrt(2)
    assert float(rows["r"]["runs"]) == 2
    assert float(rows["r"]["acc_std"]) == pytest.approx(0.1 / 2 ** 0.5)
    assert float(rows["r"]["size_relative_mean"]) == pytest.approx(1.4)
    assert float(rows["r"]["bytes_relative_std"]) == pytest.approx(0.8 / 2 ** 0.5)
    assert float(rows["r"]["children_mean"]) == 3.0
    assert float(rows["r"]["child_time_s_std"]) == pytest.approx(3.0 / 2 ** 0.5)
    md = (out / "compare.md").read_text()
    assert f"| finetune | 3 | 0.6667 ± {(0.26 / 6) ** 0.5:.4f} |" in md
    assert "| r | 2 | 0.7500 ± 0.0707 |" in md
