"""mini-ImageNet (Vinyals et al. 2016) with the Ravi & Larochelle split: 64/16/20 classes, 600 images each.

Layouts read (under `root`):
- `train.csv`, `val.csv`, `test.csv` (`filename,label`) with images either flat in `images/<filename>` (the common
  84x84 release) or in per-class folders `images/<label>/<filename>` (original ImageNet JPEGs, MMFewShot's layout);
- or learn2learn's `mini-imagenet-cache-{train,validation,test}.pkl` (dict with `image_data` (N, 84, 84, 3) uint8
  and `class_dict` {class name: [indices]}), used when the CSV files are absent.
"""
from __future__ import annotations

import csv
import pickle
from pathlib import Path
from typing import Callable

from PIL import Image

from fsl.data.base import DatasetError, SplitDataset, files_fingerprint, header_size, open_rgb, require

LAYOUT = """expected layout under ROOT (either one):
  ROOT/train.csv, ROOT/val.csv, ROOT/test.csv   (header `filename,label`, Ravi & Larochelle split)
  ROOT/images/<filename>  or  ROOT/images/<label>/<filename>
or learn2learn's cache files:
  ROOT/mini-imagenet-cache-train.pkl, ROOT/mini-imagenet-cache-validation.pkl, ROOT/mini-imagenet-cache-test.pkl"""

L2L_SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test"}


def read_split_csv(path: Path) -> list[tuple[str, str]]:
    """(filename, label) rows of a Ravi & Larochelle CSV; errors name the file and line."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != ["filename", "label"]:
            raise DatasetError(f"{path}: line 1 should be the header 'filename,label', found {header}")
        rows = []
        for line_number, row in enumerate(reader, start=2):
            if len(row) != 2 or not row[0] or not row[1]:
                raise DatasetError(f"{path}: line {line_number} is not 'filename,label': {row}")
            rows.append((row[0], row[1]))
    if not rows:
        raise DatasetError(f"{path} lists no images")
    return rows


class MiniImageNet(SplitDataset):
    def __init__(self, root: str | Path, split: str, transform: Callable | None = None):
        super().__init__(transform)
        root = self.root = Path(root)
        require(root, "mini-ImageNet root folder",
                f"run `python -m fsl data prepare mini-imagenet --root {root}` or pass data.root=...\n{LAYOUT}")
        csv_path = root / f"{split}.csv"
        cache_path = root / f"mini-imagenet-cache-{L2L_SPLIT_NAMES[split]}.pkl"
        if csv_path.exists():
            self._read_csv_layout(root, csv_path)
        elif cache_path.exists():
            self._read_l2l_cache(cache_path)
        else:
            raise DatasetError(f"mini-ImageNet split file not found: {csv_path} (nor {cache_path.name})\n"
                               f"  fix: {LAYOUT}")

    def _read_csv_layout(self, root: Path, csv_path: Path) -> None:
        rows = read_split_csv(csv_path)
        images = require(root / "images", "mini-ImageNet image folder", LAYOUT)
        first_file, first_label = rows[0]
        per_class_folders = not (images / first_file).exists() and (images / first_label / first_file).exists()
        self.class_names = sorted({label for _, label in rows})
        class_index = {name: i for i, name in enumerate(self.class_names)}
        self.labels = [class_index[label] for _, label in rows]
        self.paths = [images / label / name if per_class_folders else images / name for name, label in rows]
        missing = [(i, p) for i, p in enumerate(self.paths) if not p.exists()]
        if missing:
            i, path = missing[0]
            raise DatasetError(f"{csv_path}: line {i + 2} names an image that does not exist: {path} "
                               f"({len(missing)} missing in all)\n  fix: complete the image folder or the CSV")
        self.array = None

    def _read_l2l_cache(self, path: Path) -> None:
        try:
            with open(path, "rb") as f:
                cache = pickle.load(f)
            self.array, class_dict = cache["image_data"], cache["class_dict"]
        except Exception as error:  # a pickle can fail in many ways; all mean the file is not the cache
            raise DatasetError(f"{path} is not a learn2learn mini-ImageNet cache ({error}); "
                               f"delete it and download it again") from error
        self.class_names = sorted(class_dict)
        labels = [0] * len(self.array)
        for class_id, name in enumerate(self.class_names):
            for index in class_dict[name]:
                labels[index] = class_id
        self.labels = labels
        self.cache_path = path

    def image_size(self, index: int) -> tuple[int, int]:
        return tuple(self.array.shape[1:3]) if self.array is not None else header_size(self.paths[index])

    def image_sizes(self) -> list[tuple[int, int]] | None:
        return [tuple(self.array.shape[1:3])] * len(self.array) if self.array is not None else None

    def fingerprint(self) -> str:
        return files_fingerprint([self.cache_path] if self.array is not None else self.paths)

    def load_image(self, index: int) -> Image.Image:
        if self.array is not None:
            return Image.fromarray(self.array[index]).convert("RGB")
        return open_rgb(self.paths[index])

    def source(self, index: int) -> str:
        return f"{self.cache_path}[{index}]" if self.array is not None else str(self.paths[index])
