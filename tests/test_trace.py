"""import_module: user MLPs and CNNs, torchvision models, multi-output heads, clear refusals."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from growth.compile import compile_graph
from growth.errors import GraphError, ShapeError, UnsupportedModuleError
from growth.graph import output_scale
from growth.trace import import_module


def randomize_bn(module: nn.Module) -> None:
    """Non-trivial BN statistics and affine terms, so a lost buffer changes the output."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)


def assert_same_function(module: nn.Module, shape: tuple[int, ...], batch: int = 3,
                         **kw) -> None:
    """Import, compile, and compare with the module in eval mode (1e-5 of output scale)."""
    module.eval()
    graph = import_module(module, shape, **kw)
    compiled = compile_graph(graph).eval()
    x = torch.randn(batch, *shape)
    with torch.no_grad():
        want, got = module(x.clone()), compiled(x.clone())  # in-place ops may write into x
    if isinstance(want, torch.Tensor):
        want, got = {"out": want}, {"out": got}
    elif isinstance(want, (tuple, list)):
        want = dict(zip(graph.heads, want))
    assert list(got) == list(want)
    for k in want:
        err = float((want[k] - got[k]).abs().max()) / output_scale(want[k])
        assert err <= 1e-5, (k, err)
    assert graph.param_count() == sum(p.numel() for p in module.parameters())
    return graph


FLATTENS = {
    "view_size0": lambda x: x.view(x.size(0), -1),
    "view_shape0": lambda x: x.view(x.shape[0], -1),
    "reshape_n": lambda x: x.reshape(-1, 48),
    "method_flatten": lambda x: x.flatten(1),
    "torch_flatten": lambda x: torch.flatten(x, 1),
    "torch_reshape": lambda x: torch.reshape(x, (x.size()[0], -1)),
    "contiguous_view": lambda x: x.contiguous().view(x.size(0), 48),
}


class UserMLP(nn.Module):
    def __init__(self, flatten=FLATTENS["view_size0"]) -> None:
        super().__init__()
        self.flat = flatten
        self.fc1 = nn.Linear(48, 16)
        self.bn = nn.BatchNorm1d(16)
        self.act = nn.ReLU(inplace=True)  # called twice: one node per call
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(16, 16)
        self.out = nn.Linear(32, 5)

    def forward(self, x):
        h = self.act(self.bn(self.fc1(self.flat(x))))
        h2 = self.act(self.fc2(self.drop(h)))
        return self.out(torch.cat([h, h2], dim=1))


@pytest.mark.parametrize("style", sorted(FLATTENS))
def test_user_mlp_with_each_flatten_style(style):
    torch.manual_seed(0)
    m = UserMLP(FLATTENS[style])
    randomize_bn(m)
    graph = assert_same_function(m, (3, 4, 4))
    assert [graph.node(n).kind for n in ("act", "act_1")] == ["relu", "relu"]
    assert graph.heads == ["out"] and graph.input_node() == "x"


class UserCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),
                                  nn.ReLU(inplace=True))
        self.branch = nn.Conv2d(8, 8, 3, padding=1)
        self.side = nn.Conv2d(8, 4, 1, bias=False)
        self.pool = nn.AvgPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        a = self.stem(x)
        b = F.relu(self.branch(a))
        b += a  # residual, written in place
        c = torch.cat((torch.add(b, a), torch.sigmoid(self.side(a))), 1)
        c = F.max_pool2d(self.pool(c), kernel_size=2, stride=2)
        d = F.adaptive_avg_pool2d(c, 1)
        return self.fc(torch.flatten(torch.cat([d, self.gap(c)], 1), 1))


def test_user_cnn_with_residual_cat_and_functional_ops():
    torch.manual_seed(0)
    m = UserCNN()
    randomize_bn(m)
    graph = assert_same_function(m, (3, 8, 8))
    assert graph.node("stem_0").kind == "conv2d" and graph.node("stem_1").kind == "batchnorm2d"
    assert graph.node("cat").kind == "concat" and graph.node("add").kind == "add"
    assert graph.inputs("add") == ["relu", "stem_2"]


