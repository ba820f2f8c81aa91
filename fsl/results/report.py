"""Tables and plots from the result CSVs (never from memory): `python -m fsl tables [--results DIR]`.

Reads  results/summary.csv, results/<cell>/test_episodes*.csv, results/<cell>/train_log*.csv (through fsl.results)
Writes results/tables/<dataset>.md         MMFewShot's README format (its "std" column is our ci95), every run;
                                           omniglot.md first sets each run beside the MAML paper's Table 1
       results/tables/comparison.md        each of the 12 reference cells: our comparable result beside the reference
       results/tables/not_comparable.md    every other row, with why it is not the reference's protocol
       results/tables/variants.md          cells run under several inner-loop variants, side by side (#17)
       results/tables/seeds.md             runs under several training seeds: across-seed mean and std
       results/plots/*.png                 bar chart vs the reference (and omniglot_vs_paper.png), learning curves,
                                           per-episode histograms
Same CSVs in, same bytes out.
"""
from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend first: plotting must work without a display)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from fsl import results as results_io  # noqa: E402
from fsl.data.episodes import EPISODE_STREAMS, SHARED_STREAMS  # noqa: E402
from fsl.results.files import (
    ResultsError,  # noqa: E402, F401  (raised by the readers; re-exported for callers)
    check_writable,  # noqa: E402
    write_text_atomic,  # noqa: E402
)
from fsl.results.reference import OMNIGLOT, OMNIGLOT_SOURCE, REFERENCE, reference  # noqa: E402

DATASET_TITLES = {"cub": "CUB", "mini-imagenet": "mini-ImageNet", "tiered-imagenet": "tiered-ImageNet",
                  "omniglot": "Omniglot", "glyphs": "glyphs (built-in demo)"}


def read_summary(results: str | Path) -> pd.DataFrame:
    """summary.csv of `results`, sorted by dataset, arch, shots, run; an error with the fix if there is none."""
    summary = results_io.read_summary(results, must_exist=True)
    return summary.sort_values(["dataset", "arch", "shots", "run"], kind="stable").reset_index(drop=True)


def fmt(mean: float, ci: float) -> str:
    return f"{mean:.2f} ± {ci:.2f}"


def optional_int(value) -> str:
    return "" if pd.isna(value) else str(int(value))


