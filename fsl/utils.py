"""Small shared helpers: seeding, device selection, atomic file writes, git commit lookup."""
from __future__ import annotations

import os
import random
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's `random` (learn2learn draws episodes with it), NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; 'cuda...' without a GPU is an error that says so."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name} but torch sees no CUDA GPU; use device=cpu or device=auto")
    return device


def check_writable(folder: str | Path, key: str) -> None:
    """Refuse, naming the config key, a folder this process cannot create or write a file in (read-only, not a
    folder, no permission): found before training, not at its first checkpoint or result."""
    from fsl.config import ConfigError  # local: utils is imported by config's users, config imports no torch
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".fsl-write-check-"):
            pass
    except OSError as error:
        raise ConfigError(f"{key}: cannot write into {folder} ({error.strerror or error}); fix: {key}=<a folder "
                          f"you can write>") from None


def write_atomic(path: str | Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` then rename tmp_path onto `path`, so readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def git_commit(*paths: str | Path) -> str:
    """Last commit touching `paths` (the whole repository if none), with '+dirty' if they have local changes;
    'unknown' outside a git checkout."""
    try:
        args = ["--", *map(str, paths)] if paths else []
        commit = subprocess.run(["git", "log", "-1", "--format=%H", *args], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", *args], capture_output=True, text=True,
                               check=True).stdout.strip()
        return (commit or "uncommitted") + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
