"""What every dataset reader returns: one split as a torch Dataset of (image, label) with a cheap label list."""
from __future__ import annotations

import hashlib
import io
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from fsl.data.transforms import IMAGENET, Normalisation, eval_resize_crop

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
    (transform(image), label); without a transform the image is an RGB `PIL.Image`. Training and evaluation read
    the decoded images from an image store instead (fsl.data.store), which `load_image` fills once.
    Subclasses set `root`, `labels` and `class_names` and implement `load_image(i)`, `source(i)` (where item i is
    stored, for error messages), `image_size(i)` and `fingerprint()` (what the store checks it was built from).
    """

    root: Path
    labels: list[int]
    class_names: list[str]
    # images a class needs per split: protocol training episodes take 5 shots + 16 queries, validation and test
    # episodes up to 5 shots + 15 queries (checked by `fsl data check`)
    min_images = {"train": 5 + 16, "val": 5 + 15, "test": 5 + 15}
    normalisation: Normalisation = IMAGENET  # what the network sees of a stored pixel (fsl.data.transforms)
    channels = 3                             # the network's input channels: len(normalisation.mean)

    @staticmethod
    def eval_transform(image_size: int) -> Callable[[Image.Image], Image.Image]:
        """PIL -> PIL: what the store's eval kind holds of each image (validation, test and un-augmented training):
        the protocol's short-side resize and centre crop (fsl.data.transforms.eval_resize_crop)."""
        return eval_resize_crop(image_size)

    def __init__(self, transform: Callable | None = None):
        self.transform = transform

    def load_image(self, index: int) -> Image.Image:
        raise NotImplementedError

    def source(self, index: int) -> str:
        raise NotImplementedError

    def image_size(self, index: int) -> tuple[int, int]:
        """(height, width) of image `index` as `load_image` returns it, read without decoding the pixels."""
        raise NotImplementedError

    def image_sizes(self) -> list[tuple[int, int]] | None:
        """Every image's (height, width) at once where the reader knows them without reading each (else None)."""
        return None

    def fingerprint(self) -> str:
        """A hash that changes when the files the images come from change (names, sizes, modification times)."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.load_image(index)
        return (self.transform(image) if self.transform else image), self.labels[index]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def verify(self) -> None:
        """A structural check of the files, cheaper than decoding every image (`fsl data check --no-decode`): a
        DatasetError naming the file and the fix, or nothing. None by default: readers check at load what they can."""

    def groups(self) -> dict[str, set[str]]:
        """Groups of classes that `fsl data check` counts besides classes and images, by kind (Omniglot's
        alphabets); none by default."""
        return {}

    def protocol_problem(self) -> str | None:
        """Why this data is not the protocol's dataset, when the reader can tell (e.g. an incomplete Omniglot); None
        otherwise. `fsl data check` reports it, and a row tested on such data is never comparable."""
        return None

    def images_per_class(self) -> Counter:
        """class index -> number of images."""
        return Counter(self.labels)

    def indices_to_labels(self) -> dict[int, int]:
        """The bookkeeping learn2learn's MetaDataset would otherwise build by decoding every item."""
        return dict(enumerate(self.labels))


def files_fingerprint(paths: Iterable[Path], *extra: str) -> str:
    """Hash of each file's resolved path, size and modification time (and `extra` strings); one stat per file. The
    same files named by a relative, an absolute or a `..` path have the same fingerprint."""
    digest = hashlib.sha256("\n".join(extra).encode())
    for path in paths:
        stat = path.stat()
        digest.update(f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def header_size(path_or_bytes: Path | bytes) -> tuple[int, int]:
    """(height, width) of an image file or encoded bytes, from its header (no pixel decoding)."""
    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    with Image.open(source) as image:
        return image.height, image.width


def open_rgb(path_or_bytes: Path | bytes) -> Image.Image:
    """Decode an image file (or encoded bytes) fully into an RGB PIL image; errors name the source. Every reader
    and `fsl adapt` decode through here.
    - Turned upright by its EXIF orientation, as MMFewShot's reader (mmcv.imread -> cv2.imread, which applies it)
      reads the seed's datasets: a phone photo reaches the model as it is shown, not sideways (#49).
    - Transparency (RGBA, LA, PA, or a palette or grey image with a transparent colour) is laid over white, as a
      viewer shows it: dropping the alpha channel, as cv2.imread does, turns black strokes on a transparent
      background all black (the seed's datasets are JPEGs, which have none).
    - Images of more than 8 bits per channel (16-bit greyscale PNGs of scientific cameras and microscopes: PIL's
      "I;16" modes, and 32-bit "I" / float "F") are scaled to 0-255 by their type's range: PIL's own convert("RGB")
      clips them, so every pixel above 255 becomes white (#38)."""
    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    with Image.open(source) as opened:
        image = ImageOps.exif_transpose(opened)  # a copy, turned, or the same pixels where there is no orientation
        if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            return wide_to_rgb(image)
        if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        return image.convert("RGB")  # convert() forces the full decode, so truncated files fail here


def wide_to_rgb(image: Image.Image) -> Image.Image:
    """A greyscale image of more than 8 bits -> RGB, value v of a 16-bit image (or a 32-bit integer image holding
    16-bit values, as PIL reads 16-bit PNGs) as round(v * 255 / 65535); float images by 0-1 if they lie there."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        top = 1.0 if values.min() >= 0 and values.max() <= 1 else max(float(values.max()), 1e-12)
    else:
        top = 65535.0 if values.max() <= 65535 else float(2**32 - 1)
    grey = np.clip(np.rint(values * 255.0 / top), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")
