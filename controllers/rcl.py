"""The RCL controller (Xu & Zhu, NeurIPS 2018): how many units or filters to add to each layer.

- Actor: an LSTM reads the network's layers in the space's canonical order, one step per layer
  token; a step's input is the token's embedding beside the embedding of the previous layer's
  decision (a start symbol before the first layer and after a layer that had none). For each
  layer the space can widen, a softmax over `counts` (units or filters to add, 0 included)
  gives the decision, masked to the counts whose widening the space offers (size guard,
  parameter limit) and renormalised. Layers are decided in order on the network as widened so
  far, so the limit holds for the whole child; pools and layers the space cannot widen get no
  decision. A child widens its layers with the space's operator: `widen_private` in a private
  space (units no old head reads), `net2wider` otherwise.
- Reward (`RCLController.reward`): R = A - alpha x (P_child - P_parent) / P_parent, A the
  child's validation accuracy, P the parameter counts of the child and of the network it grew
  from: accuracy less a complexity cost in parameters added, relative to the network (the
  search's score, `growth.searching.score`, with cost alpha).
- Critic: V(s), s the parent's layer tokens (an embedding, an LSTM and a linear output of its
  own), trained to the children's rewards by mean squared error with its own Adam.
- Actor-critic update, one per observed generation of N children (failed ones left out):
  advantage A_i = R_i - V(s), V taken before the critic's update and detached; the actor
  takes one Adam step on -(1/N) sum_i A_i sum_d log p(d), the sum over child i's decisions;
  the critic takes `value_steps` Adam steps on (1/N) sum_i (V(s) - R_i)^2.
- A generation's children are distinct, change the parent and are new to the search (the
  `exclude` rule of every controller); the all-zero decision is the parent itself.
"""

from __future__ import annotations

import math
from collections.abc import Container, Sequence
from typing import Any, ClassVar

import torch
from growth.controllers.base import (
    Proposal,
    generator_state,
    sample_masked,
    set_generator_state,
    validate_settings,
)
from growth.controllers.eas import masked_log_softmax
from growth.search_spaces.space import Action, SearchSpace
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from growth.errors import CheckpointError
from growth.graph import NetGraph
from growth.searching import score

START = 0  # the decision symbol before the first layer and after a layer without a decision


class RCLSettings(BaseModel):
    """RCL's settings (validated; unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    counts: list[int] = Field(default_factory=lambda: [0, 2, 4, 8, 16, 32], min_length=2,
                              description="units or filters a layer may add: the choices of "
                              "each decision, 0 included, increasing")
    alpha: float = Field(0.05, ge=0, description="complexity cost: reward = validation "
                         "accuracy - alpha x added parameters / the parent's parameters")
    embedding_dim: int = Field(16, ge=1, description="token and decision embeddings")
    hidden: int = Field(64, ge=1, description="LSTM units of the actor and of the critic")
    lr: float = Field(1e-3, gt=0, description="the actor's Adam learning rate")
    value_lr: float = Field(0.02, gt=0, description="the critic's Adam learning rate")
    value_steps: int = Field(5, ge=1, description="critic steps per observed generation")
    draws: int = Field(20, ge=1, description="rollouts drawn per child sought before the "
                       "space counts as exhausted (a draw that repeats an architecture is "
                       "drawn again)")

    @field_validator("counts")
    @classmethod
    def _counts(cls, v: list[int]) -> list[int]:
        if v[0] != 0 or any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError(f"counts must start at 0 (add nothing) and increase strictly, e.g. "
                             f"[0, 4, 8, 16]; got {v}")
        return v


class RCLPolicy(nn.Module):
    """The actor: one LSTM step per layer token, a softmax over the counts per decision."""

    def __init__(self, vocab_size: int, n_counts: int, embedding_dim: int, hidden: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, embedding_dim)
        self.decisions = nn.Embedding(n_counts + 1, embedding_dim)  # START, then 1 + index
        self.cell = nn.LSTMCell(2 * embedding_dim, hidden)
        self.out = nn.Linear(hidden, n_counts)

    def step(self, token: int, previous: int, state: tuple[Tensor, Tensor] | None
             ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Logits over the counts at one layer, and the next state."""
        x = torch.cat([self.tokens(torch.tensor([token])),
                       self.decisions(torch.tensor([previous]))], dim=-1)
        h, c = self.cell(x, state)
        return self.out(h)[0], (h, c)


