"""Corrupt and foreign checkpoints, table-driven: `growth resume` exits 2 with one line naming
the file and what is wrong, no traceback, and the run directory byte for byte as it was (no
fallback to an older checkpoint, no retraining, no leftovers). The strategy's tensors live in
RUNDIR/tensors/<sha256>.safetensors, named by the checkpoint's manifest: a problem with one
names the file that holds it."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from runfiles import snapshot, write_config
from safetensors.torch import load_file, save, save_file

from growth.campaign import Campaign
from growth.checkpoint import FILES
from growth.cli import main
from growth.config import load_config
from growth.io import sha256

LAST = Path("checkpoints") / "task_001"  # the newest checkpoint of the template run
KEY = "fisher/0/fc1.weight"  # a tensor of task 0, written once and named by both checkpoints


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An EWC run of 3 tasks killed after task 1, and a second run of the same config."""
    root = tmp_path_factory.mktemp("ckpt")
    cfg = load_config(write_config(root / "c.yaml", strategy={"name": "ewc"},
                                   train__epochs=1, data__max_train_per_task=100))
    for name in ("run", "other"):
        Campaign(cfg, root / name).start()
        shutil.rmtree(root / name / "checkpoints" / "task_002")
    cfg_si = load_config(write_config(root / "si.yaml", strategy={"name": "si"},
                                      train__epochs=1, data__max_train_per_task=100,
                                      data__n_tasks=2))
    Campaign(cfg_si, root / "si").start()
    return root


# ---- mutations ------------------------------------------------------------------------------
def refresh_manifest(ckpt: Path) -> None:
    """Rewrite the manifest's digests, as a careless tool would after editing a file."""
    path = ckpt / "manifest.json"
    m = json.loads(path.read_text())
    m["files"] = {rel: sha256(ckpt / rel) for rel in m["files"] if (ckpt / rel).is_file()}
    path.write_text(json.dumps(m))


def edit_json(rel: str, change: Callable[[dict], object], fix: bool = True
              ) -> Callable[[Path], None]:
    """Change the parsed file in place (what `change` returns is ignored)."""
    def mutate(run: Path) -> None:
        path = run / LAST / rel
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))
        if fix:
            refresh_manifest(run / LAST)
    return mutate


def write_bytes(rel: str, data: bytes, fix: bool = False) -> Callable[[Path], None]:
    def mutate(run: Path) -> None:
        (run / LAST / rel).write_bytes(data)
        if fix:
            refresh_manifest(run / LAST)
    return mutate


def edit_tensors(rel: str, change: Callable[[dict[str, torch.Tensor]], None]
                 ) -> Callable[[Path], None]:
    def mutate(run: Path) -> None:
        path = run / LAST / rel
        tensors = load_file(str(path))
        change(tensors)
        save_file(tensors, str(path))
        refresh_manifest(run / LAST)
    return mutate


def first_key(tensors: dict, prefix: str = "") -> str:
    return sorted(k for k in tensors if k.startswith(prefix))[0]


def set_item(d: dict, key: str, value: object) -> None:
    d[key] = value


def flip_byte(rel: str) -> Callable[[Path], None]:
    def mutate(run: Path) -> None:
        path = run / LAST / rel
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    return mutate


def manifest_of(run: Path) -> dict:
    return json.loads((run / LAST / "manifest.json").read_text())


def tensor_file(key: str) -> Callable[[Path], Path]:
    """The file the newest manifest names for `key` (after the mutation)."""
    def where(run: Path) -> Path:
        return run / "tensors" / f"{manifest_of(run)['tensors'][key]}.safetensors"
    return where


def strategy_tensors(run: Path, folder: Path = LAST) -> dict[str, torch.Tensor]:
    names = json.loads((run / folder / "manifest.json").read_text())["tensors"]
    return {k: load_file(str(run / "tensors" / f"{d}.safetensors"))[k] for k, d in names.items()}


def put_file(run: Path, data: bytes) -> str:
    """A tensor file in the run's store, named by its SHA-256 as the writer names them."""
    digest = hashlib.sha256(data).hexdigest()
    (run / "tensors" / f"{digest}.safetensors").write_bytes(data)
    return digest


def name_files(run: Path, names: dict[str, str]) -> None:
    """Point the newest manifest's tensors at `names` (key -> digest), consistently."""
    path = run / LAST / "manifest.json"
    m = json.loads(path.read_text())
    m["tensors"] = names
    path.write_text(json.dumps(m))


