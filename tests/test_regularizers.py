"""The samples that Fisher (EWC, MWC) and MAS importances are measured on follow the run's seed."""

from __future__ import annotations

import torch

from growth.data.containers import Task
from growth.graph import NetGraph
from growth.model import Model
from growth.regularizers import task_fisher, task_sample
from growth.strategies import Context

N, CLASSES = 40, 4


def task(index: int = 0) -> Task:
    """Inputs carry their own position (x[i] = i), so a drawn subset can be read off them."""
    x = torch.arange(N, dtype=torch.float32).view(N, 1) / N
    y = torch.arange(N) % CLASSES
    return Task(index, f"t{index}", (x, y), (x, y), (x, y), list(range(CLASSES)), CLASSES, 0,
                (1,))


def model() -> Model:
    torch.manual_seed(0)
    g = NetGraph()
    g.add_input("x", (1,))
    g.add("fc", "linear", ["x"], out_features=6)
    g.add("r", "relu", ["fc"])
    for i in range(2):
        g.add(f"head{i}", "linear", ["r"], out_features=CLASSES)
        g.add_output(f"out{i}", f"head{i}")
    return Model(g)


def context(seed: int, t: Task, m: Model | None = None) -> Context:
    return Context(m or model(), t, [], lambda t: f"out{t.index}", lambda t, y: y,
                   torch.device("cpu"), seed=seed)


def picked(seed: int, t: Task, n: int | None = 10) -> list[int]:
    x, _ = task_sample(context(seed, t), t, n)
    return [round(float(v) * N) for v in x.flatten()]


def test_the_subset_follows_the_seed() -> None:
    t = task()
    a, again, b = picked(0, t), picked(0, t), picked(1, t)
    assert a == again
    assert a != b
    assert len(a) == len(set(a)) == 10 and set(a) <= set(range(N))
    assert len({tuple(picked(s, t)) for s in range(6)}) == 6


def test_tasks_of_one_run_draw_their_own_subsets() -> None:
    assert picked(0, task(0)) != picked(0, task(1))


def test_labels_stay_with_their_inputs() -> None:
    t = task()
    x, y = task_sample(context(3, t), t, 10)
    assert torch.equal(y, torch.round(x.flatten() * N).long() % CLASSES)


def test_a_task_no_larger_than_the_budget_is_used_whole_whatever_the_seed() -> None:
    t = task()
    for seed in (0, 1):
        assert picked(seed, t, None) == picked(seed, t, N) == list(range(N))


def test_fisher_of_a_subset_depends_on_the_seed() -> None:
    t, m = task(), model()
    f0 = task_fisher(context(0, t, m), t, 5)
    assert all(torch.equal(v, task_fisher(context(0, t, m), t, 5)[k]) for k, v in f0.items())
    f1 = task_fisher(context(1, t, m), t, 5)
    assert any(not torch.equal(v, f1[k]) for k, v in f0.items())
