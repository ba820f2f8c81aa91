"""Accuracy on fixed episodes: what validation (fsl.train) and the test (fsl.evaluate) both measure.

Each episode is adapted from the meta-learned weights by the test-time inner loop and scored on its query set; the
result is one accuracy (%) per episode (fsl.results.ci95 summarises them).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from fsl import batching, distributed
from fsl.config import Config
from fsl.episodes import FixedEpisodes
from fsl.maml import InnerLoop, InnerRates, evaluate_tasks
from fsl.precision import autocast


def parallel_episodes(cfg: Config, model: nn.Module, rates: InnerRates | None, episodes: FixedEpisodes,
                      device: torch.device) -> tuple[int, str]:
    """(test.parallel_episodes resolved for this device, why): `auto` probes the adaptation of the first episodes
    (fsl.batching: time on a CPU, one episode's memory on CUDA), at most 16 episodes at once."""
    probed = list(range(min(len(episodes), 16)))

    def run(group: int) -> None:
        with autocast(cfg.precision, device):
            for batch in episodes.batches(probed, group, device):
                evaluate_tasks(model, batch, InnerLoop.testing(cfg), rates)
    return batching.resolve(cfg.test.parallel_episodes, len(episodes), device, run, cap=16)


def evaluate(model: nn.Module, episodes: FixedEpisodes, loop: InnerLoop, device: torch.device,
             rates: InnerRates | None = None, progress: str | None = None, precision: str = "fp32",
             parallel: int = 1) -> np.ndarray:
    """Per-episode query accuracy (%) of `model` adapted by `loop` (with learned `rates`, if any) on each episode, in
    episode order; `parallel` episodes are adapted together (fsl.maml.evaluate_tasks), one host sync per batch.

    Under torchrun the episodes are dealt out round-robin across the processes (all of them must call this) and
    every process gets the full array, identical to a single-process run's."""
    share = list(distributed.my_share(len(episodes)))
    accuracies = []
    with tqdm(total=len(share), desc=progress, unit="ep", leave=False,
              disable=progress is None or not distributed.is_main()) as bar:
        for batch in episodes.batches(share, parallel, device):
            with autocast(precision, device):
                accuracies += evaluate_tasks(model, batch, loop, rates).tolist()
            bar.update(len(batch.query_y))
    return np.asarray(distributed.gather_shares(accuracies, len(episodes)), dtype=np.float64)
