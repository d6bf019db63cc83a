"""Run directories: one writer at a time, paths named in errors, leftovers cleaned, metrics
rebuilt, a finished run left alone, files readable by others."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from runfiles import snapshot, unwritable, write_config

from growth.campaign import Campaign, latest_checkpoint
from growth.cli import main
from growth.config import load_config
from growth.metrics import make_metrics
from growth.rundir import LOCK, RunLock

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def cli(*args: str | Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "growth", *map(str, args)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("finished")
    out = root / "run"
    Campaign(load_config(write_config(root / "c.yaml", train__epochs=1)), out).start()
    return out


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# ---- the lock -------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_runs_on_one_out_exactly_one_runs(tmp_path: Path) -> None:
    long = {"data__max_train_per_task": None, "train__epochs": 15}
    configs = [write_config(tmp_path / f"{s}.yaml", strategy={"name": s}, **long)
               for s in ("finetune", "l2")]
    out = tmp_path / "run"
    procs = [cli("run", c, "--out", out, "--quiet") for c in configs]
    results = [(p.pid, *p.communicate(timeout=300), p.returncode) for p in procs]
    codes = sorted(r[3] for r in results)
    assert codes == [0, 2], results
    (w_pid, _, _, _), (l_pid, _, l_err, _) = sorted(results, key=lambda r: r[3])
    winner = "finetune" if w_pid == procs[0].pid else "l2"
    assert "Traceback" not in l_err and len(l_err.strip().splitlines()) == 1, l_err
    # the loser may arrive before the winner has written its pid into the lock file
    assert f"in use by another growth process (pid {w_pid})" in l_err or \
        "in use by another growth process (a process starting up)" in l_err or \
        "already holds a run" in l_err, l_err
    # the winner's directory is whole: its config, its strategy in every checkpoint, all tasks
    assert yaml.safe_load((out / "config.yaml").read_text())["strategy"]["name"] == winner
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finished_tasks"] == 3 and metrics["run"]["strategy"] == winner
    for k in range(3):
        state = json.loads((out / "checkpoints" / f"task_{k:03d}" / "state.json").read_text())
        assert state["strategy"] == winner
    assert main(["resume", str(out), "--quiet"]) == 0  # every checkpoint check passes


def test_a_second_writer_is_refused_with_the_holders_pid(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path / "c.yaml", data__max_train_per_task=None, train__epochs=1000)
    out = tmp_path / "run"
    first = cli("run", cfg, "--out", out, "--quiet")
    try:
        deadline = time.time() + 300
        while time.time() < deadline and first.poll() is None and not (
                (out / "run.json").is_file() and (out / LOCK).read_text().strip()):
            time.sleep(0.02)
        assert first.poll() is None, first.communicate()
        for args in (["run", str(cfg), "--out", str(out)], ["resume", str(out)]):
            assert main([*args, "--quiet"]) == 2
            err = capsys.readouterr().err
            assert f"in use by another growth process (pid {first.pid})" in err, err
        assert first.poll() is None  # the holder runs on, undisturbed
    finally:
        first.kill()
        first.wait()


def test_resume_refused_while_locked_changes_nothing(finished_run: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    run = copy_run(finished_run, tmp_path / "run")
    before = snapshot(run)
    with RunLock(run):  # another process's lock: flock(2) locks are per open file
        assert main(["resume", str(run), "--quiet"]) == 2
        err = capsys.readouterr().err
    assert f"in use by another growth process (pid {os.getpid()})" in err
    assert snapshot(run) == before


def test_stale_lock_of_a_dead_process_is_taken_over_and_logged(finished_run: Path,
                                                               tmp_path: Path) -> None:
    run = copy_run(finished_run, tmp_path / "run")
    for name in ("task_001", "task_002"):
        import shutil

        shutil.rmtree(run / "checkpoints" / name)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / LOCK).write_text(f"{dead.pid}\n")  # left by a killed run: its flock died with it
    assert main(["resume", str(run), "--quiet"]) == 0
    assert f"stale lock of pid {dead.pid}" in (run / "log.txt").read_text()
    assert (run / LOCK).read_text() == ""  # released
    assert json.loads((run / "metrics.json").read_text())["finished_tasks"] == 3


# ---- paths ----------------------------------------------------------------------------------
def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_out_that_is_a_file_or_under_a_file(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path / "c.yaml")
    a_file = tmp_path / "taken"
    a_file.write_text("mine")
    for out in (a_file, a_file / "run"):
        assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 2
        err = one_line_error(capsys)
        assert str(a_file) in err and "is a file" in err
    assert a_file.read_text() == "mine"


def test_unwritable_out_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path / "c.yaml")
    parent = tmp_path / "locked"
    parent.mkdir()
    with unwritable(parent):
        assert main(["run", str(cfg), "--out", str(parent / "run"), "--quiet"]) == 2
        err = one_line_error(capsys)
        assert str(parent / "run") in err and "not writable" in err
        assert main(["run", str(cfg), "--out", str(parent), "--quiet"]) == 2
        assert str(parent) in one_line_error(capsys)
    assert list(parent.iterdir()) == []


def test_unwritable_run_directory_for_resume_and_report(finished_run: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    run = copy_run(finished_run, tmp_path / "run")
    import shutil

    shutil.rmtree(run / "checkpoints" / "task_002")
    before = snapshot(run)
    with unwritable(run):
        assert main(["resume", str(run), "--quiet"]) == 2
        assert str(run) in one_line_error(capsys)
        assert main(["report", str(run)]) == 2
        err = one_line_error(capsys)
        assert str(run / "report") in err and "not writable" in err
    assert snapshot(run) == before


def test_resume_of_what_is_not_a_run_directory(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    for path, needle in ((tmp_path / "missing", "no such run directory"),
                         (tmp_path / "empty", "not a run directory"),
                         (tmp_path / "file", "not a folder")):
        assert main(["resume", str(path), "--quiet"]) == 2
        err = one_line_error(capsys)
        assert str(path) in err and needle in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file"]
    assert list((tmp_path / "empty").iterdir()) == []


# ---- after a kill, and after the end ---------------------------------------------------------
def test_leftovers_removed_and_lagging_metrics_rebuilt(finished_run: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    run = copy_run(finished_run, tmp_path / "run")
    full = json.loads((run / "metrics.json").read_text())
    behind = make_metrics(full["run"], full["tasks"], full["R"][:3] + [[None] * 3],
                          full["sizes"][:2], full["wall_time_s"][:2])
    (run / "metrics.json").write_text(json.dumps(behind))  # killed before the last write
    (run / "metrics.csv").write_text("after_task,task,task_name,accuracy\n")
    (run / ".metrics.json.k1lled.tmp").write_text("")
    (run / "checkpoints" / ".tmp_task_002").mkdir()
    (run / "checkpoints" / ".tmp_task_002" / "state.json").write_text("{")
    assert main(["resume", str(run), "--quiet"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert json.loads((run / "metrics.json").read_text()) == full
    assert (run / "metrics.csv").read_text() == (finished_run / "metrics.csv").read_text()
    assert not (run / ".metrics.json.k1lled.tmp").exists()
    assert not (run / "checkpoints" / ".tmp_task_002").exists()
    assert latest_checkpoint(run).name == "task_002"


def test_resume_of_a_finished_run_has_nothing_to_do(finished_run: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    run = copy_run(finished_run, tmp_path / "run")
    before = snapshot(run)
    assert main(["resume", str(run), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"{run}: all 3 tasks are finished; nothing to do" in out
    assert snapshot(run) == before  # not even the log is touched


def test_run_files_are_readable_by_others(finished_run: Path) -> None:
    files = [p for p in finished_run.rglob("*") if p.is_file()]
    assert len(files) > 10
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
    for d in (p for p in finished_run.rglob("*") if p.is_dir()):
        assert stat.S_IMODE(d.stat().st_mode) & 0o055 == 0o055, d
