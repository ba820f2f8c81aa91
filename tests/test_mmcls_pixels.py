"""fsl's training and test images against mmcls 0.18's own transforms (MMFewShot's MAML pipelines), pixel by pixel
(issue #35): the same images and the same random parameters through both, on mini-ImageNet-lite, CUB-lite (the
crops taken from the originals in the store) and large synthetic photos with fine detail (through a store too).
mmcls runs in the side environment `make fidelity` installs (tests/helpers/mmcls_pipeline.py); without it these
tests skip."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, fixture_root

from fsl.data import load_split
from fsl.data.augment import augment_originals, draw_params, normalise
from fsl.data.base import SplitDataset
from fsl.data.store import ImageStore, from_images, open_store
from fsl.data.transforms import STD_255, eval_resize_crop

SIDE_PYTHON = Path(os.environ.get("FSL_MMFEWSHOT_PYTHON", REPO / ".venv-mmfewshot" / "bin" / "python"))
pytestmark = pytest.mark.skipif(not SIDE_PYTHON.exists(), reason=f"no MMFewShot side environment at {SIDE_PYTHON} "
                                "(`make fidelity` installs it)")
SIZE = 84


def mmcls_outputs(images: list[np.ndarray], params: np.ndarray, tmp_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) pipelines of mmcls on each image with its params row: (N, 3, S, S) float32 each."""
    source, target = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(source, count=len(images), params=params, image_size=SIZE,
             **{f"image_{i}": image for i, image in enumerate(images)})
    subprocess.run([str(SIDE_PYTHON), str(REPO / "tests" / "helpers" / "mmcls_pipeline.py"), str(source),
                    str(target)], check=True, capture_output=True, text=True, cwd=REPO)
    out = np.load(target)
    return (np.stack([out[f"train_{i}"] for i in range(len(images))]),
            np.stack([out[f"test_{i}"] for i in range(len(images))]))


def fsl_train(store: ImageStore, indices: list[int], params: np.ndarray) -> np.ndarray:
    """fsl's batched augmentation of train-kind store originals `indices` with params, as training runs it."""
    return augment_originals(store, np.asarray(indices), params, SIZE).numpy()


def fsl_test(images: list[np.ndarray]) -> np.ndarray:
    from PIL import Image
    crops = [np.asarray(eval_resize_crop(SIZE)(Image.fromarray(image))) for image in images]
    return normalise(torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2)).numpy()


