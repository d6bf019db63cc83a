"""Operator registry: built-in growth operators plus plug-ins from the "growth.ops" entry points.

An operator is a pure function `graph -> OpResult`. The result carries a `ChangeRecord` that says
exactly which tensors changed and how their entries map back to the parent's, so optimizer state,
masks and regularisers can follow a change without comparing graphs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from growth.errors import OperatorError
from growth.graph import NetGraph
from growth.plugins import load_plugins

ENTRY_POINT_GROUP = "growth.ops"
TensorShape = tuple[int, ...]


@dataclass(frozen=True)
class ChangeRecord:
    """What one operator did to a graph.

    resized: "node.tensor" -> (old shape, new shape).
    index_maps: for each resized tensor, per resized dim, the old position each new position was
    copied from (-1 for a fresh entry).
    divisors: for a resized tensor and dim whose copied entries were also divided (Net2Wider's
    consumer columns: by the number of copies of their unit), the divisor of each new position;
    a dim not listed was copied unscaled (divisor 1). Stored as divisors, not scales, so that
    whatever follows the change (anchors, optimizer state) reproduces the operator's arithmetic
    bit for bit. `growth.remap` turns a record into the transform of any per-parameter tensor.
    added / removed: tensor names that appeared / disappeared; added_nodes / removed_nodes alike.
    """

    op: str
    params: dict[str, Any] = field(default_factory=dict)
    resized: dict[str, tuple[TensorShape, TensorShape]] = field(default_factory=dict)
    index_maps: dict[str, dict[int, list[int]]] = field(default_factory=dict)
    divisors: dict[str, dict[int, list[float]]] = field(default_factory=dict)
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    added_nodes: list[str] = field(default_factory=list)
    removed_nodes: list[str] = field(default_factory=list)

    @property
    def is_noop(self) -> bool:
        return not (self.resized or self.added or self.removed or self.added_nodes
                    or self.removed_nodes)


@dataclass(frozen=True)
class OpResult:
    """A new graph and the record of how it differs from the operator's input."""

    graph: NetGraph
    record: ChangeRecord


ROLES = ("wider", "deeper")  # the calls a search space makes (growth.search_spaces.space)


@dataclass(frozen=True)
class Operator:
    """A named growth operator; calling it applies `fn` to a graph.

    role: how a search space may call it (`space.operators`): "wider" as
    `fn(graph, node=..., width=..., seed=...)` (widen a layer to `width` units), "deeper" as
    `fn(graph, after=..., kernel_size=..., seed=...)` (insert a layer after a node;
    `kernel_size` only on image maps); None: not for search spaces (strategies and scripts
    still call it by name)."""

    name: str
    description: str
    fn: Callable[..., OpResult]
    role: str | None = None

    def __post_init__(self) -> None:
        if self.role is not None and self.role not in ROLES:
            raise OperatorError(f"operator {self.name!r}: role must be one of {ROLES} or None, "
                                f"got {self.role!r}")

    def __call__(self, graph: NetGraph, *args: Any, **kwargs: Any) -> OpResult:
        return self.fn(graph, *args, **kwargs)


_BUILTIN: dict[str, Operator] = {}


def register(op: Operator, *, replace: bool = False) -> Operator:
    """Make `op` available by name; a name already taken by another operator needs replace=True."""
    if not isinstance(op, Operator):
        raise OperatorError(f"register() takes an Operator, got {type(op).__name__}; wrap your "
                            "function as Operator(name, description, fn)")
    old = _BUILTIN.get(op.name)
    if old is not None and old != op and not replace:
        raise OperatorError(f"an operator named {op.name!r} is already registered; pick another "
                            "name or pass replace=True")
    _BUILTIN[op.name] = op
    return op


def _as_operator(obj: Any, entry: str) -> Operator:
    if isinstance(obj, Operator):
        return obj
    name, desc = getattr(obj, "name", None), getattr(obj, "description", None)
    if callable(obj) and isinstance(name, str) and isinstance(desc, str):
        return Operator(name, desc, obj, getattr(obj, "role", None))
    raise TypeError(f"{entry} is neither an Operator nor a callable with str `name` and "
                    "`description` attributes")


def _plugins() -> dict[str, Operator]:
    """Operators from installed distributions; a broken plug-in warns and is skipped."""
    return load_plugins(ENTRY_POINT_GROUP, _as_operator, _BUILTIN)


def available_operators() -> dict[str, Operator]:
    """Every operator by name: the built-ins, then installed plug-ins."""
    return {**_BUILTIN, **_plugins()}


def is_builtin(name: str) -> bool:
    """True for operators registered in this process (built-ins, `register` calls); False for
    those found through the "growth.ops" entry points of installed distributions."""
    return name in _BUILTIN


def get_operator(name: str) -> Operator:
    """The operator called `name`, or an OperatorError listing the available ones."""
    if name in _BUILTIN:
        return _BUILTIN[name]
    ops = available_operators()
    if name not in ops:
        raise OperatorError(f"unknown operator {name!r}; available operators: {sorted(ops)}")
    return ops[name]
