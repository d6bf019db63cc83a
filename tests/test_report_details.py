"""Output details: `growth report` over search runs and campaign runs together, and the search
leaderboard's architecture strings shortened to fit a table cell."""

from __future__ import annotations

from pathlib import Path

import pytest
from growth.controllers.search_report import describe_actions, short_arch
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
