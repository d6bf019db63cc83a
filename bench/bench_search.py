"""Search benchmark: what Ray Tune costs, what parallel trials buy, what inheriting weights buys.

    python bench/bench_search.py [--child-seconds 10] [--children 4] [--seed 0] [--child-epochs 2]

On digits (all ten classes as one task) with a small CNN base trained first, children are
proposed by the random controller over a Net2Net space.

- tune_overhead: wall time of `--children` children trained as Tune trials one at a time
  (`run_search`, concurrency 1; Ray already started, the experiment's start-up and its trial
  process's warm-up counted) over the same children (same actions, same seeds) trained
  in-process one after the other with the trial's own body (`growth.controllers.trial.train_child`),
  timed before and after the Tune run (their mean). Children are sized to train for about
  `--child-seconds` each. Target <= 1.2 for children of about 10 s.
- parallel_speedup: 2 children as 2 trials at once on 2 CPUs over the same 2 one after the
  other (both through `run_search`). Target >= 1.6.
- inherit_speedup: optimisation steps a randomly initialised child needs to reach its
  parent's validation accuracy over the steps the Net2Net-initialised child (same
  architecture, same training) needs; accuracy is checked after every epoch, so the
  inheriting child counts at least one epoch. Target >= 5.

- fixed_s: the wall time of one generation of 4 children that train one step each, minus
  their training time (Ray already started, as for a campaign's second search): what a
  generation costs beyond its work. Target <= 3 s. Printed for the Ray backend and the local one.
- children_vs_continued: a child's validation accuracy after `--child-epochs` epochs minus
  the parent's continued for the same epochs with the same recipe (the empty child), mean over
  the children; with the search's recipe (the parent's moments, lr x 0.5, cosine) and with a
  cold restart (a fresh optimizer at the full lr, constant), the recipe children had before.

Last line: `search: tune_overhead=R parallel_speedup=S inherit_speedup=I fixed_s=F`.
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from growth.controllers import make_controller
from growth.controllers.driver import Budget, Resources, run_search
from growth.controllers.searcher import ControllerSearcher, Generation
from growth.controllers.trial import MOMENTS, TrialSpec, save_moments, train_child
from growth.search_spaces import make_space
from growth.search_spaces.networks import add_head, small_cnn

from growth.cluster import ray_cluster
from growth.data import Task, build_stream
from growth.graph import NetGraph
from growth.model import Model
from growth.scenarios import labelers
from growth.strategies import Context, make_strategy
from growth.train import TrainConfig, evaluate, fit

SPACE = {"widths": {"conv": [16, 24, 32, 48], "fc": [64, 96, 128]}, "kernel_sizes": [3]}
CONTROLLER = {"wider_actions": 2, "deeper_actions": 1}


def context(graph: NetGraph, task: Task) -> Context:
    head_of, label_of = labelers("task")
    return Context(Model(graph), task, [], head_of, label_of, torch.device("cpu"))


def base_network(task: Task, folder: Path, epochs: int) -> tuple[NetGraph, float]:
    torch.manual_seed(0)
    graph = add_head(small_cnn(task.input_shape, [16, 16], batchnorm=False), "t0",
                     task.n_classes)
    ctx = context(graph, task)
    fit(ctx, make_strategy("finetune"), TrainConfig(epochs=epochs, lr=0.05))
    graph = ctx.model.graph
    graph.save(folder)
    save_moments(ctx.optimizer, ctx.model.named_parameters(), folder)
    return graph, evaluate(ctx, task, "val")


def child_configs(space, parent: Path, n: int, seed: int, train: TrainConfig) -> list[dict]:
    """The trial configs run_search will make (same controller seed, same proposals)."""
    searcher = ControllerSearcher(make_controller("random", space, CONTROLLER, seed=seed),
                                  Generation(0, n, str(parent), {
                                      "spec": TrialSpec(train=train).model_dump(mode="json"),
                                      "attempt": 0}), seed=seed)
    searcher.advance()
    return [searcher.trial_config(i) for i in searcher.to_train]


def in_process(configs: list[dict], task: Task, space, tmp: Path) -> float:
    start = time.perf_counter()
    for c in configs:
        m = train_child(c, task, space, tmp / f"inproc-{c['key']}")
        assert m["status"] == "ok", m["error"]
    return time.perf_counter() - start


def through_tune(tmp: Path, name: str, parent: Path, parent_acc: float, space, task: Task,
                 n: int, seed: int, train: TrainConfig, concurrency: int,
                 backend: str = "ray") -> tuple[float, list]:
    start = time.perf_counter()
    result = run_search(tmp / name, parent, make_controller("random", space, CONTROLLER,
                                                            seed=seed),
                        space, task, TrialSpec(train=train), Budget(children=n, generations=1),
                        Resources(concurrency=concurrency, max_failures=0), seed=seed,
                        parent_acc=parent_acc, backend=backend)
    wall = time.perf_counter() - start
    assert all(r.ok for r in result.records), [r.error for r in result.records]
    return wall, result.records


def children_vs_continued(space, tmp: Path, task: Task, n: int, seed: int,
                          recipe: TrainConfig, warm: bool) -> list[float]:
    """Each child's validation accuracy minus the parent's continued with the same recipe (the
    empty child: no action), trained in-process with the trial's own body. warm: children and
    the parent go on from the parent's optimizer moments (saved beside it), else a fresh one."""
    parent = tmp / ("base" if warm else "base-cold")
    if not warm and not parent.exists():
        shutil.copytree(tmp / "base", parent)
        (parent / MOMENTS).unlink(missing_ok=True)
    configs = child_configs(space, parent, n, seed, recipe)
    continued = {**configs[0], "key": "continued", "actions": [], "arch": "parent",
                 "lineage": []}
    base = train_child(continued, task, space, tmp / f"continued-{warm}")
    gaps = []
    for c in configs:
        m = train_child(c, task, space, tmp / f"child-{warm}-{c['key']}")
        assert m["status"] == "ok", m["error"]
        gaps.append(m["val_acc"] - base["val_acc"])
    return gaps


