"""Decoded images stored once per dataset split: uint8 arrays on disk, opened memory-mapped.

Every process (training, DataLoader workers, torchrun ranks) reads the same file through the page cache, so a split
costs RAM for the pages in use, not for every image in every process, and no image is decoded during training.
Two kinds per split, built from the published layout by `fsl data cache` or on first use:

    train  the images as the training augmentation needs them, aspect ratio kept: each original is downscaled (never
           upscaled) by one factor on both axes, to the size at which the protocol's smallest crop (8% of the area,
           aspect ratio 3/4 or 4/3: sqrt(0.06 x area) pixels on its short side) still covers image_size source
           pixels on either axis; originals already that small are stored as they are (mini- and tiered-ImageNet:
           84 x 84). Each image sits at the top left of an S x S canvas (S = the largest stored side of the split),
           the rest filled by repeating its last row and column, so that sampling at its border clamps to it. Crop
           parameters are drawn for the original size, as torchvision would, and scaled to the stored one
           (fsl.data.augment).
    eval   the deterministic evaluation transform's output, uint8: the reader's `eval_transform` (the protocol's
           short side to 96/84 x image_size and centre crop; Omniglot's LANCZOS resize of the whole image).

Files under `cache_dir`: <name>.npy (pixels, (N, S, S, 3)), <name>.sizes.npy ((N, 4): original height and width,
stored height and width) and <name>.json, the stamp (format version, the reader's source fingerprint, count, bytes),
written last. A store heals itself: a missing, unreadable or foreign stamp, a stamp of another format or source, a
pixel or sizes file that is missing, truncated or has another header is rebuilt, and temporary files left by an
interrupted build are removed. Building writes temporary files and renames them into place, under a lock, so an
interruption leaves no half store and concurrent processes build it once. An image that cannot be decoded stops
the build, naming the file.
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

from fsl.data.augment import RATIO, SCALE
from fsl.data.base import DatasetError, SplitDataset
from fsl.data.progress import progress_bar

FORMAT = "fsl-image-store-3"  # 3: the eval kind is mmcls's cv2 resize and centre crop (#35)
KINDS = ("train", "eval")


@dataclass
class ImageStore:
    """One split's decoded images: pixels (N, S, S, 3) uint8 (memory-mapped), sizes (N, 2) original (height, width),
    stored_sizes (N, 2) the (height, width) each image occupies at the top left of its canvas."""
    pixels: np.ndarray
    sizes: np.ndarray
    stored_sizes: np.ndarray
    kind: str
    path: Path

    def __len__(self) -> int:
        return len(self.pixels)

    def gather(self, indices: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Images `indices` (any shape) as one array (*indices.shape, S, S, 3), read from the page cache; into `out`
        (e.g. pinned memory) when given."""
        flat = np.take(self.pixels, np.asarray(indices).reshape(-1), axis=0,
                       out=None if out is None else out.reshape(-1, *self.pixels.shape[1:]))
        return flat.reshape(*np.shape(indices), *self.pixels.shape[1:])


SMALLEST_CROP_SIDE = math.sqrt(SCALE[0] * min(RATIO))  # short side of the smallest crop / sqrt(area): sqrt(0.06)


def stored_size(height: int, width: int, image_size: int) -> tuple[int, int]:
    """The train kind's (height, width) for an original of height x width: one downscaling factor for both axes, so
    that the smallest protocol crop still spans image_size pixels on either axis; never upscaled."""
    factor = min(1.0, image_size / (SMALLEST_CROP_SIDE * math.sqrt(height * width)))
    return min(height, math.ceil(height * factor)), min(width, math.ceil(width * factor))


def store_name(dataset: SplitDataset, dataset_name: str, split: str, kind: str, image_size: int) -> str:
    where = hashlib.sha256(str(dataset.root.resolve()).encode()).hexdigest()[:8]
    return f"{dataset_name}{getattr(dataset, 'store_tag', '')}-{split}-{kind}{image_size}-{where}"


def expected_stamp(dataset: SplitDataset, kind: str, image_size: int) -> dict:
    return {"format": FORMAT, "kind": kind, "image_size": image_size, "count": len(dataset),
            "source": dataset.fingerprint()}


def paths(base: Path) -> dict[str, Path]:
    return {"pixels": base.with_suffix(".npy"), "sizes": base.with_name(base.name + ".sizes.npy"),
            "stamp": base.with_suffix(".json")}


def read_array(path: Path, what: str) -> tuple[np.ndarray | None, str | None]:
    """(the array, memory-mapped, None), or (None, why it cannot be read)."""
    if not path.exists():
        return None, f"{path.name} is missing"
    try:
        return np.load(path, mmap_mode="r"), None
    except (ValueError, OSError, EOFError) as error:  # a garbled header or a truncated file
        return None, f"{path.name} ({what}) cannot be read ({error})"


