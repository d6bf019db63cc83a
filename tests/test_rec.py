"""REC: switches, equality with MWC, compression inside the loop with state carried through
expansion and compression, the size invariant, and old tasks' data never read."""

from __future__ import annotations

import inspect
import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from graphgen import single_thread  # noqa: F401 (fixture)
from growth.search_spaces.networks import add_head, mlp

from growth.campaign import Campaign
from growth.compress import trunk_params
from growth.config import load_config
from growth.data import Task, build_stream
from growth.errors import ConfigError, OperatorError
from growth.model import Model
from growth.ops import net2deeper, net2wider
from growth.ops.widen_private import widen_private
from growth.regularizers import stored
from growth.strategies import Context, make_strategy
from growth.strategies.rec import REC
from growth.train import TrainConfig, evaluate, learn_task

MAXN = 400
pytestmark = pytest.mark.usefixtures("single_thread")

TINY = {
    "name": "tiny", "seed": 2, "threads": 1,
    "data": {"dataset": "digits", "stream": "permuted", "n_tasks": 3,
             "max_train_per_task": 400},
    "model": {"kind": "mlp", "hidden": [32, 32]},
    "train": {"epochs": 3, "batch_size": 32, "lr": 0.05},
    "strategy": {"name": "mwc"},
}


def config(tmp_path: Path, strategy: dict[str, Any], name: str = "c") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**TINY, "strategy": strategy}))
    return path


def test_switches_take_off_and_settings(tmp_path: Path) -> None:
    cfg = load_config(config(tmp_path, {"name": "rec"}), ["strategy.search=off",
                                                           "strategy.compress.epochs=2"])
    rec = make_strategy("rec", cfg.strategy.settings())
    assert not rec.params.search.enabled and rec.params.compress.epochs == 2
    assert rec.params.compress.enabled
    on = make_strategy("rec", {"search": True, "compress": "on"})
    assert on.params.search.controller == "eas" and on.params.compress.temperature == 2.0
    with pytest.raises(ConfigError, match="strategy.search.childs"):
        load_config(config(tmp_path, {"name": "rec", "search": {"childs": 3}}))


@pytest.mark.parametrize("compress", ["off", "on"])
def test_rec_without_search_is_mwc_to_the_last_digit(tmp_path: Path, compress: str) -> None:
    """With owners off (the MWC penalty alone)."""
    mwc = Campaign(load_config(config(tmp_path, {"name": "mwc"}, "m")), tmp_path / "m").start()
    rec_cfg = config(tmp_path, {"name": "rec", "search": "off", "compress": compress,
                                "owners": "off"}, "r")
    rec = Campaign(load_config(rec_cfg), tmp_path / "r").start()
    assert rec["R"] == mwc["R"]
    assert rec["search"]["children"] == 0
    details = rec["details"]["rec"]
    assert sorted(details) == ["0", "1", "2"]
    if compress == "on":  # nothing grew, so nothing was compressed
        assert details["1"]["compression"].startswith("none needed")


# ---- a fixed expansion standing in for the search (the search has its own tests) ----------
class FixedExpansion(REC):
    """REC whose expansion is always: widen fc1 to 48, deepen after act1, widen fc2 to 40."""

    noise = 0.05

    def _expand(self, ctx: Context, entry: dict[str, Any]) -> None:
        g = ctx.model.graph
        records = []
        for op, kw in ((net2wider, {"node": "fc1", "width": 48, "noise": self.noise, "seed": 1}),
                       (net2deeper, {"after": "act1"}),
                       (net2wider, {"node": "fc2", "width": 40, "noise": self.noise, "seed": 2})):
            result = op(g, **kw)
            g = result.graph
            records.append(result.record)
        ctx.replace_graph(g, records)
        entry.update({"expansion": ["fixed"], "children": 0, "child_time_s": 0.0})


class Clock:
    """Tasks whose training and validation data raise once a later task has begun."""

    now = 0


