"""Users' own models and data: `model: {kind: python, factory, args, output}` and
`data: {dataset: python, factory, args}`, through config load and the campaign."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from growth.campaign import Campaign, build_base_graph
from growth.compile import compile_graph
from growth.config import validate_config
from growth.data import build_stream
from growth.errors import ConfigError, DataError
from growth.model import Model

MODELS = textwrap.dedent('''
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self, width, classes=10):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
                                      nn.MaxPool2d(2), nn.Flatten(),
                                      nn.Linear(width * 16, 24), nn.ReLU())
            self.classifier = nn.Linear(24, classes)

        def forward(self, x):
            return self.classifier(self.body(x))


    def build(width=4):
        return Net(width)


    def body(width=4):
        return Net(width).body


    def not_a_module():
        return "a string"
''')

DATA = textwrap.dedent('''
    import numpy as np
    import torch
    from torch.utils.data import TensorDataset


    def tasks(n=30, tasks=3):
        """Tasks of 2 classes: arrays for task 0, torch Datasets for the others."""
        rng = np.random.default_rng(0)
        out = []
        for i in range(tasks):
            x = rng.normal(size=(n, 5)).astype("float32") + i
            y = np.arange(n) % 2
            if i == 0:
                out.append({"train": (x, y), "test": (x[:10], y[:10]), "name": "arrays"})
            else:
                ds = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
                out.append({"train": ds, "test": ds, "val": (x[:4], y[:4])})
        return out


    def bad_labels():
        return [{"train": (np.zeros((4, 3)), np.full(4, 0.5)), "test": (np.zeros((2, 3)),
                                                                       np.zeros(2))}]


    def two_shapes():
        y4, y2 = np.zeros(4, int), np.zeros(2, int)
        return [{"train": (np.zeros((4, 3)), y4), "test": (np.zeros((2, 3)), y2)},
                {"train": (np.zeros((4, 2)), y4), "test": (np.zeros((2, 2)), y2)}]
''')


@pytest.fixture
def user_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "my_models.py").write_text(MODELS)
    (tmp_path / "my_data.py").write_text(DATA)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the import fallback appends the cwd
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith(("my_models", "my_data", "growth_user_"))]:
        del sys.modules[name]


def _cfg(**sections) -> object:
    return validate_config({"threads": 1, "data": {"max_train_per_task": 120, "n_tasks": 2},
                            "train": {"epochs": 1}, **sections}, "user.yaml")


@pytest.mark.parametrize("factory", ["my_models.py:build", "my_models:build"])
def test_a_users_classifier_becomes_the_trunk_its_linear_layer_replaced(user_dir: Path,
                                                                       factory: str) -> None:
    cfg = _cfg(model={"kind": "python", "factory": factory, "args": {"width": 6},
                      "output": "classifier"})
    campaign = Campaign(cfg, user_dir / "run")
    graph = campaign.base
    assert graph.heads == ["t0", "t1"] and graph.shape("t0") == (10,)
    assert graph.shape("features") == (24,)  # the classifier's input, not its 10 outputs
    from growth.plugins import load_factory

    torch.manual_seed(cfg.seed)  # the same module, built with the campaign's seed
    net = load_factory(factory, "test")(width=6).eval()
    x = campaign.tasks[0].test[0][:16]
    with torch.no_grad():
        got = Model(graph).eval().node_view("features")(x)
        torch.testing.assert_close(got, net.body(x), rtol=0, atol=0)  # bit-identical


def test_a_users_feature_extractor_feeds_the_heads_directly(user_dir: Path) -> None:
    cfg = _cfg(scenario="domain", model={"kind": "python", "factory": "my_models.py:body"})
    graph = build_base_graph(cfg, Campaign(cfg, user_dir / "run").tasks)
    assert graph.heads == ["all"] and graph.shape("features") == (24,)


@pytest.mark.parametrize("model,message", [
    ({"kind": "python"}, "needs model.factory"),
    ({"kind": "python", "factory": "nowhere_at_all:build"}, "cannot import 'nowhere_at_all'"),
    ({"kind": "python", "factory": "my_models:missing"}, "has no function 'missing'"),
    ({"kind": "python", "factory": "missing.py:build"}, "missing.py is not a file"),
    ({"kind": "python", "factory": "build"}, "should match pattern"),
    ({"kind": "mlp", "factory": "my_models:build"}, "applies only to model.kind: python"),
])
def test_a_model_factory_that_cannot_be_used_is_a_config_error(user_dir: Path, model: dict,
                                                                message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        _cfg(model=model)
    assert "user.yaml" in str(err.value)


@pytest.mark.parametrize("factory,args,message", [
    ("my_models:not_a_module", {}, "returned str, not a torch.nn.Module"),
    ("my_models:build", {"depth": 3}, r"my_models:build\(\*\*model.args\) failed: TypeError"),
])
def test_a_model_factory_that_fails_names_the_call(user_dir: Path, factory: str, args: dict,
                                                   message: str) -> None:
    cfg = _cfg(model={"kind": "python", "factory": factory, "args": args})
    with pytest.raises(ConfigError, match=message):
        Campaign(cfg, user_dir / "run")


def test_a_users_stream_is_checked_carved_and_offset(user_dir: Path) -> None:
    cfg = _cfg(data={"dataset": "python", "factory": "my_data:tasks", "args": {"n": 40},
                     "val_fraction": 0.25})
    tasks = build_stream({**cfg.data.model_dump(), "seed": 0})
    assert len(tasks) == 3  # n_tasks is not set here: every task the function returns
    first, second = tasks[0], tasks[1]
    assert first.name == "arrays" and second.name == "task-1"
    assert (len(first.train[1]), len(first.val[1]), len(first.test[1])) == (30, 10, 10)
    assert first.val[1].tolist().count(0) == 5  # stratified: half of each class held out
    assert (len(second.train[1]), len(second.val[1])) == (40, 4)  # its own val kept
    assert [t.class_offset for t in tasks] == [0, 2, 4] and first.n_classes == 2
    assert first.train[0].dtype == torch.float32 and first.train[1].dtype == torch.int64
    train_rows = {tuple(r) for r in first.train[0].tolist()}
    assert not train_rows & {tuple(r) for r in first.val[0].tolist()}  # disjoint


def test_a_campaign_runs_on_a_users_model_and_stream(user_dir: Path) -> None:
    cfg = _cfg(scenario="class", data={"dataset": "python", "factory": "my_data.py:tasks",
                                       "n_tasks": 2},
               model={"kind": "mlp", "hidden": [8]}, strategy={"name": "ewc"})
    metrics = Campaign(cfg, user_dir / "run").start()
    assert metrics["finished_tasks"] == 2 and len(metrics["R"]) == 3
    assert metrics["run"]["dataset"] == "python"


@pytest.mark.parametrize("factory,message", [
    ("my_data:bad_labels", "labels must be integers"),
    ("my_data:two_shapes", r"task 1 has inputs of shape \(2,\), task 0 \(3,\)"),
])
def test_a_stream_that_cannot_be_used_is_a_data_error(user_dir: Path, factory: str,
                                                      message: str) -> None:
    cfg = _cfg(data={"dataset": "python", "factory": factory})
    with pytest.raises(DataError, match=rf"user.yaml: data: data.factory: .*{message}"):
        Campaign(cfg, user_dir / "run")


def test_more_tasks_than_the_function_gives_is_a_data_error(user_dir: Path) -> None:
    cfg = _cfg(data={"dataset": "python", "factory": "my_data:tasks", "n_tasks": 5})
    with pytest.raises(DataError, match="n_tasks=5 but data.factory returned 3 tasks"):
        Campaign(cfg, user_dir / "run")


def test_numpy_and_tensor_inputs_give_the_same_tasks(user_dir: Path) -> None:
    from growth.data.custom import custom_stream

    x, y = np.random.default_rng(1).normal(size=(20, 3)), np.arange(20) % 4
    a = custom_stream(lambda: [{"train": (x, y), "test": (x, y)}], {})
    b = custom_stream(lambda: [{"train": (torch.tensor(x), torch.tensor(y)),
                                "test": (x, y)}], {})
    assert torch.equal(a[0].train[0], b[0].train[0]) and a[0].n_classes == 4


def test_a_timm_vit_from_the_config_becomes_the_trunk_and_grows_exactly(tmp_path: Path
                                                                         ) -> None:
    """`factory: timm:create_model`: a library's model by name, its classifier replaced by
    the heads; its features are timm's own, and the transformer moves keep the function."""
    timm = pytest.importorskip("timm")
    from growth.ops import add_block, add_heads, attention_nodes, blockable, net2wider

    args = {"model_name": "test_vit", "pretrained": False, "num_classes": 10, "img_size": 8,
            "patch_size": 4, "in_chans": 1}
    cfg = _cfg(model={"kind": "python", "factory": "timm:create_model", "args": args,
                      "output": "classifier"})
    campaign = Campaign(cfg, tmp_path / "run")  # the stream and the base network
    graph = campaign.base
    assert campaign.tasks[0].input_shape == (1, 8, 8) and graph.heads == ["t0", "t1"]
    torch.manual_seed(cfg.seed)  # the same module, built with the campaign's seed
    net = timm.create_model(**args).eval()
    x = campaign.tasks[0].test[0][:16]
    features = Model(graph).eval().node_view("features")
    with torch.no_grad():
        want = net.forward_head(net.forward_features(x), pre_logits=True)
        torch.testing.assert_close(features(x), want, rtol=0, atol=0)  # bit-identical
        attn = attention_nodes(graph)
        assert len(attn) == len(net.blocks)  # each block's attention, a growable node
        g = net2wider(graph, "patch_embed_proj", 2 * net.embed_dim).graph
        g = add_heads(g, attn[1], graph.node(attn[1]).attrs["num_heads"] + 1, seed=1).graph
        g = add_block(g, blockable(g)[0], seed=2).graph
        for head in graph.heads:  # every head computes what it computed
            old = compile_graph(graph, head=head).eval()(x)
            new = compile_graph(g, head=head).eval()(x)
            assert float((new - old).abs().max()) <= 1e-5 * float(old.abs().max())
    assert g.param_count() > graph.param_count()
