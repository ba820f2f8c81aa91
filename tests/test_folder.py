"""Your own data (#25): the `folder` dataset in both layouts, `fsl data check folder`, a folder cell trained and
tested end to end, and `fsl adapt` with its refusals. Folders are built in the tests from the real-data fixture."""
import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, STORE_CACHE, fixture_root

from fsl.data import DatasetError, load_split
from fsl.data.check import check_dataset
from fsl.data.folder import detect_layout

SPLIT_CLASSES = {"train": 6, "val": 5, "test": 5}  # classes taken from the fixture's split of the same name


def fixture_rows(split: str, classes: int, per_class: int = 25) -> list[tuple[str, str]]:
    with open(fixture_root("mini-imagenet") / f"{split}.csv", newline="") as f:
        rows = [tuple(row) for row in csv.reader(f)][1:]
    chosen = sorted({label for _, label in rows})[:classes]
    return [row for label in chosen for row in [r for r in rows if r[1] == label][:per_class]]


def class_folders(root: Path, per_class: int = 25) -> Path:
    """ROOT/{train,val,test}/<class>/<image> from the fixture's images."""
    images = fixture_root("mini-imagenet") / "images"
    for split, classes in SPLIT_CLASSES.items():
        for name, label in fixture_rows(split, classes, per_class):
            (root / split / label).mkdir(parents=True, exist_ok=True)
            shutil.copy(images / name, root / split / label / name)
    return root


