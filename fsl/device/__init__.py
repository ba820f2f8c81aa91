"""Where and how a run computes.

    distributed.py   the device (auto / cpu / cuda[:N]) and its name, torchrun's processes and their collectives
    precision.py     the numeric precision (fp32, tf32, bf16) the device must honour, and deterministic kernels
    memory_count.py  live tensor memory counted by a dispatch mode (any device, the meta device included)
    rehearsal.py     a CUDA rehearsal on a CPU: torch's CUDA API as shipped, only the driver faked (tests, CI)
"""
