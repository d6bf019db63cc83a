"""torchvision architectures as base networks: import by name, local weights, heads at
"features", inputs with other channel counts, and the `model: kind: torchvision` config key."""

from __future__ import annotations

import pytest
import torch
import torchvision
from graphgen import single_thread  # noqa: F401 (fixture)
from growth.search_spaces.networks import FEATURES, add_head
from growth.search_spaces.zoo import torchvision_trunk

from growth.campaign import Campaign
from growth.compile import compile_graph
from growth.config import load_config
from growth.errors import ConfigError, GraphError

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, str]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    with torch.no_grad():  # non-trivial BN statistics, so a wrong load would show
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    return model, str(path)


def with_classifier(trunk, model: torch.nn.Module):
    """The trunk with the original classifier as its head: must compute the original model."""
    g = add_head(trunk, "t0", model.fc.out_features)
    node = g.node("head_t0")
    node.tensors = {"weight": model.fc.weight.detach().clone(),
                    "bias": model.fc.bias.detach().clone()}
    return g


def test_local_weights_give_the_original_network(resnet_file) -> None:
    model, path = resnet_file
    trunk = torchvision_trunk("resnet18", (3, 32, 32), path)
    assert trunk.inputs(FEATURES) == ["flatten"] and trunk.heads == []
    assert "fc" not in trunk
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
        got = compile_graph(with_classifier(trunk, model)).eval()(x)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)


def test_fresh_weights_without_a_file_differ_from_the_file(resnet_file) -> None:
    model, path = resnet_file
    torch.manual_seed(5)
    fresh = torchvision_trunk("resnet18", (3, 32, 32))
    loaded = torchvision_trunk("resnet18", (3, 32, 32), path)
    assert not torch.equal(fresh.node("conv1").tensors["weight"],
                           loaded.node("conv1").tensors["weight"])


def test_one_channel_inputs_see_what_rgb_sees_of_a_grey_image(resnet_file) -> None:
    model, path = resnet_file
    grey = torchvision_trunk("resnet18", (1, 16, 16), path)
    assert grey.shape(grey.input_node()) == (1, 16, 16)
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(x.repeat(1, 3, 1, 1))
        got = compile_graph(with_classifier(grey, model)).eval()(x)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)


def test_a_weights_file_that_does_not_fit_is_a_config_error(resnet_file, tmp_path) -> None:
    model, _ = resnet_file
    state = dict(model.state_dict())
    state.pop("layer1.0.conv1.weight")
    state["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(ConfigError, match=r"does not fit resnet18: missing \['layer1.0.conv1"
                       r".weight'\]; unexpected \['extra.weight'\]"):
        torchvision_trunk("resnet18", (3, 32, 32), bad)
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="cannot read"):
        torchvision_trunk("resnet18", (3, 32, 32), tmp_path / "junk.pth")


def test_an_architecture_without_a_linear_classifier_is_refused() -> None:
    with pytest.raises(GraphError, match="^squeezenet1_1 ends in .* not a linear classifier"):
        torchvision_trunk("squeezenet1_1", (3, 64, 64))


def test_config_key_builds_a_campaign_with_per_task_heads(tmp_path) -> None:
    cfg_path = tmp_path / "tv.yaml"
    cfg_path.write_text("data: {dataset: digits, stream: split, n_tasks: 2}\n"
                        "model: {kind: torchvision, arch: resnet18}\n"
                        "train: {epochs: 0}\n")
    campaign = Campaign(load_config(cfg_path), tmp_path / "run")
    g = campaign.base
    assert g.heads == ["t0", "t1"] and g.inputs("head_t0") == [FEATURES]
    assert g.shape(g.input_node()) == (1, 8, 8)
    assert g.node("head_t0").attrs["out_features"] == 5


