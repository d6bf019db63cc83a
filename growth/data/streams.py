"""Continual-learning task streams built from one in-memory Dataset.

Kinds:
- permuted: n_tasks tasks over the whole dataset; every task, task 0 included, applies its own
  fixed pixel permutation (over the flattened C*H*W) drawn from the seed, so no task is
  privileged by seeing unpermuted images.
- variations: one task per listed variation (see growth.data.variations); n_tasks, if given,
  keeps the first n_tasks of the list.
- split: disjoint class groups; `by="classes"` makes n_tasks equal groups of the class order
  ("fixed": 0..K-1, "shuffled": a seeded shuffle), `by="superclass"` one task per superclass
  (cifar100: 20 tasks of 5 classes), ordered by superclass id or shuffled likewise.

Per task, `max_train_per_task` first caps the task's training pool (seeded, stratified), then a
stratified `val_fraction` of that pool becomes the validation set. Test sets are never
subsampled. The same seed always gives identical tasks. Task tensors may share memory with the
Dataset (the "original" variation's test set does): treat them as read-only.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from growth.data.augment import AUGMENTATIONS
from growth.data.containers import Dataset, Split, Task
from growth.data.custom import custom_stream
from growth.data.datasets import load_dataset
from growth.data.orders import reorder
from growth.data.sampling import generator, stratified_pick, stratified_split
from growth.data.streaming import is_lazy, take
from growth.data.variations import VARIATIONS, apply_variation, texture_bank
from growth.errors import DataError
from growth.plugins import load_factory

STREAMS = ("permuted", "variations", "split")
SPLIT_BY = ("classes", "superclass")
CLASS_ORDERS = ("fixed", "shuffled")  # "random" is accepted as an alias of "shuffled"
DEFAULT_TASKS = 5


def make_stream(
    dataset: Dataset,
    kind: str,
    n_tasks: int | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    max_train_per_task: int | None = None,
    variations: list[str] | None = None,
    by: str = "classes",
    class_order: str = "fixed",
) -> list[Task]:
    """Build the task list of stream `kind` over `dataset` (see the module docstring)."""
    _check_sampling(val_fraction, max_train_per_task)
    if kind != "split" and is_lazy(dataset.train_x):
        raise DataError(f"a {kind} stream transforms every image in memory; {dataset.name} is "
                        "read from disk (data.load: stream): use data.load: memory, or a "
                        "split stream")
    carve = _Carver(seed, val_fraction, max_train_per_task)
    if kind == "permuted":
        return _permuted(dataset, _task_count(n_tasks, DEFAULT_TASKS), seed, carve)
    if kind == "variations":
        names = _variation_names(variations, n_tasks)
        return _variations(dataset, names, seed, carve)
    if kind == "split":
        groups = _class_groups(dataset, n_tasks, seed, by, class_order)
        return _split(dataset, groups, carve)
    raise DataError(f"unknown stream kind {kind!r}; valid kinds: {', '.join(STREAMS)}")


def build_stream(cfg: dict[str, Any]) -> list[Task]:
    """Load the dataset and build the stream described by a plain config dict.

    Keys (missing or None means the default): dataset ("python": `factory` called with
    `args` returns the tasks, see growth.data.custom), root, download, image_size, stream,
    n_tasks, seed, val_fraction, max_train_per_task, variations, by, class_order, load and
    workers (folder datasets read into memory or streamed from disk), augment (training
    batches), and split_seed (train/test split of datasets without an official one; kept
    apart from `seed` so that runs with different seeds are tested on the same images), order
    (the tasks' order: see growth.data.orders).
    """

    def get(key: str, default: Any) -> Any:
        value = cfg.get(key)
        return default if value is None else value

    if get("dataset", "digits") == "python":  # the user's own function (growth.data.custom)
        tasks = custom_stream(load_factory(cfg.get("factory"), "data.factory"),
                              get("args", {}), seed=get("seed", 0),
                              val_fraction=get("val_fraction", 0.1),
                              max_train_per_task=cfg.get("max_train_per_task"),
                              n_tasks=cfg.get("n_tasks"))
        return reorder(_augmented(tasks, get("augment", "none")), cfg.get("order"))
    dataset = load_dataset(
        get("dataset", "digits"),
        root=get("root", "data"),
        download=bool(get("download", False)),
        image_size=get("image_size", 64),
        seed=get("split_seed", 0),
        load=get("load", "auto"),
        workers=get("workers", 2),
    )
    tasks = make_stream(
        dataset,
        get("stream", "split"),
        n_tasks=cfg.get("n_tasks"),
        seed=get("seed", 0),
        val_fraction=get("val_fraction", 0.1),
        max_train_per_task=cfg.get("max_train_per_task"),
        variations=cfg.get("variations"),
        by=get("by", "classes"),
        class_order=get("class_order", "fixed"),
    )
    return reorder(_augmented(tasks, get("augment", "none")), cfg.get("order"))


def _augmented(tasks: list[Task], kind: str) -> list[Task]:
    if kind not in AUGMENTATIONS:
        raise DataError(f"unknown augmentation {kind!r}; valid: {', '.join(AUGMENTATIONS)}")
    for t in tasks:
        t.augment = kind
    return tasks


class _Carver:
    """Seeded per-task choice of training and validation indices."""

    def __init__(self, seed: int, val_fraction: float, max_train: int | None) -> None:
        self.seed, self.val_fraction, self.max_train = seed, val_fraction, max_train

    def __call__(self, y: Tensor, index: int) -> tuple[Tensor, Tensor]:
        pool = torch.arange(len(y))
        if self.max_train is not None and self.max_train < len(y):
            pool = stratified_pick(y, self.max_train, generator(self.seed, "subsample", index))
        gen = generator(self.seed, "validation", index)
        rest, val = stratified_split(y[pool], self.val_fraction, gen)
        return pool[rest], pool[val]


def _permuted(ds: Dataset, n_tasks: int, seed: int, carve: _Carver) -> list[Task]:
    shape, k = ds.input_shape, ds.n_classes
    tasks = []
    for i in range(n_tasks):
        perm = torch.randperm(math.prod(shape), generator=generator(seed, "permutation", i))

        def permute(x: Tensor, idx: Tensor | None = None, perm: Tensor = perm) -> Tensor:
            flat = x.flatten(1) if idx is None else x.flatten(1).index_select(0, idx)
            return flat.index_select(1, perm).view(-1, *shape)

        tr, va = carve(ds.train_y, i)
        train = (permute(ds.train_x, tr), ds.train_y[tr])
        val = (permute(ds.train_x, va), ds.train_y[va])
        test = (permute(ds.test_x), ds.test_y.clone())
        tasks.append(Task(i, f"perm-{i}", train, val, test, list(range(k)), k, i * k, shape))
    return tasks


def _variations(ds: Dataset, names: list[str], seed: int, carve: _Carver) -> list[Task]:
    shape, k = ds.input_shape, ds.n_classes
    bank = texture_bank(shape, generator(seed, "texture-bank"))
    tasks = []
    for i, name in enumerate(names):

        def vary(x: Tensor, y: Tensor, part: str, name: str = name, i: int = i) -> Split:
            return apply_variation(name, x, generator(seed, "variation", name, i, part), bank), y

        tr, va = carve(ds.train_y, i)
        train = vary(ds.train_x[tr], ds.train_y[tr], "train")
        val = vary(ds.train_x[va], ds.train_y[va], "val")
        test = vary(ds.test_x, ds.test_y, "test")
        tasks.append(Task(i, name, train, val, test, list(range(k)), k, i * k, shape))
    return tasks


def _split(ds: Dataset, groups: list[list[int]], carve: _Carver) -> list[Task]:
    tasks, offset = [], 0
    for i, classes in enumerate(groups):
        local = torch.full((ds.n_classes,), -1, dtype=torch.int64)
        local[torch.tensor(classes)] = torch.arange(len(classes))
        sel_train = torch.nonzero(local[ds.train_y] >= 0).flatten()
        sel_test = torch.nonzero(local[ds.test_y] >= 0).flatten()
        y_train = local[ds.train_y[sel_train]]
        tr, va = carve(y_train, i)
        train = (take(ds.train_x, sel_train[tr]), y_train[tr])
        val = (take(ds.train_x, sel_train[va]), y_train[va])
        test = (take(ds.test_x, sel_test), local[ds.test_y[sel_test]])
        n = len(classes)
        tasks.append(Task(i, f"split-{i}", train, val, test, classes, n, offset, ds.input_shape))
        offset += n
    return tasks


def _class_groups(
    ds: Dataset, n_tasks: int | None, seed: int, by: str, class_order: str
) -> list[list[int]]:
    """The dataset's class ids grouped into tasks, in task order."""
    class_order = "shuffled" if class_order == "random" else class_order
    if class_order not in CLASS_ORDERS:
        raise DataError(f"unknown class_order {class_order!r}; valid: {', '.join(CLASS_ORDERS)}")
    if by == "superclass":
        return _superclass_groups(ds, n_tasks, seed, class_order)
    if by != "classes":
        raise DataError(f"unknown split `by` {by!r}; valid: {', '.join(SPLIT_BY)}")
    k, n = ds.n_classes, _task_count(n_tasks, DEFAULT_TASKS)
    if k % n:
        works = [d for d in range(1, k + 1) if k % d == 0]
        raise DataError(
            f"n_tasks={n} does not divide the {k} classes of {ds.name} into equal groups; "
            f"use one of {works}"
        )
    order = _order(k, seed, class_order, "class-order")
    return order.view(n, k // n).tolist()


def _superclass_groups(
    ds: Dataset, n_tasks: int | None, seed: int, class_order: str
) -> list[list[int]]:
    """One group per superclass, holding its fine classes in ascending id order."""
    if ds.train_coarse is None:
        raise DataError(f"split by superclass needs superclass labels, which {ds.name} lacks")
    pairs = torch.unique(torch.stack([ds.train_y, ds.train_coarse], 1), dim=0)
    if len(torch.unique(pairs[:, 0])) != len(pairs):
        raise DataError(f"{ds.name}: some class appears under more than one superclass")
    n_super = int(ds.train_coarse.max()) + 1
    if n_tasks is not None and _task_count(n_tasks, n_super) != n_super:
        raise DataError(
            f"split by superclass makes one task per superclass: n_tasks must be {n_super} "
            f"(or unset), got {n_tasks}"
        )
    groups = [pairs[pairs[:, 1] == c, 0].tolist() for c in range(n_super)]
    return [groups[c] for c in _order(n_super, seed, class_order, "superclass-order").tolist()]


def _order(n: int, seed: int, class_order: str, purpose: str) -> Tensor:
    if class_order == "shuffled":
        return torch.randperm(n, generator=generator(seed, purpose))
    return torch.arange(n)


def _variation_names(variations: list[str] | None, n_tasks: int | None) -> list[str]:
    names = list(VARIATIONS if variations is None else variations)
    unknown = [v for v in names if v not in VARIATIONS]
    if unknown or not names:
        raise DataError(f"unknown variations {unknown}; valid: {', '.join(VARIATIONS)}")
    if n_tasks is None:
        return names
    n = _task_count(n_tasks, len(names))
    if n > len(names):
        raise DataError(
            f"n_tasks={n} but only {len(names)} variations are listed ({names}); "
            f"use n_tasks <= {len(names)} or list more variations"
        )
    return names[:n]


def _task_count(n_tasks: int | None, default: int) -> int:
    if n_tasks is None:
        return default
    if isinstance(n_tasks, bool) or not isinstance(n_tasks, int) or n_tasks < 1:
        raise DataError(f"n_tasks must be a positive integer, got {n_tasks!r}")
    return n_tasks


def _check_sampling(val_fraction: float, max_train_per_task: int | None) -> None:
    if not 0.0 <= float(val_fraction) < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if max_train_per_task is not None and (
        isinstance(max_train_per_task, bool)
        or not isinstance(max_train_per_task, int)
        or max_train_per_task < 1
    ):
        raise DataError(
            f"max_train_per_task must be a positive integer or None, got {max_train_per_task!r}"
        )
