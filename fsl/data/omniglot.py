"""Omniglot (Lake et al., Science 2015): 1,623 handwritten characters from 50 alphabets, 20 drawings of each.

The release (github.com/brendenlake/omniglot, python/) is two archives, read as they are or extracted, under `root`:

    root/images_background.zip   30 alphabets, 964 characters   (or the extracted folder root/images_background/)
    root/images_evaluation.zip   20 alphabets, 659 characters   (or root/images_evaluation/)
    each holding <archive>/<Alphabet>/characterNN/<image id>_<drawer>.png, 105 x 105, 1-bit

The MAML protocol (Finn et al. 2017; cbfinn/maml data_generator.py) pools both archives and splits *characters*, not
alphabets: shuffled with a fixed seed, 1,100 train, 100 val, the other 423 test. Here the characters are sorted by
(archive, alphabet, character) and shuffled with random.Random(SPLIT_SEED); cbfinn shuffles `os.listdir` order,
which depends on the file system, so its exact split cannot be reproduced, only its sizes.

Each image is resized to image_size x image_size (stored once in the image store) and fed to the network inverted,
1 - p / 255, ink 1 (`INK`), in one of two forms (`images`, the config's data.omniglot_images):
  binary     the default: the archive's 1-bit image resized by PIL as it is, as cbfinn's resize_images.py does
             (`im.resize((28, 28), resample=Image.LANCZOS)` on mode "1", which PIL resizes with NEAREST whatever
             filter is asked): the paper's inputs, values 0 and 255 only, strokes subsampled (`resize_binary`);
  greyscale  converted to greyscale first, then LANCZOS (`eval_transform`): smooth edges, as learn2learn's Omniglot
             benchmark feeds; fsl's rows before #36.
Every class of every episode is rotated by a random multiple of 90 degrees (`data.class_rotations`,
fsl.data.episodes.ClassRotations).
"""
from __future__ import annotations

import io
import os
import random
import zipfile
from pathlib import Path
from typing import Callable

from PIL import Image

from fsl.data.base import DatasetError, SplitDataset, files_fingerprint, header_size
from fsl.data.transforms import INK, resize_lanczos

IMAGES = ("binary", "greyscale")  # the input forms (module docstring)

ARCHIVES = ("images_background", "images_evaluation")
SPLIT_SIZES = {"train": 1100, "val": 100, "test": 423}  # characters; cbfinn: num_train 1200 - num_val 100, rest test
SPLIT_SEED = 1  # cbfinn's random.seed(1) before its shuffle
RELEASE_CHARACTERS = 1623  # 964 in images_background, 659 in images_evaluation
LAYOUT = """expected under ROOT, for each of images_background and images_evaluation, either the archive or its folder:
  ROOT/images_background.zip   ROOT/images_evaluation.zip      (the official archives), or
  ROOT/images_background/<Alphabet>/characterNN/<id>_<drawer>.png and the same for images_evaluation"""


class Archive:
    """One of the two parts of the release, a zip file or its extracted folder: the PNG paths under it and their
    bytes. A zip is opened once per process (DataLoader workers and store builders each open their own)."""

    def __init__(self, root: Path, name: str):
        self.name = name
        self.zip_path, self.folder = root / f"{name}.zip", root / name
        if self.folder.is_dir():
            self.files = sorted(str(p.relative_to(root)) for p in self.folder.glob("*/*/*.png"))
            self.source = self.folder
        elif self.zip_path.exists():
            try:
                with zipfile.ZipFile(self.zip_path) as archive:
                    self.files = sorted(n for n in archive.namelist() if n.endswith(".png"))
            except (zipfile.BadZipFile, OSError) as error:
                raise DatasetError(f"{self.zip_path} is not a readable zip archive ({error})\n  fix: download it "
                                   f"again (`fsl data prepare omniglot --root {root}`)") from error
            self.source = self.zip_path
        else:
            raise DatasetError(f"Omniglot archive not found: {self.zip_path} (nor the folder {self.folder})\n"
                               f"  fix: `fsl data prepare omniglot --root {root}`, or place it by hand\n{LAYOUT}")
        self.root, self._zip, self._pid = root, None, None

    def read(self, name: str) -> bytes:
        if self.source == self.folder:
            return (self.root / name).read_bytes()
        if self._zip is None or self._pid != os.getpid():
            self._zip, self._pid = zipfile.ZipFile(self.zip_path), os.getpid()
        return self._zip.read(name)

    def fingerprint_files(self) -> list[Path]:
        return [self.zip_path] if self.source == self.zip_path else [self.root / f for f in self.files]


def characters(files: list[str]) -> dict[tuple[str, str, str], list[str]]:
    """(archive, alphabet, character) -> its PNG paths, sorted."""
    found: dict[tuple[str, str, str], list[str]] = {}
    for name in files:
        archive, alphabet, character, _ = name.split("/")
        found.setdefault((archive, alphabet, character), []).append(name)
    return found


