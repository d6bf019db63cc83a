"""The generic node: a short list of torch calls replayed exactly as the model makes them.

Most calls of an imported network become node kinds the operators understand (linear, conv2d,
BatchNorm, permutes...). What no kind expresses, and where no growth rule is needed (attention
arithmetic, softmax, a permute that moves the batch dim, windows folded into the batch), is kept
as a `program` node: the calls, in order, from batch-first inputs to one batch-first output,
with the parameters and constants they read held as the node's own tensors. It computes exactly
what the model computes, since it makes the same calls on the same batched tensors.

A program is data (JSON): each call names its function from a fixed table (`FUNCTIONS`: torch
functions that are also tensor methods, plus joining and constructor functions, every function
of `torch.nn.functional`, `operator`, `math`; and tensor methods but those that move data off
the device, touch storage or run Python callables), and its arguments are constants or
references to the node's inputs (`{"input": i}`), its tensors (`{"tensor": name}`) and earlier
calls (`{"call": j}`); a device is the inputs' device and the dtype the model ran in is the
network's precision, both resolved when the program runs. Loading a graph never imports or runs
anything else.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from growth.errors import GraphError

_METHOD_DENY = frozenset({
    "apply_", "map_", "map2_", "backward", "register_hook", "register_post_accumulate_grad_hook",
    "record_stream", "set_", "share_memory_", "pin_memory", "storage", "untyped_storage",
    "storage_type", "storage_offset", "data_ptr", "const_data_ptr", "numpy", "tolist", "item",
    "cpu", "cuda", "to_mkldnn", "retain_grad", "requires_grad_", "resize_", "resize_as_",
    "detach_", "is_pinned", "is_shared", "type", "dim_order", "element_size", "nbytes",
})
_TORCH_EXTRA = ("cat", "concat", "concatenate", "stack", "hstack", "vstack", "einsum",
                "meshgrid", "zeros", "ones", "empty", "full", "arange", "linspace", "eye",
                "zeros_like", "ones_like", "empty_like", "full_like", "cdist", "broadcast_to",
                "tensordot", "cartesian_prod", "atan2", "clip", "scalar_tensor", "tensor_split")
_OPERATORS = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "matmul",
              "getitem", "and_", "or_", "xor", "invert", "eq", "ne", "lt", "le", "gt", "ge",
              "iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior",
              "abs", "not_", "truth")
_ATTRIBUTES = frozenset({"shape", "T", "mT", "dtype", "real"})


def setitem(x: torch.Tensor, index: Any, value: Any) -> torch.Tensor:
    """`x[index] = value`, returning the written tensor (a program's calls return values)."""
    x[index] = value
    return x


def attribute(x: Any, name: str) -> Any:
    """getattr, for the few tensor attributes a computation reads."""
    if name not in _ATTRIBUTES:
        raise GraphError(f"a program may read tensor attributes {sorted(_ATTRIBUTES)}, not "
                         f"{name!r}")
    return getattr(x, name)


def _table() -> dict[str, Callable[..., Any]]:
    out: dict[str, Callable[..., Any]] = {}
    methods = {n for n in dir(torch.Tensor) if not n.startswith("_") and n not in _METHOD_DENY
               and callable(getattr(torch.Tensor, n, None))}
    for n in sorted(methods):
        out[f"Tensor.{n}"] = getattr(torch.Tensor, n)
    for n in sorted(methods | set(_TORCH_EXTRA)):
        fn = getattr(torch, n, None)
        if callable(fn) and not isinstance(fn, type):
            out[f"torch.{n}"] = fn
    for n in dir(F):
        fn = getattr(F, n)
        if not n.startswith("_") and callable(fn) and not isinstance(fn, type) and getattr(
                fn, "__module__", "") in ("torch.nn.functional", "torch._C._nn", "torch"):
            out[f"torch.nn.functional.{n}"] = fn
    for n in _OPERATORS:
        out[f"operator.{n}"] = getattr(operator, n)
    for n in dir(math):
        if not n.startswith("_") and callable(getattr(math, n)):
            out[f"math.{n}"] = getattr(math, n)
    out["setitem"], out["getattr"] = setitem, attribute
    return out


FUNCTIONS: dict[str, Callable[..., Any]] = _table()
_NAMES: dict[Any, str] = {}
for _name, _fn in FUNCTIONS.items():
    if not _name.startswith("Tensor."):
        _NAMES.setdefault(_fn, _name)
_NAMES[operator.setitem], _NAMES[getattr] = "setitem", "getattr"
ELEMENTWISE = frozenset({
    "operator.add", "operator.sub", "operator.mul", "operator.truediv", "operator.neg",
    "operator.pow", "operator.iadd", "operator.isub", "operator.imul", "operator.itruediv",
    "Tensor.add", "Tensor.sub", "Tensor.mul", "Tensor.div", "Tensor.neg", "Tensor.pow",
    "Tensor.add_", "Tensor.sub_", "Tensor.mul_", "Tensor.div_", "Tensor.sigmoid",
    "Tensor.exp", "Tensor.tanh", "Tensor.abs", "Tensor.sqrt", "Tensor.clamp", "Tensor.float",
    "Tensor.to", "Tensor.type_as", "Tensor.contiguous", "Tensor.clone", "torch.sigmoid",
    "torch.exp", "torch.tanh", "torch.abs", "torch.sqrt", "torch.clamp", "torch.erf",
    "Tensor.erf", "torch.nn.functional.relu", "torch.nn.functional.gelu",
    "torch.nn.functional.silu", "torch.nn.functional.sigmoid", "torch.nn.functional.softplus",
    "torch.nn.functional.hardtanh", "torch.nn.functional.relu6",
})


def function_name(call: str, target: Any) -> str | None:
    """The table's name of an fx call target (None: not in the table)."""
    if call == "call_method":
        name = f"Tensor.{target}"
        return name if name in FUNCTIONS else None
    try:
        return _NAMES.get(target)
    except TypeError:  # unhashable target
        return None


def is_inplace(name: str) -> bool:
    """A call that writes into its first argument."""
    short = name.rsplit(".", 1)[-1]
    return name == "setitem" or (short.endswith("_") and not short.endswith("__")) or (
        name.startswith("operator.i") and name not in ("operator.invert",))


# ---- arguments as JSON ------------------------------------------------------------------------
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.int16,
    torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64)}
