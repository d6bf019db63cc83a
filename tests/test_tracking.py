"""Experiment trackers (config `tracking:`): the config section and the old `tensorboard` key,
the fan-out's names and steps, MLflow (a local file store, read back with MLflow's client) and
W&B (offline mode, its run file read back record by record), resume, missing packages."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
from runfiles import write_config

from growth.campaign import Campaign, resume_run
from growth.cli import main
from growth.config import TrackingConfig, load_config
from growth.errors import ConfigError
from growth.tracking import Tracking, open_tracking


def epochs_csv(run: Path) -> list[dict[str, str]]:
    with (run / "epochs.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def run_cli(cfg: Path, out: Path) -> dict[str, Any]:
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    return json.loads((out / "metrics.json").read_text())


# ---- the config section --------------------------------------------------------------------
def test_tracking_section_is_validated(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path / "c.yaml", tracking={"mlflow": True}))
    assert cfg.tracking.mlflow is not None and cfg.tracking.mlflow.experiment == "growth"
    assert cfg.tracking.wandb is None and cfg.tracking.enabled == ["mlflow"]
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key 'tracking.mlflow.url'"):
        load_config(write_config(tmp_path / "c.yaml", tracking={"mlflow": {"url": "x"}}))
    with pytest.raises(ConfigError, match=r"c.yaml: tracking.wandb.mode: .*'offline'"):
        load_config(write_config(tmp_path / "c.yaml", tracking={"wandb": {"mode": "live"}}))


def test_the_old_tensorboard_key_is_read_as_tracking_tensorboard(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    cfg = load_config(write_config(tmp_path / "c.yaml", tensorboard=True))
    assert cfg.tracking.tensorboard is True
    written = cfg.to_dict()
    assert "tensorboard" not in written and written["tracking"]["tensorboard"] is True
    cfg = load_config(write_config(tmp_path / "c.yaml"), ["tensorboard=true"])
    assert cfg.tracking.tensorboard is True
    with pytest.raises(ConfigError, match="tensorboard: set twice.*keep only tracking"):
        load_config(write_config(tmp_path / "c.yaml", tensorboard=False,
                                 tracking={"tensorboard": True}))


@pytest.mark.parametrize("name", ["mlflow", "wandb"])
def test_a_tracker_without_its_package_names_the_extra(tmp_path: Path, name: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda mod, *a: None if mod == name else real(mod, *a))
    cfg = write_config(tmp_path / "c.yaml", tracking={name: {}})
    with pytest.raises(ConfigError, match=rf"c.yaml: tracking.{name} needs the {name} package; "
                                          rf"pip install 'growth\[{name}\]'"):
        load_config(cfg)
    with pytest.raises(ConfigError, match=rf"--set 'tracking.{name}=true': tracking.{name} "
                                          "needs"):
        load_config(write_config(tmp_path / "c.yaml"), [f"tracking.{name}=true"])
    # and when the import itself fails at run time (the check above passed in another process)
    monkeypatch.setattr(importlib.util, "find_spec", real)
    for module in [name, *(m for m in sys.modules if m.startswith(f"{name}."))]:
        monkeypatch.setitem(sys.modules, module, None)  # submodules an earlier test imported
    settings = TrackingConfig.model_validate({name: {"mode": "offline"} if name == "wandb"
                                              else {}})
    with pytest.raises(ConfigError, match=rf"pip install 'growth\[{name}\]'"):
        open_tracking(settings, tmp_path / "run", "abc", "tiny", 2)


# ---- the fan-out ---------------------------------------------------------------------------
class Recorder:
    def __init__(self) -> None:
        self.logged: list[tuple[dict[str, float], int]] = []
        self.closed: bool | None = None

    def params(self, config: dict[str, Any]) -> None:
        self.config = config

    def metrics(self, values: dict[str, float], step: int) -> None:
        self.logged.append((dict(values), step))

    def artifacts(self, root: Path, files: list[Path]) -> None:
        self.files = files

    def close(self, ok: bool) -> None:
        self.closed = ok


class Broken(Recorder):
    def metrics(self, values: dict[str, float], step: int) -> None:
        raise OSError("disk full")


def test_names_and_steps_of_epochs_and_tasks(caplog: pytest.LogCaptureFixture) -> None:
    good, bad = Recorder(), Broken()
    tracking = Tracking({"bad": bad, "good": good}, epochs_per_task=2)
    with caplog.at_level(logging.WARNING, "growth.tracking"):
        tracking.epoch(1, 0, 0.5, float("nan"))  # no validation split: no val_accuracy
        tracking.epoch(1, 1, 0.25, 0.75)
    assert "bad failed at metrics (OSError: disk full)" in caplog.text
    assert "bad" not in tracking.trackers
    R = [[0.1, 0.2, 0.3], [0.8, 0.2, 0.1], [0.6, 0.9, 0.4]]
    tracking.task_done(1, {"R": R, "acc": 0.75, "bwt": -0.2, "fwt": float("nan"),
                           "sizes": [{"task": 0, "params": 10}, {"task": 1, "params": 12,
                                                                 "relative": 1.2}]})
    tracking.params({"seed": 3, "tracking": {"tensorboard": True}})
    tracking.close(ok=False)
    assert good.logged[:2] == [({"train_loss/task_1": 0.5}, 2),
                               ({"train_loss/task_1": 0.25, "val_accuracy/task_1": 0.75}, 3)]
    values, step = good.logged[2]
    assert step == 3  # task 1's last epoch: (1 + 1) * 2 - 1
    assert values == pytest.approx({
        "accuracy/task_0": 0.6, "accuracy/task_1": 0.9, "accuracy/task_2": 0.4,
        "average_accuracy": 0.75, "acc": 0.75, "bwt": -0.2,  # fwt NaN: left out
        "size/params": 12.0, "size/relative": 1.2})
    assert good.config == {"seed": 3} and good.closed is False


# ---- MLflow ----------------------------------------------------------------------------------
def test_mlflow_file_store_holds_the_run(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    cfg = write_config(tmp_path / "c.yaml", train__epochs=2,
                       tracking={"mlflow": {"uri": uri, "experiment": "digits"}})
    out = tmp_path / "run"
    metrics = run_cli(cfg, out)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("digits")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    assert run.info.run_id == json.loads((out / "tracking.json").read_text())["mlflow"]
    table = epochs_csv(out)
    for t in range(3):
        loss = client.get_metric_history(run.info.run_id, f"train_loss/task_{t}")
        assert [m.step for m in loss] == [2 * t, 2 * t + 1]
        mine = [float(r["train_loss"]) for r in table if int(r["task"]) == t]
        assert [m.value for m in loss] == pytest.approx(mine, rel=1e-6)
    R = metrics["R"]
    for j in range(3):  # column j of R, one value per task learned
        hist = client.get_metric_history(run.info.run_id, f"accuracy/task_{j}")
        assert [m.step for m in hist] == [1, 3, 5]
        assert [m.value for m in hist] == pytest.approx([R[i][j] for i in (1, 2, 3)])
    avg = client.get_metric_history(run.info.run_id, "average_accuracy")
    assert [m.value for m in avg] == pytest.approx([sum(R[i][:i]) / i for i in (1, 2, 3)])
    final = run.data.metrics
    assert final["acc"] == pytest.approx(metrics["acc"])
    assert final["bwt"] == pytest.approx(metrics["bwt"])
    assert final["fwt"] == pytest.approx(metrics["fwt"])
    assert final["size/params"] == metrics["sizes"][-1]["params"]
    assert run.data.params["train.lr"] == "0.05" and run.data.params["seed"] == "3"
    assert run.data.params["model.hidden"] == "[32]"
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.json", "epochs.csv", "log.txt", "report"} <= files
    report = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert {"report/report.md", "report/accuracy_curves.png"} <= report


def test_mlflow_resume_continues_the_same_run(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    cfg = write_config(tmp_path / "c.yaml", train__epochs=2, tracking={"mlflow": {"uri": uri}})
    out = tmp_path / "run"
    run_cli(cfg, out)
    shutil.rmtree(out / "checkpoints" / "task_002")
    metrics = resume_run(out)
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("growth").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["acc"] == pytest.approx(metrics["acc"])
    loss = client.get_metric_history(run.info.run_id, "train_loss/task_2")
    assert sorted(m.step for m in loss) == [4, 4, 5, 5]  # task 2 learned twice, same steps


def test_an_unreachable_mlflow_store_is_a_config_error(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    (tmp_path / "file").write_text("not a folder")
    cfg = write_config(tmp_path / "c.yaml",
                       tracking={"mlflow": {"uri": (tmp_path / "file" / "x").as_uri()}})
    with pytest.raises(ConfigError, match="tracking.mlflow: cannot start an MLflow run at "
                                          "file:.*Not a directory.*check tracking.mlflow.uri"):
        Campaign(load_config(cfg), tmp_path / "run").start()
    assert not (tmp_path / "run" / "checkpoints").exists()  # found before any training


# ---- Weights & Biases (offline) --------------------------------------------------------------
def wandb_records(path: Path) -> list[Any]:
    """The records of a W&B run file (a log of 32 KiB blocks: a 7-byte file header, then
    chunks of crc32, length, type (1 full, 2 first, 3 middle, 4 last), each a protobuf)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending, out = 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def test_wandb_online_without_a_login_is_a_config_error(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no W&B settings
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    settings = TrackingConfig.model_validate({"wandb": {"project": "p"}})
    with pytest.raises(ConfigError, match="mode online needs a W&B login.*mode: offline"):
        open_tracking(settings, tmp_path / "run", "abc", "tiny", 2)
    assert not (tmp_path / "run").exists()


def test_wandb_offline_run_holds_the_metrics(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = pytest.importorskip("wandb")
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = write_config(tmp_path / "c.yaml", train__epochs=2,
                       tracking={"wandb": {"mode": "offline", "project": "cl"}})
    out = tmp_path / "run"
    metrics = run_cli(cfg, out)
    wandb.teardown()  # W&B's service writes the run file in the background: let it finish
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    (path,) = (tmp_path / "wandb-home" / "wandb").glob(f"offline-run-*-{run_id}/run-*.wandb")
    records = wandb_records(path)
    rows = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]
    table = epochs_csv(out)
    for t in range(3):
        got = [(row["step"], row[f"train_loss/task_{t}"]) for row in rows
               if f"train_loss/task_{t}" in row]
        mine = [float(r["train_loss"]) for r in table if int(r["task"]) == t]
        assert [s for s, _ in got] == [2 * t, 2 * t + 1]
        assert [v for _, v in got] == pytest.approx(mine, rel=1e-6)
    after = [row for row in rows if "acc" in row]
    assert [row["step"] for row in after] == [1, 3, 5]
    R = metrics["R"]
    assert [row["accuracy/task_0"] for row in after] == pytest.approx([R[i][0] for i in (1, 2, 3)])
    assert after[-1]["acc"] == pytest.approx(metrics["acc"])
    assert after[-1]["bwt"] == pytest.approx(metrics["bwt"])
    assert after[-1]["size/params"] == metrics["sizes"][-1]["params"]
    config = {u.key or "/".join(u.nested_key): json.loads(u.value_json) for r in records
              if r.WhichOneof("record_type") == "config" for u in r.config.update}
    assert config["train"]["lr"] == 0.05 and config["seed"] == 3 and "tracking" not in config
    (artifact,) = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    names = {e.path for e in artifact.manifest.contents}
    assert {"metrics.json", "epochs.csv", "config.yaml", "report/report.md"} <= names


# ---- resume -----------------------------------------------------------------------------------
def test_a_resume_may_switch_trackers_on_with_the_old_key(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    run_cli(write_config(tmp_path / "c.yaml", train__epochs=2), out)
    shutil.rmtree(out / "checkpoints" / "task_002")
    config = out / "config.yaml"  # as a run started before `tracking:` would hold it
    text = config.read_text()
    assert "tracking:" in text
    head, _, rest = text.partition("tracking:")
    rest = rest.split("\n", 1)[1]
    while rest.startswith("  "):  # drop the section's lines
        rest = rest.split("\n", 1)[1]
    config.write_text(f"{head}tensorboard: true\n{rest}")
    resume_run(out)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train_loss/task_2")] == [4, 5]
    assert "train_loss/task_1" not in events.Tags()["scalars"]


# ---- growth search -----------------------------------------------------------------------------
def tracked_search_config(tmp_path: Path, uri: str, **search: object) -> Path:
    import yaml
    from searchkit import search_config

    path = search_config(tmp_path, children=2, budget={"generations": 1}, base_epochs=1,
                         epochs=1, **search)
    cfg = yaml.safe_load(path.read_text())
    cfg["tracking"] = {"mlflow": {"uri": uri, "experiment": "search"}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_search_is_one_tracked_run_with_its_children(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from growth.commands.search import search_config as run_search_config

    uri = (tmp_path / "mlruns").as_uri()
    out = tmp_path / "run"
    summary = run_search_config(tracked_search_config(tmp_path, uri, backend="local"), out)
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("search").experiment_id])
    assert run.info.status == "FINISHED"
    children = [json.loads(line) for line in (out / "children.jsonl").read_text().splitlines()]
    hist = client.get_metric_history(run.info.run_id, "child/val_accuracy")
    assert [m.step for m in hist] == [1, 2]
    assert [m.value for m in hist] == pytest.approx([c["val_acc"] for c in children])
    best = client.get_metric_history(run.info.run_id, "best/val_accuracy")
    assert [m.value for m in best] == pytest.approx(
        [children[0]["val_acc"], max(c["val_acc"] for c in children)])
    final = run.data.metrics
    assert final["best/val_acc"] == pytest.approx(summary["best"]["val_acc"])
    assert final["base/test_acc"] == pytest.approx(summary["base"]["test_acc"])
    assert final["trials"] == 2
    assert run.data.params["search.children"] == "2"
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"search_metrics.json", "leaderboard.json", "config.yaml", "report"} <= files


@pytest.mark.slow
def test_ray_tune_logs_each_child_to_mlflow_and_wandb(tmp_path: Path, ray_session: Any,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    pytest.importorskip("mlflow")
    wandb = pytest.importorskip("wandb")
    from mlflow.tracking import MlflowClient

    from growth.commands.search import search_config as run_search_config

    monkeypatch.delenv("WANDB_MODE", raising=False)  # restored after the test
    monkeypatch.setenv("WANDB_SILENT", "true")
    uri = (tmp_path / "mlruns").as_uri()
    path = tracked_search_config(tmp_path, uri, backend="tune")
    cfg = yaml.safe_load(path.read_text())
    cfg["tracking"]["wandb"] = {"mode": "offline", "dir": str(tmp_path / "wb")}
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    run_search_config(path, out)
    wandb.teardown()
    children = sorted(json.loads(line)["val_acc"]
                      for line in (out / "children.jsonl").read_text().splitlines())
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("search").experiment_id])
    trials = [r for r in runs if r.data.tags.get("growth.search") == "s"]
    assert len(runs) == 3 and len(trials) == 2  # the search's own run and one per child
    assert sorted(r.data.metrics["val_acc"] for r in trials) == pytest.approx(children)
    # W&B: the search's run (its id the run's own) and one offline run per child
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    files = sorted((tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 3 and sum(run_id in f.name for f in files) == 1
    logged = []
    for f in files:
        if run_id not in f.name:
            logged += [json.loads(i.value_json) for r in wandb_records(f)
                       if r.WhichOneof("record_type") == "history" for i in r.history.item
                       if (i.key or "/".join(i.nested_key)) == "val_acc"]
    assert sorted(logged) == pytest.approx(children)
