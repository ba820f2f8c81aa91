"""Where and how a run computes.

    distributed.py   the device (auto / cpu / cuda[:N]) and its name, torchrun's processes and their collectives
    precision.py     the numeric precision (fp32, tf32, bf16) the device must honour, and deterministic kernels
"""
