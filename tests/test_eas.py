"""The EAS controller: masks and log-probabilities checked against the network's own logits
(computed here by hand), REINFORCE moving the policy toward a rewarded action, the EMA
baseline and the paper's reward, and children of an imported ResNet-18."""

from __future__ import annotations

import math

import pytest
import torch
from graphgen import max_rel_error, outputs, randomize, single_thread  # noqa: F401
from growth.controllers import make_controller
from growth.controllers.base import Proposal, sample_masked
from growth.controllers.eas import ACC_CAP, EASController, reward, step_log_prob
from growth.search_spaces import make_space
from growth.search_spaces.networks import add_head, mlp, small_cnn

from growth.graph import NetGraph

pytestmark = pytest.mark.usefixtures("single_thread")


def _cnn(fc: tuple[int, ...] = ()) -> NetGraph:  # 8x8: act1 sees 8x8, act2 4x4 (no 5x5 there)
    return randomize(add_head(small_cnn((1, 8, 8), [3, 4], fc=fc), "t0", 3), 0)


def _mlp() -> NetGraph:  # fc1 5 units, fc2 7 units
    return randomize(add_head(mlp((6,), [5, 7]), "t0", 3), 0)


def _eas(g: NetGraph, spec: dict | None = None, seed: int = 0, **settings) -> EASController:
    space = make_space(spec or {}, g)
    return make_controller("eas", space, settings, seed=seed)


# ---- independent scoring of a rollout step --------------------------------------------------
def _manual_wider(net, step) -> float:
    """Sum of log P(decision) over the layers offered, from the raw sigmoid probabilities."""
    with torch.no_grad():
        p = torch.sigmoid(net.wider_logits(step["tokens"])).double()
    total = 0.0
    for i, (offered, widen) in enumerate(zip(step["mask"], step["choice"])):
        if offered:
            total += math.log(p[i]) if widen else math.log(1 - p[i])
        else:
            assert widen == 0
    return total


def _renormalised(logits: torch.Tensor, mask: list[int]) -> torch.Tensor:
    probs = torch.softmax(logits.double(), -1) * torch.tensor(mask, dtype=torch.float64)
    probs = probs / probs.sum()
    assert abs(float(probs.sum()) - 1) < 1e-12
    assert all(float(probs[i]) == 0 for i, m in enumerate(mask) if not m)
    return probs


def _manual_deeper(net, step) -> float:
    """Block, position, kernel: softmax of the decoder's logits, masked, renormalised."""
    with torch.no_grad():
        state = net.deeper_start(step["tokens"])
        logits, state = net.deeper_logits(state, 0, None)
        p_block = _renormalised(logits, step["block_mask"])
        logits, state = net.deeper_logits(state, 1, step["block"])
        p_pos = _renormalised(logits, step["position_mask"])
        total = math.log(p_block[step["block"]]) + math.log(p_pos[step["position"]])
        if step["kernel_mask"] is not None:
            logits, state = net.deeper_logits(state, 2, step["position"])
            p_kernel = _renormalised(logits, step["kernel_mask"])
            total += math.log(p_kernel[step["kernel"]])
    return total


def _manual(net, proposal) -> float:
    return sum(_manual_wider(net, s) if s["type"] == "wider" else _manual_deeper(net, s)
               for s in proposal.decisions["steps"])


def test_log_probabilities_match_the_networks_probabilities() -> None:
    g = _cnn(fc=(6,))
    c = _eas(g, {"widths": {"conv": [4, 8], "fc": [8, 16]}, "max_blocks": 4},
             wider_actions=2, deeper_actions=4, seed=1)
    proposals = c.propose(g, 4)
    kinds = {s["type"] for p in proposals for s in p.decisions["steps"]}
    assert kinds == {"wider", "deeper"}
    for p in proposals:
        for step in p.decisions["steps"]:
            got = float(step_log_prob(c.net, step)[0].detach())
            want = _manual_wider(c.net, step) if step["type"] == "wider" else \
                _manual_deeper(c.net, step)
            assert got == pytest.approx(want, abs=1e-5)
            assert step["logp"] == pytest.approx(want, abs=1e-5)  # what it was sampled with
    # the loss is -(1/N) sum_i A_i log p(child i) (entropy weight 0 here)
    c.settings.entropy_weight = 0.0
    a, b = proposals[:2]
    loss = float(c.loss([(a, 0.7), (b, -1.3)]).detach())
    assert loss == pytest.approx(-(0.7 * _manual(c.net, a) - 1.3 * _manual(c.net, b)) / 2,
                                 rel=1e-5)
    # with zero advantages, what is left is -weight * the mean entropy per decision
    c.settings.entropy_weight = 0.5
    entropies = [h for p in (a, b) for st in p.decisions["steps"] for h in _entropies(c.net, st)]
    loss = float(c.loss([(a, 0.0), (b, 0.0)]).detach())
    assert loss == pytest.approx(-0.5 * sum(entropies) / len(entropies), rel=1e-5)


