"""The search seam: how a strategy asks for an architecture search without knowing who runs it.

A strategy that grows by search (REC, and any plug-in) describes what it wants in a
`SearchRequest` and hands it to `ctx.searcher`, a `Searcher` the campaign provides (from
`growth.controllers.service`: the driver, on Ray actors, Ray Tune or in-process). The strategy
never imports a controller, the driver, Tune or Ray; a test gives it any object with a
`search` method.

What travels through the seam:
- the network to grow is `ctx.model` (its graph, and `ctx.optimizer`'s moments when the
  caller has trained it on the task: children go on from them), the task is `ctx.task` (its
  training and validation splits only), the folder is `ctx.workdir` (a search there resumes);
- the children's loss is a strategy by name and settings, trained from the caller's state in
  the parent's shapes (`child_strategy`): REC's children pay exactly the MWC penalty REC pays;
- the controller's state (its policy, baseline and generator) comes in and goes out, so one
  controller learns across a campaign's tasks while the caller checkpoints it;
- the outcome is the chosen child (its graph and the operators' change records that lead to it
  from the parent, for the caller's state to follow) or None: the parent is a candidate, and a
  child replaces it only when its score beats the parent's (`parent_acc`) by `settings.margin`;
  a network's score is its validation accuracy, less `settings.cost` x the parameters it adds
  relative to the parent's (RCL's complexity cost).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from growth.search_spaces.space import SpaceSpec

if TYPE_CHECKING:
    import torch

    from growth.context import Context, TrainConfig
    from growth.graph import NetGraph
    from growth.ops.registry import ChangeRecord

ControllerState = tuple[dict[str, "torch.Tensor"], dict[str, Any]]


CONTROLLER = "controller"  # state key prefix of a strategy's one controller for the campaign


def stored_controller(state: dict[str, Any], extra: dict[str, Any]) -> ControllerState | None:
    """The controller a strategy keeps in its state (`controller/all/...` tensors and the
    `controller` entry of its extra), or None before its first search."""
    prefix = f"{CONTROLLER}/all/"
    tensors = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not tensors:
        return None
    return tensors, dict(extra.get(CONTROLLER, {}))


def store_controller(state: dict[str, Any], extra: dict[str, Any], found: ControllerState
                     ) -> dict[str, Any]:
    """`state` with the controller a search returned in place of the one it held (detached
    CPU copies); its extra entry is replaced in `extra`."""
    tensors, kept = found
    prefix = f"{CONTROLLER}/all/"
    state = {k: v for k, v in state.items() if not k.startswith(prefix)}
    state.update({prefix + k: v.detach().cpu().clone() for k, v in tensors.items()})
    extra[CONTROLLER] = dict(kept)
    return state


class SearchSettings(BaseModel):
    """How a strategy searches an expansion per task (small CPU defaults; the EAS paper's
    scale, 10 children per episode trained 20 epochs each, is reachable by config).

    The controller's own settings and the space are checked at config load by the campaign's
    searcher (`growth.controllers.check_search_settings`), like every other key."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    enabled: bool = Field(True, description="off: keep the parent network")
    controller: str = Field("eas", description="eas, random, rcl, or a plug-in controller")
    controller_params: dict[str, Any] = Field(
        default_factory=dict, description="the controller's own settings (controllers/)")
    space: SpaceSpec | None = Field(None, description="search space (search_spaces/; None: "
                                    "the defaults for the network)")
    children: int = Field(4, ge=1, description="children per generation")
    generations: int = Field(1, ge=1, description="generations per task")
    parent: Literal["best", "fixed"] = Field(
        "best", description="best: each generation grows from the best network so far; fixed: "
        "every generation grows from the network the search started from, and the best child "
        "of the whole search is chosen at its end")
    epochs: int = Field(2, ge=1, description="training epochs of each child")
    lr_scale: float = Field(0.5, gt=0, description="children's learning rate as a fraction of "
                            "the task's train.lr")
    schedule: Literal["constant", "cosine"] = Field(
        "cosine", description="children's learning-rate schedule (EAS: cosine to 0)")
    margin: float = Field(0.0, ge=0, le=1, description="a child replaces the parent only if "
                          "its score beats the parent's by more than this")
    cost: float = Field(0.0, ge=0, description="a network's score: its validation accuracy minus "
                        "cost x the parameters it adds to the network the search started from, "
                        "relative to that network's (RCL's reward); 0: accuracy alone")
    backend: Literal["auto", "local", "ray", "tune"] = Field(
        "auto", description="local: children in this process, one after another; ray: Ray "
        "actors kept for the whole campaign (parallel, clusters); tune: Ray Tune trials "
        "(Tune's per-child MLflow/W&B loggers); auto: local until a child's training time is "
        "known, then ray when running children at once saves more than Ray's cost "
        "(growth.controllers.driver.choose_backend)")
    concurrency: int = Field(2, ge=1, description="children trained at once (ray)")
    cpus_per_trial: float = Field(1.0, gt=0, description="CPUs (torch threads) per child")
    ray_address: str | None = Field(None, description="join this Ray cluster (default: the "
                                    "one already running, or a local one)")


def score(acc: float, params: int, base_params: int, cost: float) -> float:
    """A network's score in a search: its validation accuracy minus `cost` x the parameters it
    adds to `base_params` (the network the search started from), relative to them (RCL's
    reward); cost 0: the accuracy itself."""
    if not cost:
        return acc
    return acc - cost * (params - base_params) / base_params


@dataclass
class SearchRequest:
    """What a strategy asks for (the network, task and folder come from the context)."""

    settings: SearchSettings
    train: TrainConfig  # the task's training settings; children derive theirs from them
    child_strategy: tuple[str, dict[str, Any]] = ("finetune", {})  # name, settings
    parent_acc: float | None = None  # the parent's validation accuracy on the task
    controller_state: ControllerState | None = None  # None: a fresh controller


@dataclass
class SearchOutcome:
    """The chosen child (None: the parent stays), the records from the parent to it, what the
    search cost, and the controller's state after it."""

    graph: NetGraph | None
    records: list[ChangeRecord] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    controller_state: ControllerState | None = None


@runtime_checkable
class Searcher(Protocol):
    """Runs an architecture search of `ctx.model` on `ctx.task` in `ctx.workdir`."""

    def search(self, ctx: Context, request: SearchRequest) -> SearchOutcome:
        """Search, or resume the search found in `ctx.workdir`; never raises for a child that
        fails (a failed child is a result), only for a search that cannot run."""
