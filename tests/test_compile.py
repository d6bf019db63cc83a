"""compile_graph against hand-written torch modules; head views; weights back into graphs."""

import pytest
import torch
import torch.nn.functional as F
from growth.search_spaces.networks import add_head, mlp, small_cnn
from torch import nn

from growth.compile import compile_graph, graph_with_weights, head_view
from growth.errors import CheckpointError, GraphError
from growth.graph import NetGraph
from growth.layers import module_tensors


class HandCNN(nn.Module):
    """conv-BN-ReLU, a residual add, a concat with the input, pool, flatten, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.fc = nn.Linear(7 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn1(self.conv1(x)))
        r = self.conv2(a) + a
        c = torch.cat([r, x], 1)
        return self.fc(torch.flatten(F.max_pool2d(c, 2), 1))


def graph_of(hand: HandCNN) -> NetGraph:
    """The same network as a NetGraph holding the hand module's tensors."""
    g = NetGraph()
    g.add_input("x", (3, 8, 8))
    g.add("conv1", "conv2d", ["x"], module_tensors(hand.conv1), out_channels=4, kernel_size=3,
          padding=1)
    g.add("bn1", "batchnorm2d", ["conv1"], module_tensors(hand.bn1))
    g.add("act1", "relu", ["bn1"])
    g.add("conv2", "conv2d", ["act1"], module_tensors(hand.conv2), out_channels=4,
          kernel_size=3, padding=1, bias=False)
    g.add("res", "add", ["conv2", "act1"])
    g.add("cat", "concat", ["res", "x"])
    g.add("pool", "maxpool2d", ["cat"], kernel_size=2)
    g.add("flat", "flatten", ["pool"])
    g.add("fc", "linear", ["flat"], module_tensors(hand.fc), out_features=5)
    g.add_output("out", "fc")
    g.validate()
    return g


def two_head_graph() -> NetGraph:
    return add_head(add_head(mlp((6,), [8, 8], batchnorm=True), "t1", 3), "t2", 4)


@pytest.fixture
def hand() -> HandCNN:
    torch.manual_seed(0)
    m = HandCNN()
    m.bn1.running_mean.uniform_(-0.5, 0.5)
    m.bn1.running_var.uniform_(0.5, 2.0)
    return m


def test_compiled_equals_hand_written_in_eval_and_train_mode(hand):
    compiled = compile_graph(graph_of(hand))
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(compiled.eval()(x), hand.eval()(x), atol=1e-6)
        assert torch.allclose(compiled.train()(x), hand.train()(x), atol=1e-6)
    # BN running statistics moved the same way during the train-mode pass
    assert torch.allclose(compiled.bn1.running_mean, hand.bn1.running_mean)


def test_state_dict_keys_are_graph_tensor_keys(hand):
    g = graph_of(hand)
    assert set(compile_graph(g).state_dict()) == set(g.named_tensors())


def test_compiled_tensors_are_copies_of_the_graph(hand):
    g = graph_of(hand)
    compiled = compile_graph(g)
    with torch.no_grad():
        compiled.fc.weight.zero_()
    assert g.node("fc").tensors["weight"].abs().sum() > 0


def test_generated_code_calls_layers_directly(hand):
    g = graph_of(hand)
    code = compile_graph(g).code
    for layer in ("conv1", "bn1", "act1", "conv2", "pool", "fc"):
        assert code.count(f"self.{layer}(") == 1
    assert "torch.cat(" in code and "torch.flatten(" in code and " + " in code
    assert "for " not in code and "while " not in code  # straight-line code, no interpreter
    body = [line for line in code.splitlines() if " = " in line]
    assert len(body) == len(g) - 2  # one statement per node except input and output


