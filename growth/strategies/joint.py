"""Joint training: at each task, train on the data of every task seen so far (upper bound).

It reads old tasks' data, which the continual setting forbids; it is the reference that
shows how much the other strategies lose. Tasks that share a head (class-incremental) are
joined into one training set, so every batch mixes their classes; with a head per task, the
tasks' batches are interleaved.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from growth.strategies.base import Context, Strategy
from growth.strategies.rehearsal import join_by_head

if TYPE_CHECKING:
    from growth.data import Task


class Joint(Strategy):
    name = "joint"
    description = "multi-task training on all tasks seen so far (upper bound; reads old data)"

    def train_sets(self, ctx: Context) -> list[Task]:
        return join_by_head(ctx, [*ctx.seen, ctx.task])
