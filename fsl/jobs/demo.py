"""`make demo`: the whole pipeline on the built-in glyphs data, in minutes on a CPU.

Generates the glyphs dataset (once), meta-tests the *untrained* initialisation (what adaptation alone gives), then
meta-trains, tests the best checkpoint and builds the tables and plots, exactly as for the 12 paper cells.
"""
from __future__ import annotations

import json
import time

from fsl.config import load_config
from fsl.data import glyphs
from fsl.device.distributed import resolve_device
from fsl.maml import InnerLoop, build_learner
from fsl.results import cell_file, ci95, report, write_test_episodes
from fsl.results.files import write_text_atomic
from fsl.train import meta_test as evaluate
from fsl.train import meta_train as train
from fsl.train.accuracy import evaluate as episode_accuracies
from fsl.train.accuracy import parallel_episodes
from fsl.train.cell import FixedEpisodes
from fsl.train.checkpoint import seed_everything

CONFIG = "experiments/glyphs-conv4-1shot.yaml"


def run(overrides: list[str] | None = None) -> dict:
    start = time.time()
    cfg = load_config(CONFIG, overrides)
    generated = glyphs.ensure_generated(cfg.data_root)
    generation_s = time.time() - start
    device = resolve_device(cfg.device)

    seed_everything(cfg.seed)
    untrained, rates = build_learner(cfg, device)
    test_episodes = FixedEpisodes(cfg, "test", cfg.test.episodes)
    parallel, _ = parallel_episodes(cfg, untrained, rates, test_episodes, device)
    untrained_acc = episode_accuracies(untrained, test_episodes, InnerLoop.testing(cfg), device, rates=rates,
                                       progress="untrained init", precision=cfg.precision, parallel=parallel,
                                       prefetch=cfg.data.prefetch)
    write_test_episodes(cell_file(cfg, "untrained_test_episodes"), untrained_acc)

    from_scratch = not (cfg.run_dir / "latest.pth").exists()  # False: a rerun that resumes or reuses the training
    train_start = time.time()
    best = train.run(cfg)
    train_s = time.time() - train_start
    row = evaluate.run(cfg, best, CONFIG, episodes=test_episodes)
    written = report.run(cfg.results_dir)
    minutes = (time.time() - start) / 60
    timing = {"minutes": round(minutes, 2), "trained_from_scratch": from_scratch,
              "glyphs_generated_s": round(generation_s, 1) if generated else None,
              "train_command_s": round(train_s, 1), "mean_acc": row["mean_acc"], "ci95": row["ci95"],
              "untrained_mean_acc": round(float(untrained_acc.mean()), 4), "device": row["device"],
              "commit": row["commit"]}
    write_text_atomic(cell_file(cfg, "demo_run").with_suffix(".json"), json.dumps(timing, indent=1) + "\n")
    print(f"\ndemo finished in {minutes:.1f} min: {cfg.run_name} test accuracy {row['mean_acc']:.2f} ± "
          f"{row['ci95']:.2f} % "
          f"(5-way {cfg.test.shots}-shot, chance 20%); adapting the untrained initialisation gives "
          f"{untrained_acc.mean():.2f} ± {ci95(untrained_acc):.2f} %")
    print("results:", f"{cfg.results_dir}/summary.csv", *[str(p) for p in written if "glyphs" in str(p)
                                                         or p.name == "comparison.md"], sep="\n  ")
    return row
