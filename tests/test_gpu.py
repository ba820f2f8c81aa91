"""CUDA specifics (#14): precision flags, the task-batched loop and the batched augmentation on the GPU. Skipped on
machines without a GPU (CI); run on a GPU with `python -m pytest tests/test_gpu.py` (benchmarks/gpu_session.sh)."""
import copy

import pytest
import torch

from fsl.config import ConfigError
from fsl.data.augment import augment
from fsl.maml import InnerLoop, meta_train_step
from fsl.models import build_model
from fsl.precision import apply_precision, autocast, check_precision, honoured_precisions
from test_maml import batch_of, make_episode

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
    sizes = torch.full((16, 2), 84)
    params = torch.tensor([[10, 5, 60, 70, i % 2, 0, 1, 2, 3, 1.2, 0.8, 1.1] for i in range(16)], dtype=torch.float64)
    cpu = augment(images, params, sizes, 84)
    gpu = augment(images.cuda(), params, sizes, 84).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-4)
