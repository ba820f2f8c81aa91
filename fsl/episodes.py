"""N-way K-shot episodes built with learn2learn's task pipeline.

`MetaDataset` + `Taskset` (the TaskDataset of older releases) with `NWays`, `KShots(shots + queries)`,
`LoadData`, `RemapLabels` (labels 0..N-1 in a random order per task, i.e. a random assignment of classes to head
rows) and `ConsecutiveLabels` (items grouped by class), then split per class into `shots` support and `queries` query items.

Episode `i` of an `EpisodeDataset` is a pure function of `(seed, i)`: the task description (learn2learn draws it
with Python's `random`) and the image augmentations (torch's RNG) are drawn under a generator seeded from
`(seed, i)`. So the same seed gives the same classes, images and crops in every run, with any number of DataLoader
workers, in any order, and after resuming at any task; the caller's RNG state is left as it was.
"""
from __future__ import annotations

import os
import random
from contextlib import contextmanager
from typing import Iterator, NamedTuple

import learn2learn as l2l
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fsl.data.base import DatasetError, SplitDataset


class Episode(NamedTuple):
    """support_x: (ways*shots, C, H, W); support_y: (ways*shots,) in 0..ways-1 (class-major order);
    query_x: (ways*queries, C, H, W); query_y: (ways*queries,). A meta-batch from `episode_loader` has one more
    leading dimension (tasks) on every field."""
    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    def to(self, device: torch.device | str) -> "Episode":
        return Episode(*(t.to(device, non_blocking=True) for t in self))

    def unbind(self) -> list["Episode"]:
        """A meta-batch (leading task dimension) -> list of single episodes."""
        return [Episode(*fields) for fields in zip(*(t.unbind(0) for t in self))]


@contextmanager
def seeded(seed: int, index: int) -> Iterator[None]:
    """Seed Python's `random` and torch's CPU RNG from (seed, index) inside the block; restore them after."""
    python_state = random.getstate()
    derived = int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0])
    with torch.random.fork_rng(devices=[]):
        random.seed(derived)
        # the CPU generator only: torch.manual_seed would also queue seeds for CUDA/XPU/MTIA, capturing a Python
        # stack trace each time (~2 ms per episode, a third of a cached glyphs episode)
        torch.default_generator.manual_seed(derived)
        try:
            yield
        finally:
            random.setstate(python_state)


def build_taskset(dataset: SplitDataset, ways: int, shots: int, queries: int) -> l2l.data.Taskset:
    """learn2learn task pipeline drawing `ways` classes and `shots + queries` images of each."""
    per_class = dataset.images_per_class()
    if len(per_class) < ways:
        raise DatasetError(f"{type(dataset).__name__} split has {len(per_class)} classes, fewer than ways={ways}")
    too_small = {dataset.class_names[c]: n for c, n in per_class.items() if n < shots + queries}
    if too_small:
        raise DatasetError(f"{len(too_small)} class(es) have fewer images than shots + queries = {shots} + "
                           f"{queries}, e.g. {dict(list(too_small.items())[:3])}\n"
                           f"  fix: lower the queries, or remove these classes from the split")
    meta = l2l.data.MetaDataset(dataset, indices_to_labels=dataset.indices_to_labels())
    transforms = [
        l2l.data.transforms.NWays(meta, n=ways),
        l2l.data.transforms.KShots(meta, k=shots + queries),
        l2l.data.transforms.LoadData(meta),
        l2l.data.transforms.RemapLabels(meta, shuffle=True),
        l2l.data.transforms.ConsecutiveLabels(meta),
    ]
    return l2l.data.Taskset(meta, task_transforms=transforms)


class EpisodeDataset(Dataset):
    """Episodes `start .. start+count-1` of the stream defined by `seed` (see module docstring)."""

    def __init__(self, dataset: SplitDataset, ways: int, shots: int, queries: int, seed: int,
                 count: int, start: int = 0):
        self.taskset = build_taskset(dataset, ways, shots, queries)
        self.ways, self.shots, self.queries = ways, shots, queries
        self.seed, self.start, self.count = seed, start, count

    def __len__(self) -> int:
        return self.count

    def describe(self, i: int) -> list[int]:
        """Dataset indices of episode i's images, class by class (support first within each class)."""
        with seeded(self.seed, self.start + i):
            return [d.index for d in self.taskset.sample_task_description()]

    def __getitem__(self, i: int) -> Episode:
        if not 0 <= i < self.count:
            raise IndexError(i)
        with seeded(self.seed, self.start + i):
            x, y = self.taskset.get_task(self.taskset.sample_task_description())
        per_class = self.shots + self.queries
        x = x.view(self.ways, per_class, *x.shape[1:])  # (ways, shots+queries, C, H, W), grouped by ConsecutiveLabels
        y = y.view(self.ways, per_class)
        assert bool((y == y[:, :1]).all()), f"episode {i}: images are not grouped by class: {y.tolist()}"
        return Episode(support_x=x[:, :self.shots].flatten(0, 1), support_y=y[:, :self.shots].flatten(),
                       query_x=x[:, self.shots:].flatten(0, 1), query_y=y[:, self.shots:].flatten())


class RankShare(Dataset):
    """This rank's tasks of every meta-batch of `episodes`: item k is episode
    (k // per_rank) * meta_batch + rank * per_rank + k % per_rank, with per_rank = meta_batch / world.
    Loaded in batches of per_rank, rank r's step s holds tasks r*per_rank .. (r+1)*per_rank-1 of meta-batch s, so
    the P ranks together see exactly the meta-batches of a single process. len(episodes) must be a multiple of
    meta_batch."""

    def __init__(self, episodes: Dataset, meta_batch: int, rank: int, world: int):
        assert meta_batch % world == 0 and len(episodes) % meta_batch == 0, (len(episodes), meta_batch, world)
        self.episodes, self.meta_batch, self.rank, self.per_rank = episodes, meta_batch, rank, meta_batch // world

    def __len__(self) -> int:
        return len(self.episodes) // self.meta_batch * self.per_rank

    def global_index(self, k: int) -> int:
        return (k // self.per_rank) * self.meta_batch + self.rank * self.per_rank + k % self.per_rank

    def __getitem__(self, k: int) -> Episode:
        if not 0 <= k < len(self):
            raise IndexError(k)
        return self.episodes[self.global_index(k)]


def _single_threaded_worker(_: int) -> None:
    torch.set_num_threads(1)  # workers decode images; intra-op threads would only fight the training process


def collate_episodes(batch: list[Episode]) -> Episode:
    """Stack episodes field by field: (tasks, ...) on every field."""
    return Episode(*(torch.stack(field) for field in zip(*batch)))


def episode_loader(episodes: Dataset, meta_batch: int = 1, workers: int = 0,
                   pin_memory: bool = False) -> DataLoader:
    """Yields Episodes whose fields have a leading dimension of `meta_batch` tasks, in episode order.
    `workers` is capped at the number of CPU cores."""
    workers = min(workers, os.cpu_count() or 1)
    return DataLoader(episodes, batch_size=meta_batch, shuffle=False, num_workers=workers,
                      pin_memory=pin_memory, worker_init_fn=_single_threaded_worker,
                      persistent_workers=False, prefetch_factor=4 if workers else None,
                      collate_fn=collate_episodes)
