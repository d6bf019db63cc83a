"""The pieces of the mask-based strategies (PackNet, CPG, HAT, Piggyback, SupSup): which
weights a task may train, pruning by magnitude, frozen or per-task shared tensors, real-valued
scores trained through the binary masks they give, and swapping masked weights in for
evaluation.

Masked parameters are the trunk's weight matrices and kernels (linear and conv weights, two or
more dims); biases and BatchNorm (the trunk's one-dimensional parameters and BN statistics)
are "shared" tensors that the strategies freeze after the first task or store per task. An
owner index says which task a weight belongs to: 0 = free, k + 1 = task k.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor, nn

from growth.model import Model


def masked_names(model: Model) -> list[str]:
    """Trunk parameters with two or more dims: the weights owners and masks cover."""
    params = model.named_parameters()
    return [n for n in model.trunk_parameter_names() if params[n].dim() >= 2]


def shared_names(model: Model) -> list[str]:
    """Trunk tensors outside the masks: biases, BatchNorm affine parameters and statistics."""
    trunk = {n.split(".", 1)[0] for n in model.trunk_parameter_names()}
    weights = set(masked_names(model))
    tensors = dict(model.module.state_dict(keep_vars=True))
    return [n for n in tensors if n.split(".", 1)[0] in trunk and n not in weights]


def batchnorms(model: Model) -> list[nn.Module]:
    """The trunk's BatchNorm modules."""
    trunk = {n.split(".", 1)[0] for n in model.trunk_parameter_names()}
    return [m for n, m in model.module.named_children()
            if n in trunk and isinstance(m, nn.modules.batchnorm._BatchNorm)]


def owner_dtype(tasks: int) -> torch.dtype:
    """The smallest integer type that holds owner indices 0..tasks."""
    return torch.uint8 if tasks <= 255 else torch.int16 if tasks <= 32767 else torch.int32


def prune_smallest(weight: Tensor, candidates: Tensor, ratio: float) -> Tensor:
    """The round(ratio * n) entries of `weight` with the smallest magnitude among the n
    `candidates` (ties: the earlier entry goes first), as a boolean mask."""
    return smallest(weight, candidates, int(round(ratio * int(candidates.sum()))))


def smallest(weight: Tensor, candidates: Tensor, k: int) -> Tensor:
    """The k `candidates` entries of `weight` with the smallest magnitude (ties: the earlier
    entry first), as a boolean mask."""
    flat = candidates.flatten()
    out = torch.zeros_like(flat)
    if k <= 0:
        return out.view_as(candidates)
    idx = flat.nonzero().flatten()
    mags = weight.detach().flatten()[idx].abs().float().cpu()
    order = torch.sort(mags, stable=True).indices[:k]
    out[idx[order.to(idx.device)]] = True
    return out.view_as(candidates)


@contextmanager
def swapped(tensors: Mapping[str, Tensor], values: Mapping[str, Tensor]) -> Iterator[None]:
    """Write `values` into the named tensors (parameters or buffers) for the block and put the
    exact old values back afterwards."""
    saved = {}
    with torch.no_grad():
        for n, v in values.items():
            saved[n] = tensors[n].detach().clone()
            tensors[n].detach().copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for n, v in saved.items():
                tensors[n].detach().copy_(v)


class Guard:
    """Keeps the entries a task may not train exactly where they are during a fit.

    Gradients of those entries are zeroed after every backward pass, so momentum and Adam's
    moments stay zero there and a fresh optimizer never moves them; `restore` writes their
    values back (after each step when the optimizer decays weights, and at the end of a fit).
    """

    def __init__(self, params: Mapping[str, nn.Parameter], trainable: Mapping[str, Tensor]):
        self.params = {n: params[n] for n in trainable}
        self.scale = {n: t.to(params[n].device, params[n].dtype) for n, t in trainable.items()}
        self.values = {n: p.detach().clone() for n, p in self.params.items()}
        self.frozen = {n: v * (1 - self.scale[n]) for n, v in self.values.items()}

    def mask_grads(self) -> None:
        for n, p in self.params.items():
            if p.grad is not None:
                p.grad.mul_(self.scale[n])

    @torch.no_grad()
    def restore(self, skip: set[str] | frozenset[str] = frozenset()) -> None:
        """p * trainable + values * (1 - trainable): exact, and two passes (a `where` is
        several times slower on the CPU)."""
        for n, p in self.params.items():
            if n not in skip:
                p.mul_(self.scale[n]).add_(self.frozen[n])


