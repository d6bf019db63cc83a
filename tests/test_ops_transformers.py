"""Growing transformers exactly: the embedding width through LayerNorm (every unit copied the
same number of times), MLP hidden widths, attention heads (zero output projection) and identity
blocks; on hand-made graphs, on torchvision's vit_b_16 and on a timm ViT; state following the
records."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from graphgen import max_rel_error, outputs, randomize, single_thread  # noqa: F401 (fixture)
from growth.search_spaces.networks import add_head, vit

from growth import optim
from growth.compile import compile_graph
from growth.errors import OperatorError
from growth.graph import NetGraph, output_scale
from growth.ops import (
    NOISE_BOUND,
    add_block,
    add_heads,
    attention_nodes,
    blockable,
    find_group,
    get_operator,
    heads_cost,
    net2deeper,
    net2wider,
    resizable,
    widen_private,
)
from growth.ops.blocks import block_cost
from growth.remap import IMPORTANCE, WEIGHT, remap
from growth.trace import import_module

pytestmark = pytest.mark.usefixtures("single_thread")
TOL = 1e-5


def tiny_vit(seed: int = 0, kind: str = "attention") -> NetGraph:
    """The built-in ViT trunk (2 blocks, dim 8, 2 heads) with a head, random weights (LayerNorm
    and class token included, so a wrong gather shows)."""
    torch.manual_seed(seed)
    g = add_head(vit((3, 8, 8), patch=4, dim=8, depth=2, heads=2, mlp_dim=12), "t", 5)
    if kind == "self_attention":  # torch's MultiheadAttention in place of the attention kind
        out = NetGraph()
        for n in g.topo_order():
            node = g.node(n)
            if node.kind == "attention":
                out.add(n, "self_attention", g.inputs(n), embed_dim=8, num_heads=2)
            elif node.kind == "input":
                out.add_input(n, node.attrs["shape"])
            else:
                out.add(n, node.kind, g.inputs(n), **node.attrs)
        g = out
    return randomize(g, seed)


def preserved(parent: NetGraph, child: NetGraph) -> float:
    shape = parent.shape(parent.input_node())
    x = torch.randn((4, *shape), generator=torch.Generator().manual_seed(3))
    return max_rel_error(outputs(parent, x), outputs(child, x))


# ---- LayerNorm over a widened axis ----------------------------------------------------------
def test_layernorm_of_tiled_units_is_the_tiled_layernorm_by_hand() -> None:
    """The rule itself: with every unit copied k times, mean and variance are the old ones, so
    LayerNorm(x') is LayerNorm(x) copied k times (gamma and beta tiled alike)."""
    x = torch.randn(5, 6, dtype=torch.float64)
    gamma, beta = torch.rand(6, dtype=torch.float64) + 0.5, torch.randn(6, dtype=torch.float64)
    tiled = x.repeat(1, 3)
    mean, var = tiled.mean(1, keepdim=True), tiled.var(1, unbiased=False, keepdim=True)
    assert torch.allclose(mean, x.mean(1, keepdim=True))
    assert torch.allclose(var, x.var(1, unbiased=False, keepdim=True))
    want = F.layer_norm(x, (6,), gamma, beta).repeat(1, 3)
    got = F.layer_norm(tiled, (18,), gamma.repeat(3), beta.repeat(3))
    assert torch.allclose(got, want)
    copied_once = torch.cat([x, x[:, :2]], 1)  # copying only some units moves the statistics
    assert not torch.allclose(copied_once.mean(1), x.mean(1))


@pytest.mark.parametrize("kind", ["attention", "self_attention"])
def test_the_residual_stream_widens_through_every_norm_and_attention(kind: str) -> None:
    g = tiny_vit(1, kind)
    group = find_group(g, "patch")
    assert group.tile == "block1_norm1" and group.width == 8
    assert set(group.producers) == {"patch", "block1_attn", "block1_fc2", "block2_attn",
                                    "block2_fc2"}
    assert set(group.consumers) == {"block1_attn", "block1_fc1", "block2_attn", "block2_fc1",
                                    "head_t"}
    with pytest.raises(OperatorError, match="multiple of 8: use 16 instead of 12"):
        net2wider(g, "patch", 12)
    result = net2wider(g, "patch", 24, seed=5)
    tiled = list(range(8)) * 3
    rec = result.record
    assert rec.index_maps["block2_norm2.weight"] == {0: tiled}
    assert rec.index_maps["pos.weight"] == {2: tiled} and rec.index_maps["cls.weight"] == {2: tiled}
    qkv, proj = (("qkv.weight", "proj.weight") if kind == "attention" else
                 ("in_proj_weight", "out_proj.weight"))
    assert rec.index_maps[f"block1_attn.{qkv}"] == {1: tiled}  # reads the stream
    assert rec.divisors[f"block1_attn.{qkv}"] == {1: [3.0] * 24}
    assert rec.index_maps[f"block1_attn.{proj}"] == {0: tiled}  # writes it
    assert result.graph.shape("block2_add2") == (5, 24)  # 4 patches and the class token
    assert preserved(g, result.graph) <= TOL


@pytest.mark.parametrize("kind", ["attention", "self_attention"])
def test_noisy_widening_perturbs_the_copies_rows_of_every_producer_of_the_stream(
        kind: str) -> None:
    g = tiny_vit(1, kind)
    proj = "proj.weight" if kind == "attention" else "out_proj.weight"
    old = g.node("block1_attn").tensors[proj]
    wide = net2wider(g, "patch", 16, noise=0.01, seed=2).graph
    new = wide.node("block1_attn").tensors[proj]
    assert torch.equal(new[:8], old)  # the old units' rows are the old rows
    ratio = new[8:] / old  # each copy's row, weight by weight, is the row x (1 + u)
    assert (ratio - 1).abs().max() <= 0.01 and not torch.equal(new[8:], old)
    assert preserved(g, wide) <= NOISE_BOUND * 0.01


def test_a_private_widening_is_refused_on_the_stream_and_private_in_the_mlp() -> None:
    g = tiny_vit(3)
    with pytest.raises(OperatorError, match="widen_private\\('patch'\\): its channels reach "
                                            "'block1_norm1', which normalises over them"):
        widen_private(g, "patch", 16)
    # why: built by hand (copies whose columns are zero, the old columns undivided), such a
    # network keeps the function until a new unit trains, and then every head moves
    private = net2wider(g, "patch", 16).graph
    for n in ("block1_attn", "block1_fc1", "block2_attn", "block2_fc1", "head_t"):
        key = "qkv.weight" if n.endswith("attn") else "weight"
        old = g.node(n).tensors[key]
        private.node(n).tensors[key] = torch.cat([old, torch.zeros_like(old)], 1)
    assert preserved(g, private) <= TOL
    bias = private.node("patch").tensors["bias"].clone()
    bias[8:] += 1.0  # only the new units' incoming weights change
    private.node("patch").tensors["bias"] = bias
    assert preserved(g, private) > 1e-2
    result = widen_private(g, "block1_fc1", 15)  # no norm reads the MLP's hidden units
    cols = result.graph.node("block1_fc2").tensors["weight"]
    assert torch.equal(cols[:, :12], g.node("block1_fc2").tensors["weight"])  # undivided
    assert not cols[:, 12:].any()  # the copies' columns: zero, fresh in the record
    assert result.record.index_maps["block1_fc2.weight"] == {1: list(range(12)) + [-1] * 3}
    assert preserved(g, result.graph) <= TOL


def test_chosen_copies_are_refused_where_a_norm_fixes_the_mapping() -> None:
    g = tiny_vit(4)
    with pytest.raises(OperatorError, match="copies cannot be chosen where 'block1_norm1' "
                                            "normalises over the channels"):
        net2wider(g, "patch", 16, copies=[0] * 8)
    assert net2wider(g, "block1_fc1", 14, copies=[3, 3]).record.params["copies"] == [3, 3]


def test_the_mlp_hidden_width_widens_to_any_width() -> None:
    g = tiny_vit(2)
    assert find_group(g, "block1_fc1").tile is None
    result = net2wider(g, "block2_fc1", 19, seed=1)
    assert result.graph.node("block2_fc2").attrs["in_features"] == 19
    assert preserved(g, result.graph) <= TOL


# ---- attention heads ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["attention", "self_attention"])
def test_new_heads_have_fresh_queries_and_a_zero_output_projection(kind: str) -> None:
    g = tiny_vit(3, kind)
    result = add_heads(g, "block1_attn", 5, seed=7)  # 2 heads of 4 features -> 5
    node = result.graph.node("block1_attn")
    qkv, bias, proj = (("qkv.weight", "qkv.bias", "proj.weight") if kind == "attention" else
                       ("in_proj_weight", "in_proj_bias", "out_proj.weight"))
    old = g.node("block1_attn").tensors
    assert node.attrs["num_heads"] == 5 and node.attrs["head_dim"] == 4
    assert node.tensors[qkv].shape == (3 * 20, 8) and node.tensors[proj].shape == (8, 20)
    for b in range(3):  # q, k and v blocks each keep their old rows first
        assert torch.equal(node.tensors[qkv][b * 20:b * 20 + 8], old[qkv][b * 8:(b + 1) * 8])
        assert node.tensors[qkv][b * 20 + 8:(b + 1) * 20].abs().min() > 0
        assert not node.tensors[bias][b * 20 + 8:(b + 1) * 20].any()
    assert torch.equal(node.tensors[proj][:, :8], old[proj])
    assert not node.tensors[proj][:, 8:].any()
    fresh = [-1] * 12
    assert result.record.index_maps[f"block1_attn.{qkv}"] == {
        0: [*range(8), *fresh, *range(8, 16), *fresh, *range(16, 24), *fresh]}
    assert result.record.index_maps[f"block1_attn.{proj}"] == {1: [*range(8), *fresh]}
    assert preserved(g, result.graph) <= TOL
    other = add_heads(g, "block1_attn", 5, seed=8).graph.node("block1_attn").tensors[qkv]
    assert not torch.equal(other, node.tensors[qkv])  # the seed draws the new heads


def test_new_heads_change_the_output_once_their_projection_trains() -> None:
    g = tiny_vit(4)
    grown = add_heads(g, "block2_attn", 3, seed=1).graph
    net = compile_graph(grown)
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    net(x).sum().backward()
    grad = net.block2_attn.proj.weight.grad
    assert grad[:, 8:].abs().sum() > 0  # the new columns learn from the new heads' outputs


def test_heads_refusals_and_their_cost() -> None:
    g = tiny_vit(5)
    assert heads_cost(g, "block1_attn", 3) == 4 * (3 * 8 + 3 + 8)  # rows q, k, v + bias + proj
    with pytest.raises(OperatorError, match="heads must be an int >= its 2 heads, got 1"):
        add_heads(g, "block1_attn", 1)
    with pytest.raises(OperatorError, match="'block1_fc1' is a linear node"):
        add_heads(g, "block1_fc1", 3)
    with pytest.raises(OperatorError, match="would add 140 parameters, over the limit of 100"):
        add_heads(g, "block1_attn", 3, max_new_params=100)
    assert add_heads(g, "block1_attn", 2).record.is_noop
    assert attention_nodes(g) == ["block1_attn", "block2_attn"]


# ---- identity blocks ------------------------------------------------------------------------
def test_an_inserted_block_computes_the_identity_bit_for_bit() -> None:
    g = tiny_vit(6)
    assert blockable(g) == ["block1_add1", "block1_add2", "block2_add1", "block2_add2"]
    result = add_block(g, "block1_add2", seed=2)
    child = result.graph
    names = [f"block1_add2_block1_{n}" for n in ("norm1", "attn", "add1", "norm2", "fc1", "act",
                                                 "fc2", "add2")]
    assert result.record.added_nodes == names
    assert child.inputs("block2_norm1") == [names[-1]] and child.inputs("block2_add1")[0] == \
        names[-1]
    attn = child.node(names[1])
    assert attn.attrs["num_heads"] == 2 and attn.attrs["head_dim"] == 4  # as the network's
    assert child.node(names[4]).attrs["out_features"] == 12 and child.node(names[0]).attrs[
        "eps"] == 1e-6
    assert not attn.tensors["proj.weight"].any() and not child.node(names[6]).tensors[
        "weight"].any()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(compile_graph(g)(x), compile_graph(child)(x))
    assert len(result.record.added) == sum(len(child.node(n).tensors) for n in names)
    params = sum(child.node(n).param_count for n in names)
    assert params == block_cost(8, 2, 4, 12)


def test_an_inserted_block_trains_from_its_zero_layers() -> None:
    child = add_block(tiny_vit(7), "block2_add2").graph
    net = compile_graph(child)
    net(torch.randn(6, 3, 8, 8)).sum().backward()
    mods = dict(net.named_modules())
    assert mods["block2_add2_block1_fc2"].weight.grad.abs().sum() > 0
    assert mods["block2_add2_block1_attn"].proj.weight.grad.abs().sum() > 0


def test_block_refusals() -> None:
    g = tiny_vit(8)
    with pytest.raises(OperatorError, match="token sequences \\(L, D\\)"):
        add_block(g, "patch")
    with pytest.raises(OperatorError, match="output head"):
        add_block(g, "t")
    with pytest.raises(OperatorError, match="activation must be one of"):
        add_block(g, "block1_add2", activation="tanh")
    with pytest.raises(OperatorError, match="over the limit of 10"):
        add_block(g, "block1_add2", max_new_params=10)


# ---- state follows the records ----------------------------------------------------------------
def test_anchors_importance_and_optimizer_state_follow_transformer_growth() -> None:
    g = tiny_vit(9)
    wide = net2wider(g, "patch", 16, seed=0)
    heads = add_heads(wide.graph, "block1_attn", 3, seed=1)
    block = add_block(heads.graph, "block2_add2", seed=2)
    records = [wide.record, heads.record, block.record]
    final = block.graph.named_tensors()
    for name, t in g.named_tensors().items():  # an anchor of every old tensor follows bit for bit
        if name.startswith("block1_attn.") and name.split(".", 1)[1] in ("qkv.weight",
                                                                           "qkv.bias",
                                                                           "proj.weight"):
            continue  # fresh heads: checked below
        assert torch.equal(remap(t, name, records, WEIGHT), final[name]), name
    fisher = remap(torch.ones(24, 8), "block1_attn.qkv.weight", records, IMPORTANCE)
    assert fisher.shape == (36, 16)  # 3 heads x 4, over the doubled stream
    assert not fisher[8:12].any() and not fisher[:, 8:].any()  # fresh heads, copied columns
    assert torch.equal(fisher[:8, :8], torch.ones(8, 8))  # old rows, original columns: r = 1
    module = compile_graph(g)
    opt = torch.optim.Adam(module.parameters(), lr=0.1)
    module(torch.randn(4, 3, 8, 8)).sum().backward()
    opt.step()
    grown = compile_graph(block.graph)
    fresh = optim.follow(opt, dict(module.named_parameters()), dict(grown.named_parameters()),
                         records)
    proj = dict(grown.named_parameters())["block1_attn.proj.weight"]
    assert fresh.state[proj]["exp_avg"].shape == (16, 12)
    assert not fresh.state[proj]["exp_avg"][:, 8:].any()  # new heads' columns start empty


# ---- torchvision's vit_b_16 and a timm ViT ------------------------------------------------------
def _check(model: torch.nn.Module, graph: NetGraph, x: torch.Tensor) -> float:
    with torch.no_grad():
        want, got = model(x), compile_graph(graph).eval()(x)
    return float((want - got).abs().max()) / output_scale(want)


@pytest.mark.slow
def test_torchvision_vit_b_16_widened_and_deepened_computes_the_same_function() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None, image_size=32).eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zero-inits it
    graph = import_module(model, (3, 32, 32))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert _check(model, graph, x) == 0.0
    attn = attention_nodes(graph)
    assert graph.node(attn[0]).kind == "self_attention" and len(attn) == 12
    g = add_heads(graph, attn[3], 13, seed=1).graph
    mlp = "encoder_layers_encoder_layer_5_mlp_0"
    assert mlp in resizable(g)
    g = net2wider(g, mlp, 3100, seed=2).graph
    g = add_block(g, blockable(g)[7], seed=3).graph
    g = net2deeper(g, "encoder_layers_encoder_layer_2_mlp_1").graph  # after a GELU: linear
    assert _check(model, g, x) <= TOL
    assert len(g) > len(graph) and g.param_count() > graph.param_count()


