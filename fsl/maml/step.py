"""The outer step of MAML and its family: the meta-gradient of a meta-batch through the inner loop
(fsl.maml.loop), and the meta-optimizer's update, with no host sync.

    task_meta_gradient   adapt T tasks together, add d(query loss)/d(meta-parameters) into .grad (second or first
                         order, MAML++'s multi-step loss)
    meta_train_step      one outer step over a meta-batch, `parallel_tasks` tasks adapted at a time; torchrun's
                         gradient all-reduce; a non-finite step skipped on the device (fused Adam's found_inf)
    meta_optimizer       the outer Adam (fused)
    evaluate_tasks       meta-test T episodes at once (validation and test), accuracies left on the device
"""
from __future__ import annotations

import torch
from torch import nn

from fsl.data.episodes import Episode
from fsl.device import distributed
from fsl.maml.loop import InnerLoop, InnerRates, adapt, adapt_steps, is_head, task_accuracies, task_losses


def task_meta_gradient(model: nn.Module, episodes: Episode, loop: InnerLoop, scale: float = 1.0,
                       rates: InnerRates | None = None,
                       step_weights: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Adapt the T tasks of `episodes` on their support sets, then add `scale` x d(sum of the T query losses) /
    d(meta-parameters) into each `p.grad` (of `model`, and of `rates`).

    `step_weights` (MAML++ multi-step loss): the outer loss is sum_k w_k x (query loss after step k) instead of the
    last step's alone. Second order back-propagates through the inner loop. First order without learned rates
    (FOMAML): each step's fast weights are constants (leaves), so the meta-gradient is sum_k w_k x the gradient of
    query loss k at fast weights k, taken step by step (higher's `track_higher_grads=False` alone would leave the
    meta-parameters without any gradient, so it is added by hand). Returns (last step's query losses (T,), query
    accuracies % (T,)), detached.
    """
    leaves = loop.first_order and rates is None  # FOMAML: every step's fast weights are leaves
    outer = 0.0
    for step, fmodel in enumerate(adapt_steps(model, episodes.support_x, episodes.support_y, loop, rates)):
        if step_weights is None and step < loop.steps - 1:
            continue
        logits = fmodel(episodes.query_x)  # per-step BatchNorm: the weights of this step
        losses = task_losses(logits, episodes.query_y)
        if leaves:
            weight = scale * (1.0 if step_weights is None else step_weights[step])
            add_gradients(model, torch.autograd.grad(losses.sum() * weight, fmodel.fast_params))
        else:
            outer = losses.sum() if step_weights is None else outer + losses.sum() * step_weights[step]
    if not leaves:
        (outer * scale).backward()
    return losses.detach(), task_accuracies(logits.detach(), episodes.query_y)


def add_gradients(model: nn.Module, grads: tuple[torch.Tensor, ...]) -> None:
    """Add gradients w.r.t. fast weights (aligned with model.parameters(); (T, ...) per-task weights are summed over
    the tasks) into the parameters' `.grad`."""
    for p, g in zip(model.parameters(), grads):
        g = g.sum(0) if g.dim() > p.dim() else g
        p.grad = g if p.grad is None else p.grad + g


def meta_parameters(model: nn.Module, zero_head: bool = False) -> list[nn.Parameter]:
    """The parameters the outer loop learns: all of them, or all but the linear head with `zero_head` (Kao et al.,
    ICLR 2022, "MAML is a noisy contrastive learner": the head stays at zero, so every adaptation starts from
    logits that ignore the order of the labels; with one inner step only the head adapts, to a prototype-like
    classifier). The inner loop adapts every parameter either way."""
    return [p for name, p in model.named_parameters() if not (zero_head and is_head(name))]


def named_meta_parameters(model: nn.Module, rates: InnerRates | None) -> list[tuple[str, nn.Parameter]]:
    """Every tensor that receives a meta-gradient: the model's parameters and the learned rates."""
    return list(model.named_parameters()) + ([(f"rates.{name}", p) for name, p in rates.named_parameters()]
                                             if rates is not None else [])


def check_meta_gradients(named: list[tuple[str, torch.Tensor]] | nn.Module) -> None:
    """Every meta-parameter must have a gradient after the outer backward (a host-side check: no device sync)."""
    named = list(named.named_parameters()) if isinstance(named, nn.Module) else named
    missing = [name for name, p in named if p.grad is None]
    if missing:
        raise RuntimeError(f"meta-parameters without a gradient after the outer backward: {missing[:5]} "
                           f"({len(missing)} in all); the inner loop lost the graph to the meta-parameters")


def non_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A device flag, float32 (), 1.0 if any of `tensors` holds a NaN or an infinity: one fused kernel for all of
    them (GradScaler's `_amp_foreach_non_finite_check_and_unscale_`, with a scale of 1, which leaves them as they
    are), and no host sync."""
    found = torch.zeros((), device=tensors[0].device)
    torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, torch.ones((), device=found.device))
    return found


def meta_optimizer(parameters: list[nn.Parameter], lr: float) -> torch.optim.Adam:
    """The outer loop's Adam, fused: one kernel for the whole update, and it honours a device-side skip flag
    (`optimizer.found_inf`, as GradScaler uses it), so that a non-finite meta-gradient never reaches the weights
    without the host having to look."""
    return torch.optim.Adam(parameters, lr=lr, fused=True)


def make_fused(optimizer: torch.optim.Optimizer) -> None:
    """After `load_state_dict` of a checkpoint written by a non-fused Adam: keep the fused update (the loaded param
    groups say fused=None) with its step counters on the parameters' device, as the fused kernel needs them."""
    for group in optimizer.param_groups:
        group["fused"] = True
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "step" in state:
                state["step"] = torch.as_tensor(state["step"], dtype=torch.float32, device=p.device)


def chunks(episodes: Episode, size: int) -> list[Episode]:
    """Split a batch of T tasks into batches of at most `size` tasks (views, no copy)."""
    return [Episode(*(t[start:start + size] for t in episodes)) for start in range(0, len(episodes.query_y), size)]


STEP_STATS = ("loss_sum", "accuracy_sum", "skipped")  # the fields of meta_train_step's result


def meta_train_step(model: nn.Module, meta_optimizer: torch.optim.Optimizer, episodes: Episode, loop: InnerLoop,
                    rates: InnerRates | None = None, step_weights: list[float] | None = None,
                    parallel_tasks: int = 1) -> torch.Tensor:
    """One outer step over a meta-batch `episodes` (T tasks): mean query loss over the tasks, their gradients
    accumulated `parallel_tasks` tasks at a time (one batched adaptation per group; 1 = task by task, the least
    memory: each group's graph is freed by its backward).

    No host sync: the result stays on the device, a float32 tensor (3,) = STEP_STATS: the sum of the meta-batch's
    query losses, the sum of their accuracies (%), and 1.0 if the step was skipped. A NaN or infinite loss or
    meta-gradient skips the optimizer step on the device (fused Adam's `found_inf`, see `meta_optimizer`), so the
    weights and Adam's moments stay at their last finite values; the caller reads the flag when it next reads the
    numbers (fsl.train.meta_train). With an optimizer that cannot skip on the device, the flag is read here instead (one sync)
    and the step is not taken.

    Under torchrun, `episodes` is this rank's share of the meta-batch (see fsl.device.distributed): task gradients are
    scaled by 1 / (global meta-batch) and summed across ranks before the step, so every rank takes the step a single
    process would take on the whole meta-batch, and every rank sees the same sums and the same skip flag.
    """
    meta_batch = len(episodes.query_y) * distributed.world_size()
    named = named_meta_parameters(model, rates)
    for _, p in named:  # also the zero head's gradients, which no optimizer clears
        p.grad = None
    losses, accuracies = [], []
    for group in chunks(episodes, parallel_tasks):
        loss, acc = task_meta_gradient(model, group, loop, 1 / meta_batch, rates, step_weights)
        losses.append(loss)
        accuracies.append(acc)
    check_meta_gradients(named)
    sums = torch.stack([torch.cat(losses).sum(), torch.cat(accuracies).sum()]).float()
    sums = distributed.all_reduce_gradients([p for _, p in named], extra=sums)  # the step's one collective
    skipped = non_finite([p.grad for _, p in named] + [sums])
    if getattr(meta_optimizer, "_step_supports_amp_scaling", False):
        meta_optimizer.found_inf = skipped
        try:
            meta_optimizer.step()
        finally:  # as GradScaler does: a later step() without a flag must not reuse this one
            del meta_optimizer.found_inf
    elif not skipped.item():
        meta_optimizer.step()
    return torch.cat([sums, skipped.view(1)])


def evaluate_tasks(model: nn.Module, episodes: Episode, loop: InnerLoop,
                   rates: InnerRates | None = None) -> torch.Tensor:
    """Meta-test T episodes at once: `loop.steps` SGD steps from the meta-learned weights (head included), then
    classify each whole query set in one batch (BatchNorm uses its statistics). Returns query accuracies % (T,), on
    the episodes' device (no host sync). `model`'s parameters are left untouched."""
    with torch.enable_grad():
        fmodel = adapt(model, episodes.support_x, episodes.support_y, loop, rates)
    with torch.no_grad():
        return task_accuracies(fmodel(episodes.query_x), episodes.query_y)


def evaluate_episode(model: nn.Module, episode: Episode, loop: InnerLoop, rates: InnerRates | None = None) -> float:
    """Meta-test one episode (fields without the task dimension); query accuracy in %."""
    return evaluate_tasks(model, Episode(*(t.unsqueeze(0) for t in episode)), loop, rates).item()
