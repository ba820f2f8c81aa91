"""Result files: one reader and one writer for every CSV that `fsl test`, `fsl train` and `make demo` produce.

    results/summary.csv                       one row per run (work dir): mean ± ci95 and where it came from
    results/<cell>/test_episodes[_quick].csv  per-episode test accuracy of the run
    results/<cell>/train_log[_quick].csv      the tracked copy of <work_dir>/<run>/log.csv

Each file has a declared schema (`Column`s: name, type, required or a default for files written before the column
existed). Reading checks every value against it, so a malformed value stops with the file, line, column and the fix;
columns a file lacks get their defaults; columns the schema does not know are kept as text. Writes are atomic.
"""
from __future__ import annotations

import csv
import fcntl
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
import torch

from fsl.config import Config, ConfigError, config_files, from_dict, variant_label
from fsl.data.episodes import EPISODE_STREAMS, SHARED_STREAMS
from fsl.data.store import current_umask
from fsl.device.distributed import describe_device
from fsl.device.precision import describe_precision
from fsl.results import provenance
from fsl.results.reference import reference


def check_writable(folder: str | Path, key: str) -> None:
    """Refuse, naming the config key, a folder this process cannot create or write a file in (read-only, not a
    folder, no permission): found before training, not at its first checkpoint or result."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".fsl-write-check-"):
            pass
    except OSError as error:
        raise ConfigError(f"{key}: cannot write into {folder} ({error.strerror or error}); fix: {key}=<a folder "
                          f"you can write>") from None

def write_atomic(path: str | Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` then rename tmp_path onto `path`, so readers never see a half-written file. The file
    gets the mode a plain open() would give it (0666 less the umask): mkstemp's 0600 would hide a lab's shared
    results, logs and checkpoints from everyone but their writer."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))

OUTPUTS = ("results", "benchmarks/results")  # what runs write into the repository: never what produced a number


def git_commit(*paths: str | Path) -> str:
    """Last commit touching `paths` (the whole repository if none), with '+dirty' if they have local changes (for the
    whole repository: changes outside OUTPUTS, so that a row written beside another uncommitted row still names a
    clean code commit); 'unknown' outside a git checkout."""
    try:
        args = ["--", *map(str, paths)] if paths else ["--", ".", *(f":(exclude){o}" for o in OUTPUTS)]
        commit = subprocess.run(["git", "log", "-1", "--format=%H", *args], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", *args], capture_output=True, text=True,
                               check=True).stdout.strip()
        return (commit or "uncommitted") + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class ResultsError(RuntimeError):
    """A results file is missing, empty or malformed; the message names the file, line and column and the fix."""


@dataclass(frozen=True)
class Column:
    name: str
    kind: type                 # int | float | bool | str
    required: bool = False     # a file without this column is refused
    default: Any = None        # value for files (or cells) that lack it; None = empty
    empty_is_value: bool = False  # an empty cell of a file that has the column is the value "" (not a missing one)


def _schema(*columns: Column) -> dict[str, Column]:
    return {c.name: c for c in columns}


SUMMARY = _schema(
    Column("run", str),                           # work-dir name: cell [-variant] [-seedN] [-quick]; with
                                                  # train_tag and test_tag, the row key
    Column("train_tag", str, default=""),         # training settings other than the config file's
                                                  # ("train.tasks=2000"); empty: the file's own run
    Column("test_tag", str, default=""),          # test settings other than the run's own ("test.episodes=100");
                                                  # empty (with train_tag): the run's own test, the row the tables
                                                  # use
    Column("checkpoint_tag", str, default=""),   # '' for the run's own row; the first 12 hex digits of the tested
                                                  # checkpoint's sha256 for a test of another checkpoint than the
                                                  # one behind a finished or longer-trained row of the same run
                                                  # (`place_row`): a row beside it, never in its place; in the key
    Column("episode_streams", str, default=SHARED_STREAMS),  # how the test episodes were drawn: per-split (seed, split,
                                                  # i), since #36; shared: (seed, i) for every split, the rows
                                                  # written before (fsl.data.episodes.EPISODE_STREAMS); in the key
    Column("cell", str, required=True),           # {dataset}-{arch}-{K}shot
    Column("dataset", str, required=True),
    Column("data_root", str),                     # the name of the dataset folder (data.root) the run read
    Column("images", str, default=""),            # the form of its images, where a dataset has two (Config.images_form):
                                                  # mini-ImageNet full | 84x84, Omniglot binary | greyscale
    Column("arch", str, required=True),
    Column("ways", int, required=True),
    Column("shots", int, required=True),
    Column("variant", str, default="maml"),       # the inner loop: fsl.config.variant_label, e.g. maml+zero_head
    Column("image_size", int, default=84),
    Column("train_batch", int),                   # images per training episode: ways * (shots + queries)
    Column("mean_acc", float, required=True),     # mean per-episode query accuracy, %
    Column("ci95", float, required=True),         # 95% confidence half-width, % (MMFewShot's "std")
    Column("episodes", int, required=True),       # test episodes
    Column("queries", int),                       # query images per class of each test episode (test.queries)
    Column("test_seed", int),                     # the seed of the test episodes (test.seed)
    Column("class_rotations", bool),              # every class turned by a random multiple of 90 degrees
    Column("episodes_id", str, default=""),       # a hash of everything that picks the test episodes' images
                                                  # (`episodes_identity`): two rows of one episodes_id were tested on
                                                  # the same episodes (fsl compare); empty in rows of before #49
    Column("train_tasks", int),                   # tasks the run behind the checkpoint trained
    Column("planned_tasks", int),                 # train.tasks of its config (train.stop_at may stop it before)
    Column("best_val_tasks", int),                # task count of the validation-selected checkpoint
    Column("quick", bool, default=False),
    Column("comparable", bool, default=False),    # the full protocol of a reference cell (see fsl.results.provenance)
    Column("not_comparable_why", str, default="written before fsl recorded provenance", empty_is_value=True),
    # (empty: nothing, the row is comparable; the default is for files written before the column)
    Column("seed", int, default=0),
    Column("precision", str, default="fp32"),     # numeric settings of meta-training (fsl.device.precision)
    Column("test_precision", str, default="fp32"),  # ... and of this meta-test
    Column("train_config_sha", str),              # hash of every setting that defines the trained model
    Column("test_config_sha", str),               # hash of every setting that defines the test
    Column("tasks_per_s", float),                 # meta-training speed over the whole run
    Column("peak_memory_mb", float),              # peak GPU memory of meta-training (CUDA only)
    Column("parallel_tasks", int),                # training tasks adapted together (train.parallel_tasks, resolved)
    Column("parallel_episodes", int),             # test episodes adapted together (test.parallel_episodes, resolved)
    Column("checkpoint", str),                    # the tested checkpoint where the test found it (the path column)
    Column("checkpoint_sha256", str, default=""),  # its sha256
    Column("published_checkpoint", str, default=""),  # its copy under results/ (relative to it), committed with the
                                                  # row, for checkpoints up to PUBLISH_LIMIT_MB; empty: larger
    Column("commit", str),                        # code commit of the test (+dirty: uncommitted changes)
    Column("config_commit", str),                 # last commit of the cell's config files
    Column("device", str),
    Column("seconds", float),                     # wall time of the test
    Column("finished_at", str),
    Column("reference_mean", float),
    Column("reference_ci95", float),
)
EPISODES = _schema(Column("episode", int, required=True), Column("accuracy", float, required=True))
TRAIN_LOG = _schema(
    Column("cell", str), Column("seed", int, default=0), Column("tasks", int, required=True),
    Column("split", str, required=True), Column("loss", float), Column("accuracy", float, required=True),
    Column("ci95", float), Column("tasks_per_s", float), Column("seconds", float),
    Column("input_s", float),  # train rows: of `seconds`, the time the steps waited for their episodes (since #48)
)
SCHEMAS = {"summary": SUMMARY, "episodes": EPISODES, "train_log": TRAIN_LOG}
PANDAS_TYPES = {int: "Int64", float: "float64", bool: "boolean", str: "object"}


def _parse(text: str, kind: type) -> Any:
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("true", "1", "1.0"):
            return True
        if lowered in ("false", "0", "0.0"):
            return False
        raise ValueError(text)
    if kind is int:
        number = float(text)
        if not number.is_integer():
            raise ValueError(text)
        return int(number)
    if kind is float:
        number = float(text)
        if math.isnan(number):
            return None
        return number
    return text


def read_csv(path: str | Path, schema: dict[str, Column], current: str | None = None) -> pd.DataFrame:
    """Read a results CSV, checking it against `schema`. Missing optional columns get their defaults (files written
    before the column existed), except in a file that has the column `current` (the schema's newest): that file was
    written by this fsl with every column, and one it lacks was cut or deleted by hand, so it is refused. Every value
    is converted to its column's type (nullable pandas dtypes: Int64, boolean, float64, object)."""
    path = Path(path)
    if not path.exists():
        raise ResultsError(f"{path} not found")
    check_row_widths(path)
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError as error:
        raise ResultsError(f"{path} is empty\n  fix: delete it; `fsl test` writes it again") from error
    except pd.errors.ParserError as error:
        raise ResultsError(f"{path}: malformed CSV ({error})\n  fix: repair or delete the file") from error
    missing = [c.name for c in schema.values() if c.required and c.name not in raw.columns]
    if missing:
        raise ResultsError(f"{path}: missing column(s) {missing}; found {list(raw.columns)}\n  fix: this is not a "
                           f"file fsl wrote, or it was cut; rerun the command that writes it")
    lost = [name for name in schema if name not in raw.columns] if current in raw.columns else []
    if lost:  # a default would silently stand in for what the file said (a deleted `comparable` reads as False)
        raise ResultsError(f"{path}: column(s) {lost} missing from a file this fsl wrote (it has '{current}'): cut or "
                           f"edited by hand\n  fix: restore them (e.g. git checkout -- {path}), or delete the file "
                           f"and rerun the tests that wrote its rows")
    frame = pd.DataFrame(index=raw.index)
    for column in schema.values():
        values = []
        present = column.name in raw.columns
        texts = raw[column.name] if present else [""] * len(raw)
        for line, text in enumerate(texts, start=2):
            if text.strip() == "" and present and column.empty_is_value:
                values.append("")
                continue
            if text.strip() == "":
                if column.required:
                    raise ResultsError(f"{path}: line {line}, column '{column.name}' is empty but required\n  fix: "
                                       f"delete line {line} and rerun the run that wrote it")
                values.append(column.default)
                continue
            try:
                values.append(_parse(text, column.kind))
            except ValueError:
                raise ResultsError(f"{path}: line {line}, column '{column.name}' is {text!r}, not a "
                                   f"{column.kind.__name__}\n  fix: correct the value, or delete line {line} and "
                                   f"rerun the run that wrote it") from None
        frame[column.name] = pd.Series(values, index=raw.index, dtype=PANDAS_TYPES[column.kind])
    for name in raw.columns:  # columns of a newer fsl: kept as they are
        if name not in schema:
            frame[name] = raw[name]
    return frame


def check_row_widths(path: Path) -> None:
    """Refuse a row with another number of fields than the header (a line cut short would otherwise read as empty
    values, and be written back with defaults)."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        for row in reader:
            if row and header is not None and len(row) != len(header):
                raise ResultsError(f"{path}: line {reader.line_num} has {len(row)} of the header's {len(header)} "
                                   f"fields (cut short, or edited)\n  fix: restore the line (version control), or "
                                   f"delete it and rerun the run that wrote it")


def write_csv(frame: pd.DataFrame | list[dict], path: str | Path, schema: dict[str, Column]) -> Path:
    """Write rows atomically, columns in schema order (then any others); every schema column is present."""
    frame = pd.DataFrame(frame)
    missing = [c.name for c in schema.values() if c.required and c.name not in frame.columns]
    if missing:
        raise ValueError(f"rows for {path} lack required column(s) {missing}")
    columns = list(schema) + [c for c in frame.columns if c not in schema]
    frame = frame.reindex(columns=columns)
    write_atomic(path, lambda tmp: frame.to_csv(tmp, index=False))
    return Path(path)


# ---- summary.csv -----------------------------------------------------------------------------------------------

def summary_path(results_dir: str | Path) -> Path:
    return Path(results_dir) / "summary.csv"


def read_summary(results_dir: str | Path, must_exist: bool = False) -> pd.DataFrame:
    """Every row of `results_dir`/summary.csv (an empty frame with the schema's columns if there is none, unless
    `must_exist`). Rows of files written before the `run` column get their cell (+ '-quick') as run."""
    path = summary_path(results_dir)
    if not path.exists() or path.stat().st_size == 0:
        if must_exist:
            if not Path(results_dir).is_dir():
                raise ResultsError(f"results folder not found: {results_dir}\n  fix: run a cell first (e.g. "
                                   f"`make demo`) or pass --results DIR")
            raise ResultsError(f"{path} is missing or empty: no cell has been tested yet\n  fix: run "
                               f"`python -m fsl test <config>` (or `make <cell>`) first")
        return pd.DataFrame({c.name: pd.Series(dtype=PANDAS_TYPES[c.kind]) for c in SUMMARY.values()})
    summary = read_csv(path, SUMMARY, current=CURRENT_SUMMARY)
    unnamed = summary["run"].isna()
    summary.loc[unnamed, "run"] = summary.loc[unnamed, "cell"] + np.where(summary.loc[unnamed, "quick"], "-quick", "")
    check_unique_rows(path, summary)
    return summary


CURRENT_SUMMARY = "episodes_id"  # the newest SUMMARY column: a summary.csv that has it must have every column


def check_unique_rows(path: Path, summary: pd.DataFrame) -> None:
    """Refuse two rows of one key (ROW_KEY): a copied line would count as a second training seed, or stand for the
    run in one table and not another."""
    first: dict[tuple[str, ...], int] = {}
    for line, row in enumerate(summary.astype(object).where(summary.notna(), None).to_dict("records"), start=2):
        key = row_key(row)
        if key in first:
            raise ResultsError(f"{path}: line {line} has the key of line {first[key]} ({', '.join(ROW_KEY)} = "
                               f"{', '.join(repr(k) for k in key)}): a copied or edited row\n  fix: delete one of "
                               f"the two lines (the one fsl did not write; version control has the file as written)")
        first[key] = line


ROW_KEY = ("run", "train_tag", "test_tag", "episode_streams", "checkpoint_tag")  # one row per run, training
# settings, test settings, episode streams, and (for a test of another checkpoint beside the run's row) checkpoint


def row_key(row) -> tuple[str, ...]:
    key = ["" if row.get(k) is None or pd.isna(row.get(k)) else str(row.get(k)) for k in ROW_KEY]
    key[3] = key[3] or SHARED_STREAMS
    return tuple(key)


def _finished(row) -> bool:
    tasks, planned = row.get("train_tasks"), row.get("planned_tasks")
    return bool(row.get("comparable")) or (tasks is not None and planned is not None and not pd.isna(tasks)
                                           and not pd.isna(planned) and tasks >= planned)


def place_row(results_dir: str | Path, row: dict) -> dict:
    """`row` (a test's, with its checkpoint_sha256) as it may enter summary.csv: in the place of the run's own row of
    the same key when that row came from the same checkpoint, or from a run that had not finished and trained no more
    tasks than this one (the run went on); otherwise beside it, under its checkpoint's tag (`checkpoint_tag`, its
    own per-run files), not comparable: a finished result, its published checkpoint and its files are never replaced
    by another checkpoint's test (a budget run's `train.stop_at`, a retrained or edited checkpoint)."""
    own_key = row_key({**row, "checkpoint_tag": ""})
    summary = read_summary(results_dir)
    held = [r for r in summary.astype(object).where(summary.notna(), None).to_dict("records")
            if row_key(r) == own_key]
    if not held or held[0].get("checkpoint_sha256") == row["checkpoint_sha256"]:
        return {**row, "checkpoint_tag": ""}
    old = held[0]
    if not _finished(old) and (old.get("train_tasks") or 0) <= (row.get("train_tasks") or 0):
        return {**row, "checkpoint_tag": ""}
    why = (f"another checkpoint than the one behind the run's {'finished' if _finished(old) else 'longer'} row "
           f"({old.get('mean_acc')} %, checkpoint {str(old.get('checkpoint_sha256') or 'of unrecorded sha256')[:12]})")
    return {**row, "checkpoint_tag": row["checkpoint_sha256"][:12], "comparable": False,
            "not_comparable_why": "; ".join(filter(None, [row.get("not_comparable_why"), why]))}


_HELD = threading.local()  # the summary locks this thread holds (`summary_lock`), by lock file


@contextmanager
def summary_lock(results_dir: str | Path) -> Iterator[None]:
    """Hold summary.csv.lock (flock, exclusive) inside the block: one test at a time reads and writes the summary,
    across processes and threads (fsl sweep, job arrays). Re-entrant within a thread."""
    path = summary_path(results_dir).with_name("summary.csv.lock")
    held = _HELD.__dict__.setdefault("paths", set())
    if str(path) in held:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        held.add(str(path))
        try:
            yield
        finally:
            held.discard(str(path))


def record_row(results_dir: str | Path, row: dict, write_files: Callable[[dict], dict]) -> dict:
    """A test's `row` into summary.csv, under the summary's lock from start to end: placed (`place_row`), its files
    written by `write_files(row)` (which returns fields to add to the row), then upserted. Two concurrent tests of one
    run (another checkpoint each) thus see each other's row: neither replaces the other's (before, both could take
    the run's place, and the later replaced the earlier's row and files). Returns the row as written."""
    with summary_lock(results_dir):
        row = place_row(results_dir, row)
        row.update(write_files(row))
        upsert_summary(results_dir, row)
    return row


def upsert_summary(results_dir: str | Path, row: dict) -> Path:
    """Add `row` to summary.csv, replacing only the row of the same run, training settings and test settings
    (ROW_KEY): another run of the cell (train_tag) or another test (test_tag) adds a row beside the run's own;
    rows sorted by quick flag, then the key. Holds the summary's lock (`summary_lock`) while reading and writing, so
    concurrent tests (fsl sweep, job arrays) lose no row."""
    path = summary_path(results_dir)
    with summary_lock(results_dir):
        summary = read_summary(results_dir)
        rows = [r for r in summary.astype(object).where(summary.notna(), None).to_dict("records")
                if row_key(r) != row_key(row)] + [row]
        rows.sort(key=lambda r: (bool(r.get("quick")), row_key(r)))
        return write_csv(rows, path, SUMMARY)


PUBLISH_LIMIT_MB = 5.0  # checkpoints up to this size are published beside their row (conv4 on Omniglot and glyphs:
                        # ~1.4 MB with its Adam state); larger ones (ResNet-12, the 84x84 cells) keep the path column
                        # only (docs/omniglot.md, "Published checkpoints")


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def publish_checkpoint(results_dir: str | Path, row, checkpoint: str | Path, digest: str | None = None) -> dict:
    """Copy the tested `checkpoint` beside the row's files (results/<cell>/checkpoint<tag>.pth, the run's own file:
    `row_file`) when it is at most PUBLISH_LIMIT_MB, atomically and readable as the umask allows; returns the row's
    checkpoint_sha256 and published_checkpoint (relative to `results_dir`, empty when not published). `digest`: the
    checkpoint's sha256, if known."""
    checkpoint, digest = Path(checkpoint), digest or sha256_of(checkpoint)
    if checkpoint.stat().st_size > PUBLISH_LIMIT_MB * 2**20:
        return {"checkpoint_sha256": digest, "published_checkpoint": ""}
    target = row_file(results_dir, row, "checkpoint", test=False).with_suffix(".pth")
    if not (target.exists() and sha256_of(target) == digest):
        write_atomic(target, lambda tmp: shutil.copyfile(checkpoint, tmp))
    return {"checkpoint_sha256": digest, "published_checkpoint": str(target.relative_to(results_dir))}


