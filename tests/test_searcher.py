"""The Tune Searcher adapter, the trial body and the search records, without a Ray cluster:
the controller observes a generation in proposal order whatever order trials finish in,
known children are not trained again, the searcher survives cloudpickle and save/restore,
a trial's child keeps its parent's function, and records survive a torn write."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import ray.cloudpickle as cloudpickle
import torch
from growth.controllers import make_controller
from growth.controllers.records import (
    ChildRecord,
    append_record,
    board_rows,
    leaderboard,
    read_records,
)
from growth.controllers.searcher import ControllerSearcher, Generation
from growth.controllers.trial import (
    CHILD_FILE,
    TrialSpec,
    child_seed,
    save_strategy_state,
    train_child,
)
from searchkit import CHILD_TRAIN, accuracy, digits_task, small_space, trained_base

from growth.errors import CheckpointError, ConfigError
from growth.graph import NetGraph
from growth.strategies import make_strategy


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("searcher")
    task = digits_task()
    base, acc = trained_base(task, tmp / "base", hidden=(16, 16), epochs=3)
    return tmp, task, base, acc, small_space(base)


def _searcher(setup, seed: int = 1, n: int = 4, known=None, exclude=frozenset()
              ) -> ControllerSearcher:
    tmp, _, _, _, space = setup
    controller = make_controller("random", space, {"wider_actions": 2, "deeper_actions": 1},
                                 seed=seed)
    return ControllerSearcher(controller, Generation(0, n, str(tmp / "base"),
                                                     {"spec": {}, "attempt": 0}, known or {},
                                                     exclude), seed=7)


def _child_trained_by(setup, strategy: str, folder: Path) -> dict[str, Any]:
    """Child 0 of a one-child generation, trained with the registered `strategy`; its
    metrics (the training must succeed)."""
    _, task, _, _, space = setup
    config = _searcher(setup, n=1).suggest("x")
    config["spec"] = TrialSpec(train=CHILD_TRAIN, strategy={"name": strategy}).model_dump(
        mode="json")
    m = train_child(config, task, space, folder)
    assert m["status"] == "ok", m["error"]
    return m


class Recording:
    """Wraps a controller; remembers what observe() received."""

    def __init__(self, inner) -> None:
        self.inner, self.name, self.observed = inner, inner.name, []

    def __getattr__(self, item):
        return getattr(self.inner, item)

    def observe(self, results) -> None:
        self.observed.append(list(results))
        self.inner.observe(results)


def test_generation_is_observed_once_in_proposal_order(setup) -> None:
    s = _searcher(setup)
    s.controller = Recording(s.controller)
    configs = {f"t{i}": s.suggest(f"t{i}") for i in range(4)}
    assert s.suggest("t9") is None  # nothing more until the generation is over
    assert [c["index"] for c in configs.values()] == [0, 1, 2, 3]
    assert configs["t2"]["seed"] == child_seed(7, 0, 2) and configs["t2"]["key"] == "g000c02"
    json.dumps(configs)  # trial configs are plain JSON
    accs = {"t3": 0.5, "t0": 0.25, "t2": float("nan"), "t1": 0.75}
    for tid, acc in accs.items():  # finishing out of order, one NaN, one error
        assert not s.observed
        s.on_trial_complete(tid, None if tid == "t1" else {"status": "ok", "val_acc": acc},
                            error=tid == "t1")
    s.on_trial_complete("never-seen", {"status": "ok", "val_acc": 1.0})  # tolerated
    assert s.observed and len(s.controller.observed) == 1
    assert s.suggest("t10") == "FINISHED"  # a single generation: the search is over
    got = [(p.arch, acc) for p, acc in s.controller.observed[0]]
    assert got == [(s.proposals[0].arch, 0.25), (s.proposals[1].arch, None),
                   (s.proposals[2].arch, None), (s.proposals[3].arch, 0.5)]


def test_the_searcher_tells_tune_it_maximises_the_validation_accuracy(setup) -> None:
    """Tune reads a searcher's metric and mode (its own are left unset by the driver): the
    children's `val_acc`, higher is better."""
    s = _searcher(setup)
    assert (s.metric, s.mode) == ("val_acc", "max")


