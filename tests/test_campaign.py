"""Campaigns end to end: configs, run directories, checkpoints, resume after a real kill, CLI."""

from __future__ import annotations

import csv
import json
import math
import shutil
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest
import torch
import yaml
from growth.search_spaces.networks import add_head, mlp, small_cnn
from runfiles import kill_after_first_checkpoint

from growth import campaign as campaign_module
from growth import strategies
from growth.campaign import (
    Campaign,
    Progress,
    _diff,
    build_base_graph,
    labelers,
    resolve_device,
    resume_run,
    run_config,
    run_config_of,
    task_seed,
)
from growth.cli import main
from growth.config import load_config
from growth.data import build_stream
from growth.data.containers import Task
from growth.errors import CheckpointError, ConfigError, RunDirError
from growth.model import Model
from growth.strategies import Context, Strategy
from growth.train import evaluate, fit

TINY = {
    "name": "tiny",
    "seed": 3,
    "threads": 1,
    "data": {"dataset": "digits", "stream": "permuted", "n_tasks": 3, "max_train_per_task": 300},
    "model": {"kind": "mlp", "hidden": [32]},
    "train": {"epochs": 5, "batch_size": 32, "lr": 0.05},
    "strategy": {"name": "finetune"},
}


def write_config(path: Path, **changes: object) -> Path:
    cfg = json.loads(json.dumps(TINY))
    for key, value in changes.items():
        node = cfg
        *parents, last = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(cfg_path: Path, out: Path, *sets: str) -> dict:
    return Campaign(load_config(cfg_path, list(sets)), out).start()


def test_run_directory_holds_everything(tmp_path: Path) -> None:
    m = run(write_config(tmp_path / "c.yaml"), tmp_path / "run")
    run_dir = tmp_path / "run"
    for name in ("config.yaml", "metrics.json", "metrics.csv"):
        assert (run_dir / name).is_file(), name
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "task_000", "task_001", "task_002"]
    assert len(m["R"]) == 4 and all(v is not None for row in m["R"] for v in row)
    assert m["finished_tasks"] == 3 and len(m["sizes"]) == 3 and len(m["wall_time_s"]) == 3
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["train"]["epochs"] == 5 and resolved["strategy"]["name"] == "finetune"
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert on_disk["R"] == m["R"] and on_disk["acc"] == pytest.approx(m["acc"])
    # the network learns: each task is well above chance right after it is trained
    assert all(m["R"][i + 1][i] > 0.5 for i in range(3))


def test_same_seed_same_R_and_other_seed_differs(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml")
    a = run(cfg, tmp_path / "a")
    b = run(cfg, tmp_path / "b")
    c = run(cfg, tmp_path / "c", "seed=4")
    assert a["R"] == b["R"]
    assert a["R"] != c["R"]


def test_resume_in_process_matches_uninterrupted(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", strategy={"name": "joint"})
    full = run(cfg, tmp_path / "full")
    part = tmp_path / "part"
    run(cfg, part)
    for name in ("task_001", "task_002"):  # as if killed after task 0

        shutil.rmtree(part / "checkpoints" / name)
    assert resume_run(part)["R"] == full["R"]


# a process started, SIGKILLed and resumed, then the run again: 40 s on a loaded machine;
# test_resume_in_process_matches_uninterrupted checks the same R without a process
@pytest.mark.slow
def test_resume_after_real_kill_gives_same_R(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", data__n_tasks=4, data__max_train_per_task=None,
                       train__epochs=8)
    out = tmp_path / "killed"
    kill_after_first_checkpoint(cfg, out, last_task=3)
    assert not (out / "checkpoints" / "task_003").exists()
    assert main(["resume", str(out), "--quiet"]) == 0
    resumed = json.loads((out / "metrics.json").read_text())
    full = run(cfg, tmp_path / "full")
    assert resumed["R"] == full["R"]


def test_corrupt_checkpoint_is_an_error_naming_the_file(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run(write_config(tmp_path / "c.yaml"), out)
    weights = out / "checkpoints" / "task_002" / "graph" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="weights.safetensors"):
        resume_run(out)
    assert main(["resume", str(out), "--quiet"]) == 2


def test_existing_run_is_not_overwritten(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml")
    run(cfg, tmp_path / "run")
    with pytest.raises(RunDirError, match="growth resume"):
        run(cfg, tmp_path / "run")


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"data__strem": "permuted"}, "unknown key 'data.strem'"),
        ({"train__epochs": "many"}, "train.epochs"),
        ({"strategy": {"name": "nope"}}, "unknown strategy 'nope'"),
        ({"model__kind": "transformer"}, "model.kind"),
    ],
)
def test_config_errors_name_file_and_key(tmp_path: Path, changes: dict, needle: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path / "bad.yaml", **changes)
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert needle in str(err.value) and "bad.yaml" in str(err.value)
    assert main(["run", str(cfg), "--out", str(tmp_path / "never")]) == 2
    captured = capsys.readouterr()
    assert needle in captured.err and "Traceback" not in captured.err
    assert not (tmp_path / "never").exists()


