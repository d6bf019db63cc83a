"""Names that become paths, outputs that may be written, and file modes.

Every name a folder is made from (a search's child keys, which come from records and trial
configs; a comparison's labels and name; a run's name) is a plain name, and every folder is
resolved, links followed, under its root: a forged search directory or config cannot make the
engine write or delete outside it. An output folder is new, empty, or one the same command
wrote (its marker file). Files get the modes a plain open() gives under the user's umask."""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from growth.controllers import make_controller
from growth.controllers.driver import Budget, SearchDir, _adopt, run_search
from growth.controllers.records import read_records
from growth.controllers.trial import TrialSpec
from growth.search_spaces.networks import add_head, mlp
from runfiles import snapshot, write_config
from searchkit import digits_task, small_space, trained_base

from growth.cli import main
from growth.commands.compare import load_compare, run_compare
from growth.errors import ConfigError, RunDirError
from growth.train import TrainConfig


# ---- search keys: the adopt step of `growth resume` --------------------------------------------
@pytest.fixture(scope="module")
def finished_search(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-generation search (local backend) at ROOT/a/b/run."""
    root = tmp_path_factory.mktemp("search")
    task = digits_task()
    trained_base(task, root / "base", epochs=2)
    _search(root / "a" / "b" / "run", root / "base", "local")
    return root


def _search(folder: Path, base: Path, backend: str) -> object:
    task = digits_task()
    from growth.graph import NetGraph

    space = small_space(NetGraph.load(base))
    controller = make_controller("random", space, {"wider_actions": 1, "deeper_actions": 0},
                                 seed=1)
    return run_search(folder, base, controller, space, task,
                      TrialSpec(train=TrainConfig(epochs=1, lr=0.02)),
                      Budget(children=2, generations=1), seed=1, parent_acc=0.5,
                      backend=backend)


@pytest.mark.parametrize("forged", ["../../../escape_victim", "{victim}", "g000c00/inner",
                                    "..", "g999c99"])
def test_a_forged_child_record_never_writes_outside_the_search(finished_search: Path,
                                                               tmp_path: Path, forged: str
                                                               ) -> None:
    """A copy of a finished search set back to generation 0, with a child folder planted in
    Tune's storage whose child.json names `forged`: resuming adopts nothing of it (it used to
    delete the folder the key climbed to and move the child's files there), and ends as the
    search it is."""
    shutil.copytree(finished_search / "base", tmp_path / "base")
    run = tmp_path / "a" / "b" / "run"
    shutil.copytree(finished_search / "a" / "b" / "run", run)
    victim = tmp_path / "a" / "escape_victim"  # where ../../../ from run/children lands
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    key = forged.replace("{victim}", str(victim))
    state = json.loads((run / "search.json").read_text())
    state.update(generation=0, done=False)
    (run / "search.json").write_text(json.dumps(state))
    planted = run / "tune" / "gen000-a0" / "evil"
    shutil.copytree(run / "children" / "g000c00", planted)
    record = json.loads((planted / "child.json").read_text())
    record["key"] = key
    (planted / "child.json").write_text(json.dumps(record))
    before = (run / "children.jsonl").read_text()
    keys = sorted(p.name for p in (run / "children").iterdir())

    result = _search(run, tmp_path / "base", "ray")  # nothing left to train: Ray never starts

    assert (victim / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in victim.iterdir()) == ["precious.txt"]
    assert (run / "children.jsonl").read_text() == before
    assert sorted(p.name for p in (run / "children").iterdir()) == keys
    assert result.done and [r.key for r in result.records] == keys


def test_a_children_folder_that_links_out_is_not_written_through(finished_search: Path,
                                                                  tmp_path: Path) -> None:
    """children/ replaced by a link to a folder elsewhere: adopting a finished child there
    would replace that folder's g000c00; it is refused instead."""
    run = shutil.copytree(finished_search / "a" / "b" / "run", tmp_path / "run")
    elsewhere = tmp_path / "elsewhere"
    shutil.move(str(run / "children"), elsewhere)
    (elsewhere / "g000c00" / "precious.txt").write_text("keep me")
    (run / "children").symlink_to(elsewhere, target_is_directory=True)
    before = snapshot(elsewhere)
    source = tmp_path / "finished"  # the same child, finished again in Tune's storage
    shutil.copytree(elsewhere / "g000c00", source)
    (source / "precious.txt").unlink()

    adopted = _adopt(SearchDir(run), "g000c00",
                     lambda tmp: shutil.copytree(source, tmp, dirs_exist_ok=True))

    assert adopted is None
    assert snapshot(elsewhere) == before


def test_a_recorded_checkpoint_outside_the_search_is_refused(finished_search: Path,
                                                             tmp_path: Path) -> None:
    run = shutil.copytree(finished_search / "a" / "b" / "run", tmp_path / "run")
    record = read_records(run / "children.jsonl")[0]
    record.checkpoint = "../../elsewhere"
    from growth.controllers.driver import SearchResult

    result = SearchResult(run, [record], [record], 1, run, None, 0.0)
    with pytest.raises(RunDirError, match="outside"):
        result.path(record)


# ---- comparisons: labels, name, run folders, --out ------------------------------------------
BASE = {"name": "tiny", "seed": 0, "threads": 1,
        "data": {"dataset": "digits", "stream": "permuted", "n_tasks": 2,
                 "max_train_per_task": 100},
        "model": {"kind": "mlp", "hidden": [8]}, "train": {"epochs": 1, "lr": 0.05}}


def _compare(tmp: Path, strategies: list, name: str = "cmp") -> Path:
    (tmp / "base.yaml").write_text(yaml.safe_dump(BASE))
    path = tmp / "compare.yaml"
    path.write_text(yaml.safe_dump({"name": name, "base": "base.yaml", "seeds": [0],
                                    "strategies": strategies}))
    return path


@contextmanager
def no_ray(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A tripwire: the comparison must be refused before it asks for Ray."""
    import growth.cluster

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("Ray was asked for: the comparison was not refused first")

    monkeypatch.setattr(growth.cluster, "ray_cluster", refuse)
    yield


@pytest.mark.parametrize("label", ["../../esc_label", "/tmp/esc_label", "a/b", "..", "~x"])
def test_a_label_that_is_not_a_plain_name_is_refused(tmp_path: Path, label: str) -> None:
    path = _compare(tmp_path, ["finetune", {"name": "finetune", "label": label}])
    with pytest.raises(ConfigError, match="strategies.1.label.*not a plain name"):
        load_compare(path)


@pytest.mark.parametrize("name", ["../esc", "/tmp/esc", "a/b"])
def test_a_comparison_name_that_is_not_a_plain_name_is_refused(tmp_path: Path, name: str
                                                               ) -> None:
    with pytest.raises(ConfigError, match="name.*not a plain name"):
        load_compare(_compare(tmp_path, ["finetune"], name=name))


def test_a_run_folder_that_links_out_of_the_comparison_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _compare(tmp_path, ["finetune"])
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "compare.json").write_text("{}")
    (out / "finetune-s0").symlink_to(elsewhere, target_is_directory=True)
    with no_ray(monkeypatch), pytest.raises(RunDirError, match="outside"):
        run_compare(path, out)
    assert list(elsewhere.iterdir()) == []


def test_compare_refuses_an_out_folder_it_did_not_write(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    """--out an existing run directory: refused, nothing written into it."""
    path = _compare(tmp_path, ["finetune"])
    run = tmp_path / "a_run"
    run.mkdir()
    (run / "config.yaml").write_text("name: mine\n")
    before = snapshot(run)
    with no_ray(monkeypatch):
        assert main(["compare", str(path), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "compare.json" in err, err
    assert snapshot(run) == before


# ---- growth compress --out --------------------------------------------------------------------
def _saved_network(folder: Path) -> Path:
    import torch

    torch.manual_seed(0)
    add_head(mlp((1, 8, 8), [16]), "t0", 10).save(folder)
    return folder


def test_compress_refuses_an_out_folder_it_did_not_write(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    net = _saved_network(tmp_path / "net")
    run = tmp_path / "run"
    main(["run", str(write_config(tmp_path / "c.yaml", data__n_tasks=1, train__epochs=1)),
          "--out", str(run), "--quiet"])
    capsys.readouterr()
    before = snapshot(run)
    code = main(["compress", str(net), "--budget", "0.5", "--data", "digits", "--epochs", "1",
                 "--out", str(run)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert str(run) in err and "compress.json" in err, err
    assert snapshot(run) == before


def test_compress_replaces_its_own_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    """A folder compress wrote (compress.json marks it) is replaced whole; so is an empty
    one; the default NETWORK-compressed follows the same rule."""
    net = _saved_network(tmp_path / "net")
    args = ["compress", str(net), "--data", "digits", "--epochs", "1"]
    (tmp_path / "empty").mkdir()
    assert main([*args, "--budget", "0.5", "--out", str(tmp_path / "empty")]) == 0
    assert main([*args, "--budget", "0.5"]) == 0
    assert main([*args, "--budget", "0.25"]) == 0  # again: its own folder
    summary = json.loads((tmp_path / "net-compressed" / "compress.json").read_text())
    assert summary["format"] == "growth.compress"
    assert summary["settings"]["budget"] == 0.25
    assert sorted(p.name for p in (tmp_path / "net-compressed").iterdir()) == [
        "compress.json", "structure.json", "weights.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_run_and_report_refuse_folders_of_other_files(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    """`growth run --out` a compressed network's folder would have written run.json,
    config.yaml and metrics.json among its files; `growth report --out` a run directory its
    report.md and plots: both are refused and change nothing. A new run still goes into an
    empty folder, and a report into its own folder again."""
    net = _saved_network(tmp_path / "net")
    assert main(["compress", str(net), "--budget", "0.5", "--data", "digits", "--epochs", "1",
                 "--out", str(tmp_path / "small")]) == 0
    cfg = write_config(tmp_path / "c.yaml", data__n_tasks=1, train__epochs=1)
    before = snapshot(tmp_path / "small")
    capsys.readouterr()
    assert main(["run", str(cfg), "--out", str(tmp_path / "small"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "did not write" in err, err
    assert snapshot(tmp_path / "small") == before
    (tmp_path / "run").mkdir()
    assert main(["run", str(cfg), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    before = snapshot(tmp_path / "small")
    capsys.readouterr()
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "small")]) == 2
    assert "report folder" in capsys.readouterr().err
    assert snapshot(tmp_path / "small") == before
    assert main(["report", str(tmp_path / "run")]) == 0
    assert main(["report", str(tmp_path / "run")]) == 0


@pytest.mark.parametrize("damage, words", [
    ("nan", "holds NaN or infinite values"),
    ("float64", "is torch.float64"),
])
def test_compress_reads_the_network_as_untrusted(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str],
                                                 damage: str, words: str) -> None:
    """NaN weights used to surface as "training diverged ... lower train.lr", a float64 file
    as a dtype traceback; both are one line naming the weights file."""
    import torch
    from safetensors.torch import load_file, save_file

    net = _saved_network(tmp_path / "net")
    weights = net / "weights.safetensors"
    tensors = load_file(str(weights))
    if damage == "nan":
        first = sorted(tensors)[0]
        tensors[first] = torch.full_like(tensors[first], math.nan)
    else:
        tensors = {k: v.double() for k, v in tensors.items()}
    save_file(tensors, str(weights))
    code = main(["compress", str(net), "--budget", "0.5", "--data", "digits", "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert str(weights) in err and words in err, err
    assert not (tmp_path / "net-compressed").exists()


# ---- modes from the umask -----------------------------------------------------------------------
@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask", [0o077, 0o022])
def test_files_get_the_modes_the_umask_gives(tmp_path: Path, mask: int) -> None:
    """Weights, configs, metrics and checkpoints were forced to 0644 (folders 0755) whatever
    the umask; under 077 they were readable by everyone."""
    cfg = write_config(tmp_path / "c.yaml", data__n_tasks=2, train__epochs=1,
                       data__max_train_per_task=100)
    run = tmp_path / "run"
    with umask(mask):
        assert main(["run", str(cfg), "--out", str(run), "--quiet"]) == 0
    files = [p for p in run.rglob("*") if p.is_file()]
    folders = [p for p in run.rglob("*") if p.is_dir()]
    assert any(p.parent.name == "graph" for p in files) and any(
        p.name == "metrics.json" for p in files)
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) & ~(0o666 & ~mask) == 0, (p, oct(p.stat().st_mode))
    for p in folders:
        assert stat.S_IMODE(p.stat().st_mode) & ~(0o777 & ~mask) == 0, (p, oct(p.stat().st_mode))
    if mask == 0o022:  # and nothing is stricter than a plain open() would make it
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in files
                   if p.name != ".lock")
