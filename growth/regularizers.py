"""Pieces the regularisation strategies share: per-sample importances, quadratic penalties, KD.

- `fisher_diagonal` / `mas_importance`: exact per-sample gradients (torch.func: functional_call
  + vmap + grad, in chunks) reduced to the diagonal Fisher (mean squared gradient of
  log p(y|x), labels given) or MAS's mean |d ||f(x)||^2 / d theta|.
- `sliced_importance`: SCP's mean over random unit slices xi of (d xi . mean_x f(x) / d theta)^2.
- `PathIntegral`: the running sums -g * delta over optimiser steps that SI, AR1 and RWalk
  integrate along a task's path.
- `Quadratic`: sum_k s_k sum_i W_{k,i} (theta_i - a_{k,i})^2 over parameters keyed by name,
  merged once into one term per parameter, W (theta - m)^2 + const, so the hot loop costs the
  same for one anchor or twenty; its gradient in closed form (RWalk separates the task loss's
  gradient from the penalty's with it). Anchors and weights have their parameter's shape: after a
  graph change they were carried through its record (`growth.remap`), never sliced.
- `kd_loss`: distillation at a temperature.

The strategies built on them are in `growth.strategies` (the quadratic ones share
`growth.strategies.ewc.QuadraticStrategy`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from growth.data.sampling import generator
from growth.errors import ShapeError

if TYPE_CHECKING:
    from growth.context import Context
    from growth.data import Task

CANCELLED = 1e-12  # |sum v| below this fraction of sum |v|: the weights cancel (linear term)
GRAD_BUDGET = 1 << 25  # floats of per-sample gradients held at once (128 MiB in float32)

SampleLoss = Callable[[Tensor, Tensor], Tensor]  # (logits [1, C], label [1]) -> scalar


# ---- per-sample importances ------------------------------------------------------------------
def mean_sample_grads(view: nn.Module, names: list[str], x: Tensor, y: Tensor,
                      loss: SampleLoss, reduce: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
    """Mean over samples of reduce(per-sample gradient of loss), for parameters `names`.

    Runs the view in eval mode (deterministic; BatchNorm uses running statistics).
    """
    params = dict(view.named_parameters())
    own = {n: params[n].detach() for n in names}
    fixed = {n: p.detach() for n, p in params.items() if n not in own}
    fixed.update(dict(view.named_buffers()))

    def one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(view, {**fixed, **p}, (xi.unsqueeze(0),))
        return loss(out, yi.unsqueeze(0))

    per_sample = vmap(grad(one), in_dims=(None, 0, 0))
    chunk = max(1, min(len(y), GRAD_BUDGET // max(1, sum(p.numel() for p in own.values()))))
    acc = {n: torch.zeros_like(p) for n, p in own.items()}
    with evaluating(view):
        for i in range(0, len(y), chunk):
            grads = per_sample(own, x[i:i + chunk], y[i:i + chunk])
            for n, g in grads.items():
                acc[n] += reduce(g).sum(0)
    return {n: a / max(len(y), 1) for n, a in acc.items()}


@contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """Eval mode for a module and its (possibly shared) layers, each layer's mode restored."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _log_likelihood(out: Tensor, y: Tensor) -> Tensor:
    return F.log_softmax(out, dim=1).gather(1, y.view(-1, 1)).sum()


def _squared_norm(out: Tensor, _y: Tensor) -> Tensor:
    return out.square().sum()


