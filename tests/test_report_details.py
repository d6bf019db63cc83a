"""Output details: `growth report` over search runs and campaign runs together, the search
leaderboard's architecture strings shortened to fit a table cell, and the search report's page
and figure read back from fabricated runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from growth.controllers.records import ChildRecord
from growth.controllers.search_report import _markdown, best_so_far, describe_actions, short_arch
from matplotlib import rcParams
from matplotlib.axes import Axes
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from runfiles import write_config

from growth.cli import main
from growth.errors import ReportError, RunDirError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("runs")
    search, campaign = tmp / "search", tmp / "campaign"
    assert main(["search", str(ROOT / "experiments" / "search_digits.yaml"), "--out",
                 str(search), "--quiet", "--set", "search.backend=local",
                 "--set", "search.children=2", "--set", "search.budget={generations: 1}",
                 "--set", "search.base_epochs=1", "--set", "train.epochs=1",
                 "--set", "data.max_train_per_task=200"]) == 0
    assert main(["run", str(write_config(tmp / "c.yaml", train__epochs=1)), "--out",
                 str(campaign), "--quiet"]) == 0
    return search, campaign


def test_report_of_search_and_campaign_runs_writes_both_pages(runs: tuple[Path, Path],
                                                              tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]
                                                              ) -> None:
    search, campaign = runs
    out = tmp_path / "rep"
    assert main(["report", str(search), str(campaign), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"report written: {out / 'search.md'}",
                       f"report written: {out / 'report.md'}"]
    assert "# Search:" in (out / "search.md").read_text()
    assert "R matrix" in (out / "report.md").read_text()


def test_the_leaderboard_names_each_childs_changes(runs: tuple[Path, Path]) -> None:
    search, _ = runs
    text = (search / "report" / "search.md").read_text()
    rows = [ln for ln in text.splitlines() if ln.startswith("| 1 |")]
    assert rows and ("net2wider" in rows[0] or "net2deeper" in rows[0])
    assert max(len(ln) for ln in text.splitlines()) < 400


def test_long_architectures_are_cut_with_their_size_and_a_digest() -> None:
    short = "in1x8x8 flatten fc32 relu features"
    assert short_arch(short) == short
    long = " ".join(f"conv3x3-{64 + k}" for k in range(400))
    other = long.replace("conv3x3-100", "conv3x3-999")
    cut = short_arch(long)
    assert len(cut) < 130 and cut.startswith("conv3x3-64 conv3x3-65")
    assert "(400 nodes, #" in cut and short_arch(other) != cut
    assert describe_actions([{"op": "net2wider", "node": "fc1", "width": 48},
                             {"op": "net2deeper", "after": "act1", "kernel_size": 3}]) == \
        "net2wider fc1→48, net2deeper after act1 (k3)"
    assert describe_actions([{"op": "x", "after": "a"}] * 6).endswith(", … 2 more")
    assert describe_actions([]) == "none"


def test_a_search_report_of_fabricated_records_prints_counts_as_counts(tmp_path: Path
                                                                       ) -> None:
    """A search run is a folder with search.json; its report goes into a folder created with
    its parents, and parameter counts print as integers next to accuracies to 4 digits; the
    figure beside it is a PNG of three panels side by side."""
    import json

    from growth.controllers.records import RECORDS, ChildRecord, append_record
    from growth.controllers.search_report import SUMMARY, is_search_run, write_search_report

    run = tmp_path / "run"
    run.mkdir()
    assert not is_search_run(run)
    (run / "search.json").write_text("{}")
    assert is_search_run(run)
    (run / SUMMARY).write_text(json.dumps({"base": {"val_acc": 0.5, "params": 120},
                                           "best": {"key": "g000c00", "val_acc": 0.625,
                                                    "params": 130}}))
    append_record(run / RECORDS, ChildRecord("g000c00", 0, 0, "fc1=12", [], "ok",
                                             val_acc=0.625, params=130))
    path = write_search_report([run], tmp_path / "new" / "folder")
    assert path == tmp_path / "new" / "folder" / "search.md"
    png = (path.parent / "search.png").read_bytes()  # three panels, 15 x 4.2 in at 120 dpi
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    assert (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")) == (1800, 504)
    text = path.read_text()
    assert "| base | base | 0.5000 | n/a | 120 |" in text
    assert "| best | g000c00 | 0.6250 | n/a | 130 |" in text


def _child(key: str, generation: int, val: float | None, params: int = 10,
           train_s: float = 1.0, error: str = "") -> ChildRecord:
    return ChildRecord(key=key, generation=generation, index=int(key[-2:]), arch="in fc out",
                       actions=[], status="failed" if val is None else "ok", val_acc=val,
                       val_acc_before=None if val is None else val / 2, params=params,
                       train_time_s=train_s, error=error)


def test_the_best_so_far_counts_finished_children_of_each_generation_from_the_base() -> None:
    """By hand: base 0.65; generation 0 trains 0.5 and 0.7, generation 1 a failed child and
    0.6, generation 2 0.9: best 0.65, 0.7, 0.7, 0.9. Without a base the curve starts at None
    and takes the first finished child."""
    records = [_child("g000c00", 0, 0.5), _child("g000c01", 0, 0.7),
               _child("g001c00", 1, None, error="diverged"), _child("g001c01", 1, 0.6),
               _child("g002c00", 2, 0.9)]
    assert best_so_far(records, 0.65) == [(-1, 0.65), (0, 0.7), (1, 0.7), (2, 0.9)]
    assert best_so_far(records[2:], None) == [(-1, None), (1, 0.6), (2, 0.9)]


def test_a_search_page_lists_base_best_counts_leaderboard_and_failures_as_written() -> None:
    """The whole markdown of one search, line by line, from a fabricated summary and records:
    the leaderboard best first (ties: fewer parameters), failed children listed apart."""
    summary = {"run": {"controller": "eas"}, "base": {"val_acc": 0.5, "test_acc": 0.25,
                                                       "params": 100},
               "best": {"key": "g001c01", "val_acc": 0.75, "test_acc": 0.625, "params": 120},
               "generations": 2, "parent_kept": 1, "wall_time_s": 12.25}
    records = [_child("g000c00", 0, 0.5, params=110, train_s=2.0),
               _child("g001c00", 1, None, train_s=0.5, error="diverged"),
               _child("g001c01", 1, 0.75, params=120, train_s=3.0),
               _child("g001c02", 1, 0.75, params=115, train_s=1.5)]
    assert _markdown(Path("runs/s1"), summary, records) == [
        "# Search: eas (s1)", "",
        "| | network | val acc | test acc | params |", "|---|---|---|---|---|",
        "| base | base | 0.5000 | 0.2500 | 100 |",
        "| best | g001c01 | 0.7500 | 0.6250 | 120 |", "",
        "4 children trained (1 failed) in 2 generations (the parent kept after 1); search "
        "wall time 12.2 s, child training 7.0 s in all.", "",
        "| rank | child | val acc | before training | params | train s | changes | arch |",
        "|---|---|---|---|---|---|---|---|",
        "| 1 | g001c02 | 0.7500 | 0.3750 | 115 | 1.5 | none | `in fc out` |",
        "| 2 | g001c01 | 0.7500 | 0.3750 | 120 | 3.0 | none | `in fc out` |",
        "| 3 | g000c00 | 0.5000 | 0.2500 | 110 | 2.0 | none | `in fc out` |",
        "", "Failed children:", "", "- g001c00: diverged", ""]
    empty = _markdown(Path("runs/s2"), {}, [])
    assert empty[0] == "# Search: ? (s2)"
    assert empty[4:6] == ["| base | base | n/a | n/a | n/a |", "| best | n/a | n/a | n/a | n/a |"]
    assert empty[7] == ("0 children trained (0 failed) in n/a generations (the parent kept "
                        "after n/a); search wall time n/a s, child training 0.0 s in all.")
    assert "Failed children:" not in empty


def test_the_page_shows_the_ten_best_and_a_childs_whole_lineage() -> None:
    """Eleven children: ten rows. A child's changes are its lineage from the search's first
    parent (a widening two generations back), not only its own last step (a deepening)."""
    records = [_child(f"g000c{i:02d}", 0, 0.5 + i / 100) for i in range(11)]
    records[10].lineage = [[{"op": "widen", "node": "fc1", "width": 8}],
                           [{"op": "deepen", "after": "fc1"}]]
    records[10].actions = [{"op": "deepen", "after": "fc1"}]
    rows = [ln for ln in _markdown(Path("s"), {}, records) if ln.startswith("| ") and
            ln.split(" | ")[0][2:].isdigit()]
    assert [r.split(" | ")[1] for r in rows] == [f"g000c{i:02d}" for i in range(10, 0, -1)]
    assert rows[0].split(" | ")[6] == "widen fc1→8, deepen after fc1"


# The figure and the page of fabricated search runs, read back. `_plot` draws on a matplotlib
# Figure and saves it: the `drawn` fixture keeps each Figure at its save so that a test can read
# every panel's lines back (and skips the layout and the PNG, a second of CPU each).

def _search_run(folder: Path, summary: dict | None, records: list[ChildRecord]) -> Path:
    """A search run directory as the driver leaves it: search.json, the summary, one line per
    child in the order given (the report sorts them by key)."""
    from growth.controllers.records import RECORDS, append_record
    from growth.controllers.search_report import SUMMARY

    folder.mkdir(parents=True)
    (folder / "search.json").write_text("{}")
    if summary is not None:
        (folder / SUMMARY).write_text(json.dumps(summary))
    (folder / RECORDS).touch()
    for r in records:
        append_record(folder / RECORDS, r)
    return folder


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Figure, Path]]:
    saved: list[tuple[Figure, Path]] = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kw: saved.append((fig, Path(path))))
    monkeypatch.setattr(Figure, "tight_layout", lambda fig, **kw: None)  # spacing only
    return saved


def _panels(fig: Figure) -> dict[str, Axes]:
    return {ax.get_title(): ax for ax in fig.axes}


def _lines(ax: Axes) -> dict[str, Line2D]:
    """The labelled lines of a panel (what its legend lists), by label."""
    return {ln.get_label(): ln for ln in ax.get_lines() if not ln.get_label().startswith("_")}


def _xy(line: Line2D) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in line.get_xydata()]


# One search by hand, records written out of key order. Trial order (by key): x = 1..6 is
# g000c00 0.5, g000c01 failed, g001c00 0.75, g001c01 0.625, g002c00 failed, g003c00 0.875.
# Generations change after trials 2, 4 and 5: separators at 2.5, 4.5, 5.5. Means: generation 0
# 0.5, generation 1 (0.75 + 0.625) / 2 = 0.6875, generation 2 none (its child failed),
# generation 3 0.875. Best so far from the base's 0.6: -1 0.6, 0 0.6, 1 0.75, 2 0.75, 3 0.875.
ONE_SEARCH = [_child("g001c01", 1, 0.625), _child("g000c01", 0, None, error="nan loss"),
              _child("g003c00", 3, 0.875), _child("g000c00", 0, 0.5),
              _child("g002c00", 2, None, error="oom"), _child("g001c00", 1, 0.75)]
ONE_SUMMARY = {"run": {"controller": "eas"}, "base": {"val_acc": 0.6}}


def test_the_figure_of_one_search_plots_trials_means_and_best_so_far_by_hand(
        tmp_path: Path, drawn: list[tuple[Figure, Path]]) -> None:
    from growth.controllers.search_report import write_search_report

    run = _search_run(tmp_path / "s1", ONE_SUMMARY, ONE_SEARCH)
    write_search_report([run])
    [(fig, path)] = drawn
    assert path == run / "report" / "search.png"
    panels = _panels(fig)
    assert list(panels) == ["reward per trial", "the controller's learning curve",
                            "best so far per generation"]
    assert [ax.get_subplotspec().get_geometry() for ax in fig.axes] == [  # side by side
        (1, 3, 0, 0), (1, 3, 1, 1), (1, 3, 2, 2)]
    trials, means, best = panels.values()
    assert [(ax.get_xlabel(), ax.get_ylabel()) for ax in (trials, means, best)] == [
        ("trained child (trial order)", "validation accuracy (reward)"),
        ("generation", "mean validation accuracy of its children"),
        ("generation (-1: base network)", "best validation accuracy")]
    lines = _lines(trials)
    assert list(lines) == ["eas (s1)", "eas (s1): failed", "base network"]
    assert _xy(lines["eas (s1)"]) == [(1, 0.5), (3, 0.75), (4, 0.625), (6, 0.875)]
    assert _xy(lines["eas (s1): failed"]) == [(2, 0.0), (5, 0.0)]
    assert lines["base network"].get_ydata() == [0.6, 0.6]
    separators = [ln for ln in trials.get_lines() if ln.get_label().startswith("_")]
    assert [ln.get_xdata()[0] for ln in separators] == [2.5, 4.5, 5.5]
    assert list(_lines(means)) == ["eas (s1)"]
    assert _xy(_lines(means)["eas (s1)"]) == [(0, 0.5), (1, 0.6875), (3, 0.875)]
    assert list(_lines(best)) == ["eas (s1)"]
    assert _xy(_lines(best)["eas (s1)"]) == [(-1, 0.6), (0, 0.6), (1, 0.75), (2, 0.75),
                                              (3, 0.875)]
    for ax in (trials, means, best):  # every line above is in its panel's legend
        assert [t.get_text() for t in ax.get_legend().get_texts()] == list(_lines(ax))


def test_trials_are_points_failures_crosses_in_the_runs_colour_and_curves_joined(
        tmp_path: Path, drawn: list[tuple[Figure, Path]]) -> None:
    """What tells the marks apart: trials are unjoined dots, a failed child is a cross of its
    run's colour, the two curves are dots joined by lines; the generation separators and the
    base network's line are thin, grey (not a run's colour) and the base's dashed; generations
    and trials are counted in whole numbers on every x axis."""
    from growth.controllers.search_report import write_search_report

    write_search_report([_search_run(tmp_path / "s1", ONE_SUMMARY, ONE_SEARCH)])
    trials, means, best = _panels(drawn[0][0]).values()
    ok, failed, base = _lines(trials).values()
    assert (ok.get_marker(), ok.get_linestyle(), ok.get_markersize()) == ("o", "None", 4)
    assert (failed.get_marker(), failed.get_linestyle()) == ("x", "None")
    assert failed.get_color() == ok.get_color()
    for curve in (_lines(means)["eas (s1)"], _lines(best)["eas (s1)"]):
        assert (curve.get_marker(), curve.get_linestyle()) == ("o", "-")
    separators = [ln for ln in trials.get_lines() if ln.get_label().startswith("_")]
    for ref in [*separators, base]:
        red, green, blue, _ = to_rgba(ref.get_color())
        assert red == green == blue and ref.get_linewidth() < rcParams["lines.linewidth"]
    assert base.get_linestyle() == "--"
    for ax in (trials, means, best):
        assert all(float(t).is_integer() for t in ax.get_xticks())


def test_several_searches_share_each_panel_in_a_colour_each_without_separators(
        tmp_path: Path, drawn: list[tuple[Figure, Path]], monkeypatch: pytest.MonkeyPatch
        ) -> None:
    """Two runs: a curve per run in each panel, each run one colour in all three; no
    generation separators and no base line (the runs' generations and bases differ); the
    report goes to ./report, its page holds both searches in the order given."""
    from growth.controllers.search_report import write_search_report

    monkeypatch.chdir(tmp_path)
    eas = _search_run(tmp_path / "a", ONE_SUMMARY, ONE_SEARCH)
    rnd = _search_run(tmp_path / "b", {"run": {"controller": "random"}, "base": {"val_acc": 0.6}},
                      [_child("g000c00", 0, 0.25), _child("g001c00", 1, None, error="x")])
    path = write_search_report([eas, rnd])
    assert path == Path("report") / "search.md"
    [(fig, png)] = drawn
    assert png == Path("report") / "search.png"
    trials, means, best = _panels(fig).values()
    assert list(_lines(trials)) == ["eas (a)", "eas (a): failed", "random (b)",
                                    "random (b): failed"]
    assert len(trials.get_lines()) == 4  # no separators, no base line
    assert _xy(_lines(trials)["random (b)"]) == [(1, 0.25)]
    assert _xy(_lines(trials)["random (b): failed"]) == [(2, 0.0)]
    assert _xy(_lines(means)["random (b)"]) == [(0, 0.25)]
    assert _xy(_lines(best)["random (b)"]) == [(-1, 0.6), (0, 0.6), (1, 0.6)]
    colours = [{_lines(ax)[f"{run}"].get_color() for ax in (trials, means, best)}
               for run in ("eas (a)", "random (b)")]
    assert len(colours[0]) == len(colours[1]) == 1 and colours[0] != colours[1]
    assert _lines(trials)["random (b): failed"].get_color() in colours[1]
    text = path.read_text()
    assert text.index("# Search: eas (a)") < text.index("# Search: random (b)")
    assert text.endswith("\n\n![search](search.png)\n")


def test_a_search_without_children_or_base_draws_empty_panels(
        tmp_path: Path, drawn: list[tuple[Figure, Path]]) -> None:
    """No child trained yet and no summary: the page says 0 children; the trials and mean
    panels are empty, the best-so-far curve has no point (no base); no failed marks."""
    from growth.controllers.search_report import write_search_report

    path = write_search_report([_search_run(tmp_path / "s", None, [])], tmp_path / "out")
    trials, means, best = _panels(drawn[0][0]).values()
    assert list(_lines(trials)) == ["? (s)"] and _xy(_lines(trials)["? (s)"]) == []
    assert _xy(_lines(means)["? (s)"]) == [] and _xy(_lines(best)["? (s)"]) == []
    assert "0 children trained (0 failed)" in path.read_text()


def test_the_best_so_far_curve_of_a_search_without_base_starts_at_its_first_child(
        tmp_path: Path, drawn: list[tuple[Figure, Path]]) -> None:
    from growth.controllers.search_report import write_search_report

    write_search_report([_search_run(tmp_path / "s", {"run": {"controller": "eas"}},
                                     ONE_SEARCH)])
    trials, _, best = _panels(drawn[0][0]).values()
    assert "base network" not in _lines(trials)
    assert _xy(_lines(best)["eas (s)"]) == [(0, 0.5), (1, 0.75), (2, 0.75), (3, 0.875)]


def test_the_generation_means_skip_failed_children_and_empty_generations() -> None:
    """By hand: generation 0 (0.5 and 0.75) 0.625; generation 1 only failed: absent;
    generation 2 (0.25, a failed child, 1.0 and 0.5) 1.75 / 3."""
    from growth.controllers.search_report import generation_means

    records = [_child("g000c00", 0, 0.5), _child("g000c01", 0, 0.75),
               _child("g001c00", 1, None), _child("g002c00", 2, 0.25),
               _child("g002c01", 2, None), _child("g002c02", 2, 1.0), _child("g002c03", 2, 0.5)]
    assert generation_means(records) == [(0, 0.625), (2, pytest.approx(1.75 / 3))]
    assert generation_means([]) == []


def test_the_report_folder_is_refused_with_foreign_files_and_reused_when_it_is_its_own(
        tmp_path: Path, drawn: list[tuple[Figure, Path]]) -> None:
    """An existing --out of other files is refused (the message names the folder kind and the
    page it would write); one holding search.md, or a campaign's report.md, is written into."""
    from growth.controllers.search_report import write_search_report

    run = _search_run(tmp_path / "s", ONE_SUMMARY, ONE_SEARCH[:2])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match=r"^report folder .* \(no search\.md\)"):
        write_search_report([run], foreign)
    campaign = tmp_path / "campaign_report"
    campaign.mkdir()
    (campaign / "report.md").write_text("# campaign")
    (campaign / "r.png").write_text("")
    assert write_search_report([run], campaign).read_text().startswith("# Search: eas (s)")


