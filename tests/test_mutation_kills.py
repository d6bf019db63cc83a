"""Tests that kill mutants of the core modules which the other tests let survive.

Each test names the behaviour it pins; expected values are computed by hand in the test.
docs/mutation.md lists the mutants each one kills.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from growth.errors import ReportError
from growth.metrics import (
    RMatrix,
    average_accuracy,
    make_metrics,
    metrics_csv,
    read_metrics,
    size_report,
    write_metrics,
)


# ---- metrics -----------------------------------------------------------------------------------
def _partial_r() -> np.ndarray:
    """3 tasks, 2 finished: row 3 not measured yet."""
    nan = math.nan
    return np.array([[0.1, 0.2, 0.3],
                     [0.9, 0.4, 0.5],
                     [0.7, 0.8, 0.6],
                     [nan, nan, nan]])


def test_average_accuracy_covers_the_finished_tasks_or_the_first_upto():
    r = _partial_r()
    assert average_accuracy(r) == pytest.approx([0.9, (0.7 + 0.8) / 2])  # 2 finished tasks
    assert average_accuracy(r, upto=1) == pytest.approx([0.9])
    assert average_accuracy(r, upto=0) == []


def test_rmatrix_summarize_passes_upto_through():
    m = RMatrix.from_list(_partial_r().tolist())
    # R[:2, :1] = [[0.1], [0.9]]: one task, no transfer
    one = m.summarize(upto=1)
    assert one["acc"] == pytest.approx(0.9)
    assert math.isnan(one["bwt"]) and math.isnan(one["fwt"])
    two = m.summarize()
    assert two["acc"] == pytest.approx(0.75)
    assert two["bwt"] == pytest.approx(0.7 - 0.9)
    assert two["fwt"] == pytest.approx(0.4 - 0.2)


def _metrics_file(tmp_path, text: str):
    (tmp_path / "metrics.json").write_text(text, encoding="utf-8")
    return tmp_path


def test_read_metrics_refuses_json_constants_by_name(tmp_path):
    run = _metrics_file(tmp_path, '{"run": {}, "tasks": ["a"], "R": [[0.5], [NaN]]}')
    with pytest.raises(ReportError) as err:
        read_metrics(run)
    assert str(err.value) == (f"{run / 'metrics.json'}: NaN is not a number; metrics hold finite "
                              "numbers or null")


@pytest.mark.parametrize("where, key", [
    ('"sizes": [{"params": 1e999}]', "['sizes'][0]['params']"),
    ('"wall_time_s": [1.0, -1e999]', "['wall_time_s'][1]"),
])
def test_read_metrics_names_the_key_of_an_infinite_number(tmp_path, where, key):
    run = _metrics_file(tmp_path, '{"run": {}, "tasks": ["a"], "R": [[0.5], [0.75]], '
                                  + where + "}")
    with pytest.raises(ReportError) as err:
        read_metrics(run)
    value = "inf" if "-" not in where else "-inf"
    assert str(err.value) == f"{run / 'metrics.json'}: {key} is {value}, not a finite number"


def test_read_metrics_names_a_boolean_where_an_object_belongs(tmp_path):
    run = _metrics_file(tmp_path, '{"run": true, "tasks": ["a"], "R": [[0.5], [0.75]]}')
    with pytest.raises(ReportError, match=r"'run' must be an object, got a boolean$"):
        read_metrics(run)


def test_read_metrics_round_trips_non_ascii_task_names(tmp_path):
    data = {"run": {}, "tasks": ["tâche-ü"], "R": [[0.5], [0.75]]}
    run = _metrics_file(tmp_path, json.dumps(data, ensure_ascii=False))
    assert read_metrics(run)["tasks"] == ["tâche-ü"]


def test_size_report_of_an_empty_base_has_no_ratios():
    out = size_report({"trunk": [torch.zeros(3)]}, base_params=0, base_bytes=0)
    assert out["params"] == 3 and out["bytes"] == 12
    assert out["relative"] is None and out["relative_bytes"] is None


def test_metrics_csv_ends_lines_with_newline_only():
    m = make_metrics({}, ["a"], [[0.25], [0.5]])
    assert metrics_csv(m) == "after_task,task,task_name,accuracy\n0,0,a,0.25\n1,0,a,0.5\n"


def test_write_metrics_makes_missing_parents_and_writes_indented_json(tmp_path):
    m = make_metrics({"name": "r"}, ["a"], [[0.25], [0.5]])
    path = write_metrics(tmp_path / "deep" / "er" / "run", m)
    assert path == tmp_path / "deep" / "er" / "run" / "metrics.json"
    assert path.read_text(encoding="utf-8") == json.dumps(m, indent=2) + "\n"


def test_write_metrics_names_the_file_it_refuses_to_write(tmp_path):
    with pytest.raises(ReportError) as err:
        write_metrics(tmp_path, {"run": {}, "tasks": ["a"]})
    assert str(err.value) == f"{tmp_path / 'metrics.json'}: missing key(s) R"
    assert not (tmp_path / "metrics.json").exists()


def test_summarize_with_nothing_finished_names_every_score():
    out = RMatrix(2).summarize()
    assert set(out) == {"acc", "bwt", "fwt"} and all(math.isnan(v) for v in out.values())


def test_make_metrics_turns_numpy_integers_into_ints_and_keeps_the_config():
    m = make_metrics({}, ["a"], [[0.25], [0.5]], sizes=[{"params": np.int64(7)}],
                     config={"seed": 3})
    assert m["sizes"] == [{"params": 7}] and type(m["sizes"][0]["params"]) is int
    assert m["config"] == {"seed": 3}
    assert "config" not in make_metrics({}, ["a"], [[0.25], [0.5]])


def test_read_metrics_refuses_a_search_time_that_is_not_a_number(tmp_path):
    run = _metrics_file(tmp_path, '{"run": {}, "tasks": ["a"], "R": [[0.5], [0.75]], '
                                  '"search": {"children": 2, "child_time_s": "1 s"}}')
    with pytest.raises(ReportError) as err:
        read_metrics(run)
    assert str(err.value) == (f"{run / 'metrics.json'}: 'search'['child_time_s'] must be a "
                              "number or null, got the string '1 s'")


# ---- LwF ---------------------------------------------------------------------------------------
def test_lwf_adds_nothing_before_its_first_task_and_freezes_its_teacher():
    from test_strategies import context, mlp, synthetic

    from growth.strategies import make_strategy

    tasks, model = synthetic(2), mlp(n_heads=2)
    s = make_strategy("lwf", {})
    x = tasks[0].train[0]
    assert s.penalty(context(model, tasks, 0), x) is None  # a fresh strategy: no teacher yet
    s.before_task(context(model, tasks, 1))
    teacher = list(s._teacher.parameters())
    assert teacher and not any(p.requires_grad for p in teacher)
    assert not any(p is q for p in teacher for q in model.module.parameters())


# ---- regularisers ------------------------------------------------------------------------------
def test_importance_samples_are_drawn_from_their_own_named_stream():
    """The subset is the randperm of a generator seeded, as growth.data.sampling documents,
    with seed * 0x9E3779B1 + crc32("importance-sample/<task>"): a stable key, so a run's
    Fisher estimates stay reproducible across versions and never share draws with another
    purpose (replay, permutations) of the same seed and task."""
    import zlib

    from test_regularizers import context, task

    from growth.regularizers import task_sample

    t = task(1)
    seed = 5
    x, _ = task_sample(context(seed, t), t, 7)
    mixed = (seed * 0x9E3779B1 + zlib.crc32(b"importance-sample/1")) % (2**63 - 1)
    idx = torch.randperm(len(t.train[1]), generator=torch.Generator().manual_seed(mixed))[:7]
    assert torch.equal(x, t.train[0][idx])


def _fisher_by_hand(layer: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor):
    """Mean over samples of the squared gradient of log softmax(Wx + b)[y]: for a linear
    layer that gradient is (onehot(y) - softmax) x^T for W and onehot(y) - softmax for b."""
    fw, fb = torch.zeros_like(layer.weight), torch.zeros_like(layer.bias)
    with torch.no_grad():
        for xi, yi in zip(x, y):
            d = torch.nn.functional.one_hot(yi, 3).float() - torch.softmax(layer(xi), 0)
            fw += torch.outer(d, xi).square()
            fb += d.square()
    return fw / len(y), fb / len(y)


@pytest.mark.parametrize("n, budget", [(1, None), (7, 3)])
def test_fisher_is_the_mean_squared_gradient_in_any_chunking(monkeypatch, n, budget):
    from growth import regularizers

    torch.manual_seed(0)
    layer = torch.nn.Linear(2, 3)
    x, y = torch.randn(n, 2), torch.arange(n) % 3
    if budget is not None:  # room for the gradients of 3 samples at a time: 3 chunks of 7
        monkeypatch.setattr(regularizers, "GRAD_BUDGET", budget * 9)
    got = regularizers.fisher_diagonal(layer, ["weight", "bias"], x, y)
    fw, fb = _fisher_by_hand(layer, x, y)
    torch.testing.assert_close(got["weight"], fw)
    torch.testing.assert_close(got["bias"], fb)


def test_quadratic_whose_weights_cancel_keeps_its_linear_term():
    """(theta - a1)^2 - (theta - a2)^2 = -2 theta (a1 - a2) + a1^2 - a2^2: no quadratic left."""
    from growth.regularizers import build_quadratic

    layer = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(0.5)
    a1, a2 = torch.tensor([[2.0]]), torch.tensor([[-1.0]])
    q = build_quadratic(layer, [(1.0, None, {"weight": a1}), (-1.0, None, {"weight": a2})])
    assert not q.terms and len(q.linear) == 1
    assert float(q().detach()) == pytest.approx(-2 * 0.5 * (2.0 + 1.0) + 4.0 - 1.0)
    assert build_quadratic(layer, [])() is None


def test_quadratic_in_the_parameters_precision_with_default_and_missing_weights():
    """One term per parameter, W (theta - m)^2 with W = sum of weights and m their mean
    anchor; weights None or missing a parameter count as ones; no linear term is kept when the
    weights do not cancel; a weight of another shape is refused by the parameter's name."""
    from growth.errors import ShapeError
    from growth.regularizers import build_quadratic

    layer = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -1.0]]))
    a1, a2 = torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 4.0]])
    q = build_quadratic(layer, [(1.0, None, {"weight": a1}), (3.0, {}, {"weight": a2})])
    assert q.module is layer and not q.linear and len(q.terms) == 1
    # 1 * |theta - a1|^2 + 3 * |theta - a2|^2 = (1 + 1) + 3 * (1 + 25)
    out = q()
    assert out.dtype == torch.float32 and float(out.detach()) == pytest.approx(80.0)
    with pytest.raises(ShapeError, match="'weight'"):
        build_quadratic(layer, [(1.0, {"weight": torch.ones(3)}, {"weight": a1})])


