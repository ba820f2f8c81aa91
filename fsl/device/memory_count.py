"""Live tensor memory, counted by a dispatch mode: what a GPU's caching allocator would count as allocated.

`LiveTensors` sees every tensor that an operator returns while it is active (in the threads that entered it) and keeps
a weak reference to its storage; the bytes of the storages still alive are the "allocated" memory, and their maximum
over the operators so far is the peak. Storages are counted once however many views share them, and a storage kept
alive only by autograd's saved tensors still counts (the weak reference is to the C++ storage, not to a Python
object). Allocations made outside an operator (the model's parameters, a batch made before) are not counted: call
`count(tensors)` for those.

Works on any device, the meta device included (sizes without data: `benchmarks/step_memory.py`), and is what
fsl.device.rehearsal reports as a faked GPU's allocated memory.
"""
from __future__ import annotations

import threading
from typing import Iterable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensors(TorchDispatchMode):
    """Counts live storage bytes: `allocated` (now) and `peak` (bytes), over the tensors operators return."""

    def __init__(self, limit: int | None = None) -> None:
        """`limit`: bytes past which an operator's outputs raise torch.cuda.OutOfMemoryError, as a GPU's allocator
        does (fsl.device.rehearsal's faked GPU); None: no limit."""
        super().__init__()
        self.limit = limit
        self.lock = threading.Lock()
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}  # storage address -> (weak ref, bytes)
        self.allocated = 0  # bytes; until freed storages are forgotten (_purge), an upper bound
        self.peak = 0
        self.purge_at = 1024  # storages held past which freed ones are forgotten

    def count(self, tensors: Iterable) -> None:
        """Count `tensors` (any nesting of them) as allocated, e.g. a model's parameters made before the mode."""
        with self.lock:
            self._purge()
            self._add_all(tensors)

    def reset_peak(self) -> None:
        with self.lock:
            self._purge()
            self.peak = self.allocated

    def current(self) -> int:
        with self.lock:
            self._purge()
            return self.allocated

    def _add_all(self, tensors) -> None:
        """Count the storages of `tensors` not counted yet, then the peak.

        Freed storages are forgotten lazily, since forgetting walks every storage counted: until then `allocated` is
        an upper bound, so they need forgetting only where it would set a new peak or pass the limit, or where the
        storages held have doubled. The peak and the refusals are those of forgetting before every operator (a
        storage's address is not reused while its weak reference is held), at a fraction of the cost."""
        for leaf in tree_leaves(tensors):
            if isinstance(leaf, torch.Tensor):
                storage = leaf.untyped_storage()
                key = storage._cdata
                if key not in self.storages:
                    self.storages[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.allocated += storage.nbytes()
        if self.allocated > self.peak or (self.limit is not None and self.allocated > self.limit) \
                or len(self.storages) > self.purge_at:
            self._purge()
        self.peak = max(self.peak, self.allocated)

    def _purge(self) -> None:
        """Forget the storages that have been freed."""
        dead = [key for key, (ref, _) in self.storages.items() if ref.expired()]
        for key in dead:
            self.allocated -= self.storages.pop(key)[1]
        self.purge_at = 2 * len(self.storages) + 1024

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        with self.lock:
            self._add_all(out)
            over = self.limit is not None and self.allocated > self.limit
            if over:
                for leaf in tree_leaves(out):  # the allocation fails: its outputs never existed
                    if isinstance(leaf, torch.Tensor):
                        entry = self.storages.pop(leaf.untyped_storage()._cdata, None)
                        self.allocated -= entry[1] if entry else 0
        if over:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (faked): {func} would take the allocated memory "
                                              f"past the device's {self.limit / 2**20:.0f} MiB")
        return out
