"""Small torch modules that some node kinds build (the rest are torch's or torchvision's own).

Each computes exactly what the model code it stands for computes, in the same order of
operations, so an imported network gives bit-identical outputs where the ops are the same.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Scale(nn.Module):
    """Multiplies its input by a learned tensor `weight` (broadcast): one scalar (a gate whose
    size training chooses, shape (1,)) or one value per channel (layer scale, e.g. (C, 1, 1))."""

    def __init__(self, shape: Sequence[int] = (1,), init: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full(tuple(shape), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class Offset(nn.Module):
    """Adds a learned tensor `weight` (broadcast) to its input: a positional embedding."""

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(tuple(shape)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight


class ClassToken(nn.Module):
    """Prepends learned tokens (`weight`, shape (1, T, D)) to each sequence (B, L, D)."""

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(tuple(shape)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.weight.expand(x.shape[0], -1, -1), x], dim=1)


class SelfAttention(nn.MultiheadAttention):
    """Multi-head self-attention on (B, L, E) sequences: queries, keys and values are the input.
    Returns the attended sequence only, computed by the very call a model makes to
    `nn.MultiheadAttention(x, x, x, need_weights=...)`."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 need_weights: bool = False) -> None:
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, batch_first=True)
        self.need_weights = need_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x, x, x, need_weights=self.need_weights)[0]


def window_attention(dim: int, window_size: Sequence[int], shift_size: Sequence[int],
                     num_heads: int, qkv_bias: bool, proj_bias: bool, attention_dropout: float,
                     dropout: float, version: int) -> nn.Module:
    """Swin's shifted-window attention (torchvision's own module, version 1 or 2)."""
    from torchvision.models import swin_transformer as swin

    cls = swin.ShiftedWindowAttention if version == 1 else swin.ShiftedWindowAttentionV2
    return cls(dim, list(window_size), list(shift_size), num_heads, qkv_bias=qkv_bias,
               proj_bias=proj_bias, attention_dropout=attention_dropout, dropout=dropout)


def relative_attention(feat_dim: int, head_dim: int, max_seq_len: int) -> nn.Module:
    """MaxViT's relative-positional multi-head attention (torchvision's own module)."""
    from torchvision.models.maxvit import RelativePositionalMultiHeadAttention

    return RelativePositionalMultiHeadAttention(feat_dim, head_dim, max_seq_len)


def stochastic_depth(p: float, mode: str) -> nn.Module:
    """Drops whole residual branches while training, identity in eval (torchvision's module)."""
    from torchvision.ops import StochasticDepth

    return StochasticDepth(p, mode)
