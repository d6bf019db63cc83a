"""How a per-parameter tensor follows a graph change: one transform, chosen by the tensor's role.

An operator's `ChangeRecord` says, for every resized tensor and dim, which old position each new
position copies (`index_maps`, -1 = fresh) and by what the copy was divided (`divisors`; 1 if
absent). Among the new positions copying one old position, the first is the *original* (the old
unit itself: Net2Wider keeps old units first, pruning keeps one of each), the others are *copies*.

Two per-position factors follow from the record. d_j, the divisor: the new value is
old / d_j. r_j = 1 / sum of 1/d_k over the positions k copying the same old position: along
any trajectory of the parent, the widened network computes the same function and its gradient
at position j is r_j times the parent's (Net2Wider's copies are exchangeable, so their
gradients are equal and, by the chain rule, sum with weights 1/d_k to the parent's). So a
divided consumer column (c copies, d = c) has r = 1: d out / d W'[:, j] = h_j is unchanged; a
copied row, bias or BatchNorm entry of a unit with c copies (d = 1) has r = 1/c: its consumer
columns carry 1/c of the unit's output. Pruning and plain copies have d = r = 1.

Roles (what strategies and optimizers declare for each kind of state):
- WEIGHT (anchors theta*, SI's start and previous values): old / d at every valid position,
  computed as the operator computes it, so an anchor transformed with its parameter equals the
  transformed parameter bit for bit: the penalty is 0 and its gradient 0 where it was.
- IMPORTANCE (Fisher, MAS and SI Omega, L2's unit weights: the W of W (theta - theta*)^2):
  r^2 * old at originals, 0 at copies and fresh positions. A perturbation delta of an original
  moves the widened network's output, to first order, as r * delta moves the parent's, so the
  penalty of any perturbation of the old units is the parent's penalty of the matching
  perturbation (exactly so for divided columns, where r = 1 and the map is linear). For the
  Fisher this is exactly the Fisher the widened network has at the originals. Copies are new
  capacity: unpenalised until the task that trains them ends.
- SPLIT (importance that protects every copy: REC's old-task Fisher after growth):
  d_j^2 / c * old at each of the c positions copying one old position, 0 at fresh ones. A
  change that moves the copies together (each copied row by delta, each divided column by
  delta / d_j: what the parent's change delta becomes in the widened network) costs
  sum_j (d_j^2 / c) (delta / d_j)^2 old = old * delta^2, the parent's penalty exactly; with
  IMPORTANCE it would cost r^2 of it (1/c for a row), and the copies would be free.
- MASK (owner indices, binary masks, picks): old at originals, 0 (free) at copies and fresh.
- GRADIENT (momentum, Adam's exp_avg): r * old at every valid position; GRADIENT_SQ (Adam's
  exp_avg_sq): r^2 * old. Optimizer moments are running statistics of the gradient; these are
  the statistics the widened network's own gradients have along the parent's trajectory, so
  the next steps mix old and new gradients of one scale.
- PATH (SI's running sums omega = sum -g * step): r / d * old at originals, 0 at copies: along
  the parent's trajectory each original's gradient is r g and its step 1/d of the parent's.
A tensor of a parameter the record removed is dropped; one it does not name is unchanged. A
chain of records (widen, widen, prune) is followed one record after another: the factors of a
position multiply along the chain.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from growth.errors import ShapeError

if TYPE_CHECKING:
    from growth.ops.registry import ChangeRecord

WEIGHT, IMPORTANCE, SPLIT, MASK, GRADIENT, GRADIENT_SQ, PATH = (
    "weight", "importance", "importance_split", "mask", "gradient", "gradient_sq", "path")
ROLES = (WEIGHT, IMPORTANCE, SPLIT, MASK, GRADIENT, GRADIENT_SQ, PATH)
_ORIGINALS_ONLY = frozenset({IMPORTANCE, MASK, PATH})


def as_records(records: ChangeRecord | Iterable[ChangeRecord] | None) -> list[ChangeRecord]:
    """One record, a chain of them, or none, as a list."""
    from growth.ops.registry import ChangeRecord

    if records is None:
        return []
    out = [records] if isinstance(records, ChangeRecord) else list(records)
    for r in out:
        if not isinstance(r, ChangeRecord):
            raise TypeError(f"expected the operators' ChangeRecords (OpResult.record), got "
                            f"{type(r).__name__}; pass result.record, not result.record.index_maps")
    return out


def remap(t: Tensor, name: str, records: ChangeRecord | Iterable[ChangeRecord] | None,
          role: str) -> Tensor | None:
    """`t`, a tensor shaped like parameter `name`, carried through `records` as `role` says;
    None if a record removed the parameter."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; one of {ROLES}")
    out: Tensor | None = t
    for rec in as_records(records):
        if name in rec.removed:
            return None
        maps = rec.index_maps.get(name)
        if maps:
            old_shape = rec.resized.get(name, (tuple(t.shape),))[0]
            if tuple(out.shape) != tuple(old_shape):
                raise ShapeError(f"{name!r}: a state tensor of shape {tuple(out.shape)} cannot "
                                 f"follow the {rec.op} change, which resized the parameter from "
                                 f"{tuple(old_shape)}; it missed an earlier change")
            out = _apply(out, maps, rec.divisors.get(name, {}), role)
    return out


