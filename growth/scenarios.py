"""Which head serves a task and how its labels read there, per scenario.

Task-incremental ("task"): one head per task (`t0`, `t1`, ...), labels as the task gives
them. Class-incremental ("class"): one head over every class of the stream (`all`), each
task's labels shifted by its class offset. Domain-incremental ("domain"): one head (`all`)
that every task's inputs go through with the labels as the task gives them (the same classes
in new input domains: permuted or varied digits, a split stream's "first or second class of
the pair"), so no task id is needed. The campaign, search trials and the `growth compress`
command all read heads and labels through `labelers`, so they agree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from growth.data import Task

SCENARIOS = ("task", "class", "domain")
SHARED_HEAD = "all"  # the one head of the class and domain scenarios
HeadOf = Callable[["Task"], str]
LabelOf = Callable[["Task", torch.Tensor], torch.Tensor]


def head_name(task: Task) -> str:
    """The head of `task` in the task-incremental scenario."""
    return f"t{task.index}"


def labelers(scenario: str) -> tuple[HeadOf, LabelOf]:
    """The head serving a task and its labels in that head, for a scenario."""
    if scenario == "class":
        return (lambda t: SHARED_HEAD), (lambda t, y: y + t.class_offset)
    if scenario == "domain":
        return (lambda t: SHARED_HEAD), (lambda t, y: y)
    return head_name, (lambda t, y: y)


def heads(scenario: str, tasks: Sequence[Task]) -> dict[str, int]:
    """The heads a network needs for a stream, with their output sizes."""
    if scenario == "class":
        return {SHARED_HEAD: max(t.class_offset + t.n_classes for t in tasks)}
    if scenario == "domain":
        return {SHARED_HEAD: max(t.n_classes for t in tasks)}
    return {head_name(t): t.n_classes for t in tasks}
