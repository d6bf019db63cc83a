"""Metrics against hand-computed values: ACC/BWT/FWT, partial runs, sizes, metrics files."""

import csv
import json
import math

import numpy as np
import pytest

from growth.errors import GrowthError, ReportError
from growth.metrics import (
    RMatrix,
    acc,
    bwt,
    finished_tasks,
    fwt,
    make_metrics,
    read_metrics,
    size_report,
    summarize,
    tensor_bytes,
    write_metrics,
)

NAN = math.nan

# 3 tasks. Row 0 = random init, row i = after training task i (1-based, as in docs/methods.md).
R3 = [
    [0.10, 0.20, 0.30],  # init
    [0.90, 0.25, 0.35],  # after task 1
    [0.80, 0.85, 0.40],  # after task 2
    [0.70, 0.75, 0.95],  # after task 3
]
# ACC = (0.70 + 0.75 + 0.95) / 3                         = 2.40 / 3 = 0.80
# BWT = ((0.70 - 0.90) + (0.75 - 0.85)) / 2               = -0.30 / 2 = -0.15
# FWT = ((R[1][2] - R[0][2]) + (R[2][3] - R[0][3])) / 2
#     = ((0.25 - 0.20) + (0.40 - 0.30)) / 2               = 0.15 / 2 = 0.075


def test_three_task_matrix_matches_hand_computation():
    assert acc(R3) == pytest.approx(0.80)
    assert bwt(R3) == pytest.approx(-0.15)
    assert fwt(R3) == pytest.approx(0.075)
    assert summarize(R3) == pytest.approx({"acc": 0.80, "bwt": -0.15, "fwt": 0.075})


def test_one_task_has_accuracy_but_no_transfer():
    R1 = [[0.1], [0.9]]
    assert acc(R1) == pytest.approx(0.9)
    assert math.isnan(bwt(R1))
    assert math.isnan(fwt(R1))


def test_partial_matrix_is_scored_as_a_shorter_finished_run():
    # The run above stopped after task 2; task-3 column of row 2 was measured, row 3 was not.
    partial = [row[:] for row in R3]
    partial[3] = [NAN, NAN, NAN]
    # Over 2 tasks: ACC = (0.80 + 0.85) / 2 = 0.825, BWT = 0.80 - 0.90 = -0.10,
    # FWT = R[1][2] - R[0][2] = 0.25 - 0.20 = 0.05.
    assert finished_tasks(partial) == 2
    assert summarize(partial) == pytest.approx({"acc": 0.825, "bwt": -0.10, "fwt": 0.05})
    # After one task only: ACC = 0.90, no BWT/FWT yet.
    s1 = summarize(R3, upto=1)
    assert s1["acc"] == pytest.approx(0.90)
    assert math.isnan(s1["bwt"]) and math.isnan(s1["fwt"])


def test_nothing_finished_gives_nan_everywhere():
    empty = [[0.1, 0.2], [NAN, NAN], [NAN, NAN]]
    assert finished_tasks(empty) == 0
    assert all(math.isnan(v) for v in summarize(empty).values())


def test_missing_entry_needed_by_a_metric_makes_it_nan():
    R = [row[:] for row in R3]
    R[0] = [NAN, NAN, NAN]  # initial model not evaluated: FWT undefined, the rest is fine
    s = summarize(R)
    assert math.isnan(s["fwt"])
    assert s["acc"] == pytest.approx(0.80) and s["bwt"] == pytest.approx(-0.15)


def test_none_entries_read_as_nan():
    R = [[0.1, None], [0.9, 0.3], [None, None]]
    assert finished_tasks(R) == 1
    assert summarize(R)["acc"] == pytest.approx(0.9)


@pytest.mark.parametrize("bad", [[[0.1, 0.2]], [[0.1], [0.2], [0.3]], [[0.1, 0.2], [0.3]]])
def test_bad_shapes_are_typed_errors(bad):
    with pytest.raises(ReportError):
        acc(bad)


def test_upto_out_of_range_is_a_typed_error():
    with pytest.raises(ReportError, match="upto"):
        summarize(R3, upto=4)


def test_rmatrix_records_incrementally_and_round_trips():
    r = RMatrix(2)
    assert np.isnan(r.values).all()
    r.record(0, 0, 0.5)
    r.record(0, 1, 0.4)
    r.record(1, 0, 0.9)
    r.record(1, 1, 0.45)
    assert r.row(1).tolist() == [0.9, 0.45]
    # The init row and after task 1 are known; after task 2 is not.
    assert r.to_list() == [[0.5, 0.4], [0.9, 0.45], [None, None]]
    back = RMatrix.from_list(r.to_list())
    assert back.to_list() == r.to_list()
    assert back.summarize() == pytest.approx({"acc": 0.9, "bwt": NAN, "fwt": NAN}, nan_ok=True)
    json.dumps(r.to_list(), allow_nan=False)  # strict JSON


def test_rmatrix_rejects_out_of_range_indices():
    r = RMatrix(2)
    with pytest.raises(ReportError, match="after_task"):
        r.record(3, 0, 0.1)
    with pytest.raises(ReportError, match="task"):
        r.record(1, 2, 0.1)
    with pytest.raises(ReportError):
        RMatrix(0)


