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
    widening_bound,
    widening_cost,
)
from growth.ops.guards import MAX_NEW_PARAMS, check_size
from growth.ops.registry import ChangeRecord, OpResult

NOISE_BOUND = 10.0  # max relative output error per unit of noise, one widening (measured <= 4.4)


def net2wider(graph: NetGraph, node: str, width: int, noise: float = 0.0,
              seed: int = 0, max_new_params: int | None = MAX_NEW_PARAMS) -> OpResult:
    """Widen producer `node` (linear or conv2d) and its channel group to `width` units.

    noise=0 preserves the network's function to float precision. noise>0 breaks the symmetry
    between a unit and its copies: each weight of a new copy's incoming rows (in every producer
    of the group) is multiplied by (1 + u), u ~ Uniform(-noise, noise); biases stay copied
    exactly. On random networks the output then moves by at most NOISE_BOUND * noise relative
    to the output's scale (max |output|), measured with margin; the tests check this bound.
    The mapping and the noise are drawn from a torch.Generator seeded with `seed`.
    max_new_params: refuse a widening that adds more parameters (None: no limit); see
    `growth.ops.guards`.
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
        return OpResult(out, ChangeRecord("net2wider", params))
    check_blocks(group, width, "net2wider")
    check_tiles(group, width, "net2wider")
    if max_new_params is not None and widening_bound(graph, group, width) > max_new_params:
        check_size(call, widening_cost(graph, node, width, group),  # exact only when it may fail
                   max_new_params)
    gen = torch.Generator().manual_seed(int(seed))
    if group.tile is not None:  # a norm over the channels: every unit copied equally
        idx = torch.arange(width) % group.width
    else:
        b = group.block  # grouped convs downstream: copy whole groups of b channels
        extra = torch.randint(group.width // b, ((width - group.width) // b,), generator=gen)
        idx = torch.cat([torch.arange(group.width),
                         (extra[:, None] * b + torch.arange(b)).flatten()])
    changes = apply_index(out, group, idx, divide=True)
    if noise > 0:
        _perturb_copies(out, group, noise, gen)
    return OpResult(out, ChangeRecord("net2wider", params, changes.resized, changes.index_maps,
                                      changes.divisors))


def _check_width(node: str, width: int, current: int) -> None:
    if isinstance(width, bool) or not isinstance(width, int):
        raise OperatorError(f"net2wider({node!r}): width must be an int, got {width!r}")
    if width < current:
        raise OperatorError(f"net2wider({node!r}): width {width} is below the current width "
                            f"{current}; net2wider only grows, use prune_units to shrink")


def _perturb_copies(graph: NetGraph, group: ChannelGroup, noise: float,
                    gen: torch.Generator) -> None:
    """Multiply the new copies' incoming weights by (1 + u), u ~ U(-noise, noise)."""
    for p in group.producers:
        n = graph.node(p)
        weight = n.tensors["weight"]
        u = torch.rand(weight[group.width:].shape, generator=gen, dtype=weight.dtype) * 2 - 1
        n.tensors["weight"] = torch.cat([weight[:group.width], weight[group.width:] * (1 + noise
                                                                                       * u)])
