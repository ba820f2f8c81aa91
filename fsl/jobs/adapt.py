"""`fsl adapt CHECKPOINT SUPPORT_DIR QUERY... [--out predictions.csv]`: what MAML is for. A meta-trained model adapts
to a handful of labelled images of new classes, then labels new images.

    SUPPORT_DIR/<class>/<image>   a few images per class; as many classes as the checkpoint's head has rows (ways)
    QUERY                         image files, or folders searched recursively

The adaptation is the checkpoint's own meta-test inner loop (fsl.maml.InnerLoop.testing: maml.test_inner_steps SGD
steps from the meta-learned weights, with its learned rates if any), in its precision (fp32 without TF32, tf32, or
bf16 autocast: fsl.device.precision), on the images as the test episodes see them (the trained dataset's evaluation
transform and normalisation: the protocol's resize and centre crop, or Omniglot's LANCZOS resize and inverted
greyscale). Writes a CSV (file, predicted class, one probability column per class) and prints a short table; where a
query sits in a folder named like a support class, that is taken as its true class and the accuracy is printed too.

BatchNorm uses the statistics of the batch it is given (MAML's, in training and in every fsl meta-test: the query
batch, transductive), so what batch a query is in decides its label (#38). `--batch-norm` (`BATCH_NORM`):
    each      (default) each query is classified in a batch of the support images and itself alone: its label
              depends on the support set and on that image, never on the other queries;
    together  the protocol's form: the queries in batches of ways x test.queries images (a test episode's query
              set), normalised by each other's statistics.
What each costs in accuracy, measured on test episodes: docs/your-data.md (benchmarks/adapt_batch_norm.py).
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fsl.data import READERS
from fsl.data.augment import normalise
from fsl.data.base import DatasetError, SplitDataset, open_rgb
from fsl.data.folder import class_folder_images, is_image
from fsl.data.omniglot import resize_binary
from fsl.device.distributed import resolve_device
from fsl.device.precision import apply_precision, autocast
from fsl.maml import InnerLoop, adapt
from fsl.results.files import check_writable, sha256_of, write_atomic
from fsl.train.checkpoint import load_checkpoint_model


def read_images(paths: list[Path], image_size: int, reader: type[SplitDataset] = SplitDataset,
                binary: bool = False) -> torch.Tensor:
    """(N, C, S, S) float32, normalised: each image as the test episodes of `reader`'s dataset see it (its
    eval_transform and normalisation, C its channels); `binary`: a model trained on Omniglot's 1-bit inputs
    (data.omniglot_images=binary) sees each image thresholded at grey 128, then resized as the 1-bit archive images
    were (fsl.data.omniglot.resize_binary). DatasetError naming an unreadable file."""
    resize = reader.eval_transform(image_size)
    if binary:
        to_bits = resize_binary(image_size)
        resize = lambda image: to_bits(image.convert("L").point(lambda p: 255 if p >= 128 else 0).convert("1"))  # noqa: E731
    arrays = []
    for path in paths:
        try:
            arrays.append(np.asarray(resize(open_rgb(path)), dtype=np.uint8))
        except Exception as error:  # PIL raises many types for broken files; all mean the same to the user
            raise DatasetError(f"cannot read image {path} ({type(error).__name__}: {error})\n  fix: replace or "
                               f"remove the file") from error
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)[:, :reader.channels]
    return normalise(pixels, normalisation=reader.normalisation)


def support_set(folder: Path, ways: int) -> tuple[list[str], list[Path], list[int]]:
    """The support folder's classes, images and labels; refused, with the reason, if the head cannot take it."""
    layout = f"SUPPORT_DIR/<class>/<image>, one folder per class ({ways} of them)"
    if folder.is_file():
        raise DatasetError(f"support folder {folder} is a file, not a folder\n  fix: {layout}")
    if not folder.is_dir():
        raise DatasetError(f"support folder not found: {folder}\n  fix: {layout}")
    classes, paths, labels = class_folder_images(folder)
    if not classes:
        raise DatasetError(f"{folder} holds no class folder of images\n  fix: {layout}")
    if len(classes) != ways:
        raise DatasetError(f"{folder} holds {len(classes)} class folder(s) {classes[:8]}, but the checkpoint's head "
                           f"classifies {ways} ways\n  fix: give exactly {ways} class folders (or use a checkpoint "
                           f"trained with train.ways={len(classes)})")
    return classes, paths, labels  # class_folder_images refused class folders without images


def query_files(queries: list[str]) -> list[Path]:
    """Image files named, and every image under the folders named, in sorted order."""
    files = []
    for item in map(Path, queries):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if is_image(p))
        elif item.is_file():
            files.append(item)
        else:
            raise DatasetError(f"query not found: {item}")
    if not files:
        raise DatasetError(f"no query image in {queries}\n  fix: name image files or folders that hold some")
    return files