_FORMATS = {str(f).removeprefix("torch."): f for f in (
    torch.contiguous_format, torch.channels_last, torch.preserve_format)}


class Input:
    """Reference to the program's i-th input while encoding."""

    def __init__(self, index: int) -> None:
        self.index = index


class Tensor:
    """Reference to one of the program's tensors while encoding."""

    def __init__(self, name: str) -> None:
        self.name = name


class Call:
    """Reference to the result of an earlier call while encoding."""

    def __init__(self, index: int) -> None:
        self.index = index


class NetworkDtype:
    """The network's floating precision (the dtype the model was traced in), wherever a call
    names it: a program runs in whatever precision its graph is compiled to."""


NETWORK_DTYPE = NetworkDtype()


class Unstorable(Exception):
    """An argument that a program cannot hold (raised with a description of it)."""


def encode(value: Any) -> Any:
    """A call argument (constants and Input/Tensor/Call references) as JSON."""
    if isinstance(value, Input):
        return {"input": value.index}
    if isinstance(value, Tensor):
        return {"tensor": value.name}
    if isinstance(value, Call):
        return {"call": value.index}
    if isinstance(value, NetworkDtype):
        return {"dtype": "network"}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": str(value)}
    if isinstance(value, (tuple, torch.Size)):
        return {"tuple": [encode(v) for v in value]}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise Unstorable(f"a dict with non-string keys {value!r}")
        return {"dict": {k: encode(v) for k, v in value.items()}}
    if isinstance(value, slice):
        return {"slice": [encode(value.start), encode(value.stop), encode(value.step)]}
    if value is Ellipsis:
        return {"ellipsis": True}
    if isinstance(value, torch.dtype) and str(value).removeprefix("torch.") in _DTYPES:
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": "input"}  # wherever the program runs
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    raise Unstorable(f"argument {value!r} of type {type(value).__name__}")


class _Ref:
    """A decoded reference, resolved at every forward."""

    __slots__ = ("kind", "key")

    def __init__(self, kind: str, key: Any) -> None:
        self.kind, self.key = kind, key


