"""Training-time augmentation of image batches, per sample, vectorised over the batch.

- crop_flip (the CIFAR standard): zero-pad by H/8 pixels (4 on 32x32), crop back to H x W at a
  random offset, flip left-right with probability 1/2.
- resized_crop_flip (the ImageNet/CUB standard): crop a random box of 8%..100% of the area with
  aspect ratio 3/4..4/3, resize it back to H x W (bilinear), flip with probability 1/2.

Randomness comes from the generator the training loop passes (seeded per task), so augmented
runs stay reproducible and resume to the same result. Evaluation and importance measurements
never augment.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from growth.errors import DataError

AUGMENTATIONS = ("none", "crop_flip", "resized_crop_flip")
AREA = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)


def augment(x: Tensor, kind: str, gen: torch.Generator) -> Tensor:
    """A new batch: `x` [B, C, H, W] augmented sample by sample (`kind` from AUGMENTATIONS)."""
    if kind == "none":
        return x
    if x.dim() != 4:
        raise DataError(f"augment {kind!r} needs image batches [B, C, H, W], got shape "
                        f"{tuple(x.shape)}")
    if kind == "crop_flip":
        return _flip(_crop(x, gen), gen)
    if kind == "resized_crop_flip":
        return _resized_crop_flip(x, gen)
    raise DataError(f"unknown augmentation {kind!r}; valid: {', '.join(AUGMENTATIONS)}")


def _crop(x: Tensor, gen: torch.Generator) -> Tensor:
    b, c, h, w = x.shape
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad))
    top = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(x.device)
    left = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(x.device)
    rows = (top[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (left[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chans = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


def _flip(x: Tensor, gen: torch.Generator) -> Tensor:
    flip = (torch.rand(len(x), generator=gen) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def _resized_crop_flip(x: Tensor, gen: torch.Generator) -> Tensor:
    """One affine sampling grid per sample: box scale, box centre and the flip sign."""
    b = len(x)
    area = torch.empty(b).uniform_(*AREA, generator=gen)
    log_ratio = torch.empty(b).uniform_(math.log(RATIO[0]), math.log(RATIO[1]), generator=gen)
    ratio = log_ratio.exp()
    sx = (area * ratio).sqrt().clamp(max=1.0)  # box width / image width
    sy = (area / ratio).sqrt().clamp(max=1.0)
    cx = (torch.rand(b, generator=gen) * 2 - 1) * (1 - sx)  # centre keeps the box inside
    cy = (torch.rand(b, generator=gen) * 2 - 1) * (1 - sy)
    sign = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = sx * sign, cx
    theta[:, 1, 1], theta[:, 1, 2] = sy, cy
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
