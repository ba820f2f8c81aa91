"""Readers, transforms and episodes on the real-data fixtures in ../shared/data, and every data error."""
import json
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, fixture_root
from fsl.data import DatasetError, load_split
from fsl.data.check import check_dataset
from fsl.data.transforms import eval_transform, train_transform
from fsl.episodes import EpisodeDataset, episode_loader

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
                               "test": {"classes": 20, "images": 1200}}


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


def test_training_episode_shapes_and_labels():
    dataset = load_split("mini-imagenet", fixture_root("mini-imagenet"), "train", eval_transform(84))
    episode = EpisodeDataset(dataset, ways=5, shots=5, queries=16, seed=0, count=2)[0]
    assert episode.support_x.shape == (25, 3, 84, 84) and episode.query_x.shape == (80, 3, 84, 84)
    assert sorted(episode.support_y.tolist()) == sorted(list(range(5)) * 5)
    assert sorted(episode.query_y.tolist()) == sorted(list(range(5)) * 16)
    # support and query of one class come from the same dataset class, and never share an image
    indices = EpisodeDataset(dataset, 5, 5, 16, seed=0, count=2).describe(0)
    assert len(set(indices)) == 105
    for c in range(5):
        labels = {dataset.labels[i] for i in indices[c * 21:(c + 1) * 21]}
        assert len(labels) == 1


def test_label_order_is_random_per_task():
    dataset = load_split("mini-imagenet", fixture_root("mini-imagenet"), "val", eval_transform(28))
    episodes = EpisodeDataset(dataset, 5, 1, 1, seed=0, count=20)
    # support items come class by class in dataset-class order; the head row of the first class must vary
    first_rows = {episodes[i].support_y[0].item() for i in range(20)}
    assert len(first_rows) > 1


def episodes_bytes(workers: int, root) -> tuple[list, bytes]:
    dataset = load_split("mini-imagenet", root, "test", eval_transform(84))
    episodes = EpisodeDataset(dataset, ways=5, shots=1, queries=15, seed=0, count=6)
    descriptions = [episodes.describe(i) for i in range(len(episodes))]
    tensors = b"".join(t.numpy().tobytes() for batch in episode_loader(episodes, 1, workers) for t in batch)
    return descriptions, tensors


def test_fixed_episodes_identical_across_runs_and_workers():
    root = fixture_root("mini-imagenet")
    a = episodes_bytes(0, root)
    b = episodes_bytes(2, root)
    c = episodes_bytes(0, root)
    assert a[0] == b[0] == c[0]
    assert a[1] == b[1] == c[1]


def test_training_augmentation_is_a_function_of_the_task_index():
    dataset = load_split("mini-imagenet", fixture_root("mini-imagenet"), "train", train_transform(84))
    whole = EpisodeDataset(dataset, 5, 1, 2, seed=3, count=4)
    resumed = EpisodeDataset(dataset, 5, 1, 2, seed=3, count=2, start=2)
    torch.manual_seed(123)  # the caller's RNG must not matter, nor be changed
    state = torch.get_rng_state()
    assert torch.equal(whole[2].support_x, resumed[0].support_x)
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(whole[0].support_x, whole[1].support_x)


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


def test_episode_needs_enough_images_per_class(tmp_path):
    dataset = load_split("tiered-imagenet", fixture_root("tiered-imagenet"), "val")
    with pytest.raises(DatasetError, match="fewer images than shots \\+ queries = 5 \\+ 36"):
        EpisodeDataset(dataset, 5, 5, 36, seed=0, count=1)


def test_html_page_saved_as_pickle(tmp_path):
    root = copy_fixture("tiered-imagenet", tmp_path)
    (root / "val_images_png.pkl").write_bytes(b"<!DOCTYPE html><html><body>Google Drive - quota exceeded")
    with pytest.raises(DatasetError, match="HTML page"):
        load_split("tiered-imagenet", root, "val")


def test_cub_missing_file(tmp_path):
    root = copy_fixture("cub", tmp_path)
    (root / "image_class_labels.txt").unlink()
    with pytest.raises(DatasetError, match="image_class_labels.txt"):
        load_split("cub", root, "train")


def test_tiered_keeps_png_bytes_and_decodes_per_item():
    dataset = load_split("tiered-imagenet", fixture_root("tiered-imagenet"), "train")
    assert isinstance(dataset.png_bytes[0], (bytes, np.ndarray)) and len(dataset.png_bytes[0]) < 84 * 84 * 3
    assert dataset.load_image(0).size == (84, 84)


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


def test_cached_images_are_the_transformed_images():
    root = fixture_root("mini-imagenet")
    plain = load_split("mini-imagenet", root, "test", eval_transform(28))
    cached = load_split("mini-imagenet", root, "test", eval_transform(28))
    cached.cache_transformed()
    for index in (0, 7, 0, 7):  # second visit comes from the cache
        assert torch.equal(cached[index][0], plain[index][0]) and cached[index][1] == plain[index][1]
    assert sorted(cached.cache) == [0, 7]


def test_cub_class_missing_before_later_classes_is_an_error(tmp_path):
    """Without its lines and folder, class 3 would shift every later class to another split; refuse instead."""
    root = copy_fixture("cub", tmp_path)
    image_ids = {line.split()[0] for line in (root / "image_class_labels.txt").read_text().splitlines()
                 if line.split()[1] == "3"}
    for name in ("images.txt", "image_class_labels.txt"):
        lines = (root / name).read_text().splitlines()
        (root / name).write_text("\n".join(l for l in lines if l.split()[0] not in image_ids) + "\n")
    shutil.rmtree(root / "images" / "003.Sooty_Albatross")
    with pytest.raises(DatasetError, match=r"class\(es\) \['003.Sooty_Albatross'\] \(1 in all\) have no images"):
        load_split("cub", root, "train")
