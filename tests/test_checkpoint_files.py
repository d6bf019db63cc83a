"""Checkpoints that write each tensor once: strategy tensors in content-addressed files that
later checkpoints name, per-task state read from its file when it is used, retention that
never removes what the newest checkpoint names, and what a run costs on disk and in memory."""

from __future__ import annotations

import json
import mmap
import shutil
import signal
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from runfiles import write_config
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from growth.campaign import Campaign, Progress, resume_run, run_config_of
from growth.checkpoint import FILES_V1, Saved, apply_retention, latest_checkpoint
from growth.config import load_config
from growth.io import sha256
from growth.regularizers import build_quadratic
from growth.report import write_report
from growth.resources import Collector, disk_bytes, peak_rss_bytes, reset_peak_rss
from growth.strategies import Context
from growth.strategies.ewc import trained_parameters
from growth.tensorfiles import StateDict, TensorRef

QUICK = {"train__epochs": 2, "data__max_train_per_task": 100}


def cfg(tmp: Path, strategy: dict, **changes: object):  # type: ignore[no-untyped-def]
    return load_config(write_config(tmp / f"{strategy['name']}.yaml", strategy=strategy,
                                    **{**QUICK, **changes}))


def manifest(run: Path, task: int) -> dict:
    return json.loads((run / "checkpoints" / f"task_{task:03d}" / "manifest.json").read_text())


def store(run: Path) -> list[Path]:
    return sorted((run / "tensors").glob("*.safetensors"))


def keys_of(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


class Stop(Exception):
    """Raised from a progress callback: the run stops as a kill would, after a checkpoint."""


def stop_before(task: int) -> Progress:
    def start(i: int, _t: object) -> None:
        if i == task:
            raise Stop
    return Progress(on_task_start=start)


# ---- the store and the state mapping ----------------------------------------------------------
def test_the_store_writes_a_group_once_and_rewrites_a_damaged_file_of_its_name(
        tmp_path: Path) -> None:
    from growth.errors import CheckpointError
    from growth.tensorfiles import TensorStore

    store = TensorStore(tmp_path / "tensors")
    tensors = {"fisher/0/w": torch.arange(4.0), "fisher/0/b": torch.ones(2),
               "fisher/1/w": torch.zeros(4), "owner/all/w": torch.ones(4, dtype=torch.int8)}
    refs = store.save(tensors)
    files = {r.path for r in refs.values()}
    assert len(files) == 3 and refs["fisher/0/w"].path == refs["fisher/0/b"].path
    assert keys_of(refs["fisher/0/w"].path) == {"fisher/0/w", "fisher/0/b"}
    assert all(p.name == f"{sha256(p)}.safetensors" for p in files)
    # a state read from the files keeps them: nothing is written, the same references return
    state = StateDict()
    for k, r in refs.items():
        state.refer(k, r)
    stamp = {p: p.stat().st_mtime_ns for p in files}
    again = store.save(state)
    assert again == refs and {p: p.stat().st_mtime_ns for p in files} == stamp
    # the same tensors in memory: the same names; a damaged file of that name is replaced
    victim = refs["fisher/1/w"].path
    victim.write_bytes(b"\x00" * 16)
    assert store.save(dict(tensors)) == refs
    assert torch.equal(refs["fisher/1/w"].load(), torch.zeros(4))
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"{victim} is missing.*'fisher/1/w'"):
        refs["fisher/1/w"].load()