def dataset_table(rows: pd.DataFrame, results_dir: Path | None = None) -> str:
    """MMFewShot's README table (Arch | Input Size | Batch Size | way | shot | mean Acc | std, where std is our ci95),
    with the run, the tasks trained, whether the row is the reference's protocol, and, as the seed's table has them,
    its ckpt and log (`artefacts`)."""
    lines = ["| run | variant | Arch | Input Size | Batch Size | way | shot | mean Acc | std | episodes | "
             "train tasks | comparable | ckpt | log |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows.itertuples():
        ckpt, log = artefacts(row._asdict(), results_dir)
        lines.append(f"| {row.run} | {row.variant} | {row.arch} | {row.image_size}x{row.image_size} | "
                     f"{optional_int(row.train_batch)} "
                     f"| {row.ways} | {row.shots} | {row.mean_acc:.2f} | {row.ci95:.2f} | {row.episodes} | "
                     f"{optional_int(row.train_tasks)} | {'yes' if row.comparable else 'no'} | {ckpt} | {log} |")
    return "\n".join(lines) + "\n"


def artefacts(row: dict, results_dir: Path | None) -> tuple[str, str]:
    """The row's ckpt and log cells, as links relative to results/tables/: the published checkpoint (with the start
    of its sha256), or the checkpoint's path where it was too large to publish (or was tested before #36 published
    any: 'not published'); the training log copied beside the row."""
    published, digest = row.get("published_checkpoint"), row.get("checkpoint_sha256")
    if isinstance(published, str) and published:
        ckpt = f"[ckpt](../{published}) `{str(digest)[:8]}`"
    elif isinstance(digest, str) and digest:
        ckpt = f"path: `{row.get('checkpoint')}`"
    else:
        ckpt = "not published"
    log = "-"
    if results_dir is not None:
        path = results_io.row_file(results_dir, row, "train_log", test=False)
        if path.exists():
            log = f"[log](../{path.relative_to(results_dir)})"
    return ckpt, log


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


def trained_share(train_tasks: float, planned_tasks: float) -> str:
    """The share of its config's tasks a run trained, in percent: whole from 10 % up, rounded down so that an
    unfinished run never reads 100 % ('56%', '100%'), two significant digits below ('7%', '0.0033%')."""
    share = 100 * train_tasks / planned_tasks
    return f"{int(share)}%" if share >= 10 else f"{share:.2g}%"


def budget(row) -> str:
    """'64,000 of 1,920,000 (3.3%)': the tasks the run trained, of its config's."""
    if pd.isna(row.train_tasks):
        return ""
    if pd.isna(row.planned_tasks) or row.planned_tasks == row.train_tasks:
        return f"{int(row.train_tasks):,}"
    return f"{int(row.train_tasks):,} of {int(row.planned_tasks):,} ({trained_share(row.train_tasks, row.planned_tasks)})"


def paper_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per Omniglot cell and variant family (maml, fomaml, ...), the one set beside the paper: the comparable
    run if there is one, else the run that trained the most tasks, the newest test on ties. Column `others`: how many
    more rows of that cell and variant `rows` holds (the table "Every run" lists them). Order: variant, ways, shots."""
    family = rows["variant"].where(~rows["variant"].str.startswith("fomaml"), "fomaml")
    ranked = rows.assign(family=family, others=rows.groupby([rows["ways"], rows["shots"], family])["run"]
                         .transform("size") - 1)
    ranked = ranked.sort_values(["comparable", "train_tasks", "finished_at"], ascending=False, na_position="last",
                                kind="stable")
    chosen = ranked.drop_duplicates(["ways", "shots", "family"])
    return chosen.sort_values(["family", "ways", "shots"], key=lambda c: c.ne("maml") if c.name == "family" else c,
                              kind="stable")


RETEST = re.compile(r"test\.episodes=(\d+)")  # a run's own test on more episodes: its only other test setting


def longer_tests(others: pd.DataFrame) -> dict[tuple[str, str, str], pd.Series]:
    """(run, train_tag, episode_streams) -> the row of the run's test on the most episodes among its tests that
    differ from its own only in test.episodes (#51: the protocol's 600 episodes, again on 6,000)."""
    found: dict[tuple[str, str, str], pd.Series] = {}
    for _, row in others.iterrows():
        if RETEST.fullmatch(str(row["test_tag"])) and not row["checkpoint_tag"]:
            key = (row["run"], row["train_tag"], row["episode_streams"])
            if key not in found or row["episodes"] > found[key]["episodes"]:
                found[key] = row
    return found


def retest_of(row, retests: dict | None) -> pd.Series | None:
    """The longer test (`longer_tests`) of a paper_rows row, if it has more episodes than the row's own."""
    found = (retests or {}).get((row.run, row.train_tag, row.episode_streams))
    return found if found is not None and found["episodes"] > row.episodes else None


def paper_table(rows: pd.DataFrame, retests: dict | None = None) -> str:
    """Omniglot beside the MAML paper: for each cell and variant, the run `paper_rows` picks (its mean ± ci95, the
    tasks it trained of its config's, whether it is the full protocol) beside the published number for its ways, shots
    and variant (fsl.results.reference.OMNIGLOT), its test on more episodes where there is one (`retests`:
    `longer_tests`; the protocol's own test stays the headline), and how many other runs of it "Every run" lists; the
    paper's cells without a run are listed as such."""
    header = ["| cell | variant | fsl (mean ± ci95) | paper | source | difference | fsl on more test episodes | its "
              "difference | trained tasks | comparable | device | run | other runs |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines = {}  # (variant family, ways, shots) -> its line: the paper's cells first, in the paper's order
    for row in paper_rows(rows).itertuples():
        published = reference(row.dataset, row.arch, row.ways, row.shots, row.family)
        paper = fmt(*published) if published else "none"
        difference = f"{row.mean_acc - published[0]:+.2f}" if published else ""
        longer = retest_of(row, retests)
        more = "" if longer is None else f"{fmt(longer['mean_acc'], longer['ci95'])} ({longer['episodes']:,})"
        more_difference = f"{longer['mean_acc'] - published[0]:+.2f}" if longer is not None and published else ""
        lines[(row.family, row.ways, row.shots)] = (
            f"| {row.ways}-way {row.shots}-shot | {row.variant} | {fmt(row.mean_acc, row.ci95)} | {paper} | "
            f"{OMNIGLOT_SOURCE.get(row.family, '')} | {difference} | {more} | {more_difference} | {budget(row)} | "
            f"{'yes' if row.comparable else 'no'} | {row.device} | {row.run} | {row.others or ''} |")
    for (ways, shots, variant), published in OMNIGLOT.items():
        lines.setdefault((variant, ways, shots), f"| {ways}-way {shots}-shot | {variant} | not run | "
                                                 f"{fmt(*published)} | {OMNIGLOT_SOURCE[variant]} | | | | | | | | |")
    order = {cell: k for k, cell in enumerate((v, w, s) for (w, s, v) in OMNIGLOT)}
    return "\n".join(header + [lines[cell] for cell in sorted(lines, key=lambda c: order.get(c, len(order)))]) + "\n"


def plot_omniglot(rows: pd.DataFrame, path: Path, retests: dict | None = None) -> None:
    """Omniglot's four cells: the published MAML and FOMAML accuracies (hollow) and beside each the run `paper_rows`
    picks (filled, labelled with the share of its config's tasks it trained) and its test on more episodes where
    there is one (a diamond), as points with their 95% intervals on an axis zoomed to them: the differences are a
    point or two, which bars from 0 would hide."""
    cells = [(ways, shots) for ways in (5, 20) for shots in (1, 5)]
    chosen = paper_rows(rows)
    x = np.arange(len(cells))
    fig, ax = plt.subplots(figsize=(8, 5))
    lowest = []
    for k, (variant, label) in enumerate((("maml", "MAML"), ("fomaml", "first-order MAML"))):
        paper = [OMNIGLOT[(w, s, variant)] for w, s in cells]
        ax.errorbar(x + (2 * k - 1.5) * 0.15, [m for m, _ in paper], yerr=[c for _, c in paper], fmt="o",
                    mfc="white", color=f"C{2 * k}", capsize=3, label=f"{label}: {OMNIGLOT_SOURCE[variant]}")
        lowest += [m - c for m, c in paper]
        ours = chosen[chosen["family"] == variant]
        for i, (ways, shots) in enumerate(cells):
            match = ours[(ours["ways"] == ways) & (ours["shots"] == shots)]
            if match.empty:
                continue
            row = next(match.itertuples())
            position = x[i] + (2 * k - 0.5) * 0.15
            ax.errorbar(position, row.mean_acc, yerr=row.ci95, fmt="o", color=f"C{2 * k + 1}", capsize=3,
                        label=f"fsl, {label}" if f"fsl, {label}" not in ax.get_legend_handles_labels()[1] else None)
            share = "" if pd.isna(row.planned_tasks) else trained_share(row.train_tasks, row.planned_tasks)
            ax.annotate(share, (position, row.mean_acc - row.ci95), xytext=(0, -4), textcoords="offset points",
                        ha="center", va="top", fontsize=7, rotation=90)
            lowest.append(row.mean_acc - row.ci95)
            longer = retest_of(row, retests)
            if longer is not None:
                label_more = f"fsl, {label}, {longer['episodes']:,} test episodes"
                ax.errorbar(position + 0.1, longer["mean_acc"], yerr=longer["ci95"], fmt="D", markersize=4,
                            color=f"C{2 * k + 1}", capsize=2,
                            label=label_more if label_more not in ax.get_legend_handles_labels()[1] else None)
                lowest.append(longer["mean_acc"] - longer["ci95"])
    ax.set_xticks(x, [f"{w}-way {s}-shot" for w, s in cells])
    ax.set_ylabel("test accuracy (%) ± 95% CI")
    ax.set_ylim(max(0.0, np.floor(min(lowest)) - 2), 100.2)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("Omniglot: fsl beside the MAML paper (labels: share of the protocol's tasks trained)", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2)
    fig.tight_layout()
    save_figure(fig, path)


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


def run_group(run: str) -> str:
    """The run name without its seed tag: the runs of one experiment under several seeds."""
    return re.sub(r"-seed\d+", "", run)


def seed_statistics(summary: pd.DataFrame) -> pd.DataFrame:
    """Per experiment run under 2+ seeds (non-quick rows): group, seeds, across-seed mean and standard deviation
    (ddof=1) of the mean accuracy."""
    rows = summary[~summary["quick"]].assign(group=lambda f: f["run"].map(run_group))
    stats = rows.groupby("group", sort=True).agg(seeds=("seed", "count"), seed_list=("seed", lambda s: sorted(s)),
                                                 mean=("mean_acc", "mean"), std=("mean_acc", "std"),
                                                 within=("ci95", "mean"))
    return stats[stats["seeds"] >= 2].reset_index()


def seeds_table(summary: pd.DataFrame) -> str:
    """Per experiment under 2+ seeds: each seed's mean ± ci95, the within-run ci95 (test episodes, averaged over
    the seeds) beside the between-seed standard deviation of the mean (ddof 1), in accuracy points."""
    stats = seed_statistics(summary)
    rows = summary.assign(group=summary["run"].map(run_group))
    lines = ["| run | seeds | per seed: mean ± ci95 (test episodes) | within-run ci95 (mean over seeds) | "
             "across seeds: mean ± std |", "|---|---|---|---|---|"]
    for stat in stats.itertuples():
        per_seed = rows[(rows["group"] == stat.group) & ~rows["quick"]].sort_values("seed")
        listing = ", ".join(f"seed {r.seed}: {fmt(r.mean_acc, r.ci95)}" for r in per_seed.itertuples())
        lines.append(f"| {stat.group} | {stat.seeds} | {listing} | {stat.within:.2f} | {fmt(stat.mean, stat.std)} |")
    return "\n".join(lines) + "\n"


def seed_spread(rows: pd.DataFrame) -> str:
    """omniglot.md's section on training seeds (#36): the between-seed spread beside the within-run ci95, and what
    each covers (docs/omniglot.md); empty without a run under 2+ seeds."""
    if not len(seed_statistics(rows)):
        return ""
    return ("\n## Across training seeds\n\nci95: the 95% half-width over one trained model's test episodes (the "
            "sampling of test tasks). std: the standard deviation of the mean over training seeds (`make <cell> "
            "SEEDS=3`: initialisation and training episodes; the test episodes are the same for every seed). "
            "Neither covers which characters fall in the test split (docs/omniglot.md).\n\n" + seeds_table(rows))


VARIANT_ORDER = ["maml", "fomaml", "anil", "metasgd", "maml++"]


def maml_baseline(of_cell: pd.DataFrame) -> pd.Series | None:
    """The run a cell's variants are set against: its variant file `<cell>-maml`, else its plain MAML run of seed
    0 (not the zeroing trick's); of several, the comparable one, else the one trained the most tasks. None if the
    cell has no such run."""
    plain = of_cell[of_cell["run"] == f"{of_cell['cell'].iloc[0]}-maml"]
    if plain.empty:
        plain = of_cell[(of_cell["variant"].str.split("+").str[0] == "maml") & (of_cell["seed"] == 0)
                        & ~of_cell["variant"].str.contains("zero_head")]
    plain = plain.sort_values(["comparable", "train_tasks"], ascending=False, na_position="last", kind="stable")
    return None if plain.empty else plain.iloc[0]


def variant_rows(summary: pd.DataFrame) -> pd.DataFrame:
    """Non-quick rows of the cells run under two or more inner-loop variants on one schedule, cell by cell, MAML
    first. Where the cell has a MAML baseline (`maml_baseline`), only the runs that trained as many tasks as it are
    kept: a run stopped at another budget (the 2,000-step seeds beside a 60,000-step run) differs in more than its
    inner loop, and its own dataset table lists it."""
    rows = summary[~summary["quick"]]
    kept = []
    for _, of_cell in rows.groupby("cell", sort=False):
        baseline = maml_baseline(of_cell)
        if baseline is not None and pd.notna(baseline["train_tasks"]):
            of_cell = of_cell[of_cell["train_tasks"] == baseline["train_tasks"]]
        if of_cell["variant"].nunique() >= 2:
            kept.append(of_cell)
    rows = pd.concat(kept) if kept else rows.iloc[:0]
    base = rows["variant"].map(lambda v: "maml++" if v.startswith("maml++") else v.split("+")[0])
    order = base.map(lambda v: VARIANT_ORDER.index(v) if v in VARIANT_ORDER else len(VARIANT_ORDER))
    return rows.assign(order=order).sort_values(["cell", "order", "variant", "seed"], kind="stable")


def paired_against_maml(summary: pd.DataFrame, results_dir: Path | None) -> dict[str, str]:
    """run -> its paired per-episode difference against its cell's MAML baseline (`maml_baseline`;
    fsl.results.compare), where both were tested on the same episodes and their per-episode files are there."""
    from fsl.results import compare
    if results_dir is None:
        return {}
    paired = {}
    for _, of_cell in variant_rows(summary).groupby("cell"):
        baseline = maml_baseline(of_cell)
        for row in of_cell.itertuples() if baseline is not None else ():
            if row.run == baseline["run"]:
                continue
            try:
                d = compare.compare_runs(results_dir, row.run, baseline["run"])
            except (ResultsError, OSError):
                continue
            paired[row.run] = f"{d['mean']:+.2f} ± {d['ci95']:.2f} ({d['a_better']}/{d['b_better']})"
    return paired


def variants_table(summary: pd.DataFrame, results_dir: Path | None = None) -> str:
    """Variant x cell: mean ± ci95, the paired difference against the cell's plain MAML run on the same test
    episodes, speed and memory of meta-training, and the test-config hash (equal within a cell = the same test
    episodes and adaptation); across-seed statistics where a run has several seeds."""
    stats = {s.group: s for s in seed_statistics(summary).itertuples()}
    paired = paired_against_maml(summary, results_dir)
    lines = ["| cell | variant | run | mean ± ci95 | paired vs MAML (episodes better/worse) | across seeds (mean ± "
             "std, n) | train tasks | tasks/s | peak GPU MB | device | test config |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in variant_rows(summary).itertuples():
        stat = stats.get(run_group(row.run))
        seeds = f"{fmt(stat.mean, stat.std)}, {stat.seeds}" if stat is not None else ""
        speed = "" if pd.isna(row.tasks_per_s) else f"{row.tasks_per_s:.1f}"
        memory = "" if pd.isna(row.peak_memory_mb) else f"{row.peak_memory_mb:.0f}"
        lines.append(f"| {row.cell} | {row.variant} | {row.run} | {fmt(row.mean_acc, row.ci95)} | "
                     f"{paired.get(row.run, '')} | {seeds} | "
                     f"{optional_int(row.train_tasks)} | {speed} | {memory} | {row.device} | "
                     f"{row.test_config_sha} |")
    return "\n".join(lines) + "\n"


def plot_variants(summary: pd.DataFrame, path: Path) -> None:
    """Grouped bars: for each cell run under several variants, every variant's mean ± ci95."""
    rows = variant_rows(summary)
    rows = rows[rows["seed"] == rows.groupby("run")["seed"].transform("min")]  # one bar per run: its first seed
    cells = list(dict.fromkeys(rows["cell"]))
    variants = list(dict.fromkeys(rows["variant"]))
    width = 0.8 / max(1, len(variants))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cells) * max(1, len(variants)) / 3 + 2), 4.5))
    for k, variant in enumerate(variants):
        of = rows[rows["variant"] == variant].drop_duplicates("cell").set_index("cell")
        means = [of["mean_acc"].get(c, np.nan) for c in cells]
        cis = [of["ci95"].get(c, np.nan) for c in cells]
        ax.bar(np.arange(len(cells)) + (k - (len(variants) - 1) / 2) * width, means, width, yerr=cis, capsize=2,
               label=variant)
    ax.set_xticks(np.arange(len(cells)), cells)
    ax.set_ylabel("test accuracy (%) ± 95% CI")
    low = np.nanmin(rows["mean_acc"] - rows["ci95"]) if len(rows) else 0
    ax.set_ylim(max(0, np.floor(low / 10) * 10 - 10), 100)
    ax.set_title("MAML variants on the same tasks and test episodes")
    ax.legend(fontsize=7, ncol=3, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)