def test_error_is_a_growth_error():
    assert issubclass(ReportError, GrowthError)


# --------------------------------------------------------------------------- sizes


def test_numpy_sizes():
    assert tensor_bytes(np.zeros((3, 4), dtype=np.float32)) == 48
    assert tensor_bytes(np.zeros(10, dtype=bool)) == 10


def test_torch_sizes_by_dtype_and_relative():
    torch = pytest.importorskip("torch")
    w = torch.zeros(10, 20)  # float32: 200 params, 800 bytes
    b = torch.zeros(20, dtype=torch.float16)  # 20 params, 40 bytes
    mask = torch.ones(10, 20, dtype=torch.bool)  # 200 elements, 1 byte each = 200 bytes
    assert tensor_bytes(w) == 800
    assert tensor_bytes(b) == 40
    assert tensor_bytes(mask) == 200
    rep = size_report({"trunk": [w], "heads": iter([b]), "masks": [mask]}, base_params=210)
    assert rep["trunk_params"] == 200 and rep["trunk_bytes"] == 800
    assert rep["heads_params"] == 20 and rep["heads_bytes"] == 40
    assert rep["masks_params"] == 200 and rep["masks_bytes"] == 200
    assert rep["params"] == 420 and rep["bytes"] == 1040
    assert rep["relative"] == pytest.approx(2.0)  # 420 / 210


def test_size_report_without_base_and_empty_group():
    rep = size_report({"trunk": [np.zeros(5, dtype=np.float64)], "adapters": []}, None)
    assert rep == {
        "params": 5,
        "bytes": 40,
        "trunk_params": 5,
        "trunk_bytes": 40,
        "adapters_params": 0,
        "adapters_bytes": 0,
        "relative": None,
    }


# --------------------------------------------------------------------------- metrics files


def _metrics(R=R3):
    return make_metrics(
        run={"name": "demo", "strategy": "finetune", "seed": 1, "stream": "s", "dataset": "d"},
        tasks=["a", "b", "c"],
        R=R,
        sizes=[{"task": 0, "params": 10, "bytes": 40, "relative": 1.0}],
        wall_time_s=[1.5],
    )


def test_make_metrics_fills_scores_and_progress():
    m = _metrics()
    assert m["acc"] == pytest.approx(0.8) and m["bwt"] == pytest.approx(-0.15)
    assert m["finished_tasks"] == 3
    assert m["search"] == {"children": 0, "child_time_s": 0.0}
    with pytest.raises(ReportError, match="task names"):
        make_metrics({}, ["a"], R3)
    # Row 3 half measured while the campaign says 2 tasks are done: scores cover 2 tasks.
    R = [row[:] for row in R3]
    R[3] = [0.7, NAN, NAN]
    m2 = make_metrics({}, ["a", "b", "c"], R, finished=2)
    assert m2["finished_tasks"] == 2 and m2["acc"] == pytest.approx(0.825)
    assert m2["R"][3] == [0.7, None, None]


def test_write_then_read_round_trip_with_partial_run(tmp_path):
    R = [row[:] for row in R3]
    R[3] = [NAN, NAN, NAN]
    m = _metrics(R)
    assert m["bwt"] == pytest.approx(-0.10) and m["finished_tasks"] == 2
    path = write_metrics(tmp_path / "run", m)
    assert path.name == "metrics.json"
    text = path.read_text()
    assert "NaN" not in text  # strict JSON: unmeasured entries are null
    back = read_metrics(tmp_path / "run")
    assert back["R"][3] == [None, None, None]
    assert back == json.loads(json.dumps(m))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.csv", "metrics.json"]


def test_csv_has_one_row_per_measured_entry(tmp_path):
    R = [row[:] for row in R3]
    R[3] = [NAN, NAN, NAN]
    write_metrics(tmp_path, _metrics(R))
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9  # 3 measured rows x 3 tasks
    assert rows[4] == {"after_task": "1", "task": "1", "task_name": "b", "accuracy": "0.25"}


def test_missing_metrics_names_the_file(tmp_path):
    with pytest.raises(ReportError, match="metrics.json"):
        read_metrics(tmp_path)


def test_corrupt_metrics_names_the_file(tmp_path):
    (tmp_path / "metrics.json").write_text('{"run": ')
    with pytest.raises(ReportError, match=str(tmp_path / "metrics.json")):
        read_metrics(tmp_path)


@pytest.mark.parametrize(
    "data, key",
    [
        ({"run": {}, "tasks": ["a"]}, "R"),
        ({"run": {}, "tasks": ["a"], "R": [[0.1, 0.2]]}, "R"),
        ({"run": {}, "tasks": ["a", "b"], "R": [[0.1], [0.2]]}, "tasks"),
        ([1, 2], "object"),
        ({"run": "x", "tasks": ["a"], "R": [[0.1], [0.2]]}, "'run' must be an object"),
        ({"run": {}, "tasks": 3, "R": [[0.1], [0.2]]}, "'tasks' must be a list"),
    ],
)
def test_malformed_metrics_are_rejected(tmp_path, data, key):
    (tmp_path / "metrics.json").write_text(json.dumps(data))
    with pytest.raises(ReportError, match=key):
        read_metrics(tmp_path)


