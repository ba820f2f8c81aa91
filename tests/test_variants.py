"""The MAML family (#17): each variant's meta-gradient against an independent torch.autograd reference in float64,
MAML++'s loss weights, per-step BatchNorm, resume, meta-test with the learned rates, and the refusals."""
import pytest
import torch
import torch.nn.functional as F
from conftest import MINI_84, REPO, STORE_CACHE, fixture_root
from test_maml import batch_of, make_episode, plain_copy
from torch.func import functional_call

from fsl.config import ConfigError, load_config
from fsl.maml import InnerLoop, InnerRates, task_meta_gradient
from fsl.maml.schedule import msl_weights
from fsl.models import build_model
from fsl.train import checkpoint
from fsl.train import meta_test as evaluate
from fsl.train import meta_train as train

STEPS, LR = 2, 0.1


def float64_setup(per_step_bn: int = 0, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("conv4", ways=3, image_size=16, per_step_bn=per_step_bn).double()
    torch.nn.init.normal_(model.classifier.weight, std=0.1)
    return model, make_episode(ways=3, shots=2, queries=4, seed=seed)


def loss_at(model, params: dict, x, y) -> torch.Tensor:
    return F.cross_entropy(functional_call(plain_copy(model), params, (x,)), y)


def grads_of(tensors) -> torch.Tensor:
    return torch.cat([t.grad.flatten() for t in tensors])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_anil_meta_gradient_equals_a_head_only_reference():
    """ANIL: the inner loop adapts the head on the body's features; the body's meta-gradient flows through them."""
    model, episode = float64_setup()
    task_meta_gradient(model, batch_of(episode), InnerLoop(STEPS, LR, head_only=True))
    params = dict(model.named_parameters())
    fast = dict(params)
    for _ in range(STEPS):
        heads = {n: p for n, p in fast.items() if n.startswith("classifier.")}
        grads = torch.autograd.grad(loss_at(model, fast, episode.support_x, episode.support_y), list(heads.values()),
                                    create_graph=True)
        fast = {**fast, **{n: p - LR * g for (n, p), g in zip(heads.items(), grads)}}
    reference = torch.autograd.grad(loss_at(model, fast, episode.query_x, episode.query_y), list(params.values()))
    error = relative(grads_of(model.parameters()), torch.cat([g.flatten() for g in reference]))
    print(f"\nANIL meta-gradient vs head-only reference: {error:.1e}")
    assert error <= 1e-10


@pytest.mark.parametrize("kind", ["per_element", "per_layer_per_step"])
def test_learned_rates_get_the_reference_gradient(kind):
    """Meta-SGD (a rate per weight) and MAML++ LSLR (a rate per tensor and step): the model's and the rates'
    meta-gradients equal a reference inner loop with the rates as tensors, fast = w - rate * grad."""
    model, episode = float64_setup()
    loop = InnerLoop(STEPS, LR)
    rates = InnerRates(model, loop, kind, LR).double()
    with torch.no_grad():  # rates that differ per tensor (and step): a test that could tell them apart
        for i, rate in enumerate(rates.rates):
            rate.mul_(1 + 0.1 * i + 0.05 * torch.rand_like(rate))
    task_meta_gradient(model, batch_of(episode), loop, rates=rates)
    params = dict(model.named_parameters())
    ref_rates = [r.detach().clone().requires_grad_() for r in rates.rates]
    fast = dict(params)
    for step in range(STEPS):
        grads = torch.autograd.grad(loss_at(model, fast, episode.support_x, episode.support_y), list(fast.values()),
                                    create_graph=True)
        fast = {n: p - (r if kind == "per_element" else r[step]) * g
                for (n, p), g, r in zip(fast.items(), grads, ref_rates)}
    wrt = list(params.values()) + ref_rates
    reference = torch.autograd.grad(loss_at(model, fast, episode.query_x, episode.query_y), wrt)
    reference = torch.cat([g.flatten() for g in reference])
    error = relative(torch.cat([grads_of(model.parameters()), grads_of(rates.rates)]), reference)
    rate_error = relative(grads_of(rates.rates), torch.cat([g.flatten() for g in reference[-sum(
        r.numel() for r in ref_rates):].split([r.numel() for r in ref_rates])]))
    print(f"\n{kind}: meta-gradient (weights and rates) vs reference {error:.1e}, rates alone {rate_error:.1e}")
    assert error <= 1e-10 and rate_error <= 1e-10 and grads_of(rates.rates).norm() > 0


def test_msl_weights_follow_maml_plus_plus():
    """get_per_step_loss_importance_vector with 5 steps: 1/5 each; halfway through the annealing the four first at
    0.1 and the last at 0.6; at its end 0.006 and 0.976; afterwards the last step alone."""
    assert msl_weights(5, 0.0, 0.15) == pytest.approx([0.2] * 5)
    assert msl_weights(5, 0.075, 0.15) == pytest.approx([0.1] * 4 + [0.6])
    assert msl_weights(5, 0.1499999, 0.15) == pytest.approx([0.006] * 4 + [0.976], abs=1e-5)
    assert msl_weights(5, 0.15, 0.15) is None and msl_weights(1, 0.0, 0.15) is None


def test_multi_step_loss_is_the_weighted_sum_of_per_step_query_losses():
    model, episode = float64_setup()
    weights = [0.3, 0.7]
    task_meta_gradient(model, batch_of(episode), InnerLoop(STEPS, LR), step_weights=weights)
    params = dict(model.named_parameters())
    fast, outer = dict(params), 0.0
    for step in range(STEPS):
        grads = torch.autograd.grad(loss_at(model, fast, episode.support_x, episode.support_y), list(fast.values()),
                                    create_graph=True)
        fast = {n: p - LR * g for (n, p), g in zip(fast.items(), grads)}
        outer = outer + weights[step] * loss_at(model, fast, episode.query_x, episode.query_y)
    reference = torch.cat([g.flatten() for g in torch.autograd.grad(outer, list(params.values()))])
    error = relative(grads_of(model.parameters()), reference)
    print(f"\nmulti-step loss meta-gradient vs the hand-weighted sum: {error:.1e}")
    assert error <= 1e-10


def test_per_step_batchnorm_weights_are_used_at_their_step_and_not_adapted():
    """MAML++ BNWB: step k's forwards (support at step k, query after it) use row k of every BatchNorm weight and
    bias; these are meta-learned (they get a gradient) but not adapted."""
    model, episode = float64_setup(per_step_bn=STEPS)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "steps") and module.steps:
                module.weight.copy_(torch.rand_like(module.weight) + 0.5)
                module.bias.copy_(torch.randn_like(module.bias) * 0.1)
    task_meta_gradient(model, batch_of(episode), InnerLoop(STEPS, LR, per_step_bn=True))
    params = dict(model.named_parameters())
    norms = {n for n in params if params[n].dim() == 2 and n.startswith("features.")}
    assert len(norms) == 8  # weight and bias of 4 BatchNorm layers, (steps, C) each

    def at_step(fast: dict, step: int) -> dict:
        return {n: (params[n][step] if n in norms else p) for n, p in fast.items()}
    fast = {n: p for n, p in params.items() if n not in norms}
    for step in range(STEPS):
        adapted = list(fast)
        grads = torch.autograd.grad(loss_at(model, at_step({**fast, **{n: params[n] for n in norms}}, step),
                                            episode.support_x, episode.support_y), [fast[n] for n in adapted],
                                    create_graph=True)
        fast = {n: fast[n] - LR * g for n, g in zip(adapted, grads)}
    last = at_step({**fast, **{n: params[n] for n in norms}}, STEPS - 1)
    reference = torch.autograd.grad(loss_at(model, last, episode.query_x, episode.query_y), list(params.values()))
    error = relative(grads_of(model.parameters()), torch.cat([g.flatten() for g in reference]))
    print(f"\nper-step BatchNorm meta-gradient vs reference: {error:.1e}")
    assert error <= 1e-10
    first_rows = torch.cat([params[n].grad[0] for n in sorted(norms)])
    assert first_rows.norm() > 0  # step 0's rows shape the adaptation, so they are meta-learned too


