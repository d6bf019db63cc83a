"""What the replay strategies share: an episodic memory in strategy state, replay losses through
each sample's own head, and the memory seen as training sets.

`Rehearsal` keeps one `EpisodicMemory` (growth/memory.py) under the `memory` budget, filled at
the end of each task by streaming the task's training samples, in an order drawn from the
task's seed, through the strategy's insertion policy (reservoir unless the method says
otherwise). During a task the memory therefore holds old tasks' samples only. Labels are
stored in their head's label space (class-incremental: global class ids), with the task index,
so a task-incremental replay sends each sample through its own task's head.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from torch.func import functional_call

from growth.data.sampling import generator
from growth.data.streaming import is_lazy, take
from growth.memory import PREFIX, EpisodicMemory
from growth.strategies.base import Context, Strategy, StrategyParams
from growth.strategies.spec import TensorSpec

if TYPE_CHECKING:
    from growth.data import Task

ViewFn = Callable[[str | tuple[str, ...]], nn.Module]  # head name(s) -> module computing them


class MemoryParams(StrategyParams):
    """Settings every method with an episodic memory shares."""

    memory: int = Field(500, ge=1, description="memory budget in samples (all tasks together)")


class ReplayParams(MemoryParams):
    """Settings of the methods that replay memory batches during training."""

    replay_batch: int = Field(32, ge=1, description="memory samples replayed per step")


def tasks_by_index(ctx: Context) -> dict[int, Task]:
    return {t.index: t for t in [*ctx.seen, ctx.task]}


def class_keys(ctx: Context) -> Callable[[Tensor, Tensor], Tensor]:
    """(task indices, head labels) -> one integer per class: the head's position in the model
    times 2**20 plus the label, so task-incremental tasks' classes stay apart."""
    tasks = tasks_by_index(ctx)
    heads = ctx.model.heads

    def key(task: Tensor, y: Tensor) -> Tensor:
        pos = torch.tensor([heads.index(ctx.head_of(tasks[int(t)])) for t in task.tolist()],
                           dtype=torch.long, device=y.device)
        return pos * (1 << 20) + y.to(torch.long)

    return key


def head_groups(ctx: Context, task: Tensor) -> dict[str, Tensor]:
    """Head name -> positions of the rows whose task that head serves."""
    tasks = tasks_by_index(ctx)
    out: dict[str, list[int]] = {}
    for i, t in enumerate(task.tolist()):
        out.setdefault(ctx.head_of(tasks[t]), []).append(i)
    return {h: torch.tensor(rows, dtype=torch.long, device=task.device)
            for h, rows in out.items()}


def replay_losses(ctx: Context, x: Tensor, y: Tensor, task: Tensor,
                  view: ViewFn | None = None, params: dict[str, Tensor] | None = None
                  ) -> Tensor:
    """Per-sample cross-entropy, each sample through its own task's head, with one trunk pass
    for all heads. view: builds the module for some heads (default: the model's head views;
    latent replay passes the layers above its node). params: evaluate under these parameter
    values instead of the module's own (a virtual step)."""
    view = view or ctx.model.head
    groups = head_groups(ctx, task)
    names = tuple(groups)
    module = view(names if len(names) > 1 else names[0])
    if params is None:
        out = module(x)
    else:
        own = {n: params[n] for n, _ in module.named_parameters() if n in params}
        out = functional_call(module, own, (x,))
    if len(names) == 1:
        out = {names[0]: out}
    losses = torch.empty(len(y), device=x.device)
    for h, rows in groups.items():
        losses[rows] = F.cross_entropy(out[h][rows], y[rows], reduction="none")
    return losses


def replay_loss(ctx: Context, x: Tensor, y: Tensor, task: Tensor,
                view: ViewFn | None = None) -> Tensor:
    """Mean cross-entropy of replayed samples through their own heads."""
    return replay_losses(ctx, x, y, task, view).mean()


def join_by_head(ctx: Context, tasks: list[Task]) -> list[Task]:
    """Tasks sharing a head joined into one training set (labels in head space), so batches
    mix their classes; tasks with a head of their own are left as they are."""
    groups: dict[str, list[Task]] = {}
    for t in tasks:
        groups.setdefault(ctx.head_of(t), []).append(t)
    out = []
    for group in groups.values():
        if len(group) == 1 or any(is_lazy(t.train[0]) for t in group):
            out.extend(group)
            continue
        x = torch.cat([t.train[0] for t in group])
        y = torch.cat([ctx.label_of(t, t.train[1]) for t in group])
        out.append(dataclasses.replace(group[-1], train=(x, y), class_offset=0))
    return out