class GuardedTask(Task):
    def __getattribute__(self, name: str) -> Any:
        if name in ("train", "val") and Clock.now > object.__getattribute__(self, "index"):
            index = object.__getattribute__(self, "index")
            raise AssertionError(f"task {index}'s {name} data read during task {Clock.now}")
        return object.__getattribute__(self, name)


def guarded(tasks: list[Task]) -> list[Task]:
    return [GuardedTask(**{f: getattr(t, f) for f in t.__dataclass_fields__}) for t in tasks]


def run_rec(strategy: REC, n_tasks: int = 3, epochs: int = 3) -> tuple[REC, list[dict], Model,
                                                                      list[Task]]:
    tasks = guarded(build_stream({"dataset": "digits", "stream": "permuted",
                                  "n_tasks": n_tasks, "max_train_per_task": MAXN, "seed": 1}))
    torch.manual_seed(0)
    g = mlp((1, 8, 8), [32, 32])
    for t in tasks:
        g = add_head(g, f"t{t.index}", t.n_classes)
    model = Model(g)
    base = model.graph
    cfg = TrainConfig(epochs=epochs, batch_size=32, lr=0.05)
    sizes = []
    for t in tasks:
        Clock.now = t.index
        ctx = Context(model, t, tasks[:t.index], lambda t: f"t{t.index}", lambda t, y: y,
                      torch.device("cpu"), seed=10 + t.index)
        learn_task(ctx, strategy, cfg, seed=ctx.seed)
        graph = model.graph
        sizes.append({"trunk": trunk_params(graph), "same_as_base":
                      graph.to_dict() == base.to_dict(),
                      "acc": [evaluate(ctx, s) for s in tasks]})
    Clock.now = 0
    return strategy, sizes, model, tasks


@pytest.mark.parametrize("student", ["parent", "cut"])
def test_rec_compresses_every_expansion_back_to_the_base(student: str) -> None:
    rec = FixedExpansion(REC.Params(compress={"student": student}))
    rec, sizes, model, tasks = run_rec(rec, epochs=4)
    base_trunk = 64 * 32 + 32 + 32 * 32 + 32
    for k, s in enumerate(sizes):  # the size invariant, after every task
        assert s["trunk"] == base_trunk and s["same_as_base"], k
    details = rec.run_report()["details"]["rec"]
    for t in ("1", "2"):
        c = details[t]["compression"]
        assert c["trunk_before"] > base_trunk and c["trunk_after"] == base_trunk
        assert c["dropped"] == ["act1_deep1", "act1_deep1_relu"]
        assert set(c["accuracy_before"]) == set(c["accuracy_after"]) == {"val", "test"}
        assert details[t]["trunk_params"] == base_trunk
    # old tasks' Fisher and anchors live on in the base shapes (carried, not re-measured)
    params = model.named_parameters()
    for k in (0, 1, 2):
        for name, f in stored(rec.state, "fisher", k).items():
            assert f.shape == params[name].shape
        for name, a in stored(rec.state, "anchor", k).items():
            assert a.shape == params[name].shape


def test_the_parent_student_takes_back_the_state_before_the_expansion() -> None:
    """student: parent resumes from the network and the state the task began with: after
    task 1, task 0's Fisher and anchors are exactly those stored at the end of task 0."""
    kept: dict[str, torch.Tensor] = {}

    class Probe(FixedExpansion):
        def after_task(self, ctx: Context) -> None:
            super().after_task(ctx)
            if ctx.task.index == 0:
                kept.update({k: v.clone() for k, v in self.state.items()})

    rec, _, _, _ = run_rec(Probe(REC.Params(compress={"epochs": 1})), n_tasks=2, epochs=1)
    kept = {k: v for k, v in kept.items() if k.split("/")[1] == "0"}  # task 0's own tensors
    assert kept and all(torch.equal(rec.state[k], v) for k, v in kept.items())
    assert any(k.startswith("anchor/1/") for k in rec.state)


