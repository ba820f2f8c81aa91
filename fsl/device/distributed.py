"""Several processes, one meta-batch: torch.distributed under torchrun (NCCL on GPUs, Gloo on CPUs).

`torchrun --nproc_per_node P -m fsl train CONFIG` starts P copies of the command. Each copy calls `setup()`, which
joins the process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). Then:

- every outer step, rank r meta-trains on its `meta_batch / P` tasks of the step's meta-batch (global task indices
  step*meta_batch + r*meta_batch/P + j), gradients are summed across ranks with one all-reduce, and every rank
  takes the same Adam step: the tasks and the averaged gradient are those of a single-process run;
- validation and meta-test episodes are dealt out round-robin (episode i to rank i mod P) and the per-episode
  accuracies gathered back in episode order;
- only rank 0 (`is_main()`) prints progress, logs, and writes checkpoints and results.

Without torchrun (no WORLD_SIZE in the environment) every function here is a no-op for one process.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist

from fsl.config import DEVICE, DEVICE_CHOICES, ConfigError


def resolve_device(name: str, key: str = "device") -> torch.device:
    """'auto' -> cuda if available else cpu; 'cuda' -> the current GPU with its index (cuda:0 unless a process chose
    another), as every torch.cuda function that takes a device accepts it; 'cuda...' without a GPU, or an index past
    the GPUs there are, is an error that says so. `key`: how the
    caller's user wrote the setting ('device' for a config key, '--device' for a command-line flag), for the
    messages."""
    setting = (lambda value: f"{key} {value}") if key.startswith("--") else (lambda value: f"{key}={value}")
    if not DEVICE.fullmatch(str(name)):
        raise ConfigError(f"{setting(repr(name))}: choose {DEVICE_CHOICES}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ConfigError(f"{setting(name)} but torch sees no CUDA GPU; use {setting('cpu')} or {setting('auto')}")
    if device.index is None:
        return indexed(device)
    if device.index >= torch.cuda.device_count():
        raise ConfigError(f"{setting(name)} but torch sees {torch.cuda.device_count()} CUDA GPU(s) (indices 0.."
                          f"{torch.cuda.device_count() - 1}); fix: {setting('cuda')} or an index below "
                          f"{torch.cuda.device_count()}")
    return device


def indexed(device: torch.device | str) -> torch.device:
    """`device` with its index: 'cuda' is the current GPU (cuda:0 unless the process chose another), which
    torch.cuda.set_device, and with it a new thread's device, requires; other devices as they are."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank_from_env() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def setup(device_name: str) -> torch.device:
    """This process's device; joins torchrun's process group first if there is one (idempotent).

    device 'auto'/'cuda' under torchrun means cuda:LOCAL_RANK (one GPU per process); 'cpu' uses Gloo."""
    device = resolve_device(device_name)
    if not launched_by_torchrun():
        return device
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"process with LOCAL_RANK {local_rank} but this node has {torch.cuda.device_count()} "
                               f"GPU(s); fix: --nproc_per_node (GPUS=) at most {torch.cuda.device_count()}")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=30),
                                **({"device_id": device} if device.type == "cuda" else {}))
    return device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def tasks_per_rank(meta_batch: int) -> int:
    """meta_batch / P; an error naming the process counts that work when P does not divide the meta-batch."""
    world = world_size()
    if meta_batch % world:
        divisors = [p for p in range(1, meta_batch + 1) if meta_batch % p == 0]
        raise ValueError(f"train.meta_batch={meta_batch} cannot be split evenly across {world} processes; "
                         f"fix: run with --nproc_per_node (GPUS=) in {divisors}, or set train.meta_batch to a "
                         f"multiple of {world}")
    return meta_batch // world


def all_reduce_gradients(parameters: list[torch.Tensor], extra: torch.Tensor | None = None) -> torch.Tensor | None:
    """Sum every parameter's .grad across ranks, and `extra` (the step's loss and accuracy sums) with them: one
    flat all-reduce, the step's only collective. Each rank's gradient is already scaled by 1/(global meta-batch), so
    the sum is the meta-batch mean. Returns `extra` summed (itself for one process)."""
    if world_size() == 1:
        return extra
    grads = [p.grad for p in parameters if p.grad is not None]  # fsl.maml checks for missing ones
    tail = [] if extra is None else [extra.reshape(-1).to(grads[0].dtype)]
    flat = torch.cat([g.reshape(-1) for g in grads] + tail)
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
    return None if extra is None else flat[offset:].view_as(extra).to(extra.dtype)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of `values` (any shape) over ranks; `values` itself for one process."""
    if world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is True on any rank (e.g. one rank received SIGTERM)."""
    if world_size() == 1:
        return flag
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0)


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (pickled; put tensors on the CPU first)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def my_share(count: int) -> range:
    """Indices 0..count-1 this rank handles in a round-robin split: rank, rank + P, rank + 2P, ..."""
    return range(rank(), count, world_size())


def gather_shares(values: Sequence[float], count: int) -> list[float]:
    """Inverse of `my_share`: every rank's values, back in index order 0..count-1, on every rank."""
    if world_size() == 1:
        return list(values)
    shares: list[Any] = [None] * world_size()
    dist.all_gather_object(shares, list(values))
    ordered = [0.0] * count
    for r, share in enumerate(shares):
        for i, value in zip(range(r, count, world_size()), share):
            ordered[i] = value
    return ordered


def device_name(device: torch.device) -> str:
    """The one place that names a device: the GPU's name ('NVIDIA H100 80GB HBM3') or 'cpu xN' (N torch threads)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"


def describe_device(device: torch.device) -> str:
    """The devices of this run as results and benchmarks record them: `device_name`, prefixed by the process count
    under torchrun ('2 x NVIDIA H100 80GB HBM3')."""
    return f"{world_size()} x {device_name(device)}" if world_size() > 1 else device_name(device)


def device_slug(device: torch.device) -> str:
    """`describe_device` as a file-name part: 'cpu-x2', 'nvidia-h100-80gb-hbm3'."""
    return describe_device(device).replace(" ", "-").lower()
