"""Meta-training (step 1 of the protocol): MAML's outer loop with validation-based model selection.

`meta_train` reads as the protocol runs: set up, resume, then for each meta-batch of training tasks the schedule's
settings, one outer step, the log, and at their cadences validation + model selection and a checkpoint; then finish.
Each concern is one named piece:
    fsl.train.cell.training_episodes  the meta-batches; episode i is a pure function of (seed, i) (fsl.data.episodes), so
                                    a resumed run sees exactly the tasks an uninterrupted run would
    fsl.maml.schedule.at                 meta lr, derivative order and multi-step-loss weights at a task count
    outer_step                      one outer step (fsl.maml.meta_train_step; no host sync)
    StepWindow                      the steps' numbers, read from the device at the boundaries only
    Due                             which boundaries (log, validation, checkpoint, stop) a step crossed
    Validation                      accuracy on the fixed val episodes; the best weights are kept
    fsl.train.checkpoint.Checkpoints      latest.pth, best_accuracy_mean.pth, resume
    fsl.train.run_log.RunLog              log.csv (+ TensorBoard) and its copy in results/
    StopRequest                     SIGINT/SIGTERM -> latest.pth, then stop
Writes into `cfg.run_dir`: config.yaml (the resolved config), log.csv, latest.pth, best_accuracy_mean.pth.
"""
from __future__ import annotations

import itertools
import math
import signal
import time
from contextlib import closing, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from fsl.config import Config, ConfigError, dump_yaml
from fsl.data.episodes import Episode
from fsl.data.progress import progress_bar
from fsl.device import distributed
from fsl.device.precision import apply_precision, autocast
from fsl.maml import (
    InnerLoop,
    InnerRates,
    batching,
    build_learner,
    chunks,
    meta_optimizer,
    meta_parameters,
    meta_train_step,
    named_meta_parameters,
    schedule,
    task_meta_gradient,
)
from fsl.results import ci95
from fsl.results.files import check_writable, write_text_atomic
from fsl.train.accuracy import evaluate_fitting, parallel_episodes
from fsl.train.cell import FixedEpisodes, cell_split, cell_store, check_cell_data, training_episodes
from fsl.train.checkpoint import Checkpoints, RunDirLock, TrainState, seed_everything
from fsl.train.run_log import RunLog


class TrainingError(RuntimeError):
    """Training cannot go on (NaN loss, out of memory); the message says where and what to do."""


def run(cfg: Config, test_split: bool = True) -> Path:
    """Train `cfg`'s cell to cfg.train.tasks tasks (resuming if possible). Returns the best checkpoint's path.
    `test_split`: build the test split's image store first, so that an unreadable test image is found before
    training (fsl tune passes False: a study reads nothing of the test split but its labels).

    Under torchrun every rank runs this function; see fsl.device.distributed for who does what."""
    device = distributed.setup(cfg.device)
    if distributed.is_main():  # before anything is written: folders the run could not write into
        check_writable(Path(cfg.data.cache_dir), "data.cache_dir")
        check_writable(cfg.run_dir, "work_dir")
        check_writable(Path(cfg.results_dir), "results_dir")
    with RunDirLock(cfg.run_dir) if distributed.is_main() else nullcontext():
        return meta_train(cfg, device, test_split)