def test_anchors_of_old_tasks_follow_the_expansion_exactly() -> None:
    """The expansion carries task 0's anchors as the operators carry weights: the same exact
    operators applied to a network whose weights are those anchors give them bit for bit."""
    seen: dict[int, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}

    class Probe(FixedExpansion):
        noise = 0.0

        def _expand(self, ctx: Context, entry: dict[str, Any]) -> None:
            anchors = stored(self.state, "anchor", 0)
            g = ctx.model.graph.copy()
            for name, a in anchors.items():  # a network made of task 0's anchors
                node, tensor = name.rsplit(".", 1)
                g.node(node).tensors[tensor] = a.clone()
            for op, kw in ((net2wider, {"node": "fc1", "width": 48, "noise": 0.0, "seed": 1}),
                           (net2deeper, {"after": "act1"}),
                           (net2wider, {"node": "fc2", "width": 40, "noise": 0.0, "seed": 2})):
                g = op(g, **kw).graph
            want = {n: t for n, t in g.named_tensors().items() if n in anchors}
            super()._expand(ctx, entry)
            seen[ctx.task.index] = (want, stored(self.state, "anchor", 0))

    run_rec(Probe(REC.Params(compress={"epochs": 1})), epochs=2)
    assert sorted(seen) == [1, 2]
    for want, got in seen.values():
        assert all(torch.equal(got[n], want[n]) for n in want)
        # the inserted layer is anchored at the identity it was inserted as
        assert sorted(set(got) - set(want)) == ["act1_deep1.bias", "act1_deep1.weight"]
        assert torch.equal(got["act1_deep1.weight"], torch.eye(48))
        assert torch.equal(got["act1_deep1.bias"], torch.zeros(48))


def test_old_tasks_data_are_never_read_after_their_task() -> None:
    """The guard raises on any read of an old task's training or validation split."""
    run_rec(FixedExpansion(REC.Params(compress={"epochs": 1, "importance": "fisher"})),
            epochs=1)
    tasks = guarded(build_stream({"dataset": "digits", "stream": "permuted", "n_tasks": 2}))
    Clock.now = 1
    try:
        with pytest.raises(AssertionError, match="task 0's train data read during task 1"):
            tasks[0].train  # noqa: B018 (the guard itself works)
    finally:
        Clock.now = 0


def test_size_invariant_is_checked_after_every_task() -> None:
    """A compression that leaves the network larger than the base is caught after the task;
    with compression off the expanded network is kept, as asked."""

    class Broken(FixedExpansion):
        def _compress(self, ctx: Context, entry: dict[str, Any]) -> None:
            entry["compression"] = "skipped by a bug"

    with pytest.raises(OperatorError, match="REC after task 1: the trunk has 7,432 parameters, "
                                            "above its budget of 3,136"):
        run_rec(Broken(REC.Params()), n_tasks=2, epochs=1)
    rec, sizes, _, _ = run_rec(FixedExpansion(REC.Params(compress=False)), n_tasks=2, epochs=1)
    assert sizes[-1]["trunk"] == 7432  # compress off keeps the child
    with pytest.raises(ValueError, match="REC compresses back to the base trunk's size"):
        REC.Params(compress={"budget": 0.5})


def test_metrics_record_each_tasks_rec_details(tmp_path: Path) -> None:
    cfg = config(tmp_path, {"name": "rec", "search": "off", "compress": "off"})
    Campaign(load_config(cfg), tmp_path / "r").start()
    data = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert data["search"] == {"children": 0, "child_time_s": 0.0, "search_wall_s": 0.0,
                              "searches": 0, "parent_kept": 0}
    assert data["details"]["rec"]["2"]["trunk_params"] == 64 * 32 + 32 + 32 * 32 + 32


