"""State follows graph changes exactly: the real operators on linear, conv, residual and concat
graphs, against gradients and Fishers measured on the changed network itself."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, jvp

from growth.compile import compile_graph
from growth.errors import ShapeError
from growth.graph import NetGraph
from growth.model import Model
from growth.ops import ChangeRecord, net2deeper, net2wider, prune_units
from growth.regularizers import build_quadratic, fisher_diagonal
from growth.remap import (
    GRADIENT,
    GRADIENT_SQ,
    IMPORTANCE,
    MASK,
    PATH,
    SPLIT,
    WEIGHT,
    remap,
    remap_state,
    split_key,
)
from growth.strategies import Context, make_strategy, state_key
from growth.train import TrainConfig, learn_task
from tests.graphgen import concat_net, randomize, residual
from tests.test_strategies import context, mlp, synthetic

CFG = TrainConfig(epochs=1, batch_size=16, lr=0.05, momentum=0.9)


pytestmark = pytest.mark.usefixtures("one_thread")


def conv_bn() -> NetGraph:
    """conv -> BN -> relu -> pool -> conv -> BN -> relu -> flatten -> linear."""
    g = NetGraph()
    g.add_input("x", (2, 6, 6))
    g.add("c1", "conv2d", ["x"], out_channels=3, kernel_size=3, padding=1)
    g.add("bn1", "batchnorm2d", ["c1"])
    g.add("r1", "relu", ["bn1"])
    g.add("p1", "maxpool2d", ["r1"], kernel_size=2)
    g.add("c2", "conv2d", ["p1"], out_channels=4, kernel_size=3, padding=1)
    g.add("bn2", "batchnorm2d", ["c2"])
    g.add("r2", "relu", ["bn2"])
    g.add("flat", "flatten", ["r2"])
    g.add("fc", "linear", ["flat"], out_features=3)
    g.add_output("out", "fc")
    return randomize(g, 4)


def dense() -> NetGraph:
    g = NetGraph()
    g.add_input("x", (5,))
    g.add("l1", "linear", ["x"], out_features=4)
    g.add("a1", "tanh", ["l1"])
    g.add("l2", "linear", ["a1"], out_features=3)
    g.add("a2", "relu", ["l2"])
    g.add("l3", "linear", ["a2"], out_features=3)
    g.add_output("out", "l3")
    return randomize(g, 3)


# (graph, layer to widen, new width); concat_net's "a" is the first of two concat inputs and
# residual's "c0" drags c1 (both a producer and a consumer of the group) and c2 along.
CASES = {
    "linear": (dense, "l1", 7),
    "conv_bn": (conv_bn, "c1", 5),
    "residual": (residual, "c0", 6),
    "concat_first": (concat_net, "a", 5),
}


def _data(graph: NetGraph, n: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *graph.shape(graph.input_node())), generator=gen)
    classes = graph.shape(graph.inputs(graph.heads[0])[0])[0]
    return x, torch.randint(0, classes, (n,), generator=gen)


def _grads(graph: NetGraph, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    module = compile_graph(graph).eval()
    F.cross_entropy(module(x), y).backward()
    return {n: p.grad for n, p in module.named_parameters()}


def _fisher(graph: NetGraph, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    module = compile_graph(graph)
    return fisher_diagonal(module, [n for n, _ in module.named_parameters()], x, y)


def _originals(idx: list[int]) -> list[bool]:
    seen: set[int] = set()
    out = []
    for i in idx:
        out.append(i not in seen)
        seen.add(i)
    return out


def _copy_mask(record: ChangeRecord, name: str, shape: torch.Size) -> torch.Tensor:
    """True where the position is a copy (not the first occurrence) along any resized dim."""
    mask = torch.zeros(shape, dtype=torch.bool)
    for dim, idx in record.index_maps.get(name, {}).items():
        first = torch.tensor(_originals(idx))
        view = [1] * len(shape)
        view[dim] = -1
        mask |= ~first.view(view).expand(shape)
    return mask


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_and_fishers_follow_as_measured_on_the_widened_network(case: str) -> None:
    build, node, width = CASES[case]
    graph = build()
    x, y = _data(graph)
    result = net2wider(graph, node, width, seed=5)
    wide = result.graph
    g_narrow, g_wide = _grads(graph, x, y), _grads(wide, x, y)
    f_narrow, f_wide = _fisher(graph, x, y), _fisher(wide, x, y)
    assert result.record.index_maps  # the widening really resized tensors
    for name in g_wide:
        got = remap(g_narrow[name], name, result.record, GRADIENT)
        torch.testing.assert_close(got, g_wide[name], rtol=1e-4, atol=1e-6)
        copies = _copy_mask(result.record, name, g_wide[name].shape)
        fisher = remap(f_narrow[name], name, result.record, IMPORTANCE)
        torch.testing.assert_close(fisher[~copies], f_wide[name][~copies], rtol=1e-4, atol=1e-8)
        assert torch.all(fisher[copies] == 0)  # copies are new capacity: unpenalised


@pytest.mark.parametrize("case", list(CASES))
def test_transformed_weights_are_the_operators_weights_bit_for_bit(case: str) -> None:
    build, node, width = CASES[case]
    graph = build()
    result = net2wider(graph, node, width, seed=2)
    before, after = graph.named_tensors(), result.graph.named_tensors()
    for name, t in after.items():
        assert torch.equal(remap(before[name], name, result.record, WEIGHT), t), name


def test_a_chain_of_records_is_followed_one_after_another() -> None:
    graph = residual()
    r1 = net2wider(graph, "c0", 6, seed=1)
    r2 = net2wider(r1.graph, "c0", 8, seed=2)
    r3 = prune_units(r2.graph, "c0", 5)
    records = [r1.record, r2.record, r3.record]
    before, after = graph.named_tensors(), r3.graph.named_tensors()
    x, y = _data(graph)
    f0 = _fisher(graph, x, y)
    for name, t in after.items():
        assert torch.equal(remap(before[name], name, records, WEIGHT), t), name
    # widen, widen is exact: the Fisher follows the measured one through both records
    f2 = _fisher(r2.graph, x, y)
    for name in f2:
        step = remap(f0[name], name, r1.record, IMPORTANCE)
        copies = _copy_mask(r1.record, name, step.shape)
        assert torch.all(step[copies] == 0)
        both = remap(f0[name], name, records[:2], IMPORTANCE)
        torch.testing.assert_close(both, remap(step, name, r2.record, IMPORTANCE))
        carried = remap(copies.to(torch.uint8), name, r2.record, MASK).bool()
        orig = ~(carried | _copy_mask(r2.record, name, f2[name].shape))
        torch.testing.assert_close(both[orig], f2[name][orig], rtol=1e-4, atol=1e-8)
        assert torch.all(both[~orig] == 0)
    # pruning keeps units in order, unscaled: kept positions carry their own importance
    kept = r3.record.index_maps["c0.weight"][0]
    f_two = remap(f0["c0.weight"], "c0.weight", records[:2], IMPORTANCE)
    assert torch.equal(remap(f0["c0.weight"], "c0.weight", records, IMPORTANCE), f_two[kept])


def test_roles_on_a_hand_record() -> None:
    """Old unit 0 copied twice (d = 3 on the column), unit 1 kept, one fresh position."""
    rec = ChangeRecord("hand", resized={"w": ((2, 2), (4, 2))},
                       index_maps={"w": {0: [0, 1, 0, -1]}}, divisors={"w": {0: [3, 1, 3, 1]}})
    t = torch.tensor([[6.0, 3.0], [2.0, 4.0]])
    # weight: value / d at every valid position, fresh 0
    assert torch.equal(remap(t, "w", rec, WEIGHT), torch.tensor([[2.0, 1], [2, 4], [2, 1], [0, 0]]))
    # r = 1 / (1/3 + 1/3) = 1.5 for unit 0's positions, 1 for unit 1
    assert torch.equal(remap(t, "w", rec, GRADIENT),
                       torch.tensor([[9.0, 4.5], [2, 4], [9, 4.5], [0, 0]]))
    assert torch.equal(remap(t, "w", rec, IMPORTANCE),
                       torch.tensor([[13.5, 6.75], [2, 4], [0, 0], [0, 0]]))
    assert torch.equal(remap(t, "w", rec, PATH), torch.tensor([[3.0, 1.5], [2, 4], [0, 0], [0, 0]]))
    owner = torch.tensor([[1, 2], [3, 0]], dtype=torch.uint8)
    out = remap(owner, "w", rec, MASK)
    assert out.dtype == torch.uint8
    assert torch.equal(out, torch.tensor([[1, 2], [3, 0], [0, 0], [0, 0]], dtype=torch.uint8))
    with pytest.raises(ShapeError, match="'w'.*missed an earlier change"):
        remap(torch.zeros(3, 2), "w", rec, WEIGHT)


def test_state_without_a_record_or_a_role_is_an_error() -> None:
    rec = ChangeRecord("hand", resized={"w": ((2,), (3,))}, index_maps={"w": {0: [0, 1, 1]}})
    state = {"anchor/0/w": torch.ones(2), "fisher/0/v": torch.ones(4)}
    with pytest.raises(ShapeError, match="'foo'"):
        remap_state({"foo/0/w": torch.ones(2)}, rec, {"anchor": WEIGHT}, {"w": (3,)})
    with pytest.raises(ShapeError, match="'fisher/0/v'.*change records"):
        remap_state(state, rec, {"anchor": WEIGHT, "fisher": IMPORTANCE}, {"w": (3,), "v": (5,)})
    out = remap_state(state, rec, {"anchor": WEIGHT}, {"w": (3,), "v": (4,)})
    assert out["anchor/0/w"].shape == (3,) and torch.equal(out["fisher/0/v"], state["fisher/0/v"])
    removed = ChangeRecord("cut", removed=["w"])
    assert "anchor/0/w" not in remap_state(state, removed, {"anchor": WEIGHT}, {"v": (4,)})


def test_replace_graph_refuses_a_resize_without_its_record() -> None:
    tasks = synthetic(2)
    model = mlp(hidden=4)
    s = make_strategy("ewc", {})
    ctx = context(model, tasks, 0)
    learn_task(ctx, s, CFG, seed=0)
    before = dict(s.state)
    grown = net2wider(model.graph, "fc1", 6)
    with pytest.raises(ShapeError, match="'fc1.weight'.*no change record"):
        ctx.replace_graph(grown.graph)
    assert all(torch.equal(before[k], v) for k, v in s.state.items())
    with pytest.raises(TypeError, match="result.record"):
        ctx.replace_graph(grown.graph, grown.record.index_maps)


# ---- every quadratic strategy: zero at the transformed anchors, exact perturbations ----------
QUADRATIC = {
    "ewc": {"lambda": 3.0, "fisher_samples": None},
    "ewc_online": {"lambda": 3.0, "mode": "online", "gamma": 0.7, "fisher_samples": None},
    "mwc": {"lambda": 3.0, "beta": 2.0, "fisher_samples": None},
    "si": {"c": 0.5},
    "mas": {"lambda": 0.3, "samples": None},
    "l2": {"lambda": 0.2},
}


def _strategy(key: str):
    return make_strategy(key.split("_")[0], QUADRATIC[key])


def _apply(model: Model, kind: str) -> tuple[NetGraph, list[ChangeRecord]]:
    if kind == "widen":
        r = net2wider(model.graph, "fc1", 7, seed=4)
        return r.graph, [r.record]
    if kind == "deeper":
        r = net2deeper(model.graph, "r1")
        return r.graph, [r.record]
    r1 = net2wider(model.graph, "fc1", 6, seed=1)
    r2 = net2wider(r1.graph, "features", 7, seed=2)
    r3 = prune_units(r2.graph, "fc1", 5)
    return r3.graph, [r1.record, r2.record, r3.record]


@pytest.mark.parametrize("kind", ["widen", "deeper", "chain"])
@pytest.mark.parametrize("key", list(QUADRATIC))
def test_the_penalty_is_exactly_zero_with_zero_gradient_at_the_transformed_anchors(
        key: str, kind: str) -> None:
    tasks = synthetic(2)
    model = mlp(n_heads=2, hidden=4)
    s = _strategy(key)
    learn_task(context(model, tasks, 0), s, CFG, seed=0)
    ctx = context(model, tasks, 1)
    ctx.strategy = s
    graph, records = _apply(model, kind)
    ctx.replace_graph(graph, records)
    s.before_task(ctx)
    value = s.penalty(ctx, None, None, None)
    assert value is not None and float(value.detach()) == 0.0
    value.backward()
    grads = [p.grad for p in model.module.parameters() if p.grad is not None]
    assert grads and all(torch.all(g == 0) for g in grads)
    with torch.no_grad():  # and it is a real penalty: moving an old weight costs
        model.module.fc1.weight[0] += 0.5
    s._quad = None
    assert float(s.penalty(ctx, None, None, None).detach()) > 0


def _narrow_penalty(key: str, s, names: list[str], delta: dict[str, torch.Tensor]) -> float:
    """The parent's penalty of a perturbation `delta` from its anchors, from its own state."""
    total = 0.0
    for n in names:
        d = delta[n].double()
        if key in ("ewc", "mwc"):
            total += 1.5 * float((s.state[state_key("fisher", 0, n)].double() * d * d).sum())
        elif key == "ewc_online":
            total += 1.5 * float((s.state[state_key("fisher", "all", n)].double() * d * d).sum())
        elif key == "si":
            total += 0.5 * float((s.state[state_key("omega", "all", n)].double() * d * d).sum())
        elif key == "mas":
            total += 0.3 * float((s.state[state_key("importance", "all", n)].double() * d * d)
                                 .sum())
        else:
            total += 0.2 * float((d * d).sum())
    return total


