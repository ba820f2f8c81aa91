"""Every inner-loop combination the config accepts, against one independent reference, in float64, with 1 and 3
tasks adapted at once (the task-batched path that `parallel_tasks=auto` takes on a GPU).

The reference shares no code with fsl/maml/loop.py: torch.nn's own layers (`plain_copy`), torch.func.functional_call
and torch.autograd.grad, one task at a time, written from the papers' definitions:
    fast_k+1 = fast_k - rate_k * g_k,  g_k = d L_support(fast_k) / d fast_k   (a constant when first order)
    outer    = sum_k w_k * L_query(fast_k+1)   (the last step alone without the multi-step loss)
    meta-gradient = d outer / d (meta-parameters, learned rates), averaged over the meta-batch.
"""
import pytest
import torch
import torch.nn.functional as F
from test_maml import batch_of, make_episode, plain_copy
from torch.func import functional_call

from fsl.maml import InnerLoop, InnerRates, meta_train_step
from fsl.models import TaskBatchNorm2d, build_model

STEPS, LR = 2, 0.1

# name: (InnerLoop switches, learned rates kind or None, multi-step loss weights or None); each row is a loop that
# some accepted config runs (MAML++'s first third is its first-order phase; DA + MSL without learned rates is the
# first-order phase of maml.first_order_fraction with maml.multi_step_loss)
COMBINATIONS = {
    "maml": ({}, None, None),
    "fomaml": ({"first_order": True}, None, None),
    "anil": ({"head_only": True}, None, None),
    "anil first order": ({"head_only": True, "first_order": True}, None, None),
    "metasgd": ({}, "per_element", None),
    "metasgd first order": ({"first_order": True}, "per_element", None),
    "maml + msl": ({}, None, [0.3, 0.7]),
    "fomaml + msl (DA + MSL first-order phase)": ({"first_order": True}, None, [0.3, 0.7]),
    "maml++": ({"per_step_bn": True}, "per_layer_per_step", [0.3, 0.7]),
    "maml++ first-order phase": ({"per_step_bn": True, "first_order": True}, "per_layer_per_step", [0.3, 0.7]),
    "lslr without bnwb": ({}, "per_layer_per_step", None),
}


def setup(name: str):
    switches, kind, weights = COMBINATIONS[name]
    torch.manual_seed(0)
    model = build_model("conv4", ways=3, image_size=16, per_step_bn=STEPS if switches.get("per_step_bn") else 0)
    model = model.double()
    torch.nn.init.normal_(model.classifier.weight, std=0.1)
    with torch.no_grad():  # per-step BatchNorm rows that differ, so that using the wrong row would show
        for module in model.modules():
            if isinstance(module, TaskBatchNorm2d) and module.steps:
                module.weight.copy_(torch.rand_like(module.weight) + 0.5)
                module.bias.copy_(torch.randn_like(module.bias) * 0.1)
    loop = InnerLoop(STEPS, LR, **switches)
    rates = None
    if kind is not None:
        rates = InnerRates(model, loop, kind, LR).double()
        with torch.no_grad():
            for i, rate in enumerate(rates.rates):
                rate.mul_(1 + 0.1 * i + 0.05 * torch.rand_like(rate))
    return model, loop, rates, weights


def reference_gradient(model, rates, episode, loop: InnerLoop, weights) -> torch.Tensor:
    """d outer / d (model parameters, rates) of one task, from the definitions (module docstring)."""
    plain = plain_copy(model)
    params = dict(model.named_parameters())
    norms = {n for n, p in params.items() if n.startswith("features.") and p.dim() == 2}  # per-step BN: (S, C)
    adapted = [n for n in params if (n.startswith("classifier.") if loop.head_only else n not in norms)]
    rate_list = [r.detach().clone().requires_grad_() for r in rates.rates] if rates is not None else []

    def logits(fast: dict, x: torch.Tensor, step: int) -> torch.Tensor:
        full = {**params, **fast, **{n: params[n][step] for n in norms}}
        return functional_call(plain, full, (x,))

    fast = {n: params[n] for n in adapted}
    outer = 0.0
    for step in range(loop.steps):
        loss = F.cross_entropy(logits(fast, episode.support_x, step), episode.support_y)
        grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not loop.first_order)
        if rates is None:
            step_rates = [LR] * len(adapted)
        else:
            step_rates = [r if rates.kind == "per_element" else r[step] for r in rate_list]
        fast = {n: p - rate * (g.detach() if loop.first_order else g)
                for (n, p), g, rate in zip(fast.items(), grads, step_rates)}
        if weights is not None or step == loop.steps - 1:
            query = F.cross_entropy(logits(fast, episode.query_x, step), episode.query_y)
            outer = outer + (1.0 if weights is None else weights[step]) * query
    wrt = list(params.values()) + rate_list
    grads = torch.autograd.grad(outer, wrt, allow_unused=True)
    return torch.cat([(torch.zeros_like(w) if g is None else g).flatten() for g, w in zip(grads, wrt)])


def fsl_gradient(model, rates, episodes, loop, weights, parallel: int) -> torch.Tensor:
    """fsl's meta-gradient of the meta-batch (zero-lr SGD: the weights stay)."""
    wrt = list(model.parameters()) + (list(rates.parameters()) if rates is not None else [])
    meta_train_step(model, torch.optim.SGD(wrt, lr=0.0), episodes, loop, rates, weights, parallel_tasks=parallel)
    return torch.cat([p.grad.flatten() for p in wrt])


@pytest.mark.parametrize("tasks", [1, 3], ids=["T=1", "T=3"])
@pytest.mark.parametrize("name", sorted(COMBINATIONS))
def test_meta_gradient_equals_the_independent_reference(name, tasks):
    model, loop, rates, weights = setup(name)
    episodes = [make_episode(ways=3, shots=2, queries=4, seed=s) for s in range(3)]
    reference = torch.stack([reference_gradient(model, rates, e, loop, weights) for e in episodes]).mean(0)
    ours = fsl_gradient(model, rates, batch_of(*episodes), loop, weights, parallel=tasks)
    error = ((ours - reference).norm() / reference.norm()).item()
    print(f"\n{name}, {tasks} task(s) at once: relative difference to the reference {error:.1e}")
    assert reference.norm() > 0 and error <= 1e-10
    if weights is not None:  # the earlier step's loss counts: another weighting gives another gradient
        other = torch.stack([reference_gradient(model, rates, e, loop, [0.0, 0.7]) for e in episodes]).mean(0)
        assert ((other - reference).norm() / reference.norm()).item() > 1e-3
