"""Shared fixtures: one Ray for the whole test session (starting Ray takes seconds)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


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
