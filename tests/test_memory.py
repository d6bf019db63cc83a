"""The episodic memory: reservoir, class-balanced and herding insertion, views, size, state."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load, save
from scipy.stats import chisquare

from growth.memory import EpisodicMemory, herd


def by_label(task: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return y


def test_reservoir_keeps_every_offered_sample_with_equal_probability():
    n, budget, trials = 12, 4, 3000
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(n)
    for _ in range(trials):
        mem = EpisodicMemory(budget)
        x = torch.arange(n, dtype=torch.float32).view(n, 1)
        for part in (slice(0, 3), slice(3, 7), slice(7, n)):  # offered in three calls
            mem.reservoir(x[part], torch.zeros(len(x[part]), dtype=torch.long), 0, gen)
        assert len(mem) == budget and mem.seen == n
        counts[mem.x.flatten().long()] += 1
    p = budget / n
    z = (counts / trials - p) / math.sqrt(p * (1 - p) / trials)
    assert z.abs().max() < 4, counts
    assert chisquare(counts.numpy()).pvalue > 1e-3, counts


def test_reservoir_fills_before_it_replaces_and_keeps_rows_consistent():
    mem = EpisodicMemory(5)
    x = torch.arange(3, dtype=torch.float32).view(3, 1)
    mem.reservoir(x, torch.tensor([0, 1, 2]), torch.tensor([4, 5, 6]), torch.Generator())
    assert mem.x.flatten().tolist() == [0, 1, 2] and mem.y.tolist() == [0, 1, 2]
    assert mem.task.tolist() == [4, 5, 6]
    x = torch.arange(3, 40, dtype=torch.float32).view(-1, 1)
    mem.reservoir(x, x.flatten().long(), x.flatten().long() + 4, torch.Generator())
    assert len(mem) == 5
    assert mem.y.tolist() == mem.x.flatten().long().tolist()  # rows stay whole
    assert mem.task.tolist() == (mem.y + 4).tolist()


def test_balanced_insertion_keeps_classes_within_one_row_of_each_other():
    mem = EpisodicMemory(10)
    gen = torch.Generator().manual_seed(1)
    for c in range(3):  # classes arrive one after the other, 20 samples each
        y = torch.full((20,), c)
        mem.balanced(torch.randn(20, 2), y, c, by_label, gen)
        counts = torch.bincount(mem.y, minlength=c + 1)[: c + 1]
        assert int(counts.sum()) == 10
        assert int(counts.max() - counts.min()) <= 1, counts
    assert sorted(torch.bincount(mem.y).tolist()) == [3, 3, 4]


def test_herding_picks_the_hand_computed_exemplars():
    # class 0: mean (0.25, 0.65). Step 1 takes p2 (distance .381), step 2 p1 (mean (.3, .9),
    # .255 against p3's .292), step 3 p0 ((.533, .6): .287 against p3's .331) although p3 is
    # nearer the class mean than p0.
    # class 1: mean (.467, -.8): p6 (.133), then p4 ((.3, -.9): .194 against p5's .254)
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-0.6, 0.8],
                          [0.0, -1.0], [0.8, -0.6], [0.6, -0.8]])
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    x = torch.arange(7, dtype=torch.float32).view(7, 1)
    scale = torch.tensor([0.3, 3.0, 0.5, 2.0, 4.0, 0.2, 1.5]).view(7, 1)
    mem = EpisodicMemory(100)
    mem.herding(x, y, 0, feats * scale, 3, by_label)  # features are normalised first
    assert mem.x.flatten().tolist() == [2, 1, 0, 6, 4, 5]
    mem.keep_per_class(2, by_label)
    assert mem.x.flatten().tolist() == [2, 1, 6, 4]
    assert herd(feats[:4], 4).tolist() == [2, 1, 0, 3]


def test_views_and_samples():
    mem = EpisodicMemory(10)
    mem.reservoir(torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 2, 2]),
                  torch.tensor([0, 0, 0, 0, 1, 1]), torch.Generator())
    assert mem.rows(1).tolist() == [4, 5]
    assert {k: v.tolist() for k, v in mem.classes(by_label).items()} == {
        0: [0, 2], 1: [1, 3], 2: [4, 5]}
    rows = mem.sample(4, torch.Generator().manual_seed(0), mem.rows(0))
    assert len(set(rows.tolist())) == 4 and set(rows.tolist()) == {0, 1, 2, 3}
    x, y, t = mem.batch(rows)
    assert torch.equal(x, mem.x[rows]) and torch.equal(y, mem.y[rows])


def test_memory_bytes_are_counted_from_the_rows():
    mem = EpisodicMemory(50)
    assert mem.report() == {"samples": 0, "bytes": 0}
    mem.reservoir(torch.zeros(7, 1, 8, 8), torch.zeros(7, dtype=torch.long), 0,
                  torch.Generator())
    assert mem.report() == {"samples": 7, "bytes": 7 * (64 * 4 + 8 + 8)}
    mem.reservoir(torch.zeros(100, 1, 8, 8, dtype=torch.float16),
                  torch.zeros(100, dtype=torch.long), 1, torch.Generator())
    assert mem.report() == {"samples": 50, "bytes": 50 * (64 * 4 + 8 + 8)}  # stored as float32


def test_memory_state_round_trips_through_safetensors_and_json():
    mem = EpisodicMemory(8)
    gen = torch.Generator().manual_seed(3)
    mem.reservoir(torch.randn(20, 1, 2, 2), torch.randint(0, 3, (20,)), 2, gen)
    tensors, extra = mem.state_dict()
    back = EpisodicMemory(8)
    back.load_state_dict(load(save({k: v.contiguous() for k, v in tensors.items()})),
                         json.loads(json.dumps(extra)))
    assert torch.equal(back.x, mem.x) and torch.equal(back.y, mem.y)
    assert torch.equal(back.task, mem.task) and back.seen == 20
    more = torch.randn(10, 1, 2, 2), torch.randint(0, 3, (10,))
    mem.reservoir(*more, 3, torch.Generator().manual_seed(4))
    back.reservoir(*more, 3, torch.Generator().manual_seed(4))
    assert torch.equal(back.x, mem.x)
    empty = EpisodicMemory(4)
    tensors, extra = empty.state_dict()
    empty.load_state_dict(load(save(tensors)), extra)
    assert len(empty) == 0 and empty.x is None


@pytest.mark.parametrize("budget", [1, 3])
def test_reservoir_never_exceeds_the_budget(budget):
    mem = EpisodicMemory(budget)
    for i in range(4):
        mem.reservoir(torch.randn(5, 2), torch.arange(5), i, torch.Generator().manual_seed(i))
        assert len(mem) == budget


def test_balanced_insertion_admits_a_new_class_when_the_budget_is_below_the_classes():
    """Budget 2, full with classes 0 and 1; a sample of class 2 holds 0 < 2 / 3 rows of its
    class, so it goes in, in place of a row of the largest class (ties: the smallest key, 0)."""
    mem = EpisodicMemory(2)
    gen = torch.Generator().manual_seed(0)
    mem.balanced(torch.zeros(2, 1), torch.tensor([0, 1]), 0, by_label, gen)
    mem.balanced(torch.ones(1, 1), torch.tensor([2]), 1, by_label, gen)
    assert sorted(mem.y.tolist()) == [1, 2]
    assert mem.x[mem.y == 2].flatten().tolist() == [1.0]


def test_keeping_m_per_class_keeps_each_classes_first_rows_in_order():
    mem = EpisodicMemory(10)
    mem.herding(torch.arange(6.0).view(6, 1), torch.tensor([0, 1, 2, 0, 1, 2]), 0,
                torch.eye(6), 2, by_label)
    assert mem.x.flatten().tolist() == [0, 3, 1, 4, 2, 5]  # herding order: class by class
    mem.select(torch.tensor([0, 2, 4, 1, 3, 5]))  # interleave the classes: 0, 1, 2, 0, 1, 2
    assert mem.y.tolist() == [0, 1, 2, 0, 1, 2]
    mem.keep_per_class(1, by_label)
    assert mem.x.flatten().tolist() == [0, 1, 2] and mem.y.tolist() == [0, 1, 2]


def test_herding_with_no_room_per_class_adds_nothing():
    """iCaRL's m = budget // classes is 0 once the classes outnumber the budget."""
    mem = EpisodicMemory(1)
    mem.herding(torch.arange(4.0).view(4, 1), torch.tensor([0, 0, 1, 1]), 0, torch.eye(4), 0,
                by_label)
    assert len(mem) == 0


