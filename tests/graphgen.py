"""Hypothesis strategies that build small random NetGraphs, plus helpers to run and compare them.

Shapes: MLPs, CNNs (BN, pools, flatten or global pooling), residual nets (identity and projection
shortcuts), concat nets (branches joined on channels, and vectors joined after flatten) and
multi-head nets. Tensors come from a seeded generator (never torch's global RNG), with
non-trivial BN statistics, so an example replays exactly.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import strategies as st

from growth.compile import compile_graph
from growth.graph import NetGraph, output_scale
from growth.layers import PARAMETRIC

ACTS = ("relu", "tanh", "leaky_relu", "identity", "silu")
Draw = st.DrawFn


# ---- tensors and running ---------------------------------------------------------------------
def randomize(graph: NetGraph, seed: int) -> NetGraph:
    """Give every parametric node fresh random tensors (in place on this graph) and return it."""
    gen = torch.Generator().manual_seed(seed)
    for name in graph.topo_order():
        node = graph.node(name)
        if node.kind in PARAMETRIC:
            node.tensors = {k: _random_like(k, v, gen) for k, v in node.tensors.items()}
    return graph


def _random_like(key: str, t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    if not t.is_floating_point():
        return t.clone()
    if key == "weight" and t.dim() >= 2:
        fan_in = t[0].numel()
        return torch.randn(t.shape, generator=gen) * (1.5 / fan_in ** 0.5)
    if key == "running_var":
        return torch.rand(t.shape, generator=gen) + 0.5
    if key == "weight":  # BN gamma
        return torch.rand(t.shape, generator=gen) + 0.5
    return torch.randn(t.shape, generator=gen) * 0.3


def random_input(graph: NetGraph, batch: int = 4, seed: int = 0) -> torch.Tensor:
    shape = graph.shape(graph.input_node())
    return torch.randn((batch, *shape), generator=torch.Generator().manual_seed(seed))


def outputs(graph: NetGraph, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every head's output in eval mode, as a dict (also for single-head graphs)."""
    with torch.no_grad():
        y = compile_graph(graph).eval()(x)
    return y if isinstance(y, dict) else {graph.heads[0]: y}