def problem(base: Path, stamp: dict) -> str | None:
    """Why the store at `base` cannot be used for `stamp` (None if it can)."""
    files = paths(base)
    if not files["stamp"].exists():
        return "not built yet"
    try:
        found = json.loads(files["stamp"].read_text())
    except (ValueError, OSError) as error:
        return f"its stamp {files['stamp'].name} is unreadable ({error})"
    if not isinstance(found, dict) or found.get("format") != stamp["format"]:
        version = found.get("format") if isinstance(found, dict) else None
        return f"written by another fsl version (format {version}, this one reads {stamp['format']})"
    for key in ("kind", "image_size", "count", "source"):
        if found.get(key) != stamp[key]:
            return f"its source changed ({key} differs)"
    size = files["pixels"].stat().st_size if files["pixels"].exists() else 0
    if not isinstance(found.get("bytes"), int) or size != found["bytes"]:
        return f"{files['pixels'].name} is truncated or replaced ({size} bytes, the stamp says {found.get('bytes')})"
    pixels, why = read_array(files["pixels"], "pixels")
    if pixels is None:
        return why
    if pixels.dtype != np.uint8 or pixels.ndim != 4 or len(pixels) != stamp["count"]:
        return f"{files['pixels'].name} holds {pixels.dtype} {pixels.shape}, not {stamp['count']} uint8 images"
    sizes, why = read_array(files["sizes"], "image sizes")
    if sizes is None:
        return why
    if sizes.shape != (stamp["count"], 4):
        return f"{files['sizes'].name} holds {sizes.shape}, not ({stamp['count']}, 4) image sizes"
    return None


def remove_leftovers(base: Path) -> None:
    """Temporary files of an interrupted build of this store (called under its lock: no build is running)."""
    for path in paths(base).values():
        for leftover in path.parent.glob(f".{path.name}.*.tmp"):
            leftover.unlink(missing_ok=True)


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
                remove_leftovers(base)
                try:
                    build(dataset, base, stamp, kind, image_size, progress)
                except BaseException:
                    base.with_suffix(".lock").unlink(missing_ok=True)  # a failed build leaves nothing behind
                    raise
    files = paths(base)
    sizes = np.load(files["sizes"])
    return ImageStore(np.load(files["pixels"], mmap_mode="r"), sizes[:, :2], sizes[:, 2:], kind, files["pixels"])


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


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def build(dataset: SplitDataset, base: Path, stamp: dict, kind: str, image_size: int, progress: bool) -> None:
    """Decode every image of `dataset` into temporary files, then rename them into place, the stamp last."""
    sizes = read_sizes(dataset)
    stored = np.asarray([stored_size(h, w, image_size) if kind == "train" else (image_size, image_size)
                         for h, w in sizes.tolist()], dtype=np.int32).reshape(len(dataset), 2)
    side = int(stored.max()) if len(stored) else image_size
    transform = dataset.eval_transform(image_size) if kind == "eval" else None
    final = paths(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    temporary = {}
    for key, path in final.items():
        handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=base.parent)
        os.close(handle)
        temporary[key] = Path(name)
    try:
        pixels = np.lib.format.open_memmap(temporary["pixels"], mode="w+", dtype=np.uint8,
                                           shape=(len(dataset), side, side, 3))
        for index in progress_bar(range(len(dataset)), desc=f"decoding {base.name}", unit="img",
                                  disable=not progress, mininterval=2):
            image = decode(dataset, index)
            if (image.height, image.width) != tuple(sizes[index]):
                raise DatasetError(f"{dataset.source(index)}: decoded {image.height}x{image.width}, its header says "
                                   f"{sizes[index][0]}x{sizes[index][1]}; fix: replace the file")
            image = transform(image) if transform else image
            height, width = stored[index]
            if image.size != (width, height):
                image = image.resize((width, height), Image.BILINEAR)  # PIL filters are antialiased when shrinking
            array = np.asarray(image, dtype=np.uint8)
            pixels[index] = np.pad(array, ((0, side - height), (0, side - width), (0, 0)), mode="edge")
        pixels.flush()
        del pixels
        with open(temporary["sizes"], "wb") as f:
            np.save(f, np.concatenate([sizes, stored], axis=1))
        temporary["stamp"].write_text(json.dumps({**stamp, "bytes": temporary["pixels"].stat().st_size,
                                                  "side": side}, indent=1))
        final["stamp"].unlink(missing_ok=True)  # no stamp while the files change: an interruption means "rebuild"
        mode = 0o666 & ~current_umask()  # mkstemp made them 0600: a shared cache_dir must be readable by the lab
        for key in ("pixels", "sizes", "stamp"):
            os.chmod(temporary[key], mode)
            os.replace(temporary[key], final[key])
    finally:
        for path in temporary.values():
            path.unlink(missing_ok=True)
