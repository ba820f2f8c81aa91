"""What `fsl adapt`'s per-query BatchNorm costs (#38 item 4): test accuracy of a trained checkpoint on its cell's
fixed test episodes, each episode adapted once and its queries classified two ways (fsl.jobs.adapt.classify):

    together  the protocol's transductive test: the episode's query set normalised by its own statistics (what
              `fsl test` measures);
    each      `fsl adapt`'s default: each query in a batch of the support images and itself alone.

Reports both accuracies (mean ± 95% half-width over the episodes) and their paired per-episode difference.

    python benchmarks/adapt_batch_norm.py CHECKPOINT [key=value ...] [--episodes 600] [--out FILE]
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fsl.config import parse_overrides, set_key  # noqa: E402
from fsl.jobs.adapt import BATCH_NORM, classify  # noqa: E402
from fsl.maml import InnerLoop, adapt  # noqa: E402
from fsl.results import ci95  # noqa: E402
from fsl.train.cell import FixedEpisodes  # noqa: E402
from fsl.train.checkpoint import load_checkpoint_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("overrides", nargs="*", help="run settings, e.g. data.root=... data.cache_dir=...")
    parser.add_argument("--episodes", type=int, default=None, help="default: the checkpoint's test.episodes")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here (markdown)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, rates, _, cfg = load_checkpoint_model(args.checkpoint, None, torch.device("cpu"))  # its own settings
    for key, value in parse_overrides(args.overrides).items():  # where the data and the stores are
        set_key(cfg, key, value)
    count = args.episodes or cfg.test.episodes
    episodes = FixedEpisodes(cfg, "test", count)
    loop = InnerLoop.testing(cfg)
    accuracy = {form: [] for form in BATCH_NORM}
    start = time.time()
    with contextlib.closing(episodes.batches(list(range(count)), 1, torch.device("cpu"))) as stream:
        for episode in stream:
            with torch.enable_grad():
                adapted = adapt(model, episode.support_x, episode.support_y, loop, rates)
            with torch.no_grad():
                for form in BATCH_NORM:
                    p = classify(adapted, episode.support_x[0], episode.query_x[0], form, len(episode.query_x[0]))
                    accuracy[form].append(100 * (p.argmax(1) == episode.query_y[0]).double().mean().item())
    together, each = (np.asarray(accuracy[f]) for f in ("together", "each"))
    difference = each - together
    lines = [f"# fsl adapt's BatchNorm: {cfg.run_name} on {count} test episodes", "",
             f"`python benchmarks/adapt_batch_norm.py {args.checkpoint} {' '.join(args.overrides)} --episodes "
             f"{count}` (CPU, 1 thread, {time.time() - start:.0f} s); {cfg.test.ways}-way {cfg.test.shots}-shot, "
             f"{cfg.test.queries} queries per class, {cfg.maml.test_inner_steps} test steps.", "",
             "| BatchNorm of the queries | accuracy (mean ± 95% half-width) |", "|---|---|",
             f"| together: the episode's query set (the protocol, `fsl test`) | {together.mean():.2f} ± "
             f"{ci95(together):.2f} |",
             f"| each: the support set and the query alone (`fsl adapt`'s default) | {each.mean():.2f} ± "
             f"{ci95(each):.2f} |", "",
             f"Paired per episode, each - together: {difference.mean():+.2f} ± {ci95(difference):.2f} points; "
             f"{int((difference > 0).sum())} episodes favour each, {int((difference < 0).sum())} together, "
             f"{int((difference == 0).sum())} tie.", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