def tiny(tmp_path, *extra):
    return [f"data.root={fixture_root('mini-imagenet')}", MINI_84, "data.image_size=28", "data.workers=0", "train.parallel_tasks=1", "test.parallel_episodes=1",
            f"data.cache_dir={STORE_CACHE}", "device=cpu", "train.meta_batch=2", "train.queries=2",
            "train.val_episodes=2", "train.log_every=2", "test.episodes=3", f"work_dir={tmp_path / 'work'}",
            f"results_dir={tmp_path / 'results'}", *extra]


VARIANT_RUNS = {
    "fomaml": ["maml.variant=fomaml"],
    "anil": ["maml.variant=anil"],
    "metasgd": ["maml.variant=metasgd"],
    # every MAML++ switch moves within the 8 tasks: first order for the first 8/3, MSL annealing over all 8
    "maml++": ["maml.variant=maml++", "maml.test_inner_steps=2", "maml.msl_fraction=1.0"],
}


@pytest.mark.parametrize("variant", sorted(VARIANT_RUNS))
def test_each_variant_resumes_bit_identically_and_tests_with_its_learned_parameters(variant, tmp_path):
    config = REPO / "experiments/mini-imagenet-conv4-1shot.yaml"
    settings = VARIANT_RUNS[variant]
    straight = load_config(config, tiny(tmp_path / "a", "train.tasks=8", "train.val_every=4", *settings))
    train.run(straight)
    half = load_config(config, tiny(tmp_path / "b", "train.tasks=4", "train.val_every=4", *settings))
    if variant == "maml++":  # the schedule (cosine, annealing) depends on train.tasks: resume needs the same value
        half = load_config(config, tiny(tmp_path / "b", "train.tasks=8", "train.val_every=4", *settings))
        stop_after_first_validation(half)
    else:
        train.run(half)
    resumed = load_config(config, tiny(tmp_path / "b", "train.tasks=8", "train.val_every=4", *settings))
    train.run(resumed)
    a = torch.load(straight.run_dir / "latest.pth", weights_only=False)
    b = torch.load(resumed.run_dir / "latest.pth", weights_only=False)
    assert a["tasks_done"] == b["tasks_done"] == 8 and straight.run_dir.name.endswith(f"-{variant}")
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    if a["rates"] is not None:
        for name, value in a["rates"].items():
            assert torch.equal(value, b["rates"][name]), name
        # they were learned (all but the rates of the conv biases before a BatchNorm, whose gradient is zero)
        moved = [not torch.equal(v, torch.full_like(v, straight.maml.inner_lr)) for v in a["rates"].values()]
        assert sum(moved) >= len(moved) // 2 + 1
    model, rates, _, _ = checkpoint.load_checkpoint_model(straight.run_dir / "latest.pth", straight, "cpu")
    if rates is not None:  # meta-test adapts with the learned rates, not fresh ones
        assert all(torch.equal(r, a["rates"][n]) for n, r in rates.state_dict().items())
    row = evaluate.run(straight, straight.run_dir / "best_accuracy_mean.pth")
    assert row["variant"] == variant and row["run"] == f"mini-imagenet-conv4-1shot-{variant}"


