"""Tables, plots and the notebook from a results folder that the tests write by hand (no training)."""
import os
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO

from fsl.results import SUMMARY, ResultsError, report, row_file, write_csv, write_test_episodes


def write_results(folder: Path) -> Path:
    rows = [
        {"run": "mini-imagenet-conv4-1shot", "cell": "mini-imagenet-conv4-1shot", "dataset": "mini-imagenet",
         "arch": "conv4", "ways": 5, "shots": 1, "image_size": 84, "train_batch": 105, "mean_acc": 47.10,
         "ci95": 0.41, "episodes": 2000, "train_tasks": 100000, "quick": False, "comparable": True,
         "not_comparable_why": "", "reference_mean": 46.76, "reference_ci95": 0.42},
        {"run": "cub-resnet12-5shot", "cell": "cub-resnet12-5shot", "dataset": "cub", "arch": "resnet12", "ways": 5,
         "shots": 5, "image_size": 84, "train_batch": 105, "mean_acc": 80.00, "ci95": 0.35, "episodes": 2000,
         "train_tasks": 100000, "quick": False, "comparable": True, "not_comparable_why": "",
         "reference_mean": 85.50, "reference_ci95": 0.33},
        {"run": "cub-conv4-1shot-quick", "cell": "cub-conv4-1shot", "dataset": "cub", "arch": "conv4", "ways": 5,
         "shots": 1, "image_size": 84, "train_batch": 105, "mean_acc": 30.0, "ci95": 2.0, "episodes": 100,
         "train_tasks": 400, "quick": True, "comparable": False, "not_comparable_why": "quick sanity run",
         "reference_mean": 60.32, "reference_ci95": 0.50},
        {"run": "cub-conv4-5shot", "cell": "cub-conv4-5shot", "dataset": "cub", "arch": "conv4", "ways": 5,
         "shots": 5, "image_size": 84, "train_batch": 105, "mean_acc": 70.0, "ci95": 0.5, "episodes": 2000,
         "train_tasks": 2000, "quick": False, "comparable": False,
         "not_comparable_why": "training stopped at 2000 of 100000 tasks", "reference_mean": 77.03,
         "reference_ci95": 0.39},
    ]
    folder.mkdir(parents=True, exist_ok=True)
    write_csv([{**row, "episode_streams": "per-split"} for row in rows], folder / "summary.csv", SUMMARY)
    return folder


def test_tables_from_summary_only(tmp_path):
    results = write_results(tmp_path / "results")
    report.run(results)
    comparison = (results / "tables/comparison.md").read_text()
    assert "| mini-imagenet-conv4-1shot | 47.10 ± 0.41 | 46.76 ± 0.42 | +0.34 | yes |" in comparison
    assert "| cub-resnet12-5shot | 80.00 ± 0.35 | 85.50 ± 0.33 | -5.50 | no |" in comparison
    assert "| cub-conv4-1shot | not run | 60.32 ± 0.50 | | |" in comparison  # the quick row is not mixed in
    assert "| cub-conv4-5shot | not run | 77.03 ± 0.39 | | |" in comparison  # nor the short run
    assert comparison.count("not run") == 10
    cub = (results / "tables/cub.md").read_text()
    assert "| cub-resnet12-5shot | maml | resnet12 | 84x84 | 105 | 5 | 5 | 80.00 | 0.35 | 2000 | 100000 | yes |" in cub
    assert "| cub-conv4-5shot | maml | conv4 | 84x84 | 105 | 5 | 5 | 70.00 | 0.50 | 2000 | 2000 | no |" in cub
    assert "30.00" not in cub
    others = (results / "tables/not_comparable.md").read_text()
    assert "| cub-conv4-1shot-quick | 30.00 ± 2.00 | 100 | 400 | quick sanity run |" in others
    assert "| cub-conv4-5shot | 70.00 ± 0.50 | 2000 | 2000 | training stopped at 2000 of 100000 tasks |" in others
    assert "47.10" not in others
    assert (results / "plots/cells_vs_reference.png").stat().st_size > 10_000


