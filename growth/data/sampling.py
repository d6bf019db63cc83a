"""Seeded, stratified index selection shared by dataset splits and task streams.

Every random choice in `growth.data` draws from a generator derived from the run seed and a
purpose string, so that one choice (say a permutation) does not shift when an unrelated option
(say `max_train_per_task`) changes.
"""

from __future__ import annotations

import zlib

import torch
from torch import Tensor


def generator(seed: int, *purpose: object) -> torch.Generator:
    """A torch generator seeded from `seed` and a purpose key; stable across runs and platforms."""
    key = "/".join(str(p) for p in purpose).encode()
    mixed = (int(seed) * 0x9E3779B1 + zlib.crc32(key)) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


def stratified_pick(y: Tensor, n: int, gen: torch.Generator) -> Tensor:
    """Indices of `n` items of `y` whose class proportions follow those of `y` (sorted).

    Each class is shuffled and its items get keys (rank + u) / class_count with u uniform in
    [0, 1); the n smallest keys are taken, so every class contributes about n * share items and
    the total is exactly n.
    """
    n = max(0, min(int(n), len(y)))
    if n == len(y):
        return torch.arange(len(y))
    order = torch.randperm(len(y), generator=gen)
    shuffled = y[order]
    counts = torch.bincount(shuffled).to(torch.float64)
    rank = _rank_within_class(shuffled)
    jitter = torch.rand(len(y), generator=gen, dtype=torch.float64)
    keys = (rank.to(torch.float64) + jitter) / counts[shuffled]
    chosen = order[torch.argsort(keys, stable=True)[:n]]
    return torch.sort(chosen).values


def stratified_split(y: Tensor, fraction: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Split indices of `y` into (rest, taken) with round(fraction * len(y)) taken, stratified."""
    taken = stratified_pick(y, round(fraction * len(y)), gen)
    mask = torch.ones(len(y), dtype=torch.bool)
    mask[taken] = False
    return torch.nonzero(mask).flatten(), taken


def _rank_within_class(y: Tensor) -> Tensor:
    """Position of each item among the items of its own class, in the given order."""
    order = torch.argsort(y, stable=True)
    sorted_y = y[order]
    starts = torch.zeros_like(sorted_y)
    boundary = torch.ones(len(y), dtype=torch.bool)
    boundary[1:] = sorted_y[1:] != sorted_y[:-1]
    starts[boundary] = torch.nonzero(boundary).flatten()
    starts = torch.cummax(starts, dim=0).values
    rank = torch.empty_like(y)
    rank[order] = torch.arange(len(y)) - starts
    return rank