def test_a_state_entry_read_from_a_file_is_read_again_at_each_access_until_replaced(
        tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    save_file({"fisher/0/w": torch.ones(3)}, str(path))
    state = StateDict({"anchor/latest/w": torch.zeros(3)})
    state.refer("fisher/0/w", TensorRef(path, "fisher/0/w"))
    first = state["fisher/0/w"]
    first.add_(5)  # a fresh tensor: what is stored does not change
    assert torch.equal(state["fisher/0/w"], torch.ones(3)) and state["fisher/0/w"] is not first
    copy = state.copy()
    assert copy.ref("fisher/0/w") == TensorRef(path, "fisher/0/w")
    assert copy.ref("anchor/latest/w") is None and copy["anchor/latest/w"] is state[
        "anchor/latest/w"]
    state["fisher/0/w"] = torch.full((3,), 2.0)  # replaced: held in memory from now on
    assert state.ref("fisher/0/w") is None and copy.ref("fisher/0/w") is not None
    assert sorted(state) == ["anchor/latest/w", "fisher/0/w"] and len(state) == 2
    assert dict(copy)["fisher/0/w"].tolist() == [1.0, 1.0, 1.0]


# ---- each tensor is written once -------------------------------------------------------------
def test_a_finished_tasks_tensors_are_written_once_and_named_by_later_checkpoints(
        tmp_path: Path) -> None:
    run = tmp_path / "run"
    first: dict[str, tuple[int, int]] = {}

    def after(i: int, _m: dict) -> None:
        if i == 0:
            first.update({p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in store(run)})

    Campaign(cfg(tmp_path, {"name": "ewc"}, data__n_tasks=4), run, Progress(
        on_task_end=after)).start()
    files = store(run)
    # one file per kind and task: fisher/k and anchor/k, 2 per task, none holding two tasks
    assert len(files) == 8
    groups = [{k.rsplit("/", 1)[0] for k in keys_of(p)} for p in files]
    assert all(len(g) == 1 for g in groups)
    assert sorted(g.pop() for g in groups) == sorted(
        f"{what}/{k}" for what in ("anchor", "fisher") for k in range(4))
    # task 0's files were written once: the same files (inode, time) when the run ends, and
    # every later checkpoint names them
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files
            if p.name in first} == first and len(first) == 2
    named = [set(manifest(run, t)["tensors"].values()) for t in range(4)]
    assert [len(n) for n in named] == [2, 4, 6, 8]
    assert all(named[t] <= named[t + 1] for t in range(3))
    # each file is named by its bytes, and checkpoint folders hold no strategy tensors
    assert all(p.name == f"{sha256(p)}.safetensors" for p in files)
    for t in range(4):
        folder = run / "checkpoints" / f"task_{t:03d}"
        assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) \
            == sorted(["graph/structure.json", "graph/weights.safetensors", "state.json",
                       "manifest.json"])
    # the run's tensor bytes are the four tasks' state once: no file is counted twice
    sizes = {t: sum(p.stat().st_size for p in files if p.name[:64] in named[t]) for t in range(4)}
    per_task = sizes[0]
    assert sizes[3] == pytest.approx(4 * per_task, rel=0.01)


def test_entries_of_running_slots_are_stored_again_only_when_they_change(
        tmp_path: Path) -> None:
    """SI keeps one running Omega and one anchor: each checkpoint names its own pair."""
    run = tmp_path / "si"
    Campaign(cfg(tmp_path, {"name": "si"}), run).start()
    named = [set(manifest(run, t)["tensors"].values()) for t in range(3)]
    assert all(len(n) == 2 for n in named) and not (named[0] & named[1] or named[1] & named[2])
    assert len(store(run)) == 6


# ---- per-task state out of memory -------------------------------------------------------------
def test_per_task_state_is_read_from_its_files_and_running_state_stays_in_memory(
        tmp_path: Path) -> None:
    ewc = Campaign(cfg(tmp_path, {"name": "ewc"}), tmp_path / "ewc")
    ewc.start()
    state = ewc.strategy.state
    assert isinstance(state, StateDict) and len(state) == 3 * 2 * 4
    refs = state.refs()
    assert set(refs) == set(state)  # every fisher/k and anchor/k lives in its file
    names = manifest(tmp_path / "ewc", 2)["tensors"]
    for key, ref in refs.items():
        assert ref.path == tmp_path / "ewc" / "tensors" / f"{names[key]}.safetensors"
        assert torch.equal(state[key], load_file(str(ref.path))[key])
    packnet = Campaign(cfg(tmp_path, {"name": "packnet", "shared": "per_task"}),
                       tmp_path / "packnet")
    packnet.start()
    state = packnet.strategy.state
    held = {k for k in state if state.ref(k) is None}  # type: ignore[union-attr]
    assert held == {k for k in state if k.startswith("owner/all/")} and held
    assert all(state.ref(k) is not None for k in state if k.startswith("shared/"))  # type: ignore[union-attr]