def ci95(accuracies: np.ndarray) -> float:
    """95% confidence half-width of the mean: 1.96 * std(ddof=0) / sqrt(n) (MMFewShot's "std" column)."""
    accuracies = np.asarray(accuracies, dtype=np.float64)
    return float(1.96 * accuracies.std(ddof=0) / math.sqrt(len(accuracies)))


def summary_row(tested: Config, accuracies: np.ndarray, checkpoint: dict, checkpoint_path: Path, train_tasks: int,
                parallel_episodes: int, device: torch.device, seconds: float, config_path: str | Path | None) -> dict:
    """The SUMMARY row of one test: what it measured (`accuracies`, % per episode, over `seconds` on `device`), the
    checkpoint it tested (trained under its own config, `train_tasks` tasks in its run), the settings it ran under
    (`tested`), and where all of it came from (fsl.results.provenance, commits). The row belongs to the trained run: its
    cell and name (a 1-shot run tested 5-shot is still the 1-shot cell's run, with a test_tag), its training
    settings against `config_path` (train_tag)."""
    trained = from_dict(checkpoint["config"])
    comparable, why = provenance.comparability(trained, tested, train_tasks, checkpoint["tasks_done"],
                                               checkpoint["best_val_tasks"])
    cell = (tested.data.dataset, tested.model.arch, tested.test.ways, tested.test.shots)
    published = reference(*cell, variant_label(trained)) or reference(*cell) or (None, None)  # else MAML's
    return {
        "run": trained.cell + tested.run_tag, "train_tag": provenance.train_tag(trained, config_path),
        "test_tag": provenance.test_tag(trained, tested), "episode_streams": EPISODE_STREAMS, "cell": trained.cell,
        "variant": variant_label(tested), "dataset": tested.data.dataset, "data_root": tested.data_root.name,
        "images": tested.images_form,
        "arch": tested.model.arch, "ways": tested.test.ways, "shots": tested.test.shots,
        "image_size": tested.data.image_size,
        "train_batch": tested.train.ways * (tested.train.shots + tested.train.queries),
        "mean_acc": round(float(accuracies.mean()), 4), "ci95": round(ci95(accuracies), 4),
        "episodes": len(accuracies), **episodes_identity(tested, len(accuracies)),
        "train_tasks": train_tasks, "planned_tasks": trained.train.tasks,
        "best_val_tasks": checkpoint["best_val_tasks"], "quick": tested.quick,
        "comparable": comparable, "not_comparable_why": why, "seed": tested.seed,
        "precision": describe_precision(trained.precision, device, trained.cudnn_benchmark, trained.deterministic),
        "test_precision": describe_precision(tested.precision, device, tested.cudnn_benchmark,
                                             tested.deterministic),
        "train_config_sha": provenance.train_sha(trained), "test_config_sha": provenance.meta_test_sha(tested),
        "tasks_per_s": checkpoint.get("tasks_per_s"), "peak_memory_mb": checkpoint.get("peak_memory_mb"),
        "parallel_tasks": checkpoint.get("parallel_tasks"), "parallel_episodes": parallel_episodes,
        "checkpoint": str(checkpoint_path), "commit": git_commit(),
        "config_commit": git_commit(*config_files(config_path)) if config_path else "unknown",
        "device": describe_device(device), "seconds": round(seconds, 1),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "reference_mean": published[0], "reference_ci95": published[1],
    }