@pytest.mark.parametrize("model, words", [
    ("{kind: torchvision}", "needs model.arch"),
    ("{kind: torchvision, arch: resnet19}", "'resnet19' is not a torchvision"),
    ("{kind: torchvision, arch: resnet18, hidden: [4]}", "model.hidden: applies only to"),
    ("{kind: mlp, arch: resnet18}", "model.arch: applies only to model.kind: torchvision"),
])
def test_model_keys_are_validated(tmp_path, model: str, words: str) -> None:
    cfg_path = tmp_path / "tv.yaml"
    cfg_path.write_text("data: {dataset: digits}\n")
    with pytest.raises(ConfigError, match="model") as err:
        load_config(cfg_path, [f"model={model}"])
    assert words in str(err.value)


def test_only_a_plain_first_convolution_is_adapted_to_other_channels() -> None:
    """A network whose input feeds anything but an ungrouped convolution (here a flatten
    before a linear layer) cannot take another channel count: refused, naming the node."""
    from growth.search_spaces.networks import mlp
    from growth.search_spaces.zoo import _adapt_input

    with pytest.raises(GraphError, match="cannot adapt 'flatten' \\(flatten\\) to 1 input"):
        _adapt_input(mlp((3, 4, 4), [5]), 1)


def test_an_unknown_architecture_names_at_most_eight_similar_ones() -> None:
    """'resnet' is no architecture; ten names share its first four letters ('resn'): the
    error lists the first eight of torchvision's classification models among them."""
    from growth.search_spaces.zoo import build_model

    similar = [n for n in torchvision.models.list_models(module=torchvision.models)
               if "resn" in n]
    assert len(similar) > 8
    with pytest.raises(ConfigError, match="'resnet' is not") as err:
        build_model("resnet")
    assert f"similar: {similar[:8]};" in str(err.value)


def test_a_mismatch_lists_four_keys_then_an_ellipsis_only_for_more(tmp_path) -> None:
    """A weights file that does not fit names the first four keys of each kind; " ..." says
    that more were left out, so it follows five keys and not four."""
    from growth.search_spaces.zoo import load_weights

    model = torch.nn.Sequential(*[torch.nn.Linear(1, 1) for _ in range(3)])  # 6 keys
    state = {k: v for k, v in model.state_dict().items() if k.startswith("2.")}
    state.update({f"x{i}": torch.zeros(1) for i in range(5)})
    path = tmp_path / "w.pth"
    torch.save(state, path)
    with pytest.raises(ConfigError, match=r"missing \['0.bias', '0.weight', '1.bias', "
                       r"'1.weight'\]; unexpected \['x0', 'x1', 'x2', 'x3'\] \.\.\.$"):
        load_weights(model, path, "tiny")



def test_a_users_module_becomes_a_trunk_whose_features_are_its_output() -> None:
    """`module_trunk` imports a module and ends it at an identity "features" node that reads
    the module's last layer (its output is the features the heads read)."""
    from growth.search_spaces.zoo import module_trunk

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    g = module_trunk(net, (4,))
    assert g.node(FEATURES).kind == "identity"
    [source] = g.inputs(FEATURES)
    assert torch.equal(g.node(source).tensors["weight"], net[2].weight.detach())
    assert add_head(g, "t0", 5).shape(FEATURES) == (2,)


def test_a_users_classifier_is_cut_and_the_features_read_the_layer_before_it() -> None:
    """`output="classifier"`: the module's last linear layer is the classifier the heads
    replace, so the trunk ends at the ReLU before it (3 features), without that layer."""
    from growth.search_spaces.zoo import module_trunk

    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    g = module_trunk(net, (4,), output="classifier", name="my_net")
    [source] = g.inputs(FEATURES)
    assert g.node(source).kind == "relu" and g.shape(FEATURES) == (3,)
    assert [n for n in g.topo_order() if g.node(n).kind == "linear"] == [g.inputs(source)[0]]
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = compile_graph(add_head(g, "t0", 2)).eval()(x)  # a fresh head on 3 features
        assert got.shape == (5, 2)
    with pytest.raises(GraphError, match="^my_net ends in"):  # the name given, in the error
        module_trunk(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()), (4,),
                     output="classifier", name="my_net")


