"""The built-in glyphs dataset: deterministic bytes, splits by script, and the same reader/episode path."""
import csv
import hashlib
import json
import subprocess
import sys

import torch
from conftest import REPO

from fsl.data import glyphs, load_split, store
from fsl.data.episodes import EpisodeDataset, EpisodeMaker, collate_specs
from fsl.data.transforms import eval_transform


def digest(root) -> dict:
    return {name: hashlib.sha256((root / name).read_bytes()).hexdigest()
            for name in ("images.npy", "labels.npy", "classes.csv", "VERSION")}


def test_generation_is_byte_identical(glyphs_root, tmp_path):
    glyphs.generate(tmp_path / "again")
    assert digest(glyphs_root) == digest(tmp_path / "again")


def test_splits_are_by_script(glyphs_root):
    with open(glyphs_root / "classes.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    scripts = {split: {r["script"] for r in rows if r["split"] == split} for split in ("train", "val", "test")}
    assert scripts["test"] == set(glyphs.TEST_SCRIPTS) and scripts["val"] == set(glyphs.VAL_SCRIPTS)
    assert not scripts["train"] & (scripts["val"] | scripts["test"])
    assert len(rows) >= 1000 and len(scripts["train"]) >= 20


def test_reader_store_and_episodes(glyphs_root, tmp_path):
    dataset = load_split("glyphs", glyphs_root, "test")
    assert len(dataset) == 20 * dataset.num_classes
    images = store.open_store(dataset, "glyphs", "test", "eval", 20, tmp_path)
    assert images.pixels.shape == (len(dataset), 20, 20, 3)
    specs = collate_specs([EpisodeDataset(dataset, 5, 1, 15, seed=0, count=1)[0]])
    episode = EpisodeMaker(images, 5, 1, 15, 20, torch.device("cpu"))(specs)
    assert episode.support_x.shape == (1, 5, 3, 20, 20) and episode.query_x.shape == (1, 75, 3, 20, 20)
    torch.testing.assert_close(episode.query_x[0, 3], eval_transform(20)(dataset.load_image(int(specs.indices[0, 4]))),
                               rtol=0, atol=1e-5)


def test_generation_is_reused(glyphs_root):
    assert glyphs.ensure_generated(glyphs_root) is False


def test_data_check_cli(glyphs_root):
    out = subprocess.run([sys.executable, "-m", "fsl", "data", "check", "glyphs", "--root", str(glyphs_root), "--json"],
                         capture_output=True, text=True, cwd=REPO, check=True).stdout
    counts = json.loads(out)
    assert counts["test"]["images"] == 20 * counts["test"]["classes"]