def meta_train(cfg: Config, device: torch.device, test_split: bool = True) -> Path:
    """`run` with the device set up and the run directory locked: the protocol's training loop."""
    main = distributed.is_main()
    start_run(cfg, device, test_split)
    model, rates = build_learner(cfg, device)
    learned_rates = list(rates.parameters()) if rates is not None else []
    optimizer = meta_optimizer(meta_parameters(model, cfg.maml.zero_head) + learned_rates, cfg.train.meta_lr)
    checkpoints = Checkpoints(cfg, model, rates, optimizer, device)
    state = checkpoints.resume()  # refuses a checkpoint of another experiment (fsl.results.provenance.check_resume)
    if main:
        write_text_atomic(cfg.run_dir / "config.yaml", dump_yaml(cfg))
    if state.tasks_done >= cfg.train.tasks:
        return finish(state, checkpoints, "training already finished")
    if cfg.train.stop_at and state.tasks_done >= cfg.train.stop_at:
        return finish(state, checkpoints, f"already stopped at train.stop_at={cfg.train.stop_at} (rerun without it to "
                                          f"train on to {cfg.train.tasks})")
    stream = training_episodes(cfg, state.tasks_done, device)
    validation = Validation(cfg, model, rates, device)
    log = RunLog(cfg, resume_at=state.tasks_done) if main else None
    window = StepWindow(*state.window, started=state.train_seconds)
    last_task = min(cfg.train.stop_at or cfg.train.tasks, cfg.train.tasks)  # the bar's 100% and ETA: where this run stops
    progress = progress_bar(total=last_task, initial=state.tasks_done, unit="task", desc=cfg.run_name,
                    dynamic_ncols=True, smoothing=0.05, disable=not main)
    clock = time.time()
    with StopRequest() as stop, closing(stream), closing(log) if log is not None else nullcontext():
        first = next(stream)
        resolve_parallel_tasks(cfg, model, rates, first, device, state, progress)
        stream.release()  # the producer builds ahead only now: the probe measured this process's memory alone
        for episodes in itertools.chain([first], stream):
            settings = schedule.at(cfg, state.tasks_done)
            stats = outer_step(cfg, model, optimizer, rates, episodes, settings, state, device)
            step_tasks = len(episodes.query_y) * distributed.world_size()
            window.add(stats, state.tasks_done + 1, state.tasks_done + step_tasks)
            state.tasks_done += step_tasks
            progress.update(step_tasks)
            due = Due.after(cfg, state.tasks_done, step_tasks, lambda boundary: stop.requested(boundary, device))
            if due.read:
                window.read(checkpoints.latest)  # the step's only sync, and only at these boundaries
            state.train_seconds, clock = state.train_seconds + time.time() - clock, time.time()
            if due.log and main and window.tasks:
                window.log(log, progress, state, stream.input_seconds)
            state.window = [window.loss, window.accuracy, window.tasks]
            if due.validate:
                checkpoints.save(state)  # first: a validation that fails loses no training
                validation(state, checkpoints, log, progress)
                clock = time.time()  # validation time does not count as training time
            elif due.checkpoint:
                checkpoints.save(state)
            if due.stop:
                progress.close()
                stop.raise_stopped(state.tasks_done, checkpoints.latest)
            if due.end and state.tasks_done < cfg.train.tasks:
                progress.close()
                return finish(state, checkpoints, f"stopped at train.stop_at={cfg.train.stop_at} (rerun without it "
                                                  f"to train on to {cfg.train.tasks})")
    progress.close()
    return finish(state, checkpoints, "finished")


def start_run(cfg: Config, device: torch.device, test_split: bool = True) -> None:
    """Before any long work: refuse a meta-batch torchrun cannot split evenly and data that cannot fill the cell's
    episodes (all three splits, from their labels); build the test
    split's image store (an unreadable test image is found now, not after training); set the numeric precision,
    print the resolved config, and seed every RNG with cfg.seed. The config is written into the run directory only
    once `meta_train` has checked the checkpoint it resumes: a refused resume changes no file."""
    world = distributed.world_size()
    if world > 1 and cfg.train.tasks % cfg.train.meta_batch:
        raise ConfigError(f"train.tasks={cfg.train.tasks} is not a multiple of train.meta_batch="
                          f"{cfg.train.meta_batch}; with several processes every outer step must be a full "
                          f"meta-batch. Fix: train.tasks="
                          f"{cfg.train.tasks // cfg.train.meta_batch * cfg.train.meta_batch}")
    apply_precision(cfg.precision, device, cfg.cudnn_benchmark, cfg.deterministic)
    check_cell_data(cfg)
    if test_split:
        cell_store(cfg, cell_split(cfg, "test"), "test", "eval")
    if distributed.is_main():
        local_batch = distributed.tasks_per_rank(cfg.train.meta_batch)
        processes = f" x {world} processes ({local_batch} tasks of each meta-batch per process)" if world > 1 else ""
        print(f"cell {cfg.cell} on {device}{processes}; resolved config:\n{dump_yaml(cfg)}", flush=True)
    seed_everything(cfg.seed)


def finish(state: TrainState, checkpoints: Checkpoints, what: str) -> Path:
    """Say where the run ended and return the path of the checkpoint its test takes (test.weights)."""
    if distributed.is_main():
        best = (f"best validation {state.best_val_mean:.2f}% at task {state.best_val_tasks}: {checkpoints.best}"
                if state.best_val_mean >= 0 else "no validation yet")
        print(f"{what}: {state.tasks_done} tasks; {best}", flush=True)
    return checkpoints.tested


def probe_tasks(model: torch.nn.Module, rates: InnerRates | None, episodes: Episode, cfg: Config,
                device: torch.device) -> Callable[[int], None]:
    """`run(p)`: the meta-gradient of the meta-batch `episodes`, p tasks adapted at a time, under the run's most
    memory-hungry loop (second order unless first order throughout, every step's query loss if MSL) and its
    precision, for fsl.maml.batching's probes (memory on CUDA, time on a CPU); leaves no gradient behind."""
    loop = InnerLoop.training(cfg, first_order=cfg.maml.first_order)
    weights = [1.0] * loop.steps if cfg.maml.multi_step_loss else None

    def run(group: int) -> None:
        with autocast(cfg.precision, device):
            for chunk in chunks(episodes, group):
                task_meta_gradient(model, chunk, loop, 1.0, rates, weights)
        for _, p in named_meta_parameters(model, rates):
            p.grad = None
    return run


