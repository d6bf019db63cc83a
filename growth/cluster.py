"""Start or join the Ray cluster that search trials run on, with Ray's console output quiet.

`ray_cluster()` is the one way the product gets Ray:
- the Ray this process is already connected to (a test session; a campaign that runs inside a
  Ray task, as `growth compare` does) is used as it is and left running;
- an address (`--ray-address`, the config's `search.ray_address`, or RAY_ADDRESS) joins an
  existing cluster, and only disconnects at the end;
- otherwise a local Ray is started for the run (no dashboard) and stopped after it. It runs
  under a keeper process (`growth.keeper`) that watches this one: when this process dies,
  SIGKILL included, the keeper kills every process of that Ray within a second or two, so no
  trial, Ray task or agent outlives its driver; and a terminal's Ctrl-C reaches this process
  only (the keeper has a session of its own), which then stops Ray in order.

Ray's own console output is kept out of the product's progress display: Tune's table reporter
is off, workers' output is not forwarded, Ray's log records (warnings and errors, such as a
failed trial's traceback) and the lines Ray's threads print in this process (a worker's death,
the memory monitor) go to the run's log file, and the local Ray's processes write theirs
there too. Tune's own SIGINT handler is off, and the handlers a Tune run leaves behind are put
back (`signals_kept`), so Ctrl-C is an interrupt of the command, never a quiet end of a
generation.
"""

from __future__ import annotations

import io
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from growth.errors import ConfigError

# Tune's rich console output ("new output") ignores verbose=0; the classic reporter honours it.
QUIET_ENV = {"RAY_AIR_NEW_OUTPUT": "0", "RAY_DEDUP_LOGS": "1"}
# Tune's SIGINT handler turns Ctrl-C into "end this experiment quietly" and stays installed
# after the run; the product's commands treat Ctrl-C as an interrupt instead (always set).
# Tune's automatic loggers include a TensorBoard writer (when tensorboardX is installed) whose
# exit hook waits forever for its thread after an interrupted experiment, so an interrupted
# command never exits: they are off, and the driver adds the CSV and JSON loggers itself.
FORCED_ENV = {"TUNE_DISABLE_SIGINT_HANDLER": "1", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}
RAY_LOGGERS = ("ray", "ray.tune", "ray.train", "ray.air")
RAY_THREADS = "ray_"  # Ray names the threads it starts in a driver ray_listen_error_messages...
KEEPER_STOP_S = 30.0  # how long a finished run waits for the keeper to stop Ray in order


@dataclass(frozen=True)
class ClusterInfo:
    """The cluster a run uses: where it is, whether this run started it, what it holds."""

    address: str
    started: bool  # True: a local Ray started for this run (stopped at the end)
    nodes: int
    cpus: float
    gpus: float


