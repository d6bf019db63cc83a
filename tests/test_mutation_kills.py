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
