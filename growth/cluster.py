"""Start or join the Ray cluster that search trials run on, with Ray's console output quiet.

`ray_cluster()` is the one way the product gets Ray:
- the Ray this process is already connected to (a test session; a campaign that runs inside a
  Ray task, as `growth compare` does) is used as it is and left running;
- an address (`--ray-address`, the config's `search.ray_address`, or RAY_ADDRESS) joins an
  existing cluster, and only disconnects at the end;
- otherwise a local Ray is started for the run (no dashboard) and stopped after it.

Ray's own console output is kept out of the product's progress display: Tune's table reporter
is off, workers' output is not forwarded, and Ray's log records (warnings and errors, such as
a failed trial's traceback) go to the run's log file instead of the terminal.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from growth.errors import ConfigError

# Tune's rich console output ("new output") ignores verbose=0; the classic reporter honours it.
QUIET_ENV = {"RAY_AIR_NEW_OUTPUT": "0", "RAY_DEDUP_LOGS": "1"}
RAY_LOGGERS = ("ray", "ray.tune", "ray.train", "ray.air")


@dataclass(frozen=True)
class ClusterInfo:
    """The cluster a run uses: where it is, whether this run started it, what it holds."""

    address: str
    started: bool  # True: a local Ray started for this run (stopped at the end)
    nodes: int
    cpus: float
    gpus: float


def quiet_ray_env() -> None:
    """Settings that keep Tune's console reporter off (set before Tune runs; user values win)."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


@contextmanager
def ray_logs_to(log_file: Path | None) -> Iterator[None]:
    """Send Ray's log records (warnings and above) to `log_file`, or drop them, for a while."""
    handler: logging.Handler = (logging.FileHandler(log_file) if log_file is not None
                                else logging.NullHandler())
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = []
    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.propagate))
        logger.handlers = [handler]
        logger.propagate = False
    try:
        yield
    finally:
        for logger, handlers, propagate in saved:
            logger.handlers = handlers
            logger.propagate = propagate
        handler.close()


def _describe(ray: Any, started: bool) -> ClusterInfo:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    res = ray.cluster_resources()
    return ClusterInfo(ray.get_runtime_context().gcs_address, started, len(nodes),
                       float(res.get("CPU", 0)), float(res.get("GPU", 0)))


@contextmanager
def ray_cluster(address: str | None = None, num_cpus: int | None = None,
                num_gpus: int | None = None, log_file: Path | None = None
                ) -> Iterator[ClusterInfo]:
    """Use Ray for the duration of the block (see the module docstring).

    address: "host:port" of a running cluster's head (or "auto" for the one on this machine);
    None joins RAY_ADDRESS when it is set, else starts a local Ray with `num_cpus`/`num_gpus`
    (default: all of the machine's). log_file: where Ray's warnings go meanwhile.
    """
    quiet_ray_env()
    import ray

    with ray_logs_to(log_file):
        if ray.is_initialized():
            yield _describe(ray, started=False)
            return
        address = address or os.environ.get("RAY_ADDRESS") or None
        try:
            if address:
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
            else:
                # "local": a new Ray even when another cluster runs on this machine (without
                # it, ray.init joins the last one `ray start` recorded, whoever started it)
                ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus,
                         include_dashboard=False, log_to_driver=False,
                         logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
            where = f"the Ray cluster at {address!r}" if address else "a local Ray"
            raise ConfigError(f"could not start or join {where}: {str(exc).splitlines()[0]}; "
                              "check --ray-address / search.ray_address (the head's "
                              "host:port, e.g. 10.0.0.1:6379), or leave it out to start a "
                              "local Ray") from None
        try:
            yield _describe(ray, started=not address)
        finally:
            ray.shutdown()


def driver_task_options() -> dict[str, Any]:
    """Ray task options for a process that drives searches (a campaign run as a Ray task).

    A driver mostly waits for its trials, which claim CPUs by their own resources; it holds
    no CPU itself, so several campaigns running at once on one cluster leave every CPU to
    their trials instead of to waiting drivers (tests/test_search_tune.py runs two searches
    from Ray tasks at once on two CPUs).
    """
    return {"num_cpus": 0}
