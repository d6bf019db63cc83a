"""An interrupt is an interrupt: SIGINT (Ctrl-C) and SIGTERM stop every command promptly with
a non-zero exit, the run stays resumable and is never marked done, and nothing interrupted is
recorded as a result. A driver's death takes its Ray work with it; Ray's own output goes to
the run's ray.log, never the terminal.

Ray Tune used to swallow Ctrl-C (it ended the generation, counted the unfinished children
as failed and went on, so a second Ctrl-C wrote `done: true` and exited 0), and left its
handler installed, so the test session ignored Ctrl-C after a search."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from growth.controllers import make_controller
from growth.controllers.driver import Budget, Resources, SearchProgress, run_search
from growth.controllers.records import read_records
from growth.controllers.trial import TrialSpec
from searchkit import CHILD_TRAIN, digits_task, search_config, small_space, trained_base

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from probe_kills import processes_of, survivors  # noqa: E402

pytestmark = pytest.mark.slow


def _search(folder: Path, base: Path, progress: SearchProgress | None = None) -> Any:
    task = digits_task()
    from growth.graph import NetGraph

    space = small_space(NetGraph.load(base))
    controller = make_controller("random", space, {"wider_actions": 1, "deeper_actions": 1},
                                 seed=2)
    return run_search(folder, base, controller, space, task, TrialSpec(train=CHILD_TRAIN),
                      Budget(children=3, generations=2), Resources(concurrency=1),
                      seed=2, parent_acc=0.5, backend="ray", progress=progress)


def test_ctrl_c_during_a_tune_generation_interrupts_the_search(tmp_path: Path,
                                                               ray_session: Any) -> None:
    """SIGINT as the first child of generation 0 is recorded: KeyboardInterrupt reaches the
    caller, search.json stays at generation 0 and not done, no child is recorded as failed,
    Ctrl-C works again afterwards, and the search resumes to its end."""
    base = tmp_path / "base"
    trained_base(digits_task(), base, epochs=2)
    handler = signal.getsignal(signal.SIGINT)

    def on_child(record: Any, board: Any) -> None:
        os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        _search(tmp_path / "run", base, SearchProgress(on_child=on_child))
    assert signal.getsignal(signal.SIGINT) is handler  # Tune's handler did not stay
    state = json.loads((tmp_path / "run" / "search.json").read_text())
    assert state["done"] is False and state["generation"] == 0
    records = read_records(tmp_path / "run" / "children.jsonl")
    assert len(records) == 1 and records[0].ok

    result = _search(tmp_path / "run", base)
    assert result.done and result.generations == 2
    after = read_records(tmp_path / "run" / "children.jsonl")
    keys = [r.key for r in after]
    assert len(keys) == len(set(keys)) > 1 and after[0].key == records[0].key
    assert {r.generation for r in after} == {0, 1} and all(r.ok for r in after)


def _cli(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "growth", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _ended(proc: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
    """The output of `proc` once it exits; killed (and the test failed) if it has not within
    `timeout` seconds: a command that hangs on its way out is no prompt stop."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"still running {timeout:g} s after the signal: {out!r} {err!r}")


def _wait_for(check: Any, proc: subprocess.Popen[str], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_growth_search_stops_on_a_signal_and_resumes(tmp_path: Path, sig: int, code: int
                                                     ) -> None:
    """`growth search --quiet` with its own local Ray: the signal arrives once a child is
    recorded; the command exits promptly with 130 / 143, says how to go on and nothing else,
    leaves no process behind, and `growth resume` finishes the search."""
    cfg = search_config(tmp_path, children=2, backend="ray")
    run = tmp_path / "run"
    proc = _cli("search", str(cfg), "--out", str(run), "--quiet")
    records = run / "children.jsonl"
    _wait_for(lambda: records.is_file() and records.read_text().strip(), proc)
    tree = processes_of(proc.pid)
    start = time.monotonic()
    proc.send_signal(sig)
    out, err = _ended(proc, 120)
    assert proc.returncode == code, (out, err)
    assert time.monotonic() - start < 60
    assert out == "" and err.count("\n") == 1 and "growth resume" in err, (out, err)
    assert not survivors(tree, wait_s=10)
    state = json.loads((run / "search.json").read_text())
    assert state["done"] is False
    assert all(r.ok for r in read_records(records))
    if sig == signal.SIGTERM:  # one resume is enough to show the run is whole
        resumed = _cli("resume", str(run), "--quiet")
        out, err = resumed.communicate(timeout=900)
        assert resumed.returncode == 0, err
        assert json.loads((run / "search.json").read_text())["done"] is True
        assert len(read_records(records)) == 4


def test_growth_run_stops_on_sigterm_and_resumes(tmp_path: Path) -> None:
    """SIGTERM used to kill the process where it stood (status -15); now it is an interrupt:
    status 143, the log says so, and the run resumes."""
    from runfiles import write_config

    cfg = write_config(tmp_path / "c.yaml", train__epochs=30, data__n_tasks=2)
    run = tmp_path / "run"
    proc = _cli("run", str(cfg), "--out", str(run), "--quiet")
    _wait_for(lambda: (run / "checkpoints" / "task_000").is_dir(), proc)
    proc.send_signal(signal.SIGTERM)
    out, err = _ended(proc, 120)
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM)" in err and "Traceback" not in err
    assert "interrupted" in (run / "log.txt").read_text()
    resumed = _cli("resume", str(run), "--quiet")
    assert resumed.wait(timeout=900) == 0
    assert json.loads((run / "metrics.json").read_text())["finished_tasks"] == 2


