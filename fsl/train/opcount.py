"""Count what decides a GPU step's speed, on any device: aten operator calls (each is at least one kernel launch on
a GPU) and the calls that make the host wait for the device (syncs).

    with OpCounter() as ops:
        step()
    ops.total, ops.syncs, ops.by_phase

A sync is an operator whose result the host must read, or whose output size depends on the data:
`aten._local_scalar_dense` (`.item()`, `bool(tensor)`, `float(tensor)`), `nonzero`, `unique*`, `masked_select`,
indexing with a boolean mask, a copy between devices that does not say `non_blocking=True`, and `Tensor.tolist()` /
`Tensor.numpy()` (on a CPU tensor they read memory without any aten call, so the counter wraps them while it is
active, for the thread that entered it). On a CPU a device copy cannot happen (there is no second device); on CUDA,
`torch.cuda.set_sync_debug_mode("error")` catches it instead (tests/test_gpu.py).
"""
from __future__ import annotations

import threading
from collections import Counter
from contextlib import contextmanager
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique",
            "aten._unique2", "aten.unique_dim", "aten.unique_consecutive", "aten.item", "aten.is_nonzero",
            "aten.nonzero_static"}


def op_name(func) -> str:
    """'aten.add' for aten.add.Tensor."""
    return str(func.overloadpacket)


def is_sync(func, args, kwargs) -> bool:
    """Does this call make the host wait for the device? (see the module docstring)"""
    name = op_name(func)
    if name in SYNC_OPS or name.startswith("aten.unique"):
        return True
    if name in ("aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())
    if name in ("aten._to_copy", "aten.copy_"):
        source = args[1] if name == "aten.copy_" else args[0]
        target = args[0].device if name == "aten.copy_" else kwargs.get("device", source.device)
        return source.device != torch.device(target) and not (kwargs.get("non_blocking") or
                                                                (len(args) > 2 and args[2] is True))
    return False


class OpCounter(TorchDispatchMode):
    """Counts every aten call made under it (forward, inner gradients and backward alike), per phase
    (`with ops.phase("name"):`), and records each sync with its phase."""

    def __init__(self):
        super().__init__()
        self.current = "other"
        self.by_phase: Counter[str] = Counter()
        self.by_op: Counter[str] = Counter()
        self.sync_calls: list[tuple[str, str]] = []  # (phase, op)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        previous, self.current = self.current, name
        try:
            yield
        finally:
            self.current = previous

    @property
    def total(self) -> int:
        return sum(self.by_phase.values())

    @property
    def syncs(self) -> int:
        return len(self.sync_calls)

    READS = ("tolist", "numpy")  # Tensor methods that bring values to the host without an aten call on a CPU

    def __enter__(self):
        self.thread = threading.get_ident()
        self.originals = {name: getattr(torch.Tensor, name) for name in self.READS}
        for name, original in self.originals.items():
            setattr(torch.Tensor, name, self._reading(name, original))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self.originals.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)

    def _reading(self, name: str, original):
        def read(tensor, *args, **kwargs):
            if threading.get_ident() == self.thread:
                self.sync_calls.append((self.current, f"Tensor.{name}"))
            return original(tensor, *args, **kwargs)
        return read

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.by_phase[self.current] += 1
        self.by_op[op_name(func)] += 1
        if is_sync(func, args, kwargs):
            self.sync_calls.append((self.current, op_name(func)))
        return func(*args, **kwargs)