def test_set_overrides_and_bad_set(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml")
    assert load_config(cfg, ["train.epochs=7", "model.hidden=[8, 8]"]).model.hidden == [8, 8]
    with pytest.raises(ConfigError, match="key=value"):
        load_config(cfg, ["train.epochs"])
    with pytest.raises(ConfigError, match="unknown key 'train.epoch'"):
        load_config(cfg, ["train.epoch=3"])


def test_cli_run_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path / "c.yaml", data__n_tasks=2)
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    assert "ACC" in capsys.readouterr().out
    assert main(["report", str(out)]) == 0
    assert (out / "report" / "report.md").is_file()
    assert (out / "report" / "r_matrix.png").is_file()


def test_class_incremental_split_stream(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", scenario="class",
                       data={"dataset": "digits", "stream": "split", "n_tasks": 5})
    m = run(cfg, tmp_path / "run")
    # single head over all 10 classes; finetune forgets old classes almost entirely
    assert m["R"][1][0] > 0.8
    assert m["R"][5][0] < 0.5


def test_class_scenario_needs_split(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", scenario="class")
    with pytest.raises(ConfigError, match="split"):
        Campaign(load_config(cfg), tmp_path / "run")


def test_divergence_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path / "c.yaml", train__lr=1e25, data__n_tasks=1)
    assert main(["run", str(cfg), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "diverged" in err and "train.lr" in err


@pytest.mark.parametrize("path", sorted(Path("experiments").glob("*.yaml")) or
                         sorted((Path(__file__).parents[1] / "experiments").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.name == path.stem


def test_split_digits_class_config_runs(tmp_path: Path) -> None:
    root = Path(__file__).parents[1]
    m = Campaign(load_config(root / "experiments" / "split_digits_class.yaml",
                             ["train.epochs=2"]), tmp_path / "run").start()
    assert m["finished_tasks"] == 5 and m["run"]["scenario"] == "class"


@pytest.mark.parametrize(
    ("sets", "needle"),
    [
        (["model.hidden=[-3]"], "model.hidden"),
        (["model.activation=foo"], "model.activation"),
        (["model={kind: cnn, channels: [4, 4, 4, 4]}"], "model:"),  # 8x8 pooled 4 times
        (["model={kind: cnn, dropout: 0.5}"], "model.fc"),
    ],
)
def test_model_section_errors_write_nothing(tmp_path: Path, sets: list[str], needle: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path / "c.yaml")
    args = ["run", str(cfg), "--out", str(tmp_path / "never"), "--quiet"]
    for item in sets:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "never").exists()


def test_resume_refuses_a_changed_config(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run(write_config(tmp_path / "c.yaml"), out)
    shutil.rmtree(out / "checkpoints" / "task_002")
    text = (out / "config.yaml").read_text().replace("- 32", "- 16")
    (out / "config.yaml").write_text(text)
    with pytest.raises(ConfigError, match="model.hidden"):
        resume_run(out)


def test_cnn_campaign_uses_dropout_and_activation(tmp_path: Path) -> None:
    model = {"kind": "cnn", "channels": [8, 16], "fc": [32], "batchnorm": True}
    base = run(write_config(tmp_path / "a.yaml", model=model, data__n_tasks=2), tmp_path / "a")
    drop = run(write_config(tmp_path / "b.yaml", model={**model, "dropout": 0.5},
                            data__n_tasks=2), tmp_path / "b")
    tanh = run(write_config(tmp_path / "c.yaml", model={**model, "activation": "tanh"},
                            data__n_tasks=2), tmp_path / "c")
    assert base["R"][1][0] > 0.5
    assert base["R"] != drop["R"] and base["R"] != tanh["R"]
    graph = yaml.safe_load((tmp_path / "b" / "checkpoints" / "task_001" / "graph" /
                            "structure.json").read_text())
    kinds = [n["kind"] for n in graph["nodes"]]
    assert "dropout" in kinds and "conv2d" in kinds and "batchnorm2d" in kinds


@pytest.mark.parametrize("strategy", ["finetune", "joint", "ewc", "si", "mas", "l2", "lwf",
                                      "mwc", "pnn", "rwalk", "scp"])
def test_every_strategy_resumes_to_the_same_R(tmp_path: Path, strategy: str) -> None:
    cfg = write_config(tmp_path / "c.yaml", strategy={"name": strategy},
                       model={"kind": "mlp", "hidden": [32], "batchnorm": True, "dropout": 0.2},
                       train__epochs=2)
    full = run(cfg, tmp_path / "full")
    part = tmp_path / "part"
    run(cfg, part)
    for name in ("task_001", "task_002"):
        shutil.rmtree(part / "checkpoints" / name)
    assert resume_run(part)["R"] == full["R"]


def test_each_run_logs_only_to_its_own_directory(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", data__n_tasks=1)
    for name in ("a", "b"):
        assert main(["run", str(cfg), "--out", str(tmp_path / name), "--quiet"]) == 0
    first = (tmp_path / "a" / "log.txt").read_text()
    assert str(tmp_path / "b") not in first and first.count("campaign 'tiny'") == 1


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("strategy", ["finetune", "joint", "ewc", "si", "mas", "l2", "lwf",
                                      "mwc", "pnn"])
def test_every_strategy_runs_and_resumes_on_cuda(tmp_path: Path, strategy: str) -> None:
    cfg = write_config(tmp_path / "c.yaml", device="cuda", strategy={"name": strategy},
                       model={"kind": "mlp", "hidden": [32], "batchnorm": True})
    part = tmp_path / "part"
    full = run(cfg, part)
    shutil.rmtree(part / "checkpoints" / "task_002")
    resumed = resume_run(part)
    assert resumed["finished_tasks"] == 3
    assert resumed["R"][:3] == full["R"][:3] and full["R"][3][2] > 0.5


# ---- quick in-process runs: entry points, resume paths, progress callbacks --------------------
QUICK = {"data__n_tasks": 2, "data__max_train_per_task": 64,
         "model": {"kind": "mlp", "hidden": [8]},
         "train": {"epochs": 1, "batch_size": 32, "lr": 0.05}}


def recorder() -> tuple[Progress, list[tuple]]:
    calls: list[tuple] = []
    return Progress(on_task_start=lambda i, t: calls.append(("start", i, t.index)),
                    on_epoch=lambda task, epoch, loss: calls.append(("epoch", task, epoch))
                    if math.isfinite(loss) else calls.append(("bad loss", loss)),
                    on_task_end=lambda i, m: calls.append(("end", i, m["finished_tasks"]))
                    ), calls


def test_run_config_applies_overrides_and_reports_progress(tmp_path: Path) -> None:
    progress, calls = recorder()
    out = tmp_path / "new" / "run"  # folders that do not exist yet
    m = run_config(write_config(tmp_path / "c.yaml", **QUICK), out, ["train.epochs=2", "seed=5"],
                   progress)
    assert calls == [("start", 0, 0), ("epoch", 0, 0), ("epoch", 0, 1), ("end", 0, 1),
                     ("start", 1, 1), ("epoch", 1, 0), ("epoch", 1, 1), ("end", 1, 2)]
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["train"]["epochs"] == 2 and resolved["seed"] == 5
    assert m["run"] == {"name": "tiny", "strategy": "finetune", "seed": 5,
                        "stream": "permuted", "dataset": "digits", "scenario": "task"}
    assert m["finished_tasks"] == 2 and m["config"] == resolved
    # fine-tuning never grows: the model is the base network, in parameters and in bytes
    assert [(z["task"], z["relative"], z["relative_bytes"]) for z in m["sizes"]] == [
        (0, 1.0, 1.0), (1, 1.0, 1.0)]
    with (out / "epochs.csv").open() as f:
        rows = list(csv.DictReader(f))
    names = m["tasks"]
    assert [(r["task"], r["task_name"], r["epoch"]) for r in rows] == [
        ("0", names[0], "0"), ("0", names[0], "1"), ("1", names[1], "0"), ("1", names[1], "1")]
    assert all(float(r["train_loss"]) > 0 and 0 <= float(r["val_accuracy"]) <= 1
               for r in rows)


def test_resume_trains_only_the_tasks_after_the_last_checkpoint(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", **QUICK)
    full = run(cfg, tmp_path / "full")
    part = tmp_path / "part"
    run(cfg, part)
    shutil.rmtree(part / "checkpoints" / "task_001")
    progress, calls = recorder()
    assert resume_run(part, progress)["R"] == full["R"]
    assert calls == [("start", 1, 1), ("epoch", 1, 0), ("end", 1, 2)]
    with (part / "epochs.csv").open() as f:  # the finished task's rows are kept
        assert [r["task"] for r in csv.DictReader(f)] == ["0", "1"]
    assert not (part / "tensorboard").exists()


def test_resume_without_a_checkpoint_starts_from_the_beginning(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", **QUICK)
    full = run(cfg, tmp_path / "full")
    part = tmp_path / "part"
    run(cfg, part)
    shutil.rmtree(part / "checkpoints")
    campaign = Campaign(run_config_of(part), part)
    assert campaign.resume()["R"] == full["R"]
    assert campaign.resumed_at is None
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == ["task_000", "task_001"]
    assert "starting from the beginning" in (part / "log.txt").read_text()


def test_resume_of_a_finished_run_trains_nothing_and_repairs_metrics(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()  # an empty folder is a fine place for a new run
    first = run(write_config(tmp_path / "c.yaml", **QUICK), out)
    saved = json.loads((out / "metrics.json").read_text())
    log_text = (out / "log.txt").read_text()
    compact = json.dumps(saved)  # the same metrics, written differently
    (out / "metrics.json").write_text(compact)
    progress, calls = recorder()
    campaign = Campaign(run_config_of(out), out, progress)
    m = campaign.resume()
    assert calls == [] and campaign.resumed_at == 2
    assert m["R"] == first["R"] and m["acc"] == pytest.approx(first["acc"])
    assert (out / "metrics.json").read_text() == compact  # up to date: left as it was
    assert (out / "log.txt").read_text() == log_text  # nothing resumed, nothing logged
    for name in ("metrics.json", "metrics.csv"):  # missing: rebuilt from the checkpoint
        (out / name).unlink()
    assert Campaign(run_config_of(out), out).resume()["R"] == first["R"]
    assert json.loads((out / "metrics.json").read_text()) == saved
    assert (out / "metrics.csv").is_file()
    stale = {**saved, "R": [[0.0] * 2] * 3}
    (out / "metrics.json").write_text(json.dumps(stale))
    Campaign(run_config_of(out), out).resume()
    assert json.loads((out / "metrics.json").read_text()) == saved


def test_diff_names_every_changed_key_dotted() -> None:
    old = {"model": {"hidden": [32], "kind": "mlp"}, "seed": 3, "train": {"lr": 0.1},
           "n": {"X": 1}, "gone": 1}
    new = {"model": {"hidden": [16], "kind": "mlp"}, "seed": 3, "train": 5,
           "n": {"X": 2}, "added": {"a": 1}}
    assert _diff(old, new) == {"model.hidden", "train", "n.X", "gone", "added"}
    assert _diff(new, new) == set()


def test_task_seeds_are_pinned() -> None:
    """The seeds of past runs must not change: (seed * 1000003 + task * 7919 + 17) mod
    (2^31 - 1), checked by hand."""
    assert task_seed(3, 2) == 3015864  # 3000009 + 15838 + 17, below the modulus
    assert task_seed(5000, 1) == 705055642  # 5000022936 - 2 * 2147483647


def _tasks(shape: tuple[int, ...], classes: list[int]) -> list[Task]:
    none = (torch.zeros(0, *shape), torch.zeros(0, dtype=torch.long))
    offsets = [sum(classes[:i]) for i in range(len(classes))]
    return [Task(i, f"t{i}", none, none, none, list(range(o, o + n)), n, o, shape)
            for i, (n, o) in enumerate(zip(classes, offsets))]


@pytest.mark.parametrize("scenario", ["task", "class"])
def test_base_graph_follows_the_model_section(tmp_path: Path, scenario: str) -> None:
    """Every key of the model section reaches the trunk; one head per task (named t<index>,
    its own classes) or one shared head over all classes."""
    mlp_cfg = load_config(write_config(tmp_path / "m.yaml", model={
        "kind": "mlp", "hidden": [6, 5], "activation": "tanh", "batchnorm": True,
        "dropout": 0.25}), [f"scenario={scenario}"] + (
        ["data.stream=split"] if scenario == "class" else []))
    cnn_cfg = load_config(write_config(tmp_path / "c.yaml", model={
        "kind": "cnn", "channels": [3, 4], "fc": [7], "activation": "tanh",
        "batchnorm": False, "dropout": 0.3}))
    tasks = _tasks((1, 8, 8), [2, 3])
    heads = ({"t0": 2, "t1": 3} if scenario == "task" else {"all": 5})

    def with_heads(g):
        for name, n in heads.items():
            g = add_head(g, name, n)
        return g

    got = build_base_graph(mlp_cfg, tasks).to_dict()
    want = with_heads(mlp((1, 8, 8), [6, 5], activation="tanh", batchnorm=True,
                          dropout=0.25)).to_dict()
    assert got == want
    got = build_base_graph(cnn_cfg, _tasks((1, 8, 8), [2, 3])).to_dict()
    want = small_cnn((1, 8, 8), [3, 4], batchnorm=False, activation="tanh", fc=[7],
                     dropout=0.3)
    assert got == add_head(add_head(want, "t0", 2), "t1", 3).to_dict()


def test_device_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="c.yaml: device: cuda"):
        resolve_device("cuda", "c.yaml")
    with pytest.raises(ConfigError, match="^<config>: device: cuda"):  # no file: the config
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


def test_the_stream_is_drawn_from_the_config_seed(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path / "c.yaml", **QUICK), ["seed=11"])
    tasks = Campaign(cfg, tmp_path / "run").tasks
    same = build_stream({**cfg.data.model_dump(), "seed": 11})
    other = build_stream({**cfg.data.model_dump(), "seed": 12})
    assert all(torch.equal(a.train[0], b.train[0]) for a, b in zip(tasks, same))
    assert not torch.equal(tasks[1].train[0], other[1].train[0])


def test_each_task_trains_from_its_own_seed(tmp_path: Path) -> None:
    """The first task's weights are those of a fit from the base network with the task's
    seed (and not with the loop's default seed)."""
    cfg = load_config(write_config(tmp_path / "c.yaml", **QUICK),
                      ["data.n_tasks=1", "data.val_fraction=0"])
    c = Campaign(cfg, tmp_path / "run")
    base = Model(c.base)
    c.start()
    task = c.tasks[0]

    def replay(seed: int) -> list[torch.Tensor]:
        model = Model(c.base)
        ctx = Context(model, task, [], c.head_of, c.label_of, torch.device("cpu"))
        fit(ctx, Strategy(), cfg.train, seed=seed)
        return [p.detach() for p in model.module.parameters()]

    assert not all(torch.equal(p, q) for p, q in zip(base.module.parameters(),
                                                     c.model.module.parameters()))
    got = [p.detach() for p in c.model.module.parameters()]
    assert all(torch.equal(p, q) for p, q in zip(got, replay(task_seed(3, 0))))
    assert not all(torch.equal(p, q) for p, q in zip(got, replay(0)))
    with (tmp_path / "run" / "epochs.csv").open() as f:  # no validation split: no accuracy
        assert [r["val_accuracy"] for r in csv.DictReader(f)] == [""]


class Scored(Strategy):
    """Fine-tuning that scores every task as 'class 0' through its own evaluation, keeps a
    memory, reports figures, and writes down each task's work folder."""

    name = "scored"
    workdirs: list[Path] = []

    def before_task(self, ctx):
        Scored.workdirs.append(ctx.workdir)

    @contextmanager
    def evaluation(self, ctx, task):
        yield lambda x: torch.nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long),
                                                    task.n_classes).float()

    def run_report(self):
        return {"search": {"children": 4, "child_time_s": 1.5}, "details": {"note": "x"}}

    def memory_report(self):
        return {"samples": 7, "bytes": 28}


def test_strategy_evaluation_reports_and_memory_reach_the_metrics(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(strategies.STRATEGIES, "scored", Scored)
    monkeypatch.setattr(Scored, "workdirs", [])
    out = tmp_path / "run"
    cfg = load_config(write_config(tmp_path / "c.yaml", **QUICK, strategy={"name": "scored"},
                                   tensorboard=True))
    c = Campaign(cfg, out)
    m = c.start()
    assert [p.name.startswith("events.out.tfevents") for p in (out / "tensorboard").iterdir()
            ] == [True]
    zeros = [float((t.test[1] == 0).float().mean()) for t in c.tasks]  # 'class 0' is right
    assert m["R"] == [pytest.approx(zeros)] * 3
    assert m["search"]["children"] == 4 and m["search"]["child_time_s"] == 1.5
    assert m["details"] == {"note": "x"}
    assert [(z["memory_samples"], z["memory_bytes"]) for z in m["sizes"]] == [(7, 28)] * 2
    assert Scored.workdirs == [out / "work" / "task_000", out / "work" / "task_001"]
    # each epoch's accuracy is the task's own head on its validation split (the last epoch of
    # the last task: the final network)
    last = c.tasks[1]
    val = evaluate(c._ctx(last), last, "val")
    assert val != evaluate(c._ctx(last), last, "test")
    with (out / "epochs.csv").open() as f:
        assert float(list(csv.DictReader(f))[-1]["val_accuracy"]) == val


def test_wall_time_counts_training_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a clock that every training forward pass moves by 1 and every evaluation pass by
    100: each task's wall time is its training batches alone (2 epochs of 2 batches)."""
    clock = [0.0]
    monkeypatch.setattr(campaign_module, "time",
                        type("Clock", (), {"perf_counter": staticmethod(lambda: clock[0])}))

    def tick(module, inputs):
        clock[0] += 1 if module.training else 100

    def on_start(i, task):
        if i == 0:
            c.model.module.fc1.register_forward_pre_hook(tick)  # in every forward pass

    cfg = load_config(write_config(tmp_path / "c.yaml", **QUICK), ["train.epochs=2"])
    c = Campaign(cfg, tmp_path / "run", Progress(on_task_start=on_start))
    m = c.start()
    assert m["wall_time_s"] == [4.0, 4.0]


def test_labelers_name_the_head_and_its_labels() -> None:
    task = _tasks((4,), [2, 3])[1]  # classes 2, 3, 4 of the stream
    y = torch.tensor([0, 2, 1])
    head, label = labelers("class")
    assert head(task) == "all" and label(task, y).tolist() == [2, 4, 3]
    head, label = labelers("task")
    assert head(task) == "t1" and label(task, y).tolist() == [0, 2, 1]


def test_the_resolved_config_spells_out_the_strategys_defaults_by_their_config_names(
        tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path / "c.yaml", **QUICK,
                                   strategy={"name": "ewc", "lambda": 7}))
    section = Campaign(cfg, tmp_path / "run")._resolved().to_dict()["strategy"]
    assert section == {"name": "ewc", "lambda": 7.0, "mode": "separate", "gamma": 1.0,
                       "fisher_samples": 1000}


def test_a_torchvision_base_network_starts_from_its_weights_file(tmp_path: Path) -> None:
    import torchvision

    torch.manual_seed(0)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, tmp_path / "r18.pth")
    cfg = load_config(write_config(tmp_path / "c.yaml", model={
        "kind": "torchvision", "arch": "resnet18", "weights": str(tmp_path / "r18.pth")}))
    g = build_base_graph(cfg, _tasks((3, 16, 16), [2, 3]))
    tensors = g.named_tensors()
    assert torch.equal(tensors["conv1.weight"], state["conv1.weight"])
    assert tensors["head_t0.weight"].shape == (2, 512)
    assert tensors["head_t1.weight"].shape == (3, 512)


def test_cuda_runs_pin_deterministic_kernels_and_cpu_runs_leave_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bitwise-equal resumes on a GPU need cudnn's deterministic kernels; a CPU run leaves the
    process's cudnn settings as the user set them (nothing is moved to the device here)."""
    cfg = load_config(write_config(tmp_path / "c.yaml", **QUICK))
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    Campaign(cfg, tmp_path / "cpu")
    assert torch.backends.cudnn.deterministic is False and torch.backends.cudnn.benchmark is True
    monkeypatch.setattr(campaign_module, "resolve_device",
                        lambda name, source="": torch.device("cuda"))
    Campaign(cfg, tmp_path / "gpu")
    assert torch.backends.cudnn.deterministic is True and torch.backends.cudnn.benchmark is False


def test_model_and_contexts_live_on_the_campaign_device(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """`cpu:0` stands in for a second device on a CPU-only machine: it differs from `cpu`,
    Model's default, so a model or context built without the campaign's device shows."""
    device = torch.device("cpu", 0)
    monkeypatch.setattr(campaign_module, "resolve_device", lambda name, source="": device)
    out = tmp_path / "run"
    campaign = Campaign(load_config(write_config(tmp_path / "c.yaml", **QUICK)), out)
    campaign.start()
    assert campaign.model.device == device
    assert campaign._ctx(campaign.tasks[1]).device == device
    shutil.rmtree(out / "checkpoints" / "task_001")
    again = Campaign(run_config_of(out), out)
    again.resume()
    assert again.resumed_at == 1 and again.model.device == device


def test_a_strategy_session_is_entered_only_when_tasks_are_left(tmp_path: Path) -> None:
    """REC's session holds a Ray cluster: resuming a finished run (here one with a temp file a
    kill left, so it goes through the loop) must not start one for nothing."""
    out = tmp_path / "run"
    run(write_config(tmp_path / "c.yaml", **QUICK), out)
    (out / ".metrics.json.tmp").write_text("{")  # a write a kill interrupted

    def resume_counting_sessions() -> tuple[dict, list[Path]]:
        campaign = Campaign(run_config_of(out), out)
        entered: list[Path] = []
        campaign.strategy.session = lambda workdir: entered.append(workdir) or nullcontext()
        return campaign.resume(), entered

    metrics, entered = resume_counting_sessions()
    assert not (out / ".metrics.json.tmp").exists() and metrics["finished_tasks"] == 2
    assert entered == []
    shutil.rmtree(out / "checkpoints" / "task_001")
    metrics, entered = resume_counting_sessions()  # one task left: one session around it
    assert entered == [out / "work"] and metrics["finished_tasks"] == 2


def test_a_cuda_config_on_a_machine_without_cuda_names_its_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = load_config(write_config(tmp_path / "gpu.yaml", **QUICK, device="cuda"))
    with pytest.raises(ConfigError, match=r"gpu\.yaml: device: cuda was asked for"):
        Campaign(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
