"""Latent replay (Pellegrini et al. 2020): replay activations stored at a chosen layer.

At the end of each task the activations of `layer` (a node of the graph, computed in eval
mode) for the task's training samples are offered to a reservoir memory. From the second task
on, the layers below `layer` are frozen (`lower_lr: 0`) or slowed (their gradients scaled by
`lower_lr`, which for SGD is the same as a smaller learning rate), and each batch adds the
cross-entropy of a replayed batch of activations sent through the layers above `layer` only
(each through its own task's head). Memory bytes count the stored activations. `layer` must cut
the network (every path to the heads goes through it). With batch normalisation below
`layer`, its running statistics still move during training; stored activations are those of
eval mode.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from growth.data.sampling import generator
from growth.errors import ConfigError, GraphError
from growth.regularizers import evaluating
from growth.strategies.base import Context
from growth.strategies.rehearsal import Rehearsal, ReplayParams, replay_loss

CHUNK = 1024


class LatentReplayParams(ReplayParams):
    """Latent replay settings: memory 500 activations at node "act1" (the first hidden
    block's output of the built-in MLP), replay batch 32, lower layers frozen."""

    layer: str = Field("act1", description="node whose activations are stored and replayed")
    lower_lr: float = Field(0.0, ge=0, le=1,
                            description="learning-rate factor of the layers below (0 freezes)")


class LatentReplay(Rehearsal):
    name = "latent_replay"
    description = "latent replay: activations stored at a layer, replayed above it; below frozen"
    Params = LatentReplayParams
    params: LatentReplayParams
    _lower: list[torch.nn.Parameter] = []  # parameters below `layer` (set at each task start)

    def before_task(self, ctx: Context) -> None:
        super().before_task(ctx)
        try:
            ctx.model.view_above(self.params.layer, ctx.head_of(ctx.task))
        except GraphError as exc:
            raise ConfigError(f"strategy.layer: {exc}") from None
        below = ctx.model.nodes_below(self.params.layer)
        self._lower = [p for n, p in ctx.model.named_parameters().items()
                       if n.split(".", 1)[0] in below]
        if ctx.seen and self.params.lower_lr == 0:
            for p in self._lower:
                p.requires_grad_(False)

    def penalty(self, ctx: Context, x: Tensor, y: Tensor, logits: Tensor) -> Tensor | None:
        batch = self.replay_batch(self.params.replay_batch)
        if batch is None:
            return None
        layer = self.params.layer
        return replay_loss(ctx, *batch, view=lambda heads: ctx.model.view_above(layer, heads))

    def after_backward(self, ctx: Context) -> None:
        scale = self.params.lower_lr
        if ctx.seen and 0 < scale < 1:
            for p in self._lower:
                if p.grad is not None:
                    p.grad.mul_(scale)

    @torch.no_grad()
    def remember(self, ctx: Context) -> None:
        x, y = self.stream(ctx)
        view = ctx.model.node_view(self.params.layer)
        with evaluating(ctx.model.module):
            acts = torch.cat([view(x[i:i + CHUNK].to(ctx.device))
                              for i in range(0, len(x), CHUNK)])
        self.memory.reservoir(acts, y, ctx.task.index,
                              generator(ctx.seed, "reservoir", ctx.task.index))