def test_children_finished_or_trained_before_are_not_trained_again(setup) -> None:
    first = _searcher(setup, seed=5)
    first.advance()
    archs = [p.arch for p in first.proposals]
    assert len(set(archs)) == 4  # a generation's children are distinct
    s = _searcher(setup, seed=5, known={2: 0.6})  # an earlier attempt finished child 2
    s.advance()
    assert [p.arch for p in s.proposals] == archs  # same seed, same proposals
    assert sorted(s.to_train) == [0, 1, 3] and s.results[2] == 0.6
    for i in sorted(s.to_train):
        s.on_trial_complete(f"t{i}", None)  # unknown ids: the index comes from the config
        s.on_trial_complete(f"t{i}", {"status": "ok", "val_acc": 0.1 * i,
                                      "config": s.trial_config(i)})
    assert s.observed and s.results == {0: 0.0, 1: 0.1, 2: 0.6, 3: 0.30000000000000004}
    later = _searcher(setup, seed=5, exclude=frozenset(archs))  # a later generation's
    later.advance()
    assert len(later.proposals) == 4 and not {p.arch for p in later.proposals} & set(archs)


def test_the_searcher_survives_cloudpickle_and_save_restore(setup, tmp_path: Path) -> None:
    s = _searcher(setup, seed=5)
    s.suggest("a")
    s.suggest("b")
    s.on_trial_complete("a", {"status": "ok", "val_acc": 0.9})
    clone = cloudpickle.loads(cloudpickle.dumps(s))  # what Tune writes into tuner.pkl
    assert clone.running == {"b": 1} and clone.results == {0: 0.9}
    s.save(str(tmp_path / "searcher.pkl"))
    fresh = _searcher(setup, seed=99)  # a different generator until restored
    fresh.restore(str(tmp_path / "searcher.pkl"))
    assert [p.arch for p in fresh.proposals] == [p.arch for p in s.proposals]
    assert fresh.pending == s.pending and fresh.running == s.running
    parent = NetGraph.load(setup[0] / "base")
    assert ([p.arch for p in fresh.controller.propose(parent, 3)] ==
            [p.arch for p in s.controller.propose(parent, 3)])  # the controller's state too


def test_a_searcher_unpickled_without_its_source_has_no_generation_to_go_on_to(setup
                                                                               ) -> None:
    """Tune's pickled searcher keeps no source (the driver): once its generation is over,
    advancing it ends the search instead of asking a source that is not there."""
    s = _searcher(setup, n=1)
    s.suggest("a")
    s.on_trial_complete("a", {"status": "ok", "val_acc": 0.5})
    clone = cloudpickle.loads(cloudpickle.dumps(s))
    assert clone.source is None
    assert clone.advance() is False and clone.done


def test_a_trial_reported_failed_or_of_another_generation_is_no_result(setup) -> None:
    """A trial counts only when it reports status "ok" without an error: one that failed, or
    errored, is None whatever accuracy it carries; a trial the searcher did not hand out counts
    only when its config names this generation and an index."""
    s = _searcher(setup, n=2)
    s.advance()
    s.on_trial_complete("old", {"status": "ok", "val_acc": 0.9,
                                "config": {"generation": 3, "index": 0}})
    s.on_trial_complete("odd", {"status": "ok", "val_acc": 0.9, "config": {"generation": 0}})
    assert s.results == {}
    s.suggest("a"), s.suggest("b")
    s.on_trial_complete("a", {"status": "failed", "val_acc": 0.8})
    s.on_trial_complete("b", {"status": "ok", "val_acc": 0.7}, error=True)
    assert s.observed and s.results == {0: None, 1: None}


def test_a_childs_first_result_stands_and_an_index_out_of_range_is_ignored(setup) -> None:
    """A child reported twice (a retried trial) keeps its first accuracy; an index the
    generation does not have is ignored and does not complete it."""
    s = _searcher(setup, n=2)
    s.advance()
    s.result(0, 0.5)
    s.result(0, 0.9)
    s.result(2, 0.1)
    s.result(-1, 0.1)
    assert s.results == {0: 0.5} and not s.observed
    s.result(1, 0.25)
    assert s.results == {0: 0.5, 1: 0.25} and s.observed


def test_finish_is_false_while_a_child_has_not_reported(setup) -> None:
    """Tune's fit returned with a child missing (an interrupt): the generation stays open."""
    s = _searcher(setup, n=2)
    s.suggest("a"), s.suggest("b")
    s.on_trial_complete("a", {"status": "ok", "val_acc": 0.5})
    assert s.finish() is False and not s.observed
    s.on_trial_complete("b", {"status": "ok", "val_acc": 0.25})
    assert s.finish() is True and s.ended


