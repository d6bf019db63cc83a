"""Campaign configs: YAML validated at load, with `--set key=value` overrides.

Every mistake is a ConfigError naming where it came from (the file, or the `--set` item) and
the dotted key: bytes that are not UTF-8, YAML that does not parse, duplicate keys, nesting or
size beyond the limits, an unknown key, a wrong type, a non-finite number, a key that does
not apply to the chosen stream/model/optimizer, a value above a sane bound. Many problems are
reported together, capped at MAX_PROBLEMS lines plus a count.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from growth.context import TrainConfig
from growth.data.datasets import DATASETS
from growth.data.orders import CURRICULA, is_order_name
from growth.devices import DEVICE_PATTERN
from growth.errors import ConfigError
from growth.io import name_problem
from growth.layers import ACTIVATIONS
from growth.plugins import FACTORY_PATTERN

MAX_CONFIG_BYTES = 1 << 20  # a campaign config is a page of YAML, not a data file
MAX_DEPTH = 12  # sections nest two or three levels; a search space a few more
MAX_NODES = 20_000  # values after YAML aliases are expanded
MAX_PROBLEMS = 10  # lines of a multi-problem error before "... and N more"
MAX_SHOWN = 60  # characters of an offending value quoted in an error

MINIMAL_EXAMPLE = (
    "name: my-run\n"
    "data: {dataset: digits, stream: permuted, n_tasks: 5}\n"
    "model: {kind: mlp, hidden: [100, 100]}\n"
    "train: {epochs: 5, lr: 0.05}\n"
    "strategy: {name: ewc}"
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class DataConfig(_Section):
    """Which dataset and how it is cut into tasks (see growth.data.build_stream)."""

    dataset: Literal[(*DATASETS, "python")] = "digits"  # type: ignore[valid-type]
    # python: "package.module:function" or "file.py:function" returning the tasks (each a
    # mapping with train/test splits, growth.data.custom), called with `args`
    factory: str | None = Field(None, pattern=FACTORY_PATTERN)
    args: dict[str, Any] = Field(default_factory=dict)
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
    load: Literal["auto", "memory", "stream"] = "auto"  # folder datasets: memory or disk
    workers: int = Field(2, ge=0)  # DataLoader processes reading streamed images
    augment: Literal["none", "crop_flip", "resized_crop_flip"] = "none"  # training batches
    order: list[int] | str | None = None  # task order (growth.data.orders); None: the stream's

    @field_validator("order")
    @classmethod
    def _an_order(cls, value: list[int] | str | None) -> list[int] | str | None:
        if isinstance(value, str) and not is_order_name(value):
            raise ValueError(f"unknown task order {value!r}; valid: a list of task indices, "
                             f"{', '.join(CURRICULA)}, or random-K (K = 1, 2, ...)")
        if isinstance(value, list):
            if not value or min(value) < 0 or len(set(value)) != len(value):
                raise ValueError("a task order lists distinct task indices (0, 1, ...), "
                                 f"at least one, got {value}")
        return value


    @model_validator(mode="after")
    def _python_needs_a_factory(self) -> DataConfig:
        if self.dataset == "python" and self.factory is None:
            raise ValueError("data.dataset: python needs data.factory, e.g. 'my_data:tasks' or "
                             "'data.py:tasks' (a function returning the tasks)")
        return self


class ModelConfig(_Section):
    """The base network: an MLP, a small CNN, a small Vision Transformer, a torchvision
    architecture imported by name (its classifier replaced by the heads); one linear head per
    task."""

    kind: Literal["mlp", "cnn", "vit", "torchvision", "python"] = "mlp"
    arch: str | None = None  # torchvision: e.g. resnet18, vgg11_bn (search_spaces/zoo.py)
    # python: "package.module:function" or "file.py:function" returning a torch.nn.Module,
    # called with `args`; its output is the features the heads read, or (output: classifier)
    # its last linear layer is replaced by the heads
    factory: str | None = Field(None, pattern=FACTORY_PATTERN)
    args: dict[str, Any] = Field(default_factory=dict)
    output: Literal["features", "classifier"] = "features"
    weights: str | None = None  # torchvision: a local state-dict file for a pretrained start
    hidden: list[PositiveInt] = Field(default_factory=lambda: [100, 100])  # mlp widths
    channels: list[PositiveInt] = Field(default_factory=lambda: [32, 64])  # cnn conv blocks
    fc: list[PositiveInt] = Field(default_factory=list)  # cnn dense blocks after the convs
    activation: Literal[tuple(sorted(ACTIVATIONS))] = "relu"  # type: ignore[valid-type]
    batchnorm: bool = False
    dropout: float = Field(0.0, ge=0, lt=1)  # mlp: after every block; cnn: after fc blocks
    patch: PositiveInt = 4  # vit: patch size (divides the image's height and width)
    dim: PositiveInt = 32  # vit: token features
    depth: PositiveInt = 2  # vit: transformer blocks
    heads: PositiveInt = 2  # vit: attention heads (dim // heads features each)
    mlp_dim: PositiveInt | None = None  # vit: MLP hidden width (default 2 * dim)

    @model_validator(mode="after")
    def _torchvision_needs_an_arch(self) -> ModelConfig:
        if self.kind == "torchvision":
            from growth.search_spaces.zoo import classification_models

            if self.arch is None:
                raise ValueError("model.kind: torchvision needs model.arch, the name of a "
                                 "torchvision classification architecture (e.g. resnet18)")
            if self.arch not in classification_models():
                raise ValueError(f"model.arch: {self.arch!r} is not a torchvision "
                                 "classification architecture (torchvision.models."
                                 "list_models())")
        return self

    @model_validator(mode="after")
    def _python_needs_a_factory(self) -> ModelConfig:
        if self.kind == "python" and self.factory is None:
            raise ValueError("model.kind: python needs model.factory, e.g. "
                             "'my_models:build' or 'models.py:build' (a function returning "
                             "a torch.nn.Module)")
        return self

    @model_validator(mode="after")
    def _dropout_has_a_place(self) -> ModelConfig:
        if self.kind == "cnn" and self.dropout > 0 and not self.fc:
            raise ValueError("dropout in a cnn applies to its fc blocks: set model.fc "
                             "(e.g. [256]) or dropout: 0")
        return self


class StrategyConfig(BaseModel):
    """`name` plus the strategy's own settings, validated by that strategy's Params model."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    name: str = "finetune"

    def settings(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ControllerConfig(BaseModel):
    """`name` plus the controller's own settings, validated by that controller."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    name: str = "random"

    def settings(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class SearchBudget(_Section):
    """How much an architecture search may spend (see docs/search.md)."""

    generations: int = Field(2, ge=1)
    trials: int | None = Field(None, ge=1)  # trained children in all (None: children x gens)
    max_params: int | None = Field(None, ge=1)  # no child above this many parameters
    wall_time_s: float | None = Field(None, gt=0)  # no generation starts after this


class SearchConfig(_Section):
    """`growth search`: which task, which controller over which space, budget, resources."""

    task: int = Field(0, ge=0)  # index of the stream's task to search on
    controller: ControllerConfig = Field(default_factory=ControllerConfig)
    space: dict[str, Any] = Field(default_factory=dict)  # see growth.search_spaces.make_space
    children: int = Field(4, ge=1)  # children per generation
    parent: Literal["best", "fixed"] = "best"  # the next generation grows the best so far
    base_epochs: int | None = Field(None, ge=0)  # training of the base (default train.epochs)
    epochs: int | None = Field(None, ge=1)  # training of each child (default train.epochs)
    lr_scale: float = Field(0.5, gt=0)  # children's learning rate: train.lr x this
    schedule: Literal["constant", "cosine"] = "cosine"  # children's learning-rate schedule
    margin: float = Field(0.0, ge=0, le=1)  # a child replaces its parent only above this
    backend: Literal["auto", "local", "ray", "tune"] = "auto"  # growth.searching.SearchSettings
    budget: SearchBudget = Field(default_factory=SearchBudget)
    concurrency: int = Field(2, ge=1)  # trials at once
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0)
    max_failures: int = Field(1, ge=0)  # retries when a trial's process or node fails
    ray_address: str | None = None  # join this cluster (default: start a local Ray)
    storage: str | None = None  # Tune storage: a shared path or URI for multi-node clusters


class TuneRange(_Section):
    """The values one tuned key may take: exactly one of a grid (every value is tried), a
    choice (values drawn at random), or a uniform or log-uniform interval [low, high]."""

    grid: list[Any] | None = Field(None, min_length=1)
    choice: list[Any] | None = Field(None, min_length=1)
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    integer: bool = False  # round values drawn from an interval to integers

    @model_validator(mode="after")
    def _one_kind(self) -> TuneRange:
        kinds = [k for k in ("grid", "choice", "uniform", "loguniform")
                 if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of grid, choice, uniform, loguniform"
                             + (f" (got {', '.join(kinds)})" if kinds else ""))
        interval = self.uniform or self.loguniform
        if interval is not None and not interval[0] < interval[1]:
            raise ValueError(f"an interval is [low, high] with low < high, got "
                             f"{list(interval)}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("a loguniform interval needs low > 0")
        if self.integer and interval is None:
            raise ValueError("integer applies to uniform and loguniform intervals")
        return self

    @property
    def sampled(self) -> bool:
        return self.grid is None


class TuneConfig(_Section):
    """`growth tune`: which settings to try, how each trial is scored, resources (see
    docs/tuning.md)."""

    space: dict[str, TuneRange] = Field(min_length=1)  # dotted config key -> its range
    trials: int | None = Field(None, ge=1)  # settings tried in all (default: see docs)
    include_default: bool = True  # the config's own values are a trial (t000)
    seeds: list[int] | None = Field(None, min_length=1)  # each trial's campaigns (None: seed)
    protocol: Literal["stream", "first_tasks"] = "stream"  # what a trial learns and is scored on
    first_tasks: int | None = Field(None, ge=1)  # protocol first_tasks: how many
    scheduler: Literal["fifo", "asha"] = "fifo"  # asha stops poor trials after a few tasks
    grace_tasks: int = Field(1, ge=1)  # asha: tasks every trial learns before it may stop
    reduction_factor: float = Field(2.0, gt=1)  # asha: 1 / the share of trials kept per rung
    concurrency: int = Field(2, ge=1)  # trials at once
    cpus_per_trial: float = Field(1.0, gt=0)  # also each trial's torch threads
    max_failures: int = Field(1, ge=0)  # retries when a trial's process or node fails
    sample_seed: int = 0  # seed of the values drawn (the trials' campaigns use `seeds`)
    presets: str | None = None  # also write the preset into this folder (relative to the file)
    ray_address: str | None = None  # join this cluster (default: start a local Ray)

    @model_validator(mode="after")
    def _protocol_keys(self) -> TuneConfig:
        if self.protocol == "first_tasks" and self.first_tasks is None:
            raise ValueError("protocol: first_tasks needs first_tasks: k (the tasks each trial "
                             "learns and is scored on)")
        if self.protocol != "first_tasks" and self.first_tasks is not None:
            raise ValueError("first_tasks applies only to protocol: first_tasks; remove it")
        if self.scheduler != "asha" and ("grace_tasks" in self.model_fields_set or
                                         "reduction_factor" in self.model_fields_set):
            raise ValueError("grace_tasks and reduction_factor apply only to scheduler: asha")
        return self


class CheckpointsConfig(_Section):
    """Which checkpoints a run keeps (growth.checkpoint). Retention changes no result, so a
    resume may change it."""

    keep: int | None = Field(None, ge=1)  # newest checkpoints kept (None: every task's)


class MLflowConfig(_Section):
    """An MLflow run per campaign (growth.tracking): `pip install 'growth[mlflow]'`."""

    # tracking URI: file:/abs/path, sqlite:///mlflow.db, http://host:5000; None: MLflow's own
    # default (MLFLOW_TRACKING_URI, else ./mlruns)
    uri: str | None = None
    experiment: str = Field("growth", min_length=1)
    run_name: str | None = None  # default: the config's name
    tags: dict[str, str] = Field(default_factory=dict)


class WandbConfig(_Section):
    """A Weights & Biases run per campaign (growth.tracking): `pip install 'growth[wandb]'`."""

    project: str = Field("growth", min_length=1)
    entity: str | None = None  # W&B team or user (default: the logged-in user's)
    mode: Literal["online", "offline", "disabled"] = "online"  # offline: `wandb sync` later
    dir: str | None = None  # where wandb writes (default: WANDB_DIR, else the run directory)
    group: str | None = None
    tags: list[str] = Field(default_factory=list)


class TrackingConfig(_Section):
    """Experiment trackers fed the same numbers as epochs.csv and metrics.json; tracking
    never changes results, so a resume may add or change trackers."""

    tensorboard: bool = False  # event files in RUNDIR/tensorboard (`pip install tensorboard`)
    mlflow: MLflowConfig | None = None  # `mlflow: {}` for MLflow's defaults
    wandb: WandbConfig | None = None  # `wandb: {mode: offline}` ...
    artifacts: bool = True  # MLflow/W&B: upload the run's files and report/ when it finishes

    @model_validator(mode="before")
    @classmethod
    def _switches(cls, data: Any) -> Any:
        """`mlflow: true` is `mlflow: {}`; `mlflow: false` turns it off."""
        if isinstance(data, dict):
            data = dict(data)
            for key in ("mlflow", "wandb"):
                if data.get(key) is True:
                    data[key] = {}
                elif data.get(key) is False:
                    data[key] = None
        return data

    @property
    def enabled(self) -> list[str]:
        """The trackers switched on, by name."""
        return [name for name, on in (("tensorboard", self.tensorboard),
                                      ("mlflow", self.mlflow is not None),
                                      ("wandb", self.wandb is not None)) if on]


class Config(_Section):
    name: str = "run"
    seed: int = 0
    scenario: Literal["task", "class", "domain"] = "task"  # growth.scenarios
    device: str = Field("cpu", pattern=DEVICE_PATTERN)  # cpu | cuda | cuda:N | auto
    threads: int | None = Field(None, ge=1)
    allow_large: bool = False  # lift the upper bounds in LIMITS (for the brave)
    # TensorBoard, MLflow, W&B (the old top-level `tensorboard: bool` is read as
    # tracking.tensorboard, see _migrate)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    evaluate_on: Literal["test", "val"] = "test"  # val: R on validation splits, test never read
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    search: SearchConfig | None = None  # architecture search (`growth search`)
    tune: TuneConfig | None = None  # a search over settings (`growth tune`)
    checkpoints: CheckpointsConfig = Field(default_factory=CheckpointsConfig)
    _source: str = PrivateAttr("<config>")

    @property
    def source(self) -> str:
        """Where the config came from (its file), for error messages."""
        return self._source

    def to_dict(self) -> dict[str, Any]:
        """The resolved config, as it is written to a run directory: keys that do not apply
        to the chosen stream/model/optimizer are left out, so reading it back is valid (and
        there is no `search` or `tune` key unless the config has that section)."""
        data = self.model_dump(mode="json", by_alias=True)
        for section, key, _why in _inapplicable(self, only_set=False):
            data[section].pop(key, None)
        for section in ("search", "tune"):
            if data.get(section) is None:
                data.pop(section, None)
        if "tune" in data:  # as written: keys that apply only, each range by its one kind
            tune = data["tune"]
            if tune["scheduler"] != "asha":
                tune.pop("grace_tasks")
                tune.pop("reduction_factor")
            if tune["first_tasks"] is None:
                tune.pop("first_tasks")
            tune["space"] = {k: {kind: v for kind, v in spec.items()
                                 if v is not None and (kind != "integer" or v)}
                             for k, spec in tune["space"].items()}
        for section, key, default in QUIET_DEFAULTS:
            if data[section].get(key) == default:
                data[section].pop(key, None)
        if data.get("evaluate_on") == "test":  # a key added later, as QUIET_DEFAULTS' keys
            data.pop("evaluate_on", None)
        return data


# ---- which keys apply when (a key set where it does not apply is an error) -----------------
# section -> key -> (selector key in the same section, the selector values it applies to)
APPLIES: dict[str, dict[str, tuple[str, tuple[str, ...]]]] = {
    "data": {
        "variations": ("stream", ("variations",)),
        "by": ("stream", ("split",)),
        "class_order": ("stream", ("split",)),
        "image_size": ("dataset", ("cub200", "imagefolder")),
        "download": ("dataset", ("mnist", "fashion_mnist", "cifar10", "cifar100")),
        "root": ("dataset", tuple(d for d in DATASETS if d != "digits")),
        "split_seed": ("dataset", ("digits", "imagefolder")),
        "load": ("dataset", ("cub200", "imagefolder")),
        "workers": ("dataset", ("cub200", "imagefolder")),
        "factory": ("dataset", ("python",)),
        "args": ("dataset", ("python",)),
        "stream": ("dataset", DATASETS),
    },
    "model": {
        "hidden": ("kind", ("mlp",)),
        "channels": ("kind", ("cnn",)),
        "fc": ("kind", ("cnn",)),
        "activation": ("kind", ("mlp", "cnn")),
        "batchnorm": ("kind", ("mlp", "cnn")),
        "dropout": ("kind", ("mlp", "cnn")),
        "arch": ("kind", ("torchvision",)),
        "weights": ("kind", ("torchvision",)),
        **{k: ("kind", ("vit",)) for k in ("patch", "dim", "depth", "heads", "mlp_dim")},
        "factory": ("kind", ("python",)),
        "args": ("kind", ("python",)),
        "output": ("kind", ("python",)),
    },
    "train": {
        "momentum": ("optimizer", ("sgd",)),
        "milestones": ("schedule", ("step",)),
        "gamma": ("schedule", ("step",)),
    },
}

# keys added after runs were started, written to a run's config only when set away from their
# default, so that those runs still resume (a resume compares the config with the checkpoint's)
QUIET_DEFAULTS: tuple[tuple[str, str, Any], ...] = (("train", "warmup_epochs", 0),
                                                    ("data", "order", None))

# dotted key -> largest value accepted without `allow_large: true`; for a list, every entry
# is bounded, and "key#" bounds its length
LIMITS: dict[str, int] = {
    "threads": 256,
    "data.n_tasks": 100,
    "data.image_size": 1024,
    "data.workers": 64,
    "model.hidden": 65_536,
    "model.hidden#": 64,
    "model.channels": 8_192,
    "model.channels#": 32,
    "model.fc": 65_536,
    "model.fc#": 64,
    "model.patch": 256,
    "model.dim": 8_192,
    "model.depth": 64,
    "model.heads": 256,
    "model.mlp_dim": 65_536,
    "train.epochs": 10_000,
    "train.batch_size": 65_536,
}


# ---- reading --------------------------------------------------------------------------------
def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read, override and validate a config file; every problem is a ConfigError."""
    path = Path(path)
    source = str(path)
    raw = parse_yaml(read_config_text(path), source)
    if raw is None:
        raise ConfigError(f"{source}: the config is empty; a minimal one:\n{MINIMAL_EXAMPLE}")
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got "
                          f"{_type_name(raw)}; a minimal config:\n{MINIMAL_EXAMPLE}")
    origins: dict[str, str] = {}
    for item in overrides or []:
        origins[apply_override(raw, item)] = item
    return validate_config(raw, source, origins)