def test_a_folder_without_records_is_refused_and_an_empty_record_file_is_a_search(
        tmp_path: Path) -> None:
    from growth.controllers.records import RECORDS
    from growth.controllers.search_report import _records

    with pytest.raises(ReportError, match="holds no search records"):
        _records(tmp_path)
    (tmp_path / RECORDS).touch()
    assert _records(tmp_path) == []


def test_descriptions_and_architectures_at_their_edges() -> None:
    """A step with neither node nor after is placed at "?", one with kernel_size None is a
    plain deepening; exactly four steps show all four; an architecture of exactly 80 characters
    is kept whole, and a cut that falls on a space keeps the word before it whole."""
    import hashlib

    assert describe_actions([{"op": "deepen"}, {"op": "deepen", "after": "a",
                                                 "kernel_size": None}]) == \
        "deepen after ?, deepen after a"
    assert describe_actions([{"op": "w", "node": f"n{i}", "width": i} for i in range(4)]) == \
        "w n0→0, w n1→1, w n2→2, w n3→3"
    exact = "x" * 79 + "y"
    assert short_arch(exact) == exact
    words = ["a" * 9] * 8 + ["tail", "end"]  # the 8th word ends at 78, character 79 a space
    long = " ".join(words)
    digest = hashlib.sha1(long.encode()).hexdigest()[:8]
    assert short_arch(long) == " ".join(["a" * 9] * 8) + f" … (10 nodes, #{digest})"
