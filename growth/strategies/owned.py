"""REC's hard protection: each trunk weight owned by the task that needs it, as PackNet's.

An owner index per masked weight (the trunk's linear and conv weights; growth.masks): 0 = free,
k + 1 = task k (state owner/all/<param>, role MASK, so a graph change carries it and new units
start free). A task trains the free weights only (the owned ones held by a `growth.masks.Guard`:
zero gradients, values written back); after it, the task takes the free weights and gives back
the `prune` fraction it needs least, by its own Fisher (or by magnitude), zeroed and free for
the next tasks. Evaluating task k zeroes every weight that tasks 0..k do not own, so what a
later task does with the free weights never reaches task k. Biases and BatchNorm ("shared"):
frozen after the first task (as PackNet's default), or trained by every task under the MWC
penalty, which then applies to them alone (`shared: mwc`; BatchNorm stays frozen either way:
no penalty holds its running statistics).

Where the owner indices are stored (`store`): packed (default), each owned weight's index sits
in the lowest `bits` bits of its own stored value (float32: 23 mantissa bits, so the weight
keeps 23 - bits of them, a relative change below 2^(bits - 23)), and the weights alone are the
model; free weights are zero, so their bits read 0. `table`: a separate index table of
ceil(log2(T + 1)) bits per weight, as PackNet's. Packing happens once per task, after the task
took its weights and before it is scored: the weights older tasks own never change again.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from growth.errors import ConfigError
from growth.masks import masked_names, owner_dtype, prune_smallest
from growth.metrics import Stored, index_bits
from growth.model import Model
from growth.strategies.base import state_key

OWNER = "owner"


class OwnerSettings(BaseModel):
    """REC's owner masks (`owners: off` = the soft MWC protection alone)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    enabled: bool = Field(True, description="off: old tasks are protected by the MWC penalty "
                          "alone (every weight shared)")
    prune: float = Field(0.75, ge=0, lt=1, description="fraction of the weights a task "
                         "trained that it gives back after it (zeroed, free for later tasks)")
    importance: Literal["fisher", "magnitude"] = Field(
        "magnitude", description="which weights a task keeps: the largest of its own diagonal "
        "Fisher (on its training data, at the end of the task) or of magnitude")
    retrain_epochs: int = Field(2, ge=0, description="epochs on the weights a task kept "
                                "after the pruning")
    retrain: Literal["teacher", "loss"] = Field(
        "teacher", description="the retraining distils the expanded network as the "
        "compression does (the task's loss when the search kept the network), or trains with "
        "the task's loss alone (as PackNet)")
    shared: Literal["frozen", "mwc"] = Field(
        "frozen", description="biases and BatchNorm: frozen after the first task; mwc: biases "
        "trained by every task under the MWC penalty (old tasks then drift through them), "
        "BatchNorm frozen all the same")
    store: Literal["packed", "table"] = Field(
        "packed", description="packed: each owned weight's owner index in the lowest `bits` "
        "bits of its stored value (no index table: 1.00x the base's bytes; each weight keeps "
        "23 - bits of float32's 23 mantissa bits); table: a separate index table, "
        "ceil(log2(T + 1)) bits per weight, as PackNet's")
    bits: int = Field(8, ge=1, le=16, description="bits of each weight that hold its packed "
                      "owner index: up to 2^bits - 1 tasks")


def owner_table(state: dict[str, Tensor], model: Model, tasks: int) -> dict[str, Tensor]:
    """owner/all/<param> for every masked parameter (created free where missing)."""
    params = model.named_parameters()
    out = {}
    for n in masked_names(model):
        key = state_key(OWNER, "all", n)
        if key not in state:
            state[key] = torch.zeros(params[n].shape, dtype=owner_dtype(tasks + 1))
        out[n] = state[key]
    return out


@torch.no_grad()
def take(owners: dict[str, Tensor], params: dict[str, torch.nn.Parameter],
         scores: dict[str, Tensor], task: int, ratio: float) -> dict[str, int]:
    """Task `task` takes every free weight, then gives back the `ratio` of them with the
    smallest score in each layer: zeroed and free again. Returns the weights kept per layer."""
    kept = {}
    for n, owner in owners.items():
        free = owner == 0
        owner[free] = task + 1
        cut = prune_smallest(scores[n].to(owner.device), free, ratio)
        params[n][cut.to(params[n].device)] = 0
        owner[cut] = 0
        kept[n] = int((owner == task + 1).sum())
    return kept


def visible(owner: Tensor, task: int) -> Tensor:
    """The weights finished task `task` computes with: those owned by tasks 0..task."""
    return (owner > 0) & (owner <= task + 1)


# float dtypes that can carry an owner index, with the integer view of their bits and how many
# mantissa bits they have (half precision has too few to give any away)
_BITS = {torch.float32: (torch.int32, 23), torch.float64: (torch.int64, 52)}


def check_packable(params: dict[str, Tensor], names: Iterable[str], bits: int,
                   task: int) -> None:
    """Refuse what packing cannot hold: a task beyond 2^bits - 1, or weights without the
    mantissa bits to spare. Checked before a task trains, so nothing is lost."""
    if task + 1 > 2 ** bits - 1:
        raise ConfigError(f"owners.bits {bits} holds the owner indices of {2 ** bits - 1} "
                          f"tasks; task {task} is number {task + 1}: raise strategy.owners.bits "
                          "or set strategy.owners.store=table")
    for n in names:
        dtype = params[n].dtype
        if dtype not in _BITS or bits >= _BITS[dtype][1] // 2:
            raise ConfigError(f"owners.store packed writes owner indices into the lowest "
                              f"{bits} bits of each weight, but {n} is {dtype}: use float32 "
                              "or float64 weights, fewer owners.bits, or "
                              "strategy.owners.store=table")


@torch.no_grad()
def pack(owners: dict[str, Tensor], params: dict[str, torch.nn.Parameter], bits: int) -> None:
    """Write each owned weight's owner index into its lowest `bits` bits (free weights are
    zero and stay so). A weight packed before is rewritten with the same bits: unchanged."""
    low = (1 << bits) - 1
    for n, owner in owners.items():
        p = params[n]
        ints = p.detach().view(_BITS[p.dtype][0])
        held = (owner > 0).to(p.device)
        index = owner.to(device=p.device, dtype=ints.dtype)
        ints.copy_(torch.where(held, (ints & ~low) | index, ints))


def unpack(params: dict[str, Tensor], names: Iterable[str], bits: int) -> dict[str, Tensor]:
    """The owner indices the stored weights carry (the inverse of `pack` on its output)."""
    low = (1 << bits) - 1
    return {n: params[n].detach().view(_BITS[params[n].dtype][0]) & low for n in names}


def mask_sizes(owners: dict[str, Tensor], tasks: int) -> list[Any]:
    """The owner indices as stored: ceil(log2(T + 1)) bits each (side data, not parameters)."""
    bits = index_bits(tasks + 1)
    return [Stored(o.numel(), bits, parameters=False) for o in owners.values()]


__all__ = ["OWNER", "OwnerSettings", "check_packable", "mask_sizes", "owner_table", "pack",
           "take", "unpack", "visible"]
