"""The protocol's training augmentation, applied to a whole batch of uint8 images on the training device.

MMFewShot's MAML pipeline (torchvision v1, one PIL image at a time): RandomResizedCrop(84, scale 0.08-1, ratio
3/4-4/3), RandomHorizontalFlip(0.5), ColorJitter(brightness 0.4, contrast 0.4, saturation 0.4), normalise. Here the
random parameters are drawn per image on the CPU with the generator calls of torchvision's `get_params` functions, in
the order the v1 pipeline makes them (so a seeded episode gets the very parameters the v1 pipeline would draw), and
stored as rows of numbers; `augment` then applies them to all images of a meta-batch at once: every crop-and-resize as
torchvision.ops.roi_align computes it (area-averaged bilinear sampling, i.e. antialiased like PIL's resize; as
grid_sample where a crop is not downscaled), the flips, the colour operations in each image's own random order, and
the normalisation. Pixels differ from PIL's by interpolation and rounding only. Everything data-dependent (the order
images are processed in, the groups of images sharing a jitter order, whether a crop is downscaled) is decided on the
host from the parameters (`plan_augmentation`), so `augment` never makes the host wait for the device.

Parameter row per image (PARAMS columns): crop top, left, height, width in the original image's pixels; flip (0/1);
the ColorJitter order (a permutation of 0 brightness, 1 contrast, 2 saturation, 3 hue); the brightness, contrast and
saturation factors.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from fsl.data.transforms import IMAGENET, Normalisation

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


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 1, H, W), ITU-R 601 luma as torchvision's rgb_to_grayscale."""
    r, g, b = images.unbind(1)
    return (0.2989 * r).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(1)


