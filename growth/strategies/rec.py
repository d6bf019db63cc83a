"""REC: Regularize, Expand, Compress (the project's definition, docs/methods.md).

Task 1 trains the base network with the task loss. Every later task t:
1. Regularize: MWC. Its relatedness weights w_{k,t} are measured on the parent network at the
   start of the task; the loss is CE_t plus the MWC penalty throughout (search children,
   training, distillation).
2. Expand: an architecture search on the current network (the EAS controller, or random
   search, through the search driver on Ray Tune: `growth.controllers.driver.run_search`); every child
   is trained with the MWC loss on task t and scored on task t's validation split; the best
   child replaces the network, carrying the strategy's state along its operator records.
   `search: off` keeps the parent.
3. The kept network's training is finished with MWC (the loop's own epochs).
4. Compress: back to at most the base trunk's parameter count (`growth.compress.compress`:
   the base architecture cut out of the expanded network, distilled on task t with KL at T = 2
   on task t's head and every old head, plus the MWC penalty). `compress: off` keeps the
   expanded network.
5. Consolidate: Fisher and anchors of task t on the final network; older tasks' Fisher and
   anchors were carried through the expansion and the compression by `growth.remap`.

Old tasks' data are never read after their task: the search, the training, the compression
and the Fisher all read task t's splits only (earlier tasks reach a search trial as metadata).
After every task the trunk must fit the base trunk's size unless compression is off.
With `search: off` and `compress: off` REC is MWC, to the last digit.

The search runs in `ctx.workdir/search` (the campaign gives each task a folder), so a killed
run resumes the search where it stopped: finished children are kept and not trained again.
"""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from growth.compress import CompressParams, compress, default_heads, distill, trunk_params
from growth.errors import CheckpointError, ConfigError, OperatorError
from growth.graph import NetGraph
from growth.regularizers import stored
from growth.remap import GRADIENT_SQ
from growth.search_spaces.space import SpaceSpec
from growth.strategies.base import Context
from growth.strategies.mwc import MWC, MWCParams

log = logging.getLogger("growth.rec")


class RECSearch(BaseModel):
    """How REC searches an expansion per task (small CPU defaults; the paper's numbers, 10
    children per episode and 20 epochs per child, are reachable by config)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    enabled: bool = Field(True, description="off: keep the parent network")
    controller: Literal["eas", "random"] = "eas"
    controller_params: dict[str, Any] = Field(
        default_factory=dict, description="the controller's own settings (controllers/)")
    space: SpaceSpec | None = Field(None, description="search space (search_spaces/; "
                                    "None: the defaults for the network)")
    children: int = Field(4, ge=1, description="children per generation")
    generations: int = Field(1, ge=1, description="generations per task")
    epochs: int = Field(2, ge=1, description="training epochs of each child")
    concurrency: int = Field(2, ge=1, description="children trained at once")
    cpus_per_trial: float = Field(1.0, gt=0, description="CPUs (torch threads) per child")
    ray_address: str | None = Field(None, description="join this Ray cluster (default: "
                                    "the one already running, or a local one)")

    @model_validator(mode="after")
    def _controller_settings(self) -> RECSearch:
        """The controller's own settings are checked at config load, like every other key."""
        from growth.controllers.eas import EASSettings
        from growth.controllers.random_search import RandomSettings

        model = {"eas": EASSettings, "random": RandomSettings}[self.controller]
        try:
            model.model_validate(self.controller_params)
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(p) for p in err["loc"])
            raise ValueError(f"controller_params.{key}: {err['msg']}") from None
        return self


