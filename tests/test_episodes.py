"""Image stores, batched augmentation and episodes (#15), on the real-data fixtures."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import learn2learn as l2l
import numpy as np
import pytest
import torch
from conftest import REPO, fixture_root
from PIL import Image
from torchvision import transforms as T

from fsl.data import DatasetError, load_split, store
from fsl.data.augment import PARAMS, augment_originals, colour_jitter_, draw_params, normalise, plan_augmentation
from fsl.data.base import SplitDataset
from fsl.data.episodes import EpisodeDataset, EpisodeMaker, collate_specs, episode_loader, seeded
from fsl.data.transforms import crop_resize, eval_resize_crop, eval_transform, train_transform


@pytest.fixture(scope="module")
def mini_train(tmp_path_factory):
    """mini-ImageNet-lite's train split and its train-kind store (84x84 sources: stored as they are)."""
    dataset = load_split("mini-imagenet", fixture_root("mini-imagenet"), "train")
    return dataset, store.open_store(dataset, "mini-imagenet", "train", "train", 84, tmp_path_factory.mktemp("c"))


def test_train_store_holds_the_decoded_images(mini_train):
    dataset, images = mini_train
    assert images.pixels.shape == (3840 * 84 * 84 * 3,) and images.pixels.dtype == np.uint8
    assert isinstance(images.pixels, np.memmap)  # shared through the page cache, not copied into RAM
    for i in (0, 1234, 3839):
        assert np.array_equal(images.image(i), np.asarray(dataset.load_image(i)))
    assert (images.sizes == 84).all() and images.offsets[1] == 84 * 84 * 3


def test_eval_store_is_the_evaluation_transform(tmp_path):
    dataset = load_split("cub", fixture_root("cub"), "test")
    images = store.open_store(dataset, "cub", "test", "eval", 84, tmp_path)
    assert images.pixels.shape == (685, 84, 84, 3)
    for i in (0, 684):
        assert np.array_equal(images.pixels[i], np.asarray(eval_resize_crop(84)(dataset.load_image(i))))
    maker = EpisodeMaker(images, 5, 1, 15, 84, torch.device("cpu"))
    specs = collate_specs([EpisodeDataset(dataset, 5, 1, 15, seed=0, count=1)[0]])
    episode = maker(specs)
    first = eval_transform(84)(dataset.load_image(int(specs.indices[0, 0])))
    torch.testing.assert_close(episode.support_x[0, 0], first, rtol=0, atol=1e-5)  # as the v1 pipeline, to rounding


def test_cub_train_store_keeps_the_originals_at_full_resolution(tmp_path):
    """Variable-size originals are stored as they are, one after another (mmcls crops the decoded original), with
    their sizes for the crop parameters and their offsets; a crop reads only the pixels its resize reads."""
    dataset = load_split("cub", fixture_root("cub"), "val")
    images = store.open_store(dataset, "cub", "val", "train", 84, tmp_path)
    sizes = store.read_sizes(dataset)
    assert np.array_equal(images.sizes, sizes) and len(set(map(tuple, sizes))) > 1
    assert images.pixels.ndim == 1 and images.pixels.size == (sizes.prod(1) * 3).sum()
    for i in (0, int(np.argmin(sizes[:, 1])), len(dataset) - 1):
        assert np.array_equal(images.image(i), np.asarray(dataset.load_image(i)))
    rows, cols = np.array([[0, 5, 5, 99]]), np.array([[3, 2, 1]])
    assert np.array_equal(images.patches([7], rows, cols)[0], np.asarray(dataset.load_image(7))[rows[0]][:, cols[0]])


def stamp_of(images) -> dict:
    return json.loads(images.path.with_suffix(".json").read_text())


