"""The protocol's training augmentation, applied to a whole batch of uint8 images on the training device.

MMFewShot's MAML pipeline (torchvision v1, one PIL image at a time): RandomResizedCrop(84, scale 0.08-1, ratio
3/4-4/3), RandomHorizontalFlip(0.5), ColorJitter(brightness 0.4, contrast 0.4, saturation 0.4), normalise. Here the
random parameters are drawn per image on the CPU by torchvision's own `get_params` functions, in the order the v1
pipeline draws them (so a seeded episode gets the very parameters the v1 pipeline would draw), and stored as rows of
numbers; `augment` then applies them to all images of a meta-batch at once: one roi_align for every crop-and-resize
(area-averaged bilinear sampling, i.e. antialiased like PIL's resize), one flip, the colour operations in each image's
own random order, and the normalisation. Pixels differ from PIL's by interpolation and rounding only.

Parameter row per image (PARAMS columns): crop top, left, height, width in the original image's pixels; flip (0/1);
the ColorJitter order (a permutation of 0 brightness, 1 contrast, 2 saturation, 3 hue); the brightness, contrast and
saturation factors.
"""
from __future__ import annotations

import numpy as np
import torch
from torchvision import transforms as T
from torchvision.ops import roi_align

from fsl.data.transforms import MEAN_255, STD_255

SCALE, RATIO, FLIP, JITTER = (0.08, 1.0), (3 / 4, 4 / 3), 0.5, 0.4
PARAMS = ("top", "left", "height", "width", "flip", "order0", "order1", "order2", "order3", "brightness",
          "contrast", "saturation")


def draw_params(sizes: np.ndarray) -> np.ndarray:
    """Random augmentation parameters for images of original sizes (n, 2) = (height, width), drawn from torch's CPU
    generator exactly as torchvision's v1 transforms draw them, image after image. Returns (n, len(PARAMS)) float64."""
    jitter = (1 - JITTER, 1 + JITTER)
    rows = np.empty((len(sizes), len(PARAMS)))
    for row, (height, width) in zip(rows, sizes):
        shape_only = torch.empty(0, int(height), int(width))  # get_params reads only the size
        row[0:4] = T.RandomResizedCrop.get_params(shape_only, list(SCALE), list(RATIO))
        row[4] = float(torch.rand(1) < FLIP)                   # RandomHorizontalFlip.forward
        order, brightness, contrast, saturation, _ = T.ColorJitter.get_params(jitter, jitter, jitter, None)
        row[5:9] = order.numpy()
        row[9:12] = brightness, contrast, saturation
    return rows


def normalise(images: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """(B, 3, H, W) pixels on the 0-255 scale / `scale` (uint8 or float) -> float32 (pixel - mean) / std, ImageNet's.
    """
    std = torch.tensor(STD_255, device=images.device).view(1, 3, 1, 1)
    shift = (torch.tensor(MEAN_255, device=images.device).view(1, 3, 1, 1) / std)
    return torch.addcmul(-shift, images.float(), scale / std)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 1, H, W), ITU-R 601 luma as torchvision's rgb_to_grayscale."""
    r, g, b = images.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's _blend for float images: factor * image + (1 - factor) * other, clamped to [0, 1]."""
    factor = factor.view(-1, 1, 1, 1)
    return (factor * images + (1 - factor) * other).clamp_(0, 1)


COLOUR_OPS = {
    0: lambda x, f: (f.view(-1, 1, 1, 1) * x).clamp_(0, 1),                                 # brightness
    1: lambda x, f: blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), f),           # contrast
    2: lambda x, f: blend(x, grayscale(x), f),                                              # saturation
}


def augment(images: torch.Tensor, params: torch.Tensor, sizes: torch.Tensor, out_size: int) -> torch.Tensor:
    """Apply each image's parameters and normalise.

    images: (B, 3, S, S) uint8, each an original image of size `sizes` (B, 2) = (height, width) stored as an S x S
    canvas (an anisotropic resize; the identity where the original is S x S); params: (B, len(PARAMS)) from
    `draw_params`. Returns (B, 3, out_size, out_size) float32, normalised."""
    canvas = images.shape[-1]
    params, sizes = params.to(images.device, torch.float32), sizes.to(images.device, torch.float32)
    scale_y, scale_x = canvas / sizes[:, 0], canvas / sizes[:, 1]
    top, left, height, width = params[:, 0] * scale_y, params[:, 1] * scale_x, params[:, 2] * scale_y, \
        params[:, 3] * scale_x
    boxes = torch.stack([torch.arange(len(images), device=images.device, dtype=torch.float32), left, top,
                         left + width, top + height], dim=1)  # (B, 5): image, x1, y1, x2, y2 in canvas pixels
    # sampling_ratio=-1: ceil(box side / out_size) bilinear samples per output pixel and axis, averaged, so a
    # downscaling crop averages every source pixel it covers (antialiasing), an upscaling one is plain bilinear
    x = roi_align(images.float().div_(255), boxes, out_size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    flipped = params[:, 4].nonzero().squeeze(1)
    x[flipped] = x[flipped].flip(-1)
    for position in range(4):  # ColorJitter applies its operations in a random order per image
        op_ids = params[:, 5 + position].long()
        for op, apply in COLOUR_OPS.items():
            chosen = (op_ids == op).nonzero().squeeze(1)
            if len(chosen):
                x[chosen] = apply(x[chosen], params[chosen, 9 + op])
    return normalise(x, scale=255.0)