def decode(value: Any) -> Any:
    """The inverse of `encode`, with references as `_Ref`s (a GraphError for bad data)."""
    if isinstance(value, list):
        return [decode(v) for v in value]
    if not isinstance(value, dict):
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise GraphError(f"program argument {value!r} is not valid JSON data")
    if len(value) != 1:
        raise GraphError(f"program argument {value!r} must have exactly one key")
    (key, v), = value.items()
    if key in ("input", "call"):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise GraphError(f"program reference {value!r} needs a non-negative int")
        return _Ref(key, v)
    if key == "tensor":
        if not isinstance(v, str):
            raise GraphError(f"program reference {value!r} needs a tensor name")
        return _Ref(key, v)
    if key == "device":
        return _Ref("device", None)
    if key == "tuple":
        return tuple(decode(x) for x in _list(v, value))
    if key == "dict":
        if not isinstance(v, dict):
            raise GraphError(f"program argument {value!r}: expected a mapping")
        return {str(k): decode(x) for k, x in v.items()}
    if key == "slice":
        items = _list(v, value)
        if len(items) != 3:
            raise GraphError(f"program argument {value!r}: a slice has 3 items")
        return slice(*(decode(x) for x in items))
    if key == "ellipsis":
        return Ellipsis
    if key == "float" and v in ("inf", "-inf", "nan"):
        return float(v)
    if key == "dtype" and v == "network":
        return _Ref("dtype", None)
    if key == "dtype" and v in _DTYPES:
        return _DTYPES[v]
    if key == "memory_format" and v in _FORMATS:
        return _FORMATS[v]
    raise GraphError(f"program argument {value!r} is not one a program can hold")


def _list(v: Any, whole: Any) -> list[Any]:
    if not isinstance(v, list):
        raise GraphError(f"program argument {whole!r}: expected a list")
    return v


def dtype_of(name: str | None) -> torch.dtype | None:
    return None if name is None else _DTYPES.get(name)


# ---- the module ----------------------------------------------------------------------------------
class Program(nn.Module):
    """Replays `calls` (see the module docstring) on its inputs; returns the last call's value.

    held: name -> {"shape": [...], "buffer": bool, "dtype": name or None (the network's
    floating precision)}; parameters are trainable, buffers (constants, indices) are not.
    """

    def __init__(self, calls: Sequence[Mapping[str, Any]],
                 tensors: Mapping[str, Mapping[str, Any]]) -> None:
        super().__init__()
        self._calls = [_decode_call(i, c) for i, c in enumerate(calls)]
        if not self._calls:
            raise GraphError("a program needs at least one call")
        self._names = []
        for name, spec in tensors.items():
            if not name.isidentifier():
                raise GraphError(f"program tensor name {name!r} must be an identifier")
            dtype = dtype_of(spec.get("dtype")) or torch.get_default_dtype()
            value = torch.zeros([int(s) for s in spec["shape"]], dtype=dtype)
            if spec.get("buffer"):
                self.register_buffer(name, value)
            else:
                self.register_parameter(name, nn.Parameter(value))
            self._names.append(name)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        results: list[Any] = []
        device = inputs[0].device if inputs else None
        floats = [t for t in (*inputs, *self.parameters(), *self.buffers())
                  if t.is_floating_point()]
        dtype = floats[0].dtype if floats else torch.get_default_dtype()

        def fill(v: Any) -> Any:
            if isinstance(v, _Ref):
                if v.kind == "input":
                    return inputs[v.key]
                if v.kind == "call":
                    return results[v.key]
                if v.kind == "tensor":
                    return getattr(self, v.key)
                return dtype if v.kind == "dtype" else device
            if isinstance(v, list):
                return [fill(x) for x in v]
            if isinstance(v, tuple):
                return tuple(fill(x) for x in v)
            if isinstance(v, dict):
                return {k: fill(x) for k, x in v.items()}
            if isinstance(v, slice):
                return slice(fill(v.start), fill(v.stop), fill(v.step))
            return v

        for fn, args, kwargs in self._calls:
            results.append(fn(*fill(args), **fill(kwargs)))
        return results[-1]


def _decode_call(i: int, call: Mapping[str, Any]) -> tuple[Callable[..., Any], Any, Any]:
    if not isinstance(call, Mapping) or call.get("fn") not in FUNCTIONS:
        raise GraphError(f"program call {i}: {call!r} does not name a function a program may "
                         "call")
    args, kwargs = decode(call.get("args", [])), decode(call.get("kwargs", {"dict": {}}))
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise GraphError(f"program call {i}: args must be a list and kwargs a mapping")
    return FUNCTIONS[call["fn"]], tuple(args), kwargs


__all__ = ["ELEMENTWISE", "FUNCTIONS", "NETWORK_DTYPE", "Call", "Input", "Program", "Tensor",
           "Unstorable",
           "decode", "encode", "function_name", "is_inplace", "setitem"]
