"""Published checkpoints (#36 item 1), as the seed's table has a ckpt and a log on every row: `fsl test` copies a
small tested checkpoint beside its row with its sha256; a copy elsewhere (a fresh clone) re-tests it bit for bit on
one CPU, a published unfinished run resumes elsewhere to the same weights, and every committed row with a published
checkpoint re-tests to its committed numbers."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, fixture_root

from fsl.results import row_file
from fsl.results.files import PUBLISH_LIMIT_MB, sha256_of

CELL = str(REPO / "experiments" / "omniglot-conv4-1shot.yaml")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # one CPU thread: the same kernels, bit for bit


def fsl(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "fsl", *args], cwd=REPO, capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def tiny(where: Path, *extra: str) -> list[str]:
    return [f"data.root={fixture_root('omniglot')}", f"data.cache_dir={where / 'cache'}", "device=cpu",
            "data.workers=0", "train.tasks=8", "train.val_every=4", "train.val_episodes=4", "train.log_every=4",
            "train.checkpoint_every=4", "test.episodes=12", "train.parallel_tasks=4", "test.parallel_episodes=4",
            "train.meta_batch=4", f"work_dir={where / 'work'}", f"results_dir={where / 'results'}", *extra]


def own_row(results: Path) -> pd.Series:
    return pd.read_csv(results / "summary.csv", keep_default_na=False).iloc[0]


def test_a_tested_run_publishes_its_checkpoint_and_a_copy_elsewhere_retests_it_bit_for_bit(tmp_path):
    first = tmp_path / "here"
    fsl("train", CELL, *tiny(first))
    fsl("test", CELL, *tiny(first))
    row = own_row(first / "results")
    tested = Path(row.checkpoint)
    assert row.checkpoint_sha256 == sha256_of(tested) and tested.stat().st_size < PUBLISH_LIMIT_MB * 2**20
    published = first / "results" / row.published_checkpoint
    assert row.published_checkpoint.startswith("omniglot-conv4-1shot/checkpoint__train-")  # the run's own file
    assert row.published_checkpoint.endswith(".pth")
    assert sha256_of(published) == row.checkpoint_sha256 and published.stat().st_mode & 0o044 == 0o044
    tables = fsl("tables", "--results", str(first / "results"))
    table = (first / "results" / "tables" / "other_tests.md").read_text()  # a run with its own training settings
    assert f"[ckpt](../{row.published_checkpoint}) `{row.checkpoint_sha256[:8]}`" in table, tables.stdout
    assert "[log](../omniglot-conv4-1shot/train_log__train-" in table

    clone = tmp_path / "clone"  # another folder, another store cache: nothing of the first run but the file
    (clone / "results").mkdir(parents=True)
    copied = clone / "published.pth"
    shutil.copyfile(published, copied)
    fsl("test", CELL, str(copied), *tiny(clone))
    again = own_row(clone / "results")
    ours = pd.read_csv(row_file(first / "results", row, "test_episodes")).accuracy.to_numpy()
    theirs = pd.read_csv(row_file(clone / "results", again, "test_episodes")).accuracy.to_numpy()
    assert np.array_equal(ours, theirs) and again.mean_acc == row.mean_acc and again.ci95 == row.ci95
    assert again.checkpoint_sha256 == row.checkpoint_sha256


def test_a_published_unfinished_run_resumes_elsewhere_to_the_same_weights(tmp_path):
    """Stopped at task 4 of 8, its latest.pth and config.yaml copied to another machine's work folder (the data at
    another path: a link), resumed to task 8: the same weights as the run that never stopped."""
    whole, part = tmp_path / "whole", tmp_path / "part"
    fsl("train", CELL, *tiny(whole))
    fsl("train", CELL, *tiny(part, "train.stop_at=4"))
    elsewhere = tmp_path / "elsewhere"
    run = elsewhere / "work" / "omniglot-conv4-1shot"
    run.mkdir(parents=True)
    for name in ("latest.pth", "config.yaml"):
        shutil.copyfile(part / "work" / "omniglot-conv4-1shot" / name, run / name)
    data = tmp_path / "data-elsewhere"
    data.symlink_to(fixture_root("omniglot").resolve(), target_is_directory=True)
    resumed = fsl("train", CELL, *tiny(elsewhere, f"data.root={data}"))
    assert "resuming from" in resumed.stdout + resumed.stderr and "at task 4" in resumed.stdout + resumed.stderr
    a = torch.load(whole / "work" / "omniglot-conv4-1shot" / "latest.pth", weights_only=False)["model"]
    b = torch.load(run / "latest.pth", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def committed_published_rows() -> list[pd.Series]:
    summary = pd.read_csv(REPO / "results" / "summary.csv", keep_default_na=False)
    if "published_checkpoint" not in summary:
        return []
    return [row for _, row in summary.iterrows() if row.published_checkpoint and not row.test_tag]


@pytest.mark.parametrize("row", committed_published_rows(), ids=lambda row: row.run)
def test_a_committed_row_retests_from_its_published_checkpoint_to_its_numbers(row, tmp_path, request):
    """What a fresh clone does: `fsl test` on the committed checkpoint, its sha256 checked, gives the committed
    per-episode accuracies (one CPU thread, the row's own parallel_episodes): bit for bit on the CPU that tested it
    (the first test above checks that on this one); another CPU's float rounding may flip a rare query, so here at
    most 1 % of the episodes may differ and the mean by 0.2 points."""
    from fsl.config import from_dict
    from fsl.results.provenance import protocol_file

    published = REPO / "results" / row.published_checkpoint
    assert sha256_of(published) == row.checkpoint_sha256
    root = request.getfixturevalue("glyphs_root") if row.dataset == "glyphs" else fixture_root(row.dataset)
    trained = from_dict(torch.load(published, map_location="cpu", weights_only=False)["config"])
    config = protocol_file(trained)  # the cell's file, or a variant's own (experiments/variants/<cell>-fomaml.yaml)
    fsl("test", str(config), str(published), f"data.root={root}",
        f"data.cache_dir={tmp_path / 'cache'}", "device=cpu", "data.workers=0",
        f"test.parallel_episodes={int(float(row.parallel_episodes))}", f"results_dir={tmp_path}",
        f"seed={row.seed}", *row.train_tag.split())  # a run of its own training settings is tested with them
    again = own_row(tmp_path)
    committed = pd.read_csv(row_file(REPO / "results", row, "test_episodes")).accuracy.to_numpy()
    ours = pd.read_csv(row_file(tmp_path, again, "test_episodes")).accuracy.to_numpy()
    differ = int((committed != ours).sum())
    print(f"{row.run}: {differ} of {len(ours)} episodes differ; mean {again.mean_acc} (committed {row.mean_acc})")
    assert len(ours) == len(committed) == row.episodes
    assert differ <= 0.01 * len(ours) and abs(again.mean_acc - row.mean_acc) <= 0.2


def test_committed_rows_with_published_checkpoints_exist():
    """The Omniglot full-protocol rows (#36 item 4), input comparison (item 3) and seed spread (item 6) are
    published: the parametrised re-test above has rows to run."""
    assert {row.run for row in committed_published_rows()} >= {"omniglot-conv4-1shot", "omniglot-conv4-1shot-fomaml",
                                                               "omniglot-conv4-1shot-inputs-binary",
                                                               "omniglot-conv4-1shot-inputs-greyscale",
                                                               "glyphs-conv4-1shot", "omniglot-conv4-1shot-2000steps",
                                                               "omniglot-conv4-1shot-2000steps-seed1", "omniglot-conv4-1shot-2000steps-seed2"}


def committed_run_states() -> list[Path]:
    """The resumable states of unfinished runs committed between sessions (docs/omniglot.md, "The full-protocol
    run, across sessions"): results/<cell>/run*/latest.pth."""
    return sorted((REPO / "results").glob("*/run*/latest.pth"))


@pytest.mark.parametrize("latest", committed_run_states(), ids=lambda p: str(p.parent.relative_to(REPO / "results")))
def test_a_committed_run_state_verifies_and_resumes_under_its_protocol_config(latest):
    """What the next machine checks before it resumes: the sha256 file matches, the checkpoint is of this fsl's
    episode streams and of its committed protocol config (`fsl train <that yaml>` would resume it, not refuse), it is
    unfinished, and its log.csv ends at or before the checkpoint's task."""
    from fsl.config import from_dict
    from fsl.results.provenance import check_resume, protocol_config
    from fsl.train.checkpoint import check_streams

    folder = latest.parent
    recorded, name = (folder / "latest.pth.sha256").read_text().split()
    assert name == "latest.pth" and recorded == sha256_of(latest)
    checkpoint = torch.load(latest, map_location="cpu", weights_only=False)
    stored = from_dict(checkpoint["config"])
    check_resume(stored, protocol_config(stored), latest, checkpoint["tasks_done"])
    check_streams(checkpoint, latest)
    assert 0 < checkpoint["tasks_done"] < stored.train.tasks
    log = pd.read_csv(folder / "log.csv")
    assert set(log.cell) == {stored.cell} and 0 < log.tasks.max() <= checkpoint["tasks_done"]
    assert (folder / "config.yaml").exists()
