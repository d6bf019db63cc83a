"""Presets: the best settings `growth tune` found for a strategy on a stream, as a YAML file.

A preset lives in a presets folder (the project ships experiments/presets/) under the name
`<strategy>-<dataset>-<stream>-<scenario>.yaml`, so a comparison finds the preset of each of
its strategies from its base config alone (`settings: presets` in `growth compare`). The file:

    # header: what was tuned, the command that made it, the chosen trial's score
    strategy: {name: ewc, lambda: 3000.0}   # the strategy section, tuned values filled in
    set: [train.lr=0.02]                    # other tuned keys, as --set items
    tuned: {...}                            # where and how it was tuned (config, protocol,
                                            # seeds, trials, scores)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from growth.config import Config, parse_yaml, read_config_text
from growth.errors import ConfigError
from growth.io import atomic_write_text


class Preset(BaseModel):
    """A preset file's content (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")
    strategy: dict[str, Any]
    set: list[str] = Field(default_factory=list)
    tuned: dict[str, Any] = Field(default_factory=dict)


def preset_name(strategy: str, cfg: Config) -> str:
    """The file name of `strategy`'s preset for the stream of `cfg`."""
    return f"{strategy}-{cfg.data.dataset}-{cfg.data.stream}-{cfg.scenario}.yaml"


def write_preset(folder: Path, name: str, preset: Preset, header: list[str]) -> Path:
    """Write a preset (header lines as comments) into `folder`; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    body = yaml.safe_dump(preset.model_dump(mode="json"), sort_keys=False, width=96)
    text = "".join(f"# {line}\n" if line else "#\n" for line in header) + body
    path = folder / name
    atomic_write_text(path, text)
    return path


def read_preset(path: Path) -> Preset:
    """A preset file, checked; a missing or malformed one is a ConfigError naming it."""
    raw = parse_yaml(read_config_text(path), str(path))
    try:
        preset = Preset.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"{path}: {key}: {err['msg']}") from None
    if not isinstance(preset.strategy.get("name"), str):
        raise ConfigError(f"{path}: strategy.name: a preset names its strategy")
    return preset


def find_preset(folder: Path, strategy: str, cfg: Config) -> Preset | None:
    """`strategy`'s preset for the stream of `cfg` in `folder`, or None if there is none."""
    path = folder / preset_name(strategy, cfg)
    if not path.is_file():
        return None
    preset = read_preset(path)
    if preset.strategy["name"] != strategy:
        raise ConfigError(f"{path}: strategy.name is {preset.strategy['name']!r}, but the file "
                          f"is named for {strategy!r}")
    return preset
