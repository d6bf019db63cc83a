"""GEM, gradient episodic memory (Lopez-Paz & Ranzato 2017).

After backward, g is the current batch's gradient and g_k the gradient of the loss on task k's
memory rows, for every old task k (one forward pass over the memory, one gradient per task).
If g . g_k >= 0 for every k the step uses g. Otherwise it uses the g~ closest to g with
g~ . g_k >= 0 for all k, found in the dual: min_v 1/2 v'GG'v + g'G'v subject to v >= margin
(G's rows the g_k), g~ = G'v + g, solved by quadprog (Goldfarb-Idnani). As in the paper's code
the margin (0.5) is a lower bound on v; it leaves G g~ >= 0 (G g~ is the bound's multiplier).
Deviation: the paper's code always adds 1e-3 to GG''s diagonal; here the QP is solved as is
(the constraints then hold to float64 precision) and only a singular GG' (memory gradients
linearly dependent) gets 1e-6 of its diagonal's mean added.
"""

from __future__ import annotations

import numpy as np
import quadprog
import torch
from pydantic import Field
from torch import Tensor

from growth.strategies.agem import flat, flat_grads, trainable, write_grads
from growth.strategies.base import Context
from growth.strategies.rehearsal import MemoryParams, Rehearsal, replay_losses

RIDGE = 1e-6


class GEMParams(MemoryParams):
    """GEM settings: memory 500 samples (every old task's rows constrain each step), margin
    0.5 (the paper's memory strength)."""

    margin: float = Field(0.5, ge=0, description="lower bound on the dual variables")


def gem_project(g: Tensor, G: Tensor, margin: float = 0.0) -> Tensor:
    """g if it agrees with every row of G, else G'v + g for the dual QP's solution v."""
    if G.numel() == 0 or bool((G @ g >= 0).all()):
        return g
    mem = G.detach().double().cpu().numpy()
    cur = g.detach().double().cpu().numpy()
    t = mem.shape[0]
    P = mem @ mem.T
    P = 0.5 * (P + P.T)
    q = -(mem @ cur)
    try:
        v = quadprog.solve_qp(P, q, np.eye(t), np.full(t, margin))[0]
    except ValueError:  # singular: the memory gradients are linearly dependent
        ridge = np.eye(t) * (RIDGE * max(float(np.trace(P)) / t, 1e-30))
        v = quadprog.solve_qp(P + ridge, q, np.eye(t), np.full(t, margin))[0]
    return torch.from_numpy(v @ mem + cur).to(g)


class GEM(Rehearsal):
    name = "gem"
    description = "gradient episodic memory: no step may raise an old task's memory loss"
    Params = GEMParams
    params: GEMParams

    def after_backward(self, ctx: Context) -> None:
        if not len(self.memory):
            return
        params = trainable(ctx)
        g = flat_grads(params)
        x, y, task = self.memory.batch(self.memory.rows())
        losses = replay_losses(ctx, x, y, task)
        old = sorted(set(task.tolist()))
        rows = []
        for i, k in enumerate(old):
            loss = losses[task == k].mean()
            grads = torch.autograd.grad(loss, params, allow_unused=True,
                                        retain_graph=i < len(old) - 1)
            rows.append(flat(grads, params))
        projected = gem_project(g, torch.stack(rows), self.params.margin)
        if projected is not g:
            write_grads(params, projected)