def test_the_run_report_sums_the_searches_of_every_task() -> None:
    """Children, their training time and the searches' wall time summed over the tasks; a
    task with no search (no "expansion") is no search, one whose parent stayed counts as kept."""
    rec = REC()
    tasks = {"0": {"trunk_params": 5},
             "1": {"expansion": "parent", "children": 3, "child_time_s": 1.5,
                   "search_wall_s": 2.0},
             "2": {"expansion": ["widen"], "children": "4", "child_time_s": "2.25",
                   "search_wall_s": 0.5},
             "3": {"expansion": "parent"}}
    rec.extra["rec"] = tasks
    report = rec.run_report()
    assert report == {"search": {"children": 7, "child_time_s": 3.75, "search_wall_s": 2.5,
                                 "searches": 3, "parent_kept": 2},
                      "details": {"rec": tasks}}
    assert REC().run_report()["search"] == {"children": 0, "child_time_s": 0.0,
                                            "search_wall_s": 0.0, "searches": 0,
                                            "parent_kept": 0}


def test_a_copy_coherent_change_after_widening_costs_exactly_the_parents_penalty() -> None:
    """After Net2Wider gives unit 3 of fc1 copies, moving every copy's incoming row by delta
    and every copy's outgoing column by eps / c (what the parent's change becomes in the
    widened network) costs the penalty the parent's change cost: (lambda / 2) F delta^2 summed,
    by hand from the stored Fisher. With protect_copies off the copies are free."""
    tasks = build_stream({"dataset": "digits", "stream": "permuted", "n_tasks": 2,
                          "max_train_per_task": 120, "seed": 3})
    torch.manual_seed(0)
    g = add_head(add_head(mlp((1, 8, 8), [6, 5]), "t0", 10), "t1", 10)
    costs = {}
    for protect in (True, False):
        model = Model(g)
        rec = make_strategy("rec", {"search": False, "compress": False, "lambda": 3.0,
                                    "protect_copies": protect, "owners": False})
        ctx = Context(model, tasks[0], [], lambda t: f"t{t.index}", lambda t, y: y,
                      torch.device("cpu"))
        learn_task(ctx, rec, TrainConfig(epochs=1, lr=0.05))
        ctx = Context(model, tasks[1], tasks[:1], lambda t: f"t{t.index}", lambda t, y: y,
                      torch.device("cpu"), strategy=rec)
        rec.before_task(ctx)
        fisher = stored(rec.state, "fisher", 0)
        delta, eps = 0.3, -0.2
        want = 1.5 * (float(fisher["fc1.weight"][3].sum()) * delta ** 2 +
                      float(fisher["fc1.bias"][3]) * delta ** 2 +
                      float(fisher["fc2.weight"][:, 3].sum()) * eps ** 2)
        assert want > 0
        widened = net2wider(model.graph, "fc1", 9, noise=0.0, seed=6)
        copies = [j for j, i in enumerate(widened.record.index_maps["fc1.weight"][0]) if i == 3]
        assert len(copies) == 3  # seed 6 gives unit 3 three copies
        ctx.replace_graph(widened.graph, [widened.record])
        rec._quad = None
        with torch.no_grad():
            params = model.named_parameters()
            for j in copies:
                params["fc1.weight"][j] += delta
                params["fc1.bias"][j] += delta
                params["fc2.weight"][:, j] += eps / len(copies)
        costs[protect] = (float(rec.penalty(ctx, None, None, None)), want)
    got, want = costs[True]
    assert got == pytest.approx(want, rel=1e-5)
    free, _ = costs[False]  # MWC's own role: the copies beyond the original cost nothing
    assert free < 0.9 * want


def test_an_inserted_layer_is_anchored_with_each_old_tasks_mean_fisher() -> None:
    """protect_copies: the layer Net2Deeper inserts gets, for every finished task k, an anchor
    at its identity and a uniform Fisher equal to the mean of task k's Fisher over the grown
    network's other tensors (by hand); off, it stays free."""
    got: dict[bool, dict[str, torch.Tensor]] = {}

    class Probe(FixedExpansion):
        noise = 0.0

        def _expand(self, ctx: Context, entry: dict[str, Any]) -> None:
            super()._expand(ctx, entry)
            got[self.params.protect_copies] = stored(self.state, "fisher", 0)

    for protect in (True, False):
        probe = Probe(REC.Params(compress=False, protect_copies=protect))
        run_rec(probe, n_tasks=2, epochs=1)
        if protect:  # the mean of task 0's Fisher over the grown network's other tensors
            rest = [v for k, v in got[True].items() if not k.startswith("act1_deep1.")]
            level = float(sum(v.double().sum() for v in rest) / sum(v.numel() for v in rest))
            f = got[True]["act1_deep1.weight"]
            assert f.shape == (48, 48) and level > 0
            assert torch.allclose(f, torch.full_like(f, level))
    assert "act1_deep1.weight" not in got[False]


