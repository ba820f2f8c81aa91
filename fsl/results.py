"""Result files, written atomically: per-episode test CSVs and one `summary.csv` row per cell (and quick flag)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fsl.config import Config
from fsl.utils import write_atomic

SUMMARY_COLUMNS = ["cell", "dataset", "arch", "ways", "shots", "image_size", "train_batch", "mean_acc", "ci95",
                   "episodes", "train_tasks", "quick", "checkpoint", "seed", "commit", "config_commit", "config_sha", "device", "seconds",
                   "finished_at", "reference_mean", "reference_ci95"]


def test_episodes_path(cfg: Config) -> Path:
    return Path(cfg.results_dir) / cfg.cell / ("test_episodes_quick.csv" if cfg.quick else "test_episodes.csv")


def train_log_path(cfg: Config) -> Path:
    """The tracked copy of <run_dir>/log.csv that the learning-curve plots read."""
    return Path(cfg.results_dir) / cfg.cell / ("train_log_quick.csv" if cfg.quick else "train_log.csv")


def write_csv_atomic(frame: pd.DataFrame, path: str | Path) -> None:
    write_atomic(path, lambda tmp: frame.to_csv(tmp, index=False))


def write_test_episodes(cfg: Config, accuracies: np.ndarray) -> Path:
    """results/<cell>/test_episodes.csv: columns episode, accuracy (%)."""
    path = test_episodes_path(cfg)
    write_csv_atomic(pd.DataFrame({"episode": np.arange(len(accuracies)), "accuracy": accuracies}), path)
    return path


def read_summary(results_dir: str | Path) -> pd.DataFrame:
    path = Path(results_dir) / "summary.csv"
    if not path.exists() or path.stat().st_size == 0:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    return pd.read_csv(path)


def upsert_summary(results_dir: str | Path, row: dict) -> None:
    """Add `row` to summary.csv, replacing the row of the same cell and quick flag."""
    summary = read_summary(results_dir)
    if len(summary):
        keep = ~((summary["cell"] == row["cell"]) & (summary["quick"].astype(bool) == bool(row["quick"])))
        summary = summary[keep]
    summary = pd.concat([summary, pd.DataFrame([row])], ignore_index=True) if len(summary) else pd.DataFrame([row])
    columns = SUMMARY_COLUMNS + [c for c in summary.columns if c not in SUMMARY_COLUMNS]
    summary = summary.reindex(columns=columns).sort_values(["quick", "cell"], kind="stable")
    write_csv_atomic(summary, Path(results_dir) / "summary.csv")


def is_done(results_dir: str | Path, cell: str, quick: bool, sha: str, config_commit: str) -> bool:
    """True if summary.csv holds a result of `cell` for this config hash and config commit."""
    summary = read_summary(results_dir)
    if not len(summary) or "+dirty" in config_commit:
        return False
    match = summary[(summary["cell"] == cell) & (summary["quick"].astype(bool) == quick)]
    return bool(len(match)) and match.iloc[0]["config_sha"] == sha and match.iloc[0]["config_commit"] == config_commit