def test_failed_write_leaves_previous_file_intact(tmp_path):
    write_metrics(tmp_path, _metrics())
    before = (tmp_path / "metrics.json").read_text()
    bad = _metrics()
    bad["R"] = [[0.1]]  # wrong shape: refused before anything is written
    with pytest.raises(ReportError):
        write_metrics(tmp_path, bad)
    assert (tmp_path / "metrics.json").read_text() == before
    assert not list(tmp_path.glob(".*.tmp"))


GOOD = {"run": {"name": "r"}, "tasks": ["a"], "R": [[0.1], [0.9]],
        "sizes": [{"task": 0, "params": 10, "bytes": 40, "relative": None}],
        "wall_time_s": [1.5], "search": {"children": 0, "child_time_s": 0.0}}


@pytest.mark.parametrize(
    "change, key",
    [
        ({"run": "x"}, r"'run' must be an object, got the string 'x'"),
        ({"run": None}, r"'run' must be an object, got null"),
        ({"sizes": 3}, r"'sizes' .* must be a list, got the number 3"),
        ({"sizes": {"params": 3}}, r"'sizes' .* must be a list, got an object"),
        ({"sizes": [3]}, r"'sizes'\[0\] must be an object, got the number 3"),
        ({"sizes": [{"params": 1}, "big"]}, r"'sizes'\[1\] must be an object"),
        ({"sizes": [{"params": "10"}]}, r"'sizes'\[0\]\['params'\] must be a number"),
        ({"wall_time_s": "a"}, r"'wall_time_s' .* must be a list, got the string 'a'"),
        ({"wall_time_s": ["a"]}, r"'wall_time_s'\[0\] must be a number"),
        ({"wall_time_s": [1.0, None]}, r"'wall_time_s'\[1\] must be a number"),
        ({"wall_time_s": [True]}, r"'wall_time_s'\[0\] must be a number"),
        ({"search": [1]}, r"'search' must be an object, got a list"),
        ({"search": {"children": "many"}}, r"'search'\['children'\] must be a number"),
        ({"storage": 5}, r"'storage' .* must be an object, got the number 5"),
        ({"peak_rss_bytes": [1, "2"]}, r"'peak_rss_bytes'\[1\] must be a number of bytes"),
        ({"storage": {"run_bytes": "5 MB"}}, r"'storage'\['run_bytes'\] must be a number"),
    ],
)
def test_mistyped_entries_name_the_file_and_the_key(tmp_path, change, key):
    (tmp_path / "metrics.json").write_text(json.dumps({**GOOD, **change}))
    with pytest.raises(ReportError, match=str(tmp_path / "metrics.json") + ": " + key):
        read_metrics(tmp_path)


@pytest.mark.parametrize(
    "data",
    [
        {k: GOOD[k] for k in ("run", "tasks", "R")},
        {**GOOD, "sizes": None, "wall_time_s": None, "search": None, "storage": None},
        {**GOOD, "storage": {"run_bytes": 4096, "checkpoint_bytes": None}},
        {**GOOD, "sizes": [], "wall_time_s": []},
        {**GOOD, "search": {"children": 2, "child_time_s": 3, "best": "child-7"}},
    ],
)
def test_absent_or_empty_entries_and_extra_search_keys_are_accepted(tmp_path, data):
    (tmp_path / "metrics.json").write_text(json.dumps(data))
    assert read_metrics(tmp_path) == data


def test_mistyped_entries_are_refused_before_writing(tmp_path):
    with pytest.raises(ReportError, match="'wall_time_s'"):
        write_metrics(tmp_path, {**_metrics(), "wall_time_s": "slow"})
    assert not (tmp_path / "metrics.json").exists()


def test_stored_parts_count_bits_as_stored_and_side_data_only_in_bytes():
    from growth.metrics import Stored, index_bits

    assert [index_bits(v) for v in (1, 2, 3, 4, 5, 6, 9, 256, 257)] == [1, 1, 2, 2, 3, 3, 4, 8, 9]
    torch = pytest.importorskip("torch")
    w = torch.zeros(100, 10)  # 1000 float32 weights: 4000 bytes
    owner = Stored(1000, index_bits(6), parameters=False)  # owners 0..5 in 3 bits: 375 bytes
    picks = Stored(1001, 1, parameters=False)  # 1001 bits: 126 bytes (rounded up)
    adapter = Stored(50, 32)  # learned: params and bytes
    rep = size_report({"trunk": [w], "masks": [owner, picks], "adapters": [adapter]},
                      base_params=1000, base_bytes=4000)
    assert rep["masks_params"] == 0 and rep["masks_bytes"] == 375 + 126
    assert rep["adapters_params"] == 50 and rep["adapters_bytes"] == 200
    assert rep["params"] == 1050 and rep["bytes"] == 4000 + 501 + 200
    assert rep["relative"] == pytest.approx(1.05)
    assert rep["relative_bytes"] == pytest.approx(4701 / 4000)
