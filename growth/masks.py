"""Weight ownership for the mask-based strategies (PackNet, CPG): which weights a task may train,
pruning by magnitude, and swapping masked weights in for evaluation.

Masked parameters are the trunk's weight matrices and kernels (linear and conv weights, two or
more dims); biases and BatchNorm (the trunk's one-dimensional parameters and BN statistics)
are "shared" tensors that the strategies freeze after the first task or store per task. An
owner index says which task a weight belongs to: 0 = free, k + 1 = task k.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

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
    return torch.uint8 if tasks < 255 else torch.int16 if tasks < 32767 else torch.int32


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
        self.keep = {n: ~t.to(params[n].device) for n, t in trainable.items()}
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
