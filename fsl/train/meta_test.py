"""Meta-test (step 2 of the protocol): adapt the meta-learned model on the fixed test episodes, report mean ± ci95.

`fsl test` calls `run`; the episodes come from fsl.train.cell.FixedEpisodes, the accuracy from fsl.train.accuracy (shared
with validation), the checkpoint from fsl.train.checkpoint, and the summary row from fsl.results.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from fsl.config import Config, load_config
from fsl.device import distributed
from fsl.device.precision import apply_precision
from fsl.maml import InnerLoop
from fsl.results import ci95, read_summary, row_file, summary_row, write_test_episodes
from fsl.results.files import check_writable, publish_checkpoint, record_row, sha256_of, write_atomic
from fsl.train.accuracy import evaluate_fitting, parallel_episodes
from fsl.train.cell import FixedEpisodes, check_test_episodes
from fsl.train.checkpoint import load_checkpoint_model, tested_checkpoint, trained_tasks


def run(requested: Config, checkpoint_path: str | Path, config_path: str | Path | None = None,
        episodes: FixedEpisodes | None = None) -> dict:
    """Test `checkpoint_path` on the fixed test episodes; write the per-episode CSV and the summary row, which
    records where the result came from (fsl.results.provenance). Returns the summary row.

    The model-defining settings come from the checkpoint; `requested` may change only test-time and run settings.
    `episodes`: the test episodes if the caller has built them already (they must be `FixedEpisodes(cfg, "test",
    cfg.test.episodes)`)."""
    device = distributed.setup(requested.device)
    if distributed.is_main():  # before the test: a results folder it could not write, a summary it could not extend
        check_writable(Path(requested.results_dir), "results_dir")
        read_summary(requested.results_dir)
    checkpoint_path = Path(checkpoint_path)
    model, rates, checkpoint, cfg = load_checkpoint_model(checkpoint_path, requested, device)
    apply_precision(cfg.precision, device, cfg.cudnn_benchmark, cfg.deterministic)
    episodes = episodes or FixedEpisodes(cfg, "test", cfg.test.episodes)
    parallel, why = parallel_episodes(cfg, model, rates, episodes, device)
    if distributed.is_main():
        print(f"test.parallel_episodes={parallel} ({why})", flush=True)
    start = time.time()
    accuracies, parallel = evaluate_fitting(model, episodes, InnerLoop.testing(cfg), device, rates=rates,
                                            progress=f"test {cfg.run_name}", precision=cfg.precision,
                                            parallel=parallel, prefetch=cfg.data.prefetch)
    row = summary_row(cfg, accuracies, checkpoint, checkpoint_path, trained_tasks(checkpoint_path, checkpoint),
                      parallel, device, time.time() - start, config_path)
    incomplete = episodes.protocol_problem
    if incomplete:  # data that is not the protocol's (fsl.data.base.SplitDataset.protocol_problem)
        row["comparable"] = False
        row["not_comparable_why"] = "; ".join(filter(None, [row["not_comparable_why"], incomplete.split(": not")[0]
                                                            + ": not the protocol's data"]))
    if not distributed.is_main():
        return row
    digest = sha256_of(checkpoint_path)

    def write_files(placed: dict) -> dict:
        write_test_episodes(row_file(cfg.results_dir, placed, "test_episodes"), accuracies)
        log = checkpoint_path.parent / "log.csv"
        if log.exists():  # the run's learning curve, tracked beside its test (training never writes into results/)
            write_atomic(row_file(cfg.results_dir, placed, "train_log", test=False),
                         lambda tmp: shutil.copyfile(log, tmp))
        return publish_checkpoint(cfg.results_dir, placed, checkpoint_path, digest)  # small ones beside the row
    # beside a finished row, never over it, under the summary's lock throughout
    row = record_row(cfg.results_dir, {**row, "checkpoint_sha256": digest}, write_files)
    episodes_csv = row_file(cfg.results_dir, row, "test_episodes")
    tag = "".join(f" ({row[key]})" for key in ("train_tag", "test_tag") if row[key])
    tag += f" (checkpoint {row['checkpoint_tag']}, beside the run's own row)" if row["checkpoint_tag"] else ""
    caveat = "" if row["comparable"] else f" (not comparable to the reference: {row['not_comparable_why']})"
    print(f"{row['run']}{tag}: {accuracies.mean():.2f} ± {ci95(accuracies):.2f} % over {len(accuracies)} test "
          f"episodes{caveat}\n  per-episode: {episodes_csv}\n  summary: {Path(cfg.results_dir) / 'summary.csv'}"
          + (f"\n  checkpoint: {Path(cfg.results_dir) / row['published_checkpoint']} (sha256 "
             f"{row['checkpoint_sha256'][:12]}...)" if row["published_checkpoint"] else ""))
    return row


def run_command(config_path: str, checkpoint: str | None, overrides: list[str]) -> dict:
    """`fsl test CONFIG [CHECKPOINT] [key=value ...]`: refuse test settings the test split cannot fill before looking
    for a checkpoint, then test CHECKPOINT, or the run's own (`default_checkpoint`)."""
    cfg = load_config(config_path, overrides)
    check_test_episodes(cfg)
    return run(cfg, checkpoint or default_checkpoint(config_path, overrides, cfg), config_path)


def default_checkpoint(config_path: str, overrides: list[str], cfg: Config) -> Path:
    """The checkpoint `fsl test` takes when none is named: the run's (fsl.train.checkpoint.tested_checkpoint). A test
    with other ways or shots than the run's (a 1-shot run tested 5-shot) names another cell: its run is then the
    one of the config file's own ways and shots, if that one exists."""
    path = tested_checkpoint(cfg)
    episode_keys = ("test.ways", "test.shots")
    if not path.exists() and any(o.split("=", 1)[0].strip() in episode_keys for o in overrides):
        own = load_config(config_path, [o for o in overrides if o.split("=", 1)[0].strip() not in episode_keys])
        path = tested_checkpoint(own) if tested_checkpoint(own).exists() else path
    return path
