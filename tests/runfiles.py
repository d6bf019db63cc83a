"""Helpers for tests of run directories and plug-ins: a tiny config, file checksums,
unwritable paths, distributions installed the way pip lays them out."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

EXAMPLE_PLUGIN = Path(__file__).resolve().parents[1] / "examples" / "plugin"

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
    """TINY with `section__key=value` changes, written as YAML to `path`."""
    cfg = json.loads(json.dumps(TINY))
    for key, value in changes.items():
        node = cfg
        *parents, last = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` with the SHA-256 of its bytes ('dir' for folders)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@contextmanager
def unwritable(path: Path) -> Iterator[None]:
    """Make `path` (and what it holds) unwritable, even for root (immutable flag)."""
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(
                ["chattr", "-R", "+i", str(path)], capture_output=True).returncode:
            pytest.skip("running as root without chattr: nothing can make a folder unwritable")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-R", "-i", str(path)], check=False)
        return
    modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")]}
    for p, mode in modes.items():
        p.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        yield
    finally:
        for p, mode in modes.items():
            p.chmod(mode)


def install(site: Path, name: str, version: str, modules: dict[str, str],
            entry_points: dict[str, dict[str, str]]) -> None:
    """Lay out a distribution in `site` as pip does: its modules and a dist-info folder whose
    entry_points.txt importlib.metadata reads."""
    site.mkdir(exist_ok=True)
    for module, text in modules.items():
        (site / f"{module}.py").write_text(text)
    dist = site / f"{name.replace('-', '_')}-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = []
    for group, entries in entry_points.items():
        lines += [f"[{group}]", *(f"{k} = {v}" for k, v in entries.items()), ""]
    (dist / "entry_points.txt").write_text("\n".join(lines))


def example_packages() -> list[Path]:
    """The example plug-in packages in examples/ (folders with a pyproject.toml)."""
    return sorted(p.parent for p in EXAMPLE_PLUGIN.parent.glob("*/pyproject.toml"))


def example_modules() -> list[str]:
    """The modules the example packages install."""
    return [m for folder in example_packages() for m in tomllib.loads(
        (folder / "pyproject.toml").read_text())["tool"]["setuptools"]["py-modules"]]


def install_example(site: Path, folder: Path = EXAMPLE_PLUGIN) -> None:
    """An example package (default examples/plugin), from its own pyproject.toml (what the
    docs tell users to install)."""
    project = tomllib.loads((folder / "pyproject.toml").read_text())
    meta = project["project"]
    modules = {m: (folder / f"{m}.py").read_text()
               for m in project["tool"]["setuptools"]["py-modules"]}
    install(site, meta["name"], meta["version"], modules, meta["entry-points"])


def kill_after_first_checkpoint(config: Path, out: Path, last_task: int) -> Path:
    """Start `growth run CONFIG --out OUT` as a process, SIGKILL it as soon as a task's
    checkpoint exists, and return that checkpoint (the run must not have reached its last
    task, else nothing was interrupted)."""
    import signal
    import sys
    import time

    from growth.campaign import latest_checkpoint

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "growth.cli", "run", str(config), "--out",
                             str(out), "--quiet"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while latest_checkpoint(out) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = latest_checkpoint(out)
    assert done is not None, proc.stderr.read().decode() if proc.stderr else ""
    assert done.name != f"task_{last_task:03d}", "the run finished before it could be killed"
    return done