def rewrite_strategy(change: Callable[[dict[str, torch.Tensor]], None]
                     ) -> Callable[[Path], None]:
    """A careful-looking edit of the strategy's tensors: all of them changed, saved as one new
    file named by its SHA-256, and named by the manifest; every digest checks out."""
    def mutate(run: Path) -> None:
        tensors = strategy_tensors(run)
        change(tensors)
        digest = put_file(run, save(tensors))
        name_files(run, dict.fromkeys(tensors, digest))
    return mutate


def file_of_key(key: str, data: Callable[[Path], bytes]) -> Callable[[Path], None]:
    """Name another file (its bytes from `data`, consistently named) for one tensor."""
    def mutate(run: Path) -> None:
        names = manifest_of(run)["tensors"]
        names[key] = put_file(run, data(run))
        name_files(run, names)
    return mutate


def from_other_strategy(run: Path) -> None:
    """The SI run's strategy tensors, their files copied over, named by this checkpoint."""
    si = run.parent / "si"
    for f in (si / "tensors").iterdir():
        shutil.copyfile(f, run / "tensors" / f.name)
    names = json.loads((si / "checkpoints" / "task_001" / "manifest.json").read_text())
    name_files(run, names["tensors"])


def flip_tensor_byte(key: str) -> Callable[[Path], None]:
    def mutate(run: Path) -> None:
        path = tensor_file(key)(run)
        data = bytearray(path.read_bytes())
        data[-3] ^= 0xFF  # inside the tensor's values
        path.write_bytes(bytes(data))
    return mutate


def folder_to_file(run: Path) -> None:
    shutil.rmtree(run / LAST)
    (run / LAST).write_text("not a checkpoint")


def copy_from_other_run(run: Path) -> None:
    shutil.rmtree(run / LAST)
    shutil.copytree(run.parent / "other" / LAST, run / LAST)


def tensor_change(fn: Callable[[torch.Tensor], torch.Tensor], prefix: str = ""
                  ) -> Callable[[dict], None]:
    def change(tensors: dict) -> None:
        k = first_key(tensors, prefix)
        tensors[k] = fn(tensors[k])
    return change


@dataclass
class Case:
    id: str
    mutate: Callable[[Path], None]
    file: str | Callable[[Path], Path]  # the path the message must name (relative to the run)
    needle: str  # what the message must say is wrong


M, S, W = (str(LAST / n) for n in ("manifest.json", "state.json", "graph/weights.safetensors"))
G = str(LAST / "graph" / "structure.json")