def test_weights_that_nearly_cancel_are_judged_against_all_of_their_mass():
    """v = 1 - 1 + 1.5e-12 is below 1e-12 times sum |v| (about 2), so the term is linear; it
    would not be against the last weight's mass alone (1.5e-12)."""
    from growth.regularizers import build_quadratic

    layer = torch.nn.Linear(1, 1, bias=False)
    anchors = [{"weight": torch.tensor([[a]])} for a in (1.0, 2.0, 3.0)]
    q = build_quadratic(layer, [(s, None, a) for s, a in zip((1.0, -1.0, 1.5e-12), anchors)])
    assert not q.terms and len(q.linear) == 1
    assert q.linear[0][1].dtype == torch.float32


# ---- L2, MAS, SI (and the shapes of EWC's and MWC's state) -------------------------------------
@pytest.mark.parametrize("name, params, checked, other", [
    ("l2", {}, "anchor/latest", "importance/latest"),
    ("mas", {}, "importance/all", "anchor/latest"),
    ("si", {}, "omega/all", "anchor/latest"),
    ("si", {}, "anchor/latest", "omega/all"),
    ("ewc", {}, "fisher/0", "anchor/0"),
    ("ewc", {}, "anchor/0", "fisher/0"),
    ("ewc", {"mode": "online"}, "fisher/all", "anchor/latest"),
    ("ewc", {"mode": "online"}, "anchor/latest", "fisher/all"),
    ("mwc", {}, "fisher/0", "anchor/0"),
    ("mwc", {}, "anchor/0", "fisher/0"),
])
def test_checkpoint_state_must_have_its_parameters_shape(name, params, checked, other):
    from growth.strategies import make_strategy

    s = make_strategy(name, params)
    graph = {"fc.weight": torch.zeros(3, 4)}
    fits = {f"{checked}/fc.weight": torch.zeros(3, 4), f"{other}/fc.weight": torch.ones(3, 4)}
    assert s.check_state(fits, {"tasks": [0]}, graph, 1) == []
    smaller = {**fits, f"{checked}/fc.weight": torch.zeros(2, 4)}
    problems = s.check_state(smaller, {"tasks": [0]}, graph, 1)
    assert problems == [f"tensor '{checked}/fc.weight' has shape (2, 4), but fc.weight is "
                        "(3, 4)"]


