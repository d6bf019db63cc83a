"""REC: Regularize, Expand, Compress (the project's definition, docs/methods.md).

Task 1 trains the base network with the task loss. Every later task t:
1. Regularize: MWC. Its relatedness weights w_{k,t} are measured on the network at the start
   of the task; the loss is CE_t plus the MWC penalty throughout (training, search children,
   distillation), and the network learns task t as MWC would (the loop's own epochs).
2. Expand: an architecture search from the trained network, asked of the searcher the
   campaign hands over (`ctx.searcher`, growth.searching: the EAS controller or random search,
   children in this process or on Ray); children go on from the network's weights,
   optimizer moments and MWC state with the MWC loss on task t, and are scored on task t's
   validation split. The network is a candidate: a child replaces it only if its validation
   accuracy beats the network's by more than `search.margin`, carrying the strategy's state
   along its operator records. One controller serves the whole campaign: its policy, baseline
   and generator are this strategy's state (`controller/all/...`), checkpointed with it, so
   what it learned on task t shapes task t+1's children. `search: off` keeps the network.
3. Compress: back to at most the base trunk's parameter count (`growth.compress`: the network
   before the expansion distilled from the expanded one, or the base architecture cut out of
   it, with KL at T = 2 on task t's head (and old heads by `old_heads`), plus the MWC
   penalty). `compress: off` keeps the expanded network.
4. Own (`owners`, default on; growth.strategies.owned; the first task too): task t takes
   the free trunk weights, gives back the `owners.prune` share with the smallest magnitude
   (zeroed, free for later tasks) and retrains what it kept (distilled from the expanded
   network when there is one). Owned weights are held still in every later fit (the loop's
   hooks, and the compression's through `hold`), the MWC penalty then reaches only the
   shared tensors, and a finished task is scored with the weights it and the tasks before it
   own. `owners: off` leaves the MWC penalty alone to protect old tasks (every weight shared).
5. Consolidate: Fisher and anchors of task t on the final network; older tasks' Fisher and
   anchors were carried through the expansion and the compression by `growth.remap`.

Old tasks' data are never read after their task: the search, the training, the compression
and the Fisher all read task t's splits only (earlier tasks reach a search as metadata).
After every task the trunk must fit the base trunk's size unless compression is off.
With `search: off` and `owners: off` REC is MWC, to the last digit; with `search: off` and
owners (shared tensors frozen) it is PackNet on every task it has learned.

The search runs in `ctx.workdir/search`, so a killed run resumes it where it stopped: finished
children are kept and not trained again.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field, field_validator

from growth.compress import (
    CompressParams,
    compress,
    default_heads,
    distill,
    split_accuracies,
    trunk_params,
)
from growth.errors import ConfigError, DivergedError, OperatorError
from growth.graph import NetGraph
from growth.masks import Guard, decays, frozen_shared, held_norms, masked_names, swapped
from growth.ops.registry import ChangeRecord
from growth.regularizers import Component, stored, task_fisher
from growth.remap import MASK, SPLIT
from growth.search_spaces.space import SpaceSpec
from growth.searching import (
    CONTROLLER,
    ControllerState,
    SearchRequest,
    SearchSettings,
    store_controller,
    stored_controller,
)
from growth.strategies.base import Context, Scorer
from growth.strategies.mwc import MWC, MWCParams
from growth.strategies.owned import (
    OWNER,
    OwnerSettings,
    check_packable,
    mask_sizes,
    owner_table,
    pack,
    take,
    visible,
)
from growth.strategies.private import FrozenParent, fresh_entries, parent_entries
from growth.strategies.spec import TensorSpec
from growth.train import evaluate

if TYPE_CHECKING:
    from growth.data import Task
    from growth.model import Model

log = logging.getLogger("growth.rec")


class RECCompress(CompressParams):
    """How REC compresses after each task (growth.compress; budget None: the base trunk)."""

    enabled: bool = Field(True, description="off: keep the expanded network")
    epochs: int | None = Field(None, ge=0, description="distillation epochs on the task's "
                               "data (None: the task's train.epochs)")
    mix: float | None = Field(0.5, ge=0, le=1, description="alpha: alpha CE + (1 - alpha) "
                              "T^2 KL on each head (None: CE + kd_weight T^2 KL)")
    patience: int | None = Field(2, ge=1, description="stop the distillation once the task's "
                                 "validation accuracy has not improved for this many epochs, "
                                 "keeping the best student (the one it started as included)")
    student: Literal["parent", "cut"] = Field(
        "parent", description="parent: the network before this task's expansion (the base "
        "architecture with the parent's own units and state); cut: the base architecture cut "
        "out of the expanded network by importance (as `growth compress`)")
    @field_validator("budget")
    @classmethod
    def _base_size(cls, value: float | None) -> float | None:
        if value is not None:
            raise ValueError("REC compresses back to the base trunk's size; leave budget "
                             "unset (it is for `growth compress`)")
        return value

    old_heads: Literal["parent", "teacher", "none"] = Field(
        "none", description="old heads are distilled from the network before this task's "
        "expansion (as LwF), from the expanded teacher, or not at all")


class RECParams(MWCParams):
    """REC settings: MWC's (lambda, beta, fisher_samples), then `search` and `compress`,
    each a section of settings, or a switch (`search: off` = `search: {enabled: false}`)."""

    search: SearchSettings = Field(default_factory=SearchSettings,
                                   description="the expansion search per task (off: keep the "
                                   "network)")
    compress: RECCompress = Field(default_factory=RECCompress, description="compression back "
                                  "to the base trunk (off: keep the expanded network)")
    expansion: Literal["shared", "private"] = Field(
        "private", description="shared: Net2Net children (widened units and inserted layers "
        "every head reads; old tasks' Fisher protects the copies); private: children add units "
        "only the new task reads (widen_private) and train them and the new head alone, the "
        "network they grew from frozen, so the old heads do not move while they train")
    protect_copies: bool = Field(
        True, description="after Net2Wider, old tasks' Fisher is split among a unit's copies "
        "(each of c copies: d^2 / c of it), so a change that moves the copies together costs "
        "what the parent's change cost, and a layer Net2Deeper inserts is anchored at its "
        "identity with each old task's mean Fisher; off: copies and inserted layers are free "
        "(MWC's own roles)")
    owners: OwnerSettings = Field(default_factory=OwnerSettings, description="hard "
                                  "protection: trunk weights owned by the task that needs "
                                  "them, as PackNet's (off: the MWC penalty alone)")

    @field_validator("search", "compress", "owners", mode="before")
    @classmethod
    def _switch(cls, value: Any) -> Any:
        if isinstance(value, str) and value.lower() in ("on", "off", "true", "false"):
            value = value.lower() in ("on", "true")
        if isinstance(value, bool):
            return {"enabled": value}
        return {} if value is None else value




class REC(MWC):
    name = "rec"
    description = "regularize (MWC), expand (architecture search), compress back to base size"
    Params = RECParams
    params: RECParams
    scenario_advice = ("its owner masks pick each task's weights by the task id; "
                       "strategy.owners=off runs it in the class and domain scenarios")

    def __init__(self, params: RECParams | None = None) -> None:
        super().__init__(params)
        if self.params.protect_copies:
            self.state_roles = {**MWC.state_roles, "fisher": SPLIT}
        self.state_roles = {**self.state_roles, OWNER: MASK}
        self._parent: NetGraph | None = None
        self._teacher: NetGraph | None = None  # the expanded network of this task, if any
        self._retraining = False  # the task trains the weights it kept, not the free ones
        self._owned: Guard | None = None
        self._parent_state: dict[str, torch.Tensor] = {}
        self._frozen = FrozenParent()  # a private child's parent entries

    def state_spec(self) -> dict[str, TensorSpec]:
        spec = {**super().state_spec(),
                CONTROLLER: TensorSpec(("all",), "any", "any", parameter=False, required=False)}
        if self.params.owners.enabled:
            spec[OWNER] = TensorSpec(("all",), "same", "int")
        return spec

    def overridden(self) -> set[str]:
        hooks = super().overridden()
        return hooks if self.params.owners.enabled else hooks - {"evaluation"}

    @property  # type: ignore[override]
    def scenarios(self) -> tuple[str, ...]:
        """Owners pick a task's weights by its id: the task scenario only; without them, any."""
        return ("task",) if self.params.owners.enabled else ("task", "class", "domain")

    # ---- hooks -------------------------------------------------------------------------------
    def before_task(self, ctx: Context) -> None:
        if "base" not in self.extra:  # the first task: the base network is the reference
            graph = ctx.model.graph
            self.extra["base"] = {"structure": graph.to_dict(), "trunk": trunk_params(graph)}
        owners = self.params.owners
        if owners.enabled and owners.store == "packed":
            check_packable(ctx.model.named_parameters(), masked_names(ctx.model), owners.bits,
                           ctx.task.index)
        super().before_task(ctx)  # MWC: relatedness of task t, measured on the network

    def after_task(self, ctx: Context) -> None:
        entry = self._entry(ctx)
        self._teacher = None
        if self.finished():
            self._parent = ctx.model.graph  # trained on task t: the network the search grows
            self._parent_state = dict(self.state)
            if self.params.search.enabled:
                self._expand(ctx, entry)
            if self.params.compress.enabled:
                self._compress(ctx, entry)
        if self.params.owners.enabled:
            self._take(ctx, entry)
        super().after_task(ctx)  # MWC: Fisher and anchors of task t on the final network
        self._frozen.release()
        self._teacher = None
        self._check_size(ctx, entry)

    # ---- a private expansion's child: its parent frozen -----------------------------------
    def follow(self, ctx: Context, records: list[ChangeRecord]) -> None:
        super().follow(ctx, records)
        if self.params.protect_copies:
            self._anchor_inserted(ctx, records)
        if self.params.expansion == "private" and not self.params.search.enabled and any(
                r.op == "widen_private" for r in records):
            self._frozen.entries = parent_entries(ctx, records)

    def _anchor_inserted(self, ctx: Context, records: list[ChangeRecord]) -> None:
        """Old tasks' anchors at an inserted layer's identity, with each task's mean Fisher:
        its true importance needs the old data, but leaving it free lets the new task move
        every old head's input through it."""
        params = ctx.model.named_parameters()
        added = [n for r in records if r.op == "net2deeper" for n in r.added if n in params]
        fresh = fresh_entries(ctx, records)  # zero columns of units the old tasks never read
        for k in self.finished():
            fisher = stored(self.state, "fisher", k)
            if not fisher or not (added or fresh):
                continue
            level = float(sum(f.double().sum() for f in fisher.values()) /
                          sum(f.numel() for f in fisher.values()))
            for name in added:
                p = params[name].detach()
                self.state[f"anchor/{k}/{name}"] = p.clone()
                self.state[f"fisher/{k}/{name}"] = torch.full_like(p, level)
            for name, mask in fresh.items():  # anchored at 0 (the anchors carried them so)
                key = f"fisher/{k}/{name}"
                if key in self.state:
                    self.state[key] = torch.where(mask, torch.full_like(self.state[key], level),
                                                  self.state[key])
        self._quad = None

    @contextmanager
    def training(self, ctx: Context) -> Iterator[None]:
        with ExitStack() as stack:
            stack.enter_context(self._frozen.training(ctx))
            self._owned = None
            if self.params.owners.enabled:
                stack.enter_context(self._hold_owned(ctx))
            yield

    @contextmanager
    def _hold_owned(self, ctx: Context) -> Iterator[None]:
        """Owned weights (or, while the task retrains what it kept, every other weight) held
        still; after the first task, the shared tensors too (`shared: mwc`: BatchNorm alone,
        biases train under the penalty). A private child's parent biases are held by its
        FrozenParent, and its new units' train."""
        owners = owner_table(self.state, ctx.model, len(self.finished()))
        mine = ctx.task.index + 1 if self._retraining else 0
        with ExitStack() as stack:
            if self.finished() and not self._frozen.entries:
                stack.enter_context(frozen_shared(ctx.model) if self.params.owners.shared ==
                                    "frozen" else held_norms(ctx.model))
            self._owned = Guard(ctx.model.named_parameters(),
                                {n: o == mine for n, o in owners.items()})
            stack.callback(self._owned.restore)
            yield
        self._owned = None

    def after_backward(self, ctx: Context) -> None:
        self._frozen.after_backward()
        if self._owned is not None:
            self._owned.mask_grads()

    def after_step(self, ctx: Context) -> None:
        self._frozen.after_step()
        if self._owned is not None and decays(ctx.optimizer):  # decay moves zero-grad entries
            self._owned.restore()

    # ---- owners: hard protection ------------------------------------------------------------
    def components(self, ctx: Context) -> Iterable[Component]:
        """MWC's terms; with owners, on the shared tensors alone: an owned weight is held, and
        a free one is read by no finished task (zeroed when it is scored)."""
        terms = super().components(ctx)
        if not self.params.owners.enabled:
            return terms
        masked = set(masked_names(ctx.model))
        return ((scale, {n: f for n, f in fisher.items() if n not in masked},
                 {n: a for n, a in anchor.items() if n not in masked})
                for scale, fisher, anchor in terms)

    def _take(self, ctx: Context, entry: dict[str, Any]) -> None:
        """Task t takes the free weights, gives back the `prune` share it needs least, and
        retrains the rest (distilled from the expanded network, if there is one)."""
        settings = self.params.owners
        k = ctx.task.index
        owners = owner_table(self.state, ctx.model, len(self.finished()))
        params = ctx.model.named_parameters()
        scores = (task_fisher(ctx, ctx.task, self.params.fisher_samples)
                  if settings.importance == "fisher" else
                  {n: p.detach().abs() for n, p in params.items()})
        kept = take(owners, params, scores, k, settings.prune)
        entry["owned"] = {"kept": sum(kept.values()),
                          "free": sum(int((o == 0).sum()) for o in owners.values())}
        if settings.retrain_epochs:
            self._retraining = True
            try:
                self._retrain(ctx, settings.retrain_epochs)
            finally:
                self._retraining = False
        if settings.store == "packed":
            pack(owners, params, settings.bits)
        self._quad = None
        log.info("task %d: owns %d weights, %d left free", k, entry["owned"]["kept"],
                 entry["owned"]["free"])

    def _retrain(self, ctx: Context, epochs: int) -> None:
        if (self._teacher is None or ctx.train_config is None
                or self.params.owners.retrain == "loss"):
            ctx.train_fit(epochs=epochs)
            return
        settings = self.params.compress.model_copy(update={"epochs": epochs})
        distill(ctx, self._teacher, settings, ctx.train_config, [ctx.head_of(ctx.task)],
                self._mwc_penalty, ctx.seed + 2, hold=self)

    @contextmanager
    def evaluation(self, ctx: Context, task: Task) -> Iterator[Scorer]:
        """A finished task computes with the weights it and the tasks before it own (the
        others zeroed for the split); the task being learned, with the network as it is."""
        head = ctx.model.head(ctx.head_of(task))
        if task.index not in self.finished():
            yield head
            return
        owners = owner_table(self.state, ctx.model, len(self.finished()))
        params = ctx.model.named_parameters()
        values = {n: params[n].detach() * visible(o, task.index).to(params[n].device)
                  for n, o in owners.items()}
        with swapped(dict(ctx.model.module.state_dict(keep_vars=True)), values):
            yield head

    def size_parts(self, model: Model) -> dict[str, list[Any]]:
        """Trunk and heads, plus (owners) the owner indices in the bits the tasks need, unless
        they are packed into the weights themselves."""
        parts = super().size_parts(model)
        if self.params.owners.enabled and self.params.owners.store == "table":
            tasks = len(self.finished())
            parts["masks"] = mask_sizes(owner_table(self.state, model, tasks), tasks)
        return parts

    # ---- expand ----------------------------------------------------------------------------
    def _expand(self, ctx: Context, entry: dict[str, Any]) -> None:
        """Search children of the trained network; a child that beats it replaces it (state
        follows its records)."""
        if ctx.searcher is None or ctx.train_config is None:
            raise ConfigError("REC's search needs a searcher and the task's training settings "
                              "(run it through a campaign, or set ctx.searcher and "
                              "ctx.train_config)")
        parent_acc = evaluate(ctx, ctx.task, "val")
        if not math.isfinite(parent_acc):
            raise DivergedError(f"REC on task {ctx.task.name!r}: the validation accuracy is "
                                f"{parent_acc} (an empty validation split?); children are "
                                "chosen on validation data: set data.val_fraction above 0")
        settings = self.params.model_dump(mode="json", by_alias=True, exclude_none=True)
        search = self.params.search
        if self.params.expansion == "private":
            space = (search.space or SpaceSpec()).model_copy(update={"private": True})
            search = search.model_copy(update={"space": space})
        request = SearchRequest(
            settings=search, train=ctx.train_config,
            child_strategy=(self.name, {**settings, "search": False, "compress": False}),
            parent_acc=parent_acc, controller_state=self._controller())
        start = time.perf_counter()
        found = ctx.searcher.search(ctx, request)
        entry["search_wall_s"] = time.perf_counter() - start
        entry.update(found.summary)
        if found.controller_state is not None:
            self._keep_controller(found.controller_state)
        if found.graph is not None:
            ctx.replace_graph(found.graph, found.records)
            self._quad = None
        log.info("task %d: expansion %s (%d children trained in %.1fs; the network's "
                 "validation accuracy %.4f, best child's %s)", ctx.task.index,
                 "kept the network" if found.graph is None else entry.get("expansion"),
                 entry.get("children", 0), entry.get("child_time_s", 0.0), parent_acc,
                 entry.get("best_child_val"))

    def _controller(self) -> ControllerState | None:
        return stored_controller(self.state, self.extra)

    def _keep_controller(self, found: ControllerState) -> None:
        self.state = store_controller(self.state, self.extra, found)

    # ---- compress --------------------------------------------------------------------------
    def _compress(self, ctx: Context, entry: dict[str, Any]) -> None:
        self._frozen.release()  # the student learns in every unit
        settings = self.params.compress
        base = NetGraph.from_dict(self.extra["base"]["structure"])
        graph = ctx.model.graph
        unchanged = (graph.to_dict() == self._parent.to_dict() if settings.student == "parent"
                     else graph.to_dict() == base.to_dict())
        if unchanged and trunk_params(graph) <= self._limit():
            entry["compression"] = "none needed (the network is the base architecture)"
            return
        if ctx.train_config is None:
            raise ConfigError("REC's compression needs the task's training settings "
                              "(ctx.train_config, set by the training loop)")
        if settings.epochs is None:
            settings = settings.model_copy(update={"epochs": ctx.train_config.epochs})
        heads = [ctx.head_of(ctx.task)] if settings.old_heads == "none" else default_heads(ctx)
        old_teacher = self._parent if settings.old_heads == "parent" else None
        if settings.student == "cut":
            importance = self._old_importance(ctx) if settings.importance == "fisher" else None
            report = compress(ctx, settings, ctx.train_config, base=base, heads=heads,
                              penalty=self._mwc_penalty, importance=importance,
                              seed=ctx.seed + 1, old_teacher=old_teacher)
            summary = report.summary()
        else:
            summary = self._distil_into_parent(ctx, graph, heads, old_teacher, settings)
        self._quad = None
        entry["compression"] = summary
        log.info("task %d: compressed trunk %d -> %d parameters (budget %d); task accuracy "
                 "%s -> %s", ctx.task.index, summary["trunk_before"], summary["trunk_after"],
                 summary["budget"], _fmt(summary["accuracy_before"]),
                 _fmt(summary["accuracy_after"]))

    def _distil_into_parent(self, ctx: Context, teacher: NetGraph, heads: list[str],
                            old_teacher: NetGraph | None, settings: RECCompress
                            ) -> dict[str, Any]:
        """The student is the parent: its graph and this strategy's state as they were before
        the expansion (both in the parent's shapes, so nothing needs carrying; the controller
        keeps what it learned in the search)."""
        start = time.perf_counter()
        splits = ("val", "test")
        before = split_accuracies(ctx, ctx.task, splits)
        ctx.model.replace_graph(self._parent)
        ctx.optimizer = None
        learned = {k: v for k, v in self.state.items() if k.startswith(f"{CONTROLLER}/")}
        kept = {k: v for k, v in self._parent_state.items() if not k.startswith(f"{CONTROLLER}/")}
        self.state = {**kept, **learned}
        self._quad = None
        self._teacher = teacher
        hold = self if self.params.owners.enabled else None
        losses = distill(ctx, teacher, settings, ctx.train_config, heads,
                         self._mwc_penalty, ctx.seed + 1, old_teacher, hold=hold)
        return {"budget": self._limit(), "trunk_before": trunk_params(teacher),
                "trunk_after": trunk_params(self._parent),
                "params_before": teacher.param_count(),
                "params_after": self._parent.param_count(), "accuracy_before": before,
                "accuracy_after": split_accuracies(ctx, ctx.task, splits),
                "dropped": [n for n in teacher.topo_order() if n not in self._parent],
                "student": "parent", "losses": losses,
                "wall_time_s": time.perf_counter() - start}

    def _mwc_penalty(self, ctx: Context, x: torch.Tensor, y: torch.Tensor,
                     logits: torch.Tensor) -> torch.Tensor | None:
        return MWC.penalty(self, ctx, x, y, logits)

    def _old_importance(self, ctx: Context) -> dict[str, torch.Tensor]:
        """sum_k w_{k,t} F_k over the finished tasks, in the current network's shapes."""
        rec = self.relatedness(ctx)
        total: dict[str, torch.Tensor] = {}
        for k, w in zip(rec["tasks"], rec["w"]):
            for name, f in stored(self.state, "fisher", k).items():
                total[name] = total[name] + w * f if name in total else w * f
        return total

    # ---- invariants and records ----------------------------------------------------------
    def _check_size(self, ctx: Context, entry: dict[str, Any]) -> None:
        trunk = trunk_params(ctx.model.graph)
        entry["trunk_params"] = trunk
        if not self.params.compress.enabled:
            return
        limit = self._limit()
        if trunk > limit:
            raise OperatorError(f"REC after task {ctx.task.index}: the trunk has {trunk:,} "
                                f"parameters, above its budget of {limit:,}")

    def _limit(self) -> int:
        """The trunk budget in parameters: the base trunk's size."""
        return int(self.extra["base"]["trunk"])

    def _entry(self, ctx: Context) -> dict[str, Any]:
        return self.extra.setdefault("rec", {}).setdefault(str(ctx.task.index), {})

    def run_report(self) -> dict[str, Any]:
        tasks = self.extra.get("rec", {})
        children = sum(int(e.get("children", 0)) for e in tasks.values())
        child_time = sum(float(e.get("child_time_s", 0.0)) for e in tasks.values())
        wall = sum(float(e.get("search_wall_s", 0.0)) for e in tasks.values())
        searched = [e for e in tasks.values() if "expansion" in e]
        kept = sum(1 for e in searched if e["expansion"] == "parent")
        return {"search": {"children": children, "child_time_s": child_time,
                           "search_wall_s": wall, "searches": len(searched),
                           "parent_kept": kept},
                "details": {"rec": tasks}}


def _fmt(acc: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in acc.items())

