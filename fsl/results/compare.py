"""`fsl compare RUN_A RUN_B`: two rows tested on the same fixed episodes, compared episode by episode.

Two runs' test accuracies on the *same* episodes are paired: the per-episode difference a - b cancels how hard each
episode is, so its 95 % interval is far narrower than the two rows' own intervals side by side. Rows tested on other
episodes (another dataset or data folder, other ways, shots or image size, another number of episodes, other episode
streams) are refused with the reason; a field a row written before it existed lacks is not held against it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fsl.data.episodes import EPISODE_STREAMS, SHARED_STREAMS
from fsl.results.files import ResultsError, ci95, own_tests, read_summary, read_test_episodes, row_file

SAME_EPISODES = ("dataset", "data_root", "ways", "shots", "image_size", "episodes", "episode_streams")


def own_row(summary: pd.DataFrame, run: str) -> pd.Series:
    """The row of `run`'s own test: of its config file's settings, or else of the one set of other training
    settings the run was trained with (a run of `train.tasks=...`, whose train_tag says so)."""
    rows = own_tests(summary)
    match = rows[rows["run"] == run]
    if match.empty:  # a run with its own training settings: its own test, on the current episode streams
        tested = summary[(summary["run"] == run) & (summary["test_tag"].fillna("") == "")
                         & (summary["episode_streams"].fillna(SHARED_STREAMS) == EPISODE_STREAMS)]
        if len(tested) > 1:
            tags = "; ".join(sorted(tested["train_tag"].fillna("")))
            raise ResultsError(f"run {run!r} has rows of {len(tested)} training settings ({tags}); fix: give each "
                               f"its own name= when training, so that a run name names one model")
        match = tested
    if match.empty:
        known = ", ".join(sorted(set(rows["run"]) | set(summary.loc[summary["test_tag"].fillna("") == "", "run"])))
        raise ResultsError(f"no row of run {run!r} (its own test) in summary.csv; fix: one of {known}")
    return match.iloc[-1]


def paired_difference(a: np.ndarray, b: np.ndarray) -> dict:
    """Per-episode accuracies (%) of two runs on the same episodes -> mean difference a - b, its 95 % half-width
    (1.96 x std / sqrt(n), as fsl.results.ci95), and how many episodes favour each side."""
    difference = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    return {"mean": float(difference.mean()), "ci95": ci95(difference),
            "episodes": len(difference), "a_better": int((difference > 0).sum()), "b_better": int((difference < 0).sum()),
            "ties": int((difference == 0).sum())}


def compare_runs(results_dir: str | Path, run_a: str, run_b: str) -> dict:
    """The paired difference of `run_a` over `run_b`, or ResultsError saying why their episodes differ."""
    summary = read_summary(results_dir)
    a, b = own_row(summary, run_a), own_row(summary, run_b)
    different = [f"{key} {a.get(key)} vs {b.get(key)}" for key in SAME_EPISODES
                 if pd.notna(a.get(key)) and pd.notna(b.get(key)) and a.get(key) != b.get(key)]
    if different:
        raise ResultsError(f"{run_a} and {run_b} were tested on different episodes ({'; '.join(different)}): a "
                           f"paired difference needs the same fixed episodes; fix: compare runs of one cell's test, "
                           f"or test one of them with the other's settings")
    episodes = [read_test_episodes(row_file(results_dir, row, "test_episodes")) for row in (a, b)]
    if not episodes[0]["episode"].equals(episodes[1]["episode"]):
        raise ResultsError(f"the per-episode files of {run_a} and {run_b} hold different episode numbers")
    return {"a": run_a, "b": run_b, **paired_difference(episodes[0]["accuracy"].to_numpy(),
                                                       episodes[1]["accuracy"].to_numpy())}


def run(results_dir: str | Path, run_a: str, run_b: str) -> dict:
    result = compare_runs(results_dir, run_a, run_b)
    print(f"{run_a} - {run_b}: {result['mean']:+.2f} ± {result['ci95']:.2f} % (paired, {result['episodes']} "
          f"episodes; {result['a_better']} favour {run_a}, {result['b_better']} favour {run_b}, {result['ties']} "
          f"ties)")
    return result
