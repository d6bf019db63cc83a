"""MIR, maximally interfered retrieval (Aljundi et al. 2019).

Each step draws `candidates` rows from the memory, takes a virtual step on the current
batch's cross-entropy (the optimizer's own SGD step: theta' = theta - lr (momentum * buffer +
grad); without the momentum term, an adversarially chosen replay batch under momentum 0.9
made training oscillate on 2 of 3 seeds of split digits), and replays the
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


def virtual_steps(optimizer: torch.optim.Optimizer | None,
                  named: dict[str, torch.nn.Parameter], grads: tuple[Tensor | None, ...]
                  ) -> dict[str, Tensor]:
    """Parameter -> the change the optimizer's SGD step would make for gradients `grads`:
    lr (momentum * buffer + g + weight_decay * p), with each parameter's own learning rate and
    momentum buffer (Adam's moments are not modelled: plain lr g)."""
    if optimizer is None:
        return {}
    group_of = {id(p): gr for gr in optimizer.param_groups for p in gr["params"]}
    out = {}
    for (n, p), g in zip(named.items(), grads):
        group = group_of.get(id(p))
        if g is None or group is None:
            continue
        direction = g + group.get("weight_decay", 0.0) * p.detach()
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        if buf is not None and group.get("momentum", 0.0):
            direction = group["momentum"] * buf + direction
        out[n] = group["lr"] * direction
    return out


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
        steps = virtual_steps(ctx.optimizer, named, grads)
        virtual = {n: named[n].detach() - step for n, step in steps.items()}
        with torch.no_grad(), evaluating(ctx.model.module):
            before = replay_losses(ctx, mx, my, mt)
            after = replay_losses(ctx, mx, my, mt, params=virtual)
        return torch.topk(after - before, self.params.replay_batch).indices
