"""CWR* (Lomonaco & Maltoni 2017) and AR1 (Maltoni & Lomonaco 2019): consolidated output weights.

Single-head class-incremental. The output layer (the linear layer feeding the shared head)
keeps consolidated weights cw, one row per class, and a count past_j of the training samples
of class j seen so far. Each task:
- before: the head is zeroed and the rows of the task's classes seen before get their cw back
  (the temporary weights tw; new classes start at zero);
- training: CWR* trains the head alone after the first task (the trunk is frozen, BatchNorm in
  eval mode); AR1 trains the trunk too, with SI's penalty (`growth.strategies.si`) on the
  trunk only;
- after: with cur_j the task's samples of class j, tw_j <- tw_j - mean (the mean of the task's
  classes' weights, and apart the mean of their biases), then
  cw_j <- (cw_j w_j + tw_j) / (w_j + 1), w_j = sqrt(past_j / cur_j) (cw_j = tw_j for a new
  class), past_j += cur_j; the head becomes cw (zero rows for classes not seen yet).
State: cw/all/<layer>.weight|bias and count/all/classes (past_j, int64); AR1 adds SI's.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import Tensor, nn

from growth.errors import GraphError
from growth.regularizers import Component
from growth.remap import IMPORTANCE, WEIGHT
from growth.strategies.base import Context, Strategy, StrategyParams, state_key
from growth.strategies.si import SI, SIParams
from growth.strategies.spec import TensorSpec

COUNT = state_key("count", "all", "classes")


def head_names(ctx: Context, layer: str | None) -> list[str]:
    """Parameter names of the consolidated layer: `layer`, or the linear layer feeding the
    task's head (weight first, then bias if it has one)."""
    name = layer or ctx.model.head_layer(ctx.head_of(ctx.task))
    module = dict(ctx.model.module.named_children()).get(name)
    if not isinstance(module, nn.Linear):
        raise GraphError(f"the consolidated output layer must be a linear layer; {name!r} is "
                         f"{type(module).__name__ if module is not None else 'not a layer'} "
                         "(set the strategy's `layer` to the head's linear layer)")
    return [f"{name}.weight"] + ([f"{name}.bias"] if module.bias is not None else [])


def class_counts(ctx: Context, rows: int) -> Tensor:
    """cur_j: the current task's training samples of each class of the head (int64 [rows])."""
    labels = ctx.label_of(ctx.task, ctx.task.train[1]).cpu()
    if len(labels) and int(labels.max()) >= rows:
        raise GraphError(f"task {ctx.task.name!r} has class {int(labels.max())} but the "
                         f"consolidated layer has {rows} outputs")
    return torch.bincount(labels, minlength=rows)


class ConsolidatedHead:
    """CWR*'s consolidated rows cw and counts past, kept in a strategy's state dict."""

    def __init__(self, state: dict[str, Tensor]) -> None:
        self.state = state

    def past(self, rows: int) -> Tensor:
        return self.state.get(COUNT, torch.zeros(rows, dtype=torch.long))

    @torch.no_grad()
    def reset(self, params: Mapping[str, nn.Parameter], names: list[str], cur: Tensor) -> None:
        """tw: zero rows, except the task's classes seen before, which get their cw back."""
        again = ((cur > 0) & (self.past(len(cur)) > 0)).to(params[names[0]].device)
        for n in names:
            p = params[n]
            cw = self.state.get(state_key("cw", "all", n))
            p.zero_()
            if cw is not None:
                p[again] = cw.to(p)[again]

    @torch.no_grad()
    def consolidate(self, params: Mapping[str, nn.Parameter], names: list[str],
                    cur: Tensor) -> None:
        """cw_j <- (cw_j w_j + tw_j - mean) / (w_j + 1) for the task's classes; then the layer
        holds cw (zero rows for classes never seen)."""
        past = self.past(len(cur))
        now = cur > 0
        w = torch.sqrt(past[now].double() / cur[now].double())
        for n in names:
            p = params[n]
            tw = p.detach().cpu().double()[now]
            tw = tw - tw.mean()  # the weights' mean over the task's classes; apart for biases
            key = state_key("cw", "all", n)
            cw = self.state.get(key, torch.zeros(p.shape, dtype=p.dtype)).double()
            shape = (-1,) + (1,) * (tw.dim() - 1)
            cw[now] = (cw[now] * w.view(shape) + tw) / (w.view(shape) + 1)
            self.state[key] = cw.to(p.dtype)
            p.copy_(self.state[key].to(p))
        self.state[COUNT] = past + cur


class CWRParams(StrategyParams):
    """CWR* settings.

    No strength to set: the trunk learns on the first task only and the output layer is
    consolidated. `layer`: the consolidated layer (default: the linear layer feeding the head).
    Class-incremental split digits (experiments/cwr_split_digits_class.yaml; seeds 0-4): ACC
    0.341 ± 0.079 (README).
    """

    layer: str | None = Field(
        None, description="consolidated output layer (default: the head's linear layer)")


