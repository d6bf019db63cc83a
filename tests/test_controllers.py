"""Controllers: the shared protocol on random search and EAS — children keep their parent's
function, limits hold, seeds and saved state reproduce proposals, settings are validated."""

from __future__ import annotations

import json
import math

import cloudpickle
import pytest
import torch
from graphgen import (  # noqa: F401
    max_rel_error,
    networks,
    outputs,
    randomize,
    residual,
    single_thread,
)
from growth.controllers import CONTROLLERS, Controller, Proposal, make_controller
from growth.search_spaces import SearchSpace, make_space
from growth.search_spaces.networks import add_head, mlp, small_cnn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from growth.errors import CheckpointError, ConfigError
from growth.graph import NetGraph

pytestmark = pytest.mark.usefixtures("single_thread")
# the controllers of the shared rollout (RCL decides counts per layer: test_rcl_controller.py)
NAMES = sorted(n for n in CONTROLLERS if n != "rcl")
TOL = 1e-5


def _mlp() -> NetGraph:
    return randomize(add_head(mlp((6,), [5, 7]), "t0", 3), 0)


def _cnn_bn() -> NetGraph:
    return randomize(add_head(small_cnn((2, 8, 8), [3, 4], batchnorm=True), "t0", 3), 1)


def _input(g: NetGraph, n: int = 6) -> torch.Tensor:
    shape = g.shape(g.input_node())
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(5))


def _small_space(g: NetGraph, **extra) -> SearchSpace:
    """A small space in the operators' exact mode (no symmetry-breaking noise)."""
    return make_space({"widths": {"conv": [4, 6, 8, 12], "fc": [8, 12, 16, 24]}, "noise": 0.0,
                       "deeper_noise": 0.0, **extra}, g)


def _check_children(controller: Controller, g: NetGraph, n: int, x: torch.Tensor) -> None:
    """Every proposal rebuilds (from its JSON) to the architecture it names, keeps the
    parent's function and respects the space's parameter limit."""
    before = outputs(g, x)
    space = controller.space
    for p in controller.propose(g, n):
        actions = json.loads(json.dumps(p.to_json()))["actions"]
        child, _ = space.apply(g, actions, sample=x)
        assert space.arch(child) == p.arch
        assert max_rel_error(before, outputs(child, x)) <= TOL, p.actions
        if space.max_params is not None:
            assert child.param_count() <= space.max_params


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("build", [_mlp, _cnn_bn, residual], ids=["mlp", "cnn_bn", "residual"])
def test_children_start_with_the_parents_function(name: str, build) -> None:
    g = build()
    space = _small_space(g, deeper_batchnorm=build is _cnn_bn)
    controller = make_controller(name, space, {"wider_actions": 2, "deeper_actions": 3}, seed=3)
    _check_children(controller, g, 4, _input(g))


@pytest.mark.parametrize("name", NAMES)
def test_parameter_limit_holds_for_every_child(name: str) -> None:
    g = _cnn_bn()
    space = _small_space(g, max_params=g.param_count() + 400)
    controller = make_controller(name, space, {"wider_actions": 3, "deeper_actions": 3}, seed=0)
    proposals = controller.propose(g, 6)
    assert any(p.actions for p in proposals)
    for p in proposals:
        child, _ = space.apply(g, p.actions)
        assert child.param_count() <= space.max_params
        assert p.decisions["params"] == child.param_count()


@pytest.mark.parametrize("name", NAMES)
def test_seeds_reproduce_and_differ(name: str) -> None:
    g = _mlp()
    space = _small_space(g)
    run = lambda seed: [p.to_json() for p in  # noqa: E731
                        make_controller(name, space, seed=seed).propose(g, 5)]
    assert run(1) == run(1)
    assert run(1) != run(2)


