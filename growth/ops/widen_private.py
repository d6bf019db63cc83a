"""widen_private: add units to a layer that nothing reads yet (a private expansion).

The new units come as Net2Wider's (copies of old units' incoming rows, with its symmetry-
breaking noise), but every consumer's column for a new unit starts at 0 and the original
units' columns keep their values undivided. So the function of every head is exactly the
parent's, and the old heads do not read the new units: a strategy that keeps those columns at
0 for the old tasks (REC's private expansion) grows capacity that only the new task uses. In
the change record the new positions of consumer columns are fresh (-1): anchors carried as
weights are 0 there, as the columns are. A layer whose channels reach a norm over them (a
transformer's residual stream: LayerNorm) is refused: the new units would enter the norm's mean
and variance, so the old heads would read them as soon as they train.
"""

from __future__ import annotations

from growth.graph import NetGraph
from growth.ops.guards import MAX_NEW_PARAMS
from growth.ops.net2wider import net2wider
from growth.ops.registry import OpResult


def widen_private(graph: NetGraph, node: str, width: int, noise: float = 0.0, seed: int = 0,
                  max_new_params: int | None = MAX_NEW_PARAMS) -> OpResult:
    """Widen producer `node` (and its channel group) to `width` units that no consumer reads
    yet; arguments, mapping, noise and refusals as `net2wider`."""
    return net2wider(graph, node, width, noise=noise, seed=seed, max_new_params=max_new_params,
                     private=True)