def test_mas_measures_its_importance_on_its_sample_budget():
    from test_regularizers import context, model, task

    from growth.regularizers import mas_importance, task_sample, task_view
    from growth.strategies import make_strategy

    t, m = task(0), model()
    ctx = context(2, t, m)
    s = make_strategy("mas", {"samples": 5})
    s.consolidate(ctx)
    view, names = task_view(ctx, t)
    some = mas_importance(view, names, task_sample(ctx, t, 5)[0])
    every = mas_importance(view, names, t.train[0])
    for n in names:
        torch.testing.assert_close(s.state[f"importance/all/{n}"], some[n])
    assert any(not torch.allclose(some[n], every[n]) for n in names)


def test_si_in_a_bare_fit_starts_its_path_sums_at_the_first_step():
    """`fit` without `learn_task` (no before_task): SI starts its sums at the first backward.
    Plain SGD moves each weight by -lr g, so the path sum is lr * sum g^2, by hand."""
    from test_strategies import context, mlp, synthetic

    from growth.strategies import make_strategy
    from growth.train import TrainConfig, fit

    tasks, model = synthetic(1), mlp(n_heads=1, hidden=4)
    ctx = context(model, tasks, 0)
    s = make_strategy("si", {"xi": 1e-3})
    params = model.named_parameters()
    start = {n: p.detach().clone() for n, p in params.items()}
    squares = {n: torch.zeros_like(p) for n, p in params.items()}

    def add_square(name: str):
        def hook(grad: torch.Tensor) -> None:
            squares[name].add_(grad.square())
        return hook

    for n, p in params.items():
        p.register_hook(add_square(n))
    fit(ctx, s, TrainConfig(epochs=2, batch_size=12, lr=0.2, momentum=0.0), seed=0)
    s.consolidate(ctx)
    for n, p in params.items():
        delta = p.detach() - start[n]
        assert delta.abs().max() > 1e-3  # every parameter moved
        torch.testing.assert_close(s.state[f"omega/all/{n}"], 0.2 * squares[n] / (
            delta.square() + 1e-3), rtol=1e-4, atol=1e-7)


