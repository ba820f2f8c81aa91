"""MAML correctness against independent computations, in float64 on CPU (run with -v -s to see the errors).

References: a plain functional MAML with torch.autograd.grad on torch.nn's own layers (`plain_copy`), and, for the
task-batched inner loop, the same loop run one task at a time."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fsl.data.episodes import Episode, collate_episodes
from fsl.maml import (
    InnerLoop,
    adapt,
    check_meta_gradients,
    evaluate_episode,
    evaluate_tasks,
    meta_optimizer,
    meta_parameters,
    meta_train_step,
    non_finite,
    task_meta_gradient,
)
from fsl.models import (
    FewShotClassifier,
    ResidualBlock,
    StepSequential,
    TaskBatchNorm2d,
    TaskConv2d,
    TaskLinear,
    build_model,
)


def make_episode(ways=3, shots=2, queries=3, size=16, seed=0) -> Episode:
    g = torch.Generator().manual_seed(seed)
    labels = lambda n: torch.arange(ways).repeat_interleave(n)  # noqa: E731
    return Episode(torch.randn(ways * shots, 3, size, size, generator=g, dtype=torch.float64), labels(shots),
                   torch.randn(ways * queries, 3, size, size, generator=g, dtype=torch.float64), labels(queries))


class PlainResidualBlock(ResidualBlock):
    """ResidualBlock's wiring on torch.nn's layers (which take no inner step)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.pool(self.act(out + self.shortcut(x)))


class PlainClassifier(FewShotClassifier):
    """FewShotClassifier for one task's (N, C, H, W) images on torch.nn's layers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def plain_copy(model: nn.Module) -> nn.Module:
    """The same network (the same parameter tensors) with torch.nn's own Conv2d/BatchNorm2d/Linear/Sequential forwards
    instead of fsl's task-batched ones: an independent reference for T = 1."""
    plain = copy.copy(model)  # shares the parameters
    plain._modules = {name: plain_copy(child) for name, child in model._modules.items()}
    if isinstance(model, (TaskConv2d, TaskBatchNorm2d, TaskLinear, StepSequential)):
        plain.__class__ = type(model).__mro__[1]  # nn.Conv2d, nn.BatchNorm2d, nn.Linear, nn.Sequential
    elif isinstance(model, ResidualBlock):
        plain.__class__ = PlainResidualBlock
    elif isinstance(model, FewShotClassifier):
        plain.__class__ = PlainClassifier
    return plain


def test_plain_copy_uses_torch_nn_layers():
    model = build_model("resnet12", ways=5, image_size=16)
    classes = {type(m) for m in plain_copy(model).modules()}
    assert not classes & {TaskConv2d, TaskBatchNorm2d, TaskLinear} and nn.Conv2d in classes
    assert {type(m) for m in model.modules()} >= {TaskConv2d, TaskBatchNorm2d, TaskLinear}  # the model is untouched


def batch_of(*episodes: Episode) -> Episode:
    return collate_episodes(list(episodes))


def reference_query_loss(model, params: dict, episode: Episode, steps: int, lr: float, create_graph: bool):
    """Plain functional MAML: SGD steps with torch.autograd.grad on torch.nn's layers, independent of higher."""
    model = plain_copy(model)
    fast = dict(params)
    for _ in range(steps):
        loss = F.cross_entropy(functional_call(model, fast, (episode.support_x,)), episode.support_y)
        grads = torch.autograd.grad(loss, list(fast.values()), create_graph=create_graph)
        fast = {name: p - lr * g for (name, p), g in zip(fast.items(), grads)}
    if not create_graph:  # first order: treat the adapted weights as constants w.r.t. the meta-parameters
        fast = {name: p.detach().requires_grad_() for name, p in fast.items()}
    return F.cross_entropy(functional_call(model, fast, (episode.query_x,)), episode.query_y), fast


def max_relative_error(model, reference: list[torch.Tensor]) -> float:
    ours = torch.cat([p.grad.flatten() for p in model.parameters()])
    ref = torch.cat([g.flatten() for g in reference])
    return ((ours - ref).norm() / ref.norm()).item()


def meta_gradient_and_reference(arch: str, first_order: bool):
    """A float64 model whose .grad holds fsl's meta-gradient of one episode (2 steps, lr 0.01), and the functional
    reference's query loss with the tensors to differentiate it by."""
    torch.manual_seed(0)
    model = build_model(arch, ways=3, image_size=16).double()
    episode = make_episode(size=16)
    task_meta_gradient(model, batch_of(episode), InnerLoop(2, 0.01, first_order))
    params = dict(model.named_parameters())
    loss, fast = reference_query_loss(model, params, episode, 2, 0.01, create_graph=not first_order)
    return model, episode, loss, list((fast if first_order else params).values())


