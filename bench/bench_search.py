"""Search benchmark: what Ray costs, what parallel children buy, what inheriting weights buys.

    python bench/bench_search.py [--child-seconds 10] [--children 4] [--seed 0]
                                 [--child-epochs 2] [--repeats 1] [--no-tune]

On digits (all ten classes as one task) with a small CNN base trained first, children are
proposed by the random controller over a Net2Net space; every search goes through
`run_search`. The Ray figures are the default Ray backend's (`ray`: the pool of actors,
controllers/pool.py) as a campaign uses it: the bench holds one `WorkerPool` for all its
searches, as a campaign's search service does, and starts it with a first search (a
generation of 4 one-step children, the campaign's first search: its cost beyond training is
printed as the pool's start-up); every figure below is taken on the started pool, as for a
campaign's later searches. The task's data goes to the object store once per search, as in a
campaign. The same figures for the `tune` backend (one Ray Tune experiment per search, fresh
trial processes) are printed beside them, after the pool is stopped (`--no-tune`: not run).

- tune_overhead: wall time of `--children` children trained on the pool one at a time
  (concurrency 1) over the same children (same actions, same seeds) trained in-process one
  after the other with the trials' own body (`growth.controllers.trial.train_child`), timed
  before and after the Ray run (their mean). Children are sized to train for about
  `--child-seconds` each. Target <= 1.2 for children of about 10 s.
- parallel_speedup: 2 children at once on 2 CPUs (concurrency 2) over the same 2 one after
  the other (concurrency 1), both on the pool (`--repeats N`: the medians of N interleaved
  pairs of searches). Target >= 1.6.
- inherit_speedup: optimisation steps a randomly initialised child needs to reach its
  parent's validation accuracy over the steps the Net2Net-initialised child (same
  architecture, same training) needs; accuracy is checked after every epoch, so the
  inheriting child counts at least one epoch. Target >= 5.
- fixed_s: the wall time of one search of one generation of 4 children that train one step
  each, 2 at once, minus their training time (`train_time_s`, summed), with Ray and the pool
  started: what a generation costs beyond its work. Target <= 3 s. Printed for the pool, for
  Tune (Ray started, its experiment's start-up counted) and for the local backend.
- children_vs_continued: a child's validation accuracy after `--child-epochs` epochs minus
  the parent's continued for the same epochs with the same recipe (the empty child), mean over
  the children; with the search's recipe (the parent's moments, lr x 0.5, cosine) and with a
  cold restart (a fresh optimizer at the full lr, constant), the recipe children had before.

Last line (the `ray` backend's figures):
`search: tune_overhead=R parallel_speedup=S inherit_speedup=I fixed_s=F`.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from growth.controllers import make_controller
from growth.controllers.driver import Budget, Resources, run_search
from growth.controllers.pool import WorkerPool
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


def searched(tmp: Path, name: str, parent: Path, parent_acc: float, space, task: Task,
             n: int, seed: int, train: TrainConfig, concurrency: int,
             backend: str = "ray", pool: WorkerPool | None = None) -> tuple[float, list]:
    """Wall time and records of a one-generation search of `n` children."""
    start = time.perf_counter()
    result = run_search(tmp / name, parent, make_controller("random", space, CONTROLLER,
                                                            seed=seed),
                        space, task, TrialSpec(train=train), Budget(children=n, generations=1),
                        Resources(concurrency=concurrency, max_failures=0), seed=seed,
                        parent_acc=parent_acc, backend=backend, pool=pool)
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
    ap.add_argument("--no-tune", action="store_true", help="skip the tune backend's figures")
    ap.add_argument("--repeats", type=int, default=1,
                    help="parallel_speedup from the medians of this many interleaved pairs")
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

        one_step = TrainConfig(epochs=1, lr=0.02, batch_size=len(task.train[1]))
        seed, two = args.seed, args.seed + 1
        configs = child_configs(space, tmp / "base", args.children, seed, train)
        figures: dict[str, dict[str, float]] = {}

        def measure(backend: str, pool: WorkerPool | None) -> dict[str, float]:
            """tune_overhead, parallel_speedup and fixed_s on one Ray backend."""
            def run(name: str, n: int, seed: int, train: TrainConfig, concurrency: int
                    ) -> tuple[float, list]:
                return searched(tmp, f"{backend}-{name}", tmp / "base", base_acc, space, task,
                                n, seed, train, concurrency, backend, pool)

            before = in_process(configs, task, space, tmp)
            wall, records = run("seq", args.children, seed, train, 1)
            after = in_process(configs, task, space, tmp)  # before and after: load drifts
            assert sorted(r.arch for r in records) == sorted(c["arch"] for c in configs)
            print(f"[{backend}] {len(configs)} children in-process {before:.1f}s / "
                  f"{after:.1f}s (before / after), on Ray one at a time {wall:.1f}s (child "
                  f"bodies {sum(r.end - r.start for r in records):.1f}s)")
            pairs = []
            for k in range(args.repeats):  # interleaved: both see the same load
                one_by_one, _ = run(f"one{k}", 2, two, train, 1)
                together, recs = run(f"two{k}", 2, two, train, 2)
                overlap = min(r.end for r in recs) - max(r.start for r in recs)
                print(f"[{backend}] 2 children one after the other {one_by_one:.1f}s, at once "
                      f"{together:.1f}s (overlapped {overlap:.1f}s)")
                pairs.append((one_by_one, together))
            one_by_one = statistics.median(p[0] for p in pairs)
            together = statistics.median(p[1] for p in pairs)
            fixed_wall, recs = run("fixed", 4, seed + 2, one_step, 2)
            fixed = fixed_wall - sum(r.train_time_s for r in recs)
            print(f"[{backend}] a generation of 4 one-step children: {fixed:.2f}s beyond "
                  "their training")
            return {"overhead": wall / ((before + after) / 2),
                    "speedup": one_by_one / together, "fixed": fixed}

        with ray_cluster(num_cpus=2) as cluster:
            print(f"ray: {cluster.nodes} node(s), {cluster.cpus:.0f} CPUs")
            pool = WorkerPool()  # held across searches, as a campaign's search service holds it
            try:
                wall, recs = searched(tmp, "first", tmp / "base", base_acc, space, task, 4,
                                      seed + 4, one_step, 2, "ray", pool)
                print(f"[ray] the pool's first search (its actors started): "
                      f"{wall - sum(r.train_time_s for r in recs):.2f}s beyond training")
                figures["ray"] = measure("ray", pool)
            finally:
                pool.close()  # its actors hold the CPUs Tune's trials need
            if not args.no_tune:
                figures["tune"] = measure("tune", None)
                t = figures["tune"]
                print(f"tune backend: tune_overhead={t['overhead']:.2f} "
                      f"parallel_speedup={t['speedup']:.2f} fixed_s={t['fixed']:.2f}")
            wall, recs = searched(tmp, "fixed-local", tmp / "base", base_acc, space, task, 4,
                                  seed + 2, one_step, 2, "local")
            print(f"[local] a generation of 4 one-step children: "
                  f"{wall - sum(r.train_time_s for r in recs):.2f}s beyond their training")

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

        child, _ = space.apply(base, configs[0]["actions"])  # untrained: Net2Net weights
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
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.1f} (1 min), {load[1]:.1f} (5 min) on "
          f"{os.cpu_count()} cores")
    r = figures["ray"]
    print(f"search: tune_overhead={r['overhead']:.2f} parallel_speedup={r['speedup']:.2f} "
          f"inherit_speedup={inherit_speedup:.1f} fixed_s={r['fixed']:.2f}")


if __name__ == "__main__":
    main()
