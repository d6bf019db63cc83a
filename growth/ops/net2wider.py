"""Net2Wider: add units to a layer (and its whole channel group) without changing the function.

New unit j copies old unit g(j) (g(j) = j for the old units, uniform over them for the new ones);
every consumer's input column is divided by the number of copies of its old unit, so the sum a
consumer sees is unchanged. Where grouped convolutions read the channels, the new units come as
copies of whole groups (uniform over the groups), and those convolutions gain groups. Where a
LayerNorm or GroupNorm normalises over the channels, every unit is copied the same number of
times (the width must be a multiple): the mean and variance of k copies of each unit are those
of the units, so the norm's output is k copies of its old output (docs/operators.md).
"""

from __future__ import annotations

import torch

from growth.errors import OperatorError
from growth.graph import NetGraph
from growth.ops.channels import (
    ChannelGroup,
    apply_index,
    check_blocks,
    check_tiles,
    find_group,
    row_weight,
    widening_bound,
    widening_cost,
)
from growth.ops.guards import MAX_NEW_PARAMS, check_size
from growth.ops.registry import ChangeRecord, OpResult

NOISE_BOUND = 10.0  # max relative output error per unit of noise, one widening (measured <= 4.4)


def net2wider(graph: NetGraph, node: str, width: int, noise: float = 0.0,
              seed: int = 0, max_new_params: int | None = MAX_NEW_PARAMS,
              private: bool = False, copies: list[int] | None = None) -> OpResult:
    """Widen producer `node` (linear or conv2d) and its channel group to `width` units.

    noise=0 preserves the network's function to float precision. noise>0 breaks the symmetry
    between a unit and its copies: each weight of a new copy's incoming rows (in every producer
    of the group) is multiplied by (1 + u), u ~ Uniform(-noise, noise); biases stay copied
    exactly. On random networks the output then moves by at most NOISE_BOUND * noise relative
    to the output's scale (max |output|), measured with margin; the tests check this bound.
    The mapping and the noise are drawn from a torch.Generator seeded with `seed`.
    max_new_params: refuse a widening that adds more parameters (None: no limit); see
    `growth.ops.guards`.
    private: the consumers' columns of the new units start at 0 and the originals' stay
    undivided (`growth.ops.widen_private`, the operator that calls this).
    copies: the units the new ones copy, in order (one per new unit, or per new group where
    grouped convolutions read the channels), instead of the uniform draw: duplicating chosen
    units (DEN's split).
    """
    group = find_group(graph, node, op="net2wider")
    params = {"node": node, "width": width, "noise": float(noise), "seed": int(seed)}
    _check_width(node, width, group.width)
    if noise < 0:
        raise OperatorError(f"net2wider({node!r}): noise must be >= 0, got {noise}")
    call = f"net2wider({node!r}, width={width})"
    check_size(call, 0, max_new_params)  # a malformed limit is refused before any comparison
    out = graph.copy()
    if width == group.width:
        return OpResult(out, ChangeRecord("widen_private" if private else "net2wider", params))
    if private and group.tile is not None:
        raise OperatorError(
            f"widen_private({node!r}): its channels reach {group.tile!r}, which normalises over "
            "them: the new units would enter its mean and variance, so every head would read "
            "them as soon as they train; widen it with net2wider, or widen a layer whose "
            "channels no norm reads (a transformer's MLP)")
    check_blocks(group, width, "net2wider")
    check_tiles(group, width, "net2wider")
    if max_new_params is not None and widening_bound(graph, group, width) > max_new_params:
        check_size(call, widening_cost(graph, node, width, group),  # exact only when it may fail
                   max_new_params)
    gen = torch.Generator().manual_seed(int(seed))
    if group.tile is not None:  # a norm over the channels: every unit copied equally
        if copies is not None:
            raise OperatorError(f"net2wider({node!r}): copies cannot be chosen where "
                                f"{group.tile!r} normalises over the channels: every unit is "
                                "copied the same number of times (leave copies out)")
        idx = torch.arange(width) % group.width
    else:
        b = group.block  # grouped convs downstream: copy whole groups of b channels
        extra = torch.randint(group.width // b, ((width - group.width) // b,), generator=gen)
        if copies is not None:
            extra = _chosen(node, copies, len(extra), group.width // b)
            params["copies"] = extra.tolist()
        idx = torch.cat([torch.arange(group.width),
                         (extra[:, None] * b + torch.arange(b)).flatten()])
    changes = apply_index(out, group, idx, divide=not private, fresh=private)
    if noise > 0:
        _perturb_copies(out, group, noise, gen)
    op = "widen_private" if private else "net2wider"
    return OpResult(out, ChangeRecord(op, params, changes.resized, changes.index_maps,
                                      changes.divisors))


def _check_width(node: str, width: int, current: int) -> None:
    if isinstance(width, bool) or not isinstance(width, int):
        raise OperatorError(f"net2wider({node!r}): width must be an int, got {width!r}")
    if width < current:
        raise OperatorError(f"net2wider({node!r}): width {width} is below the current width "
                            f"{current}; net2wider only grows, use prune_units to shrink")


def _chosen(node: str, copies: object, n: int, units: int) -> torch.Tensor:
    """The caller's copied units as an index tensor, or an OperatorError saying what is wrong."""
    values = list(copies) if isinstance(copies, (list, tuple)) else None
    if values is None or len(values) != n or any(
            isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < units for c in values):
        raise OperatorError(f"net2wider({node!r}): copies must list {n} unit indices in "
                            f"0..{units - 1}, one per new unit, got {copies!r}")
    return torch.tensor(values, dtype=torch.long)


def _perturb_copies(graph: NetGraph, group: ChannelGroup, noise: float,
                    gen: torch.Generator) -> None:
    """Multiply the new copies' incoming weights by (1 + u), u ~ U(-noise, noise)."""
    for p in group.producers:
        n = graph.node(p)
        key = row_weight(n.kind)
        weight = n.tensors[key]
        u = torch.rand(weight[group.width:].shape, generator=gen, dtype=weight.dtype) * 2 - 1
        n.tensors[key] = torch.cat([weight[:group.width], weight[group.width:] * (1 + noise
                                                                                       * u)])