@pytest.mark.parametrize("arch", ["conv4", "resnet12"])
def test_second_order_meta_gradient_matches_functional_reference(arch):
    model, _, loss, wrt = meta_gradient_and_reference(arch, first_order=False)
    reference = torch.autograd.grad(loss, wrt)
    error = max_relative_error(model, reference)
    print(f"\n{arch} second-order meta-gradient relative error vs functional reference: {error:.2e}")
    assert error <= 1e-8


def test_first_order_meta_gradient_matches_its_reference():
    model, episode, loss, wrt = meta_gradient_and_reference("conv4", first_order=True)
    check_meta_gradients(model)  # track_higher_grads=False alone would leave these None
    reference = torch.autograd.grad(loss, wrt)
    error = max_relative_error(model, reference)
    print(f"\nconv4 first-order meta-gradient relative error vs reference: {error:.2e}")
    assert error <= 1e-10
    # and it really is different from the second-order gradient
    second = build_model("conv4", ways=3, image_size=16).double()
    second.load_state_dict(model.state_dict())
    task_meta_gradient(second, batch_of(episode), InnerLoop(2, 0.01))
    assert max_relative_error(second, reference) > 1e-6


def test_second_order_meta_gradient_matches_finite_differences():
    torch.manual_seed(0)
    model = build_model("conv4", ways=3, image_size=16).double()
    episode = make_episode()
    task_meta_gradient(model, batch_of(episode), InnerLoop(2, 0.1))
    direction = [torch.randn_like(p) for p in model.parameters()]
    analytic = sum((p.grad * d).sum() for p, d in zip(model.parameters(), direction)).item()
    eps = 1e-8  # small enough not to cross a ReLU/max-pool kink (1e-6 does on this input)
    params = dict(model.named_parameters())

    def loss_at(sign: float) -> float:
        shifted = {n: (p + sign * eps * d).detach().requires_grad_() for (n, p), d in zip(params.items(), direction)}
        return reference_query_loss(model, shifted, episode, 2, 0.1, create_graph=False)[0].item()

    numeric = (loss_at(1) - loss_at(-1)) / (2 * eps)
    error = abs(analytic - numeric) / abs(numeric)
    print(f"\ndirectional derivative: analytic {analytic:.10f}, central difference {numeric:.10f}, "
          f"relative error {error:.2e}")
    assert error <= 1e-5


def test_meta_training_reduces_query_loss_on_a_fixed_task():
    torch.manual_seed(0)
    model = build_model("conv4", ways=3, image_size=16)
    optimizer = meta_optimizer(list(model.parameters()), lr=1e-3)
    episode = Episode(*(t.float() if t.is_floating_point() else t for t in make_episode()))
    losses = [meta_train_step(model, optimizer, batch_of(episode, episode), InnerLoop(2, 0.01))[0].item() / 2
              for _ in range(15)]
    print(f"\nquery loss over 15 outer steps: {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.5 * losses[0]


def test_meta_batch_gradient_is_the_mean_of_task_gradients():
    torch.manual_seed(0)
    model = build_model("conv4", ways=3, image_size=16).double()
    episodes = [make_episode(seed=s) for s in range(2)]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    before = copy.deepcopy(model)
    meta_train_step(model, optimizer, batch_of(*episodes), InnerLoop(1, 0.01))  # SGD lr 1: -mean grad
    expected = [p.detach().clone() for p in before.parameters()]
    for episode in episodes:
        single = copy.deepcopy(before)
        task_meta_gradient(single, batch_of(episode), InnerLoop(1, 0.01))
        for i, p in enumerate(single.parameters()):
            expected[i] -= p.grad / len(episodes)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-10, atol=1e-12)


def test_evaluation_leaves_meta_weights_bit_identical():
    torch.manual_seed(0)
    model = build_model("conv4", ways=3, image_size=16)
    before = copy.deepcopy(model.state_dict())
    episode = Episode(*(t.float() if t.is_floating_point() else t for t in make_episode()))
    accuracies = [evaluate_episode(model, episode, InnerLoop(5, 0.01, True)) for _ in range(20)]
    assert all(0 <= a <= 100 for a in accuracies) and len(set(accuracies)) == 1
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in model.parameters())