def decays(optimizer: torch.optim.Optimizer | None) -> bool:
    """Whether the optimizer moves weights whose gradient is zero (weight decay)."""
    return optimizer is not None and any(g.get("weight_decay", 0) for g in optimizer.param_groups)


@contextmanager
def held_norms(model: Model) -> Iterator[None]:
    """BatchNorm held for the block: eval mode (its running statistics, which no penalty
    can hold) and no gradient for its affine parameters; both put back."""
    norms = [(m, m.training) for m in batchnorms(model)]
    params = [(p, p.requires_grad) for m, _ in norms for p in m.parameters()]
    for m, _ in norms:
        m.eval()
    for p, _ in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for m, mode in norms:
            m.train(mode)
        for p, grad in params:
            p.requires_grad_(grad)


@contextmanager
def frozen_shared(model: Model) -> Iterator[None]:
    """The shared tensors train no more for the block: biases and BatchNorm affine parameters
    get no gradient, BatchNorm runs on its running statistics (eval mode); both put back."""
    params = model.named_parameters()
    frozen = [params[n] for n in shared_names(model) if n in params]
    grads = [p.requires_grad for p in frozen]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with held_norms(model):
            yield
    finally:
        for p, g in zip(frozen, grads):
            p.requires_grad_(g)


def shared_copy(model: Model) -> dict[str, Tensor]:
    """A CPU copy of the shared tensors (biases, BatchNorm parameters and statistics), for
    strategies that store them per task."""
    tensors = model.module.state_dict()
    return {n: tensors[n].detach().cpu().clone() for n in shared_names(model)}


def kth_largest(values: Tensor, k: int, work: tuple[Tensor, Tensor] | None = None) -> float:
    """The k-th largest of non-negative float32 `values` (1 <= k <= numel), exactly.

    A radix select on the float bits (ordered like the values for non-negative floats): one
    bincount of the top 16 bits finds the bin holding the k-th largest, and only that bin's
    values are ranked. Several times faster than `kthvalue` or a sort on the CPU, where
    edge-popup's top-k runs on every training step. work: an int32 and a bool buffer of the
    values' size, so that no large tensor is allocated per call."""
    flat = values.detach().reshape(-1)
    n = flat.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k must lie in 1..{n}, got {k}")
    if n <= 4096:
        return float(flat.kthvalue(n - k + 1).values)
    bits, hit = work if work is not None else (torch.empty(n, dtype=torch.int32),
                                               torch.empty(n, dtype=torch.bool))
    top = torch.bitwise_right_shift(flat.view(torch.int32), 16, out=bits.view(-1))
    counts = torch.bincount(top, minlength=1 << 15).flip(0)  # counts per bin, largest first
    reached = counts.cumsum(0)
    j = int(torch.searchsorted(reached, k))  # the first bin (from the top) reaching k values
    rank = k - int(reached[j] - counts[j])  # the k-th largest is this bin's rank-th largest
    b = (1 << 15) - 1 - j
    if flat.device.type == "cpu":  # numpy's boolean indexing is several times faster here
        members = torch.from_numpy(flat.numpy()[np.equal(top.numpy(), b,
                                                          out=hit.view(-1).numpy())])
    else:
        members = flat[torch.eq(top, b, out=hit.view(-1))]
    return float(members.kthvalue(members.numel() - rank + 1).values)


class TopK:
    """edge-popup's supermask of one score tensor: 1.0 at the n - floor((1 - keep) * n)
    entries of largest |score| (ties at the threshold: all kept), 0.0 elsewhere, in the
    scores' dtype.

    Called on every training step, with scores that moved a little since the last call: on
    the CPU the new threshold is first looked for among the values near the last one (two
    counts say whether the k-th largest lies in that band, which is then ranked alone), else
    found by `kth_largest`. Exact either way. Holds its work buffers, so a step allocates no
    large tensor."""

    def __init__(self, like: Tensor, keep: float) -> None:
        self.k = max(1, like.numel() - int((1 - keep) * like.numel()))
        self.magnitude = torch.empty_like(like, dtype=torch.float32)
        self.work = (torch.empty_like(like, dtype=torch.int32),
                     torch.empty_like(like, dtype=torch.bool))
        self.threshold: float | None = None
        self.width = 0.0
        self.flags: np.ndarray | None = None  # a second boolean buffer (CPU)

    def __call__(self, scores: Tensor, out: Tensor) -> Tensor:
        mags = torch.abs(scores.detach(), out=self.magnitude)
        found = self._near_last(mags) if mags.device.type == "cpu" else None
        threshold = kth_largest(mags, self.k, self.work) if found is None else found
        if self.threshold is not None:  # the band the next call searches first
            self.width = max(4 * abs(threshold - self.threshold), threshold * 2.0 ** -20)
        self.threshold = threshold
        return torch.ge(mags, threshold, out=out)

    def _near_last(self, mags: Tensor) -> float | None:
        """The k-th largest if it lies within a few widths of the last threshold, else None."""
        if self.threshold is None:
            return None
        values = mags.numpy().reshape(-1)
        over = self.work[1].view(-1).numpy()
        if self.flags is None:
            self.flags = np.empty(values.size, dtype=bool)
        width = self.width
        for _ in range(3):
            high, low = self.threshold + width, self.threshold - width
            above = np.count_nonzero(np.greater(values, high, out=over))
            inside = np.count_nonzero(np.greater(values, low, out=self.flags)) - above
            if above < self.k <= above + inside:
                band = values[np.logical_and(self.flags, np.logical_not(over, out=over),
                                             out=over)]
                at = band.size - (self.k - above)  # the (k - above)-th largest of the band
                return float(np.partition(band, at)[at])
            width *= 8
        return None