EPISODE_FIELDS = ("dataset", "data_root", "images", "split", "ways", "shots", "queries", "test_seed", "class_rotations",
                  "image_size", "episode_streams", "episodes")  # what picks a test's episodes and their images


def episodes_identity(tested: Config, episodes: int, split: str = "test") -> dict:
    """The row's record of which episodes `tested` was tested on (`episodes` of them): queries, test_seed,
    class_rotations, and episodes_id, a hash of EPISODE_FIELDS (the others are columns of the row already)."""
    fields = {"dataset": tested.data.dataset, "data_root": tested.data_root.name, "images": tested.images_form,
              "split": split, "ways": tested.test.ways, "shots": tested.test.shots, "queries": tested.test.queries,
              "test_seed": tested.test.seed, "class_rotations": tested.data.class_rotations,
              "image_size": tested.data.image_size, "episode_streams": EPISODE_STREAMS, "episodes": episodes}
    return {"queries": tested.test.queries, "test_seed": tested.test.seed,
            "class_rotations": tested.data.class_rotations,
            "episodes_id": short_hash(" ".join(f"{k}={fields[k]}" for k in EPISODE_FIELDS))}


def own_tests(summary: pd.DataFrame) -> pd.DataFrame:
    """The rows of each run's own test of its config file's settings (empty train_tag and test_tag): what the tables
    and plots show. A run tested on both episode streams shows its per-split row only (the shared-stream row stays
    in summary.csv)."""
    own = summary[(summary["test_tag"].fillna("") == "") & (summary["train_tag"].fillna("") == "")
                  & (summary["checkpoint_tag"].fillna("") == "")]
    streams = own["episode_streams"].fillna(SHARED_STREAMS)
    retested = set(own.loc[streams == EPISODE_STREAMS, "run"])
    return own[(streams == EPISODE_STREAMS) | ~own["run"].isin(retested)]