def max_rel_error(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """Largest per-head max |difference| relative to that head's output scale."""
    assert before.keys() == after.keys(), (before.keys(), after.keys())
    return max(float((after[h] - before[h]).abs().max()) / output_scale(before[h])
               for h in before)


def snapshot(graph: NetGraph) -> tuple[dict, dict[str, torch.Tensor]]:
    """Structure and cloned tensors, to check later that nothing changed the graph."""
    return graph.to_dict(), {k: v.clone() for k, v in graph.named_tensors().items()}


def assert_unchanged(graph: NetGraph, snap: tuple[dict, dict[str, torch.Tensor]]) -> None:
    structure, tensors = snap
    assert graph.to_dict() == structure
    now = graph.named_tensors()
    assert now.keys() == tensors.keys()
    for k, v in tensors.items():
        assert torch.equal(now[k], v), f"the input tensor {k} was written into"


@pytest.fixture(scope="module")
def single_thread():
    """Tiny networks run faster on one thread, and a loaded box does not stall on spin-waits.
    Use with `pytestmark = pytest.mark.usefixtures("single_thread")` after importing it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- building blocks -------------------------------------------------------------------------
def _act(draw: Draw, g: NetGraph, src: str, name: str) -> str:
    return g.add(name, draw(st.sampled_from(ACTS)), [src])


def _head(draw: Draw, g: NetGraph, src: str, prefix: str = "", out: str = "out") -> str:
    """Vector or image `src` -> (pooling) -> flatten -> linear -> output."""
    if len(g.shape(src)) == 3:
        if draw(st.booleans()):
            src = g.add(f"{prefix}gap", "adaptive_avgpool2d", [src], output_size=1)
        src = g.add(f"{prefix}flat", "flatten", [src])
    if draw(st.booleans()):
        src = g.add(f"{prefix}hid", "linear", [src], out_features=draw(st.integers(1, 5)))
        src = _act(draw, g, src, f"{prefix}hid_act")
    src = g.add(f"{prefix}fc", "linear", [src], out_features=draw(st.integers(1, 4)))
    return g.add_output(out, src)


def _conv(draw: Draw, g: NetGraph, src: str, name: str, width: int | None = None,
          kernels: tuple[int, ...] = (1, 3)) -> str:
    k = draw(st.sampled_from(kernels))
    width = width if width is not None else draw(st.integers(1, 5))
    return g.add(name, "conv2d", [src], out_channels=width, kernel_size=k, padding=k // 2,
                 bias=draw(st.booleans()))


def _image_input(draw: Draw, g: NetGraph) -> str:
    side = draw(st.integers(4, 7))
    return g.add_input("x", (draw(st.integers(1, 3)), side, side))


# ---- strategies ------------------------------------------------------------------------------
@st.composite
def mlps(draw: Draw) -> NetGraph:
    g = NetGraph()
    src = g.add_input("x", (draw(st.integers(1, 5)),))
    for i in range(draw(st.integers(1, 3))):
        src = g.add(f"l{i}", "linear", [src], out_features=draw(st.integers(1, 5)),
                    bias=draw(st.booleans()))
        if draw(st.booleans()):
            src = g.add(f"bn{i}", "batchnorm1d", [src])
        src = _act(draw, g, src, f"a{i}")
        if draw(st.booleans()):
            src = g.add(f"drop{i}", "dropout", [src], p=0.3)
    _head(draw, g, src)
    return randomize(g, draw(st.integers(0, 2**16)))


@st.composite
def cnns(draw: Draw) -> NetGraph:
    g = NetGraph()
    src = _image_input(draw, g)
    for i in range(draw(st.integers(1, 3))):
        src = _conv(draw, g, src, f"conv{i}")
        if draw(st.booleans()):
            src = g.add(f"bn{i}", "batchnorm2d", [src])
        src = _act(draw, g, src, f"a{i}")
        if min(g.shape(src)[1:]) >= 4 and draw(st.booleans()):
            kind = draw(st.sampled_from(["maxpool2d", "avgpool2d"]))
            src = g.add(f"pool{i}", kind, [src], kernel_size=2)
    _head(draw, g, src)
    return randomize(g, draw(st.integers(0, 2**16)))


@st.composite
def residual_nets(draw: Draw) -> NetGraph:
    g = NetGraph()
    src = _image_input(draw, g)
    width = draw(st.integers(1, 4))
    src = g.add("stem", "conv2d", [src], out_channels=width, kernel_size=3, padding=1)
    src = g.add("stem_act", "relu", [src])
    for b in range(draw(st.integers(1, 3))):
        project = draw(st.booleans())
        out_width = draw(st.integers(1, 4)) if project else width
        h = _conv(draw, g, src, f"b{b}_conv1")
        h = g.add(f"b{b}_bn1", "batchnorm2d", [h])
        h = g.add(f"b{b}_act1", "relu", [h])
        h = _conv(draw, g, h, f"b{b}_conv2", width=out_width)
        if draw(st.booleans()):
            h = g.add(f"b{b}_bn2", "batchnorm2d", [h])
        short = src
        if project:
            short = g.add(f"b{b}_proj", "conv2d", [src], out_channels=out_width, kernel_size=1)
        src = g.add(f"b{b}_act2", "relu", [g.add(f"b{b}_add", "add", [h, short])])
        width = out_width
    _head(draw, g, src)
    return randomize(g, draw(st.integers(0, 2**16)))


@st.composite
def concat_nets(draw: Draw) -> NetGraph:
    g = NetGraph()
    src = _image_input(draw, g)
    stem = g.add("stem_act", "relu", [_conv(draw, g, src, "stem")])
    branches = [stem] if draw(st.booleans()) else []
    for i in range(draw(st.integers(2 - len(branches), 3))):
        branches.append(_act(draw, g, _conv(draw, g, stem, f"br{i}"), f"br{i}_act"))
    src = g.add("cat", "concat", branches)
    if draw(st.booleans()):
        src = g.add("cat_bn", "batchnorm2d", [src])
    src = _conv(draw, g, g.add("cat_act", "relu", [src]), "mix")
    if draw(st.booleans()):  # a second join, of vectors after flatten
        left = g.add("flat_a", "flatten", [src])
        right = g.add("flat_b", "flatten", [g.add("gap_b", "adaptive_avgpool2d", [stem],
                                                  output_size=1)])
        src = g.add("vcat", "concat", [left, right])
    _head(draw, g, src)
    return randomize(g, draw(st.integers(0, 2**16)))


@st.composite
def multi_head_nets(draw: Draw) -> NetGraph:
    g = NetGraph()
    if draw(st.booleans()):
        src = g.add_input("x", (draw(st.integers(1, 5)),))
        src = _act(draw, g, g.add("trunk", "linear", [src], out_features=draw(st.integers(1, 5))),
                   "trunk_act")
    else:
        src = _image_input(draw, g)
        src = g.add("trunk_act", "relu", [_conv(draw, g, src, "trunk")])
    for h in range(draw(st.integers(2, 3))):
        _head(draw, g, src, prefix=f"h{h}_", out=f"task{h}")
    return randomize(g, draw(st.integers(0, 2**16)))


@st.composite
def modern_nets(draw: Draw) -> NetGraph:
    """Blocks of today's architectures: inverted residuals (depthwise convs, SE gates, layer
    scale), grouped bottlenecks, channels-last MLP blocks (ConvNeXt) and token MLPs."""
    g = NetGraph()
    src = _image_input(draw, g)
    width = 2 * draw(st.integers(1, 2))
    src = g.add("stem", "conv2d", [src], out_channels=width, kernel_size=3, padding=1)
    src = g.add("stem_act", draw(st.sampled_from(["relu6", "hardswish", "relu"])), [src])
    for b in range(draw(st.integers(1, 3))):
        block = draw(st.sampled_from(["inverted", "grouped", "channels_last"]))
        if block == "inverted":
            h = _conv(draw, g, src, f"b{b}_expand", width=width * draw(st.integers(1, 3)))
            h = g.add(f"b{b}_act", draw(st.sampled_from(["relu6", "silu", "hardswish"])), [h])
            mid = g.shape(h)[0]
            h = g.add(f"b{b}_dw", "conv2d", [h], out_channels=mid * draw(st.integers(1, 2)),
                      kernel_size=3, padding=1, groups=mid)
            if draw(st.booleans()):  # squeeze-and-excitation gate
                pool = g.add(f"b{b}_pool", "adaptive_avgpool2d", [h], output_size=1)
                s = g.add(f"b{b}_se1", "conv2d", [pool], out_channels=2, kernel_size=1)
                s = g.add(f"b{b}_se_act", "relu", [s])
                s = g.add(f"b{b}_se2", "conv2d", [s], out_channels=g.shape(h)[0], kernel_size=1)
                s = g.add(f"b{b}_gate", draw(st.sampled_from(["sigmoid", "hardsigmoid"])), [s])
                h = g.add(f"b{b}_se", "mul", [s, h])
            h = _conv(draw, g, h, f"b{b}_project", width=width)
        elif block == "grouped":
            groups = draw(st.sampled_from([1, 2]))
            h = _conv(draw, g, src, f"b{b}_reduce", width=groups * draw(st.integers(2, 3)))
            h = g.add(f"b{b}_bn", "batchnorm2d", [h])
            h = g.add(f"b{b}_act", "relu", [h])
            h = g.add(f"b{b}_group", "conv2d", [h], out_channels=g.shape(h)[0], kernel_size=3,
                      padding=1, groups=groups)
            h = _conv(draw, g, g.add(f"b{b}_act2", "relu", [h]), f"b{b}_expand", width=width)
        else:
            h = g.add(f"b{b}_dw", "conv2d", [src], out_channels=width, kernel_size=3, padding=1,
                      groups=width)
            h = g.add(f"b{b}_last", "permute", [h], dims=[1, 2, 0])
            h = g.add(f"b{b}_up", "linear", [h], out_features=draw(st.integers(1, 6)))
            h = g.add(f"b{b}_gelu", "gelu", [h])
            h = g.add(f"b{b}_down", "linear", [h], out_features=width)
            h = g.add(f"b{b}_first", "permute", [h], dims=[2, 0, 1])
            h = g.add(f"b{b}_scale", "scale", [h], shape=[width, 1, 1])
        src = g.add(f"b{b}_add", "add", [h, src]) if draw(st.booleans()) else h
        width = g.shape(src)[0]
    if draw(st.booleans()):
        src = g.add("mean", "mean", [src], dims=[1, 2])
    _head(draw, g, src)
    return randomize(g, draw(st.integers(0, 2**16)))


def networks() -> st.SearchStrategy[NetGraph]:
    """Any of the shapes above."""
    return st.one_of(mlps(), cnns(), residual_nets(), concat_nets(), multi_head_nets())


# ---- small hand-made graphs (names fixed, so tests can check index maps by hand) -------
def mlp(hidden: int = 3) -> NetGraph:
    g = NetGraph()
    g.add_input("x", (2,))
    g.add("l1", "linear", ["x"], out_features=hidden)
    g.add("r1", "relu", ["l1"])
    g.add("l2", "linear", ["r1"], out_features=2)
    g.add_output("out", "l2")
    return randomize(g, 0)


def residual() -> NetGraph:
    """c0 -> bn0 -> r0 is added to two blocks' outputs: {c0, c1, c2} form one residual group."""
    g = NetGraph()
    g.add_input("x", (3, 6, 6))
    g.add("c0", "conv2d", ["x"], out_channels=4, kernel_size=3, padding=1)
    g.add("bn0", "batchnorm2d", ["c0"])
    g.add("r0", "relu", ["bn0"])
    g.add("c1", "conv2d", ["r0"], out_channels=4, kernel_size=3, padding=1)
    g.add("bn1", "batchnorm2d", ["c1"])
    g.add("add1", "add", ["bn1", "r0"])
    g.add("r1", "relu", ["add1"])
    g.add("inner", "conv2d", ["r1"], out_channels=3, kernel_size=1)
    g.add("ri", "relu", ["inner"])
    g.add("c2", "conv2d", ["ri"], out_channels=4, kernel_size=3, padding=1)
    g.add("add2", "add", ["c2", "r1"])
    g.add("r2", "relu", ["add2"])
    g.add("gap", "adaptive_avgpool2d", ["r2"], output_size=1)
    g.add("flat", "flatten", ["gap"])
    g.add("fc", "linear", ["flat"], out_features=3)
    g.add_output("out", "fc")
    return randomize(g, 1)


def concat_net() -> NetGraph:
    g = NetGraph()
    g.add_input("x", (2, 5, 5))
    g.add("a", "conv2d", ["x"], out_channels=3, kernel_size=3, padding=1)
    g.add("b", "conv2d", ["x"], out_channels=2, kernel_size=1)
    g.add("cat", "concat", ["a", "b"])
    g.add("bn", "batchnorm2d", ["cat"])
    g.add("r", "relu", ["bn"])
    g.add("c", "conv2d", ["r"], out_channels=2, kernel_size=1)
    g.add("flat", "flatten", ["c"])
    g.add("fc", "linear", ["flat"], out_features=3)
    g.add_output("out", "fc")
    return randomize(g, 2)
