"""What every dataset reader returns: one split as a torch Dataset of (image, label) with a cheap label list."""
from __future__ import annotations

import io
from collections import Counter
from pathlib import Path
from typing import Callable

from PIL import Image
from torch.utils.data import Dataset

SPLITS = ("train", "val", "test")


class DatasetError(RuntimeError):
    """A dataset is missing, incomplete or malformed. The message names the file and the fix."""


def require(path: Path, what: str, fix: str) -> Path:
    """Return `path` if it exists, else raise DatasetError naming it, what it should be, and the fix."""
    if not path.exists():
        raise DatasetError(f"{what} not found: {path}\n  fix: {fix}")
    return path


class SplitDataset(Dataset):
    """One split of a few-shot dataset.

    `labels[i]` is the class of item i in 0..num_classes-1, known without decoding any image, so that
    learn2learn's MetaDataset can index millions of items cheaply. `__getitem__(i)` decodes one image and returns
    (transform(image), label); without a transform the image is an RGB `PIL.Image`.
    Subclasses set `labels` and `class_names` and implement `load_image(i)` and `source(i)` (where item i is
    stored, for error messages).
    """

    labels: list[int]
    class_names: list[str]
    # images a class needs per split: protocol training episodes take 5 shots + 16 queries, validation and test
    # episodes up to 5 shots + 15 queries (checked by `fsl data check`)
    min_images = {"train": 5 + 16, "val": 5 + 15, "test": 5 + 15}

    def __init__(self, transform: Callable | None = None):
        self.transform = transform
        self.cache: dict | None = None  # index -> transformed image, once `cache_transformed()` is called

    def cache_transformed(self) -> None:
        """Keep every transformed image after its first load (each DataLoader worker keeps its own copy). Only
        correct for a deterministic transform; worth it for small images seen many times (the glyphs demo)."""
        self.cache = {}

    def load_image(self, index: int) -> Image.Image:
        raise NotImplementedError

    def source(self, index: int) -> str:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        if self.cache is not None and index in self.cache:
            return self.cache[index], self.labels[index]
        image = self.load_image(index)
        image = self.transform(image) if self.transform else image
        if self.cache is not None:
            self.cache[index] = image
        return image, self.labels[index]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def images_per_class(self) -> Counter:
        """class index -> number of images."""
        return Counter(self.labels)

    def indices_to_labels(self) -> dict[int, int]:
        """The bookkeeping learn2learn's MetaDataset would otherwise build by decoding every item."""
        return dict(enumerate(self.labels))


def open_rgb(path_or_bytes: Path | bytes) -> Image.Image:
    """Decode an image file (or encoded bytes) fully into an RGB PIL image; errors name the source."""
    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    with Image.open(source) as image:
        return image.convert("RGB")  # convert() forces the full decode, so truncated files fail here