def _entropies(net, step) -> list[float]:
    """Entropy of each decision of a step, from the probabilities it was offered."""
    with torch.no_grad():
        if step["type"] == "wider":
            p = torch.sigmoid(net.wider_logits(step["tokens"])).double()
            return [float(-(q * q.log() + (1 - q) * (1 - q).log()))
                    for q, m in zip(p, step["mask"]) if m]
        state = net.deeper_start(step["tokens"])
        out, previous = [], None
        for i, key in enumerate(["block", "position", "kernel"]):
            if step[f"{key}_mask"] is None:
                break
            logits, state = net.deeper_logits(state, i, previous)
            p = _renormalised(logits, step[f"{key}_mask"])
            out.append(float(-sum(q * q.log() for q in p if q > 0)))
            previous = step[key]
        return out


def test_masks_offer_only_what_the_space_offers() -> None:
    g = _cnn(fc=(6,))
    # conv widths end at 4: conv2 (4) is at the limit; conv1 (3) may widen to 4
    c = _eas(g, {"widths": {"conv": [3, 4], "fc": [6, 8]}, "max_blocks": 4},
             wider_actions=1, deeper_actions=6, seed=2)
    space = c.space
    layers = space.layers(g)
    assert [x.node for x in layers] == ["conv1", "pool1", "conv2", "pool2", "fc3"]
    for p in c.propose(g, 8):
        wider, *deeper = p.decisions["steps"]
        assert wider["mask"] == [1, 0, 0, 0, 1]  # pools never; conv2 at its width limit
        for step in deeper:
            assert step["block_mask"][3] == 0  # only three blocks exist
            assert step["position_mask"][step["position"]] == 1
            assert step["block_mask"][step["block"]] == 1
        for step, action in zip(deeper, [a for a in p.actions if a["op"] == "net2deeper"]):
            if action["after"].startswith("act3"):  # the fc layer: no kernel decision
                assert step["kernel_mask"] is None and "kernel_size" not in action
            else:
                assert step["kernel_mask"] is not None
                assert step["kernel_mask"][step["kernel"]] == 1
                assert space.spec.kernel_sizes[step["kernel"]] == action["kernel_size"]
            if action["after"] == "act2":  # a 4x4 map: no 5x5 kernel
                assert step["kernel_mask"] == [1, 1, 0]


def test_an_mlp_never_gets_a_kernel_decision() -> None:
    g = _mlp()
    c = _eas(g, deeper_actions=4)
    for p in c.propose(g, 5):
        for step in p.decisions["steps"]:
            if step["type"] == "deeper":
                assert step["kernel_mask"] is None and step["kernel"] is None
        assert all("kernel_size" not in a for a in p.actions)


def test_masked_sampling_draws_from_the_renormalised_distribution() -> None:
    probs = torch.tensor([0.5, 0.1, 0.3, 0.1])
    gen = torch.Generator().manual_seed(0)
    draws = [sample_masked(probs, [1, 1, 0, 1], gen)[0] for _ in range(4000)]
    assert sample_masked(probs, [0, 1, 0, 0], gen) == (1, 0.0)
    assert 2 not in draws
    freq = [draws.count(i) / len(draws) for i in (0, 1, 3)]
    assert freq == pytest.approx([0.5 / 0.7, 0.1 / 0.7, 0.1 / 0.7], abs=0.03)


# ---- learning ------------------------------------------------------------------------------
def _p_block(c: EASController, g: NetGraph, block: int) -> float:
    menu = c.space.deeper_menu(g)
    with torch.no_grad():
        state = c.net.deeper_start(c.space.tokens(c.space.layers(g)))
        logits, _ = c.net.deeper_logits(state, 0, None)
    return float(_renormalised(logits, menu.block_mask())[block])


