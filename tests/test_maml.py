"""MAML correctness against independent computations, in float64 on CPU (run with -v -s to see the errors)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from fsl.episodes import Episode
from fsl.maml import (NonFiniteLossError, adapt, check_meta_gradients, evaluate_episode, meta_parameters,
                      meta_train_step, task_meta_gradient)
from fsl.models import build_model


def make_episode(ways=3, shots=2, queries=3, size=16, seed=0) -> Episode:
    g = torch.Generator().manual_seed(seed)
    labels = lambda n: torch.arange(ways).repeat_interleave(n)  # noqa: E731
    return Episode(torch.randn(ways * shots, 3, size, size, generator=g, dtype=torch.float64), labels(shots),
                   torch.randn(ways * queries, 3, size, size, generator=g, dtype=torch.float64), labels(queries))


def reference_query_loss(model, params: dict, episode: Episode, steps: int, lr: float, create_graph: bool):
    """Plain functional MAML: SGD steps with torch.autograd.grad, independent of higher."""
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
    task_meta_gradient(model, episode, steps=2, inner_lr=0.01, first_order=first_order)
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
    task_meta_gradient(second, episode, steps=2, inner_lr=0.01, first_order=False)
    assert max_relative_error(second, reference) > 1e-6


def test_second_order_meta_gradient_matches_finite_differences():
    torch.manual_seed(0)
    model = build_model("conv4", ways=3, image_size=16).double()
    episode = make_episode()
    task_meta_gradient(model, episode, steps=2, inner_lr=0.1, first_order=False)
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
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    episode = Episode(*(t.float() if t.is_floating_point() else t for t in make_episode()))
    losses = [meta_train_step(model, optimizer, [episode, episode], inner_steps=2, inner_lr=0.01)[0]
              for _ in range(15)]
    print(f"\nquery loss over 15 outer steps: {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.5 * losses[0]


def test_meta_batch_gradient_is_the_mean_of_task_gradients():
    torch.manual_seed(0)
    model = build_model("conv4", ways=3, image_size=16).double()
    episodes = [make_episode(seed=s) for s in range(2)]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    before = copy.deepcopy(model)
    meta_train_step(model, optimizer, episodes, inner_steps=1, inner_lr=0.01)  # SGD lr 1: delta = -mean grad
    expected = [p.detach().clone() for p in before.parameters()]
    for episode in episodes:
        single = copy.deepcopy(before)
        task_meta_gradient(single, episode, 1, 0.01, False)
        for i, p in enumerate(single.parameters()):
            expected[i] -= p.grad / len(episodes)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-10, atol=1e-12)


def test_evaluation_leaves_meta_weights_bit_identical():
    torch.manual_seed(0)
    model = build_model("conv4", ways=3, image_size=16)
    before = copy.deepcopy(model.state_dict())
    episode = Episode(*(t.float() if t.is_floating_point() else t for t in make_episode()))
    accuracies = [evaluate_episode(model, episode, steps=5, inner_lr=0.01) for _ in range(20)]
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
    fmodel = adapt(model, episode.support_x, episode.support_y, steps=1, inner_lr=lr)
    fast = dict(zip([name for name, _ in model.named_parameters()], fmodel.fast_params))
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
        meta_train_step(model, optimizer, [episode], inner_steps=1, inner_lr=lr)
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
        task_meta_gradient(model, episode, steps, inner_lr=0.4, first_order=first_order, zero_head=shortcut)
        gradients.append(torch.cat([p.grad.flatten() for p in model.features.parameters()]))
    full, shortcut = gradients
    error = ((full - shortcut).norm() / full.norm()).item()
    print(f"\nsteps={steps} first_order={first_order}: backbone meta-gradient relative difference {error:.1e}")
    assert full.norm() > 0 and error <= 1e-12
    accuracies = [evaluate_episode(model, episode, steps=5, inner_lr=0.4, zero_head=z) for z in (False, True)]
    assert accuracies[0] == accuracies[1]


def test_non_finite_meta_gradient_is_an_error():
    model = build_model("conv4", ways=3, image_size=16)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    model.features[0].bias.grad[1] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"non-finite meta-gradient \(NaN or inf\) in \['features.0.bias'\]"):
        check_meta_gradients(model)


def test_nan_query_loss_stops_before_the_optimizer_step():
    torch.manual_seed(0)
    model = build_model("conv4", ways=3, image_size=16)
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    episode = Episode(*(t.float() if t.is_floating_point() else t for t in make_episode()))
    with pytest.raises(NonFiniteLossError):
        meta_train_step(model, optimizer, [episode], inner_steps=2, inner_lr=1e30)
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