def stop_after_first_validation(cfg):
    """Run `cfg` and interrupt it after its first checkpoint, as a Ctrl-C would."""
    real = checkpoint.save_checkpoint
    calls = []

    def save_then_stop(path, *args):
        real(path, *args)
        if path.name == "latest.pth":
            calls.append(path)
            raise KeyboardInterrupt
    checkpoint.save_checkpoint = save_then_stop
    try:
        with pytest.raises(KeyboardInterrupt):
            train.run(cfg)
    finally:
        checkpoint.save_checkpoint = real
    assert torch.load(calls[0], weights_only=False)["tasks_done"] == 4


@pytest.mark.parametrize("overrides,message", [
    (["maml.variant=reptile"], "is not one of maml, fomaml, anil, metasgd, maml\\+\\+"),
    (["maml.adapt=body"], "choose one of all, head"),
    (["maml.learned_lr=adam"], "choose one of none, per_element, per_layer_per_step"),
    (["maml.variant=maml++"], "cannot take more steps .* fix: maml.test_inner_steps=2"),
    (["maml.per_step_bn=true", "maml.inner_steps=5"], None),
    (["maml.variant=anil", "maml.per_step_bn=true"], "ANIL never runs the body per inner step"),
    (["maml.zero_head=true", "maml.variant=metasgd"], "zero-head step uses maml.inner_lr"),
    (["maml.variant=fomaml", "maml.first_order=false"], "means maml.first_order=True, but the command says"),
    (["maml.first_order=true", "maml.first_order_fraction=0.5"], "first order throughout"),
    (["maml.msl_fraction=1.5"], "between 0 and 1"),
])
def test_settings_a_variant_cannot_honour_are_refused(overrides, message):
    config = REPO / "experiments/mini-imagenet-conv4-1shot.yaml"
    if message is None:
        assert load_config(config, overrides).maml.per_step_bn
        return
    with pytest.raises(ConfigError, match=message):
        load_config(config, overrides)


def test_variant_file_on_a_cell_file(tmp_path):
    """A ready variant config names its cell's config as base (two levels at most)."""
    variant = REPO / "experiments/variants/glyphs-conv4-1shot-anil.yaml"
    cfg = load_config(variant)
    assert (cfg.cell, cfg.maml.adapt, cfg.data.image_size, cfg.run_name) == \
        ("glyphs-conv4-1shot", "head", 20, "glyphs-conv4-1shot-anil")
    (tmp_path / "deep.yaml").write_text(f"base: {variant}\n")
    with pytest.raises(ConfigError, match="at most two levels"):
        load_config(tmp_path / "deep.yaml")
