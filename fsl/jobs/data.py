"""`fsl data prepare|check|cache DATASET`: download a dataset, check it against a cell's episodes, or build its image
stores (fsl.data.store) ahead of training."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fsl.config import Config, ConfigError, load_config
from fsl.data.base import DatasetError


def run(args: argparse.Namespace) -> int:
    """`fsl data ACTION DATASET [--root ...]`: prepare (download), check or cache a dataset; the exit status (1: the
    check found problems)."""
    cfg = load_config(args.config) if args.config else None
    if cfg is not None and cfg.data.dataset != args.dataset:
        raise ConfigError(f"{args.config} is a {cfg.data.dataset} cell, not {args.dataset}; fix: `fsl data "
                          f"{args.action} {cfg.data.dataset} --config {args.config}`")
    root = Path(args.root or (cfg.data_root if cfg is not None else Path("data") / args.dataset))
    if args.action == "cache":
        return cache_command(args, root)
    if args.action == "prepare":
        from fsl.data.prepare import prepare
        prepare(args.dataset, root)
    from fsl.data.check import check_dataset, images_form, summarise
    if args.dataset == "folder" and not args.json:
        from fsl.data.folder import detect_layout
        try:
            print(f"{root}: layout {detect_layout(root)}")
        except DatasetError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    counts, problems = check_dataset(args.dataset, root, decode=not args.no_decode, progress=not args.json,
                                     min_images=episode_sizes(args, cfg))
    problems += form_problems(args.dataset, root, cfg)
    for problem in summarise(problems):
        print(f"error: {problem}", file=sys.stderr)
    if args.json:
        print(json.dumps(counts))
    else:
        for split, count in counts.items():
            extra = "".join(f", {n:,} {kind}" for kind, n in count.items() if kind not in ("classes", "images"))
            print(f"{args.dataset} {split:5s}: {count['classes']:5,d} classes {count['images']:7,d} images{extra}")
        splits = [split for split in counts if split != "all"]
        if splits:
            sizes = " / ".join(f"{counts[split]['classes']:,}" for split in splits)
            print(f"{args.dataset} split of the classes ({' / '.join(splits)}): {sizes}")
        form = images_form(args.dataset, root)
        if form:
            print(f"{root} holds {form}")
        print(f"{root}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


def form_problems(dataset: str, root: Path, cfg: Config | None) -> list[str]:
    """Where the --config cell reads one form of a dataset that has two (mini-ImageNet's full-size JPEGs or 84x84
    release, Omniglot's binary or greyscale images: Config.images_form), whether `root` holds it, as `fsl train`
    will ask (#49: the check said OK where training refused)."""
    if cfg is None or not cfg.images_form:
        return []
    from fsl.data import load_split
    try:
        load_split(dataset, root, "test", images=cfg.images_form)
    except DatasetError as error:
        return [str(error)]
    return []


def episode_sizes(args: argparse.Namespace, cfg: Config | None) -> dict[str, int] | None:
    """Images per class the episodes take, by split: --shots/--queries for every split, else the --config cell's
    (train: train.shots + train.queries; val and test: test.shots + test.queries), else the reader's default."""
    if args.shots is not None or args.queries is not None:
        if args.shots is None or args.queries is None or args.shots < 1 or args.queries < 1:
            raise ConfigError("--shots and --queries go together, each >= 1 (e.g. --shots 1 --queries 15)")
        return dict.fromkeys(("train", "val", "test"), args.shots + args.queries)
    return cfg.episode_images if cfg is not None else None


def cache_command(args: argparse.Namespace, root: Path) -> int:
    from fsl.data import READERS, SPLITS, load_split
    from fsl.data.store import open_store
    for split in SPLITS:  # greyscale datasets are never augmented (fsl.config.validate)
        augmented = split == "train" and not args.no_augment and READERS[args.dataset].channels == 3
        kind = "train" if augmented else "eval"
        store = open_store(load_split(args.dataset, root, split), args.dataset, split, kind, args.image_size,
                           args.cache_dir)
        shape = "full resolution" if kind == "train" else f"{store.pixels.shape[1]}x{store.pixels.shape[2]}"
        print(f"{args.dataset} {split:5s} {kind:5s}: {len(store):7d} images {shape}, "
              f"{store.path.stat().st_size / 2**20:8.1f} MB  {store.path}")
    return 0