CASES = [
    # the manifest
    Case("manifest-empty", write_bytes("manifest.json", b"{}"), M, "format"),
    Case("manifest-list", write_bytes("manifest.json", b"[1, 2]"), M, "the top level"),
    Case("manifest-binary", write_bytes("manifest.json", bytes(range(256))), M, "not JSON"),
    Case("manifest-missing", lambda r: (r / LAST / "manifest.json").unlink(), M, "missing"),
    Case("manifest-drops-a-file", edit_json("manifest.json", lambda m: m["files"].pop(
        "state.json"), fix=False), M, "does not list ['state.json']"),
    Case("manifest-extra-file", edit_json("manifest.json", lambda m: set_item(
        m["files"], "notes.txt", "0" * 64), fix=False), M, "unknown files"),
    Case("manifest-other-run", edit_json("manifest.json", lambda m: set_item(
        m, "run_id", "f" * 32), fix=False), M, "belongs to run"),
    Case("manifest-wrong-task", edit_json("manifest.json", lambda m: set_item(m, "task", 0),
                                          fix=False), M, "says task 0"),
    Case("manifest-bad-digest", edit_json("manifest.json", lambda m: set_item(
        m["files"], "state.json", "xyz"), fix=False), M, "files.state.json"),
    Case("manifest-bad-tensor-digest", edit_json("manifest.json", lambda m: set_item(
        m["tensors"], KEY, "../../etc/passwd"), fix=False), M, f"tensors.{KEY}: not a SHA-256"),
    Case("manifest-nan", write_bytes("manifest.json", b'{"format": NaN}'), M, "not JSON"),
    # files against the manifest
    Case("weights-flipped", flip_byte("graph/weights.safetensors"), W, "SHA-256"),
    Case("tensor-file-missing", lambda r: tensor_file(KEY)(r).unlink(), tensor_file(KEY),
         "missing"),
    Case("tensor-flipped", flip_tensor_byte(KEY), tensor_file(KEY), "SHA-256"),
    Case("tensor-file-is-a-folder", lambda r: (tensor_file(KEY)(r).unlink(),
                                               tensor_file(KEY)(r).mkdir()),
         tensor_file(KEY), "not a file"),
    Case("state-is-a-folder", lambda r: ((r / LAST / "state.json").unlink(),
                                         (r / LAST / "state.json").mkdir()), S, "not a file"),
    Case("graph-folder-missing", lambda r: shutil.rmtree(r / LAST / "graph"), G, "missing"),
    # the checkpoints folder
    Case("newest-replaced-by-file", folder_to_file, str(LAST), "not a folder"),
    Case("stray-entry", lambda r: (r / "checkpoints" / "backup").mkdir(),
         "checkpoints/backup", "does not belong"),
    Case("checkpoints-is-a-file", lambda r: (shutil.rmtree(r / "checkpoints"),
                                             (r / "checkpoints").write_text("x")),
         "checkpoints", "not a folder"),
    Case("copied-from-another-run", copy_from_other_run, M, "belongs to run"),
    # state.json
    Case("seven-wall-times", edit_json("state.json", lambda s: set_item(
        s, "wall_time_s", [1.0] * 7)), S, "wall_time_s"),
    Case("R-wrong-shape", edit_json("state.json", lambda s: set_item(s, "R", s["R"][:2])),
         S, "R must be 4 rows of 3"),
    Case("R-unmeasured", edit_json("state.json", lambda s: s["R"][2].__setitem__(0, None)),
         S, "R[2] has unmeasured"),
    Case("R-future-row", edit_json("state.json", lambda s: s["R"][3].__setitem__(0, 0.5)),
         S, "R[3] has values"),
    Case("R-above-one", edit_json("state.json", lambda s: s["R"][1].__setitem__(0, 1.5)),
         S, "outside [0, 1]"),
    Case("state-missing-key", edit_json("state.json", lambda s: s.pop("sizes")), S, "sizes"),
    Case("state-unknown-key", edit_json("state.json", lambda s: set_item(s, "x", 1)), S,
         "x: Extra inputs"),
    Case("base-params-string", edit_json("state.json", lambda s: set_item(
        s, "base_params", "12")), S, "base_params"),
    Case("state-other-strategy", edit_json("state.json", lambda s: set_item(
        s, "strategy", "si")), S, "strategy is 'si'"),
    Case("state-other-run", edit_json("state.json", lambda s: set_item(
        s, "run_id", "e" * 32)), S, "run_id"),
    Case("state-infinity", write_bytes("state.json", b'{"format": Infinity}', fix=True), S,
         "not JSON"),
    Case("state-wrong-task", edit_json("state.json", lambda s: set_item(s, "task", 0)), S,
         "task is 0"),
    Case("peak-rss-short", edit_json("state.json", lambda s: s["peak_rss_bytes"].pop()), S,
         "peak_rss_bytes must be 2 byte counts"),
    Case("peak-rss-negative", edit_json("state.json", lambda s: set_item(
        s, "peak_rss_bytes", [-1, 5])), S, "peak_rss_bytes"),
    Case("sizes-wrong-tasks", edit_json("state.json", lambda s: s["sizes"][1].__setitem__(
        "task", 5)), S, "sizes"),
    Case("extra-tasks-wrong", edit_json("state.json", lambda s: set_item(
        s["strategy_extra"], "tasks", [0])), str(LAST), "extra 'tasks'"),
    # the network
    Case("weights-half", edit_tensors("graph/weights.safetensors", tensor_change(
        lambda t: t.half())), W, "mixed dtypes"),
    Case("weights-int", edit_tensors("graph/weights.safetensors", lambda ts: ts.update(
        {k: v.long() for k, v in ts.items()})), W, "expected floating point"),
    Case("weights-nan", edit_tensors("graph/weights.safetensors", tensor_change(
        lambda t: t * float("nan"))), W, "NaN"),
    Case("weights-extra-node", edit_tensors("graph/weights.safetensors", lambda ts: set_item(
        ts, "ghost.weight", torch.zeros(2))), W, "ghost"),
    Case("weights-wrong-shape", edit_tensors("graph/weights.safetensors", tensor_change(
        lambda t: torch.zeros(t.shape[0] + 1, *t.shape[1:]), "fc1.weight")), W, "fc1"),
    Case("structure-not-json", write_bytes("graph/structure.json", b"{nodes", fix=True), G,
         "not valid JSON"),
    Case("structure-foreign", write_bytes("graph/structure.json", b'{"a": 1}', fix=True), W,
         "does not match"),
    # the strategy's tensors
    Case("tensor-file-empty", file_of_key(KEY, lambda r: save({})), tensor_file(KEY),
         f"does not hold the tensor '{KEY}'"),
    Case("tensor-file-of-another-key", file_of_key(KEY, lambda r: tensor_file(
        "anchor/0/fc1.weight")(r).read_bytes()), tensor_file(KEY), "does not hold the tensor"),
    Case("strategy-of-si", from_other_strategy, tensor_file("anchor/latest/fc1.bias"),
         "'anchor/latest/fc1.bias': slot 'latest' is not a finished task"),
    Case("tensor-file-garbage", file_of_key(KEY, lambda r: b"\x00" * 64), tensor_file(KEY),
         "corrupt"),
    Case("strategy-too-big", rewrite_strategy(tensor_change(
        lambda t: torch.zeros(t.shape[0] + 5, *t.shape[1:]), KEY)), tensor_file(KEY),
         f"'{KEY}' has shape (37, 64)"),
    Case("strategy-int", rewrite_strategy(tensor_change(lambda t: t.long(), "anchor/")),
         tensor_file(KEY), "dtype torch.int64"),
    Case("strategy-nan", rewrite_strategy(tensor_change(lambda t: t * float("nan"), "fisher/")),
         tensor_file(KEY), "NaN"),
    Case("strategy-unknown-parameter", rewrite_strategy(lambda ts: set_item(
        ts, "fisher/0/ghost.weight", torch.zeros(2))), tensor_file(KEY),
         "not a tensor of the graph"),
    Case("strategy-future-task", rewrite_strategy(lambda ts: set_item(
        ts, "fisher/5/fc1.weight", ts[KEY].clone())), tensor_file(KEY), "not a finished task"),
    Case("strategy-foreign-what", rewrite_strategy(lambda ts: set_item(
        ts, "omega/all/fc1.weight", ts[KEY].clone())), tensor_file(KEY),
         "does not belong to strategy 'ewc'"),
    Case("strategy-task-dropped", rewrite_strategy(lambda ts: [
        ts.pop(k) for k in list(ts) if k.startswith("fisher/1/")]), str(LAST), "slot(s) 1"),
    # the run
    Case("run-json-missing", lambda r: (r / "run.json").unlink(), "run.json", "missing"),
    Case("run-json-corrupt", lambda r: (r / "run.json").write_text("{run"), "run.json",
         "corrupt"),
    Case("run-id-malformed", lambda r: (r / "run.json").write_text('{"run_id": 5}'),
         "run.json", "32 hex digits"),
    Case("config-changed", lambda r: (r / "config.yaml").write_text(
        (r / "config.yaml").read_text().replace("lr: 0.05", "lr: 0.06")), "config.yaml",
         "train.lr"),
]


def test_the_table_is_big_enough() -> None:
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_damaged_checkpoint_is_one_clean_error(case: Case, template: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("run", "other", "si"):
        shutil.copytree(template / name, tmp_path / name)
    run = tmp_path / "run"
    case.mutate(run)
    named = run / case.file if isinstance(case.file, str) else case.file(run)
    before = snapshot(run)
    assert main(["resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert str(named) in err, err
    assert case.needle in err, err
    assert snapshot(run) == before


def test_intact_template_resumes(template: Path, tmp_path: Path) -> None:
    """The template itself is sound: every failure above comes from its mutation."""
    run = shutil.copytree(template / "run", tmp_path / "run")
    assert main(["resume", str(run), "--quiet"]) == 0
    assert json.loads((run / "metrics.json").read_text())["finished_tasks"] == 3
    assert sorted(p.name for p in (run / LAST).rglob("*") if p.is_file()) == sorted(
        [Path(f).name for f in FILES] + ["manifest.json"])
