"""add_heads: more attention heads in one attention layer, without changing the function.

An attention layer's output is the output projection applied to its heads' outputs, side by
side: out = sum over heads h of P_h o_h (+ bias), where P_h are the projection's columns for
head h. New heads get fresh query, key and value rows (drawn as torch initialises a linear
layer, biases 0) and zero columns in the projection, so they add 0 to the output: the network
computes the same function, and training moves the new columns (their gradient is the new
heads' output), after which the new heads' queries and keys learn too.

Both attention kinds follow: `attention` (timm's layout: `qkv` rows are [q | k | v], each
heads x head_dim; `proj` reads heads x head_dim) and `self_attention` (torch's
MultiheadAttention: `in_proj_weight` rows [q | k | v], `out_proj`), whose heads keep their
width (`head_dim`) as heads are added.
"""

from __future__ import annotations

import math

import torch

from growth.errors import OperatorError
from growth.graph import NetGraph
from growth.ops.guards import MAX_NEW_PARAMS, check_size
from growth.ops.registry import ChangeRecord, OpResult

_TENSORS = {  # kind -> (qkv weight, qkv bias, proj weight)
    "attention": ("qkv.weight", "qkv.bias", "proj.weight"),
    "self_attention": ("in_proj_weight", "in_proj_bias", "out_proj.weight"),
}


def head_layout(graph: NetGraph, node: str) -> tuple[int, int, int, int]:
    """(heads, head_dim, input width, output width) of an attention node, or an OperatorError
    naming the node if it is not one."""
    n = graph.node(node)
    a = n.attrs
    if n.kind == "attention":
        return a["num_heads"], a["head_dim"], a["dim"], a["dim_out"]
    if n.kind == "self_attention":
        head_dim = a.get("head_dim") or a["embed_dim"] // a["num_heads"]
        return a["num_heads"], head_dim, a["embed_dim"], a["embed_dim"]
    raise OperatorError(f"add_heads({node!r}): {node!r} is a {n.kind} node; heads are added to "
                        f"attention layers ({sorted(_TENSORS)})")


def heads_cost(graph: NetGraph, node: str, heads: int) -> int:
    """Trainable parameters that growing `node` to `heads` heads adds."""
    have, head_dim, dim, dim_out = head_layout(graph, node)
    bias = _TENSORS[graph.node(node).kind][1] in graph.node(node).tensors
    return max(heads - have, 0) * head_dim * (3 * dim + (3 if bias else 0) + dim_out)


def add_heads(graph: NetGraph, node: str, heads: int, seed: int = 0,
              max_new_params: int | None = MAX_NEW_PARAMS) -> OpResult:
    """Grow attention node `node` to `heads` heads (see the module docstring).

    seed: the generator of the new heads' query, key and value weights.
    max_new_params: refuse a call adding more parameters (None: no limit).
    """
    have, head_dim, dim, _ = head_layout(graph, node)
    params = {"node": node, "heads": heads, "seed": int(seed)}
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < have:
        raise OperatorError(f"add_heads({node!r}): heads must be an int >= its {have} heads, "
                            f"got {heads!r}; heads are never removed by this operator")
    check_size(f"add_heads({node!r}, heads={heads})", heads_cost(graph, node, heads),
               max_new_params)
    out = graph.copy()
    if heads == have:
        return OpResult(out, ChangeRecord("add_heads", params))
    layer = out.node(node)
    wkey, bkey, pkey = _TENSORS[layer.kind]
    new = (heads - have) * head_dim
    old = have * head_dim
    rows = torch.cat([torch.cat([torch.arange(b * old, (b + 1) * old),
                                 torch.full((new,), -1)]) for b in range(3)])
    gen = torch.Generator().manual_seed(int(seed))
    weight = layer.tensors[wkey]
    bound = 1.0 / math.sqrt(dim)  # torch's default for a linear layer's weight
    fresh = (torch.rand((3, new, dim), generator=gen, dtype=torch.float64) * 2 - 1) * bound
    blocks = weight.view(3, old, dim)
    tensors = dict(layer.tensors)
    tensors[wkey] = torch.cat([blocks, fresh.to(weight.dtype)], 1).reshape(-1, dim)
    resized = {f"{node}.{wkey}": (tuple(weight.shape), tuple(tensors[wkey].shape))}
    maps = {f"{node}.{wkey}": {0: rows.tolist()}}
    if bkey in tensors:
        bias = tensors[bkey].view(3, old)
        tensors[bkey] = torch.cat([bias, bias.new_zeros(3, new)], 1).reshape(-1)
        resized[f"{node}.{bkey}"] = ((3 * old,), (3 * (old + new),))
        maps[f"{node}.{bkey}"] = {0: rows.tolist()}
    proj = tensors[pkey]
    tensors[pkey] = torch.cat([proj, proj.new_zeros(proj.shape[0], new)], 1)
    resized[f"{node}.{pkey}"] = (tuple(proj.shape), tuple(tensors[pkey].shape))
    maps[f"{node}.{pkey}"] = {1: list(range(old)) + [-1] * new}
    layer.tensors = tensors
    layer.attrs["num_heads"] = heads
    layer.attrs["head_dim"] = head_dim
    return OpResult(out, ChangeRecord("add_heads", params, resized, maps))


def attention_nodes(graph: NetGraph) -> list[str]:
    """The nodes `add_heads` accepts, in topological order."""
    return [n for n in graph.topo_order() if graph.node(n).kind in _TENSORS]


__all__ = ["add_heads", "attention_nodes", "head_layout", "heads_cost"]
