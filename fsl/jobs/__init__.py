"""Whole jobs built on the pipeline: what the command line runs besides training and testing one cell.

    demo.py    `make demo`: the glyphs cell from data to tables
    adapt.py   `fsl adapt`: a trained model labels your own images
    data.py    `fsl data prepare|check|cache`
    sweep.py   `fsl sweep`: the runs not done yet, concurrently on GPU groups
    slurm.py   `fsl slurm`: the same as a Slurm job array
"""
