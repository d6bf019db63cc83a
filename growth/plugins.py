"""Plug-ins by entry point: one loader for every family (operators, strategies, controllers).

A distribution adds objects to a family by naming them in its pyproject.toml, e.g.

    [project.entry-points."growth.strategies"]
    my_method = "my_package.strategy:MyMethod"

Each family says what a valid object is (`convert`); a plug-in that fails to import, is not
valid, or takes a name already in use warns and is skipped, so a broken plug-in never breaks
the engine or hides a built-in.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Container
from importlib import metadata
from typing import Any, TypeVar

T = TypeVar("T")


def load_plugins(group: str, convert: Callable[[Any, str], T], taken: Container[str] = ()
                 ) -> dict[str, T]:
    """Objects of entry-point `group` by their `name`, skipping broken ones and names in
    `taken` (the built-ins). `convert(obj, entry)` returns the valid object or raises."""
    found: dict[str, T] = {}
    for ep in metadata.entry_points(group=group):
        entry = f"{ep.name!r} ({ep.value})"
        try:
            obj = convert(ep.load(), f"{ep.name} = {ep.value}")
            name = obj.name  # type: ignore[attr-defined]
        except Exception as exc:  # a plug-in must never break the engine
            warnings.warn(f"{group} plug-in {entry} could not be loaded: "
                          f"{type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=3)
            continue
        if name in taken or name in found:
            warnings.warn(f"{group} plug-in {entry} is named {name!r}, which is already "
                          "taken; it is ignored", RuntimeWarning, stacklevel=3)
            continue
        found[name] = obj
    return found
