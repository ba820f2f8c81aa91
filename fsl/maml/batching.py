"""How many tasks to adapt at once: `train.parallel_tasks` and `test.parallel_episodes`, `auto` or a count.

Adapting T tasks together (fsl.models, fsl.maml) turns T small kernel launches into one, which is what a GPU wants,
and holds T tasks' graphs at once, which costs memory. `auto` chooses:
    CPU   the fastest group, timed: the run's own meta-batch (its first episodes at test) in groups of 1, 2, 4, ...
          tasks, each timed twice after a warm-up, until a group is slower than the best so far
          (benchmarks/omniglot_peers.py: Omniglot's tiny tasks run fastest several at a time). Tasks slower than
          SLOW_TASK_S each are compute-bound (conv4 at 84x84: ~4 s): 1, without timing more;
    CUDA  the largest group that fits the device's free memory, from one probe: the peak memory of one task (one
          episode at test), measured on the run's own model and episodes (its second run: the first may hold
          cuDNN's autotuning workspaces). With `deterministic=true`, the device's total memory instead of its free
          memory, which other processes change.
Groups are balanced (8 tasks that fit 5 at a time run as 4 + 4, not 5 + 3). The group size changes a result only by
float rounding (tests/test_variant_reference.py); the resolved size is recorded in the checkpoint, reused on resume
and written in the summary row. Timing depends on the machine's load, so with `deterministic=true` a CPU's `auto` is 1
without timing: two equal commands then give equal bits. For bit-equal reruns elsewhere, set the count.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Callable

import torch

from fsl.device.distributed import device_name

MEMORY_SHARE = 0.8  # of the free memory the groups may take: the rest is headroom for fragmentation
SLOW_TASK_S = 0.25  # CPU: a task that takes this long alone is compute-bound; grouping cannot repay timing groups
SLOWER = 1.1        # CPU: stop timing larger groups once one is this much slower per task than the best


class OutOfMemory(RuntimeError):
    """Even one task (episode) at a time does not fit the device's memory; the message names what and the fixes."""


def halved(group: int, device: torch.device, key: str) -> int:
    """The group size after running out of memory at `group` (half, at least 1), with the freed memory returned to
    the device and a note on stderr; called after the failed attempt's tensors are gone."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    smaller = max(1, group // 2)
    print(f"out of memory on {device_name(device)} with {key}={group}: retrying with {smaller} (the same result "
          f"up to float rounding; kept for the rest of the run)", file=sys.stderr, flush=True)
    return smaller


def balanced_group(total: int, fits: int) -> int:
    """The group size that splits `total` tasks into the fewest groups of at most `fits`, as evenly as possible."""
    fits = max(1, min(total, fits))
    groups = math.ceil(total / fits)
    return math.ceil(total / groups)


_RUN_PEAK: dict[torch.device, int] = {}  # the process's peak before the probes reset torch's counter


def run_peak_bytes(device: torch.device) -> int:
    """The process's peak allocated CUDA memory on `device`, across the probes' resets of torch's peak counter."""
    return max(_RUN_PEAK.get(device, 0), torch.cuda.max_memory_allocated(device))


def peak_bytes(run_one: Callable[[], None], device: torch.device) -> int:
    """Peak CUDA memory `run_one()` allocates beyond what was allocated before it, measured on its second call: the
    first runs the kernels for the first time, and with cudnn_benchmark cuDNN's autotuner then allocates workspaces
    for the algorithms it tries, which a step does not hold (the run's peak so far is kept: `run_peak_bytes`)."""
    run_one()
    torch.cuda.synchronize(device)
    _RUN_PEAK[device] = run_peak_bytes(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run_one()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def free_bytes(device: torch.device, deterministic: bool = False) -> int:
    """Memory the run can still take on `device`: free on the device plus what PyTorch's cache holds unused. With
    `deterministic`, the device's total memory less what this process has allocated: the free memory depends on
    other processes, and two equal commands must choose the same group (the same bits)."""
    free, total = torch.cuda.mem_get_info(device)
    if deterministic:
        return total - torch.cuda.memory_allocated(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def candidate_groups(total: int) -> list[int]:
    """Balanced group sizes 1, 2, 4, ... up to `total` (each at most `total`)."""
    sizes, fits = [], 1
    while fits < 2 * total:
        sizes.append(balanced_group(total, fits))
        fits *= 2
    return sorted(set(sizes))


def fastest_group(run: Callable[[int], None], total: int) -> tuple[int, str]:
    """(the group size with the least CPU time per task, the timings): `run(p)` does the `total` tasks p at a
    time."""
    per_task: dict[int, float] = {}
    for group in candidate_groups(total):
        seconds = []
        try:
            for _ in range(3):  # a warm-up (new shapes), then two timed runs
                start = time.perf_counter()
                run(group)
                seconds.append((time.perf_counter() - start) / total)
                if group == 1 and seconds[0] > SLOW_TASK_S:
                    return 1, (f"auto: 1 on cpu (a task takes {seconds[0]:.2f} s: compute-bound, grouping gains "
                               f"nothing)")
        except torch.cuda.OutOfMemoryError:  # out of memory at this group: no larger group either
            if group == 1:
                raise
            break
        per_task[group] = min(seconds[1:])
        if per_task[group] > SLOWER * min(per_task.values()):
            break
    best = min(per_task, key=per_task.get)
    timings = ", ".join(f"{group}: {1 / s:.0f}" for group, s in per_task.items())
    return best, f"auto: the fastest group on cpu, timed (tasks/s at {timings})"


def resolve(setting: int | str, total: int, device: torch.device, run: Callable[[int], None],
            cap: int | None = None, deterministic: bool = False) -> tuple[int, str]:
    """(the group size for `setting`, why): a count is taken as it is (at most `total`); `auto` (at most `total`
    and `cap`) is on a CPU the fastest `p` for `run(p)`, the work of the `total` tasks p at a time (1, untimed, when
    `deterministic`), and on CUDA what MEMORY_SHARE of the free memory (the total, if `deterministic`) holds of
    `run(1)`'s peak (one task's graph at a time)."""
    if setting != "auto":
        return min(int(setting), total), "set in the config"
    total = min(total, cap or total)
    if device.type != "cuda":
        if deterministic:
            return 1, "auto: 1 on cpu, untimed (deterministic=true: a timed choice would depend on the machine's load)"
        return fastest_group(run, total)
    try:
        per_task = max(peak_bytes(lambda: run(1), device), 1)
    except torch.cuda.OutOfMemoryError as error:
        raise OutOfMemory(f"out of memory on {device_name(device)} probing one task ({error}); even one task's "
                          f"graph does not fit. Fix: precision=bf16 (about half the memory), fewer queries or "
                          f"shots, maml.first_order=true (changes results), or a GPU with more memory") from error
    fits = int(MEMORY_SHARE * free_bytes(device, deterministic) // per_task)
    group = balanced_group(total, fits)
    memory = "the total memory (deterministic=true)" if deterministic else "the free memory"
    return group, (f"auto: {per_task / 2**20:.0f} MiB per task, {fits} fit in {MEMORY_SHARE:.0%} of {memory} of "
                   f"{device_name(device)}")