def test_multi_head_returns_a_dict_and_views_share_parameters():
    torch.manual_seed(1)
    g = two_head_graph()
    net = compile_graph(g).eval()
    x = torch.randn(5, 6)
    out = net(x)
    assert list(out) == ["t1", "t2"] and out["t1"].shape == (5, 3) and out["t2"].shape == (5, 4)
    v1, v2 = head_view(net, g, "t1").eval(), head_view(net, g, "t2").eval()
    assert v1.fc1.weight is net.fc1.weight and v2.head_t2.weight is net.head_t2.weight
    assert not hasattr(v1, "head_t2") and not hasattr(v2, "head_t1")
    assert torch.equal(v1(x), out["t1"]) and torch.equal(v2(x), out["t2"])

    before = v2(x).detach().clone()
    opt = torch.optim.SGD(v1.parameters(), lr=0.5)
    v1.train()
    F.cross_entropy(v1(x), torch.tensor([0, 1, 2, 0, 1])).backward()
    opt.step()
    after = v2(x)
    assert not torch.allclose(after, before)  # the shared trunk moved
    assert torch.equal(after, net(x)["t2"])


def test_single_head_compile_returns_a_tensor():
    g = two_head_graph()
    assert isinstance(compile_graph(g, "t2")(torch.randn(2, 6)), torch.Tensor)
    with pytest.raises(GraphError, match="no head named 't3'.*t1"):
        compile_graph(g, "t3")


def test_graph_with_weights_brings_trained_weights_back(hand):
    g = graph_of(hand)
    net = compile_graph(g).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    torch.manual_seed(2)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    trained = graph_with_weights(g, net)
    net.eval()
    again = compile_graph(trained).eval()
    with torch.no_grad():
        assert torch.equal(again(x), net(x))
        assert not torch.allclose(compile_graph(g).eval()(x), net(x))  # original untouched
    assert torch.equal(trained.node("bn1").tensors["running_mean"], net.bn1.running_mean)
    assert trained.to_dict() == g.to_dict()


def test_graph_with_weights_rejects_a_module_of_another_graph():
    small, wide = mlp((4,), [8]), mlp((4,), [9])
    small, wide = add_head(small, "t", 2), add_head(wide, "t", 2)
    with pytest.raises(CheckpointError, match="fc1.weight.*\\(9, 4\\).*\\(8, 4\\)"):
        graph_with_weights(small, compile_graph(wide))
    with pytest.raises(CheckpointError, match="no tensor 'fc1.weight'"):
        graph_with_weights(small, nn.Linear(4, 8))



# ---- base networks (search_spaces/networks.py) compile and run ------------------------------
def test_mlp_builder_trunk_ends_at_features_without_heads():
    g = mlp((1, 4, 4), [8, 6], activation="tanh", batchnorm=True, dropout=0.1)
    assert g.heads == [] and g.shape("features") == (6,)
    assert g.inputs("features") == ["drop2"] and g.node("act1").kind == "tanh"
    assert [g.node(n).kind for n in g.inputs("fc1")] == ["flatten"]
    g2 = add_head(g, "task1", 3)
    assert g.heads == [] and g2.heads == ["task1"]  # add_head returns a new graph
    assert compile_graph(g2).eval()(torch.randn(2, 1, 4, 4)).shape == (2, 3)
    assert mlp((5,), []).inputs("features") == ["x"]


def test_small_cnn_builder_with_fc_and_heads():
    g = small_cnn((3, 16, 16), channels=[4, 8], fc=[12])
    assert g.shape("pool2") == (8, 4, 4) and g.shape("features") == (12,)
    assert g.node("conv1").attrs["padding"] == 1 and g.inputs("features") == ["act3"]
    g = add_head(add_head(g, "a", 2), "b", 5)
    out = compile_graph(g)(torch.randn(3, 3, 16, 16))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"a": (3, 2), "b": (3, 5)}
    assert g.inputs("head_a") == ["features"] and g.node("head_b").kind == "linear"
    g.validate()


