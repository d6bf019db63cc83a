"""Output details: `growth report` over search runs and campaign runs together, and the search
leaderboard's architecture strings shortened to fit a table cell."""

from __future__ import annotations

from pathlib import Path

import pytest
from growth.controllers.records import ChildRecord
from growth.controllers.search_report import _markdown, best_so_far, describe_actions, short_arch
from runfiles import write_config

from growth.cli import main

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
    its parents, and parameter counts print as integers next to accuracies to 4 digits."""
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