def find_run(summary: pd.DataFrame, run: str, train_tag: str = "") -> pd.Series | None:
    """The row of `run`'s own test under training settings `train_tag`, or None."""
    match = summary[(summary["run"] == run) & (summary["train_tag"].fillna("") == train_tag)
                    & (summary["test_tag"].fillna("") == "") & (summary["checkpoint_tag"].fillna("") == "")
                    & (summary["episode_streams"].fillna(SHARED_STREAMS) == EPISODE_STREAMS)]
    return None if match.empty else match.iloc[0]


def is_done(cfg: Config, config_path: str | Path | None = None) -> bool:
    """Whether summary.csv holds this run's result for these settings (the row of its run name and training
    settings, `train_tag` against `config_path`, and its own test). For the protocol config of a reference cell
    only a comparable row counts (a run stopped early, or testing other weights, is not done); for any other run
    (variants, demo cells, quick runs) a row with the same settings does. `make all-tables` and `make variants` skip
    the runs for which this is true. A malformed summary.csv raises fsl.results.ResultsError (`fsl done` exits 2)."""
    row = find_run(read_summary(cfg.results_dir), cfg.run_name, provenance.train_tag(cfg, config_path))
    if row is None or row["train_config_sha"] != provenance.train_sha(cfg) or row["test_config_sha"] != provenance.meta_test_sha(cfg):
        return False
    protocol_run = provenance.comparability(cfg, cfg, cfg.train.tasks, None, None)[0]
    return bool(row["comparable"]) or not protocol_run


