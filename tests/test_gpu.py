"""CUDA specifics (#14, #30): precision flags, the task-batched loop and the batched augmentation on the GPU, every
CUDA-only branch of the training loop once (fused Adam's skip on the device, the memory probe on a real task, a
whole short run with the producer thread under sync-debug mode "error", NCCL with 2 GPUs). Skipped on machines
without a GPU (CI); run on a GPU with `python -m pytest tests/test_gpu.py` (benchmarks/gpu_session.sh). What a CPU
can reproduce of the GPU path is in tests/test_gpu_path.py."""
import copy

import numpy as np
import pytest
import torch
from test_maml import batch_of, make_episode

from fsl.config import ConfigError
from fsl.data.augment import augment, plan_augmentation
from fsl.data.transforms import Taps, tap_patches
from fsl.device.precision import apply_precision, autocast, check_precision, honoured_precisions
from fsl.maml import InnerLoop, meta_train_step
from fsl.models import build_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_settings_the_cpu_cannot_honour_are_refused():
    with pytest.raises(ConfigError, match="precision=tf32 is a CUDA setting .* fix: precision=fp32"):
        check_precision("tf32", torch.device("cpu"))
    assert honoured_precisions(torch.device("cpu")) == ["fp32"]


@cuda
def test_precision_flags():
    device = torch.device("cuda")
    apply_precision("fp32", device)
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    if "tf32" in honoured_precisions(device):
        apply_precision("tf32", device)
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    apply_precision("fp32", device)


def meta_gradient(model, episodes, loop, parallel, precision="fp32"):
    model = copy.deepcopy(model)
    with autocast(precision, episodes.query_x.device):
        meta_train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), episodes, loop, parallel_tasks=parallel)
    return torch.cat([p.grad.flatten() for p in model.parameters()]).double()


@cuda
@pytest.mark.parametrize("arch", ["conv4", "resnet12"])
def test_batched_meta_gradient_on_the_gpu_in_float64(arch):
    torch.manual_seed(0)
    model = build_model(arch, ways=3, image_size=16).double().cuda()
    episodes = batch_of(*(make_episode(ways=3, shots=2, queries=4, seed=s) for s in range(3)))
    episodes = type(episodes)(*(t.cuda() for t in episodes))
    loop = InnerLoop(2, 0.1)
    one, batched = meta_gradient(model, episodes, loop, 1), meta_gradient(model, episodes, loop, 3)
    assert ((batched - one).norm() / one.norm()).item() <= 1e-10


@cuda
def test_bf16_meta_gradient_points_the_fp32_way():
    if "bf16" not in honoured_precisions(torch.device("cuda")):
        pytest.skip("no bf16 on this GPU")
    torch.manual_seed(0)
    model = build_model("conv4", ways=3, image_size=32).cuda()
    episodes = batch_of(*(make_episode(ways=3, shots=2, queries=4, size=32, seed=s) for s in range(2)))
    episodes = type(episodes)(*((t.float() if t.is_floating_point() else t).cuda() for t in episodes))
    loop = InnerLoop(2, 0.1)
    fp32, bf16 = meta_gradient(model, episodes, loop, 2), meta_gradient(model, episodes, loop, 2, "bf16")
    assert torch.nn.functional.cosine_similarity(fp32, bf16, dim=0) > 0.9


@cuda
def test_augmentation_on_the_gpu_matches_the_cpu():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 84, 84), dtype=torch.uint8, generator=generator)
    params = np.array([[10, 5, 60, 70, i % 2, *((0, 1, 2, 3) if i % 3 else (2, 3, 1, 0)), 1.2, 0.8, 1.1]
                       for i in range(16)], dtype=np.float64)
    plan = plan_augmentation(params, 84)
    patches = tap_patches(images[plan.order], Taps(torch.from_numpy(plan.rows), torch.from_numpy(plan.cols),
                                                   plan.row_weights, plan.col_weights))
    cpu = augment(patches, plan, 84)
    gpu = augment(patches.cuda(), plan.to(torch.device("cuda")), 84).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-4)