def quiet_ray_env() -> None:
    """Settings that keep Tune's console reporter off (set before Tune runs; user values win)
    and its SIGINT handler off (always)."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.update(FORCED_ENV)


@contextmanager
def signals_kept() -> Iterator[None]:
    """Put back the SIGINT, SIGTERM and SIGUSR1 handlers after a block that runs Tune (Tune
    installs its own and leaves them; a test session would then ignore Ctrl-C) or connects to
    Ray (its C++ core installs a SIGTERM handler that dumps a stack and aborts)."""
    names = [s for s in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, s)]
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread has handlers to keep
        return
    saved = {n: signal.getsignal(getattr(signal, n)) for n in names}
    try:
        yield
    finally:
        for n, handler in saved.items():
            if handler is not None:
                signal.signal(getattr(signal, n), handler)


class _RayLines(io.TextIOBase):
    """A console stream that passes every write through, except those of Ray's own threads
    (the lines a driver prints when a worker dies, ...), which go to `sink`."""

    def __init__(self, stream: IO[str], sink: IO[str] | None) -> None:
        self.stream, self.sink = stream, sink

    def write(self, text: str) -> int:
        if threading.current_thread().name.startswith(RAY_THREADS):
            if self.sink is not None:
                self.sink.write(text)
                self.sink.flush()
            return len(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding: the console's
        return getattr(self.stream, name)


@contextmanager
def ray_logs_to(log_file: Path | None) -> Iterator[None]:
    """Send Ray's log records (warnings and above) and the lines its threads print to
    `log_file`, or drop them, for a while."""
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
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
    sink = open(log_file, "a", encoding="utf-8") if log_file is not None else None  # noqa: SIM115
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _RayLines(sys.stdout, sink), _RayLines(sys.stderr, sink)
    try:
        yield
    finally:
        if isinstance(sys.stdout, _RayLines):
            sys.stdout = streams[0]
        if isinstance(sys.stderr, _RayLines):
            sys.stderr = streams[1]
        for logger, handlers, propagate in saved:
            logger.handlers = handlers
            logger.propagate = propagate
        handler.close()
        if sink is not None:
            sink.close()


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
    (default: all of the machine's) under a keeper that takes it down with this process.
    log_file: where Ray's warnings, the lines its threads print and the local Ray's console
    output go meanwhile (the run's ray.log).
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
        head = nullcontext(address) if address else _local_ray(num_cpus, num_gpus, log_file)
        with head as gcs:
            try:
                with signals_kept():  # Ray's C++ core takes SIGTERM over (a stack dump, abort)
                    ray.init(address=gcs, log_to_driver=False, logging_level=logging.WARNING,
                             runtime_env=env)
            except Exception as exc:  # Ray raises many types; the cause is named below
                raise ConfigError(connect_error(address, exc)) from None
            try:
                yield _describe(ray, started=not address)
            finally:
                ray.shutdown()


@contextmanager
def _local_ray(num_cpus: int | None, num_gpus: int | None, log_file: Path | None
               ) -> Iterator[str]:
    """A local Ray under a keeper process (growth.keeper) that dies, with all of Ray, when
    this process dies; yields its GCS address. Leaving the block stops Ray in order."""
    read, write = os.pipe()
    cmd = [sys.executable, "-m", "growth.keeper", "--parent", str(os.getpid()),
           "--address-fd", str(write)]
    cmd += ["--num-cpus", str(num_cpus)] if num_cpus is not None else []
    cmd += ["--num-gpus", str(num_gpus)] if num_gpus is not None else []
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = open(log_file if log_file is not None else os.devnull, "ab")  # noqa: SIM115
    try:
        keeper = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=out,
                                  pass_fds=(write,), start_new_session=True, env=env)
    finally:
        os.close(write)
        out.close()
    try:
        with os.fdopen(read, encoding="utf-8") as pipe:
            address, _, auth = pipe.readline().strip().partition(" ")
        if auth:
            _authenticate_as(auth)
        if not address:
            keeper.wait()
            where = f" (see {log_file})" if log_file is not None else ""
            raise ConfigError(f"could not start a local Ray: its keeper exited with status "
                              f"{keeper.returncode}{where}")
        yield address
    except BaseException:  # interrupted or failed: Ray's processes go at once
        _stop(keeper, now=True)
        raise
    _stop(keeper)


def _authenticate_as(mode: str) -> None:
    """Connect with the authentication the keeper's Ray uses (a new local Ray asks for Ray's
    token, kept in ~/.ray, unless RAY_AUTH_MODE says otherwise). Ray reads RAY_AUTH_MODE when
    its settings load, on import: a process that imported Ray before reloads them."""
    if os.environ.get("RAY_AUTH_MODE") == mode:
        return
    os.environ["RAY_AUTH_MODE"] = mode
    from ray._raylet import Config

    Config.initialize("")


def _stop(keeper: subprocess.Popen[bytes], now: bool = False) -> None:
    """Ask the keeper to stop Ray: in order (its stdin closes), or `now` (a line first: every
    process of that Ray is killed at once, as when this process dies). If that takes too long,
    or this process is interrupted meanwhile, the keeper's processes are killed from here."""
    from growth.keeper import kill_all

    try:
        if keeper.stdin is not None and not keeper.stdin.closed:
            try:
                if now:
                    keeper.stdin.write(b"now\n")
                keeper.stdin.close()
            except BrokenPipeError:  # the keeper is gone already
                pass
        keeper.wait(timeout=KEEPER_STOP_S)
    except BaseException as exc:
        kill_all(keeper.pid)  # its descendants, while they still are (it is their subreaper)
        keeper.kill()
        keeper.wait()
        if not isinstance(exc, subprocess.TimeoutExpired):
            raise


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