def _tiny_state() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    return model, {k: torch.randn(v.shape) for k, v in model.state_dict().items()}


def test_weights_load_from_safetensors_and_from_a_data_parallel_state_dict(tmp_path) -> None:
    """A .safetensors file, and a torch file saved from nn.DataParallel (every key under
    "module."), both load the file's tensors into the model."""
    from growth.search_spaces.zoo import load_weights
    from safetensors.torch import save_file

    model, state = _tiny_state()
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "dp.pt")
    for name in ("w.safetensors", "dp.pt"):
        fresh, _ = _tiny_state()
        load_weights(fresh, tmp_path / name, "tiny")
        for k, v in fresh.state_dict().items():
            assert torch.equal(v, state[k]), (name, k)


class _Planted:
    """A pickled object whose unpickling runs code: a weights file must never run it."""

    def __reduce__(self):
        return (_mark_ran, ())


_RAN: list[int] = []


def _mark_ran() -> int:
    _RAN.append(1)
    return 0


def test_a_weights_file_holding_code_is_refused_without_running_it(tmp_path, monkeypatch
                                                                    ) -> None:
    """Loading asks torch for tensors only, even where torch.load's default would unpickle
    anything (torch < 2.6, or TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD set)."""
    from growth.search_spaces.zoo import load_weights

    model, state = _tiny_state()
    torch.save({**state, "extra": _Planted()}, tmp_path / "w.pt")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(ConfigError, match="cannot read"):
        load_weights(model, tmp_path / "w.pt", "tiny")
    assert _RAN == []


def test_an_unknown_architecture_like_no_other_gets_no_hint() -> None:
    from growth.search_spaces.zoo import build_model

    with pytest.raises(ConfigError, match=r"'qqqq' is not a torchvision classification "
                       r"architecture; see torchvision"):
        build_model("qqqq")


def test_a_corrupt_safetensors_file_is_read_as_safetensors_and_named(tmp_path) -> None:
    """A `.safetensors` file goes to the safetensors reader (torch.load reads one only in recent
    torch), whose refusal of a corrupt file says what the file should be."""
    from growth.search_spaces.zoo import load_weights

    model, _ = _tiny_state()
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(ConfigError, match=r"cannot read .*w\.safetensors: CheckpointError: "
                       r".* is corrupt or not a safetensors file"):
        load_weights(model, path, "tiny")


def _as_saved_on_a_gpu(src, dst) -> None:
    """Copy torch file `src` to `dst` with every storage's location rewritten from "cpu" to
    "cuda:0", as torch.save writes tensors that lived on a GPU."""
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("data.pkl"):
                # the pickle writes "cpu" once; the other storages refer back to it
                assert data.count(b"X\x03\x00\x00\x00cpu") == 1
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            zout.writestr(info, data)


def test_weights_saved_on_a_gpu_load_on_a_machine_without_one(tmp_path, monkeypatch) -> None:
    """A state dict saved from GPU tensors is mapped to the CPU when read (torch.load without
    `map_location` would try to put it on a CUDA device, which the machine lacks; torch is
    told there is none, whatever this machine has)."""
    from growth.search_spaces.zoo import load_weights

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model, state = _tiny_state()
    torch.save(state, tmp_path / "cpu.pt")
    _as_saved_on_a_gpu(tmp_path / "cpu.pt", tmp_path / "gpu.pt")
    with pytest.raises(RuntimeError, match="CUDA"):  # the file really names a GPU
        torch.load(tmp_path / "gpu.pt", weights_only=True)
    load_weights(model, tmp_path / "gpu.pt", "tiny")
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("content", [[torch.zeros(1)], {"0.weight": 1.0}],
                         ids=["a list", "a number"])
