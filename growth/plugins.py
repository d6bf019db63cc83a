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


FACTORY_PATTERN = r"^[^:\s]+:[A-Za-z_]\w*$"  # "package.module:function" or "file.py:function"


def load_factory(spec: str, key: str) -> Callable[..., Any]:
    """The function a config names for a user's own model or data: "package.module:function"
    (an installed module, or one in the current directory) or "path/to/file.py:function" (a
    path from the current directory). Any problem is a ConfigError naming `key`."""
    import importlib
    import importlib.util
    import os
    import re
    import sys
    import zlib
    from pathlib import Path

    from growth.errors import ConfigError

    if not isinstance(spec, str) or not re.fullmatch(FACTORY_PATTERN, spec):
        raise ConfigError(f"{key}: {spec!r} is not 'package.module:function' or "
                          "'path/to/file.py:function'")
    where, _, name = spec.rpartition(":")
    try:
        if where.endswith(".py"):
            path = Path(where).expanduser().resolve()
            if not path.is_file():
                raise ConfigError(f"{key}: {where} is not a file (paths are read from the "
                                  f"current directory, {Path.cwd()})")
            module_name = f"growth_user_{path.stem}_{zlib.crc32(str(path).encode()):08x}"
            module = sys.modules.get(module_name)
            if module is None:
                found = importlib.util.spec_from_file_location(module_name, path)
                module = importlib.util.module_from_spec(found)  # type: ignore[arg-type]
                sys.modules[module_name] = module
                try:
                    found.loader.exec_module(module)  # type: ignore[union-attr]
                except BaseException:
                    del sys.modules[module_name]
                    raise
        else:
            try:
                module = importlib.import_module(where)
            except ModuleNotFoundError as exc:
                here = os.getcwd()
                if exc.name != where.partition(".")[0] or here in sys.path:
                    raise
                sys.path.append(here)  # after installed packages: a local folder never shadows
                module = importlib.import_module(where)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{key}: cannot import {where!r}: {type(exc).__name__}: {exc}"
                          ) from None
    obj = getattr(module, name, None)
    if not callable(obj):
        raise ConfigError(f"{key}: {where!r} has no function {name!r}")
    return obj
