"""NetGraph: construction, shape inference per kind, validation errors, sizes, summary, storage."""

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from growth.compile import compile_graph
from growth.errors import CheckpointError, GraphError, ShapeError
from growth.graph import NetGraph, output_scale
from growth.layers import KINDS


def mlp_graph(widths=(4, 8, 3)) -> NetGraph:
    g = NetGraph()
    src = g.add_input("x", (widths[0],))
    for i, w in enumerate(widths[1:], start=1):
        src = g.add(f"fc{i}", "linear", [src], out_features=w)
        if i < len(widths) - 1:
            src = g.add(f"act{i}", "relu", [src])
    g.add_output("out", src)
    return g


def cnn_graph() -> NetGraph:
    """conv/BN/ReLU/pool, a residual add, a concat, flatten, linear."""
    g = NetGraph()
    g.add_input("x", (3, 8, 8))
    g.add("conv1", "conv2d", ["x"], out_channels=4, kernel_size=3, padding=1)
    g.add("bn1", "batchnorm2d", ["conv1"])
    g.add("act1", "relu", ["bn1"])
    g.add("conv2", "conv2d", ["act1"], out_channels=4, kernel_size=3, padding=1, bias=False)
    g.add("res", "add", ["conv2", "act1"])
    g.add("cat", "concat", ["res", "x"])
    g.add("pool", "maxpool2d", ["cat"], kernel_size=2)
    g.add("flat", "flatten", ["pool"])
    g.add("fc", "linear", ["flat"], out_features=5)
    g.add_output("out", "fc")
    return g


