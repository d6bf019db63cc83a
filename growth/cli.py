"""The `growth` command: run | search | resume | report | compare | compress | strategies | ops |
demo.

User mistakes (a config typo, a corrupt checkpoint, a missing run) print one line naming the
file and key and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from growth.errors import GrowthError


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except GrowthError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system refused: name the path, no traceback
        if exc.filename is None:
            raise
        print(f"error: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; `growth resume RUNDIR` continues from the last finished task",
              file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    from growth import __version__

    p = argparse.ArgumentParser(prog="growth", description="Lifelong learning by network "
                                "growth: run campaigns, resume them, report, list operators.")
    p.add_argument("--version", action="version", version=f"growth {__version__}",
                   help="print the version and exit")
    sub = p.add_subparsers(metavar="COMMAND")

    run = sub.add_parser("run", help="run a campaign config into a run directory")
    run.add_argument("config", help="YAML campaign config, e.g. experiments/quickstart.yaml")
    run.add_argument("--out", help="run directory (default: runs/<config name>)")
    run.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="KEY=VALUE", help="override a config key, e.g. train.epochs=3")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.set_defaults(func=_run)

    srch = sub.add_parser("search", help="architecture search on one task (Ray Tune trials)")
    srch.add_argument("config", help="YAML config with a `search:` section, e.g. "
                      "experiments/search_digits.yaml")
    srch.add_argument("--out", help="run directory (default: runs/<config name>)")
    srch.add_argument("--set", dest="overrides", action="append", default=[],
                      metavar="KEY=VALUE", help="override a config key, e.g. "
                      "search.budget.generations=3")
    srch.add_argument("--ray-address", help="join the Ray cluster at HOST:PORT (default: "
                      "search.ray_address, RAY_ADDRESS, else start a local Ray)")
    srch.add_argument("--quiet", action="store_true", help="no progress bar")
    srch.set_defaults(func=_search)

    res = sub.add_parser("resume", help="continue a killed run from its last finished task, "
                         "or a killed search from its finished children")
    res.add_argument("run_dir", help="the run directory (the --out of `growth run` or "
                     "`growth search`)")
    res.add_argument("--ray-address", help="search runs: join the Ray cluster at HOST:PORT")
    res.add_argument("--quiet", action="store_true", help="no progress bar")
    res.set_defaults(func=_resume)

    rep = sub.add_parser("report", help="markdown report and plots of one or more runs")
    rep.add_argument("run_dirs", nargs="+", help="run directories; runs whose resolved "
                     "configs differ only in the seed are grouped (mean ± std)")
    rep.add_argument("--out", help="output folder (default: RUNDIR/report for one run, "
                                   "./report for several)")
    rep.set_defaults(func=_report)

    ops = sub.add_parser("ops", help="growth operators")
    ops_sub = ops.add_subparsers(metavar="ACTION")
    lst = ops_sub.add_parser("list", help="list every registered operator")
    lst.set_defaults(func=_ops_list)

    strat = sub.add_parser("strategies", help="continual-learning strategies")
    strat_sub = strat.add_subparsers(metavar="ACTION")
    slst = strat_sub.add_parser("list", help="every strategy, built-in or plug-in, with its "
                                "settings and their defaults")
    slst.set_defaults(func=_strategies_list)

    cmp_ = sub.add_parser("compare", help="run several strategies over one stream and "
                          "several seeds in parallel (on Ray) and tabulate them")
    cmp_.add_argument("config", help="a comparison config (base config, seeds, strategies), "
                      "e.g. experiments/compare/permuted_digits.yaml")
    cmp_.add_argument("--out", help="folder of the runs, the table and the plots (default: "
                      "runs/<name>)")
    cmp_.add_argument("--ray-address", help="join this Ray cluster (host:port) instead of "
                      "starting a local one")
    cmp_.set_defaults(func=_compare)

    comp = sub.add_parser("compress", help="compress a saved network to a size budget and "
                          "distil it on a dataset")
    comp.add_argument("network", help="folder of a saved network (structure.json + "
                      "weights.safetensors), e.g. RUNDIR/checkpoints/task_004/graph")
    comp.add_argument("--budget", required=True, type=float,
                      help="trunk parameters to keep (a count), or a fraction <= 1 of the base")
    comp.add_argument("--data", required=True, help="a campaign config (its stream and train "
                      "settings) or a dataset name (digits, mnist, ...: one task of all classes)")
    comp.add_argument("--base", help="saved base network: the student takes its architecture "
                      "(layers not in it are dropped); default: the network's own")
    comp.add_argument("--task", type=int, help="task of the config's stream (default: the last)")
    comp.add_argument("--importance", choices=("magnitude", "fisher"), default="magnitude",
                      help="how units are ranked for keeping (default magnitude)")
    comp.add_argument("--epochs", type=int, default=5, help="distillation epochs (default 5)")
    comp.add_argument("--lr", type=float, help="learning rate (default: the config's, or 0.05)")
    comp.add_argument("--root", default="data", help="dataset folder for a dataset name")
    comp.add_argument("--out", help="output folder (default: NETWORK-compressed)")
    comp.set_defaults(func=_compress)

    demo = sub.add_parser("demo", help="import a network, grow it, check it computes the same")
    demo.set_defaults(func=_demo)
    return p


def _default_out(config: str) -> Path:
    from growth.rundir import holds_run

    base = Path("runs") / Path(config).stem
    out, k = base, 2
    while holds_run(out):
        out, k = Path(f"{base}-{k}"), k + 1
    return out


def _run(args: argparse.Namespace) -> int:
    from growth.campaign import Campaign
    from growth.config import load_config
    from growth.errors import ConfigError
    from growth.rundir import check_writable_dir

    cfg = load_config(args.config, args.overrides)  # validate before touching the disk
    if cfg.search is not None:  # else `growth resume` would take the run for a search
        raise ConfigError(f"{args.config}: search: this is a `growth search` config (one "
                          "task, many children); run `growth search` on it, or remove the "
                          "section (REC's search settings go under strategy.search)")
    out = Path(args.out) if args.out else _default_out(args.config)
    check_writable_dir(out)
    campaign = Campaign(cfg, out, _progress(cfg.train.epochs, args.quiet), _write_report)
    metrics = campaign.start()
    _print_summary(out, metrics)
    return 0


def _write_report(run_dir: Path) -> Path:
    """RUNDIR/report of one finished run (handed to the trackers with the run's files)."""
    from growth.report import write_report

    return write_report([run_dir])


def _search(args: argparse.Namespace) -> int:
    from growth.commands.search import SearchRun
    from growth.config import load_config

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else _default_out(args.config)
    run = SearchRun(cfg, out, ray_address=args.ray_address,
                    source=args.config)  # validated (space, controller) before any write
    run.progress, close = _search_progress(cfg, args.quiet)
    try:
        metrics = run.start()
    finally:
        close()
    _print_search_summary(out, metrics)
    return 0


def _resume(args: argparse.Namespace) -> int:
    from growth.campaign import Campaign, run_config_of

    run_dir = Path(args.run_dir)
    cfg = run_config_of(run_dir)
    if cfg.search is not None:
        return _resume_search(args, cfg)
    campaign = Campaign(cfg, run_dir, _progress(cfg.train.epochs, args.quiet), _write_report)
    metrics = campaign.resume()
    if campaign.resumed_at == len(campaign.tasks):
        print(f"{run_dir}: all {len(campaign.tasks)} tasks are finished; nothing to do")
    _print_summary(run_dir, metrics)
    return 0


def _resume_search(args: argparse.Namespace, cfg: Any) -> int:
    from growth.commands.search import SearchRun

    run_dir = Path(args.run_dir)
    run = SearchRun(cfg, run_dir, ray_address=args.ray_address,
                    source=str(run_dir / "config.yaml"))
    run.progress, close = _search_progress(cfg, args.quiet)
    try:
        metrics = run.resume()
    finally:
        close()
    _print_search_summary(run_dir, metrics)
    return 0


def _search_progress(cfg: Any, quiet: bool) -> tuple[Any, Any]:
    """A bar over the search's trials and the leaderboard's top lines after each generation;
    returns the progress hooks and the function that closes the bar."""
    from growth.controllers.driver import SearchProgress

    if quiet:
        return SearchProgress(), lambda: None
    from tqdm import tqdm

    s = cfg.search
    total = s.budget.trials or s.children * s.budget.generations
    bar = tqdm(total=total, desc=f"search ({s.controller.name})", unit="child",
               dynamic_ncols=True)

    failed = [0]

    def child(record: Any, board: list[Any]) -> None:
        failed[0] += not record.ok
        bar.update(1)
        best = board[0].val_acc if board else None
        bar.set_postfix(gen=record.generation, best="n/a" if best is None else f"{best:.4f}",
                        failed=failed[0])

    def generation_end(g: int, board: list[Any]) -> None:
        lines = [f"generation {g}: leaderboard"]
        lines += [f"  {i}. {r.key}  val {r.val_acc:.4f}  {r.params:,} params"
                  for i, r in enumerate(board[:3], start=1)]
        bar.write("\n".join(lines))

    return SearchProgress(on_child=child, on_generation_end=generation_end), bar.close


def _print_search_summary(out: Path, metrics: dict[str, Any]) -> None:
    base, best = metrics["base"], metrics["best"]
    print(f"run directory: {out}")
    print(f"base: val {base['val_acc']:.4f} test {base['test_acc']:.4f} "
          f"{base['params']:,} params")
    print(f"best ({best['key']}): val {best['val_acc']:.4f} test {best['test_acc']:.4f} "
          f"{best['params']:,} params; {metrics['trials']} children trained "
          f"({metrics['failed']} failed) in {metrics['wall_time_s']:.1f}s")
    print(f"best network: {out / 'best'}  report: {out / 'report' / 'search.md'}")


def _progress(epochs: int, quiet: bool) -> Any:
    from growth.campaign import Progress

    if quiet:
        return Progress()
    from tqdm import tqdm

    bar: dict[str, Any] = {}

    def start(i: int, task: Any) -> None:
        bar["t"] = tqdm(total=epochs, desc=f"task {i} ({task.name})", unit="epoch",
                        leave=True, dynamic_ncols=True)

    def epoch(i: int, e: int, loss: float) -> None:
        bar["t"].set_postfix(loss=f"{loss:.4f}")
        bar["t"].update(1)

    def end(i: int, metrics: dict[str, Any]) -> None:
        row = metrics["R"][i + 1]
        bar["t"].set_postfix(acc=f"{row[i]:.3f}", ACC=f"{metrics['acc']:.3f}")
        bar["t"].close()

    def search_start(i: int, children: int) -> None:  # a bar of its own, below the epochs'
        bar["s"] = tqdm(total=children, desc=f"task {i} search", unit="child", leave=False,
                        dynamic_ncols=True)

    def search_child(i: int, record: Any) -> None:
        bar["s"].update(1)
        if record.val_acc is not None:
            bar["s"].set_postfix(val=f"{record.val_acc:.4f}")

    def search_end(i: int) -> None:
        bar.pop("s").close()
        if bar["t"].n == 0:  # searched before any epoch: their clock starts now
            bar["t"].reset(total=epochs)

    return Progress(start, epoch, end, search_start, search_child, search_end)


def _print_summary(out: Path, metrics: dict[str, Any]) -> None:
    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    size = metrics["sizes"][-1] if metrics["sizes"] else {}
    print(f"run directory: {out}")
    print(f"ACC {fmt(metrics['acc'])}  BWT {fmt(metrics['bwt'])}  FWT {fmt(metrics['fwt'])}  "
          f"params {size.get('params', 0):,} ({fmt(size.get('relative'))}x base)  "
          f"time {sum(metrics['wall_time_s']):.1f}s")
    print(f"report: growth report {out}")


def _report(args: argparse.Namespace) -> int:
    from growth.report import write_report

    dirs = [Path(p) for p in args.run_dirs]
    searches = [d for d in dirs if (d / "search.json").is_file()]  # they have their own report
    campaigns = [d for d in dirs if d not in searches]
    out = Path(args.out) if args.out else None
    if searches and campaigns:  # both kinds: each its own page, side by side in one folder
        out = out or Path("report")
    if searches:
        from growth.controllers.search_report import write_search_report

        print(f"report written: {write_search_report(searches, out)}")
    if campaigns:
        print(f"report written: {write_report(campaigns, out)}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from growth.commands.compare import load_compare, run_compare

    load_compare(args.config)  # every run's config is checked before Ray starts
    folder = run_compare(args.config, args.out, args.ray_address)
    print((folder / "compare.md").read_text())
    print(f"table, CSV and plots: {folder}")
    return 0


def _compress(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from growth.commands.compress import compress_saved
    from growth.compress import CompressParams
    from growth.errors import ConfigError

    try:
        params = CompressParams(budget=args.budget, importance=args.importance,
                                epochs=args.epochs)
    except ValidationError as exc:
        raise ConfigError(f"growth compress: {exc.errors()[0]['loc'][0]}: "
                          f"{exc.errors()[0]['msg']}") from None
    train = {"lr": args.lr} if args.lr is not None else None
    report, folder = compress_saved(args.network, args.data, params, out=args.out,
                                    base=args.base, task=args.task, root=args.root, train=train)
    print(f"compressed network: {folder}")
    print(f"trunk parameters {report.trunk_before:,} -> {report.trunk_after:,} (budget "
          f"{report.budget:,}); all parameters {report.params_before:,} -> "
          f"{report.params_after:,}")
    if report.dropped:
        print(f"dropped layers: {', '.join(report.dropped)}")
    for split, before in report.accuracy_before.items():
        print(f"{split} accuracy {before:.4f} -> {report.accuracy_after[split]:.4f}")
    if len(report.tasks) > 1:  # a multi-task network: what each task keeps
        for name, acc in report.tasks.items():
            print(f"task {name}: test accuracy {acc['before']:.4f} -> {acc['after']:.4f}")
    return 0


def _ops_list(args: argparse.Namespace) -> int:
    from growth.ops import available_operators, is_builtin

    ops = available_operators()
    width = max((len(n) for n in ops), default=0)
    for name, op in sorted(ops.items()):
        role = f"  (search role: {op.role})" if op.role else ""
        origin = "" if is_builtin(name) else \
            f"  [plug-in from {getattr(op.fn, '__module__', None) or '?'}]"
        print(f"{name.ljust(width)}  {op.description}{role}{origin}")
    return 0


def _strategies_list(args: argparse.Namespace) -> int:
    from growth.strategies import STRATEGIES, available_strategies

    for name, cls in sorted(available_strategies().items()):
        origin = "" if name in STRATEGIES else f"  [plug-in from {cls.__module__}]"
        print(f"{name}: {cls.description}{origin}")
        fields = cls.Params.model_fields
        if not fields:
            print("    (no settings)")
        for key, info in fields.items():
            default = "(required)" if info.is_required() else _yaml_scalar(info.get_default(
                call_default_factory=True))
            line = f"    {info.alias or key}: {default}"
            print(f"{line.ljust(32)}  # {info.description}" if info.description else line)
    return 0


def _yaml_scalar(value: Any) -> str:
    """A default as it would be written in a config (null, true, 0.5, separate)."""
    import yaml
    from pydantic import BaseModel

    if isinstance(value, BaseModel):  # a section of settings (REC's search, compress)
        value = value.model_dump(mode="json", exclude_none=True)
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip() \
        .removesuffix("...").strip()


def _demo(args: argparse.Namespace) -> int:
    from growth.demo import run_demo

    print(run_demo())
    return 0


if __name__ == "__main__":
    sys.exit(main())
