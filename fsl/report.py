"""Tables and plots from the result CSVs (never from memory): `python -m fsl tables [--results DIR]`.

Reads  results/summary.csv, results/<cell>/test_episodes*.csv, results/<cell>/train_log*.csv (through fsl.results)
Writes results/tables/<dataset>.md         MMFewShot's README format (its "std" column is our ci95), every run
       results/tables/comparison.md        each of the 12 reference cells: our comparable result beside the reference
       results/tables/not_comparable.md    every other row, with why it is not the reference's protocol
       results/plots/*.png                 bar chart vs the reference, learning curves, per-episode histograms
Same CSVs in, same bytes out.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend first: plotting must work without a display)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from fsl import results as results_io  # noqa: E402
from fsl.reference import REFERENCE  # noqa: E402
from fsl.results import ResultsError  # noqa: E402, F401  (raised by the readers; re-exported for callers)
from fsl.utils import write_text_atomic  # noqa: E402

DATASET_TITLES = {"cub": "CUB", "mini-imagenet": "mini-ImageNet", "tiered-imagenet": "tiered-ImageNet",
                  "glyphs": "glyphs (built-in demo)"}


def read_summary(results: str | Path) -> pd.DataFrame:
    """summary.csv of `results`, sorted by dataset, arch, shots, run; an error with the fix if there is none."""
    summary = results_io.read_summary(results, must_exist=True)
    return summary.sort_values(["dataset", "arch", "shots", "run"], kind="stable").reset_index(drop=True)


def fmt(mean: float, ci: float) -> str:
    return f"{mean:.2f} ± {ci:.2f}"


def optional_int(value) -> str:
    return "" if pd.isna(value) else str(int(value))


def dataset_table(rows: pd.DataFrame) -> str:
    """MMFewShot's README table (Arch | Input Size | Batch Size | way | shot | mean Acc | std, where std is our ci95),
    with the run, the tasks trained and whether the row is the reference's protocol."""
    lines = ["| run | Arch | Input Size | Batch Size | way | shot | mean Acc | std | episodes | train tasks | "
             "comparable |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows.itertuples():
        lines.append(f"| {row.run} | {row.arch} | {row.image_size}x{row.image_size} | {optional_int(row.train_batch)} "
                     f"| {row.ways} | {row.shots} | {row.mean_acc:.2f} | {row.ci95:.2f} | {row.episodes} | "
                     f"{optional_int(row.train_tasks)} | {'yes' if row.comparable else 'no'} |")
    return "\n".join(lines) + "\n"


def comparison_table(summary: pd.DataFrame) -> str:
    """Each reference cell: our comparable result (mean ± ci95) beside MMFewShot's, the difference, and whether the
    95% intervals overlap. Cells without a comparable result show 'not run'; rows that are not the protocol are
    listed by `not_comparable_table` instead."""
    ours = {r.cell: r for r in summary[summary["comparable"]].itertuples()}
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


def not_comparable_table(summary: pd.DataFrame) -> str:
    """Every row that is not the reference's protocol, with the reason."""
    lines = ["| run | mean ± ci95 | episodes | train tasks | why not comparable |", "|---|---|---|---|---|"]
    for row in summary[~summary["comparable"]].itertuples():
        lines.append(f"| {row.run} | {fmt(row.mean_acc, row.ci95)} | {row.episodes} | "
                     f"{optional_int(row.train_tasks)} | {row.not_comparable_why} |")
    return "\n".join(lines) + "\n"


def save_figure(fig: plt.Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})  # no version stamp: same CSVs, same bytes
    plt.close(fig)


def plot_cells_vs_reference(summary: pd.DataFrame, path: Path) -> None:
    """The 12 reference cells: MMFewShot's accuracy, and ours where a comparable result exists."""
    ours = {r.cell: r for r in summary[summary["comparable"]].itertuples()}
    cells = [f"{d}-{a}-{k}shot" for d, a, k in REFERENCE]
    x = np.arange(len(cells))
    fig, ax = plt.subplots(figsize=(0.9 * len(cells) + 2, 4.5))
    ax.bar(x - 0.2, [ours[c].mean_acc if c in ours else np.nan for c in cells], 0.4,
           yerr=[ours[c].ci95 if c in ours else np.nan for c in cells], capsize=3, label="fsl (comparable runs)")
    ax.bar(x + 0.2, [m for m, _ in REFERENCE.values()], 0.4, yerr=[c for _, c in REFERENCE.values()], capsize=3,
           label="MMFewShot reference")
    ax.axhline(20, color="grey", lw=1, ls="--", label="chance (5-way)")
    ax.set_xticks(x, cells, rotation=30, ha="right")
    ax.set_ylabel("test accuracy (%) ± 95% CI")
    ax.set_ylim(0, 100)
    ax.set_title(f"MAML test accuracy per cell, beside the reference ({len(ours)} of {len(cells)} run)")
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


def tables(summary: pd.DataFrame) -> dict[str, str]:
    """{file name: markdown} of every table the summary allows (what `run` writes under results/tables)."""
    written = {}
    for dataset, rows in summary[~summary["quick"]].groupby("dataset", sort=True):
        written[f"{dataset}.md"] = (f"# {DATASET_TITLES.get(dataset, dataset)}: MAML, 5-way\n\n"
                                    f"std = 95% confidence half-width (1.96 * std / sqrt(episodes)), as MMFewShot; "
                                    f"comparable = the reference's full protocol (see not_comparable.md)\n\n"
                                    + dataset_table(rows))
    written["comparison.md"] = ("# fsl vs MMFewShot's MAML README\n\nOnly results of the full protocol (the cell's "
                                "committed config, all training tasks, 2,000 test episodes) appear here; the rest "
                                "are listed in not_comparable.md.\n\n" + comparison_table(summary))
    if (~summary["comparable"]).any():
        written["not_comparable.md"] = ("# Results not comparable to the reference\n\n"
                                        + not_comparable_table(summary))
    return written


def run(results_dir: str | Path = "results") -> list[Path]:
    """Write every table and plot that the CSVs under `results_dir` allow; returns the written paths."""
    results = Path(results_dir)
    summary = read_summary(results)
    written = []
    for name, text in tables(summary).items():
        write_text_atomic(results / "tables" / name, text)
        written.append(results / "tables" / name)
    plots = results / "plots"
    plot_cells_vs_reference(summary, plots / "cells_vs_reference.png")
    written.append(plots / "cells_vs_reference.png")
    for row in summary.itertuples():
        episodes_csv = results_io.run_file(results, row.cell, row.run, "test_episodes")
        if episodes_csv.exists():
            episodes = results_io.read_test_episodes(episodes_csv)
            plot_histogram(episodes["accuracy"], row.run, plots / f"{row.run}_test_histogram.png")
            written.append(plots / f"{row.run}_test_histogram.png")
        log_csv = results_io.run_file(results, row.cell, row.run, "train_log")
        if log_csv.exists():
            log = results_io.read_train_log(log_csv)
            plot_learning_curve(log, row.run, plots / f"{row.run}_learning_curve.png")
            written.append(plots / f"{row.run}_learning_curve.png")
    for path in written:
        print(path)
    return written
