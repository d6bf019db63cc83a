"""The controller protocol, proposals, and the rollout every controller shares.

A controller proposes children of a parent network as lists of JSON actions (operator calls)
and learns from their validation accuracies. Every controller builds its children with the
same rollout over the same `SearchSpace`: a number of wider steps (each a widen/keep decision
per layer) then deeper steps (block, position in the block, kernel), with the space's masks.
Controllers differ only in the probabilities they give those decisions, so a comparison
between them compares policies, never action sets.

A generation's children are distinct architectures that the search has not trained yet
(`propose(..., exclude=...)`: the driver passes the architectures of this search's earlier
children, and the parent's): a budget of N children trains N until the space runs out. A
controller holds no cache of accuracies: what was trained belongs to the search (its records),
while the controller (policy, baseline, generator) may outlive it, across a campaign's tasks.
"""

from __future__ import annotations

import math
from collections.abc import Container, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from growth.search_spaces.space import Action, SearchSpace, describe_errors
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor

from growth.errors import CheckpointError, ConfigError
from growth.graph import NetGraph


@dataclass(frozen=True)
class Proposal:
    """One child: the operator calls that build it from its parent, in order (plain JSON)."""

    actions: tuple[Action, ...]
    arch: str  # canonical architecture string of the child (the cache key)
    decisions: dict[str, Any] = field(default_factory=dict)  # what observe() needs to score it

    def to_json(self) -> dict[str, Any]:
        return {"actions": list(self.actions), "arch": self.arch, "decisions": self.decisions}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Proposal:
        return cls(tuple(data["actions"]), data["arch"], data.get("decisions", {}))