def test_the_zero_columns_of_private_units_are_anchored_with_each_old_tasks_mean_fisher() -> None:
    """protect_copies: widen_private's zero columns (fc2's inputs from fc1's 4 new units, which
    task 0 never read) get task 0's mean Fisher over the grown network as it was carried
    (by hand), their anchors staying 0; every other entry keeps its carried Fisher."""
    seen: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []

    class Probe(REC):
        def _expand(self, ctx: Context, entry: dict[str, Any]) -> None:
            result = widen_private(ctx.model.graph, "fc1", 16, seed=1)
            ctx.replace_graph(result.graph, [result.record])

        def _anchor_inserted(self, ctx: Context, records: list[Any]) -> None:
            carried = {k: v.clone() for k, v in stored(self.state, "fisher", 0).items()}
            super()._anchor_inserted(ctx, records)
            seen.append((carried, stored(self.state, "fisher", 0)))

    tasks = build_stream({"dataset": "digits", "stream": "permuted", "n_tasks": 2,
                          "max_train_per_task": 50, "seed": 1})
    torch.manual_seed(0)
    model = Model(add_head(add_head(mlp((1, 8, 8), [12, 12]), "t0", 10), "t1", 10))
    rec = Probe(REC.Params(compress=False, owners=False))
    for t in tasks:
        ctx = Context(model, t, tasks[:t.index], lambda t: f"t{t.index}", lambda t, y: y,
                      torch.device("cpu"), seed=t.index)
        learn_task(ctx, rec, TrainConfig(epochs=1, batch_size=16, lr=0.05), seed=t.index)
    (carried, got), = seen
    level = float(sum(v.double().sum() for v in carried.values()) /
                  sum(v.numel() for v in carried.values()))
    fresh = torch.zeros(12, 16, dtype=torch.bool)
    fresh[:, 12:] = True
    assert level > 0 and torch.equal(carried["fc2.weight"][fresh], torch.zeros(48))
    torch.testing.assert_close(got["fc2.weight"][fresh], torch.full((48,), level,
                                                                   dtype=torch.float32))
    assert torch.equal(got["fc2.weight"][~fresh], carried["fc2.weight"][~fresh])
    assert all(torch.equal(got[n], carried[n]) for n in carried if n != "fc2.weight")
    assert torch.equal(stored(rec.state, "anchor", 0)["fc2.weight"][:, 12:], torch.zeros(12, 4))


