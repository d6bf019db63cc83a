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
from growth.data.containers import Task
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


# ---- sizes, unit choice and what compress hands on, on networks built by hand ------------------
def test_budget_edges_zero_one_and_two() -> None:
    base, _ = grown_mlp()
    trunk = trunk_params(base)
    with pytest.raises(OperatorError):
        budget_params(0.0, base)
    assert budget_params(1.0, base) == trunk  # a fraction: the whole base trunk
    assert budget_params(2, base) == 2  # above 1: a count


def test_a_budget_met_exactly_keeps_the_student_that_meets_it() -> None:
    """Base widths 12 and 10; the common factors give (7, 5) units at 7/12 <= f < 0.6, whose
    trunk 64*7+7+7*5+5 = 495 is the budget: that student, not a smaller one."""
    base, grown = grown_mlp()
    student, _, widths = shrink(grown, 495, base)
    assert widths == {"fc1": 7, "fc2": 5}
    assert trunk_params(student) == 495


def test_one_unit_per_layer_meets_the_smallest_budget() -> None:
    base, grown = grown_mlp()
    student, _, widths = shrink(grown, 64 + 1 + 1 + 1, base)  # fc1 and fc2 of one unit each
    assert widths == {"fc1": 1, "fc2": 1} and trunk_params(student) == 67


def test_a_layer_wider_than_the_search_resolves_still_meets_its_budget() -> None:
    """2^21 units: every factor the search tries (20 halvings of [0, 1], the smallest 2^-20)
    keeps at least 2 of them, so a budget of 1 unit (2 parameters) is met only by the
    smallest student, one unit per layer."""
    wide = two_heads(mlp((1,), [2 ** 21]), classes=1)
    assert trunk_params(wide) == 2 * 2 ** 21
    student, _, widths = shrink(wide, 2)
    assert widths == {"fc1": 1} and trunk_params(student) == 2
    assert student.node("fc1").tensors["weight"].shape == (1, 1)


def test_an_inserted_layer_as_wide_as_its_input_is_only_dropped() -> None:
    base = randomize(two_heads(mlp((1, 8, 8), [12, 10])), 0)
    deeper = net2deeper(base, "act1").graph  # 12 -> 12: nothing to cut
    student, records, _ = shrink(deeper, trunk_params(base), base)
    assert [(r.op, r.params["node"]) for r in records] == [
        ("remove_layer", "act1_deep1"), ("remove_layer", "act1_deep1_relu")]
    assert student.to_dict() == base.to_dict()


def test_every_group_is_cut_back_after_a_head_that_cannot_be_pruned() -> None:
    """A head read from the first block sorts before fc2 ("a_head" < "fc2"): it keeps its
    classes, and fc2 after it is still cut back to the base width."""
    g = mlp((1, 8, 8), [12, 10])
    g.add("a_head", "linear", ["act1"], out_features=3)
    g.add_output("a", "a_head")
    base = randomize(two_heads(g), 0)
    grown = net2wider(base, "fc2", 14, noise=0.05, seed=1).graph
    student, _, widths = shrink(grown, trunk_params(base), base)
    assert widths == {"fc1": 12, "fc2": 10}
    assert student.to_dict() == base.to_dict()


def test_a_residual_group_is_cut_once_by_the_l1_of_all_its_producers() -> None:
    """graphgen.residual: c0, c1 and c2 write one residual group; "inner" is its own group and
    comes after c1 in order. Widen both, deepen after "inner" (a 1x1 conv whose input width is
    cut first), shrink to the base: the base comes back, one width per group, and the group
    keeps the units with the largest L1 of incoming weights summed over its three producers."""
    from graphgen import residual

    base = residual()
    g = net2wider(base, "c0", 7, noise=0.05, seed=1).graph
    g = net2wider(g, "inner", 5, noise=0.05, seed=2).graph
    g = net2deeper(g, "ri").graph
    l1 = {p: g.node(p).tensors["weight"].abs().flatten(1).sum(1) for p in ("c0", "c1", "c2")}
    want = sorted(torch.argsort(l1["c0"] + l1["c1"] + l1["c2"], descending=True)[:4].tolist())
    assert want != sorted(torch.argsort(l1["c2"], descending=True)[:4].tolist())
    student, records, widths = shrink(g, trunk_params(base), base)
    assert widths == {"c0": 4, "inner": 3}
    assert {n: student.node(n).kind for n in student.topo_order()} == \
        {n: base.node(n).kind for n in base.topo_order()}
    assert student.to_dict() == base.to_dict()
    cut = next(r for r in records if r.op == "prune_units" and r.params["node"] == "c0")
    assert cut.index_maps["c0.weight"][0] == want