# ---- metrics (continued) -----------------------------------------------------------------------
def test_a_matrix_of_integers_is_held_as_floats():
    m = RMatrix.from_list([[0, 1], [1, 0], [0, 0]])
    m.record(2, 0, 0.5)
    assert m.values.dtype == np.float64 and m.values[2, 0] == 0.5


@pytest.mark.parametrize("entry, message", [
    ('"tasks": 3', "'tasks' must be a list, got the number 3"),
    ('"tasks": ["a"], "config": [1]', "'config' (the resolved config) must be an object, "
                                      "got a list"),
])
def test_read_metrics_names_the_file_and_key_of_a_mistyped_entry(tmp_path, entry, message):
    run = _metrics_file(tmp_path, '{"run": {}, "R": [[0.5], [0.75]], ' + entry + "}")
    with pytest.raises(ReportError) as err:
        read_metrics(run)
    assert str(err.value) == f"{run / 'metrics.json'}: {message}"


# ---- EWC (and the quadratic strategies' base) --------------------------------------------------
TRUNK = ["fc1.weight", "fc1.bias", "features.weight", "features.bias"]


def test_quadratic_state_check_wants_extra_tasks_to_list_the_finished_tasks():
    from growth.strategies import make_strategy

    s = make_strategy("ewc", {})
    graph = {"fc.weight": torch.zeros(3, 4)}
    assert s.check_state({}, {}, graph, 0) == []  # nothing finished: no 'tasks' needed
    fits = {"fisher/0/fc.weight": torch.ones(3, 4), "anchor/0/fc.weight": torch.zeros(3, 4)}
    assert s.check_state(fits, {"tasks": [0]}, graph, 1) == []
    assert s.check_state(fits, {"tasks": [1]}, graph, 1) == [
        "extra 'tasks' is [1], expected the 1 finished tasks [0]"]
    foreign = {**fits, "importance/0/fc.weight": torch.ones(3, 4)}
    assert s.check_state(foreign, {"tasks": [0]}, graph, 1) == [
        "tensor 'importance/0/fc.weight' does not belong to strategy 'ewc' (it stores only "
        "['anchor', 'fisher']); is this another run's or another strategy's file?"]