def test_a_file_without_a_state_dict_of_tensors_is_refused(tmp_path, content) -> None:
    from growth.search_spaces.zoo import load_weights

    model, _ = _tiny_state()
    torch.save(content, tmp_path / "w.pt")
    with pytest.raises(ConfigError, match=r"w\.pt does not hold a state dict of tensors$"):
        load_weights(model, tmp_path / "w.pt", "tiny")


def test_a_tensor_of_the_wrong_shape_alone_is_named(tmp_path) -> None:
    """Every key present, one tensor of another shape: a ConfigError naming that key (not
    torch's size-mismatch error from load_state_dict), and the model left as it was."""
    from growth.search_spaces.zoo import load_weights

    model, state = _tiny_state()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state["1.weight"] = torch.zeros(1, 4)
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(ConfigError, match=r"w\.pt does not fit tiny: wrong shape "
                       r"\['1\.weight'\]$"):
        load_weights(model, tmp_path / "w.pt", "tiny")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_grouped_first_convolution_is_not_adapted_to_other_channels() -> None:
    """A depthwise first convolution (groups=3) cannot sum its filters over RGB: refused."""
    from growth.search_spaces.zoo import _adapt_input

    from growth.trace import import_module

    graph = import_module(torch.nn.Conv2d(3, 6, 3, groups=3).eval(), (3, 5, 5))
    [conv] = [n for n in graph.topo_order() if graph.node(n).kind == "conv2d"]
    with pytest.raises(GraphError, match=f"cannot adapt '{conv}' \\(conv2d\\) to 1 input"):
        _adapt_input(graph, 1)


def test_two_channel_inputs_see_what_rgb_sees_of_a_grey_image() -> None:
    """Adapted to 2 channels, each filter is its RGB sum halved and repeated: an input whose two
    channels both hold g gives what the RGB network gives on g repeated three times."""
    from growth.search_spaces.zoo import _adapt_input

    from growth.trace import import_module

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3).eval()
    graph = _adapt_input(import_module(conv, (3, 5, 5)), 2)
    assert graph.shape(graph.input_node()) == (2, 5, 5)
    g = torch.rand(2, 1, 5, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = conv(g.repeat(1, 3, 1, 1))
        got = compile_graph(graph).eval()(g.repeat(1, 2, 1, 1))
    assert torch.allclose(got, want, atol=1e-6)


def test_a_users_factory_that_returns_no_module_is_named_the_model_by_default() -> None:
    from growth.search_spaces.zoo import module_trunk

    with pytest.raises(ConfigError, match="^the model returned str, not a torch.nn.Module"):
        module_trunk("not a module", (4,))


@pytest.mark.parametrize("change, words", [
    (lambda state: state.pop("1.bias"), r"missing \['1\.bias'\]"),
    (lambda state: state.update(extra=torch.zeros(1)), r"unexpected \['extra'\]"),
], ids=["a key missing", "a key too many"])
def test_one_kind_of_mismatch_alone_is_named(tmp_path, change, words: str) -> None:
    """Only a key missing, or only one too many: a ConfigError naming it, not torch's
    load_state_dict error."""
    from growth.search_spaces.zoo import load_weights

    model, state = _tiny_state()
    change(state)
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(ConfigError, match=f"w\\.pt does not fit tiny: {words}$"):
        load_weights(model, tmp_path / "w.pt", "tiny")


def test_the_hint_for_an_unknown_architecture_reads_its_first_four_letters() -> None:
    """'ResNXt' shares its first four letters, lower-cased, with the resnet family (and only
    'resnx', its first five, with none): the hint names the first eight of those."""
    from growth.search_spaces.zoo import build_model

    similar = [n for n in torchvision.models.list_models(module=torchvision.models)
               if "resn" in n]
    with pytest.raises(ConfigError, match="'ResNXt' is not") as err:
        build_model("ResNXt")
    assert f"similar: {similar[:8]};" in str(err.value)