def fisher_diagonal(view: nn.Module, names: list[str], x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Diagonal Fisher: mean over samples of (d log p(y|x) / d theta)^2, with the given labels."""
    return mean_sample_grads(view, names, x, y, _log_likelihood, torch.square)


def mas_importance(view: nn.Module, names: list[str], x: Tensor) -> dict[str, Tensor]:
    """MAS importance: mean over samples of |d ||f(x)||_2^2 / d theta| (no labels needed)."""
    y = torch.zeros(len(x), dtype=torch.long, device=x.device)
    return mean_sample_grads(view, names, x, y, _squared_norm, torch.abs)


def sliced_importance(view: nn.Module, names: list[str], x: Tensor, slices: Tensor,
                      chunk: int = 256) -> dict[str, Tensor]:
    """SCP's importance: (1/L) sum_l (d (xi_l . mean_n f(x_n)) / d theta)^2 over the L unit
    slices xi_l (rows of `slices`, [L, C]), f the view's outputs, in eval mode.

    The projection is linear in xi, so with J = d mean_n f(x_n) / d theta (C rows, one backward
    pass per output) the sum over slices is the quadratic form J' M J of M = xi' xi / L: memory
    C x parameters, whatever L is.
    """
    params = dict(view.named_parameters())
    own = [params[n] for n in names]
    classes = slices.shape[1]
    jac = [torch.zeros((classes, *p.shape), dtype=p.dtype, device=p.device) for p in own]
    with evaluating(view):
        for i in range(0, len(x), chunk):
            mean = view(x[i:i + chunk]).sum(0) / len(x)  # this chunk's share of the mean
            if mean.shape != (classes,):
                raise ShapeError(f"SCP slices have {classes} coordinates but the view's output "
                                 f"has shape {tuple(mean.shape)}")
            for c in range(classes):
                grads = torch.autograd.grad(mean[c], own, retain_graph=c + 1 < classes,
                                            allow_unused=True)
                for j, g in zip(jac, grads):
                    if g is not None:
                        j[c] += g
    gram = (slices.T.double() @ slices.double() / len(slices)).to(jac[0].dtype)
    return {n: torch.einsum("c...,cd,d...->...", j, gram.to(j.device), j)
            for n, j in zip(names, jac)}


def task_sample(ctx: Context, task: Task, n: int | None) -> tuple[Tensor, Tensor]:
    """Up to n training samples of a task, head labels. The subset is drawn from the run's
    randomness: fixed by (ctx.seed, task index), so another seed measures another subset."""
    x, y = task.train
    if n is not None and n < len(y):
        gen = generator(ctx.seed, "importance-sample", task.index)
        idx = torch.randperm(len(y), generator=gen)[:n]
        x, y = x[idx], y[idx]
    return x.to(ctx.device), ctx.label_of(task, y).to(ctx.device)


def task_view(ctx: Context, task: Task) -> tuple[nn.Module, list[str]]:
    """The module serving a task's head, and the names of its trainable parameters."""
    view = ctx.model.head(ctx.head_of(task))
    return view, [n for n, p in view.named_parameters() if p.requires_grad]


def task_fisher(ctx: Context, task: Task, samples: int | None) -> dict[str, Tensor]:
    """Diagonal Fisher of a task through its head (CPU tensors, ready for strategy state)."""
    view, names = task_view(ctx, task)
    x, y = task_sample(ctx, task, samples)
    return {n: f.cpu() for n, f in fisher_diagonal(view, names, x, y).items()}


# ---- path integrals -----------------------------------------------------------------------------
class PathIntegral:
    """omega_i = sum over optimiser steps of -g_i * delta_i for some parameters, from `start`.

    `read_grads` after backward takes the gradients (the loop's, or ones the caller derived
    from them); `step` after the optimiser's step adds -g * (theta - theta_prev). `start` and
    `omega` may be given (a graph change carried them through its records); parameters
    without them start from their current value and zero. `restart` begins a new interval.
    """

    def __init__(self, params: dict[str, nn.Parameter], start: dict[str, Tensor] | None = None,
                 omega: dict[str, Tensor] | None = None) -> None:
        start, omega = start or {}, omega or {}
        self.names = list(params)
        self.params = [params[n] for n in self.names]
        with torch.no_grad():
            self.prev = [p.detach().clone() for p in self.params]
            self.start = [start[n] if n in start else p.detach().clone()
                          for n, p in zip(self.names, self.params)]
            self.omega = [omega[n] if n in omega else torch.zeros_like(p)
                          for n, p in zip(self.names, self.params)]
        self.grads: list[Tensor | None] = [None] * len(self.names)

    def read_grads(self, grads: list[Tensor | None] | None = None) -> None:
        """The gradients of this step (default: each parameter's .grad)."""
        self.grads = [p.grad for p in self.params] if grads is None else list(grads)

    @torch.no_grad()
    def step(self) -> None:
        for p, prev, omega, g in zip(self.params, self.prev, self.omega, self.grads):
            if g is not None:
                omega.sub_(g * (p - prev))
            prev.copy_(p)
        self.grads = [None] * len(self.names)

    @torch.no_grad()
    def restart(self) -> None:
        """A new interval from here: start = theta now, omega = 0."""
        for p, start, omega in zip(self.params, self.start, self.omega):
            start.copy_(p)
            omega.zero_()

    def moved(self) -> list[Tensor]:
        """theta - start, per parameter."""
        return [p.detach() - s for p, s in zip(self.params, self.start)]


# ---- stored state ------------------------------------------------------------------------------
def stored(state: Mapping[str, Tensor], what: str, task: int | str) -> dict[str, Tensor]:
    """{parameter: tensor} of the state entries keyed "<what>/<task>/<parameter>" (only
    those are read: other entries may live in files, growth.tensorfiles)."""
    prefix = f"{what}/{task}/"
    return {k[len(prefix):]: state[k] for k in state if k.startswith(prefix)}


def same_shape(a: Tensor, b: Tensor, name: str) -> None:
    """ShapeError unless two versions of one parameter's state have one shape (state follows
    graph changes through `Context.replace_graph`, never by matching slices)."""
    if a.shape != b.shape:
        raise ShapeError(f"state of parameter {name!r} has shapes {tuple(a.shape)} and "
                         f"{tuple(b.shape)}; the graph changed without its change record reaching "
                         "the strategy (use Context.replace_graph(graph, record))")


# ---- the quadratic penalty -----------------------------------------------------------------------
Component = tuple[float, dict[str, Tensor] | None, dict[str, Tensor]]  # scale, weights, anchors


@dataclass
class Quadratic:
    """sum over terms of (W * (theta - m)^2).sum() + sum over linear terms of (L * theta).sum()
    + const, built for one compiled module."""

    module: nn.Module
    terms: list[tuple[nn.Parameter, Tensor, Tensor]]  # (parameter, centre m, weight W)
    const: float
    linear: list[tuple[nn.Parameter, Tensor]] = field(default_factory=list)  # (parameter, L)

    def __call__(self) -> Tensor | None:
        if not self.terms and not self.linear:
            return None
        total = sum((w * (p - m).square()).sum() for p, m, w in self.terms)
        total = total + sum((lin * p).sum() for p, lin in self.linear)
        return total + self.const

    @torch.no_grad()
    def gradient(self) -> dict[nn.Parameter, Tensor]:
        """d penalty / d theta of each parameter it covers: 2 W (theta - m) + L."""
        out: dict[nn.Parameter, Tensor] = {}
        for p, m, w in self.terms:
            out[p] = 2 * w * (p - m)
        for p, lin in self.linear:
            out[p] = out[p] + lin if p in out else lin.clone()
        return out


def build_quadratic(module: nn.Module, components: Iterable[Component],
                    only: set[str] | None = None) -> Quadratic:
    """Merge sum_k s_k sum_i W_{k,i} (theta_i - a_{k,i})^2 into one term per parameter.

    weights None (or a parameter missing from them) means all ones. Parameters absent from the
    module, or from `only` when given, are skipped; an anchor or weight of another shape than
    its parameter is a ShapeError. Merging is exact for weights of any sign (SI's Omega can be
    negative). With b_k = a_k - a_1 (exact in float64), sum_k v_k (theta - a_k)^2 is
    V (theta - m)^2 + const, m = a_1 + sum v b / V, const = sum v b^2 - (sum v b)^2 / V, where
    V != 0: at a common anchor b = 0, so the penalty, its constant and its gradient are exactly
    0 there. Where the weights cancel (|V| <= CANCELLED * sum |v|: a V left by rounding would
    put m far away and lose the penalty to float32 cancellation; dropping it changes the
    penalty by V (theta - a_1)^2) it is the linear term -2 sum v b (theta - a_1) + sum v b^2.
    """
    params = {n: p for n, p in module.named_parameters() if only is None or n in only}
    acc: dict[str, list[Tensor]] = {}  # name -> [a_1, V, sum v b, sum v b^2, sum |v|], float64
    for scale, weights, anchors in components:
        for name, anchor in anchors.items():
            p = params.get(name)
            if p is None:
                continue
            same_shape(anchor, p, name)
            a = anchor.detach().cpu().double()
            if name not in acc:
                acc[name] = [a, *(torch.zeros(p.shape, dtype=torch.float64) for _ in range(4))]
            ref, v, vb, vbb, mass = acc[name]
            w = None if weights is None else weights.get(name)
            if w is None:
                w = torch.ones_like(a)
            else:
                same_shape(w, p, name)
                w = w.detach().cpu().double()
            w = scale * w
            b = a - ref
            v += w
            vb += w * b
            vbb += w * b * b
            mass += w.abs()
    terms, linear, const = [], [], 0.0
    for name in (n for n in params if n in acc):  # module order: sums independent of the state's
        ref, v, vb, vbb, mass = acc[name]
        nonzero = v.abs() > CANCELLED * mass
        safe = torch.where(nonzero, v, torch.ones_like(v))
        shift = torch.where(nonzero, vb / safe, torch.zeros_like(vb))
        lin = torch.where(nonzero, torch.zeros_like(vb), -2 * vb)
        const += float((vbb - torch.where(nonzero, vb * shift, torch.zeros_like(vb))
                        - lin * ref).sum())
        p = params[name]
        if bool(nonzero.any()):
            terms.append((p, (ref + shift).to(p), torch.where(nonzero, v, 0.0).to(p)))
        if bool((lin != 0).any()):
            linear.append((p, lin.to(p)))
    return Quadratic(module, terms, const, linear)


# ---- distillation ------------------------------------------------------------------------------
def kd_loss(student: Tensor, teacher: Tensor, temperature: float = 2.0) -> Tensor:
    """KL(teacher || student) of temperature-softened outputs, times T^2 (Hinton et al.) so its
    gradient scale does not depend on T; zero when the outputs agree."""
    t = temperature
    log_s = F.log_softmax(student / t, dim=1)
    log_t = F.log_softmax(teacher.detach() / t, dim=1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * (t * t)

