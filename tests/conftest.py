"""Shared fixtures: one Ray for the whole test session (starting Ray takes seconds), the
workers of a parallel run (pytest-xdist, `-n auto` in pyproject.toml) sized to the machine, and,
under mutmut, the import alias that lets its mutants of controllers/ and search_spaces/ run."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

import growth


class _TopLevelAlias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Under mutmut only: `growth.controllers[.x]` and `growth.search_spaces[.x]` are the
    top-level modules `controllers[.x]` and `search_spaces[.x]` of mutmut's copy.

    The two folders install inside the package through setuptools' package-dir mapping, so the
    editable install's finder would import them from the checkout, never from `mutants/`, and
    mutmut names their mutants by file path (`controllers.searcher.x_...`) while a function's
    trampoline compares that name with its `__module__`. One module object under both names
    makes the trampolines run and their names match."""

    PACKAGES = ("growth.controllers", "growth.search_spaces")

    def find_spec(self, fullname: str, path: object = None, target: object = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if fullname.startswith(tuple(p + "." for p in self.PACKAGES)) or fullname in self.PACKAGES:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(spec.name.removeprefix("growth."))

    def exec_module(self, module: ModuleType) -> None:
        """Executed already under its top-level name."""


if Path(growth.__file__).parents[1].name == "mutants":  # growth imported from mutmut's copy
    sys.meta_path.insert(0, _TopLevelAlias())

MAX_WORKERS = 4  # each worker is a test session of its own, with its own Ray when a test asks


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """One worker per core, at most MAX_WORKERS (a worker with Ray holds about 1 GB)."""
    return max(1, min(MAX_WORKERS, os.cpu_count() or 1))


def pytest_configure(config: pytest.Config) -> None:
    """In a worker, torch's threads share the cores with the other workers instead of each
    taking all of them (oversubscribed threads make every worker slower)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(scope="session")
def ray_session() -> Iterator[object]:
    """A local Ray with 2 CPUs, started once per test session through growth.cluster (the
    product's own way of getting Ray) and stopped at the end. Tests that need Ray ask for it;
    `growth.cluster.ray_cluster()` inside them then reuses this one."""
    from growth.cluster import ray_cluster

    with ray_cluster(num_cpus=2) as info:
        yield info


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Torch on one thread for a module's tests (`pytestmark = pytest.mark.usefixtures(
    "one_thread")`): strategy runs there are compared bit for bit, and one thread keeps their
    reductions in one order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
