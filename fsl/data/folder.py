"""Your own images as a few-shot dataset (`data.dataset=folder`, `data.root=ROOT`), in either of two layouts:

    class folders   ROOT/{train,val,test}/<class>/<image>          (one folder per class, split by class)
    CSV files       ROOT/images/<file> + ROOT/{train,val,test}.csv (`filename,label`, LibFewShot's layout)

The layout is detected from what ROOT holds (`detect_layout`) and reported by `fsl data check folder --root ROOT`.
Labels come from the folder names or the CSV, so learn2learn gets them up front and no image is decoded to learn its
label; images are decoded once, into the image stores (fsl.data.store), like the paper datasets'.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from PIL import Image

from fsl.data.base import DatasetError, SplitDataset, files_fingerprint, header_size, open_rgb, require
from fsl.data.mini_imagenet import read_split_csv

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
LAYOUTS = """expected, under ROOT, one of:
  ROOT/train/<class>/<image>, ROOT/val/<class>/<image>, ROOT/test/<class>/<image>   (class folders)
  ROOT/images/<file> with ROOT/train.csv, ROOT/val.csv, ROOT/test.csv ('filename,label' rows)   (CSV files)"""


def detect_layout(root: Path) -> str:
    """'class folders' or 'csv' for the folder at `root`; DatasetError naming what is there otherwise."""
    if (root / "images").is_dir() and any((root / f"{split}.csv").exists() for split in ("train", "val", "test")):
        return "csv"
    if any((root / split).is_dir() for split in ("train", "val", "test")):
        return "class folders"
    found = sorted(p.name for p in root.iterdir())[:8] if root.is_dir() else []
    raise DatasetError(f"{root} holds neither layout (found: {found})\n  fix: {LAYOUTS}")


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def class_folder_images(folder: Path) -> tuple[list[str], list[Path], list[int]]:
    """(class names, image paths, labels) of a folder of class folders, classes and files in sorted order. A class
    folder without images of its own is an error that names it (and where its images are, if they sit a folder
    deeper): it would count as a class that no episode can draw; so is one with images of its own and more a folder
    deeper, which would be left out."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    paths, labels, empty = [], [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (folder / name).iterdir() if is_image(p))
        if not files:
            deeper = next((p for p in sorted((folder / name).rglob("*")) if is_image(p)), None)
            empty.append(f"{folder / name}" + (f" (its images are a folder deeper, e.g. {deeper}; fix: move them "
                                               f"up into {folder / name})" if deeper else " (no image)"))
        else:  # images a folder deeper than a class's own would be left out without a word
            nested = next((p for p in sorted((folder / name).rglob("*")) if is_image(p) and p.parent != folder / name),
                          None)
            if nested is not None:
                raise DatasetError(f"class folder {folder / name} holds images of its own and more in a subfolder "
                                   f"(e.g. {nested}), which would be left out\n  fix: move them up into "
                                   f"{folder / name}, or out of it")
        paths += files
        labels += [label] * len(files)
    if empty:
        raise DatasetError(f"{len(empty)} class folder(s) hold no image of their own: {'; '.join(empty[:3])}"
                           + (f"; and {len(empty) - 3} more" if len(empty) > 3 else "")
                           + "\n  fix: every class folder holds its images directly, or remove the empty ones")
    return classes, paths, labels


class Folder(SplitDataset):
    """One split of a folder dataset (see the module docstring)."""

    def __init__(self, root: str | Path, split: str, transform: Callable | None = None):
        super().__init__(transform)
        root = self.root = Path(root)
        require(root, "dataset folder (data.root)", f"pass data.root=ROOT of your images\n{LAYOUTS}")
        self.layout = detect_layout(root)
        if self.layout == "csv":
            csv_path = require(root / f"{split}.csv", f"{split} split file", LAYOUTS)
            rows = read_split_csv(csv_path)
            self.class_names = sorted({label for _, label in rows})
            index = {name: i for i, name in enumerate(self.class_names)}
            self.paths = [root / "images" / name for name, _ in rows]
            self.labels = [index[label] for _, label in rows]
            missing = [p for p in self.paths if not p.exists()]
            if missing:
                raise DatasetError(f"{csv_path} names {len(missing)} image(s) that do not exist, e.g. {missing[0]}\n"
                                   f"  fix: complete ROOT/images or the CSV")
        else:
            folder = require(root / split, f"{split} split folder", LAYOUTS)
            self.class_names, self.paths, self.labels = class_folder_images(folder)
        if not self.paths:
            raise DatasetError(f"the {split} split of {root} ({self.layout}) holds no images\n  fix: {LAYOUTS}")

    def load_image(self, index: int) -> Image.Image:
        return open_rgb(self.paths[index])

    def source(self, index: int) -> str:
        return str(self.paths[index])

    def image_size(self, index: int) -> tuple[int, int]:
        return header_size(self.paths[index])

    def fingerprint(self) -> str:
        return files_fingerprint(self.paths, self.layout)
