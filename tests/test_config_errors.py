"""Malformed configs, table-driven: each is exit 2, one clean message that names the file (or
the --set item) and the key, no traceback, nothing written, the config file unchanged."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from runfiles import TINY

from growth.cli import main
from growth.config import MAX_PROBLEMS, load_config
from growth.errors import ConfigError


def dump(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)


def tiny(**changes: object) -> str:
    """TINY with `section__key=value` changes; value None removes the key."""
    cfg = yaml.safe_load(dump(TINY))
    for key, value in changes.items():
        node = cfg
        *parents, last = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return dump(cfg)


def nested(depth: int) -> str:
    return "name: deep\nx: " + "[" * depth + "]" * depth + "\n"


ALIAS_BOMB = "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n"
    for p, c in zip("abcdefg", "bcdefgh")) + "name: bomb\n"


@dataclass
class Case:
    id: str
    text: str | bytes | None  # the config file's content; None: no file is written
    needles: tuple[str, ...]  # what the message must say (besides the file)
    sets: list[str] = field(default_factory=list)
    source: str = "file"  # what must be named: the file, or "--set"
    make: Callable[[Path], Path] | None = None  # builds the CONFIG argument instead


CASES = [
    # reading the file
    Case("not-utf8", b"name: caf\xe9\n", ("not UTF-8", "line 1")),
    Case("utf16", "name: x\n".encode("utf-16"), ("not UTF-8",)),
    Case("folder", None, ("is a folder",), make=lambda d: (d / "cfgdir").mkdir() or d / "cfgdir"),
    Case("missing", None, ("no such config file",), make=lambda d: d / "nope.yaml"),
    Case("too-large", "name: x\n" + "#" * (1 << 20) + "\n", ("too large",)),
    Case("empty", "", ("empty", "strategy: {name: ewc}")),
    Case("only-comments", "# nothing\n# here\n", ("empty", "minimal")),
    Case("top-list", "- a\n- b\n", ("mapping",)),
    Case("top-scalar", "hello\n", ("mapping",)),
    Case("deep-nesting", nested(3000), ("nested deeper",)),
    Case("alias-bomb", ALIAS_BOMB, ("more than",)),
    # YAML syntax
    Case("unclosed-bracket", "name: x\nmodel: {hidden: [1, 2\n", ("line",)),
    Case("tab-indent", "name: x\ndata:\n\tstream: split\n", ("line 3",)),
    Case("bad-mapping", "name: x\n  seed: 1\n", ("line 2",)),
    Case("duplicate-top", tiny() + "seed: 4\n", ("duplicate key 'seed'",)),
    Case("duplicate-nested", "name: x\ntrain:\n  lr: 0.1\n  lr: 0.2\n",
         ("duplicate key 'lr'", "line 4")),
    Case("non-string-key", "name: x\n1: 2\n", ("is not a name",)),
    Case("list-key", "name: x\n? [a, b]\n: 1\n", ("a key must be a name",)),
    # unknown keys and wrong types
    Case("unknown-top", tiny(sead=1), ("unknown key 'sead'",)),
    Case("unknown-data", tiny(data__strem="split"), ("unknown key 'data.strem'",)),
    Case("unknown-strategy-key", tiny(strategy={"name": "finetune", "lambda": 3}),
         ("unknown key 'strategy.lambda'", "not a setting of strategy 'finetune'")),
    Case("unknown-strategy", tiny(strategy={"name": "nope"}),
         ("strategy.name", "unknown strategy 'nope'")),
    Case("epochs-word", tiny(train__epochs="many"), ("train.epochs",)),
    Case("seed-float", tiny(seed=1.5), ("seed",)),
    Case("name-list", tiny(name=[1]), ("name",)),
    Case("data-string", tiny(data="digits"), ("data",)),
    Case("strategy-list", tiny(strategy=["ewc"]), ("strategy",)),
    Case("model-kind", tiny(model={"kind": "transformer"}), ("model.kind",)),
    Case("optimizer", tiny(train__optimizer="rmsprop"), ("train.optimizer",)),
    Case("device", tiny(device="tpu"), ("device",)),
    Case("ewc-mode", tiny(strategy={"name": "ewc", "mode": "weird"}), ("strategy.mode",)),
    Case("lambda-word", tiny(strategy={"name": "ewc", "lambda": "big"}), ("strategy.lambda",)),
    # ranges
    Case("threads-zero", tiny(threads=0), ("threads",)),
    Case("val-fraction", tiny(data__val_fraction=1.5), ("data.val_fraction",)),
    Case("dropout-one", tiny(model__dropout=1.0), ("model.dropout",)),
    Case("lr-negative", tiny(train__lr=-0.1), ("train.lr",)),
    Case("batch-zero", tiny(train__batch_size=0), ("train.batch_size",)),
    Case("hidden-negative", tiny(model__hidden=[-3]), ("model.hidden",)),
    Case("keep-zero", tiny(checkpoints={"keep": 0}), ("checkpoints.keep",)),
    Case("keep-word", tiny(checkpoints={"keep": "newest"}), ("checkpoints.keep",)),
    Case("checkpoints-typo", tiny(checkpoints={"kep": 2}), ("unknown key 'checkpoints.kep'",)),
    # non-finite numbers
    Case("lambda-inf", tiny(strategy={"name": "ewc"}).replace(
        "name: ewc", "name: ewc\n  lambda: .inf"), ("strategy.lambda", "not a finite number")),
    Case("beta-nan", tiny(strategy={"name": "mwc"}).replace(
        "name: mwc", "name: mwc\n  beta: .nan"), ("strategy.beta", "not a finite number")),
    Case("lr-inf", tiny().replace("lr: 0.05", "lr: .inf"), ("train.lr", "not a finite number")),
    Case("val-nan", tiny(data__val_fraction=0.1).replace("val_fraction: 0.1",
                                                         "val_fraction: .nan"),
         ("data.val_fraction",)),
    # keys that do not apply
    Case("variations-on-permuted", tiny(data__variations=["rotated"]),
         ("data.variations", "applies only to data.stream: variations")),
    Case("by-on-permuted", tiny(data__by="superclass"), ("data.by", "data.stream: split")),
    Case("order-on-permuted", tiny(data__class_order="shuffled"), ("data.class_order",)),
    Case("hidden-on-cnn", tiny(model={"kind": "cnn", "hidden": [8]}),
         ("model.hidden", "model.kind: mlp")),
    Case("channels-on-mlp", tiny(model={"kind": "mlp", "channels": [8]}), ("model.channels",)),
    Case("fc-on-mlp", tiny(model={"kind": "mlp", "fc": [8]}), ("model.fc",)),
    Case("momentum-on-adam", tiny(train__optimizer="adam", train__momentum=0.5),
         ("train.momentum", "train.optimizer: sgd")),
    Case("image-size-on-digits", tiny(data__image_size=32), ("data.image_size",)),
    Case("download-on-digits", tiny(data__download=True), ("data.download",)),
    Case("class-scenario-permuted", tiny(scenario="class"), ("scenario", "split")),
    # upper bounds
    Case("n-tasks-1000", tiny(data__n_tasks=1000), ("data.n_tasks", "allow_large: true")),
    Case("epochs-huge", tiny(train__epochs=100_000), ("train.epochs", "allow_large")),
    Case("width-huge", tiny(model__hidden=[10**6]), ("model.hidden", "1,000,000")),
    Case("depth-huge", tiny(model__hidden=[4] * 100), ("model.hidden", "100 entries")),
    # error output capped
    Case("5000-unknown-keys", "name: x\n" + "".join(f"k{i}: 1\n" for i in range(5000)),
         ("unknown key 'k0'", f"and {5000 - MAX_PROBLEMS:,} more problems")),
    # --set
    Case("set-nan", tiny(strategy={"name": "mwc"}), ("strategy.beta", "not a finite number"),
         sets=["strategy.beta=.nan"], source="--set 'strategy.beta=.nan'"),
    Case("set-bad-yaml", tiny(), ("line 1",), sets=["model.hidden=[1, 2"],
         source="--set 'model.hidden=[1, 2'"),
    Case("set-no-equals", tiny(), ("key=value",), sets=["train.epochs"], source="--set"),
    Case("set-empty-part", tiny(), ("dotted key",), sets=["train..lr=1"], source="--set"),
    Case("set-through-scalar", tiny(), ("seed is not a section",), sets=["seed.x=1"],
         source="--set"),
    Case("set-unknown", tiny(), ("unknown key 'train.epoch'",), sets=["train.epoch=3"],
         source="--set 'train.epoch=3'"),
    Case("set-duplicate", tiny(), ("duplicate key 'a'",), sets=["name={a: 1, a: 2}"],
         source="--set"),
    Case("set-inapplicable", tiny(), ("model.channels",), sets=["model.channels=[4]"],
         source="--set 'model.channels=[4]'"),
    # found when the data is built, still before anything is written
    Case("split-does-not-divide", tiny(data={"dataset": "digits", "stream": "split",
                                             "n_tasks": 7}), ("data:", "n_tasks=7")),
    Case("unknown-variation", tiny(data={"dataset": "digits", "stream": "variations",
                                         "variations": ["upside_down"]}),
         ("data:", "upside_down")),
    Case("mnist-missing", tiny(data={"dataset": "mnist", "stream": "permuted", "root": "{d}"}),
         ("data:", "download: true")),
    Case("cnn-pooled-away", tiny(model={"kind": "cnn", "channels": [4, 4, 4, 4]}),
         ("model:",)),
]


def test_the_table_is_big_enough() -> None:
    assert len(CASES) >= 50 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_config_is_one_clean_error(case: Case, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    if case.make is not None:
        config = case.make(tmp_path)
    else:
        config = tmp_path / "bad.yaml"
        text = case.text.replace("{d}", str(tmp_path / "data")) if isinstance(
            case.text, str) else case.text
        config.write_bytes(text.encode() if isinstance(text, str) else text)
    before = sorted(p.name for p in tmp_path.iterdir())
    digest = hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None
    out = tmp_path / "never"
    args = ["run", str(config), "--out", str(out), "--quiet"]
    for item in case.sets:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: ")
    assert len(err) < 2000, "error output must stay short"
    named = str(config) if case.source == "file" else case.source
    assert named in err, err
    for needle in case.needles:
        assert needle in err, err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if digest is not None:
        assert hashlib.sha256(config.read_bytes()).hexdigest() == digest


def test_allow_large_lifts_the_bounds(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text(tiny(data__n_tasks=1000, allow_large=True))
    assert load_config(path).data.n_tasks == 1000


def test_resolved_config_leaves_out_keys_that_do_not_apply(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(tiny(model={"kind": "cnn", "channels": [4]}))
    cfg = load_config(path)
    written = cfg.to_dict()
    assert "hidden" not in written["model"] and written["model"]["channels"] == [4]
    assert "variations" not in written["data"] and "by" not in written["data"]
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(written))
    assert load_config(again).to_dict() == written  # what a run directory holds reads back


def test_non_finite_values_from_python_are_refused_too() -> None:
    from growth.strategies import make_strategy

    with pytest.raises(Exception, match="finite"):
        make_strategy("ewc", {"lambda": math.inf})
    with pytest.raises(ConfigError, match="strategy.beta"):
        from growth.config import validate_config

        validate_config({"strategy": {"name": "mwc", "beta": math.nan}}, "api")
