"""CWR* and AR1: the consolidated output layer against a hand computation, the trunk's
treatment, and resumed class-incremental campaigns."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from test_strategies import context, make_task, mlp, perturb, value

from growth.campaign import Campaign, resume_run
from growth.config import load_config
from growth.errors import ConfigError
from growth.strategies import make_strategy, state_key
from growth.train import TrainConfig, learn_task

CFG = TrainConfig(epochs=2, batch_size=16, lr=0.05, momentum=0.9)
TRUNK = ["fc1.weight", "fc1.bias", "features.weight", "features.bias"]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def stream() -> list:
    """Three class-incremental tasks over 4 classes: {0, 1} (5 and 3 training samples),
    {2, 3} (4 and 4), then {1, 2} again (6 and 2); labels are local, offsets 0, 2, 1."""
    gen = torch.Generator().manual_seed(1)
    tasks = []
    for i, (offset, counts) in enumerate([(0, (5, 3)), (2, (4, 4)), (1, (6, 2))]):
        y = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
        y = torch.cat([y, y[:3]])  # 11 samples: make_task trains on the first 8
        x = torch.randn(len(y), 1, 4, 4, generator=gen)
        tasks.append(make_task(i, x, y, 2, offset=offset))
    return tasks


def train_counts(task) -> list[int]:
    return torch.bincount(task.train[1] + task.class_offset, minlength=4).tolist()


@pytest.mark.parametrize("name", ["cwr", "ar1"])
def test_consolidation_is_a_count_weighted_average_of_mean_shifted_rows(name):
    tasks = stream()
    assert [train_counts(t) for t in tasks] == [[5, 3, 0, 0], [0, 0, 4, 4], [0, 6, 2, 0]]
    model = mlp(n_heads=1, classes=4)
    s = make_strategy(name)
    head = model.module.head0
    gen = torch.Generator().manual_seed(5)
    cw_w, cw_b = torch.zeros(4, 12, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    past = [0, 0, 0, 0]
    for i, task in enumerate(tasks):
        ctx = context(model, tasks, i, single_head=True)
        s.before_task(ctx)
        cur = train_counts(task)
        now = [j for j in range(4) if cur[j]]
        # the temporary head: zero, but classes of this task seen before start from cw
        want_w = torch.zeros(4, 12, dtype=torch.float64)
        want_b = torch.zeros(4, dtype=torch.float64)
        for j in now:
            if past[j]:
                want_w[j], want_b[j] = cw_w[j], cw_b[j]
        torch.testing.assert_close(head.weight.detach().double(), want_w)
        torch.testing.assert_close(head.bias.detach().double(), want_b)
        with torch.no_grad():  # what training left in the head
            head.weight.copy_(torch.randn(4, 12, generator=gen))
            head.bias.copy_(torch.randn(4, generator=gen))
        tw_w, tw_b = head.weight.detach().double(), head.bias.detach().double()
        mean_w = sum(tw_w[j].sum() for j in now) / (12 * len(now))  # over the task's rows
        mean_b = sum(tw_b[j] for j in now) / len(now)
        s.after_task(ctx)
        for j in now:
            w = math.sqrt(past[j] / cur[j])
            cw_w[j] = (cw_w[j] * w + tw_w[j] - mean_w) / (w + 1)
            cw_b[j] = (cw_b[j] * w + tw_b[j] - mean_b) / (w + 1)
            past[j] += cur[j]
        torch.testing.assert_close(head.weight.detach().double(), cw_w)  # zero rows: unseen
        torch.testing.assert_close(head.bias.detach().double(), cw_b)
        torch.testing.assert_close(s.state[state_key("cw", "all", "head0.weight")].double(), cw_w)
        assert s.state[state_key("count", "all", "classes")].tolist() == past
    assert past == [5, 9, 6, 4]


def class_stream(n_tasks: int = 3) -> list:
    gen = torch.Generator().manual_seed(4)
    tasks = []
    for i in range(n_tasks):
        x = torch.randn(48, 1, 4, 4, generator=gen) + i
        y = (x.flatten(1).sum(1) > 16 * i).long()
        tasks.append(make_task(i, x, y, 2, offset=2 * i))
    return tasks


def test_cwr_trains_only_the_output_layer_after_the_first_task_and_ar1_the_trunk_too():
    tasks = class_stream()
    trunks = {}
    for name in ("cwr", "ar1"):
        model = mlp(n_heads=1, classes=6)
        s = make_strategy(name)
        learn_task(context(model, tasks, 0, single_head=True), s, CFG, seed=0)
        after0 = {n: p.detach().clone() for n, p in model.named_parameters().items()}
        learn_task(context(model, tasks, 1, single_head=True), s, CFG, seed=1)
        params = model.named_parameters()
        trunks[name] = [torch.equal(params[n], after0[n]) for n in TRUNK]
        assert all(p.requires_grad for p in params.values())  # the freeze ends with the fit
    assert trunks["cwr"] == [True] * 4
    assert trunks["ar1"] == [False] * 4


def test_ar1_pays_si_on_the_trunk_alone_with_omega_capped():
    tasks = class_stream()
    paid = {}
    for clip in (None, 1e-4):
        model = mlp(n_heads=1, classes=6)
        s = make_strategy("ar1", {"c": 3.0, "clip": clip})
        learn_task(context(model, tasks, 0, single_head=True), s, CFG, seed=0)
        assert {k.split("/")[2] for k in s.state if k.startswith("omega/")} == set(TRUNK)
        ctx = context(model, tasks, 1, single_head=True)
        s.before_task(ctx)
        perturb(model, 2)
        params = model.named_parameters()
        by_hand = 0.0
        for n in TRUNK:
            omega = s.state[state_key("omega", "all", n)]
            omega = omega if clip is None else omega.clamp(max=clip)
            diff = params[n].detach() - s.state[state_key("anchor", "latest", n)]
            by_hand += float((3.0 * omega * diff ** 2).sum())
        paid[clip] = value(s, ctx)
        assert paid[clip] == pytest.approx(by_hand, rel=1e-5)
        model.module.zero_grad(set_to_none=True)
        s.penalty(ctx, None, None, None).backward()
        assert model.module.head0.weight.grad is None  # the output layer is CWR*'s alone
    assert paid[1e-4] < paid[None]


def test_a_task_scenario_config_is_refused(tmp_path: Path):
    for name in ("cwr", "ar1"):
        cfg = load_config("experiments/split_digits_task.yaml", [f"strategy={{name: {name}}}"])
        with pytest.raises(ConfigError, match="runs only in scenario class"):
            Campaign(cfg, tmp_path / name)


@pytest.mark.parametrize("name", ["cwr", "ar1", "rwalk", "scp"])
def test_class_incremental_campaigns_resume_to_the_same_R(tmp_path: Path, name: str):
    cfg = load_config("experiments/split_digits_class.yaml",
                      [f"strategy={{name: {name}}}", "train.epochs=2",
                       "data.max_train_per_task=60"])
    full = Campaign(cfg, tmp_path / "full").start()
    part = tmp_path / "part"
    Campaign(cfg, part).start()
    for task in ("task_002", "task_003", "task_004"):  # as if killed after task 1
        shutil.rmtree(part / "checkpoints" / task)
    assert resume_run(part)["R"] == full["R"]


@pytest.mark.parametrize("name,bad,key", [("ar1", {"clip": 0}, "clip"), ("ar1", {"c": -1}, "c"),
                                          ("cwr", {"lambda": 1}, "lambda")])
def test_bad_settings_are_refused_naming_the_key(name, bad, key):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=key):
        make_strategy(name, bad)


def test_a_layer_that_is_not_linear_is_refused_by_name():
    from growth.errors import GraphError

    tasks = class_stream()
    s = make_strategy("cwr", {"layer": "r1"})
    with pytest.raises(GraphError, match="'r1'.*linear layer"):
        s.before_task(context(mlp(n_heads=1, classes=6), tasks, 0, single_head=True))


def test_a_checkpointed_state_is_checked_against_its_declaration():
    tasks = class_stream()
    model = mlp(n_heads=1, classes=6)
    s = make_strategy("ar1")
    learn_task(context(model, tasks, 0, single_head=True), s, CFG, seed=0)
    tensors, extra = s.state_dict()
    graph = model.graph.named_tensors()
    assert s.check_state(tensors, extra, graph, 1) == []
    key = state_key("count", "all", "classes")
    retyped = {**tensors, key: tensors[key].float()}
    assert any("dtype" in p for p in s.check_state(retyped, extra, graph, 1))
    cut = {**tensors, state_key("cw", "all", "head0.weight"): torch.zeros(6, 5)}
    assert any("shape" in p for p in s.check_state(cut, extra, graph, 1))