def read_config_text(path: Path) -> str:
    """The file's text; a folder, a missing, unreadable, huge or non-UTF-8 file is an error."""
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not a config file; pass a YAML file such as "
                          "experiments/quickstart.yaml")
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {size:,} bytes is too large for a config (limit "
                              f"{MAX_CONFIG_BYTES:,}); is this the right file?")
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config ({exc.strerror})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} on line "
                          f"{line}); save the file as UTF-8") from None


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of keeping the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, f"a key must be a name, got {key!r}", key_node.start_mark
                ) from None
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {first})",
                    key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text within the depth and size limits; errors name `source` and the line."""
    try:
        _check_shape(yaml.parse(text, Loader=yaml.SafeLoader), source)
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)
    except yaml.MarkedYAMLError as exc:
        raise ConfigError(f"{source}: {_yaml_problem(exc)}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML ({exc})") from None
    _count_values(data, source)
    return data


def _check_shape(events: Iterator[yaml.Event], source: str) -> None:
    """Refuse deep nesting before the (recursive) composer sees it."""
    depth = 0
    for event in events:
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                line = event.start_mark.line + 1
                raise ConfigError(f"{source}: line {line}: nested deeper than {MAX_DEPTH} "
                                  "levels; a config is a few levels of sections")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def _count_values(data: Any, source: str) -> None:
    """Refuse alias bombs: count values as validation would walk them, stop past the limit."""
    stack, count = [data], 0
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise ConfigError(f"{source}: more than {MAX_NODES:,} values (after expanding YAML "
                              "aliases); a config is a page of keys")
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _yaml_problem(exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    what = exc.problem or exc.context or "not valid YAML"
    if exc.context and exc.problem:
        what = f"{exc.problem} ({exc.context})"
    return f"{where}{what}"


def apply_override(raw: dict[str, Any], item: str) -> str:
    """Apply one `dotted.key=value` (value parsed as YAML) to a raw config dict.

    Returns the dotted key. A value that is not valid YAML is an error (quote a string that
    holds YAML syntax, e.g. --set "name='[draft'").
    """
    key, sep, text = item.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not key or not all(p.strip() for p in parts):
        raise ConfigError(f"--set {item!r}: expected key=value with a dotted key, e.g. "
                          "train.epochs=3")
    value = parse_yaml(text, f"--set {item!r}: the value")
    node = raw
    for k, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: k + 1])
            raise ConfigError(f"--set {item!r}: {where} is not a section")
        node = child
    node[parts[-1]] = value
    return key


# ---- validation -----------------------------------------------------------------------------
def validate_config(raw: dict[str, Any], source: str = "<config>",
                    origins: dict[str, str] | None = None) -> Config:
    """Validate a raw dict: types and ranges, the strategy's own settings, which keys apply,
    and the upper bounds. `origins` maps dotted keys to the `--set` item that gave them."""
    where = _Where(source, dict(origins or {}))
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got "
                          f"{_type_name(raw)}")
    if not raw:
        raise ConfigError(f"{source}: the config is empty; a minimal one:\n{MINIMAL_EXAMPLE}")
    problems = list(_raw_problems(raw, where))
    if problems:
        raise ConfigError(_cap(problems))
    raw = _migrate(raw, where)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_cap(_describe(exc, where))) from None
    problems = [*_name_problems(cfg, where), *_strategy_problems(cfg, where),
                *_growth_search_problems(cfg, where), *_applicability_problems(cfg, where),
                *_limit_problems(cfg, where), *_scenario_problems(cfg, where),
                *_feature_problems(cfg, where), *_factory_problems(cfg, where)]
    if problems:
        raise ConfigError(_cap(problems))
    cfg._source = source
    return cfg


def _migrate(raw: dict[str, Any], where: _Where) -> dict[str, Any]:
    """Keys of older configs in their new place: `tensorboard: bool` (top level, what run
    directories started before `tracking:` hold) becomes tracking.tensorboard."""
    if "tensorboard" not in raw:
        return raw
    raw = dict(raw)
    value = raw.pop("tensorboard")
    tracking = raw.get("tracking")
    if tracking is None:
        tracking = {}
    if not isinstance(tracking, dict):
        return {**raw, "tracking": tracking}  # validation names the bad section
    if "tensorboard" in tracking:
        raise ConfigError(f"{where('tensorboard')}: tensorboard: set twice, at the top level "
                          "and as tracking.tensorboard; keep only tracking.tensorboard")
    raw["tracking"] = {**tracking, "tensorboard": value}
    if "tensorboard" in where.origins:
        where.origins["tracking.tensorboard"] = where.origins["tensorboard"]
    return raw


class _Where:
    """Names the origin of a dotted key: the `--set` item that set it, else the file."""

    def __init__(self, source: str, origins: dict[str, str]) -> None:
        self.source, self.origins = source, origins

    def __call__(self, key: str) -> str:
        parts = key.split(".")
        for k in range(len(parts), 0, -1):
            item = self.origins.get(".".join(parts[:k]))
            if item is not None:
                return f"--set {item!r}"
        return self.source


def _raw_problems(raw: Any, where: _Where, prefix: str = "") -> Iterator[str]:
    """Keys that are not names and numbers that are not finite, anywhere in the tree."""
    if isinstance(raw, dict):
        for k, v in raw.items():
            key = f"{prefix}{k}"
            if not isinstance(k, str):
                yield f"{where(prefix.rstrip('.') or key)}: key {k!r} in " \
                      f"{prefix.rstrip('.') or 'the top level'} is not a name"
                continue
            yield from _raw_problems(v, where, f"{key}.")
    elif isinstance(raw, list):
        for i, v in enumerate(raw):
            yield from _raw_problems(v, where, f"{prefix.rstrip('.')}[{i}].")
    elif isinstance(raw, float) and not math.isfinite(raw):
        key = prefix.rstrip(".")
        yield f"{where(key)}: {key}: {raw} is not a finite number"


def _describe(exc: ValidationError, where: _Where, prefix: str = "",
              strategy: str | None = None) -> list[str]:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        if err["type"] == "extra_forbidden":
            hint = "check the spelling" if strategy is None else \
                f"not a setting of strategy {strategy!r}; see `growth strategies list`"
            lines.append(f"{where(key)}: unknown key {key!r} ({hint})")
        else:
            got = err.get("input")
            shown = "" if isinstance(got, (dict, list)) else f" (got {_short(got)})"
            lines.append(f"{where(key)}: {key}: {err['msg']}{shown}")
    return lines


def _name_problems(cfg: Config, where: _Where) -> list[str]:
    """The run's name names folders (a search's storage, a comparison's runs): a plain name."""
    problem = name_problem(cfg.name)
    return [] if problem is None else [f"{where('name')}: name: {problem}"]


