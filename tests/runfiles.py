"""Helpers for tests of run directories: a tiny config, file checksums, unwritable paths."""

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
