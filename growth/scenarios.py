"""Which head serves a task and how its labels read there, per scenario.

Task-incremental ("task"): one head per task (`t0`, `t1`, ...), labels as the task gives
them. Class-incremental ("class"): one head over every class of the stream (`all`), each
task's labels shifted by its class offset. The campaign, search trials and the `growth
compress` command all read heads and labels through `labelers`, so they agree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from growth.data import Task

HeadOf = Callable[["Task"], str]
LabelOf = Callable[["Task", torch.Tensor], torch.Tensor]


def head_name(task: Task) -> str:
    """The head of `task` in the task-incremental scenario."""
    return f"t{task.index}"


def labelers(scenario: str) -> tuple[HeadOf, LabelOf]:
    """The head serving a task and its labels in that head, for a scenario (task | class)."""
    if scenario == "class":
        return (lambda t: "all"), (lambda t, y: y + t.class_offset)
    return head_name, (lambda t, y: y)