def test_ray_lines_go_to_the_log_not_the_terminal(tmp_path: Path, ray_session: Any,
                                                  capfd: pytest.CaptureFixture[str]) -> None:
    """A worker that dies makes Ray print a warning in the driver (from its own thread, about
    the kernel OOM killer among others): it lands in the run's ray.log."""
    import ray

    from growth.cluster import ray_cluster

    log = tmp_path / "ray.log"
    with ray_cluster(log_file=log):
        @ray.remote(max_retries=0)
        def crash() -> None:
            os._exit(1)

        with pytest.raises(Exception, match="died|crashed|exited"):
            ray.get(crash.remote())
        deadline = time.monotonic() + 60
        while "A worker died" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
    out, err = capfd.readouterr()
    assert "A worker died" in log.read_text()
    assert "worker died" not in out.lower() and "worker died" not in err.lower()


def test_a_sigkilled_driver_takes_its_ray_with_it(tmp_path: Path) -> None:
    """A process that started a local Ray (ray_cluster) and runs a task is SIGKILLed: 10 s
    later none of the processes it had (the keeper, GCS, raylet, agents, workers) is alive;
    Ray's agents used to stay."""
    script = ("import os, sys, time, ray\n"
              "from growth.cluster import ray_cluster\n"
              "with ray_cluster(num_cpus=1):\n"
              "    ref = ray.remote(lambda: time.sleep(600)).remote()\n"
              "    print('up', flush=True)\n"
              "    time.sleep(600)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
    time.sleep(3)  # the task's worker is up
    tree = processes_of(proc.pid)
    assert len(tree) >= 4, tree  # the keeper, GCS, raylet, a worker at least
    proc.kill()
    proc.wait()
    assert survivors(tree, wait_s=10) == []


def test_ctrl_c_during_recs_search_stops_the_run(tmp_path: Path) -> None:
    """Ctrl-C while REC's search trains children on Ray Tune used to end the generation with
    every child failed, keep the parent ("no child finished") and finish the run with exit 0
    and a lower ACC; now the run stops with 130, task 1 is not checkpointed, no child is
    recorded as failed, and a resume finishes it."""
    from runfiles import write_config

    # children trained one at a time: the signal comes with the first recorded, while the
    # next one trains
    rec = {"name": "rec", "compress": {"epochs": 1}, "expansion": "shared", "owners": False,
           "search": {"controller": "random", "children": 3, "epochs": 3, "backend": "ray",
                      "concurrency": 1,
                      "controller_params": {"wider_actions": 1, "deeper_actions": 1},
                      "space": {"widths": {"fc": [16, 24, 32, 48, 64]}}}}
    cfg = write_config(tmp_path / "c.yaml", strategy=rec, data__n_tasks=2, train__epochs=2,
                       data__max_train_per_task=150, model__hidden=[16])
    run = tmp_path / "run"
    proc = _cli("run", str(cfg), "--out", str(run), "--quiet")
    records = run / "work" / "task_001" / "search" / "children.jsonl"
    _wait_for(lambda: records.is_file() and records.read_text().strip(), proc)
    proc.send_signal(signal.SIGINT)
    out, err = _ended(proc, 120)
    planned = re.search(r"generation 0: \d+ children, (\d+) to train",
                        (run / "log.txt").read_text())
    assert planned is not None and int(planned.group(1)) >= 2  # one was still training
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err and "growth resume" in err, err
    assert not (run / "checkpoints" / "task_001").exists()
    assert all(r.ok for r in read_records(records))
    resumed = _cli("resume", str(run), "--quiet")
    assert resumed.wait(timeout=900) == 0
    assert json.loads((run / "metrics.json").read_text())["finished_tasks"] == 2