def _strategy_problems(cfg: Config, where: _Where) -> list[str]:
    from growth.strategies import available_strategies

    name = cfg.strategy.name
    strategies = available_strategies()
    if name not in strategies:
        return [f"{where('strategy.name')}: strategy.name: unknown strategy {name!r}; "
                f"available: {sorted(strategies)}"]
    try:
        params = strategies[name].Params.model_validate(cfg.strategy.settings())
    except ValidationError as exc:
        return _describe(exc, where, prefix="strategy", strategy=name)
    return _search_problems(cfg, params, where)


def _search_problems(cfg: Config, params: BaseModel, where: _Where) -> list[str]:
    """A strategy's search sections (growth.searching.SearchSettings): the controller and its
    own settings, which only the controllers know how to check, and the validation split a
    search chooses its children on."""
    from growth.controllers.service import check_search_settings
    from growth.searching import SearchSettings

    problems = []
    for key in type(params).model_fields:
        value = getattr(params, key)
        if isinstance(value, SearchSettings) and value.enabled:
            try:
                check_search_settings(value, f"strategy.{key}")
            except ConfigError as exc:
                problems += [f"{where(f'strategy.{key}')}: {line}"
                             for line in str(exc).splitlines()]
            problems += _validation_problems(cfg, where, f"strategy.{key}")
    return problems