def test_same_csvs_same_bytes(tmp_path):
    a, b = write_results(tmp_path / "a"), write_results(tmp_path / "b")
    written_a, written_b = report.run(a), report.run(b)
    assert [p.relative_to(a) for p in written_a] == [p.relative_to(b) for p in written_b]
    for pa, pb in zip(written_a, written_b):
        assert pa.read_bytes() == pb.read_bytes(), pa.name


def test_learning_curve_and_histogram_plots(tmp_path):
    results = write_results(tmp_path / "results")
    cell = results / "mini-imagenet-conv4-1shot"
    cell.mkdir()
    pd.DataFrame({"episode": range(50), "accuracy": [40.0 + i % 20 for i in range(50)]}).to_csv(
        cell / "test_episodes.csv", index=False)
    pd.DataFrame({"cell": "x", "seed": 0, "tasks": [100, 100, 200, 200], "split": ["train", "val", "train", "val"],
                  "loss": [1.5, None, 1.2, None], "accuracy": [30, 35, 40, 42], "ci95": [None, 2.0, None, 1.9],
                  "tasks_per_s": None, "seconds": 1.0}).to_csv(cell / "train_log.csv", index=False)
    written = {p.name for p in report.run(results)}
    assert {"mini-imagenet-conv4-1shot_test_histogram.png", "mini-imagenet-conv4-1shot_learning_curve.png"} <= written


def test_a_row_of_the_shared_streams_keeps_its_files_and_yields_to_the_runs_retest(tmp_path):
    """Rows written before #36 (no episode_streams: 'shared') name their files '__shared-streams'; a retest of the
    run on the per-split streams is another row, and the tables show it in place of the old one."""
    from fsl.results import own_tests, read_summary, row_file, upsert_summary
    results = write_results(tmp_path / "results")
    summary = read_summary(results)
    old = {**summary.iloc[0].to_dict(), "episode_streams": "shared", "mean_acc": 40.0}
    assert row_file(results, old, "test_episodes").name == "test_episodes__shared-streams.csv"
    assert row_file(results, summary.iloc[0], "test_episodes").name == "test_episodes.csv"
    upsert_summary(results, old)
    both = read_summary(results)
    assert sorted(both.loc[both["run"] == "mini-imagenet-conv4-1shot", "mean_acc"]) == [40.0, 47.10]
    shown = own_tests(both)
    assert shown.loc[shown["run"] == "mini-imagenet-conv4-1shot", "mean_acc"].tolist() == [47.10]


