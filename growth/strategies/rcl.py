"""RCL, reinforced continual learning (Xu & Zhu, NeurIPS 2018): per task, a controller decides
how many units or filters to add to each layer; what earlier tasks learned stays frozen.

Task 0 trains the base network. Every later task t:
1. Every entry of the network the earlier tasks left is frozen; the task's own head trains on
   it (the campaign's training): the decision "add nothing", the search's first candidate.
2. Expand: the strategy asks `ctx.searcher` (growth.searching) for a search in a private
   space, `search.parent: fixed` (every child grows from this network), controller `rcl`
   (growth.controllers.rcl: an LSTM over the layers decides per layer how many units to add,
   trained actor-critic). A child's units come from `widen_private` (no old head reads them);
   it trains its new units and the task's head with every entry the network had frozen
   (growth.strategies.private), on task t's data only, and is scored by its reward:
   validation accuracy - alpha x parameters added / the network's parameters. The network
   (reward: its own accuracy) is a candidate; the best-scoring child replaces it if its reward
   beats the network's by more than `search.margin`. One controller serves the campaign: its
   actor, critic, their optimizers and its generator are this strategy's state
   (`controller/all/...`), checkpointed with it, so what it learned on task t shapes task
   t+1's children. `search: off` keeps the network (a frozen trunk with a head per task).
3. The widths every layer has after the task are recorded (`extra["widths"]`). An earlier task
   is evaluated on the network cut back to the units it had (`prune_units` keeping each
   widened layer's first units: private widening only appends units, and everything an
   earlier task reads is frozen), which is exactly its network when it ended, so its outputs
   stay bitwise identical after every later task.

BatchNorm statistics are frozen with the weights: the running statistics of the channels the
network had are written back after every step of a later task (its new channels' statistics
learn). Old tasks' data are never read after their task.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import Field, field_validator
from torch import Tensor

from growth.compress import trunk_params
from growth.errors import ConfigError, DivergedError
from growth.graph import NetGraph
from growth.metrics import Stored
from growth.model import Model
from growth.ops import find_group, prune_units
from growth.optim import load_moments, moments
from growth.remap import MASK, remap
from growth.search_spaces.space import SearchSpace, SpaceSpec
from growth.searching import (
    CONTROLLER,
    ControllerState,
    SearchRequest,
    SearchSettings,
    score,
    store_controller,
    stored_controller,
)
from growth.strategies.base import Context, Scorer, Strategy, StrategyParams
from growth.strategies.private import FrozenParent, new_task_only, parent_entries
from growth.strategies.spec import TensorSpec
from growth.train import evaluate, fit, make_optimizer

if TYPE_CHECKING:
    from growth.data import Task
    from growth.ops.registry import ChangeRecord

log = logging.getLogger("growth.rcl")
# RCL's search unless the config says otherwise: its own controller, every child grown from
# the task's network, 3 generations of 4 children trained 5 epochs at the task's rate
SEARCH = {"controller": "rcl", "parent": "fixed", "children": 4, "generations": 3, "epochs": 5,
          "lr_scale": 1.0}


class RCLParams(StrategyParams):
    """RCL settings: the complexity cost `alpha` and the search (`search: off` = a frozen
    trunk with a head per task). The controller's own settings (counts, LSTM sizes, learning
    rates) are `search.controller_params` (growth.controllers.rcl.RCLSettings)."""

    alpha: float = Field(0.05, ge=0, description="complexity cost: a network's reward is its "
                         "validation accuracy - alpha x the parameters it adds / the network's "
                         "parameters (the controller's reward and the choice of child)")
    search: SearchSettings = Field(default_factory=lambda: SearchSettings(**SEARCH),
                                   description="the expansion search per task (off: keep the "
                                   "network); its space is private, its cost is alpha")

    @field_validator("search", mode="before")
    @classmethod
    def _search(cls, value: Any) -> Any:
        if isinstance(value, str) and value.lower() in ("on", "off", "true", "false"):
            value = value.lower() in ("on", "true")
        if isinstance(value, bool):
            value = {"enabled": value}
        if isinstance(value, Mapping):
            if value.get("cost", 0):
                raise ValueError("RCL's selection cost is strategy.alpha; remove search.cost")
            if "alpha" in (value.get("controller_params") or {}):
                raise ValueError("RCL's complexity cost is strategy.alpha; remove "
                                 "search.controller_params.alpha")
            return {**SEARCH, **value}
        return value


class RCL(Strategy):
    name = "rcl"
    description = "reinforced continual learning: per task an LSTM controller chooses how " \
                  "many units to add to each layer (actor-critic, reward = accuracy - " \
                  "complexity), the old network frozen"
    Params = RCLParams
    params: RCLParams
    scenarios: ClassVar[tuple[str, ...]] = ("task",)

    def __init__(self, params: RCLParams | None = None) -> None:
        super().__init__(params)
        self._frozen = FrozenParent()  # the network's entries while a task's new parts train
        self._buffers: dict[str, Tensor] = {}  # ... and its BatchNorm statistics' entries
        self._saved: dict[str, Tensor] = {}
        self._views: dict[int, tuple[Any, Model]] = {}  # task -> (module, its network)

    def state_spec(self) -> dict[str, TensorSpec]:
        return {CONTROLLER: TensorSpec(("all",), "any", "any", parameter=False,
                                       required=False)}

    def check_state(self, tensors: Mapping[str, Tensor], extra: Mapping[str, Any],
                    graph_tensors: Mapping[str, Tensor], finished: int) -> list[str]:
        problems = super().check_state(tensors, extra, graph_tensors, finished)
        widths = extra.get("widths", {}) if isinstance(extra.get("widths", {}), dict) else {}
        missing = [str(k) for k in range(finished) if str(k) not in widths]
        if missing:
            problems.append(f"extra 'widths' has no entry for finished task(s) "
                            f"{', '.join(missing)}: strategy 'rcl' records each task's widths")
        return problems

    # ---- hooks -------------------------------------------------------------------------------
    def before_task(self, ctx: Context) -> None:
        if ctx.head_of(ctx.task) in (ctx.head_of(t) for t in ctx.seen):
            raise ConfigError("strategy rcl needs one head per task; use scenario: task")
        if "base_trunk" not in self.extra:
            self.extra["base_trunk"] = trunk_params(ctx.model.graph)
        if ctx.seen:  # the task's head trains alone on the network the earlier tasks left
            self._hold(ctx, [])

    def after_task(self, ctx: Context) -> None:
        self._release()
        entry = self._entry(ctx)
        if ctx.seen and self.params.search.enabled:
            self._expand(ctx, entry)
        graph = ctx.model.graph
        entry["widths"] = self.extra.setdefault("widths", {})[str(ctx.task.index)] = \
            layer_widths(graph)
        entry["params"] = graph.param_count()
        entry["trunk_params"] = trunk_params(graph)

    def follow(self, ctx: Context, records: list[ChangeRecord]) -> None:
        super().follow(ctx, records)
        if not self.params.search.enabled and any(r.op == "widen_private" for r in records):
            self._hold(ctx, records)  # a search's child: its parent frozen

    @contextmanager
    def training(self, ctx: Context) -> Iterator[None]:
        buffers = dict(ctx.model.module.named_buffers())
        self._saved = {n: buffers[n].detach().clone() for n in self._buffers}
        try:
            with self._frozen.training(ctx):
                yield
        finally:
            self._restore_buffers(ctx)
            self._saved = {}

    def after_backward(self, ctx: Context) -> None:
        self._frozen.after_backward()

    def after_step(self, ctx: Context) -> None:
        self._frozen.after_step()
        self._restore_buffers(ctx)

    @contextmanager
    def evaluation(self, ctx: Context, task: Task) -> Iterator[Scorer]:
        """An earlier task on the network cut back to the units it had (see the module
        docstring); the current task and tasks not learned yet on the whole network."""
        widths = self.extra.get("widths", {}).get(str(task.index))
        params = ctx.model.named_parameters()
        if widths is None or all(params[f"{n}.weight"].shape[0] == w
                                 for n, w in widths.items()):
            yield ctx.model.head(ctx.head_of(task))
            return
        module, model = self._views.get(task.index, (None, None))
        if module is not ctx.model.module or model is None:
            model = Model(cut_to(ctx.model.graph, widths), ctx.device).eval()
            self._views[task.index] = (ctx.model.module, model)
        yield model.head(ctx.head_of(task))

    # ---- the parent frozen -------------------------------------------------------------------
    def _hold(self, ctx: Context, records: list[ChangeRecord]) -> None:
        self._frozen.entries = parent_entries(ctx, records, by="entry")
        self._buffers = parent_buffers(ctx, records)

    def _release(self) -> None:
        self._frozen.release()
        self._buffers = {}

    @torch.no_grad()
    def _restore_buffers(self, ctx: Context) -> None:
        if not self._saved:
            return
        buffers = dict(ctx.model.module.named_buffers())
        for name, keep in self._buffers.items():
            buffers[name].copy_(torch.where(keep, self._saved[name], buffers[name]))

    # ---- expand ------------------------------------------------------------------------------
    def _expand(self, ctx: Context, entry: dict[str, Any]) -> None:
        """Search children of the network (its head trained on the task); the best-scoring
        child replaces the network if its reward beats the network's trained as long as a
        child is (the head alone)."""
        if ctx.searcher is None or ctx.train_config is None:
            raise ConfigError("RCL's search needs a searcher and the task's training settings "
                              "(run it through a campaign, or set ctx.searcher and "
                              "ctx.train_config)")
        entry["head_acc"] = head_acc = evaluate(ctx, ctx.task, "val")
        if not math.isfinite(head_acc):
            raise DivergedError(f"RCL on task {ctx.task.name!r}: the validation accuracy is "
                                f"{head_acc} (an empty validation split?); children are "
                                "chosen on validation data: set data.val_fraction above 0")
        before = ctx.model.graph
        settings = self.search_settings()
        request = SearchRequest(
            settings=settings, train=ctx.train_config,
            child_strategy=(self.name, {**self.params.model_dump(mode="json",
                                                                 exclude_none=True),
                                        "search": False}),
            parent_acc=None, controller_state=self._controller())  # the network competes below
        start = time.perf_counter()
        found = ctx.searcher.search(ctx, request)
        entry.update({k: v for k, v in found.summary.items()  # the choice is made below
                      if k not in ("parent_acc", "parent_kept")})
        if found.controller_state is not None:
            self._keep_controller(found.controller_state)
        entry["zero_acc"] = zero = self._train_like_a_child(ctx, settings)
        entry["search_wall_s"] = time.perf_counter() - start
        size, alpha = before.param_count(), self.params.alpha
        child = None if found.graph is None else \
            score(float(found.summary["val_acc"]), found.graph.param_count(), size, alpha)
        entry["child_reward"] = child
        if child is not None and child > zero + settings.margin:
            ctx.replace_graph(found.graph, found.records)
            entry["reward"] = child
        else:
            entry["expansion"], entry["reward"] = "parent", zero
        after = ctx.model.graph
        entry["added"] = {n: w - layer_widths(before).get(n, 0)
                          for n, w in layer_widths(after).items()}
        log.info("task %d: %s (%d children trained in %.1fs; the head alone: validation "
                 "accuracy %.4f; reward %.4f)", ctx.task.index,
                 "kept the network" if entry["expansion"] == "parent" else
                 f"added {entry['added']}", entry.get("children", 0),
                 entry.get("child_time_s", 0.0), zero, entry["reward"])

    def _train_like_a_child(self, ctx: Context, settings: SearchSettings) -> float:
        """The network with no units added, its head trained on as the search trains a child
        (epochs, learning rate, schedule, from the same moments): the candidate every child
        must beat, so a child's extra training is not taken for the worth of its units.
        Returns its validation accuracy."""
        assert ctx.train_config is not None
        cfg = ctx.train_config.model_copy(update={
            "epochs": settings.epochs, "lr": ctx.train_config.lr * settings.lr_scale,
            "schedule": settings.schedule})
        params = ctx.model.named_parameters()
        optimizer = make_optimizer(list(params.values()), cfg)
        if ctx.optimizer is not None:
            load_moments(optimizer, params, moments(ctx.optimizer, params))
        self._hold(ctx, [])
        try:
            fit(ctx, self, cfg, seed=ctx.seed + 1, optimizer=optimizer)
        finally:
            self._release()
        return evaluate(ctx, ctx.task, "val")

    def search_settings(self) -> SearchSettings:
        """The search RCL asks for: its settings in a private space, the cost alpha, and
        alpha in the RCL controller's settings."""
        search = self.params.search
        space = (search.space or SpaceSpec()).model_copy(update={"private": True})
        controller = dict(search.controller_params)
        if search.controller == "rcl":
            controller["alpha"] = self.params.alpha
        return search.model_copy(update={"space": space, "cost": self.params.alpha,
                                         "controller_params": controller})

    def _controller(self) -> ControllerState | None:
        return stored_controller(self.state, self.extra)

    def _keep_controller(self, found: ControllerState) -> None:
        self.state = store_controller(self.state, self.extra, found)

    # ---- records -----------------------------------------------------------------------------
    def _entry(self, ctx: Context) -> dict[str, Any]:
        return self.extra.setdefault("rcl", {}).setdefault(str(ctx.task.index), {})

    def size_parts(self, model: Model) -> dict[str, list[Any]]:
        """"trunk" (the base network's trunk), "added" (the units later tasks added to it),
        "heads"; the trunk's parameters are counted as held (float32: 32 bits)."""
        parts = super().size_parts(model)
        base, trunk = self.extra.get("base_trunk"), parts["trunk"]
        total = sum(int(p.numel()) for p in trunk)
        if base is None or not trunk or total <= base:
            return parts
        bits = 8 * trunk[0].element_size()
        return {**parts, "trunk": [Stored(int(base), bits)],
                "added": [Stored(total - int(base), bits)]}

    def run_report(self) -> dict[str, Any]:
        tasks = self.extra.get("rcl", {})
        searched = [e for e in tasks.values() if "expansion" in e]
        return {"search": {"children": sum(int(e.get("children", 0)) for e in searched),
                           "child_time_s": sum(float(e.get("child_time_s", 0.0))
                                               for e in searched),
                           "search_wall_s": sum(float(e.get("search_wall_s", 0.0))
                                                for e in searched),
                           "searches": len(searched),
                           "parent_kept": sum(1 for e in searched
                                              if e["expansion"] == "parent")},
                "details": {"rcl": tasks}}