def test_stale_truncated_and_old_stores_are_rebuilt(tmp_path):
    root = tmp_path / "mini"
    shutil.copytree(fixture_root("mini-imagenet"), root)
    cache = tmp_path / "cache"
    dataset = load_split("mini-imagenet", root, "val")
    images = store.open_store(dataset, "mini-imagenet", "val", "eval", 84, cache)
    expected = store.expected_stamp(dataset, "eval", 84)
    base = images.path.with_suffix("")
    assert store.problem(base, expected) is None
    with open(images.path, "r+b") as f:  # truncated
        f.truncate(images.path.stat().st_size - 100)
    assert "truncated" in store.problem(base, expected)
    store.open_store(dataset, "mini-imagenet", "val", "eval", 84, cache)
    assert store.problem(base, expected) is None
    stamp = stamp_of(images)
    images.path.with_suffix(".json").write_text(json.dumps({**stamp, "format": "fsl-image-store-0"}))
    assert "another fsl version" in store.problem(base, expected)
    store.open_store(dataset, "mini-imagenet", "val", "eval", 84, cache)
    image = root / "images" / load_split("mini-imagenet", root, "val").paths[5].name
    Image.open(image).transpose(Image.FLIP_LEFT_RIGHT).save(image)  # the source changed
    dataset = load_split("mini-imagenet", root, "val")
    assert "source changed" in store.problem(base, store.expected_stamp(dataset, "eval", 84))
    rebuilt = store.open_store(dataset, "mini-imagenet", "val", "eval", 84, cache)
    assert np.array_equal(rebuilt.pixels[5], np.asarray(eval_resize_crop(84)(dataset.load_image(5))))


@pytest.mark.parametrize("damage,reason", [
    ("stamp truncated", "stamp .* is unreadable"),
    ("stamp without bytes", "truncated or replaced .* the stamp says None"),
    ("stamp not a mapping", "another fsl version"),
    ("sizes missing", "sizes.npy is missing"),
    ("sizes truncated", "sizes.npy \\(image sizes\\) cannot be read"),
    ("pixel header garbage", "\\.npy \\(pixels\\) cannot be read"),
])
def test_corrupt_stores_are_rebuilt_and_leftovers_removed(tmp_path, damage, reason):
    """Every kind of damage a kill or a disk can leave: found with the file named, rebuilt on the next open (same
    pixels), and the .tmp files of an interrupted build removed."""
    dataset = load_split("mini-imagenet", fixture_root("mini-imagenet"), "val")
    images = store.open_store(dataset, "mini-imagenet", "val", "eval", 84, tmp_path)
    first = np.array(images.pixels[:3])
    base = images.path.with_suffix("")
    stamp_path, sizes_path = images.path.with_suffix(".json"), base.with_name(base.name + ".sizes.npy")
    if damage == "stamp truncated":
        stamp_path.write_text(stamp_path.read_text()[:20])
    elif damage == "stamp without bytes":
        stamp_path.write_text(json.dumps({k: v for k, v in stamp_of(images).items() if k != "bytes"}))
    elif damage == "stamp not a mapping":
        stamp_path.write_text("[1, 2]")
    elif damage == "sizes missing":
        sizes_path.unlink()
    elif damage == "sizes truncated":
        sizes_path.write_bytes(sizes_path.read_bytes()[:40])
    else:  # the right size, a garbled header
        with open(images.path, "r+b") as f:
            f.write(b"\x00" * 64)
    leftover = tmp_path / f".{images.path.name}.abc123.tmp"
    leftover.write_bytes(b"x" * 1000)  # what a kill during a build leaves
    assert re.search(reason, store.problem(base, store.expected_stamp(dataset, "eval", 84)))
    rebuilt = store.open_store(dataset, "mini-imagenet", "val", "eval", 84, tmp_path)
    assert store.problem(base, store.expected_stamp(dataset, "eval", 84)) is None
    assert np.array_equal(np.asarray(rebuilt.pixels[:3]), first) and not leftover.exists()


