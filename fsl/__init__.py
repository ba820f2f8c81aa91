"""fsl: MAML (Finn et al. 2017) few-shot classification, reproducing MMFewShot's 12 MAML cells and the MAML paper's
Omniglot table.

The subpackages follow the pipeline, data to results:

    config.py   the run's settings: defaults, validation, the protocol's deviations
    data/       datasets, image stores, and the N-way K-shot episodes (data/episodes.py)
    models.py   the backbones (conv4, resnet12) and the classifier head
    maml/       the inner loop and the outer step (MAML, FOMAML, ANIL, Meta-SGD, MAML++)
    device/     where a run computes: the device, torchrun, precision
    train/      meta-training and meta-testing a cell: checkpoints, logs, accuracy
    results/    the CSVs, provenance, the published numbers, tables and plots
    jobs/       whole jobs: the demo, fsl adapt, data preparation, sweeps, Slurm

docs/ has one page per concept; docs/layout.md walks through the modules.
"""
__version__ = "0.2.0"
