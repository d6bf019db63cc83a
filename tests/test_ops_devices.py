"""Graphs hold CPU tensors wherever the caller's tensors live: the importer copies a model's
tensors to the CPU, and operators bring samples and scores to the CPU before using them.

Without a GPU, other dtypes, Python lists, numpy arrays and the meta device stand in for
"not the graph's own kind of tensor"; the CUDA test runs where a GPU is present.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from graphgen import max_rel_error, mlp, outputs, residual
from torch import nn

from growth.errors import OperatorError, UnsupportedModuleError
from growth.graph import NetGraph
from growth.ops import net2deeper, net2wider, prune_units
from growth.trace import import_module


def sample_for(graph: NetGraph, batch: int = 8, dtype: torch.dtype = torch.float32
               ) -> torch.Tensor:
    shape = graph.shape(graph.input_node())
    gen = torch.Generator().manual_seed(3)
    return torch.randn((batch, *shape), generator=gen, dtype=dtype)


def assert_cpu(graph: NetGraph) -> None:
    for key, t in graph.named_tensors().items():
        assert t.device.type == "cpu", f"{key} is on {t.device}"


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                      nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                      nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.5, 1.5)
    return m.eval()


# ---- net2deeper's sample ---------------------------------------------------------------------
def test_batchnorm_statistics_from_a_float64_sample_match_float32() -> None:
    g = residual()
    x32 = sample_for(g)
    deep32 = net2deeper(g, "r1", batchnorm=True, sample=x32).graph
    deep64 = net2deeper(g, "r1", batchnorm=True, sample=x32.double()).graph
    for key, t in deep32.node("r1_deep1_bn").tensors.items():
        t64 = deep64.node("r1_deep1_bn").tensors[key]
        assert t64.dtype == t.dtype and t64.device.type == "cpu", key
        assert torch.allclose(t64.float(), t.float(), atol=1e-5), key
    assert max_rel_error(outputs(g, x32), outputs(deep64, x32)) <= 1e-5


def test_a_meta_sample_is_refused_saying_it_holds_no_values() -> None:
    g = mlp()
    meta = torch.empty(4, 2, device="meta")
    with pytest.raises(OperatorError, match=r"'r1'.*meta device"):
        net2deeper(g, "r1", batchnorm=True, sample=meta)


# ---- prune_units' scores ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["list", "numpy", "float64", "int", "requires_grad"])
def test_scores_of_any_kind_keep_the_same_units(kind: str) -> None:
    g = mlp(hidden=5)
    values = [3.0, 1.0, 4.0, 1.5, 5.0]
    given = {"list": values, "numpy": np.array(values),
             "float64": torch.tensor(values, dtype=torch.float64),
             "int": torch.tensor([3, 1, 4, 2, 5]),
             "requires_grad": torch.tensor(values, requires_grad=True)}[kind]
    result = prune_units(g, "l1", 3, scores=given)
    assert result.record.index_maps["l1.weight"] == {0: [0, 2, 4]}
    assert_cpu(result.graph)


def test_meta_scores_are_refused_saying_they_hold_no_values() -> None:
    with pytest.raises(OperatorError, match=r"'l1'.*meta device"):
        prune_units(mlp(hidden=5), "l1", 2, scores=torch.ones(5, device="meta"))


@pytest.mark.parametrize("scores", [["a", "b", "c", "d", "e"], [[1.0, 2.0], [3.0]],
                                    {"l1": 1.0}])
def test_scores_that_are_not_numbers_are_an_operator_error(scores: object) -> None:
    with pytest.raises(OperatorError, match=r"prune_units\('l1'\): scores"):
        prune_units(mlp(hidden=5), "l1", 2, scores=scores)


def test_scores_of_the_wrong_length_as_a_list() -> None:
    with pytest.raises(OperatorError, match=r"'l1'.*\(5,\)"):
        prune_units(mlp(hidden=5), "l1", 2, scores=[1.0, 2.0])


# ---- the importer ----------------------------------------------------------------------------
def test_imported_tensors_are_private_cpu_leaves() -> None:
    m = small_cnn()
    g = import_module(m, (3, 6, 6))
    assert_cpu(g)
    theirs = {t.data_ptr() for t in m.state_dict().values()}
    for key, t in g.named_tensors().items():
        assert not t.requires_grad and t.grad_fn is None, key
        assert t.data_ptr() not in theirs, key


def test_a_model_on_the_meta_device_is_refused_naming_the_layer() -> None:
    with torch.device("meta"):
        m = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(UnsupportedModuleError, match=r"layer '0' \(Linear\).*meta device"):
        import_module(m, (4,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_model_imports_grows_and_prunes_on_cpu_tensors() -> None:
    cuda = torch.device("cuda")
    m = small_cnn().to(cuda)
    g = import_module(m, (3, 6, 6))
    assert_cpu(g)
    x = sample_for(g)
    with torch.no_grad():
        assert max_rel_error({"out": m(x.to(cuda)).cpu()}, outputs(g, x)) <= 1e-4
    wide = net2wider(g, "_3", 6, noise=0.01, seed=1).graph
    deep = net2deeper(wide, "_4", batchnorm=True, sample=x.to(cuda)).graph
    scores = torch.arange(6, dtype=torch.float32, device=cuda)
    pruned = prune_units(deep, "_3", 4, scores=scores)
    assert pruned.record.index_maps["_3.weight"] == {0: [2, 3, 4, 5]}
    for graph in (wide, deep, pruned.graph):
        assert_cpu(graph)
    # deepening with BN keeps the function in eval mode, with the CUDA sample as with the CPU one
    assert max_rel_error(outputs(wide, x), outputs(deep, x)) <= 1e-4
    on_cpu = net2deeper(wide, "_4", batchnorm=True, sample=x).graph
    for key, t in deep.node("_4_deep1_bn").tensors.items():
        assert torch.allclose(t, on_cpu.node("_4_deep1_bn").tensors[key], atol=1e-5), key
