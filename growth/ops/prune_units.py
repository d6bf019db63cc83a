"""prune_units: keep a layer's most important units (and shrink its whole channel group).

The same channel-group walk as Net2Wider, with an index of kept units and no division: pruning
removes contributions, it does not split them. Compression uses it to bring a grown network back
to a size budget.
"""

from __future__ import annotations

import torch

from growth.errors import OperatorError
from growth.graph import NetGraph
from growth.ops.channels import ChannelGroup, apply_index, check_blocks, find_group
from growth.ops.registry import ChangeRecord, OpResult


def prune_units(graph: NetGraph, node: str, keep: int,
                scores: torch.Tensor | None = None) -> OpResult:
    """Keep the `keep` highest-scoring units of producer `node` (in their original order).

    scores: one importance value per current unit (e.g. magnitude or Fisher); default: the L1 norm
    of each unit's incoming weights summed over every producer of the channel group. Ties keep
    the earlier unit. The function changes by exactly the pruned units' contributions. Where
    grouped convolutions read the channels, whole groups are kept or dropped (by summed score)
    and `keep` must leave whole groups.
    """
    group = find_group(graph, node, op="prune_units")
    b = group.block  # grouped convs read the channels: whole groups go
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep < group.width:
        raise OperatorError(f"prune_units({node!r}): keep must be an int in 1..{group.width - 1} "
                            f"(the layer has {group.width} units), got {keep!r}; use net2wider "
                            "to grow a layer")
    check_blocks(group, keep, "prune_units")
    params = {"node": node, "keep": keep, "scores": "given" if scores is not None else "l1"}
    scores = _scores(graph, group) if scores is None else _given(node, scores, group.width)
    block_scores = scores.float().view(-1, b).sum(1)
    order = torch.sort(block_scores, descending=True, stable=True).indices
    kept = order[:keep // b].sort().values
    idx = (kept[:, None] * b + torch.arange(b)).flatten()
    out = graph.copy()
    changes = apply_index(out, group, idx, divide=False)
    return OpResult(out, ChangeRecord("prune_units", params, changes.resized, changes.index_maps))


def _given(node: str, scores: object, width: int) -> torch.Tensor:
    """The caller's scores as a CPU tensor of shape (width,) (the graph's tensors are on the CPU,
    so the kept-unit index must be too), or an OperatorError saying what is wrong."""
    try:
        t = torch.as_tensor(scores)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise OperatorError(f"prune_units({node!r}): scores must be {width} numbers, one per unit "
                            f"(a tensor, array or list), got {type(scores).__name__}: {exc}"
                            ) from None
    if t.shape != (width,):
        raise OperatorError(f"prune_units({node!r}): scores must have shape ({width},), one "
                            f"per unit, got {tuple(t.shape)}")
    if t.is_meta:
        raise OperatorError(f"prune_units({node!r}): scores are on the meta device and hold no "
                            "values; pass real scores (on any device)")
    if t.is_complex():
        raise OperatorError(f"prune_units({node!r}): scores must be real numbers, got {t.dtype}")
    return t.detach().to("cpu")


def _scores(graph: NetGraph, group: ChannelGroup) -> torch.Tensor:
    """L1 norm of each unit's incoming weights, summed over the group's producers."""
    total = torch.zeros(group.width)
    for p in group.producers:
        total = total + graph.node(p).tensors["weight"].detach().abs().flatten(1).sum(1).float()
    return total
