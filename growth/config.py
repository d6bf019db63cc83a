"""Campaign configs: YAML validated at load, with `--set key=value` overrides.

Every mistake is a ConfigError naming the file and the dotted key (an unknown key, a wrong
type, a bad value), so the CLI can print one line and exit 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

from growth.data.datasets import DATASETS
from growth.errors import ConfigError
from growth.layers import ACTIVATIONS
from growth.train import TrainConfig


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Section):
    """Which dataset and how it is cut into tasks (see growth.data.build_stream)."""

    dataset: Literal[DATASETS] = "digits"  # type: ignore[valid-type]
    root: str = "data"
    download: bool = False
    image_size: int = Field(64, ge=4)
    stream: Literal["permuted", "variations", "split"] = "permuted"
    n_tasks: int | None = Field(None, ge=1)  # None: 5 (permuted, split), 20 (superclass)
    val_fraction: float = Field(0.1, ge=0, lt=1)
    max_train_per_task: int | None = Field(None, ge=1)
    variations: list[str] | None = None
    by: Literal["classes", "superclass"] = "classes"
    class_order: Literal["fixed", "shuffled"] = "fixed"
    split_seed: int = 0  # train/test split of datasets without one (digits, one-folder trees)


class ModelConfig(_Section):
    """The base network: an MLP or a small CNN trunk, one linear head per task."""

    kind: Literal["mlp", "cnn"] = "mlp"
    hidden: list[PositiveInt] = Field(default_factory=lambda: [100, 100])  # mlp widths
    channels: list[PositiveInt] = Field(default_factory=lambda: [32, 64])  # cnn conv blocks
    fc: list[PositiveInt] = Field(default_factory=list)  # cnn dense blocks after the convs
    activation: Literal[tuple(sorted(ACTIVATIONS))] = "relu"  # type: ignore[valid-type]
    batchnorm: bool = False
    dropout: float = Field(0.0, ge=0, lt=1)  # mlp: after every block; cnn: after fc blocks

    @model_validator(mode="after")
    def _dropout_has_a_place(self) -> ModelConfig:
        if self.kind == "cnn" and self.dropout > 0 and not self.fc:
            raise ValueError("dropout in a cnn applies to its fc blocks: set model.fc "
                             "(e.g. [256]) or dropout: 0")
        return self


class StrategyConfig(BaseModel):
    """`name` plus the strategy's own settings, validated by that strategy's Params model."""

    model_config = ConfigDict(extra="allow")
    name: str = "finetune"

    def settings(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Config(_Section):
    name: str = "run"
    seed: int = 0
    scenario: Literal["task", "class"] = "task"
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    threads: int | None = Field(None, ge=1)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config, as it is written to a run directory."""
        return self.model_dump(mode="json", by_alias=True)


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read, override and validate a config file; every problem is a ConfigError."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got "
                          f"{type(raw).__name__}")
    for item in overrides or []:
        apply_override(raw, item)
    return validate_config(raw, str(path))


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one `dotted.key=value` (value parsed as YAML) to a raw config dict."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.epochs=3")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def validate_config(raw: dict[str, Any], source: str = "<config>") -> Config:
    """Validate a raw dict (top level and the strategy's own settings)."""
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None
    _validate_strategy(cfg, source)
    return cfg


def _validate_strategy(cfg: Config, source: str) -> None:
    from growth.strategies import STRATEGIES

    name = cfg.strategy.name
    if name not in STRATEGIES:
        raise ConfigError(f"{source}: strategy.name: unknown strategy {name!r}; "
                          f"available: {sorted(STRATEGIES)}")
    try:
        STRATEGIES[name].Params.model_validate(cfg.strategy.settings())
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source, prefix="strategy")) from None


def _describe(exc: ValidationError, source: str, prefix: str = "") -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        if err["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key {key!r} (check the spelling)")
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{source}: {key}: {err['msg']}{shown}")
    return "\n".join(lines)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