def test_a_penalty_build_holds_one_tasks_tensors_at_a_time(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """MWC over six finished tasks: the relatedness and the merged penalty read each task's
    Fisher and anchors from their files and let them go before the next task's."""
    campaign = Campaign(cfg(tmp_path, {"name": "mwc"}, data__n_tasks=6, train__epochs=1),
                        tmp_path / "run")
    campaign.start()
    strategy = campaign.strategy
    per_task = sum(1 for k in strategy.state if k.startswith("fisher/0/"))
    live, peak = [0], [0]
    load = TensorRef.load

    def counted(ref: TensorRef) -> torch.Tensor:
        t = load(ref)
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        weakref.finalize(t, lambda: live.__setitem__(0, live[0] - 1))
        return t

    monkeypatch.setattr(TensorRef, "load", counted)
    tasks = campaign.tasks
    ctx = Context(campaign.model, tasks[5], tasks[:5], campaign.head_of, campaign.label_of,
                  torch.device("cpu"), seed=7)
    strategy.extra["relatedness"].pop("5")  # measured again, against all six tasks
    rec = strategy.relatedness(ctx)
    assert rec["tasks"] == list(range(6))
    assert 0 < peak[0] <= per_task  # one task's Fisher at a time
    peak[0] = 0
    quad = build_quadratic(ctx.model.module, strategy.components(ctx),
                           trained_parameters(strategy, ctx))
    assert quad.terms and live[0] == 0
    assert 2 * per_task < peak[0] <= 2 * 2 * per_task  # Fisher and anchors of <= 2 tasks


# ---- resume ----------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", [
    {"name": "mwc"}, {"name": "ewc"}, {"name": "packnet", "shared": "per_task"},
    {"name": "cpg", "ratios": [0.5], "prune_epochs": 1}, {"name": "er", "memory": 50},
], ids=lambda s: s["name"])
def test_a_run_resumed_from_shared_checkpoints_ends_with_the_same_R(
        strategy: dict, tmp_path: Path) -> None:
    config = cfg(tmp_path, strategy)
    full = Campaign(config, tmp_path / "full").start()
    part = tmp_path / "part"
    with pytest.raises(Stop):
        Campaign(config, part, stop_before(2)).start()
    assert latest_checkpoint(part).name == "task_001"
    before = {p.name for p in store(part)}
    resumed = resume_run(part)
    assert resumed["R"] == full["R"]
    assert {p.name for p in store(part)} >= before
    # the resumed run's files are the uninterrupted run's, file for file
    assert {p.name for p in store(part)} == {p.name for p in store(tmp_path / "full")}


def test_resume_removes_tensor_files_no_checkpoint_names_after_its_checks(
        tmp_path: Path) -> None:
    run = tmp_path / "run"
    full = Campaign(cfg(tmp_path, {"name": "ewc"}), run).start()
    only_last = set(manifest(run, 2)["tensors"].values()) - set(manifest(run, 1)["tensors"]
                                                                .values())
    shutil.rmtree(run / "checkpoints" / "task_002")  # as if killed before its rename
    (run / "tensors" / ".abc.safetensors.x.tmp").write_bytes(b"half")
    assert resume_run(run)["R"] == full["R"]
    assert not (run / "tensors" / ".abc.safetensors.x.tmp").exists()
    assert "removed 2 tensor file(s) that no checkpoint names" in (run / "log.txt").read_text()
    assert set(manifest(run, 2)["tensors"].values()) - set(manifest(run, 1)["tensors"]
                                                           .values()) == only_last


def test_a_version_1_checkpoint_still_resumes(tmp_path: Path) -> None:
    """Checkpoints written before tensor files were shared hold the strategy's tensors in
    task_NNN/strategy.safetensors."""
    config = cfg(tmp_path, {"name": "ewc"})
    full = Campaign(config, tmp_path / "full").start()
    run = tmp_path / "run"
    with pytest.raises(Stop):
        Campaign(config, run, stop_before(2)).start()
    ckpt = run / "checkpoints" / "task_001"
    m = manifest(run, 1)
    tensors = {k: load_file(str(run / "tensors" / f"{d}.safetensors"))[k]
               for k, d in m.pop("tensors").items()}
    save_file(tensors, str(ckpt / "strategy.safetensors"))
    shutil.rmtree(run / "tensors")
    shutil.rmtree(run / "checkpoints" / "task_000")
    m["version"] = 1
    m["files"] = {rel: sha256(ckpt / rel) for rel in FILES_V1}
    (ckpt / "manifest.json").write_text(json.dumps(m))
    assert resume_run(run)["R"] == full["R"]
    assert manifest(run, 2)["version"] == 2


