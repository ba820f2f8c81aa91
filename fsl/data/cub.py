"""CUB-200-2011 (Wah et al. 2011) with the few-shot class split used by MMFewShot.

Classes in `classes.txt` order, 0-based index i = class id - 1: i % 2 == 0 -> train, i % 4 == 1 -> val,
i % 4 == 3 -> test (100/50/50 on the full 200 classes). The classes with images must be the first M of
`classes.txt` (all 200 in the release; reduced copies keep a prefix): a class without images before the last class
with images is an error, since every split would silently lose or shift classes. Raw images by default
(`images/<NNN.Class>/<file>.jpg`); `bbox_crop=True` crops each image to its box in `bounding_boxes.txt`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from PIL import Image

from fsl.data.base import DatasetError, SplitDataset, files_fingerprint, header_size, open_rgb, require

LAYOUT = """expected layout under ROOT (the CUB_200_2011 folder of the official archive):
  ROOT/images/<NNN.Class>/<file>.jpg, ROOT/images.txt, ROOT/classes.txt, ROOT/image_class_labels.txt
  (ROOT/bounding_boxes.txt too with data.bbox_crop=true)"""


def split_of_class(index: int) -> str:
    """The protocol's rule for the 0-based class index."""
    return "train" if index % 2 == 0 else ("val" if index % 4 == 1 else "test")


def read_id_table(path: Path) -> dict[int, list[str]]:
    """`<id> <fields...>` lines -> {id: fields}; errors name the file and line."""
    table = {}
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) < 2 or not parts[0].isdigit():
            raise DatasetError(f"{path}: line {line_number} is not '<id> <value>': {line!r}")
        table[int(parts[0])] = parts[1:]
    return table


class CUB(SplitDataset):
    def __init__(self, root: str | Path, split: str, transform: Callable | None = None, bbox_crop: bool = False):
        super().__init__(transform)
        root = self.root = Path(root)
        fix = f"run `python -m fsl data prepare cub --root {root}` or pass data.root=...\n{LAYOUT}"
        require(root, "CUB-200-2011 root folder", fix)
        images = read_id_table(require(root / "images.txt", "CUB images.txt", fix))
        classes = read_id_table(require(root / "classes.txt", "CUB classes.txt", fix))
        image_class = read_id_table(require(root / "image_class_labels.txt", "CUB image_class_labels.txt", fix))
        boxes = read_id_table(require(root / "bounding_boxes.txt", "CUB bounding_boxes.txt", fix)) \
            if bbox_crop else {}

        classes_with_images = sorted({int(image_class[i][0]) for i in images if i in image_class})
        holes = sorted(set(range(1, max(classes_with_images, default=0) + 1)) - set(classes_with_images))
        if holes:
            named = [classes.get(c, [f"id {c}"])[0] for c in holes[:3]]
            raise DatasetError(f"{root}: class(es) {named} ({len(holes)} in all) have no images in images.txt, but "
                               f"later classes do; the split rule indexes classes by their id in classes.txt, so "
                               f"the splits would not be the protocol's\n  fix: restore images/<class>/ and its "
                               f"lines in images.txt and image_class_labels.txt (the official archive has all 200)")
        split_classes = [c for c in classes_with_images if split_of_class(c - 1) == split]
        class_index = {c: i for i, c in enumerate(split_classes)}
        self.class_names = [classes[c][0] for c in split_classes]
        self.labels, self.paths, self.boxes = [], [], []
        for image_id in sorted(images):
            if image_id not in image_class:
                raise DatasetError(f"{root / 'image_class_labels.txt'} has no class for image id {image_id}")
            class_id = int(image_class[image_id][0])
            if class_id not in class_index:
                continue
            self.labels.append(class_index[class_id])
            self.paths.append(root / "images" / images[image_id][0])
            self.boxes.append(tuple(float(v) for v in boxes[image_id]) if bbox_crop else None)
        missing = [p for p in self.paths if not p.exists()]
        if missing:
            raise DatasetError(f"{root / 'images.txt'} names {len(missing)} image(s) that do not exist, "
                               f"first: {missing[0]}\n  fix: {LAYOUT}")

    def load_image(self, index: int) -> Image.Image:
        image = open_rgb(self.paths[index])
        if self.boxes[index] is not None:
            x, y, width, height = self.boxes[index]
            image = image.crop((int(x), int(y), int(x + width), int(y + height)))
        return image

    def source(self, index: int) -> str:
        return str(self.paths[index])

    def image_size(self, index: int) -> tuple[int, int]:
        if self.boxes[index] is None:
            return header_size(self.paths[index])
        x, y, width, height = self.boxes[index]
        return int(y + height) - int(y), int(x + width) - int(x)

    def fingerprint(self) -> str:
        return files_fingerprint(self.paths, f"bbox_crop={self.boxes[0] is not None if self.boxes else False}",
                                 *(str(box) for box in self.boxes if box))
