"""A-GEM, averaged gradient episodic memory (Chaudhry et al. 2019).

After backward, g is the current batch's gradient and g_ref the gradient of the loss on a batch
drawn from the whole memory (old tasks only: the memory is filled at task ends). If
g . g_ref < 0 the step uses g~ = g - (g . g_ref / g_ref . g_ref) g_ref, else g. The vectors
cover every trainable parameter (old heads included: the memory's loss reaches them).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from growth.strategies.base import Context
from growth.strategies.rehearsal import Rehearsal, ReplayParams, replay_loss


class AGEMParams(ReplayParams):
    """A-GEM settings: memory 500 samples; the reference gradient is measured on 256 memory
    samples per step (the paper's size)."""

    replay_batch: int = Field(256, ge=1, description="memory samples behind g_ref per step")


def agem_project(g: Tensor, g_ref: Tensor) -> Tensor:
    """g unchanged if it agrees with g_ref, else g minus its component along g_ref."""
    dot = torch.dot(g, g_ref)
    if dot >= 0:
        return g
    return g - (dot / torch.dot(g_ref, g_ref)) * g_ref


def flat_grads(params: list[torch.nn.Parameter]) -> Tensor:
    """The parameters' .grad as one vector (zeros where a parameter has none)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in params])


def flat(grads: tuple[Tensor | None, ...], params: list[torch.nn.Parameter]) -> Tensor:
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                      for g, p in zip(grads, params)])


def write_grads(params: list[torch.nn.Parameter], vector: Tensor) -> None:
    """Set each parameter's .grad to its slice of `vector`."""
    start = 0
    for p in params:
        n = p.numel()
        p.grad = vector[start:start + n].view_as(p).clone()
        start += n


def trainable(ctx: Context) -> list[torch.nn.Parameter]:
    return [p for p in ctx.model.module.parameters() if p.requires_grad]


class AGEM(Rehearsal):
    name = "agem"
    description = "averaged GEM: project the gradient when it disagrees with the memory's"
    Params = AGEMParams
    params: AGEMParams

    def after_backward(self, ctx: Context) -> None:
        batch = self.replay_batch(self.params.replay_batch)
        if batch is None:
            return
        params = trainable(ctx)
        g = flat_grads(params)
        ref = torch.autograd.grad(replay_loss(ctx, *batch), params, allow_unused=True)
        projected = agem_project(g, flat(ref, params))
        if projected is not g:
            write_grads(params, projected)
