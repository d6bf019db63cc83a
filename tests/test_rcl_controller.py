"""RCL's controller: its reward, its actor-critic loss and gradient against a hand computation
(the LSTM written out here), the decisions it samples (counts per layer, masks, widen_private
children), distinct proposals, saved state, settings; and the search driver's scores and its
"fixed" policy, which RCL's strategy uses."""

from __future__ import annotations

import json
import math

import pytest
import torch
from graphgen import randomize, single_thread  # noqa: F401
from growth.controllers import make_controller
from growth.controllers.rcl import RCLController, log_prob
from growth.search_spaces import SearchSpace, make_space
from growth.search_spaces.networks import add_head, mlp, small_cnn

from growth.errors import CheckpointError, ConfigError
from growth.graph import NetGraph
from growth.searching import score

pytestmark = pytest.mark.usefixtures("single_thread")


def _mlp() -> NetGraph:  # fc1 5 units, fc2 7 units, two heads
    return randomize(add_head(add_head(mlp((6,), [5, 7]), "t0", 3), "t1", 3), 0)


def _rcl(g: NetGraph, spec: dict | None = None, seed: int = 0, **settings) -> RCLController:
    space = make_space({"private": True, **(spec or {})}, g)
    return make_controller("rcl", space, {"counts": [0, 1, 3], **settings}, seed=seed)


