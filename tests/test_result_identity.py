"""A row's identity (#49): what produced it and which episodes it was tested on.

A finished result is never replaced by another checkpoint's test (fsl.results.files.place_row); summary.csv refuses a
current file with a column cut out or a row copied (read_summary); fsl compare pairs only rows tested on the same
episodes, test seed, queries and class rotations included (fsl.results.compare)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_report import write_results

from fsl.results import ResultsError, compare, read_summary, row_file, upsert_summary
from fsl.results.files import place_row, record_row

RUN = "mini-imagenet-conv4-1shot"


def own(results: Path, run: str = RUN) -> dict:
    """The run's own row (not a row beside it)."""
    rows = read_summary(results)
    return rows[(rows["run"] == run) & (rows["checkpoint_tag"] == "")].iloc[0].to_dict()


def with_checkpoint(results: Path, sha: str, **fields) -> Path:
    """The fixture's comparable row of RUN, recorded as tested from checkpoint `sha` (+ `fields`)."""
    upsert_summary(results, {**own(results), "checkpoint_sha256": sha, **fields})
    return results


def test_another_checkpoints_test_goes_beside_a_finished_row_with_files_of_its_own(tmp_path):
    """WRONG 1: a 32-task budget run, or an edited copy of the published checkpoint, tested under the run's name: the
    finished comparable row (47.10 % over 100,000 tasks) keeps its place and its files; the new row is keyed by its
    checkpoint, not comparable, and says why."""
    results = with_checkpoint(write_results(tmp_path / "results"), "a" * 64)
    stopped = {**own(results), "checkpoint_sha256": "b" * 64, "mean_acc": 49.7, "train_tasks": 32,
               "planned_tasks": 100000, "comparable": False, "not_comparable_why": "training stopped at 32 of 100000 tasks"}
    placed = place_row(results, stopped)
    assert placed["checkpoint_tag"] == "b" * 12 and placed["comparable"] is False
    assert placed["not_comparable_why"] == ("training stopped at 32 of 100000 tasks; another checkpoint than the one "
                                            "behind the run's finished row (47.1 %, checkpoint aaaaaaaaaaaa)")
    assert row_file(results, placed, "test_episodes").name == "test_episodes__ckpt-bbbbbbbbbbbb.csv"
    assert row_file(results, placed, "checkpoint", test=False).name == "checkpoint__ckpt-bbbbbbbbbbbb.csv"
    assert row_file(results, own(results), "test_episodes").name == "test_episodes.csv"
    upsert_summary(results, placed)
    edited = place_row(results, {**own(results), "checkpoint_sha256": "c" * 64, "mean_acc": 99.0})
    assert edited["checkpoint_tag"] == "c" * 12 and edited["comparable"] is False  # complete, comparable settings
    upsert_summary(results, edited)
    rows = read_summary(results)
    kept = rows[(rows["run"] == RUN) & (rows["checkpoint_tag"] == "")]
    assert list(kept["mean_acc"]) == [47.10] and list(kept["comparable"]) == [True]
    assert sorted(rows.loc[rows["run"] == RUN, "checkpoint_tag"]) == ["", "b" * 12, "c" * 12]
    from fsl.results import own_tests
    assert list(own_tests(rows).set_index("run").loc[[RUN], "mean_acc"]) == [47.10]


def test_two_concurrent_tests_of_one_run_keep_both_rows(tmp_path):
    """Two tests of one run, each of another checkpoint, at once (two shells, a job array): the second waits for the
    first's row, then goes beside it; neither replaces the other's row (record_row holds the summary's lock from
    placing the row to writing it; before, both took the run's place and the later replaced the earlier)."""
    import threading
    import time
    results = write_results(tmp_path / "results")
    template = {**own(results), "run": "race-conv4-1shot"}
    started = threading.Event()

    def write_files(row: dict) -> dict:
        started.set()
        time.sleep(0.3)  # the test's files: the other test is placing its row meanwhile
        return {}
    first = threading.Thread(target=record_row, args=(results, {**template, "checkpoint_sha256": "a" * 64},
                                                      write_files))
    first.start()
    started.wait(5)
    record_row(results, {**template, "checkpoint_sha256": "b" * 64, "mean_acc": 12.0}, lambda row: {})
    first.join()
    rows = read_summary(results)
    race = rows[rows["run"] == "race-conv4-1shot"].set_index("checkpoint_tag")
    assert sorted(race.index) == ["", "b" * 12]
    assert race.loc["", "checkpoint_sha256"] == "a" * 64 and race.loc["b" * 12, "mean_acc"] == 12.0


