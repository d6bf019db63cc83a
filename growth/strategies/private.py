"""Private expansion: a network grows units only the new task reads, the network it grew from
kept exactly where it was.

`widen_private` adds units whose consumer columns start at 0, so no old head reads them. The
strategies that grow this way (REC's `expansion: private`, RCL) train a child's new units and
the new task's head while what the parent had stays put: `parent_entries` says which entries
those are (through the operators' change records: whole units for REC, whose old heads run on
the whole network; single entries for RCL, whose old tasks run on the units they had), and
`FrozenParent` holds them during each fit with a `growth.masks.Guard` (gradients zeroed after
every backward pass, values written back after every step and at the end of the fit).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch

from growth.context import Context
from growth.masks import Guard
from growth.ops.registry import ChangeRecord
from growth.remap import MASK, WEIGHT, remap


def new_task_only(ctx: Context) -> set[str]:
    """Nodes only the new task's head reads (its head layer): the new task's alone."""
    graph = ctx.model.graph
    others: set[str] = set()
    for head in graph.heads:
        if head != ctx.head_of(ctx.task):
            others |= graph.ancestors([head])
    return graph.ancestors([ctx.head_of(ctx.task)]) - others


def parent_entries(ctx: Context, records: list[ChangeRecord],
                   by: Literal["unit", "entry"] = "unit") -> dict[str, torch.Tensor]:
    """Which entries of each parameter the parent had (True). By unit: a row (dim 0) the
    records copied or kept is the parent's, whatever its columns, so the parent's units never
    read new units (their zero columns stay 0: old heads on the whole network do not move);
    new units' rows are not. By entry: exactly the entries the parent had, so the parent's
    units may learn to read new units (for a strategy that runs old tasks on the units they
    had). Parameters only the new task's head reads are left out (the new task trains them)."""
    own = new_task_only(ctx)
    out = {}
    for name, p in ctx.model.named_parameters().items():
        if name.rsplit(".", 1)[0] in own:
            continue
        old = next((r.resized[name][0] for r in records if name in r.resized), tuple(p.shape))
        mask = remap(torch.ones(old), name, records, MASK)
        if by == "entry":
            out[name] = mask.bool().to(p.device)
            continue
        rows = mask.flatten(1).any(1) if mask.dim() > 1 else mask.bool()
        out[name] = rows.view(-1, *([1] * (p.dim() - 1))).expand(p.shape).to(p.device)
    return out


def fresh_entries(ctx: Context, records: list[ChangeRecord]) -> dict[str, torch.Tensor]:
    """Entries the records made fresh (index -1: widen_private's zero columns), True there:
    what an old task's head would read of units it never saw, kept at 0 for it. Tensors only
    the new task's head reads are left out."""
    own = new_task_only(ctx)
    out = {}
    for name, p in ctx.model.named_parameters().items():
        if name.rsplit(".", 1)[0] in own:
            continue
        touched = [r for r in records if name in r.index_maps]
        if not any(-1 in idx for r in touched for idx in r.index_maps[name].values()):
            continue
        old = next((r.resized[name][0] for r in records if name in r.resized), tuple(p.shape))
        kept = remap(torch.ones(old), name, records, WEIGHT)  # 0 at fresh entries
        out[name] = (kept == 0).to(p.device)
    return out


class FrozenParent:
    """The parent's entries, held still through every fit while `entries` is set.

    A strategy sets `entries` (from `parent_entries`) when it builds a child or before a fit
    that must train only new units and the new head, forwards its `training`,
    `after_backward` and `after_step` hooks here, and calls `release` when the fits are done.
    """

    def __init__(self) -> None:
        self.entries: dict[str, torch.Tensor] | None = None
        self._guard: Guard | None = None

    def release(self) -> None:
        self.entries = None

    @contextmanager
    def training(self, ctx: Context) -> Iterator[None]:
        if not self.entries:
            yield
            return
        params = ctx.model.named_parameters()
        self._guard = Guard(params, {n: ~m for n, m in self.entries.items()})
        try:
            yield
        finally:
            self._guard.restore()
            self._guard = None

    def after_backward(self) -> None:
        if self._guard is not None:
            self._guard.mask_grads()

    def after_step(self) -> None:
        if self._guard is not None:  # the parent's moments would move frozen entries
            self._guard.restore()


__all__ = ["FrozenParent", "fresh_entries", "new_task_only", "parent_entries"]