def resolve_parallel_tasks(cfg: Config, model: torch.nn.Module, rates: InnerRates | None, episodes: Episode,
                           device: torch.device, state: TrainState, progress: tqdm) -> None:
    """state.parallel_tasks for train.parallel_tasks on this device (`auto`: probed on the run's first meta-batch,
    fsl.maml.batching). A resumed run under the same setting keeps the size its checkpoint recorded (as resolved, or as
    halved after running out of memory), so that it continues bit for bit."""
    setting = str(cfg.train.parallel_tasks)
    if state.parallel_tasks is not None and state.parallel_tasks_setting == setting:
        why = f"as recorded in {cfg.run_dir / 'latest.pth'} for train.parallel_tasks={setting}"
    else:
        state.parallel_tasks, why = batching.resolve(cfg.train.parallel_tasks, distributed.tasks_per_rank(
            cfg.train.meta_batch), device, probe_tasks(model, rates, episodes, cfg, device),
            deterministic=cfg.deterministic)
        state.parallel_tasks_setting = setting
    if distributed.is_main():
        progress.write(f"train.parallel_tasks={state.parallel_tasks} ({why})")


def outer_step(cfg: Config, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rates: InnerRates | None,
               episodes: Episode, settings: schedule.StepSettings, state: TrainState,
               device: torch.device) -> torch.Tensor:
    """One outer step on the meta-batch `episodes` under the schedule's `settings`, state.parallel_tasks tasks
    adapted at a time; returns fsl.maml.STEP_STATS on the device. Out of memory, the step is taken again with half
    as many tasks at once (the same step up to float rounding; the new size is kept in `state`, so a resumed run
    continues with it); at one task at a time, fsl.maml.batching.OutOfMemory with the fixes."""
    for group in optimizer.param_groups:
        group["lr"] = settings.meta_lr
    loop = InnerLoop.training(cfg, first_order=settings.first_order)
    while True:
        try:
            with autocast(cfg.precision, device):
                return meta_train_step(model, optimizer, episodes, loop, rates, settings.step_weights,
                                       state.parallel_tasks)
        except torch.cuda.OutOfMemoryError as error:
            if state.parallel_tasks == 1:
                raise batching.OutOfMemory(
                    f"out of memory on {distributed.device_name(device)} at task {state.tasks_done} with one task's "
                    f"graph at a time ({cfg.model.arch}, second order={not loop.first_order}, precision="
                    f"{cfg.precision}): {error}. Fix: precision=bf16 (about half the memory), maml.first_order=true "
                    f"(changes results) or a GPU with more memory. {cfg.run_dir / 'latest.pth'} holds the last "
                    f"checkpoint; rerun to resume.") from error
        state.parallel_tasks = batching.halved(state.parallel_tasks, device, "train.parallel_tasks")


def crossed(tasks_done: int, step_tasks: int, every: int) -> bool:
    """True if the last `step_tasks` tasks crossed a multiple of `every`."""
    return tasks_done // every > (tasks_done - step_tasks) // every


@dataclass(frozen=True)
class Due:
    """What is due after an outer step: a log row (every train.log_every tasks), validation with model selection and
    a checkpoint (every train.val_every), a checkpoint alone (every train.checkpoint_every, or on a stop request),
    stopping on a request, the end of the run (all train.tasks, or train.stop_at). The last step logs and
    validates."""
    log: bool
    validate: bool
    checkpoint: bool
    stop: bool
    end: bool

    @classmethod
    def after(cls, cfg: Config, tasks_done: int, step_tasks: int, stop: Callable[[bool], bool]) -> "Due":
        """`stop(boundary)`: whether a stop was requested (`StopRequest.requested`), told whether this step is a
        boundary (log, validation, checkpoint or the end)."""
        end = tasks_done == cfg.train.tasks or 0 < cfg.train.stop_at <= tasks_done
        log = crossed(tasks_done, step_tasks, cfg.train.log_every) or end
        validate = crossed(tasks_done, step_tasks, cfg.train.val_every) or end
        checkpoint = crossed(tasks_done, step_tasks, cfg.train.checkpoint_every)
        stopping = stop(log or validate or checkpoint or end)
        return cls(log=log, validate=validate, checkpoint=checkpoint or stopping, stop=stopping, end=end)

    @property
    def read(self) -> bool:
        """Whether the step window must be read (the one host sync) before acting."""
        return self.log or self.validate or self.checkpoint