def _p_widen_first(c: EASController, g: NetGraph) -> float:
    with torch.no_grad():
        return float(torch.sigmoid(c.net.wider_logits(c.space.tokens(c.space.layers(g)))[0]))


@pytest.mark.parametrize("what", ["deeper", "wider"])
def test_reinforce_moves_the_policy_toward_the_rewarded_action(what: str) -> None:
    """Accuracy 0.5 (reward tan(pi/4) = 1) for one action, 0 (reward 0) otherwise."""
    if what == "deeper":
        g = _cnn()
        c = _eas(g, {"max_blocks": 2}, wider_actions=0, deeper_actions=1, lr=0.05, seed=3)
        prob = lambda: _p_block(c, g, 1)  # noqa: E731
        rewarded = lambda p: p.actions[0]["after"] == "act2"  # noqa: E731
    else:
        g = _mlp()
        c = _eas(g, wider_actions=1, deeper_actions=0, lr=0.05, seed=3)
        prob = lambda: _p_widen_first(c, g)  # noqa: E731
        rewarded = lambda p: any(a["node"] == "fc1" for a in p.actions)  # noqa: E731
    before = prob()
    for _ in range(6):
        proposals = c.propose(g, 8)
        c.observe([(p, 0.5 if rewarded(p) else 0.0) for p in proposals])
    assert c.updates == 6
    assert prob() > before + 0.15, (before, prob())


def test_baseline_is_an_exponential_moving_average_of_mean_rewards() -> None:
    g = _mlp()
    c = _eas(g, baseline_decay=0.9)
    ps = c.propose(g, 2)
    c.observe([(ps[0], 0.5), (ps[1], None)])  # a failed child has no reward
    assert c.baseline == pytest.approx(1.0)  # starts at the first mean: tan(pi/4)
    c.observe([(ps[0], 0.0), (ps[1], 0.0)])
    assert c.baseline == pytest.approx(0.9 * 1.0 + 0.1 * 0.0)
    c.observe([(ps[0], None)])  # nothing scored: no update
    assert c.updates == 2 and c.baseline == pytest.approx(0.9)


def test_rewards_enter_the_update_as_advantages_over_the_baseline() -> None:
    """Equal rewards on the first generation: the baseline is their mean, every advantage is
    0 and (without the entropy bonus) the policy does not move; unequal ones move it."""
    g = _mlp()
    c = _eas(g, entropy_weight=0.0, wider_actions=1, deeper_actions=1)
    before = {k: v.clone() for k, v in c.net.state_dict().items()}
    ps = c.propose(g, 4)
    c.observe([(p, 0.6) for p in ps])
    assert all(torch.equal(before[k], v) for k, v in c.net.state_dict().items())
    c.observe([(p, 0.2 * i) for i, p in enumerate(ps)])
    assert not all(torch.equal(before[k], v) for k, v in c.net.state_dict().items())


def test_reward_is_tan_of_accuracy_times_half_pi() -> None:
    assert reward(0.5) == pytest.approx(1.0)
    assert reward(0.0) == 0.0
    assert reward(0.9) == pytest.approx(math.tan(0.45 * math.pi))
    assert math.isfinite(reward(1.0)) and reward(1.0) == pytest.approx(
        math.tan(ACC_CAP * math.pi / 2))


def test_paper_settings_are_reachable_and_validated() -> None:
    g = _mlp()
    c = _eas(g, wider_actions=4, deeper_actions=5)
    s = c.settings
    assert (s.embedding_dim, s.hidden, s.lr, s.entropy_weight, s.baseline_decay) == (
        16, 50, 2e-3, 1e-5, 0.95)
    assert c.net.encoder.bidirectional and c.net.encoder.hidden_size == 50
    assert c.net.embed.embedding_dim == 16 and c.net.decoder.hidden_size == 100
    p = c.propose(g, 1)[0]
    assert [s["type"] for s in p.decisions["steps"]] == ["wider"] * 4 + ["deeper"] * 5


# ---- an imported torchvision network ----------------------------------------------------------
@pytest.fixture(scope="module")
def resnet18() -> NetGraph:
    torchvision = pytest.importorskip("torchvision")
    from growth.trace import import_module

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=5).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-trivial BN statistics, so a wrong gather shows
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return import_module(model, (3, 32, 32))


