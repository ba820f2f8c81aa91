"""The protocol's training augmentation, applied to a whole batch of uint8 images on the training device.

MMFewShot's MAML pipeline (torchvision v1, one PIL image at a time): RandomResizedCrop(84, scale 0.08-1, ratio
3/4-4/3), RandomHorizontalFlip(0.5), ColorJitter(brightness 0.4, contrast 0.4, saturation 0.4), normalise. Here the
random parameters are drawn per image on the CPU with the generator calls of torchvision's `get_params` functions, in
the order the v1 pipeline makes them (so a seeded episode gets the very parameters the v1 pipeline would draw), and
stored as rows of numbers; `augment` then applies them to all images of a meta-batch at once: every crop-and-resize as
torchvision.ops.roi_align computes it (area-averaged bilinear sampling, i.e. antialiased like PIL's resize; as
grid_sample where a crop is not downscaled), the flips, the colour operations in each image's own random order, and
the normalisation. Pixels differ from PIL's by interpolation and rounding only.

Parameter row per image (PARAMS columns): crop top, left, height, width in the original image's pixels; flip (0/1);
the ColorJitter order (a permutation of 0 brightness, 1 contrast, 2 saturation, 3 hue); the brightness, contrast and
saturation factors.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from fsl.data.transforms import MEAN_255, STD_255

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


def normalise(images: torch.Tensor, scale: float = 1.0, out: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 3, H, W) pixels on the 0-255 scale / `scale` (uint8 or float) -> float32 (pixel - mean) / std, ImageNet's;
    written into `out` when given."""
    std = torch.tensor(STD_255, device=images.device).view(1, 3, 1, 1)
    shift = (torch.tensor(MEAN_255, device=images.device).view(1, 3, 1, 1) / std)
    return torch.addcmul(-shift, images.float(), scale / std, out=out)


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


def colour_jitter_(images: torch.Tensor, orders: torch.Tensor, factors: torch.Tensor) -> None:
    """ColorJitter(0.4, 0.4, 0.4) in place on (B, 3, H, W) images in [0, 1]: each image's operations in its own
    order, orders (B, 4) a permutation of 0..3 per image (3, hue, is off), factors (B, 3). Images that share an
    order are processed together."""
    real = orders[orders != 3].view(-1, 3)                 # each image's order of the three operations it applies
    keys = real[:, 0] * 9 + real[:, 1] * 3 + real[:, 2]
    for key in keys.unique().tolist():
        chosen = (keys == key).nonzero().squeeze(1)
        group = images[chosen]
        for op in (key // 9, key // 3 % 3, key % 3):
            jitter_(group, op, factors[chosen, op])
        images[chosen] = group


def sample_crops(images: torch.Tensor, boxes: torch.Tensor, out_size: int) -> torch.Tensor:
    """Crop boxes (B, 4) = (x1, y1, x2, y2) in pixels of float images (B, 3, S, S) and resize each to out_size: the
    value torchvision.ops.roi_align(aligned=True, sampling_ratio=-1) gives, i.e. ceil(box side / out_size)
    bilinear samples per output pixel and axis, averaged (so a downscaling crop averages every source pixel it
    covers, like PIL's antialiased resize). A box no larger than out_size needs one sample per pixel: that is
    grid_sample's bilinear interpolation at the same points (vectorised and multi-threaded on CPUs, unlike
    roi_align), used for all boxes when none is larger."""
    if bool((boxes[:, 2:] - boxes[:, :2] > out_size).any()):
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


def augment(images: torch.Tensor, params: torch.Tensor, sizes: torch.Tensor, out_size: int,
            chunk: int = 64) -> torch.Tensor:
    """Apply each image's parameters and normalise.

    images: (B, 3, S, S) uint8, each an original image of size `sizes` (B, 2) = (height, width) stored as an S x S
    canvas (an anisotropic resize; the identity where the original is S x S); params: (B, len(PARAMS)) from
    `draw_params`. Returns (B, 3, out_size, out_size) float32, normalised. Works `chunk` images at a time: on a CPU,
    small blocks stay in cache and their memory is reused (fresh 70 MB tensors cost more in page faults than in
    arithmetic)."""
    canvas = images.shape[-1]
    params, sizes = params.to(images.device, torch.float32), sizes.to(images.device, torch.float32)
    scale_y, scale_x = canvas / sizes[:, 0], canvas / sizes[:, 1]
    top, left = params[:, 0] * scale_y, params[:, 1] * scale_x
    boxes = torch.stack([left, top, left + params[:, 3] * scale_x, top + params[:, 2] * scale_y], dim=1)
    out = torch.empty(len(images), 3, out_size, out_size, device=images.device)
    step = chunk if images.device.type == "cpu" else len(images)  # a GPU takes the whole batch at once
    for start in range(0, len(images), step):
        part = slice(start, start + step)
        canvases = images[part].to(torch.float32, memory_format=torch.contiguous_format)
        x = sample_crops(canvases, boxes[part], out_size).div_(255)
        flipped = params[part, 4].nonzero().squeeze(1)
        x[flipped] = x[flipped].flip(-1)
        colour_jitter_(x, params[part, 5:9].long(), params[part, 9:12])
        normalise(x, scale=255.0, out=out[part])
    return out
