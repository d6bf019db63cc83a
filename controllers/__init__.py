"""Architecture-search controllers: one protocol (propose / observe / state), EAS, random search
and RCL's.

`make_controller(name, space, params, seed)` builds one by name; params are validated (an
unknown or bad key is a ConfigError naming it). Plug-ins come from the "growth.controllers"
entry-point group (a class with `name`, `propose`, `observe`, `state_dict`,
`load_state_dict`, built as `cls(space, params, seed=..., where=...)`).
"""

from __future__ import annotations

from typing import Any

from growth.controllers.base import Controller, ControllerSettings, Proposal
from growth.controllers.eas import EASController
from growth.controllers.random_search import RandomController
from growth.controllers.rcl import RCLController
from growth.search_spaces.space import SearchSpace

from growth.errors import ConfigError
from growth.plugins import load_plugins

ENTRY_POINT_GROUP = "growth.controllers"
CONTROLLERS: dict[str, type] = {"eas": EASController, "random": RandomController,
                                "rcl": RCLController}
_PROTOCOL = ("propose", "observe", "state_dict", "load_state_dict")


def _as_controller(obj: Any, entry: str) -> type:
    if isinstance(obj, type) and isinstance(getattr(obj, "name", None), str) and all(
            callable(getattr(obj, m, None)) for m in _PROTOCOL):
        return obj
    raise TypeError(f"{entry} is not a controller class (a `name` and {', '.join(_PROTOCOL)})")


def available_controllers() -> dict[str, type]:
    """Every controller by name: the built-ins, then installed plug-ins."""
    return {**CONTROLLERS, **load_plugins(ENTRY_POINT_GROUP, _as_controller, CONTROLLERS)}


def make_controller(name: str, space: SearchSpace, params: dict[str, Any] | None = None,
                    seed: int = 0, where: str = "search.controller") -> Controller:
    """The controller called `name` ("eas", "random", "rcl", or a plug-in) over `space`, seeded."""
    found = CONTROLLERS if name in CONTROLLERS else available_controllers()
    if name not in found:
        raise ConfigError(f"{where}.name: unknown controller {name!r}; available: "
                          f"{sorted(found)}")
    return found[name](space, params, seed=seed, where=where)


__all__ = ["CONTROLLERS", "Controller", "ControllerSettings", "EASController", "Proposal",
           "RCLController", "RandomController", "available_controllers", "make_controller"]