class Zoo(nn.Module):
    """Every activation form the importer maps, as modules, functions and methods."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.mods = nn.Sequential(nn.GELU(), nn.SiLU(), nn.Tanh(), nn.Sigmoid(),
                                  nn.LeakyReLU(0.2), nn.ELU(0.5), nn.Identity(), nn.ReLU6(),
                                  nn.Hardswish(), nn.Hardsigmoid(), nn.Hardtanh(-2, 3),
                                  nn.Mish(), nn.Softplus(2.0), nn.GELU("tanh"))

    def forward(self, x):
        h = self.mods(self.fc(x))
        h = F.relu6(F.hardswish(F.hardsigmoid(F.hardtanh(F.mish(F.softplus(h, 0.5)), -1, 2))))
        h = F.gelu(F.silu(F.elu(F.leaky_relu(h, 0.3), alpha=0.7)), approximate="tanh")
        h = torch.tanh(F.relu(h)) + torch.relu(h).sigmoid() + h.tanh() + F.dropout(h, 0.5, False)
        return h.relu() + h.add(h)


def test_every_activation_form_is_imported():
    torch.manual_seed(0)
    graph = assert_same_function(Zoo(), (6,))
    kinds = {graph.node(n).kind for n in graph}
    assert {"gelu", "silu", "tanh", "sigmoid", "leaky_relu", "elu", "identity", "relu", "relu6",
            "hardswish", "hardsigmoid", "hardtanh", "mish", "softplus"} <= kinds
    assert graph.node("mods_4").attrs["negative_slope"] == 0.2
    assert graph.node("mods_10").attrs == {"min_val": -2, "max_val": 3}
    assert graph.node("mods_13").attrs["approximate"] == "tanh"


class InPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = self.fc1(x)
        h.contiguous().relu_()  # result unused: later reads of h (an alias) see the change
        torch.relu_(x)
        return self.fc2(h + x)


def test_in_place_ops_feed_later_reads():
    torch.manual_seed(0)
    m = InPlace()
    with torch.no_grad():
        m.fc1.bias.fill_(-0.5)  # many negative pre-activations: a dropped relu_ would show
    graph = assert_same_function(m, (4,), batch=8)
    assert graph.inputs("add") == ["relu_", "relu__1"]


class TwoOutputs(nn.Module):
    def __init__(self, as_dict: bool) -> None:
        super().__init__()
        self.trunk, self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2), nn.Linear(8, 3)
        self.as_dict = as_dict

    def forward(self, x):
        h = torch.relu(self.trunk(x))
        return {"task_a": self.a(h), "task_b": self.b(h)} if self.as_dict else \
            (self.a(h), self.b(h), h)


def test_tuple_and_dict_outputs_become_heads():
    torch.manual_seed(0)
    g = assert_same_function(TwoOutputs(as_dict=False), (4,))
    assert g.heads == ["out0", "out1", "out2"]
    g = assert_same_function(TwoOutputs(as_dict=True), (4,))
    assert g.heads == ["task_a", "task_b"]
    g = import_module(TwoOutputs(as_dict=False), (4,), head_names=["a", "b", "features"])
    assert g.heads == ["a", "b", "features"] and g.inputs("features") == ["relu"]
    assert g.inputs("a") == ["a_1"]  # the layer gave its name to the head
    with pytest.raises(GraphError, match="3 distinct names"):
        import_module(TwoOutputs(as_dict=False), (4,), head_names=["a", "a", "c"])


class Unused(TwoOutputs):
    def forward(self, x):
        return self.a(torch.relu(self.trunk(x)))


def test_unused_layers_are_left_out():
    g = import_module(Unused(as_dict=False), (4,))
    assert "b" not in g and g.param_count() == 4 * 8 + 8 + 8 * 2 + 2


def test_head_name_clashing_with_a_layer_renames_the_layer():
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    g = import_module(m, (4,), head_names=["_1"])  # fx names the ReLU node "_1"
    assert g.heads == ["_1"] and g.inputs("_1") == ["_1_1"]


def test_graph_holds_copies_of_the_module_tensors():
    m = nn.Sequential(nn.Linear(4, 4))
    g = import_module(m, (4,))
    with torch.no_grad():
        m[0].weight.zero_()
    assert g.node("_0").tensors["weight"].abs().sum() > 0


def test_resnet18_imports_with_equal_outputs():
    torch.manual_seed(0)
    m = torchvision.models.resnet18(weights=None, num_classes=10)
    randomize_bn(m)
    graph = assert_same_function(m, (3, 32, 32), batch=2)
    assert graph.node("layer1_0_conv1").kind == "conv2d"
    assert graph.node("layer1_0_relu_1").kind == "relu"  # self.relu reused: one node per call
    assert graph.inputs("add") == ["layer1_0_bn2", "maxpool"]
    assert graph.node("layer2_0_downsample_0").attrs["stride"] == (2, 2)


@pytest.mark.slow
def test_vgg11_bn_imports_with_equal_outputs():
    torch.manual_seed(0)
    m = torchvision.models.vgg11_bn(weights=None, num_classes=10)
    randomize_bn(m)
    graph = assert_same_function(m, (3, 32, 32), batch=2)
    assert graph.node("avgpool").attrs["output_size"] == (7, 7)
    assert graph.node("classifier_2").kind == "dropout"


# ---- refusals --------------------------------------------------------------------------------
class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return x
        return -x


class Wrapper(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.block = inner

    def forward(self, x):
        return self.block(self.fc(x))


def test_untraceable_module_names_the_layer():
    with pytest.raises(UnsupportedModuleError, match="'block' \\(Branchy.*control flow"):
        import_module(Wrapper(Branchy()), (4,))


@pytest.mark.parametrize("inner,match", [
    (nn.LSTM(4, 4), "layer 'block' \\(LSTM\\).*no node kind"),
    (nn.Softmax(dim=1), None),  # traced into F.softmax, replayed by a program node
    (nn.Linear(4, 4, bias=False).requires_grad_(False), None),
])
def test_unsupported_layer_names_path_and_type(inner, match):
    if match is None:  # a supported layer imports fine
        import_module(Wrapper(inner), (4,)).validate()
        return
    with pytest.raises(UnsupportedModuleError, match=match) as info:
        import_module(Wrapper(inner), (4,))
    assert "supported modules: " in str(info.value) and "Conv2d" in str(info.value)


def test_grouped_and_depthwise_convolutions_import():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 6, 3, groups=2),
                      nn.Conv2d(6, 12, 3, padding=1, groups=6))
    graph = assert_same_function(m, (4, 8, 8))
    assert [graph.node(n).attrs["groups"] for n in ("_0", "_1", "_2")] == [1, 2, 6]


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(self.fc(x))


def test_a_layer_called_twice_keeps_one_copy_of_its_weights():
    torch.manual_seed(0)
    m = Shared()
    graph = assert_same_function(m, (4,))
    held = [t for n in graph for t in graph.node(n).tensors.values()]
    assert sorted(t.numel() for t in held) == [4, 16]  # held once; both calls read them
    net = compile_graph(graph)
    net(torch.randn(3, 4)).sum().backward()
    m(torch.randn(3, 4)).sum().backward()
    grads = [p.grad for p in net.parameters()]
    assert sorted(g.numel() for g in grads) == [4, 16]  # the gradients of both calls add up


class Lambda(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn
        self.w = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return self.fn(self, x)


@pytest.mark.parametrize("fn,match", [
    (lambda s, x: x.view(3, -1), "fixes the batch size.*shape could not be traced"),
    (lambda s, x: torch.cat([x, x], dim=0), "function torch.cat .*not a batch of per-sample"),
    (lambda s, x: torch.flatten(x), "function torch.flatten .*not a batch of per-sample"),
    (lambda s, x: x[0], "function operator.getitem .*not a batch of per-sample"),
    (lambda s, x: torch.mean(x), "function torch.mean .*not a batch of per-sample"),
    (lambda s, x: x * x.sum().item(), "tensor method .item\\(\\).*no node kind computes it"),
    (lambda s, x: x[torch.nonzero(x)[:, 0]], "function torch.nonzero .*could not be traced"),
])
def test_unsupported_calls_name_the_function(fn, match):
    with pytest.raises(UnsupportedModuleError, match=match):
        import_module(Lambda(fn), (4,))


class Fn(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@pytest.mark.parametrize("fn,kinds", [
    (lambda x: torch.sum(x, dim=1, keepdim=True) * x, ["sum", "mul"]),
    (lambda x: x * 2 + 1, ["program"]),
    (lambda x: x.softmax(1), ["program"]),
    (lambda x: (x.unsqueeze(1) @ x.unsqueeze(2)).flatten(1) * x,
     ["reshape", "reshape", "program", "flatten", "mul"]),
])
def test_calls_without_a_node_kind_are_replayed_exactly(fn, kinds):
    graph = assert_same_function(Fn(fn), (4,))
    assert [graph.node(n).kind for n in graph][1:-1] == kinds


def test_a_parameter_read_twice_is_held_once():
    torch.manual_seed(0)
    graph = assert_same_function(Lambda(lambda s, x: x * s.w + s.w), (4,))
    holders = [n for n in graph if graph.node(n).tensors]
    assert len(holders) == 1 and graph.param_count() == 4


class ManyGaps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.fc = nn.LSTM(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x).softmax(1) * x.exp()  # replayed exactly
        g = x * x.sum().item()  # a value, not a shape: unsupported, and so is its use
        k = x[:, torch.nonzero(x[0])[:, 0]].mean(1, keepdim=True)  # shape depends on values
        return self.rnn(x)[0] + g + h + k  # an unsupported layer


def test_every_unsupported_call_is_listed_in_one_error():
    with pytest.raises(UnsupportedModuleError) as info:
        import_module(ManyGaps(), (4,))
    msg = str(info.value)
    assert msg.startswith("cannot import ManyGaps: 3 calls cannot be imported.")
    for what in ("tensor method .item() (fx node 'item') in the forward of ManyGaps "
                 "(test_trace.py:", "function torch.nonzero (fx node 'nonzero')",
                 "layer 'rnn' (LSTM)"):
        assert what in msg, what
    head = msg.split("supported modules")[0]
    assert "mul" not in head and "softmax" not in head  # a consequence; a replayed call
    assert "\n" not in msg


class Checked(nn.Module):
    """Shape checks as models write them (ViT asserts its image size)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        n, c, w = x.shape
        torch._assert((c == 3) & (w * 2 == 4), f"expected (3, 2) inputs, got ({c}, {w})")
        torch._assert(x.dim() == 3, "expected a batch of matrices")
        torch._assert(n > 0, "empty batch")  # depends on the batch size: cannot be evaluated
        return self.fc(x.reshape(n, c * w))


