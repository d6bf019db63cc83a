"""REC's owners (growth/strategies/owned.py): PackNet's owner masks inside REC. Without the
search REC is PackNet to the last digit; old tasks' outputs and owned weights never move; a
task keeps the largest of what was free; the MWC penalty reaches the shared tensors alone; the
owner indices are counted in the stored bytes; old data are never read; resume is exact."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from growth.search_spaces.networks import add_head, mlp

from growth.campaign import Campaign, resume_run
from growth.config import load_config
from growth.data import build_stream
from growth.errors import ConfigError
from growth.masks import swapped
from growth.metrics import Stored
from growth.model import Model
from growth.ops.widen_private import widen_private
from growth.regularizers import stored
from growth.strategies import Context, make_strategy
from growth.strategies.owned import check_packable, owner_table, pack, unpack, visible
from growth.strategies.rec import REC
from growth.train import TrainConfig, learn_task

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {
    "name": "tiny", "seed": 2, "threads": 1,
    "data": {"dataset": "digits", "stream": "permuted", "n_tasks": 3,
             "max_train_per_task": 300},
    "model": {"kind": "mlp", "hidden": [32, 32]},
    "train": {"epochs": 2, "batch_size": 32, "lr": 0.05},
}
WEIGHTS = 64 * 32 + 32 * 32  # the trunk's masked weights (fc1, fc2)


def campaign(tmp_path: Path, strategy: dict[str, Any], name: str) -> dict[str, Any]:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**TINY, "strategy": strategy}))
    return Campaign(load_config(path), tmp_path / name).start()


def test_rec_with_owners_and_no_search_is_packnet_to_the_last_digit(tmp_path: Path) -> None:
    """Owners with frozen shared tensors and no expansion: PackNet's algorithm (magnitude
    pruning of 0.75, 2 retraining epochs), written apart, gives the same accuracies bit for
    bit on every task learned so far (R's row i + 1 is after task i). A task not learned yet
    differs: PackNet scores it with no weights at all, REC with the network as it is."""
    packnet = campaign(tmp_path, {"name": "packnet"}, "p")
    rec = campaign(tmp_path, {"name": "rec", "search": "off",
                              "owners": {"shared": "frozen", "store": "table"}}, "r")
    assert len(rec["R"]) == 4
    for i in range(1, 4):
        assert rec["R"][i][:i] == packnet["R"][i][:i], i
    assert rec["acc"] == packnet["acc"] and rec["bwt"] == packnet["bwt"] == 0.0


def test_owner_indices_are_counted_in_the_stored_bytes(tmp_path: Path) -> None:
    """1.00x parameters. An index table: base + ceil(log2(T + 1)) bits per masked weight, by
    hand; owners packed into the weights (the default): no table, 1.00x the base's bytes."""
    m = campaign(tmp_path, {"name": "rec", "search": "off", "owners": {"store": "table"}}, "r")
    base_bytes = m["sizes"][0]["bytes"] - m["sizes"][0]["masks_bytes"]
    for t, size in enumerate(m["sizes"]):
        bits = math.ceil(math.log2(t + 2))  # owner values 0..t+1 after task t
        assert size["relative"] == 1.0
        assert size["masks_bytes"] == math.ceil(WEIGHTS * bits / 8), t
        assert size["bytes"] == base_bytes + size["masks_bytes"]
    assert m["sizes"][2]["masks_bytes"] == 768  # 3072 weights x 2 bits
    packed = campaign(tmp_path, {"name": "rec", "search": "off"}, "packed")
    for size in packed["sizes"]:
        assert size["relative"] == size["relative_bytes"] == 1.0
        assert "masks_bytes" not in size and size["bytes"] == base_bytes


def test_packing_writes_each_owner_index_into_the_lowest_bits() -> None:
    """By hand from float32's layout (1.0 = 0x3F800000, 23 mantissa bits): owner 5 in the
    lowest 8 bits of 1.0 gives 1 + 5 * 2^-23; -2.0 with owner 3 gives -(2 + 3 * 2^-22); 0.5 with
    owner 2 gives 0.5 + 2 * 2^-24; low bits already set (1 + 255 * 2^-23) are replaced, not
    or-ed (owner 1: 1 + 2^-23; in 4 bits: 0x3F8000F1 = 1 + 241 * 2^-23); a free zero stays 0.
    float64: owner 5 on 1.0 gives 1 + 5 * 2^-52."""
    values = [1.0, -2.0, 1 + 255 * 2 ** -23, 0.0, 0.5]
    owner = torch.tensor([5, 3, 1, 0, 2], dtype=torch.uint8)
    w = torch.nn.Parameter(torch.tensor(values))
    pack({"w": owner}, {"w": w}, 8)
    assert w.detach().tolist() == [1 + 5 * 2 ** -23, -(2 + 3 * 2 ** -22), 1 + 2 ** -23, 0.0,
                                   0.5 + 2 * 2 ** -24]
    assert unpack({"w": w}, ["w"], 8)["w"].tolist() == [5, 3, 1, 0, 2]
    w4 = torch.nn.Parameter(torch.tensor(values))
    pack({"w": owner}, {"w": w4}, 4)
    assert w4.detach()[2].item() == 1 + 241 * 2 ** -23
    assert unpack({"w": w4}, ["w"], 4)["w"].tolist() == [5, 3, 1, 0, 2]
    w64 = torch.nn.Parameter(torch.tensor([1.0, 0.0], dtype=torch.float64))
    pack({"w": torch.tensor([5, 0], dtype=torch.uint8)}, {"w": w64}, 8)
    assert w64.detach().tolist() == [1 + 5 * 2 ** -52, 0.0]


def test_packing_refuses_what_it_cannot_hold(tmp_path: Path) -> None:
    """bits = 1 holds one task: the second task stops before it trains, naming the key to
    change; half-precision weights have no mantissa bits to give away."""
    with pytest.raises(ConfigError, match=r"owners.bits 1 holds .* 1 tasks; task 1"):
        campaign(tmp_path, {"name": "rec", "search": "off", "owners": {"bits": 1}}, "b")
    half = {"w": torch.zeros(3, dtype=torch.float16)}
    with pytest.raises(ConfigError, match="w is torch.float16.*owners.store=table"):
        check_packable(half, ["w"], 4, 0)
    check_packable({"w": torch.zeros(3)}, ["w"], 8, 254)  # 255 tasks fit in 8 bits
    with pytest.raises(ConfigError, match="task 255 is number 256"):
        check_packable({"w": torch.zeros(3)}, ["w"], 8, 255)


# ---- in the loop, with a private expansion standing in for the search ------------------------
class PrivateWidening:
    """A searcher whose child adds 8 private units to fc1 (untrained: a teacher all the same)."""

    def search(self, ctx: Context, request: Any) -> Any:
        from growth.searching import SearchOutcome

        result = widen_private(ctx.model.graph, "fc1", 40, seed=ctx.task.index)
        return SearchOutcome(result.graph, [result.record], {"expansion": ["widen"],
                                                             "children": 1})


def run_tasks(rec: REC, n_tasks: int = 3, probe: Any = None, decay: float = 0.0
              ) -> tuple[Model, list[Any]]:
    tasks = build_stream({"dataset": "digits", "stream": "permuted", "n_tasks": n_tasks,
                          "max_train_per_task": 200, "seed": 1})
    torch.manual_seed(0)
    g = mlp((1, 8, 8), [32, 32])
    for t in tasks:
        g = add_head(g, f"t{t.index}", 10)
    model = Model(g)
    for t in tasks:
        ctx = Context(model, t, tasks[:t.index], lambda t: f"t{t.index}", lambda t, y: y,
                      torch.device("cpu"), seed=t.index, searcher=PrivateWidening(),
                      strategy=rec)
        learn_task(ctx, rec, TrainConfig(epochs=2, batch_size=32, lr=0.05,
                                         weight_decay=decay), seed=t.index)
        if probe is not None:
            probe(ctx, tasks)
    return model, tasks


def outputs(rec: REC, ctx: Context, task: Any, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), rec.evaluation(ctx, task) as score:
        return score(x).clone()


@pytest.mark.parametrize("decay", [0.0, 0.01])
def test_old_tasks_outputs_and_owned_weights_do_not_move(decay: float) -> None:
    """After task k, task k's logits on fixed inputs and the weights it owns are recorded;
    after every later task (each searched, distilled and pruned) they are the same, bit for
    bit (shared tensors frozen), weight decay or not."""
    rec = REC(REC.Params(owners={"shared": "frozen"}, compress={"epochs": 1}))
    x = torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    seen: dict[int, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}

    def probe(ctx: Context, tasks: list[Any]) -> None:
        params = ctx.model.named_parameters()
        owners = {n.split("/", 2)[2]: o for n, o in rec.state.items() if n.startswith("owner/")}
        assert sorted(owners) == ["fc1.weight", "fc2.weight"]
        k = ctx.task.index
        seen[k] = (outputs(rec, ctx, ctx.task, x),
                   {n: params[n].detach()[o == k + 1].clone() for n, o in owners.items()})
        for j in range(k):
            logits, owned = seen[j]
            assert torch.equal(outputs(rec, ctx, tasks[j], x), logits), (j, k)
            for n, o in owners.items():
                assert torch.equal(params[n].detach()[o == j + 1], owned[n]), (n, j, k)

    model, _ = run_tasks(rec, probe=probe, decay=decay)
    assert sorted(seen) == [0, 1, 2]
    details = rec.run_report()["details"]["rec"]
    assert details["1"]["compression"]["trunk_after"] == 64 * 32 + 32 + 32 * 32 + 32


def test_the_packed_weights_alone_carry_the_owners() -> None:
    """With owners packed (the default), after every task (searched, distilled, pruned,
    retrained) the indices the weights' lowest 8 bits hold are the owner table, free weights
    are exactly 0, and the scores a task gets from owners read off the weights equal REC's own.
    Against the same run with an index table: after the first task each weight differs by less
    than 2^-15 of itself (8 of 23 mantissa bits given away) and the owners agree."""
    x = torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    after_first: dict[str, dict[str, torch.Tensor]] = {}

    def probe_for(rec: REC, store: str) -> Any:
        def probe(ctx: Context, tasks: list[Any]) -> None:
            params = ctx.model.named_parameters()
            owners = {n.split("/", 2)[2]: o for n, o in rec.state.items()
                      if n.startswith("owner/")}
            if ctx.task.index == 0:
                after_first[store] = {n: params[n].detach().clone() for n in owners}
                after_first[store + "/owners"] = {n: o.clone() for n, o in owners.items()}
            if store == "table":
                return
            read = unpack(params, owners, 8)
            for n, o in owners.items():
                assert torch.equal(read[n], o.to(torch.int32)), n
                assert torch.all(params[n].detach()[o == 0] == 0), n
            for task in tasks[:ctx.task.index + 1]:
                values = {n: params[n].detach() * visible(read[n], task.index) for n in read}
                with torch.no_grad(), swapped(dict(ctx.model.module.state_dict(
                        keep_vars=True)), values):
                    own = ctx.model.head(ctx.head_of(task))(x).clone()
                assert torch.equal(outputs(rec, ctx, task, x), own), task.index
        return probe

    for store in ("packed", "table"):
        rec = REC(REC.Params(owners={"store": store}, compress={"epochs": 1}))
        run_tasks(rec, probe=probe_for(rec, store))
    packed, table = after_first["packed"], after_first["table"]
    for n, w in table.items():
        assert torch.equal(after_first["packed/owners"][n], after_first["table/owners"][n])
        assert torch.all((packed[n] - w).abs() <= w.abs() * 2 ** -15), n
        assert not torch.equal(packed[n], w)  # the bits did change


def test_a_task_keeps_the_largest_share_of_what_was_free() -> None:
    """No retraining: after task t each layer's owned entries of t are the n - round(0.75 n)
    largest |w| among the n free ones just before (found here by a sort), the rest zeroed."""
    before: dict[int, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}

    class Probe(REC):
        def _take(self, ctx: Context, entry: dict[str, Any]) -> None:
            params = ctx.model.named_parameters()
            free = {n.split("/", 2)[2]: o == 0 for n, o in self.state.items()
                    if n.startswith("owner/")}  # made by the first fit, all free then
            assert sorted(free) == ["fc1.weight", "fc2.weight"]
            before[ctx.task.index] = ({n: params[n].detach().clone() for n in free}, free)
            super()._take(ctx, entry)
            after = {n.split("/", 2)[2]: o for n, o in self.state.items()
                     if n.startswith("owner/")}
            k = ctx.task.index
            values, was_free = before[k]
            counts = [int(f.sum()) for f in was_free.values()]  # all taken, 0.75 given back
            assert entry["owned"] == {"kept": sum(c - round(0.75 * c) for c in counts),
                                      "free": sum(round(0.75 * c) for c in counts)}
            for n, f in was_free.items():
                count = int(f.sum())
                keep = count - round(0.75 * count)
                mags = values[n][f].abs()
                top = torch.sort(mags, descending=True, stable=True).values[keep - 1]
                mine = after[n] == k + 1
                assert int(mine.sum()) == keep, (n, k)
                assert not bool((mine & ~f).any())  # only what was free
                assert torch.all(values[n][mine].abs() >= top)
                pruned = f & ~mine
                assert torch.all(params[n].detach()[pruned] == 0)
                assert torch.all(after[n][pruned] == 0)

    rec = Probe(REC.Params(owners={"retrain_epochs": 0}, compress={"epochs": 1}))
    run_tasks(rec)
    assert sorted(before) == [0, 1, 2]


def test_the_mwc_penalty_reaches_the_shared_tensors_alone() -> None:
    """With owners, a move of a free (masked) weight costs nothing; a move of a bias by delta
    costs (lambda / 2) w F delta^2, by hand from the stored Fisher and relatedness."""
    rec = REC(REC.Params(search=False, compress=False, **{"lambda": 4.0}))
    tasks = build_stream({"dataset": "digits", "stream": "permuted", "n_tasks": 2,
                          "max_train_per_task": 120, "seed": 3})
    torch.manual_seed(0)
    model = Model(add_head(add_head(mlp((1, 8, 8), [6, 5]), "t0", 10), "t1", 10))
    ctx = Context(model, tasks[0], [], lambda t: f"t{t.index}", lambda t, y: y,
                  torch.device("cpu"))
    learn_task(ctx, rec, TrainConfig(epochs=1, lr=0.05))
    ctx = Context(model, tasks[1], tasks[:1], lambda t: f"t{t.index}", lambda t, y: y,
                  torch.device("cpu"), strategy=rec)
    rec.before_task(ctx)
    params = model.named_parameters()
    free = rec.state["owner/all/fc1.weight"] == 0
    assert bool(free.any())
    with torch.no_grad():
        params["fc1.weight"][free] += 0.7
    assert float(rec.penalty(ctx, None, None, None)) == 0.0
    w = rec.relatedness(ctx)["w"][0]
    fisher = stored(rec.state, "fisher", 0)["fc1.bias"]
    unit = int(fisher.argmax())
    with torch.no_grad():
        params["fc1.bias"][unit] += 0.3
    rec._quad = None
    want = 2.0 * w * float(fisher[unit]) * 0.3 ** 2
    assert want > 0
    assert float(rec.penalty(ctx, None, None, None)) == pytest.approx(want, rel=1e-5)


def test_old_tasks_data_are_never_read_with_owners(monkeypatch: Any) -> None:
    """Task k's training and validation splits raise once task k + 1 has begun."""
    from growth.data import Task

    now = {"task": 0}
    real = Task.__getattribute__

    def guarded(self: Task, name: str) -> Any:
        if name in ("train", "val") and now["task"] > real(self, "index"):
            raise AssertionError(f"task {real(self, 'index')}'s {name} data read during task "
                                 f"{now['task']}")
        return real(self, name)

    class Clocked(REC):
        def before_task(self, ctx: Context) -> None:
            now["task"] = ctx.task.index
            super().before_task(ctx)

    monkeypatch.setattr(Task, "__getattribute__", guarded)
    rec = Clocked(REC.Params(compress={"epochs": 1}, owners={"importance": "fisher"}))
    run_tasks(rec)
    now["task"] = 1
    with pytest.raises(AssertionError, match="task 0's train data read during task 1"):
        build_stream({"dataset": "digits", "stream": "permuted", "n_tasks": 2})[0].train  # noqa: B018


def test_resume_with_owners_gives_the_same_R(tmp_path: Path) -> None:
    strategy = {"name": "rec", "compress": {"epochs": 1},
                "search": {"backend": "local", "controller": "random", "children": 1,
                           "generations": 1, "epochs": 1}}
    full = campaign(tmp_path, strategy, "full")
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    for name in ("task_001", "task_002"):  # as if killed after task 0
        shutil.rmtree(part / "checkpoints" / name)
    shutil.rmtree(part / "work", ignore_errors=True)
    assert resume_run(part)["R"] == full["R"]
    assert make_strategy("rec").params.owners.enabled


def test_old_tasks_do_not_move_on_a_cnn_with_batchnorm(tmp_path: Path) -> None:
    """The real path on a CNN with BatchNorm (its statistics and affine parameters frozen
    after the first task): searched, distilled with early stopping (an evaluation inside the
    fit), pruned; every old task's accuracy stays what it was, bit for bit (BWT exactly 0)."""
    path = tmp_path / "cnn.yaml"
    path.write_text(yaml.safe_dump({
        **TINY, "model": {"kind": "cnn", "channels": [4, 8], "fc": [16], "batchnorm": True},
        "strategy": {"name": "rec", "compress": {"epochs": 2},
                     "search": {"backend": "local", "controller": "random", "children": 2,
                                "generations": 1, "epochs": 1}}}))
    m = Campaign(load_config(path), tmp_path / "cnn").start()
    assert any(isinstance(e.get("compression"), dict) for e in m["details"]["rec"].values())
    R = m["R"]
    for j in range(3):
        assert all(R[i][j] == R[j + 1][j] for i in range(j + 2, 4)), j
    assert m["bwt"] == 0.0


# ---- owned.py on hand-made owner tables -----------------------------------------------------
def small_model() -> Model:
    torch.manual_seed(0)
    return Model(add_head(add_head(mlp((1, 2, 2), [3]), "t0", 2), "t1", 2))


def test_a_new_owner_table_holds_the_index_of_the_task_being_learned() -> None:
    """With T tasks finished, task T (owner index T + 1) is learned next: the table made for
    it is all free and of the smallest integer type holding T + 1 (uint8 up to 254, then
    int16), so 255 finished tasks need int16 for index 256."""
    model = small_model()
    for tasks, dtype in ((0, torch.uint8), (253, torch.uint8), (255, torch.int16)):
        state: dict[str, torch.Tensor] = {}
        owners = owner_table(state, model, tasks)
        assert sorted(owners) == ["fc1.weight"] and sorted(state) == ["owner/all/fc1.weight"]
        table = owners["fc1.weight"]
        assert table.dtype == dtype and table.shape == (3, 4) and not bool(table.any())
        assert torch.iinfo(dtype).max >= tasks + 1
        assert owner_table(state, model, tasks)["fc1.weight"] is table  # kept


def test_a_finished_task_computes_with_its_own_and_earlier_tasks_weights_only() -> None:
    """Task 0 finished, task 1 learning: its free weights moved (not zero, as mid-training),
    some weights hand-marked as task 1's. Task 0 is scored with the weights it owns alone;
    free and later tasks' weights are zeroed, by hand here; task 1 with the network as it is."""
    model = small_model()
    with torch.no_grad():  # positive weights and inputs: every unit active, every weight read
        model.named_parameters()["fc1.weight"].copy_(torch.arange(1.0, 13.0).view(3, 4) / 10)
    rec = REC()
    rec.extra["tasks"] = [0]
    owner = torch.tensor([[0, 1, 2, 1], [1, 0, 0, 2], [2, 1, 1, 0]], dtype=torch.uint8)
    rec.state["owner/all/fc1.weight"] = owner
    x = torch.rand(5, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    tasks = build_stream({"dataset": "digits", "stream": "permuted", "n_tasks": 2,
                          "max_train_per_task": 10})
    w = model.named_parameters()["fc1.weight"].detach().clone()
    keep = torch.tensor([[float(o == 1) for o in row] for row in owner.tolist()])
    want = {}
    for zeroed, name in ((w * keep, "t0"), (w, "t1")):
        with torch.no_grad():
            model.named_parameters()["fc1.weight"].copy_(zeroed)
            want[name] = model.head(name)(x).clone()
            model.named_parameters()["fc1.weight"].copy_(w)
    assert not torch.equal(want["t0"], want["t1"])
    for t in tasks:
        ctx = Context(model, t, tasks[:t.index], lambda t: f"t{t.index}", lambda t, y: y,
                      torch.device("cpu"))
        with rec.evaluation(ctx, t) as scorer, torch.no_grad():
            torch.testing.assert_close(scorer(x), want[f"t{t.index}"], rtol=0, atol=0)
    assert torch.equal(model.named_parameters()["fc1.weight"], w)  # nothing written back


def test_after_a_searched_private_expansion_the_task_retrains_every_weight_it_kept() -> None:
    """The parent is frozen only while a private child trains (in the search); once the child
    replaces the network, the retraining moves the kept weights of the parent's units too
    (fc2 reads only the parent's rows: all of it is the parent's)."""
    moved: dict[str, bool] = {}

    class Probe(REC):
        def _retrain(self, ctx: Context, epochs: int) -> None:
            params = ctx.model.named_parameters()
            owner = self.state["owner/all/fc2.weight"]
            before = params["fc2.weight"].detach().clone()
            super()._retrain(ctx, epochs)
            mine = owner == ctx.task.index + 1
            moved[ctx.task.index] = bool((params["fc2.weight"].detach() != before)[mine].any())

    class Private:
        def search(self, ctx: Context, request: Any) -> Any:
            from growth.searching import SearchOutcome

            result = widen_private(ctx.model.graph, "fc1", 12, seed=0)
            return SearchOutcome(result.graph, [result.record], {"children": 1})

    rec = Probe(REC.Params(compress=False, owners={"retrain_epochs": 1}))
    tasks = build_stream({"dataset": "digits", "stream": "permuted", "n_tasks": 2,
                          "max_train_per_task": 40, "seed": 1})
    torch.manual_seed(0)
    model = Model(add_head(add_head(mlp((1, 8, 8), [8, 8]), "t0", 10), "t1", 10))
    for t in tasks:
        ctx = Context(model, t, tasks[:t.index], lambda t: f"t{t.index}", lambda t, y: y,
                      torch.device("cpu"), seed=t.index, searcher=Private(), strategy=rec)
        learn_task(ctx, rec, TrainConfig(epochs=1, batch_size=20, lr=0.05), seed=t.index)
    assert model.named_parameters()["fc1.weight"].shape == (12, 64)  # the child, kept
    assert moved == {0: True, 1: True}


def test_with_fisher_importance_a_task_keeps_the_weights_of_largest_fisher(
        monkeypatch: Any) -> None:
    """importance fisher: the task's own Fisher (fisher_samples of its data) ranks what it
    keeps, not magnitude: weights growing along the rows, a Fisher falling, so the 3 kept of
    fc1's 12 (0.75 given back) are its first 3 entries; by magnitude they would be the last
    (owner indices in a table: the kept weights keep their exact values)."""
    import growth.strategies.rec as rec_module

    model = small_model()
    with torch.no_grad():
        model.named_parameters()["fc1.weight"].copy_(torch.arange(1.0, 13.0).view(3, 4))
    asked: list[tuple[Any, int]] = []

    def fisher(ctx: Context, task: Any, samples: int) -> dict[str, torch.Tensor]:
        asked.append((task, samples))
        return {"fc1.weight": torch.arange(12.0, 0.0, -1.0).view(3, 4)}

    monkeypatch.setattr(rec_module, "task_fisher", fisher)
    rec = REC(REC.Params(fisher_samples=7, owners={"importance": "fisher", "store": "table",
                                                   "retrain_epochs": 0}))
    task = build_stream({"dataset": "digits", "stream": "permuted", "n_tasks": 1,
                         "max_train_per_task": 10})[0]
    ctx = Context(model, task, [], lambda t: f"t{t.index}", lambda t, y: y,
                  torch.device("cpu"))
    entry: dict[str, Any] = {}
    rec._take(ctx, entry)
    assert asked == [(task, 7)]
    kept = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.uint8)
    assert torch.equal(rec.state["owner/all/fc1.weight"], kept)
    w = torch.arange(1.0, 13.0).view(3, 4) * kept
    assert torch.equal(model.named_parameters()["fc1.weight"].detach(), w)
    assert entry["owned"] == {"kept": 3, "free": 9}


def test_a_checkpoints_owner_table_must_match_its_weight_exactly() -> None:
    """Owner indices are integers of exactly their weight's shape (a table that merely fits
    inside it is refused: it would leave weights without an owner); the controller's tensors
    are optional; with owners off, an owner table does not belong to REC."""
    model = small_model()
    graph = model.graph.named_tensors()
    good = {"owner/all/fc1.weight": torch.zeros(3, 4, dtype=torch.uint8)}
    assert REC().check_state(good, {}, graph, 0) == []
    small = {"owner/all/fc1.weight": torch.zeros(2, 4, dtype=torch.uint8)}
    assert REC().check_state(small, {}, graph, 0) == [
        "tensor 'owner/all/fc1.weight' has shape (2, 4), but fc1.weight is (3, 4)"]
    floats = {"owner/all/fc1.weight": torch.zeros(3, 4)}
    assert REC().check_state(floats, {}, graph, 0) == [
        "tensor 'owner/all/fc1.weight' has dtype torch.float32, expected int"]
    off = REC(REC.Params(owners=False)).check_state(good, {}, graph, 0)
    assert len(off) == 1 and "does not belong to strategy 'rec'" in off[0]


def test_packing_limits_apply_only_with_owners() -> None:
    """owners.bits 1 holds one task's index: task 1 is refused before it trains with owners,
    and learns as usual with owners off (nothing is packed then)."""
    tasks = build_stream({"dataset": "digits", "stream": "permuted", "n_tasks": 2,
                          "max_train_per_task": 10})
    ctx = Context(small_model(), tasks[1], tasks[:1], lambda t: f"t{t.index}",
                  lambda t, y: y, torch.device("cpu"))
    REC(REC.Params(owners={"enabled": False, "bits": 1})).before_task(ctx)
    with pytest.raises(ConfigError, match="owners.bits 1 holds the owner indices of 1 tasks"):
        REC(REC.Params(owners={"bits": 1})).before_task(ctx)


def test_an_owner_table_before_any_task_is_counted_at_one_bit_a_weight() -> None:
    """store table, no task finished: each masked weight's index (0: free) takes 1 bit."""
    rec = REC(REC.Params(owners={"store": "table"}))
    assert rec.size_parts(small_model())["masks"] == [Stored(12, 1, parameters=False)]


def test_packing_into_float32_leaves_a_weight_at_least_12_of_its_23_mantissa_bits() -> None:
    """float32 weights give at most 10 bits to an owner index (23 // 2 = 11 refused)."""
    params = {"w": torch.zeros(2, 2)}
    check_packable(params, ["w"], 10, 0)
    with pytest.raises(ConfigError, match="lowest 11 bits of each weight, but w is torch.float32"):
        check_packable(params, ["w"], 11, 0)


def test_a_task_retrains_what_it_kept_for_owners_retrain_epochs() -> None:
    """retrain_epochs is the retraining's own count, not the task's (1 here): with no
    expansion there is no teacher, and the loop runs them on the task's loss, each epoch one
    forward pass in training mode per batch."""
    tasks = build_stream({"dataset": "digits", "stream": "permuted", "n_tasks": 1,
                          "max_train_per_task": 50, "seed": 1})
    batches = math.ceil(len(tasks[0].train[1]) / 16)

    def training_passes(retrain_epochs: int) -> int:
        torch.manual_seed(0)
        model = Model(add_head(mlp((1, 8, 8), [12]), "t0", 10))
        passes = [0]
        fc1 = dict(model.module.named_modules())["fc1"]
        fc1.register_forward_hook(lambda m, i, o: passes.__setitem__(0, passes[0] + m.training))
        rec = make_strategy("rec", {"owners": {"retrain_epochs": retrain_epochs}})
        ctx = Context(model, tasks[0], [], lambda t: "t0", lambda t, y: y,
                      torch.device("cpu"), seed=0)
        learn_task(ctx, rec, TrainConfig(epochs=1, batch_size=16, lr=0.05), seed=0)
        return passes[0]

    assert training_passes(3) - training_passes(0) == 3 * batches


@pytest.mark.parametrize("owners", [True, False])
def test_under_weight_decay_the_owned_weights_are_put_back_after_every_step(
        owners: bool) -> None:
    """Weight decay moves weights whose gradient is zero: after every optimizer step of the
    second task (its training and its retraining) the weights the first task owns are where
    they were, so the task trains beside them as they are, not only after its fits. Without
    owners nothing is held, and the decay runs through."""
    tasks = build_stream({"dataset": "digits", "stream": "permuted", "n_tasks": 2,
                          "max_train_per_task": 50, "seed": 1})
    torch.manual_seed(0)
    model = Model(add_head(add_head(mlp((1, 8, 8), [12]), "t0", 10), "t1", 10))
    held: list[bool] = []
    first: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    class Probe(REC):
        def after_step(self, ctx: Context) -> None:
            super().after_step(ctx)
            params = ctx.model.named_parameters()
            held.extend(torch.equal(params[n].detach()[mask], value)
                        for n, (mask, value) in first.items())

    rec = Probe(REC.Params(search=False, compress=False, owners=owners))
    for t in tasks:
        ctx = Context(model, t, tasks[:t.index], lambda t: f"t{t.index}", lambda t, y: y,
                      torch.device("cpu"), seed=t.index)
        learn_task(ctx, rec, TrainConfig(epochs=1, batch_size=16, lr=0.05, weight_decay=0.1),
                   seed=t.index)
        params = model.named_parameters()
        first.update({n.split("/", 2)[2]: (o == 1, params[n.split("/", 2)[2]].detach()[o == 1]
                                           .clone())
                      for n, o in rec.state.items() if n.startswith("owner/")})
    batches = math.ceil(len(tasks[1].train[1]) / 16)
    assert sorted(first) == (["fc1.weight"] if owners else [])
    assert len(held) == (3 * batches if owners else 0)  # an epoch and two of retraining
    assert all(held)
