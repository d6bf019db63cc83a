"""add_block: insert an identity transformer block into a token sequence (Net2Deeper for
transformers).

The block is the pre-norm block of ViT and its relatives:

    y = x + Attention(LayerNorm(x));   out = y + fc2(act(fc1(LayerNorm(y))))

with both residual branches ending in a zero layer: the attention's output projection and
`fc2` have zero weights and biases, so each branch adds 0 and the block computes out = x
exactly, whatever its other weights are (drawn as torch initialises them; LayerNorm weight 1,
bias 0). Training moves the zero layers first (their gradients are the branches' inputs), and
the rest of the block follows.
"""

from __future__ import annotations

import torch

from growth.errors import OperatorError
from growth.graph import NetGraph
from growth.layers import build_module
from growth.ops.guards import MAX_NEW_PARAMS, check_size
from growth.ops.layout import feature_axes
from growth.ops.registry import ChangeRecord, OpResult

_ACTIVATIONS = ("gelu", "relu", "silu")


def blockable(graph: NetGraph) -> list[str]:
    """Nodes after which `add_block` inserts a block: the residual adds of token sequences
    (L, D) with features on the last axis, i.e. the ends of transformer blocks."""
    shapes = graph.shapes()
    axes = feature_axes(graph, shapes)
    return [n for n, s in shapes.items() if graph.node(n).kind == "add" and len(s) == 2
            and axes[n] == 1]


def block_cost(dim: int, heads: int, head_dim: int, hidden: int) -> int:
    """Trainable parameters of one block on `dim` features."""
    inner = heads * head_dim
    return (4 * dim + (dim + 1) * 3 * inner + (inner + 1) * dim + (dim + 1) * hidden
            + (hidden + 1) * dim)