def test_missing_or_empty_results_give_clear_messages(tmp_path):
    with pytest.raises(ResultsError, match="results folder not found"):
        report.run(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty/summary.csv").write_text("")
    with pytest.raises(ResultsError, match="missing or empty"):
        report.run(tmp_path / "empty")


def test_malformed_row_names_file_line_column_and_fix(tmp_path):
    results = write_results(tmp_path / "results")
    lines = (results / "summary.csv").read_text().splitlines()
    lines[2] = lines[2].replace("80.0", "eighty")
    (results / "summary.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ResultsError, match=r"summary.csv: line 3, column 'mean_acc' is 'eighty', not a float\n"
                                           r"  fix: correct the value, or delete line 3"):
        report.run(results)


def test_summary_of_an_older_fsl_is_read_with_defaults(tmp_path):
    """A summary.csv with the columns of issue #5 (no train_batch, run, comparable...): read, not refused."""
    results = tmp_path / "results"
    results.mkdir()
    (results / "summary.csv").write_text(
        "cell,dataset,arch,ways,shots,mean_acc,ci95,episodes,train_tasks,quick,checkpoint,seed,commit,config_sha\n"
        "cub-conv4-1shot,cub,conv4,5,1,61.0,0.5,2000,100000,False,w/best.pth,0,abc,123\n"
        "cub-conv4-1shot,cub,conv4,5,1,30.0,2.0,100,400,True,w/q.pth,0,abc,456\n")
    summary = report.read_summary(results)
    assert list(summary["run"]) == ["cub-conv4-1shot", "cub-conv4-1shot-quick"]
    assert list(summary["image_size"]) == [84, 84] and summary["train_batch"].isna().all()
    assert not summary["comparable"].any()  # nothing says it was the protocol
    assert summary.loc[0, "not_comparable_why"] == "written before fsl recorded provenance"
    assert list(summary["config_sha"]) == ["123", "456"]  # unknown columns are kept
    report.run(results)
    assert "cub-conv4-1shot | 61.00 ± 0.50" in (results / "tables/not_comparable.md").read_text()


def test_a_comparable_row_keeps_its_empty_reason_when_another_row_is_written(tmp_path):
    """A comparable row's not_comparable_why is empty; the next test's write (which reads and writes back every row)
    must not give it the default of files that predate the column ("written before fsl recorded provenance")."""
    from fsl.results import read_summary, upsert_summary
    results = write_results(tmp_path / "results")
    base = read_summary(results).iloc[0].to_dict()
    upsert_summary(results, {**base, "run": "mini-imagenet-conv4-1shot-anil", "variant": "anil"})
    summary = read_summary(results).set_index("run")
    assert summary.loc["mini-imagenet-conv4-1shot", "not_comparable_why"] == ""
    assert summary.loc["mini-imagenet-conv4-1shot-anil", "not_comparable_why"] == ""
    assert summary.loc["cub-conv4-5shot", "not_comparable_why"] == "training stopped at 2000 of 100000 tasks"


def test_notebook_writes_nothing(tmp_path, monkeypatch):
    results = write_results(tmp_path / "results")
    before = sorted(p.relative_to(results) for p in results.rglob("*"))
    run_notebook(results, monkeypatch)
    assert sorted(p.relative_to(results) for p in results.rglob("*")) == before


def test_tables_cli_without_results_is_not_a_traceback(tmp_path):
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-m", "fsl", "tables", "--results", str(tmp_path / "none")], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr and "results folder not found" in result.stderr


def run_notebook(results: Path, monkeypatch) -> str:
    """Execute notebooks/results.ipynb on `results`; returns its outputs as text."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(REPO / "notebooks/results.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), \
        "commit the notebook without outputs"
    monkeypatch.setenv("FSL_RESULTS", str(results))
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    return "".join(str(o) for cell in notebook.cells for o in cell.get("outputs", []))


def test_notebook_executes(tmp_path, monkeypatch):
    results = write_results(tmp_path / "results")
    report.run(results)
    outputs = run_notebook(results, monkeypatch)
    assert "47.10 ± 0.41" in outputs and "training stopped at 2000 of 100000 tasks" in outputs


def test_variants_and_seeds_tables(tmp_path):
    """Cells run under several variants go side by side; runs under several seeds get across-seed statistics."""
    common = {"cell": "glyphs-conv4-1shot", "dataset": "glyphs", "arch": "conv4", "ways": 5, "shots": 1,
              "image_size": 20, "episodes": 300, "train_tasks": 9600, "quick": False, "comparable": False,
              "not_comparable_why": "no reference number for this cell", "device": "cpu x2",
              "test_config_sha": "abc"}
    rows = [
        {**common, "run": "glyphs-conv4-1shot", "variant": "maml+zero_head+cosine", "seed": 0, "mean_acc": 90.0,
         "ci95": 0.9, "tasks_per_s": 21.0},
        {**common, "run": "glyphs-conv4-1shot-anil", "variant": "anil+cosine", "seed": 0, "mean_acc": 85.0,
         "ci95": 1.0, "tasks_per_s": 60.5},
        {**common, "run": "glyphs-conv4-1shot-anil-seed1", "variant": "anil+cosine", "seed": 1, "mean_acc": 87.0,
         "ci95": 1.1, "tasks_per_s": 60.0},
        {**common, "run": "glyphs-conv4-1shot-anil-seed2", "variant": "anil+cosine", "seed": 2, "mean_acc": 86.0,
         "ci95": 1.2, "tasks_per_s": 59.0},
        {**common, "run": "glyphs-conv4-5shot", "cell": "glyphs-conv4-5shot", "shots": 5, "variant": "maml",
         "seed": 0, "mean_acc": 95.0, "ci95": 0.5},
    ]
    results = tmp_path / "results"
    results.mkdir()
    write_csv(rows, results / "summary.csv", SUMMARY)
    written = {p.name for p in report.run(results)}
    assert {"variants.md", "seeds.md", "variants.png"} <= written
    variants = (results / "tables/variants.md").read_text()
    lines = [line for line in variants.splitlines() if line.startswith("| glyphs")]
    assert [line.split(" | ")[2] for line in lines] == ["glyphs-conv4-1shot", "glyphs-conv4-1shot-anil",
                                                        "glyphs-conv4-1shot-anil-seed1",
                                                        "glyphs-conv4-1shot-anil-seed2"]  # 5-shot: one variant
    assert "| glyphs-conv4-1shot | anil+cosine | glyphs-conv4-1shot-anil | 85.00 ± 1.00 |  | 86.00 ± 1.00, 3 | 9600 " \
           "| 60.5 |  | cpu x2 | abc |" in variants
    seeds = (results / "tables/seeds.md").read_text()
    assert "| glyphs-conv4-1shot-anil | 3 | seed 0: 85.00 ± 1.00, seed 1: 87.00 ± 1.10, seed 2: 86.00 ± 1.20 | " \
           "1.10 | 86.00 ± 1.00 |" in seeds


def test_variants_of_a_cell_are_the_runs_trained_as_long_as_its_maml_baseline(tmp_path):
    """variants.md sets a variant against the cell's MAML run of the same schedule: a MAML run stopped at 2,000
    outer steps beside the 60,000-step one is neither listed nor the baseline of the paired difference."""
    common = {"cell": "omniglot-conv4-1shot", "dataset": "omniglot", "arch": "conv4", "ways": 5, "shots": 1,
              "image_size": 28, "episodes": 4, "planned_tasks": 1920000, "quick": False, "seed": 0,
              "device": "cpu x1", "test_config_sha": "abc", "episode_streams": "per-split", "train_tag": "",
              "test_tag": ""}
    runs = {"omniglot-conv4-1shot-2000steps": ("maml", 64000, False, [60.0, 80.0, 100.0, 80.0]),
            "omniglot-conv4-1shot": ("maml", 1920000, True, [100.0, 100.0, 100.0, 80.0]),
            "omniglot-conv4-1shot-fomaml": ("fomaml", 1920000, True, [100.0, 80.0, 100.0, 100.0])}
    results = tmp_path / "results"
    results.mkdir()
    rows = [{**common, "run": run, "variant": variant, "train_tasks": tasks, "comparable": comparable,
             "mean_acc": sum(accuracies) / 4, "ci95": 1.0} for run, (variant, tasks, comparable, accuracies)
            in runs.items()]
    write_csv(rows, results / "summary.csv", SUMMARY)
    for row in rows:
        write_test_episodes(row_file(results, row, "test_episodes"), runs[row["run"]][3])
    report.run(results)
    lines = [line for line in (results / "tables/variants.md").read_text().splitlines()
             if line.startswith("| omniglot")]
    assert [line.split(" | ")[2] for line in lines] == ["omniglot-conv4-1shot", "omniglot-conv4-1shot-fomaml"]
    assert "| 95.00 ± 1.00 | +0.00 ± 13.86 (1/1) |" in lines[1]  # against the 60,000-step run, not the short one


def test_a_run_retested_on_the_per_split_streams_lists_its_shared_stream_row_apart_saying_so(tmp_path):
    """A run of before #36 tested again on the per-split streams: the tables show the new row; other_tests.md lists
    the old one and says which streams it was tested on, as its settings are otherwise the config file's."""
    common = {"run": "omniglot-conv4-1shot", "cell": "omniglot-conv4-1shot", "dataset": "omniglot", "arch": "conv4",
              "ways": 5, "shots": 1, "image_size": 28, "episodes": 600, "planned_tasks": 1920000, "quick": False,
              "variant": "maml", "seed": 0}
    rows = [{**common, "episode_streams": "shared", "train_tasks": 1066976, "mean_acc": 99.50, "ci95": 0.31,
             "comparable": False, "not_comparable_why": "training stopped at 1066976 of 1920000 tasks"},
            {**common, "episode_streams": "per-split", "train_tasks": 1920000, "mean_acc": 99.53, "ci95": 0.26,
             "comparable": True}]
    results = tmp_path / "results"
    results.mkdir()
    write_csv(rows, results / "summary.csv", SUMMARY)
    report.run(results)
    others = (results / "tables/other_tests.md").read_text()
    assert "| omniglot-conv4-1shot | its config file; shared episode streams (before #36) | its own | 99.50 ± 0.31 " \
           "| 600 | 1066976 |" in others and "99.53" not in others
    assert "| 99.53 ± 0.26 | 98.70 ± 0.40 |" in (results / "tables/omniglot.md").read_text()


def test_omniglot_table_sets_the_seed_spread_beside_the_within_run_interval(tmp_path):
    """#36 item 6: omniglot.md shows, for a cell run under several seeds, each seed's ci95 and the between-seed std;
    a single-seed run adds no such section."""
    common = {"cell": "omniglot-conv4-1shot", "dataset": "omniglot", "arch": "conv4", "ways": 5, "shots": 1,
              "image_size": 28, "episodes": 600, "train_tasks": 64000, "planned_tasks": 1920000, "quick": False,
              "comparable": False, "variant": "maml", "device": "cpu x1", "test_config_sha": "abc"}
    rows = [{**common, "run": "omniglot-conv4-1shot", "seed": 0, "mean_acc": 99.0, "ci95": 0.3}]
    results = tmp_path / "results"
    results.mkdir()
    write_csv(rows, results / "summary.csv", SUMMARY)
    report.run(results)
    assert "Across training seeds" not in (results / "tables/omniglot.md").read_text()
    rows += [{**common, "run": f"omniglot-conv4-1shot-short{tag}", "seed": seed, "mean_acc": mean, "ci95": ci95}
             for tag, seed, mean, ci95 in (("", 0, 85.0, 1.3), ("-seed1", 1, 86.0, 1.2), ("-seed2", 2, 84.0, 1.4))]
    write_csv(rows, results / "summary.csv", SUMMARY)
    report.run(results)
    text = (results / "tables/omniglot.md").read_text()
    spread = text[text.index("## Across training seeds"):text.index("## Every run")]
    assert "| omniglot-conv4-1shot-short | 3 | seed 0: 85.00 ± 1.30, seed 1: 86.00 ± 1.20, seed 2: 84.00 ± 1.40 | " \
           "1.30 | 85.00 ± 1.00 |" in spread and "omniglot-conv4-1shot |" not in spread


def test_beside_the_paper_sets_one_run_per_cell_the_comparable_one_first(tmp_path):
    """omniglot.md's paper table and plot show one run per cell and variant: the comparable run, else the one trained
    the most tasks (newest on ties), with the count of the others; a non-comparable row listed first never hides
    the comparable one."""
    common = {"cell": "omniglot-conv4-1shot", "dataset": "omniglot", "arch": "conv4", "ways": 5, "shots": 1,
              "image_size": 28, "episodes": 600, "planned_tasks": 1920000, "quick": False, "variant": "maml",
              "device": "cpu x1", "test_config_sha": "abc", "seed": 0}
    rows = [{**common, "run": "omniglot-conv4-1shot", "train_tasks": 1066976, "comparable": False, "mean_acc": 99.5,
             "ci95": 0.31, "finished_at": "2026-11-30"},
            {**common, "run": "omniglot-conv4-1shot-short", "train_tasks": 64000, "comparable": False,
             "mean_acc": 82.0, "ci95": 1.5, "finished_at": "2026-12-03"},
            {**common, "run": "omniglot-conv4-1shot-full", "train_tasks": 1920000, "comparable": True,
             "mean_acc": 98.9, "ci95": 0.4, "finished_at": "2026-12-01"},
            {**common, "run": "omniglot-conv4-1shot-fomaml", "variant": "fomaml", "train_tasks": 32000,
             "comparable": False, "mean_acc": 70.0, "ci95": 2.0, "finished_at": "2026-12-02"},
            {**common, "run": "omniglot-conv4-1shot-fomaml-b", "variant": "fomaml", "train_tasks": 32000,
             "comparable": False, "mean_acc": 71.0, "ci95": 2.0, "finished_at": "2026-12-04"}]
    retest = {**common, "run": "omniglot-conv4-1shot-full", "train_tasks": 1920000, "comparable": False,
              "test_tag": "test.episodes=6000", "episodes": 6000, "mean_acc": 98.6, "ci95": 0.12,
              "finished_at": "2026-12-07"}  # #51: the same weights on 6,000 episodes, set beside, never instead
    results = tmp_path / "results"
    results.mkdir()
    write_csv(rows + [retest], results / "summary.csv", SUMMARY)
    report.run(results)
    text = (results / "tables/omniglot.md").read_text()
    paper = text[text.index("## Beside the paper"):text.index("## Every run")]
    assert "| 5-way 1-shot | maml | 98.90 ± 0.40 | 98.70 ± 0.40 | Finn et al. 2017, Table 1 | +0.20 | " \
           "98.60 ± 0.12 (6,000) | -0.10 | 1,920,000 | yes | cpu x1 | omniglot-conv4-1shot-full | 2 |" in paper
    assert "| 5-way 1-shot | fomaml | 71.00 ± 2.00 | 98.30 ± 0.50 | Nichol et al. 2018, Table 1 | -27.30 |  |  | " \
        in paper
    assert "99.50" not in paper and "82.00" not in paper and "70.00" not in paper
    cells = [line.split(" | ")[:2] for line in paper.splitlines() if line.startswith("| 5-way") or
             line.startswith("| 20-way")]
    assert cells == [[f"| {cell}", variant] for variant in ("maml", "fomaml") for cell in
                     ("5-way 1-shot", "5-way 5-shot", "20-way 1-shot", "20-way 5-shot")]  # the paper's order, run or not
    chosen = report.paper_rows(pd.read_csv(results / "summary.csv").assign(comparable=lambda d: d.comparable.astype(bool)))
    assert list(chosen.run) == ["omniglot-conv4-1shot-full", "omniglot-conv4-1shot-fomaml-b"]  # what the plot draws
    every = text[text.index("## Every run"):]
    assert all(f"| {row['run']} |" in every for row in rows) and "98.60" not in every
    others = (results / "tables/other_tests.md").read_text()
    assert "| omniglot-conv4-1shot-full | its config file" in others and "| test.episodes=6000 | 98.60 ± 0.12 | 6000 |" \
        in others


def test_the_share_of_the_protocol_trained_reads_as_a_percentage_never_rounded_up_to_done():
    """The paper plot's point labels and the tables' trained tasks: '100%' for a finished run (not '1e+02%'), an
    unfinished one rounded down, small shares with two digits."""
    assert [report.trained_share(t, 1_920_000) for t in (1_920_000, 1_919_999, 1_066_976, 133_568, 64)] == \
        ["100%", "99%", "55%", "7%", "0.0033%"]
    row = pd.Series({"train_tasks": 1_919_000, "planned_tasks": 1_920_000})
    assert report.budget(row) == "1,919,000 of 1,920,000 (99%)"


def test_fsl_compare_pairs_episodes_and_refuses_other_episodes(tmp_path):
    """`fsl compare A B`: the per-episode difference a - b, mean ± 1.96 std / sqrt(n), and who wins how often; runs
    tested on other episodes (here another shot count) are refused with the reason."""
    import numpy as np

    from fsl.results import compare, read_summary, upsert_summary
    results = write_results(tmp_path / "results")
    base = read_summary(results).iloc[0].to_dict()
    upsert_summary(results, {**base, "run": "mini-imagenet-conv4-1shot-anil", "variant": "anil"})
    rng = np.random.RandomState(0)
    a, b = rng.uniform(20, 80, 2000), rng.uniform(20, 80, 2000)
    cell = results / "mini-imagenet-conv4-1shot"
    cell.mkdir()
    for name, values in (("test_episodes.csv", b), ("test_episodes_anil.csv", a)):
        pd.DataFrame({"episode": range(2000), "accuracy": values}).to_csv(cell / name, index=False)
    result = compare.compare_runs(results, "mini-imagenet-conv4-1shot-anil", "mini-imagenet-conv4-1shot")
    difference = a - b
    assert result["mean"] == pytest.approx(difference.mean(), abs=1e-12)
    assert result["ci95"] == pytest.approx(1.96 * difference.std() / np.sqrt(2000), abs=1e-12)
    assert (result["a_better"], result["b_better"], result["episodes"]) == ((a > b).sum(), (a < b).sum(), 2000)
    with pytest.raises(ResultsError, match="tested on different episodes .*shots 1 vs 5"):
        compare.compare_runs(results, "mini-imagenet-conv4-1shot", "cub-resnet12-5shot")
    with pytest.raises(ResultsError, match="no row of run 'nothing'"):
        compare.compare_runs(results, "nothing", "cub-resnet12-5shot")
    # a run of its own training settings (name=..., train.tasks=...: the #36 input comparison) is found by its name,
    # its test being its own; a name holding two trainings is refused
    tagged = {**base, "run": "mini-imagenet-conv4-1shot-short", "train_tag": "train.tasks=2000",
              "episode_streams": "per-split"}
    upsert_summary(results, tagged)
    pd.DataFrame({"episode": range(2000), "accuracy": a}).to_csv(
        compare.row_file(results, tagged, "test_episodes"), index=False)
    upsert_summary(results, {**base, "run": "mini-imagenet-conv4-1shot", "episode_streams": "per-split"})
    pd.DataFrame({"episode": range(2000), "accuracy": b}).to_csv(cell / "test_episodes.csv", index=False)
    short = compare.compare_runs(results, "mini-imagenet-conv4-1shot-short", "mini-imagenet-conv4-1shot")
    assert short["mean"] == pytest.approx(difference.mean(), abs=1e-12)
    upsert_summary(results, {**tagged, "train_tag": "train.tasks=4000"})
    with pytest.raises(ResultsError, match="has rows of 2 training settings .*fix: give each its own name="):
        compare.compare_runs(results, "mini-imagenet-conv4-1shot-short", "mini-imagenet-conv4-1shot")


def test_atomic_writes_are_readable_as_the_umask_allows(tmp_path):
    """summary.csv, logs and checkpoints are written through a temporary file: mkstemp's 0600 must not reach them,
    or a lab's shared results are its writer's alone."""
    from fsl.results import write_text_atomic
    previous = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "shared.csv", "a\n1\n")
        os.umask(0o077)
        write_text_atomic(tmp_path / "private.csv", "a\n1\n")
    finally:
        os.umask(previous)
    assert (tmp_path / "shared.csv").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "private.csv").stat().st_mode & 0o777 == 0o600


def test_tables_on_a_read_only_results_folder_is_one_line_and_an_unknown_stream_is_not_called_old(tmp_path):
    """#49 UNCLEAR: `fsl tables` on a read-only results folder ended in a traceback; any episode_streams value but
    per-split was labelled "(before #36)", also one of a newer fsl."""
    import shutil
    import subprocess
    import sys

    from fsl.results import read_summary, upsert_summary
    results = write_results(tmp_path / "results")
    base = read_summary(results).iloc[0].to_dict()
    upsert_summary(results, {**base, "run": "mini-imagenet-conv4-1shot-x", "train_tag": "train.tasks=8",
                             "episode_streams": "per-task"})
    report.run(results)
    other = (results / "tables" / "other_tests.md").read_text()
    assert "episode streams 'per-task' (unknown to this fsl: written by a newer one?)" in other
    assert "(before #36)" not in other
    shutil.rmtree(results / "tables")  # a tables folder no one can write into, root included: a file in its place
    (results / "tables").write_text("")
    result = subprocess.run([sys.executable, "-m", "fsl", "tables", "--results", str(results)], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "--results: cannot write into" in result.stderr and "fix: --results=" in result.stderr
