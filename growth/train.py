"""The one training loop every strategy shares, and evaluation.

`learn_task` = before_task -> fit -> after_task. `fit` is plain minibatch SGD/Adam over the
strategy's training sets with cross-entropy (or the strategy's own `loss`) plus its penalty;
strategies that need extra training (pruning, distillation, search children, a generator)
call `fit` again rather than writing a loop of their own. Only the hooks a strategy overrides
are called.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from growth.context import Context, Hooks, TrainConfig
from growth.data.augment import augment
from growth.data.streaming import ImageFiles, is_lazy, loader_batches
from growth.errors import DivergedError

if TYPE_CHECKING:
    from growth.data import Task

# An epoch whose mean loss is above EXPLODING times the loss the fit started from (its first
# epoch's first batch, measured before any step; times 1 when that is below 1) has exploded:
# the fit stops as for a NaN loss. Losses a method legitimately reaches stay within a few
# times the starting one; an exploding one grows by orders of magnitude (1e23, 1e29) while
# still finite, often within the first epoch, and every later number it produces is garbage.
EXPLODING = 1e4
ADVICE = "lower train.lr or the strategy's strength (lambda, c, lambda_o)"


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


@dataclass
class _Set:
    view: torch.nn.Module
    x: torch.Tensor | ImageFiles  # the whole split on the device, or files read per batch
    y: torch.Tensor
    head: str
    multi: bool  # the view returns a dict of heads (the task's own and the strategy's extras)
    augment: str = "none"  # growth.data.augment, applied to training batches only


def _sets(ctx: Context, tasks: list[Task], extra: list[str]) -> list[_Set]:
    out = []
    for t in tasks:
        x, y = t.train
        head = ctx.head_of(t)
        heads = tuple(dict.fromkeys([head, *extra]))
        view = ctx.model.head(heads if len(heads) > 1 else head)
        out.append(_Set(view, x.to(ctx.device), ctx.label_of(t, y).to(ctx.device), head,
                        len(heads) > 1, t.augment))
    return out


Batch = tuple[_Set, torch.Tensor, torch.Tensor]


def _batches(sets: list[_Set], batch_size: int, gen: torch.Generator,
             device: torch.device) -> Iterator[Batch]:
    """Shuffled minibatches (set, x, y) of every set; with several sets, batches are
    interleaved. Splits held as tensors are indexed in place (the fast path); files are read
    through a DataLoader."""
    if any(is_lazy(s.x) for s in sets):
        yield from _streamed(sets, batch_size, gen, device)
        return
    if len(sets) == 1:
        s = sets[0]
        for idx in _order(s, gen).split(batch_size):
            x = s.x[idx]
            yield s, (x if s.augment == "none" else augment(x, s.augment, gen)), s.y[idx]
        return
    plan = [(i, idx) for i, s in enumerate(sets) for idx in _order(s, gen).split(batch_size)]
    for k in torch.randperm(len(plan), generator=gen).tolist():
        i, idx = plan[k]
        s = sets[i]
        x = s.x[idx]
        yield s, (x if s.augment == "none" else augment(x, s.augment, gen)), s.y[idx]


def _streamed(sets: list[_Set], batch_size: int, gen: torch.Generator,
              device: torch.device) -> Iterator[Batch]:
    """The fast path's batches, in its order (each set's shuffle, then the interleaving),
    with files read through DataLoaders: a loader reads its set's batches in the order the
    interleaving will ask for them."""
    splits = [_order(s, gen).split(batch_size) for s in sets]
    plan = [(i, j) for i, parts in enumerate(splits) for j in range(len(parts))]
    picks = (torch.randperm(len(plan), generator=gen).tolist() if len(sets) > 1
             else list(range(len(plan))))
    sources: list[Iterator[tuple[torch.Tensor, torch.Tensor]]] = []
    for i, s in enumerate(sets):
        parts = [splits[i][plan[k][1]] for k in picks if plan[k][0] == i]
        if is_lazy(s.x):
            sources.append(loader_batches(s.x, [p.cpu() for p in parts], device))
        else:
            sources.append((s.x[idx], idx) for idx in parts)
    for k in picks:
        s = sets[plan[k][0]]
        x, positions = next(sources[plan[k][0]])
        yield s, (x if s.augment == "none" else augment(x, s.augment, gen)), s.y[positions]


def _order(s: _Set, gen: torch.Generator) -> torch.Tensor:
    """A shuffled order drawn on the CPU (seeded), moved to the data's device once per epoch."""
    return torch.randperm(len(s.y), generator=gen).to(s.y.device)


