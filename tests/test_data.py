"""Readers, transforms and episodes on the real-data fixtures in ../shared/data, and every data error."""
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, fixture_root

from fsl.data import DatasetError, load_split
from fsl.data.check import check_dataset
from fsl.data.episodes import EpisodeDataset
from fsl.data.transforms import eval_transform, train_transform

EXPECTED = {"mini-imagenet": {"train": (64, 3840), "val": (16, 960), "test": (20, 1200)},
            "cub": {"train": (25, 1463), "val": (13, 741), "test": (12, 685)},
            "tiered-imagenet": {"train": (31, 1240), "val": (8, 320), "test": (19, 760)}}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_split_sizes_and_disjoint_classes(name):
    root = fixture_root(name)
    class_sets = {}
    for split, (classes, images) in EXPECTED[name].items():
        dataset = load_split(name, root, split)
        assert (dataset.num_classes, len(dataset)) == (classes, images)
        assert sorted(set(dataset.labels)) == list(range(classes))
        class_sets[split] = set(dataset.class_names)
    assert not (class_sets["train"] & class_sets["val"] or class_sets["train"] & class_sets["test"]
                or class_sets["val"] & class_sets["test"])


def test_cub_split_rule_and_bbox_crop():
    root = fixture_root("cub")
    assert load_split("cub", root, "val").class_names[:2] == ["002.Laysan_Albatross", "006.Least_Auklet"]
    assert load_split("cub", root, "test").class_names[0] == "004.Groove_billed_Ani"
    raw, cropped = load_split("cub", root, "train")[0][0], load_split("cub", root, "train", bbox_crop=True)[0][0]
    assert cropped.size[0] < raw.size[0] or cropped.size[1] < raw.size[1]