@pytest.mark.parametrize("name", ["eas", "random"])
def test_children_of_an_imported_resnet18_keep_its_function(resnet18: NetGraph,
                                                            name: str) -> None:
    g = resnet18
    space = make_space({"noise": 0.0, "deeper_noise": 0.0}, g)  # the exact mode
    layers = space.layers(g)
    assert sum(x.kind == "conv" for x in layers) == 20 and layers[-1].kind == "pool"
    c = make_controller(name, space, {"wider_actions": 1, "deeper_actions": 2}, seed=1)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    before = outputs(g, x)
    for p in c.propose(g, 2):
        assert any(a["op"] == "net2deeper" for a in p.actions)
        child, _ = space.apply(g, p.actions)
        assert space.arch(child) == p.arch
        assert max_rel_error(before, outputs(child, x)) <= 1e-5


def test_a_wider_step_with_nothing_to_widen_is_no_decision_in_the_entropy_mean() -> None:
    """A wider step whose layers are all at their widest decides nothing: with zero
    advantages the loss is -weight x the deeper step's entropy over its own decisions only."""
    from growth.controllers.base import Proposal

    g = _cnn(fc=(6,))
    c = _eas(g, {"widths": {"conv": [4, 8], "fc": [8, 16]}, "max_blocks": 4},
             wider_actions=0, deeper_actions=1, seed=1)
    [deeper] = c.propose(g, 1)[0].decisions["steps"]
    tokens = deeper["tokens"]
    empty = {"type": "wider", "tokens": tokens, "mask": [0] * len(tokens),
             "choice": [0] * len(tokens), "logp": 0.0}
    proposal = Proposal((), "x", {"steps": [empty, deeper]})
    c.settings.entropy_weight = 0.5
    entropies = _entropies(c.net, deeper)
    assert len(entropies) == 3  # block, position, kernel
    loss = float(c.loss([(proposal, 0.0)]).detach())
    assert loss == pytest.approx(-0.5 * sum(entropies) / 3, rel=1e-5)


def test_a_network_with_no_hidden_layer_gets_no_child_and_no_error() -> None:
    """Logistic regression has no layer token: the encoder is never run on an empty sequence
    (an LSTM refuses one), and there is nothing to propose."""
    g = randomize(add_head(mlp((6,), []), "t0", 3), 0)
    assert _eas(g).propose(g, 2) == []


def test_an_eas_state_names_its_controller_and_one_without_an_update_count_loads_as_zero(
        ) -> None:
    """The saved extras carry the controller's name, baseline, update count and settings; a
    state saved without an update count (no update yet) restores 0 updates."""
    g = _mlp()
    c = _eas(g, wider_actions=1, deeper_actions=0)
    ps = c.propose(g, 2)
    c.observe([(ps[0], 0.5), (ps[1], 0.5)])  # baseline tan(pi/4) = 1
    tensors, extra = c.state_dict()
    assert (extra["controller"], extra["updates"]) == ("eas", 1)
    assert extra["baseline"] == pytest.approx(1.0)
    assert extra["settings"]["wider_actions"] == 1
    fresh = _eas(g, wider_actions=1, deeper_actions=0)
    fresh.load_state_dict(tensors, {k: v for k, v in extra.items() if k != "updates"})
    assert fresh.updates == 0 and fresh.baseline == pytest.approx(1.0)


def test_the_baseline_moves_a_tenth_of_the_way_to_a_later_generations_mean() -> None:
    """Decay 0.9, first mean reward 1 (accuracy 0.5), then rewards 0 and 1 (mean 0.5): the
    baseline becomes 0.9 x 1 + 0.1 x 0.5 = 0.95."""
    g = _mlp()
    c = _eas(g, baseline_decay=0.9)
    ps = c.propose(g, 2)
    c.observe([(ps[0], 0.5), (ps[1], 0.5)])
    c.observe([(ps[0], 0.0), (ps[1], 0.5)])
    assert c.baseline == pytest.approx(0.95)


