"""Reports from fake run folders: files written, PNGs valid, numbers shown, errors typed."""

import math
import re

import pytest

pytest.importorskip("matplotlib")

from growth.errors import ReportError  # noqa: E402
from growth.metrics import make_metrics, read_metrics, write_metrics  # noqa: E402
from growth.report import write_report  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TASKS = ["mnist-01", "mnist-23", "mnist-45"]
R3 = [
    [0.1000, 0.2000, 0.3000],
    [0.9123, 0.2500, 0.3500],
    [0.8000, 0.8500, 0.4000],
    [0.7000, 0.7500, 0.9500],
]
# ACC = 0.8, BWT = ((0.70 - 0.9123) + (0.75 - 0.85)) / 2 = -0.15615, FWT = 0.075


def _sizes(n):
    base = 1000
    out = []
    for k in range(n):
        trunk, heads = base + 100 * k, 10 * (k + 1)
        total = trunk + heads
        out.append(
            {
                "task": k,
                "params": total,
                "bytes": 4 * total,
                "relative": total / base,
                "trunk_params": trunk,
                "heads_params": heads,
            }
        )
    return out


def make_run(root, name="demo", strategy="finetune", seed=0, R=R3, finished=3, config=None):
    run_dir = root / name
    metrics = make_metrics(
        run={"name": name, "strategy": strategy, "seed": seed, "stream": "s", "dataset": "mnist"},
        tasks=TASKS,
        R=R,
        sizes=_sizes(finished),
        wall_time_s=[12.5] * finished,
        search={"children": 7, "child_time_s": 33.0},
        config=config,
    )
    write_metrics(run_dir, metrics)
    return run_dir


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 5000, path  # a real plot, not an empty canvas


def test_single_run_report(tmp_path):
    run_dir = make_run(tmp_path)
    md = write_report([run_dir])
    assert md == run_dir / "report" / "report.md"
    for png in ("r_matrix.png", "accuracy_curves.png", "model_size.png"):
        assert_png(md.parent / png)
    text = md.read_text()
    for value in ("0.1000", "0.9123", "0.8500", "0.9500"):  # R entries
        assert value in text
    assert "| ACC | BWT | FWT |" in text
    assert "| 0.8000 | -0.1562 | 0.0750 |" in text
    for name in TASKS:
        assert f"after {name}" in text
    assert "1,230" in text  # final params: trunk 1000 + 2 * 100, heads 3 * 10
    assert "Child networks trained: 7" in text
    assert "Total: 37.5 s" in text
    assert "finetune" in text and "mnist" in text


def test_out_folder_overrides_default(tmp_path):
    run_dir = make_run(tmp_path)
    md = write_report([run_dir], out=tmp_path / "elsewhere")
    assert md == tmp_path / "elsewhere" / "report.md"
    assert not (run_dir / "report").exists()


def test_partial_run_reports_without_crashing(tmp_path):
    R = [row[:] for row in R3]
    R[2] = [math.nan] * 3
    R[3] = [math.nan] * 3
    run_dir = make_run(tmp_path, R=R, finished=1)
    md = write_report([run_dir])
    text = md.read_text()
    assert "n/a" in text  # unmeasured entries and BWT/FWT after one task
    assert "1 / 3" in text
    assert "| 0.9123 | n/a | n/a |" in text  # ACC over the one finished task
    for png in ("r_matrix.png", "accuracy_curves.png", "model_size.png"):
        assert_png(md.parent / png)


def test_run_with_nothing_finished(tmp_path):
    R = [R3[0]] + [[math.nan] * 3] * 3
    md = write_report([make_run(tmp_path, R=R, finished=0)])
    assert "No size recorded yet" in md.read_text()
    assert_png(md.parent / "model_size.png")


