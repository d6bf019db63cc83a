"""The EAS controller (Cai et al. 2018): an RL meta-controller that grows networks with
function-preserving Net2Net actions.

- Encoder: each layer is a token (conv-filters-kernel, fc-units, pool; see
  `SearchSpace.token`), embedded (dim 16) and read by one bidirectional LSTM layer (50 units
  per direction).
- Net2Wider actor: one shared sigmoid classifier on each layer's encoder output gives
  P(widen); widen/keep is sampled per layer, masked where the space offers no widening
  (pools, the width limit, the parameter limit, layers the operators cannot resize).
- Net2Deeper actor: an LSTM decoder started from the encoder's final state (both directions
  concatenated) makes three softmax decisions, each fed the previous one: block, position
  in the block, kernel size; each is masked to what the space offers and renormalised, and
  the kernel decision is not made on fully connected layers.
- REINFORCE: one update per observed generation on
  -(1/N) sum_i (R_i - b) sum_{d in child i} log p(d) - entropy_weight * mean entropy,
  with R = tan(acc * pi / 2), b an exponential moving average of the generations' mean
  reward (b <- decay b + (1 - decay) mean R, started at the first mean), Adam.
- A generation's children are distinct and new to the search (`distinct_rollouts`).
"""

from __future__ import annotations

import math
from collections.abc import Container, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from growth.controllers.base import (
    ControllerSettings,
    Proposal,
    distinct_rollouts,
    generator_state,
    set_generator_state,
    validate_settings,
)
from growth.search_spaces.space import SearchSpace
from pydantic import Field
from torch import Tensor, nn

from growth.errors import CheckpointError
from growth.graph import NetGraph

ACC_CAP = 0.999  # tan(acc * pi / 2) is infinite at acc = 1; a perfect child scores tan(0.999 pi/2)


class EASSettings(ControllerSettings):
    embedding_dim: int = Field(16, ge=1)
    hidden: int = Field(50, ge=1)  # LSTM units per direction; the decoder has 2 * hidden
    lr: float = Field(2e-3, gt=0)  # Adam
    entropy_weight: float = Field(1e-5, ge=0)
    baseline_decay: float = Field(0.95, ge=0, lt=1)


def reward(acc: float) -> float:
    """The paper's reward: tan(acc * pi / 2), which stretches differences near 100%."""
    return math.tan(min(max(acc, 0.0), ACC_CAP) * math.pi / 2)


