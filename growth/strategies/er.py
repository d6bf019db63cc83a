"""ER, experience replay (Chaudhry et al. 2019, "On tiny episodic memories").

Each minibatch of the current task is joined by a minibatch drawn uniformly from a reservoir
memory; the loss is the current batch's cross-entropy plus `alpha` times the replayed batch's
(each replayed sample through its own task's head). The memory is filled at the end of each
task, so replayed samples are old tasks' samples. Deviation: the two batches are two forward
passes and their mean losses are summed (rather than one pass over the joined batch), so a
network with batch normalisation sees the replayed batch's statistics separately.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from growth.strategies.base import Context
from growth.strategies.rehearsal import Rehearsal, ReplayParams, replay_loss


class ERParams(ReplayParams):
    """ER settings: memory 500 samples, replay batch 32 (the training batch), alpha 1."""

    alpha: float = Field(1.0, ge=0, description="weight of the replayed batch's loss")


class ER(Rehearsal):
    name = "er"
    description = "experience replay: each batch joined by a batch drawn from a reservoir memory"
    Params = ERParams
    params: ERParams

    def penalty(self, ctx: Context, x: Tensor, y: Tensor, logits: Tensor) -> Tensor | None:
        batch = self.replay_batch(self.params.replay_batch)
        if batch is None:
            return None
        return self.params.alpha * replay_loss(ctx, *batch)