def test_save_and_restore_keep_the_controllers_baseline_and_update_count(setup,
                                                                        tmp_path: Path) -> None:
    """EAS keeps its reward baseline and update count beside its tensors: both come back."""
    tmp, _, _, _, space = setup
    params = {"wider_actions": 1, "deeper_actions": 1}

    def searcher(seed: int) -> ControllerSearcher:
        return ControllerSearcher(make_controller("eas", space, params, seed=seed),
                                  Generation(0, 2, str(tmp / "base"), {}, {}), seed=7)

    s = searcher(3)
    s.suggest("a"), s.suggest("b")
    s.on_trial_complete("a", {"status": "ok", "val_acc": 0.5})
    s.on_trial_complete("b", {"status": "ok", "val_acc": 0.25})
    assert s.controller.baseline == pytest.approx((math.tan(0.5 * math.pi / 2)
                                                   + math.tan(0.25 * math.pi / 2)) / 2)
    s.save(str(tmp_path / "searcher.pkl"))
    fresh = searcher(99)
    fresh.restore(str(tmp_path / "searcher.pkl"))
    assert (fresh.controller.baseline, fresh.controller.updates) == (s.controller.baseline, 1)


def test_train_child_starts_from_the_parent_and_saves_the_child(setup, tmp_path: Path
                                                                ) -> None:
    tmp, task, base, acc, space = setup
    s = _searcher(setup, n=1)
    config = s.suggest("x")
    config["spec"] = TrialSpec(train=CHILD_TRAIN).model_dump(mode="json")
    out = tmp_path / "child"
    m = train_child(config, task, space, out)
    assert m["status"] == "ok", m["error"]
    assert m["val_acc_before"] == pytest.approx(acc, abs=1e-12)
    child = NetGraph.load(out)
    assert space.arch(child) == config["arch"] and m["params"] == child.param_count()
    assert accuracy(child, task) == pytest.approx(m["val_acc"], abs=1e-12)
    batches = math.ceil(len(task.train[1]) / CHILD_TRAIN.batch_size)
    assert m["steps"] == CHILD_TRAIN.epochs * batches
    assert 0.0 < m["train_time_s"] <= m["end"] - m["start"]  # the training, within the call
    record = json.loads((out / "child.json").read_text())
    assert record["key"] == "g000c00" and record["actions"] == config["actions"]
    again = train_child(config, task, space, tmp_path / "again")  # its own seed: repeatable
    assert again["val_acc"] == m["val_acc"]