@runtime_checkable
class Controller(Protocol):
    """The one protocol: propose children, observe their accuracies, save and restore."""

    name: ClassVar[str]
    space: SearchSpace

    def propose(self, parent: NetGraph, n: int, exclude: Container[str] = ()
                ) -> list[Proposal]:
        """Up to n children of `parent` with distinct architectures, none in `exclude` (each
        from the controller's own seeded generator); fewer only when the space is exhausted."""

    def observe(self, results: Sequence[tuple[Proposal, float | None]]) -> None:
        """Validation accuracy per child (None: the child failed); one call per generation."""

    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Tensors (policy, optimizer, generator) and JSON-able extra (baseline, cache, ...)."""

    def load_state_dict(self, tensors: dict[str, Tensor], extra: dict[str, Any]) -> None:
        """Restore exactly: a restored controller proposes what the saved one would have."""


class ControllerSettings(BaseModel):
    """Settings every controller has (validated; unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")
    wider_actions: int = Field(2, ge=0)  # wider steps per child (paper: 4)
    deeper_actions: int = Field(2, ge=0)  # deeper steps per child (paper: 5)
    draws: int = Field(20, ge=1)  # rollouts drawn per child sought before the space counts
    # as exhausted (a draw that repeats an architecture is drawn again)


# ---- the shared rollout ---------------------------------------------------------------------
class Policy(Protocol):
    """The probabilities a controller gives the rollout's decisions."""

    def wider_probs(self, tokens: list[int]) -> list[float]:
        """P(widen) for each layer token."""

    def deeper_start(self, tokens: list[int]) -> Any:
        """The decoder state for one deeper step on a network with these tokens."""

    def deeper_probs(self, state: Any, step: int, previous: int | None) -> tuple[Tensor, Any]:
        """Unmasked probabilities of decision `step` (0 block, 1 position, 2 kernel) given the
        previous decision, and the next state."""


def sample_masked(probs: Tensor, mask: Sequence[int], gen: torch.Generator
                  ) -> tuple[int, float]:
    """One draw from `probs` restricted to `mask` and renormalised, and its log-probability."""
    p = probs.detach().double() * torch.tensor(mask, dtype=torch.float64)
    total = float(p.sum())
    if not total > 0 or not math.isfinite(total):  # all masked mass underflowed: uniform
        p = torch.tensor(mask, dtype=torch.float64)
    p = p / p.sum()
    choice = int(torch.multinomial(p, 1, generator=gen))
    return choice, math.log(float(p[choice]))


def rollout(space: SearchSpace, parent: NetGraph, policy: Policy, gen: torch.Generator,
            settings: ControllerSettings) -> Proposal:
    """Build one child: `wider_actions` wider steps, then `deeper_actions` deeper steps.

    A wider step reads the layer tokens once and decides widen/keep for each layer the space
    offers (in order, on the network as widened so far in this step); a deeper step picks a
    block, a position and a kernel among the insertions the space offers. The decisions and
    their masks are kept in `Proposal.decisions["steps"]` so a learning controller can score
    them again; each step also records `logp`, the log-probability it was sampled with."""
    graph, actions, steps = parent, [], []
    for _ in range(settings.wider_actions):
        graph = _wider_step(space, graph, policy, gen, actions, steps)
    for _ in range(settings.deeper_actions):
        graph = _deeper_step(space, graph, policy, gen, actions, steps)
    decisions = {"steps": steps, "params": graph.param_count()}
    return Proposal(tuple(actions), space.arch(graph), decisions)


def _wider_step(space: SearchSpace, graph: NetGraph, policy: Policy, gen: torch.Generator,
                actions: list[Action], steps: list[dict[str, Any]]) -> NetGraph:
    layers = space.layers(graph)
    tokens = space.tokens(layers)
    probs = policy.wider_probs(tokens) if tokens else []
    widenable = space.widenable(graph)
    mask, choice, logp = [], [], 0.0
    for layer, p in zip(layers, probs):
        options = space.wider_options(graph, layer, widenable, seed=len(actions))
        if not options:
            mask.append(0)
            choice.append(0)
            continue
        widen = int(float(torch.rand((), generator=gen, dtype=torch.float64)) < p)
        mask.append(1)
        choice.append(widen)
        logp += math.log(p if widen else 1 - p) if 0 < p < 1 else 0.0
        if widen:
            action = _one_of(options, gen)
            graph = space.step(graph, action)
            actions.append(action)
            widenable = space.widenable(graph)
    steps.append({"type": "wider", "tokens": tokens, "mask": mask, "choice": choice,
                  "logp": logp})
    return graph


def _deeper_step(space: SearchSpace, graph: NetGraph, policy: Policy, gen: torch.Generator,
                 actions: list[Action], steps: list[dict[str, Any]]) -> NetGraph:
    layers = space.layers(graph)
    menu = space.deeper_menu(graph, layers)
    block_mask = menu.block_mask()
    if not any(block_mask):  # nothing to insert (size limit, all excluded): no decision
        return graph
    tokens = space.tokens(layers)
    state = policy.deeper_start(tokens)
    probs, state = policy.deeper_probs(state, 0, None)
    block, logp = sample_masked(probs, block_mask, gen)
    probs, state = policy.deeper_probs(state, 1, block)
    pos_mask = menu.position_mask(block)
    position, lp = sample_masked(probs, pos_mask, gen)
    logp += lp
    k_mask = menu.kernel_mask(block, position)
    kernel = None
    if k_mask is not None:  # images: choose a kernel size (never offered on vectors)
        probs, state = policy.deeper_probs(state, 2, position)
        kernel, lp = sample_masked(probs, k_mask, gen)
        logp += lp
    steps.append({"type": "deeper", "tokens": tokens, "block_mask": block_mask, "block": block,
                  "position_mask": pos_mask, "position": position, "kernel_mask": k_mask,
                  "kernel": kernel, "logp": logp})
    op = _one_of(menu.operators(block, position, kernel), gen)
    actions.append(menu.action(block, position, kernel, seed=len(actions), op=op))
    return menu.child(block, position, kernel, seed=len(actions) - 1, op=op)


def _one_of(options: Sequence[Any], gen: torch.Generator) -> Any:
    """The only option, or one drawn uniformly (the space's operators of one role are
    alternatives the policy does not choose between; a single one draws nothing, so a space
    with one operator per role rolls out exactly as before)."""
    if len(options) <= 1:
        return options[0] if options else None
    return options[int(torch.randint(len(options), (1,), generator=gen))]


# ---- distinct children and state helpers -------------------------------------------------
def distinct_rollouts(space: SearchSpace, parent: NetGraph, policy: Policy, gen: torch.Generator,
                      settings: ControllerSettings, n: int, exclude: Container[str] = ()
                      ) -> list[Proposal]:
    """Up to n rollouts with distinct architectures, none in `exclude` nor the parent's own
    (a child must change something), drawing at most `settings.draws` x n rollouts."""
    seen = {space.arch(parent), *exclude}
    out: list[Proposal] = []
    for _ in range(settings.draws * max(int(n), 0)):
        if len(out) >= n:
            break
        proposal = rollout(space, parent, policy, gen, settings)
        if proposal.arch not in seen:
            seen.add(proposal.arch)
            out.append(proposal)
    return out


def generator_state(gen: torch.Generator) -> Tensor:
    return gen.get_state().clone()


def set_generator_state(gen: torch.Generator, tensors: dict[str, Tensor], key: str = "rng"
                        ) -> None:
    if key not in tensors:
        raise CheckpointError(f"controller state has no {key!r} tensor (the generator state); "
                              "was it saved by this controller?")
    gen.set_state(tensors[key].to(torch.uint8).cpu())


def validate_settings(model: type[BaseModel], params: dict[str, Any] | None, where: str
                      ) -> BaseModel:
    """Controller settings from a dict; every problem is a ConfigError naming the key."""
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"{where}: expected a mapping of settings, got "
                          f"{type(params).__name__}")
    try:
        return model.model_validate(params or {})
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc, where)) from None


__all__ = ["Controller", "ControllerSettings", "Policy", "Proposal", "rollout", "sample_masked"]
