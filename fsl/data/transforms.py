"""Image transforms: MMFewShot's test pipeline (`eval_resize_crop`, mmcls's cv2-based Resize and CenterCrop), the
batched crop-and-resize both pipelines use (`crop_resize`: the pixels cv2's bilinear resize reads, `resize_taps`
and `tap_patches`, and its fixed-point arithmetic on them, `blend_taps`), and torchvision's per-image v1 transforms.

fsl does not run these per image during training: the image store (fsl.data.store) keeps `eval_resize_crop`'s output
and the source images at full resolution; for each training crop the host reads only the source pixels its resize
reads (`resize_taps`, fsl.data.store.ImageStore.patches), and fsl.data.augment applies mmcls's training augmentation to whole batches on the training
device, with parameters drawn as `train_transform` (torchvision's) draws them; `train_transform` is the reference
for those draws, not for the pixels (tests/test_mmcls_pixels.py compares the pixels with mmcls's own transforms). Outputs of the full transforms are float32 tensors (3, size, size) normalised with
ImageNet's mean/std on the 0-255 scale, so values lie roughly in [-2.2, 2.7].
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

MEAN_255 = (123.675, 116.28, 103.53)
STD_255 = (58.395, 57.12, 57.375)


class Normalisation(NamedTuple):
    """What the network sees of a stored uint8 pixel p (0-255), per channel: (p - mean) / std. The number of
    channels is len(mean): the stores hold RGB, greyscale datasets use the first channel."""
    mean: tuple[float, ...]
    std: tuple[float, ...]


IMAGENET = Normalisation(MEAN_255, STD_255)  # the protocol's, on RGB
INK = Normalisation((255.0,), (-255.0,))       # greyscale inverted to [0, 1], ink 1: 1 - p / 255 (Omniglot, as
                                               # Finn et al.'s code and learn2learn's benchmark do)


def to_normalised_tensor() -> T.Compose:
    """PIL RGB image -> (3, H, W) float32, (pixel in 0..255 - mean) / std."""
    return T.Compose([T.PILToTensor(), T.ConvertImageDtype(torch.float32), T.Lambda(lambda x: x * 255.0),
                      T.Normalize(MEAN_255, STD_255)])


def train_transform(image_size: int = 84) -> T.Compose:
    """torchvision's RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3), horizontal flip p=0.5, ColorJitter(0.4, 0.4,
    0.4): the parameter draws fsl's augmentation makes (its pixels are mmcls's, fsl.data.augment)."""
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)),
        T.RandomHorizontalFlip(0.5),
        T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4),
        to_normalised_tensor(),
    ])


COEF_SCALE = 2048  # cv2's INTER_RESIZE_COEF_SCALE: its bilinear weights are integers out of 2048


def cv2_taps(start: torch.Tensor, length: torch.Tensor, out: int) -> tuple[torch.Tensor, ...]:
    """cv2.resize's INTER_LINEAR taps along one axis of crops `start` .. `start + length` (B, 1) (long) resized to
    `out` pixels (modules/imgproc/src/resize.cpp): output pixel j reads source pixels i0 and i1 (B, out) with integer
    weights w0 + w1 = 2048 (B, out), at fx = (j + 0.5) x length / out - 0.5 in float32; outside the crop the edge
    pixel alone. No smoothing when shrinking."""
    centre = (torch.arange(out, device=start.device, dtype=torch.float64) + 0.5) * (length.double() / out) - 0.5
    fx = centre.float()
    sx = fx.floor()
    fx, sx = fx - sx, sx.long()
    low, high = sx < 0, sx >= length - 1
    fx = torch.where(low | high, torch.zeros_like(fx), fx)
    sx = torch.where(low, torch.zeros_like(sx), torch.where(high, (length - 1).expand_as(sx), sx))
    w1 = (fx * COEF_SCALE).round_().int()
    w0 = ((1 - fx) * COEF_SCALE).round_().int()
    return start + sx, start + torch.minimum(sx + 1, length - 1), w0, w1


class Taps(NamedTuple):
    """cv2 INTER_LINEAR's reads for crops resized to out_height x out_width (`resize_taps`): rows (B, 2 out_height)
    the source rows [y0 | y1] (long), cols (B, 2 out_width) the source columns [x0 | x1] (long), row_weights (B, 2,
    out_height) and col_weights (B, 2, out_width) their integer weights (int32, w0 + w1 = 2048). Output pixel (i, j)
    reads the four source pixels at rows[i], rows[out_height + i] and cols[j], cols[out_width + j]."""
    rows: torch.Tensor
    cols: torch.Tensor
    row_weights: torch.Tensor
    col_weights: torch.Tensor


def resize_taps(boxes: torch.Tensor, out_height: int, out_width: int | None = None) -> Taps:
    """The taps of boxes (B, 4) = (x1, y1, x2, y2) (x2, y2 exclusive; rounded to whole pixels) cut out of their
    images and resized to out_height x out_width as mmcv.imcrop then mmcv.imresize do (`cv2_taps` per axis)."""
    out_width = out_width or out_height
    boxes = boxes.round().long()
    y0, y1, b0, b1 = cv2_taps(boxes[:, 1:2], boxes[:, 3:4] - boxes[:, 1:2], out_height)
    x0, x1, a0, a1 = cv2_taps(boxes[:, 0:1], boxes[:, 2:3] - boxes[:, 0:1], out_width)
    return Taps(torch.cat([y0, y1], 1), torch.cat([x0, x1], 1), torch.stack([b0, b1], 1), torch.stack([a0, a1], 1))


def blend_taps(patches: torch.Tensor, row_weights: torch.Tensor, col_weights: torch.Tensor) -> torch.Tensor:
    """cv2.resize's INTER_LINEAR on uint8 in its fixed point, from the pixels it reads: patches (B, C, 2 out_height,
    2 out_width) of integer values 0-255, the source pixels at a crop's `Taps` (rows [y0 | y1] x cols [x0 | x1]),
    with their weights (B, 2, out_height) and (B, 2, out_width). The horizontal pass S0 w0 + S1 w1, the vertical pass
    as cv2's SIMD kernel rounds, ((b0 (R0 >> 4)) >> 16 + (b1 (R1 >> 4)) >> 16 + 2) >> 2. Returns float32 (B, C,
    out_height, out_width) of integer values; equal to cv2's but for about 1 value in 2,000, by 1
    (tests/test_mmcls_pixels.py). No gather: the taps were read when the patches were."""
    out_height, out_width = row_weights.shape[-1], col_weights.shape[-1]
    pixels = patches.int()
    a0, a1 = col_weights[:, None, None, 0, :], col_weights[:, None, None, 1, :]
    across = lambda rows: rows[..., :out_width] * a0 + rows[..., out_width:] * a1  # noqa: E731
    top, bottom = across(pixels[:, :, :out_height]), across(pixels[:, :, out_height:])
    b0, b1 = row_weights[:, None, 0, :, None], row_weights[:, None, 1, :, None]
    out = (((b0 * (top >> 4)) >> 16) + ((b1 * (bottom >> 4)) >> 16) + 2) >> 2
    return out.clamp_(0, 255).float()


def tap_patches(images: torch.Tensor, taps: Taps) -> torch.Tensor:
    """The pixels `taps` read from images (B, C, H, W): (B, C, 2 out_height, 2 out_width), two gathers."""
    batch, channels, _, width = images.shape
    rows = images.gather(2, taps.rows[:, None, :, None].expand(batch, channels, -1, width))
    return rows.gather(3, taps.cols[:, None, None, :].expand(batch, channels, rows.shape[2], -1))


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, out_height: int, out_width: int | None = None
                ) -> torch.Tensor:
    """Cut boxes (B, 4) = (x1, y1, x2, y2) (x2, y2 exclusive; rounded to whole pixels) out of images (B, C, H, W)
    of integer values 0-255 and resize each crop to out_height x out_width as mmcls does (mmcv.imcrop, then
    mmcv.imresize: cv2.resize with INTER_LINEAR on uint8): `resize_taps`, `tap_patches`, `blend_taps`. Returns float32
    (B, C, out_height, out_width) of integer values."""
    taps = resize_taps(boxes, out_height, out_width)
    return blend_taps(tap_patches(images, taps), taps.row_weights, taps.col_weights)


def eval_resize_crop(image_size: int = 84):
    """PIL -> PIL RGB: MMFewShot's test pipeline (configs/classification/_base_/meta_test/*: mmcls's
    Resize(size=(int(image_size * 1.15), -1)), then CenterCrop(image_size)): the short side resized to
    int(1.15 x image_size) (96 for 84) and the long side to int(96 x long / short), with cv2's bilinear interpolation
    (`crop_resize`, no smoothing when shrinking); then the centre crop at round((side - size) / 2)."""
    short = int(image_size * 1.15)

    def resize_crop(image: Image.Image) -> Image.Image:
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
        height, width = pixels.shape[1:]
        new_h, new_w = (int(short * height / width), short) if width < height else (short, int(short * width / height))
        box = torch.tensor([[0, 0, width, height]])
        resized = crop_resize(pixels[None], box, new_h, new_w)[0]
        top, left = max(0, int(round((new_h - image_size) / 2))), max(0, int(round((new_w - image_size) / 2)))
        crop = resized[:, top:top + image_size, left:left + image_size]
        return Image.fromarray(crop.permute(1, 2, 0).to(torch.uint8).numpy())
    return resize_crop


def resize_lanczos(image_size: int) -> T.Compose:
    """PIL -> PIL: the whole image resized to image_size x image_size with PIL's LANCZOS filter (Omniglot's
    28x28, as learn2learn's benchmark and Finn et al.'s resize_images.py ask for; see fsl.data.omniglot)."""
    return T.Compose([T.Resize((image_size, image_size), interpolation=T.InterpolationMode.LANCZOS)])


def eval_transform(image_size: int = 84) -> T.Compose:
    """`eval_resize_crop`, then normalise (MMFewShot's test pipeline)."""
    return T.Compose([eval_resize_crop(image_size), to_normalised_tensor()])