def test_shape_assertions_are_evaluated_at_import():
    with pytest.warns(UserWarning, match="function torch._assert.*dropped"):
        graph = assert_same_function(Checked(), (3, 2))
    assert [graph.node(n).kind for n in graph] == ["input", "flatten", "linear", "output"]
    with pytest.raises(ShapeError, match="input shape \\(3, 3\\) fails the model's own check in "
                       "the model \\(Checked\\) \\(test_trace.py:[0-9]+, in forward\\): "
                       "expected \\(3, 2\\)"):
        import_module(Checked(), (3, 3))


class Layouts(nn.Module):
    """Layout plumbing, learned tensors read directly, layers called as functions."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gamma = nn.Parameter(torch.rand(8, 1, 1) + 0.5)  # layer scale
        self.pos = nn.Parameter(torch.randn(1, 16, 8))  # positional embedding
        self.ln_w, self.ln_b = nn.Parameter(torch.rand(8) + 0.5), nn.Parameter(torch.randn(8))
        self.w, self.b = nn.Parameter(torch.randn(6, 8)), nn.Parameter(torch.randn(6))

    def forward(self, x):
        h = self.gamma * self.conv(x)  # (8, 4, 4)
        t = h.flatten(2).transpose(1, 2) + self.pos  # tokens (16, 8)
        t = F.layer_norm(t, (8,), self.ln_w, self.ln_b, 1e-6)
        a, b = t.chunk(2, dim=-1)  # (16, 4) each
        u = torch.cat([b, a], dim=2).permute(0, 2, 1).unsqueeze(-1)  # (8, 16, 1)
        u = F.pad(u.squeeze(3), (1, 1)).mean(-1, keepdim=True)  # (8, 1)
        v = F.linear(t[:, 1:, :], self.w, self.b)[..., ::2]  # (15, 3)
        return torch.cat([u.view(u.size(0), -1), v.reshape(-1, 15 * (self.b.shape[0] // 2))], 1)


def test_layout_plumbing_and_learned_tensors_import_bit_identical():
    torch.manual_seed(0)
    m = Layouts().eval()
    graph = import_module(m, (3, 4, 4))
    kinds = [graph.node(n).kind for n in graph]
    for kind in ("scale", "offset", "layernorm", "getitem", "permute", "reshape", "pad", "mean",
                 "linear"):
        assert kind in kinds, kind
    x = torch.randn(3, 3, 4, 4)
    with torch.no_grad():
        assert torch.equal(compile_graph(graph).eval()(x), m(x))
    assert graph.param_count() == sum(p.numel() for p in m.parameters())


def test_two_inputs_or_non_tensor_outputs_are_refused():
    class TwoIn(nn.Module):
        def forward(self, x, y):
            return x + y

    class SizeOut(nn.Module):
        def forward(self, x):
            return x.size(0)

    with pytest.raises(UnsupportedModuleError, match="2 inputs"):
        import_module(TwoIn(), (4,))
    with pytest.raises(UnsupportedModuleError, match="not a tensor"):
        import_module(SizeOut(), (4,))


def test_wrong_input_shape_is_a_shape_error_naming_the_node():
    with pytest.raises(ShapeError, match="'_0'"):
        import_module(nn.Sequential(nn.Linear(4, 4)), (5,))


def test_a_library_models_failed_check_names_its_source_line():
    vit = torchvision.models.VisionTransformer(32, 8, 1, 2, 8, 16, num_classes=3).eval()
    with pytest.raises(ShapeError, match="input shape \\(3, 16, 16\\) fails the model's own "
                       "check in the model \\(VisionTransformer\\) \\(vision_transformer.py:"
                       "[0-9]+, in _process_input\\): Wrong image height! Expected 32"):
        import_module(vit, (3, 16, 16))