# ---- retention -------------------------------------------------------------------------------
def test_retention_keeps_the_newest_checkpoints_and_every_file_they_name(tmp_path: Path
                                                                         ) -> None:
    config = cfg(tmp_path, {"name": "ewc"}, data__n_tasks=4, checkpoints={"keep": 2})
    kept = Campaign(config, tmp_path / "kept").start()
    run = tmp_path / "kept"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["task_002", "task_003"]
    newest = set(manifest(run, 3)["tensors"].values())
    assert {p.name[:64] for p in store(run)} == newest  # task 0's files too: task 3 names them
    assert len(newest) == 8
    full = Campaign(cfg(tmp_path, {"name": "ewc"}, data__n_tasks=4), tmp_path / "all").start()
    assert kept["R"] == full["R"]
    assert kept["storage"]["checkpoints"] == 2 and full["storage"]["checkpoints"] == 4
    assert kept["storage"]["run_bytes"] < full["storage"]["run_bytes"]


def test_a_run_that_keeps_one_checkpoint_resumes_to_the_same_R(tmp_path: Path) -> None:
    config = cfg(tmp_path, {"name": "mwc"}, data__n_tasks=4, checkpoints={"keep": 1})
    full = Campaign(config, tmp_path / "full").start()
    part = tmp_path / "part"
    with pytest.raises(Stop):
        Campaign(config, part, stop_before(3)).start()
    assert [p.name for p in (part / "checkpoints").iterdir()] == ["task_002"]
    assert {p.name[:64] for p in store(part)} == set(manifest(part, 2)["tensors"].values())
    assert resume_run(part)["R"] == full["R"]
    assert [p.name for p in (part / "checkpoints").iterdir()] == ["task_003"]


# A campaign in its own process whose first retention step is killed (SIGKILL) in the middle:
# "folder" after the first file of the oldest checkpoint folder is gone, "tensors" after the
# first tensor file only that folder named is gone.
KILLED_IN_RETENTION = """
import os, shutil, signal, sys
from pathlib import Path
from growth.campaign import Campaign
from growth.config import load_config

config, out, where = sys.argv[1:]
real_rmtree, real_unlink = shutil.rmtree, Path.unlink

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def rmtree(path, *args, **kwargs):
    if (Path(path) / "manifest.json").exists():
        real_unlink(Path(path) / "manifest.json")
        die()
    real_rmtree(path, *args, **kwargs)

def unlink(self, *args, **kwargs):
    real_unlink(self, *args, **kwargs)
    if self.parent.name == "tensors" and self.name.endswith(".safetensors"):
        die()

if where == "folder":
    shutil.rmtree = rmtree
else:
    Path.unlink = unlink
Campaign(load_config(config), Path(out)).start()
"""


@pytest.mark.parametrize(("where", "strategy"), [("folder", "mwc"), ("tensors", "si")])
def test_a_run_killed_while_retention_removes_files_resumes_to_the_same_R(
        where: str, strategy: str, tmp_path: Path) -> None:
    """SI: its running sums are stored again after every task, so an old checkpoint names
    files no newer one does."""
    config = cfg(tmp_path, {"name": strategy}, data__n_tasks=4, checkpoints={"keep": 1})
    full = Campaign(config, tmp_path / "full").start()
    run = tmp_path / "run"
    script = tmp_path / "killed.py"
    script.write_text(KILLED_IN_RETENTION)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / f"{strategy}.yaml"),
                           str(run), where], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert latest_checkpoint(run).name == "task_001"  # killed removing task_000's files
    left = sorted(p.name for p in (run / "checkpoints").iterdir())
    named = set(manifest(run, 1)["tensors"].values())
    if where == "folder":  # task_000's folder was out of the way before its files went
        assert left == [".tmp_removed_task_000", "task_001"]
    else:  # the folder is gone, some files only it named are left
        assert left == ["task_001"] and {p.name[:64] for p in store(run)} > named
    assert resume_run(run)["R"] == full["R"]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["task_003"]
    assert {p.name[:64] for p in store(run)} == set(manifest(run, 3)["tensors"].values())
    assert {p.name for p in store(run)} == {p.name for p in store(tmp_path / "full")}


