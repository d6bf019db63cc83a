"""Task orders: the same tasks of a stream learned in another order (`data.order`).

An order is one of:
- a list of the stream's task indices, e.g. [2, 0, 1, 3, 4]: those tasks in that order (a
  shorter list learns only the tasks it names);
- `random-K` (K = 1, 2, ...): the K-th random permutation, drawn from K alone, so every seed
  and every strategy of a comparison gets the same `random-3`;
- a curriculum by difficulty, `easy_first` or `hard_first`. A task's difficulty is the error
  of a nearest-class-mean classifier (class means of the task's training split, scored on its
  validation split): a measure of the data alone that needs no network and never reads a
  test split. Ties keep the stream's order. A pixel permutation leaves every distance, hence
  this measure, unchanged: on a permuted stream the tasks differ only in which images their
  validation splits drew, so a curriculum there orders them by that sampling noise.

Reordering keeps every task's data, name and classes (its class offset too, so
class-incremental labels keep their meaning) and gives it its new position as `index`: the
campaign's per-task seed and the task's head follow the position, so two orders train with the
same batch seeds at each position.
"""

from __future__ import annotations

import re
from dataclasses import replace

import torch

from growth.data.containers import Task
from growth.data.sampling import generator
from growth.data.streaming import is_lazy
from growth.errors import DataError

CURRICULA = ("easy_first", "hard_first")
RANDOM = re.compile(r"random-([1-9][0-9]*)")
Order = list[int] | str | None


def is_order_name(name: str) -> bool:
    """Whether `name` names an order: a curriculum or random-K."""
    return name in CURRICULA or RANDOM.fullmatch(name) is not None


def random_order(n_tasks: int, k: int) -> list[int]:
    """The K-th random permutation of n_tasks tasks (the same for every seed)."""
    if k < 1:
        raise DataError(f"random orders are numbered from 1, got random-{k}")
    return torch.randperm(n_tasks, generator=generator(0, "task-order", k)).tolist()


def difficulty(task: Task) -> float:
    """Error of a nearest-class-mean classifier on the task's validation split, the class means
    taken over its training split (0 = every validation sample is nearest its class mean)."""
    (x, y), (vx, vy) = task.train, task.val
    if is_lazy(x) or is_lazy(vx):
        raise DataError(f"task {task.name}: a curriculum measures each task's data in memory; "
                        "use data.load: memory, or a list or random order")
    if len(vy) == 0:
        raise DataError(f"task {task.name}: a curriculum scores tasks on their validation "
                        "split, which is empty; set data.val_fraction above 0")
    flat, vflat = x.flatten(1).double(), vx.flatten(1).double()
    classes = torch.unique(y)
    means = torch.stack([flat[y == c].mean(0) for c in classes])
    nearest = classes[torch.cdist(vflat, means).argmin(1)]
    return float((nearest != vy).double().mean())


def resolve_order(tasks: list[Task], order: Order) -> list[int]:
    """The task indices an order names, checked against the stream."""
    n = len(tasks)
    if order is None:
        return list(range(n))
    if isinstance(order, str):
        match = RANDOM.fullmatch(order)
        if match:
            return random_order(n, int(match.group(1)))
        if order not in CURRICULA:
            raise DataError(f"unknown task order {order!r}; valid: a list of task indices, "
                            f"{', '.join(CURRICULA)}, or random-K (K = 1, 2, ...)")
        scores = [difficulty(t) for t in tasks]
        sign = 1.0 if order == "easy_first" else -1.0
        return sorted(range(n), key=lambda i: (sign * scores[i], i))
    picked = [int(i) for i in order]
    bad = [i for i in picked if not 0 <= i < n]
    if bad or not picked:
        raise DataError(f"task order {picked}: the stream has {n} tasks, numbered 0..{n - 1}")
    if len(set(picked)) != len(picked):
        raise DataError(f"task order {picked} names a task twice")
    return picked


def reorder(tasks: list[Task], order: Order) -> list[Task]:
    """The tasks in the order named, each with its new position as index."""
    return [replace(tasks[i], index=pos) for pos, i in enumerate(resolve_order(tasks, order))]
