"""widen_private: units no consumer reads yet. Every head computes the parent's function
(to float summation order) whatever the noise, the new units' consumer columns are 0 and the
originals' undivided, and anchors carried as weights through its record equal the widened
tensors."""

from __future__ import annotations

import pytest
import torch
from graphgen import outputs, randomize, residual
from growth.search_spaces.networks import add_head, mlp, small_cnn

from growth.errors import OperatorError
from growth.ops import get_operator, net2wider, widen_private
from growth.remap import WEIGHT, remap


def _mlp():
    return randomize(add_head(add_head(mlp((6,), [5, 4]), "t0", 3), "t1", 2), 0)


@pytest.mark.parametrize("build,node,width", [
    (_mlp, "fc1", 9),
    (lambda: randomize(add_head(small_cnn((2, 8, 8), [3, 4], fc=(6,)), "t0", 3), 1),
     "conv1", 7),
    (residual, "c0", 6),
])
def test_every_head_keeps_the_parents_function_whatever_the_noise(build, node, width) -> None:
    g = build()
    x = torch.randn(5, *g.shape(g.input_node()), generator=torch.Generator().manual_seed(2))
    out = widen_private(g, node, width, noise=0.5, seed=3)
    before, after = outputs(g, x), outputs(out.graph, x)
    for h in before:  # exact up to summation order (zero columns join the sums)
        assert torch.allclose(before[h], after[h], rtol=0, atol=1e-6), h
    assert out.record.op == "widen_private" and not out.record.divisors


def test_new_units_are_read_by_no_consumer_and_the_originals_undivided() -> None:
    g = _mlp()
    out = widen_private(g, "fc1", 9, noise=0.1, seed=0)
    wide = net2wider(g, "fc1", 9, noise=0.1, seed=0)  # the same copies, read as Net2Wider
    w2 = out.graph.node("fc2").tensors["weight"]
    assert torch.equal(w2[:, :5], g.node("fc2").tensors["weight"])  # originals: undivided
    assert torch.equal(w2[:, 5:], torch.zeros(4, 4))  # new units: nobody reads them
    assert out.record.index_maps["fc2.weight"][1] == [0, 1, 2, 3, 4, -1, -1, -1, -1]
    # the new units' incoming rows are Net2Wider's noisy copies
    assert torch.equal(out.graph.node("fc1").tensors["weight"],
                       wide.graph.node("fc1").tensors["weight"])


def test_anchors_carried_as_weights_equal_the_widened_tensors() -> None:
    g = _mlp()
    out = widen_private(g, "fc1", 8, seed=5)
    for name, t in g.named_tensors().items():
        assert torch.equal(remap(t, name, out.record, WEIGHT), out.graph.named_tensors()[name])


def test_it_is_registered_and_refuses_what_net2wider_refuses() -> None:
    g = _mlp()
    assert get_operator("widen_private")(g, "fc1", 6).record.op == "widen_private"
    assert widen_private(g, "fc1", 5).record.is_noop
    with pytest.raises(OperatorError, match="below the current width"):
        widen_private(g, "fc1", 3)