def test_comparison_lists_every_run_and_strategy_means(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    worse = [row[:] for row in R3]
    worse[3] = [0.5, 0.6, 0.9]  # ACC = 2.0 / 3 = 0.6667
    runs = [
        make_run(tmp_path, "ft-s0", "finetune", 0),
        make_run(tmp_path, "ft-s1", "finetune", 1, R=worse),
        make_run(tmp_path, "grow-s0", "grow", 0),
    ]
    md = write_report(runs)
    assert md.resolve() == (tmp_path / "report" / "report.md").resolve()
    for png in ("r_matrices.png", "acc.png", "model_size.png"):
        assert_png(md.parent / png)
    text = md.read_text()
    for name in ("ft-s0", "ft-s1", "grow-s0"):
        assert name in text
    assert "0.6667" in text
    # finetune has two seeds: ACC mean (0.8 + 0.6667) / 2 = 0.7333, std (ddof=1) 0.0943.
    assert "| finetune | 2 | 0, 1 | 3 / 3 | 0.7333 ± 0.0943 |" in text
    assert "| grow | 1 | 0 | 3 / 3 | 0.8000 | -0.1562 |" in text  # a single run is listed too
    for png in ("average_accuracy.png", "bwt.png"):
        assert_png(md.parent / png)


def test_duplicate_run_names_stay_distinguishable(tmp_path):
    a = make_run(tmp_path / "a", "same")
    b = make_run(tmp_path / "b", "same")
    c = make_run(tmp_path / "c", "other-dir")
    write_metrics(c, {**read_metrics(c), "run": {"name": "same", "strategy": "x", "seed": 2}})
    text = write_report([a, b, c], out=tmp_path / "cmp").read_text()
    # Same name in folders both called "same": told apart by position; the third by folder.
    assert "| same [same] [#1] |" in text and "| same [same] [#2] |" in text
    assert "| same [other-dir] |" in text


def test_missing_metrics_is_a_typed_error_naming_the_path(tmp_path):
    good = make_run(tmp_path)
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    with pytest.raises(ReportError, match=str(empty / "metrics.json")):
        write_report([good, empty], out=tmp_path / "cmp")


def test_no_run_dirs_is_a_typed_error():
    with pytest.raises(ReportError):
        write_report([])


def test_recorded_finished_tasks_bounds_the_scores(tmp_path):
    # Row 3 is partly measured (evaluation of the last task in progress); the campaign says 2.
    R = [row[:] for row in R3]
    R[3] = [0.7, math.nan, math.nan]
    run_dir = make_run(tmp_path, R=R, finished=2)
    write_metrics(run_dir, {**read_metrics(run_dir), "finished_tasks": 2})
    text = write_report([run_dir]).read_text()
    # Over 2 tasks: ACC = (0.80 + 0.85) / 2, BWT = 0.80 - 0.9123, FWT = 0.25 - 0.20.
    assert "| 0.8250 | -0.1123 | 0.0500 |" in text
    assert "2 / 3" in text


@pytest.mark.parametrize(
    "key, value",
    [("run", "x"), ("sizes", 3), ("sizes", [3]), ("wall_time_s", "a"), ("search", [])],
)
def test_mistyped_metrics_entries_are_one_line_errors(tmp_path, capsys, key, value):
    import json

    from growth.cli import main

    run_dir = make_run(tmp_path)
    path = run_dir / "metrics.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
    with pytest.raises(ReportError, match=f"{path}: '{key}'"):
        write_report([run_dir])
    assert main(["report", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert f"'{key}'" in err and str(path) in err and "Traceback" not in err
    assert not (run_dir / "report").exists()


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_values_are_refused_naming_the_file(tmp_path, capsys, text):
    from growth.cli import main

    run_dir = make_run(tmp_path)
    path = run_dir / "metrics.json"
    raw = path.read_text()
    path.write_text(re.sub(r'"acc": [0-9.e+-]+', f'"acc": {text}', raw, count=1))
    assert path.read_text() != raw
    with pytest.raises(ReportError, match=str(path)):
        write_report([run_dir])
    assert main(["report", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "finite" in err and "Traceback" not in err
    assert not (run_dir / "report").exists()


def test_a_run_named_twice_is_counted_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    worse = [row[:] for row in R3]
    worse[3] = [0.5, 0.6, 0.9]
    a = make_run(tmp_path, "ft-s0", "finetune", 0)
    b = make_run(tmp_path, "ft-s1", "finetune", 1, R=worse)
    twice = write_report([a, b, tmp_path / "." / "ft-s0"], out=tmp_path / "twice").read_text()
    once = write_report([a, b], out=tmp_path / "once").read_text()
    assert twice.replace("twice", "once") == once
    assert "Comparison of 2 runs" in twice


def _config(strategy="mwc", seed=0, epochs=10, name="cmp", threads=1):
    return {"name": name, "seed": seed, "threads": threads,
            "data": {"dataset": "digits", "stream": "permuted", "n_tasks": 3},
            "train": {"epochs": epochs, "lr": 0.05}, "strategy": {"name": strategy}}


def test_runs_with_different_configs_are_kept_apart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    worse = [row[:] for row in R3]
    worse[3] = [0.5, 0.6, 0.9]  # ACC 0.6667
    runs = [
        make_run(tmp_path, "a", "mwc", 0, config=_config(seed=0, name="a", threads=1)),
        make_run(tmp_path, "b", "mwc", 1, R=worse, config=_config(seed=1, name="b", threads=2)),
        make_run(tmp_path, "c", "mwc", 0, R=worse, config=_config(seed=0, epochs=1)),
        make_run(tmp_path, "d", "ewc", 0, config=_config("ewc")),
    ]
    text = write_report(runs).read_text()
    assert "Comparison of 4 runs in 3 groups" in text
    # the 10-epoch runs form one group (seed, name and threads do not count), n = 2
    assert "| mwc † (train.epochs=10) | 2 | 0, 1 | 3 / 3 | 0.7333 ± 0.0943 |" in text
    # the 1-epoch run is not averaged in: its own row, n = 1
    assert "| mwc † (train.epochs=1) | 1 | 0 | 3 / 3 | 0.6667 |" in text
    assert "| ewc | 1 | 0 | 3 / 3 | 0.8000 |" in text
    assert "† mwc: runs with different configs are kept apart; they differ in `train.epochs`" \
        in text
    assert "| c | mwc † (train.epochs=1) | 0 |" in text


def test_trackers_do_not_make_runs_different(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tracked = {**_config(seed=1), "tracking": {"tensorboard": True, "mlflow": {"uri": "file:/x"}}}
    older = {**_config(seed=2), "tensorboard": True}  # a run started before `tracking:`
    runs = [make_run(tmp_path, "a", "mwc", 0, config=_config(seed=0)),
            make_run(tmp_path, "b", "mwc", 1, config=tracked),
            make_run(tmp_path, "c", "mwc", 2, config=older)]
    text = write_report(runs).read_text()
    assert "Comparison of 3 runs in 1 groups" in text
    assert "| mwc | 3 | 0, 1, 2 |" in text


def test_config_yaml_groups_runs_whose_metrics_lack_it(tmp_path, monkeypatch):
    import yaml

    monkeypatch.chdir(tmp_path)
    dirs = [make_run(tmp_path, n, "ewc", k) for k, n in enumerate("xyz")]
    for d, epochs in zip(dirs, (5, 5, 7)):
        (d / "config.yaml").write_text(yaml.safe_dump(_config("ewc", epochs=epochs)))
    text = write_report(dirs).read_text()
    assert "| ewc † (train.epochs=5) | 2 | 0, 1 |" in text
    assert "| ewc † (train.epochs=7) | 1 | 2 |" in text
    assert "have no config" not in text


def test_average_accuracy_by_hand():
    from growth.metrics import average_accuracy

    # after task 1: R[1][0]; after 2: mean(R[2][0:2]); after 3: mean(R[3][0:3])
    expected = [0.9123, (0.80 + 0.85) / 2, (0.70 + 0.75 + 0.95) / 3]
    assert average_accuracy(R3) == pytest.approx(expected)
    assert average_accuracy(R3, 2) == pytest.approx(expected[:2])


def _axes(fig):
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def test_every_plot_has_a_title_labels_and_units(tmp_path):
    from growth import plots
    from growth.runs import group_runs, load_runs

    runs = load_runs([make_run(tmp_path, n, "ft", k) for k, n in enumerate("ab")])
    groups = group_runs(runs)
    figures = [plots.heatmap_figure(runs), plots.curves_figure(runs[0]),
               plots.size_figure(runs[0]), plots.average_accuracy_figure(groups),
               plots.group_scores_figure(groups, "acc", "ACC", "ACC (fraction)", True),
               plots.group_scores_figure(groups, "bwt", "BWT", "BWT (fraction)", False),
               plots.group_size_figure(groups)]
    for fig in figures:
        for ax in _axes(fig):
            if not ax.get_visible() or not ax.get_ylabel():  # colorbars carry their label
                continue
            assert ax.get_title() and ax.get_xlabel(), fig
            assert "(" in ax.get_ylabel() and "(" in ax.get_xlabel(), (ax.get_xlabel(),
                                                                      ax.get_ylabel())


def test_accuracy_curves_zoom_to_the_data_and_show_the_average(tmp_path):
    from growth import plots
    from growth.runs import load_runs

    high = [[0.10, 0.10, 0.10], [0.97, 0.1, 0.1], [0.95, 0.98, 0.1], [0.93, 0.96, 0.99]]
    run = load_runs([make_run(tmp_path, R=high)])[0]
    ax = plots.curves_figure(run).axes[0]
    lo, hi = ax.get_ylim()
    assert 0.85 < lo < 0.93 and 0.99 < hi <= 1.0  # not a 0-1 axis
    avg = next(line for line in ax.lines if line.get_label() == "average over tasks seen")
    assert list(avg.get_ydata()) == pytest.approx([0.97, (0.95 + 0.98) / 2,
                                                   (0.93 + 0.96 + 0.99) / 3])


def test_group_error_bars_are_the_sample_std(tmp_path):
    from growth import plots
    from growth.runs import group_runs, load_runs

    worse = [row[:] for row in R3]
    worse[3] = [0.5, 0.6, 0.9]
    runs = load_runs([make_run(tmp_path, "a", "ft", 0), make_run(tmp_path, "b", "ft", 1, R=worse)])
    fig = plots.group_scores_figure(group_runs(runs), "acc", "ACC", "ACC (fraction)", True)
    container = fig.axes[0].containers[0]
    (mean,) = container.lines[0].get_ydata()
    segment = container.lines[2][0].get_segments()[0]
    accs = [0.8, 2.0 / 3.0]
    std = (sum((a - sum(accs) / 2) ** 2 for a in accs) / 1) ** 0.5
    assert mean == pytest.approx(sum(accs) / 2)
    assert segment[1][1] - segment[0][1] == pytest.approx(2 * std)


def test_report_of_real_runs_groups_by_their_resolved_config(tmp_path, monkeypatch):
    from runfiles import write_config

    from growth.campaign import Campaign
    from growth.config import load_config

    monkeypatch.chdir(tmp_path)
    dirs = []
    for seed, epochs in ((0, 2), (1, 2), (0, 1)):
        cfg = write_config(tmp_path / f"c{seed}{epochs}.yaml", seed=seed, name=f"s{seed}",
                           train__epochs=epochs, data__n_tasks=2)
        Campaign(load_config(cfg), tmp_path / f"run{seed}{epochs}").start()
        dirs.append(tmp_path / f"run{seed}{epochs}")
    assert read_metrics(dirs[0])["config"]["train"]["epochs"] == 2
    text = write_report(dirs).read_text()
    assert "| finetune † (train.epochs=2) | 2 | 0, 1 | 2 / 2 |" in text
    assert "| finetune † (train.epochs=1) | 1 | 0 | 2 / 2 |" in text


def _final(acc_row):
    """R3 with another final row."""
    R = [row[:] for row in R3]
    R[3] = list(acc_row)
    return R


def test_differences_to_a_reference_group_paired_by_seed(tmp_path, monkeypatch):
    """ewc's ACC is finetune's plus 0.1, 0.0, 0.2 on seeds 0, 1, 2 (final rows by hand): mean
    0.1, sd 0.1, t = sqrt(3); with 2 degrees of freedom p = 1 - t / sqrt(2 + t^2) =
    1 - sqrt(3 / 5). A fourth finetune seed has no partner and is left out."""
    from scipy import stats as scipy_stats

    monkeypatch.chdir(tmp_path)
    ft = {0: [0.6, 0.6, 0.6], 1: [0.7, 0.7, 0.7], 2: [0.5, 0.5, 0.5], 3: [0.9, 0.9, 0.9]}
    ewc = {0: [0.7, 0.7, 0.7], 1: [0.7, 0.7, 0.7], 2: [0.7, 0.7, 0.7]}
    runs = [make_run(tmp_path, f"ft-s{s}", "finetune", s, R=_final(r),
                     config=_config("finetune", seed=s)) for s, r in ft.items()]
    runs += [make_run(tmp_path, f"ewc-s{s}", "ewc", s, R=_final(r),
                      config=_config("ewc", seed=s)) for s, r in ewc.items()]
    text = write_report(runs).read_text()
    assert "## Differences in ACC to finetune (paired by seed)" in text
    section = text.split("## Differences")[1].split("## Runs")[0]
    row = next(ln for ln in section.splitlines() if ln.startswith("| ewc |"))
    p = 1 - (3 / 5) ** 0.5
    assert p == pytest.approx(scipy_stats.ttest_rel([0.7] * 3, [0.6, 0.7, 0.5]).pvalue)
    half = 4.302652729911275 * 0.1 / 3 ** 0.5  # t(0.975, 2)
    assert row == (f"| ewc | 3 | +0.1000 | [{0.1 - half:+.4f}, {0.1 + half:+.4f}] | "
                   f"{p:.3f} | n.s. |")
    # the other way round, with --reference
    text = write_report(runs, reference="ewc").read_text()
    assert "| finetune | 3 | -0.1000 |" in text.split("## Differences")[1]
    with pytest.raises(ReportError, match="'nosuch' is not a group.*finetune, ewc"):
        write_report(runs, reference="nosuch")


def test_paired_by_seed_takes_a_strategy_name_and_the_command_prints_the_table(
        tmp_path, monkeypatch, capsys):
    """Two mwc groups (epochs 1 and 10) and one ewc group, seeds 0 and 1: against ewc's 0.7,
    0.7, epochs 1 ends at 0.8, 0.6 (differences +0.1, -0.1: mean 0, sd sqrt(0.02)) and epochs
    10 at 0.9, 0.9. `--reference ewc` names ewc's one group; `mwc` names two and is refused."""
    from growth.cli import main
    from growth.report import paired_by_seed

    monkeypatch.chdir(tmp_path)
    runs = []
    for s, (a, b) in enumerate([(0.8, 0.7), (0.6, 0.7)]):
        runs.append(make_run(tmp_path, f"m1-s{s}", "mwc", s, R=_final([a] * 3),
                             config=_config("mwc", seed=s, epochs=1)))
        runs.append(make_run(tmp_path, f"m10-s{s}", "mwc", s, R=_final([0.9] * 3),
                             config=_config("mwc", seed=s, epochs=10)))
        runs.append(make_run(tmp_path, f"e-s{s}", "ewc", s, R=_final([b] * 3),
                             config=_config("ewc", seed=s)))
    reference, diffs = paired_by_seed(runs, "ewc")
    assert reference == "ewc"
    assert set(diffs) == {"mwc † (train.epochs=1)", "mwc † (train.epochs=10)"}
    one = diffs["mwc † (train.epochs=1)"]
    assert one is not None and one.n == 2 and one.diff == pytest.approx(0.0, abs=1e-12)
    # t(0.975, 1) = tan(0.475 pi) = 12.706...; sd of (+0.1, -0.1) is sqrt(0.02)
    half = math.tan(0.475 * math.pi) * math.sqrt(0.02) / math.sqrt(2)
    assert one.high == pytest.approx(half, abs=1e-9) and not one.significant
    ten = diffs["mwc † (train.epochs=10)"]
    assert ten is not None and ten.diff == pytest.approx(0.2, abs=1e-12)
    assert ten.p == 0.0 and ten.significant  # +0.2 on both seeds: no spread
    with pytest.raises(ReportError, match="'mwc' names several groups"):
        paired_by_seed(runs, "mwc")
    assert main(["report", *map(str, runs), "--out", str(tmp_path / "rep"),
                 "--reference", "ewc"]) == 0
    printed = capsys.readouterr().out
    assert "## Differences in ACC to ewc (paired by seed)" in printed
    assert "| mwc † (train.epochs=10) | 2 | +0.2000 |" in printed
