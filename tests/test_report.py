"""Tables, plots and the notebook from a results folder that the tests write by hand (no training)."""
import os
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO
from fsl import report
from fsl.report import ResultsError
from fsl.results import SUMMARY_COLUMNS


def write_results(folder: Path) -> Path:
    rows = [
        {"cell": "mini-imagenet-conv4-1shot", "dataset": "mini-imagenet", "arch": "conv4", "ways": 5, "shots": 1,
         "image_size": 84, "train_batch": 105, "mean_acc": 47.10, "ci95": 0.41, "episodes": 2000,
         "train_tasks": 100000, "quick": False, "reference_mean": 46.76, "reference_ci95": 0.42},
        {"cell": "cub-resnet12-5shot", "dataset": "cub", "arch": "resnet12", "ways": 5, "shots": 5,
         "image_size": 84, "train_batch": 105, "mean_acc": 80.00, "ci95": 0.35, "episodes": 2000,
         "train_tasks": 100000, "quick": False, "reference_mean": 85.50, "reference_ci95": 0.33},
        {"cell": "cub-conv4-1shot", "dataset": "cub", "arch": "conv4", "ways": 5, "shots": 1, "image_size": 84,
         "train_batch": 105, "mean_acc": 30.0, "ci95": 2.0, "episodes": 100, "train_tasks": 400, "quick": True,
         "reference_mean": 60.32, "reference_ci95": 0.50},
    ]
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).reindex(columns=SUMMARY_COLUMNS).to_csv(folder / "summary.csv", index=False)
    return folder


def test_tables_from_summary_only(tmp_path):
    results = write_results(tmp_path / "results")
    report.run(results)
    comparison = (results / "tables/comparison.md").read_text()
    assert "| mini-imagenet-conv4-1shot | 47.10 ± 0.41 | 46.76 ± 0.42 | +0.34 | yes |" in comparison
    assert "| cub-resnet12-5shot | 80.00 ± 0.35 | 85.50 ± 0.33 | -5.50 | no |" in comparison
    assert "| cub-conv4-1shot | not run | 60.32 ± 0.50 | | |" in comparison  # the quick row is not mixed in
    assert comparison.count("not run") == 10
    cub = (results / "tables/cub.md").read_text()
    assert "| resnet12 | 84x84 | 105 | 5 | 5 | 80.00 | 0.35 | 2000 | 100000 |" in cub
    assert "30.00" not in cub and "30.00 ± 2.00" in (results / "tables/quick.md").read_text()
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


def test_missing_or_empty_results_give_clear_messages(tmp_path):
    with pytest.raises(ResultsError, match="results folder not found"):
        report.run(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty/summary.csv").write_text("")
    with pytest.raises(ResultsError, match="missing or empty"):
        report.run(tmp_path / "empty")


def test_malformed_row_names_file_and_line(tmp_path):
    results = write_results(tmp_path / "results")
    lines = (results / "summary.csv").read_text().splitlines()
    lines[2] = lines[2].replace("80.0", "eighty")
    (results / "summary.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ResultsError, match=r"summary.csv: line 3: column 'mean_acc' is 'eighty'"):
        report.run(results)


def test_tables_cli_without_results_is_not_a_traceback(tmp_path):
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-m", "fsl", "tables", "--results", str(tmp_path / "none")], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr and "results folder not found" in result.stderr


def test_notebook_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    results = write_results(tmp_path / "results")
    notebook = nbformat.read(REPO / "notebooks/results.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), \
        "commit the notebook without outputs"
    monkeypatch.setenv("FSL_RESULTS", str(results))
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    outputs = "".join(str(o) for cell in notebook.cells for o in cell.get("outputs", []))
    assert "47.10 ± 0.41" in outputs
