"""Meta-training (step 1 of the protocol): MAML outer loop with validation-based model selection.

Writes into `cfg.run_dir` (= <work_dir>/<cell>):
    config.yaml               the resolved config
    log.csv                   one row per training window and per validation
    latest.pth                everything needed to continue (periodically, at validation, and on SIGINT/SIGTERM)
    best_accuracy_mean.pth    the weights with the best mean validation accuracy so far
Rerunning continues from latest.pth. Training episode i is a pure function of (seed, i) (see fsl.episodes), so a
resumed run sees exactly the tasks an uninterrupted run would, and ends with the same weights.
"""
from __future__ import annotations

import csv
import fcntl
import math
import os
import shutil
import signal
import time
from contextlib import closing, nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from fsl import batching, distributed, schedule
from fsl.config import Config, ConfigError, dump_yaml, from_dict, to_dict
from fsl.episodes import Episode, EpisodeDataset, EpisodeMaker, EpisodeStream, RankShare, episode_loader
from fsl.evaluate import cell_split, cell_store, ci95, evaluate, fixed_episodes, test_group
from fsl.maml import (InnerLoop, build_learner, chunks, make_fused, meta_optimizer, meta_parameters,
                      meta_train_step, named_meta_parameters, task_meta_gradient)
from fsl.precision import apply_precision, autocast
from fsl.provenance import check_resume
from fsl.results import TRAIN_LOG, train_log_path
from fsl.utils import rng_states, seed_everything, set_rng_states, write_atomic, write_text_atomic

LOG_COLUMNS = list(TRAIN_LOG)


class TrainingError(RuntimeError):
    """Training cannot go on (NaN loss, out of memory); the message says where and what to do."""


def save_checkpoint(path: Path, model, rates, optimizer, cfg: Config, state: dict) -> None:
    """Everything a resume or a test needs: weights, learned inner rates, optimizer, config, RNG states, counters."""
    checkpoint = {"model": model.state_dict(), "rates": rates.state_dict() if rates is not None else None,
                  "optimizer": optimizer.state_dict(), "config": to_dict(cfg), "rng": rng_states(), **state}
    write_atomic(path, lambda tmp: torch.save(checkpoint, tmp))


class RunLog:
    """<run_dir>/log.csv, one row per training window and per validation (LOG_COLUMNS), and, with
    train.tensorboard, the same numbers as TensorBoard scalars in <run_dir>/tb at step = tasks done:
    train/loss, train/accuracy, train/tasks_per_s, val/accuracy, val/ci95.

    Resuming at task t drops what was logged after t (rows of the interrupted run that will be written again)."""

    SCALARS = {"train": ("loss", "accuracy", "tasks_per_s"), "val": ("accuracy", "ci95")}

    def __init__(self, run_dir: Path, tensorboard: bool, resume_at: int = 0):
        self.path = run_dir / "log.csv"
        if resume_at:
            self.truncate(resume_at)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported here: tensorboard is only needed for it
            self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=resume_at + 1 if resume_at else None)

    def write(self, row: dict) -> None:
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow(row)
        if self.writer is not None:
            for name in self.SCALARS[row["split"]]:
                self.writer.add_scalar(f"{row['split']}/{name}", row[name], row["tasks"])
            self.writer.flush()

    def truncate(self, tasks_done: int) -> None:
        if not self.path.exists():
            return
        with open(self.path, newline="") as f:
            rows = [row for row in csv.DictReader(f) if int(row["tasks"]) <= tasks_done]

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
                writer.writeheader()
                writer.writerows(rows)
        write_atomic(self.path, write)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked between outer steps, so latest.pth is written before exiting. Ctrl-C
    and Slurm signal the whole process group: the loader workers ignore both (fsl.episodes), the trainer owns them."""

    def __init__(self):
        self.signal: int | None = None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame) -> None:
        if self.signal is not None:  # second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


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
            raise TrainingError(f"{self.path.parent} is being trained by another process (pid {holder}); two "
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


def crossed(tasks_done: int, step_tasks: int, every: int) -> bool:
    """True if the last `step_tasks` tasks crossed a multiple of `every`."""
    return tasks_done // every > (tasks_done - step_tasks) // every


class StepWindow:
    """The outer steps since the last read, their numbers still on the device: each step's STEP_STATS tensor and
    its task range. `read` brings them to the host in one sync (once per log window, validation or checkpoint),
    and stops the run if a step was skipped for a non-finite loss or meta-gradient."""

    def __init__(self):
        self.steps: list[tuple[torch.Tensor, int, int]] = []  # (stats (3,), first task, last task)
        self.loss = self.accuracy = 0.0
        self.tasks = 0

    def add(self, stats: torch.Tensor, first: int, last: int) -> None:
        self.steps.append((stats, first, last))

    def read(self, latest: Path) -> None:
        """Add the pending steps to the window's means; raise TrainingError at the first skipped step."""
        if not self.steps:
            return
        values = torch.stack([stats for stats, _, _ in self.steps]).tolist()  # the one sync
        for (loss_sum, accuracy_sum, skipped), (_, first, last) in zip(values, self.steps):
            if skipped or not math.isfinite(loss_sum):
                raise TrainingError(
                    f"non-finite meta-training loss or meta-gradient (NaN or inf) at tasks {first}-{last}; that "
                    f"step was skipped on the device and the run stopped at the next read. {latest} is the last "
                    f"good checkpoint (not overwritten). Fix: lower train.meta_lr or maml.inner_lr, then rerun to "
                    f"resume.")
            self.loss += loss_sum
            self.accuracy += accuracy_sum
            self.tasks += last - first + 1
        self.steps = []

    def reset(self) -> None:
        self.loss = self.accuracy = 0.0
        self.tasks = 0


