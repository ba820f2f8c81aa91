import pytest
import torch

from fsl.models import TaskBatchNorm2d, build_model, count_parameters


@pytest.mark.parametrize("arch,feature_dim,parameters", [("conv4", 1600, 121_093), ("resnet12", 640, 12_427_525)])
def test_protocol_shapes_and_sizes(arch, feature_dim, parameters):
    model = build_model(arch, ways=5, image_size=84)
    assert model.feature_dim == feature_dim
    assert count_parameters(model) == parameters
    assert model(torch.randn(3, 3, 84, 84)).shape == (3, 5)


def test_head_width_follows_the_image_size():
    assert build_model("conv4", 5, image_size=28).feature_dim == 64


@pytest.mark.parametrize("arch", ["conv4", "resnet12"])
def test_batchnorm_uses_batch_statistics_in_eval_mode_too(arch):
    model = build_model(arch, 5, image_size=32)
    assert not any(name.endswith("running_mean") for name, _ in model.named_buffers())
    x = torch.randn(6, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        together = model(x)
        alone = model(x[:3])
    # batch statistics: the first three outputs depend on the rest of the batch
    assert not torch.allclose(together[:3], alone, atol=1e-4)


def test_initialisation():
    model = build_model("conv4", 5)
    conv = model.features[0]
    bn = model.features[1]
    assert torch.all(conv.bias == 0) and torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    fan_out = conv.out_channels * 9
    assert conv.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.1)


@pytest.mark.parametrize("arch", ["conv4", "resnet12"])
def test_per_step_batchnorm_weights_are_chosen_by_the_forward_step_argument(arch):
    """MAML++ BNWB without hidden state: the forward's `step` picks each BatchNorm layer's row, the same step gives
    the same output whatever ran before, and one weight per step is what each row is."""
    torch.manual_seed(0)
    model = build_model(arch, ways=5, image_size=16, per_step_bn=2).double()
    norms = [m for m in model.modules() if isinstance(m, TaskBatchNorm2d)]
    assert norms and all(m.weight.shape == (2, m.num_features) for m in norms)
    with torch.no_grad():
        for m in norms:
            m.weight[1].mul_(3.0)
            m.bias[1].add_(0.5)
    x = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    first = model(x, step=0)
    second = model(x, step=1)
    assert (first - second).abs().max() > 1e-3
    torch.testing.assert_close(model(x, step=0), first, rtol=0, atol=0)  # after a step-1 forward: no state kept
    torch.testing.assert_close(model(x), first, rtol=0, atol=0)  # default: step 0
    plain = build_model(arch, ways=5, image_size=16).double()  # one weight per layer = row 0 of the per-step model
    per_step = {f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, TaskBatchNorm2d)
                for p in ("weight", "bias")}
    plain.load_state_dict({k: v[0] if k in per_step else v for k, v in model.state_dict().items()})
    torch.testing.assert_close(plain(x), first, rtol=0, atol=0)