class RCLValue(nn.Module):
    """The critic: V(s) of the network whose layer tokens are s."""

    def __init__(self, vocab_size: int, embedding_dim: int, hidden: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, embedding_dim)
        self.lstm = nn.LSTM(embedding_dim, hidden, batch_first=True)
        self.out = nn.Linear(hidden, 1)

    def forward(self, tokens: Sequence[int]) -> Tensor:
        _, (h, _) = self.lstm(self.tokens(torch.as_tensor(list(tokens), dtype=torch.long)[None]))
        return self.out(h[-1, 0])[0]


def log_prob(net: RCLPolicy, decisions: dict[str, Any]) -> Tensor:
    """Sum of the log-probabilities of a child's decisions under `net` (with gradients): the
    LSTM run over the tokens again, fed the recorded decisions."""
    state, previous, total = None, START, torch.zeros(())
    for token, mask, choice in zip(decisions["tokens"], decisions["masks"],
                                   decisions["choices"]):
        logits, state = net.step(token, previous, state)
        if choice is None:
            previous = START
            continue
        total = total + masked_log_softmax(logits, mask)[choice]
        previous = 1 + choice
    return total


class RCLController:
    """RCL's controller; see the module docstring."""

    name: ClassVar[str] = "rcl"
    Settings: ClassVar[type[BaseModel]] = RCLSettings

    def __init__(self, space: SearchSpace, params: dict[str, Any] | None = None,
                 seed: int = 0, where: str = "search.controller") -> None:
        self.space = space
        self.settings: RCLSettings = validate_settings(RCLSettings, params, where)
        self.seed = int(seed)
        s, n = self.settings, len(self.settings.counts)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.net = RCLPolicy(space.vocab_size, n, s.embedding_dim, s.hidden)
            self.value = RCLValue(space.vocab_size, s.embedding_dim, s.hidden)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=s.lr)
        self.value_optimizer = torch.optim.Adam(self.value.parameters(), lr=s.value_lr)
        self.gen = torch.Generator().manual_seed(self.seed)
        self.updates = 0

    # ---- the protocol ---------------------------------------------------------------------
    def propose(self, parent: NetGraph, n: int, exclude: Container[str] = ()
                ) -> list[Proposal]:
        """Up to n distinct children new to the search, none the parent itself."""
        seen = {self.space.arch(parent), *exclude}
        out: list[Proposal] = []
        for _ in range(self.settings.draws * max(int(n), 0)):
            if len(out) >= n:
                break
            proposal = self.rollout(parent)
            if proposal.arch not in seen:
                seen.add(proposal.arch)
                out.append(proposal)
        return out

    def rollout(self, parent: NetGraph) -> Proposal:
        """One child: a decision per layer the space can widen (see the module docstring)."""
        space, counts = self.space, self.settings.counts
        layers = space.layers(parent)
        tokens = space.tokens(layers)
        graph, actions = parent, []
        masks: list[list[int] | None] = []
        choices: list[int | None] = []
        state, previous, logp = None, START, 0.0
        widenable = space.widenable(graph)
        for layer, token in zip(layers, tokens):
            with torch.no_grad():
                logits, state = self.net.step(token, previous, state)
            options = self._options(graph, layer, widenable, len(actions))
            if sum(a is not None for a in options) == 0:  # nothing to add here: no decision
                masks.append(None)
                choices.append(None)
                previous = START
                continue
            mask = [1, *(int(a is not None) for a in options)]
            choice, lp = sample_masked(torch.softmax(logits.double(), -1), mask, self.gen)
            masks.append(mask)
            choices.append(choice)
            logp += lp
            previous = 1 + choice
            if choice > 0:
                action = options[choice - 1]
                graph = space.step(graph, action)
                actions.append(action)
                widenable = space.widenable(graph)
        decisions = {"tokens": tokens, "masks": masks, "choices": choices, "logp": logp,
                     "counts": [None if c is None else counts[c] for c in choices],
                     "params": graph.param_count(), "parent_params": parent.param_count()}
        return Proposal(tuple(actions), space.arch(graph), decisions)

    def _options(self, graph: NetGraph, layer: Any, widenable: set[str], seed: int
                 ) -> list[Action | None]:
        """The widening by each count above 0, None where the space does not offer it (the
        cost grows with the count: the first refused count ends the list)."""
        out: list[Action | None] = []
        for count in self.settings.counts[1:]:
            action = (self.space.widen_by(graph, layer, count, widenable, seed)
                      if not out or out[-1] is not None else None)
            out.append(action)
        return out

    def observe(self, results: Sequence[tuple[Proposal, float | None]]) -> None:
        """One actor-critic update from the children that did not fail."""
        scored = [(p, self.reward(p, acc)) for p, acc in results
                  if acc is not None and math.isfinite(acc)]
        if not scored:
            return
        tokens = scored[0][0].decisions["tokens"]
        with torch.no_grad():
            baseline = float(self.value(tokens))
        loss = self.actor_loss([(p, r - baseline) for p, r in scored])
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        rewards = [r for _, r in scored]
        for _ in range(self.settings.value_steps):
            value_loss = self.critic_loss(tokens, rewards)
            self.value_optimizer.zero_grad()
            value_loss.backward()
            self.value_optimizer.step()
        self.updates += 1

    def reward(self, proposal: Proposal, acc: float) -> float:
        """acc - alpha x (child's parameters - parent's) / parent's, from the sizes the child
        was proposed with."""
        d = proposal.decisions
        return score(acc, int(d["params"]), int(d["parent_params"]), self.settings.alpha)

    def actor_loss(self, advantages: Sequence[tuple[Proposal, float]]) -> Tensor:
        """-(1/N) sum_i A_i sum_d log p(d)."""
        total = torch.zeros(())
        for proposal, advantage in advantages:
            total = total + advantage * log_prob(self.net, proposal.decisions)
        return -total / len(advantages)

    def critic_loss(self, tokens: Sequence[int], rewards: Sequence[float]) -> Tensor:
        """(1/N) sum_i (V(s) - R_i)^2."""
        v = self.value(tokens)
        return ((v - torch.tensor(list(rewards), dtype=v.dtype)) ** 2).mean()

    # ---- state ----------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors: dict[str, Tensor] = {}
        for part, module, opt in (("policy", self.net, self.optimizer),
                                  ("value", self.value, self.value_optimizer)):
            tensors.update({f"{part}/{k}": v.detach().clone()
                            for k, v in module.state_dict().items()})
            for i, st in opt.state_dict()["state"].items():
                for k, v in st.items():
                    tensors[f"optim/{part}/{i}/{k}"] = torch.as_tensor(v).clone()
        tensors["rng"] = generator_state(self.gen)
        extra = {"controller": self.name, "updates": self.updates,
                 "settings": self.settings.model_dump(mode="json")}
        return tensors, extra

    def load_state_dict(self, tensors: dict[str, Tensor], extra: dict[str, Any]) -> None:
        for part, module, opt in (("policy", self.net, self.optimizer),
                                  ("value", self.value, self.value_optimizer)):
            own = module.state_dict()
            saved = {k.removeprefix(f"{part}/"): v for k, v in tensors.items()
                     if k.startswith(f"{part}/")}
            if set(saved) != set(own) or any(saved[k].shape != own[k].shape for k in own):
                raise CheckpointError(f"the saved RCL {part} network does not match this "
                                      "controller (its space or settings changed: vocabulary, "
                                      "counts, embedding_dim, hidden)")
            module.load_state_dict(saved)
            state: dict[int, dict[str, Tensor]] = {}
            for k, v in tensors.items():
                if k.startswith(f"optim/{part}/"):
                    _, _, i, key = k.split("/", 3)
                    state.setdefault(int(i), {})[key] = v.clone()
            held = opt.state_dict()
            held["state"] = state
            opt.load_state_dict(held)
        set_generator_state(self.gen, tensors)
        self.updates = int(extra.get("updates", 0))


__all__ = ["RCLController", "RCLPolicy", "RCLSettings", "RCLValue", "log_prob"]