# ---- compression's wiring: old tasks' importance, and whom old heads are distilled from ------
def test_old_tasks_importance_weighs_each_tasks_fisher_by_its_relatedness() -> None:
    """What the "cut" student's units are scored by, besides the task's own Fisher:
    sum_k w_{k,t} F_k over the finished tasks, with the w (not r) of this task's relatedness
    row; a tensor only one task's Fisher holds (head_t0) gets that task's term alone."""
    torch.manual_seed(0)
    model = Model(add_head(add_head(add_head(mlp((1, 8, 8), [5]), "t0", 10), "t1", 10), "t2", 10))
    tasks = build_stream({"dataset": "digits", "stream": "permuted", "n_tasks": 3,
                          "max_train_per_task": 20})
    rec = make_strategy("rec", {"compress": {"student": "cut", "importance": "fisher"}})
    gen = torch.Generator().manual_seed(1)
    f0 = {"fc1.weight": torch.rand(5, 64, generator=gen), "fc1.bias": torch.rand(5, generator=gen)}
    f1 = {"fc1.weight": torch.rand(5, 64, generator=gen), "fc1.bias": torch.rand(5, generator=gen),
          "head_t0.weight": torch.rand(10, 5, generator=gen)}
    for k, fisher in enumerate((f0, f1)):
        rec.state.update({f"fisher/{k}/{n}": f for n, f in fisher.items()})
    rec.extra["tasks"] = [0, 1]
    rec.extra["relatedness"] = {"2": {"tasks": [0, 1], "r": [0.2, 0.7], "w": [0.5, 1.5]}}
    ctx = Context(model, tasks[2], tasks[:2], lambda t: f"t{t.index}", lambda t, y: y,
                  torch.device("cpu"))
    got = rec._old_importance(ctx)
    assert sorted(got) == ["fc1.bias", "fc1.weight", "head_t0.weight"]
    for n in ("fc1.weight", "fc1.bias"):
        torch.testing.assert_close(got[n], 0.5 * f0[n] + 1.5 * f1[n], rtol=0, atol=1e-7)
    torch.testing.assert_close(got["head_t0.weight"], 1.5 * f1["head_t0.weight"])


class Widening:
    """A searcher whose chosen child widens fc1 by two units, with noise (another function)."""

    def __init__(self) -> None:
        self.parents: list[Any] = []

    def search(self, ctx: Context, request: Any) -> Any:
        from growth.searching import SearchOutcome

        self.parents.append(ctx.model.graph)
        result = net2wider(ctx.model.graph, "fc1", 14, noise=0.1, seed=1)
        return SearchOutcome(result.graph, [result.record], {"expansion": ["widen"],
                                                             "children": 1})


