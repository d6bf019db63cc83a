"""Optimizer state that follows the parameters when the graph changes.

After growth or compression the module is recompiled and its parameters are new tensors;
an optimizer still holding the old ones would silently train nothing (or the wrong shapes).
`follow` builds the same optimizer over the new parameters and carries each parameter's state
(momentum, Adam moments) across, remapped with the operator's index maps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

IndexMaps = Mapping[str, Mapping[int, Sequence[int]]]


def follow(optimizer: torch.optim.Optimizer, old: Mapping[str, torch.Tensor],
           new: Mapping[str, torch.nn.Parameter], index_maps: IndexMaps | None = None
           ) -> torch.optim.Optimizer:
    """The same optimizer (type and hyperparameters of its first group) over `new` params.

    old/new: parameters by name before and after the change. index_maps: per parameter name,
    per resized dim, the old position each new position was copied from (-1 = fresh), as
    growth operators record them. State of an unchanged parameter is copied; of a resized
    one, gathered along the maps (fresh positions start at zero); without a map the
    overlapping leading block is kept. Parameters that are new start with empty state.
    """
    group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    fresh = type(optimizer)(list(new.values()), **group)
    maps = index_maps or {}
    for name, p_new in new.items():
        p_old = old.get(name)
        if p_old is None or p_old not in optimizer.state:
            continue
        fresh.state[p_new] = {
            k: remap(v, tuple(p_new.shape), maps.get(name))
            if torch.is_tensor(v) and v.shape == p_old.shape else _copy(v)
            for k, v in optimizer.state[p_old].items()
        }
    return fresh


def _copy(v: object) -> object:
    return v.clone() if torch.is_tensor(v) else v


def remap(t: torch.Tensor, shape: tuple[int, ...],
          maps: Mapping[int, Sequence[int]] | None = None) -> torch.Tensor:
    """`t` brought to `shape`: gathered along mapped dims, else the leading overlap kept."""
    out = t.detach().clone()
    for dim, idx in (maps or {}).items():
        index = torch.as_tensor(list(idx), dtype=torch.long, device=t.device)
        valid = index >= 0
        gathered = out.index_select(dim, index.clamp(min=0))
        mask_shape = [1] * out.dim()
        mask_shape[dim] = len(index)
        out = gathered * valid.view(mask_shape).to(gathered.dtype)
    if tuple(out.shape) == tuple(shape):
        return out
    result = torch.zeros(shape, dtype=t.dtype, device=t.device)
    region = tuple(slice(0, min(a, b)) for a, b in zip(out.shape, shape))
    result[region] = out[region]
    return result