class StepWindow:
    """The outer steps since the last log row, their numbers still on the device: each step's STEP_STATS tensor and
    its task range. `read` brings them to the host in one sync (once per log window, validation or checkpoint),
    and stops the run if a step was skipped for a non-finite loss or meta-gradient. `started`: the run's training
    seconds when the window opened."""

    def __init__(self, loss: float = 0.0, accuracy: float = 0.0, tasks: int = 0, started: float = 0.0):
        self.steps: list[tuple[torch.Tensor, int, int]] = []  # (stats (3,), first task, last task)
        self.loss, self.accuracy, self.tasks, self.started = loss, accuracy, tasks, started
        self.input_started = 0.0  # the stream's input seconds when the window opened (in this process)

    def add(self, stats: torch.Tensor, first: int, last: int) -> None:
        self.steps.append((stats, first, last))

    def read(self, latest: Path) -> None:
        """Add the pending steps to the window's sums; raise TrainingError at the first skipped step."""
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

    def log(self, log: RunLog, progress: tqdm, state: TrainState, input_seconds: float) -> None:
        """Write the window's means as a log row, then open the next window. `input_seconds`: the episode stream's
        total so far (fsl.data.episodes.EpisodeStream.input_seconds): the window's share is the time its steps waited
        for their input, logged as input_s and shown as the progress line's `input` percentage: a run whose steps
        wait on the host (a GPU the input cannot keep busy) says so."""
        seconds = state.train_seconds - self.started
        waited = input_seconds - self.input_started
        loss, accuracy = self.loss / self.tasks, self.accuracy / self.tasks
        log.training(state.tasks_done, loss, accuracy, self.tasks, seconds, waited)
        progress.set_postfix(loss=f"{loss:.3f}", acc=f"{accuracy:.1f}", input=f"{100 * waited / max(seconds, 1e-9):.0f}%")
        self.loss, self.accuracy, self.tasks, self.started = 0.0, 0.0, 0, state.train_seconds
        self.input_started = input_seconds


class Validation:
    """Validation and model selection: the mean accuracy on train.val_episodes fixed val episodes under the test-time
    inner loop; the weights with the best mean so far are best_accuracy_mean.pth (the protocol's selection)."""

    def __init__(self, cfg: Config, model: torch.nn.Module, rates: InnerRates | None, device: torch.device):
        self.cfg, self.model, self.rates, self.device = cfg, model, rates, device
        self.episodes = FixedEpisodes(cfg, "val", cfg.train.val_episodes)

    def __call__(self, state: TrainState, checkpoints: Checkpoints, log: RunLog | None, progress: tqdm) -> None:
        """Validate at state.tasks_done; save the best checkpoint if it improved, then latest.pth; log it."""
        start, main, setting = time.time(), distributed.is_main(), str(self.cfg.test.parallel_episodes)
        if state.parallel_episodes is None or state.parallel_episodes_setting != setting:
            state.parallel_episodes, why = parallel_episodes(self.cfg, self.model, self.rates, self.episodes,
                                                             self.device)
            state.parallel_episodes_setting = setting
            if main:
                progress.write(f"test.parallel_episodes={state.parallel_episodes} ({why})")
        accuracies, state.parallel_episodes = evaluate_fitting(
            self.model, self.episodes, InnerLoop.testing(self.cfg), self.device, rates=self.rates,
            precision=self.cfg.precision, parallel=state.parallel_episodes, prefetch=self.cfg.data.prefetch)
        mean = float(np.mean(accuracies))
        improved = mean > state.best_val_mean
        if improved:
            state.best_val_mean, state.best_val_tasks = mean, state.tasks_done
            checkpoints.save(state, best=True)
        checkpoints.save(state)
        if main:
            log.validation(state.tasks_done, accuracies, time.time() - start)
            progress.write(f"task {state.tasks_done}: validation {mean:.2f} ± {ci95(accuracies):.2f}% "
                           f"{'(best so far)' if improved else ''}")


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked between outer steps, so latest.pth is written before exiting. Ctrl-C
    and Slurm signal the whole process group: the loader workers ignore both (fsl.data.episodes), the trainer owns them."""

    def __init__(self):
        self.signal: int | None = None

    def __enter__(self) -> "StopRequest":
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def requested(self, boundary: bool, device: torch.device) -> bool:
        """Whether to stop after this step: one process checks its own signal every step; under torchrun the ranks
        agree on it (any rank's signal stops all) at the boundaries only, which are the same steps on every rank:
        no collective, and no host sync, in the steps between."""
        if distributed.world_size() == 1:
            return self.signal is not None
        return boundary and distributed.any_rank(self.signal is not None, device)

    def handle(self, signum, frame) -> None:
        if self.signal is not None:  # second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.signal = signum

    def raise_stopped(self, tasks_done: int, latest: Path) -> None:
        cause = f"signal {self.signal}" if self.signal else "a signal to another process"
        raise KeyboardInterrupt(f"stopped by {cause} at task {tasks_done}; {latest} written, rerun the same "
                                f"command to resume")

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
