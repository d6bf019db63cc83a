"""`growth tune`: the plan of trials, configs checked up front, trials scored on validation data
with the test splits never read, presets written and used by `growth compare`, and a tune
resumed after a kill that chooses what an uninterrupted one chooses."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from growth.cli import main
from growth.commands.compare import load_compare
from growth.commands.presets import Preset, write_preset
from growth.commands.tune import (
    TuneRun,
    make_plan,
    read_records,
    run_trial,
    trial_configs,
    tune_config,
)
from growth.config import TuneConfig, load_config
from growth.errors import ConfigError
from growth.graph import NetGraph

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "name": "tiny-tune", "seed": 0, "threads": 1,
    "data": {"dataset": "digits", "stream": "permuted", "n_tasks": 2,
             "max_train_per_task": 200},
    "model": {"kind": "mlp", "hidden": [16]},
    "train": {"epochs": 2, "batch_size": 32, "lr": 0.05},
    "strategy": {"name": "ewc"},
    "tune": {"space": {"strategy.lambda": {"grid": [1.0, 1000.0, 1.0e6]}}, "seeds": [0, 1]},
}


def write(tmp: Path, **tune: Any) -> Path:
    cfg = json.loads(json.dumps(TINY))
    cfg["tune"].update(tune)
    path = tmp / "tune.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ---- the plan ---------------------------------------------------------------------------------
def test_the_plan_starts_with_the_default_then_every_grid_point() -> None:
    tune = TuneConfig.model_validate({"space": {"strategy.lambda": {"grid": [1, 50, 9]},
                                                "strategy.mode": {"grid": ["separate",
                                                                           "online"]}}})
    plan = make_plan(tune, {"strategy.lambda": 50, "strategy.mode": "separate"})
    assert [t.id for t in plan] == [f"t{i:03d}" for i in range(6)]
    assert plan[0].default and plan[0].setting == {"strategy.lambda": 50,
                                                   "strategy.mode": "separate"}
    # the grid's six points less the one equal to the default, in product order
    assert [tuple(t.setting.values()) for t in plan[1:]] == [
        (1, "separate"), (1, "online"), (50, "online"), (9, "separate"), (9, "online")]


def test_drawn_settings_are_reproducible_and_in_range() -> None:
    space = {"strategy.lambda": {"loguniform": [1.0, 1.0e4]},
             "strategy.gamma": {"uniform": [0.5, 1.0]},
             "strategy.fisher_samples": {"uniform": [10, 100], "integer": True}}
    tune = TuneConfig.model_validate({"space": space, "trials": 6, "sample_seed": 3})
    default = {"strategy.lambda": 50.0, "strategy.gamma": 1.0, "strategy.fisher_samples": 1000}
    plan = make_plan(tune, default)
    assert len(plan) == 7 and plan[0].setting == default
    assert [t.setting for t in make_plan(tune, default)] == [t.setting for t in plan]
    other = make_plan(tune.model_copy(update={"sample_seed": 4}), default)
    assert [t.setting for t in other[1:]] != [t.setting for t in plan[1:]]
    lams = [t.setting["strategy.lambda"] for t in plan[1:]]
    assert all(1.0 <= v <= 1.0e4 for v in lams)
    assert all(float(f"{v:.4g}") == v for v in lams)  # four significant digits
    assert max(lams) / min(lams) > 10  # drawn on a log scale, spread over decades
    assert all(isinstance(t.setting["strategy.fisher_samples"], int) for t in plan[1:])
    # a longer plan begins with the shorter one's trials
    longer = make_plan(tune.model_copy(update={"trials": 9}), default)
    assert [t.setting for t in longer[:7]] == [t.setting for t in plan]


@pytest.mark.parametrize("space, words", [
    ({"data.n_tasks": {"grid": [2, 3]}}, "only keys under strategy., train. and model."),
    ({"strategy.name": {"grid": ["ewc", "si"]}}, "only keys under"),
    ({"strategy.lamda": {"grid": [1.0]}}, "not a key of this config"),
    ({"strategy.lambda": {"grid": [-1.0]}}, "trial t001"),
])
def test_a_space_that_names_no_setting_is_refused_before_anything_runs(
        tmp_path: Path, space: dict, words: str) -> None:
    path = tmp_path / "t.yaml"
    cfg = json.loads(json.dumps(TINY))
    cfg["tune"]["space"] = space
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=str(path)) as err:
        tune_config(path, tmp_path / "out")
    assert words in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tune, words", [
    ({"space": {"strategy.lambda": {"grid": [1], "uniform": [1, 2]}}}, "exactly one"),
    ({"space": {"strategy.lambda": {"loguniform": [0, 2]}}}, "low > 0"),
    ({"space": {"strategy.lambda": {"uniform": [3, 2]}}}, "low < high"),
    ({"space": {"strategy.lambda": {"grid": [1]}}, "protocol": "first_tasks"},
     "first_tasks: k"),
    ({"space": {"strategy.lambda": {"grid": [1]}}, "grace_tasks": 2}, "scheduler: asha"),
    ({"space": {}}, "tune.space"),
])
def test_tune_sections_are_checked(tmp_path: Path, tune: dict, words: str) -> None:
    cfg = json.loads(json.dumps(TINY))
    cfg["tune"] = tune
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="t.yaml") as err:
        load_config(path)
    assert words in str(err.value)


@pytest.mark.parametrize("tune", [
    {"scheduler": "fifo"},
    {"scheduler": "asha", "grace_tasks": 2, "protocol": "first_tasks", "first_tasks": 2},
    {"space": {"strategy.lambda": {"loguniform": [1, 10], "integer": True}}},
])
def test_a_tune_config_as_written_to_its_run_directory_reads_back(tmp_path: Path,
                                                                  tune: dict) -> None:
    """`growth resume` reads the run's config.yaml: what the run wrote must validate again and
    mean the same."""
    from growth.config import dump_config, parse_yaml, validate_config

    cfg = load_config(write(tmp_path, **tune))
    again = validate_config(parse_yaml(dump_config(cfg), "config.yaml"), "config.yaml")
    assert again.tune == cfg.tune


def test_growth_run_refuses_a_tune_config(tmp_path: Path, capsys: pytest.CaptureFixture
                                          ) -> None:
    assert main(["run", str(write(tmp_path)), "--out", str(tmp_path / "r")]) == 2
    assert "run `growth tune` on it" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# ---- one trial: validation data only -----------------------------------------------------------
class _Sealed(tuple):
    """A test split that raises when anything reads it."""

    def __iter__(self):
        raise AssertionError("a test split was read during tuning")

    def __getitem__(self, i):
        raise AssertionError("a test split was read during tuning")

    def __len__(self):
        raise AssertionError("a test split was read during tuning")


def _val_accuracy(folder: Path, task: Any, head: str) -> float:
    """A saved network's accuracy on a task's validation split, computed here."""
    from growth.compile import compile_graph

    net = compile_graph(NetGraph.load(folder), head=head).eval()
    x, y = task.val
    with torch.no_grad():
        return float((net(x).argmax(1) == y).double().mean())


def test_a_trial_never_reads_a_test_split_and_scores_validation_acc(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every task the trial's campaigns build has a test split that raises when read; the trial
    still finishes, and its score is the mean over seeds of the validation ACC, measured here
    on the saved networks."""
    import growth.campaign as campaign_module
    from growth.data import build_stream

    built: list[int] = []

    def sealed_stream(spec: dict) -> list:
        tasks = build_stream(spec)
        built.append(len(tasks))
        for t in tasks:
            object.__setattr__(t, "test", _Sealed())
        return tasks

    monkeypatch.setattr(campaign_module, "build_stream", sealed_stream)
    cfg = load_config(write(tmp_path))
    run = TuneRun(cfg, tmp_path / "out", str(tmp_path / "tune.yaml"))
    trial = run.plan()[2]  # lambda 1000
    spec = {"id": trial.id, "tasks": 2,
            "runs": trial_configs(cfg, trial, tmp_path / "out" / "trials", "tune.yaml")}
    reports: list[dict] = []
    result = run_trial(spec, reports.append)
    assert result["status"] == "ok", result["error"]
    assert built == [2, 2]  # both seeds' campaigns went through the sealed stream
    assert [r["tasks_done"] for r in reports] == [1, 2, 3, 4, 4]
    assert reports[-1] == result and result["final"]
    expected = {}
    for seed in (0, 1):
        folder = tmp_path / "out" / "trials" / trial.id / f"s{seed}"
        tasks = build_stream({**cfg.data.model_dump(), "seed": seed})
        last = folder / "checkpoints" / "task_001" / "graph"
        accs = [_val_accuracy(last, t, f"t{t.index}") for t in tasks]
        expected[str(seed)] = float(np.mean(accs))
        m = json.loads((folder / "metrics.json").read_text())
        assert m["run"]["evaluated_on"] == "val"
        assert m["R"][2] == pytest.approx(accs, abs=1e-12)
        # the running score after the first task: that task's validation accuracy
    assert result["seed_scores"] == pytest.approx(expected, abs=1e-12)
    assert result["score"] == pytest.approx(np.mean(list(expected.values())), abs=1e-12)
    first = json.loads((tmp_path / "out" / "trials" / trial.id / "s0" / "metrics.json")
                       .read_text())
    assert reports[0]["score"] == pytest.approx(first["R"][1][0])
    assert reports[1]["score"] == pytest.approx(np.mean(first["R"][2][:2]))


