"""`torchrun ... tests/helpers/crash_one_rank.py CRASH_RANK CRASH_STEP fsl-args...`: runs `python -m fsl` with
process CRASH_RANK raising at its CRASH_STEP-th outer step (a stand-in for a rank that dies: OOM, hardware)."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: make the repository importable
import fsl.train.meta_train  # noqa: E402
from fsl.__main__ import main  # noqa: E402

crash_rank, crash_step = int(sys.argv[1]), int(sys.argv[2])
original = fsl.train.meta_train.meta_train_step
steps = 0


def failing_step(*args, **kwargs):
    global steps
    steps += 1
    if int(os.environ["RANK"]) == crash_rank and steps == crash_step:
        raise RuntimeError(f"injected failure on rank {crash_rank} at step {crash_step}")
    return original(*args, **kwargs)


fsl.train.meta_train.meta_train_step = failing_step
sys.exit(main(sys.argv[3:]))