def test_missing_meta_gradient_is_an_error():
    model = build_model("conv4", ways=3, image_size=16)
    with pytest.raises(RuntimeError, match="without a gradient"):
        check_meta_gradients(model)


def test_zero_head_adapts_to_the_closed_form_head_and_stays_zero_under_meta_training():
    """Zeroing trick: with a zero head the first inner step leaves the backbone unchanged (d loss / d features =
    W^T (p - y) = 0) and moves the head to lr/N (Y - 1/ways)^T [features, 1]; meta-training never moves the head."""
    torch.manual_seed(0)
    ways, lr = 3, 0.4
    model = build_model("conv4", ways=ways, image_size=16, zero_head=True).double()
    assert {id(p) for p in meta_parameters(model, zero_head=True)} == \
        {id(p) for p in model.features.parameters()}
    episode = make_episode(ways=ways, shots=2)
    fmodel = adapt(model, episode.support_x[None], episode.support_y[None], InnerLoop(1, lr))
    fast = dict(zip([name for name, _ in model.named_parameters()], (p[0] for p in fmodel.fast_params)))
    for name, p in model.features.named_parameters():
        torch.testing.assert_close(fast[f"features.{name}"], p, rtol=0, atol=0)
    with torch.no_grad():
        features = model.features(episode.support_x).flatten(1)                    # (N, D)
        residual = F.one_hot(episode.support_y, ways).double() - 1 / ways          # y - softmax(0)
        expected_weight = lr / len(features) * residual.T @ features               # (ways, D)
    torch.testing.assert_close(fast["classifier.weight"], expected_weight, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(fast["classifier.bias"], torch.zeros(ways, dtype=torch.float64), rtol=0, atol=1e-15)

    backbone_before = [p.detach().clone() for p in model.features.parameters()]
    optimizer = torch.optim.Adam(meta_parameters(model, zero_head=True), lr=1e-3)
    for _ in range(2):
        meta_train_step(model, optimizer, batch_of(episode), InnerLoop(1, lr))
    assert model.classifier.weight.abs().max() == 0 and model.classifier.bias.abs().max() == 0
    moved = max((p - b).abs().max().item() for p, b in zip(model.features.parameters(), backbone_before))
    assert moved > 1e-4


@pytest.mark.parametrize("steps,first_order", [(1, False), (2, False), (2, True)])
def test_zero_head_shortcut_gives_the_full_inner_loop_backbone_meta_gradient(steps, first_order):
    """adapt(zero_head=True) skips the backbone in the first step; the backbone meta-gradient must not change."""
    torch.manual_seed(0)
    model = build_model("conv4", ways=3, image_size=16, zero_head=True).double()
    episode = make_episode(ways=3, shots=2)
    gradients = []
    for shortcut in (False, True):
        model.zero_grad(set_to_none=True)
        task_meta_gradient(model, batch_of(episode), InnerLoop(steps, 0.4, first_order, zero_head=shortcut))
        gradients.append(torch.cat([p.grad.flatten() for p in model.features.parameters()]))
    full, shortcut = gradients
    error = ((full - shortcut).norm() / full.norm()).item()
    print(f"\nsteps={steps} first_order={first_order}: backbone meta-gradient relative difference {error:.1e}")
    assert full.norm() > 0 and error <= 1e-12
    accuracies = [evaluate_episode(model, episode, InnerLoop(5, 0.4, True, zero_head=z)) for z in (False, True)]
    assert accuracies[0] == accuracies[1]


def test_missing_meta_gradient_is_an_error_and_non_finite_is_one_device_flag():
    model = build_model("conv4", ways=3, image_size=16)
    with pytest.raises(RuntimeError, match=r"without a gradient after the outer backward: \['features.0.weight'"):
        check_meta_gradients(model)
    grads = [torch.zeros_like(p) for p in model.parameters()]
    assert non_finite(grads).item() == 0
    grads[1][1] = float("nan")
    assert non_finite(grads).item() == 1 and torch.isnan(grads[1][1])  # flagged, values left as they were
    grads[1][1], grads[-1][0] = 0.0, float("-inf")
    assert non_finite(grads).item() == 1


@pytest.mark.parametrize("fused", [True, False], ids=["fused-adam", "other-optimizer"])
def test_non_finite_step_is_skipped_and_flagged_without_touching_the_weights(fused):
    """A diverging inner loop (lr 1e30): the step reports skipped=1 and neither the weights nor Adam's state move
    (fused Adam skips on the device; another optimizer is not stepped)."""
    torch.manual_seed(0)
    model = build_model("conv4", ways=3, image_size=16)
    optimizer = meta_optimizer(list(model.parameters()), 1e-3) if fused else torch.optim.SGD(model.parameters(), 0.1)
    episode = Episode(*(t.float() if t.is_floating_point() else t for t in make_episode()))
    meta_train_step(model, optimizer, batch_of(episode), InnerLoop(2, 0.01))  # one good step: Adam has state
    before = copy.deepcopy(model.state_dict())
    state_before = copy.deepcopy(optimizer.state_dict()["state"])
    stats = meta_train_step(model, optimizer, batch_of(episode), InnerLoop(2, 1e30))
    assert stats.shape == (3,) and stats[2].item() == 1.0
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
    for key, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(state_before[key][name])), (key, name)
    stats = meta_train_step(model, optimizer, batch_of(episode), InnerLoop(2, 0.01))
    assert stats[2].item() == 0.0 and any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


