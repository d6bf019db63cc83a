"""A controller as a Ray Tune search algorithm, one generation at a time.

Tune asks `suggest` for trial configs and reports finished trials to `on_trial_complete`;
here the first comes from `controller.propose` and the second feeds `controller.observe`, once
per generation with every child's accuracy in proposal order (a batched REINFORCE update does
not depend on which trial finished first). While a generation still has trials running,
`suggest` answers "nothing yet"; once it is observed, the searcher asks its source (the
driver) for the next generation, so one Tune experiment can run several generations on the
same trial actors. The controller proposes children distinct from each other and from the
search's earlier generations (`Generation.exclude`); a child finished by an earlier attempt at
the generation (after a resume) is not given to Tune again. The local backend of the driver
drives the same searcher without Tune (`advance`, `pending`, `trial_config`, `result`).

Known Tune pitfalls handled here: `save`/`restore` are implemented (Tune otherwise skips them
and the controller's learning is silently lost on `Tuner.restore`); the searcher holds only
plain data and the controller, so Tune can cloudpickle it into `tuner.pkl` (the live source
is left out); and `on_trial_complete` accepts trial ids it never handed out (Tune reports
them after a restore) by reading the child's generation and index from the trial's config.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass, field
from typing import Any, Protocol

from growth.controllers.records import child_key
from growth.controllers.trial import child_seed, local_folder
from ray.tune.search import Searcher

from growth.graph import NetGraph

METRIC = "val_acc"


@dataclass
class Generation:
    """One generation as the driver plans it."""

    generation: int
    n: int  # children to propose
    parent: str  # the graph folder (path or URI) they grow from
    base_config: dict[str, Any] = field(default_factory=dict)  # JSON in every trial config
    known: dict[int, float | None] = field(default_factory=dict)  # finished earlier, by index
    exclude: frozenset[str] = frozenset()  # architectures trained by earlier generations


class GenerationSource(Protocol):
    """Where a searcher's generations come from (the driver)."""

    def next_generation(self) -> Generation | None:
        """The next generation to run, or None when there is none (for this experiment)."""

    def began(self, searcher: ControllerSearcher) -> None:
        """The generation's children are proposed (`searcher.to_train` need trials)."""

    def ended(self, searcher: ControllerSearcher) -> None:
        """The generation is over and the controller has observed it."""


class _Once:
    """A source of exactly one generation."""

    def __init__(self, generation: Generation) -> None:
        self.generation: Generation | None = generation

    def next_generation(self) -> Generation | None:
        out, self.generation = self.generation, None
        return out

    def began(self, searcher: ControllerSearcher) -> None:
        pass

    def ended(self, searcher: ControllerSearcher) -> None:
        pass


class ControllerSearcher(Searcher):
    """Runs `controller` over the generations `source` plans (one Generation: just that)."""

    def __init__(self, controller: Any, source: GenerationSource | Generation,
                 seed: int = 0) -> None:
        super().__init__(metric=METRIC, mode="max")
        self.controller = controller
        self.source: GenerationSource | None = (_Once(source) if isinstance(source, Generation)
                                                else source)
        self.seed = int(seed)
        self.gen: Generation | None = None
        self.proposals: list[Any] = []
        self.results: dict[int, float | None] = {}
        self.pending: list[int] = []
        self.running: dict[str, int] = {}
        self.observed = False
        self.ended = False
        self.done = False

    # ---- generations ----------------------------------------------------------------------
    def advance(self) -> bool:
        """Go on to a generation with children to train, ending generations that are over on
        the way; False once the source has no generation left."""
        while not self.done:
            if self.gen is not None and not self.observed:
                return True
            self._end()
            plan = self.source.next_generation() if self.source is not None else None
            if plan is None:
                self.done = True
                break
            self._begin(plan)
        return False

    def finish(self) -> None:
        """End the current generation, counting children that never reported as failed (the
        experiment stopped); call once Tune's fit returns."""
        if self.gen is not None and not self.observed:
            for i in range(len(self.proposals)):
                if i not in self.results:
                    self.result(i, None)
            self.pending, self.running = [], {}
        self._end()

    def _begin(self, plan: Generation) -> None:
        self.gen = plan
        with local_folder(plan.parent) as folder:
            parent = NetGraph.load(folder)
        self.proposals = list(self.controller.propose(parent, plan.n, plan.exclude))
        self.results = {i: plan.known[i] for i in range(len(self.proposals)) if i in plan.known}
        self.pending = [i for i in range(len(self.proposals)) if i not in self.results]
        self.running = {}
        self.observed = self.ended = False
        if self.source is not None:
            self.source.began(self)
        self._maybe_observe()

    def _end(self) -> None:
        if self.gen is not None and self.observed and not self.ended:
            self.ended = True
            if self.source is not None:
                self.source.ended(self)

    @property
    def generation(self) -> int | None:
        return None if self.gen is None else self.gen.generation

    @property
    def to_train(self) -> list[int]:
        """Indices of the current generation's children that still need a trial."""
        return list(self.pending) + sorted(self.running.values())

    def trial_config(self, index: int) -> dict[str, Any]:
        """The JSON config of child `index`'s trial."""
        assert self.gen is not None
        g, p = self.gen.generation, self.proposals[index]
        return {**self.gen.base_config, "key": child_key(g, index), "generation": g,
                "index": index, "parent": self.gen.parent,
                "actions": [dict(a) for a in p.actions], "arch": p.arch,
                "seed": child_seed(self.seed, g, index)}

    def result(self, index: int, acc: float | None) -> None:
        """Child `index` of the current generation finished with accuracy `acc` (None:
        failed)."""
        if self.gen is None or index in self.results or not 0 <= index < len(self.proposals):
            return
        acc = float(acc) if acc is not None and math.isfinite(float(acc)) else None
        self.results[index] = acc
        self._maybe_observe()

    def _maybe_observe(self) -> None:
        if self.observed or self.gen is None or len(self.results) < len(self.proposals):
            return
        self.controller.observe([(p, self.results[i]) for i, p in enumerate(self.proposals)])
        self.observed = True

    # ---- the Tune Searcher interface ------------------------------------------------------
    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if not self.advance():
            return Searcher.FINISHED
        if not self.pending:
            return None  # the generation's last trials are still running
        index = self.pending.pop(0)
        self.running[trial_id] = index
        return self.trial_config(index)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None,
                          error: bool = False) -> None:
        index = self.running.pop(trial_id, None)
        if index is None:  # a trial this searcher did not hand out (Tune after a restore)
            config = (result or {}).get("config") or {}
            if config.get("generation") != self.generation or "index" not in config:
                return
            index = int(config["index"])
        ok = not error and result is not None and result.get("status") == "ok"
        self.result(index, result.get(METRIC) if ok and result is not None else None)

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles the searcher into tuner.pkl
        return {**self.__dict__, "source": None}

    def get_state(self) -> dict[str, Any]:
        tensors, extra = self.controller.state_dict()
        keep = ("gen", "proposals", "results", "pending", "running", "observed", "ended",
                "done", "seed")
        return {"controller": ({k: v.detach().cpu() for k, v in tensors.items()}, extra),
                **{k: getattr(self, k) for k in keep}}

    def set_state(self, state: dict[str, Any]) -> None:
        tensors, extra = state.pop("controller")
        self.controller.load_state_dict(tensors, extra)
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.set_state(pickle.load(f))
