"""Random search over a SearchSpace: the baseline for the EAS controller.

Same rollout, same actions and limits as EAS: each layer the space offers widens with
probability `widen_probability` in each wider step, and each deeper step picks a block, a
position and a kernel uniformly among the insertions the space offers. It learns nothing; it
proposes architectures the search has not trained yet.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from typing import Any, ClassVar

import torch
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
from torch import Tensor

from growth.graph import NetGraph


class RandomSettings(ControllerSettings):
    widen_probability: float = Field(0.5, ge=0, le=1)


class _Uniform:
    """The random policy: a fixed widen probability, uniform deeper choices."""

    def __init__(self, p: float, sizes: tuple[int, int, int]) -> None:
        self.p, self.sizes = p, sizes

    def wider_probs(self, tokens: list[int]) -> list[float]:
        return [self.p] * len(tokens)

    def deeper_start(self, tokens: list[int]) -> None:
        return None

    def deeper_probs(self, state: None, step: int, previous: int | None) -> tuple[Tensor, None]:
        return torch.ones(self.sizes[step]), None


class RandomController:
    """Proposes uniformly random children; see the module docstring."""

    name: ClassVar[str] = "random"
    Settings: ClassVar[type[ControllerSettings]] = RandomSettings

    def __init__(self, space: SearchSpace, params: dict[str, Any] | None = None,
                 seed: int = 0, where: str = "search.controller") -> None:
        self.space = space
        self.settings: RandomSettings = validate_settings(RandomSettings, params, where)
        self.seed = int(seed)
        self.gen = torch.Generator().manual_seed(self.seed)
        s = space.spec
        self._policy = _Uniform(self.settings.widen_probability,
                                (s.max_blocks, s.max_layers_per_block, len(s.kernel_sizes)))

    def propose(self, parent: NetGraph, n: int, exclude: Container[str] = ()
                ) -> list[Proposal]:
        return distinct_rollouts(self.space, parent, self._policy, self.gen, self.settings, n,
                                 exclude)

    def observe(self, results: Sequence[tuple[Proposal, float | None]]) -> None:
        """Random search learns nothing."""

    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return {"rng": generator_state(self.gen)}, {"controller": self.name}

    def load_state_dict(self, tensors: dict[str, Tensor], extra: dict[str, Any]) -> None:
        set_generator_state(self.gen, tensors)