@pytest.mark.parametrize("key", list(QUADRATIC))
def test_a_perturbation_of_the_old_units_costs_what_it_cost_before_widening(key: str) -> None:
    """Widen fc1 (its rows and bias, the features layer's columns). A perturbation delta' of
    the old units moves the widened network's outputs, to first order, as the parent's move
    under delta = delta' on the divided columns (exactly: the output is linear in them) and
    delta'/c on the rows of a unit with c copies; the penalty of delta' is the parent's of delta.
    """
    tasks = synthetic(2)
    model = mlp(n_heads=2, hidden=4)
    s = _strategy(key)
    learn_task(context(model, tasks, 0), s, CFG, seed=0)
    parent = model.graph
    narrow_state = {k: v.clone() for k, v in s.state.items()}
    ctx = context(model, tasks, 1)
    ctx.strategy = s
    result = net2wider(model.graph, "fc1", 7, seed=4)
    idx = result.record.index_maps["fc1.weight"][0]
    c = torch.tensor([idx.count(i) for i in range(4)], dtype=torch.float32)
    ctx.replace_graph(result.graph, result.record)
    s.before_task(ctx)
    gen = torch.Generator().manual_seed(9)
    names = ["fc1.weight", "fc1.bias", "features.weight"]
    params = model.named_parameters()
    delta_wide = {n: torch.zeros_like(params[n]) for n in names}
    delta_wide["fc1.weight"][:4] = torch.randn(4, 16, generator=gen) * 0.1
    delta_wide["fc1.bias"][:4] = torch.randn(4, generator=gen) * 0.1
    delta_wide["features.weight"][:, :4] = torch.randn(4, 4, generator=gen) * 0.1
    delta = {"fc1.weight": delta_wide["fc1.weight"][:4] / c[:, None],
             "fc1.bias": delta_wide["fc1.bias"][:4] / c,
             "features.weight": delta_wide["features.weight"][:, :4]}
    x = tasks[0].train[0][:8]
    view = compile_graph(result.graph, head="out1").eval()
    wide_params = dict(view.named_parameters())
    _, move_wide = jvp(lambda *p: functional_call(view, dict(zip(names, p)), (x,)),
                       tuple(wide_params[n].detach() for n in names),
                       tuple(delta_wide[n] for n in names))
    parent_view = compile_graph(parent, head="out1")
    parent_params = dict(parent_view.named_parameters())
    _, move = jvp(lambda *p: functional_call(parent_view.eval(), dict(zip(names, p)), (x,)),
                  tuple(parent_params[n].detach() for n in names),
                  tuple(delta[n] for n in names))
    torch.testing.assert_close(move_wide, move, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        for n in names:
            params[n] += delta_wide[n]
    s.state, wide_state = narrow_state, s.state
    expect = _narrow_penalty(key, s, names, delta)
    s.state = wide_state
    s._quad = None
    assert float(s.penalty(ctx, None, None, None)) == pytest.approx(expect, rel=1e-5, abs=1e-9)


# ---- signed weights ----------------------------------------------------------------------------
def test_negative_and_cancelling_weights_give_the_true_quadratic() -> None:
    lin = torch.nn.Linear(3, 4)
    gen = torch.Generator().manual_seed(1)
    w1 = torch.randn(4, 3, generator=gen)  # signed, as SI's Omega can be
    a1, a2 = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    w2 = -w1.clone()
    w2[0] = torch.randn(3, generator=gen)  # row 0: no cancellation; rows 1-3 cancel exactly
    comps = [(0.7, {"weight": w1}, {"weight": a1}), (0.7, {"weight": w2}, {"weight": a2})]
    q = build_quadratic(lin, comps)
    for _ in range(3):
        with torch.no_grad():
            lin.weight.copy_(torch.randn(4, 3, generator=gen))
        theta = lin.weight.detach().double()
        expect = 0.7 * (w1.double() * (theta - a1.double()) ** 2
                        + w2.double() * (theta - a2.double()) ** 2).sum()
        assert float(q().detach()) == pytest.approx(float(expect), rel=1e-5, abs=1e-6)
    single = build_quadratic(lin, comps[:1])
    theta = lin.weight.detach().double()
    expect = 0.7 * (w1.double() * (theta - a1.double()) ** 2).sum()
    assert float(single().detach()) == pytest.approx(float(expect), rel=1e-5)
    with torch.no_grad():
        lin.weight.copy_(a1)
    assert float(single().detach()) == 0.0


def test_si_with_negative_omega_pays_the_true_penalty() -> None:
    tasks = synthetic(2)
    model = mlp(n_heads=2, hidden=4)
    s = make_strategy("si", {"c": 0.5})
    learn_task(context(model, tasks, 0), s, CFG, seed=0)
    gen = torch.Generator().manual_seed(3)
    for k in [k for k in s.state if k.startswith("omega/")]:
        s.state[k] = torch.randn(s.state[k].shape, generator=gen)  # about half negative
    ctx = context(model, tasks, 1)
    s.before_task(ctx)
    with torch.no_grad():
        for p in model.module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    params = model.named_parameters()
    trained = {n for n, _ in model.head("out1").named_parameters()}
    expect = 0.0
    negative = 0
    for n in trained - {"head1.weight", "head1.bias"}:  # task 0 never trained head1: no term
        omega, anchor = s.state[f"omega/all/{n}"].double(), s.state[f"anchor/latest/{n}"].double()
        negative += int((omega < 0).sum())
        expect += 0.5 * float((omega * (params[n].detach().double() - anchor) ** 2).sum())
    assert negative > 20
    assert float(s.penalty(ctx, None, None, None).detach()) == pytest.approx(expect, rel=1e-5)


# ---- optimizer state -----------------------------------------------------------------------
def _trajectory(graph: NetGraph, opt_name: str, steps: int = 3):
    """Train a copy of `graph` a few steps (eval mode: BN statistics fixed); returns the model,
    its optimizer and the graph before each step."""
    model = Model(graph)
    model.eval()
    params = list(model.module.parameters())
    opt = (torch.optim.SGD(params, lr=0.1, momentum=0.9) if opt_name == "sgd"
           else torch.optim.Adam(params, lr=0.01, betas=(0.8, 0.9)))
    x, y = _data(graph, 16, seed=7)
    points = []
    for _ in range(steps):
        points.append(model.graph)
        opt.zero_grad()
        F.cross_entropy(model.module(x), y).backward()
        opt.step()
    return model, opt, points, (x, y)


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
@pytest.mark.parametrize("case", ["linear", "concat_first"])
def test_optimizer_moments_are_the_widened_networks_along_the_parents_path(
        opt_name: str, case: str) -> None:
    build, node, width = CASES[case]
    model, opt, points, (x, y) = _trajectory(build(), opt_name)
    old = model.named_parameters()
    result = net2wider(model.graph, node, width, seed=6)
    ctx = Context(model, None, [], lambda t: "out", lambda t, y: y, torch.device("cpu"),
                  optimizer=opt)
    ctx.replace_graph(result.graph, result.record)
    assert set(ctx.optimizer.state) == set(model.module.parameters())
    # the moments the widened network's own gradients build along the parent's path
    moments: dict[str, list[torch.Tensor]] = {}
    for step, g in enumerate(points):
        grads = _grads(net2wider(g, node, width, seed=6).graph, x, y)
        for n, gr in grads.items():
            m = moments.setdefault(n, [torch.zeros_like(gr), torch.zeros_like(gr)])
            if opt_name == "sgd":  # torch's first step takes the gradient itself
                m[0] = gr.clone() if step == 0 else 0.9 * m[0] + gr
            else:
                m[0] = 0.8 * m[0] + 0.2 * gr
                m[1] = 0.9 * m[1] + 0.1 * gr * gr
    for n, p in model.named_parameters().items():
        state = ctx.optimizer.state[p]
        assert old[n] is not p
        if opt_name == "sgd":
            torch.testing.assert_close(state["momentum_buffer"], moments[n][0], rtol=1e-4,
                                       atol=1e-7)
        else:
            torch.testing.assert_close(state["exp_avg"], moments[n][0], rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(state["exp_avg_sq"], moments[n][1], rtol=1e-4, atol=1e-9)
            assert int(state["step"]) == 3


def test_masks_keep_old_owners_and_free_every_copy() -> None:
    graph = concat_net()
    result = net2wider(graph, "a", 6, seed=3)
    owner = torch.full(graph.named_tensors()["c.weight"].shape, 2, dtype=torch.uint8)
    out = remap(owner, "c.weight", result.record, MASK)
    cols = result.record.index_maps["c.weight"][1]
    first = torch.tensor(_originals(cols))
    assert out.shape == result.graph.named_tensors()["c.weight"].shape
    assert torch.all(out[:, first] == 2) and torch.all(out[:, ~first] == 0)
    assert cols[6:] == [3, 4]  # the concat's second input kept its columns, after a's six


# ---- edge cases of the transform itself, on hand records ----------------------------------------
def _hand_record() -> ChangeRecord:
    """The record of test_roles_on_a_hand_record: unit 0 copied twice (d = 3), one fresh."""
    return ChangeRecord("hand", resized={"w": ((2, 2), (4, 2))},
                        index_maps={"w": {0: [0, 1, 0, -1]}}, divisors={"w": {0: [3, 1, 3, 1]}})


def test_state_stays_on_its_own_device_whatever_the_default_device() -> None:
    """A checkpoint's state on the CPU follows a change while another default device is set
    (e.g. torch.set_default_device("cuda")): every helper tensor is made on the state's device.
    Values by hand as in test_roles_on_a_hand_record (r = 1.5 for unit 0, 1 for unit 1)."""
    t = torch.tensor([[6.0, 3.0], [2.0, 4.0]])
    expect = {
        WEIGHT: torch.tensor([[2.0, 1], [2, 4], [2, 1], [0, 0]]),
        IMPORTANCE: torch.tensor([[13.5, 6.75], [2, 4], [0, 0], [0, 0]]),
        MASK: torch.tensor([[6.0, 3], [2, 4], [0, 0], [0, 0]]),
        GRADIENT: torch.tensor([[9.0, 4.5], [2, 4], [9, 4.5], [0, 0]]),
        GRADIENT_SQ: torch.tensor([[13.5, 6.75], [2, 4], [13.5, 6.75], [0, 0]]),
        PATH: torch.tensor([[3.0, 1.5], [2, 4], [0, 0], [0, 0]]),
        # d^2 / c: unit 0 has c = 2 copies divided by d = 3 (9 / 2 each), unit 1 one (1)
        SPLIT: torch.tensor([[27.0, 13.5], [2, 4], [27, 13.5], [0, 0]]),
    }
    rec = _hand_record()
    copied = ChangeRecord("copy", resized={"w": ((2, 2), (3, 2))}, index_maps={"w": {0: [0, 1, 1]}})
    with torch.device("meta"):
        got = {role: remap(t, "w", rec, role) for role in expect}
        undivided = remap(t, "w", copied, GRADIENT)  # no divisors: d = 1, r = 1/2 for unit 1
    for role, want in expect.items():
        assert got[role].device == t.device, role
        assert torch.equal(got[role], want), role
    assert torch.equal(undivided, torch.tensor([[6.0, 3], [1, 2], [1, 2]]))


def test_a_dimension_emptied_by_a_change_leaves_an_empty_tensor() -> None:
    rec = ChangeRecord("cut", resized={"w": ((2, 3), (0, 3))}, index_maps={"w": {0: []}})
    t = torch.arange(6.0).view(2, 3)
    for role in (WEIGHT, IMPORTANCE, SPLIT, MASK, GRADIENT, GRADIENT_SQ, PATH):
        out = remap(t, "w", rec, role)
        assert out.shape == (0, 3) and out.dtype == t.dtype, role


def test_a_record_without_shapes_is_followed_by_its_index_maps() -> None:
    """`resized` is optional for remap: the index maps alone say where each entry goes."""
    rec = ChangeRecord("swap", index_maps={"w": {0: [1, 0, 1]}})
    t = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert torch.equal(remap(t, "w", rec, WEIGHT), torch.tensor([[3.0, 4], [1, 2], [3, 4]]))
    # unit 1 copied once more (d = 1): r = 1/2, so r^2 = 1/4 at its original, 0 at the copy
    assert torch.equal(remap(t, "w", rec, IMPORTANCE),
                       torch.tensor([[0.75, 1.0], [1, 2], [0, 0]]))


def test_a_key_splits_at_its_first_two_slashes() -> None:
    assert split_key("fisher/t1/block/conv.weight") == ("fisher", "t1", "block/conv.weight")
    assert split_key("anchor/0/w") == ("anchor", "0", "w")
    with pytest.raises(ShapeError, match="'anchor/w'"):
        split_key("anchor/w")


def test_dropping_a_removed_parameter_keeps_every_later_entry() -> None:
    rec = ChangeRecord("cut", removed=["w"])
    state = {"anchor/0/w": torch.ones(2), "anchor/0/v": torch.full((3,), 2.0),
             "fisher/1/v": torch.full((3,), 5.0)}
    out = remap_state(state, rec, {"anchor": WEIGHT, "fisher": IMPORTANCE}, {"v": (3,)})
    assert list(out) == ["anchor/0/v", "fisher/1/v"]
    assert torch.equal(out["fisher/1/v"], torch.full((3,), 5.0))


def test_an_undeclared_role_names_the_strategy_by_default() -> None:
    rec = ChangeRecord("hand", resized={"w": ((2,), (3,))}, index_maps={"w": {0: [0, 1, 1]}})
    with pytest.raises(ShapeError, match="^strategy state 'foo/0/w'.*the strategy declares"):
        remap_state({"foo/0/w": torch.ones(2)}, rec, {}, {"w": (3,)})
