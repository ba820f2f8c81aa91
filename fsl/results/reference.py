"""The target numbers, as data: mean accuracy % and the 95% confidence half-width %.

REFERENCE: MMFewShot's MAML README (../shared/reference/mmfewshot-maml-readme.txt), the 12 cells, (dataset, arch,
shots) -> (mean, ci95) over 2,000 test episodes. MMFewShot calls the half-width "std"; it is 1.96 * std(per-episode
accuracy, ddof=0) / sqrt(2000).

OMNIGLOT: Omniglot, (ways, shots, variant) -> (mean, ci95) over 600 test tasks (1.96 * std / sqrt(600), cbfinn's
main.py). MAML: Finn et al. (ICML 2017), Table 1, "MAML (ours)". FOMAML: Nichol et al. (2018, "On First-Order
Meta-Learning Algorithms"), Table 1, "1st-order MAML + Transduction": their runs of first-order MAML, transductive
(BatchNorm on the query batch) as fsl's are; the MAML paper reports first order for mini-ImageNet only.
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

OMNIGLOT = {
    (5, 1, "maml"): (98.7, 0.4),
    (5, 5, "maml"): (99.9, 0.1),
    (20, 1, "maml"): (95.8, 0.3),
    (20, 5, "maml"): (98.9, 0.2),
    (5, 1, "fomaml"): (98.3, 0.5),
    (5, 5, "fomaml"): (99.2, 0.2),
    (20, 1, "fomaml"): (89.4, 0.5),
    (20, 5, "fomaml"): (97.9, 0.1),
}
OMNIGLOT_SOURCE = {"maml": "Finn et al. 2017, Table 1", "fomaml": "Nichol et al. 2018, Table 1"}


def reference(dataset: str, arch: str, ways: int, shots: int, variant: str = "maml") -> tuple[float, float] | None:
    """The published (mean, ci95) of a cell under an inner-loop variant (fsl.config.variant_label), or None: the
    12 MMFewShot cells are 5-way MAML; Omniglot's are conv4, MAML and FOMAML."""
    if dataset == "omniglot":
        return OMNIGLOT.get((ways, shots, variant)) if arch == "conv4" else None
    return REFERENCE.get((dataset, arch, shots)) if ways == 5 and variant == "maml" else None