def cwr_spec() -> dict[str, TensorSpec]:
    return {"cw": TensorSpec(("all",), "same"),
            "count": TensorSpec(("all",), "any", "int", parameter=False)}


def check_tasks(extra: Mapping[str, Any], finished: int) -> list[str]:
    if extra.get("tasks", []) != list(range(finished)):
        return [f"extra 'tasks' is {extra.get('tasks')!r}, expected the {finished} finished "
                f"tasks {list(range(finished))}"]
    return []


class CWRStar(Strategy):
    name = "cwr"
    description = ("CWR*: consolidated output weights per class (count-weighted), zero-init "
                   "temporary head, trunk trained on the first task only (class scenario)")
    Params = CWRParams
    params: CWRParams
    scenarios: ClassVar[tuple[str, ...]] = ("class",)
    state_roles: ClassVar[dict[str, str]] = {"cw": WEIGHT}

    def before_task(self, ctx: Context) -> None:
        self._names = head_names(ctx, self.params.layer)
        params = ctx.model.named_parameters()
        self._cur = class_counts(ctx, params[self._names[0]].shape[0])
        ConsolidatedHead(self.state).reset(params, self._names, self._cur)

    @contextmanager
    def training(self, ctx: Context) -> Iterator[None]:
        """After the first task only the consolidated layer trains; the rest is frozen, its
        BatchNorm on its running statistics."""
        if not self.extra.get("tasks"):
            yield
            return
        layer = self._names[0].rsplit(".", 1)[0]
        frozen = [(p, p.requires_grad) for n, p in ctx.model.named_parameters().items()
                  if n not in self._names]
        norms = [(m, m.training) for n, m in ctx.model.module.named_children()
                 if n != layer and isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for p, _ in frozen:
            p.requires_grad_(False)
        for m, _ in norms:
            m.eval()
        try:
            yield
        finally:
            for p, g in frozen:
                p.requires_grad_(g)
            for m, mode in norms:
                m.train(mode)

    def after_task(self, ctx: Context) -> None:
        ConsolidatedHead(self.state).consolidate(ctx.model.named_parameters(), self._names,
                                                 self._cur)
        self.extra["tasks"] = [*self.extra.get("tasks", []), ctx.task.index]

    def state_spec(self) -> dict[str, TensorSpec]:
        return cwr_spec()

    def check_state(self, tensors: Mapping[str, Tensor], extra: Mapping[str, Any],
                    graph_tensors: Mapping[str, Tensor], finished: int) -> list[str]:
        return (super().check_state(tensors, extra, graph_tensors, finished)
                + check_tasks(extra, finished))


class AR1Params(SIParams):
    """AR1 settings: SI's on the trunk (c, xi), a cap on its importance, CWR*'s `layer`.

    c: 1, xi: 0.1 (SI's defaults), clip: None. On class-incremental split digits (experiments/
    ar1_split_digits_class.yaml: 5 tasks of 2 classes, MLP 64-100-100, SGD lr 0.05 momentum
    0.9, 10 epochs; seeds 0-4) it gives ACC 0.321 ± 0.056 (CWR* 0.341 ± 0.079, SI alone
    0.204 ± 0.046; README).
    """

    clip: float | None = Field(
        None, gt=0, description="cap on SI's importance Omega in the penalty (None: none)")
    layer: str | None = Field(
        None, description="consolidated output layer (default: the head's linear layer)")


class AR1(SI):
    name = "ar1"
    description = ("AR1: CWR*'s consolidated output weights plus SI's penalty on the trunk, "
                   "which trains on every task (class scenario)")
    Params = AR1Params
    params: AR1Params
    scenarios: ClassVar[tuple[str, ...]] = ("class",)
    state_roles: ClassVar[dict[str, str]] = {"anchor": WEIGHT, "omega": IMPORTANCE, "cw": WEIGHT}

    def before_task(self, ctx: Context) -> None:
        self._head = head_names(ctx, self.params.layer)
        params = ctx.model.named_parameters()
        self._cur = class_counts(ctx, params[self._head[0]].shape[0])
        ConsolidatedHead(self.state).reset(params, self._head, self._cur)
        super().before_task(ctx)

    def tracked(self, ctx: Context) -> list[str]:
        """SI covers the trunk: every trained parameter but the consolidated layer's."""
        head = set(head_names(ctx, self.params.layer))
        return [n for n in super().tracked(ctx) if n not in head]

    def components(self, ctx: Context) -> list[Component]:
        """SI's term, its Omega capped at `clip` (the stored sum is kept whole)."""
        clip = self.params.clip
        return [(scale, w if w is None or clip is None else
                 {n: t.clamp(max=clip) for n, t in w.items()}, anchors)
                for scale, w, anchors in super().components(ctx)]

    def after_task(self, ctx: Context) -> None:
        super().after_task(ctx)
        ConsolidatedHead(self.state).consolidate(ctx.model.named_parameters(), self._head,
                                                 self._cur)

    def state_spec(self) -> dict[str, TensorSpec]:
        return {**super().state_spec(), **cwr_spec()}
