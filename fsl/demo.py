"""`make demo`: the whole pipeline on the built-in glyphs data, in minutes on a CPU.

Generates the glyphs dataset (once), meta-tests the *untrained* initialisation (what adaptation alone gives), then
meta-trains, tests the best checkpoint and builds the tables and plots, exactly as for the 12 paper cells.
"""
from __future__ import annotations

import time

from fsl import evaluate, report, train
from fsl.config import load_config
from fsl.data import glyphs
from fsl.maml import InnerLoop, build_learner
from fsl.results import cell_file, write_test_episodes
from fsl.utils import resolve_device, seed_everything

CONFIG = "experiments/glyphs-conv4-1shot.yaml"


def run(overrides: list[str] | None = None) -> dict:
    start = time.time()
    cfg = load_config(CONFIG, overrides)
    glyphs.ensure_generated(cfg.data_root)
    device = resolve_device(cfg.device)

    seed_everything(cfg.seed)
    untrained, rates = build_learner(cfg, device)
    test_episodes = evaluate.fixed_episodes(cfg, "test", cfg.test.episodes)
    untrained_acc = evaluate.evaluate(untrained, test_episodes, InnerLoop.testing(cfg), device, rates=rates,
                                      progress="untrained init", precision=cfg.precision,
                                      parallel=cfg.test.parallel_episodes)
    write_test_episodes(cell_file(cfg, "untrained_test_episodes"), untrained_acc)

    best = train.run(cfg)
    row = evaluate.run(cfg, best, CONFIG, episodes=test_episodes)
    written = report.run(cfg.results_dir)
    minutes = (time.time() - start) / 60
    print(f"\ndemo finished in {minutes:.1f} min: {cfg.run_name} test accuracy {row['mean_acc']:.2f} ± "
          f"{row['ci95']:.2f} % "
          f"(5-way {cfg.test.shots}-shot, chance 20%); adapting the untrained initialisation gives "
          f"{untrained_acc.mean():.2f} ± {evaluate.ci95(untrained_acc):.2f} %")
    print("results:", f"{cfg.results_dir}/summary.csv", *[str(p) for p in written if "glyphs" in str(p)
                                                         or p.name == "comparison.md"], sep="\n  ")
    return row
