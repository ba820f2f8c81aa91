"""Numeric precision of a run, as one named setting (`precision` in the config) that the device must honour.

    fp32  IEEE float32 everywhere. On CUDA this switches off TF32, which PyTorch enables for cuDNN convolutions by
          default on Ampere and newer GPUs (so "fp32" there is stricter than a default PyTorch run).
    tf32  CUDA, compute capability >= 8.0: convolutions and matmuls in TensorFloat-32 (10-bit mantissa inputs, float32
          accumulation); weights, gradients and the optimizer stay float32.
    bf16  autocast to bfloat16 for convolutions and matmuls (weights and optimizer stay float32); CUDA GPUs that
          support bfloat16, or the CPU.

A setting the device cannot honour is refused with the fix, never silently ignored. `deterministic=true` adds
deterministic kernels (`apply_precision`); it is recorded with the precision ("fp32+deterministic").
"""
from __future__ import annotations

import contextlib
import os
from typing import ContextManager

import torch

from fsl.config import ConfigError
from fsl.device.distributed import device_name


def check_precision(precision: str, device: torch.device) -> None:
    """Raise ConfigError if `device` cannot run `precision`."""
    if precision == "tf32":
        if device.type != "cuda":
            raise ConfigError(f"precision=tf32 is a CUDA setting (TensorFloat-32 tensor cores) but this run is on "
                              f"{device.type}; fix: precision=fp32")
        major, _ = torch.cuda.get_device_capability(device)
        if major < 8:
            raise ConfigError(f"precision=tf32 needs an Ampere or newer GPU (compute capability >= 8.0); "
                              f"{device_name(device)} is {major}.x; fix: precision=fp32")
    if precision == "bf16" and device.type == "cuda" and not native_bf16(device):
        raise ConfigError(f"precision=bf16 needs bfloat16 arithmetic in hardware (compute capability >= 8.0); "
                          f"{device_name(device)} is {torch.cuda.get_device_capability(device)[0]}.x and would only "
                          f"emulate it, slower than fp32; fix: precision=fp32")


def native_bf16(device: torch.device) -> bool:
    """Whether the GPU `device` (not the current one) computes in bfloat16 natively: Ampere (8.0) and newer.
    torch.cuda.is_bf16_supported() also counts emulation (V100, T4) and reads the current device."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def apply_precision(precision: str, device: torch.device, cudnn_benchmark: bool = False,
                    deterministic: bool = False) -> None:
    """Set the process-wide backend flags for `precision` on `device` (after `check_precision`), and deterministic
    kernels if asked: torch.use_deterministic_algorithms, cuDNN's deterministic algorithms, and the workspace
    setting cuBLAS needs for deterministic matmuls (CUBLAS_WORKSPACE_CONFIG=:4096:8, read when cuBLAS starts: set
    before the first matmul, unless the environment sets it)."""
    check_precision(precision, device)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
        torch.backends.cudnn.benchmark = cudnn_benchmark
        torch.backends.cudnn.deterministic = deterministic


def autocast(precision: str, device: torch.device) -> ContextManager:
    """The context the forward passes run in: bf16 autocast, or nothing."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def describe_precision(precision: str, device: torch.device, cudnn_benchmark: bool = False,
                       deterministic: bool = False) -> str:
    """What the summary row records, e.g. 'tf32', 'fp32+cudnn_benchmark', 'fp32+deterministic'."""
    return precision + ("+cudnn_benchmark" if cudnn_benchmark and device.type == "cuda" else "") \
        + ("+deterministic" if deterministic else "")


def honoured_precisions(device: torch.device) -> list[str]:
    """The settings `device` can run: fp32 everywhere; tf32 on Ampere+; bf16 where CUDA supports it."""
    if device.type != "cuda":
        return ["fp32"]
    major, _ = torch.cuda.get_device_capability(device)
    return ["fp32"] + (["tf32"] if major >= 8 else []) + (["bf16"] if native_bf16(device) else [])