def probe_one_task(model, rates, episodes: Episode, cfg: Config) -> Callable[[], None]:
    """One task's meta-gradient under the run's most memory-hungry loop (second order unless first order
    throughout, every step's query loss if MSL), for fsl.batching's memory probe; leaves no gradient behind."""
    loop = InnerLoop.training(cfg, first_order=cfg.maml.first_order)
    weights = [1.0] * loop.steps if cfg.maml.multi_step_loss else None

    def run_one() -> None:
        task_meta_gradient(model, chunks(episodes, 1)[0], loop, 1.0, rates, weights)
        for _, p in named_meta_parameters(model, rates):
            p.grad = None
    return run_one


def run(cfg: Config) -> Path:
    """Train `cfg`'s cell to cfg.train.tasks tasks (resuming if possible). Returns the best checkpoint's path.

    Under torchrun every rank runs this function; see fsl.distributed for who does what."""
    device = distributed.setup(cfg.device)
    with RunDirLock(cfg.run_dir) if distributed.is_main() else nullcontext():
        return meta_train(cfg, device)


def meta_train(cfg: Config, device: torch.device) -> Path:
    """`run` after the device is set up and the run directory locked."""
    world, main = distributed.world_size(), distributed.is_main()
    local_batch = distributed.tasks_per_rank(cfg.train.meta_batch)
    if world > 1 and cfg.train.tasks % cfg.train.meta_batch:
        raise ConfigError(f"train.tasks={cfg.train.tasks} is not a multiple of train.meta_batch="
                          f"{cfg.train.meta_batch}; with several processes every outer step must be a full "
                          f"meta-batch. Fix: train.tasks="
                          f"{cfg.train.tasks // cfg.train.meta_batch * cfg.train.meta_batch}")
    apply_precision(cfg.precision, device, cfg.cudnn_benchmark)
    run_dir = cfg.run_dir
    latest, best = run_dir / "latest.pth", run_dir / "best_accuracy_mean.pth"
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        processes = f" x {world} processes ({local_batch} tasks of each meta-batch per process)" if world > 1 else ""
        print(f"cell {cfg.cell} on {device}{processes}; resolved config:\n{dump_yaml(cfg)}", flush=True)
        write_text_atomic(run_dir / "config.yaml", dump_yaml(cfg))

    seed_everything(cfg.seed)
    model, rates = build_learner(cfg, device)
    optimizer = meta_optimizer(meta_parameters(model, cfg.maml.zero_head)
                               + (list(rates.parameters()) if rates is not None else []), cfg.train.meta_lr)
    state = {"tasks_done": 0, "best_val_mean": -1.0, "best_val_tasks": 0, "window": [0.0, 0.0, 0],
             "train_seconds": 0.0, "peak_memory_mb": None, "parallel_tasks": None, "parallel_episodes": None}
    # rank 0 reads the checkpoint and sends it to the others: identical start on every rank, no shared disk needed
    checkpoint = torch.load(latest, map_location="cpu", weights_only=False) if main and latest.exists() else None
    checkpoint = distributed.broadcast_from_main(checkpoint)
    if checkpoint is not None:
        check_resume(from_dict(checkpoint["config"]), cfg, latest, checkpoint["tasks_done"])
        model.load_state_dict(checkpoint["model"])
        if rates is not None:
            rates.load_state_dict(checkpoint["rates"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        make_fused(optimizer)
        set_rng_states(checkpoint["rng"])
        state.update({key: checkpoint[key] for key in state if key in checkpoint})
        if main:
            print(f"resuming from {latest} at task {state['tasks_done']} (best validation "
                  f"{state['best_val_mean']:.2f}% at task {state['best_val_tasks']})", flush=True)
    elif world > 1:
        model.load_state_dict(distributed.broadcast_from_main({k: v.cpu() for k, v in model.state_dict().items()}))
        if rates is not None:
            rates.load_state_dict(distributed.broadcast_from_main({k: v.cpu() for k, v in rates.state_dict().items()}))
    if state["tasks_done"] >= cfg.train.tasks:
        if main:
            print(f"training already finished ({state['tasks_done']} tasks); best checkpoint: {best}")
        return best

    train_split = cell_split(cfg, "train")
    store = cell_store(cfg, train_split, "train", "train" if cfg.data.train_augment else "eval")
    val_episodes = fixed_episodes(cfg, "val", cfg.train.val_episodes)
    train_episodes = EpisodeDataset(train_split, cfg.train.ways, cfg.train.shots, cfg.train.queries, seed=cfg.seed,
                                    start=state["tasks_done"], count=cfg.train.tasks - state["tasks_done"],
                                    image_sizes=store.sizes if cfg.data.train_augment else None)
    if world > 1:
        train_episodes = RankShare(train_episodes, cfg.train.meta_batch, distributed.rank(), world)
    make_episodes = EpisodeMaker(store, cfg.train.ways, cfg.train.shots, cfg.train.queries, cfg.data.image_size,
                                 device)
    stream = EpisodeStream(episode_loader(train_episodes, local_batch, cfg.data.workers), make_episodes)

    def checkpoint_now(path: Path = latest) -> None:
        if main:
            state["window"] = [window.loss, window.accuracy, window.tasks]  # read: every boundary reads first
            state["tasks_per_s"] = state["tasks_done"] / max(state["train_seconds"], 1e-9)
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device) / 2**20
                state["peak_memory_mb"] = max(state["peak_memory_mb"] or 0.0, peak)
            save_checkpoint(path, model, rates, optimizer, cfg, state)

    progress = tqdm(total=cfg.train.tasks, initial=state["tasks_done"], unit="task", desc=cfg.run_name,
                    dynamic_ncols=True, smoothing=0.05, disable=not main)
    log = RunLog(run_dir, cfg.train.tensorboard, state["tasks_done"]) if main else None
    window = StepWindow()
    window.loss, window.accuracy, window.tasks = state["window"]
    window_start = step_start = time.time()
    parallel = None
    with StopRequest() as stop, closing(stream), (closing(log) if log is not None else nullcontext()):
        for episodes in stream:
            if parallel is None:
                parallel, why = batching.resolve(cfg.train.parallel_tasks, local_batch, device,
                                                 probe_one_task(model, rates, episodes, cfg))
                state["parallel_tasks"] = parallel
                if main:
                    progress.write(f"train.parallel_tasks={parallel} ({why})")
            step_tasks = len(episodes.query_y) * world
            settings = schedule.at(cfg, state["tasks_done"])
            for group in optimizer.param_groups:
                group["lr"] = settings.meta_lr
            loop = InnerLoop.training(cfg, first_order=settings.first_order)
            try:
                with autocast(cfg.precision, device):
                    stats = meta_train_step(model, optimizer, episodes, loop, rates, settings.step_weights, parallel)
            except torch.cuda.OutOfMemoryError as error:
                raise TrainingError(
                    f"CUDA out of memory at task {state['tasks_done']} ({cfg.model.arch}, second order="
                    f"{not cfg.maml.first_order}, precision={cfg.precision}, train.parallel_tasks={parallel} "
                    f"({cfg.train.parallel_tasks} in the config): the graphs of that many tasks are held at once). "
                    f"Fix, without changing results: a smaller train.parallel_tasks (1 = one task's graph at a "
                    f"time), then precision=bf16 (about half the memory); or maml.first_order=true (changes "
                    f"results), or a GPU with more memory. {latest} holds the last checkpoint; rerun to "
                    f"resume.") from error
            window.add(stats, state["tasks_done"] + 1, state["tasks_done"] + step_tasks)
            state["tasks_done"] += step_tasks
            progress.update(step_tasks)
            done = state["tasks_done"]
            stopping = distributed.any_rank(stop.signal is not None, device)
            logging = crossed(done, step_tasks, cfg.train.log_every) or done == cfg.train.tasks
            validating = crossed(done, step_tasks, cfg.train.val_every) or done == cfg.train.tasks
            if logging or validating or stopping or crossed(done, step_tasks, cfg.train.checkpoint_every):
                window.read(latest)  # the step's only sync, and only at these boundaries

            if logging and main and window.tasks:
                seconds = time.time() - window_start
                loss, accuracy = window.loss / window.tasks, window.accuracy / window.tasks
                log.write({"cell": cfg.cell, "seed": cfg.seed, "tasks": done, "split": "train", "loss": loss,
                           "accuracy": accuracy, "ci95": "", "tasks_per_s": round(window.tasks / seconds, 3),
                           "seconds": round(seconds, 2)})
                progress.set_postfix(loss=f"{loss:.3f}", acc=f"{accuracy:.1f}")
                window.reset()
                window_start = time.time()

            now = time.time()
            state["train_seconds"], step_start = state["train_seconds"] + now - step_start, now
            if validating:
                start = time.time()
                if state["parallel_episodes"] is None:
                    state["parallel_episodes"], why = test_group(cfg, model, rates, val_episodes, device)
                    if main:
                        progress.write(f"test.parallel_episodes={state['parallel_episodes']} ({why})")
                accuracies = evaluate(model, val_episodes, InnerLoop.testing(cfg), device, rates=rates,
                                      precision=cfg.precision, parallel=state["parallel_episodes"])
                mean = float(np.mean(accuracies))
                improved = mean > state["best_val_mean"]
                if improved:
                    state["best_val_mean"], state["best_val_tasks"] = mean, done
                    checkpoint_now(best)
                checkpoint_now()
                if main:
                    log.write({"cell": cfg.cell, "seed": cfg.seed, "tasks": done, "split": "val", "loss": "",
                               "accuracy": mean, "ci95": ci95(accuracies), "tasks_per_s": "",
                               "seconds": round(time.time() - start, 2)})
                    progress.write(f"task {done}: validation {mean:.2f} ± {ci95(accuracies):.2f}% "
                                   f"{'(best so far)' if improved else ''}")
                    write_atomic(train_log_path(cfg), lambda tmp: shutil.copyfile(log.path, tmp))
                window_start += time.time() - start  # validation time does not count in training tasks/s
                step_start = time.time()
            elif crossed(done, step_tasks, cfg.train.checkpoint_every) or stopping:
                checkpoint_now()

            if stopping:
                progress.close()
                cause = f"signal {stop.signal}" if stop.signal else "a signal to another process"
                raise KeyboardInterrupt(f"stopped by {cause} at task {done}; {latest} written, "
                                        f"rerun the same command to resume")
    progress.close()
    if main:
        print(f"finished {state['tasks_done']} tasks; best validation {state['best_val_mean']:.2f}% at task "
              f"{state['best_val_tasks']}: {best}")
    return best