def _apply(t: Tensor, maps: Mapping[int, Sequence[int]], divisors: Mapping[int, Sequence[float]],
           role: str) -> Tensor:
    out = t.detach()
    for dim, idx in maps.items():
        dim = int(dim)
        index = torch.as_tensor(list(idx), dtype=torch.long, device=t.device)
        valid = index >= 0
        out = out.index_select(dim, index.clamp(min=0))
        d = divisors.get(dim) if divisors else None
        d = d if d is None else torch.as_tensor(list(d), dtype=torch.float64, device=t.device)
        keep = valid & _originals(index) if role in _ORIGINALS_ONLY else valid
        if role == WEIGHT:
            if d is not None:  # the operator's own arithmetic: value / divisor, in its dtype
                out = out / _along(d.to(out.dtype), dim, out.dim())
        elif role != MASK:
            factor = _factor(index, valid, d, role)
            out = (out.double() * _along(factor, dim, out.dim())).to(out.dtype)
        out = torch.where(_along(keep, dim, out.dim()), out, torch.zeros((), dtype=out.dtype,
                                                                          device=out.device))
    return out.clone() if out is t else out


def _originals(index: Tensor) -> Tensor:
    """True at the first new position copying each old position."""
    first = torch.zeros_like(index, dtype=torch.bool)
    seen: set[int] = set()
    for j, i in enumerate(index.tolist()):
        if i >= 0 and i not in seen:
            seen.add(i)
            first[j] = True
    return first


def _factor(index: Tensor, valid: Tensor, d: Tensor | None, role: str) -> Tensor:
    """r (GRADIENT), r^2 (IMPORTANCE, GRADIENT_SQ), r / d (PATH) or d^2 / c (SPLIT) per new
    position."""
    inv = torch.ones(len(index), dtype=torch.float64, device=index.device)
    if d is not None:
        inv = 1.0 / d
    src = index.clamp(min=0)
    if role == SPLIT:
        copies = torch.zeros(int(src.max()) + 1 if len(src) else 0, dtype=torch.float64,
                             device=index.device)
        copies.index_add_(0, src[valid], torch.ones_like(inv)[valid])
        return torch.where(valid, 1.0 / (inv * inv * copies[src].clamp_min(1.0)),
                           torch.zeros_like(inv))
    total = torch.zeros(int(src.max()) + 1 if len(src) else 0, dtype=torch.float64,
                        device=index.device)
    total.index_add_(0, src[valid], inv[valid])
    r = torch.where(valid, 1.0 / total[src].clamp_min(1e-300), torch.zeros_like(inv))
    if role == GRADIENT:
        return r
    if role == PATH:
        return r * inv
    return r * r


def _along(v: Tensor, dim: int, ndim: int) -> Tensor:
    shape = [1] * ndim
    shape[dim] = -1
    return v.view(shape)


def split_key(key: str) -> tuple[str, str, str]:
    """"what/task/param" -> (what, task, param)."""
    parts = key.split("/", 2)
    if len(parts) != 3:
        raise ShapeError(f"strategy state key {key!r} is not of the form 'what/task/parameter'")
    return parts[0], parts[1], parts[2]


def remap_state(state: Mapping[str, Tensor], records: ChangeRecord | Iterable[ChangeRecord] | None,
                roles: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]],
                owner: str = "strategy") -> dict[str, Tensor]:
    """Every "what/task/param" entry carried through `records` by the role declared for `what`.

    shapes: the parameters' shapes after the change. An entry whose parameter it no longer
    matches, with no record to say how it moved, is a ShapeError naming it: state is never
    matched to a parameter by guesswork.
    """
    records = as_records(records)
    touched = {n for r in records for n in (*r.index_maps, *r.removed)}
    out: dict[str, Tensor] = {}
    for key, t in state.items():
        what, _, param = split_key(key)
        if param in touched:
            role = roles.get(what)
            if role is None:
                raise ShapeError(f"{owner} state {key!r}: the graph change resized {param!r}, "
                                 f"but the {owner} declares no role for {what!r} state "
                                 f"(state_roles: {dict(roles)}); declare one of {ROLES}")
            t = remap(t, param, records, role)
            if t is None:
                continue
        want = shapes.get(param)
        if want is not None and tuple(t.shape) != tuple(want):
            raise ShapeError(f"{owner} state {key!r} has shape {tuple(t.shape)} but parameter "
                             f"{param!r} now has {tuple(want)}; pass the operators' change "
                             "records to Context.replace_graph so the state can follow them")
        out[key] = t
    return out
