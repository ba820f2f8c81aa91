"""The run log: <run_dir>/log.csv, one row per training window and per validation (fsl.results.TRAIN_LOG), and, with
train.tensorboard, the same numbers as TensorBoard scalars in <run_dir>/tb at step = tasks done: train/loss,
train/accuracy, train/tasks_per_s, val/accuracy, val/ci95. Its tracked copy in results/ (results/<cell>/train_log*.csv)
is written by `fsl test` of the run (fsl.train.meta_test), never during training.
"""
from __future__ import annotations

import csv

import numpy as np

from fsl.config import Config
from fsl.results import TRAIN_LOG, ci95
from fsl.results.files import write_atomic

LOG_COLUMNS = list(TRAIN_LOG)


class RunLog:
    """Appends rows to <run_dir>/log.csv. Resuming at task t drops what was logged after t (rows of the interrupted
    run that will be written again)."""

    SCALARS = {"train": ("loss", "accuracy", "tasks_per_s"), "val": ("accuracy", "ci95")}

    def __init__(self, cfg: Config, resume_at: int = 0):
        self.cfg = cfg
        self.path = cfg.run_dir / "log.csv"
        if resume_at:
            self.truncate(resume_at)
        self.writer = None
        if cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported here: tensorboard is only needed for it
            self.writer = SummaryWriter(str(cfg.run_dir / "tb"), purge_step=resume_at + 1 if resume_at else None)

    def training(self, tasks: int, loss: float, accuracy: float, window_tasks: int, seconds: float,
                 input_seconds: float | None = None) -> None:
        """The mean query loss and accuracy (%) of the `window_tasks` tasks up to `tasks`, trained in `seconds`, of
        which the steps waited `input_seconds` for their episodes."""
        self.write({"cell": self.cfg.cell, "seed": self.cfg.seed, "tasks": tasks, "split": "train", "loss": loss,
                    "accuracy": accuracy, "ci95": "", "tasks_per_s": round(window_tasks / seconds, 3),
                    "seconds": round(seconds, 2),
                    "input_s": "" if input_seconds is None else round(input_seconds, 3)})

    def validation(self, tasks: int, accuracies: np.ndarray, seconds: float) -> None:
        """The validation at `tasks` (per-episode accuracies, %, measured in `seconds`)."""
        self.write({"cell": self.cfg.cell, "seed": self.cfg.seed, "tasks": tasks, "split": "val", "loss": "",
                    "accuracy": float(np.mean(accuracies)), "ci95": ci95(accuracies), "tasks_per_s": "",
                    "seconds": round(seconds, 2)})

    def write(self, row: dict) -> None:
        if self.path.exists() and self.header() != LOG_COLUMNS:
            self.truncate(10**18)  # a log of an older fsl: rewritten with today's columns (the new ones empty)
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow(row)
        if self.writer is not None:
            for name in self.SCALARS[row["split"]]:
                self.writer.add_scalar(f"{row['split']}/{name}", row[name], row["tasks"])
            self.writer.flush()

    def header(self) -> list[str]:
        with open(self.path, newline="") as f:
            return next(csv.reader(f), [])

    def truncate(self, tasks_done: int) -> None:
        if not self.path.exists():
            return
        with open(self.path, newline="") as f:
            rows = [row for row in csv.DictReader(f) if int(row["tasks"]) <= tasks_done]

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
                writer.writeheader()
                writer.writerows(rows)
        write_atomic(self.path, write)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