def test_data_check_cli_json():
    root = fixture_root("mini-imagenet")
    out = subprocess.run([sys.executable, "-m", "fsl", "data", "check", "mini-imagenet", "--root", str(root), "--json"],
                         capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert json.loads(out) == {"train": {"classes": 64, "images": 3840}, "val": {"classes": 16, "images": 960},
                               "test": {"classes": 20, "images": 1200}, "all": {"classes": 100, "images": 6000}}


def test_transform_outputs():
    dataset = load_split("mini-imagenet", fixture_root("mini-imagenet"), "train")
    image = dataset[0][0]
    for transform in (train_transform(84), eval_transform(84)):
        x = transform(image)
        assert x.shape == (3, 84, 84) and x.dtype == torch.float32
        # (0 - 123.675) / 58.395 = -2.118 ... (255 - 103.53) / 57.375 = 2.640
        assert x.min() >= -2.12 and x.max() <= 2.65
    x = eval_transform(84)(image)
    assert abs(x.mean().item()) < 1.5  # normalised, not 0-255 or 0-1


# ---- every data error, on corrupted temporary copies ----------------------------------------------------------

def copy_fixture(name, tmp_path):
    destination = tmp_path / name
    shutil.copytree(fixture_root(name), destination)
    return destination


def test_missing_root_names_the_prepare_command(tmp_path):
    with pytest.raises(DatasetError, match="fsl data prepare mini-imagenet"):
        load_split("mini-imagenet", tmp_path / "nowhere", "train")


def test_missing_split_file(tmp_path):
    root = copy_fixture("mini-imagenet", tmp_path)
    (root / "val.csv").unlink()
    with pytest.raises(DatasetError, match="val.csv"):
        load_split("mini-imagenet", root, "val")


def test_csv_row_naming_a_missing_image(tmp_path):
    root = copy_fixture("mini-imagenet", tmp_path)
    (root / "images" / "n0153282900000005.jpg").unlink()
    with pytest.raises(DatasetError, match="line 2 names an image that does not exist"):
        load_split("mini-imagenet", root, "train")


def test_truncated_image_and_small_class_and_overlap_are_reported(tmp_path):
    root = copy_fixture("mini-imagenet", tmp_path)
    image = root / "images" / "n0153282900000006.jpg"
    image.write_bytes(image.read_bytes()[:300])
    rows = (root / "val.csv").read_text().splitlines()
    first_val_class = rows[1].split(",")[1]
    kept = [rows[0]] + [r for r in rows[1:] if r.split(",")[1] != first_val_class] + \
        [r for r in rows[1:] if r.split(",")[1] == first_val_class][:10]
    (root / "val.csv").write_text("\n".join(kept) + "\n")
    test_rows = (root / "test.csv").read_text().splitlines()
    (root / "test.csv").write_text("\n".join(test_rows + [rows[1]]) + "\n")  # a val image in test too
    counts, problems = check_dataset("mini-imagenet", root)
    text = "\n".join(problems)
    assert "unreadable or truncated image" in text and "n0153282900000006.jpg" in text
    assert f"'{first_val_class}' has 10 images" in text
    assert "in both the val and test splits" in text
    result = subprocess.run([sys.executable, "-m", "fsl", "data", "check", "mini-imagenet", "--root", str(root)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode != 0 and "truncated" in result.stderr


def test_episode_needs_enough_images_per_class():
    dataset = load_split("tiered-imagenet", fixture_root("tiered-imagenet"), "val")
    with pytest.raises(DatasetError, match="fewer images than shots \\+ queries = 5 \\+ 36"):
        EpisodeDataset(dataset, 5, 5, 36, seed=0, count=1)


def test_html_page_saved_as_pickle(tmp_path):
    root = copy_fixture("tiered-imagenet", tmp_path)
    (root / "val_images_png.pkl").write_bytes(b"<!DOCTYPE html><html><body>Google Drive - quota exceeded")
    with pytest.raises(DatasetError, match="HTML page"):
        load_split("tiered-imagenet", root, "val").png_bytes  # read when the image store is built


def test_cub_missing_file(tmp_path):
    root = copy_fixture("cub", tmp_path)
    (root / "image_class_labels.txt").unlink()
    with pytest.raises(DatasetError, match="image_class_labels.txt"):
        load_split("cub", root, "train")


def test_tiered_reads_labels_only_until_an_image_is_decoded():
    dataset = load_split("tiered-imagenet", fixture_root("tiered-imagenet"), "train")
    assert dataset._png_bytes is None and len(dataset.labels) == 1240  # the images pickle is not loaded
    assert dataset.load_image(0).size == (84, 84)
    assert isinstance(dataset.png_bytes[0], (bytes, np.ndarray)) and len(dataset.png_bytes[0]) < 84 * 84 * 3


def test_mini_imagenet_learn2learn_cache_layout(tmp_path):
    source = load_split("mini-imagenet", fixture_root("mini-imagenet"), "val")
    array = np.stack([np.asarray(source.load_image(i)) for i in range(len(source))])
    class_dict = {}
    for i, label in enumerate(source.labels):
        class_dict.setdefault(source.class_names[label], []).append(i)
    with open(tmp_path / "mini-imagenet-cache-validation.pkl", "wb") as f:
        pickle.dump({"image_data": array, "class_dict": class_dict}, f)
    cached = load_split("mini-imagenet", tmp_path, "val")
    assert (cached.num_classes, len(cached)) == (16, 960)
    assert np.array_equal(np.asarray(cached.load_image(5)), array[5])


def test_prepare_offline_fails_fast_with_manual_steps(tmp_path, monkeypatch):
    import urllib.request

    from fsl.data import prepare

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DatasetError, match="manual steps"):
        prepare.prepare("mini-imagenet", tmp_path / "mini")


def test_prepare_rejects_html_instead_of_archive(tmp_path, monkeypatch):
    import io
    import urllib.request

    from fsl.data import prepare

    class Page(io.BytesIO):
        headers = {"Content-Type": "text/html; charset=utf-8"}

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: Page(b"<html>virus scan warning</html>"))
    with pytest.raises(DatasetError, match="HTML page instead of CUB_200_2011.tgz"):
        prepare.prepare("cub", tmp_path / "cub")
    assert not list((tmp_path / "cub").glob("*.tgz*"))


def test_cub_class_missing_before_later_classes_is_an_error(tmp_path):
    """Without its lines and folder, class 3 would shift every later class to another split; refuse instead."""
    root = copy_fixture("cub", tmp_path)
    image_ids = {line.split()[0] for line in (root / "image_class_labels.txt").read_text().splitlines()
                 if line.split()[1] == "3"}
    for name in ("images.txt", "image_class_labels.txt"):
        lines = (root / name).read_text().splitlines()
        (root / name).write_text("\n".join(line for line in lines if line.split()[0] not in image_ids) + "\n")
    shutil.rmtree(root / "images" / "003.Sooty_Albatross")
    with pytest.raises(DatasetError, match=r"class\(es\) \['003.Sooty_Albatross'\] \(1 in all\) have no images"):
        load_split("cub", root, "train")


def test_a_files_fingerprint_names_the_file_not_the_path_spelling(tmp_path, monkeypatch):
    """A store built through ../shared/data from one folder is reused from another (it was rebuilt: 'source
    differs')."""
    from fsl.data.base import files_fingerprint
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"123")
    monkeypatch.chdir(tmp_path / "a")
    spellings = [Path("x.png"), tmp_path / "a" / "x.png", tmp_path / "a" / ".." / "a" / "x.png"]
    assert len({files_fingerprint([p]) for p in spellings}) == 1
    before = files_fingerprint([spellings[0]])
    (tmp_path / "a" / "x.png").write_bytes(b"1234")
    assert files_fingerprint([spellings[0]]) != before  # the file changed