def test_importance_of_weights_and_biases_adds_up_in_double_precision() -> None:
    base, grown = grown_mlp()
    marked = [2, 4, 6, 8, 10, 12, 13, 14, 15, 16, 17, 19]
    rest = [u for u in range(20) if u not in marked]
    weight = torch.zeros(20, 64)
    weight[marked] = 1.0  # 64 per marked unit
    bias = torch.zeros(20)
    bias[rest] = 0.5  # the biases alone would prefer the others
    _, records, _ = shrink(grown, trunk_params(base), base,
                           importance={"fc1.weight": weight, "fc1.bias": bias})
    assert records[0].index_maps["fc1.weight"][0] == marked


def two_point_task(index: int, val_labels: list[int] | None = None,
                   test_labels: list[int] | None = None) -> Task:
    """Inputs a = (1, 0) and b = (0, 1): a unit of a layer reading them with one nonzero weight
    and no bias is active on exactly one of the two (relu'(0) = 0: no gradient on the other)."""

    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    y = torch.tensor([0, 0, 1, 1])
    xv = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    return Task(index, f"two{index}", (x, y), (xv, torch.tensor(val_labels or [0, 1])),
                (xv, torch.tensor(test_labels or [0, 1])), [0, 1], 2, 0, (2,))


def two_point_nets() -> tuple[NetGraph, NetGraph]:
    """Base: fc1 of 4 units; teacher: fc1 of 8. Units 0-3 read a, 4-7 read b. Units 2, 3, 6, 7
    have the largest weights (magnitude keeps them); the heads read units 0, 1, 4, 5 100 times
    more strongly, so their Fisher is about 10^4 times larger (the Fisher keeps them)."""
    base = randomize(two_heads(mlp((2,), [4]), classes=2), 0)
    teacher = randomize(two_heads(mlp((2,), [8]), classes=2), 1)
    w = torch.zeros(8, 2)
    w[[0, 1, 2, 3], 0] = torch.tensor([1.0, 1.0, 5.0, 5.0])
    w[[4, 5, 6, 7], 1] = torch.tensor([1.0, 1.0, 5.0, 5.0])
    fc1 = teacher.node("fc1")
    fc1.tensors = {"weight": w, "bias": torch.zeros(8)}
    scale = torch.tensor([1.0, 1, 0.01, 0.01, 1, 1, 0.01, 0.01])
    for h in ("head_t0", "head_t1"):
        head = teacher.node(h)
        head.tensors = {"weight": torch.tensor([[1.0], [-1.0]]) * scale, "bias": torch.zeros(2)}
    return base, teacher


def two_point_ctx(teacher: NetGraph, **labels) -> Context:
    return Context(Model(teacher.copy()), two_point_task(1, **labels), [two_point_task(0)],
                   lambda t: f"t{t.index}", lambda t, y: y, torch.device("cpu"))


def kept_fc1(report) -> list[int]:
    return report.records[0].index_maps["fc1.weight"][0]


def test_compress_keeps_the_units_its_importance_names() -> None:
    base, teacher = two_point_nets()
    train = TrainConfig(epochs=1, batch_size=2, lr=0.01)
    magnitude = compress(two_point_ctx(teacher), CompressParams(epochs=0), train, base=base)
    assert kept_fc1(magnitude) == [2, 3, 6, 7]
    fisher = CompressParams(epochs=0, importance="fisher", fisher_samples=None)
    assert kept_fc1(compress(two_point_ctx(teacher), fisher, train, base=base)) == [0, 1, 4, 5]
    # the Fisher of one sample sees only the units that sample makes active
    one = CompressParams(epochs=0, importance="fisher", fisher_samples=1)
    assert kept_fc1(compress(two_point_ctx(teacher), one, train, base=base)) in (
        [0, 1, 2, 3], [4, 5, 6, 7])
    # importance the caller adds (in the teacher's shapes) goes onto the Fisher; entries of
    # other shapes or other parameters are left out
    extra = {"fc1.bias": 1e3 * torch.tensor([0.0, 0, 1, 1, 0, 0, 1, 1]),
             "fc1.weight": torch.ones(3), "nothing.weight": torch.ones(8)}
    report = compress(two_point_ctx(teacher), fisher, train, base=base, importance=extra)
    assert kept_fc1(report) == [2, 3, 6, 7]
    assert report.graph.to_dict() == base.to_dict()


def test_compress_reports_accuracy_on_each_split_sizes_and_time() -> None:
    """The teacher's predictions on a and b, by hand: validation labels agree with them,
    test labels disagree, so the two splits' accuracies are 1 and 0."""
    base, teacher = two_point_nets()
    xv = two_point_task(1).val[0]
    with torch.no_grad():
        pred = Model(teacher).head("t1").eval()(xv).argmax(1).tolist()
    ctx = two_point_ctx(teacher, val_labels=pred, test_labels=[1 - p for p in pred])
    params = CompressParams(epochs=2)
    import time as clock

    start = clock.perf_counter()
    report = compress(ctx, params, TrainConfig(epochs=1, batch_size=2, lr=0.01), base=base)
    elapsed = clock.perf_counter() - start
    assert report.accuracy_before == {"val": 1.0, "test": 0.0}
    assert set(report.accuracy_after) == {"val", "test"}
    assert len(report.losses) == 2 and all(math.isfinite(v) for v in report.losses)
    assert 0 < report.wall_time_s <= elapsed
    assert report.widths == {"fc1": 4}
    assert [(r.op, r.params["node"]) for r in report.records] == [("prune_units", "fc1")]
    assert report.trunk_before == 8 * 2 + 8 and report.trunk_after == 4 * 2 + 4
    assert report.summary()["widths"] == {"fc1": 4}