def layer_widths(graph: NetGraph) -> dict[str, int]:
    """The units of every layer a search may widen (conv/linear layers other than heads)."""
    return {layer.node: int(layer.width) for layer in SearchSpace().layers(graph)
            if layer.width is not None}


def cut_to(graph: NetGraph, widths: Mapping[str, int]) -> NetGraph:
    """`graph` with each layer cut back to its first `widths[layer]` units (its channel group
    with it, `prune_units`): the network as it was when those were its widths, since private
    widening only appends units."""
    for node, width in widths.items():
        now = find_group(graph, node).width
        if now > width:
            first = torch.arange(now, 0, -1, dtype=torch.float32)  # the first units score most
            graph = prune_units(graph, node, int(width), scores=first).graph
    return graph


def parent_buffers(ctx: Context, records: list[ChangeRecord]) -> dict[str, Tensor]:
    """Which entries of each floating buffer (BatchNorm's running statistics) the parent had
    (True), through the records; buffers only the new task's head reads are left out."""
    own = new_task_only(ctx)
    out = {}
    for name, b in ctx.model.module.named_buffers():
        if not b.is_floating_point() or name.rsplit(".", 1)[0] in own:
            continue
        old = next((r.resized[name][0] for r in records if name in r.resized), tuple(b.shape))
        out[name] = remap(torch.ones(old), name, records, MASK).bool().to(b.device)
    return out


__all__ = ["RCL", "RCLParams", "cut_to", "layer_widths", "parent_buffers"]
