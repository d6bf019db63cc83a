"""Image variations for the MNIST-variation kind of stream, vectorised over the whole batch.

- original: the images unchanged.
- rotated: each image rotated by its own angle, uniform in [0, 360), about its centre
  (bilinear; corners that come from outside the image are black).
- noise_background: background pixels (every channel below BACKGROUND_THRESHOLD, i.e. where the
  digit is dark) replaced by uniform noise in [0, 1].
- image_background: background pixels replaced by a patch of a textured image.
- rotated_background: rotated, then image_background.

Deviation from the published MNIST-variation benchmark: its image backgrounds are patches of
natural photographs, which cannot be fetched offline. Here the background is a random crop of a
texture from a fixed, seeded bank of smooth textures (uniform noise on a coarse grid, bilinearly
upsampled to twice the image size, scaled to [0, 1]). The role is the same, a structured
distractor behind the digit, but the statistics differ from photographs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

VARIATIONS = ("original", "rotated", "noise_background", "image_background", "rotated_background")
BACKGROUND_THRESHOLD = 0.1
TEXTURE_BANK_SIZE = 32
CHUNK = 8192


def rotate(x: Tensor, degrees: Tensor) -> Tensor:
    """Rotate each image of x [N, C, H, W] by its own angle (degrees, counter-clockwise as
    displayed, like torch.rot90 over dims (2, 3))."""
    n, _, h, w = x.shape
    identity = torch.eye(2, 3, dtype=x.dtype)[None]
    base = F.affine_grid(identity, [1, 1, h, w], align_corners=False).view(1, h * w, 2)
    base = torch.cat([base, torch.ones(1, h * w, 1, dtype=x.dtype)], dim=2)
    rad = degrees.to(torch.float64) * (math.pi / 180.0)
    cos, sin, zero = torch.cos(rad), torch.sin(rad), torch.zeros_like(rad)
    # The sampling grid maps output to input coordinates (y points down): the inverse rotation.
    theta = torch.stack(
        [torch.stack([cos, sin], 1), torch.stack([-sin, cos], 1), torch.stack([zero, zero], 1)], 1
    ).to(x.dtype)  # [N, 3, 2]
    out = torch.empty_like(x)
    for start in range(0, n, CHUNK):
        part = slice(start, start + CHUNK)
        grid = torch.matmul(base, theta[part]).view(-1, h, w, 2)
        out[part] = F.grid_sample(x[part], grid, mode="bilinear", align_corners=False)
    return out.clamp_(0.0, 1.0)


def background_mask(x: Tensor) -> Tensor:
    """True where a pixel is background: every channel darker than BACKGROUND_THRESHOLD."""
    return (x < BACKGROUND_THRESHOLD).all(dim=1, keepdim=True)


def noise_background(x: Tensor, gen: torch.Generator) -> Tensor:
    """Replace background pixels by uniform noise in [0, 1]."""
    noise = torch.rand(x.shape, generator=gen, dtype=x.dtype)
    return torch.where(background_mask(x), noise, x)


def texture_bank(shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    """TEXTURE_BANK_SIZE smooth textures [K, C, 2H, 2W] in [0, 1] for image backgrounds."""
    c, h, w = shape
    textures = []
    for _ in range(TEXTURE_BANK_SIZE):
        grid = int(torch.randint(2, max(3, min(h, w) // 3 + 1), (1,), generator=gen))
        coarse = torch.rand((1, c, grid, grid), generator=gen)
        fine = F.interpolate(coarse, size=(2 * h, 2 * w), mode="bilinear", align_corners=False)
        lo, hi = fine.amin(), fine.amax()
        textures.append((fine - lo) / (hi - lo).clamp_min(1e-6))
    return torch.cat(textures)


def image_background(x: Tensor, gen: torch.Generator, bank: Tensor) -> Tensor:
    """Replace background pixels by a random H x W crop of a random texture of `bank`."""
    n, c, h, w = x.shape
    pick = torch.randint(len(bank), (n,), generator=gen)
    top = torch.randint(bank.shape[2] - h + 1, (n,), generator=gen)
    left = torch.randint(bank.shape[3] - w + 1, (n,), generator=gen)
    rows = (top[:, None] + torch.arange(h))[:, None, :, None]
    cols = (left[:, None] + torch.arange(w))[:, None, None, :]
    patch = bank[pick[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    return torch.where(background_mask(x), patch.to(x.dtype), x)


def apply_variation(name: str, x: Tensor, gen: torch.Generator, bank: Tensor) -> Tensor:
    """Apply variation `name` to x; `bank` is the texture bank used for image backgrounds."""
    return _APPLY[name](x, gen, bank)


def _rotated(x: Tensor, gen: torch.Generator, _bank: Tensor) -> Tensor:
    return rotate(x, torch.rand(len(x), generator=gen, dtype=torch.float64) * 360.0)


_APPLY: dict[str, Callable[[Tensor, torch.Generator, Tensor], Tensor]] = {
    "original": lambda x, _gen, _bank: x,
    "rotated": _rotated,
    "noise_background": lambda x, gen, _bank: noise_background(x, gen),
    "image_background": image_background,
    "rotated_background": lambda x, gen, bank: image_background(_rotated(x, gen, bank), gen, bank),
}
