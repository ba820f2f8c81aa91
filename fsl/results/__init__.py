"""Results: the files fsl writes, where each number came from, the published numbers, and the tables and plots.

    files.py        the CSVs (summary.csv, per-episode test accuracies, training logs) with their schemas, the
                    summary row of a test, atomic writes
    provenance.py   which settings define a result, and whether it is the reference's protocol
    reference.py    the published numbers: MMFewShot's 12 cells, the MAML paper's Omniglot table
    report.py       `fsl tables`: tables and plots from the CSVs

The names of files.py are importable from here (`from fsl.results import read_summary`).
"""
from fsl.results.files import (
                               EPISODES,
                               ROW_KEY,
                               SUMMARY,
                               TRAIN_LOG,
                               Column,
                               ResultsError,
                               cell_file,
                               check_row_widths,
                               check_writable,
                               ci95,
                               find_run,
                               git_commit,
                               is_done,
                               own_tests,
                               read_csv,
                               read_summary,
                               read_test_episodes,
                               read_train_log,
                               row_file,
                               row_key,
                               run_file,
                               short_hash,
                               summary_path,
                               summary_row,
                               upsert_summary,
                               write_atomic,
                               write_csv,
                               write_test_episodes,
                               write_text_atomic,
)

__all__ = ["check_writable", "write_atomic", "write_text_atomic", "git_commit", "ResultsError", "Column", "read_csv",
           "check_row_widths", "write_csv", "summary_path", "read_summary", "row_key", "upsert_summary", "ci95",
           "summary_row", "own_tests", "find_run", "is_done", "short_hash", "run_file", "cell_file", "row_file",
           "write_test_episodes", "read_test_episodes", "read_train_log", "SUMMARY", "EPISODES", "TRAIN_LOG",
           "ROW_KEY"]
