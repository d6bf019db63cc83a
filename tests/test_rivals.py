"""What the architecture-changing rivals of REC share: their settings in `growth strategies
list`, their shipped configs, the scenario they refuse."""

from __future__ import annotations

from pathlib import Path

import pytest
from rivalkit import write_config

from growth.campaign import Campaign
from growth.cli import main
from growth.config import load_config
from growth.errors import ConfigError
from growth.strategies import get_strategy

RIVALS = ("learn_to_grow", "den", "progress_compress", "expert_gate", "rcl")
ROOT = Path(__file__).resolve().parents[1]


def test_strategies_list_shows_each_rival_with_every_setting_and_its_description(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["strategies", "list"]) == 0
    out = capsys.readouterr().out
    blocks = {b.split(":", 1)[0]: b for b in out.split("\n") if b and not b.startswith(" ")}
    for name in RIVALS:
        assert name in blocks, name
        cls = get_strategy(name)
        section = out.split(f"\n{name}: ", 1)[1].split("\n\n", 1)[0]
        for key, info in cls.Params.model_fields.items():
            line = next(ln for ln in section.splitlines()
                        if ln.strip().startswith(f"{info.alias or key}:"))
            assert info.description and f"# {info.description}" in line, line


@pytest.mark.parametrize("name", RIVALS)
def test_each_rival_ships_a_digits_config_and_one_at_the_papers_scale(name: str) -> None:
    configs = [load_config(p) for p in sorted((ROOT / "experiments").glob("*.yaml"))]
    mine = [c for c in configs if c.strategy.name == name]
    assert {c.data.dataset for c in mine} >= {"digits"}
    assert any(c.data.dataset in ("mnist", "cifar100") for c in mine)


@pytest.mark.parametrize("name", RIVALS)
def test_a_class_incremental_campaign_is_refused_before_any_write(name: str,
                                                                  tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", {"name": name}, scenario="class",
                       data={"dataset": "digits", "stream": "split", "n_tasks": 5})
    with pytest.raises(ConfigError, match=f"strategy '{name}' runs only in scenario task"):
        Campaign(load_config(cfg), tmp_path / "r")
    assert not (tmp_path / "r").exists()