def test_a_rec_trial_finishes_on_validation_data(tmp_path: Path) -> None:
    """REC measures its network on the task's splits around the compression; in a trial the
    test splits are empty, so it measures the validation split only (a NaN for the empty test
    split stopped every REC trial when the metrics were written)."""
    rec = {"name": "rec", "compress": {"epochs": 1},
           "search": {"controller": "random", "children": 2, "epochs": 1, "backend": "local",
                      "controller_params": {"wider_actions": 1, "deeper_actions": 0},
                      "space": {"widths": {"fc": [16, 24]}}}}
    path = write(tmp_path, space={"strategy.lambda": {"grid": [10.0]}}, seeds=[0])
    raw = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**raw, "strategy": rec}))
    cfg = load_config(path)
    trial = TuneRun(cfg, tmp_path / "out", str(path)).plan()[1]
    spec = {"id": trial.id, "tasks": 2,
            "runs": trial_configs(cfg, trial, tmp_path / "out" / "trials", "tune.yaml")}
    result = run_trial(spec, lambda m: None)
    assert result["status"] == "ok", result["error"]
    m = json.loads((tmp_path / "out" / "trials" / trial.id / "s0" / "metrics.json").read_text())

    def measured(node: Any) -> list[dict]:  # every accuracy_before/after the run recorded
        if isinstance(node, dict):
            own = [v for k, v in node.items() if k in ("accuracy_before", "accuracy_after")]
            return own + [x for v in node.values() for x in measured(v)]
        return [x for v in node for x in measured(v)] if isinstance(node, list) else []

    assert all(set(acc) == {"val"} for acc in measured(m))
    assert result["score"] == pytest.approx(float(np.mean(m["R"][2])), abs=1e-12)


