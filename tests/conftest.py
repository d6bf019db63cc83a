"""Shared fixtures: one Ray for the whole test session (starting Ray takes seconds), and the
workers of a parallel run (pytest-xdist, `-n auto` in pyproject.toml) sized to the machine."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

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