def _lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh):
    """One LSTM step by its equations (gates in torch's order: input, forget, cell, output)."""
    i, f, g, o = (x @ w_ih.T + b_ih + h @ w_hh.T + b_hh).chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def test_the_decoder_starts_from_both_directions_final_states_computed_by_hand() -> None:
    """The encoder's final (h, c), forward then backward, each from the LSTM's equations
    over the tokens (the backward direction reads them last to first), start the decoder;
    its first block logits and its state after one step are checked the same way."""
    g = _mlp()
    c = _eas(g, hidden=5, embedding_dim=3)
    net, tokens = c.net, c.space.tokens(c.space.layers(g))
    enc = dict(net.encoder.named_parameters())
    with torch.no_grad():
        x = net.embed(torch.tensor(tokens))
        final = []
        for suffix, seq in (("l0", x), ("l0_reverse", x.flip(0))):
            h = cell = torch.zeros(5)
            for t in seq:
                h, cell = _lstm_cell(t, h, cell, *(enc[f"{w}_{suffix}"] for w in
                                                    ("weight_ih", "weight_hh", "bias_ih",
                                                     "bias_hh")))
            final.append((h, cell))
        h0 = torch.cat([final[0][0], final[1][0]])
        c0 = torch.cat([final[0][1], final[1][1]])
        state = net.deeper_start(tokens)
        torch.testing.assert_close(state[0][0], h0, rtol=0, atol=1e-6)
        torch.testing.assert_close(state[1][0], c0, rtol=0, atol=1e-6)
        d = net.decoder
        h1, c1 = _lstm_cell(net.decoder_inputs[0].weight[0], h0, c0, d.weight_ih, d.weight_hh,
                            d.bias_ih, d.bias_hh)
        logits, (h, cell) = net.deeper_logits(state, 0, None)
        torch.testing.assert_close(logits, net.classifiers[0](h1), rtol=0, atol=1e-6)
        torch.testing.assert_close((h[0], cell[0]), (h1, c1), rtol=0, atol=1e-6)


def test_a_child_without_decisions_adds_nothing_to_the_loss_but_counts_in_its_mean() -> None:
    """-(1/N) sum_i A_i log p(child i): a child read back without decisions has log p = 0,
    so the loss of (a, 1) and (it, 5) is half the loss of (a, 1) alone."""
    g = _mlp()
    c = _eas(g, entropy_weight=0.0)
    a = c.propose(g, 1)[0]
    bare = Proposal.from_json({"actions": [], "arch": "bare"})
    alone = float(c.loss([(a, 1.0)]).detach())
    assert alone != 0
    assert float(c.loss([(a, 1.0), (bare, 5.0)]).detach()) == pytest.approx(alone / 2)


def test_a_saved_policy_of_another_shape_or_with_a_missing_tensor_is_refused_by_name() -> None:
    """A state saved by a controller with another hidden size (same tensor names, other
    shapes), or one missing a policy tensor, is a CheckpointError naming what to check, not
    torch's size mismatch or a KeyError; the controller is left as it was."""
    from growth.errors import CheckpointError

    g = _mlp()
    tensors, extra = _eas(g, hidden=5, embedding_dim=3).state_dict()
    c = _eas(g, hidden=6, embedding_dim=3)
    before = {k: v.clone() for k, v in c.net.state_dict().items()}
    with pytest.raises(CheckpointError, match="hidden"):
        c.load_state_dict(tensors, extra)
    own, own_extra = _eas(g, hidden=6, embedding_dim=3, seed=1).state_dict()
    del own["policy/wider.bias"]
    with pytest.raises(CheckpointError, match="hidden"):
        c.load_state_dict(own, own_extra)
    assert all(torch.equal(before[k], v) for k, v in c.net.state_dict().items())


def test_the_baseline_scales_an_earlier_baseline_other_than_one_by_the_decay() -> None:
    """Decay 0.8; the first generation's rewards are tan(pi/3) = sqrt(3) (accuracy 2/3), so
    the baseline starts at sqrt(3); a second generation of mean reward (1 + 0) / 2 = 0.5 moves
    it to 0.8 sqrt(3) + 0.2 x 0.5 (a baseline of 1, as the tests above start from, would not
    tell d x b from d / b)."""
    g = _mlp()
    c = _eas(g, baseline_decay=0.8)
    ps = c.propose(g, 2)
    c.observe([(ps[0], 2 / 3), (ps[1], 2 / 3)])
    assert c.baseline == pytest.approx(math.sqrt(3))
    c.observe([(ps[0], 0.5), (ps[1], 0.0)])
    assert c.baseline == pytest.approx(0.8 * math.sqrt(3) + 0.2 * 0.5)