def meta_gradient(model: nn.Module, episodes: Episode, loop: InnerLoop, parallel_tasks: int) -> torch.Tensor:
    """fsl's meta-gradient of a meta-batch (a zero-lr optimizer leaves the weights where they are)."""
    model = copy.deepcopy(model)
    meta_train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), episodes, loop,
                    parallel_tasks=parallel_tasks)
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("arch", ["conv4", "resnet12"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("zero_head", [False, True], ids=["head", "zero_head"])
def test_task_batched_meta_gradient_equals_one_task_at_a_time(arch, first_order, zero_head):
    """#14: three tasks adapted in one batched forward (grouped convolutions, per-task BatchNorm) give the meta-
    gradient of higher's loop over the tasks one at a time, to 1e-10 in float64; support (6) and query (12) sizes
    differ; evaluation accuracies are identical."""
    torch.manual_seed(0)
    model = build_model(arch, ways=3, image_size=16, zero_head=zero_head).double()
    if not zero_head:
        nn.init.normal_(model.classifier.weight, std=0.1)  # a head that matters in every step
    episodes = batch_of(*(make_episode(ways=3, shots=2, queries=4, seed=s) for s in range(3)))
    loop = InnerLoop(2, 0.1, first_order, zero_head)
    one_at_a_time = meta_gradient(model, episodes, loop, parallel_tasks=1)
    batched = meta_gradient(model, episodes, loop, parallel_tasks=3)
    error = ((batched - one_at_a_time).norm() / one_at_a_time.norm()).item()
    print(f"\n{arch} {'first' if first_order else 'second'} order zero_head={zero_head}: batched vs one at a time "
          f"relative difference {error:.1e}")
    assert one_at_a_time.norm() > 0 and error <= 1e-10
    if arch == "conv4":  # uneven groups (2 + 1); resnet12 in float64 is slow, and the grouping code is shared
        assert meta_gradient(model, episodes, loop, parallel_tasks=2).sub(one_at_a_time).norm() \
            <= 1e-10 * one_at_a_time.norm()
    testing = InnerLoop(3, 0.5, True, zero_head)
    together = evaluate_tasks(model, episodes, testing).tolist()
    alone = [evaluate_tasks(model, Episode(*(t[i:i + 1] for t in episodes)), testing).item() for i in range(3)]
    assert together == alone
    if arch != "conv4":
        return
    # and the adapted query logits behind them
    logits = adapt(model, episodes.support_x, episodes.support_y, testing)(episodes.query_x)
    for i in range(3):
        alone = adapt(model, episodes.support_x[i:i + 1], episodes.support_y[i:i + 1], testing)
        torch.testing.assert_close(logits[i:i + 1], alone(episodes.query_x[i:i + 1]), rtol=1e-10, atol=1e-12)


def test_shared_and_per_task_weights_give_the_plain_network():
    """Task layers with T = 1 are the torch.nn layers; with T tasks, each task's slice equals its own forward."""
    torch.manual_seed(0)
    model = build_model("resnet12", ways=5, image_size=16).double()
    x = torch.randn(3, 4, 3, 16, 16, dtype=torch.float64)
    together = model(x)
    assert together.shape == (3, 4, 5)
    for t in range(3):
        torch.testing.assert_close(together[t], plain_copy(model)(x[t]), rtol=1e-12, atol=1e-12)