def csv_layout(root: Path) -> Path:
    """ROOT/images/<file> + ROOT/{train,val,test}.csv (LibFewShot's layout) from the fixture's images."""
    (root / "images").mkdir(parents=True)
    for split, classes in SPLIT_CLASSES.items():
        rows = fixture_rows(split, classes)
        with open(root / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows([("filename", "label"), *rows])
        for name, _ in rows:
            shutil.copy(fixture_root("mini-imagenet") / "images" / name, root / "images" / name)
    return root


@pytest.mark.parametrize("make,layout", [(class_folders, "class folders"), (csv_layout, "csv")])
def test_both_layouts_are_detected_read_and_checked(tmp_path, make, layout):
    root = make(tmp_path / "mine")
    assert detect_layout(root) == layout
    train = load_split("folder", root, "train")
    assert (train.num_classes, len(train)) == (6, 150) and sorted(set(train.labels)) == list(range(6))
    assert train.indices_to_labels() == dict(enumerate(train.labels))  # learn2learn gets the labels up front
    counts, problems = check_dataset("folder", root)
    assert problems == [] and counts["test"] == {"classes": 5, "images": 125}
    out = subprocess.run([sys.executable, "-m", "fsl", "data", "check", "folder", "--root", str(root)], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 0 and f"layout {layout}" in out.stdout and "folder train:     6 classes" in out.stdout


def test_check_names_every_problem(tmp_path):
    root = class_folders(tmp_path / "mine")
    shutil.copytree(root / "train" / sorted(p.name for p in (root / "train").iterdir())[0],
                    root / "val" / sorted(p.name for p in (root / "train").iterdir())[0])   # a class in two splits
    small = sorted((root / "test").iterdir())[0]
    for path in sorted(small.iterdir())[10:]:                                                # 10 images: too few
        path.unlink()
    broken = sorted(sorted((root / "val").iterdir())[1].iterdir())[0]
    broken.write_bytes(broken.read_bytes()[:200])                                           # unreadable
    counts, problems = check_dataset("folder", root)
    text = "\n".join(problems)
    assert "is in both the train and val splits" in text
    assert f"test class '{small.name}' has 10 images, fewer than the 20" in text
    assert f"unreadable or truncated image {broken}" in text
    shutil.rmtree(root / "test")
    (root / "test").mkdir()
    with pytest.raises(DatasetError, match="the test split of .* holds no images"):
        load_split("folder", root, "test")
    with pytest.raises(DatasetError, match="holds neither layout"):
        detect_layout(tmp_path)


@pytest.fixture(scope="module")
def trained_folder_cell(tmp_path_factory):
    """A folder cell trained (tiny) and tested through the command line, as `make folder-conv4-5shot` runs it."""
    tmp = tmp_path_factory.mktemp("folder-cell")
    root = class_folders(tmp / "my-birds")
    settings = [f"data.root={root}", "data.image_size=28", "data.workers=0", "train.parallel_tasks=1", "test.parallel_episodes=1", f"data.cache_dir={STORE_CACHE}",
                "train.tasks=4", "train.meta_batch=2", "train.queries=2", "train.val_every=4", "train.val_episodes=2",
                "test.episodes=4", "test.queries=2", "train.log_every=2", f"work_dir={tmp / 'work'}",
                f"results_dir={tmp / 'results'}", "device=cpu"]
    for command in ("train", "test"):
        subprocess.run([sys.executable, "-m", "fsl", command, str(REPO / "experiments/folder-conv4-5shot.yaml"),
                        *settings], cwd=REPO, check=True, capture_output=True)
    return tmp, root


def test_a_folder_cell_trains_tests_and_is_never_comparable(trained_folder_cell):
    tmp, root = trained_folder_cell
    row = pd.read_csv(tmp / "results/summary.csv").iloc[0]
    assert (row["run"], row["dataset"], row["data_root"]) == ("folder-conv4-5shot", "folder", "my-birds")
    assert not row["comparable"] and "no reference number" in row["not_comparable_why"]


def support_set(root: Path, support: Path, per_class: int) -> Path:
    """SUPPORT/<class>/<image>: the first `per_class` images of each test class of the folder cell."""
    for folder in sorted((root / "test").iterdir()):
        (support / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:per_class]:
            shutil.copy(image, support / folder.name / image.name)
    return support


def adapt(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fsl", "adapt", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_adapt_labels_new_images_and_writes_the_predictions(trained_folder_cell, tmp_path):
    tmp, root = trained_folder_cell
    checkpoint = tmp / "work/folder-conv4-5shot/best_accuracy_mean.pth"
    support, queries = tmp_path / "support", tmp_path / "queries"
    for folder in sorted((root / "test").iterdir()):  # 5 new classes: 5 support images each, the rest to label
        images = sorted(folder.iterdir())
        (support / folder.name).mkdir(parents=True)
        (queries / folder.name).mkdir(parents=True)
        for i, image in enumerate(images):
            shutil.copy(image, (support if i < 5 else queries) / folder.name / image.name)
    single = sorted((queries / folder.name).iterdir())[0]
    result = adapt(checkpoint, support, queries, single, "--out", tmp_path / "predictions.csv")
    assert result.returncode == 0, result.stderr
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    classes = sorted(p.name for p in support.iterdir())
    assert len(predictions) == 5 * 20 + 1 and list(predictions.columns) == ["file", "predicted"] + [
        f"p_{c}" for c in classes] + ["batch_norm"]
    assert set(predictions["batch_norm"]) == {"each"} and "BatchNorm: each query in a batch of the support" in \
        result.stdout
    twice = predictions[predictions["file"] == str(single)]  # in its folder's batch, and alone at the end
    assert len(twice) == 2 and twice.iloc[0].equals(twice.iloc[1])  # one answer, whatever else is passed (#38)
    assert predictions[[f"p_{c}" for c in classes]].sum(axis=1).round(4).eq(1).all()
    assert set(predictions["predicted"]) <= set(classes)
    accuracy = float(result.stdout.split("support class: ")[1].split(" %")[0])
    correct = sum(Path(f).parent.name == p for f, p in zip(predictions["file"], predictions["predicted"]))
    assert accuracy == pytest.approx(100 * correct / len(predictions), abs=0.01)


def test_adapt_together_is_the_transductive_test_where_other_queries_change_a_label(trained_folder_cell, tmp_path):
    """--batch-norm together: MAML's meta-test form, each query normalised with the other queries of its batch, so
    the same image gets other probabilities alone and among others (#38 item 4: the default no longer does)."""
    tmp, root = trained_folder_cell
    checkpoint = tmp / "work/folder-conv4-5shot/best_accuracy_mean.pth"
    support = support_set(root, tmp_path / "support", 5)
    others = [sorted(folder.iterdir())[5] for folder in sorted((root / "test").iterdir())]
    single = others[0]
    result = adapt(checkpoint, support, *others, *others, single, "--batch-norm", "together", "--out",
                   tmp_path / "together.csv")  # batches of 5 ways x 2 queries: the 10, then `single` alone
    assert result.returncode == 0, result.stderr
    predictions = pd.read_csv(tmp_path / "together.csv")
    rows = predictions[predictions["file"] == str(single)].drop(columns=["file"])
    assert len(rows) == 3 and set(predictions["batch_norm"]) == {"together"}
    assert rows.iloc[0].equals(rows.iloc[1]) and not rows.iloc[0].equals(rows.iloc[2])


def test_adapt_refuses_what_the_checkpoint_cannot_take(trained_folder_cell, tmp_path):
    tmp, root = trained_folder_cell
    checkpoint = tmp / "work/folder-conv4-5shot/best_accuracy_mean.pth"
    support = tmp_path / "support"
    shutil.copytree(root / "test", support)
    queries = sorted(sorted(support.iterdir())[0].iterdir())[:2]
    shutil.copytree(root / "val" / sorted(p.name for p in (root / "val").iterdir())[0], support / "extra")
    wrong_ways = adapt(checkpoint, support, *queries)
    assert wrong_ways.returncode == 2 and "holds 6 class folder(s)" in wrong_ways.stderr \
        and "head classifies 5 ways" in wrong_ways.stderr
    shutil.rmtree(support / "extra")
    empty = sorted(support.iterdir())[1]
    for image in empty.iterdir():
        image.unlink()
    no_images = adapt(checkpoint, support, *queries)
    assert no_images.returncode == 2 and f"1 class folder(s) hold no image of their own: {empty} (no image)" in \
        no_images.stderr
    shutil.rmtree(empty)
    shutil.copytree(root / "test" / empty.name, empty)
    broken = sorted(empty.iterdir())[0]
    broken.write_bytes(b"not an image")
    unreadable = adapt(checkpoint, support, *queries)
    assert unreadable.returncode == 2 and f"cannot read image {broken}" in unreadable.stderr


def test_a_16_bit_greyscale_png_reads_as_its_grey_levels_not_white(tmp_path):
    """#38: PIL's convert("RGB") clips 16-bit values at 255, so a microscope's 16-bit PNG became a white image; every
    reader and `fsl adapt` decode through fsl.data.base.open_rgb, which scales by the type's range."""
    import numpy as np
    from PIL import Image

    from fsl.data.base import open_rgb
    values = (np.arange(48 * 48).reshape(48, 48) * 28).astype(np.uint16)  # 0 .. 64,484
    Image.fromarray(values).save(tmp_path / "gray16.png")
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I")
    clipped = np.asarray(Image.open(tmp_path / "gray16.png").convert("RGB"))
    assert (clipped == 255).mean() > 0.9  # what the old reader fed the network
    image = np.asarray(open_rgb(tmp_path / "gray16.png"))
    assert image.shape == (48, 48, 3) and (image[..., 0] == image[..., 2]).all()
    assert np.array_equal(image[..., 0], np.rint(values.astype(np.float64) * 255 / 65535).astype(np.uint8))


def test_a_transparent_image_is_laid_over_white_and_a_phone_photo_stands_upright(tmp_path):
    """#49 WRONG 5: RGBA -> RGB dropped the alpha channel, so black strokes on a transparent background (stored as
    black, alpha 0) became all black. UNCLEAR: EXIF orientation was ignored, so a phone photo reached the model
    sideways; MMFewShot's reader (cv2.imread) applies it, and so does open_rgb now, for every dataset."""
    import numpy as np
    from PIL import Image

    from fsl.data.base import open_rgb
    rgba = np.zeros((20, 30, 4), np.uint8)       # transparent black ...
    rgba[8:12, 5:25] = (0, 0, 0, 255)            # ... but one opaque black stroke
    rgba[0, 0] = (200, 100, 50, 128)             # and one half-transparent pixel
    Image.fromarray(rgba, "RGBA").save(tmp_path / "stroke.png")
    image = np.asarray(open_rgb(tmp_path / "stroke.png"))
    assert (image[8:12, 5:25] == 0).all() and (image[15:, :] == 255).all()
    assert image[0, 0].tolist() == [227, 177, 152]  # 200 * 128/255 + 255 * 127/255, as alpha_composite rounds
    grey = Image.fromarray(rgba[..., 3], "L").convert("LA")
    grey.putalpha(Image.fromarray(rgba[..., 3]))
    grey.save(tmp_path / "grey.png")
    assert (np.asarray(open_rgb(tmp_path / "grey.png"))[15:] == 255).all()
    pixels = np.zeros((10, 40, 3), np.uint8)  # stored landscape, shown portrait (orientation 6: turn 90 cw)
    pixels[:, :5] = 255                        # the stored left edge: the shown top
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    upright = np.asarray(open_rgb(tmp_path / "phone.jpg"))
    assert upright.shape == (40, 10, 3) and upright[:4].mean() > 200 and upright[-10:].mean() < 30


def test_a_class_folder_with_images_and_a_subfolder_of_more_is_refused(tmp_path):
    """#49 UNCLEAR: a class with images of its own and a nested subfolder silently dropped the nested images."""
    from fsl.data import DatasetError
    from fsl.data.folder import class_folder_images
    root = class_folders(tmp_path / "mine", per_class=4)
    klass = sorted((root / "train").iterdir())[0]
    (klass / "more").mkdir()
    shutil.copy(sorted(klass.glob("*.*"))[0], klass / "more" / "extra.png")
    with pytest.raises(DatasetError, match=rf"class folder {klass} holds images of its own and more in a subfolder "
                                           rf"\(e.g. {klass / 'more' / 'extra.png'}\)"):
        class_folder_images(root / "train")


def test_adapt_leaves_support_images_out_of_its_accuracy_and_says_what_a_support_path_is(trained_folder_cell,
                                                                                         tmp_path):
    """#49 WRONG 6: queries that are the support images reported 'accuracy on the 10 queries: 100.00 %'. UNCLEAR: an
    empty support folder suggested train.ways=0; a support path that is a file said 'not found'."""
    tmp, root = trained_folder_cell
    checkpoint = tmp / "work/folder-conv4-5shot/best_accuracy_mean.pth"
    support = support_set(root, tmp_path / "support", 2)
    same = adapt(checkpoint, support, support)
    assert same.returncode == 0, same.stderr
    assert "10 of the 10 queries are support images (the same file contents): left out of the accuracy" in \
        same.stdout and "accuracy on the" not in same.stdout
    (tmp_path / "empty").mkdir()
    empty = adapt(checkpoint, tmp_path / "empty", support)
    assert empty.returncode == 2 and "holds no class folder of images" in empty.stderr and "ways=0" not in \
        empty.stderr
    a_file = sorted(sorted(support.iterdir())[0].iterdir())[0]
    wrong = adapt(checkpoint, a_file, support)
    assert wrong.returncode == 2 and f"support folder {a_file} is a file, not a folder" in wrong.stderr
