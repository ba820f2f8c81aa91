"""Write a few classes of a dataset split as image folders, the layout `fsl adapt` and `data.dataset=folder` read:

    OUT/support/<class>/<image>.png   `--shots` images per class
    OUT/queries/<class>/<image>.png   `--queries` other images per class (their folder names their true class)

    python scripts/export_folders.py glyphs data/glyphs test --ways 5 --shots 1 --queries 15 --out /tmp/my-classes

Classes and images are drawn with `--seed` (Python's random), so the same command writes the same folders.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fsl.data import load_split  # noqa: E402


def export(dataset: str, root: str, split: str, ways: int, shots: int, queries: int, out: Path, seed: int) -> None:
    data = load_split(dataset, root, split)
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(data.labels):
        by_class.setdefault(label, []).append(index)
    eligible = sorted(c for c, items in by_class.items() if len(items) >= shots + queries)
    if len(eligible) < ways:
        raise SystemExit(f"{split} has {len(eligible)} classes with {shots + queries}+ images, fewer than {ways}")
    for label in rng.sample(eligible, ways):
        name = data.class_names[label].replace("/", "_")
        chosen = rng.sample(by_class[label], shots + queries)
        for part, items in (("support", chosen[:shots]), ("queries", chosen[shots:])):
            folder = out / part / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in items:
                data.load_image(index).save(folder / f"{index}.png")
    print(f"{out}: {ways} classes, {shots} support and {queries} query images each")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset")
    parser.add_argument("root")
    parser.add_argument("split", choices=["train", "val", "test"])
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    export(args.dataset, args.root, args.split, args.ways, args.shots, args.queries, args.out, args.seed)


if __name__ == "__main__":
    main()
