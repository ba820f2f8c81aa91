"""`fsl data prepare`: download a dataset from its public source, verify it, and lay it out for the readers.

Offline, or when a mirror answers with something other than the file (an HTML page is the usual failure of public
links), it stops at once with the manual steps and the expected layout.
"""
from __future__ import annotations

import hashlib
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from fsl.data import cub, glyphs, mini_imagenet, omniglot, tiered_imagenet
from fsl.data.base import DatasetError


@dataclass
class Download:
    urls: list[str]        # tried in order
    filename: str          # name under the dataset root
    md5: str | None = None  # published checksum, where one exists


ZENODO = "https://zenodo.org/record/7978538/files"  # learn2learn's mirror of the few-shot releases
OMNIGLOT = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"  # the release; torchvision's too
SOURCES: dict[str, list[Download]] = {
    "cub": [Download(["https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
                      "https://zenodo.org/record/8000562/files/CUB_200_2011.tgz"],
                     "CUB_200_2011.tgz", md5="97eceeb196236b17998738112f37df78")],
    "mini-imagenet": [Download([f"{ZENODO}/mini-imagenet-cache-{split}.pkl"], f"mini-imagenet-cache-{split}.pkl")
                      for split in ("train", "validation", "test")],
    "tiered-imagenet": [Download([f"{ZENODO}/tiered-imagenet-{split}_{kind}.pkl"], f"{split}_{kind}.pkl")
                        for split in ("train", "val", "test") for kind in ("images_png", "labels")],
    # the md5s torchvision.datasets.Omniglot checks the same files against
    "omniglot": [Download([f"{OMNIGLOT}/images_background.zip"], "images_background.zip",
                          md5="68d2efa1b9178cc56df9314c21c6e718"),
                 Download([f"{OMNIGLOT}/images_evaluation.zip"], "images_evaluation.zip",
                          md5="6b91aef0f799c5bb55b94e3f2daec811")],
}

MANUAL_STEPS = {
    "cub": f"""manual steps:
  1. download CUB_200_2011.tgz from https://www.vision.caltech.edu/datasets/cub_200_2011/ (md5 {SOURCES['cub'][0].md5})
  2. tar -xzf CUB_200_2011.tgz  and pass the extracted CUB_200_2011 folder as --root / data.root
{cub.LAYOUT}""",
    "mini-imagenet": f"""manual steps:
  the seed's cells read the full-size ImageNet JPEGs (data.mini_imagenet_images=full), which need an ImageNet
  account, so nothing downloads them:
  1. get the Ravi & Larochelle split files train.csv, val.csv, test.csv (github.com/twitter-research/meta-learning-lstm,
     data/miniImagenet) and ILSVRC-2012's train images (image-net.org)
  2. under --root / data.root: the three CSVs, and images/<wnid>/ holding each CSV class's whole ImageNet train folder
     (ILSVRC2012_img_train.tar holds <wnid>.tar per class: tar -xf <wnid>.tar -C images/<wnid>)
  the 84x84 release (data.mini_imagenet_images=84x84, never comparable): learn2learn's mini-imagenet-cache-*.pkl from
  {ZENODO}/, which `fsl data prepare mini-imagenet` downloads when the root holds no full-size form
{mini_imagenet.LAYOUT}""",
    "tiered-imagenet": f"""manual steps:
  1. download Ren et al.'s tiered-ImageNet release (https://github.com/renmengye/few-shot-ssl-public) or
     learn2learn's copies tiered-imagenet-<split>_<kind>.pkl from {ZENODO}/ (rename to <split>_<kind>.pkl)
  2. place them under --root / data.root
{tiered_imagenet.LAYOUT}""",
    "omniglot": f"""manual steps:
  1. download images_background.zip (md5 {SOURCES['omniglot'][0].md5}) and images_evaluation.zip
     (md5 {SOURCES['omniglot'][1].md5}) from https://github.com/brendenlake/omniglot/tree/master/python
  2. place both under --root / data.root (extracting them is optional)
{omniglot.LAYOUT}""",
}


def fetch(download: Download, destination: Path, name: str, timeout: float = 30.0) -> None:
    """Download to `destination` (via a .part file), rejecting HTML pages and checksum mismatches."""
    errors = []
    for url in download.urls:
        part = destination.with_name(destination.name + ".part")
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as out:
                head = response.read(1024)
                if b"<html" in head.lower() or "text/html" in response.headers.get("Content-Type", ""):
                    raise DatasetError(f"{url} returned an HTML page instead of {download.filename}")
                out.write(head)
                shutil.copyfileobj(response, out, length=1 << 22)
        except (urllib.error.URLError, OSError, DatasetError) as error:
            errors.append(f"{url}: {error}")
            part.unlink(missing_ok=True)
            continue
        if download.md5 and md5sum(part) != download.md5:
            errors.append(f"{url}: md5 {md5sum(part)} != published {download.md5}")
            part.unlink()
            continue
        part.replace(destination)
        return
    raise DatasetError(f"could not download {download.filename}:\n  " + "\n  ".join(errors) +
                       f"\n{MANUAL_STEPS[name]}")


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def prepare(name: str, root: str | Path) -> Path:
    """Download and lay out dataset `name` under `root`; returns `root`. Files already in place are kept."""
    root = Path(root)
    if name == "glyphs":
        glyphs.ensure_generated(root)
        return root
    if name == "folder":
        raise DatasetError("`folder` is your own images: nothing to download. Lay them out as class folders per split "
                           "or images/ + split CSVs (fsl/data/folder.py), then `fsl data check folder --root ROOT`")
    if name not in SOURCES:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {sorted(SOURCES) + ['glyphs']}")
    root.mkdir(parents=True, exist_ok=True)
    if name == "mini-imagenet" and (root / "train.csv").exists() and (root / "images").is_dir():
        print(f"{root} holds the split CSVs and images/: nothing to download ({mini_imagenet.form_of(root)} form)")
        return root
    if name == "mini-imagenet":
        print("the seed's mini-ImageNet cells read the full-size ImageNet JPEGs, which need an ImageNet account: "
              "downloading the 84x84 release instead (data.mini_imagenet_images=84x84, never comparable); the "
              "full-size steps: docs/datasets.md, \"mini-ImageNet's two forms\"", flush=True)
    for download in SOURCES[name]:
        target = root / download.filename
        if not target.exists():
            print(f"downloading {download.filename} from {download.urls[0]}", flush=True)
            fetch(download, target, name)
    if name == "cub":
        extract_cub(root / "CUB_200_2011.tgz", root)
    return root


def extract_cub(archive: Path, root: Path) -> None:
    """Unpack the official archive so that `root` holds images/, images.txt, classes.txt, ..."""
    if (root / "images.txt").exists():
        return
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        extracted = Path(tmp) / "CUB_200_2011"
        if not extracted.is_dir():
            raise DatasetError(f"{archive} holds no CUB_200_2011 folder\n{MANUAL_STEPS['cub']}")
        for item in extracted.iterdir():
            item.replace(root / item.name)