def _validation_problems(cfg: Config, where: _Where, searching: str) -> list[str]:
    """A search ranks children by their validation accuracy: without a validation split
    every child would fail, and the run would end as if no search had been asked for."""
    if cfg.data.val_fraction > 0:
        return []
    return [f"{where('data.val_fraction')}: data.val_fraction: 0 leaves no validation split, "
            f"but {searching} chooses children on validation accuracy; set it above 0 (e.g. "
            f"0.1){' or ' + searching + '.enabled: false' if searching != 'search' else ''}"]


def _inapplicable(cfg: Config, only_set: bool = True) -> Iterator[tuple[str, str, str]]:
    """(section, key, reason) of every key set where it has no effect."""
    for section, rules in APPLIES.items():
        model = getattr(cfg, section)
        for key, (selector, values) in rules.items():
            if only_set and key not in model.model_fields_set:
                continue
            chosen = getattr(model, selector)
            if chosen not in values:
                yield section, key, (f"applies only to {section}.{selector}: "
                                     f"{' | '.join(values)}, not {chosen}")


def _applicability_problems(cfg: Config, where: _Where) -> list[str]:
    return [f"{where(f'{s}.{k}')}: {s}.{k}: {why}; remove the key"
            for s, k, why in _inapplicable(cfg)]


