"""The operator registry: built-ins with descriptions, plug-ins from entry points."""

from __future__ import annotations

import importlib.metadata as md
import textwrap

import pytest
from graphgen import mlp

from growth import plugins as plugin_loader
from growth.errors import OperatorError
from growth.ops import Operator, OpResult, available_operators, get_operator, register
from growth.ops import registry as reg

PLUGIN = textwrap.dedent('''
    from growth.ops import ChangeRecord, Operator, OpResult

    def _same(graph, **kwargs):
        return OpResult(graph.copy(), ChangeRecord("identity_op", dict(kwargs)))

    IDENTITY = Operator("identity_op", "return a copy of the graph", _same)

    class Bare:
        name = "bare_op"
        description = "a plain callable with name and description"

        def __call__(self, graph, **kwargs):
            return OpResult(graph.copy(), ChangeRecord("bare_op"))

    BARE = Bare()
    NOT_AN_OP = 42
    IDENTITY_CLASH = Operator("net2wider", "takes a built-in's name", _same)

    class Nameless:
        description = "callable, but with no name"

        def __call__(self, graph):
            return OpResult(graph.copy(), ChangeRecord("nameless"))

    class Undescribed:
        name = "undescribed_op"

        def __call__(self, graph):
            return OpResult(graph.copy(), ChangeRecord("undescribed_op"))

    class Inert:
        name = "inert_op"
        description = "a name and a description, but nothing to call"

    NAMELESS, UNDESCRIBED, INERT = Nameless(), Undescribed(), Inert()
''')


def test_builtins_are_listed_with_one_line_descriptions() -> None:
    ops = available_operators()
    assert {"net2wider", "net2deeper", "prune_units"} <= set(ops)
    for name in ("net2wider", "net2deeper", "prune_units"):
        op = ops[name]
        assert op.name == name and op.description and "\n" not in op.description


def test_get_operator_applies_the_builtin() -> None:
    result = get_operator("net2wider")(mlp(), node="l1", width=6)
    assert isinstance(result, OpResult) and result.graph.shape("l1") == (6,)
    assert result.record.op == "net2wider"


def install(tmp_path, monkeypatch, entries: list[tuple[str, str]]) -> list[dict]:
    """Entry points `entries` (name, "module:attr") of the operator group, over PLUGIN; returns
    the keyword arguments each lookup was made with."""
    (tmp_path / "fake_growth_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [md.EntryPoint(name, value, reg.ENTRY_POINT_GROUP) for name, value in entries]
    seen = []

    def entry_points(**kwargs):
        seen.append(kwargs)
        return [ep for ep in eps if ep.group == kwargs.get("group")]

    monkeypatch.setattr(plugin_loader.metadata, "entry_points", entry_points)
    return seen


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    return install(tmp_path, monkeypatch, [
        ("identity", "fake_growth_plugin:IDENTITY"),
        ("bare", "fake_growth_plugin:BARE"),
        ("wrong", "fake_growth_plugin:NOT_AN_OP"),
        ("missing", "no_such_module_anywhere:OP"),
        ("clash", "fake_growth_plugin:IDENTITY_CLASH"),
    ])


def test_entry_point_plugins_show_up_and_broken_ones_only_warn(plugins) -> None:
    with pytest.warns(RuntimeWarning) as caught:
        ops = available_operators()
    assert plugins == [{"group": "growth.ops"}]
    assert ops["identity_op"].description == "return a copy of the graph"
    assert ops["bare_op"].description.startswith("a plain callable")
    assert {"net2wider", "net2deeper", "prune_units"} <= set(ops)
    messages = " ".join(str(w.message) for w in caught)
    for broken in ("'wrong'", "'missing'", "'clash'"):
        assert broken in messages
    g = mlp()
    with pytest.warns(RuntimeWarning):
        assert get_operator("bare_op")(g).record.op == "bare_op"


def test_register_refuses_a_taken_name_unless_replaced() -> None:
    op = Operator("net2wider", "impostor", lambda graph: None)
    with pytest.raises(OperatorError, match="already registered"):
        register(op)
    with pytest.raises(OperatorError, match="Operator"):
        register(lambda graph: None)  # type: ignore[arg-type]
    original = get_operator("net2wider")
    try:
        register(op, replace=True)
        assert get_operator("net2wider") is op
    finally:
        register(original, replace=True)


@pytest.mark.parametrize("attr", ["NOT_AN_OP", "NAMELESS", "UNDESCRIBED", "INERT"])
def test_a_plugin_needs_a_callable_with_a_name_and_a_description(tmp_path, monkeypatch, attr):
    install(tmp_path, monkeypatch, [("odd", f"fake_growth_plugin:{attr}")])
    with pytest.warns(RuntimeWarning) as caught:
        ops = available_operators()
    assert set(ops) == set(reg._BUILTIN)  # skipped: none of them is an operator
    (warning,) = caught
    assert str(warning.message) == (
        f"growth.ops plug-in 'odd' (fake_growth_plugin:{attr}) could not be loaded: TypeError: "
        f"odd = fake_growth_plugin:{attr} is neither an Operator nor a callable with str `name` "
        "and `description` attributes")