def test_a_memory_restored_from_a_state_without_rows_is_an_empty_one():
    """A state holding no row tensors (nothing stored yet) gives an empty memory whose labels
    and task indices stay integers once samples arrive."""
    mem = EpisodicMemory(4)
    assert mem.device == torch.device("cpu")
    assert mem.to("cpu") is mem and mem.device == torch.device("cpu")
    mem.load_state_dict({}, {})
    assert len(mem) == 0 and mem.x is None and mem.seen == 0
    mem.reservoir(torch.randn(3, 2), torch.tensor([1, 0, 1]), 2, torch.Generator().manual_seed(0))
    assert mem.y.tolist() == [1, 0, 1] and mem.task.tolist() == [2, 2, 2]
    assert mem.y.dtype == torch.long and mem.task.dtype == torch.long


def test_a_memory_on_another_device_keeps_every_row_there():
    """The meta device stands in for an accelerator (every machine has it): whatever the
    memory holds, returns or loads stays on the memory's device from construction on, as rows
    on a GPU must (a CPU tensor beside a meta one fails at once, as beside a GPU one)."""
    meta = torch.device("meta")

    def on_meta(mem: EpisodicMemory) -> bool:
        return all(t.device == meta for t in (mem.x, mem.y, mem.task) if t is not None)

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 3), torch.arange(6)
    mem = EpisodicMemory(4, meta)
    assert on_meta(mem)  # empty, before the first insertion
    mem.reservoir(x, y, 0, gen)  # fills 4 rows, then overwrites some
    mem.reservoir(x, y, torch.ones(6, dtype=torch.long), gen)
    assert on_meta(mem) and len(mem) == 4 and mem.y.dtype == mem.task.dtype == torch.long
    assert {t.device for t in (mem.rows(), mem.sample(2, gen), mem.sample(1, gen, mem.rows()),
                               *mem.batch(torch.tensor([0, 3])))} == {meta}
    mem.select(torch.tensor([0, 2]))
    assert on_meta(mem) and len(mem) == 2

    cpu = EpisodicMemory(4)
    cpu.reservoir(x, y, 0, gen)
    assert on_meta(cpu.to("meta")) and cpu.device == meta
    tensors, extra = cpu.state_dict()
    restored = EpisodicMemory(4, meta)
    restored.load_state_dict({k: torch.zeros(v.shape, dtype=v.dtype)
                              for k, v in tensors.items()}, extra)
    assert on_meta(restored) and len(restored) == 4
    empty = EpisodicMemory(4, meta)
    empty.load_state_dict({}, {})
    assert on_meta(empty) and len(empty) == 0