def _limit_problems(cfg: Config, where: _Where) -> list[str]:
    if cfg.allow_large:
        return []
    data, out = cfg.model_dump(), []
    for dotted, limit in LIMITS.items():
        key = dotted.rstrip("#")
        value: Any = data
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is None:
            continue
        if dotted.endswith("#"):
            over = f"{len(value)} entries" if len(value) > limit else None
        else:
            big = [v for v in (value if isinstance(value, list) else [value]) if v > limit]
            over = f"{big[0]:,}" if big else None
        if over:
            out.append(f"{where(key)}: {key}: {over} is above the limit of {limit:,}; "
                       "set allow_large: true to go beyond")
    return out


def _growth_search_problems(cfg: Config, where: _Where) -> list[str]:
    """A `growth search` config (a `search:` section) needs a validation split too."""
    return [] if cfg.search is None else _validation_problems(cfg, where, "search")


def _scenario_problems(cfg: Config, where: _Where) -> list[str]:
    if cfg.scenario == "class" and cfg.data.stream != "split" and cfg.data.dataset != "python":
        return [f"{where('scenario')}: scenario: class needs data.stream: split (disjoint "
                "classes); use scenario: task for permuted or variations streams"]
    return []


def _feature_problems(cfg: Config, where: _Where) -> list[str]:
    """Optional packages a config asks for, checked before anything runs."""
    from importlib.util import find_spec

    out = []
    for name in cfg.tracking.enabled:
        if find_spec(name) is None:
            key = f"tracking.{name}"
            out.append(f"{where(key)}: {key} needs the {name} package; pip install "
                       f"'growth[{name}]' or remove {key}")
    return out


def _factory_problems(cfg: Config, where: _Where) -> list[str]:
    """A user's model or data function must import (it is called when the campaign starts)."""
    from growth.plugins import load_factory

    out = []
    for key, spec, on in (("model.factory", cfg.model.factory, cfg.model.kind == "python"),
                          ("data.factory", cfg.data.factory, cfg.data.dataset == "python")):
        if on and spec is not None:
            try:
                load_factory(spec, key)
            except ConfigError as exc:
                out.append(f"{where(key)}: {exc}")
    return out


def _cap(problems: list[str]) -> str:
    shown = problems[:MAX_PROBLEMS]
    if len(problems) > MAX_PROBLEMS:
        shown.append(f"... and {len(problems) - MAX_PROBLEMS:,} more problems")
    return "\n".join(shown)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= MAX_SHOWN else f"{text[:MAX_SHOWN]}... ({len(text):,} chars)"


def _type_name(value: Any) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number",
            bool: "a boolean"}.get(type(value), type(value).__name__)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True)
