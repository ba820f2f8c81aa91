"""The GPU path's defects of issue #30, each reproduced on a CPU: the producer thread (data.prefetch=thread), the
optimizer's skip flag, bf16 on emulating GPUs, fsl adapt's precision, out-of-memory recovery, deterministic kernels.
What only a GPU can check is in tests/test_gpu.py."""
from __future__ import annotations

import sys
import threading
import time
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import MINI_84, REPO, STORE_CACHE, fixture_root
from test_maml import batch_of, make_episode

from fsl.config import ConfigError, load_config
from fsl.data import load_split
from fsl.data.episodes import EpisodeDataset, EpisodeMaker, EpisodeStream, episode_loader
from fsl.device.precision import check_precision
from fsl.device.rehearsal import FakeGPU, rehearsal
from fsl.maml import InnerLoop, batching, meta_optimizer, meta_train_step
from fsl.models import build_model
from fsl.train import meta_train as train
from fsl.train.cell import FixedEpisodes, training_episodes

CONFIG = REPO / "experiments/mini-imagenet-conv4-1shot.yaml"


def tiny(tmp_path, *extra):
    """Tiny but real: 28x28 mini-ImageNet-lite episodes, 2 queries, 2 tasks per outer step."""
    return [f"data.root={fixture_root('mini-imagenet')}", MINI_84, "data.image_size=28", "data.workers=0",
            f"data.cache_dir={STORE_CACHE}", "device=cpu", "train.meta_batch=2", "train.queries=2",
            "train.val_episodes=3", "train.log_every=2", "test.episodes=4", "train.tensorboard=false",
            f"work_dir={tmp_path / 'work'}", f"results_dir={tmp_path / 'results'}", *extra]


def flat(episode) -> list[np.ndarray]:
    return [t.numpy().copy() for t in episode]


def test_the_producer_thread_gives_the_inline_episodes_while_validation_episodes_are_drawn(tmp_path):
    """#30.1: episode i is a pure function of (seed, i) when a thread draws training episodes (workers=0, so the
    drawing happens in the thread) while the main thread draws validation episodes; before `seeded` held a lock,
    2 to 5 of 200 episodes came out different."""
    cfg = load_config(CONFIG, tiny(tmp_path, "train.tasks=120"))
    inline = [flat(e) for e in training_episodes(cfg, 0, torch.device("cpu"))]
    threaded = load_config(CONFIG, tiny(tmp_path, "train.tasks=120", "data.prefetch=thread"))
    stream = training_episodes(threaded, 0, torch.device("cpu"))
    assert stream.thread is not None
    first = next(stream)
    stream.release()
    validation, interval = [], sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # the threads take turns every few bytecodes: their draws interleave
    try:
        with stream:
            episodes = [flat(first)]
            for episode in stream:
                validation.append(FixedEpisodes(threaded, "val", 4).specs)  # draws while the thread draws
                episodes.append(flat(episode))
    finally:
        sys.setswitchinterval(interval)
    assert len(episodes) == len(inline) == 60
    for a, b in zip(inline, episodes):
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
    drawn_alone = FixedEpisodes(threaded, "val", 4).specs
    assert all(np.array_equal(a.indices, b.indices) for specs in validation for a, b in zip(specs, drawn_alone))


class Failing:
    """A loader whose second batch raises."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        yield self.batches[0]
        raise ValueError("injected: the loader failed")


def stream_of(tmp_path, loader, prefetch="thread", device=torch.device("cpu"), **kwargs) -> EpisodeStream:
    cfg = load_config(CONFIG, tiny(tmp_path))
    dataset = load_split("mini-imagenet", cfg.data_root, "val")
    from fsl.data.store import open_store
    store = open_store(dataset, "mini-imagenet", "val", "eval", 28, STORE_CACHE, progress=False)
    return EpisodeStream(loader, EpisodeMaker(store, 5, 1, 2, 28, device), prefetch, **kwargs)


def specs(tmp_path, count):
    cfg = load_config(CONFIG, tiny(tmp_path))
    dataset = load_split("mini-imagenet", cfg.data_root, "val")
    return list(episode_loader(EpisodeDataset(dataset, 5, 1, 2, seed=0, count=count), 2))


def test_a_producer_error_is_raised_by_every_later_next(tmp_path):
    """#30.3: the error reached the consumer once; the next `next()` then waited for ever."""
    stream = stream_of(tmp_path, Failing(specs(tmp_path, 2)))
    next(stream)
    for _ in range(2):
        done = {}

        def consume():
            try:
                next(stream)
            except ValueError as error:
                done["error"] = error
        waiter = threading.Thread(target=consume, daemon=True)
        waiter.start()
        waiter.join(timeout=10)
        assert "injected: the loader failed" in str(done.get("error")), "next() blocked"
    stream.close()
    assert not stream.thread.is_alive()


