"""Architecture-search controllers: one protocol (propose / observe / state), EAS and random.

`make_controller(name, space, params, seed)` builds one by name; params are validated (an
unknown or bad key is a ConfigError naming it).
"""

from __future__ import annotations

from typing import Any

from controllers.base import Controller, ControllerSettings, Proposal
from controllers.eas import EASController
from controllers.random_search import RandomController
from growth.errors import ConfigError
from search_spaces.space import SearchSpace

CONTROLLERS: dict[str, type] = {"eas": EASController, "random": RandomController}


def make_controller(name: str, space: SearchSpace, params: dict[str, Any] | None = None,
                    seed: int = 0, where: str = "search.controller") -> Controller:
    """The controller called `name` ("eas", "random") over `space`, seeded."""
    if name not in CONTROLLERS:
        raise ConfigError(f"{where}.name: unknown controller {name!r}; available: "
                          f"{sorted(CONTROLLERS)}")
    return CONTROLLERS[name](space, params, seed=seed, where=where)


__all__ = ["CONTROLLERS", "Controller", "ControllerSettings", "EASController", "Proposal",
           "RandomController",
           "make_controller"]
