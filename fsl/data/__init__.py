"""Dataset readers: `load_split(name, root, split)` returns a SplitDataset for any of the supported datasets, and
`register_dataset` adds one (docs/extending.md)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from fsl import config
from fsl.data.base import SPLITS, DatasetError, SplitDataset
from fsl.data.cub import CUB
from fsl.data.folder import Folder
from fsl.data.glyphs import Glyphs
from fsl.data.mini_imagenet import MiniImageNet
from fsl.data.omniglot import Omniglot
from fsl.data.tiered_imagenet import TieredImageNet

READERS = {"cub": CUB, "mini-imagenet": MiniImageNet, "tiered-imagenet": TieredImageNet, "omniglot": Omniglot,
           "glyphs": Glyphs, "folder": Folder}


def load_split(name: str, root: str | Path, split: str, transform: Callable | None = None,
               **options) -> SplitDataset:
    """Read `split` ('train', 'val' or 'test') of dataset `name` stored under `root`."""
    if name not in READERS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {sorted(READERS)}")
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    return READERS[name](root, split, transform, **options)


def register_dataset(name: str, reader: type[SplitDataset]) -> None:
    """Make `data.dataset=name` read its splits with `reader(root, split, transform)`, a SplitDataset subclass
    (fsl.data.base says what it implements); a reader with `channels = 1` is greyscale (no colour augmentation).
    Call it before the config is loaded, e.g. in the script that runs fsl's command line (docs/examples/)."""
    if name in READERS and READERS[name] is not reader:
        raise ValueError(f"dataset {name!r} is already registered (by {READERS[name].__qualname__}); pick another name")
    if not (isinstance(reader, type) and issubclass(reader, SplitDataset)):
        raise TypeError(f"register_dataset({name!r}, ...): the reader must be a SplitDataset subclass (fsl.data.base)")
    READERS[name] = reader
    if name not in config.DATASETS:
        config.DATASETS.append(name)
    if reader.channels == 1 and name not in config.GREYSCALE:
        config.GREYSCALE.append(name)


__all__ = ["READERS", "SPLITS", "DatasetError", "SplitDataset", "load_split", "register_dataset"]
