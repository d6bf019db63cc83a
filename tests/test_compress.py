"""Compression: the layer-removal operator, the student's structure and size, distillation, and
`growth compress` on a saved network."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from graphgen import outputs, randomize, single_thread  # noqa: F401 (fixture)
from growth.search_spaces.networks import add_head, mlp, small_cnn

from growth.cli import main
from growth.compress import (
    CompressParams,
    budget_params,
    compress,
    distill,
    shrink,
    trunk_params,
)
from growth.data import build_stream
from growth.distillation import Distillation
from growth.errors import OperatorError
from growth.graph import NetGraph
from growth.model import Model
from growth.ops import get_operator, net2deeper, net2wider, prune_units, remove_layer
from growth.strategies import Context
from growth.train import TrainConfig, evaluate, fit

pytestmark = pytest.mark.usefixtures("single_thread")


def two_heads(trunk: NetGraph, classes: int = 10) -> NetGraph:
    return add_head(add_head(trunk, "t0", classes), "t1", classes)


def x_for(graph: NetGraph, batch: int = 8) -> torch.Tensor:
    shape = graph.shape(graph.input_node())
    return torch.randn((batch, *shape), generator=torch.Generator().manual_seed(3))


# ---- remove_layer ----------------------------------------------------------------------------
def test_removing_identity_insertions_gives_back_the_network_exactly() -> None:
    torch.manual_seed(0)
    base = randomize(two_heads(small_cnn((3, 8, 8), [4, 6], batchnorm=True)), 1)
    x = x_for(base)
    grown = net2deeper(base, "act1", kernel_size=3, batchnorm=True, sample=x).graph
    grown = net2deeper(grown, "features").graph  # linear identity on the feature vector
    added = [n for n in grown.topo_order() if n not in base]
    assert added == ["act1_deep1", "act1_deep1_bn", "act1_deep1_relu", "features_deep1",
                     "features_deep1_relu"]
    g = grown
    for n in reversed(added):  # any order works; reversed checks rewiring through later nodes
        g = remove_layer(g, n).graph
    assert g.to_dict() == base.to_dict()
    assert g.named_tensors().keys() == base.named_tensors().keys()
    assert all(torch.equal(a, base.named_tensors()[k]) for k, a in g.named_tensors().items())
    before, after = outputs(base, x), outputs(g, x)
    assert all(torch.equal(before[h], after[h]) for h in before)


def test_removal_record_names_the_layer_and_its_tensors() -> None:
    base = two_heads(mlp((6,), [5]))
    grown = net2deeper(base, "act1").graph
    result = get_operator("remove_layer")(grown, "act1_deep1")
    rec = result.record
    assert rec.op == "remove_layer" and rec.params == {"node": "act1_deep1"}
    assert rec.removed == ["act1_deep1.weight", "act1_deep1.bias"]
    assert rec.removed_nodes == ["act1_deep1"] and not rec.resized and not rec.added
    assert result.graph.inputs("act1_deep1_relu") == ["act1"]
    assert "act1_deep1" in grown  # the operator's input graph is untouched


def test_removing_a_trained_layer_changes_the_function() -> None:
    base = randomize(two_heads(mlp((6,), [5, 5])), 2)
    result = remove_layer(base, "act1")  # a relu: shape-preserving, but not the identity
    x = x_for(base)
    assert not torch.allclose(outputs(base, x)["t0"], outputs(result.graph, x)["t0"])


@pytest.mark.parametrize("node, words", [
    ("fc2", "output shape (4,) differs from its input's ('act1', (5,))"),
    ("flatten", "differs from its input's"),
    ("x", "input nodes cannot be removed"),
    ("t0", "output nodes cannot be removed"),
])
def test_removal_refuses_what_would_change_shapes(node: str, words: str) -> None:
    g = two_heads(mlp((1, 2, 3), [5, 4]))
    with pytest.raises(OperatorError, match=r"remove_layer\(") as err:
        remove_layer(g, node)
    assert words in str(err.value)


def test_removal_refuses_a_node_with_two_inputs() -> None:
    g = NetGraph()
    g.add_input("x", (4,))
    g.add("a", "linear", ["x"], out_features=4)
    g.add("s", "add", ["a", "x"])
    g.add_output("out", "s")
    with pytest.raises(OperatorError, match="reads 2 inputs"):
        remove_layer(g, "s")


# ---- the student's structure and size ----------------------------------------------------------
def grown_mlp(seed: int = 0) -> tuple[NetGraph, NetGraph]:
    torch.manual_seed(seed)
    base = randomize(two_heads(mlp((1, 8, 8), [12, 10])), seed)
    g = net2wider(base, "fc1", 20, noise=0.05, seed=1).graph
    g = net2deeper(g, "act1").graph
    g = net2wider(g, "fc2", 16, noise=0.05, seed=2).graph
    g = net2deeper(g, "features").graph
    return base, g


def test_budget_is_a_count_or_a_fraction_of_the_base_trunk() -> None:
    base, _ = grown_mlp()
    trunk = 64 * 12 + 12 + 12 * 10 + 10  # fc1 and fc2 (the heads are not trunk)
    assert trunk_params(base) == trunk
    assert budget_params(None, base) == trunk
    assert budget_params(0.5, base) == math.floor(0.5 * trunk)
    assert budget_params(700, base) == 700


def test_student_at_the_base_budget_is_the_base_architecture() -> None:
    base, grown = grown_mlp()
    student, records, widths = shrink(grown, trunk_params(base), base)
    assert student.to_dict() == base.to_dict()
    assert trunk_params(student) == trunk_params(base)
    assert widths == {"fc1": 12, "fc2": 10}
    assert [(r.op, r.params["node"]) for r in records] == [
        ("prune_units", "fc1"), ("prune_units", "fc2"),  # original layers, to base widths
        ("prune_units", "act1_deep1"), ("prune_units", "features_deep1"),  # to their inputs
        ("remove_layer", "act1_deep1"), ("remove_layer", "act1_deep1_relu"),
        ("remove_layer", "features_deep1"), ("remove_layer", "features_deep1_relu")]


@pytest.mark.parametrize("budget", [0.9, 0.5, 0.2, 300])
def test_student_never_exceeds_the_budget(budget: float) -> None:
    base, grown = grown_mlp()
    limit = budget_params(budget, base)
    student, _, widths = shrink(grown, limit, base)
    assert trunk_params(student) <= limit
    fc1, fc2 = widths["fc1"], widths["fc2"]
    assert trunk_params(student) == 64 * fc1 + fc1 + fc1 * fc2 + fc2  # hand count
    assert {n: student.node(n).kind for n in student.topo_order()} == \
        {n: base.node(n).kind for n in base.topo_order()}
    # the largest common factor: one more unit in each layer would break the budget
    f1, f2 = fc1 + math.ceil(12 / 10), fc2 + 1
    assert 64 * f1 + f1 + f1 * f2 + f2 > limit


def test_budget_below_one_unit_per_layer_is_refused() -> None:
    base, grown = grown_mlp()
    with pytest.raises(OperatorError, match="below the smallest student"):
        shrink(grown, 50, base)


def test_units_kept_are_the_most_important() -> None:
    base, grown = grown_mlp()
    w1 = grown.node("fc1").tensors["weight"]
    l1 = w1.abs().sum(1)
    want = sorted(torch.argsort(l1, descending=True)[:12].tolist())
    student, records, _ = shrink(grown, trunk_params(base), base)
    assert records[0].index_maps["fc1.weight"][0] == want
    assert torch.equal(student.node("fc1").tensors["weight"], w1[want])
    # Fisher-style importance picks the units it marks, whatever their magnitude
    marked = [1, 3, 5, 7, 9, 11, 13, 15, 17, 18, 19, 0]
    imp = {"fc1.weight": torch.zeros_like(w1), "fc1.bias": torch.zeros(20)}
    imp["fc1.bias"][marked] = 1.0
    _, records, _ = shrink(grown, trunk_params(base), base, importance=imp)
    assert records[0].index_maps["fc1.weight"][0] == sorted(marked)


def test_an_inserted_identity_is_cut_to_the_units_its_input_kept() -> None:
    """Widen, insert an identity after the widened layer, prune back: the inserted layer keeps
    the rows that read the kept inputs, so dropping it loses nothing."""
    base = randomize(two_heads(mlp((6,), [5, 4])), 3)
    g = net2wider(base, "fc1", 9, seed=0).graph
    g = net2deeper(g, "act1").graph  # identity 9 -> 9
    scores = torch.tensor([0.0, 9, 1, 8, 2, 7, 3, 6, 5])  # keeps units 1, 3, 5, 7, 8
    cut = prune_units(g, "fc1", 5, scores=scores)
    assert cut.record.index_maps["fc1.weight"][0] == [1, 3, 5, 7, 8]
    imp = {"fc1.bias": scores}
    student, records, _ = shrink(g, trunk_params(base), base, importance=imp)
    assert records[0].index_maps["fc1.weight"][0] == [1, 3, 5, 7, 8]
    deep = next(r for r in records if r.params.get("node") == "act1_deep1" and
                r.op == "prune_units")
    assert deep.index_maps["act1_deep1.weight"][0] == [1, 3, 5, 7, 8]
    x = x_for(base)
    with_identity = outputs(cut.graph, x)  # the pruned teacher, identity still in place
    dropped = outputs(student, x)
    assert all(torch.allclose(with_identity[h], dropped[h], atol=1e-6) for h in dropped)


def test_a_network_that_is_no_expansion_of_the_base_is_refused() -> None:
    base, grown = grown_mlp()
    other = two_heads(mlp((1, 8, 8), [12]))
    with pytest.raises(OperatorError, match="lacks base nodes"):
        shrink(other, 10_000, grown)
    with pytest.raises(OperatorError, match="cannot be pruned|lacks base nodes"):
        shrink(grown, 10_000, two_heads(mlp((1, 8, 8), [12, 10]), classes=3))


# ---- distillation ----------------------------------------------------------------------------
def test_distillation_penalty_is_the_tempered_kl_on_every_head() -> None:
    torch.manual_seed(0)
    g = randomize(two_heads(mlp((4,), [6]), classes=3), 4)
    teacher_graph = randomize(g.copy(), 5)
    teacher = Model(teacher_graph).module.eval()
    student = Model(g)
    tasks = build_stream({"dataset": "digits", "stream": "split", "n_tasks": 5})
    ctx = Context(student, tasks[1], tasks[:1], lambda t: f"t{t.index}", lambda t, y: y,
                  torch.device("cpu"))
    x = torch.randn(5, 4)
    out = student.head(("t1", "t0"))(x)
    ctx.outputs = out
    d = Distillation([(teacher, ["t1", "t0"])], temperature=2.0, weight=0.7)
    got = d.penalty(ctx, x, torch.zeros(5, dtype=torch.long), out["t1"])
    want = 0.0
    with torch.no_grad():
        target = teacher(x)
    for h in ("t1", "t0"):  # T^2 * mean over samples of sum_c p_c (log p_c - log q_c)
        p = torch.softmax(target[h] / 2, 1)
        q = torch.softmax(out[h].detach() / 2, 1)
        want += 4 * float((p * (p.log() - q.log())).sum(1).mean())
    assert float(got.detach()) == pytest.approx(0.7 * want, rel=1e-5)
    assert d.extra_heads(ctx) == ["t0"]
    extra = Distillation([(teacher, ["t1", "t0"])], 2.0, 0.7, lambda c, *a: torch.tensor(1.5))
    assert float(extra.penalty(ctx, x, torch.zeros(5), out["t1"]).detach()) == \
        pytest.approx(0.7 * want + 1.5, rel=1e-5)


def digits_setup(seed: int = 0) -> tuple[Context, NetGraph, TrainConfig]:
    """A base MLP trained on permuted-digits task 0, then grown and trained on task 1."""
    tasks = build_stream({"dataset": "digits", "stream": "permuted", "n_tasks": 2,
                          "seed": seed})
    torch.manual_seed(seed)
    base = two_heads(mlp((1, 8, 8), [32, 32]))
    cfg = TrainConfig(epochs=8, batch_size=32, lr=0.05)
    model = Model(base)
    head_of = lambda t: f"t{t.index}"  # noqa: E731
    ctx0 = Context(model, tasks[0], [], head_of, lambda t, y: y, torch.device("cpu"))
    from growth.strategies import Strategy

    fit(ctx0, Strategy(), cfg, seed=1)
    base = model.graph
    grown = net2wider(base, "fc1", 64, noise=0.05, seed=1).graph
    grown = net2deeper(grown, "act1").graph
    grown = net2wider(grown, "fc2", 48, noise=0.05, seed=2).graph
    ctx = Context(Model(grown), tasks[1], tasks[:1], head_of, lambda t, y: y,
                  torch.device("cpu"))
    fit(ctx, Strategy(), cfg, seed=2)
    return ctx, base, cfg


TOLERANCE = 0.03  # compression may cost at most 3 points of the new task's test accuracy


@pytest.mark.parametrize("importance", ["magnitude", "fisher"])
def test_compression_keeps_the_new_tasks_accuracy(importance: str) -> None:
    ctx, base, cfg = digits_setup()
    teacher = ctx.model.graph
    report = compress(ctx, CompressParams(importance=importance, epochs=8), cfg, base=base,
                      seed=3)
    assert report.graph.to_dict() == base.to_dict()
    assert report.trunk_after == trunk_params(base) <= report.budget < report.trunk_before
    assert report.dropped == ["act1_deep1", "act1_deep1_relu"]
    assert ctx.model.graph.to_dict() == base.to_dict()  # the context now holds the student
    before, after = report.accuracy_before["test"], report.accuracy_after["test"]
    assert before > 0.9
    assert after >= before - TOLERANCE
    assert evaluate(ctx, ctx.task) == after
    # the old head was distilled too: it still agrees with the teacher on the new data
    x = ctx.task.test[0]
    with torch.no_grad():
        t_old = Model(teacher).head("t0").eval()(x).argmax(1)
        s_old = ctx.model.head("t0").eval()(x).argmax(1)
    assert (t_old == s_old).float().mean() > 0.8


def test_distillation_pulls_the_old_head_towards_the_teacher() -> None:
    """With the KL terms (kd_weight 1) the student's old head matches the teacher's outputs on
    new data better than without them (kd_weight 0)."""
    gaps = {}
    for weight in (0.0, 1.0):
        ctx, base, cfg = digits_setup()
        teacher = Model(ctx.model.graph).head("t0").eval()
        compress(ctx, CompressParams(epochs=4, kd_weight=weight), cfg, base=base, seed=3)
        x = ctx.task.test[0]
        with torch.no_grad():
            p = F.log_softmax(teacher(x), 1)
            q = F.log_softmax(ctx.model.head("t0").eval()(x), 1)
        gaps[weight] = float(F.kl_div(q, p, log_target=True, reduction="batchmean"))
    assert gaps[1.0] < 0.5 * gaps[0.0]


def test_old_heads_learn_from_the_old_teacher_and_the_tasks_head_from_the_teacher(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """distill with an old teacher: the KL term of the task's head targets the teacher, the old
    heads' terms target the old teacher (three networks with different weights, the loss on one
    batch against the tempered KL computed by hand)."""
    import growth.train

    torch.manual_seed(0)
    g = two_heads(mlp((1, 8, 8), [6]), classes=10)
    student, teacher, old = randomize(g.copy(), 4), randomize(g.copy(), 5), randomize(g.copy(), 6)
    tasks = build_stream({"dataset": "digits", "stream": "permuted", "n_tasks": 2,
                          "max_train_per_task": 16})
    ctx = Context(Model(student), tasks[1], tasks[:1], lambda t: f"t{t.index}", lambda t, y: y,
                  torch.device("cpu"))
    hooks = []
    real = growth.train.fit

    def keep(ctx: Context, strategy, *args, **kwargs):  # the real loop, its hooks kept
        hooks.append(strategy)
        return real(ctx, strategy, *args, **kwargs)

    monkeypatch.setattr(growth.train, "fit", keep)
    params = CompressParams(epochs=1, kd_weight=0.7, temperature=2.0)
    distill(ctx, teacher, params, TrainConfig(epochs=1, batch_size=8, lr=0.01), ["t1", "t0"],
            old_teacher=old)
    d, = hooks
    assert d.extra_heads(ctx) == ["t0"]
    x = tasks[1].test[0][:6]
    out = ctx.model.head(("t1", "t0"))(x)
    ctx.outputs = out
    got = float(d.penalty(ctx, x, tasks[1].test[1][:6], out["t1"]).detach())
    want = 0.0
    for head, source in (("t1", teacher), ("t0", old)):  # T^2 mean_i sum_c p (log p - log q)
        with torch.no_grad():
            p = torch.softmax(Model(source).head(head).eval()(x) / 2, 1)
        q = torch.softmax(out[head].detach() / 2, 1)
        want += 4 * float((p * (p.log() - q.log())).sum(1).mean())
    assert got == pytest.approx(0.7 * want, rel=1e-5)


# ---- growth compress ---------------------------------------------------------------------------
def test_compress_command_on_a_saved_network(tmp_path, capsys) -> None:
    base, grown = grown_mlp()
    grown.save(tmp_path / "grown")
    base.save(tmp_path / "base")
    code = main(["compress", str(tmp_path / "grown"), "--budget", "0.5", "--base",
                 str(tmp_path / "base"), "--data", "digits", "--epochs", "1",
                 "--out", str(tmp_path / "small")])
    assert code == 0
    out = capsys.readouterr().out
    student = NetGraph.load(tmp_path / "small")
    limit = budget_params(0.5, base)
    assert trunk_params(student) <= limit
    summary = json.loads((tmp_path / "small" / "compress.json").read_text())
    assert summary["budget"] == limit and summary["trunk_after"] == trunk_params(student)
    assert f"trunk parameters {trunk_params(grown):,} -> {trunk_params(student):,}" in out
    assert "test accuracy" in out and "dropped layers: act1_deep1" in out


def test_compress_command_mistakes_are_one_line_errors(tmp_path, capsys) -> None:
    base, grown = grown_mlp()
    grown.save(tmp_path / "grown")
    assert main(["compress", str(tmp_path / "grown"), "--budget", "0.5", "--data",
                 "nosuchdata"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "neither a config file" in err
    assert main(["compress", str(tmp_path / "grown"), "--budget", "-1", "--data",
                 "digits"]) == 2
    assert "budget" in capsys.readouterr().err
    assert main(["compress", str(tmp_path / "nothing"), "--budget", "0.5", "--data",
                 "digits"]) == 2
    assert "structure.json is missing" in capsys.readouterr().err


def test_compress_command_reports_every_task_of_a_multi_task_network(tmp_path, capsys) -> None:
    """Before: the run's own final R row; after: each head of the saved student on its task."""
    from runfiles import write_config

    from growth.campaign import Campaign
    from growth.compile import compile_graph
    from growth.config import load_config

    config = write_config(tmp_path / "c.yaml", train__epochs=2)
    campaign = Campaign(load_config(config), tmp_path / "run")
    metrics = campaign.start()
    network = tmp_path / "run" / "checkpoints" / "task_002" / "graph"
    assert main(["compress", str(network), "--budget", "0.5", "--data", str(config),
                 "--epochs", "1", "--out", str(tmp_path / "small")]) == 0
    out = capsys.readouterr().out
    tasks = json.loads((tmp_path / "small" / "compress.json").read_text())["tasks"]
    student = NetGraph.load(tmp_path / "small")
    assert list(tasks) == [t.name for t in campaign.tasks]
    for j, task in enumerate(campaign.tasks):
        x, y = task.test
        with torch.no_grad():
            after = int((compile_graph(student, head=f"t{j}").eval()(x).argmax(1) == y).sum())
        assert tasks[task.name]["before"] == pytest.approx(metrics["R"][3][j], abs=1e-12)
        assert tasks[task.name]["after"] == pytest.approx(after / len(y), abs=1e-12)
        line = (f"task {task.name}: test accuracy {tasks[task.name]['before']:.4f} -> "
                f"{tasks[task.name]['after']:.4f}")
        assert line in out