def test_the_stream_ends_and_closes_cleanly_holding_or_not(tmp_path):
    batches = specs(tmp_path, 8)
    held = stream_of(tmp_path, batches, hold_first=True)
    next(held)
    time.sleep(0.3)
    assert held.ready.qsize() == 0  # held after the first batch
    held.release()
    assert len(list(held)) == 3
    with pytest.raises(StopIteration):
        next(held)  # and again: the end is kept
    held.close()
    abandoned = stream_of(tmp_path, batches)
    next(abandoned)
    abandoned.close()  # with batches still queued
    assert not abandoned.thread.is_alive() and not held.thread.is_alive()
    inline = stream_of(tmp_path, batches, prefetch="inline")
    assert inline.thread is None and len(list(inline)) == 4


def test_the_producer_thread_sets_its_cuda_device_first(tmp_path):
    """#30.2: a new thread's current CUDA device is 0; without set_device, leaving torch.cuda.stream() initialised
    a context on GPU 0 from every rank. In a rehearsal of 2 GPUs (fsl.device.rehearsal: torch's own set_device and
    stream functions, the driver faked), a stream for cuda:1: the producer thread selects GPU 1 before it builds on
    its side stream, and the consumer waits for the thread's event. (#47.1: a stub of set_device hid that torch
    refuses torch.device('cuda') without an index.)"""
    with rehearsal(devices=2) as driver:
        stream = stream_of(tmp_path, specs(tmp_path, 4), device=torch.device("cuda", 1))
        with stream:
            assert len(list(stream)) == 2
    producer = [name for name, thread in driver.calls if thread == "fsl-episode-stream"]
    assert producer[0] == "cudaSetDevice(1)" and producer.count("cudaEventRecord") == 2
    assert [name for name, thread in driver.calls if thread == "MainThread"].count("cudaStreamWaitEvent") == 2


def test_the_skip_flag_is_removed_after_the_step():
    """#30.4: GradScaler deletes `found_inf` after a step; fsl left it, and a later plain step() was skipped."""
    torch.manual_seed(0)
    model = build_model("conv4", ways=3, image_size=16)
    optimizer = meta_optimizer(list(model.parameters()), 1e-3)
    episodes = batch_of(make_episode(), make_episode(seed=1))
    episodes = type(episodes)(*(t.float() if t.is_floating_point() else t for t in episodes))
    meta_train_step(model, optimizer, episodes, InnerLoop(1, 0.1))
    assert not hasattr(optimizer, "found_inf")
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_bf16_is_refused_on_gpus_that_only_emulate_it_and_for_the_runs_device():
    """#30.5: torch.cuda.is_bf16_supported() counts emulation (V100, T4) and reads the current device. A rehearsal
    of an A100 (8.0) as GPU 0 and a V100 (7.0) as GPU 1: torch's own capability functions read the faked driver."""
    gpus = (FakeGPU(name="NVIDIA A100", major=8), FakeGPU(name="Tesla V100", major=7))
    with rehearsal(devices=2, gpu=gpus), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note that this build does not support a 7.0 GPU
        assert torch.cuda.is_bf16_supported()  # for the current device, 0, and counting emulation anyway
        check_precision("bf16", torch.device("cuda", 0))
        with pytest.raises(ConfigError, match="bfloat16 arithmetic in hardware .* Tesla V100 is 7.x and would only "
                                              "emulate it"):
            check_precision("bf16", torch.device("cuda", 1))


