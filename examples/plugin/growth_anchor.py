"""A minimal growth strategy plug-in: pull the trunk toward the weights the previous task left.

The penalty is strength * sum |theta - theta*| over the trunk (an L1 pull, which the built-in
`l2` strategy does not offer). Everything a strategy needs is here: a name, a one-line
description, validated settings, two hooks, and a declaration of the state it saves.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from growth.remap import WEIGHT
from growth.strategies import Context, Strategy, StrategyParams, state_key
from growth.strategies.spec import TensorSpec


class AnchorParams(StrategyParams):
    strength: float = Field(0.001, ge=0, description="weight of the pull")
    norm: Literal["l1", "l2"] = Field("l1", description="l1: sum |d|; l2: sum d^2")


class Anchor(Strategy):
    name = "anchor"
    description = "pull the trunk toward the previous task's weights (L1 or L2)"
    Params = AnchorParams
    params: AnchorParams
    state_roles = {"anchor": WEIGHT}  # anchors follow a grown graph as the weights do

    def state_spec(self) -> dict[str, TensorSpec]:
        """One anchor per trunk parameter, saved after every task under the slot "latest"."""
        return {"anchor": TensorSpec(slots=("latest",), shape="same")}

    def penalty(self, ctx: Context, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor
                ) -> torch.Tensor | None:
        if not self.state:
            return None
        params = ctx.model.named_parameters()
        total = logits.new_zeros(())
        for key, anchor in self.state.items():
            d = params[key.split("/", 2)[2]] - anchor.to(logits.device)
            total = total + (d.abs().sum() if self.params.norm == "l1" else d.square().sum())
        return self.params.strength * total

    def after_task(self, ctx: Context) -> None:
        params = ctx.model.named_parameters()
        for name in ctx.model.trunk_parameter_names():
            self.state[state_key("anchor", "latest", name)] = params[name].detach().cpu().clone()
