"""Worked example (docs/extending.md): a backbone, Conv-6 (Chen et al., ICLR 2019, "A closer look at few-shot
classification": six conv4 blocks, max-pooling after the first four only).

A backbone is a function `build(in_channels, norm, options)` that returns the feature extractor for T tasks at once:
its layers are fsl.models' task layers (TaskConv2d: a convolution grouped by task; `norm(channels)`: BatchNorm with
each task's own statistics), in a StepSequential, which hands the inner step to the layers that use it. The head
(a linear layer sized from the features) and the initialisation (model.init) come from fsl.models.build_model.

    python docs/examples/conv6_backbone.py train experiments/glyphs-conv4-1shot.yaml model.arch=conv6
    python docs/examples/conv6_backbone.py test  experiments/glyphs-conv4-1shot.yaml model.arch=conv6

(the run is named glyphs-conv6-1shot). tests/test_extending.py checks that each task's features depend on its own
images only and runs a tiny cell through this script.
"""
from __future__ import annotations

import sys
from typing import Callable

from torch import nn

from fsl.config import ModelConfig
from fsl.models import StepSequential, TaskConv2d, register_backbone


def conv6(in_channels: int, norm: Callable[[int], nn.Module], options: ModelConfig,
          channels: int = 64) -> StepSequential:
    """6 x [3x3 conv (padding 1) -> BN -> ReLU], max-pool 2 after the first 4: 84x84 -> 64x5x5, 20x20 -> 64x1x1."""
    layers: list[nn.Module] = []
    for block in range(6):
        layers += [TaskConv2d(in_channels, channels, 3, padding=1), norm(channels), nn.ReLU()]
        layers += [nn.MaxPool2d(2)] if block < 4 else []
        in_channels = channels
    return StepSequential(*layers)


register_backbone("conv6", conv6)

if __name__ == "__main__":
    from fsl.__main__ import main
    sys.exit(main())