@pytest.mark.parametrize("name", NAMES)
def test_restored_state_proposes_what_the_uninterrupted_controller_would(name: str) -> None:
    g = _cnn_bn()
    space = _small_space(g)
    a = make_controller(name, space, seed=4)
    first = a.propose(g, 3)
    a.observe([(p, 0.5 + 0.1 * i) for i, p in enumerate(first)])
    tensors, extra = a.state_dict()
    saved = {k: v.clone() for k, v in tensors.items()}
    extra = json.loads(json.dumps(extra))  # the extra part is plain JSON
    want = [p.to_json() for p in a.propose(g, 3)]
    b = make_controller(name, space, seed=99)  # another seed: everything must come from state
    b.load_state_dict(saved, extra)
    assert [p.to_json() for p in b.propose(g, 3)] == want
    # ... and learns from that generation as the saved one does
    for ctl in (a, b):
        ctl.observe([(Proposal.from_json(p), 0.9 - 0.2 * i) for i, p in enumerate(want)])
    assert [p.to_json() for p in b.propose(g, 3)] == [p.to_json() for p in a.propose(g, 3)]
    c = cloudpickle.loads(cloudpickle.dumps(a))  # a Tune searcher holds one
    assert isinstance(c, Controller)
    assert [p.to_json() for p in c.propose(g, 2)] == [p.to_json() for p in a.propose(g, 2)]


@pytest.mark.parametrize("name", NAMES)
def test_a_generation_is_distinct_new_and_changes_the_parent(name: str) -> None:
    g = _mlp()
    controller = make_controller(name, _small_space(g), seed=0)
    first = controller.propose(g, 6)
    archs = [p.arch for p in first]
    assert len(first) == 6 and len(set(archs)) == 6
    assert SearchSpace.arch(g) not in archs  # a child changes something
    again = controller.propose(g, 6, exclude=set(archs))
    assert len(again) == 6 and not set(p.arch for p in again) & set(archs)


@pytest.mark.parametrize("name", NAMES)
def test_proposals_stop_when_the_space_is_exhausted(name: str) -> None:
    g = _mlp()  # fc1 (5 units) and fc2 (7) widen to 8 and no further: three children
    space = make_space({"widths": {"fc": [8]}, "noise": 0.0, "deeper_noise": 0.0}, g)
    controller = make_controller(name, space, {"wider_actions": 1, "deeper_actions": 0,
                                               "draws": 40}, seed=1)
    children = controller.propose(g, 5)
    widened = sorted(tuple(sorted(a["node"] for a in p.actions)) for p in children)
    assert widened == [("fc1",), ("fc1", "fc2"), ("fc2",)]  # all three, once each
    assert controller.propose(g, 5, exclude={p.arch for p in children}) == []


def test_make_controller_validates_name_and_settings() -> None:
    space = SearchSpace()
    with pytest.raises(ConfigError, match="search.controller.name: unknown controller 'ppo'; "
                                          r"available: \['eas', 'random', 'rcl'\]"):
        make_controller("ppo", space)
    with pytest.raises(ConfigError, match=r"search.controller.wider_action: unknown key"):
        make_controller("random", space, {"wider_action": 3})
    with pytest.raises(ConfigError, match=r"search.controller.widen_probability: Input should "
                                          "be less than or equal to 1"):
        make_controller("random", space, {"widen_probability": 2})
    with pytest.raises(ConfigError, match=r"search.controller.deeper_actions: Input should be "
                                          "greater than or equal to 0"):
        make_controller("random", space, {"deeper_actions": -1})


def test_a_random_controller_made_directly_has_seed_0_and_names_itself() -> None:
    """Made without make_controller: seed 0 by default (as by make_controller), settings
    errors under search.controller, and its saved state's extras name it."""
    from growth.controllers.random_search import RandomController

    g = _mlp()
    space = make_space({"widths": {"fc": [8, 16, 24, 32]}}, g)
    assert ([p.arch for p in RandomController(space).propose(g, 3)] ==
            [p.arch for p in RandomController(space, seed=0).propose(g, 3)] !=
            [p.arch for p in RandomController(space, seed=1).propose(g, 3)])
    with pytest.raises(ConfigError, match=r"^search\.controller\.widen_probability: "):
        RandomController(space, {"widen_probability": 2})
    assert RandomController(space).state_dict()[1] == {"controller": "random"}
    assert ([p.arch for p in make_controller("random", space).propose(g, 3)] ==
            [p.arch for p in RandomController(space, seed=0).propose(g, 3)])  # by name: 0 too


def test_load_state_refuses_a_state_without_a_generator() -> None:
    controller = make_controller("random", SearchSpace())
    with pytest.raises(CheckpointError, match="'rng'"):
        controller.load_state_dict({}, {})


