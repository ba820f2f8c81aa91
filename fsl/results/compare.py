"""`fsl compare RUN_A RUN_B`: two rows tested on the same fixed episodes, compared episode by episode.

Two runs' test accuracies on the *same* episodes are paired: the per-episode difference a - b cancels how hard each
episode is, so its 95 % interval is far narrower than the two rows' own intervals side by side. Rows tested on other
episodes (another dataset, data folder or image form, other ways, shots, queries or image size, another test seed,
class rotations, number of episodes or episode streams: fsl.results.files.EPISODE_FIELDS) are refused with the
reason. Rows written before #49 lack the columns queries, test_seed and class_rotations; for them the test settings
their test_tag names (`tag_settings`) stand in, so that a row of test.seed=1 never pairs with a row of the run's own
seed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fsl.data.episodes import EPISODE_STREAMS, SHARED_STREAMS
from fsl.results.files import EPISODE_FIELDS, ResultsError, ci95, own_tests, read_summary, read_test_episodes, row_file

SAME_EPISODES = tuple(k for k in EPISODE_FIELDS if k != "split")  # fsl test's rows are all of the test split
TAGGED = {"test.queries": "queries", "test.seed": "test_seed", "data.class_rotations": "class_rotations"}


def tag_settings(row: pd.Series) -> dict:
    """The episode-defining settings a row's train_tag and test_tag name (test.queries=10 -> queries: '10'; the
    test's own over the training's), for rows written before their columns existed."""
    tags = f"{row.get('train_tag') or ''} {row.get('test_tag') or ''}"
    pairs = (part.split("=", 1) for part in tags.split() if "=" in part)
    return {TAGGED[key]: value for key, value in pairs if key in TAGGED}


def differences(a: pd.Series, b: pd.Series) -> list[str]:
    """How the episodes of rows `a` and `b` differ, field by field ('test_seed 0 vs 1')."""
    different = [f"{key} {a.get(key)} vs {b.get(key)}" for key in SAME_EPISODES
                 if pd.notna(a.get(key)) and pd.notna(b.get(key)) and a.get(key) != b.get(key)]
    if not different and (pd.isna(a.get("test_seed")) or pd.isna(b.get("test_seed"))):  # a row of before #49
        tags = [tag_settings(a), tag_settings(b)]
        different = [f"{key} {tags[0].get(key, 'its own')} vs {tags[1].get(key, 'its own')}"
                     for key in TAGGED.values() if tags[0].get(key) != tags[1].get(key)]
    if not different and a.get("episodes_id") and b.get("episodes_id") and a["episodes_id"] != b["episodes_id"]:
        different = [f"episodes_id {a['episodes_id']} vs {b['episodes_id']}"]
    return different


def own_row(summary: pd.DataFrame, run: str) -> pd.Series:
    """The row of `run`'s own test: of its config file's settings, or else of the one set of other training
    settings the run was trained with (a run of `train.tasks=...`, whose train_tag says so)."""
    rows = own_tests(summary)
    match = rows[rows["run"] == run]
    if match.empty:  # a run with its own training settings: its own test, on the current episode streams
        tested = summary[(summary["run"] == run) & (summary["test_tag"].fillna("") == "")
                         & (summary["checkpoint_tag"].fillna("") == "")
                         & (summary["episode_streams"].fillna(SHARED_STREAMS) == EPISODE_STREAMS)]
        if len(tested) > 1:
            tags = "; ".join(sorted(tested["train_tag"].fillna("")))
            raise ResultsError(f"run {run!r} has rows of {len(tested)} training settings ({tags}); fix: give each "
                               f"its own name= when training, so that a run name names one model")
        match = tested
    if match.empty:
        other = summary.loc[summary["run"] == run, "test_tag"].dropna()
        if len(other):
            raise ResultsError(f"run {run!r} has only tests with other settings than its own ({'; '.join(other)}), "
                               f"and a paired comparison takes each run's own test; fix: fsl test the run with its "
                               f"own settings, then compare")
        known = ", ".join(sorted(set(rows["run"]) | set(summary.loc[summary["test_tag"].fillna("") == "", "run"])))
        raise ResultsError(f"no row of run {run!r} in summary.csv; fix: " + (f"one of {known}" if known else
                           "test a run first (fsl test CONFIG), or point --results at the folder that holds them"))
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
    summary = read_summary(results_dir, must_exist=True)
    a, b = own_row(summary, run_a), own_row(summary, run_b)
    different = differences(a, b)
    if different:
        raise ResultsError(f"{run_a} and {run_b} were tested on different episodes ({'; '.join(different)}): a "
                           f"paired difference needs the same fixed episodes; fix: compare runs of one cell's test, "
                           f"or test one of them with the other's settings")
    episodes = []
    for run, row in ((run_a, a), (run_b, b)):
        path = row_file(results_dir, row, "test_episodes")
        if not path.exists():
            raise ResultsError(f"{path}: the per-episode accuracies of run {run!r} are missing; fix: restore the file "
                               f"(git checkout -- {path}), or rerun its test (fsl test)")
        episodes.append(read_test_episodes(path))
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