def block_defaults(graph: NetGraph, dim: int) -> dict[str, object]:
    """The block the network already uses: heads and head width of its last attention layer,
    the MLP width and activation after its first LayerNorm on `dim` features, that norm's eps;
    else 1 head per 64 features, MLP 4 x dim, gelu, eps 1e-6."""
    out: dict[str, object] = {"heads": max(1, dim // 64), "head_dim": None, "hidden": 4 * dim,
                              "activation": "gelu", "eps": 1e-6}
    order = graph.topo_order()
    for n in order:
        node = graph.node(n)
        if node.kind == "attention":
            out.update(heads=node.attrs["num_heads"], head_dim=node.attrs["head_dim"])
        elif node.kind == "self_attention":
            a = node.attrs
            out.update(heads=a["num_heads"], head_dim=a.get("head_dim") or a["embed_dim"]
                       // a["num_heads"])
    for n in order:
        node = graph.node(n)
        if node.kind != "layernorm" or list(node.attrs["normalized_shape"]) != [dim]:
            continue
        out["eps"] = node.attrs["eps"]
        fc = [c for c in graph.consumers(n) if graph.node(c).kind == "linear"]
        if fc:
            out["hidden"] = graph.node(fc[0]).attrs["out_features"]
            acts = [c for c in graph.consumers(fc[0]) if graph.node(c).kind in _ACTIVATIONS]
            if acts:
                out["activation"] = graph.node(acts[0]).kind
            break
    return out


def add_block(graph: NetGraph, after: str, heads: int | None = None,
              head_dim: int | None = None, hidden: int | None = None,
              activation: str | None = None, seed: int = 0,
              max_new_params: int | None = MAX_NEW_PARAMS) -> OpResult:
    """Insert an identity transformer block after `after` (see the module docstring); every
    consumer of `after` reads the block. Unset sizes follow `block_defaults`."""
    call = f"add_block after {after!r}"
    if graph.node(after).kind == "output":
        raise OperatorError(f"{call}: it is an output head; insert after the node it reads")
    shapes = graph.shapes()
    shape = shapes[after]
    if len(shape) != 2 or feature_axes(graph, shapes)[after] != 1:
        raise OperatorError(f"{call}: its output has shape {shape}; a transformer block needs "
                            "token sequences (L, D) with the features on the last axis")
    dim = shape[1]
    d = block_defaults(graph, dim)
    heads = int(d["heads"]) if heads is None else heads
    head_dim = head_dim or d["head_dim"] or max(1, dim // heads)
    hidden = int(d["hidden"]) if hidden is None else hidden
    activation = str(d["activation"]) if activation is None else activation
    for what, v in (("heads", heads), ("head_dim", head_dim), ("hidden", hidden)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise OperatorError(f"{call}: {what} must be a positive int, got {v!r}")
    if activation not in _ACTIVATIONS:
        raise OperatorError(f"{call}: activation must be one of {_ACTIVATIONS}, got "
                            f"{activation!r}")
    check_size(call, block_cost(dim, heads, head_dim, hidden), max_new_params)
    params = {"after": after, "heads": heads, "head_dim": head_dim, "hidden": hidden,
              "activation": activation, "seed": int(seed)}
    out = graph.copy()
    consumers = out.consumers(after)
    base = _fresh_name(out, after)
    dtype = _dtype(graph)
    eps = float(d["eps"])
    layers = _fresh_layers(dim, heads, head_dim, hidden, dtype, seed)
    names = [
        out.add(f"{base}_norm1", "layernorm", [after], tensors=layers["norm1"],
                normalized_shape=[dim], eps=eps),
        out.add(f"{base}_attn", "attention", [f"{base}_norm1"], tensors=layers["attn"], dim=dim,
                num_heads=heads, head_dim=head_dim, dim_out=dim),
        out.add(f"{base}_add1", "add", [after, f"{base}_attn"]),
        out.add(f"{base}_norm2", "layernorm", [f"{base}_add1"], tensors=layers["norm2"],
                normalized_shape=[dim], eps=eps),
        out.add(f"{base}_fc1", "linear", [f"{base}_norm2"], tensors=layers["fc1"],
                out_features=hidden),
        out.add(f"{base}_act", activation, [f"{base}_fc1"]),
        out.add(f"{base}_fc2", "linear", [f"{base}_act"], tensors=layers["fc2"],
                out_features=dim),
        out.add(f"{base}_add2", "add", [f"{base}_add1", f"{base}_fc2"]),
    ]
    for c in consumers:
        out.rewire(c, after, names[-1])
    added = [f"{n}.{k}" for n in names for k in out.node(n).tensors]
    return OpResult(out, ChangeRecord("add_block", params, added=added, added_nodes=names))


def _fresh_layers(dim: int, heads: int, head_dim: int, hidden: int, dtype: torch.dtype,
                  seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """The block's tensors: torch's initialisation from a generator seeded with `seed` (the
    global generator is left as it was); the branches' last layers zero."""
    inner = heads * head_dim
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(int(seed))
        attn = build_module("attention", {"dim": dim, "num_heads": heads, "head_dim": head_dim,
                                          "dim_out": dim, "qkv_bias": True, "proj_bias": True,
                                          "attn_drop": 0.0, "proj_drop": 0.0})
        fc1 = build_module("linear", {"in_features": dim, "out_features": hidden, "bias": True})
    finally:
        torch.random.set_rng_state(state)
    attn_t = {k: v.detach().to(dtype) for k, v in attn.state_dict().items()}
    attn_t["proj.weight"] = torch.zeros(dim, inner, dtype=dtype)
    attn_t["proj.bias"] = torch.zeros(dim, dtype=dtype)
    norm = {"weight": torch.ones(dim, dtype=dtype), "bias": torch.zeros(dim, dtype=dtype)}
    return {"norm1": dict(norm), "norm2": {k: v.clone() for k, v in norm.items()},
            "attn": attn_t, "fc1": {k: v.detach().to(dtype) for k, v in fc1.state_dict().items()},
            "fc2": {"weight": torch.zeros(dim, hidden, dtype=dtype),
                    "bias": torch.zeros(dim, dtype=dtype)}}


def _dtype(graph: NetGraph) -> torch.dtype:
    for name in graph.nx.nodes:
        for t in graph.node(name).tensors.values():
            if t.is_floating_point():
                return t.dtype
    return torch.get_default_dtype()


def _fresh_name(graph: NetGraph, after: str) -> str:
    k = 1
    while any(n.startswith(f"{after}_block{k}_") for n in graph.nx.nodes):
        k += 1
    return f"{after}_block{k}"


__all__ = ["add_block", "block_cost", "block_defaults", "blockable"]
