"""The host's share of a training meta-batch in native code: the pixels each crop's resize reads (fsl/data/patches.c).

A protocol meta-batch is 840 crops; reading their source pixels with two np.take per crop took ~170-240 ms of Python
and numpy per meta-batch (the taps of a crop are 3-byte pixels, which numpy copies one by one), capping any GPU at
~38 tasks/s and holding the interpreter lock against the thread that launches the step's kernels (#48). The C loop
reads the same bytes in a few milliseconds, through ctypes, which releases the lock for the call; the crops are split
across `threads` threads.

The library is compiled on first use with the system's C compiler (`cc`, or $CC) into the user's cache
($FSL_CACHE, else $XDG_CACHE_HOME/fsl or ~/.cache/fsl, `native/`), named by the source's hash, under a lock. Where
there is no compiler, `load()` returns None and fsl.data.store falls back to numpy, after one line on stderr that says
so and names the fix.
"""
from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).with_name("patches.c")
_LIBRARY: ctypes.CDLL | None | bool = False  # False: not tried yet
_POOL: ThreadPoolExecutor | None = None


def cache_dir() -> Path:
    root = os.environ.get("FSL_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fsl"
    return Path(root) / "native"


def build(target: Path) -> None:
    """Compile patches.c into the shared library `target` (atomically, under a lock: concurrent processes build it
    once)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            raise OSError("no C compiler (cc) on PATH")
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            subprocess.run([compiler, "-O3", "-shared", "-fPIC", "-o", str(built), str(SOURCE)], check=True,
                           capture_output=True, text=True)
            os.replace(built, target)


def load() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use; None (once noted on stderr) where it cannot be built."""
    global _LIBRARY
    if _LIBRARY is False:
        digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
        target = cache_dir() / f"fsl-patches-{digest}.so"
        try:
            if not target.exists():
                build(target)
            library = ctypes.CDLL(str(target))
            library.fsl_patches.restype = None
            library.fsl_patches.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [ctypes.c_void_p]
            library.max_taps = ctypes.c_int64.in_dll(library, "fsl_max_taps").value  # a crop's columns, at most
            _LIBRARY = library
        except (OSError, subprocess.CalledProcessError) as error:
            detail = getattr(error, "stderr", "") or str(error)
            print(f"fsl: the native gather of training crops could not be built ({detail.strip()[:200]}); numpy "
                  f"gathers them instead, ~10x slower on the host. Fix: install a C compiler (e.g. apt-get install "
                  f"gcc), or set CC", file=sys.stderr, flush=True)
            _LIBRARY = None
    return _LIBRARY or None


def patches(pixels: np.ndarray, offsets: np.ndarray, widths: np.ndarray, rows: np.ndarray, cols: np.ndarray,
            out: np.ndarray, threads: int = 1) -> bool:
    """out (n, R, C, 3) uint8 <- the pixels at rows (n, R) x cols (n, C) of images at byte `offsets` (n,) of width
    `widths` (n,) in the flat uint8 `pixels`; the crops split across `threads` threads. False (nothing written)
    where the kernel is not available, or a crop has more columns than its `fsl_max_taps`."""
    global _POOL
    library = load()
    if library is None:
        return False
    n, R, C = len(offsets), rows.shape[1], cols.shape[1]
    if C > library.max_taps:  # patches.c's FSL_MAX_TAPS: a crop's columns (2 x image_size); numpy reads wider ones
        return False
    assert out.shape == (n, R, C, 3) and out.dtype == np.uint8 and out.flags.c_contiguous, (out.shape, out.dtype)
    offsets, widths = (np.ascontiguousarray(a, dtype=np.int64) for a in (offsets, widths))
    rows, cols = (np.ascontiguousarray(a, dtype=np.int64) for a in (rows, cols))
    assert pixels.dtype == np.uint8 and pixels.ndim == 1 and pixels.flags.c_contiguous

    def run(start: int, stop: int) -> None:
        library.fsl_patches(pixels.ctypes.data, offsets[start:].ctypes.data, widths[start:].ctypes.data,
                            rows[start:].ctypes.data, cols[start:].ctypes.data, stop - start, R, C,
                            out[start:].ctypes.data)
    bounds = np.linspace(0, n, max(1, min(threads, n)) + 1).astype(int)
    if len(bounds) == 2:
        run(0, n)
        return True
    if _POOL is None or _POOL._max_workers < len(bounds) - 1:
        _POOL = ThreadPoolExecutor(max_workers=len(bounds) - 1, thread_name_prefix="fsl-gather")
    for future in [_POOL.submit(run, a, b) for a, b in zip(bounds[:-1], bounds[1:])]:
        future.result()
    return True
