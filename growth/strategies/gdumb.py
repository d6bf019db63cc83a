"""GDumb, greedy sampler and dumb learner (Prabhu et al. 2020).

Before each task the task's training samples are offered, in an order drawn from the task's
seed, to a class-balanced greedy memory (growth/memory.py: a class below memory / classes seen
rows may evict a random row of the largest class). Then the network is reset to fresh random
weights (drawn from the task's seed) and trained from scratch on the memory alone, in mixed
batches, for train.epochs; that network is the one evaluated. Task-incremental: the memory's
rows go through their own task's head, so each task is masked to its own classes. Deviations:
no cutmix and no SGDR schedule (the run's optimizer and epochs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from growth.data.sampling import generator
from growth.graph import NetGraph
from growth.layers import PARAMETRIC, build_module
from growth.strategies.base import Context
from growth.strategies.rehearsal import MemoryParams, Rehearsal, as_tasks, class_keys

if TYPE_CHECKING:
    from growth.data import Task


class GDumbParams(MemoryParams):
    """GDumb settings: memory 500 samples; training epochs are the run's train.epochs."""


def fresh_weights(graph: NetGraph, seed: int) -> NetGraph:
    """A copy of `graph` whose layers hold freshly initialised tensors, drawn from `seed`."""
    out = graph.copy()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in out.topo_order():
            node = out.node(name)
            if node.kind in PARAMETRIC and node.tensors:
                layer = build_module(node.kind, node.attrs)
                node.tensors = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    return out


class GDumb(Rehearsal):
    name = "gdumb"
    description = "GDumb: a class-balanced memory, a network trained from scratch on it alone"
    Params = GDumbParams
    params: GDumbParams

    def before_task(self, ctx: Context) -> None:
        super().before_task(ctx)
        x, y = self.stream(ctx)
        self.memory.balanced(x, y, ctx.task.index, class_keys(ctx),
                             generator(ctx.seed, "balanced", ctx.task.index))
        ctx.replace_graph(fresh_weights(ctx.model.graph, ctx.seed))

    def train_sets(self, ctx: Context) -> list[Task]:
        return as_tasks(ctx, *self.memory.batch(self.memory.rows()))

    def after_task(self, ctx: Context) -> None:
        """Nothing: the memory took the task's samples before training."""
