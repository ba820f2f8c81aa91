"""fsl: MAML (Finn et al. 2017) few-shot classification, reproducing MMFewShot's 12 MAML cells.

data -> episodes -> models -> maml (inner loop) -> train / evaluate -> results / report
"""
__version__ = "0.2.0"
