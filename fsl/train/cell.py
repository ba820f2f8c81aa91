"""A cell's data as training, validation and the test read it: its splits, image stores and episodes.

    cell_split          a split of the cell's dataset (data.dataset under data.root)
    cell_store          a split's image store (fsl.data.store), built on first use under data.cache_dir
    check_cell_data     before training: what the splits' labels show against the cell's episodes
    training_episodes   the training meta-batches from a task count on (this process's share under torchrun)
    FixedEpisodes       the fixed validation or test episodes (test.seed)
"""
from __future__ import annotations

import torch

from fsl.config import Config
from fsl.data import load_split
from fsl.data.base import DatasetError, SplitDataset
from fsl.data.check import split_problems, summarise
from fsl.data.episodes import (
    EpisodeDataset,
    EpisodeMaker,
    EpisodeStream,
    RankShare,
    build_taskset,
    collate_specs,
    episode_loader,
)
from fsl.data.store import ImageStore, open_store
from fsl.device import distributed


def cell_split(cfg: Config, split: str) -> SplitDataset:
    """`split` of the cell's dataset under cfg.data_root, with the reader options the config sets."""
    options = {"bbox_crop": True} if cfg.data.bbox_crop else {}
    if cfg.data.dataset in ("omniglot", "mini-imagenet"):
        options["images"] = cfg.images_form
    return load_split(cfg.data.dataset, cfg.data_root, split, **options)


def cell_store(cfg: Config, dataset: SplitDataset, split: str, kind: str) -> ImageStore:
    """The split's image store of `kind` under data.cache_dir (built on first use; fsl.data.store)."""
    return open_store(dataset, cfg.data.dataset, split, kind, cfg.data.image_size, cfg.data.cache_dir,
                      progress=distributed.is_main())


def training_episodes(cfg: Config, start: int, device: torch.device) -> EpisodeStream:
    """The training episodes `start` .. train.tasks - 1 of the cell, one meta-batch (this process's share of it,
    under torchrun) at a time, built on `device` (augmented if data.train_augment), ahead by a thread with
    data.prefetch, which holds after the first batch until `release()`."""
    split = cell_split(cfg, "train")
    store = cell_store(cfg, split, "train", "train" if cfg.data.train_augment else "eval")
    sizes = store.sizes if cfg.data.train_augment else None  # for the augmentation parameters
    episodes = EpisodeDataset(split, cfg.train.ways, cfg.train.shots, cfg.train.queries, seed=cfg.seed, start=start,
                              count=cfg.train.tasks - start, image_sizes=sizes, rotations=cfg.data.class_rotations,
                              keys="train", stream="train")
    if distributed.world_size() > 1:
        episodes = RankShare(episodes, cfg.train.meta_batch, distributed.rank(), distributed.world_size())
    make = EpisodeMaker(store, cfg.train.ways, cfg.train.shots, cfg.train.queries, cfg.data.image_size, device,
                        normalisation=split.normalisation)
    loader = episode_loader(episodes, distributed.tasks_per_rank(cfg.train.meta_batch), cfg.data.workers)
    return EpisodeStream(loader, make, cfg.data.prefetch, hold_first=True)


def check_test_episodes(cfg: Config) -> None:
    """Refuse test settings the test split cannot fill (fewer classes than test.ways, classes with fewer images than
    test.shots + test.queries), reading only its labels; DatasetError with the fix."""
    build_taskset(cell_split(cfg, "test"), cfg.test.ways, cfg.test.shots, cfg.test.queries, keys="test")


def check_cell_data(cfg: Config) -> None:
    """Before training: every problem the three splits' labels show (fsl.data.check.split_problems: too few classes
    or images per class for the cell's episodes, a class or an image in two splits), each once with its count, as
    one DatasetError; nothing is decoded."""
    datasets = {split: cell_split(cfg, split) for split in ("train", "val", "test")}
    ways = {"train": cfg.train.ways, "val": cfg.test.ways, "test": cfg.test.ways}
    problems = summarise(split_problems(datasets, cfg.episode_images, ways))
    if problems:
        listing = "\n  ".join(problems[:10]) + (f"\n  ... {len(problems) - 10} more" if len(problems) > 10 else "")
        raise DatasetError(f"{cfg.data_root} cannot hold this cell's episodes ({len(problems)} problem(s); "
                           f"`fsl data check {cfg.data.dataset} --config ...` lists them all):\n  {listing}")


class FixedEpisodes:
    """The `count` fixed `split` episodes of the cell (test.ways/shots/queries, seeded by test.seed and the split's
    own stream, fsl.data.episodes.STREAMS): their
    descriptions, drawn once, and the evaluation images they index (the store's eval kind). Validation uses the
    val split's, the test the test split's."""

    def __init__(self, cfg: Config, split: str, count: int):
        dataset = cell_split(cfg, split)
        self.store = cell_store(cfg, dataset, split, "eval")
        stream = EpisodeDataset(dataset, cfg.test.ways, cfg.test.shots, cfg.test.queries, seed=cfg.test.seed,
                                count=count, rotations=cfg.data.class_rotations, keys="test", stream=split)
        self.specs = [stream[i] for i in range(count)]
        self.shape = (cfg.test.ways, cfg.test.shots, cfg.test.queries, cfg.data.image_size)
        self.normalisation = dataset.normalisation
        self.protocol_problem = dataset.protocol_problem()  # why this data is not the protocol's, or None

    def __len__(self) -> int:
        return len(self.specs)

    def batches(self, indices: list[int], size: int, device: torch.device, prefetch: str = "inline") -> EpisodeStream:
        """Episodes `indices`, `size` at a time, as tensors on `device`, built ahead by a thread with `prefetch`
        (data.prefetch): an EpisodeStream, to be closed (`contextlib.closing`)."""
        make = EpisodeMaker(self.store, *self.shape, device, normalisation=self.normalisation)
        specs = (collate_specs([self.specs[i] for i in indices[start:start + size]])
                 for start in range(0, len(indices), size))
        return EpisodeStream(specs, make, prefetch)
