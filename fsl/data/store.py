"""Decoded images stored once per dataset split: uint8 arrays on disk, opened memory-mapped.

Every process (training, DataLoader workers, torchrun ranks) reads the same file through the page cache, so a split
costs RAM for the pages in use, not for every image in every process, and no image is decoded during training.
Two kinds per split, built from the published layout by `fsl data cache` or on first use:

    train  the images as the training augmentation needs them: an S x S canvas per image, S = the largest original
           side, capped at ceil(image_size / sqrt(0.08)) (the protocol's smallest crop, 8% of the area, then still
           covers at least image_size source pixels across); originals that are S x S are stored as they are
           (mini- and tiered-ImageNet: 84 x 84). Each image's original (height, width) is kept: crop parameters are
           drawn for the original, as torchvision would (fsl.data.augment).
    eval   the deterministic evaluation transform's output (short side to 96/84 x image_size, centre crop), uint8.

Files under `cache_dir`: <name>.npy (pixels, (N, S, S, 3)), <name>.sizes.npy ((N, 2)) and <name>.json, the stamp
(format version, the reader's source fingerprint, count, sizes), written last. A store whose stamp is missing, of
another format, of a changed source, or whose pixel file has the wrong length is rebuilt. Building writes temporary
files and renames them into place, under a lock, so an interrupted build leaves no half store and concurrent
processes build it once. An image that cannot be decoded stops the build, naming the file.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image
from tqdm import tqdm

from fsl.data.augment import SCALE
from fsl.data.base import DatasetError, SplitDataset
from fsl.data.transforms import eval_resize_crop

FORMAT = "fsl-image-store-1"
KINDS = ("train", "eval")


@dataclass
class ImageStore:
    """One split's decoded images: pixels (N, S, S, 3) uint8 (memory-mapped), sizes (N, 2) original (height, width)."""
    pixels: np.ndarray
    sizes: np.ndarray
    kind: str
    path: Path

    def __len__(self) -> int:
        return len(self.pixels)

    def gather(self, indices: np.ndarray) -> np.ndarray:
        """Images `indices` (any shape) as one array (*indices.shape, S, S, 3), read from the page cache."""
        return self.pixels[np.asarray(indices).reshape(-1)].reshape(*np.shape(indices), *self.pixels.shape[1:])


def canvas_side(sizes: np.ndarray, image_size: int) -> int:
    """Side S of the train kind's canvas: the largest original side, at most what the smallest crop needs."""
    return int(min(math.ceil(image_size / math.sqrt(SCALE[0])), sizes.max()))


def store_name(dataset: SplitDataset, dataset_name: str, split: str, kind: str, image_size: int) -> str:
    where = hashlib.sha256(str(dataset.root.resolve()).encode()).hexdigest()[:8]
    return f"{dataset_name}-{split}-{kind}{image_size}-{where}"


def expected_stamp(dataset: SplitDataset, kind: str, image_size: int) -> dict:
    return {"format": FORMAT, "kind": kind, "image_size": image_size, "count": len(dataset),
            "source": dataset.fingerprint()}


def problem(base: Path, stamp: dict) -> str | None:
    """Why the store at `base` cannot be used for `stamp` (None if it can)."""
    stamp_path = base.with_suffix(".json")
    if not stamp_path.exists():
        return "not built yet"
    found = json.loads(stamp_path.read_text())
    if found.get("format") != stamp["format"]:
        return f"written by another fsl version (format {found.get('format')}, this one reads {stamp['format']})"
    for key in ("kind", "image_size", "count", "source"):
        if found.get(key) != stamp[key]:
            return f"its source changed ({key} differs)"
    pixels = base.with_suffix(".npy")
    if not pixels.exists() or pixels.stat().st_size != found["bytes"]:
        size = pixels.stat().st_size if pixels.exists() else 0
        return f"{pixels.name} is truncated or replaced ({size} bytes, the stamp says {found['bytes']})"
    return None