def tables(summary: pd.DataFrame, results_dir: Path | None = None, retests: dict | None = None) -> dict[str, str]:
    """{file name: markdown} of every table the summary allows (what `run` writes under results/tables); `retests`:
    the own rows' tests on more episodes (`longer_tests`), set beside them in omniglot.md."""
    written = {}
    for dataset, rows in summary[~summary["quick"]].groupby("dataset", sort=True):
        ways = ", ".join(f"{w}-way" for w in sorted(rows["ways"].unique()))
        paper = ("## Beside the paper\n\nOne run per cell and variant: the comparable one, else the one trained the "
                 "most tasks (other runs: the count, listed under Every run). Mean ± 95% half-width over the test "
                 "tasks; trained tasks: of the config's train.tasks (runs stopped early with train.stop_at are never "
                 "comparable). Plot: "
                 "plots/omniglot_vs_paper.png. More test episodes: the same weights tested again on more "
                 "episodes (`fsl test ... test.episodes=6000`), listed also in other_tests.md; the protocol's own "
                 "test is the headline (docs/omniglot.md, The gap to the paper).\n\n" + paper_table(rows, retests)
                 + seed_spread(rows) + "\n## Every run\n\n"
                 if dataset == "omniglot" else "")
        written[f"{dataset}.md"] = (f"# {DATASET_TITLES.get(dataset, dataset)}: MAML, {ways}\n\n" + paper +
                                    "std = 95% confidence half-width (1.96 * std / sqrt(episodes)), as MMFewShot; "
                                    "comparable = the reference's full protocol (see not_comparable.md). One row "
                                    "per run: its config file's training settings and its own test (other runs "
                                    "and tests: other_tests.md)\n\n" + dataset_table(rows, results_dir))
    written["comparison.md"] = ("# fsl vs MMFewShot's MAML README\n\nOnly results of the full protocol (the cell's "
                                "committed config, all training tasks, 2,000 test episodes) appear here; the rest "
                                "are listed in not_comparable.md.\n\n" + comparison_table(summary))
    if (~summary["comparable"]).any():
        written["not_comparable.md"] = ("# Results not comparable to the reference\n\n"
                                        + not_comparable_table(summary))
    if len(variant_rows(summary)):
        written["variants.md"] = ("# The MAML family on one protocol\n\nEach cell's runs share its tasks, seed, "
                                  "schedule and test episodes (same test config hash = same test episodes and "
                                  "adaptation); only the inner loop differs. ci95: 95% half-width over the test "
                                  "episodes of one trained model; across seeds: the spread of the mean over "
                                  "training seeds (`make <run> SEEDS=3`). tasks/s: meta-training, validation "
                                  "excluded. paired vs MAML: the mean per-episode difference to the cell's MAML "
                                  "run on the same episodes, ± its 95% half-width (`fsl compare`). Plot: "
                                  "plots/variants.png\n\n" + variants_table(summary, results_dir))
    if len(seed_statistics(summary)):
        written["seeds.md"] = ("# Runs under several seeds\n\nci95 is the 95% half-width over one model's test "
                               "episodes; std the standard deviation of the mean over training seeds (ddof 1).\n\n"
                               + seeds_table(summary))
    return written


