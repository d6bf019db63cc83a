"""Small torch modules that some node kinds build (the rest are torch's or torchvision's own).

Each computes exactly what the model code it stands for computes, in the same order of
operations, so an imported network gives bit-identical outputs where the ops are the same.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
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
    `nn.MultiheadAttention(x, x, x, need_weights=...)`.

    head_dim (None: embed_dim // num_heads) lets the heads' width differ from embed_dim, as it
    does after heads are added or the residual stream is widened: the same tensors
    (`in_proj_weight` (3 * heads * head_dim, E), `out_proj.weight` (E, heads * head_dim)), and
    the same arithmetic in the order torch's own path takes it.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 need_weights: bool = False, head_dim: int | None = None) -> None:
        self.heads_dim = embed_dim // num_heads if head_dim is None else int(head_dim)
        inner = num_heads * self.heads_dim
        own_path = inner != embed_dim  # torch's layer needs heads that split embed_dim
        super().__init__(embed_dim, 1 if own_path else num_heads, dropout=dropout, bias=bias,
                         batch_first=True)
        self.num_heads, self.need_weights, self.own_path = num_heads, need_weights, own_path
        if self.own_path:
            factory = {"device": self.in_proj_weight.device, "dtype": self.in_proj_weight.dtype}
            self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim, **factory))
            if bias:
                self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner, **factory))
            self.out_proj = nn.modules.linear.NonDynamicallyQuantizableLinear(
                inner, embed_dim, bias=bias, **factory)
            self._reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if not self.own_path:
            return super().forward(x, x, x, need_weights=self.need_weights)[0]
        b, n, _ = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, self.num_heads, self.heads_dim).transpose(1, 2)
                   for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v,
                                             dropout_p=self.dropout if self.training else 0.0)
        out = out.transpose(1, 2).reshape(b, n, self.num_heads * self.heads_dim)
        return self.out_proj(out)


class Attention(nn.Module):
    """Multi-head self-attention on (B, L, dim) tokens as timm's `Attention` computes it: one
    `qkv` projection to 3 x heads x head_dim (q, k, v blocks, each split into heads), scaled
    dot-product attention, heads joined, `proj` to dim_out. The heads' width need not be dim,
    so heads can be added (with zero columns of `proj`, they change nothing)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, dim_out: int,
                 qkv_bias: bool = True, proj_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=qkv_bias)
        self.proj = nn.Linear(num_heads * head_dim, dim_out, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        out = out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        return self.proj_drop(self.proj(out))


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
