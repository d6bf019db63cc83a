"""The `growth` command: run | search | tune | resume | report | compare | compress | strategies |
ops | demo.

User mistakes (a config typo, a corrupt checkpoint, a missing run, a flag's bad number)
print one line naming the file and key (or the flag) and exit with status 2, without a
traceback. Numbers given as flags are checked as they are parsed.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from growth.errors import GrowthError


class _UsageError(Exception):
    """A command line argparse refused (main prints it as one line and returns 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`--help` shows the usage)."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{self.prog}: error: {message} (see `{self.prog} --help`)")


def _number(kind: type, low: float, *, above: bool = False, whole_above_one: bool = False
            ) -> Callable[[str], Any]:
    """An argparse `type` that reads a finite `kind` >= low (> low with `above`)."""

    def read(text: str) -> Any:
        try:
            value = float(text) if kind is float else int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'a number' if kind is float else 'a whole number'}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if value < low or (above and value == low):
            raise argparse.ArgumentTypeError(
                f"{text!r} must be {'above' if above else 'at least'} {low:g}")
        if whole_above_one and value > 1 and value != int(value):
            raise argparse.ArgumentTypeError(
                f"{text!r}: above 1 the budget counts parameters (a whole number); a fraction "
                "of the base is at most 1")
        return value

    read.__name__ = kind.__name__  # argparse names the type in its own messages
    return read


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C raises KeyboardInterrupt: every command
    stops the same way for both (nothing half-done is marked finished)."""


_SIGNALS_SEEN: list[int] = []  # a library may catch the exception and stop in its own way


def _interrupt(signum: int, frame: Any) -> None:
    _SIGNALS_SEEN.append(signum)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _interrupted(term: bool) -> int:
    print(f"{'terminated (SIGTERM)' if term else 'interrupted'}; nothing unfinished was "
          "recorded as finished: `growth resume RUNDIR` (or the same `growth compare`) "
          "continues from what was finished", file=sys.stderr)
    return 143 if term else 130


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    previous = {}
    if _main_thread():  # SIGTERM is an interrupt; Ctrl-C's is recorded (unless ignored)
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, _interrupt)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            previous[signal.SIGINT] = signal.signal(signal.SIGINT, _interrupt)
    try:
        return int(args.func(args) or 0)
    except (GrowthError, OSError) as exc:
        if _SIGNALS_SEEN:  # code that caught the interrupt (torch and safetensors turn it
            # into errors of their own: "cannot read the strategy tensor") failed because of it
            return _interrupted(signal.SIGTERM in _SIGNALS_SEEN)
        if isinstance(exc, GrowthError):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if exc.filename is None:  # the file system refused: name the path, no traceback
            raise
        print(f"error: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        return _interrupted(isinstance(exc, Terminated) or signal.SIGTERM in _SIGNALS_SEEN)
    finally:
        _SIGNALS_SEEN.clear()
        for kind, handler in previous.items():
            if handler is not None:
                signal.signal(kind, handler)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _parser() -> argparse.ArgumentParser:
    from growth import __version__

    p = _Parser(prog="growth", description="Lifelong learning by network "
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

    srch = sub.add_parser("search", help="architecture search on one task (children on Ray)")
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

    tun = sub.add_parser("tune", help="the best settings of a strategy on a stream (Ray Tune "
                         "trials scored on validation data), written as a preset")
    tun.add_argument("config", help="YAML config with a `tune:` section, e.g. "
                     "experiments/tune/ewc-digits-permuted.yaml")
    tun.add_argument("--out", help="run directory (default: runs/<config name>)")
    tun.add_argument("--trials", type=int, help="settings to try besides the config's own "
                     "(default: tune.trials)")
    tun.add_argument("--ray-address", help="join the Ray cluster at HOST:PORT (default: "
                     "tune.ray_address, RAY_ADDRESS, else start a local Ray)")
    tun.add_argument("--quiet", action="store_true", help="no progress bar")
    tun.set_defaults(func=_tune)

    res = sub.add_parser("resume", help="continue a killed run from its last finished task, "
                         "a killed search from its finished children, or a killed tune from "
                         "its finished trials")
    res.add_argument("run_dir", help="the run directory (the --out of `growth run` or "
                     "`growth search`)")
    res.add_argument("--ray-address", help="search and tune runs: join the Ray cluster at "
                     "HOST:PORT")
    res.add_argument("--quiet", action="store_true", help="no progress bar")
    res.set_defaults(func=_resume)

    rep = sub.add_parser("report", help="markdown report and plots of one or more runs")
    rep.add_argument("run_dirs", nargs="+", help="run directories; runs whose resolved "
                     "configs differ only in the seed are grouped (mean ± std)")
    rep.add_argument("--out", help="output folder (default: RUNDIR/report for one run, "
                                   "./report for several)")
    rep.add_argument("--reference", help="several runs: the group the others' differences in "
                     "ACC are taken to, paired by seed: its label, or a strategy's name that "
                     "one group has (default: the first group)")
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
    cmp_.add_argument("--reference", help="the label every strategy's difference in ACC is "
                      "taken to, paired by seed (default: the config's `reference`, else the "
                      "first strategy)")
    cmp_.add_argument("--tables-only", action="store_true", help="run nothing: write the "
                      "table, differences and plots from the runs already in the folder")
    cmp_.set_defaults(func=_compare)

    comp = sub.add_parser("compress", help="compress a saved network to a size budget and "
                          "distil it on a dataset")
    comp.add_argument("network", help="folder of a saved network (structure.json + "
                      "weights.safetensors), e.g. RUNDIR/checkpoints/task_004/graph")
    comp.add_argument("--budget", required=True, type=_number(float, 0, above=True,
                                                              whole_above_one=True),
                      help="trunk parameters to keep (a count), or a fraction <= 1 of the base")
    comp.add_argument("--data", required=True, help="a campaign config (its stream and train "
                      "settings) or a dataset name (digits, mnist, ...: one task of all classes)")
    comp.add_argument("--base", help="saved base network: the student takes its architecture "
                      "(layers not in it are dropped); default: the network's own")
    comp.add_argument("--task", type=_number(int, 0),
                      help="task of the config's stream (default: the last)")
    comp.add_argument("--importance", choices=("magnitude", "fisher"), default="magnitude",
                      help="how units are ranked for keeping (default magnitude)")
    comp.add_argument("--epochs", type=_number(int, 0), default=5,
                      help="distillation epochs (default 5)")
    comp.add_argument("--lr", type=_number(float, 0, above=True),
                      help="learning rate (default: the config's, or 0.05)")
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
    from growth.rundir import check_new_run_dir

    cfg = load_config(args.config, args.overrides)  # validate before touching the disk
    if cfg.search is not None:  # else `growth resume` would take the run for a search
        raise ConfigError(f"{args.config}: search: this is a `growth search` config (one "
                          "task, many children); run `growth search` on it, or remove the "
                          "section (REC's search settings go under strategy.search)")
    if cfg.tune is not None:
        raise ConfigError(f"{args.config}: tune: this is a `growth tune` config (many "
                          "campaigns, one per setting); run `growth tune` on it, or remove the "
                          "section")
    out = Path(args.out) if args.out else _default_out(args.config)
    check_new_run_dir(out)
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
    if cfg.tune is not None:
        from growth.commands.tune import resume_tune

        bar, progress = _tune_progress(args.quiet)
        try:
            summary = resume_tune(run_dir, args.ray_address, progress)
        finally:
            bar()
        _print_tune_summary(run_dir, summary)
        return 0
    campaign = Campaign(cfg, run_dir, _progress(cfg.train.epochs, args.quiet), _write_report)
    metrics = campaign.resume()
    if campaign.resumed_at == len(campaign.tasks):
        print(f"{run_dir}: all {len(campaign.tasks)} tasks are finished; nothing to do")
    _print_summary(run_dir, metrics)
    return 0


def _tune(args: argparse.Namespace) -> int:
    import shlex

    from growth.commands.tune import tune_config
    from growth.errors import ConfigError

    if args.trials is not None and args.trials < 1:
        raise ConfigError(f"--trials {args.trials}: give 1 or more")
    out = Path(args.out) if args.out else _default_out(args.config)
    command = "growth tune " + " ".join(shlex.quote(a) for a in [
        args.config, "--out", str(out), *(["--trials", str(args.trials)] if args.trials
                                          else [])])
    close, progress = _tune_progress(args.quiet)
    try:
        summary = tune_config(args.config, out, args.trials, args.ray_address, command,
                              progress)
    finally:
        close()
    _print_tune_summary(out, summary)
    return 0


def _tune_progress(quiet: bool) -> tuple[Any, Any]:
    """A bar over a tune's trials (closed by the first value returned), and its hooks."""
    from growth.commands.tune import TuneProgress

    if quiet:
        return (lambda: None), TuneProgress()
    from tqdm import tqdm

    bar: dict[str, Any] = {}
    best: list[float] = []

    def start(total: int, done: int) -> None:
        bar["t"] = tqdm(total=total, initial=done, desc="tune", unit="trial",
                        dynamic_ncols=True)

    def trial(record: Any) -> None:
        if record.score is not None:
            best.append(record.score)
        bar["t"].update(1)
        bar["t"].set_postfix(best="n/a" if not best else f"{max(best):.4f}")

    def close() -> None:
        if "t" in bar:
            bar["t"].close()

    return close, TuneProgress(start, trial)