def distillers(monkeypatch: pytest.MonkeyPatch) -> list:
    """The hooks compress hands to the real loop, kept for inspection."""
    import growth.train

    hooks = []
    real = growth.train.fit

    def keep(ctx: Context, strategy, *args, **kwargs):
        hooks.append(strategy)
        return real(ctx, strategy, *args, **kwargs)

    monkeypatch.setattr(growth.train, "fit", keep)
    return hooks


def tempered_kl(source: NetGraph, head: str, out: torch.Tensor, x: torch.Tensor) -> float:
    """T^2 mean_i sum_c p (log p - log q) at T = 2, p from `source`'s head."""
    with torch.no_grad():
        p = torch.softmax(Model(source).head(head).eval()(x) / 2, 1)
    q = torch.softmax(out.detach() / 2, 1)
    return 4 * float((p * (p.log() - q.log())).sum(1).mean())


def test_compress_distils_the_heads_it_is_given_with_its_penalty(
        monkeypatch: pytest.MonkeyPatch) -> None:
    base, teacher = two_point_nets()
    hooks = distillers(monkeypatch)
    ctx = two_point_ctx(teacher)
    params = CompressParams(epochs=1, kd_weight=0.7, temperature=2.0)
    compress(ctx, params, TrainConfig(epochs=1, batch_size=2, lr=0.01), base=base,
             heads=["t1"], penalty=lambda c, *a: torch.tensor(1.5))
    d, = hooks
    assert d.heads == ["t1"]
    for module, _ in d.teachers:  # frozen, in eval mode
        assert not module.training and not any(p.requires_grad for p in module.parameters())
    x, y = ctx.task.train
    out = ctx.model.head(("t1", "t0"))(x)
    ctx.outputs = out
    got = float(d.penalty(ctx, x, y, out["t1"]).detach())
    assert got == pytest.approx(0.7 * tempered_kl(teacher, "t1", out["t1"], x) + 1.5, rel=1e-5)


def test_compress_with_an_old_teacher_and_a_mix(monkeypatch: pytest.MonkeyPatch) -> None:
    """mix = 0.25: the loss is 0.25 CE + 0.75 T^2 KL per head; the old head's KL targets the
    old teacher, the task's head's the teacher."""
    base, teacher = two_point_nets()
    old = randomize(teacher.copy(), 7)
    hooks = distillers(monkeypatch)
    ctx = two_point_ctx(teacher)
    params = CompressParams(epochs=1, mix=0.25, temperature=2.0)
    compress(ctx, params, TrainConfig(epochs=1, batch_size=2, lr=0.01), base=base,
             old_teacher=old)
    d, = hooks
    x, y = ctx.task.train
    out = ctx.model.head(("t1", "t0"))(x)
    ctx.outputs = out
    got = float(d.penalty(ctx, x, y, out["t1"]).detach())
    want = tempered_kl(teacher, "t1", out["t1"], x) + tempered_kl(old, "t0", out["t0"], x)
    assert got == pytest.approx(0.75 * want, rel=1e-5)
    ce = float(d.loss(ctx, x, y, out["t1"]).detach())
    by_hand = -float(torch.log_softmax(out["t1"].detach(), 1)[torch.arange(4), y].mean())
    assert ce == pytest.approx(0.25 * by_hand, rel=1e-5)


def test_compress_is_reproducible_from_its_seed() -> None:
    base, teacher = two_point_nets()
    train = TrainConfig(epochs=1, batch_size=1, lr=0.5)
    params = CompressParams(epochs=1)

    def student(**seed) -> torch.Tensor:
        ctx = two_point_ctx(teacher)
        compress(ctx, params, train, base=base, **seed)
        return ctx.model.graph.node("fc1").tensors["weight"]

    default = student()
    assert torch.equal(default, student(seed=0))
    assert not torch.equal(default, student(seed=1))
    # distill on its own draws from seed 0 by default too
    trained = []
    for seed in ({}, {"seed": 0}):
        ctx = two_point_ctx(teacher)
        distill(ctx, teacher, params, train, ["t1", "t0"], **seed)
        trained.append(ctx.model.graph.node("fc1").tensors["weight"])
    assert torch.equal(*trained)