def test_loading_state_rebuilds_the_penalty_from_the_loaded_tensors():
    """Fisher c on the trunk, anchors 0: the penalty is (lambda/2) c sum theta^2 over the trunk,
    for whichever state was loaded last (no terms merged from the previous one are reused)."""
    from test_strategies import context, mlp, synthetic

    from growth.strategies import make_strategy

    tasks, model = synthetic(2), mlp(n_heads=2)
    ctx = context(model, tasks, 1)
    params = model.named_parameters()
    squares = sum(float(params[n].detach().square().sum()) for n in TRUNK)
    s = make_strategy("ewc", {"lambda": 4.0})
    for c in (1.0, 3.0):
        s.load_state_dict({**{f"fisher/0/{n}": torch.full_like(params[n], c) for n in TRUNK},
                           **{f"anchor/0/{n}": torch.zeros_like(params[n]) for n in TRUNK}},
                          {"tasks": [0]})
        assert float(s.penalty(ctx).detach()) == pytest.approx(2.0 * c * squares, rel=1e-5)


def test_penalty_terms_are_merged_once_per_compiled_model(monkeypatch):
    """Two batches on one model merge the terms once; a recompiled model (new module, here
    with its trunk doubled) gets terms of its own: (lambda/2) sum (2 theta)^2 = 4x before."""
    from test_strategies import context, mlp, synthetic

    from growth.regularizers import build_quadratic
    from growth.strategies import ewc, make_strategy

    builds = []

    def counted(*args, **kwargs):
        builds.append(1)
        return build_quadratic(*args, **kwargs)

    monkeypatch.setattr(ewc, "build_quadratic", counted)
    tasks, model = synthetic(2), mlp(n_heads=2)
    ctx = context(model, tasks, 1)
    params = model.named_parameters()
    squares = sum(float(params[n].detach().square().sum()) for n in TRUNK)
    s = make_strategy("ewc", {"lambda": 4.0})
    s.load_state_dict({**{f"fisher/0/{n}": torch.ones_like(params[n]) for n in TRUNK},
                       **{f"anchor/0/{n}": torch.zeros_like(params[n]) for n in TRUNK}},
                      {"tasks": [0]})
    for _ in range(2):
        assert float(s.penalty(ctx).detach()) == pytest.approx(2.0 * squares, rel=1e-5)
    assert len(builds) == 1
    model.replace_graph(model.graph)
    with torch.no_grad():
        for n in TRUNK:
            model.named_parameters()[n].mul_(2.0)
    for _ in range(2):
        assert float(s.penalty(ctx).detach()) == pytest.approx(8.0 * squares, rel=1e-5)
    assert len(builds) == 2


def _online_state(params: dict, names: list[str], fisher: torch.Tensor | float) -> dict:
    return {**{f"fisher/all/{n}": torch.full(params[n].shape, fisher, dtype=torch.float64)
               for n in names},
            **{f"anchor/latest/{n}": params[n].detach().clone() for n in names}}


