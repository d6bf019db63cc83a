"""Plug-ins by entry point: the example strategy package (examples/plugin) installed as pip
would install it, then used by `growth strategies list`, `growth run` and `growth resume`; a
controller plug-in; broken plug-ins only warn."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
from runfiles import install, install_example, write_config

from growth.cli import main


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "site"
    path.mkdir()
    monkeypatch.syspath_prepend(str(path))
    before = set(sys.modules)
    yield path
    for name in set(sys.modules) - before:  # forget the plug-in modules imported here
        if name.startswith(("growth_anchor", "fake_controllers")):
            del sys.modules[name]


def test_plugin_strategy_is_unknown_until_installed(site: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path / "c.yaml", strategy={"name": "anchor"})
    assert main(["run", str(cfg), "--out", str(tmp_path / "never"), "--quiet"]) == 2
    assert "unknown strategy 'anchor'" in capsys.readouterr().err
    install_example(site)
    assert main(["strategies", "list"]) == 0
    out = capsys.readouterr().out
    assert "anchor: pull the trunk toward the previous task's weights (L1 or L2)  [plug-in from " \
           "growth_anchor]" in out
    assert "    strength: 0.001" in out and "# weight of the pull" in out
    assert "    norm: l1" in out
    assert "ewc: elastic weight consolidation" in out  # the built-ins are still there


def test_plugin_strategy_runs_and_resumes(site: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    install_example(site)
    cfg = write_config(tmp_path / "c.yaml", strategy={"name": "anchor", "strength": 0.01},
                       train__epochs=2)
    full, part = tmp_path / "full", tmp_path / "part"
    for out in (full, part):
        assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    shutil.rmtree(part / "checkpoints" / "task_002")  # as if killed during the last task
    assert main(["resume", str(part), "--quiet"]) == 0
    R = json.loads((full / "metrics.json").read_text())["R"]
    assert json.loads((part / "metrics.json").read_text())["R"] == R
    state = json.loads((full / "checkpoints" / "task_002" / "state.json").read_text())
    assert state["strategy"] == "anchor" and state["config"]["strategy"] == {
        "name": "anchor", "strength": 0.01, "norm": "l1"}
    from safetensors.torch import load_file

    manifest = json.loads((full / "checkpoints" / "task_002" / "manifest.json").read_text())
    assert sorted(manifest["tensors"]) == ["anchor/latest/fc1.bias", "anchor/latest/fc1.weight"]
    saved = load_file(str(full / "tensors" / f"{manifest['tensors']['anchor/latest/fc1.bias']}"
                                             ".safetensors"))
    assert sorted(saved) == ["anchor/latest/fc1.bias", "anchor/latest/fc1.weight"]
    # the pull works: a strong one keeps task 0 better than fine-tuning does
    finetune = tmp_path / "finetune"
    assert main(["run", str(write_config(tmp_path / "f.yaml", train__epochs=2)), "--out",
                 str(finetune), "--quiet"]) == 0
    strong = tmp_path / "strong"
    cfg2 = write_config(tmp_path / "s.yaml", strategy={"name": "anchor", "strength": 0.05},
                        train__epochs=2)
    assert main(["run", str(cfg2), "--out", str(strong), "--quiet"]) == 0
    forgot = [json.loads((d / "metrics.json").read_text())["R"] for d in (finetune, strong)]
    assert forgot[1][3][0] > forgot[0][3][0]


CONTROLLER = textwrap.dedent('''
    from growth.controllers.random_search import RandomController

    class Shy(RandomController):
        name = "shy"

        def propose(self, parent, n, exclude=()):
            return super().propose(parent, min(n, 1), exclude)

    class Clash(RandomController):  # a built-in's name: ignored, the built-in stays
        name = "eas"

    NOT_A_CONTROLLER = object()

    class Stateless:  # no state to restore: a search could not resume it
        name = "stateless"
        def propose(self, parent, n, exclude=()): return []
        def observe(self, results): pass
        def state_dict(self): return {}, {}
''')


def test_controller_plugin_is_made_by_name(site: Path) -> None:
    from growth.controllers import EASController, available_controllers, make_controller
    from growth.search_spaces import make_space
    from growth.search_spaces.networks import add_head, mlp

    install(site, "fake-controllers", "1.0", {"fake_controllers": CONTROLLER},
            {"growth.controllers": {"shy": "fake_controllers:Shy",
                                    "broken": "fake_controllers:NOT_A_CONTROLLER",
                                    "stateless": "fake_controllers:Stateless",
                                    "clash": "fake_controllers:Clash"}})
    with pytest.warns(RuntimeWarning) as caught:
        found = available_controllers()
    assert {"eas", "random", "shy"} <= set(found) and "stateless" not in found
    assert found["eas"] is EASController

    def said(name: str) -> str:  # the warning about plug-in entry `name`
        return " ".join(str(w.message) for w in caught if f"plug-in '{name}' (" in str(w.message))

    assert "not a controller class" in said("stateless") and "load_state_dict" in said("stateless")
    assert said("broken") and "already taken" in said("clash")
    graph = add_head(mlp((6,), [5, 7]), "t0", 3)
    space = make_space({"widths": {"fc": [8, 12]}}, graph)
    with pytest.warns(RuntimeWarning):
        shy = make_controller("shy", space, seed=1)
    assert type(shy).__name__ == "Shy" and len(shy.propose(graph, 4)) == 1


def test_broken_strategy_plugins_only_warn(site: Path) -> None:
    from growth.strategies import available_strategies

    install(site, "bad-plugins", "1.0", {"bad_plugins": "from growth.strategies import "
                                         "Strategy\nclass Nameless(Strategy):\n    pass\n"},
            {"growth.strategies": {"nameless": "bad_plugins:Nameless",
                                   "missing": "no_such_module_here:X",
                                   "clash": "growth.strategies.ewc:EWC"}})
    with pytest.warns(RuntimeWarning) as caught:
        found = available_strategies()
    text = " ".join(str(w.message) for w in caught)
    for name in ("'nameless'", "'missing'", "'clash'"):
        assert name in text
    assert found["ewc"].__module__ == "growth.strategies.ewc" and "nameless" not in found