def test_builders_reject_bad_arguments():
    with pytest.raises(GraphError, match="activation 'swish'"):
        mlp((4,), [3], activation="swish")
    with pytest.raises(GraphError, match="\\(C, H, W\\)"):
        small_cnn((4,))
    with pytest.raises(GraphError, match="identifier"):
        add_head(mlp((4,), [3]), "task-1", 2)
    with pytest.raises(GraphError, match="'t'.*already exists|already exists"):
        add_head(add_head(mlp((4,), [3]), "t", 2), "t", 2)
    with pytest.raises(GraphError, match="linear head needs a vector"):
        add_head(small_cnn((1, 4, 4), [2]), "t", 2, source="pool1")


def test_a_list_of_heads_runs_the_shared_trunk_once():
    g = two_head_graph()
    gm = compile_graph(g)
    both = compile_graph(g, ["t2", "t1"], modules=gm)
    x = torch.randn(3, 6)
    out = both(x)
    assert set(out) == {"t1", "t2"}
    full = gm(x)
    assert torch.equal(out["t1"], full["t1"]) and torch.equal(out["t2"], full["t2"])
    assert isinstance(compile_graph(g, ["t1"])(x), dict)  # a list always gives a dict
    calls = [n.target for n in both.graph.nodes if n.op == "call_module"]
    assert len(calls) == len(set(calls))  # no layer runs twice


def test_a_float64_graph_compiles_to_float64():
    g = two_head_graph()
    for name in g.topo_order():
        node = g.node(name)
        node.tensors = {k: v.double() if v.is_floating_point() else v
                        for k, v in node.tensors.items()}
    gm = compile_graph(g, "t1").eval()
    out = gm(torch.randn(2, 6, dtype=torch.float64))
    assert out.dtype == torch.float64