def test_adapt_runs_in_the_checkpoints_precision(tmp_path, monkeypatch):
    """#30.6: `fsl adapt` applied no precision: TF32 convolutions for an fp32 model, no autocast for a bf16 one."""
    from dataclasses import asdict

    from fsl.jobs import adapt
    from fsl.maml import build_learner
    from fsl.train.checkpoint import TrainState, save_checkpoint

    applied, autocasts = [], []
    monkeypatch.setattr(adapt, "apply_precision", lambda precision, *args: applied.append(precision))
    real = adapt.autocast
    monkeypatch.setattr(adapt, "autocast", lambda precision, device: autocasts.append(precision) or
                        real(precision, device))
    cfg = load_config(CONFIG, tiny(tmp_path, "precision=bf16"))
    model, _ = build_learner(cfg)
    checkpoint = tmp_path / "best.pth"
    save_checkpoint(checkpoint, model, None, meta_optimizer(list(model.parameters()), 1e-3), cfg,
                    asdict(TrainState()))
    dataset = load_split("mini-imagenet", cfg.data_root, "test")
    for label in range(5):
        index = dataset.labels.index(label)
        (tmp_path / "support" / f"c{label}").mkdir(parents=True)
        (tmp_path / "support" / f"c{label}" / "a.jpg").write_bytes(dataset.paths[index].read_bytes())
    adapt.run(checkpoint, tmp_path / "support", [str(tmp_path / "support")], device="cpu")
    assert applied == ["bf16"] and autocasts == ["bf16", "bf16"]


class InjectOOM:
    """Makes fsl.maml.step.task_meta_gradient (or evaluate_tasks) raise an out-of-memory error for groups of more than
    `fits` tasks, as a GPU would."""

    def __init__(self, module, name, fits):
        self.real, self.fits, self.failures = getattr(module, name), fits, 0
        setattr(module, name, self)

    def __call__(self, model, episodes, *args, **kwargs):
        if len(episodes.query_y) > self.fits:
            self.failures += 1
            raise torch.cuda.OutOfMemoryError(f"injected: {len(episodes.query_y)} tasks at once")
        return self.real(model, episodes, *args, **kwargs)


def weights(run_dir):
    return torch.load(run_dir / "latest.pth", weights_only=False)


def test_out_of_memory_halves_the_group_and_the_run_resumes_bit_equal(tmp_path, monkeypatch, capsys):
    """#30.9: an OOM in a training step and in validation: the step (validation) is taken again with half as many
    tasks (episodes) at once, the size is kept, and resuming continues with it; the weights equal a run that used
    that size throughout. At one task at a time, a clear error."""
    from fsl.maml import step
    from fsl.train import accuracy
    settings = ["train.meta_batch=4", "train.parallel_tasks=4", "test.parallel_episodes=3", "train.val_every=8"]
    monkeypatch.setattr(step, "task_meta_gradient", step.task_meta_gradient)  # where meta_train_step looks it up
    step_oom = InjectOOM(step, "task_meta_gradient", fits=2)
    monkeypatch.setattr(accuracy, "evaluate_tasks", accuracy.evaluate_tasks)
    val_oom = InjectOOM(accuracy, "evaluate_tasks", fits=1)
    halved = load_config(CONFIG, tiny(tmp_path / "a", "train.tasks=8", *settings))
    train.run(halved)
    assert step_oom.failures == 1 and val_oom.failures == 1  # once each: the smaller sizes were kept
    state = weights(halved.run_dir)
    assert (state["parallel_tasks"], state["parallel_episodes"]) == (2, 1)
    assert "with train.parallel_tasks=4: retrying with 2" in capsys.readouterr().err
    resumed = load_config(CONFIG, tiny(tmp_path / "a", "train.tasks=16", *settings))
    train.run(resumed)
    assert step_oom.failures == 1 and weights(resumed.run_dir)["parallel_tasks"] == 2
    straight = load_config(CONFIG, tiny(tmp_path / "b", "train.tasks=16", "train.meta_batch=4",
                                        "train.parallel_tasks=2", "test.parallel_episodes=1", "train.val_every=8"))
    train.run(straight)
    for name, tensor in weights(straight.run_dir)["model"].items():
        assert torch.equal(weights(resumed.run_dir)["model"][name], tensor), name
    log_a = pd.read_csv(resumed.run_dir / "log.csv").drop(columns=["seconds", "tasks_per_s", "input_s"])
    log_b = pd.read_csv(straight.run_dir / "log.csv").drop(columns=["seconds", "tasks_per_s", "input_s"])
    pd.testing.assert_frame_equal(log_a, log_b)
    step_oom.fits = 0
    with pytest.raises(batching.OutOfMemory, match="with one task's graph at a time .* Fix: precision=bf16"):
        train.run(load_config(CONFIG, tiny(tmp_path / "c", "train.tasks=4", "train.parallel_tasks=1")))