def fit(ctx: Context, strategy: Hooks, cfg: TrainConfig, seed: int = 0,
        epochs: int | None = None,
        params: list[torch.nn.Parameter] | None = None,
        on_epoch: Callable[[int, float], None] | None = None,
        optimizer: torch.optim.Optimizer | None = None) -> list[float]:
    """Train ctx.model on the strategy's training sets; returns the mean loss of each epoch.

    params: the parameters to optimise (default: all of the model's).
    optimizer: go on with this optimizer (e.g. `ctx.optimizer` after `ctx.replace_graph`)
    instead of a fresh one; the last optimizer stays in `ctx.optimizer` after the fit.
    """
    hooks = strategy.overridden()
    use_loss = "loss" in hooks
    use_penalty = "penalty" in hooks
    use_after_backward = "after_backward" in hooks
    use_after_step = "after_step" in hooks
    extra = strategy.extra_heads(ctx)
    sets = _sets(ctx, strategy.train_sets(ctx), extra)
    gen = torch.Generator().manual_seed(seed)
    ctx.model.train()
    with ExitStack() as stack:
        if "training" in hooks:
            stack.enter_context(strategy.training(ctx))
        if optimizer is None:
            if params is None:
                params = [p for p in ctx.model.module.parameters() if p.requires_grad]
            optimizer = make_optimizer(params, cfg)
        ctx.optimizer = optimizer
        return _epochs(ctx, strategy, cfg, sets, extra, gen, epochs, optimizer,
                       on_epoch, (use_loss, use_penalty, use_after_backward, use_after_step))


def _epochs(ctx: Context, strategy: Hooks, cfg: TrainConfig, sets: list[_Set],
            extra: list[str], gen: torch.Generator, epochs: int | None,
            optimizer: torch.optim.Optimizer,
            on_epoch: Callable[[int, float], None] | None,
            use: tuple[bool, bool, bool, bool]) -> list[float]:
    use_loss, use_penalty, use_after_backward, use_after_step = use
    losses: list[float] = []
    n_epochs = cfg.epochs if epochs is None else epochs
    schedule = _schedule(cfg, n_epochs, _batches_per_epoch(sets, cfg.batch_size))
    step = 0
    start = math.nan  # the first batch's loss, the reference of EXPLODING
    best = _Best(ctx, strategy, cfg.patience)
    for epoch in range(n_epochs):
        ctx.epoch = epoch
        total = torch.zeros((), device=ctx.device)
        n = 0
        for s, x, y in _batches(sets, cfg.batch_size, gen, ctx.device):
            out = s.view(x)
            if s.multi:
                ctx.outputs = out
                logits = out[s.head]
            else:
                logits = out
                if extra:
                    ctx.outputs = {s.head: logits}
            loss = strategy.loss(ctx, x, y, logits) if use_loss else F.cross_entropy(logits, y)
            if use_penalty:
                term = strategy.penalty(ctx, x, y, logits)
                if term is not None:
                    loss = loss + term
            if step == 0:
                start = float(loss.detach())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if use_after_backward:
                strategy.after_backward(ctx)
            if schedule is not None:
                for group in optimizer.param_groups:
                    group["lr"] = schedule(step)
            optimizer.step()
            step += 1
            if use_after_step:
                strategy.after_step(ctx)
            total += loss.detach()
            n += 1
        ctx.outputs = None
        losses.append(float(total) / max(n, 1))
        problem = _diverged(losses[-1], start)
        if problem is not None:
            _stop(ctx, strategy, epoch, problem)
        if on_epoch is not None:
            on_epoch(epoch, losses[-1])
        if best.stop_after(epoch):
            break
    best.restore()
    broken = [i for i, g in enumerate(optimizer.param_groups)
              for p in g["params"] if not bool(torch.isfinite(p).all())]
    if broken:  # a last step can break the weights after the last loss was measured
        _stop(ctx, strategy, max(len(losses) - 1, 0), "the weights hold NaN or infinite values")
    return losses


def _diverged(last: float, start: float) -> str | None:
    """Why an epoch's mean loss means the fit diverged (None: it did not); see EXPLODING."""
    if not math.isfinite(last):
        return f"the loss is {last}"
    limit = EXPLODING * max(abs(start), 1.0) if math.isfinite(start) else math.inf
    if abs(last) > limit:
        return (f"the loss exploded to {last:.3g} (it started at {start:.3g}; the limit is "
                f"{EXPLODING:g} x that, at least {EXPLODING:g})")
    return None