def test_a_frozen_layer_computes_as_in_eval_mode_in_either_mode():
    """Frozen BatchNorm and dropout in a training model: the BN uses its running statistics
    (by hand: (h - mean) / sqrt(var + eps) * w + b) and leaves them alone, dropout is off, and
    each layer keeps the mode the model gives it."""
    torch.manual_seed(3)
    fc, bn = nn.Linear(4, 3), nn.BatchNorm1d(3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    g = NetGraph()
    g.add_input("x", (4,))
    g.add("fc", "linear", ["x"], module_tensors(fc), out_features=3)
    g.add("bn", "batchnorm1d", ["fc"], module_tensors(bn), frozen=True)
    g.add("drop", "dropout", ["bn"], p=0.9, frozen=True)
    g.add_output("out", "drop")
    net = compile_graph(g)
    x = torch.randn(8, 4)
    h = x @ fc.weight.T + fc.bias
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    expect = (h - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias
    assert not net.bn.weight.requires_grad and net.fc.weight.requires_grad
    for training in (True, False):
        net.train(training)
        with torch.no_grad():
            torch.testing.assert_close(net(x), expect)
        assert net.bn.training is training and net.drop.training is training
        assert torch.equal(net.bn.running_mean, mean) and torch.equal(net.bn.running_var, var)


def test_graph_with_weights_takes_a_state_dict_and_copies_the_tensors():
    torch.manual_seed(4)
    g = add_head(mlp((4,), [5]), "t", 2)
    net = compile_graph(g)
    with torch.no_grad():
        net.fc1.weight.fill_(0.25)
    state = net.state_dict()
    back = graph_with_weights(g, state)
    assert torch.equal(back.node("fc1").tensors["weight"], torch.full((5, 4), 0.25))
    with torch.no_grad():  # training goes on: the graph taken back must not move with it
        net.fc1.weight.add_(1.0)
        state["fc1.weight"].add_(1.0)
    assert torch.equal(back.node("fc1").tensors["weight"], torch.full((5, 4), 0.25))
    assert torch.equal(graph_with_weights(g, net).node("fc1").tensors["weight"],
                       torch.full((5, 4), 2.25))


# ---- functional kinds, identity, heads: against the torch calls written by hand ---------------
def plumbing_graph() -> NetGraph:
    g = NetGraph()
    g.add_input("x", (2, 3, 4))
    g.add("perm", "permute", ["x"], dims=[2, 0, 1])            # (4, 2, 3)
    g.add("flat", "reshape", ["perm"], shape=[8, 3])            # (8, 3)
    g.add("pick", "getitem", ["flat"], index=[[1, 7, 2], 0])    # rows 1, 3, 5 of column 0
    g.add("avg", "mean", ["x"], dims=[-1], keepdim=True)        # (2, 3, 1)
    g.add("padded", "pad", ["avg"], pad=[1, 2], value=0.5)      # (2, 3, 4)
    g.add("gate", "mul", ["padded", "x"])
    g.add("same", "identity", ["gate"])
    g.add("joined", "concat", ["same", "x"], dim=-1)            # (2, 3, 8)
    g.add_output("picked", "pick")
    g.add_output("out", "joined")
    g.validate()
    return g


def test_functional_kinds_compute_the_torch_calls_with_the_batch_dim_put_back():
    torch.manual_seed(5)
    x = torch.randn(3, 2, 3, 4)
    net = compile_graph(plumbing_graph())
    out = net(x)
    pick = x.permute(0, 3, 1, 2).reshape(3, 8, 3)[:, 1:7:2, 0]
    padded = F.pad(x.mean(-1, keepdim=True), [1, 2], "constant", 0.5)
    joined = torch.cat([padded * x, x], -1)
    assert list(out) == ["picked", "out"]
    assert torch.equal(out["picked"], pick) and torch.equal(out["out"], joined)
    assert dict(net.named_children()) == {}  # no layer holds anything, identity included
    assert type(net).__name__ == "CompiledNet"


def test_an_identity_node_passes_its_input_through_without_a_layer():
    torch.manual_seed(6)
    fc = nn.Linear(3, 2)
    g = NetGraph()
    g.add_input("x", (3,))
    g.add("fc", "linear", ["x"], module_tensors(fc), out_features=2)
    g.add("skip", "identity", ["fc"], frozen=True)
    g.add_output("out", "skip")
    net = compile_graph(g)
    x = torch.randn(4, 3)
    with torch.no_grad():
        assert torch.equal(net(x), fc(x))
    assert list(dict(net.named_children())) == ["fc"]


def test_a_list_of_heads_gives_a_dict_even_for_a_single_head_graph():
    g = add_head(mlp((4,), [3]), "t", 2)
    x = torch.randn(2, 4)
    out = compile_graph(g, ["t"])(x)
    assert isinstance(out, dict) and list(out) == ["t"] and out["t"].shape == (2, 2)


def test_asking_for_no_head_or_unknown_heads_names_them():
    g = two_head_graph()
    with pytest.raises(GraphError, match=r"^no head named \[\]; the graph's heads are"):
        compile_graph(g, [])
    with pytest.raises(GraphError, match=r"^no head named 't3', 't4'; the graph's heads are"):
        compile_graph(g, ["t1", "t3", "t4"])


def test_a_node_lacking_some_of_its_tensors_is_an_error_naming_them():
    fc = nn.Linear(3, 2)
    g = NetGraph()
    g.add_input("x", (3,))
    g.add("fc", "linear", ["x"], {"weight": fc.weight.detach().clone()}, out_features=2)
    g.add_output("out", "fc")
    with pytest.raises(GraphError, match=r"node 'fc' lacks tensors \['bias'\]"):
        compile_graph(g)


def test_a_parametric_layer_without_tensors_compiles_as_built():
    """A LayerNorm without affine parameters holds no tensors: it computes the plain
    normalisation (x - mean) / sqrt(var + eps), by hand here."""
    g = NetGraph()
    g.add_input("x", [4])
    g.add("ln", "layernorm", ["x"], normalized_shape=[4], elementwise_affine=False)
    g.add_output("out", "ln")
    assert g.node("ln").tensors == {}
    x = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.0, -1.0, 1.0, 0.0]])
    mean = x.mean(1, keepdim=True)
    var = ((x - mean) ** 2).mean(1, keepdim=True)
    torch.testing.assert_close(compile_graph(g)(x), (x - mean) / torch.sqrt(var + 1e-5))
