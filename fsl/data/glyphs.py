"""glyphs: a built-in Omniglot-like dataset rendered from the fonts that matplotlib ships (DejaVu and STIX).

Each class is one Unicode character; its instances differ in font family, weight and slant, plus a random affine
distortion (rotation, shear, scale, shift). Classes are grouped by script (first word of the Unicode name, with
arrows merged) and the splits are by script, so test characters come from scripts never seen in training:
test = Armenian, Georgian, Lao; val = Cyrillic; train = every other script with at least `MIN_SCRIPT_CLASSES`
characters (Latin, Greek, Arabic, Hebrew, Canadian syllabics, Braille, arrows, box drawing, ...), each script
capped at `MAX_SCRIPT_CLASSES` characters.

Generated on first use under `root` (`images.npy` (N, 32, 32) uint8 white-on-black, `labels.npy` (N,) int64 class
ids, `classes.csv`) with a `VERSION` stamp; the same version and seed give the same bytes on any machine with the
same matplotlib fonts (rendering goes through matplotlib's own FreeType build).
"""
from __future__ import annotations

import csv
import functools
import glob
import hashlib
import os
import shutil
import tempfile
import unicodedata
from pathlib import Path
from typing import Callable

import matplotlib
import numpy as np
from matplotlib import ft2font
from PIL import Image

from fsl.data.base import DatasetError, SplitDataset, files_fingerprint

VERSION = "glyphs-v2"
IMAGE_SIZE = 32          # stored size; the test transform centre-crops 28 (32 = 28 * 96 / 84)
RENDER_SIZE = 64         # glyphs are drawn large, distorted, then downsampled with antialiasing
INSTANCES = 20
MIN_FONTS = 4            # a character is a class only if at least this many fonts draw it
MIN_SCRIPT_CLASSES = 10
MAX_SCRIPT_CLASSES = 120  # evenly spaced by code point: keeps Latin's ~1000 accented variants from dominating
TEST_SCRIPTS = ("ARMENIAN", "GEORGIAN", "LAO")
VAL_SCRIPTS = ("CYRILLIC",)
ARROW_WORDS = {"RIGHTWARDS", "LEFTWARDS", "UPWARDS", "DOWNWARDS", "NORTH", "SOUTH", "UP", "DOWN", "LEFT", "RIGHT"}
FONT_PATTERNS = ("DejaVuSans*.ttf", "DejaVuSerif*.ttf", "STIXGeneral*.ttf")


def font_files() -> list[Path]:
    """matplotlib's DejaVu Sans/Mono/Serif and STIX General fonts in all their weights and slants."""
    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    files = sorted({Path(p) for pattern in FONT_PATTERNS for p in glob.glob(str(folder / pattern))})
    return [f for f in files if "Display" not in f.name]  # the Display variants hold only a handful of glyphs


def script_of(char: str) -> str | None:
    """Script of a letter or symbol; None for anything else (marks, digits, punctuation, spaces, unnamed) and for
    variants of another character (names with "WITH": accents, hooks, strokes), which at 28x28 differ from their
    base character by a few pixels."""
    if unicodedata.category(char)[0] not in "LS":
        return None
    name = unicodedata.name(char, "")
    if not name or " WITH " in name:
        return None
    first = name.split()[0]
    return "ARROWS" if first in ARROW_WORDS and "ARROW" in name else first


def split_of_script(script: str) -> str:
    return "test" if script in TEST_SCRIPTS else "val" if script in VAL_SCRIPTS else "train"


def list_classes(fonts: list[Path]) -> list[tuple[int, str, list[int]]]:
    """(codepoint, script, [font indices that draw it]) for every character drawn by >= MIN_FONTS fonts."""
    coverage: dict[int, list[int]] = {}
    for font_index, path in enumerate(fonts):
        for codepoint, glyph in ft2font.FT2Font(str(path)).get_charmap().items():
            if glyph:
                coverage.setdefault(codepoint, []).append(font_index)
    candidates = [(cp, script_of(chr(cp)), sorted(idx)) for cp, idx in sorted(coverage.items())
                  if len(idx) >= MIN_FONTS]
    candidates = [c for c in candidates if c[1] is not None]
    by_script: dict[str, list] = {}
    for candidate in candidates:
        by_script.setdefault(candidate[1], []).append(candidate)
    classes = []
    for members in by_script.values():
        if len(members) >= MIN_SCRIPT_CLASSES:
            keep = np.unique(np.linspace(0, len(members) - 1, min(len(members), MAX_SCRIPT_CLASSES)).round())
            classes += [members[int(i)] for i in keep]
    return sorted(classes)