def test_a_retest_of_the_same_checkpoint_or_a_longer_run_takes_the_runs_place(tmp_path):
    """The same checkpoint retested replaces its row (new code, same weights); a run that went on (more tasks than a
    stopped row) replaces the stopped row; a shorter run goes beside a longer stopped one."""
    results = write_results(tmp_path / "results")
    stopped = own(results, "cub-conv4-5shot")
    upsert_summary(results, {**stopped, "checkpoint_sha256": "d" * 64})  # 2,000 of 100,000 tasks
    assert place_row(results, {**stopped, "checkpoint_sha256": "d" * 64, "mean_acc": 71.0})["checkpoint_tag"] == ""
    longer = place_row(results, {**stopped, "checkpoint_sha256": "e" * 64, "train_tasks": 4000})
    assert longer["checkpoint_tag"] == "" and longer["comparable"] is False
    shorter = place_row(results, {**stopped, "checkpoint_sha256": "f" * 64, "train_tasks": 32})
    assert shorter["checkpoint_tag"] == "f" * 12
    assert "the run's longer row (70.0 %, checkpoint dddddddddddd)" in shorter["not_comparable_why"]


def test_a_current_summary_with_a_column_cut_out_is_refused(tmp_path):
    """WRONG 7: deleting `comparable` read the comparable rows as not comparable (and `fsl done` then retrained a
    finished cell); deleting `episode_streams` read per-split rows as shared. A file this fsl wrote has every
    column, so a missing one is refused, naming it and the fix; a file of an older fsl still reads with defaults
    (tests/test_report.py)."""
    results = write_results(tmp_path / "results")
    for column in ("comparable", "episode_streams"):
        frame = pd.read_csv(results / "summary.csv", dtype=str, keep_default_na=False)
        frame.drop(columns=[column]).to_csv(tmp_path / "summary.csv", index=False)
        cut = tmp_path / column
        cut.mkdir()
        (tmp_path / "summary.csv").rename(cut / "summary.csv")
        with pytest.raises(ResultsError, match=rf"(?s)column\(s\) \['{column}'\] missing from a file this fsl wrote .*"
                                               r"fix: restore them"):
            read_summary(cut)


def test_a_copied_summary_row_is_refused_not_counted_twice(tmp_path):
    """WRONG 8: a copied row became a second training seed with std 0 in the seeds table."""
    results = write_results(tmp_path / "results")
    lines = (results / "summary.csv").read_text().splitlines()
    (results / "summary.csv").write_text("\n".join(lines + [lines[2]]) + "\n")
    with pytest.raises(ResultsError, match=r"(?s)summary.csv: line 6 has the key of line 3 .*fix: delete one of the two"):
        read_summary(results)


def paired(results: Path, runs: dict[str, dict]) -> None:
    """Rows `runs` (name -> fields over the fixture's RUN row) and their per-episode files."""
    base = own(results)
    for run, fields in runs.items():
        row = {**base, "run": run, "episode_streams": "per-split", **fields}
        upsert_summary(results, row)
        path = row_file(results, row, "test_episodes")
        path.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"episode": range(2000), "accuracy": np.full(2000, 50.0)}).to_csv(path, index=False)


@pytest.mark.parametrize("field, a, b", [("test_seed", 0, 1), ("queries", 15, 10), ("class_rotations", False, True)])
def test_compare_refuses_rows_of_another_test_seed_queries_or_rotations(tmp_path, field, a, b):
    """WRONG 2: two runs tested with test.seed 0 and 1 (or test.queries 15 and 10) were paired episode by episode."""
    results = write_results(tmp_path / "results")
    base = {"test_seed": 0, "queries": 15, "class_rotations": False}
    paired(results, {"x": {**base, field: a}, "y": {**base, field: b}})
    with pytest.raises(ResultsError, match=rf"tested on different episodes \({field} {a} vs {b}\)"):
        compare.compare_runs(results, "x", "y")
    paired(results, {"y": {**base, field: a}})
    assert compare.compare_runs(results, "x", "y")["mean"] == 0.0


def test_compare_reads_rows_of_before_49_by_their_tags(tmp_path):
    """Rows without the columns (written before #49): the settings their tags name stand in for them."""
    results = write_results(tmp_path / "results")
    paired(results, {"x": {}, "y": {"train_tag": "test.seed=1"}})
    with pytest.raises(ResultsError, match=r"different episodes \(test_seed its own vs 1\)"):
        compare.compare_runs(results, "x", "y")


def test_compare_says_which_run_and_what_to_do(tmp_path):
    """UNCLEAR: a run with only another test 'had no row'; a missing per-episode file named no run; a results
    folder that does not exist ended 'fix: one of ' with nothing after."""
    results = write_results(tmp_path / "results")
    paired(results, {"x": {}, "z": {"test_tag": "test.episodes=100"}})
    with pytest.raises(ResultsError, match=r"(?s)run .z. has only tests with other settings than its own "
                                           r"\(test.episodes=100\).*fix: fsl test the run with its own settings"):
        compare.compare_runs(results, "x", "z")
    paired(results, {"y": {}})
    row_file(results, {**own(results), "run": "y", "episode_streams": "per-split"}, "test_episodes").unlink()
    with pytest.raises(ResultsError, match=r"the per-episode accuracies of run 'y' are missing; fix: restore"):
        compare.compare_runs(results, "x", "y")
    with pytest.raises(ResultsError, match=r"(?s)results folder not found: .*fix: "):
        compare.compare_runs(tmp_path / "nonexistent", "x", "y")
