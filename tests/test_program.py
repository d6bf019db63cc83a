"""Program nodes as data: they save, load and checkpoint with their tensors (index buffers and
constant masks included), run in the precision and on the device the graph is compiled to,
and a structure naming anything outside the function table is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from graphgen import single_thread  # noqa: F401 (fixture)
from torch import nn

from growth.checkpoint import CampaignState, read_checkpoint, write_checkpoint
from growth.compile import compile_graph
from growth.errors import CheckpointError, GraphError
from growth.graph import NetGraph
from growth.metrics import RMatrix
from growth.strategies import make_strategy
from growth.trace import import_module

pytestmark = pytest.mark.usefixtures("single_thread")


class RelativeBias(nn.Module):
    """Attention over 4 tokens with a learned bias gathered by an index buffer (Swin's
    relative positions), a constant mask of -inf, and a cast to float as models write it."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(6, 18)
        self.table = nn.Parameter(torch.randn(7, 2))
        self.register_buffer("index", torch.tensor([[3, 2, 1, 0], [4, 3, 2, 1], [5, 4, 3, 2],
                                                    [6, 5, 4, 3]]))
        mask = torch.zeros(4, 4)
        mask[0, 3] = float("-inf")
        self.register_buffer("mask", mask)
        self.proj = nn.Linear(6, 6)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 2, 3).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.table[self.index].permute(2, 0, 1) + self.mask
        attn = (q.float() @ k.transpose(-2, -1) * 3 ** -0.5 + bias).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


def imported() -> tuple[nn.Module, NetGraph]:
    torch.manual_seed(0)
    model = RelativeBias().eval()
    return model, import_module(model, (4, 6))


def programs(graph: NetGraph) -> list[str]:
    return [n for n in graph if graph.node(n).kind == "program"]


def test_a_program_holds_its_parameters_index_buffers_and_constants() -> None:
    model, graph = imported()
    held = {k: v for n in programs(graph) for k, v in graph.node(n).tensors.items()}
    specs = {k: v for n in programs(graph) for k, v in graph.node(n).attrs["held"].items()}
    assert any(torch.equal(t, model.index) for t in held.values())
    assert any(spec["dtype"] == "int64" and spec["buffer"] for spec in specs.values())
    assert any(torch.equal(t, model.table.detach()) and not specs[k]["buffer"]
               for k, t in held.items())
    assert graph.param_count() == sum(p.numel() for p in model.parameters())
    x = torch.randn(3, 4, 6)
    with torch.no_grad():
        assert torch.equal(compile_graph(graph).eval()(x), model(x))


def test_programs_save_load_and_checkpoint(tmp_path: Path) -> None:
    model, graph = imported()
    x = torch.randn(3, 4, 6)
    back = NetGraph.load(graph.save(tmp_path / "g"))
    with torch.no_grad():
        assert torch.equal(compile_graph(back).eval()(x), model(x))
    strategy = make_strategy("finetune", {})
    r = RMatrix(1)
    r.record(0, 0, 0.1)  # R[0]: before any task
    r.record(1, 0, 0.5)
    state = CampaignState(r, sizes=[{"task": 0}], wall_time_s=[1.0],
                          base_params=graph.param_count(), peak_rss_bytes=[None])
    ckpt = write_checkpoint(tmp_path / "run", 0, graph, strategy, state, "r1").path
    restored = read_checkpoint(ckpt, "r1", 1, strategy).graph  # integer buffers, -inf masks
    with torch.no_grad():
        assert torch.equal(compile_graph(restored).eval()(x), model(x))


def test_a_program_runs_in_the_graphs_precision() -> None:
    model, graph = imported()
    x = torch.randn(3, 4, 6)
    with torch.no_grad():  # q.float() casts to the network's precision, here float64
        got = compile_graph(graph).double().eval()(x.double())
        want = model(x)  # the model itself runs in float32 only
    assert got.dtype == torch.float64
    assert float((got - want).abs().max()) < 1e-5


@pytest.mark.parametrize("call,match", [
    ({"fn": "torch.save", "args": [{"input": 0}, "/tmp/x"]}, "does not name a function"),
    ({"fn": "builtins.eval", "args": ["1"]}, "does not name a function"),
    ({"fn": "Tensor.numpy", "args": [{"input": 0}]}, "does not name a function"),
    ({"fn": "getattr", "args": [{"input": 0}, "__class__"]}, None),  # refused when run
    ({"fn": "Tensor.add", "args": [{"input": 0}, {"object": "os.system"}]}, "can hold"),
])
def test_a_structure_naming_anything_else_is_refused(tmp_path: Path, call: dict,
                                                     match: str | None) -> None:
    attrs = {"calls": [call], "held": {}, "in_shapes": [[4]], "shape": [4]}
    if match is None:  # a valid call whose argument is checked when it runs
        g = NetGraph()
        g.add_input("x", (4,))
        g.add("p", "program", ["x"], **attrs)
        g.add_output("out", "p")
        loaded = NetGraph.load(g.save(tmp_path / "g"))
        with pytest.raises(GraphError, match="not '__class__'"):
            compile_graph(loaded)(torch.randn(2, 4))
        return
    g = NetGraph()
    g.add_input("x", (4,))
    with pytest.raises(GraphError, match=match):  # built as the graph is
        g.add("p", "program", ["x"], **attrs)
    data = {"format": "growth.netgraph", "version": 1, "nodes": [
        {"name": "x", "kind": "input", "inputs": [], "attrs": {"shape": [4]}},
        {"name": "p", "kind": "program", "inputs": ["x"], "attrs": attrs},
        {"name": "out", "kind": "output", "inputs": ["p"], "attrs": {}}]}
    folder = tmp_path / "h"
    folder.mkdir()
    (folder / "structure.json").write_text(json.dumps(data))
    from safetensors.torch import save_file

    save_file({}, str(folder / "weights.safetensors"))
    with pytest.raises(CheckpointError, match=match):  # a saved structure, read as data
        NetGraph.load(folder)


def test_functional_calls_become_nodes_or_programs_by_what_they_compute() -> None:
    class Mixed(nn.Module):
        def forward(self, x):
            y = F.hardswish(F.layer_norm(x, (6,)))  # kinds
            return y * 0.5 + F.softmax(y, dim=-1)  # an elementwise program, a softmax program

    graph = import_module(Mixed(), (4, 6))
    kinds = [graph.node(n).kind for n in graph][1:-1]
    assert kinds[:2] == ["layernorm", "hardswish"] and kinds.count("program") >= 1
    scaled = [n for n in programs(graph) if graph.node(n).attrs["elementwise"]]
    assert scaled  # y * 0.5 maps every value on its own: channels pass through it
