"""The small CLI commands: ops list, demo, help."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

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


def _actions(parser, path=("growth",)):
    """Every (command path, argparse action) of the parser and its subcommands."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, (*path, name))
        else:
            yield path, action


def test_every_option_and_argument_has_help() -> None:
    from growth.cli import _parser

    missing = [f"{' '.join(path)} {a.dest}" for path, a in _actions(_parser())
               if a.dest != "help" and not (a.help or "").strip()]
    assert missing == []
    commands = {path for path, _ in _actions(_parser())}
    assert ("growth", "strategies", "list") in commands and ("growth", "run") in commands


def test_version_everywhere(capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.metadata
    import subprocess
    import sys

    import growth

    assert growth.__version__ == importlib.metadata.version("growth")
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"growth {growth.__version__}"
    proc = subprocess.run([sys.executable, "-m", "growth", "--version"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"growth {growth.__version__}"


def test_progress_bar_and_log_number_tasks_alike(tmp_path, capsys) -> None:
    from runfiles import write_config

    cfg = write_config(tmp_path / "c.yaml", data__n_tasks=2, train__epochs=1)
    assert main(["run", str(cfg), "--out", str(tmp_path / "run")]) == 0
    bar = capsys.readouterr().err
    log = (tmp_path / "run" / "log.txt").read_text()
    for i in range(2):
        assert f"task {i} (perm-{i})" in bar and f"task {i} (perm-{i})" in log
    assert "task 2" not in bar and "task 2" not in log


def test_run_refuses_a_search_config_and_writes_nothing(tmp_path, capsys) -> None:
    """`growth run` on a `growth search` config would ignore its search section, and `growth
    resume` would then take the run directory for a search: refused before any write."""
    out = tmp_path / "run"
    config = Path(__file__).resolve().parents[1] / "experiments" / "search_digits.yaml"
    code = main(["run", str(config), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert "search_digits.yaml" in err and "growth search" in err
    assert not out.exists()


@pytest.mark.parametrize("flag, value, words", [
    ("--budget", "inf", "is not a finite number"),
    ("--budget", "1e400", "is not a finite number"),
    ("--budget", "nan", "is not a finite number"),
    ("--budget", "1.5", "counts parameters (a whole number)"),
    ("--budget", "abc", "is not a number"),
    ("--budget", "0", "must be above 0"),
    ("--budget", "-1", "must be above 0"),
    ("--lr", "-1", "must be above 0"),
    ("--lr", "nan", "is not a finite number"),
    ("--lr", "0", "must be above 0"),
    ("--epochs", "2.5", "is not a whole number"),
    ("--epochs", "-1", "must be at least 0"),
    ("--task", "-1", "must be at least 0"),
    ("--task", "x", "is not a whole number"),
])
def test_compress_numbers_are_checked_as_they_are_parsed(tmp_path, capsys, flag, value,
                                                         words) -> None:
    """One line naming the flag, exit 2, before anything is read: no traceback (inf was an
    OverflowError, --lr -1 the optimizer's ValueError) and no usage text (--budget abc)."""
    args = ["compress", str(tmp_path / "absent"), "--data", "digits", "--budget", "0.5"]
    code = main([*args, flag, value])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "usage" not in err, err
    assert f"argument {flag}: {value!r}" in err and words in err, err


def test_budget_counts_and_fractions_still_parse() -> None:
    from growth.cli import _parser

    for text, value in (("0.5", 0.5), ("1", 1.0), ("700", 700.0), ("1e3", 1000.0)):
        args = _parser().parse_args(["compress", "n", "--data", "digits", "--budget", text])
        assert args.budget == value


@pytest.mark.parametrize("sig, code, words", [(signal.SIGINT, 130, "interrupted"),
                                              (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_an_interrupt_a_library_turned_into_an_error_is_still_an_interrupt(
        tmp_path, capsys, monkeypatch, request, sig, code, words) -> None:
    """Ctrl-C landing in safetensors' read of a memory-mapped strategy tensor came back as
    torch's "could not determine the shape" error, so the run ended as "error: cannot read the
    strategy tensor" (exit 2), blaming a sound file. The signal was seen: it is the cause."""
    from runfiles import write_config

    from growth.campaign import Campaign
    from growth.errors import CheckpointError

    # as in a terminal: a run started in the background of a script inherits Ctrl-C ignored,
    # and the CLI leaves an ignored Ctrl-C ignored
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, outer))

    def start(self):
        try:
            os.kill(os.getpid(), sig)
            time.sleep(5)  # the handler raises here
        except KeyboardInterrupt:  # what the library did with it
            raise CheckpointError("run/tensors/x.safetensors: cannot read the strategy "
                                  "tensor 'anchor' (could not determine the shape)") from None
        raise AssertionError("the signal was not delivered")

    monkeypatch.setattr(Campaign, "start", start)
    cfg = write_config(tmp_path / "c.yaml")
    assert main(["run", str(cfg), "--out", str(tmp_path / "run")]) == code
    err = capsys.readouterr().err
    assert err.startswith(words) and "cannot read" not in err, err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # an error with no signal behind it is still the error
    monkeypatch.setattr(Campaign, "start", lambda self: (_ for _ in ()).throw(
        CheckpointError("damaged")))
    assert main(["run", str(cfg), "--out", str(tmp_path / "run2")]) == 2
    assert "error: damaged" in capsys.readouterr().err
