"""The protocol's training augmentation, applied to a whole batch of uint8 images on the training device.

MMFewShot's MAML train pipeline is mmcls 0.18's (configs/classification/maml/*: RandomResizedCrop(84), RandomFlip(0.5),
ColorJitter(0.4, 0.4, 0.4), Normalize; mmcls/datasets/pipelines/transforms.py), on uint8 images: the crop is cut out,
then resized with cv2's bilinear interpolation (no smoothing when shrinking); the flip; the three colour operations in
a random order, each through mmcv's adjust_* with its uint8 rounding; the normalisation. `augment` computes the same
on all images of a meta-batch at once (`blend_taps`, `jitter_`), from the source pixels each crop's resize reads, within 1 grey level of mmcls's per-image output
(tests/test_mmcls_pixels.py feeds both the same images and parameters).

The random parameters are fsl's own draws, from torch's CPU generator with the calls of torchvision's `get_params`
functions (`draw_params`): the same distributions as mmcls's draws (a crop of 8-100 % of the area at a log-uniform
aspect ratio in 3/4-4/3, a fair flip, factors uniform in 0.6-1.4, a uniformly random order), but not its streams
(mmcls draws with Python's `random` and NumPy). Everything data-dependent (the order images are processed in, the
groups of images sharing a jitter order) is decided on the host from the parameters (`plan_augmentation`), so
`augment` never makes the host wait for the device.

Parameter row per image (PARAMS columns): crop top, left, height, width in the original image's pixels; flip (0/1);
the ColorJitter order (a permutation of 0 brightness, 1 contrast, 2 saturation, 3 hue, which is off); the
brightness, contrast and saturation factors.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from fsl.data.transforms import IMAGENET, Normalisation, blend_taps, resize_taps

SCALE, RATIO, FLIP, JITTER = (0.08, 1.0), (3 / 4, 4 / 3), 0.5, 0.4
PARAMS = ("top", "left", "height", "width", "flip", "order0", "order1", "order2", "order3", "brightness",
          "contrast", "saturation")

JITTER_RANGE = (1 - JITTER, 1 + JITTER)
LOG_RATIO = [float(v) for v in torch.log(torch.tensor(RATIO))]  # float32 logs, as get_params computes them


def draw_params(sizes: np.ndarray) -> np.ndarray:
    """Random augmentation parameters for images of original sizes (n, 2) = (height, width), drawn from torch's CPU
    generator exactly as torchvision's v1 transforms draw them, image after image: the same generator calls as
    RandomResizedCrop.get_params, RandomHorizontalFlip and ColorJitter.get_params, in their order, into two reused
    one-element tensors (the fresh tensors and size checks of torchvision's functions cost more than the draws;
    tests/test_episodes.py checks the values against torchvision's functions). Returns (n, len(PARAMS)) float64."""
    lo, hi = JITTER_RANGE
    draw, integer = torch.empty(1), torch.empty(1, dtype=torch.int64)
    rows = np.empty((len(sizes), len(PARAMS)))
    for row, (height, width) in zip(rows, sizes.tolist()):
        row[0:4] = resized_crop_params(draw, integer, height, width)
        row[4] = float(draw.uniform_(0, 1).item() < FLIP)          # RandomHorizontalFlip.forward: torch.rand(1) < p
        row[5:9] = torch.randperm(4).numpy()                       # ColorJitter.get_params: the order, then factors
        row[9] = draw.uniform_(lo, hi).item()
        row[10] = draw.uniform_(lo, hi).item()
        row[11] = draw.uniform_(lo, hi).item()
    return rows


def resized_crop_params(draw: torch.Tensor, integer: torch.Tensor, height: int, width: int) -> tuple[int, ...]:
    """torchvision's RandomResizedCrop.get_params(img of height x width, SCALE, RATIO): (top, left, h, w)."""
    area = height * width
    for _ in range(10):
        target_area = area * draw.uniform_(SCALE[0], SCALE[1]).item()
        aspect_ratio = draw.uniform_(LOG_RATIO[0], LOG_RATIO[1]).exp_().item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = integer.random_(0, height - h + 1).item()          # torch.randint(0, n, size=(1,))
            return top, integer.random_(0, width - w + 1).item(), h, w
    in_ratio = float(width) / float(height)                          # fallback: central crop
    if in_ratio < min(RATIO):
        w, h = width, int(round(width / min(RATIO)))
    elif in_ratio > max(RATIO):
        h, w = height, int(round(height * max(RATIO)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


_CONSTANTS: dict[tuple[torch.device, Normalisation], tuple[torch.Tensor, torch.Tensor]] = {}


def normalisation_constants(device: torch.device, normalisation: Normalisation = IMAGENET
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean / std, 1 / std), each (1, C, 1, 1) float32 on `device`, on the 0-255 scale: made once per device (a
    fresh host-to-device copy per batch would be a blocking copy)."""
    key = (torch.device(device), normalisation)
    if key not in _CONSTANTS:
        std = torch.tensor(normalisation.std).view(1, -1, 1, 1)
        mean = torch.tensor(normalisation.mean).view(1, -1, 1, 1)
        _CONSTANTS[key] = ((mean / std).to(device), (1 / std).to(device))
    return _CONSTANTS[key]


def normalise(images: torch.Tensor, scale: float = 1.0, out: torch.Tensor | None = None,
              normalisation: Normalisation = IMAGENET) -> torch.Tensor:
    """(B, C, H, W) pixels on the 0-255 scale / `scale` (uint8 or float) -> float32 (pixel - mean) / std (ImageNet's
    by default, C = 3); written into `out` when given."""
    shift, inverse_std = normalisation_constants(images.device, normalisation)
    return torch.addcmul(-shift, images.float(), inverse_std * scale if scale != 1.0 else inverse_std, out=out)


def luma(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB, integer values 0-255 -> (B, 1, H, W) float64 grey levels exactly as mmcv.bgr2gray
    (cv2.COLOR_BGR2GRAY on uint8) gives them: (4899 R + 9617 G + 1868 B + 8192) >> 14, cv2's fixed point for
    0.299 R + 0.587 G + 0.114 B."""
    r, g, b = images.long().unbind(1)
    return ((4899 * r + 9617 * g + 1868 * b + 8192) >> 14).unsqueeze(1).double()


def jitter_(images: torch.Tensor, op: int, factor: torch.Tensor) -> None:
    """Apply ColorJitter operation `op` (0 brightness, 1 contrast, 2 saturation) in place to (B, 3, H, W) float32
    images of integer values 0-255, with per-image factors (B,) (float64), as mmcls 0.18's ColorJitter applies them
    (its Brightness, Contrast and ColorTransform through mmcv 1.4's adjust_brightness, adjust_contrast and
    adjust_color on uint8 images): brightness x f and contrast's blend with the image's mean grey level (the mean of
    `luma`, rounded) as cv2.addWeighted computes them on float32 images (in double, stored as float32), clamped,
    then truncated to integers (astype(uint8)); saturation's blend with `luma` rounded as cv2.addWeighted does on
    uint8 (in float32). A factor of 1 leaves an image unchanged."""
    factor = factor.view(-1, 1, 1, 1)
    if op == 0:
        images.copy_((images.double() * factor).float().clamp_(0, 255).floor_())
    elif op == 1:
        mean = luma(images).mean(dim=(1, 2, 3), keepdim=True).round_()
        images.copy_((images.double() * factor + mean * (1 - factor)).float().clamp_(0, 255).floor_())
    else:
        alpha, beta = factor.float(), (1 - factor).float()  # cv2 takes both weights as float32
        grey = luma(images).float()
        images.mul_(alpha).add_(grey * beta).round_().clamp_(0, 255)


def jitter_orders(orders: np.ndarray) -> np.ndarray:
    """Each image's order of the three ColorJitter operations it applies: orders (B, 4), a permutation of 0..3 per
    image (3, hue, is off) -> (B, 3)."""
    orders = np.asarray(orders, dtype=np.int64)
    return orders[orders != 3].reshape(-1, 3)


def order_groups(orders: np.ndarray) -> list[tuple[int, int, tuple[int, int, int]]]:
    """Runs of equal jitter orders in `orders` (B, 3), as (start, stop, order): images sorted by their order (see
    `AugmentPlan`) share a run."""
    change = np.flatnonzero((orders[1:] != orders[:-1]).any(1)) + 1
    bounds = [0, *change.tolist(), len(orders)]
    return [(a, b, tuple(orders[a].tolist())) for a, b in zip(bounds[:-1], bounds[1:])]


def colour_jitter_(images: torch.Tensor, factors: torch.Tensor, groups: list[tuple[int, int, tuple[int, int, int]]],
                   offset: int = 0) -> None:
    """ColorJitter(0.4, 0.4, 0.4) in place on (B, 3, H, W) images of integer values 0-255 with factors (B, 3) (`jitter_`), each image's
    operations in its own order: `groups` are runs (start, stop, order) of a processing order sorted by jitter order
    (`AugmentPlan`), and `images` are its rows offset .. offset + B - 1. A run is a slice: no gather, no scatter."""
    for first, last, order in groups:
        a, b = max(first, offset) - offset, min(last, offset + len(images)) - offset
        for op in order if a < b else ():
            jitter_(images[a:b], op, factors[a:b, op])


class AugmentPlan(NamedTuple):
    """Everything data-dependent about augmenting a batch, decided on the host from the drawn parameters (so the
    device never has to report a value back): the batch is processed in `order` (images sorted by their jitter
    order, so that each `groups` run is a slice), and written back to its own rows.

    order (B,) host: the input row of each processed image; rows (B, 2 out) and cols (B, 2 out) host: the source
    pixels each crop's resize reads (fsl.data.transforms.Taps), in processing order; on the device: row_weights (B, 2,
    out) and col_weights (B, 2, out) int32, their weights; values (B, 4) float64: flip (0/1), brightness, contrast,
    saturation factors; positions (B,) int64: the output row of each processed image; groups: (start, stop, jitter
    order) runs."""
    order: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    row_weights: torch.Tensor
    col_weights: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    groups: list[tuple[int, int, tuple[int, int, int]]]

    def to(self, device: torch.device) -> "AugmentPlan":
        """The plan's tensors on `device` (non-blocking from pinned memory where the device is a GPU)."""
        return self._replace(**{key: to_device(getattr(self, key), device) for key in TENSORS})


TENSORS = ("row_weights", "col_weights", "values", "positions")  # AugmentPlan's fields that go to the device


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`: pinned and copied without blocking the host when `device` is a GPU."""
    if torch.device(device).type != "cuda":
        return tensor
    return (tensor if tensor.is_pinned() else tensor.pin_memory()).to(device, non_blocking=True)


def plan_augmentation(params: np.ndarray, out_size: int) -> AugmentPlan:
    """The plan for images with parameters `params` (B, len(PARAMS)) drawn for their original sizes (the train
    store keeps the originals, fsl.data.store): the crop boxes' resize taps (`resize_taps`), computed on the host."""
    real = jitter_orders(params[:, 5:9])
    order = np.lexsort(real.T[::-1])  # by jitter order (first operation first), stable
    real, params = real[order], torch.from_numpy(params[order]).double()
    top, left, height, width = params[:, :4].unbind(1)
    taps = resize_taps(torch.stack([left, top, left + width, top + height], dim=1), out_size)
    positions = torch.from_numpy(order)  # processed image i goes to output row order[i]
    values = torch.cat([params[:, 4:5], params[:, 9:12]], dim=1)
    return AugmentPlan(order, taps.rows.numpy(), taps.cols.numpy(), taps.row_weights, taps.col_weights, values,
                       positions, order_groups(real))


def augment(patches: torch.Tensor, plan: AugmentPlan, out_size: int, chunk: int | None = 64) -> torch.Tensor:
    """Apply each image's parameters and normalise, without a host sync: every data-dependent choice is in `plan`
    (on `patches`' device: `plan.to(device)`).

    patches: (B, 3, 2 out_size, 2 out_size) uint8, the source pixels of each crop's resize (`plan.rows` x
    `plan.cols` of the stored original, fsl.data.store.ImageStore.patches), in the plan's processing order; returns
    (B, 3, out_size, out_size) float32, normalised, in the batch's own order. Works `chunk` images at a time (None:
    all at once, as on a GPU): on a CPU, small blocks stay in cache and their memory is reused (fresh 70 MB tensors
    cost more in page faults than in arithmetic)."""
    flips, factors = plan.values[:, 0], plan.values[:, 1:4]
    out = torch.empty(len(patches), 3, out_size, out_size, device=patches.device)
    step = chunk or len(patches)
    for start in range(0, len(patches), step):
        stop = min(start + step, len(patches))
        x = blend_taps(patches[start:stop], plan.row_weights[start:stop], plan.col_weights[start:stop])
        x = torch.where(flips[start:stop].view(-1, 1, 1, 1) > 0, x.flip(-1), x)
        colour_jitter_(x, factors[start:stop], plan.groups, offset=start)
        out.index_copy_(0, plan.positions[start:stop], normalise(x))
    return out


def augment_originals(store, indices: np.ndarray, params: np.ndarray, out_size: int, chunk: int | None = 64
                      ) -> torch.Tensor:
    """The augmented images (B, 3, out_size, out_size) of originals `indices` (B,) of a train-kind store
    (fsl.data.store.ImageStore) with parameters `params` (B, len(PARAMS)), in their own order, on the CPU: what
    fsl.data.episodes.EpisodeMaker does for a meta-batch."""
    plan = plan_augmentation(params, out_size)
    patches = store.patches(np.asarray(indices)[plan.order], plan.rows, plan.cols)
    return augment(torch.from_numpy(patches).permute(0, 3, 1, 2), plan, out_size, chunk)