def test_online_ewc_adds_a_loaded_double_fisher_in_the_new_fishers_precision():
    """F <- gamma F + F_new on the task's sample budget (5 of 36), held as float32 like the
    parameters even when the running sum was loaded as float64."""
    from test_strategies import context, mlp, synthetic

    from growth.regularizers import task_fisher
    from growth.strategies import make_strategy

    tasks, model = synthetic(2), mlp(n_heads=2)
    ctx = context(model, tasks, 1)
    params = model.named_parameters()
    s = make_strategy("ewc", {"mode": "online", "gamma": 0.5, "fisher_samples": 5})
    s.load_state_dict(_online_state(params, [*TRUNK, "head0.weight"], 2.0), {"tasks": [0]})
    s.consolidate(ctx)
    new, every = task_fisher(ctx, tasks[1], 5), task_fisher(ctx, tasks[1], None)
    assert any(not torch.allclose(new[n], every[n]) for n in new)
    assert s.finished() == [0, 1]
    for n in new:
        running = s.state[f"fisher/all/{n}"]
        assert running.dtype == torch.float32, n
        old = 2.0 if n in TRUNK else 0.0
        torch.testing.assert_close(running, 0.5 * old + new[n])
    assert torch.equal(s.state["fisher/all/head0.weight"],
                       torch.full(params["head0.weight"].shape, 1.0, dtype=torch.float64))


def test_online_ewc_refuses_a_running_fisher_of_another_shape_by_name():
    from test_strategies import context, mlp, synthetic

    from growth.errors import ShapeError
    from growth.strategies import make_strategy

    tasks, model = synthetic(2), mlp(n_heads=2)
    ctx = context(model, tasks, 1)
    params = model.named_parameters()
    s = make_strategy("ewc", {"mode": "online"})
    state = _online_state(params, TRUNK, 1.0)
    state["fisher/all/features.weight"] = torch.ones(5, 12)
    s.load_state_dict(state, {"tasks": [0]})
    with pytest.raises(ShapeError, match=r"^state of parameter 'features.weight' has shapes "
                                         r"\(5, 12\) and \(12, 12\)"):
        s.consolidate(ctx)


@pytest.mark.parametrize("name", ["ewc", "mwc"])
def test_separate_fishers_are_measured_on_the_sample_budget(name):
    from test_strategies import context, mlp, synthetic

    from growth.regularizers import task_fisher
    from growth.strategies import make_strategy

    tasks, model = synthetic(1), mlp(n_heads=1)
    ctx = context(model, tasks, 0)
    s = make_strategy(name, {"fisher_samples": 5})
    s.consolidate(ctx)
    some, every = task_fisher(ctx, tasks[0], 5), task_fisher(ctx, tasks[0], None)
    assert any(not torch.allclose(some[n], every[n]) for n in some)
    assert s.finished() == [0]
    for n, f in some.items():
        torch.testing.assert_close(s.state[f"fisher/0/{n}"], f)


def test_state_of_another_shape_than_its_parameter_is_refused_naming_the_strategy():
    from test_strategies import context, mlp, synthetic

    from growth.errors import ShapeError
    from growth.strategies import make_strategy

    tasks, model = synthetic(1), mlp(n_heads=1)
    s = make_strategy("ewc", {})
    s.state = {"fisher/0/fc1.weight": torch.ones(3, 3)}
    with pytest.raises(ShapeError, match=r"^ewc state 'fisher/0/fc1.weight' has shape \(3, 3\) "
                                         r"but parameter 'fc1.weight' now has \(12, 16\)"):
        s.follow(context(model, tasks, 0), [])


# ---- MWC ---------------------------------------------------------------------------------------
def test_fisher_cosine_of_tiny_fishers_is_their_angle():
    """cos([a, 0], [a, a]) = 1/sqrt(2) at any scale a: Fishers of a saturated network are tiny,
    and their relatedness must not collapse towards 0."""
    from growth.strategies.mwc import fisher_cosine

    for a in (1.0, 1e-12):
        x, y = {"w": torch.tensor([a, 0.0])}, {"w": torch.tensor([a, a])}
        assert fisher_cosine(x, y, ["w"]) == pytest.approx(1 / math.sqrt(2), rel=1e-9)


def test_fisher_cosine_over_no_shared_parameter_is_zero():
    from growth.strategies.mwc import fisher_cosine

    one = {"a": torch.ones(2)}
    assert fisher_cosine(one, {"b": torch.ones(2)}, ["a", "b"]) == 0.0
    assert fisher_cosine(one, one, []) == 0.0


def test_fisher_cosine_refuses_fishers_of_two_shapes_by_name():
    from growth.errors import ShapeError
    from growth.strategies.mwc import fisher_cosine

    with pytest.raises(ShapeError, match=r"^state of parameter 'fc1.bias' has shapes \(2,\) "
                                         r"and \(3,\)"):
        fisher_cosine({"fc1.bias": torch.ones(2)}, {"fc1.bias": torch.ones(3)}, ["fc1.bias"])