# ---- per-cell files ------------------------------------------------------------------------------------------

def short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def run_file(results_dir: str | Path, cell: str, run: str, stem: str, test_tag: str = "", train_tag: str = "",
             streams: str = EPISODE_STREAMS, checkpoint_tag: str = "") -> Path:
    """results/<cell>/<stem><tag>.csv, where tag is what the run name adds to the cell, with '_' for '-'
    (run 'cub-conv4-1shot-quick': test_episodes_quick.csv), then '__train-<hash>' for a run with other training
    settings than its config file's (`train_tag`), '__test-<hash>' for a test with other settings than the run's
    own (`test_tag`), '__shared-streams' for a row of the episode streams before #36 (`streams`) and
    '__ckpt-<sha256 prefix>' for a test of another checkpoint beside the run's own row (`checkpoint_tag`): so that
    no other run or test ever replaces a run's own file."""
    tag = run[len(cell):] if run.startswith(cell) else f"-{run}"
    other = (f"__train-{short_hash(train_tag)}" if train_tag else "") + (f"__test-{short_hash(test_tag)}"
                                                                         if test_tag else "")
    other += "__shared-streams" if streams == SHARED_STREAMS else ""
    other += f"__ckpt-{checkpoint_tag}" if checkpoint_tag else ""
    return Path(results_dir) / cell / f"{stem}{tag.replace('-', '_')}{other}.csv"


def cell_file(cfg: Config, stem: str) -> Path:
    return run_file(cfg.results_dir, cfg.cell, cfg.run_name, stem)


def row_file(results_dir: str | Path, row, stem: str, test: bool = True) -> Path:
    """The per-run file `stem` of a summary row (its test's when `test`, else its run's: the training log)."""
    streams, beside = row.get("episode_streams"), row.get("checkpoint_tag")
    return run_file(results_dir, row["cell"], row["run"], stem, (row["test_tag"] or "") if test else "",
                    row["train_tag"] or "", streams if isinstance(streams, str) and streams else SHARED_STREAMS,
                    beside if isinstance(beside, str) else "")


def write_test_episodes(path: str | Path, accuracies: np.ndarray) -> Path:
    """Per-episode test accuracies (%), in episode order: columns episode, accuracy."""
    return write_csv({"episode": np.arange(len(accuracies)), "accuracy": np.asarray(accuracies, np.float64)},
                     path, EPISODES)


def read_test_episodes(path: str | Path) -> pd.DataFrame:
    return read_csv(path, EPISODES)


def read_train_log(path: str | Path) -> pd.DataFrame:
    return read_csv(path, TRAIN_LOG)