def test_the_checkpoint_is_written_before_validating(tmp_path, monkeypatch):
    """#30.9: validation ran before the checkpoint: one that failed lost all training since the last one."""
    def broken(self, *args):
        raise RuntimeError("injected: validation failed")
    monkeypatch.setattr(train.Validation, "__call__", broken)
    cfg = load_config(CONFIG, tiny(tmp_path, "train.tasks=8", "train.val_every=8", "train.checkpoint_every=100"))
    with pytest.raises(RuntimeError, match="injected"):
        train.run(cfg)
    assert weights(cfg.run_dir)["tasks_done"] == 8


def test_deterministic_sets_the_kernels_and_is_recorded(tmp_path, monkeypatch):
    """#30.11: deterministic=true: deterministic algorithms (and, on CUDA, cuDNN's and cuBLAS's workspace), and the
    row says so."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    from fsl.train import meta_test as evaluate
    cfg = load_config(CONFIG, tiny(tmp_path, "train.tasks=4", "deterministic=true"))
    try:
        best = train.run(cfg)
        assert torch.are_deterministic_algorithms_enabled()
        import os
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        row = evaluate.run(cfg, best)
    finally:
        torch.use_deterministic_algorithms(False)
    assert row["precision"] == row["test_precision"] == "fp32+deterministic"
    with pytest.raises(ConfigError, match="deterministic=true with cudnn_benchmark=true"):
        load_config(CONFIG, ["deterministic=true", "cudnn_benchmark=true"])


def test_evaluation_reads_the_device_once_and_a_thread_builds_its_input(tmp_path, monkeypatch):
    """#30.10: validation and the test read each batch's accuracies back (a host sync per batch) and built their
    episodes in the main thread. Now: one read per evaluation, and with data.prefetch=thread the next batch is
    built while one is adapted, with the same accuracies."""
    from fsl.maml import build_learner
    from fsl.train.accuracy import evaluate
    from fsl.train.opcount import OpCounter
    cfg = load_config(CONFIG, tiny(tmp_path))
    torch.manual_seed(0)
    model, rates = build_learner(cfg)
    episodes = FixedEpisodes(cfg, "val", 6)
    loop = InnerLoop.testing(cfg)
    ops, gather = OpCounter(), EpisodeMaker.gather

    def host_side(*args, **kwargs):  # reading the store into host memory: host work, not a device read
        with ops.phase("host"):
            return gather(*args, **kwargs)
    monkeypatch.setattr(EpisodeMaker, "gather", host_side)
    with ops:
        inline = evaluate(model, episodes, loop, torch.device("cpu"), parallel=2, prefetch="inline")
    assert len(inline) == 6 and [op for phase, op in ops.sync_calls if phase != "host"] == ["Tensor.tolist"]
    threaded = evaluate(model, episodes, loop, torch.device("cpu"), parallel=2, prefetch="thread")
    assert np.array_equal(inline, threaded)
    assert not [t for t in threading.enumerate() if t.name == "fsl-episode-stream"]  # each stream was closed


def test_the_train_log_says_how_long_the_steps_waited_for_their_input(tmp_path):
    """#48.5: a run whose steps wait for their input says so: log.csv's input_s (of each window's seconds, the time
    spent in the episode stream's next()), and a log of an older fsl, without the column, gets it when resumed."""
    cfg = load_config(CONFIG, tiny(tmp_path, "train.tasks=4"))
    train.run(cfg)
    log = pd.read_csv(cfg.run_dir / "log.csv")
    rows = log[log.split == "train"]
    assert len(rows) == 2 and (rows.input_s > 0).all() and (rows.input_s <= rows.seconds + 0.05).all()
    log.drop(columns=["input_s"]).to_csv(cfg.run_dir / "log.csv", index=False)  # as written before #48
    train.run(load_config(CONFIG, tiny(tmp_path, "train.tasks=8")))
    resumed = pd.read_csv(cfg.run_dir / "log.csv")
    assert list(resumed.columns)[-1] == "input_s" and resumed[resumed.split == "train"].tasks.tolist() == [2, 4, 6, 8]
    assert resumed[(resumed.tasks > 4) & (resumed.split == "train")].input_s.notna().all()
