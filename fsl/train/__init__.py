"""Meta-training and meta-testing a cell: the protocol's two steps.

    cell.py         the cell's data: its splits, image stores, training episodes, fixed validation and test episodes
    meta_train.py   step 1: the outer loop, validation-based model selection, checkpoints (`fsl train`)
    checkpoint.py   latest.pth / best_accuracy_mean.pth, resuming, RNG states
    run_log.py      <run_dir>/log.csv and TensorBoard
    accuracy.py     accuracy on fixed episodes (validation and the test both)
    meta_test.py    step 2: the test on the fixed test episodes and its summary row (`fsl test`)
    opcount.py      aten operators and host syncs of a step, counted on any device (tests, benchmarks)
"""
