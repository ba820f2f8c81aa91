"""Dataset checks: what `fsl data check` reports, and what training and `fsl test` verify before any long work.

`split_problems` reads labels only (cheap: run at the start of every training and test, fsl.train.cell.check_cell_data):
too few classes for the episodes' ways, classes with fewer images than an episode takes, a class or an image in two
splits. `check_dataset` adds, for `fsl data check`, each reader's own structural check (`SplitDataset.verify`: e.g.
a truncated tiered-ImageNet images pickle, a label/image count mismatch) and, unless --no-decode, decodes every image.
"""
from __future__ import annotations

from pathlib import Path

from fsl.data import SPLITS, load_split
from fsl.data.base import DatasetError, SplitDataset
from fsl.data.progress import progress_bar


def split_problems(datasets: dict[str, SplitDataset], needed: dict[str, int],
                   ways: dict[str, int] | None = None) -> list[str]:
    """Every problem of the splits `datasets` that their labels show, each naming what and the fix: `needed`
    images per class (shots + queries) and `ways` classes per episode, by split."""
    problems, class_owner, source_owner = [], {}, {}
    for split, dataset in datasets.items():
        if ways and dataset.num_classes < ways[split]:
            problems.append(f"the {split} split has {dataset.num_classes} classes, fewer than the {ways[split]} ways "
                            f"of an episode; fix: add classes, or fewer ways")
        for class_id, count in sorted(dataset.images_per_class().items()):
            if count < needed[split]:
                problems.append(f"{split} class {dataset.class_names[class_id]!r} has {count} images, fewer than "
                                f"the {needed[split]} an episode takes (shots + queries); fix: add images or drop the "
                                f"class from the split")
        for class_name in dataset.class_names:
            if class_name in class_owner:
                problems.append(f"class {class_name!r} is in both the {class_owner[class_name]} and {split} splits; "
                                f"fix: the split files must be disjoint")
            class_owner.setdefault(class_name, split)
        for index in range(len(dataset)):
            source = dataset.source(index)
            if source in source_owner and "[" not in source:  # array items are per-split by construction
                where = (f"twice in the {split} split" if source_owner[source] == split else
                         f"in both the {source_owner[source]} and {split} splits")
                problems.append(f"image {source} is {where}; fix: each image in one split, once")
            source_owner.setdefault(source, split)
    return problems


def check_dataset(name: str, root: str | Path, decode: bool = True, progress: bool = False,
                  min_images: dict[str, int] | None = None) -> tuple[dict, list[str]]:
    """Return ({split: {"classes": C, "images": I, <group kind>: G...}, "all": the same over the splits},
    problems). `problems` lists every error found, each naming the file and the fix (the same error may repeat, one
    per image: print them with `summarise`); an empty list means the dataset is ready. Classes need the images per
    split that the reader declares (`SplitDataset.min_images`) unless `min_images` says otherwise. Without
    `decode`, each reader's structural check (`SplitDataset.verify`) still runs."""
    counts, problems, groups, datasets = {}, [], {}, {}
    damaged: dict[str, list[str]] = {}  # archive -> its unreadable members, over the splits
    for split in SPLITS:
        try:
            dataset = load_split(name, root, split)
        except DatasetError as error:
            problems.append(str(error))
            continue
        datasets[split] = dataset
        split_groups = dataset.groups()
        counts[split] = {"classes": dataset.num_classes, "images": len(dataset),
                         **{kind: len(members) for kind, members in split_groups.items()}}
        for kind, members in split_groups.items():
            groups.setdefault(kind, set()).update(members)
        try:
            dataset.verify()
        except DatasetError as error:
            problems.append(str(error))
            continue
        if decode:
            for index in progress_bar(range(len(dataset)), desc=f"decoding {split}", unit="img",
                                      disable=not progress, leave=False):
                try:
                    dataset.load_image(index)
                except Exception as error:  # PIL raises many types for corrupt files; report each with its file
                    source = dataset.source(index)
                    archive, _, member = source.partition(".zip:")
                    if member:  # inside an archive: the archive is the thing to replace
                        damaged.setdefault(archive + ".zip", []).append(member)
                    else:
                        problems.append(f"unreadable or truncated image {source}: {error}; fix: replace the file")
    problems += [f"{archive} is damaged: {len(members):,} of its images cannot be read (e.g. {members[0]}); fix: "
                 f"download the archive again (`fsl data prepare`), or restore it from a copy"
                 for archive, members in damaged.items()]
    problems = split_problems(datasets, {s: (min_images or d.min_images)[s] for s, d in datasets.items()}) + problems
    problems += sorted({why for d in datasets.values() if (why := d.protocol_problem())})
    if counts:
        counts["all"] = {"classes": sum(c["classes"] for c in counts.values()),
                         "images": sum(c["images"] for c in counts.values()),
                         **{kind: len(members) for kind, members in groups.items()}}
    return counts, problems


def summarise(problems: list[str]) -> list[str]:
    """Each distinct problem once, in order of first appearance, with how many times it occurred."""
    seen: dict[str, int] = {}
    for problem in problems:
        seen[problem] = seen.get(problem, 0) + 1
    return [problem if n == 1 else f"({n:,} times) {problem}" for problem, n in seen.items()]


def images_form(name: str, root: str | Path) -> str | None:
    """Which form of its images a root holds, for datasets with two (mini-ImageNet: fsl.data.mini_imagenet.FORMS):
    'FORM: description', or None (one form only, or the root cannot be read: check_dataset says why)."""
    if name != "mini-imagenet":
        return None
    from fsl.data.mini_imagenet import FORMS, form_of
    try:
        form = form_of(root)
    except DatasetError:
        return None
    return f"{form}: {FORMS[form]}" + ("" if form == "full" else "; train on it with data.mini_imagenet_images=84x84 "
                                       "(never comparable to the seed's cells)")