def jitter_(images: torch.Tensor, op: int, factor: torch.Tensor) -> None:
    """Apply ColorJitter operation `op` (0 brightness, 1 contrast, 2 saturation) in place to (B, 3, H, W) images in
    [0, 1], with per-image factors (B,); a factor of 1 leaves an image unchanged. As torchvision's adjust_* for
    float images: brightness scales, contrast blends with the mean grey level, saturation with the grey image, then
    clamp to [0, 1]."""
    factor = factor.view(-1, 1, 1, 1)
    if op == 0:
        images.mul_(factor)
    else:
        grey = grayscale(images)
        other = grey.mean(dim=(1, 2, 3), keepdim=True) if op == 1 else grey
        images.mul_(factor).add_(other * (1 - factor))
    images.clamp_(0, 1)


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
    """ColorJitter(0.4, 0.4, 0.4) in place on (B, 3, H, W) images in [0, 1] with factors (B, 3), each image's
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

    order (B,) host: the input row of each processed image; values (B, 8) float32: crop box (x1, y1, x2, y2) in
    the stored image's pixels, flip (0/1), brightness, contrast, saturation factors, in processing order;
    positions (B,) int64: the output row of each processed image; groups: (start, stop, jitter order) runs;
    downscales: some crop is larger than the output (roi_align's area averaging is needed)."""
    order: np.ndarray
    values: torch.Tensor
    positions: torch.Tensor
    groups: list[tuple[int, int, tuple[int, int, int]]]
    downscales: bool

    def to(self, device: torch.device) -> "AugmentPlan":
        """The plan's tensors on `device` (non-blocking from pinned memory where the device is a GPU)."""
        return self._replace(values=to_device(self.values, device), positions=to_device(self.positions, device))


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`: pinned and copied without blocking the host when `device` is a GPU."""
    if torch.device(device).type != "cuda":
        return tensor
    return (tensor if tensor.is_pinned() else tensor.pin_memory()).to(device, non_blocking=True)


def plan_augmentation(params: np.ndarray, sizes: np.ndarray, stored: np.ndarray, out_size: int) -> AugmentPlan:
    """The plan for images with parameters `params` (B, len(PARAMS)) drawn for their original sizes `sizes` (B, 2)
    = (height, width), stored at sizes `stored` (B, 2) (an original downscaled for the store, fsl.data.store): crop
    boxes scaled from original to stored pixels on each axis."""
    real = jitter_orders(params[:, 5:9])
    order = np.lexsort(real.T[::-1])  # by jitter order (first operation first), stable
    real, params = real[order], torch.from_numpy(params[order]).float()
    scale = torch.from_numpy(stored[order] / sizes[order]).float()  # (B, 2) stored / original, per axis
    top, left = params[:, 0] * scale[:, 0], params[:, 1] * scale[:, 1]
    boxes = torch.stack([left, top, left + params[:, 3] * scale[:, 1], top + params[:, 2] * scale[:, 0]], dim=1)
    positions = torch.from_numpy(order)  # processed image i goes to output row order[i]
    values = torch.cat([boxes, params[:, 4:5], params[:, 9:12]], dim=1)
    extent = boxes.numpy()
    downscales = bool((extent[:, 2:] - extent[:, :2] > out_size).any())
    return AugmentPlan(order, values, positions, order_groups(real), downscales)


def sample_crops(images: torch.Tensor, boxes: torch.Tensor, out_size: int, downscales: bool | None = None
                 ) -> torch.Tensor:
    """Crop boxes (B, 4) = (x1, y1, x2, y2) in pixels of float images (B, 3, S, S) and resize each to out_size: the
    value torchvision.ops.roi_align(aligned=True, sampling_ratio=-1) gives, i.e. ceil(box side / out_size)
    bilinear samples per output pixel and axis, averaged (so a downscaling crop averages every source pixel it
    covers, like PIL's antialiased resize). A box no larger than out_size needs one sample per pixel: that is
    grid_sample's bilinear interpolation at the same points (vectorised and multi-threaded on CPUs, unlike
    roi_align), used for all boxes when none is larger. `downscales`: whether some box is larger, if the caller
    knows (from the host); None: looked up on the device (a sync)."""
    if downscales is None:
        downscales = bool((boxes[:, 2:] - boxes[:, :2] > out_size).any())
    if downscales:
        indexed = torch.cat([torch.arange(len(images), device=images.device, dtype=boxes.dtype)[:, None], boxes], 1)
        return roi_align(images, indexed, out_size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    side = images.shape[-1]
    steps = (torch.arange(out_size, device=images.device, dtype=boxes.dtype) + 0.5) / out_size  # bin centres
    x = boxes[:, 0:1] + steps * (boxes[:, 2:3] - boxes[:, 0:1]) - 0.5   # (B, out) pixel coordinates (aligned)
    y = boxes[:, 1:2] + steps * (boxes[:, 3:4] - boxes[:, 1:2]) - 0.5
    # grid_sample (align_corners=False): pixel p is at (2p + 1) / side - 1; border padding = roi_align's clamping
    grid = torch.stack(torch.broadcast_tensors((2 * x + 1)[:, None, :] / side - 1,
                                               (2 * y + 1)[:, :, None] / side - 1), dim=-1)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def augment(images: torch.Tensor, plan: AugmentPlan, out_size: int, chunk: int | None = 64) -> torch.Tensor:
    """Apply each image's parameters and normalise, without a host sync: every data-dependent choice is in `plan`
    (on `images`' device: `plan.to(device)`).

    images: (B, 3, S, S) uint8, the stored images in the plan's processing order (`plan.order` of the batch);
    returns (B, 3, out_size, out_size) float32, normalised, in the batch's own order. Works `chunk` images at a
    time (None: all at once, as on a GPU): on a CPU, small blocks stay in cache and their memory is reused (fresh
    70 MB tensors cost more in page faults than in arithmetic)."""
    boxes, flips, factors = plan.values[:, :4], plan.values[:, 4], plan.values[:, 5:8]
    out = torch.empty(len(images), 3, out_size, out_size, device=images.device)
    step = chunk or len(images)
    for start in range(0, len(images), step):
        stop = min(start + step, len(images))
        canvases = images[start:stop].to(torch.float32, memory_format=torch.contiguous_format)
        x = sample_crops(canvases, boxes[start:stop], out_size, plan.downscales).div_(255)
        x = torch.where(flips[start:stop].view(-1, 1, 1, 1) > 0, x.flip(-1), x)
        colour_jitter_(x, factors[start:stop], plan.groups, offset=start)
        out.index_copy_(0, plan.positions[start:stop], normalise(x, scale=255.0))
    return out
