"""MMFewShot's image pipelines, run by mmcls 0.18's own transforms on given images and given random parameters.

Run with the side environment's Python (`make fidelity` installs .venv-mmfewshot):
    .venv-mmfewshot/bin/python tests/helpers/mmcls_pipeline.py IN.npz OUT.npz

IN holds `count`, image_<i> (H, W, 3) uint8 RGB, and params (count, len(fsl.data.augment.PARAMS)) as fsl draws
them, image_size. OUT holds train_<i> and test_<i>, (3, S, S) float32 normalised RGB: the train pipeline of
configs/classification/maml/*/maml_*.py (RandomResizedCrop, RandomFlip, ColorJitter, Normalize) with the crop box,
flip, colour order and factors of params row i, and the test pipeline of configs/classification/_base_/meta_test/*
(Resize(size=(int(S * 1.15), -1)), CenterCrop(S), Normalize). The random draws are replaced by the given values:
RandomResizedCrop.get_params returns the row's box; RandomFlip gets flip_prob 1 or 0; ColorJitter is what its
__call__ builds after its draws (Brightness, Contrast, ColorTransform with prob 1, magnitude factor - 1 and no
random negation, composed in the row's order).
"""
import sys

import numpy as np

sys.modules.setdefault("matplotlib.blocking_input", type(sys)("matplotlib.blocking_input"))
sys.modules["matplotlib.blocking_input"].BlockingInput = type("BlockingInput", (), {})
from mmcls.datasets.pipelines import transforms as T  # noqa: E402
from mmcls.datasets.pipelines.auto_augment import Brightness, ColorTransform, Contrast  # noqa: E402
from mmcls.datasets.pipelines.compose import Compose  # noqa: E402

NORM = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)


def train(image_bgr: np.ndarray, row: np.ndarray, size: int) -> np.ndarray:
    top, left, height, width = (int(v) for v in row[:4])
    crop = T.RandomResizedCrop(size)
    crop.get_params = lambda **_: (top, left, top + height - 1, left + width - 1)  # (ymin, xmin, ymax, xmax)
    flip = T.RandomFlip(flip_prob=float(row[4]), direction="horizontal")
    ops = {0: Brightness, 1: Contrast, 2: ColorTransform}
    jitter = [ops[int(op)](magnitude=float(row[9 + int(op)]) - 1, prob=1.0, random_negative_prob=0.0)
              for op in row[5:9] if int(op) != 3]
    pipeline = Compose([crop, flip, *jitter, T.Normalize(**NORM)])
    return pipeline({"img": image_bgr, "img_fields": ["img"]})["img"]


def test(image_bgr: np.ndarray, size: int) -> np.ndarray:
    pipeline = Compose([T.Resize(size=(int(size * 1.15), -1)), T.CenterCrop(crop_size=size), T.Normalize(**NORM)])
    return pipeline({"img": image_bgr, "img_fields": ["img"]})["img"]


def main(source: str, target: str) -> None:
    data = np.load(source)
    size, out = int(data["image_size"]), {}
    for i in range(int(data["count"])):
        bgr = np.ascontiguousarray(data[f"image_{i}"][..., ::-1])  # mmcv loads BGR (LoadImageFromFile)
        out[f"train_{i}"] = train(bgr.copy(), data["params"][i], size).transpose(2, 0, 1)
        out[f"test_{i}"] = test(bgr.copy(), size).transpose(2, 0, 1)
    np.savez(target, **out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
