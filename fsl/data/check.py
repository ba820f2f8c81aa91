"""`fsl data check`: validate a dataset folder and count classes and images per split."""
from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from fsl.data import SPLITS, load_split
from fsl.data.base import DatasetError



def check_dataset(name: str, root: str | Path, decode: bool = True, progress: bool = False,
                  min_images: dict[str, int] | None = None) -> tuple[dict, list[str]]:
    """Return ({split: {"classes": C, "images": I, <group kind>: G...}, "all": the same over the splits},
    problems). `problems` lists every error found, each naming the file and the fix; an empty list means the dataset
    is ready. Classes need the images per split that the reader declares (`SplitDataset.min_images`) unless
    `min_images` says otherwise."""
    counts, problems, class_owner, source_owner, groups = {}, [], {}, {}, {}
    for split in SPLITS:
        try:
            dataset = load_split(name, root, split)
        except DatasetError as error:
            problems.append(str(error))
            continue
        split_groups = dataset.groups()
        counts[split] = {"classes": dataset.num_classes, "images": len(dataset),
                         **{kind: len(members) for kind, members in split_groups.items()}}
        for kind, members in split_groups.items():
            groups.setdefault(kind, set()).update(members)
        needed = (min_images or dataset.min_images)[split]
        for class_id, count in sorted(dataset.images_per_class().items()):
            if count < needed:
                problems.append(f"{split} class {dataset.class_names[class_id]!r} has {count} images, fewer than "
                                f"the {needed} an episode needs (shots + queries); fix: add images or "
                                f"drop the class from the split")
        for class_name in dataset.class_names:
            if class_name in class_owner:
                problems.append(f"class {class_name!r} is in both the {class_owner[class_name]} and {split} splits; "
                                f"fix: the split files must be disjoint")
            class_owner.setdefault(class_name, split)
        for index in range(len(dataset)):
            source = dataset.source(index)
            if source in source_owner and "[" not in source:  # array items are per-split by construction
                problems.append(f"image {source} is in both the {source_owner[source]} and {split} splits")
            source_owner.setdefault(source, split)
        if decode:
            for index in tqdm(range(len(dataset)), desc=f"decoding {split}", disable=not progress, leave=False):
                try:
                    dataset.load_image(index)
                except Exception as error:  # PIL raises many types for corrupt files; report each with its file
                    problems.append(f"unreadable or truncated image {dataset.source(index)}: {error}; "
                                    f"fix: replace the file")
    if counts:
        counts["all"] = {"classes": sum(c["classes"] for c in counts.values()),
                         "images": sum(c["images"] for c in counts.values()),
                         **{kind: len(members) for kind, members in groups.items()}}
    return counts, problems