def as_tasks(ctx: Context, x: Tensor, y: Tensor, task: Tensor) -> list[Task]:
    """Rows grouped by head into training sets the loop can iterate: one Task per head, its
    labels already in head space (class_offset 0), so batches mix every class of that head."""
    tasks = tasks_by_index(ctx)
    out = []
    for rows in head_groups(ctx, task).values():
        first = tasks[int(task[rows[0]])]
        out.append(dataclasses.replace(first, train=(x[rows], y[rows]), class_offset=0))
    return out


class Rehearsal(Strategy):
    """Base of the strategies that keep an episodic memory of old samples."""

    Params = MemoryParams
    params: MemoryParams

    def __init__(self, params: MemoryParams | None = None) -> None:
        super().__init__(params)
        self.memory = EpisodicMemory(self.params.memory)
        self.gen = torch.Generator()

    def before_task(self, ctx: Context) -> None:
        """Replay draws come from the task's seed, so a resumed run draws the same batches."""
        self.gen = generator(ctx.seed, self.name, "replay", ctx.task.index)
        self.memory.to(ctx.device)

    def after_task(self, ctx: Context) -> None:
        self.remember(ctx)

    def remember(self, ctx: Context) -> None:
        """Stream the task's training samples through the reservoir in a seeded order."""
        x, y = self.stream(ctx)
        self.memory.reservoir(x, y, ctx.task.index, generator(ctx.seed, "reservoir",
                                                                ctx.task.index))

    def stream(self, ctx: Context) -> tuple[Tensor, Tensor]:
        """The task's training samples (head labels) in the order the memory is offered them;
        images streamed from disk stay a lazy view (only the rows kept are read)."""
        x, y = ctx.task.train
        order = torch.randperm(len(y), generator=generator(ctx.seed, "stream", ctx.task.index))
        return take(x, order), ctx.label_of(ctx.task, y[order])

    def replay_batch(self, n: int) -> tuple[Tensor, Tensor, Tensor] | None:
        """A uniform draw of n rows from the memory, or None when it is empty."""
        if not len(self.memory):
            return None
        return self.memory.batch(self.memory.sample(n, self.gen))

    # ---- state ---------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors, extra = super().state_dict()
        mem, meta = self.memory.state_dict()
        return {**tensors, **mem}, {**extra, "memory": meta}

    def load_state_dict(self, tensors: dict[str, Tensor], extra: dict[str, Any]) -> None:
        own = {k: v for k, v in tensors.items() if not k.startswith(PREFIX)}
        rest = {k: v for k, v in extra.items() if k != "memory"}
        super().load_state_dict(own, rest)
        self.memory.load_state_dict(tensors, extra.get("memory", {}))

    def state_spec(self) -> dict[str, TensorSpec]:
        return {"memory": TensorSpec(slots=("all",), shape="any", dtype="any", parameter=False)}

    def check_state(self, tensors: Mapping[str, Tensor], extra: Mapping[str, Any],
                    graph_tensors: Mapping[str, Tensor], finished: int) -> list[str]:
        """The memory's rows: float inputs, integer labels and tasks, one length."""
        problems = super().check_state(tensors, extra, graph_tensors, finished)
        x, y, task = (tensors.get(PREFIX + k) for k in ("x", "y", "task"))
        for key, t in ((PREFIX + "y", y), (PREFIX + "task", task)):
            if t is not None and (t.is_floating_point() or t.dim() != 1):
                problems.append(f"tensor {key!r} must be a vector of integers, got {t.dtype} "
                                f"of shape {tuple(t.shape)}")
        lengths = {len(t) for t in (x, y, task) if t is not None}
        if len(lengths) > 1:
            problems.append(f"the memory's tensors {PREFIX}x, y and task differ in length "
                            f"({sorted(lengths)})")
        if task is not None and len(task) and int(task.max()) >= finished:
            problems.append(f"tensor {PREFIX + 'task'!r} names task {int(task.max())}, which is "
                            f"not finished (0..{finished - 1})")
        return problems

    def memory_report(self) -> dict[str, int]:
        return self.memory.report()