def test_random_search_widens_with_its_probability() -> None:
    g = _mlp()
    space = make_space({"widths": {"fc": list(range(8, 200))}}, g)
    never = make_controller("random", space, {"widen_probability": 0.0, "deeper_actions": 0})
    always = make_controller("random", space, {"widen_probability": 1.0, "deeper_actions": 0})
    assert never.propose(g, 3) == []  # never widening proposes only the parent itself
    [p] = always.propose(g, 3)  # always widening every layer gives one child
    assert [a["node"] for a in p.actions] == ["fc1", "fc2", "fc1", "fc2"]


def test_random_search_is_uniform_over_what_the_space_offers() -> None:
    g = randomize(add_head(small_cnn((1, 8, 8), [3, 4], fc=(6,)), "t0", 3), 0)
    space = make_space({"widths": {"conv": [3, 4], "fc": [6, 8]}, "max_blocks": 4}, g)
    c = make_controller("random", space, {"wider_actions": 1, "deeper_actions": 3}, seed=0)
    for p in c.propose(g, 5):
        for step in p.decisions["steps"]:
            if step["type"] == "wider":  # each offered layer: widen or keep, 1/2 each
                assert step["logp"] == pytest.approx(sum(step["mask"]) * math.log(0.5))
                continue
            offered = [sum(step["block_mask"]), sum(step["position_mask"])]
            if step["kernel_mask"] is not None:
                offered.append(sum(step["kernel_mask"]))
            assert step["logp"] == pytest.approx(-sum(math.log(n) for n in offered))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(g=networks(), seed=st.integers(0, 1000))
def test_random_children_of_random_networks_keep_the_function(g: NetGraph, seed: int) -> None:
    """MLPs, CNNs, residual, concat and multi-head networks (tests/graphgen.py)."""
    space = _small_space(g)
    controller = make_controller("random", space, {"wider_actions": 2, "deeper_actions": 2},
                                 seed=seed)
    _check_children(controller, g, 2, _input(g, 4))


class _FixedPolicy:
    """P(widen) 0.25 for every layer; decision k's i-th option weighs i + 1; the decoder
    state counts the decisions, and every call is recorded."""

    def __init__(self, sizes: tuple[int, int, int]) -> None:
        self.sizes, self.calls = sizes, []

    def wider_probs(self, tokens: list[int]) -> list[float]:
        return [0.25] * len(tokens)

    def deeper_start(self, tokens: list[int]) -> int:
        return 0

    def deeper_probs(self, state: int, step: int, previous: int | None):
        self.calls.append((state, step, previous))
        return torch.arange(1, self.sizes[step] + 1, dtype=torch.float32), state + 1


def test_a_rollout_records_the_log_probability_of_what_it_drew() -> None:
    """On a fixed policy the recorded log-probabilities are the hand-computed ones: log 0.25
    per widened layer and log 0.75 per kept one; for each deeper decision, the chosen option's
    weight over the offered options' weights. Each decision reads the state the previous one
    left and the option chosen before it."""
    from growth.controllers.base import ControllerSettings, rollout

    g = _cnn_bn()
    space = _small_space(g)
    spec = space.spec
    policy = _FixedPolicy((spec.max_blocks, spec.max_layers_per_block, len(spec.kernel_sizes)))
    settings = ControllerSettings(wider_actions=1, deeper_actions=1)
    for seed in range(4):
        policy.calls.clear()
        wider, deeper = rollout(space, g, policy, torch.Generator().manual_seed(seed),
                                settings).decisions["steps"]
        assert wider["logp"] == pytest.approx(sum(
            math.log(0.25 if c else 0.75) for m, c in zip(wider["mask"], wider["choice"]) if m))
        decisions = [(deeper["block_mask"], deeper["block"]),
                     (deeper["position_mask"], deeper["position"]),
                     (deeper["kernel_mask"], deeper["kernel"])]
        assert deeper["logp"] == pytest.approx(sum(
            math.log((c + 1) / sum(i + 1 for i, on in enumerate(m) if on))
            for m, c in decisions))
        assert policy.calls == [(0, 0, None), (1, 1, deeper["block"]),
                                (2, 2, deeper["position"])]


class _SurePolicy(_FixedPolicy):
    """P(widen) exactly 0 for the first layer and 1 for every other (a saturated policy)."""

    def wider_probs(self, tokens: list[int]) -> list[float]:
        return [0.0] + [1.0] * (len(tokens) - 1)