def test_a_diverging_setting_is_a_failed_trial_not_an_error(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path))
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": 1.0e30})})
    run = TuneRun(cfg, tmp_path / "out", "tune.yaml")
    trial = run.plan()[0]
    spec = {"id": trial.id, "tasks": 2,
            "runs": trial_configs(cfg, trial, tmp_path / "out" / "trials", "tune.yaml")}
    result = run_trial(spec, lambda m: None)
    assert result["status"] == "failed" and "Diverged" in result["error"]


def test_first_tasks_protocol_learns_only_the_first_k(tmp_path: Path) -> None:
    cfg = json.loads(json.dumps(TINY))
    cfg["data"].update(stream="split", n_tasks=5)
    cfg["data"]["order"] = "hard_first"
    cfg["tune"].update(protocol="first_tasks", first_tasks=2, seeds=[4])
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(cfg))
    loaded = load_config(path)
    run = TuneRun(loaded, tmp_path / "out", str(path))
    runs = trial_configs(loaded, run.plan()[0], tmp_path / "out" / "trials", str(path))
    from growth.data import build_stream, resolve_order

    tasks = build_stream({**loaded.data.model_dump(), "order": None, "seed": 4})
    assert runs[0]["config"]["data"]["order"] == resolve_order(tasks, "hard_first")[:2]
    assert runs[0]["config"]["evaluate_on"] == "val" and runs[0]["config"]["seed"] == 4