def test_each_later_decoder_step_reads_the_previous_decisions_embedding_by_hand() -> None:
    """Steps 1 and 2 (position, kernel) are fed the embedding row of the previous decision
    (block 1, then position 2), not the row of decision 0: each step's state and logits from
    the LSTM cell's equations."""
    g = _cnn()
    c = _eas(g, {"max_blocks": 3}, hidden=4, embedding_dim=3)
    net, d = c.net, c.net.decoder
    assert net.decoder_inputs[2].num_embeddings > 2
    with torch.no_grad():
        h = torch.randn(1, 8, generator=torch.Generator().manual_seed(0))
        cell = torch.randn(1, 8, generator=torch.Generator().manual_seed(1))
        state = (h, cell)
        for step, previous in ((1, 1), (2, 2)):
            want_h, want_c = _lstm_cell(net.decoder_inputs[step].weight[previous], state[0][0],
                                        state[1][0], d.weight_ih, d.weight_hh, d.bias_ih,
                                        d.bias_hh)
            logits, state = net.deeper_logits(state, step, previous)
            torch.testing.assert_close((state[0][0], state[1][0]), (want_h, want_c), rtol=0,
                                       atol=1e-6)
            torch.testing.assert_close(logits, net.classifiers[step](want_h), rtol=0,
                                       atol=1e-6)


def test_a_child_of_one_decision_has_that_decisions_entropy_as_its_mean() -> None:
    """One wider step offering one layer is one decision: with zero advantages the loss is
    -weight x that decision's entropy -(p log p + (1 - p) log(1 - p)), p = sigmoid(logit)."""
    g = _mlp()
    c = _eas(g, wider_actions=1, deeper_actions=0, entropy_weight=0.5)
    tokens = c.space.tokens(c.space.layers(g))
    step = {"type": "wider", "tokens": tokens, "mask": [1] + [0] * (len(tokens) - 1),
            "choice": [1] + [0] * (len(tokens) - 1), "logp": 0.0}
    with torch.no_grad():
        p = float(torch.sigmoid(c.net.wider_logits(tokens)[0]))
    entropy = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    loss = float(c.loss([(Proposal((), "one", {"steps": [step]}), 0.0)]).detach())
    assert loss == pytest.approx(-0.5 * entropy, rel=1e-5)


def test_the_policys_tables_follow_the_space_and_default_to_the_papers_sizes() -> None:
    """The decoder's input tables hold one start symbol, then one row per block and one per
    position (the previous decision), its classifiers one output per block, position and
    kernel; built without sizes, the policy embeds in 16 dimensions with 50 units per
    direction (the paper's)."""
    from growth.controllers.eas import EASPolicy

    g = _cnn()
    c = _eas(g, {"max_blocks": 3, "max_layers_per_block": 5}, hidden=4, embedding_dim=3)
    net = c.net
    assert len(c.space.spec.kernel_sizes) == 3
    assert [e.weight.shape for e in net.decoder_inputs] == [(1, 3), (3, 3), (5, 3)]
    assert [(m.in_features, m.out_features) for m in net.classifiers] == [(8, 3), (8, 5),
                                                                           (8, 3)]
    paper = EASPolicy(7, (3, 5, 3))
    assert paper.embed.weight.shape == (7, 16) and paper.encoder.hidden_size == 50
    assert paper.decoder.hidden_size == 100 and paper.decoder_inputs[1].weight.shape == (3, 16)


def test_an_eas_controller_made_without_seed_or_key_uses_seed_0_and_names_its_key() -> None:
    """Built directly, the controller draws as one seeded 0 and its settings' errors name
    `search.controller.<key>`; a caller's key, when given, names them instead."""
    from growth.errors import ConfigError

    g = _mlp()
    space = make_space({}, g)
    made = EASController(space, {"wider_actions": 1, "deeper_actions": 1})
    assert [p.to_json() for p in made.propose(g, 2)] == [
        p.to_json() for p in _eas(g, seed=0, wider_actions=1, deeper_actions=1).propose(g, 2)]
    with pytest.raises(ConfigError, match=r"^search\.controller\.lr"):
        EASController(space, {"lr": 0})
    with pytest.raises(ConfigError, match=r"^rec\.search\.controller\.baseline_decay"):
        EASController(space, {"baseline_decay": 1.0}, where="rec.search.controller")
