"""The image store of mini-ImageNet's full-size form (#35 item 3): build time, size, and the cost of a training
meta-batch's reads, measured on a made root of ImageNet-size JPEGs in MMFewShot's layout.

No full-size ImageNet is on this machine, so the root is made: --classes classes of --per-class JPEGs (quality 90),
500 x 375 and 375 x 500 alternately (the usual size of ImageNet's and CUB's photos), each a smooth scene with fine
texture and noise (so that JPEG decoding costs what a photo costs). Measured: the train store (the originals at full
resolution) and the eval store (short side to 96, centre crop 84) built from it, seconds per image and bytes per
image; then one protocol meta-batch (8 tasks, 5-way, 5 + 16 images per class) read from the train store
(`EpisodeMaker.gather`: the pixels the 840 crops' resizes read) and augmented on the CPU. Scaled to the release's
38,400 / 9,600 / 12,000 images per image, at these sizes.

    python benchmarks/full_size_store.py [--classes 16] [--per-class 40] [--out benchmarks/results]

Writes <out>/full-size-store-<machine>.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fsl.data import load_split  # noqa: E402
from fsl.data.episodes import EpisodeDataset, EpisodeMaker, collate_specs  # noqa: E402
from fsl.data.store import open_store  # noqa: E402
from fsl.device.distributed import device_slug  # noqa: E402

RELEASE = {"train": 38_400, "val": 9_600, "test": 12_000}  # Ravi & Larochelle: 64 / 16 / 20 classes of 600


def photo(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = [128 + 60 * np.sin(x / rng.uniform(20, 60) + y / rng.uniform(20, 60))
                + 25 * np.sin(x / rng.uniform(1.5, 4)) * np.cos(y / rng.uniform(1.5, 4)) for _ in range(3)]
    noisy = np.stack(channels, -1) + rng.normal(0, 8, (height, width, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def made_root(root: Path, classes: int, per_class: int) -> Path:
    """MMFewShot's full-size layout, every split the same made classes' size (train.csv / val.csv / test.csv)."""
    rng = np.random.default_rng(0)
    for split in RELEASE:
        lines = ["filename,label"]
        for c in range(classes):
            label = f"n{list(RELEASE).index(split) * 1000 + c:08d}"
            folder = root / "images" / label
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(1, per_class + 1):
                size = (375, 500) if k % 2 else (500, 375)
                Image.fromarray(photo(*size, rng)).save(folder / f"{label}_{k * 7}.JPEG", quality=90)
                lines.append(f"{label}{k:08d}.jpg,{label}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=16)
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="fsl-full-store-"))
    root = made_root(work / "mini-imagenet", args.classes, args.per_class)
    jpeg_bytes = sum(p.stat().st_size for p in (root / "images").rglob("*.JPEG")) / (3 * args.classes * args.per_class)
    rows, per_image = [], {}
    for split, kind in (("train", "train"), ("val", "eval"), ("test", "eval")):
        dataset = load_split("mini-imagenet", root, split, images="full")
        start = time.perf_counter()
        store = open_store(dataset, "mini-imagenet", split, kind, 84, work / "cache", progress=False)
        seconds = time.perf_counter() - start
        size = store.path.stat().st_size
        per_image[split] = (seconds / len(dataset), size / len(dataset))
        rows.append(f"| {split} | {kind} | {len(dataset):,} | {seconds:.1f} s ({seconds / len(dataset) * 1e3:.1f} ms "
                    f"an image) | {size / 2**20:.1f} MB ({size / len(dataset) / 1e3:.0f} kB an image) | "
                    f"{RELEASE[split]:,} images: {RELEASE[split] * seconds / len(dataset) / 60:.1f} min, "
                    f"{RELEASE[split] * size / len(dataset) / 1e9:.2f} GB |")
    dataset = load_split("mini-imagenet", root, "train", images="full")
    store = open_store(dataset, "mini-imagenet", "train", "train", 84, work / "cache", progress=False)
    episodes = EpisodeDataset(dataset, 5, 5, 16, seed=0, count=8 * 6, image_sizes=store.sizes)
    make = EpisodeMaker(store, 5, 5, 16, 84, torch.device("cpu"))
    gather, build = [], []
    for batch in range(6):
        specs = collate_specs([episodes[batch * 8 + i] for i in range(8)])
        start = time.perf_counter()
        gathered = make.gather(specs)
        gather.append(time.perf_counter() - start)
        start = time.perf_counter()
        make.build(gathered)
        build.append(time.perf_counter() - start)
    read = gathered.pixels.nbytes
    machine = device_slug(torch.device("cpu"))
    lines = [f"# mini-ImageNet's full-size form: the image store ({machine})", "",
             f"`python benchmarks/full_size_store.py --classes {args.classes} --per-class {args.per_class}` on "
             f"{os.cpu_count()} CPU cores (1 thread), torch {torch.__version__}. A made root in MMFewShot's layout "
             f"(images/<wnid>/<wnid>_<number>.JPEG and the split CSVs): {args.classes} classes of {args.per_class} "
             f"JPEGs per split, 500x375 and 375x500 alternately, quality 90, {jpeg_bytes / 1e3:.0f} kB a file on "
             "average. The train store keeps the decoded originals (mmcls crops those); the eval stores keep the "
             "test pipeline's 84x84 output (short side to 96, centre crop). The last column scales the measured "
             "per-image figures to the release's split sizes, at these image sizes.", "",
             "| split | store | images | build | size | at the release's size |", "|---|---|---|---|---|---|",
             *rows, "",
             "One protocol training meta-batch (8 tasks x 105 images, 84x84) from the train store, mean of the last 5 "
             "of 6:", "",
             f"- read the pixels the 840 crops' resizes read (`EpisodeMaker.gather`, 2 x 84 rows and columns of "
             f"each original): {np.mean(gather[1:]) * 1e3:.0f} ms, {read / 2**20:.0f} MB into the batch",
             f"- resize, flip, colour jitter and normalise them on the CPU (`EpisodeMaker.build`): "
             f"{np.mean(build[1:]) * 1e3:.0f} ms", ""]
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"full-size-store-{machine}.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