# ---- presets ----------------------------------------------------------------------------------
def test_compare_takes_each_strategy_settings_from_its_preset(tmp_path: Path) -> None:
    base = {k: v for k, v in TINY.items() if k != "tune"}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    presets = tmp_path / "presets"
    write_preset(presets, "ewc-digits-permuted-task.yaml",
                 Preset(strategy={"name": "ewc", "lambda": 3000.0, "mode": "online"},
                        set=["train.lr=0.02"]), ["a header"])
    cmp = {"name": "c", "base": "base.yaml", "seeds": [0, 1], "presets": "presets",
           "strategies": ["finetune", "ewc",
                          {"name": "ewc", "label": "ewc-tuned", "settings": "presets",
                           "reference": "ewc"},
                          {"name": "ewc", "label": "ewc-tuned-own", "settings": "presets",
                           "mode": "separate"}]}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cmp))
    plan = load_compare(path)
    assert plan.settings["ewc"] == {"name": "ewc"}
    assert plan.settings["ewc-tuned"] == {"name": "ewc", "lambda": 3000.0, "mode": "online"}
    assert plan.settings["ewc-tuned-own"]["mode"] == "separate"  # the entry's own key wins
    assert "train.lr=0.02" in plan.runs["ewc-tuned-s1"].overrides
    assert "train.lr=0.02" not in plan.runs["ewc-s1"].overrides
    assert plan.reference_of == {"ewc": "finetune", "ewc-tuned": "ewc",
                                 "ewc-tuned-own": "finetune"}
    run_cfg = load_config(plan.base, plan.runs["ewc-tuned-s0"].overrides)
    assert run_cfg.strategy.settings() == {"lambda": 3000.0, "mode": "online"}
    assert run_cfg.train.lr == 0.02
    # every strategy from presets: finetune has no settings and needs none; si has no preset
    cmp.update(settings="presets", strategies=["finetune", "ewc", "si"])
    path.write_text(yaml.safe_dump(cmp))
    with pytest.raises(ConfigError, match="si-digits-permuted-task.yaml"):
        load_compare(path)


def test_shipped_presets_match_their_tune_configs() -> None:
    """Every preset in experiments/presets names the command that made it, is named for its
    config's strategy and stream, and holds a value for every key its config tunes."""
    from growth.commands.presets import preset_name, read_preset

    files = sorted((ROOT / "experiments" / "presets").glob("*.yaml"))
    assert files
    for path in files:
        made = next(ln for ln in path.read_text().splitlines() if ln.startswith("# Made by: "))
        words = made.split()
        assert words[3:5] == ["growth", "tune"], path
        preset = read_preset(path)
        assert words[5] == preset.tuned["config"], path
        cfg = load_config(ROOT / preset.tuned["config"])
        assert cfg.tune is not None and cfg.strategy.name == preset.strategy["name"], path
        assert path.name == preset_name(cfg.strategy.name, cfg)
        values = {f"strategy.{k}" for k in preset.strategy} | {s.split("=")[0]
                                                              for s in preset.set}
        assert set(cfg.tune.space) <= values, path


# ---- a whole tune, killed and resumed ---------------------------------------------------------
@pytest.mark.slow
def test_a_tune_resumed_after_a_kill_chooses_the_same_setting(tmp_path: Path,
                                                              ray_session: Any) -> None:
    """SIGKILL `growth tune` once its first trial is recorded; `growth resume` keeps that
    record, runs the rest, and ends with every score and the choice of an uninterrupted run."""
    cfg = write(tmp_path, concurrency=1, presets="presets")
    reference = tune_config(cfg, tmp_path / "reference")
    ref = read_records(tmp_path / "reference" / "trials.jsonl")
    # lambda 1e6 makes the loss NaN: a failed trial, recorded like the others
    assert [ref[t].status for t in sorted(ref)] == ["ok", "ok", "ok", "failed"]

    run = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "growth.cli", "tune", str(cfg), "--out",
                             str(run), "--ray-address", ray_session.address, "--quiet"],
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    records = run / "trials.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if read_records(records):
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()[0]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = records.read_text().splitlines()
    assert 1 <= len(before) < 4, "the kill came after the last trial"

    assert main(["resume", str(run), "--ray-address", ray_session.address, "--quiet"]) == 0
    after = records.read_text().splitlines()
    assert after[:len(before)] == before  # recorded trials kept as they were
    final = read_records(records)
    assert sorted(final) == sorted(ref)  # every trial once
    for key, r in ref.items():
        assert (final[key].setting, final[key].score, final[key].seed_scores) == \
            (r.setting, r.score, r.seed_scores), key
    summary = json.loads(json.dumps(reference))
    chosen = yaml.safe_load((run / "preset.yaml").read_text())
    assert chosen["strategy"]["lambda"] == summary["best"]["setting"]["strategy.lambda"]
    assert chosen["tuned"]["trial"] == summary["best"]["id"]
    assert chosen["tuned"]["config"] == str(cfg)  # the file it was started from
    # the preset written into the config's presets folder is the run directory's
    assert (tmp_path / "presets" / "ewc-digits-permuted-task.yaml").is_file()
    # the best is the highest score, the earlier trial on a tie
    ok = [final[t] for t in sorted(final) if final[t].status == "ok"]
    top = max(r.score for r in ok)
    assert summary["best"]["id"] == next(r.id for r in ok if r.score >= top - 1e-9)
    assert math.isfinite(summary["default"]["score"])
    for name in ("tune.md", "tune.csv", "tune_scores.png"):
        assert (run / name).is_file()


