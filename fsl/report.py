"""Tables and plots from the result CSVs (never from memory): `python -m fsl tables [--results DIR]`.

Reads  results/summary.csv, results/<cell>/test_episodes.csv, results/<cell>/train_log.csv
Writes results/tables/<dataset>.md      MMFewShot's README format (its "std" column is our ci95)
       results/tables/comparison.md     each of the 12 reference cells: ours beside the reference
       results/tables/quick.md          quick sanity runs, never mixed into the tables above
       results/plots/*.png              bar chart vs the reference, learning curves, per-episode histograms
Same CSVs in, same bytes out.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend first: plotting must work without a display)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from fsl.reference import REFERENCE  # noqa: E402
from fsl.utils import write_text_atomic  # noqa: E402

DATASET_TITLES = {"cub": "CUB", "mini-imagenet": "mini-ImageNet", "tiered-imagenet": "tiered-ImageNet",
                  "glyphs": "glyphs (built-in demo)"}
NUMERIC = {"summary.csv": ["ways", "shots", "mean_acc", "ci95", "episodes"],
           "test_episodes.csv": ["episode", "accuracy"], "train_log.csv": ["tasks"]}


class ResultsError(RuntimeError):
    """The results folder is missing, empty or holds a malformed CSV; the message names the file and line."""


def read_results_csv(path: Path, required: list[str]) -> pd.DataFrame:
    """Read a result CSV, checking its columns and numbers; errors name the file and the line."""
    try:
        frame = pd.read_csv(path)
    except pd.errors.ParserError as error:
        raise ResultsError(f"{path}: malformed CSV ({error})") from error
    except pd.errors.EmptyDataError as error:
        raise ResultsError(f"{path} is empty") from error
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ResultsError(f"{path}: missing column(s) {missing}; found {list(frame.columns)}")
    for column in NUMERIC.get(path.name, []):
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = values.isna() & frame[column].notna() | frame[column].isna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise ResultsError(f"{path}: line {row + 2}: column '{column}' is {frame[column].iloc[row]!r}, "
                               f"not a number")
        frame[column] = values
    return frame


def read_summary(results: Path) -> pd.DataFrame:
    path = results / "summary.csv"
    if not results.is_dir():
        raise ResultsError(f"results folder not found: {results}\n  fix: run a cell first (e.g. `make demo`) or "
                           f"pass --results DIR")
    if not path.exists() or path.stat().st_size == 0:
        raise ResultsError(f"{path} is missing or empty: no cell has been tested yet\n  fix: run "
                           f"`python -m fsl test <config>` (or `make <cell>`) first")
    summary = read_results_csv(path, ["cell", "dataset", "arch", "ways", "shots", "mean_acc", "ci95", "episodes",
                                      "quick"])
    summary["quick"] = summary["quick"].astype(str).str.lower().isin(["true", "1"])
    return summary.sort_values(["dataset", "arch", "shots"], kind="stable").reset_index(drop=True)


def fmt(mean: float, ci: float) -> str:
    return f"{mean:.2f} ± {ci:.2f}"


def dataset_table(rows: pd.DataFrame) -> str:
    """MMFewShot's README table: Arch | Input Size | Batch Size | way | shot | mean Acc | std (= our ci95)."""
    lines = ["| Arch | Input Size | Batch Size | way | shot | mean Acc | std | episodes | train tasks |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows.itertuples():
        size = int(getattr(row, "image_size", 84) or 84)
        batch = getattr(row, "train_batch", "")
        lines.append(f"| {row.arch} | {size}x{size} | {'' if pd.isna(batch) else int(batch)} | {int(row.ways)} | "
                     f"{int(row.shots)} | {row.mean_acc:.2f} | {row.ci95:.2f} | {int(row.episodes)} | "
                     f"{'' if pd.isna(row.train_tasks) else int(row.train_tasks)} |")
    return "\n".join(lines) + "\n"


def comparison_table(summary: pd.DataFrame) -> str:
    """Each reference cell: ours (mean ± ci95) beside MMFewShot's, the difference, and whether the 95% intervals
    overlap. Cells without a (non-quick) result show 'not run'."""
    ours = {r.cell: r for r in summary[~summary["quick"]].itertuples()}
    lines = ["| cell | ours (mean ± ci95) | reference | difference | intervals overlap |", "|---|---|---|---|---|"]
    for (dataset, arch, shots), (ref_mean, ref_ci) in REFERENCE.items():
        cell = f"{dataset}-{arch}-{shots}shot"
        row = ours.get(cell)
        if row is None:
            lines.append(f"| {cell} | not run | {fmt(ref_mean, ref_ci)} | | |")
            continue
        overlap = abs(row.mean_acc - ref_mean) <= row.ci95 + ref_ci
        lines.append(f"| {cell} | {fmt(row.mean_acc, row.ci95)} | {fmt(ref_mean, ref_ci)} | "
                     f"{row.mean_acc - ref_mean:+.2f} | {'yes' if overlap else 'no'} |")
    return "\n".join(lines) + "\n"


def quick_table(summary: pd.DataFrame) -> str:
    lines = ["Quick sanity runs (few hundred tasks, 100 test episodes): not comparable to the reference.", "",
             "| cell | mean ± ci95 | episodes | train tasks |", "|---|---|---|---|"]
    for row in summary[summary["quick"]].itertuples():
        tasks = "" if pd.isna(getattr(row, "train_tasks", None)) else int(row.train_tasks)
        lines.append(f"| {row.cell} | {fmt(row.mean_acc, row.ci95)} | {int(row.episodes)} | {tasks} |")
    return "\n".join(lines) + "\n"


def save_figure(fig: plt.Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})  # no version stamp: same CSVs, same bytes
    plt.close(fig)