def render(font: ft2font.FT2Font, char: str, rng: np.random.Generator) -> np.ndarray | None:
    """One instance: the glyph drawn at RENDER_SIZE, randomly rotated/sheared/scaled/shifted, downsampled to
    (IMAGE_SIZE, IMAGE_SIZE) uint8. Glyphs keep their natural size (a lower-case letter stays smaller than its
    capital), centred on their bounding box. None if the font draws nothing for it."""
    font.set_size(RENDER_SIZE * 0.55, 72)
    font.set_text(char, 0.0, flags=ft2font.LoadFlags.NO_HINTING)
    font.draw_glyphs_to_bitmap(antialiased=True)
    bitmap = np.asarray(font.get_image())
    if bitmap.size == 0 or bitmap.max() == 0:
        return None
    ys, xs = np.nonzero(bitmap)
    bitmap = bitmap[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    canvas = Image.new("L", (RENDER_SIZE, RENDER_SIZE))
    scale = min(rng.uniform(0.9, 1.1), 0.8 * RENDER_SIZE / max(bitmap.shape))  # shrink only what would not fit
    glyph = Image.fromarray(bitmap).resize((max(1, round(bitmap.shape[1] * scale)),
                                             max(1, round(bitmap.shape[0] * scale))), Image.BILINEAR)
    canvas.paste(glyph, ((RENDER_SIZE - glyph.width) // 2, (RENDER_SIZE - glyph.height) // 2))
    angle, shear = np.deg2rad(rng.uniform(-10, 10)), rng.uniform(-0.2, 0.2)
    shift = rng.uniform(-0.06, 0.06, size=2) * RENDER_SIZE
    # inverse affine (output -> input coordinates) about the centre, as PIL's AFFINE transform expects
    a, b = np.cos(angle), np.sin(angle)
    matrix = np.array([[a, -b + shear], [b, a]])
    centre = np.array([RENDER_SIZE / 2, RENDER_SIZE / 2])
    offset = centre - matrix @ (centre + shift)
    coefficients = (matrix[0, 0], matrix[0, 1], offset[0], matrix[1, 0], matrix[1, 1], offset[1])
    canvas = canvas.transform(canvas.size, Image.AFFINE, coefficients, resample=Image.BILINEAR)
    return np.asarray(canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS), dtype=np.uint8)


def generate(root: str | Path, seed: int = 0) -> None:
    """Render the whole dataset into `root` (written to a temporary folder, then moved into place)."""
    root = Path(root)
    fonts = font_files()
    if len(fonts) < MIN_FONTS:
        raise DatasetError(f"matplotlib ships {len(fonts)} of the DejaVu/STIX fonts under "
                           f"{matplotlib.get_data_path()}; the glyphs dataset needs at least {MIN_FONTS}")
    loaded = [ft2font.FT2Font(str(path)) for path in fonts]
    rng = np.random.default_rng(seed)
    images, labels, rows = [], [], []
    for codepoint, script, font_indices in list_classes(fonts):
        class_images = []
        order = rng.permutation(font_indices)
        for attempt in range(4 * INSTANCES):
            if len(class_images) == INSTANCES:
                break
            image = render(loaded[order[attempt % len(order)]], chr(codepoint), rng)
            if image is not None:
                class_images.append(image)
        if len(class_images) < INSTANCES:
            continue
        labels += [len(rows)] * INSTANCES
        images += class_images
        rows.append((len(rows), f"U+{codepoint:04X}", unicodedata.name(chr(codepoint)), script,
                     split_of_script(script)))
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".glyphs-", dir=root.parent))
    np.save(staging / "images.npy", np.stack(images))
    np.save(staging / "labels.npy", np.asarray(labels, dtype=np.int64))
    with open(staging / "classes.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "codepoint", "name", "script", "split"])
        writer.writerows(rows)
    (staging / "VERSION").write_text(stamp(seed) + "\n")
    if root.exists():
        shutil.rmtree(root)
    os.replace(staging, root)


@functools.lru_cache(maxsize=None)
def stamp(seed: int) -> str:
    """Version, settings and a hash of the font files: a cached dataset is reused only if all match."""
    fonts = hashlib.sha256(b"".join(p.read_bytes() for p in font_files())).hexdigest()[:16]
    return f"{VERSION} seed={seed} size={IMAGE_SIZE} instances={INSTANCES} fonts={fonts}"


def ensure_generated(root: str | Path, seed: int = 0) -> bool:
    """Generate the dataset under `root` unless an up-to-date copy is there. Returns True if it generated."""
    root = Path(root)
    version = root / "VERSION"
    if version.exists() and version.read_text().strip() == stamp(seed):
        return False
    print(f"generating the glyphs dataset into {root} (once; about a minute)", flush=True)
    generate(root, seed)
    return True


class Glyphs(SplitDataset):
    """One split of the glyphs dataset; generated into `root` on first use."""

    min_images = {"train": 5 + 5, "val": 5 + 15, "test": 5 + 15}  # the demo trains on up to 5 shots + 5 queries

    def __init__(self, root: str | Path, split: str, transform: Callable | None = None):
        super().__init__(transform)
        root = self.root = Path(root)
        ensure_generated(root)
        with open(root / "classes.csv", newline="") as f:
            classes = [row for row in csv.DictReader(f) if row["split"] == split]
        class_index = {int(row["class"]): i for i, row in enumerate(classes)}
        all_labels = np.load(root / "labels.npy")
        keep = np.flatnonzero(np.isin(all_labels, list(class_index)))
        self.images = np.load(root / "images.npy", mmap_mode="r")
        self.indices = keep
        self.labels = [class_index[int(c)] for c in all_labels[keep]]
        self.class_names = [f"{row['codepoint']} {row['name']}" for row in classes]
        self.root = root

    def load_image(self, index: int) -> Image.Image:
        return Image.fromarray(np.asarray(self.images[self.indices[index]])).convert("RGB")

    def source(self, index: int) -> str:
        return f"{self.root / 'images.npy'}[{self.indices[index]}]"

    def image_size(self, index: int) -> tuple[int, int]:
        return tuple(self.images.shape[1:3])

    def image_sizes(self) -> list[tuple[int, int]] | None:
        return [tuple(self.images.shape[1:3])] * len(self.indices)

    def fingerprint(self) -> str:
        return files_fingerprint([self.root / "images.npy", self.root / "classes.csv"],
                                 (self.root / "VERSION").read_text())
