"""The searcher a campaign hands its strategies (`growth.searching.Searcher`).

`SearchService.search(ctx, request)` runs one architecture search of `ctx.model` on
`ctx.task` through the driver (`run_search`) in `ctx.workdir/search`, so calling it again there
resumes it. It
- writes the parent beside its state: the graph, the calling strategy's state in the parent's
  shapes and the optimizer's moments (children go on from both);
- builds the space and the controller, restoring the controller the request carries (one
  controller learns across a campaign's tasks; the caller keeps its state in its checkpoint);
- trains children on the backend the settings choose: in this process, on Ray actors, or as
  Ray Tune trials, on a Ray the service starts (or joins) on the first search that needs it
  and holds until the campaign ends, with the `ray` backend's actors (a `WorkerPool`: torch
  and the engine imported once per actor) held as long, so a campaign pays Ray's start-up
  and its workers' once and a run with nothing left to train pays it never (a campaign that
  runs as a Ray task, one of several on a cluster, gives its actors back after each search
  instead: their CPUs are others' between its searches);
- returns the chosen child, rebuilt with the space to get the operators' change records from
  the parent (the caller's state follows them), or None when no child's score beat the
  parent's by the margin (`settings.parent` and `settings.cost` say which children compete
  and how they score: `growth.searching.score`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, nullcontext
from pathlib import Path
from typing import Any

from growth.controllers.pool import WorkerPool

from growth.context import Context
from growth.errors import CheckpointError, ConfigError
from growth.graph import NetGraph
from growth.searching import SearchOutcome, SearchRequest, SearchSettings

PARENT = "parent"


def check_search_settings(settings: SearchSettings, where: str) -> None:
    """The controller's name and its own settings, as config load checks every key."""
    from growth.controllers import available_controllers
    from growth.controllers.base import validate_settings

    found = available_controllers()
    if settings.controller not in found:
        raise ConfigError(f"{where}.controller: unknown controller {settings.controller!r}; "
                          f"available: {sorted(found)}")
    model = getattr(found[settings.controller], "Settings", None)
    if model is not None:
        validate_settings(model, settings.controller_params, f"{where}.controller_params")


class SearchService:
    """Runs searches for a campaign's strategies; holds Ray (if any search needs it) until
    `close` (or the end of a `with` block)."""

    def __init__(self, log_file: Path | None = None, ray_address: str | None = None,
                 on_start: Callable[[int, int], None] | None = None,
                 on_child: Callable[[int, Any], None] | None = None,
                 on_end: Callable[[int], None] | None = None) -> None:
        """on_start(task index, children the budget allows), on_child(task index, its
        ChildRecord) and on_end(task index): progress hooks around each search."""
        self.log_file = log_file
        self.ray_address = ray_address
        self.on_start = on_start or (lambda task, children: None)
        self.on_child = on_child or (lambda task, record: None)
        self.on_end = on_end or (lambda task: None)
        self.cluster: Any = None
        self.pool = WorkerPool()  # the `ray` backend's actors, started by the first search
        self.child_s: float | None = None  # a child's training time, from the last search
        self._stack = ExitStack()

    def __enter__(self) -> SearchService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the pool's actors, then stop (or leave) the Ray this service started or
        joined."""
        try:
            self.pool.close()  # while Ray is still there
        finally:
            self._stack.close()
            self.cluster = None

    def _connect(self, address: str | None) -> AbstractContextManager[Any]:
        from growth.cluster import ray_cluster

        if self.cluster is None:
            self.cluster = self._stack.enter_context(
                ray_cluster(address or self.ray_address, log_file=self.log_file))
        return nullcontext(self.cluster)

    # ---- the Searcher protocol ---------------------------------------------------------------
    def search(self, ctx: Context, request: SearchRequest) -> SearchOutcome:
        from growth.controllers import make_controller
        from growth.controllers.driver import (
            Budget,
            Resources,
            SearchProgress,
            in_ray_task,
            run_search,
        )
        from growth.controllers.trial import (
            StrategyRef,
            TaskMeta,
            TrialSpec,
            save_moments,
            save_strategy_state,
        )
        from growth.search_spaces.space import make_space

        if ctx.workdir is None:
            raise ConfigError("a search needs a folder: run it through a campaign, or set "
                              "ctx.workdir")
        s, start = request.settings, time.perf_counter()
        folder = Path(ctx.workdir) / "search"
        graph = ctx.model.graph
        parent = folder / PARENT
        if not (parent / "structure.json").is_file():
            graph.save(parent)
            if ctx.strategy is not None:
                save_strategy_state(ctx.strategy, parent)
            save_moments(ctx.optimizer, ctx.model.named_parameters(), parent)
        where = "strategy.search"
        space = make_space(s.space, graph, where=f"{where}.space")
        controller = make_controller(s.controller, space, s.controller_params, seed=ctx.seed,
                                     where=f"{where}.controller")
        if request.controller_state is not None:
            controller.load_state_dict(*request.controller_state)
        train = request.train.model_copy(update={
            "epochs": s.epochs, "lr": request.train.lr * s.lr_scale, "schedule": s.schedule,
            "warmup_epochs": 0})
        name, params = request.child_strategy
        spec = TrialSpec(train=train, strategy=StrategyRef(name=name, params=params),
                         scenario=ctx.scenario, seen=[TaskMeta.of(t) for t in ctx.seen],
                         device=str(ctx.device),
                         threads=max(1, int(s.cpus_per_trial)))
        index = ctx.task.index
        self.on_start(index, s.children * s.generations)
        try:
            result = run_search(
                folder, parent, controller, space, ctx.task, spec,
                Budget(children=s.children, generations=s.generations),
                Resources(concurrency=s.concurrency, cpus_per_trial=s.cpus_per_trial),
                seed=ctx.seed, parent_acc=request.parent_acc, policy=s.parent, margin=s.margin,
                cost=s.cost, backend=s.backend, child_s=self.child_s, log_file=self.log_file,
                progress=SearchProgress(on_child=lambda rec, board: self.on_child(index, rec)),
                connect=lambda: self._connect(s.ray_address), pool=self.pool)
        finally:
            self.on_end(index)
            if in_ray_task():  # a campaign of several on one cluster: CPUs back between searches
                self.pool.close()
        times = [r.train_time_s for r in result.records if r.ok]
        if times:
            self.child_s = sum(times) / len(times)
        summary = {"children": len(result.records),
                   "failed": sum(1 for r in result.records if not r.ok),
                   "child_time_s": sum(r.train_time_s for r in result.records),
                   "generations": result.generations, "parent_kept": result.kept,
                   "parent_acc": request.parent_acc,
                   "best_child_val": result.best.val_acc if result.best else None,
                   "search_wall_s": time.perf_counter() - start}
        state = controller.state_dict()
        if not result.replaced:
            return SearchOutcome(None, [], {**summary, "expansion": "parent"}, state)
        child = NetGraph.load(result.parent)
        actions = [a for step in result.lineage for a in step]
        rebuilt, records = space.apply(graph, actions, sample=ctx.task.train[0][:spec.sample_size])
        if rebuilt.to_dict() != child.to_dict():
            raise CheckpointError(f"{result.parent}: the chosen child's structure differs from "
                                  "its actions applied to the parent; the search folder "
                                  f"{folder} belongs to another run")
        return SearchOutcome(child, records, {**summary, "expansion": actions,
                                              "arch": space.arch(child),
                                              "val_acc": result.parent_acc}, state)