def test_interrupted_build_leaves_nothing_and_a_bad_image_is_named(tmp_path, monkeypatch):
    dataset = load_split("mini-imagenet", fixture_root("mini-imagenet"), "test")
    real = type(dataset).load_image

    def interrupted(self, index):
        if index == 100:
            raise KeyboardInterrupt
        return real(self, index)
    monkeypatch.setattr(type(dataset), "load_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.open_store(dataset, "mini-imagenet", "test", "eval", 84, tmp_path)
    assert list(tmp_path.iterdir()) == []  # no store, no temporary file, no lock file

    root = tmp_path / "mini"
    shutil.copytree(fixture_root("mini-imagenet"), root)
    monkeypatch.undo()
    bad = root / "images" / load_split("mini-imagenet", root, "test").paths[7].name
    bad.write_bytes(bad.read_bytes()[:400])
    with pytest.raises(DatasetError, match=f"(?s)cannot decode image .*{bad.name}.*fix: replace the file"):
        store.open_store(load_split("mini-imagenet", root, "test"), "mini-imagenet", "test", "eval", 84, tmp_path)


def v1_taskset(dataset, transform):
    """The per-image pipeline before #15: learn2learn loads transform(PIL image) item by item."""
    dataset.transform = transform
    meta = l2l.data.MetaDataset(dataset, indices_to_labels=dataset.indices_to_labels())
    return l2l.data.Taskset(meta, task_transforms=[
        l2l.data.transforms.NWays(meta, n=5), l2l.data.transforms.KShots(meta, k=5 + 16),
        l2l.data.transforms.LoadData(meta), l2l.data.transforms.RemapLabels(meta, shuffle=True),
        l2l.data.transforms.ConsecutiveLabels(meta)])


def test_batched_augmentation_draws_the_v1_parameters_and_gives_its_pixels(mini_train, monkeypatch):
    """A seeded training episode: the same images, crops, flips and colour factors as torchvision's per-image
    pipeline with the same seed; pixels equal up to interpolation and rounding."""
    dataset, images = mini_train
    crops, jitters = [], []
    crop_params, jitter_params = T.RandomResizedCrop.get_params, T.ColorJitter.get_params
    monkeypatch.setattr(T.RandomResizedCrop, "get_params",
                        staticmethod(lambda *a: crops.append(crop_params(*a)) or crops[-1]))
    monkeypatch.setattr(T.ColorJitter, "get_params",
                        staticmethod(lambda *a: jitters.append(jitter_params(*a)) or jitters[-1]))
    with seeded(3, 2):
        taskset = v1_taskset(load_split("mini-imagenet", fixture_root("mini-imagenet"), "train"), train_transform(84))
        x_v1, y_v1 = taskset.get_task(taskset.sample_task_description())
    v1_crops, v1_jitters = list(crops), list(jitters)
    spec = EpisodeDataset(dataset, 5, 5, 16, seed=3, count=1, start=2, image_sizes=images.sizes)[0]
    assert spec.params.shape == (105, len(PARAMS))
    assert np.array_equal(spec.params[:, :4], np.asarray(v1_crops)) and np.array_equal(spec.labels, y_v1.numpy())
    assert np.array_equal(spec.params[:, 5:9], np.stack([j[0].numpy() for j in v1_jitters]))
    assert np.array_equal(spec.params[:, 9:], np.asarray([j[1:4] for j in v1_jitters]))
    episode = EpisodeMaker(images, 5, 5, 16, 84, torch.device("cpu"))(collate_specs([spec]))
    ours = torch.cat([episode.support_x[0].view(5, 5, 3, 84, 84), episode.query_x[0].view(5, 16, 3, 84, 84)], 1)
    difference = (ours.flatten(0, 1) - x_v1).abs()  # normalised units: 1 ~ 57/255 of the pixel range
    print(f"\nbatched vs per-image v1 augmentation: mean |difference| {difference.mean():.4f}, "
          f"95th percentile {difference.quantile(0.95):.4f} (normalised units)")
    assert difference.mean() < 0.03 and difference.quantile(0.95) < 0.1
    flipped = spec.params[:, 4] == 1
    assert 20 < flipped.sum() < 85  # ~half of the 105 images


def test_parameters_are_torchvision_draws_for_any_image_shape():
    """draw_params makes torchvision's own generator calls: the same values and the same generator state after, for
    square, CUB-like and extreme shapes (the last ones reach get_params' central-crop fallback)."""
    rng = np.random.RandomState(0)
    sizes = np.concatenate([np.full((300, 2), 84), rng.randint(20, 500, (300, 2)),
                            np.stack([rng.randint(10, 40, 300), rng.randint(300, 500, 300)], 1)])
    jitter = [0.6, 1.4]
    torch.manual_seed(5)
    expected = []
    for height, width in sizes:
        crop = T.RandomResizedCrop.get_params(torch.empty(0, height, width), [0.08, 1.0], [3 / 4, 4 / 3])
        flip = float(torch.rand(1) < 0.5)
        order, *factors = T.ColorJitter.get_params(jitter, jitter, jitter, None)
        expected.append([*crop, flip, *order.tolist(), *factors[:3]])
    state = torch.get_rng_state()
    torch.manual_seed(5)
    ours = draw_params(sizes)
    assert np.array_equal(ours, np.asarray(expected)) and torch.equal(torch.get_rng_state(), state)
    assert ((ours[-300:, 2] == sizes[-300:, 0]) & (ours[-300:, 1] > 0)).mean() > 0.5  # fallback: full height


def mmcv_jitter(image: np.ndarray, op: int, factor: float) -> np.ndarray:
    """mmcv 1.4's adjust_brightness / adjust_contrast / adjust_color on one (H, W, 3) uint8 RGB image, written out
    in numpy (the reference for fsl.data.augment.jitter_; tests/test_mmcls_pixels.py checks mmcv itself)."""
    x = image.astype(np.float64)
    grey = (4899 * x[..., 0] + 9617 * x[..., 1] + 1868 * x[..., 2] + 8192).astype(np.int64) >> 14  # BGR2GRAY
    if op == 0:
        return np.floor(np.clip((x * factor).astype(np.float32), 0, 255)).astype(np.uint8)
    if op == 1:
        mean = round(grey.sum() / grey.size)
        return np.floor(np.clip((x * factor + mean * (1 - factor)).astype(np.float32), 0, 255)).astype(np.uint8)
    blend = x.astype(np.float32) * np.float32(factor) + grey[..., None].astype(np.float32) * np.float32(1 - factor)
    return np.clip(np.round(blend), 0, 255).astype(np.uint8)


def test_crop_resize_is_cut_then_resized_and_colours_are_mmcv_adjust():
    """The batched operations against their definitions: a crop of the output's size comes back as it is, a crop
    is resized from its own pixels only (cut, then resized: the image outside the box never enters), ColorJitter
    is mmcv's adjust_* in each image's order, and chunking changes nothing."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (24, 3, 120, 120), generator=g, dtype=torch.uint8)
    corner = torch.randint(0, 120 - 84, (24, 2), generator=g)
    boxes = torch.cat([corner, corner + 84], 1).double()
    expected = torch.stack([image[:, y:y + 84, x:x + 84] for image, (x, y) in zip(images, corner.tolist())])
    assert torch.equal(crop_resize(images, boxes, 84), expected.float())
    outside = images.clone()
    outside[:, :, :, :10], outside[:, :, :, 50:] = 0, 255  # only columns 10..49 are the crop's
    box = torch.tensor([[10.0, 5.0, 50.0, 100.0]]).expand(24, 4)
    assert torch.equal(crop_resize(images, box, 84), crop_resize(outside, box, 84))

    x = torch.randint(0, 256, (30, 3, 16, 16), generator=g, dtype=torch.uint8)
    orders = torch.stack([torch.randperm(4, generator=g) for _ in range(30)])
    factors = 0.6 + 0.8 * torch.rand(30, 3, generator=g, dtype=torch.float64)
    expected = []
    for image, order, factor in zip(x.permute(0, 2, 3, 1).numpy(), orders, factors):
        for op in order.tolist():
            image = mmcv_jitter(image, op, factor[op].item()) if op != 3 else image
        expected.append(torch.from_numpy(image).permute(2, 0, 1))
    params = np.zeros((30, len(PARAMS)))
    params[:, 2:4], params[:, 5:9], params[:, 9:12] = 16, orders.numpy(), factors.numpy()
    plan = plan_augmentation(params, 16)
    assert len(plan.groups) <= 24 and sorted(plan.order.tolist()) == list(range(30))
    ours = x[plan.order].float()  # the processing order: one slice per jitter order
    colour_jitter_(ours, plan.values[:, 1:4], plan.groups)
    reference = torch.stack(expected)[plan.order].float()
    assert torch.equal(ours, reference)

    sizes = np.array([[120, 120]] * 24)
    originals = store.from_images(list(images.permute(0, 2, 3, 1).numpy()))
    params = draw_params(sizes)
    torch.testing.assert_close(augment_originals(originals, np.arange(24), params, 84, chunk=5),
                               augment_originals(originals, np.arange(24), params, 84, chunk=24), rtol=0, atol=0)


def test_episode_tensors_and_labels(mini_train):
    dataset, images = mini_train
    specs = collate_specs([EpisodeDataset(dataset, 5, 5, 16, seed=0, count=2, image_sizes=images.sizes)[i]
                           for i in range(2)])
    episode = EpisodeMaker(images, 5, 5, 16, 84, torch.device("cpu"))(specs)
    assert episode.support_x.shape == (2, 25, 3, 84, 84) and episode.query_x.shape == (2, 80, 3, 84, 84)
    assert episode.support_x.dtype == torch.float32 and -2.2 < episode.query_x.mean() < 2.7
    for t in range(2):
        assert sorted(episode.support_y[t].tolist()) == sorted(list(range(5)) * 5)
        assert sorted(episode.query_y[t].tolist()) == sorted(list(range(5)) * 16)
        indices = specs.indices[t]
        assert len(set(indices.tolist())) == 105  # support and query never share an image
        for c in range(5):  # each class block: one dataset class, one head row
            assert len({dataset.labels[i] for i in indices[c * 21:(c + 1) * 21]}) == 1
            assert len(set(specs.labels[t, c * 21:(c + 1) * 21].tolist())) == 1


def test_label_order_is_random_per_task():
    dataset = load_split("mini-imagenet", fixture_root("mini-imagenet"), "val")
    episodes = EpisodeDataset(dataset, 5, 1, 1, seed=0, count=20)
    # items come class by class in dataset-class order; the head row of the first class must vary
    assert len({int(episodes[i].labels[0]) for i in range(20)}) > 1


def test_episodes_are_a_function_of_seed_and_index(mini_train):
    dataset, images = mini_train
    whole = EpisodeDataset(dataset, 5, 1, 2, seed=3, count=4, image_sizes=images.sizes)
    resumed = EpisodeDataset(dataset, 5, 1, 2, seed=3, count=2, start=2, image_sizes=images.sizes)
    torch.manual_seed(123)  # the caller's RNG must not matter, nor be changed
    state = torch.get_rng_state()
    for a, b in zip(whole[2], resumed[0]):
        assert np.array_equal(a, b)
    assert torch.equal(torch.get_rng_state(), state)
    assert not np.array_equal(whole[0].params, whole[1].params)
    in_process = [np.concatenate([f.ravel() for f in batch]) for batch in episode_loader(whole, 2, workers=0)]
    in_workers = [np.concatenate([f.ravel() for f in batch]) for batch in episode_loader(whole, 2, workers=2)]
    assert all(np.array_equal(a, b) for a, b in zip(in_process, in_workers)) and len(in_workers) == 2


def test_workers_send_no_tensor_through_shared_memory(mini_train, monkeypatch):
    """Episode descriptions are numpy arrays pickled through the worker's pipe: a worker that tried to send a
    torch tensor (which goes through /dev/shm) would fail here."""
    def refuse(tensor):
        raise RuntimeError("a tensor was sent through shared memory")
    monkeypatch.setitem(ForkingPickler._extra_reducers, torch.Tensor, refuse)
    dataset, images = mini_train
    episodes = EpisodeDataset(dataset, 5, 5, 16, seed=0, count=4, image_sizes=images.sizes)
    batches = list(episode_loader(episodes, 2, workers=2))
    assert len(batches) == 2 and all(isinstance(f, np.ndarray) for batch in batches for f in batch)
    assert sum(f.nbytes for f in batches[0]) < 30_000  # a meta-batch of 2 is a few KB, not 2 x 2.2 MB of pixels


ORPHAN = """
import sys, time
from pathlib import Path
from fsl.data import load_split, store
from fsl.data.episodes import EpisodeDataset, episode_loader
dataset = load_split("mini-imagenet", Path(sys.argv[1]), "train")
images = store.open_store(dataset, "mini-imagenet", "train", "train", 84, Path(sys.argv[2]), progress=False)
loader = iter(episode_loader(EpisodeDataset(dataset, 5, 5, 16, seed=0, count=400, image_sizes=images.sizes), 8, 1))
next(loader)
print(loader._workers[0].pid, flush=True)
time.sleep(600)
"""


def test_a_loader_worker_exits_when_its_trainer_is_killed_outright(tmp_path):
    """A trainer killed by SIGKILL (the OOM killer, Slurm past its grace time) leaves no loader worker behind, even
    with the worker's result pipe full (4 prefetched meta-batches of ~92 KB): torch's watchdog alone ends the worker's
    loop, then the worker waits forever for its queue's feeder thread (fsl.data.episodes.exit_with_parent)."""
    trainer = subprocess.Popen([sys.executable, "-c", ORPHAN, str(fixture_root("mini-imagenet")), str(tmp_path)],
                               stdout=subprocess.PIPE, text=True, cwd=REPO)
    worker = int(trainer.stdout.readline())
    time.sleep(2)  # the worker fills its pipe
    trainer.kill()
    trainer.wait()

    def alive() -> bool:
        try:
            return Path(f"/proc/{worker}/stat").read_text().split(") ")[1][0] != "Z"  # a zombie has exited
        except FileNotFoundError:
            return False
    deadline = time.monotonic() + 20
    while alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    if alive():
        os.kill(worker, signal.SIGKILL)
        pytest.fail(f"loader worker {worker} outlived its killed trainer by 20 s")


def test_data_cache_cli_builds_every_store(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fsl", "data", "cache", "tiered-imagenet", "--root",
                          str(fixture_root("tiered-imagenet")), "--cache-dir", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO, env={**os.environ}, check=True).stdout
    built = sorted(p.name for p in tmp_path.glob("*.npy") if not p.name.endswith(".sizes.npy"))
    assert [name.split("-")[2] + "-" + name.split("-")[3] for name in built] == \
        ["test-eval84", "train-train84", "val-eval84"]
    assert "MB" in out


def test_crops_of_variable_size_images_map_through_the_canvas(tmp_path):
    """CUB: originals of many sizes stored on one square canvas; crops drawn for the original land on the same
    content (compared with the per-image v1 pipeline on the original images)."""
    dataset = load_split("cub", fixture_root("cub"), "val")
    images = store.open_store(dataset, "cub", "val", "train", 84, tmp_path)
    spec = EpisodeDataset(dataset, 5, 5, 16, seed=1, count=1, image_sizes=images.sizes)[0]
    with seeded(1, 0):
        taskset = v1_taskset(load_split("cub", fixture_root("cub"), "val"), train_transform(84))
        x_v1, _ = taskset.get_task(taskset.sample_task_description())
    episode = EpisodeMaker(images, 5, 5, 16, 84, torch.device("cpu"))(collate_specs([spec]))
    ours = torch.cat([episode.support_x[0].view(5, 5, 3, 84, 84), episode.query_x[0].view(5, 16, 3, 84, 84)], 1)
    difference = (ours.flatten(0, 1) - x_v1).abs()
    print(f"\nCUB canvas: mean |difference| {difference.mean():.4f}, 95th percentile {difference.quantile(0.95):.4f}")
    assert difference.mean() < 0.05


class MadeImages(SplitDataset):
    """A split of images made in the test (one class), for stores of real-size non-square images."""

    def __init__(self, images: list[Image.Image], root):
        super().__init__()
        self.images, self.root = images, root
        self.labels, self.class_names = [0] * len(images), ["made"]

    def load_image(self, index: int) -> Image.Image:
        return self.images[index]

    def source(self, index: int) -> str:
        return f"made image {index}"

    def image_size(self, index: int) -> tuple[int, int]:
        return self.images[index].height, self.images[index].width

    def fingerprint(self) -> str:
        return "made"


def textured(width: int, height: int, seed: int) -> Image.Image:
    """A photo-like test image: smooth shapes plus fine detail on both axes (periods of 3 to 40 px)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    rng = np.random.RandomState(seed)
    channels = []
    for _ in range(3):
        value = 128 + 50 * np.sin(2 * np.pi * (x / rng.uniform(25, 40) + y / rng.uniform(30, 45)))
        value += 35 * np.sin(2 * np.pi * x / rng.uniform(3, 6)) * np.cos(2 * np.pi * y / rng.uniform(3, 6))
        channels.append(value)
    return Image.fromarray(np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8))


def test_crops_of_photo_sized_originals_from_the_store_are_the_originals_crops(tmp_path):
    """CUB-size images (500x375 and 375x500) through the train store (kept at full resolution) and the patches a
    crop's resize reads: exactly the crops cut from the original images and resized (`crop_resize`, mmcls's order:
    tests/test_mmcls_pixels.py compares with mmcls itself). The store of earlier formats kept them downscaled, ~7
    grey levels away."""
    images = [textured(500, 375, 0), textured(375, 500, 1)]
    dataset = MadeImages(images, tmp_path)
    made = store.open_store(dataset, "made", "train", "train", 84, tmp_path / "cache")
    assert made.sizes.tolist() == [[375, 500], [500, 375]]
    torch.manual_seed(0)
    indices = np.repeat([0, 1], 150)
    params = draw_params(made.sizes[indices])
    params[:, 4], params[:, 9:12] = 0, 1.0  # no flip, no colour change: the crop and resize alone
    ours = augment_originals(made, indices, params, 84)
    top, left, height, width = torch.from_numpy(params[:, :4]).double().unbind(1)
    boxes = torch.stack([left, top, left + width, top + height], 1)
    originals = [torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None] for image in images]
    expected = torch.cat([crop_resize(originals[i], boxes[j:j + 1], 84) for j, i in enumerate(indices.tolist())])
    assert torch.equal(ours, normalise(expected))


def numpy_patches(made, indices, rows, cols):
    """The reference of ImageStore.patches: two np.take per crop (the code before #48's native gather)."""
    out = np.empty((len(indices), rows.shape[1], cols.shape[1], 3), np.uint8)
    for patch, index, row, col in zip(out, indices.tolist(), rows, cols):
        np.take(made.image(index).take(row, axis=0), col, axis=1, out=patch)
    return out


def test_the_native_gather_reads_the_bytes_numpy_reads(tmp_path):
    """#48: fsl.data.native's C loop (outside the interpreter lock, the crops split over threads) gives the bytes of
    the numpy loop, for photo-sized originals of both orientations, crops touching every edge, on 1 and 3 threads."""
    from fsl.data import native
    if native.load() is None:
        pytest.skip("no C compiler here: ImageStore.patches uses numpy (the reference itself)")
    made = store.from_images([np.asarray(textured(*size, seed)) for seed, size in enumerate([(500, 375), (375, 500), (7, 5)])])
    rng = np.random.default_rng(0)
    indices = rng.integers(0, 3, 64)
    rows = np.stack([np.sort(rng.integers(0, made.sizes[i, 0], 168)) for i in indices])
    cols = np.stack([np.sort(rng.integers(0, made.sizes[i, 1], 168)) for i in indices])
    rows[:, -1], cols[:, -1] = made.sizes[indices, 0] - 1, made.sizes[indices, 1] - 1  # the last row and column
    expected = numpy_patches(made, indices, rows, cols)
    for threads in (1, 3):
        out = np.zeros_like(expected)
        made.patches(indices, rows, cols, out=out, threads=threads)
        assert np.array_equal(out, expected)
    height, width = made.sizes[2]  # a crop wider than patches.c's FSL_MAX_TAPS columns: numpy reads it
    few, wide = np.sort(rng.integers(0, height, (2, 3))), np.sort(rng.integers(0, width, (2, native.load().max_taps + 1)))
    out = np.zeros((2, 3, wide.shape[1], 3), np.uint8)
    assert not native.patches(made.pixels, made.offsets[[2, 2]], made.sizes[[2, 2], 1], few, wide, out)
    made.patches(np.array([2, 2]), few, wide, out=out)
    assert np.array_equal(out, numpy_patches(made, np.array([2, 2]), few, wide)) and out.any()


def test_84x84_sources_travel_whole_and_give_the_same_episodes(mini_train):
    """#48.3: a crop of an 84x84 source reads 168x168 taps, four times the image; such sources go to a GPU whole
    (tap_patches takes the crops' pixels there) and the episodes are the same bits as from the patches."""
    dataset, made = mini_train
    maker = EpisodeMaker(made, 5, 5, 16, 84, torch.device("cpu"))
    assert not maker.whole  # on a CPU nothing travels: the host reads the patches
    maker.whole = True  # as for a GPU (fsl.device.rehearsal runs the same with device=cuda)
    batch = collate_specs([EpisodeDataset(dataset, 5, 5, 16, seed=0, count=3, image_sizes=made.sizes)[i]
                           for i in range(3)])
    gathered = maker.gather(batch)
    assert gathered.pixels.shape == (315, 84, 84, 3) and gathered.taps is not None
    whole = maker.build(gathered)
    maker.whole = False
    patched = maker.gather(batch)
    assert patched.pixels.shape == (315, 168, 168, 3)
    assert all(torch.equal(a, b) for a, b in zip(whole, maker.build(patched)))
    again = maker(batch)  # a consumed buffer is reused: the same episode
    assert all(torch.equal(a, b) for a, b in zip(whole, again))
