"""mini-ImageNet (Vinyals et al. 2016) with the Ravi & Larochelle split: 64/16/20 classes, 600 images each.

Two forms of its images, told apart by what a root holds (`form`):
- `full`: the full-size ImageNet (ILSVRC-2012 train) JPEGs, as MMFewShot reads them (its documented layout,
  tools/data/classification/mini-imagenet/README.md): `images/<wnid>/<wnid>_<number>.JPEG`, every file of each
  class's ImageNet folder, and the split CSVs. A CSV row `n0153282900000005.jpg,n01532829` names the 5th image of
  class n01532829 in the order of the number after the last `_` (MMFewShot 0.1.0,
  mmfewshot/classification/datasets/mini_imagenet.py, `load_annotations`: the number is the file name's last five
  digits). MMFewShot's MAML cells crop these originals (train) and resize their short side to 96 (test): the seed's
  cells (data.mini_imagenet_images=full).
- `84x84`: the common pre-shrunk release, `images/<filename>` flat beside the CSVs, or learn2learn's
  `mini-imagenet-cache-{train,validation,test}.pkl` (dict with `image_data` (N, 84, 84, 3) uint8 and `class_dict`
  {class name: [indices]}), used when the CSV files are absent. Each image was resized to 84 x 84 from the original,
  squashing its aspect ratio: data.mini_imagenet_images=84x84, and no row on it is comparable to the seed's.
"""
from __future__ import annotations

import csv
import pickle
from pathlib import Path
from typing import Callable

from PIL import Image

from fsl.data.base import DatasetError, SplitDataset, files_fingerprint, header_size, open_rgb, require

FORMS = {"full": "the full-size ImageNet JPEGs (images/<wnid>/<wnid>_<number>.JPEG), as MMFewShot reads them",
         "84x84": "the 84x84 release (images/<filename> or learn2learn's cache), each image squashed to 84 x 84"}

LAYOUT = """expected layout under ROOT (one of):
  full-size ImageNet JPEGs (MMFewShot's layout; the seed's cells, data.mini_imagenet_images=full):
    ROOT/train.csv, ROOT/val.csv, ROOT/test.csv   (header `filename,label`, Ravi & Larochelle split)
    ROOT/images/<wnid>/<wnid>_<number>.JPEG      (ILSVRC-2012 train: each CSV class's whole folder)
  the 84x84 release (data.mini_imagenet_images=84x84, never comparable):
    ROOT/train.csv, ROOT/val.csv, ROOT/test.csv and ROOT/images/<filename>
    or learn2learn's ROOT/mini-imagenet-cache-{train,validation,test}.pkl"""

L2L_SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test"}


def read_split_csv(path: Path) -> list[tuple[str, str]]:
    """(filename, label) rows of a Ravi & Larochelle CSV; errors name the file and line. A UTF-8 byte order mark
    (spreadsheet exports) and blank lines are read past; a file named twice is refused (its image would stand twice
    in an episode's draw: an episode could hold the same image as two of its images)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != ["filename", "label"]:
            raise DatasetError(f"{path}: line 1 should be the header 'filename,label', found {header}; fix: the "
                               f"Ravi & Larochelle split CSVs (`fsl data prepare mini-imagenet`)")
        rows, first = [], {}
        for line_number, row in enumerate(reader, start=2):
            if not row or not "".join(row).strip():
                continue
            if len(row) != 2 or not row[0] or not row[1]:
                raise DatasetError(f"{path}: line {line_number} is not 'filename,label': {row}; fix: correct or "
                                   f"delete the line")
            if row[0] in first:
                raise DatasetError(f"{path}: line {line_number} names {row[0]} again (as line {first[row[0]]}); "
                                   f"fix: delete one of the two lines")
            first[row[0]] = line_number
            rows.append((row[0], row[1]))
    if not rows:
        raise DatasetError(f"{path} lists no images; fix: the Ravi & Larochelle split CSVs")
    return rows


def imagenet_order(name: str) -> int:
    """The number an ImageNet train file name ends with (`n01532829_1234.JPEG` -> 1234): MMFewShot's sort key."""
    stem = name.split(".")[0]
    try:
        return int(stem.split("_")[-1])
    except ValueError:
        return -1


