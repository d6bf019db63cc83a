"""Continual-learning strategies, one file each, behind a name registry."""

from __future__ import annotations

from typing import Any

from growth.errors import ConfigError
from growth.strategies.base import Context, Strategy, StrategyParams, state_key
from growth.strategies.ewc import EWC
from growth.strategies.joint import Joint
from growth.strategies.l2 import L2
from growth.strategies.lwf import LwF
from growth.strategies.mas import MAS
from growth.strategies.mwc import MWC
from growth.strategies.si import SI

STRATEGIES: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Add a strategy class under its `name` (usable as a decorator)."""
    STRATEGIES[cls.name] = cls
    return cls


def make_strategy(name: str, params: dict[str, Any] | None = None) -> Strategy:
    """Build a strategy from its name and raw settings (validated by its Params model)."""
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ConfigError(f"unknown strategy {name!r}; available: {sorted(STRATEGIES)}") from None
    return cls(cls.Params.model_validate(params or {}))


for _cls in (Strategy, Joint, EWC, SI, MAS, L2, LwF, MWC):
    register(_cls)

__all__ = ["Context", "STRATEGIES", "Strategy", "StrategyParams", "make_strategy", "register",
           "state_key"]