def steps_to_reach(graph: NetGraph, task: Task, target: float, train: TrainConfig,
                   reinit: bool, max_epochs: int) -> tuple[int | None, int]:
    """Optimisation steps (checked after every epoch) until validation accuracy >= target."""
    ctx = context(graph, task)
    if reinit:
        torch.manual_seed(1)
        for m in ctx.model.module.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    strategy = make_strategy("finetune")
    batches = math.ceil(len(task.train[1]) / train.batch_size)
    optimizer = None
    for epoch in range(1, max_epochs + 1):
        fit(ctx, strategy, train, seed=epoch, epochs=1, optimizer=optimizer)
        optimizer = ctx.optimizer  # one optimizer throughout (momentum carried)
        if evaluate(ctx, task, "val") >= target:
            return epoch * batches, epoch
    return None, max_epochs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child-seconds", type=float, default=10.0)
    ap.add_argument("--children", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base-epochs", type=int, default=30)
    ap.add_argument("--max-epochs", type=int, default=200)
    ap.add_argument("--child-epochs", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-search-"))
    try:
        task = build_stream({"dataset": "digits", "stream": "split", "n_tasks": 1, "seed": 0,
                             "val_fraction": 0.2})[0]
        base, base_acc = base_network(task, tmp / "base", args.base_epochs)
        space = make_space(SPACE, base)
        print(f"base: small CNN {base.param_count():,} parameters, validation accuracy "
              f"{base_acc:.4f}; {len(task.train[1])} training samples, 1 thread per child")

        probe = TrainConfig(epochs=2, lr=0.02)
        configs = child_configs(space, tmp / "base", 1, args.seed, probe)
        in_process(configs, task, space, tmp)  # warm-up (first optimizer, first compile)
        t = in_process(configs, task, space, tmp) / probe.epochs
        epochs = max(1, round(args.child_seconds / t))
        train = TrainConfig(epochs=epochs, lr=0.02)
        print(f"children: {epochs} epochs each (~{t * epochs:.1f}s in-process)")

        with ray_cluster(num_cpus=2) as cluster:
            print(f"ray: {cluster.nodes} node(s), {cluster.cpus:.0f} CPUs")
            seed = args.seed
            configs = child_configs(space, tmp / "base", args.children, seed, train)
            before = in_process(configs, task, space, tmp)
            tune_wall, records = through_tune(tmp, "seq", tmp / "base", base_acc, space, task,
                                              args.children, seed, train, 1)
            after = in_process(configs, task, space, tmp)  # before and after: load drifts
            assert sorted(r.arch for r in records) == sorted(c["arch"] for c in configs)
            inproc = (before + after) / 2
            overhead = tune_wall / inproc
            print(f"{len(configs)} children in-process {before:.1f}s / {after:.1f}s (before / "
                  f"after), as Tune trials one at a time {tune_wall:.1f}s (trial bodies "
                  f"{sum(r.end - r.start for r in records):.1f}s)")

            two = seed + 1
            one_by_one, _ = through_tune(tmp, "one", tmp / "base", base_acc, space, task, 2,
                                         two, train, 1)
            together, recs = through_tune(tmp, "two", tmp / "base", base_acc, space, task, 2,
                                          two, train, 2)
            overlap = min(r.end for r in recs) - max(r.start for r in recs)
            speedup = one_by_one / together
            print(f"2 trials one after the other {one_by_one:.1f}s, at once {together:.1f}s "
                  f"(trials overlapped {overlap:.1f}s)")

            fixed = {}
            one_step = TrainConfig(epochs=1, lr=0.02, batch_size=len(task.train[1]))
            for backend in ("ray", "local"):
                wall, recs = through_tune(tmp, f"fixed-{backend}", tmp / "base", base_acc,
                                          space, task, 4, seed + 2, one_step, 2, backend)
                fixed[backend] = wall - sum(r.train_time_s for r in recs)
            print(f"a generation of 4 one-step children beyond their training: ray "
                  f"{fixed['ray']:.2f}s, local {fixed['local']:.2f}s")

        recipes = {"search recipe (moments, lr x 0.5, cosine)":
                   TrainConfig(epochs=args.child_epochs, lr=0.025, schedule="cosine"),
                   "cold restart (fresh optimizer, lr 0.05, constant)":
                   TrainConfig(epochs=args.child_epochs, lr=0.05)}
        for what, recipe in recipes.items():
            gaps = children_vs_continued(space, tmp, task, args.children, seed + 3, recipe,
                                         warm="moments" in what)
            print(f"children vs the parent continued, {what}: mean "
                  f"{statistics.fmean(gaps):+.4f}, {sum(g >= 0 for g in gaps)}/{len(gaps)} "
                  "at or above")

        child, _ = space.apply(base, records[0].actions)  # untrained: Net2Net weights
        fit_cfg = TrainConfig(epochs=1, lr=0.02)
        inherit, e1 = steps_to_reach(child, task, base_acc, fit_cfg, False, args.max_epochs)
        scratch, e2 = steps_to_reach(child, task, base_acc, fit_cfg, True, args.max_epochs)
        if scratch is None:
            scratch = e2 * math.ceil(len(task.train[1]) / fit_cfg.batch_size)
            print(f"random init did not reach {base_acc:.4f} in {e2} epochs (a lower bound)")
        inherit_speedup = scratch / inherit if inherit else float("nan")
        print(f"steps to the parent's validation accuracy {base_acc:.4f}: Net2Net child "
              f"{inherit} ({e1} epochs), random init {scratch} ({e2} epochs)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"search: tune_overhead={overhead:.2f} parallel_speedup={speedup:.2f} "
          f"inherit_speedup={inherit_speedup:.1f} fixed_s={fixed['ray']:.2f}")


if __name__ == "__main__":
    main()
