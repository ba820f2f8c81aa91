"""tiered-ImageNet (Ren et al. 2018): 351/97/160 classes in 20/6/8 super-categories, 84x84 images.

Reads Ren et al.'s release (also learn2learn's file names): `{split}_images_png.pkl`, an object array of
PNG-encoded uint8 buffers, and `{split}_labels.pkl`, a dict with `label_specific` (per-image class index),
`label_specific_str` (class names), `label_general` and `label_general_str` (super-categories).
Reading a split loads only the labels; the PNG bytes (~8.7 GB for the full train split) are loaded when an image is
decoded, which happens once, when the image store is built (fsl.data.store): training reads the store.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from fsl.data.base import DatasetError, SplitDataset, files_fingerprint, header_size, open_rgb, require

LAYOUT = """expected layout under ROOT (Ren et al.'s release, or ROOT/tiered-imagenet/ as learn2learn stores it):
  ROOT/{train,val,test}_images_png.pkl   object array of PNG bytes
  ROOT/{train,val,test}_labels.pkl       dict with label_specific, label_specific_str, label_general, ..."""


def load_pickle(path: Path):
    with open(path, "rb") as f:
        head = f.read(64)
        f.seek(0)
        if head.lstrip().lower().startswith((b"<!doctype html", b"<html")):
            raise DatasetError(f"{path} is an HTML page, not a pickle: a download link returned a web page "
                               f"(a known failure of Google Drive mirrors)\n  fix: download the file by hand\n{LAYOUT}")
        try:
            return pickle.load(f, encoding="latin1")  # Ren et al.'s pickles were written by Python 2
        except Exception as error:  # any unpickling failure means the same thing: not the release's file
            raise DatasetError(f"{path} cannot be read as a pickle ({error}); it is truncated or not the "
                               f"tiered-ImageNet release file\n  fix: download it again\n{LAYOUT}") from error


class TieredImageNet(SplitDataset):
    def __init__(self, root: str | Path, split: str, transform: Callable | None = None):
        super().__init__(transform)
        root = Path(root)
        fix = f"run `python -m fsl data prepare tiered-imagenet --root {root}` or pass data.root=...\n{LAYOUT}"
        require(root, "tiered-ImageNet root folder", fix)
        if not (root / f"{split}_labels.pkl").exists() and (root / "tiered-imagenet").is_dir():
            root = root / "tiered-imagenet"
        labels_path = require(root / f"{split}_labels.pkl", "tiered-ImageNet labels file", fix)
        images_path = require(root / f"{split}_images_png.pkl", "tiered-ImageNet images file", fix)
        labels = load_pickle(labels_path)
        if not isinstance(labels, dict) or "label_specific" not in labels:
            raise DatasetError(f"{labels_path} has no 'label_specific' entry; found {type(labels).__name__} "
                               f"{sorted(labels) if isinstance(labels, dict) else ''}\n  fix: {LAYOUT}")
        self.root, self.images_path, self.labels_path, self._png_bytes = root, images_path, labels_path, None
        specific = np.asarray(labels["label_specific"]).astype(np.int64)
        self.labels = specific.tolist()
        names = labels.get("label_specific_str")
        num_classes = int(specific.max()) + 1 if len(specific) else 0
        self.class_names = [str(n) for n in names] if names is not None and len(names) == num_classes \
            else [f"class_{i}" for i in range(num_classes)]

    @property
    def png_bytes(self) -> np.ndarray:
        """(N,) object array of the encoded PNGs, loaded on first use (building the image store)."""
        if self._png_bytes is None:
            png_bytes = load_pickle(self.images_path)
            if len(png_bytes) != len(self.labels):
                raise DatasetError(f"{self.labels_path} has {len(self.labels)} labels but {self.images_path} has "
                                   f"{len(png_bytes)} images\n  fix: the two files come from different releases")
            self._png_bytes = png_bytes
        return self._png_bytes

    def verify(self) -> None:
        """The images pickle loads whole (not truncated), holds one image per label, and each is PNG data."""
        not_png = [i for i, b in enumerate(self.png_bytes) if not bytes(b[:8]) == b"\x89PNG\r\n\x1a\n"]
        if not_png:
            raise DatasetError(f"{self.images_path}: {len(not_png)} of {len(self.png_bytes)} entries are not PNG data "
                               f"(first: {self.source(not_png[0])})\n  fix: download the file again\n{LAYOUT}")

    def load_image(self, index: int) -> Image.Image:
        buffer = self.png_bytes[index]
        return open_rgb(bytes(buffer) if not isinstance(buffer, bytes) else buffer)

    def source(self, index: int) -> str:
        return f"{self.images_path}[{index}]"

    def image_size(self, index: int) -> tuple[int, int]:
        return header_size(bytes(self.png_bytes[index]))

    def fingerprint(self) -> str:
        return files_fingerprint([self.images_path, self.labels_path])