def plot_cells_vs_reference(summary: pd.DataFrame, path: Path) -> None:
    rows = summary[~summary["quick"]]
    cells = list(rows["cell"])
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(cells) + 2), 4.5))
    x = np.arange(len(cells))
    ax.bar(x - 0.2, rows["mean_acc"], 0.4, yerr=rows["ci95"], capsize=3, label="fsl (ours)")
    refs = [REFERENCE.get((r.dataset, r.arch, int(r.shots)), (np.nan, np.nan)) for r in rows.itertuples()]
    ax.bar(x + 0.2, [m for m, _ in refs], 0.4, yerr=[c for _, c in refs], capsize=3, label="MMFewShot reference")
    ax.axhline(100 / rows["ways"].max() if len(rows) else 20, color="grey", lw=1, ls="--", label="chance")
    ax.set_xticks(x, cells, rotation=30, ha="right")
    ax.set_ylabel("test accuracy (%) ± 95% CI")
    ax.set_ylim(0, 100)
    ax.set_title("MAML test accuracy per cell, beside the reference")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def plot_learning_curve(log: pd.DataFrame, cell: str, path: Path) -> None:
    train, val = log[log["split"] == "train"], log[log["split"] == "val"]
    fig, ax_acc = plt.subplots(figsize=(7, 4))
    if len(val):
        ax_acc.plot(val["tasks"], val["accuracy"], "o-", color="C0", label="validation accuracy")
        ax_acc.fill_between(val["tasks"], val["accuracy"] - val["ci95"], val["accuracy"] + val["ci95"],
                            color="C0", alpha=0.2, label="95% CI")
    ax_acc.set_xlabel("meta-training tasks")
    ax_acc.set_ylabel("validation accuracy (%)")
    ax_loss = ax_acc.twinx()
    if len(train):
        ax_loss.plot(train["tasks"], train["loss"], color="C1", label="training query loss")
    ax_loss.set_ylabel("training query loss (cross-entropy, nats)")
    handles = ax_acc.get_legend_handles_labels()[0] + ax_loss.get_legend_handles_labels()[0]
    ax_acc.legend(handles, [h.get_label() for h in handles], loc="center right", fontsize=8)
    ax_acc.set_title(f"{cell}: learning curve")
    fig.tight_layout()
    save_figure(fig, path)


def plot_histogram(accuracies: pd.Series, cell: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(accuracies, bins=np.linspace(0, 100, 21), color="C2", edgecolor="white")
    ax.axvline(accuracies.mean(), color="k", ls="--", label=f"mean {accuracies.mean():.2f}%")
    ax.set_xlabel("per-episode query accuracy (%)")
    ax.set_ylabel("episodes")
    ax.set_title(f"{cell}: test accuracy over {len(accuracies)} episodes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def run(results_dir: str | Path = "results") -> list[Path]:
    """Write every table and plot that the CSVs under `results_dir` allow; returns the written paths."""
    results = Path(results_dir)
    summary = read_summary(results)
    tables, plots, written = results / "tables", results / "plots", []
    main = summary[~summary["quick"]]
    for dataset, rows in main.groupby("dataset", sort=True):
        path = tables / f"{dataset}.md"
        write_text_atomic(path, f"# {DATASET_TITLES.get(dataset, dataset)}: MAML, 5-way\n\n"
                                f"std = 95% confidence half-width (1.96 * std / sqrt(episodes)), as MMFewShot\n\n"
                                + dataset_table(rows))
        written.append(path)
    write_text_atomic(tables / "comparison.md", "# fsl vs MMFewShot's MAML README\n\n" + comparison_table(summary))
    written.append(tables / "comparison.md")
    if summary["quick"].any():
        write_text_atomic(tables / "quick.md", "# Quick runs\n\n" + quick_table(summary))
        written.append(tables / "quick.md")
    if len(main):
        plot_cells_vs_reference(main, plots / "cells_vs_reference.png")
        written.append(plots / "cells_vs_reference.png")
    for row in summary.itertuples():
        suffix = "_quick" if row.quick else ""
        episodes_csv = results / row.cell / f"test_episodes{suffix}.csv"
        if episodes_csv.exists():
            episodes = read_results_csv(episodes_csv, ["episode", "accuracy"])
            plot_histogram(episodes["accuracy"], row.cell + suffix.replace("_", " "),
                           plots / f"{row.cell}{suffix}_test_histogram.png")
            written.append(plots / f"{row.cell}{suffix}_test_histogram.png")
        log_csv = results / row.cell / f"train_log{suffix}.csv"
        if log_csv.exists():
            log = read_results_csv(log_csv, ["tasks", "split", "loss", "accuracy", "ci95"])
            plot_learning_curve(log, row.cell + suffix.replace("_", " "),
                                plots / f"{row.cell}{suffix}_learning_curve.png")
            written.append(plots / f"{row.cell}{suffix}_learning_curve.png")
    for path in written:
        print(path)
    return written