def randomize_bn(module: nn.Module) -> None:
    """Non-trivial running statistics, so tests would notice lost BN buffers."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)


# ---- construction ------------------------------------------------------------------------
def test_construction_orders_inputs_and_lists_heads():
    g = cnn_graph()
    assert g.inputs("cat") == ["res", "x"]
    assert g.inputs("res") == ["conv2", "act1"]
    assert g.consumers("act1") == ["conv2", "res"]
    assert g.heads == ["out"]
    assert g.input_node() == "x"
    assert list(g)[0] == "x" and list(g)[-1] == "out"
    assert len(g) == 11 and "conv1" in g and "nope" not in g
    g.validate()


def test_add_fills_sizes_from_input_shapes():
    g = cnn_graph()
    assert g.node("conv1").attrs["in_channels"] == 3
    assert g.node("bn1").attrs["num_features"] == 4
    assert g.node("fc").attrs["in_features"] == (4 + 3) * 4 * 4
    assert g.node("conv1").tensors["weight"].shape == (4, 3, 3, 3)


def test_copy_is_independent_of_the_original():
    g = mlp_graph()
    h = g.copy()
    h.add("fc3", "linear", ["fc2"], out_features=2)
    h.node("fc1").attrs["out_features"] = 99
    assert "fc3" not in g
    assert g.node("fc1").attrs["out_features"] == 8


@pytest.mark.parametrize("bad", ["1abc", "a-b", "class", "", "forward", "parameters", "x"])
def test_bad_or_duplicate_names_are_rejected(bad):
    g = mlp_graph()
    with pytest.raises(GraphError, match="name|exists"):
        g.add(bad, "relu", ["fc1"])


def test_wrong_inputs_are_rejected_naming_the_node():
    g = mlp_graph()
    with pytest.raises(GraphError, match="'r'.*'ghost'"):
        g.add("r", "relu", ["ghost"])
    with pytest.raises(GraphError, match="'r'.*output node 'out'"):
        g.add("r", "relu", ["out"])
    with pytest.raises(GraphError, match="'r'.*takes 1..1 inputs"):
        g.add("r", "relu", ["fc1", "act1"])
    with pytest.raises(GraphError, match="'s'.*takes 2..n inputs"):
        g.add("s", "add", ["fc1"])


# ---- shape inference ---------------------------------------------------------------------
SHAPE_CASES = [
    ("linear", (5,), {"out_features": 7}),
    ("linear", (2, 5), {"out_features": 3}),
    ("conv2d", (3, 9, 9), {"out_channels": 4, "kernel_size": 3}),
    ("conv2d", (3, 9, 9), {"out_channels": 4, "kernel_size": 3, "stride": 2, "padding": 1}),
    ("conv2d", (3, 10, 7), {"out_channels": 2, "kernel_size": (3, 1), "stride": (2, 1),
                            "padding": (0, 2), "dilation": (2, 1)}),
    ("batchnorm1d", (6,), {}),
    ("batchnorm1d", (6, 4), {}),
    ("batchnorm2d", (3, 5, 5), {}),
    ("maxpool2d", (2, 7, 7), {"kernel_size": 2}),
    ("maxpool2d", (2, 7, 7), {"kernel_size": 3, "stride": 2, "padding": 1}),
    ("maxpool2d", (2, 5, 5), {"kernel_size": 2, "stride": 2, "padding": 1, "ceil_mode": True}),
    ("maxpool2d", (2, 7, 7), {"kernel_size": 2, "ceil_mode": True}),
    ("avgpool2d", (2, 6, 6), {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True}),
    ("avgpool2d", (2, 7, 7), {"kernel_size": 2}),
    ("adaptive_avgpool2d", (2, 7, 5), {"output_size": 1}),
    ("adaptive_avgpool2d", (2, 7, 5), {"output_size": (3, None)}),
    ("flatten", (2, 3, 4), {}),
    ("flatten", (6,), {}),
    *[(k, (3, 4, 4), {}) for k in ("relu", "leaky_relu", "elu", "gelu", "silu", "tanh",
                                   "sigmoid", "identity", "dropout", "relu6", "hardswish",
                                   "hardsigmoid", "hardtanh", "mish", "softplus", "dropout2d",
                                   "stochastic_depth")],
    ("conv2d", (4, 6, 6), {"out_channels": 8, "kernel_size": 3, "groups": 4}),
    ("conv2d", (4, 6, 6), {"out_channels": 6, "kernel_size": 1, "groups": 2}),
    ("permute", (2, 3, 4), {"dims": [2, 0, 1]}),
    ("reshape", (2, 3, 4), {"shape": [6, 2, 2]}),
    ("getitem", (2, 3, 4), {"index": [[None, None, None], 1]}),
    ("getitem", (2, 3, 4), {"index": [[0, 2, None], [None, None, 2], -1]}),
    ("mean", (2, 3, 4), {"dims": [1, -1]}),
    ("mean", (2, 3, 4), {"dims": [0], "keepdim": True}),
    ("pad", (2, 3, 4), {"pad": [1, 0, 0, 2]}),
    ("channel_shuffle", (4, 3, 3), {"groups": 2}),
    ("scale", (3, 4, 4), {"shape": [3, 1, 1]}),
    ("scale", (3, 4, 4), {}),
    ("offset", (5, 4), {"shape": [1, 5, 4]}),
    ("class_token", (5, 4), {"shape": [1, 2, 4]}),
    ("layernorm", (5, 4), {"normalized_shape": [4]}),
    ("layernorm", (3, 5, 4), {"normalized_shape": [5, 4], "bias": False}),
    ("self_attention", (5, 4), {"embed_dim": 4, "num_heads": 2}),
    ("window_attention", (4, 6, 8), {"dim": 8, "window_size": [2, 2], "shift_size": [1, 1],
                                     "num_heads": 2}),
    ("window_attention", (4, 4, 8), {"dim": 8, "window_size": [2, 2], "shift_size": [1, 1],
                                     "num_heads": 2, "version": 2}),
    ("relative_attention", (3, 4, 8), {"feat_dim": 8, "head_dim": 4, "max_seq_len": 4}),
    ("self_attention", (5, 4), {"embed_dim": 4, "num_heads": 3, "head_dim": 2}),
    ("attention", (5, 4), {"dim": 4, "num_heads": 3, "head_dim": 2, "dim_out": 6}),
    ("groupnorm", (6, 3, 3), {"num_groups": 3, "num_channels": 6}),
    ("sum", (2, 3, 4), {"dims": [0, 2], "keepdim": True}),
    ("interpolate", (2, 3, 5), {"scale_factor": 1.5, "mode": "bilinear"}),
    ("interpolate", (2, 3, 5), {"size": [4, 2]}),
    ("program", (2, 3), {"calls": [{"fn": "Tensor.softmax", "args": [{"input": 0}, -1]},
                                   {"fn": "operator.mul", "args": [{"call": 0}, {"tensor": "p0"}]},
                                   {"fn": "Tensor.transpose", "args": [{"call": 1}, 1, 2]}],
                         "held": {"p0": {"shape": [3], "buffer": False}},
                         "in_shapes": [[2, 3]], "shape": [3, 2]}),
]


def single_node_graph(kind, shape, attrs) -> NetGraph:
    g = NetGraph()
    g.add_input("x", shape)
    g.add("n", kind, ["x"], **attrs)
    g.add_output("out", "n")
    return g


@pytest.mark.parametrize("kind,shape,attrs", SHAPE_CASES)
def test_inferred_shape_matches_torch(kind, shape, attrs):
    g = single_node_graph(kind, shape, attrs)
    got = compile_graph(g).eval()(torch.randn(2, *shape))
    assert g.shape("n") == tuple(got.shape[1:]) == g.shapes()["out"]


@pytest.mark.parametrize("kind", ["add", "concat"])
def test_merge_shapes_match_torch(kind):
    g = NetGraph()
    g.add_input("x", (3, 4, 4))
    g.add("a", "conv2d", ["x"], out_channels=2, kernel_size=1)
    g.add("b", "conv2d", ["x"], out_channels=2 if kind == "add" else 5, kernel_size=1)
    g.add("m", kind, ["a", "b", "a"])
    g.add_output("out", "m")
    got = compile_graph(g)(torch.randn(2, 3, 4, 4))
    assert g.shape("m") == tuple(got.shape[1:]) == ((2, 4, 4) if kind == "add" else (9, 4, 4))


@pytest.mark.parametrize("dim,pooled,gate_first", [(0, 1, False), (2, (4, 1), True),
                                                   (-1, (1, 4), False)])
def test_concat_on_any_dim_and_broadcast_mul_match_torch(dim, pooled, gate_first):
    g = NetGraph()
    g.add_input("x", (3, 4, 2))
    g.add("c", "concat", ["x", "x"], dim=dim)
    g.add_output("out", "c")
    assert g.shape("c") == tuple(compile_graph(g)(torch.randn(2, 3, 4, 2)).shape[1:])
    g = NetGraph()
    g.add_input("x", (3, 4, 4))
    g.add("s", "adaptive_avgpool2d", ["x"], output_size=pooled)  # a gate broadcast over x
    g.add("m", "mul", ["s", "x"] if gate_first else ["x", "s"])
    g.add_output("out", "m")
    got = compile_graph(g)(torch.randn(2, 3, 4, 4))
    assert g.shape("m") == tuple(got.shape[1:]) == (3, 4, 4)


def test_every_kind_has_a_shape_case():
    covered = {k for k, _, _ in SHAPE_CASES} | {"add", "concat", "mul", "input", "output"}
    assert covered == set(KINDS)


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 12), k=st.integers(1, 4), s=st.integers(1, 3), p=st.integers(0, 2),
       d=st.integers(1, 2), ceil=st.booleans(), pool=st.sampled_from(["max", "avg", "conv"]))
def test_conv_and_pool_arithmetic_matches_torch(size, k, s, p, d, ceil, pool):
    x = torch.zeros(1, 1, size, size)
    if pool == "conv":
        attrs = {"out_channels": 1, "kernel_size": k, "stride": s, "padding": p, "dilation": d}
        kind, run = "conv2d", lambda: F.conv2d(x, torch.zeros(1, 1, k, k), None, s, p, d)
    elif pool == "max":
        attrs = {"kernel_size": k, "stride": s, "padding": p, "dilation": d, "ceil_mode": ceil}
        kind, run = "maxpool2d", lambda: F.max_pool2d(x, k, s, p, d, ceil_mode=ceil)
    else:
        attrs = {"kernel_size": k, "stride": s, "padding": p, "ceil_mode": ceil}
        kind, run = "avgpool2d", lambda: F.avg_pool2d(x, k, s, p, ceil_mode=ceil)
    try:
        want = tuple(run().shape[1:])
    except RuntimeError:  # torch refuses (pad too large, empty output): so must the graph
        want = None
    if want is None or 0 in want:
        with pytest.raises(ShapeError, match="'n'"):
            single_node_graph(kind, (1, size, size), attrs)
        return
    assert single_node_graph(kind, (1, size, size), attrs).shape("n") == want


@pytest.mark.parametrize("kind,shape,attrs,match", [
    ("linear", (5,), {"out_features": 2, "in_features": 4}, "'n'.*in_features=4"),
    ("conv2d", (5,), {"out_channels": 2, "kernel_size": 1}, "'n'.*expects an image"),
    ("conv2d", (3, 2, 2), {"out_channels": 2, "kernel_size": 3}, "'n'.*empty map"),
    ("conv2d", (3, 4, 4), {"out_channels": 2, "kernel_size": 1, "in_channels": 2},
     "'n'.*in_channels=2"),
    ("batchnorm2d", (4,), {}, "'n'.*expects an image"),
    ("batchnorm1d", (4,), {"num_features": 3}, "'n'.*num_features=3"),
    ("maxpool2d", (1, 1, 1), {"kernel_size": 2}, "'n'.*empty map"),
])
def test_shape_errors_name_the_node(kind, shape, attrs, match):
    with pytest.raises(ShapeError, match=match):
        single_node_graph(kind, shape, attrs)


def test_merge_shape_errors_name_the_node():
    g = NetGraph()
    g.add_input("x", (3, 4, 4))
    g.add("a", "conv2d", ["x"], out_channels=2, kernel_size=1)
    g.add("b", "conv2d", ["x"], out_channels=2, kernel_size=3)
    with pytest.raises(ShapeError, match="'m' \\(add\\)"):
        g.add("m", "add", ["a", "b"])
    with pytest.raises(ShapeError, match="'m' \\(concat\\)"):
        g.add("m", "concat", ["a", "b"])


# ---- validation --------------------------------------------------------------------------
def test_cycle_through_nx_is_reported_with_its_path():
    g = mlp_graph()
    g.nx.add_edge("act1", "fc1", port=1)
    with pytest.raises(GraphError, match="cycle: .*fc1.*act1"):
        g.validate()


def test_cycle_from_a_bad_rewire_is_reported():
    g = mlp_graph((4, 8, 8, 3))
    g.rewire("fc2", "act1", "act2")  # fc2 now reads its own consumer's output
    with pytest.raises(GraphError, match="cycle: .*fc2.*act2"):
        g.validate()


def test_rewire_keeps_the_port():
    g = cnn_graph()
    g.add("act2", "relu", ["conv2"])
    g.rewire("res", "conv2", "act2")
    assert g.inputs("res") == ["act2", "act1"]
    with pytest.raises(GraphError, match="does not read"):
        g.rewire("res", "conv2", "act2")


def test_missing_input_after_remove_names_the_consumer():
    g = mlp_graph()
    g.remove("act1")
    with pytest.raises(GraphError, match="'fc2'.*0 inputs.*dangling or missing"):
        g.validate()


def test_node_feeding_nothing_is_named():
    g = mlp_graph()
    g.add("spare", "relu", ["fc1"])
    with pytest.raises(GraphError, match="'spare'.*feeds nothing"):
        g.validate()


def test_shape_mismatch_after_an_edit_names_the_node():
    g = mlp_graph()
    g.node("fc2").attrs["in_features"] = 5
    with pytest.raises(ShapeError, match="'fc2'.*in_features=5"):
        g.validate()


def test_unknown_kind_names_the_node():
    g = mlp_graph()
    g.node("act1").kind = "swish"
    with pytest.raises(GraphError, match="'act1'.*unknown node kind 'swish'"):
        g.validate()
    with pytest.raises(GraphError, match="'y'.*unknown node kind 'swish'"):
        g.add("y", "swish", ["fc1"])


def test_wrong_tensor_shapes_are_named():
    g = mlp_graph()
    g.node("fc1").tensors = {"weight": torch.zeros(8, 5), "bias": torch.zeros(8)}
    with pytest.raises(ShapeError, match="'fc1'.*'weight'.*\\(8, 5\\)"):
        g.validate()
    g.node("fc1").tensors = {"weight": torch.zeros(8, 4)}
    with pytest.raises(GraphError, match="'fc1'.*should hold"):
        g.validate()


def test_graph_without_input_or_output_is_rejected():
    g = NetGraph()
    with pytest.raises(GraphError, match="no input node"):
        g.validate()
    g.add_input("x", (3,))
    with pytest.raises(GraphError, match="no output node"):
        g.validate()


def test_unknown_node_lookup_suggests_names():
    with pytest.raises(GraphError, match="no node named 'FC'.*fc1"):
        mlp_graph().node("FC")


# ---- sizes and summary -------------------------------------------------------------------
def test_param_counts_per_node_and_total_match_torch():
    g = cnn_graph()
    module = compile_graph(g)
    for name in g:
        want = sum(p.numel() for p in module.get_submodule(name).parameters()) \
            if hasattr(module, name) else 0
        assert g.param_count(name) == want, name
    assert g.param_count() == sum(p.numel() for p in module.parameters())
    assert g.param_count("conv1") == 4 * 3 * 9 + 4
    assert g.param_count("bn1") == 8  # running statistics are buffers, not parameters
    assert g.param_count("conv2") == 4 * 4 * 9


def test_summary_lists_every_node_with_shape_and_params():
    g = cnn_graph()
    text = g.summary()
    lines = text.splitlines()
    assert lines[0].split() == ["node", "kind", "inputs", "output", "shape", "params"]
    row = next(line for line in lines if line.startswith("conv1 "))
    assert row.split() == ["conv1", "conv2d", "x", "4x8x8", "112"]
    assert next(line for line in lines if line.startswith("cat ")).split()[2:4] == \
        ["res,", "x"]
    assert lines[-1] == f"total parameters: {g.param_count():,} in {len(g)} nodes"
    assert all(n in text for n in g)


# ---- storage -----------------------------------------------------------------------------
def test_save_load_roundtrip_keeps_structure_weights_and_buffers(tmp_path):
    g = cnn_graph()
    module = compile_graph(g)
    randomize_bn(module)
    from growth.compile import graph_with_weights

    g = graph_with_weights(g, module)
    g.save(tmp_path / "net")
    back = NetGraph.load(tmp_path / "net")
    assert back.to_dict() == g.to_dict()
    assert sorted(p.name for p in (tmp_path / "net").iterdir()) == \
        ["structure.json", "weights.safetensors"]  # no temp files left behind
    x = torch.randn(4, 3, 8, 8)
    want = compile_graph(g).eval()(x)
    got = compile_graph(back).eval()(x)
    assert torch.equal(want, got)


def test_to_dict_is_json_and_from_dict_rebuilds(tmp_path):
    g = cnn_graph()
    data = json.loads(json.dumps(g.to_dict()))
    back = NetGraph.from_dict(data, g.named_tensors())
    assert back.to_dict() == g.to_dict()
    assert back.shapes() == g.shapes()


def test_corrupt_weights_file_is_a_checkpoint_error(tmp_path):
    mlp_graph().save(tmp_path)
    (tmp_path / "weights.safetensors").write_bytes(b"\x00\xffgarbage" * 16)
    with pytest.raises(CheckpointError, match="weights.safetensors.*corrupt"):
        NetGraph.load(tmp_path)


def test_truncated_structure_is_a_checkpoint_error(tmp_path):
    mlp_graph().save(tmp_path)
    text = (tmp_path / "structure.json").read_text()
    (tmp_path / "structure.json").write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match="structure.json.*not valid JSON"):
        NetGraph.load(tmp_path)


def test_structure_of_the_wrong_type_is_a_checkpoint_error(tmp_path):
    mlp_graph().save(tmp_path)
    (tmp_path / "structure.json").write_text("[1, 2, 3]")
    with pytest.raises(CheckpointError, match="structure.json"):
        NetGraph.load(tmp_path)


def test_mismatched_weight_shapes_name_the_file(tmp_path):
    g = mlp_graph()
    g.save(tmp_path)
    tensors = dict(g.named_tensors())
    tensors["fc1.weight"] = torch.zeros(5, 4)
    save_file(tensors, str(tmp_path / "weights.safetensors"))
    with pytest.raises(CheckpointError, match="weights.safetensors.*'fc1'.*\\(5, 4\\)"):
        NetGraph.load(tmp_path)


def test_extra_or_missing_weights_are_checkpoint_errors(tmp_path):
    g = mlp_graph()
    g.save(tmp_path)
    tensors = dict(g.named_tensors())
    save_file({**tensors, "ghost.weight": torch.zeros(1)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(CheckpointError, match="ghost"):
        NetGraph.load(tmp_path)
    del tensors["fc2.bias"]
    save_file(tensors, str(tmp_path / "weights.safetensors"))
    with pytest.raises(CheckpointError, match="fc2"):
        NetGraph.load(tmp_path)


def test_missing_files_are_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="structure.json is missing"):
        NetGraph.load(tmp_path)
    mlp_graph().save(tmp_path)
    (tmp_path / "weights.safetensors").unlink()
    with pytest.raises(CheckpointError, match="weights.safetensors is missing"):
        NetGraph.load(tmp_path)


def test_output_scale_is_max_abs():
    assert output_scale(torch.tensor([-3.0, 2.0])) == 3.0
    assert output_scale(torch.zeros(3)) == 1e-12
    assert output_scale(torch.zeros(0)) == 1.0
