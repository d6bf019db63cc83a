"""Task orders: random permutations drawn reproducibly, curricula by a difficulty measured on
training and validation data, reordered streams that keep every task's data, and campaigns
that learn the tasks in the order given."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from growth.campaign import Campaign
from growth.config import load_config
from growth.data import Task, build_stream, reorder, resolve_order
from growth.data.orders import difficulty, random_order
from growth.errors import ConfigError, DataError

SPEC = {"dataset": "digits", "stream": "split", "n_tasks": 5, "max_train_per_task": 150}


def _task(index: int, train: list, val: list) -> Task:
    """A task of 1-D points: (value, label) pairs."""
    def split(rows: list) -> tuple:
        x = torch.tensor([[r[0]] for r in rows], dtype=torch.float32).view(-1, 1, 1, 1)
        return x, torch.tensor([r[1] for r in rows])

    empty = split([])[0][:0], torch.zeros(0, dtype=torch.int64)
    return Task(index, f"task-{index}", split(train), split(val), empty, [0, 1], 2, 2 * index,
                (1, 1, 1))


def test_difficulty_is_the_nearest_class_mean_error_on_validation() -> None:
    """Class means 0 and 2 (training points 0, 0 and 2, 2): validation points 0.4 (class 0,
    right), 1.2 (class 0, nearer 2: wrong), 1.9 (class 1, right), 0.9 (class 1, nearer 0:
    wrong): error 2 / 4."""
    t = _task(0, [(0.0, 0), (0.0, 0), (2.0, 1), (2.0, 1)],
              [(0.4, 0), (1.2, 0), (1.9, 1), (0.9, 1)])
    assert difficulty(t) == 0.5
    easy = _task(1, [(0.0, 0), (2.0, 1)], [(0.1, 0), (1.8, 1)])
    assert difficulty(easy) == 0.0
    tasks = [t, easy, _task(2, [(0.0, 0), (2.0, 1)], [(0.1, 0), (0.2, 1), (1.9, 1),
                                                      (2.0, 1)])]  # error 1 / 4
    assert resolve_order(tasks, "easy_first") == [1, 2, 0]
    assert resolve_order(tasks, "hard_first") == [0, 2, 1]


def test_curricula_never_read_a_test_split() -> None:
    class Sealed(tuple):
        def __getitem__(self, i):
            raise AssertionError("the test split was read")

        def __iter__(self):
            raise AssertionError("the test split was read")

    tasks = build_stream(SPEC)
    for t in tasks:
        t.test = Sealed()
    assert sorted(resolve_order(tasks, "hard_first")) == list(range(5))


def test_random_orders_are_reproducible_permutations_shared_by_seeds() -> None:
    orders = [random_order(5, k) for k in range(1, 6)]
    assert all(sorted(o) == list(range(5)) for o in orders)
    assert orders == [random_order(5, k) for k in range(1, 6)]  # drawn again: the same
    assert len({tuple(o) for o in orders}) >= 4  # different orders for different k
    # the stream's seed changes the data, not the order random-K names
    a = build_stream({**SPEC, "order": "random-2", "seed": 0})
    b = build_stream({**SPEC, "order": "random-2", "seed": 7})
    assert [t.name for t in a] == [t.name for t in b] == [f"split-{i}" for i in orders[1]]


def test_a_reordered_stream_keeps_every_task_and_renumbers_positions() -> None:
    tasks = build_stream({**SPEC, "seed": 3})
    moved = build_stream({**SPEC, "seed": 3, "order": [3, 0, 4, 1, 2]})
    for pos, i in enumerate([3, 0, 4, 1, 2]):
        t, src = moved[pos], tasks[i]
        assert t.index == pos and t.name == src.name and t.classes == src.classes
        assert t.class_offset == src.class_offset  # class-incremental labels keep meaning
        for split in ("train", "val", "test"):
            assert torch.equal(getattr(t, split)[0], getattr(src, split)[0])
            assert torch.equal(getattr(t, split)[1], getattr(src, split)[1])
    assert [t.name for t in build_stream({**SPEC, "order": [4, 1]})] == ["split-4", "split-1"]
    # the measure depends on the images' distances only: permuting the pixels keeps it
    t = tasks[2]
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    shuffled = Task(t.index, t.name, (t.train[0].flatten(1)[:, perm].view(-1, 1, 8, 8),
                                      t.train[1]),
                    (t.val[0].flatten(1)[:, perm].view(-1, 1, 8, 8), t.val[1]), t.test,
                    t.classes, t.n_classes, t.class_offset, t.input_shape)
    assert difficulty(shuffled) == difficulty(t)


@pytest.mark.parametrize("order, error, words", [
    ("bogus", ConfigError, "unknown task order 'bogus'"),
    ("random-0", ConfigError, "unknown task order"),
    ([1, 1], ConfigError, "distinct task indices"),
    ([0, 9], DataError, "the stream has 5 tasks"),
])
def test_bad_orders_are_refused_naming_the_config(tmp_path: Path, order: object, error: type,
                                                  words: str) -> None:
    cfg = {"name": "o", "threads": 1, "data": {**SPEC, "order": order},
           "model": {"kind": "mlp", "hidden": [8]}, "train": {"epochs": 1}}
    path = tmp_path / "o.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(error, match="o.yaml") as err:
        Campaign(load_config(path), tmp_path / "run")
    assert words in str(err.value)
    assert not (tmp_path / "run").exists()


def test_a_campaign_learns_the_tasks_in_the_order_given(tmp_path: Path) -> None:
    """The same tasks in two orders: the task learned first is trained with the same seed in
    both, from the same network, so its accuracy right after training is the same; the
    metrics name the tasks in the order learned."""
    base = {"name": "o", "seed": 2, "threads": 1, "data": {**SPEC, "n_tasks": 5},
            "model": {"kind": "mlp", "hidden": [16]}, "train": {"epochs": 1},
            "strategy": {"name": "finetune"}}
    runs = {}
    for key, order in (("given", None), ("moved", [2, 0, 1, 3, 4]), ("other", [2, 4])):
        cfg = json.loads(json.dumps(base))
        cfg["data"]["order"] = order
        path = tmp_path / f"{key}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        runs[key] = Campaign(load_config(path), tmp_path / key).start()
    assert runs["moved"]["tasks"] == ["split-2", "split-0", "split-1", "split-3", "split-4"]
    assert runs["other"]["tasks"] == ["split-2", "split-4"]
    assert runs["moved"]["R"][1][0] == runs["other"]["R"][1][0]  # split-2 learned first, alike
    assert runs["given"]["R"][1][0] != runs["moved"]["R"][1][0]
    # the resolved order is part of the run's config (a resume checks it)
    assert runs["moved"]["config"]["data"]["order"] == [2, 0, 1, 3, 4]
    assert "order" not in runs["given"]["config"]["data"]


def test_reorder_is_the_identity_without_an_order() -> None:
    tasks = build_stream(SPEC)
    assert [t.name for t in reorder(tasks, None)] == [t.name for t in tasks]