@pytest.mark.parametrize("old_heads", ["parent", "teacher", "none"])
def test_old_heads_are_distilled_from_the_network_old_heads_names(old_heads: str,
                                                                  monkeypatch: Any) -> None:
    """old_heads parent: the old heads learn from the network trained on the task before the
    search; teacher: from the expanded network, as the task's head; none: not distilled."""
    import growth.strategies.rec as rec_module

    calls: list[tuple[Any, list[str], Any]] = []
    wiring: list[tuple[Any, int, Any]] = []
    real = rec_module.distill

    def spy(*args: Any, **kwargs: Any) -> Any:
        bound = inspect.signature(real).bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        calls.append((a["teacher"], list(a["heads"]), a["old_teacher"]))
        wiring.append((a["penalty"], a["seed"], a["hold"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(rec_module, "distill", spy)
    tasks = build_stream({"dataset": "digits", "stream": "permuted", "n_tasks": 2,
                          "max_train_per_task": 60, "seed": 1})
    torch.manual_seed(0)
    model = Model(add_head(add_head(mlp((1, 8, 8), [12]), "t0", 10), "t1", 10))
    rec = make_strategy("rec", {"compress": {"epochs": 1, "old_heads": old_heads}})
    searcher = Widening()
    for t in tasks:
        ctx = Context(model, t, tasks[:t.index], lambda t: f"t{t.index}", lambda t, y: y,
                      torch.device("cpu"), seed=t.index, searcher=searcher)
        learn_task(ctx, rec, TrainConfig(epochs=1, batch_size=32, lr=0.05), seed=t.index)
    (teacher, heads, old_teacher), retrain = calls  # compression, then retraining (owners)
    assert retrain[0] is teacher and retrain[1:] == (["t1"], None)
    # both with the MWC penalty and the owned weights held; seeds: task 1's seed + 1, + 2
    assert wiring == [(rec._mwc_penalty, 2, rec), (rec._mwc_penalty, 3, rec)]
    parent = searcher.parents[-1]
    assert teacher.node("fc1").attrs["out_features"] == 14  # the expanded network
    assert heads == (["t1"] if old_heads == "none" else ["t1", "t0"])
    if old_heads == "parent":
        assert old_teacher.to_dict() == parent.to_dict()
        want = parent.named_tensors()
        assert all(torch.equal(v, want[n]) for n, v in old_teacher.named_tensors().items())
    else:
        assert old_teacher is None


@pytest.mark.parametrize(("importance", "old_heads"), [("fisher", "none"),
                                                      ("magnitude", "parent")])
def test_the_cut_student_is_scored_by_old_tasks_fisher_weighed_by_relatedness(
        importance: str, old_heads: str, monkeypatch: Any, caplog: Any) -> None:
    """student cut, importance fisher: growth.compress gets sum_k w_{k,t} F_k (the old tasks'
    stored Fisher, in the expanded shapes; at task 2 two of them, with w other than 1), the MWC
    penalty and seed t + 1; importance magnitude: no Fisher. The heads and the old teacher
    as `old_heads` names them: the task's own head alone, or every head with the old ones
    learning from the network before the expansion."""
    import growth.strategies.rec as rec_module

    calls: list[dict[str, Any]] = []
    real = rec_module.compress

    def spy(*args: Any, **kwargs: Any) -> Any:
        bound = inspect.signature(real).bind(*args, **kwargs)
        a = bound.arguments
        t = len(calls) + 1
        want: dict[str, torch.Tensor] = {}
        for k, w in enumerate(rec.extra["relatedness"][str(t)]["w"]):
            for n, f in stored(rec.state, "fisher", k).items():
                want[n] = want[n] + w * f if n in want else w * f
        calls.append({"importance": a.get("importance"), "want": want,
                      "penalty": a.get("penalty"), "seed": a.get("seed"),
                      "heads": a.get("heads"), "old_teacher": a.get("old_teacher")})
        return real(*args, **kwargs)

    monkeypatch.setattr(rec_module, "compress", spy)
    caplog.set_level(logging.INFO, logger="growth.rec")
    tasks = build_stream({"dataset": "digits", "stream": "permuted", "n_tasks": 3,
                          "max_train_per_task": 60, "seed": 1})
    torch.manual_seed(0)
    model = Model(add_head(add_head(add_head(mlp((1, 8, 8), [12]), "t0", 10), "t1", 10),
                           "t2", 10))
    rec = make_strategy("rec", {"compress": {"epochs": 1, "student": "cut",
                                             "importance": importance, "old_heads": old_heads},
                                "owners": False})
    searcher = Widening()
    for t in tasks:
        ctx = Context(model, t, tasks[:t.index], lambda t: f"t{t.index}", lambda t, y: y,
                      torch.device("cpu"), seed=t.index, searcher=searcher)
        learn_task(ctx, rec, TrainConfig(epochs=1, batch_size=32, lr=0.05), seed=t.index)
    for t, call, parent in zip((1, 2), calls, searcher.parents):
        if old_heads == "none":
            assert call["heads"] == [f"t{t}"] and call["old_teacher"] is None
        else:
            assert call["heads"][0] == f"t{t}"
            assert sorted(call["heads"]) == [f"t{k}" for k in range(t + 1)]
            assert call["old_teacher"].to_dict() == parent.to_dict()
    assert [(c["penalty"], c["seed"]) for c in calls] == [(rec._mwc_penalty, 2),
                                                           (rec._mwc_penalty, 3)]
    # fc1: 64 x 12 + 12 = 780 weights and biases; 910 widened to 14
    line = (r"task 2: compressed trunk 910 -> 780 parameters \(budget 780\); task accuracy "
            r"val \d\.\d{4}, test \d\.\d{4} -> val \d\.\d{4}, test \d\.\d{4}")
    assert any(re.fullmatch(line, r.getMessage()) for r in caplog.records), caplog.text
    if importance == "magnitude":
        assert [c["importance"] for c in calls] == [None, None]
        return
    got, want = calls[1]["importance"], calls[1]["want"]
    assert sorted(got) == sorted(want) and got["fc1.weight"].shape == (14, 64)
    assert all(abs(w - 1.0) > 1e-3 for w in rec.extra["relatedness"]["2"]["w"])
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=0)


def test_retraining_with_the_loss_distils_nothing(monkeypatch: Any) -> None:
    """owners.retrain loss: after an expansion and its compression, the task retrains what it
    kept with its loss alone (as PackNet): the compression is the only distillation."""
    import growth.strategies.rec as rec_module

    teachers: list[Any] = []
    real = rec_module.distill

    def spy(ctx: Any, teacher: Any, *args: Any, **kwargs: Any) -> Any:
        teachers.append(teacher)
        return real(ctx, teacher, *args, **kwargs)

    monkeypatch.setattr(rec_module, "distill", spy)
    tasks = build_stream({"dataset": "digits", "stream": "permuted", "n_tasks": 2,
                          "max_train_per_task": 60, "seed": 1})
    torch.manual_seed(0)
    model = Model(add_head(add_head(mlp((1, 8, 8), [12]), "t0", 10), "t1", 10))
    rec = make_strategy("rec", {"compress": {"epochs": 1},
                                "owners": {"retrain": "loss", "retrain_epochs": 1}})
    for t in tasks:
        ctx = Context(model, t, tasks[:t.index], lambda t: f"t{t.index}", lambda t, y: y,
                      torch.device("cpu"), seed=t.index, searcher=Widening())
        learn_task(ctx, rec, TrainConfig(epochs=1, batch_size=32, lr=0.05), seed=t.index)
    assert len(teachers) == 1 and teachers[0].node("fc1").attrs["out_features"] == 14


def test_each_tasks_search_wall_time_is_measured_around_the_search() -> None:
    """search_wall_s: the seconds the searcher took, within the task's own wall time."""
    import time

    tasks = build_stream({"dataset": "digits", "stream": "permuted", "n_tasks": 2,
                          "max_train_per_task": 40, "seed": 1})
    torch.manual_seed(0)
    model = Model(add_head(add_head(mlp((1, 8, 8), [12]), "t0", 10), "t1", 10))
    rec = make_strategy("rec", {"compress": False, "owners": False})
    for t in tasks:
        ctx = Context(model, t, tasks[:t.index], lambda t: f"t{t.index}", lambda t, y: y,
                      torch.device("cpu"), seed=t.index, searcher=Widening())
        start = time.perf_counter()
        learn_task(ctx, rec, TrainConfig(epochs=1, batch_size=40, lr=0.05), seed=t.index)
        took = time.perf_counter() - start
    wall = rec.run_report()["details"]["rec"]["1"]["search_wall_s"]
    assert 0 < wall < took


@pytest.mark.parametrize("student", ["parent", "cut"])
def test_only_a_network_of_its_students_architecture_within_budget_skips_the_compression(
        student: str) -> None:
    """The student's architecture (parent: the network the task began with; cut: the base)
    within the budget: nothing to compress. Any other architecture is compressed, even within
    the budget (here without training settings, so the compression stops at their absence)."""
    tasks = build_stream({"dataset": "digits", "stream": "permuted", "n_tasks": 2,
                          "max_train_per_task": 40, "seed": 1})
    net = add_head(add_head(mlp((1, 8, 8), [12]), "t0", 10), "t1", 10)
    wide = add_head(add_head(mlp((1, 8, 8), [14]), "t0", 10), "t1", 10)

    def compression(reference: Any) -> Any:
        """_compress on a network of 12 units whose student's architecture is `reference`."""
        rec = REC(REC.Params(compress={"student": student}))
        base = net if student == "parent" else reference
        rec.extra["base"] = {"structure": base.to_dict(), "trunk": trunk_params(base)}
        rec._parent = reference if student == "parent" else net
        ctx = Context(Model(net), tasks[1], tasks[:1], lambda t: f"t{t.index}",
                      lambda t, y: y, torch.device("cpu"), seed=1)
        entry: dict[str, Any] = {}
        rec._compress(ctx, entry)
        return entry["compression"]

    assert compression(net) == "none needed (the network is the base architecture)"
    assert trunk_params(net) == 64 * 12 + 12 <= trunk_params(wide)
    with pytest.raises(ConfigError, match="REC's compression needs the task's training"):
        compression(wide)
