"""Image transforms of the protocol (MMFewShot's MAML pipelines), as torchvision's per-image v1 transforms.

fsl does not run these per image during training: the image store (fsl.data.store) keeps `eval_resize_crop`'s output
and the source images, and fsl.data.augment applies the training augmentation to whole batches on the training
device, with parameters drawn exactly as `train_transform` draws them. These definitions are the reference the tests
and benchmarks compare with. Outputs of the full transforms are float32 tensors (3, size, size) normalised with
ImageNet's mean/std on the 0-255 scale, so values lie roughly in [-2.2, 2.7].
"""
from __future__ import annotations

from typing import NamedTuple

import torch
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
    """RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3), horizontal flip p=0.5, ColorJitter(0.4, 0.4, 0.4)."""
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)),
        T.RandomHorizontalFlip(0.5),
        T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4),
        to_normalised_tensor(),
    ])


def eval_resize_crop(image_size: int = 84) -> T.Compose:
    """PIL -> PIL: resize the short side to 96/84 of `image_size` (96 for 84), keep the aspect, CenterCrop(size)."""
    return T.Compose([T.Resize(round(image_size * 96 / 84)), T.CenterCrop(image_size)])


def resize_lanczos(image_size: int) -> T.Compose:
    """PIL -> PIL: the whole image resized to image_size x image_size with PIL's LANCZOS filter (Omniglot's
    28x28, as learn2learn's benchmark and Finn et al.'s resize_images.py ask for; see fsl.data.omniglot)."""
    return T.Compose([T.Resize((image_size, image_size), interpolation=T.InterpolationMode.LANCZOS)])


def eval_transform(image_size: int = 84) -> T.Compose:
    """`eval_resize_crop`, then normalise."""
    return T.Compose([eval_resize_crop(image_size), to_normalised_tensor()])
