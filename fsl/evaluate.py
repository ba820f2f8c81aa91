"""Meta-test (step 2 of the protocol): adapt the meta-learned model on the fixed test episodes, report mean ± ci95.

`fsl test` calls `run`; the episodes come from fsl.episodes.FixedEpisodes, the accuracy from fsl.accuracy (shared
with validation), the checkpoint from fsl.checkpoint, and the summary row from fsl.results.
"""
from __future__ import annotations

import time
from pathlib import Path

from fsl import distributed
from fsl.accuracy import evaluate_fitting, parallel_episodes
from fsl.checkpoint import load_checkpoint_model, trained_tasks
from fsl.config import Config
from fsl.episodes import FixedEpisodes
from fsl.maml import InnerLoop
from fsl.precision import apply_precision
from fsl.results import ci95, summary_row, test_episodes_path, upsert_summary, write_test_episodes


def run(requested: Config, checkpoint_path: str | Path, config_path: str | Path | None = None,
        episodes: FixedEpisodes | None = None) -> dict:
    """Test `checkpoint_path` on the fixed test episodes; write the per-episode CSV and the summary row, which
    records where the result came from (fsl.provenance). Returns the summary row.

    The model-defining settings come from the checkpoint; `requested` may change only test-time and run settings.
    `episodes`: the test episodes if the caller has built them already (they must be `FixedEpisodes(cfg, "test",
    cfg.test.episodes)`)."""
    device = distributed.setup(requested.device)
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
    if not distributed.is_main():
        return row
    episodes_csv = write_test_episodes(test_episodes_path(cfg, row["test_tag"]), accuracies)
    upsert_summary(cfg.results_dir, row)
    tag = f" ({row['test_tag']})" if row["test_tag"] else ""
    caveat = "" if row["comparable"] else f" (not comparable to the reference: {row['not_comparable_why']})"
    print(f"{cfg.run_name}{tag}: {accuracies.mean():.2f} ± {ci95(accuracies):.2f} % over {len(accuracies)} test "
          f"episodes{caveat}\n  per-episode: {episodes_csv}\n  summary: {Path(cfg.results_dir) / 'summary.csv'}")
    return row
