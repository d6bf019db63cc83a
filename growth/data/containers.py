"""The two records the data layer hands to the rest of the engine: a Dataset and a Task."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

Split = tuple[Tensor, Tensor]


@dataclass
class Dataset:
    """A dataset: x float32 [N, C, H, W] in [0, 1] (a tensor, or `ImageFiles` read on demand
    for folder datasets too large for memory), y int64 [N] (always in memory).

    `train_coarse`/`test_coarse` hold superclass labels where the dataset has them (cifar100),
    so that a stream can group classes by superclass.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    class_names: list[str]
    train_coarse: Tensor | None = None
    test_coarse: Tensor | None = None
    coarse_names: list[str] | None = None

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])


@dataclass
class Task:
    """One task of a stream. Labels inside `train`/`val`/`test` are local: 0..n_classes-1.

    `classes` lists the dataset's original class ids in local order; `class_offset` places the
    task's first class in a single-head, class-incremental label space (local + offset).
    """

    index: int
    name: str
    train: Split
    val: Split
    test: Split
    classes: list[int]
    n_classes: int
    class_offset: int
    input_shape: tuple[int, ...]
    augment: str = "none"  # training-batch augmentation (growth.data.augment.AUGMENTATIONS)


def images_to_float(images: np.ndarray | Tensor, channels_last: bool) -> Tensor:
    """uint8 images ([N, H, W], [N, H, W, C] or [N, C, H, W]) to float32 [N, C, H, W] in [0, 1]."""
    x = torch.as_tensor(np.asarray(images))
    if x.dim() == 3:
        x = x.unsqueeze(1)
    elif channels_last:
        x = x.permute(0, 3, 1, 2)
    return x.contiguous().to(torch.float32).div_(255.0)


def labels_to_long(labels: object) -> Tensor:
    """Any integer label sequence to an int64 tensor [N]."""
    return torch.as_tensor(np.asarray(labels), dtype=torch.int64).flatten()