def test_retention_removes_no_tensor_file_while_a_kept_manifest_is_unreadable(
        tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(Stop):
        Campaign(cfg(tmp_path, {"name": "ewc"}, data__n_tasks=4), run, stop_before(3)).start()
    files = {p.name for p in store(run)}
    names = manifest(run, 2)["tensors"]
    newest = Saved(run / "checkpoints" / "task_002",
                   {k: TensorRef(run / "tensors" / f"{d}.safetensors", k)
                    for k, d in names.items()})
    orphan = run / "tensors" / f"{'0' * 64}.safetensors"
    save_file({"x": torch.zeros(1)}, str(orphan))
    kept = run / "checkpoints" / "task_001" / "manifest.json"
    text = kept.read_text()
    kept.write_text("{broken")
    assert apply_retention(run, 2, newest) == [run / "checkpoints" / "task_000"]
    assert {p.name for p in store(run)} == files | {orphan.name}  # what task_001 names: unknown
    kept.write_text(text)
    removed = apply_retention(run, 1, newest)
    assert removed == [run / "checkpoints" / "task_001", orphan]
    assert {p.name for p in store(run)} == files == {f"{d}.safetensors" for d in names.values()}


def test_a_resume_may_change_how_many_checkpoints_are_kept(tmp_path: Path) -> None:
    config = cfg(tmp_path, {"name": "ewc"}, data__n_tasks=4)
    full = Campaign(config, tmp_path / "full").start()
    run = tmp_path / "run"
    with pytest.raises(Stop):
        Campaign(config, run, stop_before(2)).start()
    path = run / "config.yaml"
    path.write_text(path.read_text().replace("keep: null", "keep: 1"))
    assert resume_run(run)["R"] == full["R"]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["task_003"]
    assert run_config_of(run).checkpoints.keep == 1


# ---- what a run costs --------------------------------------------------------------------------
def du(*paths: Path) -> int:
    """Bytes on disk as du(1) counts them."""
    out = subprocess.run(["du", "-scB1", *map(str, paths)], capture_output=True, text=True,
                         check=True).stdout
    return int(out.strip().splitlines()[-1].split()[0])


def test_metrics_say_what_the_run_takes_on_disk_and_in_memory(tmp_path: Path) -> None:
    run = tmp_path / "run"
    m = Campaign(cfg(tmp_path, {"name": "ewc"}), run).start()
    storage = m["storage"]
    rewritten = [run / n for n in ("metrics.json", "metrics.csv", ".lock")]
    assert storage["run_bytes"] == du(run) - du(*rewritten)
    newest = run / "checkpoints" / "task_002"
    named = [run / "tensors" / f"{d}.safetensors"
             for d in set(manifest(run, 2)["tensors"].values())]
    assert storage["checkpoint_bytes"] == du(newest, *named)
    assert storage["checkpoints"] == 3 and storage["tensor_files"] == 6
    rss = m["peak_rss_bytes"]
    assert len(rss) == 3 and all(r > 10 * 2**20 for r in rss)
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk["storage"] == storage
    report = write_report([run]).read_text()
    section = report.split("## Disk and memory")[1].split("##")[0]
    assert "newest checkpoint" in section and "3 checkpoints kept, 6 tensor files" in section
    assert sum(1 for line in section.splitlines() if line.startswith("| perm-")) == 3


def test_peak_memory_starts_again_from_the_current_one_at_each_reset() -> None:
    if not reset_peak_rss():
        pytest.skip("this system cannot reset the peak resident memory")
    base = peak_rss_bytes()  # the current one: the reset just above forgot earlier highs
    big = mmap.mmap(-1, 64 * 2**20)  # 64 MiB of fresh pages (no allocator's cached ones),
    big.write(b"\1" * len(big))  # every one touched
    assert peak_rss_bytes() >= base + 60 * 2**20
    big.close()
    assert reset_peak_rss()
    assert peak_rss_bytes() < base + 32 * 2**20
    assert disk_bytes(Path(__file__)) == du(Path(__file__))


def test_collections_between_tasks_free_cycles_and_take_a_bounded_share_of_the_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import growth.resources as resources

    clock = [100.0]
    monkeypatch.setattr(resources.time, "perf_counter", lambda: clock[0])
    real = resources.gc.collect

    def slow_collect() -> int:
        clock[0] += 2.0  # a full collection that takes 2 s
        return real()

    monkeypatch.setattr(resources.gc, "collect", slow_collect)

    class Cycle:
        pass

    def garbage() -> weakref.ref:
        a = Cycle()
        a.me, a.weights = a, torch.ones(1000)  # a reference cycle
        return weakref.ref(a)

    c = Collector(share=0.05, min_wait_s=10.0)
    dead = garbage()
    clock[0] += 9.0
    assert not c.between_tasks() and dead() is not None  # 9 s < min_wait
    clock[0] += 1.0
    assert c.between_tasks() and dead() is None  # 10 s: collected
    dead = garbage()
    clock[0] += 39.0  # the last collection took 2 s: the next waits 2 / 0.05 = 40 s
    assert not c.between_tasks() and dead() is not None
    clock[0] += 1.0
    assert c.between_tasks() and dead() is None