def test_the_tune_trial_reports_the_metrics_with_the_childs_folder_as_its_checkpoint(
        setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """`tune_trial` with Ray's runtime context and `tune.report` replaced by recorders (no Ray
    session): a child that trains is reported with its metrics, the node it ran on and a
    checkpoint of the folder holding its graph and record; a child that cannot be built is
    reported failed, without a checkpoint."""
    from types import SimpleNamespace

    import ray
    from growth.controllers.trial import tune_trial
    from ray import tune

    _, task, _, _, space = setup
    reported = []

    def report(metrics, checkpoint=None) -> None:  # the folder is gone once the trial returns
        files = None if checkpoint is None else sorted(p.name for p in
                                                       Path(checkpoint.path).iterdir())
        reported.append((metrics, files))

    monkeypatch.setattr(tune, "report", report)
    monkeypatch.setattr(ray, "get_runtime_context",
                        lambda: SimpleNamespace(get_node_id=lambda: "node-7"))
    config = _searcher(setup, n=1).suggest("x")
    config["spec"] = TrialSpec(train=CHILD_TRAIN).model_dump(mode="json")
    tune_trial(config, task, space)
    tune_trial({**config, "actions": [{"op": "no_such_operator"}]}, task, space)
    (ok, files), (failed, no_files) = reported
    assert (ok["status"], ok["node"], ok["key"]) == ("ok", "node-7", "g000c00"), ok["error"]
    assert {"child.json", "structure.json"} <= set(files)
    assert (failed["status"], failed["node"], no_files) == ("failed", "node-7", None)


def test_an_earlier_task_reaches_a_trial_as_its_fields_and_empty_splits() -> None:
    """`TaskMeta`: a task's identity, classes, offset and input shape travel as JSON, and
    come back as a Task of those fields with no sample in any split."""
    from growth.controllers.trial import TaskMeta

    from growth.data import build_stream

    task = build_stream({"dataset": "digits", "stream": "split", "n_tasks": 2, "seed": 0,
                         "max_train_per_task": 20})[1]
    meta = TaskMeta.model_validate_json(TaskMeta.of(task).model_dump_json())
    back = meta.task()
    assert (back.index, back.name, back.classes, back.n_classes, back.class_offset,
            back.input_shape) == (1, task.name, list(task.classes), 5, 5, (1, 8, 8))
    for x, y in (back.train, back.val, back.test):
        assert x.shape == (0, 1, 8, 8) and y.shape == (0,) and y.dtype == torch.int64


def test_a_childs_accuracies_are_scored_by_its_strategy(setup, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A strategy that overrides `evaluation` scores the child before and after training:
    one that predicts the head's least likely class gives the share of validation samples
    whose smallest output is their label, counted here on the parent and the saved child."""
    from contextlib import contextmanager

    from growth.compile import compile_graph
    from growth.strategies import STRATEGIES, Strategy

    class Contrary(Strategy):
        name = "contrary"

        @contextmanager
        def evaluation(self, ctx, task):
            head = ctx.model.head(ctx.head_of(task))
            yield lambda x: -head(x)

    def contrary(graph: NetGraph) -> float:
        x, y = task.val
        with torch.no_grad():
            return int((compile_graph(graph).eval()(x).argmin(1) == y).sum()) / len(y)

    monkeypatch.setitem(STRATEGIES, "contrary", Contrary)
    _, task, base, acc, _ = setup
    m = _child_trained_by(setup, "contrary", tmp_path / "child")
    assert contrary(base) < 0.5 * acc  # the two scorings are far apart
    assert m["val_acc_before"] == pytest.approx(contrary(base), abs=1e-12)
    assert m["val_acc"] == pytest.approx(contrary(NetGraph.load(tmp_path / "child")), abs=1e-12)


def test_a_trial_receives_the_training_and_validation_splits_and_no_test_sample(setup
                                                                               ) -> None:
    from growth.controllers.trial import trial_data

    _, task, _, _, _ = setup
    data = trial_data(task)
    assert data.train is task.train and data.val is task.val and len(task.test[1]) > 0
    x, y = data.test
    assert x.shape == (0, *task.input_shape) and y.shape == (0,) and y.dtype == torch.int64


def test_a_childs_seed_is_a_fixed_function_of_the_search_seed_generation_and_index() -> None:
    """Values by hand: (seed x 1000003 + generation x 7919 + index x 104729 + 11) modulo the
    prime 2^31 - 1, so a saved search trains the same children in a later version."""
    assert child_seed(0, 0, 0) == 11
    assert child_seed(1, 2, 3) == 1_000_003 + 2 * 7919 + 3 * 104_729 + 11 == 1_330_039
    assert child_seed(3000, 0, 0) == 3_000_009_011 - 2_147_483_647 == 852_525_364


def test_a_failed_childs_error_is_one_line_naming_where_it_was_raised() -> None:
    """Its type, the first line of its message and the file and line of the innermost frame
    (here `boom`'s raise, two calls deep); no place for an exception never raised."""
    from growth.controllers.trial import _one_line

    def boom() -> None:
        raise ValueError("first line\nsecond line")

    def outer() -> None:
        boom()

    try:
        outer()
    except ValueError as exc:
        raised = exc
    line = boom.__code__.co_firstlineno + 1
    assert _one_line(raised) == f"ValueError: first line (at test_searcher.py:{line})"
    assert _one_line(KeyError()) == "KeyError: "


def test_a_childs_strategy_hooks_see_the_trials_training_settings(
        setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hook that reads `ctx.train_config` in the child's fit (as HAT's training hook does)
    finds the spec's settings."""
    from contextlib import contextmanager

    from growth.strategies import STRATEGIES, Strategy

    seen = []

    class Reading(Strategy):
        name = "reading"

        @contextmanager
        def training(self, ctx):
            seen.append(ctx.train_config)
            yield

    monkeypatch.setitem(STRATEGIES, "reading", Reading)
    _child_trained_by(setup, "reading", tmp_path / "child")
    assert seen == [CHILD_TRAIN]


def test_a_class_incremental_child_trains_and_scores_the_shared_head(tmp_path: Path) -> None:
    """Under scenario "class" a child reads the one shared head with the task's labels offset
    by its first class: its accuracy is the argmax of that head against y + offset, counted
    here on the saved child."""
    from growth.search_spaces import make_space
    from growth.search_spaces.networks import add_head, mlp

    from growth.compile import compile_graph
    from growth.data import build_stream
    from growth.scenarios import SHARED_HEAD

    task = build_stream({"dataset": "digits", "stream": "split", "n_tasks": 2, "seed": 0,
                         "max_train_per_task": 60})[1]
    assert task.class_offset == 5
    torch.manual_seed(0)
    add_head(mlp(task.input_shape, [8]), SHARED_HEAD, 10).save(tmp_path / "parent")
    space = make_space({"widths": {"fc": [8, 12]}}, NetGraph.load(tmp_path / "parent"))
    spec = TrialSpec(train=CHILD_TRAIN, scenario="class").model_dump(mode="json")
    s = ControllerSearcher(make_controller("random", space, seed=0),
                           Generation(0, 1, str(tmp_path / "parent"), {"spec": spec,
                                                                       "attempt": 0}))
    m = train_child(s.suggest("x"), task, space, tmp_path / "child")
    assert m["status"] == "ok", m["error"]
    x, y = task.val
    with torch.no_grad():
        guess = compile_graph(NetGraph.load(tmp_path / "child")).eval()(x).argmax(1)
    assert m["val_acc"] == pytest.approx(int((guess == y + 5).sum()) / len(y), abs=1e-12)


def test_a_strategy_reaches_the_trial_by_reference(setup, tmp_path: Path) -> None:
    """A strong L2 pull, saved after its task and named in the spec, holds the child's old
    units near the parent's weights: its state followed the widened layer into the trial."""
    from growth.model import Model
    from growth.scenarios import labelers
    from growth.strategies import Context
    from growth.train import TrainConfig, learn_task

    tmp, task, base, _, space = setup
    strategy = make_strategy("l2", {"lambda": 2.0})
    ctx = Context(Model(base), task, [], *labelers("task"), torch.device("cpu"))
    learn_task(ctx, strategy, TrainConfig(epochs=0))  # anchors and importances of the parent
    folder = save_strategy_state(strategy, tmp_path / "state")
    config = _searcher(setup, n=1).suggest("x")
    action = {"op": "net2wider", "node": "fc1", "width": 48}
    child, _ = space.apply(base, [action])
    config.update(actions=[action], arch=space.arch(child))
    train = TrainConfig(epochs=3, lr=0.1, momentum=0.9)

    def moved(ref: dict) -> float:
        spec = TrialSpec(train=train, strategy=ref)
        m = train_child({**config, "spec": spec.model_dump(mode="json")}, task, space,
                        tmp_path / ref["name"])
        assert m["status"] == "ok", m["error"]
        w = NetGraph.load(tmp_path / ref["name"]).node("fc1").tensors["weight"][:16]
        return float((w - base.node("fc1").tensors["weight"]).abs().sum())

    held = moved({"name": "l2", "params": {"lambda": 2.0}, "state": str(folder)})
    free = moved({"name": "finetune"})
    assert held < 0.2 * free, (held, free)
    config["spec"] = TrialSpec(strategy={"name": "ewc", "state": str(folder)}).model_dump(
        mode="json")
    m = train_child(config, task, space, tmp_path / "wrong")
    assert m["status"] == "failed" and "CheckpointError" in m["error"] and "'l2'" in m["error"]
    assert f"{folder} holds the state of strategy 'l2'" in m["error"]  # names where it looked


def _one_child(setup, action: dict[str, Any], seed: int, **spec: Any) -> dict[str, Any]:
    """A one-child generation's config, its actions replaced by `action`, its seed by `seed`."""
    _, _, base, _, space = setup
    config = _searcher(setup, n=1).suggest("x")
    child, _ = space.apply(base, [action], sample=digits_task().train[0][:8])
    config.update(actions=[action], arch=space.arch(child), seed=seed,
                  spec=TrialSpec(**{"train": CHILD_TRAIN, **spec}).model_dump(mode="json"))
    return config


def test_a_child_trains_in_the_batch_order_of_its_own_seed(setup, tmp_path: Path) -> None:
    """The same exact (noise-free) child trained from seeds 11 and 12 ends with different
    weights: its seed orders the batches, not a fixed one."""
    _, task, _, _, space = setup
    action = {"op": "net2wider", "node": "fc1", "width": 24}
    weights = []
    for seed in (11, 12):
        m = train_child(_one_child(setup, action, seed), task, space, tmp_path / str(seed))
        assert m["status"] == "ok", m["error"]
        weights.append(NetGraph.load(tmp_path / str(seed)).node("fc1").tensors["weight"])
    assert not torch.equal(*weights)


def test_a_child_deepened_with_batchnorm_keeps_its_parents_function(setup, tmp_path: Path
                                                                   ) -> None:
    """A layer with BatchNorm inserted after fc1 gets its statistics from a batch of the
    task's training inputs, so the child starts at its parent's validation accuracy."""
    _, task, _, acc, space = setup
    config = _one_child(setup, {"op": "net2deeper", "after": "fc1", "batchnorm": True}, 3)
    m = train_child(config, task, space, tmp_path / "child")
    assert m["status"] == "ok", m["error"]
    assert m["val_acc_before"] == pytest.approx(acc, abs=1e-12)


def test_a_childs_hooks_see_its_seed_earlier_tasks_device_and_settings(
        setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A strategy's hooks, inside a trial, see the child's seed, the earlier tasks the spec
    names (identity only, no data), the device and the training settings."""
    from growth.controllers.trial import TaskMeta

    from growth.strategies import STRATEGIES, Strategy

    seen: list[tuple[Any, ...]] = []

    class Probe(Strategy):
        name = "probe"

        def after_step(self, ctx) -> None:
            seen.append((ctx.seed, [(t.index, t.name, len(t.train[1])) for t in ctx.seen],
                         ctx.device, ctx.train_config))

    monkeypatch.setitem(STRATEGIES, "probe", Probe)
    _, task, _, _, space = setup
    earlier = TaskMeta(index=0, name="t0", classes=[0, 1], n_classes=2, class_offset=0,
                       input_shape=list(task.input_shape))
    config = _one_child(setup, {"op": "net2wider", "node": "fc1", "width": 24}, 5,
                        strategy={"name": "probe"}, seen=[earlier])
    m = train_child(config, task, space, tmp_path / "child")
    assert m["status"] == "ok", m["error"]
    assert seen[0] == (5, [(0, "t0", 0)], torch.device("cpu"), CHILD_TRAIN)


def test_a_child_saves_its_optimizers_moments_for_the_next_generation(setup, tmp_path: Path
                                                                     ) -> None:
    """With momentum, the child's folder holds the optimizer's moments, one buffer per
    parameter of the child, shaped like it (a later generation goes on from them)."""
    from growth.controllers.trial import MOMENTS

    from growth.io import load_tensors
    from growth.model import Model
    from growth.train import TrainConfig

    _, task, _, _, space = setup
    train = TrainConfig(epochs=1, lr=0.02, batch_size=32, momentum=0.9)
    config = _one_child(setup, {"op": "net2wider", "node": "fc1", "width": 24}, 5, train=train)
    m = train_child(config, task, space, tmp_path / "child")
    assert m["status"] == "ok", m["error"]
    params = Model(NetGraph.load(tmp_path / "child")).named_parameters()
    saved = load_tensors(tmp_path / "child" / MOMENTS)
    assert {k: tuple(t.shape) for k, t in saved.items()} == {
        f"{n}/momentum_buffer": tuple(p.shape) for n, p in params.items()}
    assert saved["fc1.weight/momentum_buffer"].shape == (24, 64)
    assert saved["fc1.weight/momentum_buffer"].abs().sum() > 0


def test_a_child_reads_the_strategy_state_its_parent_folder_holds(setup, tmp_path: Path
                                                                 ) -> None:
    """A parent folder holding a strategy's state (a child of a later generation) is where the
    child's strategy state comes from: state saved by L2 there refuses a child told to train
    with EWC, before any training."""
    tmp, task, base, _, space = setup
    parent = tmp_path / "parent"
    base.save(parent)
    save_strategy_state(make_strategy("l2", {"lambda": 2.0}), parent)
    config = _searcher(setup, n=1).suggest("x")
    config.update(parent=str(parent), spec=TrialSpec(
        train=CHILD_TRAIN, strategy={"name": "ewc"}).model_dump(mode="json"))
    m = train_child(config, task, space, tmp_path / "child")
    assert m["status"] == "failed" and "CheckpointError" in m["error"] and "'l2'" in m["error"]
    assert f"{parent} holds the state of strategy 'l2'" in m["error"]
    # a failed child's figures: no accuracy (NaN, not 0), nothing trained, no record file
    assert math.isnan(m["val_acc"]) and math.isnan(m["val_acc_before"])
    assert (m["params"], m["train_time_s"], m["steps"], m["epochs"]) == (0, 0.0, 0, 0)
    assert m["key"] == config["key"] and m["node"] is None
    assert not (tmp_path / "child" / CHILD_FILE).exists()


def test_records_survive_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "children.jsonl"
    a = ChildRecord("g000c00", 0, 0, "a", [], "ok", val_acc=0.5, params=10)
    b = ChildRecord("g000c01", 0, 1, "b", [], "ok", val_acc=0.5, params=8)
    c = ChildRecord("g000c02", 0, 2, "c", [], "failed", val_acc=float("nan"))
    for r in (a, b, c):
        append_record(path, r)
    with open(path, "a") as f:
        f.write('{"key": "g000c03", "generat')  # the kill came mid-write
    got = read_records(path)
    assert [r.key for r in got] == ["g000c00", "g000c01", "g000c02"]
    assert got[2].val_acc is None  # NaN is stored as null
    assert [r.key for r in leaderboard(got)] == ["g000c01", "g000c00"]  # fewer params first


def test_a_record_reads_back_with_its_accuracy_before_training(tmp_path: Path) -> None:
    """A record's accuracy before training is kept through the file; a non-finite one reads
    back as None, as the accuracy after training does."""
    path = tmp_path / "children.jsonl"
    append_record(path, ChildRecord("g000c00", 0, 0, "a", [], "ok", val_acc=0.5,
                                    val_acc_before=0.25, params=10))
    append_record(path, ChildRecord("g000c01", 0, 1, "b", [], "ok", val_acc=0.75,
                                    val_acc_before=float("inf"), params=10))
    a, b = read_records(path)
    assert (a.val_acc, a.val_acc_before) == (0.5, 0.25)
    assert (b.val_acc, b.val_acc_before) == (0.75, None)


def test_a_torn_line_is_skipped_and_a_zero_accuracy_ranks_last(tmp_path: Path) -> None:
    """A line that cannot be read (a write torn by a kill, then appended after) is skipped and
    the records after it are kept; a child of accuracy 0.0 is a finished child, ranked below
    every better one."""
    path = tmp_path / "children.jsonl"
    append_record(path, ChildRecord("g000c00", 0, 0, "a", [], "ok", val_acc=0.0, params=5))
    with open(path, "a") as f:
        f.write('{"key": "g000c01", "gener\n')
    append_record(path, ChildRecord("g000c02", 0, 2, "c", [], "ok", val_acc=0.5, params=9))
    records = read_records(path)
    assert [r.key for r in records] == ["g000c00", "g000c02"]
    assert [r.key for r in leaderboard(records)] == ["g000c02", "g000c00"]


def test_leaderboard_rows_rank_from_one_best_first_and_keep_the_top() -> None:
    """The rows `leaderboard.json` holds: rank 1 for the best child, training time rounded to
    milliseconds, and only the first `top` rows when asked."""
    a = ChildRecord("g000c00", 0, 0, "a", [], "ok", val_acc=0.5, params=10, train_time_s=2.0)
    b = ChildRecord("g000c01", 0, 1, "b", [], "ok", val_acc=0.5, params=8, train_time_s=1.5)
    c = ChildRecord("g001c00", 1, 0, "c", [], "ok", val_acc=0.9, params=20,
                    train_time_s=1.23456, checkpoint="children/g001c00")
    board = leaderboard([a, b, c])
    rows = board_rows(board)
    assert [(r["rank"], r["key"]) for r in rows] == [(1, "g001c00"), (2, "g000c01"),
                                                     (3, "g000c00")]
    assert rows[0] == {"rank": 1, "key": "g001c00", "val_acc": 0.9, "params": 20,
                       "train_time_s": 1.235, "generation": 1, "arch": "c",
                       "checkpoint": "children/g001c00"}
    assert [r["key"] for r in board_rows(board, top=2)] == ["g001c00", "g000c01"]


def test_search_config_errors_name_the_file_and_key(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]
                                                    ) -> None:
    from searchkit import search_config

    from growth.commands.search import search_config as run

    bad = [({"budget": {"trails": 3}}, ("search.budget.trails",)),
           ({"controller": {"name": "random", "lr": -1}}, ("search.controller", "lr")),
           ({"space": {"widths": {"fc": [8, 4]}}}, ("search.space.widths.fc",)),
           ({"task": 2}, ("search.task",))]
    for section, words in bad:
        path = search_config(tmp_path, **section)
        with pytest.raises(ConfigError) as err:
            run(path, tmp_path / "out")
        msg = str(err.value)
        assert str(path) in msg and all(w in msg for w in words), msg
        assert not (tmp_path / "out").exists()  # nothing written
    from growth.cli import main

    assert main(["search", str(path), "--out", str(tmp_path / "out")]) == 2
    err_line = capsys.readouterr().err.strip()
    assert err_line.startswith("error: ") and "search.task" in err_line
    assert len(err_line.splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing written


def test_resuming_with_another_controller_is_refused(setup, tmp_path: Path) -> None:
    from growth.controllers.driver import SearchDir, _begin

    tmp, _, _, _, space = setup
    controller = make_controller("random", space)
    _begin(SearchDir(tmp_path), tmp / "base",
           controller, 0, None, "best")
    with pytest.raises(ConfigError, match="seed"):
        _begin(SearchDir(tmp_path), tmp / "base",
               controller, 1, None, "best")
    (tmp_path / "controller" / "gen_000.json").write_text("{")
    with pytest.raises(CheckpointError, match="gen_000.json"):
        _begin(SearchDir(tmp_path), tmp / "base",
               controller, 0, None, "best")


def test_live_hooks_stay_out_of_what_tune_pickles(setup, tmp_path: Path) -> None:
    """Tune writes the searcher and the callbacks into tuner.pkl: a progress bar or a driver
    holding locks must not break that."""
    import threading

    from growth.controllers.driver import Recorder, SearchDir

    lock = threading.Lock()

    class Source:
        def next_generation(self):
            return Generation(0, 2, str(setup[0] / "base"), {"lock": None}, {})

        def began(self, searcher) -> None:
            self.lock = lock

        def ended(self, searcher) -> None:
            pass

    s = ControllerSearcher(make_controller("random", setup[4]), Source())
    s.suggest("a")
    clone = cloudpickle.loads(cloudpickle.dumps(s))
    assert clone.source is None and clone.running == {"a": 0}
    recorder = Recorder(SearchDir(tmp_path), on_child=lambda record: lock.acquire())
    assert cloudpickle.loads(cloudpickle.dumps(recorder)).on_child is None


def test_a_trial_no_local_node_can_hold_is_refused(setup, tmp_path: Path) -> None:
    from growth.controllers.driver import Resources, _check_fits

    from growth.cluster import ClusterInfo

    local = ClusterInfo("127.0.0.1:1", True, 1, 2.0, 0.0)
    _check_fits(Resources(cpus_per_trial=2), local)
    with pytest.raises(ConfigError, match="gpus_per_trial: 1, but the local Ray has 0"):
        _check_fits(Resources(gpus_per_trial=1), local)
    with pytest.raises(ConfigError, match="cpus_per_trial: 3"):
        _check_fits(Resources(cpus_per_trial=3), local)
    _check_fits(Resources(gpus_per_trial=1), ClusterInfo("10.0.0.1:6379", False, 1, 2.0, 0.0))


def test_a_searcher_that_has_not_begun_has_nothing_to_train_and_saves_an_empty_state(
        setup) -> None:
    """Tune may ask for the searcher's state before its first suggestion: empty containers,
    the default seed 0, and a state that restores into another fresh searcher."""
    tmp, _, _, _, space = setup
    gen = Generation(0, 2, str(tmp / "base"), {"spec": {}, "attempt": 0}, {})
    s = ControllerSearcher(make_controller("random", space, seed=0), gen)
    assert s.seed == 0 and s.to_train == []
    state = s.get_state()
    assert (state["proposals"], state["results"], state["pending"], state["running"]) == (
        [], {}, [], {})
    other = ControllerSearcher(make_controller("random", space, seed=0), gen, seed=5)
    other.set_state(state)
    assert other.seed == 0 and other.to_train == []


def test_a_source_that_has_no_generation_left_is_not_asked_again(setup) -> None:
    tmp, _, _, _, space = setup

    class Source:
        asked = 0

        def next_generation(self):
            self.asked += 1
            return None

        def began(self, searcher) -> None:
            pass

        def ended(self, searcher) -> None:
            pass

    source = Source()
    s = ControllerSearcher(make_controller("random", space, seed=0), source)
    assert s.advance() is False and s.advance() is False
    assert s.suggest("t") == ControllerSearcher.FINISHED  # Tune: the search is over
    assert source.asked == 1 and s.done


def test_the_source_hears_when_a_generation_begins_and_when_it_ends(setup) -> None:
    """`began` once the children are proposed (with what needs a trial), `ended` once the
    controller has observed them, then the next generation is asked for."""
    tmp, _, _, _, space = setup
    calls: list[tuple[str, int | None, list[int] | None, bool]] = []

    class Source:
        plans = [Generation(0, 2, str(tmp / "base"), {}, {1: 0.5})]

        def next_generation(self):
            return self.plans.pop(0) if self.plans else None

        def began(self, searcher) -> None:
            calls.append(("began", searcher.generation, searcher.to_train, searcher.observed))

        def ended(self, searcher) -> None:
            calls.append(("ended", searcher.generation, None, searcher.observed))

    s = ControllerSearcher(make_controller("random", space, seed=0), Source())
    assert s.advance() is True
    assert calls == [("began", 0, [0], False)]  # child 1 finished before: only 0 to train
    s.result(0, 0.75)
    assert s.advance() is False and s.done
    assert calls == [("began", 0, [0], False), ("ended", 0, None, True)]


def test_a_saved_strategy_state_without_extras_loads_with_empty_extras(tmp_path: Path
                                                                      ) -> None:
    """A strategy's state is saved into a folder whose parents do not exist yet; one whose
    strategy.json names the strategy but holds no `extra` (written by hand, or by an older
    version) loads with its tensors and empty extras."""
    from growth.controllers.trial import StrategyRef, load_strategy

    saved = make_strategy("l2", {"lambda": 2.0})
    saved.state = {"anchor/fc1.weight": torch.arange(6.0).reshape(2, 3)}
    folder = save_strategy_state(saved, tmp_path / "run" / "g000" / "state")
    (folder / "strategy.json").write_text(json.dumps({"name": "l2"}))
    loaded = load_strategy(StrategyRef(name="l2", params={"lambda": 2.0}, state=str(folder)))
    assert loaded.extra == {}
    assert torch.equal(loaded.state["anchor/fc1.weight"], torch.arange(6.0).reshape(2, 3))
