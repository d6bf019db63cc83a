"""What a strategy's saved state must look like, declared by the strategy itself.

A checkpoint is data from disk. Before a strategy loads its tensors they are matched against
its declaration (`Strategy.state_spec`) and the graph they go with, so a foreign, truncated or
retyped strategy file is refused by name instead of silently changing the method.

Keys are "<what>/<slot>/<parameter>". A declaration maps each `what` to a TensorSpec:
- slots="tasks": one slot per finished task, named by its index; every finished task has one.
  slots=("all",) or ("latest",) ...: fixed slot names, each present once a task has finished.
- shape="same": the parameter's shape; "within": as many dims, none larger (state stored when
  the parameter was smaller: growth adds units after it); "any".
- dtype: "float" (any floating precision, values finite), "bool", "int", or "any".
- parameter=True: the last part names a tensor of the graph (`node.tensor`); False: free text.
- required=False: fixed slots that may be absent (state a strategy keeps only once it has
  something to keep, e.g. REC's controller after its first search).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

_DTYPES = {
    "float": lambda t: t.is_floating_point(),
    "bool": lambda t: t.dtype == torch.bool,
    "int": lambda t: not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool,
    "any": lambda t: True,
}


@dataclass(frozen=True)
class TensorSpec:
    """The tensors a strategy stores under one `what` (see the module docstring)."""

    slots: Literal["tasks"] | tuple[str, ...] = "tasks"
    shape: Literal["same", "within", "any"] = "within"
    dtype: Literal["float", "bool", "int", "any"] = "float"
    parameter: bool = True
    required: bool = True


def check_tensors(spec: Mapping[str, TensorSpec], tensors: Mapping[str, torch.Tensor],
                  graph_tensors: Mapping[str, torch.Tensor], finished: int,
                  strategy: str) -> list[str]:
    """Problems of `tensors` against `spec` after `finished` tasks (empty: they fit)."""
    problems: list[str] = []
    seen: set[tuple[str, str]] = set()
    for key in sorted(tensors):
        what, slot, name = (key.split("/", 2) + ["", ""])[:3]
        rule = spec.get(what)
        if rule is None:
            stores = f"stores only {sorted(spec)}" if spec else "stores no tensors"
            problems.append(f"tensor {key!r} does not belong to strategy {strategy!r} (it "
                            f"{stores}); is this another run's or another strategy's file?")
            continue
        problems += _check_one(key, slot, name, rule, tensors[key], graph_tensors, finished)
        seen.add((what, slot))
    for what, rule in spec.items():
        slots = [str(k) for k in range(finished)] if rule.slots == "tasks" else \
            (list(rule.slots) if finished and rule.required else [])
        missing = [s for s in slots if (what, s) not in seen]
        if missing:
            problems.append(f"no {what!r} tensors for slot(s) {', '.join(missing)}: strategy "
                            f"{strategy!r} stores them after every finished task ({finished})")
    return problems


def _check_one(key: str, slot: str, name: str, rule: TensorSpec, t: torch.Tensor,
               graph_tensors: Mapping[str, torch.Tensor], finished: int) -> list[str]:
    if rule.slots == "tasks":
        if not (slot.isdigit() and int(slot) < finished):
            return [f"tensor {key!r}: slot {slot!r} is not a finished task (0..{finished - 1})"]
    elif slot not in rule.slots:
        return [f"tensor {key!r}: slot {slot!r} is not one of {list(rule.slots)}"]
    if not _DTYPES[rule.dtype](t):
        return [f"tensor {key!r} has dtype {t.dtype}, expected {rule.dtype}"]
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        return [f"tensor {key!r} holds NaN or infinite values"]
    if not rule.parameter:
        return []
    ref = graph_tensors.get(name)
    if ref is None:
        return [f"tensor {key!r} names {name!r}, which is not a tensor of the graph"]
    if rule.shape == "same" and tuple(t.shape) != tuple(ref.shape):
        return [f"tensor {key!r} has shape {tuple(t.shape)}, but {name} is {tuple(ref.shape)}"]
    if rule.shape == "within" and (t.dim() != ref.dim() or
                                   any(a > b for a, b in zip(t.shape, ref.shape))):
        return [f"tensor {key!r} has shape {tuple(t.shape)}, which does not fit in {name} "
                f"{tuple(ref.shape)}"]
    return []
