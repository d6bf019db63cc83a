"""Helpers for the mask-based strategies' tests: a campaign resumed from an earlier checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from growth.campaign import Campaign, resume_run
from growth.config import validate_config


def resumed_after_first_task(cfg: dict[str, Any], tmp_path: Path) -> tuple[list, list]:
    """R of an uninterrupted run, and R of a copy of that run cut back to its first
    checkpoint (what a kill during task 1 leaves) and resumed through `growth resume`'s
    code path (the strategy's state loaded from the checkpoint)."""
    full = Campaign(validate_config(cfg), tmp_path / "full").start()
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", cut)
    for ckpt in sorted((cut / "checkpoints").iterdir())[1:]:
        shutil.rmtree(ckpt)
    (cut / "metrics.json").unlink()
    resumed = resume_run(cut)
    assert resumed["finished_tasks"] == len(full["R"]) - 1
    return full["R"], resumed["R"]