def timm_vit() -> tuple[torch.nn.Module, NetGraph]:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=5, img_size=32).eval()
    return model, import_module(model, (3, 32, 32))


def test_a_timm_vit_imports_its_attention_as_growable_nodes() -> None:
    model, graph = timm_vit()
    attn = attention_nodes(graph)
    assert attn and all(graph.node(n).kind == "attention" for n in attn)
    assert not [n for n in graph if graph.node(n).kind == "program"]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert _check(model, graph, x) == 0.0


def test_a_timm_vit_widened_and_deepened_computes_the_same_function() -> None:
    model, graph = timm_vit()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    stem = "patch_embed_proj"
    width = find_group(graph, stem).width
    g = net2wider(graph, stem, 2 * width).graph  # the embedding width, through every norm
    g = add_heads(g, attention_nodes(g)[0], graph.node(attention_nodes(g)[0]).attrs[
        "num_heads"] + 2, seed=1).graph
    fc1 = next(n for n in resizable(g) if n.endswith("mlp_fc1"))
    g = net2wider(g, fc1, g.node(fc1).attrs["out_features"] + 5, seed=2).graph
    g = add_block(g, blockable(g)[-1], seed=3).graph
    g = get_operator("net2deeper")(g, blockable(g)[0]).graph
    assert _check(model, g, x) <= TOL