def _stop(ctx: Context, strategy: Hooks, epoch: int, problem: str) -> None:
    """One line: what diverged, where, and what to lower (the hooks' own advice, if any)."""
    what = getattr(strategy, "fitting", None) or "training"
    advice = getattr(strategy, "diverged_advice", None) or ADVICE
    detail = f"{what} diverged on task {ctx.task.name!r} in epoch {epoch + 1}: {problem}"
    raise DivergedError(f"{detail}; {advice}", detail)


class _Best:
    """Early stopping on the task's validation split: the best epoch's weights (and buffers;
    the weights the fit started from count as epoch -1) are kept and put back at the end;
    training stops after `patience` epochs without a gain. Off when patience is None or the
    task has no validation split."""

    def __init__(self, ctx: Context, strategy: Hooks, patience: int | None) -> None:
        self.ctx, self.strategy, self.patience = ctx, strategy, patience
        self.on = patience is not None and len(ctx.task.val[1]) > 0
        self.acc, self.epoch, self.state = -1.0, -1, None
        if self.on:  # the weights the fit starts from are a candidate too
            self.stop_after(-1)

    def stop_after(self, epoch: int) -> bool:
        if not self.on:
            return False
        scored = self.strategy if "evaluation" in self.strategy.overridden() else None
        acc = evaluate(self.ctx, self.ctx.task, "val", strategy=scored)
        if acc > self.acc:
            self.acc, self.epoch = acc, epoch
            self.state = {k: v.detach().clone()
                          for k, v in self.ctx.model.module.state_dict().items()}
        return epoch - self.epoch >= self.patience

    def restore(self) -> None:
        if self.state is not None:
            with torch.no_grad():
                for k, v in self.ctx.model.module.state_dict().items():
                    v.copy_(self.state[k])


def _batches_per_epoch(sets: list[_Set], batch_size: int) -> int:
    return sum(math.ceil(len(s.y) / batch_size) for s in sets)


def _schedule(cfg: TrainConfig, epochs: int, per_epoch: int) -> Callable[[int], float] | None:
    """The learning rate of each step of a fit (None: constant, the optimizer's own): a linear
    warm-up over `warmup_epochs`, then constant, cosine to 0 over the remaining steps, or
    step decay (times gamma at each milestone epoch reached)."""
    total = epochs * per_epoch
    if (cfg.schedule == "constant" and not cfg.warmup_epochs) or total <= 0:
        return None
    warm = min(cfg.warmup_epochs * per_epoch, total)

    def lr(step: int) -> float:
        if step < warm:
            return cfg.lr * (step + 1) / warm
        if cfg.schedule == "cosine":
            return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * (step - warm) / (total - warm)))
        if cfg.schedule == "step":
            epoch = step // per_epoch
            return cfg.lr * cfg.gamma ** sum(1 for m in cfg.milestones if m <= epoch)
        return cfg.lr

    return lr


def learn_task(ctx: Context, strategy: Hooks, cfg: TrainConfig, seed: int = 0,
               on_epoch: Callable[[int, float], None] | None = None) -> list[float]:
    """before_task -> fit -> after_task: how a campaign learns one task."""
    ctx.train_fit = lambda **kw: fit(ctx, strategy, cfg, **{"seed": seed, **kw})
    ctx.strategy = strategy
    ctx.train_config = cfg
    strategy.before_task(ctx)
    losses = fit(ctx, strategy, cfg, seed=seed, on_epoch=on_epoch)
    strategy.after_task(ctx)
    return losses


@torch.no_grad()
def evaluate(ctx: Context, task: Task, split: str = "test", batch_size: int = 1024,
             strategy: Hooks | None = None) -> float:
    """Accuracy of the model on one task's split (NaN if empty): through that task's head, or
    through `strategy.evaluation` when the strategy overrides it."""
    x, y = getattr(task, split)
    if len(y) == 0:
        return float("nan")
    labels = ctx.label_of(task, y).to(ctx.device)
    scoring = (strategy.evaluation(ctx, task)
               if strategy is not None and "evaluation" in strategy.overridden()
               else nullcontext(ctx.model.head(ctx.head_of(task))))
    modes = [(m, m.training) for m in ctx.model.module.modules()]  # each layer's own mode:
    ctx.model.eval()  # a strategy may hold some in eval mode through a fit (frozen BatchNorm)
    correct = 0
    try:
        with scoring as score:
            for i in range(0, len(labels), batch_size):
                scores = score(x[i:i + batch_size].to(ctx.device))
                correct += int((scores.argmax(1) == labels[i:i + batch_size]).sum())
    finally:
        for m, mode in modes:
            m.training = mode
    return correct / max(len(labels), 1)
