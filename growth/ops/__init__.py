"""Growth operators: pure functions NetGraph -> OpResult(graph, ChangeRecord).

Importing this package registers the built-ins; plug-ins come from the "growth.ops" entry-point
group (see docs/operators.md).
"""

from growth.ops.blocks import add_block, block_cost, blockable
from growth.ops.channels import (
    ChannelGroup,
    apply_index,
    find_group,
    not_resizable,
    resizable,
    units,
    widening_cost,
)
from growth.ops.columns import add_column, freeze
from growth.ops.guards import MAX_NEW_PARAMS
from growth.ops.heads import add_heads, attention_nodes, heads_cost
from growth.ops.layout import feature_axes
from growth.ops.net2deeper import deepenable, deepening_cost, net2deeper
from growth.ops.net2wider import NOISE_BOUND, net2wider
from growth.ops.prune_units import prune_units
from growth.ops.registry import (
    ROLES,
    ChangeRecord,
    Operator,
    OpResult,
    available_operators,
    get_operator,
    is_builtin,
    register,
)
from growth.ops.remove_layer import remove_layer
from growth.ops.widen_private import widen_private

register(Operator("net2wider", "add units to a layer and its channel group, keeping the function "
                  "(Net2WiderNet)", net2wider, role="wider"))
register(Operator("widen_private", "add units to a layer and its channel group that no "
                  "consumer reads yet (zero columns): a private expansion", widen_private,
                  role="wider"))
register(Operator("net2deeper", "insert an identity layer (linear or conv, optional BN/ReLU) "
                  "after a node (Net2DeeperNet)", net2deeper, role="deeper"))
register(Operator("add_heads", "add attention heads whose output projection is zero, keeping "
                  "the function", add_heads))
register(Operator("add_block", "insert an identity transformer block (pre-norm attention and MLP, "
                  "zero-initialised residual branches) into a token sequence", add_block,
                  role="deeper"))
register(Operator("add_column", "add a progressive-network column: a fresh copy of the base "
                  "trunk with lateral adapters from every earlier column; move heads onto it",
                  add_column))
register(Operator("freeze", "mark nodes frozen: no gradient, BatchNorm and dropout as in eval "
                  "mode", freeze))
register(Operator("prune_units", "keep a layer's most important units and shrink its channel "
                  "group to match", prune_units))
register(Operator("remove_layer", "drop a one-input, shape-preserving layer and reconnect its "
                  "consumers to its input (undoes Net2Deeper)", remove_layer))

__all__ = [
    "MAX_NEW_PARAMS", "NOISE_BOUND", "ROLES", "ChangeRecord", "ChannelGroup", "OpResult",
    "Operator", "add_block", "add_column", "add_heads", "apply_index", "attention_nodes",
    "available_operators", "block_cost", "blockable", "deepenable", "deepening_cost",
    "feature_axes", "find_group", "freeze", "get_operator", "heads_cost", "is_builtin",
    "net2deeper", "net2wider", "not_resizable", "prune_units", "register", "remove_layer",
    "resizable", "units", "widen_private", "widening_cost",
]
