"""Accuracy on fixed episodes: what validation (fsl.train.meta_train) and the test (fsl.train.meta_test) both measure.

Each episode is adapted from the meta-learned weights by the test-time inner loop and scored on its query set; the
result is one accuracy (%) per episode (fsl.results.ci95 summarises them).
"""
from __future__ import annotations

from contextlib import closing

import numpy as np
import torch
from torch import nn

from fsl.config import Config
from fsl.data.progress import progress_bar
from fsl.device import distributed
from fsl.device.precision import autocast
from fsl.maml import InnerLoop, InnerRates, batching, evaluate_tasks
from fsl.train.cell import FixedEpisodes


def parallel_episodes(cfg: Config, model: nn.Module, rates: InnerRates | None, episodes: FixedEpisodes,
                      device: torch.device) -> tuple[int, str]:
    """(test.parallel_episodes resolved for this device, why): `auto` probes the adaptation of the first episodes
    (fsl.maml.batching: time on a CPU, one episode's memory on CUDA), at most 16 episodes at once."""
    probed = list(range(min(len(episodes), 16)))

    def run(group: int) -> None:
        with autocast(cfg.precision, device):
            for batch in episodes.batches(probed, group, device):
                evaluate_tasks(model, batch, InnerLoop.testing(cfg), rates)
    return batching.resolve(cfg.test.parallel_episodes, len(episodes), device, run, cap=16,
                            deterministic=cfg.deterministic)


def evaluate(model: nn.Module, episodes: FixedEpisodes, loop: InnerLoop, device: torch.device,
             rates: InnerRates | None = None, progress: str | None = None, precision: str = "fp32",
             parallel: int = 1, prefetch: str = "auto") -> np.ndarray:
    """Per-episode query accuracy (%) of `model` adapted by `loop` (with learned `rates`, if any) on each episode, in
    episode order; `parallel` episodes are adapted together (fsl.maml.evaluate_tasks), their input built ahead
    (`prefetch`, fsl.data.episodes.EpisodeStream), the accuracies kept on the device and read once, at the end.

    Under torchrun the episodes are dealt out round-robin across the processes (all of them must call this) and
    every process gets the full array, identical to a single-process run's."""
    share = list(distributed.my_share(len(episodes)))
    accuracies = []
    with progress_bar(total=len(share), desc=progress, unit="ep", leave=False,
              disable=progress is None or not distributed.is_main()) as bar, \
            closing(episodes.batches(share, parallel, device, prefetch)) as batches:
        for batch in batches:
            with autocast(precision, device):
                accuracies.append(evaluate_tasks(model, batch, loop, rates))
            bar.update(len(batch.query_y))
    values = torch.cat(accuracies).tolist() if accuracies else []  # the one host sync
    return np.asarray(distributed.gather_shares(values, len(episodes)), dtype=np.float64)


def evaluate_fitting(model: nn.Module, episodes: FixedEpisodes, loop: InnerLoop, device: torch.device,
                     rates: InnerRates | None = None, progress: str | None = None, precision: str = "fp32",
                     parallel: int = 1, prefetch: str = "auto") -> tuple[np.ndarray, int]:
    """`evaluate`, retried with half as many episodes at once after running out of device memory (the group size
    changes no accuracy beyond float rounding), down to one at a time: (the accuracies, the group that fitted)."""
    while True:
        try:
            return evaluate(model, episodes, loop, device, rates, progress, precision, parallel, prefetch), parallel
        except torch.cuda.OutOfMemoryError as error:
            if parallel == 1:
                raise batching.OutOfMemory(
                    f"out of memory on {distributed.device_name(device)} adapting one {loop.steps}-step episode "
                    f"({error}); fix: fewer test.queries or test.shots, precision=bf16, or a GPU with more "
                    f"memory") from error
        parallel = batching.halved(parallel, device, "test.parallel_episodes")
