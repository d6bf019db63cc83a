"""MIR, maximally interfered retrieval (Aljundi et al. 2019).

Each step draws `candidates` rows from the memory, takes a virtual SGD step on the current
batch's cross-entropy (theta' = theta - lr * grad, lr the optimizer's), and replays the
`replay_batch` candidates whose loss rises most from theta to theta'; the loss adds their
cross-entropy (weight `alpha`). Candidates are scored in eval mode (no dropout, batch-norm
statistics untouched). The memory is a reservoir filled at task ends, as for ER.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from growth.regularizers import evaluating
from growth.strategies.base import Context
from growth.strategies.rehearsal import Rehearsal, ReplayParams, replay_loss, replay_losses


class MIRParams(ReplayParams):
    """MIR settings: memory 500 samples, 32 replayed out of 128 candidates per step, alpha 1."""

    candidates: int = Field(128, ge=1, description="memory rows scored per step")
    alpha: float = Field(1.0, ge=0, description="weight of the replayed batch's loss")


class MIR(Rehearsal):
    name = "mir"
    description = "maximally interfered retrieval: replay the memory rows a virtual step hurts most"
    Params = MIRParams
    params: MIRParams

    def penalty(self, ctx: Context, x: Tensor, y: Tensor, logits: Tensor) -> Tensor | None:
        batch = self.replay_batch(self.params.candidates)
        if batch is None:
            return None
        chosen = self.retrieve(ctx, logits, y, *batch)
        return self.params.alpha * replay_loss(ctx, *(t[chosen] for t in batch))

    def retrieve(self, ctx: Context, logits: Tensor, y: Tensor, mx: Tensor, my: Tensor,
                 mt: Tensor) -> Tensor:
        """Positions (in the candidates) of the replay_batch rows whose loss a virtual step on
        the current batch increases most."""
        if len(my) <= self.params.replay_batch:
            return torch.arange(len(my), device=my.device)
        named = {n: p for n, p in ctx.model.module.named_parameters() if p.requires_grad}
        grads = torch.autograd.grad(F.cross_entropy(logits, y), list(named.values()),
                                    retain_graph=True, allow_unused=True)
        lr = ctx.optimizer.param_groups[0]["lr"] if ctx.optimizer is not None else 0.0
        virtual = {n: p.detach() - lr * g if g is not None else p.detach()
                   for (n, p), g in zip(named.items(), grads)}
        with torch.no_grad(), evaluating(ctx.model.module):
            before = replay_losses(ctx, mx, my, mt)
            after = replay_losses(ctx, mx, my, mt, params=virtual)
        return torch.topk(after - before, self.params.replay_batch).indices