# ---- the policy written out by hand ---------------------------------------------------------
def _lstm_cell(x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, cell: torch.nn.LSTMCell
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """i, f, g, o = split(W_ih x + b_ih + W_hh h + b_hh); c' = f c + i g; h' = o tanh(c')."""
    z = cell.weight_ih @ x + cell.bias_ih + cell.weight_hh @ h + cell.bias_hh
    i, f, g, o = z.chunk(4)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def _decision_probs(c: RCLController, decisions: dict) -> list[torch.Tensor | None]:
    """Per layer, the renormalised probabilities over the counts offered there (None where
    no decision was made), fed the recorded decisions."""
    net = c.net
    h = torch.zeros(net.cell.hidden_size)
    cell = torch.zeros(net.cell.hidden_size)
    previous, out = 0, []
    with torch.no_grad():
        for token, mask, choice in zip(decisions["tokens"], decisions["masks"],
                                       decisions["choices"]):
            x = torch.cat([net.tokens.weight[token], net.decisions.weight[previous]])
            h, cell = _lstm_cell(x, h, cell, net.cell)
            logits = net.out.weight @ h + net.out.bias
            if choice is None:
                out.append(None)
                previous = 0
                continue
            e = torch.exp(logits.double() - logits.double().max()) * torch.tensor(
                mask, dtype=torch.float64)
            out.append(e / e.sum())
            previous = 1 + choice
    return out


def _hand_log_prob(c: RCLController, decisions: dict) -> float:
    probs = _decision_probs(c, decisions)
    return sum(math.log(float(p[k])) for p, k in zip(probs, decisions["choices"])
               if p is not None)


def _hand_bias_grad(c: RCLController, advantages: list[tuple]) -> torch.Tensor:
    """d/d(out.bias) of -(1/N) sum_i A_i sum_d log p(d) = -(1/N) sum_i A_i sum_d (e_d - p_d),
    e_d the one-hot of the choice, p_d the renormalised probabilities (0 where masked)."""
    grad = torch.zeros(len(c.settings.counts), dtype=torch.float64)
    for proposal, advantage in advantages:
        d = proposal.decisions
        for p, k in zip(_decision_probs(c, d), d["choices"]):
            if p is not None:
                grad -= advantage * (torch.nn.functional.one_hot(torch.tensor(k), len(p)) - p)
    return grad / len(advantages)


# ---- reward and the actor-critic loss --------------------------------------------------------
def test_reward_is_accuracy_less_alpha_times_the_relative_added_parameters() -> None:
    g = _mlp()
    for alpha in (1.0, 3.0):
        c = _rcl(g, alpha=alpha)
        for p in c.propose(g, 3):
            child, _ = c.space.apply(g, list(p.actions))
            added = (child.param_count() - g.param_count()) / g.param_count()
            assert added > 0
            assert c.reward(p, 0.8) == pytest.approx(0.8 - alpha * added, rel=1e-12)


@pytest.mark.parametrize("net", ["cnn", "limited mlp"])
def test_actor_loss_and_its_gradient_match_a_hand_computation(net: str) -> None:
    """A CNN (pools: layers without a decision) and an MLP whose parameter limit masks a
    count (the softmax renormalised over the rest)."""
    if net == "cnn":
        g = randomize(add_head(small_cnn((1, 8, 8), [3, 4], fc=(6,)), "t0", 3), 1)
        c = _rcl(g, seed=2, hidden=8, embedding_dim=4)
        decided = 3
    else:
        g = _mlp()
        c = _rcl(g, {"max_params": g.param_count() + 27}, seed=2, hidden=8, embedding_dim=4)
        decided = 2
    proposals = c.propose(g, 3)
    assert len(proposals) == 3
    assert all(sum(k is not None for k in p.decisions["choices"]) == decided
               for p in proposals)
    if net != "cnn":  # fc1 + 3 units (42) is over the limit: fc1 chooses between 0 and 1
        assert all(p.decisions["masks"][0] == [1, 1, 0] for p in proposals)
    for p in proposals:  # what each child was sampled with, and what the loss scores it by
        want = _hand_log_prob(c, p.decisions)
        assert p.decisions["logp"] == pytest.approx(want, abs=1e-5)
        assert float(log_prob(c.net, p.decisions).detach()) == pytest.approx(want, abs=1e-5)
    advantages = [(proposals[0], 0.7), (proposals[1], -1.3), (proposals[2], 0.2)]
    loss = c.actor_loss(advantages)
    want = -sum(a * _hand_log_prob(c, p.decisions) for p, a in advantages) / 3
    assert float(loss.detach()) == pytest.approx(want, rel=1e-5)
    c.net.zero_grad()
    loss.backward()
    torch.testing.assert_close(c.net.out.bias.grad.double(), _hand_bias_grad(c, advantages),
                               rtol=1e-4, atol=1e-6)
    assert c.net.tokens.weight.grad is not None and c.value.out.bias.grad is None


def test_critic_loss_and_its_gradient_match_a_hand_computation() -> None:
    g = _mlp()
    c = _rcl(g)
    tokens = c.space.tokens(c.space.layers(g))
    v = float(c.value(tokens).detach())
    rewards = [0.9, 0.6, 0.75]
    loss = c.critic_loss(tokens, rewards)
    assert float(loss.detach()) == pytest.approx(sum((v - r) ** 2 for r in rewards) / 3, rel=1e-5)
    loss.backward()
    assert float(c.value.out.bias.grad) == pytest.approx(2 * (v - sum(rewards) / 3), rel=1e-5)
    assert c.net.out.bias.grad is None  # the critic's loss never reaches the actor


def test_the_critics_value_is_its_lstms_last_state_over_every_token_by_hand() -> None:
    """V(s) = out(h_L): the critic's LSTM run by its equations over the layer tokens, first to
    last, from zero states."""
    from types import SimpleNamespace

    g = _mlp()
    c = _rcl(g)
    tokens = c.space.tokens(c.space.layers(g))
    lstm, value = c.value.lstm, c.value
    weights = SimpleNamespace(**{w: getattr(lstm, f"{w}_l0") for w in
                                 ("weight_ih", "weight_hh", "bias_ih", "bias_hh")})
    h = cell = torch.zeros(lstm.hidden_size)
    with torch.no_grad():
        for token in tokens:
            h, cell = _lstm_cell(value.tokens.weight[token], h, cell, weights)
        want = float(value.out.weight[0] @ h + value.out.bias[0])
        assert len(tokens) > 1 and float(value(tokens)) == pytest.approx(want, abs=1e-6)


def test_observe_steps_the_actor_on_the_advantage_over_the_critics_value_before_its_update(
        ) -> None:
    """Two generations through `observe` against the same steps taken by hand: rewards from
    the children's sizes, advantages over V(s) read before the critic moves, one actor step,
    `value_steps` critic steps; failed children left out."""
    g = _mlp()
    a, b = _rcl(g, seed=4, value_steps=3), _rcl(g, seed=4, value_steps=3)
    tokens = a.space.tokens(a.space.layers(g))
    for accs in ([0.9, 0.5, None, 0.7], [0.2, 0.8, 0.6, None]):
        proposals = a.propose(g, 4)
        assert [p.to_json() for p in b.propose(g, 4)] == [p.to_json() for p in proposals]
        a.observe(list(zip(proposals, accs)))
        scored = [(p, acc) for p, acc in zip(proposals, accs) if acc is not None]
        rewards = []
        for p, acc in scored:
            child, _ = b.space.apply(g, list(p.actions))
            rewards.append(acc - 0.05 * (child.param_count() - g.param_count())
                           / g.param_count())
        with torch.no_grad():
            v = float(b.value(tokens))
        b.optimizer.zero_grad()
        b.actor_loss([(p, r - v) for (p, _), r in zip(scored, rewards)]).backward()
        b.optimizer.step()
        for _ in range(3):
            b.value_optimizer.zero_grad()
            b.critic_loss(tokens, rewards).backward()
            b.value_optimizer.step()
    for x, y in ((a.net, b.net), (a.value, b.value)):
        for (k, va), vb in zip(x.state_dict().items(), y.state_dict().values()):
            assert torch.equal(va, vb), k
    assert a.updates == 2


def test_the_critic_learns_the_rewards_and_the_actor_the_rewarded_count() -> None:
    """Reward 1 when fc2 adds 3 units, 0 otherwise: P(add 3 to fc2) rises and V(s) moves
    toward the mean reward."""
    g = _mlp()
    c = _rcl(g, seed=3, lr=0.05, value_lr=0.05)
    tokens = c.space.tokens(c.space.layers(g))
    probe = c.propose(g, 4)

    def p_three() -> float:  # P(fc2 adds 3), averaged over fc1's decisions in `probe`
        ps = [_decision_probs(c, {**p.decisions, "choices": [p.decisions["choices"][0], 2]})
              for p in probe]
        return sum(float(p[1][2]) for p in ps) / len(ps)

    before, v0 = p_three(), float(c.value(tokens).detach())
    means = []
    for _ in range(8):
        proposals = c.propose(g, 4)
        accs = [1.0 if p.decisions["counts"][1] == 3 else 0.0 for p in proposals]
        c.observe(list(zip(proposals, accs)))
        means.append(sum(c.reward(p, a) for p, a in zip(proposals, accs)) / len(accs))
    assert p_three() > before + 0.1, (before, p_three())
    target = sum(means[-3:]) / 3
    assert abs(float(c.value(tokens).detach()) - target) < abs(v0 - target) / 2


def test_the_actor_and_the_critic_step_with_their_own_learning_rates() -> None:
    """Adam's first step moves each weight by lr g / (|g| + eps), that is by lr wherever the
    gradient is far above eps: after one `observe` (one actor step, one critic step) the
    largest change of an actor weight is `lr` and of a critic weight `value_lr`."""
    g = _mlp()
    c = _rcl(g, seed=2, lr=0.004, value_lr=0.03, value_steps=1)
    actor = {k: v.clone() for k, v in c.net.state_dict().items()}
    critic = {k: v.clone() for k, v in c.value.state_dict().items()}
    proposals = c.propose(g, 4)
    c.observe(list(zip(proposals, [0.9, 0.2, 0.6, 0.4])))
    for net, before, lr in ((c.net, actor, 0.004), (c.value, critic, 0.03)):
        moved = max(float((v - before[k]).abs().max()) for k, v in net.state_dict().items())
        assert moved == pytest.approx(lr, rel=1e-3)


# ---- decisions and proposals -----------------------------------------------------------------
def test_each_decision_adds_its_count_to_its_layer_with_widen_private() -> None:
    g = randomize(add_head(small_cnn((1, 8, 8), [3, 4], fc=(6,)), "t0", 3), 0)
    c = _rcl(g, seed=1, counts=[0, 2, 5])
    layers = c.space.layers(g)
    for p in c.propose(g, 5):
        d = p.decisions
        assert [k is None for k in d["choices"]] == [la.kind == "pool" for la in layers]
        child, _ = c.space.apply(g, list(p.actions))
        assert all(a["op"] == "widen_private" for a in p.actions)
        for layer, count in zip(layers, d["counts"]):
            if count is not None:
                key = "out_channels" if layer.kind == "conv" else "out_features"
                assert child.node(layer.node).attrs[key] == layer.width + count
        assert d["params"] == child.param_count() and d["parent_params"] == g.param_count()


def test_counts_over_the_parameter_limit_are_masked() -> None:
    """fc1 + 1 unit adds 6 + 1 weights and fc2's column (7): 14; fc2 + 1 adds 5 + 1 and a
    column in each head (3 + 3): 12, + 3 units 36. A limit of 12 more leaves fc2 + 1 alone."""
    g = _mlp()
    c = _rcl(g, {"max_params": g.param_count() + 12}, counts=[0, 1, 3], draws=10)
    [p] = c.propose(g, 4)
    assert p.decisions["masks"] == [None, [1, 1, 0]]  # fc1: nothing fits; fc2: one unit
    assert p.decisions["counts"] == [None, 1] and p.decisions["params"] == g.param_count() + 12


def test_a_generation_is_distinct_new_and_changes_the_parent() -> None:
    g = _mlp()  # 3 x 3 decisions: 8 children besides the parent
    c = _rcl(g, seed=0, draws=50)
    first = c.propose(g, 5)
    archs = [p.arch for p in first]
    assert len(set(archs)) == 5 and SearchSpace.arch(g) not in archs
    rest = c.propose(g, 5, exclude=set(archs))
    assert len(rest) == 3 and not {p.arch for p in rest} & set(archs)
    assert c.propose(g, 5, exclude=set(archs) | {p.arch for p in rest}) == []


def test_restored_state_proposes_and_learns_as_the_saved_controller() -> None:
    g = _mlp()
    a = _rcl(g, seed=4)
    first = a.propose(g, 3)
    a.observe([(p, 0.5 + 0.1 * i) for i, p in enumerate(first)])
    tensors, extra = a.state_dict()
    assert {k.split("/")[0] for k in tensors} == {"policy", "value", "optim", "rng"}
    saved, extra = {k: v.clone() for k, v in tensors.items()}, json.loads(json.dumps(extra))
    b = _rcl(g, seed=99)
    b.load_state_dict(saved, extra)
    want = a.propose(g, 3)
    assert [p.to_json() for p in b.propose(g, 3)] == [p.to_json() for p in want]
    for ctl in (a, b):
        ctl.observe([(p, 0.9 - 0.2 * i) for i, p in enumerate(want)])
    for x, y in ((a.net, b.net), (a.value, b.value)):
        assert all(torch.equal(u, w) for u, w in zip(x.state_dict().values(),
                                                     y.state_dict().values()))
    assert b.updates == a.updates == 2
    with pytest.raises(CheckpointError, match="RCL policy network does not match"):
        _rcl(g, hidden=5).load_state_dict(a.state_dict()[0], {})


@pytest.mark.parametrize("settings,match", [
    ({"counts": [1, 2]}, r"counts: counts must start at 0"),
    ({"counts": [0, 4, 2]}, r"counts: counts must start at 0 .* increase strictly"),
    ({"counts": [0]}, r"counts: List should have at least 2 items"),
    ({"alpha": -1}, r"alpha: Input should be greater than or equal to 0"),
    ({"wider_actions": 2}, r"wider_actions: unknown key")])
def test_bad_settings_are_refused_naming_the_key(settings: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=r"search\.controller\." + match):
        make_controller("rcl", SearchSpace(), settings)


# ---- the driver's scores ----------------------------------------------------------------------
def test_a_score_is_accuracy_less_cost_times_the_relative_added_parameters() -> None:
    assert score(0.9, 1200, 1000, 0.5) == pytest.approx(0.9 - 0.5 * 0.2)
    assert score(0.9, 1200, 1000, 0.0) == 0.9  # no cost: the accuracy, whatever the sizes
    assert score(0.9, 1000, 1000, 2.0) == 0.9


def test_a_fixed_search_grows_every_child_from_its_first_parent_and_picks_the_best_score(
        tmp_path) -> None:
    """Two generations of three children from the same parent (lineage of one step each);
    the result is the child with the best accuracy - cost x added / the parent's parameters,
    computed here from the records, not the most accurate one."""
    from growth.controllers.driver import Budget, run_search
    from growth.controllers.trial import TrialSpec
    from searchkit import digits_task, trained_base

    from growth.train import TrainConfig

    task = digits_task()
    base, acc = trained_base(task, tmp_path / "base", hidden=(16, 12), epochs=1)
    space = make_space({"widths": {"fc": [16, 24, 32, 48, 64]}, "private": True}, base)
    controller = make_controller("rcl", space, {"counts": [0, 4, 16, 48]}, seed=0)
    cost = 0.3
    result = run_search(tmp_path / "s", tmp_path / "base", controller, space, task,
                        TrialSpec(train=TrainConfig(epochs=1, lr=0.05)),
                        Budget(children=3, generations=2), seed=0, policy="fixed", cost=cost,
                        backend="local")
    ok = [r for r in result.records if r.ok]
    assert len(ok) == 6 and all(len(r.lineage) == 1 for r in ok)
    size = base.param_count()
    best = max(ok, key=lambda r: r.val_acc - cost * (r.params - size) / size)
    assert result.parent.name == best.key and result.lineage == best.lineage
    assert best.key != max(ok, key=lambda r: r.val_acc).key  # the cost changed the choice
    again = run_search(tmp_path / "s2", tmp_path / "base", make_controller(
        "rcl", space, {"counts": [0, 4, 16, 48]}, seed=0), space, task,
        TrialSpec(train=TrainConfig(epochs=1, lr=0.05)), Budget(children=3, generations=2),
        seed=0, policy="fixed", cost=cost, parent_acc=2.0, backend="local")
    assert not again.replaced  # no child beats a parent scored above any accuracy


def test_a_controller_made_without_seed_or_key_uses_seed_0_and_names_search_controller() -> None:
    g = _mlp()
    space = make_space({"private": True}, g)
    made = RCLController(space, {"counts": [0, 1, 3]})
    assert [p.to_json() for p in made.propose(g, 2)] == [
        p.to_json() for p in _rcl(g, seed=0).propose(g, 2)]
    with pytest.raises(ConfigError, match=r"^search\.controller\.counts"):
        RCLController(space, {"counts": [1, 2]})


def test_the_state_names_its_controller_and_one_without_an_update_count_loads_as_zero() -> None:
    g = _mlp()
    a = _rcl(g)
    first = a.propose(g, 2)
    a.observe([(p, 0.5) for p in first])
    tensors, extra = a.state_dict()
    assert extra["controller"] == "rcl" and extra["updates"] == 1
    b = _rcl(g)
    b.load_state_dict(tensors, {k: v for k, v in extra.items() if k != "updates"})
    assert b.updates == 0


def test_no_children_asked_none_proposed_and_one_child_is_observed() -> None:
    g = _mlp()
    c = _rcl(g)
    assert c.propose(g, 0) == []  # and nothing drawn: the next generation is a fresh one's
    assert [p.to_json() for p in c.propose(g, 1)] == [p.to_json() for p in _rcl(g).propose(g, 1)]
    [child] = c.propose(g, 1)
    c.observe([(child, 0.5)])  # a generation of one child still updates
    assert c.updates == 1
