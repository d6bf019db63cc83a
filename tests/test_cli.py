"""The small CLI commands: ops list, demo, help."""

from __future__ import annotations

import pytest

from growth.cli import main


def test_ops_list_shows_every_builtin(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ops", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("net2wider", "net2deeper", "prune_units"):
        line = next(line for line in out.splitlines() if line.startswith(name))
        assert len(line.split(None, 1)[1]) > 10  # a one-line description follows the name


def test_demo_grows_and_preserves_the_function(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "function preserved" in out and "NOT preserved" not in out
    before, after = out.split("\nparameters: ")[1].split("\n")[0].split(" -> ")
    assert int(after.replace(",", "")) > int(before.replace(",", ""))


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "run" in capsys.readouterr().out