@contextmanager
def locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def open_store(dataset: SplitDataset, dataset_name: str, split: str, kind: str, image_size: int,
               cache_dir: str | Path, progress: bool = True) -> ImageStore:
    """The store of `kind` for `dataset` (one split), built first if it is missing or stale."""
    if kind not in KINDS:
        raise ValueError(f"store kind {kind!r}; choose one of {KINDS}")
    base = Path(cache_dir) / store_name(dataset, dataset_name, split, kind, image_size)
    stamp = expected_stamp(dataset, kind, image_size)
    reason = problem(base, stamp)
    if reason is not None:
        with locked(base.with_suffix(".lock")):
            reason = problem(base, stamp)  # another process may have built it while we waited
            if reason is not None:
                if progress:
                    print(f"building the {kind} image store of {dataset_name} {split} ({len(dataset)} images) in "
                          f"{base.with_suffix('.npy')}: {reason}", flush=True)
                build(dataset, base, stamp, kind, image_size, progress)
    return ImageStore(np.load(base.with_suffix(".npy"), mmap_mode="r"),
                      np.load(base.with_name(base.name + ".sizes.npy")), kind, base.with_suffix(".npy"))


def unreadable(dataset: SplitDataset, index: int, error: Exception) -> DatasetError:
    return DatasetError(f"cannot decode image {dataset.source(index)} ({type(error).__name__}: {error})\n"
                        f"  fix: replace the file (or check the whole dataset with `fsl data check`), then rerun")


def decode(dataset: SplitDataset, index: int) -> Image.Image:
    try:
        return dataset.load_image(index)
    except Exception as error:  # PIL raises many types for corrupt files; all mean the same to the user
        raise unreadable(dataset, index, error) from error


def read_sizes(dataset: SplitDataset) -> np.ndarray:
    """(N, 2) (height, width) of every image, from the reader or the image headers."""
    sizes = dataset.image_sizes()
    if sizes is None:
        sizes = []
        for index in range(len(dataset)):
            try:
                sizes.append(dataset.image_size(index))
            except Exception as error:  # as in decode
                raise unreadable(dataset, index, error) from error
    return np.asarray(sizes, dtype=np.int32).reshape(len(dataset), 2)


def build(dataset: SplitDataset, base: Path, stamp: dict, kind: str, image_size: int, progress: bool) -> None:
    """Decode every image of `dataset` into temporary files, then rename them into place, the stamp last."""
    sizes = read_sizes(dataset)
    side = canvas_side(sizes, image_size) if kind == "train" else image_size
    transform = eval_resize_crop(image_size) if kind == "eval" else None
    final = {"pixels": base.with_suffix(".npy"), "sizes": base.with_name(base.name + ".sizes.npy"),
             "stamp": base.with_suffix(".json")}
    base.parent.mkdir(parents=True, exist_ok=True)
    temporary = {}
    for key, path in final.items():
        handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=base.parent)
        os.close(handle)
        temporary[key] = Path(name)
    try:
        pixels = np.lib.format.open_memmap(temporary["pixels"], mode="w+", dtype=np.uint8,
                                           shape=(len(dataset), side, side, 3))
        for index in tqdm(range(len(dataset)), desc=f"decoding {base.name}", unit="img", disable=not progress,
                          mininterval=2):
            image = decode(dataset, index)
            if (image.height, image.width) != tuple(sizes[index]):
                raise DatasetError(f"{dataset.source(index)}: decoded {image.height}x{image.width}, its header says "
                                   f"{sizes[index][0]}x{sizes[index][1]}; fix: replace the file")
            image = transform(image) if transform else image
            if image.size != (side, side):
                image = image.resize((side, side), Image.BILINEAR)  # PIL filters are antialiased when shrinking
            pixels[index] = np.asarray(image, dtype=np.uint8)
        pixels.flush()
        del pixels
        with open(temporary["sizes"], "wb") as f:
            np.save(f, sizes)
        temporary["stamp"].write_text(json.dumps({**stamp, "bytes": temporary["pixels"].stat().st_size,
                                                  "side": side}, indent=1))
        final["stamp"].unlink(missing_ok=True)  # no stamp while the files change: an interruption means "rebuild"
        for key in ("pixels", "sizes", "stamp"):
            os.replace(temporary[key], final[key])
    finally:
        for path in temporary.values():
            path.unlink(missing_ok=True)