class RECCompress(CompressParams):
    """How REC compresses after each task (growth.compress; budget None: the base trunk)."""

    enabled: bool = Field(True, description="off: keep the expanded network")
    epochs: int | None = Field(None, ge=0, description="distillation epochs on the task's "
                               "data (None: the task's train.epochs)")
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

    search: RECSearch = Field(default_factory=RECSearch,
                              description="the expansion search per task (off: keep the parent)")
    compress: RECCompress = Field(default_factory=RECCompress, description="compression back "
                                  "to the base trunk (off: keep the expanded network)")
    protect_copies: bool = Field(
        True, description="after Net2Wider, old tasks' Fisher covers every copy of a unit "
        "(the widened network's own Fisher), not only the original")

    @field_validator("search", "compress", mode="before")
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

    def __init__(self, params: RECParams | None = None) -> None:
        super().__init__(params)
        if self.params.protect_copies:
            self.state_roles = {**MWC.state_roles, "fisher": GRADIENT_SQ}
        self._parent: NetGraph | None = None

    def session(self, workdir: Path) -> AbstractContextManager[Any]:
        """One Ray for every task's search (started once, or the cluster already joined)."""
        if not self.params.search.enabled:
            return nullcontext()
        from growth.cluster import ray_cluster

        workdir.mkdir(parents=True, exist_ok=True)
        return ray_cluster(self.params.search.ray_address, log_file=workdir / "ray.log")

    # ---- hooks -------------------------------------------------------------------------------
    def before_task(self, ctx: Context) -> None:
        if "base" not in self.extra:  # the first task: the base network is the reference
            graph = ctx.model.graph
            self.extra["base"] = {"structure": graph.to_dict(), "trunk": trunk_params(graph)}
        super().before_task(ctx)  # MWC: relatedness of task t, measured on the parent
        self._parent = ctx.model.graph if self.finished() else None
        self._parent_state = dict(self.state)
        entry = self._entry(ctx)
        if self.finished() and self.params.search.enabled and "expansion" not in entry:
            self._expand(ctx, entry)

    def after_task(self, ctx: Context) -> None:
        entry = self._entry(ctx)
        if self.finished() and self.params.compress.enabled:
            self._compress(ctx, entry)
        super().after_task(ctx)  # MWC: Fisher and anchors of task t on the final network
        self._check_size(ctx, entry)

    # ---- expand ----------------------------------------------------------------------------
    def _expand(self, ctx: Context, entry: dict[str, Any]) -> None:
        """Search children of the current network; the best replaces it (state follows)."""
        if ctx.workdir is None or ctx.train_config is None:
            raise ConfigError("REC's search needs a folder and the task's training settings "
                              "(run it through a campaign, or set ctx.workdir and "
                              "ctx.train_config)")
        start = time.perf_counter()
        found = search_expansion(ctx, self)
        entry["search_wall_s"] = time.perf_counter() - start
        entry.update(found.summary)
        if found.graph is not None:
            ctx.replace_graph(found.graph, found.records)
            self._quad = None
        log.info("task %d: expansion %s (%d children trained in %.1fs; best validation "
                 "accuracy %s)", ctx.task.index, entry["expansion"], entry["children"],
                 entry["child_time_s"], entry.get("best_val"))

    # ---- compress --------------------------------------------------------------------------
    def _compress(self, ctx: Context, entry: dict[str, Any]) -> None:
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
        the expansion (both in the parent's shapes, so nothing needs carrying)."""
        from growth.train import evaluate

        start = time.perf_counter()
        splits = ("val", "test")
        before = {s: evaluate(ctx, ctx.task, s) for s in splits}
        ctx.model.replace_graph(self._parent)
        ctx.optimizer = None
        self.state = dict(self._parent_state)
        self._quad = None
        losses = distill(ctx, teacher, settings, ctx.train_config, heads,
                         self._mwc_penalty, ctx.seed + 1, old_teacher)
        return {"budget": self._limit(), "trunk_before": trunk_params(teacher),
                "trunk_after": trunk_params(self._parent),
                "params_before": teacher.param_count(),
                "params_after": self._parent.param_count(), "accuracy_before": before,
                "accuracy_after": {s: evaluate(ctx, ctx.task, s) for s in splits},
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
        return {"search": {"children": children, "child_time_s": child_time,
                           "search_wall_s": wall},
                "details": {"rec": tasks}}


def _fmt(acc: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in acc.items())


# ---- the search: REC's one door into controllers/ ------------------------------------------
@dataclass
class Expansion:
    """The chosen child (None: keep the parent), its operator records and what the search
    cost."""

    graph: NetGraph | None
    records: list[Any]
    summary: dict[str, Any]


def search_expansion(ctx: Context, rec: REC) -> Expansion:
    """Run the architecture search for `ctx.task` from the current network, through the search
    driver's entry point (`growth.controllers.driver.run_search`, children as Ray Tune trials), in
    `ctx.workdir/search`; calling it again there resumes the search."""
    from growth.controllers import make_controller
    from growth.controllers.driver import Budget, Resources, run_search
    from growth.controllers.trial import StrategyRef, TaskMeta, TrialSpec, save_strategy_state
    from growth.search_spaces.space import make_space

    s = rec.params.search
    folder = ctx.workdir / "search"
    parent = ctx.model.graph
    parent_dir = folder / "parent"
    if not (parent_dir / "structure.json").is_file():
        parent.save(parent_dir)
    children_params = {**rec.params.model_dump(mode="json", by_alias=True, exclude_none=True),
                       "search": False, "compress": False}
    ref = StrategyRef(name=rec.name, params=children_params,
                      state=str(save_strategy_state(rec, folder / "strategy")))
    heads = {ctx.head_of(t) for t in [*ctx.seen, ctx.task]}
    spec = TrialSpec(train=ctx.train_config.model_copy(update={"epochs": s.epochs}),
                     strategy=ref, scenario="class" if len(heads) == 1 else "task",
                     seen=[TaskMeta.of(t) for t in ctx.seen], device=ctx.device.type,
                     threads=max(1, int(s.cpus_per_trial)))
    space = make_space(s.space, parent, where="strategy.search.space")  # checks layer names
    controller = make_controller(s.controller, space, s.controller_params, seed=ctx.seed,
                                 where="strategy.search.controller")
    result = run_search(folder, parent_dir, controller, space, ctx.task, spec,
                        Budget(children=s.children, generations=s.generations),
                        Resources(concurrency=s.concurrency, cpus_per_trial=s.cpus_per_trial),
                        seed=ctx.seed, policy="best", ray_address=s.ray_address,
                        log_file=folder / "ray.log")
    summary = {"children": len(result.records),
               "failed": sum(1 for r in result.records if not r.ok),
               "child_time_s": sum(r.train_time_s for r in result.records)}
    best = result.best
    if best is None:
        return Expansion(None, [], {**summary, "expansion": "parent (no child finished)"})
    child = NetGraph.load(result.path(best))
    rebuilt, records = space.apply(parent, list(best.actions),
                                   sample=ctx.task.train[0][:spec.sample_size])
    if rebuilt.to_dict() != child.to_dict():
        raise CheckpointError(f"{result.path(best)}: the best child's structure differs from "
                              "its actions applied to the parent; the search folder "
                              f"{folder} belongs to another run")
    return Expansion(child, records, {**summary, "expansion": list(best.actions),
                                      "arch": best.arch, "best_key": best.key,
                                      "best_val": best.val_acc})
