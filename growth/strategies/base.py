"""The strategy protocol: hooks on the one training loop, plus state that checkpoints carry.

A strategy is a flat class with a few hooks, each a no-op by default. The loop in
`growth.train` calls only the hooks a strategy overrides, so an idle hook costs nothing.

Hooks, in the order the loop calls them:
  before_task(ctx)                 set up (snapshot old weights, add masks, grow the graph)
  train_sets(ctx) -> list[Task]    the tasks whose data this task trains on (joint: all seen)
  extra_heads(ctx) -> list[str]    heads to compute in the same forward pass as the task's
                                   own (LwF: the old heads); they reach `penalty` as
                                   ctx.outputs, a dict head -> logits
  training(ctx)                    a context manager around each fit: set-up and tear-down
                                   (frozen BatchNorm, masked weights written in and restored)
  loss(ctx, x, y, logits)          the batch's loss in place of cross-entropy (a method's own
                                   loss)
  penalty(ctx, x, y, logits)       extra loss terms for a batch (regularisers, distillation,
                                   a replay batch's loss)
  after_backward(ctx)              edit gradients (masks) or read them (SI)
  after_step(ctx)                  after optimizer.step (SI's path integral, re-apply masks)
  after_task(ctx)                  consolidate (Fisher, importance, pruning, compression)
  evaluation(ctx, task)            a context manager yielding the scorer of a task's inputs
                                   (default: the task's head view); strategies whose
                                   prediction is not "the head as trained" override it
                                   (per-task masks, nearest-mean classifiers, a network
                                   retrained before evaluation)

State: importance tensors, anchors and masks live in `self.state`, a flat dict keyed
"<what>/<task>/<parameter name>" (e.g. "fisher/2/fc1.weight"), so every strategy stores them
one way and checkpoints see them all; `extra` holds small JSON-able values. `state_spec`
declares what the tensors look like, so a checkpoint is checked before it is loaded. When the
graph changes (`Context.replace_graph(graph, records)`), `follow` carries every entry through
the operators' change records by the role the strategy declares for its `what` in
`state_roles` (`growth.remap`: anchors like weights, importances onto the old units, masks
gathered with new positions free); a strategy with live buffers (SI's path sums) extends
`follow`. So every per-parameter tensor always has its parameter's shape.
Once a task's checkpoint is written, the entries of per-task slots (`TensorSpec(slots=
"tasks")`: a finished task's Fisher, anchors, picks) are read from their files when used
(`offload`, growth.tensorfiles.StateDict), so state that grows with the tasks stays out of
memory: replace such an entry (`state[key] = t`), never change it in place.
Strategies that keep old data (a replay memory, a generator of it) say how much in
`memory_report`; it is reported apart from model size. Around a whole run, the campaign
enters `session(workdir)` (REC holds one Ray cluster for all its searches there), and
`run_report` adds a strategy's own figures to `metrics.json` (a search's cost, REC's
per-task expansion and compression).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict

from growth.context import HOOKS, Context, Scorer
from growth.remap import remap_state
from growth.strategies.spec import TensorSpec, check_tensors
from growth.tensorfiles import StateDict, TensorRef, copy_state

if TYPE_CHECKING:
    from pathlib import Path

    from growth.data import Task
    from growth.model import Model
    from growth.ops.registry import ChangeRecord



class StrategyParams(BaseModel):
    """Base of every strategy's validated settings (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)


