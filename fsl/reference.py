"""The target numbers: MMFewShot's MAML README (../shared/reference/mmfewshot-maml-readme.txt), as data.

(dataset, arch, shots) -> (mean accuracy %, 95% confidence half-width %) over 2,000 test episodes. MMFewShot calls
the half-width "std"; it is 1.96 * std(per-episode accuracy, ddof=0) / sqrt(2000).
"""
from __future__ import annotations

REFERENCE = {
    ("cub", "conv4", 1): (60.32, 0.50),
    ("cub", "conv4", 5): (77.03, 0.39),
    ("cub", "resnet12", 1): (70.44, 0.55),
    ("cub", "resnet12", 5): (85.50, 0.33),
    ("mini-imagenet", "conv4", 1): (46.76, 0.42),
    ("mini-imagenet", "conv4", 5): (63.88, 0.39),
    ("mini-imagenet", "resnet12", 1): (57.40, 0.47),
    ("mini-imagenet", "resnet12", 5): (72.42, 0.38),
    ("tiered-imagenet", "conv4", 1): (45.56, 0.49),
    ("tiered-imagenet", "conv4", 5): (60.20, 0.43),
    ("tiered-imagenet", "resnet12", 1): (57.63, 0.53),
    ("tiered-imagenet", "resnet12", 5): (72.30, 0.43),
}