def grey_levels(ours: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    """|difference| in grey levels (0-255) per pixel and channel, from normalised values."""
    return np.abs(ours - theirs) * np.asarray(STD_255, dtype=np.float32).reshape(1, 3, 1, 1)


def check(name: str, ours: np.ndarray, theirs: np.ndarray, jittered: bool = False) -> None:
    """Every value within 1 grey level; with the colour jitter, a value that cv2's resize (its IPP kernel, when
    upscaling) put 1 level off can move further through the truncating colour steps: then 99.5 % within 1 level
    and a mean under 0.01 levels."""
    levels = grey_levels(ours, theirs)
    print(f"\n{name}: max {levels.max():.3f} grey levels, mean {levels.mean():.4f}, "
          f"{(levels > 0.5).mean() * 100:.3f} % of values differ, {(levels > 1.001).mean() * 100:.3f} % by more "
          f"than 1")
    if jittered:
        assert (levels > 1.001).mean() < 0.005 and levels.mean() < 0.01, name
    else:
        assert levels.max() <= 1.001, name


def without_jitter(params: np.ndarray) -> np.ndarray:
    plain = params.copy()
    plain[:, 9:12] = 1.0
    return plain


def check_both_pipelines(name: str, images: list[np.ndarray], store: ImageStore, indices: list[int],
                         params: np.ndarray, tmp_path: Path) -> np.ndarray:
    """mmcls's training images (with and without the colour jitter) and test images of `images`, checked against
    fsl's of the same originals in `store` (`indices`); returns mmcls's test images."""
    train, test = mmcls_outputs(images, params, tmp_path)
    check(f"{name} train", fsl_train(store, indices, params), train, jittered=True)
    check(f"{name} test", fsl_test(images), test)
    plain = without_jitter(params)
    check(f"{name} crop, resize, flip", fsl_train(store, indices, plain), mmcls_outputs(images, plain, tmp_path)[0])
    return test


def sizes_of(images: list[np.ndarray]) -> np.ndarray:
    return np.asarray([image.shape[:2] for image in images])


def fine_photo(height: int = 375, width: int = 500, seed: int = 0) -> np.ndarray:
    """A photo-sized image with detail at every scale: stripes of 1-3 pixels, checks, gradients and noise."""
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    detail = 127 + 60 * np.sin(x * 1.9) * np.cos(y * 2.3) + 40 * ((x // 2 + y // 3) % 2) + 20 * np.sin(x / 40)
    image = np.stack([detail, np.roll(detail, 7, 1) * 0.8 + 30, 255 - detail], -1) + rng.normal(0, 12, (height,
                                                                                                      width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def test_mini_imagenet_train_and_test_images_are_mmcls_within_one_grey_level(tmp_path):
    dataset = load_split("mini-imagenet", fixture_root("mini-imagenet"), "train")
    images = [np.asarray(dataset.load_image(i)) for i in range(0, 60 * 8, 12)]
    torch.manual_seed(0)
    check_both_pipelines("mini-ImageNet", images, from_images(images), list(range(len(images))),
                         draw_params(sizes_of(images)), tmp_path)


def test_cub_crops_from_the_store_are_mmcls_within_one_grey_level(tmp_path):
    """CUB's training crops come from the store's train kind, which keeps the originals at full resolution."""
    dataset = load_split("cub", fixture_root("cub"), "val")
    store = open_store(dataset, "cub", "val", "train", SIZE, tmp_path / "cache", progress=False)
    indices = list(range(0, len(dataset), max(1, len(dataset) // 40)))[:40]
    images = [np.asarray(dataset.load_image(i)) for i in indices]
    assert len({image.shape for image in images}) > 5  # many sizes
    torch.manual_seed(1)
    check_both_pipelines("CUB", images, store, indices, draw_params(store.sizes[indices]), tmp_path)


class Photos(SplitDataset):
    """Photo-sized images as a dataset, so that they go through a real train-kind store."""

    def __init__(self, images: list[np.ndarray], root: Path):
        super().__init__()
        self.images, self.root = images, root
        self.labels, self.class_names = [0] * len(images), ["photo"]

    def load_image(self, index: int):
        from PIL import Image
        return Image.fromarray(self.images[index])

    def source(self, index: int) -> str:
        return f"photo {index}"

    def image_size(self, index: int) -> tuple[int, int]:
        return self.images[index].shape[:2]

    def fingerprint(self) -> str:
        return "photos"


def test_a_photo_sized_image_with_fine_detail_is_mmcls_within_one_grey_level(tmp_path):
    """500 x 375 and 375 x 500, the size of real CUB and ImageNet photos, through a train-kind store: mmcls keeps the
    aliased detail of a shrinking resize (cv2's bilinear does not smooth), and so does fsl now, from the store's
    full-resolution originals; the smoothing resize it replaced is far from it."""
    images = [fine_photo(seed=s) for s in range(10)] + [fine_photo(500, 375, seed=s) for s in (10, 11)]
    store = open_store(Photos(images, tmp_path), "photos", "train", "train", SIZE, tmp_path / "cache", progress=False)
    torch.manual_seed(2)
    test = check_both_pipelines("photo", images, store, list(range(len(images))), draw_params(sizes_of(images)),
                                tmp_path)
    from PIL import Image
    from torchvision import transforms as T
    smoothing = T.Compose([T.Resize(96), T.CenterCrop(SIZE)])  # PIL's antialiased resize, fsl's before #35
    smoothed = np.stack([np.asarray(smoothing(Image.fromarray(image)), np.float32) for image in images])
    mmcls_pixels = test * np.asarray(STD_255, np.float32).reshape(1, 3, 1, 1) + \
        np.asarray((123.675, 116.28, 103.53), np.float32).reshape(1, 3, 1, 1)
    apart = np.abs(mmcls_pixels - smoothed.transpose(0, 3, 1, 2))
    print(f"a smoothing resize is {apart.mean():.1f} grey levels from mmcls on average, {apart.max():.0f} at most")
    assert apart.mean() > 5  # mmcls keeps the aliased detail, and fsl with it (checked above)