@cuda
def test_steady_state_training_steps_make_no_host_sync_on_the_gpu(tmp_path, monkeypatch):
    """The training loop of tests/test_step_syncs.py on CUDA, every steady-state step (its episodes included) under
    torch.cuda.set_sync_debug_mode("error"): any sync, a blocking copy among them, raises."""
    from conftest import MINI_84, REPO, STORE_CACHE, fixture_root

    from fsl.config import load_config
    from fsl.train import meta_train as train

    cfg = load_config(REPO / "experiments/mini-imagenet-conv4-5shot.yaml", [
        f"data.root={fixture_root('mini-imagenet')}", MINI_84, f"data.cache_dir={STORE_CACHE}", "data.workers=0",
        "device=cuda", "train.meta_batch=4", "train.tasks=24", "train.log_every=24", "train.val_every=24",
        "train.val_episodes=2", "train.tensorboard=false", f"work_dir={tmp_path}", f"results_dir={tmp_path / 'r'}"])
    real_step, steps = train.meta_train_step, []

    def strict_step(*args, **kwargs):
        steps.append(1)
        if len(steps) == 1:
            return real_step(*args, **kwargs)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real_step(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    monkeypatch.setattr(train, "meta_train_step", strict_step)
    train.run(cfg)
    assert len(steps) == 6


@cuda
def test_the_episode_stream_builds_on_a_side_stream_the_same_episodes(tmp_path):
    """EpisodeStream on CUDA (copy and augmentation on a side stream, event-ordered) gives the episodes that
    building them in the consumer's stream gives."""
    from conftest import fixture_root

    from fsl.data import load_split, store
    from fsl.data.episodes import EpisodeDataset, EpisodeMaker, EpisodeStream, episode_loader

    dataset = load_split("mini-imagenet", fixture_root("mini-imagenet"), "train")
    images = store.open_store(dataset, "mini-imagenet", "train", "train", 84, tmp_path)
    episodes = EpisodeDataset(dataset, 5, 5, 16, seed=0, count=16, image_sizes=images.sizes)
    make = EpisodeMaker(images, 5, 5, 16, 84, torch.device("cuda"))
    direct = [make(specs) for specs in episode_loader(episodes, 4, 0)]
    with EpisodeStream(episode_loader(episodes, 4, 0), make) as stream:
        streamed = list(stream)
    assert len(streamed) == len(direct) == 4
    for a, b in zip(streamed, direct):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


@cuda
def test_auto_group_fits_the_gpu_and_is_recorded():
    from fsl.maml import batching
    device = torch.device("cuda")
    x = torch.zeros(1, device=device)
    group, why = batching.resolve("auto", 8, device, lambda group: torch.empty(2**20, device=device) + x)
    assert group == 8 and "MiB per task" in why
    assert batching.balanced_group(8, 5) == 4 and batching.balanced_group(8, 3) == 3


@cuda
def test_fused_adam_skips_a_non_finite_step_on_the_device_and_drops_the_flag():
    from fsl.maml import meta_optimizer
    torch.manual_seed(0)
    model = build_model("conv4", ways=3, image_size=16).cuda()
    optimizer = meta_optimizer(list(model.parameters()), 1e-3)
    episodes = batch_of(*(make_episode(ways=3, shots=2, queries=3, seed=s) for s in range(2)))
    episodes = type(episodes)(*((t.float() if t.is_floating_point() else t).cuda() for t in episodes))
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        episodes.query_x[0, 0, 0, 0, 0] = float("nan")
    stats = meta_train_step(model, optimizer, episodes, InnerLoop(1, 0.1))
    assert stats[2].item() == 1.0 and not hasattr(optimizer, "found_inf")
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def cuda_run(tmp_path, *extra):
    from conftest import MINI_84, REPO, STORE_CACHE, fixture_root

    from fsl.config import load_config
    return load_config(REPO / "experiments/mini-imagenet-conv4-5shot.yaml", [
        f"data.root={fixture_root('mini-imagenet')}", MINI_84, f"data.cache_dir={STORE_CACHE}", "data.workers=0",
        "device=cuda", "train.meta_batch=4", "train.tasks=8", "train.log_every=4", "train.val_every=8",
        "train.val_episodes=4", "train.tensorboard=false", f"work_dir={tmp_path}", f"results_dir={tmp_path / 'r'}",
        *extra])


@cuda
def test_the_memory_probe_on_a_real_task_is_recorded_and_reused(tmp_path, capsys):
    from fsl.train import meta_train as train
    cfg = cuda_run(tmp_path)
    train.run(cfg)
    state = torch.load(cfg.run_dir / "latest.pth", weights_only=False)
    assert 1 <= state["parallel_tasks"] <= 4 and state["parallel_tasks_setting"] == "auto"
    assert "MiB per task" in capsys.readouterr().out and state["peak_memory_mb"] > 0
    train.run(cuda_run(tmp_path, "train.tasks=12"))
    assert "as recorded in" in capsys.readouterr().out


@cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_nccl_two_processes_train(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import MINI_84, REPO, STORE_CACHE, fixture_root
    args = [f"data.root={fixture_root('mini-imagenet')}", MINI_84, f"data.cache_dir={STORE_CACHE}", "data.workers=0",
            "device=cuda", "train.meta_batch=4", "train.tasks=8", "train.val_every=8", "train.val_episodes=4",
            f"work_dir={tmp_path}", f"results_dir={tmp_path / 'r'}"]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "fsl", "train", str(REPO / "experiments/mini-imagenet-conv4-1shot.yaml"), *args],
                            cwd=REPO, capture_output=True, text=True, env=os.environ)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.load(tmp_path / "mini-imagenet-conv4-1shot" / "latest.pth", weights_only=False)["tasks_done"] == 8