class EASPolicy(nn.Module):
    """Encoder, Net2Wider actor and Net2Deeper actor (see the module docstring)."""

    def __init__(self, vocab_size: int, sizes: tuple[int, int, int], embedding_dim: int = 16,
                 hidden: int = 50) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embedding_dim)
        self.encoder = nn.LSTM(embedding_dim, hidden, batch_first=True, bidirectional=True)
        self.wider = nn.Linear(2 * hidden, 1)
        # decoder input of step i: a start symbol, then the previous decision
        self.decoder_inputs = nn.ModuleList([nn.Embedding(1, embedding_dim),
                                             nn.Embedding(sizes[0], embedding_dim),
                                             nn.Embedding(sizes[1], embedding_dim)])
        self.decoder = nn.LSTMCell(embedding_dim, 2 * hidden)
        self.classifiers = nn.ModuleList([nn.Linear(2 * hidden, n) for n in sizes])

    def encode(self, tokens: Sequence[int]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Per-layer outputs (L, 2*hidden) and the final state (h, c), each (1, 2*hidden)."""
        x = self.embed(torch.as_tensor(list(tokens), dtype=torch.long)[None])
        out, (h, c) = self.encoder(x)
        return out[0], (torch.cat([h[0], h[1]], dim=-1), torch.cat([c[0], c[1]], dim=-1))

    def wider_logits(self, tokens: Sequence[int]) -> Tensor:
        """One logit of P(widen) per layer token."""
        return self.wider(self.encode(tokens)[0]).squeeze(-1)

    def deeper_start(self, tokens: Sequence[int]) -> tuple[Tensor, Tensor]:
        return self.encode(tokens)[1]

    def deeper_logits(self, state: tuple[Tensor, Tensor], step: int, previous: int | None
                      ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Logits of decision `step` fed the previous decision (none at step 0)."""
        symbol = torch.tensor([0 if previous is None else int(previous)])
        h, c = self.decoder(self.decoder_inputs[step](symbol), state)
        return self.classifiers[step](h)[0], (h, c)


class _Sampling:
    """The policy as the rollout sees it: probabilities, no gradients."""

    def __init__(self, net: EASPolicy) -> None:
        self.net = net

    def wider_probs(self, tokens: list[int]) -> list[float]:
        with torch.no_grad():
            return torch.sigmoid(self.net.wider_logits(tokens).double()).tolist()

    def deeper_start(self, tokens: list[int]) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            return self.net.deeper_start(tokens)

    def deeper_probs(self, state: tuple[Tensor, Tensor], step: int, previous: int | None
                     ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        with torch.no_grad():
            logits, state = self.net.deeper_logits(state, step, previous)
        return torch.softmax(logits.double(), -1), state


def masked_log_softmax(logits: Tensor, mask: Sequence[int]) -> Tensor:
    """log of softmax(logits) restricted to `mask` and renormalised (-inf where masked)."""
    m = torch.tensor(mask, dtype=torch.bool)
    return torch.log_softmax(logits.masked_fill(~m, float("-inf")), -1)


def step_log_prob(net: EASPolicy, step: dict[str, Any]) -> tuple[Tensor, Tensor, int]:
    """Sum of log-probabilities of one rollout step's decisions, sum of their entropies, and
    the number of decisions (with gradients)."""
    if step["type"] == "wider":
        mask = torch.tensor(step["mask"], dtype=torch.bool)
        if not bool(mask.any()):
            zero = torch.zeros(())
            return zero, zero, 0
        logits = net.wider_logits(step["tokens"])[mask]
        choice = torch.tensor(step["choice"], dtype=logits.dtype)[mask]
        logp = -F.binary_cross_entropy_with_logits(logits, choice, reduction="sum")
        p = torch.sigmoid(logits)
        entropy = F.binary_cross_entropy_with_logits(logits, p, reduction="sum")
        return logp, entropy, int(mask.sum())
    state = net.deeper_start(step["tokens"])
    decisions = [(step["block_mask"], step["block"], None),
                 (step["position_mask"], step["position"], step["block"])]
    if step["kernel_mask"] is not None:
        decisions.append((step["kernel_mask"], step["kernel"], step["position"]))
    logp, entropy = torch.zeros(()), torch.zeros(())
    for i, (mask, choice, previous) in enumerate(decisions):
        logits, state = net.deeper_logits(state, i, previous)
        logq = masked_log_softmax(logits, mask)
        logp = logp + logq[choice]
        q = logq.exp()
        entropy = entropy - (q * logq.masked_fill(q == 0, 0.0)).sum()
    return logp, entropy, len(decisions)


class EASController:
    """The EAS meta-controller; see the module docstring."""

    name: ClassVar[str] = "eas"
    Settings: ClassVar[type[ControllerSettings]] = EASSettings

    def __init__(self, space: SearchSpace, params: dict[str, Any] | None = None,
                 seed: int = 0, where: str = "search.controller") -> None:
        self.space = space
        self.settings: EASSettings = validate_settings(EASSettings, params, where)
        self.seed = int(seed)
        s, spec = self.settings, space.spec
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.net = EASPolicy(space.vocab_size, (spec.max_blocks, spec.max_layers_per_block,
                                                    len(spec.kernel_sizes)),
                                 s.embedding_dim, s.hidden)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=s.lr)
        self.gen = torch.Generator().manual_seed(self.seed)
        self.baseline: float | None = None
        self.updates = 0

    # ---- the protocol ---------------------------------------------------------------------
    def propose(self, parent: NetGraph, n: int, exclude: Container[str] = ()
                ) -> list[Proposal]:
        return distinct_rollouts(self.space, parent, _Sampling(self.net), self.gen,
                                 self.settings, n, exclude)

    def observe(self, results: Sequence[tuple[Proposal, float | None]]) -> None:
        """One REINFORCE update from the children that did not fail."""
        scored = [(p, reward(acc)) for p, acc in results
                  if acc is not None and math.isfinite(acc)]
        if not scored:
            return
        mean = sum(r for _, r in scored) / len(scored)
        d = self.settings.baseline_decay
        self.baseline = mean if self.baseline is None else d * self.baseline + (1 - d) * mean
        loss = self.loss([(p, r - self.baseline) for p, r in scored])
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.updates += 1

    def loss(self, advantages: Sequence[tuple[Proposal, float]]) -> Tensor:
        """-(1/N) sum_i A_i sum_d log p(d) - entropy_weight * (mean entropy per decision)."""
        objective, entropy, count = torch.zeros(()), torch.zeros(()), 0
        for proposal, advantage in advantages:
            logp = torch.zeros(())
            for step in proposal.decisions.get("steps", []):
                lp, h, k = step_log_prob(self.net, step)
                logp, entropy, count = logp + lp, entropy + h, count + k
            objective = objective + advantage * logp
        objective = objective / len(advantages)
        mean_entropy = entropy / max(count, 1)
        return -objective - self.settings.entropy_weight * mean_entropy

    # ---- state ----------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = {f"policy/{k}": v.detach().clone() for k, v in self.net.state_dict().items()}
        opt = self.optimizer.state_dict()
        for i, st in opt["state"].items():
            for k, v in st.items():
                tensors[f"optim/{i}/{k}"] = torch.as_tensor(v).clone()
        tensors["rng"] = generator_state(self.gen)
        extra = {"controller": self.name, "baseline": self.baseline, "updates": self.updates,
                 "settings": self.settings.model_dump(mode="json")}
        return tensors, extra

    def load_state_dict(self, tensors: dict[str, Tensor], extra: dict[str, Any]) -> None:
        own = self.net.state_dict()
        policy = {k.removeprefix("policy/"): v for k, v in tensors.items()
                  if k.startswith("policy/")}
        if set(policy) != set(own) or any(policy[k].shape != own[k].shape for k in own):
            raise CheckpointError("the saved EAS policy does not match this controller (its "
                                  "space or settings changed: vocabulary, max_blocks, "
                                  "max_layers_per_block, kernel_sizes, embedding_dim, hidden)")
        self.net.load_state_dict(policy)
        opt = self.optimizer.state_dict()
        state: dict[int, dict[str, Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("optim/"):
                _, i, key = k.split("/", 2)
                state.setdefault(int(i), {})[key] = v.clone()
        opt["state"] = state
        self.optimizer.load_state_dict(opt)
        set_generator_state(self.gen, tensors)
        self.baseline = extra.get("baseline")
        self.updates = int(extra.get("updates", 0))
