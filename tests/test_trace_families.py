"""The importer on the patterns of today's model families, each written by hand (no timm):
normalisation layers that call functions, channels-last blocks, optional forward arguments,
reductions and resampling, dynamic "same" padding, folding patches into the batch, and the
shape arithmetic model code does. Each imports and computes the same function; where a node
kind exists, the operators can grow through it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from graphgen import single_thread  # noqa: F401 (fixture)
from torch import nn

from growth.compile import compile_graph
from growth.errors import UnsupportedModuleError
from growth.graph import NetGraph, output_scale
from growth.ops import find_group, net2deeper, net2wider, resizable
from growth.trace import import_module

pytestmark = pytest.mark.usefixtures("single_thread")
TOL = 1e-5


def same_function(module: nn.Module, shape: tuple[int, ...], graph: NetGraph | None = None,
                  train: bool = False) -> float:
    """Max error of the graph (imported from `module` if not given) against the module, on a
    batch of 3, relative to the output's scale."""
    graph = import_module(module.eval(), shape) if graph is None else graph
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(5))
    net = compile_graph(graph)
    module.train(train)
    net.train(train)
    with torch.no_grad():
        want, got = module(x.clone()), net(x.clone())
    return float((want - got).abs().max()) / output_scale(want)


def kinds(graph: NetGraph) -> list[str]:
    return [graph.node(n).kind for n in graph]


# ---- normalisation and activations called as functions ----------------------------------------
class NormAct(nn.BatchNorm2d):
    """BatchNorm fused with its activation, as timm's BatchNormAct2d: F.batch_norm on its own
    buffers, then the activation as a function."""

    def forward(self, x):
        out = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                           self.training, self.momentum, self.eps)
        return F.hardswish(out)


class GroupNormAct(nn.GroupNorm):
    def forward(self, x):
        return F.silu(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))


class FusedNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = NormAct(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.gn = GroupNormAct(4, 8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.gn(self.conv2(self.bn1(self.conv1(x))))
        return self.fc(F.gelu(x.mean((2, 3)), approximate="tanh"))


def fused_norm_net() -> FusedNormNet:
    torch.manual_seed(0)
    m = FusedNormNet()
    with torch.no_grad():
        m.bn1.running_mean.uniform_(-0.5, 0.5)
        m.bn1.running_var.uniform_(0.5, 2.0)
        m.bn1.num_batches_tracked.fill_(7)
        for norm in (m.bn1, m.gn):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.2, 0.2)
    return m


def test_functional_norms_become_norm_nodes_with_all_their_tensors() -> None:
    m = fused_norm_net()
    graph = import_module(m.eval(), (3, 6, 6))
    assert [k for k in kinds(graph) if k not in ("input", "output")] == [
        "conv2d", "batchnorm2d", "hardswish", "conv2d", "groupnorm", "silu", "mean", "gelu",
        "linear"]
    bn = next(graph.node(n) for n in graph if graph.node(n).kind == "batchnorm2d")
    for key in ("running_mean", "running_var", "weight", "bias", "num_batches_tracked"):
        assert torch.equal(bn.tensors[key], getattr(m.bn1, key)), key
    gn = next(graph.node(n) for n in graph if graph.node(n).kind == "groupnorm")
    assert gn.attrs["num_groups"] == 4 and gn.attrs["num_channels"] == 8
    assert same_function(m, (3, 6, 6), graph) == 0.0
    assert same_function(m, (3, 6, 6), graph, train=True) <= TOL  # batch statistics alike
    assert graph.param_count() == sum(p.numel() for p in m.parameters())


def test_widening_through_a_functional_batchnorm_and_a_groupnorm_keeps_the_function() -> None:
    graph = import_module(fused_norm_net().eval(), (3, 6, 6))
    conv1, conv2 = [n for n in graph if graph.node(n).kind == "conv2d"]
    wide = net2wider(graph, conv1, 11, seed=1).graph  # through the BatchNorm: any width
    assert same_function(fused_norm_net(), (3, 6, 6), wide) <= TOL
    norm = find_group(graph, conv2).tile  # GroupNorm: whole copies of its channels
    assert graph.node(norm).kind == "groupnorm"
    tiled = net2wider(graph, conv2, 24).graph
    gn = tiled.node(norm)
    assert gn.attrs["num_channels"] == 24 and gn.attrs["num_groups"] == 12
    assert same_function(fused_norm_net(), (3, 6, 6), tiled) <= TOL


# ---- channels-last blocks ---------------------------------------------------------------------
class ConvNeXtBlock(nn.Module):
    """ConvNeXt's block: depthwise conv, permute to channels-last, LayerNorm over channels,
    MLP, layer scale, permute back, residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        h = self.dwconv(x).permute(0, 2, 3, 1)
        h = self.fc2(F.gelu(self.fc1(self.norm(h))))
        return x + (self.gamma * h).permute(0, 3, 1, 2)


class ConvNeXtLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 2, stride=2)
        self.block = ConvNeXtBlock(6)
        self.scale = nn.Parameter(torch.rand(6) + 0.5)  # a layer scale in channels-first form
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = self.block(self.stem(x)) * self.scale.reshape(1, -1, 1, 1)
        x = F.layer_norm(x.permute(0, 2, 3, 1), (6,)).permute(0, 3, 1, 2)  # LayerNorm2d
        return self.head(x.mean((-2, -1)))


def convnext_like() -> ConvNeXtLike:
    torch.manual_seed(1)
    return ConvNeXtLike()


def test_a_channels_last_block_imports_with_layouts_and_scales() -> None:
    m = convnext_like()
    graph = import_module(m.eval(), (3, 8, 8))
    ks = kinds(graph)
    assert ks.count("permute") == 4 and ks.count("layernorm") == 2 and ks.count("scale") == 2
    assert "program" not in ks  # everything is a node kind the operators know
    scale = next(graph.node(n) for n in graph if graph.node(n).kind == "scale"
                 and graph.node(n).attrs["shape"] == [1, 6, 1, 1])
    assert torch.equal(scale.tensors["weight"], m.scale.detach().reshape(1, -1, 1, 1))
    assert same_function(m, (3, 8, 8), graph) == 0.0


def test_a_channels_last_block_grows_exactly() -> None:
    graph = import_module(convnext_like().eval(), (3, 8, 8))
    assert "block_fc1" in resizable(graph)
    wide = net2wider(graph, "block_fc1", 17, seed=2).graph  # the MLP: any width
    assert same_function(convnext_like(), (3, 8, 8), wide) <= TOL
    group = find_group(graph, "stem")  # the residual stream meets two LayerNorms
    assert group.tile is not None and "block_fc2" in group.producers
    stream = net2wider(graph, "stem", 12).graph
    assert stream.node("block_norm").attrs["normalized_shape"] == [12]
    assert same_function(convnext_like(), (3, 8, 8), stream) <= TOL
    deeper = net2deeper(stream, "block_norm").graph  # a linear on the channels-last map
    assert same_function(convnext_like(), (3, 8, 8), deeper) <= TOL


# ---- optional forward arguments, attention written by hand ------------------------------------
class Attention(nn.Module):
    """Multi-head self-attention as ViTs write it: the permute moves the batch dim."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x, attn_mask=None, is_causal=False):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, 2)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x, attn_mask=None, is_causal=False):
        x = x + self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 2, stride=2)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 5, dim) * 0.1)
        self.blocks = nn.ModuleList([Block(dim), Block(dim)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 3)

    def forward(self, x, attn_mask=None, is_causal=False):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        if attn_mask is not None or is_causal:  # control flow on the optional arguments
            raise NotImplementedError
        for block in self.blocks:
            x = block(x, attn_mask=attn_mask, is_causal=is_causal)
        return self.head(self.norm(x)[:, 0])


def tiny_vit() -> TinyViT:
    torch.manual_seed(2)
    return TinyViT()


def test_optional_forward_arguments_are_bound_to_their_defaults() -> None:
    m = tiny_vit()
    graph = import_module(m.eval(), (3, 4, 4))
    assert graph.input_node() == "x" and len(graph.input_nodes()) == 1
    programs = [n for n in graph if graph.node(n).kind == "program"]
    # per block, one program: q, k, v (the permute moves the batch dim) and the attention
    assert len(programs) == 2
    assert all(graph.node(graph.inputs(p)[0]).kind == "reshape" for p in programs)
    assert same_function(m, (3, 4, 4), graph) <= TOL
    stream = net2wider(graph, "patch", 16).graph  # the residual stream: its LayerNorms tile
    assert same_function(tiny_vit(), (3, 4, 4), stream) <= TOL
    mlp = net2wider(graph, "blocks_0_fc1", 21, seed=3).graph
    assert same_function(tiny_vit(), (3, 4, 4), mlp) <= TOL


def test_a_second_required_input_is_still_refused() -> None:
    class Masked(nn.Module):
        def forward(self, x, mask):
            return x * mask

    with pytest.raises(UnsupportedModuleError, match="reads 2 inputs \\['x', 'mask'\\]"):
        import_module(Masked(), (4,))


# ---- reductions and resampling ----------------------------------------------------------------
class SplitAttention(nn.Module):
    """ResNeSt's split attention: radix branches summed, gated by a softmax over the radix."""

    def __init__(self, channels: int = 4, radix: int = 2) -> None:
        super().__init__()
        self.radix = radix
        self.conv = nn.Conv2d(channels, channels * radix, 3, padding=1)
        self.fc1 = nn.Conv2d(channels, 8, 1)
        self.fc2 = nn.Conv2d(8, channels * radix, 1)

    def forward(self, x):
        x = self.conv(x)
        b, rc, h, w = x.shape
        x = x.reshape(b, self.radix, rc // self.radix, h, w)
        gap = x.sum(dim=1).mean((2, 3), keepdim=True)
        attn = self.fc2(F.relu(self.fc1(gap))).view(b, 1, self.radix, -1).transpose(1, 2)
        attn = F.softmax(attn, dim=1).reshape(b, -1, 1, 1).view(b, self.radix, rc // self.radix,
                                                                 1, 1)
        return (x * attn).sum(dim=1)


class FuseScales(nn.Module):
    """HRNet's fusion: a low-resolution branch upsampled onto a high-resolution one."""

    def __init__(self) -> None:
        super().__init__()
        self.high = nn.Conv2d(3, 4, 3, padding=1)
        self.low = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.split = SplitAttention(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.high(x) + self.up(self.low(x))
        h = h + F.interpolate(h[:, :, ::2, ::2], size=h.shape[-2:], mode="bilinear",
                              align_corners=False)
        return self.head(self.split(h).mean((2, 3)))


def test_sums_and_upsampling_import_as_nodes() -> None:
    torch.manual_seed(3)
    m = FuseScales()
    graph = import_module(m.eval(), (3, 6, 6))
    ks = kinds(graph)
    assert ks.count("interpolate") == 2 and ks.count("sum") == 2
    assert same_function(m, (3, 6, 6), graph) <= TOL
    up = next(n for n in graph if graph.node(n).kind == "interpolate")
    assert graph.node(up).attrs["scale_factor"] == 2 and graph.shape(up) == (4, 6, 6)
    grown = net2wider(graph, "low", 7, seed=4).graph  # its channels cross the upsampling
    assert grown.shape(up) == (7, 6, 6) and grown.node("high").attrs["out_channels"] == 7
    assert same_function(m, (3, 6, 6), grown) <= TOL


# ---- dynamic "same" padding -------------------------------------------------------------------
class Conv2dSame(nn.Conv2d):
    """TensorFlow's "same" padding, computed from the input's size at every call (as timm's
    Conv2dSame): arithmetic on x.shape that plain torch.fx cannot trace."""

    def forward(self, x):
        ih, iw = x.size()[-2:]
        pads = []
        for size, k, s, d in zip((ih, iw), self.kernel_size, self.stride, self.dilation):
            pads.append(max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0))
        ph, pw = pads
        if ph > 0 or pw > 0:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class SamePadded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = Conv2dSame(3, 4, 3, stride=2)
        self.b = nn.Conv2d(4, 4, 4, padding="same")  # even kernel: one more row after
        self.c = nn.Conv2d(4, 4, 3, padding="same", dilation=2)

    def forward(self, x):
        return self.c(self.b(self.a(x))).flatten(1)


@pytest.mark.parametrize("size", [7, 8])
def test_dynamic_same_padding_imports_at_each_input_size(size: int) -> None:
    torch.manual_seed(4)
    m = SamePadded()
    graph = import_module(m.eval(), (3, size, size))
    pads = [graph.node(n).attrs["pad"] for n in graph if graph.node(n).kind == "pad"]
    want = (size - 1) // 2 * 2 + 3 - size  # total padding of a stride-2 kernel-3 "same" conv
    assert pads == [[want // 2, want - want // 2, want // 2, want - want // 2], [0, 1, 0, 1]]
    assert graph.node("c").attrs["padding"] == (2, 2)
    assert same_function(m, (3, size, size), graph) == 0.0


# ---- patches folded into the batch (MobileViT's unfold / fold) ---------------------------------
class UnfoldBlock(nn.Module):
    """Patches of a (C, H, W) map folded into the batch, a transformer layer over the pixels of
    each patch position, folded back."""

    def __init__(self, dim: int = 4, patch: int = 2) -> None:
        super().__init__()
        self.patch = patch
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, 2)
        self.out = nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        p = self.patch
        nh, nw = h // p, w // p
        t = x.reshape(b * c * nh, p, nw, p).transpose(1, 2)
        t = t.reshape(b, c, nh * nw, p * p).transpose(1, 3).reshape(b * p * p, nh * nw, c)
        t = t + self.attn(self.norm(t))
        t = t.contiguous().view(b, p * p, nh * nw, c).transpose(1, 3)
        t = t.reshape(b * c * nh, nw, p, p).transpose(1, 2).reshape(b, c, h, w)
        return self.out(t)


def test_patches_folded_into_the_batch_import_as_one_program() -> None:
    torch.manual_seed(5)
    m = nn.Sequential(nn.Conv2d(3, 4, 1), UnfoldBlock(), nn.Flatten())
    graph = import_module(m.eval(), (3, 4, 6))
    programs = [n for n in graph if graph.node(n).kind == "program"]
    held = [t for n in programs for t in graph.node(n).tensors.values()]
    # the layers working on the folded batch are held by programs; the 1x1 conv after is not
    assert sum(t.numel() for t in held) == sum(
        p.numel() for layer in (m[1].norm, m[1].attn) for p in layer.parameters())
    assert [graph.node(n).kind for n in graph.consumers(programs[-1])] == ["conv2d"]
    assert same_function(m, (3, 4, 6), graph) == 0.0
    assert graph.param_count() == sum(p.numel() for p in m.parameters())


# ---- shape arithmetic and models that cache values in forward --------------------------------
class ShapeArithmetic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("cache", torch.zeros(1))

    def forward(self, x):
        n = x.shape[1]
        side = int(math.sqrt(n))  # int() of a size: plain torch.fx fails here
        if side * side != n:
            raise ValueError("not a square")
        grid = torch.arange(n, device=x.device).float().view(1, side, side, 1) / n
        self.cache = grid  # a model that caches a value in forward
        return self.fc(x.reshape(x.shape[0], side, side, 4) + grid)


def test_shape_arithmetic_runs_at_import_and_the_module_is_left_as_it_was() -> None:
    torch.manual_seed(6)
    m = ShapeArithmetic().eval()
    before = m.cache.clone()
    graph = import_module(m, (9, 4))
    assert torch.equal(m.cache, before)  # the import traced a copy
    assert same_function(m, (9, 4), graph) == 0.0
