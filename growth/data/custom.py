"""Task streams from a user's own function (`data: {dataset: python, factory: ...}`).

The function, called with `data.args`, returns the tasks in order; each is a `Task`, or a
mapping with `train` and `test` (and optionally `val`, `name`, `n_classes`), where a split is
an `(x, y)` pair of tensors or arrays, or a map-style torch `Dataset` of `(x, y)` items (read
into memory once). Labels are 0..n-1 within each task; the scenario decides how they meet the
heads (growth.scenarios). A task without `val` has its validation split carved from `train`
(stratified, seeded) as the built-in streams do; `max_train_per_task` caps `train` likewise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from growth.data.containers import Split, Task
from growth.data.sampling import generator, stratified_pick, stratified_split
from growth.errors import DataError

KEY = "data.factory"


def custom_stream(factory: Callable[..., Any], args: Mapping[str, Any], seed: int = 0,
                  val_fraction: float = 0.1, max_train_per_task: int | None = None,
                  n_tasks: int | None = None) -> list[Task]:
    """The tasks `factory(**args)` returns, checked and in the engine's form."""
    try:
        items = list(factory(**dict(args)))
    except DataError:
        raise
    except Exception as exc:  # the user's code: any error, named with the call
        raise DataError(f"{KEY}: calling it with data.args failed: {type(exc).__name__}: "
                        f"{exc}") from None
    if not items:
        raise DataError(f"{KEY}: the function returned no tasks")
    if n_tasks is not None:
        if n_tasks > len(items):
            raise DataError(f"n_tasks={n_tasks} but {KEY} returned {len(items)} tasks")
        items = items[:n_tasks]
    tasks: list[Task] = []
    offset = 0
    for i, item in enumerate(items):
        task = _task(item, i, offset, seed, val_fraction, max_train_per_task)
        if tasks and task.input_shape != tasks[0].input_shape:
            raise DataError(f"{KEY}: task {i} has inputs of shape {task.input_shape}, task 0 "
                            f"{tasks[0].input_shape}; one network reads every task")
        tasks.append(task)
        offset += task.n_classes
    return tasks


def _task(item: Any, i: int, offset: int, seed: int, val_fraction: float,
          max_train: int | None) -> Task:
    if isinstance(item, Task):
        item = {"train": item.train, "val": item.val, "test": item.test, "name": item.name,
                "n_classes": item.n_classes}
    if not isinstance(item, Mapping) or not {"train", "test"} <= set(item):
        raise DataError(f"{KEY}: task {i} is {type(item).__name__}; give a Task or a mapping "
                        "with 'train' and 'test' (each (x, y) or a torch Dataset)")
    unknown = sorted(set(item) - {"train", "val", "test", "name", "n_classes"})
    if unknown:
        raise DataError(f"{KEY}: task {i} has unknown keys {unknown} (train, val, test, name, "
                        "n_classes)")
    train = _split(item["train"], i, "train")
    test = _split(item["test"], i, "test")
    given_val = item.get("val")
    pool = torch.arange(len(train[1]))
    if max_train is not None and max_train < len(pool):
        pool = stratified_pick(train[1], max_train, generator(seed, "subsample", i))
    if given_val is None:
        rest, held = stratified_split(train[1][pool], val_fraction,
                                      generator(seed, "validation", i))
        val = (train[0][pool[held]], train[1][pool[held]])
        pool = pool[rest]
    else:
        val = _split(given_val, i, "val")
    train = (train[0][pool], train[1][pool])
    labels = torch.cat([train[1], val[1], test[1]])
    n = int(item.get("n_classes") or int(labels.max()) + 1)
    if int(labels.max()) >= n:
        raise DataError(f"{KEY}: task {i} has label {int(labels.max())} but n_classes={n}")
    shape = tuple(train[0].shape[1:])
    for part, (x, _) in (("val", val), ("test", test)):
        if len(x) and tuple(x.shape[1:]) != shape:
            raise DataError(f"{KEY}: task {i}: {part} inputs have shape {tuple(x.shape[1:])}, "
                            f"train {shape}")
    name = str(item.get("name") or f"task-{i}")
    return Task(i, name, train, val, test, list(range(n)), n, offset, shape)


def _split(value: Any, i: int, part: str) -> Split:
    """(x float32 [N, ...], y int64 [N]) from a pair or a map-style Dataset."""
    where = f"{KEY}: task {i} {part}"
    if isinstance(value, torch.utils.data.Dataset):
        value = _read(value, where)
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise DataError(f"{where}: give (x, y) or a torch Dataset of (x, y) items, got "
                        f"{type(value).__name__}")
    try:
        x = torch.as_tensor(np.asarray(value[0]) if not torch.is_tensor(value[0])
                            else value[0])
        y = torch.as_tensor(np.asarray(value[1]) if not torch.is_tensor(value[1])
                            else value[1])
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where}: x and y must be arrays or tensors: {exc}") from None
    if x.dim() < 2 or y.dim() != 1 or len(x) != len(y) or not len(y):
        raise DataError(f"{where}: x must be [N, ...] and y [N] with N > 0; got x "
                        f"{tuple(x.shape)}, y {tuple(y.shape)}")
    if y.is_floating_point() or y.dtype == torch.bool or int(y.min()) < 0:
        raise DataError(f"{where}: labels must be integers 0..n-1")
    return x.float().contiguous(), y.long()


def _read(dataset: torch.utils.data.Dataset, where: str) -> tuple[Tensor, Tensor]:
    try:
        rows = [dataset[k] for k in range(len(dataset))]  # type: ignore[arg-type]
    except TypeError as exc:
        raise DataError(f"{where}: a Dataset needs __len__ and __getitem__ (map-style): "
                        f"{exc}") from None
    if not rows or not all(isinstance(r, (tuple, list)) and len(r) >= 2 for r in rows):
        raise DataError(f"{where}: a Dataset's items must be (x, y)")
    xs = torch.stack([torch.as_tensor(r[0]) for r in rows])
    ys = torch.as_tensor([int(r[1]) for r in rows])
    return xs, ys