def _print_tune_summary(out: Path, summary: dict[str, Any]) -> None:
    best, default = summary["best"], summary["default"]
    print(f"run directory: {out}")
    print(f"trials: {summary['trials']} ({summary['finished']} finished, {summary['stopped']} "
          f"stopped early, {summary['failed']} failed) in {summary['wall_time_s']:.0f}s")
    if default is not None and default["score"] is not None:
        print(f"config's own setting ({default['id']}): score {default['score']:.4f}")
    if best is None:
        print("no trial finished; nothing chosen")
    else:
        shown = ", ".join(f"{k}={v}" for k, v in best["setting"].items())
        print(f"chosen ({best['id']}): {shown}: score {best['score']:.4f}")
    for path in summary["presets"]:
        print(f"preset: {path}")
    print(f"report: {out / 'tune.md'}")


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
    from growth.report import differences_markdown, paired_by_seed, write_report

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
        print(f"report written: {write_report(campaigns, out, args.reference)}")
        reference, diffs = paired_by_seed(campaigns, args.reference)
        if diffs:  # several groups: their differences to the reference, on the terminal too
            print(differences_markdown(reference, diffs))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from growth.commands.compare import default_folder, load_compare, run_compare, write_comparison

    plan = load_compare(args.config, args.reference)  # every run's config, before Ray starts
    if args.tables_only:
        folder = Path(args.out) if args.out else default_folder(plan)
        if not folder.is_dir():
            raise GrowthError(f"{folder}: no such comparison folder; --tables-only reads the "
                              "runs a `growth compare` wrote there (give its --out)")
        write_comparison(plan, folder)
    else:
        folder = run_compare(args.config, args.out, args.ray_address, args.reference)
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
