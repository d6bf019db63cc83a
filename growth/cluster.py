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
import re
import socket
import sys
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
        if address:
            check_reachable(address)
        env = worker_env()
        try:
            if address:
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING,
                         runtime_env=env)
            else:
                # "local": a new Ray even when another cluster runs on this machine (without
                # it, ray.init joins the last one `ray start` recorded, whoever started it)
                ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus,
                         include_dashboard=False, log_to_driver=False,
                         logging_level=logging.WARNING, runtime_env=env)
        except Exception as exc:  # Ray raises many types; the cause is named below
            raise ConfigError(connect_error(address, exc)) from None
        try:
            yield _describe(ray, started=not address)
        finally:
            ray.shutdown()


# ---- what goes wrong when joining a cluster, named ------------------------------------------
AUTH_WORDS = ("InvalidAuthToken", "AuthenticationError", "Unauthenticated")


def connect_error(address: str | None, exc: BaseException) -> str:
    """One message naming why Ray could not be started or joined: token authentication,
    a version mismatch, or the address (Ray's own message often names none of them, and the
    cause sits in the exception's chain or in its console warnings)."""
    chain, seen = [], set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        chain.append(f"{type(cause).__name__}: {cause}")
        cause = cause.__cause__ or cause.__context__
    text = "\n".join(chain)
    where = f"the Ray cluster at {address!r}" if address else "a local Ray"
    if any(word in text for word in AUTH_WORDS):
        mode = os.environ.get("RAY_AUTH_MODE", "disabled")
        return (f"could not join {where}: the cluster uses token authentication and refused "
                f"this process's token (InvalidAuthToken; RAY_AUTH_MODE here is {mode!r}). "
                "Set RAY_AUTH_MODE=token and the cluster's token, in RAY_AUTH_TOKEN or in a "
                "file named by RAY_AUTH_TOKEN_PATH (default ~/.ray/auth_token), on this "
                "machine; `ray get-auth-token` on the head prints it (docs: README, Running "
                "on a Ray cluster)")
    versions = re.search(r"started with:\s*Ray: (\S+)\s*Python: (\S+).*?started with:\s*"
                         r"Ray: (\S+)\s*Python: (\S+)", text, re.S)
    if versions:
        ray_c, py_c, ray_h, py_h = versions.groups()
        return (f"could not join {where}: version mismatch: the cluster runs Ray {ray_c} on "
                f"Python {py_c}, this process Ray {ray_h} on Python {py_h}; install the same "
                "Ray and Python versions on every node and on this machine")
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if address:
        return (f"could not join {where}: {first}; check --ray-address / search.ray_address "
                "(the head's host:port as `ray start --head` printed it, e.g. "
                "10.0.0.1:6379) and that the head is running; leave it out to start a local "
                "Ray")
    return f"could not start {where}: {first}"


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A HOST:PORT address that nothing answers at is a ConfigError at once (Ray itself
    retries for minutes before it gives up)."""
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"Ray address {address!r} is not HOST:PORT (e.g. 10.0.0.1:6379, as "
                          "`ray start --head` prints it), 'auto' or ray://HOST:PORT")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"could not join the Ray cluster at {address!r}: nothing answers "
                          f"there ({reason}); is the head running (`ray start --head "
                          f"--port={port}`), and is this its address?") from None


def worker_env() -> dict[str, Any] | None:
    """Ray workers put the driver's current folder first on their `sys.path`: a folder there
    named like the package (the clone's folder, when growth is launched from its parent) would
    be imported in place of an editable install. Then the workers get the package's own folder
    on PYTHONPATH, where the real package is found first."""
    import growth

    package = Path(growth.__file__).resolve().parent
    shadows = [Path.cwd() / package.name]
    if sys.argv and sys.argv[0]:
        shadows.append(Path(sys.argv[0]).resolve().parent / package.name)
    if not any(s.exists() and s.resolve() != package for s in shadows):
        return None
    path = os.pathsep.join(p for p in (str(package.parent), os.environ.get("PYTHONPATH"))
                           if p)
    return {"env_vars": {"PYTHONPATH": path}}


def driver_task_options() -> dict[str, Any]:
    """Ray task options for a process that drives searches (a campaign run as a Ray task).

    A driver mostly waits for its trials, which claim CPUs by their own resources; it holds
    no CPU itself, so several campaigns running at once on one cluster leave every CPU to
    their trials instead of to waiting drivers (tests/test_search_tune.py runs two searches
    from Ray tasks at once on two CPUs).
    """
    return {"num_cpus": 0}
