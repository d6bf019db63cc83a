"""iCaRL, incremental classifier and representation learning (Rebuffi et al. 2017).

- Exemplars: after each task the memory holds m = memory // (classes seen) exemplars per
  class, chosen by herding on L2-normalised features (the output of `feature_layer`, in eval
  mode); old classes keep their first m (their best, herding order).
- Training set: the task's data joined by every exemplar, in mixed batches. Loss per sample:
  binary cross-entropy on the new classes' outputs (target 1 for its class, 0 otherwise) plus
  binary cross-entropy of the old classes' outputs to the sigmoid of the previous model's
  (a frozen copy compiled at the task start); summed over classes, averaged over the batch.
- Classification: nearest mean of exemplars in normalised feature space, through the
  evaluation seam; a head with no exemplars yet (before its task) is scored by its outputs.

Task-incremental streams: "old classes" are the old heads' outputs, exemplars of other tasks
count as negatives for every new class, and a task is classified among its own classes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from growth.compile import compile_graph
from growth.data.streaming import is_lazy
from growth.errors import ConfigError
from growth.regularizers import evaluating
from growth.strategies.base import Context, Scorer
from growth.strategies.lwf import old_outputs
from growth.strategies.rehearsal import (
    MemoryParams,
    Rehearsal,
    class_keys,
    head_groups,
)

if TYPE_CHECKING:
    from growth.data import Task

NOT_NEW = -1  # the label of an exemplar whose class is none of the current head's new classes
CHUNK = 1024


class ICaRLParams(MemoryParams):
    """iCaRL settings: memory 500 samples (exemplars of all classes together), features at the
    trunk's output node "features"."""

    feature_layer: str = Field("features", description="node whose output is the feature space")


@torch.no_grad()
def features(ctx: Context, node: str, x: Tensor) -> Tensor:
    """L2-normalised outputs of `node` for x, in eval mode, in chunks."""
    view = ctx.model.node_view(node)
    with evaluating(ctx.model.module):
        out = [view(x[i:i + CHUNK].to(ctx.device)).flatten(1) for i in range(0, len(x), CHUNK)]
    return F.normalize(torch.cat(out), dim=1)


def nme_scores(feats: Tensor, means: Tensor, labels: Tensor, width: int) -> Tensor:
    """Scores [N, width]: minus the distance of each (normalised) feature to each class's mean
    at its label's column, -inf where a label has no mean."""
    scores = torch.full((len(feats), width), float("-inf"), device=feats.device)
    scores[:, labels] = -torch.cdist(feats, means)
    return scores


class ICaRL(Rehearsal):
    name = "icarl"
    # class-incremental by design: its distillation covers the classes of earlier tasks, none
    # when every task brings the same classes (domain)
    scenarios = ("task", "class")
    description = "iCaRL: herding exemplars, distillation, nearest-mean-of-exemplars classifier"
    Params = ICaRLParams
    params: ICaRLParams

    def __init__(self, params: ICaRLParams | None = None) -> None:
        super().__init__(params)
        self._teacher: nn.Module | None = None
        self._old: dict[str, Tensor] = {}
        self._new = torch.empty(0, dtype=torch.long)

    def before_task(self, ctx: Context) -> None:
        super().before_task(ctx)
        self._old = old_outputs(ctx)
        self._new = ctx.label_of(ctx.task, torch.arange(ctx.task.n_classes)).to(ctx.device)
        self._teacher = None
        if self._old:
            teacher = compile_graph(ctx.model.graph, head=list(self._old)).to(ctx.device)
            self._teacher = teacher.eval().requires_grad_(False)

    def train_sets(self, ctx: Context) -> list[Task]:
        """The task's samples joined by every exemplar (head labels; NOT_NEW for exemplars of
        another head), one set, so batches mix new data and exemplars."""
        if not len(self.memory):
            return [ctx.task]
        x, y = ctx.task.train
        if is_lazy(x):
            raise ConfigError("icarl joins its exemplars to the task's data in memory; use "
                              "data.load: memory (not stream) with it")
        y = ctx.label_of(ctx.task, y)
        mx, my, mt = self.memory.batch(self.memory.rows())
        own = head_groups(ctx, mt).get(ctx.head_of(ctx.task), torch.empty(0, dtype=torch.long))
        labels = torch.full_like(my, NOT_NEW)
        labels[own] = my[own]
        joined = (torch.cat([x, mx.to(x.device)]), torch.cat([y, labels.to(y.device)]))
        return [dataclasses.replace(ctx.task, train=joined, class_offset=0)]

    def extra_heads(self, ctx: Context) -> list[str]:
        return list(old_outputs(ctx))

    def loss(self, ctx: Context, x: Tensor, y: Tensor, logits: Tensor) -> Tensor:
        target = (y[:, None] == self._new[None]).to(logits.dtype)
        total = F.binary_cross_entropy_with_logits(logits[:, self._new], target, reduction="sum")
        if self._teacher is not None:
            outputs = ctx.outputs if ctx.outputs is not None else \
                ctx.model.head(tuple(self._old))(x)
            with torch.no_grad():
                old = self._teacher(x)
            for h, cols in self._old.items():
                total = total + F.binary_cross_entropy_with_logits(
                    outputs[h][:, cols], torch.sigmoid(old[h][:, cols]), reduction="sum")
        return total / len(y)

    def remember(self, ctx: Context) -> None:
        """Cut old classes to m exemplars, then herd m of each new class."""
        key = class_keys(ctx)
        x, y = self.stream(ctx)
        task = torch.full_like(y, ctx.task.index)
        classes = set(self.memory.classes(key)) | set(key(task, y).unique().tolist())
        m = self.params.memory // len(classes)
        self.memory.keep_per_class(m, key)
        feats = features(ctx, self.params.feature_layer, x)
        self.memory.herding(x, y, task, feats, m, key)

    def class_means(self, ctx: Context, head: str) -> tuple[Tensor, Tensor] | None:
        """(labels, normalised mean features of their exemplars) of one head's classes."""
        rows = head_groups(ctx, self.memory.task).get(head) if len(self.memory) else None
        if rows is None:
            return None
        mx, my, _ = self.memory.batch(rows)
        feats = features(ctx, self.params.feature_layer, mx)
        labels = my.unique()
        means = torch.stack([feats[my == c].mean(0) for c in labels])
        return labels, F.normalize(means, dim=1)

    @contextmanager
    def evaluation(self, ctx: Context, task: Task) -> Iterator[Scorer]:
        head = ctx.head_of(task)
        view = ctx.model.head(head)
        found = self.class_means(ctx, head)
        if found is None:
            yield view
            return
        labels, means = found
        width = int(view(self.memory.x[:1]).shape[1])
        node = ctx.model.node_view(self.params.feature_layer)
        yield lambda x: nme_scores(F.normalize(node(x).flatten(1), dim=1), means, labels, width)