def split_characters(keys: list[tuple[str, str, str]]) -> dict[str, list[tuple[str, str, str]]]:
    """The protocol's character split: sorted, shuffled with SPLIT_SEED, then SPLIT_SIZES in train, val, test order
    (a release with another number of characters keeps 1,100 and 100 and tests on the rest)."""
    order = sorted(keys)
    random.Random(SPLIT_SEED).shuffle(order)
    train, val = SPLIT_SIZES["train"], SPLIT_SIZES["val"]
    return {"train": order[:train], "val": order[train:train + val], "test": order[train + val:]}


def resize_binary(image_size: int) -> Callable[[Image.Image], Image.Image]:
    """1-bit PIL image -> RGB image_size x image_size, as cbfinn's resize_images.py makes it: PIL's resize of the
    mode "1" image (NEAREST, whatever filter is asked), values 0 and 255."""
    def resize(image: Image.Image) -> Image.Image:
        if image.mode != "1":
            raise ValueError(f"resize_binary expects a 1-bit image, got mode {image.mode!r}")
        return image.resize((image_size, image_size), Image.LANCZOS).convert("L").convert("RGB")
    return resize


class Omniglot(SplitDataset):
    """One split of Omniglot: its characters are the classes (see the module docstring)."""

    min_images = {"train": 5 + 5, "val": 5 + 5, "test": 5 + 5}  # the cells' episodes: K shots + K queries, K <= 5
    normalisation = INK
    channels = 1

    @staticmethod
    def eval_transform(image_size: int) -> Callable[[Image.Image], Image.Image]:
        return resize_lanczos(image_size)

    def __init__(self, root: str | Path, split: str, transform: Callable | None = None, images: str = "binary"):
        super().__init__(transform)
        if images not in IMAGES:
            raise DatasetError(f"Omniglot images={images!r}: choose one of {', '.join(IMAGES)} (data.omniglot_images)")
        self.images = images
        if images == "binary":  # an instance attribute: the store reads the 1-bit image and resizes it as PIL does
            self.eval_transform = resize_binary
        root = self.root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"Omniglot root folder not found: {root}\n  fix: `fsl data prepare omniglot --root "
                               f"{root}` or pass data.root=...\n{LAYOUT}")
        self.archives = {name: Archive(root, name) for name in ARCHIVES}
        found = {}
        for archive in self.archives.values():
            found.update(characters(archive.files))
        if len(found) <= SPLIT_SIZES["train"] + SPLIT_SIZES["val"]:
            raise DatasetError(f"{root} holds {len(found)} Omniglot characters; the protocol's split needs more than "
                               f"{SPLIT_SIZES['train'] + SPLIT_SIZES['val']} (the release has 1,623)\n  fix: {LAYOUT}")
        self.characters, self.release_alphabets = len(found), sorted({key[:2] for key in found})
        keys = split_characters(list(found))[split]
        self.class_names = ["/".join(key) for key in keys]
        self.alphabets = sorted({key[:2] for key in keys})
        self.paths = [name for key in keys for name in found[key]]
        self.labels = [label for label, key in enumerate(keys) for _ in found[key]]

    def read(self, index: int) -> bytes:
        name = self.paths[index]
        return self.archives[name.split("/")[0]].read(name)

    def load_image(self, index: int) -> Image.Image:
        """The image as the store's resize takes it: the archive's 1-bit image (binary), or greyscale as RGB."""
        with Image.open(io.BytesIO(self.read(index))) as image:
            if self.images == "binary":
                image.load()
                return image.copy()  # mode "1", as in the archive
            return image.convert("L").convert("RGB")  # paper 255, ink 0; convert() decodes fully

    def protocol_problem(self) -> str | None:
        """The protocol's split needs the release's 1,623 characters (964 + 659) of 50 alphabets: with any missing,
        the shuffled split moves other characters between train, val and test too."""
        if self.characters == RELEASE_CHARACTERS:
            return None
        return (f"{self.root} holds {self.characters:,} Omniglot characters in {len(self.release_alphabets)} "
                f"alphabets, not the release's {RELEASE_CHARACTERS:,} in 50: not the protocol's data (its character "
                f"split changes with every character missing), so no result on it is comparable; fix: the complete "
                f"archives (`fsl data prepare omniglot --root {self.root}`)")

    @property
    def store_tag(self) -> str:
        """What the image store's name adds for this input form (the greyscale stores keep their earlier names)."""
        return "-binary" if self.images == "binary" else ""

    def source(self, index: int) -> str:
        name = self.paths[index]
        archive = self.archives[name.split("/")[0]]
        return f"{archive.zip_path}:{name}" if archive.source == archive.zip_path else str(self.root / name)

    def image_size(self, index: int) -> tuple[int, int]:
        return header_size(self.read(index))

    def fingerprint(self) -> str:
        files = [f for archive in self.archives.values() for f in archive.fingerprint_files()]
        return files_fingerprint(files, f"split seed {SPLIT_SEED} sizes {SPLIT_SIZES}"
                                 + (" images binary" if self.images == "binary" else ""))

    def groups(self) -> dict[str, set[str]]:
        """The alphabets this split's characters come from, as <archive>/<alphabet>."""
        return {"alphabets": {"/".join(key) for key in self.alphabets}}
