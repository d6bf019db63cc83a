"""Joining a Ray cluster: errors that name the cause (token authentication, a version
mismatch, an address nothing answers at), against a head this test starts with
`ray start --head --block` and stops itself (its own process group only; never `ray stop`,
which would stop every Ray on the machine); and Ray workers that import the installed package
even when launched from a folder holding one named like it."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from growth.cluster import check_reachable, connect_error
from growth.errors import ConfigError

RAY = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
AUTH = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in AUTH}
    return {**env, **extra}


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A one-node head with token authentication; yields (address, token)."""
    if not Path(RAY).exists():
        pytest.skip("the ray command is not installed")
    temp = Path(f"/tmp/gr{secrets.token_hex(3)}")  # short: Ray's socket paths have a limit
    port, token = _free_port(), secrets.token_hex(16)
    log = tmp_path_factory.mktemp("head") / "head.log"
    proc = subprocess.Popen([RAY, "start", "--head", "--block", f"--port={port}",
                             f"--temp-dir={temp}", "--num-cpus=1", "--include-dashboard=false"],
                            env=_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token),
                            stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        address = ""
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            text = log.read_text()
            if "--block" in text and "ray start --address=" in text:
                address = text.split("ray start --address='")[1].split("'")[0]
                break
            time.sleep(0.5)
        if not address:
            pytest.fail(f"the test's Ray head did not start:\n{log.read_text()[-2000:]}")
        yield address, token
    finally:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops what it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything of ours left: this group only
        except ProcessLookupError:
            pass
        shutil.rmtree(temp, ignore_errors=True)


def _join(address: str, env: dict[str, str], version: str | None = None) -> str:
    """Join through growth.cluster in a fresh interpreter; its one line of outcome."""
    patch = f"ray.__version__ = {version!r}" if version else ""
    code = textwrap.dedent(f"""
        import ray
        {patch}
        from growth.cluster import ray_cluster
        from growth.errors import ConfigError
        try:
            with ray_cluster({address!r}) as info:
                print("joined", info.nodes, info.cpus)
        except ConfigError as exc:
            print("error:", exc)
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("joined", "error:"))]
    assert lines, proc.stderr[-2000:]
    return lines[-1]


@pytest.mark.slow
def test_a_missing_token_is_named_as_the_cause(head: tuple[str, str]) -> None:
    address, _ = head
    line = _join(address, _env())
    assert line.startswith(f"error: could not join the Ray cluster at {address!r}: the cluster "
                           "uses token authentication")
    assert "RAY_AUTH_MODE=token" in line and "RAY_AUTH_TOKEN" in line


@pytest.mark.slow
def test_a_version_mismatch_names_both_versions(head: tuple[str, str]) -> None:
    import ray

    address, token = head
    line = _join(address, _env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token), version="2.0.0")
    py = ".".join(map(str, sys.version_info[:3]))
    assert line == (f"error: could not join the Ray cluster at {address!r}: version mismatch: "
                    f"the cluster runs Ray {ray.__version__} on Python {py}, this process Ray "
                    f"2.0.0 on Python {py}; install the same Ray and Python versions on every "
                    "node and on this machine")


@pytest.mark.slow
def test_with_the_token_the_cluster_is_joined(head: tuple[str, str]) -> None:
    address, token = head
    assert _join(address, _env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)) == "joined 1 1.0"


def test_an_address_nothing_answers_at_fails_at_once() -> None:
    port = _free_port()  # bound and closed again: nothing listens there
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"at '127.0.0.1:{port}': nothing answers there "
                                          r"\(.*\); is the head running"):
        check_reachable(f"127.0.0.1:{port}")
    assert time.perf_counter() - start < 5  # not Ray's minutes of retries
    with pytest.raises(ConfigError, match="is not HOST:PORT"):
        check_reachable("10.0.0.1")
    check_reachable("auto")  # resolved by Ray itself


def test_other_failures_keep_rays_first_line_and_point_at_the_address() -> None:
    message = connect_error("10.0.0.1:6379", ConnectionError("Failed to connect to Ray cluster"
                                                             " at 10.0.0.1:6379\nmore"))
    assert message.startswith("could not join the Ray cluster at '10.0.0.1:6379': Failed to "
                              "connect to Ray cluster at 10.0.0.1:6379; check --ray-address")


@pytest.mark.slow
def test_workers_import_the_package_when_a_folder_shadows_it(tmp_path: Path) -> None:
    """Launched from a folder that holds one named `growth` (the clone, seen from its parent),
    Ray's workers, which put the driver's folder first on sys.path, still import the package."""
    parent = tmp_path / "parent"
    (parent / "growth").mkdir(parents=True)  # the clone's folder: no package at its top
    script = tmp_path / "bin" / "probe.py"
    script.parent.mkdir()
    script.write_text(textwrap.dedent("""
        import ray
        from growth.cluster import ray_cluster

        def probe():
            import growth
            from growth.controllers.trial import TrialSpec
            return growth.__version__, TrialSpec.__module__

        with ray_cluster(num_cpus=1):
            print("worker:", *ray.get(ray.remote(probe).remote()))
    """))
    proc = subprocess.run([sys.executable, str(script)], cwd=parent, env=_env(),
                          capture_output=True, text=True, timeout=300)
    import growth

    assert f"worker: {growth.__version__} growth.controllers.trial" in proc.stdout, \
        proc.stderr[-2000:]