def test_a_wider_decision_the_policy_is_sure_of_has_log_probability_0() -> None:
    """Decisions of probability 0 or 1 are certain: the first layer is never widened, every
    other one always, and the step's log-probability is log 1 = 0 (not a count of them)."""
    from growth.controllers.base import ControllerSettings, rollout

    g = _mlp()
    space = _small_space(g)
    policy = _SurePolicy((1, 1, 1))
    for seed in range(3):
        (wider,) = rollout(space, g, policy, torch.Generator().manual_seed(seed),
                           ControllerSettings(wider_actions=1, deeper_actions=0)
                           ).decisions["steps"]
        assert wider["mask"] == [1, 1] and wider["choice"] == [0, 1]
        assert wider["logp"] == 0.0


def test_one_of_draws_only_between_several_options() -> None:
    """A single option is returned without a draw (the generator's state is untouched, so a
    space with one operator per role rolls out as it did before roles held several); no
    option gives None; several are drawn uniformly with the generator given."""
    from growth.controllers.base import _one_of, generator_state

    gen = torch.Generator().manual_seed(5)
    before = generator_state(gen)
    assert _one_of(["a"], gen) == "a" and _one_of([], gen) is None
    assert torch.equal(generator_state(gen), before)
    draws = [_one_of(["a", "b", "c"], gen) for _ in range(300)]
    assert all(70 < draws.count(o) < 130 for o in "abc")
    again = torch.Generator().manual_seed(5)
    assert [_one_of(["a", "b", "c"], again) for _ in range(300)] == draws


def test_a_generator_state_saved_as_another_integer_type_restores() -> None:
    """A state tensor read back as int64 (a format that widens bytes) restores the generator
    exactly: it is converted to the bytes the generator takes."""
    from growth.controllers.base import generator_state, set_generator_state

    gen = torch.Generator().manual_seed(11)
    torch.rand(3, generator=gen)
    state = generator_state(gen).to(torch.int64)
    expected = torch.rand(4, generator=gen)
    fresh = torch.Generator()
    set_generator_state(fresh, {"rng": state})
    assert torch.equal(torch.rand(4, generator=fresh), expected)


def test_a_masked_draw_follows_the_probabilities_and_returns_its_log_probability() -> None:
    """Renormalised over the mask: [0.1, 0.6, 0.3] without option 1 is [0.25, 0, 0.75]."""
    from growth.controllers.base import sample_masked

    gen = torch.Generator().manual_seed(0)
    draws = [sample_masked(torch.tensor([0.1, 0.6, 0.3]), [1, 0, 1], gen) for _ in range(400)]
    assert {c for c, _ in draws} == {0, 2}
    assert all(lp == pytest.approx(math.log(0.25 if c == 0 else 0.75)) for c, lp in draws)
    assert 0.65 < sum(c == 2 for c, _ in draws) / 400 < 0.85


def test_a_proposal_read_without_decisions_gets_an_empty_mapping_and_round_trips() -> None:
    """A proposal's JSON may omit its decisions (nothing to score): it reads back with an
    empty mapping, which a learning controller reads as no steps, and `to_json` gives back
    what `from_json` read."""
    actions = [{"op": "net2wider", "layer": "fc1", "width": 8}]
    p = Proposal.from_json({"actions": actions, "arch": "fc8"})
    assert p == Proposal(tuple(actions), "fc8", {}) and p.decisions.get("steps", []) == []
    data = {"actions": actions, "arch": "fc8", "decisions": {"steps": [], "params": 3}}
    assert Proposal.from_json(data).to_json() == data


def test_a_masked_draw_whose_allowed_mass_underflowed_is_uniform_over_the_mask() -> None:
    """Every allowed probability is 0 (underflow): the draw falls back to uniform over the
    allowed entries, log-probability log(1/2), never a masked entry or a NaN."""
    from growth.controllers.base import sample_masked

    gen = torch.Generator().manual_seed(0)
    draws = [sample_masked(torch.tensor([0.0, 1.0, 0.0, 0.0]), [1, 0, 0, 1], gen)
             for _ in range(200)]
    assert {c for c, _ in draws} == {0, 3}
    assert all(lp == pytest.approx(math.log(0.5), abs=1e-12) for _, lp in draws)