class MiniImageNet(SplitDataset):
    """One split; `form` is the form the root holds (`FORMS`). `images` ('full' or '84x84') asks for a form: a root
    that holds the other is refused, naming both and the fix."""

    def __init__(self, root: str | Path, split: str, transform: Callable | None = None, images: str | None = None):
        super().__init__(transform)
        root = self.root = Path(root)
        require(root, "mini-ImageNet root folder",
                f"run `python -m fsl data prepare mini-imagenet --root {root}` or pass data.root=...\n{LAYOUT}")
        csv_path = root / f"{split}.csv"
        cache_path = root / f"mini-imagenet-cache-{L2L_SPLIT_NAMES[split]}.pkl"
        if csv_path.exists():
            self._read_csv_layout(root, csv_path, images)
        elif cache_path.exists():
            self._read_l2l_cache(cache_path)
        else:
            raise DatasetError(f"mini-ImageNet split file not found: {csv_path} (nor {cache_path.name})\n"
                               f"  fix: {LAYOUT}")
        if images is not None and images != self.form:
            other = "full" if self.form == "84x84" else "84x84"
            raise DatasetError(
                f"data.root={root} holds mini-ImageNet's {FORMS[self.form]}, but data.mini_imagenet_images={images} "
                f"asks for {FORMS[images]}; fix: pass data.mini_imagenet_images={self.form}"
                + (" (its rows are never comparable to the seed's)" if self.form == "84x84" else "")
                + f", or point data.root at a root of the {other} form (docs/datasets.md)")

    def _read_csv_layout(self, root: Path, csv_path: Path, wanted: str | None = None) -> None:
        rows = read_split_csv(csv_path)
        images = require(root / "images", "mini-ImageNet image folder", LAYOUT)
        first_file, first_label = rows[0]
        flat, nested = (images / first_file).exists(), (images / first_label).is_dir()
        # a root may hold both forms (the release's images beside ImageNet's class folders): the one asked for
        self.form = (wanted or "full") if flat and nested else ("84x84" if flat or not nested else "full")
        self.class_names = sorted({label for _, label in rows})
        class_index = {name: i for i, name in enumerate(self.class_names)}
        self.labels = [class_index[label] for _, label in rows]
        self._listing: dict[str, list[str]] = {}  # class -> its ImageNet files in MMFewShot's order
        if self.form == "84x84":
            self.paths = [images / name for name, _ in rows]
        else:
            self.paths = [self._imagenet_file(images, csv_path, line, name, label)
                          for line, (name, label) in enumerate(rows, start=2)]
        missing = [(i, p) for i, p in enumerate(self.paths) if not p.exists()]
        if missing:
            i, path = missing[0]
            raise DatasetError(f"{csv_path}: line {i + 2} names an image that does not exist: {path} "
                               f"({len(missing)} missing in all)\n  fix: complete the image folder or the CSV")
        self.array = None

    def _imagenet_file(self, images: Path, csv_path: Path, line: int, name: str, label: str) -> Path:
        """The ImageNet file a CSV row names: the k-th of its class folder by MMFewShot's order, k = the last five
        digits of the row's file name."""
        if label not in self._listing:
            folder = images / label
            if not folder.is_dir():
                raise DatasetError(f"{csv_path}: line {line} names class {label}, but {folder} is not a folder; fix: "
                                   f"extract ImageNet's train folder {label} there ({LAYOUT.splitlines()[0]})")
            files = sorted((p.name for p in folder.iterdir() if not p.name.startswith(".")), key=imagenet_order)
            odd = [f for f in files if imagenet_order(f) < 0]
            if odd:
                raise DatasetError(f"{folder / odd[0]} is not an ImageNet train file name (<wnid>_<number>.JPEG); "
                                   f"fix: keep only the class's ImageNet JPEGs in {folder}")
            self._listing[label] = files
        stem = name.split(".")[0]
        if not stem[-5:].isdigit():
            raise DatasetError(f"{csv_path}: line {line}: {name!r} does not end in five digits (e.g. "
                               f"n0153282900000005.jpg); fix: the Ravi & Larochelle CSVs")
        k, files = int(stem[-5:]), self._listing[label]
        if not 1 <= k <= len(files):
            raise DatasetError(f"{csv_path}: line {line} names image {k} of class {label}, whose folder "
                               f"{images / label} holds {len(files)}; fix: extract the class's whole ImageNet folder")
        return images / label / files[k - 1]

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
        self.form = "84x84"

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


def form_of(root: str | Path) -> str:
    """The form (`FORMS`) of the images under `root`, read from its test split; DatasetError if it holds none."""
    return MiniImageNet(root, "test").form