# ---- the report -------------------------------------------------------------------------------
def test_the_report_ranks_trials_and_plots_each_score_against_each_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Four trials by hand: t000 (the config's own, 0.80), t001 (0.90, the best), t002 failed,
    t003 never ran. The table lists them best first with each seed's score; the plot has one
    panel per tuned key, log-scaled for a log-uniform key, with every finished trial at (its
    value, its score), the default ringed and the chosen starred."""
    from matplotlib.collections import PathCollection

    import growth.plots
    from growth.commands.tune import Trial, TrialRecord, write_tune_report

    path = write(tmp_path, space={"strategy.lambda": {"loguniform": [1.0, 1.0e4]},
                                  "strategy.mode": {"grid": ["separate", "online"]}})
    cfg = load_config(path)
    plan = [Trial("t000", {"strategy.lambda": 50.0, "strategy.mode": "separate"}, True),
            Trial("t001", {"strategy.lambda": 3000.0, "strategy.mode": "online"}),
            Trial("t002", {"strategy.lambda": 9000.0, "strategy.mode": "separate"}),
            Trial("t003", {"strategy.lambda": 2.0, "strategy.mode": "online"})]
    records = {
        "t000": TrialRecord("t000", plan[0].setting, "ok", 0.80, {"0": 0.78, "1": 0.82}, 2),
        "t001": TrialRecord("t001", plan[1].setting, "ok", 0.90, {"0": 0.88, "1": 0.92}, 2),
        "t002": TrialRecord("t002", plan[2].setting, "failed", error="DivergedError: NaN"),
    }
    summary = {"trials": 4, "finished": 2, "stopped": 0, "failed": 1, "pending": 1,
               "best": {"id": "t001", "setting": plan[1].setting, "score": 0.90},
               "default": {"id": "t000", "setting": plan[0].setting, "score": 0.80},
               "wall_time_s": 12.0}
    figures: list[Any] = []
    monkeypatch.setattr(growth.plots, "save", lambda fig, where: figures.append(fig))
    text = write_tune_report(tmp_path, cfg, plan, records, summary).read_text()
    rows = (tmp_path / "tune.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["t001", "t000", "t002", "t003"]
    assert rows[1].split(",")[:7] == ["t001", "3000", "online", "0.9", "0.88", "0.92", "ok"]
    assert rows[3].endswith("DivergedError: NaN") and ",pending," in rows[4]
    assert "Chosen: **t001**, `strategy.lambda: 3000`, `strategy.mode: online`: score 0.9000 " \
        "(the config's own setting, t000: 0.8000)." in text
    assert "| **t001** | 3000 | online | 0.9000 | 0.8800 | 0.9200 | ok |" in text
    assert "- t002: DivergedError: NaN" in text
    (fig,) = figures
    lam, mode = fig.axes
    assert lam.get_xscale() == "log" and mode.get_xscale() == "linear"
    assert [t.get_text() for t in mode.get_xticklabels()] == ["online", "separate"]

    def points(ax: Any) -> dict[str, list[tuple[float, float]]]:
        out: dict[str, list[tuple[float, float]]] = {}
        for c in ax.collections:
            if isinstance(c, PathCollection):
                out.setdefault(c.get_label(), []).extend(map(tuple, c.get_offsets().tolist()))
        return out

    assert sorted(points(lam)["trial"]) == [(50.0, 0.80), (3000.0, 0.90)]
    assert points(lam)["chosen"] == [(3000.0, 0.90)]
    assert points(lam)["config's own setting"] == [(50.0, 0.80)]
    assert sorted(points(mode)["trial"]) == [(0.0, 0.90), (1.0, 0.80)]  # online, separate