def test_relatedness_weights_are_a_double_precision_scaled_softmax():
    from growth.strategies.mwc import relatedness_weights

    r, beta = [0.1, 0.25, 0.7], 3.0
    e = [math.exp(beta * v) for v in r]
    w = relatedness_weights(r, beta)
    assert w == pytest.approx([3 * v / sum(e) for v in e], rel=1e-13)
    assert relatedness_weights([], beta) == []


def test_mwc_records_empty_relatedness_for_its_first_task():
    from test_strategies import context, mlp, synthetic

    from growth.strategies import make_strategy

    tasks, model = synthetic(1), mlp(n_heads=1)
    s = make_strategy("mwc", {})
    s.before_task(context(model, tasks, 0))
    assert s.extra == {"relatedness": {"0": {"tasks": [], "r": [], "w": []}}}


def test_mwc_relatedness_uses_the_new_tasks_fisher_on_the_sample_budget():
    """r_0 = cosine over the trunk of F_0 (here all ones) and F^_1 on 5 of task 1's samples."""
    from test_strategies import context, mlp, synthetic

    from growth.regularizers import task_fisher
    from growth.strategies import make_strategy

    tasks, model = synthetic(2), mlp(n_heads=2)
    ctx = context(model, tasks, 1)
    params = model.named_parameters()
    s = make_strategy("mwc", {"fisher_samples": 5})
    s.load_state_dict({**{f"fisher/0/{n}": torch.ones_like(params[n]) for n in TRUNK},
                       **{f"anchor/0/{n}": params[n].detach().clone() for n in TRUNK}},
                      {"tasks": [0]})
    s.before_task(ctx)

    def cosine_with_ones(fisher: dict) -> float:
        v = torch.cat([fisher[n].flatten() for n in TRUNK]).double()
        return float(v.sum() / (v.norm() * math.sqrt(v.numel())))

    r = cosine_with_ones(task_fisher(ctx, tasks[1], 5))
    assert r != pytest.approx(cosine_with_ones(task_fisher(ctx, tasks[1], None)), rel=1e-3)
    assert s.extra["relatedness"]["1"] == {"tasks": [0], "r": pytest.approx([r], rel=1e-9),
                                           "w": [1.0]}


# ---- strategy base -----------------------------------------------------------------------------
def test_the_base_loss_hook_is_cross_entropy():
    from growth.strategies import make_strategy

    s = make_strategy("finetune", {})
    logits, y = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0])
    by_hand = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(1.0))) / 2
    assert float(s.loss(None, None, y, logits)) == pytest.approx(by_hand, rel=1e-6)


def test_the_default_size_parts_are_the_trunk_the_heads_and_extra_tensors():
    """mlp with 2 heads: trunk fc1 (12x16 + 12) and features (12x12 + 12) = 360 parameters,
    heads 2 x (4x12 + 4) = 104, no extra tensors."""
    from test_strategies import mlp

    from growth.strategies import make_strategy

    model = mlp(n_heads=2)
    params = model.named_parameters()
    parts = make_strategy("finetune", {}).size_parts(model)
    assert set(parts) == {"trunk", "heads", "extra"}
    assert [id(p) for p in parts["trunk"]] == [id(params[n]) for n in TRUNK]
    assert [id(p) for p in parts["heads"]] == [
        id(params[f"head{i}.{w}"]) for i in (0, 1) for w in ("weight", "bias")]
    assert sum(p.numel() for p in parts["trunk"]) == 360
    assert sum(p.numel() for p in parts["heads"]) == 104
    assert parts["extra"] == []


def test_a_strategy_built_without_settings_takes_its_documented_defaults():
    from growth.strategies.ewc import EWC, EWCParams

    s = EWC()
    assert isinstance(s.params, EWCParams)
    assert (s.params.lam, s.params.mode, s.params.gamma, s.params.fisher_samples) == (
        50.0, "separate", 1.0, 1000)
    assert s.state == {} and s.extra == {}
    given = EWCParams(**{"lambda": 3.0})
    assert EWC(given).params is given