class ScoredMasks:
    """Real-valued scores trained through the binary masks they give, over fixed weights
    (Piggyback, SupSup): the straight-through estimator, on the one loop.

    Made once per task (its buffers and the scores' optimizer live as long as the task);
    inside `applied(params)`, around each fit, the named parameters hold W * mask(scores), so
    the loop runs the plain network; `binarise(name, scores, out)` writes the 0/1 mask (float)
    into `out`. After each backward pass (`move_grads`) a score's gradient is its effective
    weight's gradient times W (d mask / d score taken as 1), times sign(score) when the mask
    ranks |score| (`magnitude`); the parameter's own gradient is dropped, so the loop's
    optimizer never moves W. After each step (`step`) the scores' optimizer steps and the
    masked weights are written again. Leaving `applied` puts W back bit for bit.
    """

    def __init__(self, scores: Mapping[str, Tensor],
                 binarise: Callable[[str, Tensor, Tensor], Tensor],
                 optimizer: torch.optim.Optimizer, magnitude: bool = False) -> None:
        self.scores = dict(scores)
        self.binarise = binarise
        self.optimizer = optimizer
        self.magnitude = magnitude
        self.params: dict[str, nn.Parameter] = {}
        self.weights = {n: torch.empty_like(s.detach()) for n, s in self.scores.items()}
        self.masks = {n: torch.empty_like(s.detach()) for n, s in self.scores.items()}
        self.signs = {n: torch.empty_like(s.detach()) for n, s in self.scores.items()} \
            if magnitude else {}

    @contextmanager
    def applied(self, params: Mapping[str, nn.Parameter]) -> Iterator[None]:
        """The parameters hold W * mask(scores) for the block; W exactly afterwards."""
        self.params = {n: params[n] for n in self.scores}
        with torch.no_grad():
            for n, p in self.params.items():
                self.weights[n] = self.weights[n].to(p.dtype).copy_(p.detach())
        self.write()
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.detach().copy_(self.weights[n])
            self.params = {}

    @torch.no_grad()
    def write(self) -> None:
        """Parameters <- W * mask(scores)."""
        for n, p in self.params.items():
            mask = self.binarise(n, self.scores[n].detach(), self.masks[n])
            torch.mul(self.weights[n], mask.to(p.dtype), out=p.detach())

    @torch.no_grad()
    def move_grads(self) -> None:
        """Score gradient <- effective weight's gradient * W (* sign(score)); none for W."""
        for n, p in self.params.items():
            g, score = p.grad, self.scores[n]
            p.grad = None
            if g is None:
                score.grad = None
                continue
            g = torch.mul(g, self.weights[n], out=g).to(score.dtype)
            if self.magnitude:
                g.mul_(torch.sign(score.detach(), out=self.signs[n]))
            score.grad = g

    def step(self) -> None:
        self.optimizer.step()
        self.write()

    def binary(self) -> dict[str, Tensor]:
        """The current masks as booleans on the CPU (what a task stores)."""
        with torch.no_grad():
            return {n: self.binarise(n, s.detach(), torch.empty_like(s.detach())).cpu() > 0
                    for n, s in self.scores.items()}


def score_optimizer(scores: list[Tensor], kind: str, lr: float) -> torch.optim.Optimizer:
    """The scores' own optimizer: Adam (fused, one pass over each tensor, where torch has it)
    or SGD with momentum 0.9."""
    if kind == "sgd":
        return torch.optim.SGD(scores, lr=lr, momentum=0.9)
    try:
        return torch.optim.Adam(scores, lr=lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(scores, lr=lr)
