"""Worked example (docs/extending.md): a dataset stored as arrays, one `.npz` file per split.

    ROOT/train.npz, ROOT/val.npz, ROOT/test.npz, each with
        images   uint8 (N, H, W, 3)   RGB pixels
        labels   int   (N,)           class ids (any integers; the classes of a split are its distinct ids)

Many few-shot datasets ship as arrays (CIFAR-FS and FC100 as pickles, learn2learn's mini-ImageNet cache); a reader
of this kind is all fsl needs. Run fsl's command line with the dataset registered:

    python docs/examples/npz_dataset.py data check npz --root /data/my-arrays
    python docs/examples/npz_dataset.py train experiments/glyphs-conv4-1shot.yaml data.dataset=npz \\
        data.root=/data/my-arrays
    python docs/examples/npz_dataset.py test  experiments/glyphs-conv4-1shot.yaml data.dataset=npz \\
        data.root=/data/my-arrays

tests/test_extending.py builds a small array dataset and runs a tiny cell through this script.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from fsl.data import register_dataset
from fsl.data.base import DatasetError, SplitDataset, files_fingerprint, require


class NpzDataset(SplitDataset):
    """One split of ROOT/{split}.npz: labels known up front (no image decoded to learn them), images decoded into
    the image store once (fsl.data.store), as for the paper datasets."""

    def __init__(self, root: str | Path, split: str, transform: Callable | None = None):
        super().__init__(transform)
        self.root = Path(root)
        self.path = require(self.root / f"{split}.npz", f"the {split} split's arrays",
                            f"write {self.root / split}.npz with `images` (N, H, W, 3) uint8 and `labels` (N,)")
        with np.load(self.path) as arrays:
            if "images" not in arrays or "labels" not in arrays:
                raise DatasetError(f"{self.path} holds {sorted(arrays)}; fix: save it with images= and labels=")
            self.images, ids = arrays["images"], arrays["labels"]
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise DatasetError(f"{self.path}: images are {self.images.dtype} {self.images.shape}; fix: uint8 "
                               f"(N, H, W, 3)")
        if len(ids) != len(self.images):
            raise DatasetError(f"{self.path}: {len(ids)} labels for {len(self.images)} images")
        classes = sorted(set(ids.tolist()))
        self.class_names = [str(c) for c in classes]
        index = {c: i for i, c in enumerate(classes)}
        self.labels = [index[c] for c in ids.tolist()]

    def load_image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])

    def source(self, index: int) -> str:
        return f"{self.path}[{index}]"

    def image_size(self, index: int) -> tuple[int, int]:
        return tuple(self.images.shape[1:3])

    def image_sizes(self) -> list[tuple[int, int]]:
        return [tuple(self.images.shape[1:3])] * len(self.images)

    def fingerprint(self) -> str:
        return files_fingerprint([self.path])


register_dataset("npz", NpzDataset)

if __name__ == "__main__":
    from fsl.__main__ import main
    sys.exit(main())
