"""Dataset readers: `load_split(name, root, split)` returns a SplitDataset for any of the supported datasets."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

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


__all__ = ["READERS", "SPLITS", "DatasetError", "SplitDataset", "load_split"]
