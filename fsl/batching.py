"""How many tasks to adapt at once: `train.parallel_tasks` and `test.parallel_episodes`, `auto` or a count.

Adapting T tasks together (fsl.models, fsl.maml) turns T small kernel launches into one, which is what a GPU wants,
and holds T tasks' graphs at once, which costs memory. `auto` chooses:
    CPU   1: the CPU is compute-bound, batching gains nothing there and costs memory (~1.1 GB per conv4 task at 84x84
          in flight, second order);
    CUDA  the largest group that fits the device's free memory, from one probe: the peak memory of one task (one
          episode at test), measured on the run's own model and episodes; groups are balanced (8 tasks that fit 5 at
          a time run as 4 + 4, not 5 + 3).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from fsl.distributed import device_name

MEMORY_SHARE = 0.8  # of the free memory the groups may take: the rest is headroom for fragmentation


def balanced_group(total: int, fits: int) -> int:
    """The group size that splits `total` tasks into the fewest groups of at most `fits`, as evenly as possible."""
    fits = max(1, min(total, fits))
    groups = math.ceil(total / fits)
    return math.ceil(total / groups)


def peak_bytes(run_one: Callable[[], None], device: torch.device) -> int:
    """Peak CUDA memory `run_one()` allocates beyond what was allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run_one()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def free_bytes(device: torch.device) -> int:
    """Memory the run can still take on `device`: free on the device plus what PyTorch's cache holds unused."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def resolve(setting: int | str, total: int, device: torch.device, run_one: Callable[[], None],
            cap: int | None = None) -> tuple[int, str]:
    """(the group size for `setting`, why): a count is taken as it is (at most `total`); `auto` is 1 on a CPU and,
    on CUDA, what MEMORY_SHARE of the free memory holds of `run_one`'s peak (one task's work), at most `total` (and
    `cap`)."""
    if setting != "auto":
        return min(int(setting), total), "set in the config"
    if device.type != "cuda":
        return 1, f"auto: 1 on {device.type} (compute-bound: batching gains nothing there)"
    per_task = max(peak_bytes(run_one, device), 1)
    fits = int(MEMORY_SHARE * free_bytes(device) // per_task)
    group = balanced_group(min(total, cap or total), fits)
    return group, (f"auto: {per_task / 2**20:.0f} MiB per task, {fits} fit in {MEMORY_SHARE:.0%} of the free "
                   f"memory of {device_name(device)}")
