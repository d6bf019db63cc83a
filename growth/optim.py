"""Optimizer state that follows the parameters when the graph changes.

After growth or compression the module is recompiled and its parameters are new tensors;
an optimizer still holding the old ones would silently train nothing (or the wrong shapes).
`follow` builds the same optimizer over the new parameters and carries each parameter's state
across the operators' change records (`growth.remap`). Moments are running statistics of the
gradient, so they follow as the gradient does: a first moment (SGD momentum, Adam's exp_avg)
by r, a second moment (exp_avg_sq) by r^2, where r is the factor between the widened network's
gradient and the parent's at that position (1 on a divided consumer column, 1/c on the row of
a unit with c copies). Along the parent's trajectory those are exactly the moments the widened
network's own gradients would have built, so the next steps mix old and new gradients of one
scale (scaling a column's momentum like its weight, 1/c, would mix a 1/c history with full-size
new gradients).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import torch

from growth.errors import ShapeError
from growth.remap import GRADIENT, GRADIENT_SQ, as_records, remap

if TYPE_CHECKING:
    from growth.ops.registry import ChangeRecord

MOMENT_ROLES = {"momentum_buffer": GRADIENT, "exp_avg": GRADIENT, "exp_avg_sq": GRADIENT_SQ,
                "max_exp_avg_sq": GRADIENT_SQ, "sum": GRADIENT_SQ, "square_avg": GRADIENT_SQ}


def follow(optimizer: torch.optim.Optimizer, old: Mapping[str, torch.Tensor],
           new: Mapping[str, torch.nn.Parameter],
           records: ChangeRecord | Iterable[ChangeRecord] | None = None
           ) -> torch.optim.Optimizer:
    """The same optimizer (type and hyperparameters of its first group) over `new` params.

    old/new: parameters by name before and after the change; records: the operators' change
    records, in the order they were applied. State of an unchanged parameter is copied; of a
    resized one, carried through the records by its role (MOMENT_ROLES). A resized parameter no
    record covers, or a per-element state the module does not know how to carry, is a
    ShapeError. Parameters that are new start with empty state.
    """
    records = as_records(records)
    group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    fresh = type(optimizer)(list(new.values()), **group)
    for name, p_new in new.items():
        p_old = old.get(name)
        if p_old is None or p_old not in optimizer.state:
            continue
        fresh.state[p_new] = {k: _carry(k, v, name, p_old, p_new, records)
                              for k, v in optimizer.state[p_old].items()}
    return fresh


def _carry(key: str, v: object, name: str, p_old: torch.Tensor, p_new: torch.Tensor,
           records: list[ChangeRecord]) -> object:
    if not torch.is_tensor(v):
        return v
    if v.shape != p_old.shape or p_old.shape == p_new.shape and not _touched(name, records):
        return v.clone()  # scalars (Adam's step) and unchanged parameters
    role = MOMENT_ROLES.get(key)
    if role is None:
        raise ShapeError(f"optimizer state {key!r} of parameter {name!r} cannot follow its "
                         f"resize: its role is unknown (known: {sorted(MOMENT_ROLES)})")
    out = remap(v, name, records, role)
    if out is None or out.shape != p_new.shape:
        raise ShapeError(f"optimizer state of {name!r}: the parameter changed from "
                         f"{tuple(p_old.shape)} to {tuple(p_new.shape)} but no change record "
                         "says how; pass the operators' records to Context.replace_graph")
    return out


def _touched(name: str, records: list[ChangeRecord]) -> bool:
    return any(name in r.index_maps for r in records)


def moments(optimizer: torch.optim.Optimizer, params: Mapping[str, torch.nn.Parameter]
            ) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as tensors keyed "<parameter>/<state key>" (what a
    search saves beside a parent, so its children go on from the parent's moments)."""
    out: dict[str, torch.Tensor] = {}
    for name, p in params.items():
        for key, value in optimizer.state.get(p, {}).items():
            if torch.is_tensor(value):
                out[f"{name}/{key}"] = value.detach().clone()
    return out


def load_moments(optimizer: torch.optim.Optimizer, params: Mapping[str, torch.nn.Parameter],
                 tensors: Mapping[str, torch.Tensor]) -> None:
    """Put state saved by `moments` into an optimizer over `params` (same names and shapes;
    a moment whose shape differs from its parameter's is a ShapeError)."""
    for key, value in tensors.items():
        name, _, what = key.rpartition("/")
        p = params.get(name)
        if p is None:
            raise ShapeError(f"saved optimizer state {key!r} names no parameter of the network")
        if value.dim() and value.shape != p.shape:
            raise ShapeError(f"saved optimizer state {key!r} has shape {tuple(value.shape)}, "
                             f"its parameter {tuple(p.shape)}")
        optimizer.state[p][what] = value.to(p.device).clone()
