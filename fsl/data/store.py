"""Decoded images stored once per dataset split: uint8 arrays on disk, opened memory-mapped.

Every process (training, DataLoader workers, torchrun ranks) reads the same file through the page cache, so a split
costs RAM for the pages in use, not for every image in every process, and no image is decoded during training.
Two kinds per split, built from the published layout by `fsl data cache` or on first use:

    train  the decoded originals at full resolution, as mmcls crops them (MMFewShot decodes the original file for every
           crop): image after image, each h x w x 3 bytes, one flat array. A training crop reads only the source pixels
           cv2's bilinear resize reads for it (`ImageStore.patches`: 2 x image_size rows and columns per crop,
           fsl.data.transforms.resize_taps), so a large photo costs disk, not transfer. Sizes: docs/datasets.md.
    eval   the deterministic evaluation transform's output, uint8: the reader's `eval_transform` (the protocol's
           short side to 96/84 x image_size and centre crop; Omniglot's resize of the whole image), (N, S, S, 3).

Files under `cache_dir`: <name>.npy (pixels), <name>.sizes.npy ((N, 3) int64: original height and width, and the byte
offset of the image in the pixel file) and <name>.json, the stamp (format version, the reader's source fingerprint,
count, bytes), written last. A store heals itself: a missing, unreadable or foreign stamp, a stamp of another format or
source, a pixel or sizes file that is missing, truncated or has another header is rebuilt, and temporary files left by
an interrupted build are removed. Building writes temporary files and renames them into place, under a lock, so an
interruption leaves no half store and concurrent processes build it once. An image that cannot be decoded stops
the build, naming the file.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from fsl.data import native
from fsl.data.base import DatasetError, SplitDataset
from fsl.data.progress import progress_bar

FORMAT = "fsl-image-store-5"  # 3: the eval kind is mmcls's cv2 resize and centre crop; 4: the train kind at full
                              # resolution (#35); 5: images turned by their EXIF orientation, transparency over white
                              # (fsl.data.base.open_rgb, #49)
KINDS = ("train", "eval")


@dataclass
class ImageStore:
    """One split's decoded images, memory-mapped. eval kind: pixels (N, S, S, 3), the evaluation transform's output.
    train kind: pixels (total bytes,), the originals at full resolution, image i's (height, width, 3) bytes from
    offsets[i]. sizes (N, 2): each original's (height, width); offsets (N,) int64."""
    pixels: np.ndarray
    sizes: np.ndarray
    offsets: np.ndarray
    kind: str
    path: Path

    def __len__(self) -> int:
        return len(self.sizes)

    def image(self, index: int) -> np.ndarray:
        """Original `index` of a train-kind store, (height, width, 3) uint8: a view of the memory map."""
        height, width = self.sizes[index]
        start = int(self.offsets[index])
        return self.pixels[start:start + height * width * 3].reshape(height, width, 3)

    def gather(self, indices: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Eval kind: images `indices` (any shape) as one array (*indices.shape, S, S, 3), read from the page cache;
        into `out` (e.g. pinned memory) when given."""
        flat = np.take(self.pixels, np.asarray(indices).reshape(-1), axis=0,
                       out=None if out is None else out.reshape(-1, *self.pixels.shape[1:]))
        return flat.reshape(*np.shape(indices), *self.pixels.shape[1:])

    def patches(self, indices: np.ndarray, rows: np.ndarray, cols: np.ndarray, out: np.ndarray | None = None,
                threads: int = 1) -> np.ndarray:
        """Train kind: the pixels at rows (B, R) x cols (B, C) of originals `indices` (B,), (B, R, C, 3) uint8: the
        pixels a crop's resize reads (fsl.data.transforms.resize_taps), not the whole image; into `out` when given.
        Read by native code outside the interpreter lock, on `threads` threads (fsl.data.native), else by numpy."""
        out = np.empty((len(indices), rows.shape[1], cols.shape[1], 3), np.uint8) if out is None else out
        indices = np.asarray(indices, dtype=np.int64)
        if native.patches(self.pixels, self.offsets[indices], self.sizes[indices, 1], rows, cols, out, threads):
            return out
        for patch, index, row, col in zip(out, indices.tolist(), rows, cols):
            np.take(self.image(index).take(row, axis=0), col, axis=1, out=patch)
        return out


def flat_offsets(sizes: np.ndarray) -> np.ndarray:
    """Byte offsets (N,) int64 of images of sizes (N, 2) (height, width) laid out one after another, 3 bytes a
    pixel: the train kind's layout."""
    return np.concatenate([[0], np.cumsum(sizes.prod(1) * 3)[:-1]]).astype(np.int64)


def pack(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Images (height, width, 3) uint8 as a train-kind store holds them: (the flat pixels, (N, 3) int64 height,
    width and byte offset)."""
    sizes = np.asarray([image.shape[:2] for image in images], dtype=np.int64).reshape(len(images), 2)
    offsets = flat_offsets(sizes)
    flat = np.concatenate([image.reshape(-1) for image in images]) if images else np.empty(0, np.uint8)
    return flat, np.concatenate([sizes, offsets[:, None]], axis=1)


def from_images(images: list[np.ndarray], path: Path = Path("-")) -> ImageStore:
    """An in-memory train-kind store of `images` (tests, benchmarks)."""
    flat, table = pack(images)
    return ImageStore(flat, table[:, :2], table[:, 2], "train", path)


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
    sizes, why = read_array(files["sizes"], "image sizes")
    if sizes is None:
        return why
    if sizes.shape != (stamp["count"], 3):
        return f"{files['sizes'].name} holds {sizes.shape}, not ({stamp['count']}, 3) image sizes and offsets"
    flat = stamp["kind"] == "train"
    expected = (int((sizes[:, 0] * sizes[:, 1] * 3).sum()),) if flat else (stamp["count"],)
    if pixels.dtype != np.uint8 or pixels.shape[:1] != expected or pixels.ndim != (1 if flat else 4):
        return f"{files['pixels'].name} holds {pixels.dtype} {pixels.shape}, not {stamp['count']} uint8 images"
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
    table = np.load(files["sizes"])
    return ImageStore(np.load(files["pixels"], mmap_mode="r"), table[:, :2], table[:, 2], kind, files["pixels"])


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
    sizes = read_sizes(dataset).astype(np.int64)
    if kind == "train":  # the originals, one after another
        offsets = flat_offsets(sizes)
        shape, side = (int((sizes.prod(1) * 3).sum()),), None
    else:
        side = image_size
        offsets = np.arange(len(dataset), dtype=np.int64) * side * side * 3
        shape = (len(dataset), side, side, 3)
    transform = dataset.eval_transform(image_size) if kind == "eval" else None
    final = paths(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    temporary = {}
    for key, path in final.items():
        handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=base.parent)
        os.close(handle)
        temporary[key] = Path(name)
    try:
        pixels = np.lib.format.open_memmap(temporary["pixels"], mode="w+", dtype=np.uint8, shape=shape)
        flat = pixels.reshape(-1)
        for index in progress_bar(range(len(dataset)), desc=f"decoding {base.name}", unit="img",
                                  disable=not progress, mininterval=2):
            image = decode(dataset, index)
            if (image.height, image.width) != tuple(sizes[index]):
                raise DatasetError(f"{dataset.source(index)}: decoded {image.height}x{image.width}, its header says "
                                   f"{sizes[index][0]}x{sizes[index][1]}; fix: replace the file")
            array = np.asarray(transform(image) if transform else image, dtype=np.uint8)
            if transform and array.shape != (side, side, 3):
                raise DatasetError(f"{dataset.source(index)}: the evaluation transform gave {array.shape}, not "
                                   f"({side}, {side}, 3); fix: the reader's eval_transform")
            flat[offsets[index]:offsets[index] + array.size] = array.reshape(-1)
        pixels.flush()
        del pixels, flat
        with open(temporary["sizes"], "wb") as f:
            np.save(f, np.concatenate([sizes, offsets[:, None]], axis=1))
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