class Strategy:
    """Fine-tuning: the base of all strategies, and the lower bound (no protection at all)."""

    name: ClassVar[str] = "finetune"
    description: ClassVar[str] = "train on each task in turn with no protection (lower bound)"
    Params: ClassVar[type[StrategyParams]] = StrategyParams
    # where the method makes sense (growth.scenarios): a method that needs the task id to
    # predict (masks, columns chosen per task) runs only in "task"
    scenarios: ClassVar[tuple[str, ...]] = ("task", "class", "domain")
    # what to change when a setting narrows `scenarios` (said when a campaign refuses one)
    scenario_advice: ClassVar[str] = ""
    # role of each kind of state ("what" in "what/task/param") under a graph change
    state_roles: ClassVar[dict[str, str]] = {}

    def __init__(self, params: StrategyParams | None = None) -> None:
        self.params = params if params is not None else type(self).Params()
        self.state: MutableMapping[str, torch.Tensor] = {}
        self.extra: dict[str, Any] = {}

    # ---- hooks (no-ops) -------------------------------------------------------------------
    def before_task(self, ctx: Context) -> None:
        """Called before the task's first epoch."""

    def train_sets(self, ctx: Context) -> list[Task]:
        """Tasks whose training data the loop iterates over (default: the current one)."""
        return [ctx.task]

    def extra_heads(self, ctx: Context) -> list[str]:
        """Heads the penalty needs besides the task's own, computed in one forward pass."""
        return []

    def loss(self, ctx: Context, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor
             ) -> torch.Tensor:
        """The batch's loss in place of cross-entropy (only called when overridden)."""
        return F.cross_entropy(logits, y)

    def penalty(self, ctx: Context, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor
                ) -> torch.Tensor | None:
        """Extra loss for the batch (added to cross-entropy), or None."""
        return None

    def after_backward(self, ctx: Context) -> None:
        """Called after loss.backward(), before the optimizer step."""

    def after_step(self, ctx: Context) -> None:
        """Called after each optimizer step."""

    def after_task(self, ctx: Context) -> None:
        """Called after the task's last epoch, before evaluation."""

    @contextmanager
    def training(self, ctx: Context) -> Iterator[None]:
        """Wraps one fit (entered after the model is put in training mode, before the
        optimizer is built): set-up and tear-down around the whole fit (BatchNorm in eval mode,
        parameters frozen, effective weights written into the parameters and the true values
        restored afterwards). Only called when overridden."""
        yield

    @contextmanager
    def evaluation(self, ctx: Context, task: Task) -> Iterator[Scorer]:
        """Yield what scores `task`'s inputs in eval mode; scores' argmax is the prediction,
        in the task's head labels. Set-up and tear-down (masks swapped in and out) go around
        the yield, so a whole split is scored in one set-up."""
        yield ctx.model.head(ctx.head_of(task))

    # ---- state ----------------------------------------------------------------------------
    def follow(self, ctx: Context, records: list[ChangeRecord]) -> None:
        """Carry the state through a graph change (called by `Context.replace_graph`, after
        the model was recompiled): every entry by the role of its `what` in `state_roles`."""
        shapes = {n: tuple(p.shape) for n, p in ctx.model.named_parameters().items()}
        self.state = remap_state(self.state, records, self.state_roles, shapes, self.name)

    def state_dict(self) -> tuple[MutableMapping[str, torch.Tensor], dict[str, Any]]:
        """Tensors (to safetensors) and small JSON-able values (to JSON); entries read from
        files stay references (a checkpoint names their files instead of writing them)."""
        return copy_state(self.state), dict(self.extra)

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], extra: dict[str, Any]
                        ) -> None:
        self.state = copy_state(tensors)
        self.extra = dict(extra)

    def offload(self, stored: Mapping[str, TensorRef]) -> None:
        """After a checkpoint is written or read: the entries of per-task slots
        (`slots="tasks"` in `state_spec`: a finished task owns them, and hooks replace them
        but never change them in place) are read from the files `stored` names from now on;
        every other entry (running sums, owners, memories: changed in place or used every
        step) is held in memory."""
        spec = self.state_spec()
        state = self.state if isinstance(self.state, StateDict) else StateDict(self.state)
        for key in list(state):
            rule = spec.get(key.split("/", 1)[0])
            if rule is not None and rule.slots == "tasks":
                if key in stored:
                    state.refer(key, stored[key])
            elif state.ref(key) is not None:
                state[key] = state[key]  # read into memory
        self.state = state

    def state_spec(self) -> dict[str, TensorSpec]:
        """What `state` holds, by `what` (see growth.strategies.spec); a checkpoint's tensors
        are checked against it before loading. Default: no tensors. Declare yours."""
        return {}

    def check_state(self, tensors: Mapping[str, torch.Tensor], extra: Mapping[str, Any],
                    graph_tensors: Mapping[str, torch.Tensor], finished: int) -> list[str]:
        """Problems with saved state after `finished` tasks, before it is loaded (empty: it
        fits). Override to check `extra` too, calling this for the tensors."""
        return check_tensors(self.state_spec(), tensors, graph_tensors, finished, self.name)

    def size_tensors(self) -> list[torch.Tensor]:
        """Tensors that are part of the deployed model besides its parameters (masks,
        adapters); counted in model size (group "extra"). Regulariser memory (Fisher,
        anchors) is not."""
        return []

    def size_parts(self, model: Model) -> dict[str, list[Any]]:
        """The deployed model by part, for `metrics.json` sizes: lists of tensors (counted as
        held) or `growth.metrics.Stored` pieces (counted as stored: owner indices in the bits
        they need, binary masks as bits, `parameters=False`). Default: "trunk" (parameters
        every head uses), "heads" (the rest), "extra" (`size_tensors`). Override to regroup
        parameters (columns, adapters) or to add stored side data ("masks")."""
        params = model.named_parameters()
        trunk = set(model.trunk_parameter_names())
        return {"trunk": [p for n, p in params.items() if n in trunk],
                "heads": [p for n, p in params.items() if n not in trunk],
                "extra": list(self.size_tensors())}

    def session(self, workdir: Path) -> AbstractContextManager[Any]:
        """What the strategy holds for a whole run (entered before the first task a run or
        resume learns, left after the last): REC keeps one Ray cluster for all its searches.
        Default: nothing."""
        return nullcontext()

    def run_report(self) -> dict[str, Any]:
        """Figures this strategy adds to `metrics.json` (JSON-able): "search" = {"children":
        candidate networks trained, "child_time_s": their training time, ...} for strategies
        that search, anything else under "details". Default: nothing."""
        return {}

    def memory_report(self) -> dict[str, int] | None:
        """How much old data the strategy keeps, reported apart from model size: None if it
        keeps none; else {"samples": stored samples, "bytes": their bytes} and, for a
        generator of old data, "generator_params" (its bytes counted in "bytes")."""
        return None

    def overridden(self) -> set[str]:
        """Names of the hooks this strategy really implements (the loop skips the rest)."""
        return {h for h in HOOKS if getattr(type(self), h) is not getattr(Strategy, h)}


def state_key(what: str, task: int | str, param: str) -> str:
    """The one key format for per-task, per-parameter strategy state."""
    return f"{what}/{task}/{param}"