def other_tests_table(rows: pd.DataFrame, results_dir: Path | None = None) -> str:
    """Runs with other training settings than their config file's (fsl train ... train.tasks=2000) and tests with
    other settings than a run's own (fsl test ... test.episodes=100): listed apart, each with what differs, its ckpt
    and log."""
    lines = ["| run | training settings | test settings | mean ± ci95 | episodes | train tasks | ckpt | log |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows.itertuples():
        ckpt, log = artefacts(row._asdict(), results_dir)
        training = row.train_tag or "its config file"
        if row.checkpoint_tag:  # another checkpoint's test, beside the run's own row (fsl.results.files.place_row)
            training += f"; checkpoint {row.checkpoint_tag}"
        if row.episode_streams == SHARED_STREAMS:  # a run of before #36, retested since on the per-split streams
            training += f"; {row.episode_streams} episode streams (before #36)"
        elif row.episode_streams != EPISODE_STREAMS:  # not a value this fsl writes
            training += f"; episode streams {row.episode_streams!r} (unknown to this fsl: written by a newer one?)"
        lines.append(f"| {row.run} | {training} | {row.test_tag or 'its own'} | "
                     f"{fmt(row.mean_acc, row.ci95)} | {row.episodes} | {optional_int(row.train_tasks)} | {ckpt} | "
                     f"{log} |")
    return "\n".join(lines) + "\n"


def run(results_dir: str | Path = "results") -> list[Path]:
    """Write every table and plot that the CSVs under `results_dir` allow; returns the written paths. The tables
    and plots show each run's own row: its config file's training settings and its own test; the other rows
    (another run of the cell, another test of a run) go to other_tests.md."""
    results = Path(results_dir)
    everything = read_summary(results)
    check_writable(results / "tables", "--results")  # a read-only results folder: one line, not a traceback
    summary = results_io.own_tests(everything).reset_index(drop=True)
    written = []
    others = everything[~everything.index.isin(results_io.own_tests(everything).index)]
    if len(others):
        write_text_atomic(results / "tables" / "other_tests.md", "# Other runs and tests\n\n"
                          "Rows of runs trained with other settings than their config file's, and tests with other "
                          "settings than a run's own. The other tables show each run's own row (config file, own "
                          "test); these never replace it.\n\n" + other_tests_table(others, Path(results_dir)))
        written.append(results / "tables" / "other_tests.md")
    retests = longer_tests(others)
    for name, text in tables(summary, results, retests).items():
        write_text_atomic(results / "tables" / name, text)
        written.append(results / "tables" / name)
    plots = results / "plots"
    plot_cells_vs_reference(summary, plots / "cells_vs_reference.png")
    written.append(plots / "cells_vs_reference.png")
    if len(variant_rows(summary)):
        plot_variants(summary, plots / "variants.png")
        written.append(plots / "variants.png")
    omniglot = summary[(summary["dataset"] == "omniglot") & ~summary["quick"]]
    if len(omniglot):
        plot_omniglot(omniglot, plots / "omniglot_vs_paper.png", retests)
        written.append(plots / "omniglot_vs_paper.png")
    for row in summary.itertuples():  # own rows: their files carry no tag
        episodes_csv = results_io.row_file(results, row._asdict(), "test_episodes")
        if episodes_csv.exists():
            episodes = results_io.read_test_episodes(episodes_csv)
            plot_histogram(episodes["accuracy"], row.run, plots / f"{row.run}_test_histogram.png")
            written.append(plots / f"{row.run}_test_histogram.png")
        log_csv = results_io.row_file(results, row._asdict(), "train_log", test=False)
        if log_csv.exists():
            log = results_io.read_train_log(log_csv)
            plot_learning_curve(log, row.run, plots / f"{row.run}_learning_curve.png")
            written.append(plots / f"{row.run}_learning_curve.png")
    for path in written:
        print(path)
    return written
