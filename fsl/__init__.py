"""fsl: MAML (Finn et al. 2017) few-shot classification, reproducing MMFewShot's 12 MAML cells.

data -> episodes -> models -> maml (inner loop) -> accuracy, train (+ checkpoint, run_log) / evaluate -> results /
report. The README's "Layout" section says what each module holds.
"""
__version__ = "0.2.0"