BATCH_NORM = {"each": "each query in a batch of the support images and itself (independent of the other queries)",
              "together": "the queries in batches of ways x test.queries, by each other's statistics (the protocol's "
                          "transductive test)"}


def classify(adapted, support_x: torch.Tensor, query_x: torch.Tensor, batch_norm: str = "each",
             batch: int = 75) -> torch.Tensor:
    """Class probabilities (Q, ways) of queries (Q, C, S, S) under the adapted model, BatchNorm as `batch_norm` says
    (`BATCH_NORM`): `each`, one forward of [support (N, C, S, S); query] per query, the query's row taken; `together`,
    forwards of `batch` queries at a time."""
    if batch_norm not in BATCH_NORM:
        raise ValueError(f"batch_norm={batch_norm!r}; choose one of {sorted(BATCH_NORM)}")
    if batch_norm == "together":
        return torch.cat([F.softmax(adapted(query_x[i:i + batch].unsqueeze(0))[0].float(), dim=-1)
                          for i in range(0, len(query_x), batch)])
    rows = [adapted(torch.cat([support_x, query[None]]).unsqueeze(0))[0, -1] for query in query_x]
    return F.softmax(torch.stack(rows).float(), dim=-1)


def run(checkpoint: str | Path, support_dir: str | Path, queries: list[str], out: str | Path | None = None,
        device: str = "auto", batch_norm: str = "each") -> dict:
    """Adapt `checkpoint` on `support_dir`, classify `queries`; returns {"predictions": rows, "accuracy": % or
    None}."""
    if out is not None:  # before adapting: a path that cannot take the CSV
        if Path(out).is_dir():
            raise DatasetError(f"--out {out} is a folder; fix: name the CSV file to write, e.g. --out "
                               f"{Path(out) / 'predictions.csv'}")
        check_writable(Path(out).parent, "--out")
    device = resolve_device(device, "--device")
    model, rates, _, cfg = load_checkpoint_model(checkpoint, None, device)
    apply_precision(cfg.precision, device, cfg.cudnn_benchmark, cfg.deterministic)  # as the checkpoint was tested
    classes, support_paths, labels = support_set(Path(support_dir), cfg.train.ways)
    files = query_files(queries)
    size, reader = cfg.data.image_size, READERS[cfg.data.dataset]
    binary = cfg.data.dataset == "omniglot" and cfg.data.omniglot_images == "binary"
    support_x = read_images(support_paths, size, reader, binary).to(device).unsqueeze(0)   # (1, N, C, S, S)
    support_y = torch.tensor(labels, device=device).unsqueeze(0)                  # (1, N)
    with torch.enable_grad(), autocast(cfg.precision, device):
        adapted = adapt(model, support_x, support_y, InnerLoop.testing(cfg), rates)
    batch = cfg.test.ways * cfg.test.queries
    probabilities = []
    with torch.no_grad(), autocast(cfg.precision, device):
        for start in range(0, len(files), batch):
            x = read_images(files[start:start + batch], size, reader, binary).to(device)
            probabilities.append(classify(adapted, support_x[0], x, batch_norm, batch).cpu())
    probabilities = torch.cat(probabilities)                                      # (Q, ways)
    rows = []
    for path, p in zip(files, probabilities.tolist()):
        rows.append({"file": str(path), "predicted": classes[int(np.argmax(p))],
                     **{f"p_{name}": round(value, 6) for name, value in zip(classes, p)}, "batch_norm": batch_norm})
    support = {sha256_of(path) for path in support_paths}  # a query that is a support image tests nothing
    seen = [sha256_of(path) in support for path in files]
    known = [(row, path.parent.name) for row, path, shown in zip(rows, files, seen)
             if path.parent.name in classes and not shown]
    accuracy = 100 * np.mean([row["predicted"] == truth for row, truth in known]) if known else None
    if out is not None:
        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
        write_atomic(out, write)
    print(f"adapted {cfg.run_name} ({cfg.maml.test_inner_steps} step(s), lr {cfg.maml.inner_lr}) on "
          f"{len(support_paths)} support images of {len(classes)} classes; {len(files)} queries; BatchNorm: "
          f"{BATCH_NORM[batch_norm]} (--batch-norm {batch_norm})")
    for row in rows[:10]:
        print(f"  {Path(row['file']).name:40.40s} -> {row['predicted']} ({row['p_' + row['predicted']]:.2f})")
    if len(rows) > 10:
        print(f"  ... {len(rows) - 10} more" + (f" in {out}" if out else ""))
    if any(seen):
        print(f"{sum(seen)} of the {len(files)} queries are support images (the same file contents): left out of "
              f"the accuracy, which would measure nothing on them")
    if accuracy is not None:
        print(f"accuracy on the {len(known)} queries in folders named like a support class: {accuracy:.2f} %")
    return {"predictions": rows, "accuracy": accuracy}
