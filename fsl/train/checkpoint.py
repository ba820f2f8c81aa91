"""Checkpoints of a run directory: what is saved, how a run resumes, and how a test loads the model back.

    <run_dir>/latest.pth              everything needed to continue (periodically, at validation, on SIGINT/SIGTERM)
    <run_dir>/best_accuracy_mean.pth  the weights with the best mean validation accuracy so far
    <run_dir>/train.lock              held by the one trainer of the directory (`RunDirLock`)

A checkpoint is a dict: model, rates (learned inner rates or None), optimizer, config (fsl.config.to_dict), rng
(every RNG state), and the `TrainState` fields at its top level. Writes are atomic.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import random
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fsl.config import Config, from_dict, to_dict
from fsl.data.episodes import EPISODE_STREAMS, SEEDED, SHARED_STREAMS
from fsl.device import distributed
from fsl.maml import InnerRates, batching, build_learner, make_fused
from fsl.results import provenance
from fsl.results.files import write_atomic
from fsl.train.cell import cell_split


@dataclass
class TrainState:
    """The counters of a run that a checkpoint carries besides the weights."""
    tasks_done: int = 0                  # training tasks whose meta-gradient has been applied
    best_val_mean: float = -1.0          # best mean validation accuracy so far, %
    best_val_tasks: int = 0              # tasks_done when it was reached (the best checkpoint's)
    window: list = field(default_factory=lambda: [0.0, 0.0, 0])  # unlogged [loss sum, accuracy sum, tasks]
    train_seconds: float = 0.0           # wall time of the outer steps, validation excluded
    tasks_per_s: float | None = None     # tasks_done / train_seconds at the last save
    peak_memory_mb: float | None = None  # peak GPU memory of the run (CUDA only)
    parallel_tasks: int | None = None    # train.parallel_tasks as resolved on this device (or halved: out of memory)
    parallel_tasks_setting: str | None = None  # the train.parallel_tasks it was resolved from
    parallel_episodes: int | None = None  # test.parallel_episodes as resolved for validation
    parallel_episodes_setting: str | None = None


class Checkpoints:
    """latest.pth and best_accuracy_mean.pth of `cfg.run_dir` for one run's model, rates and optimizer."""

    def __init__(self, cfg: Config, model: nn.Module, rates: InnerRates | None, optimizer: torch.optim.Optimizer,
                 device: torch.device):
        self.cfg, self.model, self.rates, self.optimizer, self.device = cfg, model, rates, optimizer, device
        self.latest, self.best = cfg.run_dir / "latest.pth", cfg.run_dir / "best_accuracy_mean.pth"
        self.tested = tested_checkpoint(cfg)
        self.data = data_identity(cfg)

    def resume(self) -> TrainState:
        """Restore latest.pth if there is one (after fsl.results.provenance.check_resume); under torchrun rank 0 reads it and
        sends it to the others (no shared disk needed), and a fresh start sends rank 0's initial weights."""
        main = distributed.is_main()
        restart = ("move it away to start this run afresh (best_accuracy_mean.pth beside it is not used for "
                   "resuming), or restore it from a copy")
        checkpoint = load_checkpoint(self.latest, fix=restart) if main and self.latest.exists() else None
        checkpoint = distributed.broadcast_from_main(checkpoint)
        if checkpoint is None:
            if distributed.world_size() > 1:
                for module in (self.model, self.rates):
                    if module is not None:
                        module.load_state_dict(distributed.broadcast_from_main(
                            {k: v.cpu() for k, v in module.state_dict().items()}))
            return TrainState()
        provenance.check_resume(from_dict(checkpoint["config"]), self.cfg, self.latest, checkpoint["tasks_done"])
        check_streams(checkpoint, self.latest)
        check_data(checkpoint, self.data, self.latest)
        self.model.load_state_dict(checkpoint["model"])
        if self.rates is not None:
            self.rates.load_state_dict(checkpoint["rates"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        make_fused(self.optimizer)
        set_rng_states(checkpoint["rng"])
        state = TrainState(**{f.name: checkpoint[f.name] for f in fields(TrainState) if f.name in checkpoint})
        if main:
            best = (f"best validation {state.best_val_mean:.2f}% at task {state.best_val_tasks}"
                    if state.best_val_mean >= 0 else "no validation yet")
            print(f"resuming from {self.latest} at task {state.tasks_done} ({best})", flush=True)
        return state

    def save(self, state: TrainState, best: bool = False) -> None:
        """Write latest.pth (or, with `best`, best_accuracy_mean.pth) from rank 0, with the run's speed and peak GPU
        memory so far."""
        if not distributed.is_main():
            return
        state.tasks_per_s = state.tasks_done / max(state.train_seconds, 1e-9)
        if self.device.type == "cuda":
            peak = batching.run_peak_bytes(self.device) / 2**20
            state.peak_memory_mb = max(state.peak_memory_mb or 0.0, peak)
        save_checkpoint(self.best if best else self.latest, self.model, self.rates, self.optimizer, self.cfg,
                        {**asdict(state), "data_identity": self.data})


def data_identity(cfg: Config) -> dict:
    """What the run trains and selects on, independent of where it is stored: a hash of the train and val splits'
    class names and images per class (the same data in another folder, or on another machine, is the same), and
    the folder it was read from, for messages."""
    digest = hashlib.sha256()
    for split in ("train", "val"):
        dataset = cell_split(cfg, split)
        counts = dataset.images_per_class()
        digest.update("\n".join(f"{split}/{name}:{counts.get(c, 0)}" for c, name in enumerate(dataset.class_names))
                      .encode())
    return {"root": str(cfg.data_root), "splits": digest.hexdigest()[:16]}


def check_data(checkpoint: dict, data: dict, path: Path) -> None:
    """Refuse to resume a run on other data than it was trained on (any dataset; checkpoints written before #38
    carry no identity and are not checked)."""
    stored = checkpoint.get("data_identity")
    if stored and stored["splits"] != data["splits"]:
        raise CheckpointError(f"{path} was trained on the data under {stored['root']}, but data.root={data['root']} "
                              f"holds other classes or images (its train/val splits differ): resuming would mix two "
                              f"class splits and select the best weights on another validation set. fix: "
                              f"data.root={stored['root']} (or a complete copy of it), or start afresh in another "
                              f"work_dir")


def check_streams(checkpoint: dict, path: Path) -> None:
    """Refuse to resume a run whose training episodes were drawn from other streams than this fsl draws
    (fsl.data.episodes.EPISODE_STREAMS; checkpoints written before #36 carry none: SHARED_STREAMS)."""
    streams = checkpoint.get("episode_streams", SHARED_STREAMS)
    if streams != EPISODE_STREAMS:
        raise CheckpointError(f"{path} was trained on the '{streams}' episode streams (before #36: episode i of "
                              f"every split from (seed, i)); this fsl draws '{EPISODE_STREAMS}' streams, so a "
                              f"resume would mix two task sequences. Fix: test it as it is (fsl test), or move it "
                              f"away and train the run afresh")


def tested_checkpoint(cfg: Config) -> Path:
    """The checkpoint `fsl test` takes by default (test.weights): <run_dir>/best_accuracy_mean.pth, the protocol's
    validation-selected weights, or <run_dir>/latest.pth, the final weights (the MAML paper's Omniglot test)."""
    return cfg.run_dir / ("latest.pth" if cfg.test.weights == "final" else "best_accuracy_mean.pth")


def save_checkpoint(path: Path, model: nn.Module, rates: InnerRates | None, optimizer: torch.optim.Optimizer,
                    cfg: Config, state: dict) -> None:
    """Everything a resume or a test needs: weights, learned inner rates, optimizer, config, RNG states, counters."""
    with SEEDED:  # the RNGs' own states, not those an episode producer has seeded for a moment (fsl.data.episodes)
        rng = rng_states()
    checkpoint = {"model": model.state_dict(), "rates": rates.state_dict() if rates is not None else None,
                  "optimizer": optimizer.state_dict(), "config": to_dict(cfg), "rng": rng,
                  "episode_streams": EPISODE_STREAMS, **state}
    try:
        write_atomic(path, lambda tmp: torch.save(checkpoint, tmp))
    except (OSError, RuntimeError) as error:  # torch reports a full disk as "enforce fail at inline_container.cc"
        raise CheckpointWriteError(f"cannot write {path} ({type(error).__name__}: {str(error).splitlines()[0]}); "
                                   f"is its disk full or read-only? {path.name} as it was before is unchanged. "
                                   f"Fix: free space (df -h {path.parent}), then rerun to resume") from error


def seed_everything(seed: int) -> None:
    """Seed Python's `random` (learn2learn draws episodes with it), NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

def rng_states() -> dict:
    """The host's random states. Not CUDA's: fsl draws every random number on the host (episodes, augmentation
    parameters), so a GPU's generators hold nothing a resume needs, and a checkpoint written where more GPUs were
    visible would not restore where fewer are."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_states(states: dict) -> None:
    """Restore `rng_states()`; a checkpoint's "cuda" entry (written before #47) is ignored."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])


class CheckpointError(ValueError):
    """A file given as a checkpoint is not one fsl wrote; the message names it and the fix."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, read-only); the previous one is intact."""


CHECKPOINT_FIX = "pass a checkpoint `fsl train` wrote: <work_dir>/<run>/best_accuracy_mean.pth or latest.pth"


def load_checkpoint(path: str | Path, fix: str = CHECKPOINT_FIX) -> dict:
    """The checkpoint dict at `path`, its tensors on the CPU (the model's load_state_dict copies them to its device;
    the RNG states must stay CPU tensors; a checkpoint from a GPU loads where there is none); FileNotFoundError or
    CheckpointError naming the file, the problem and `fix`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}\n  fix: train first with "
                                f"`python -m fsl train <config>`, or pass the path of best_accuracy_mean.pth")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint; fix: {fix}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated, garbage, text, CSV: torch and pickle raise many types for them
        raise CheckpointError(f"{path} cannot be read as a checkpoint ({type(error).__name__}: "
                              f"{str(error).splitlines()[0][:200]}): truncated, or not a file fsl wrote; fix: {fix}"
                              ) from error
    if not isinstance(checkpoint, dict) or not {"config", "model"} <= set(checkpoint):
        raise CheckpointError(f"{path} is a torch file but not an fsl checkpoint (it has no config and model); "
                              f"fix: {fix}")
    return checkpoint


def load_checkpoint_model(path: str | Path, requested: Config | None,
                          device: torch.device | str) -> tuple[nn.Module, InnerRates | None, dict, Config]:
    """The model and learned rates of a checkpoint written by `fsl train`, its checkpoint dict, and the config to
    test it with: the checkpoint's own settings plus the test-time and run settings of `requested`
    (fsl.results.provenance.meta_test_config), or the checkpoint's own config alone if `requested` is None."""
    checkpoint = load_checkpoint(path)
    trained = from_dict(checkpoint["config"])
    cfg = trained if requested is None else provenance.meta_test_config(trained, requested, path)
    model, rates = build_learner(cfg, device)
    model.load_state_dict(checkpoint["model"])
    if rates is not None:
        rates.load_state_dict(checkpoint["rates"])
    return model, rates, checkpoint, cfg


def trained_tasks(checkpoint_path: Path, checkpoint: dict) -> int:
    """Tasks the run behind a checkpoint completed: latest.pth's count where it sits beside it (the best checkpoint
    is written mid-run), else the checkpoint's own."""
    latest = checkpoint_path.parent / "latest.pth"
    if latest.exists() and latest.resolve() != checkpoint_path.resolve():
        return int(torch.load(latest, map_location="cpu", weights_only=False)["tasks_done"])
    return int(checkpoint["tasks_done"])


class RunDirBusy(RuntimeError):
    """Another process is training in this run directory."""


class RunDirLock:
    """One trainer per run directory: an exclusive lock on <run_dir>/train.lock, held while training, naming the pid
    that holds it. A second trainer on the same directory is refused (its log rows and checkpoints would
    interleave with the first's)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "train.lock"

    def __enter__(self) -> "RunDirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            raise RunDirBusy(f"{self.path.parent} is being trained by another process (pid {holder}); two "
                             f"trainers on one run directory would interleave their logs and checkpoints. Fix: "
                             f"wait for it (or stop it: it resumes later), or train elsewhere (work_dir=...)")
        self.file.seek(0)
        self.file.truncate()
        self.file.write(str(os.getpid()))
        self.file.flush()
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()
