"""MAML (Finn et al., ICML 2017) with higher's differentiable SGD, on T tasks at once.

One inner loop, `adapt`, serves meta-training (second or first order), validation and test; only its `steps` and
`first_order` arguments differ. It adapts T tasks together: the model (fsl.models) runs every task's images with
that task's fast weights in one batched forward (grouped convolutions, per-task BatchNorm statistics), and the
inner loss is the sum of the tasks' losses, so the gradient w.r.t. task t's fast weights is task t's alone. T = 1 is
the classic one-task loop. Episodes are `fsl.episodes.Episode`s with a leading task dimension:
    support_x: (T, ways*shots, C, H, W)   support_y: (T, ways*shots) in 0..ways-1
    query_x:   (T, ways*queries, C, H, W) query_y:   (T, ways*queries)
"""
from __future__ import annotations

import math

import higher
import torch
import torch.nn.functional as F
from torch import nn

from fsl import distributed
from fsl.episodes import Episode


class NonFiniteLossError(RuntimeError):
    """The meta-training loss or meta-gradient became NaN or infinite."""


def task_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each task: logits (T, N, ways), labels (T, N) -> (T,)."""
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape).mean(1)


def task_accuracies(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Percentage of correct argmax per task: logits (T, N, ways), labels (T, N) -> (T,)."""
    return (logits.argmax(-1) == labels).float().mean(1) * 100


def adapt(model: nn.Module, support_x: torch.Tensor, support_y: torch.Tensor, steps: int, inner_lr: float,
          first_order: bool = False, zero_head: bool = False) -> higher.patch._MonkeyPatchBase:
    """Run `steps` SGD steps (lr `inner_lr`) on each task's whole support set, adapting every parameter.

    support_x: (T, N, C, H, W), support_y: (T, N). Returns higher's functional copy of `model` holding the adapted
    ("fast") weights, each with a leading task dimension T. With `first_order=False` the fast weights stay
    differentiable functions of `model`'s parameters (second-order MAML); with `first_order=True` each step's
    gradient is taken without a graph and the fast weights are fresh leaves (see `meta_gradient`). `model`'s own
    parameters are never modified.

    `zero_head=True` says `model.classifier` is zero (`maml.zero_head`). Then the first step's gradient w.r.t. the
    backbone is exactly zero, and so is its derivative w.r.t. the backbone (every term carries the zero head:
    d loss / d features = W^T (softmax - onehot)), so the first step updates the head alone: the same fast weights
    and the same backbone meta-gradient without differentiating through the backbone twice (~1.4x faster meta-
    training at one inner step; tests/test_maml.py checks both). Only the head's own meta-gradient changes, and the
    head is not meta-learned.
    """
    tasks = support_x.shape[0]
    fmodel = higher.monkeypatch(model, copy_initial_weights=False, track_higher_grads=not first_order)
    fmodel.update_params([p.expand(tasks, *p.shape) for p in model.parameters()])  # one view of θ per task
    inner_optimizer = higher.optim.DifferentiableSGD(torch.optim.SGD(model.parameters(), lr=inner_lr),
                                                     model.parameters(), fmodel=fmodel,
                                                     track_higher_grads=not first_order)
    for step in range(steps):
        loss = task_losses(fmodel(support_x), support_y).sum()  # tasks are independent: sum, not mean
        if step == 0 and zero_head:
            head_step(model, fmodel, loss, inner_lr, first_order)
        else:
            inner_optimizer.step(loss)
    return fmodel


def is_head(name: str) -> bool:
    """Whether parameter `name` belongs to the linear head (`FewShotClassifier.classifier`)."""
    return name.startswith("classifier.")


def head_step(model: nn.Module, fmodel: higher.patch._MonkeyPatchBase, loss: torch.Tensor, inner_lr: float,
              first_order: bool) -> None:
    """One SGD step of the linear head's fast weights; the backbone's keep their values.

    Every fast weight becomes a new tensor, as after a full step: the backbone's are views of the old ones (or
    detached leaves, first order), so that later steps' gradients w.r.t. them count only their direct use and not
    the path through the new head, which depends on the old backbone weights."""
    heads = [is_head(name) for name, _ in model.named_parameters()]
    fast = list(fmodel.fast_params)
    grads = iter(torch.autograd.grad(loss, [p for p, head in zip(fast, heads) if head],
                                     create_graph=not first_order))
    fast = [p - inner_lr * next(grads) if head else p.view_as(p) for p, head in zip(fast, heads)]
    fmodel.update_params([p.detach().requires_grad_() for p in fast] if first_order else fast)


def task_meta_gradient(model: nn.Module, episodes: Episode, steps: int, inner_lr: float, first_order: bool,
                       scale: float = 1.0, zero_head: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Adapt the T tasks of `episodes` on their support sets, then add `scale` x d(sum of the T query losses) /
    d(meta-parameters) into each `p.grad`.

    Second order: back-propagates through the inner loop. First order (FOMAML): the gradient of the query losses at
    the adapted weights is used as the meta-gradient (higher's `track_higher_grads=False` alone would leave the
    meta-parameters without any gradient, so it is added by hand). Returns (query losses (T,), query accuracies %
    (T,)), detached.
    """
    fmodel = adapt(model, episodes.support_x, episodes.support_y, steps, inner_lr, first_order, zero_head)
    logits = fmodel(episodes.query_x)
    losses = task_losses(logits, episodes.query_y)
    if first_order:
        grads = torch.autograd.grad(losses.sum() * scale, fmodel.fast_params)
        for p, g in zip(model.parameters(), grads):
            g = g.sum(0)  # (T, ...) -> the sum over tasks
            p.grad = g if p.grad is None else p.grad + g
    else:
        (losses.sum() * scale).backward()
    return losses.detach(), task_accuracies(logits.detach(), episodes.query_y)


def meta_parameters(model: nn.Module, zero_head: bool = False) -> list[nn.Parameter]:
    """The parameters the outer loop learns: all of them, or all but the linear head with `zero_head` (Kao et al.,
    ICLR 2022, "MAML is a noisy contrastive learner": the head stays at zero, so every adaptation starts from
    logits that ignore the order of the labels; with one inner step only the head adapts, to a prototype-like
    classifier). The inner loop adapts every parameter either way."""
    return [p for name, p in model.named_parameters() if not (zero_head and is_head(name))]


def check_meta_gradients(model: nn.Module) -> None:
    """Every meta-parameter must have a gradient after the outer backward, and every gradient must be finite
    (NonFiniteLossError otherwise, before the optimizer step; one device sync for all of them)."""
    named = list(model.named_parameters())
    missing = [name for name, p in named if p.grad is None]
    if missing:
        raise RuntimeError(f"meta-parameters without a gradient after the outer backward: {missing[:5]} "
                           f"({len(missing)} in all); the inner loop lost the graph to the meta-parameters")
    finite = torch.stack([p.grad.isfinite().all() for _, p in named]).tolist()
    if not all(finite):
        bad = [name for (name, _), ok in zip(named, finite) if not ok]
        raise NonFiniteLossError(f"non-finite meta-gradient (NaN or inf) in {bad[:5]} ({len(bad)} parameter "
                                 f"tensors in all)")


def chunks(episodes: Episode, size: int) -> list[Episode]:
    """Split a batch of T tasks into batches of at most `size` tasks (views, no copy)."""
    return [Episode(*(t[start:start + size] for t in episodes)) for start in range(0, len(episodes.query_y), size)]


def meta_train_step(model: nn.Module, meta_optimizer: torch.optim.Optimizer, episodes: Episode, inner_steps: int,
                    inner_lr: float, first_order: bool = False, zero_head: bool = False,
                    parallel_tasks: int = 1) -> tuple[float, float]:
    """One outer step over a meta-batch `episodes` (T tasks): mean query loss over the tasks, their gradients
    accumulated `parallel_tasks` tasks at a time (one batched adaptation per group; 1 = task by task, the least
    memory: each group's graph is freed by its backward).

    Under torchrun, `episodes` is this rank's share of the meta-batch (see fsl.distributed): task gradients are
    scaled by 1 / (global meta-batch) and summed across ranks before the step, so every rank takes the step a single
    process would take on the whole meta-batch. Returns (mean query loss, mean query accuracy %) over the whole
    meta-batch. Raises NonFiniteLossError on a NaN/inf loss or meta-gradient, on every rank, before the optimizer
    step, so the weights stay at their last finite values.
    """
    meta_batch = len(episodes.query_y) * distributed.world_size()
    model.zero_grad(set_to_none=True)  # also the zero head's gradients, which no optimizer clears
    losses, accuracies = [], []
    for group in chunks(episodes, parallel_tasks):
        loss, acc = task_meta_gradient(model, group, inner_steps, inner_lr, first_order, 1 / meta_batch, zero_head)
        losses.append(loss)
        accuracies.append(acc)
    sums = torch.stack([torch.cat(losses).sum(), torch.cat(accuracies).sum()])
    mean_loss, mean_accuracy = (distributed.all_reduce_sum(sums) / meta_batch).tolist()
    if not math.isfinite(mean_loss):
        raise NonFiniteLossError(f"meta-training query loss is {mean_loss}")
    distributed.all_reduce_gradients(model)
    check_meta_gradients(model)  # after the all-reduce: every rank sees the same gradients, and raises together
    meta_optimizer.step()
    return mean_loss, mean_accuracy


def evaluate_tasks(model: nn.Module, episodes: Episode, steps: int, inner_lr: float,
                   zero_head: bool = False) -> torch.Tensor:
    """Meta-test T episodes at once: `steps` SGD steps from the meta-learned weights (head included), then classify
    each whole query set in one batch (BatchNorm uses its statistics). Returns query accuracies % (T,), on the CPU.
    `model`'s parameters are left untouched."""
    with torch.enable_grad():
        fmodel = adapt(model, episodes.support_x, episodes.support_y, steps, inner_lr, True, zero_head)
    with torch.no_grad():
        return task_accuracies(fmodel(episodes.query_x), episodes.query_y).cpu()


def evaluate_episode(model: nn.Module, episode: Episode, steps: int, inner_lr: float,
                     zero_head: bool = False) -> float:
    """Meta-test one episode (fields without the task dimension); query accuracy in %."""
    return evaluate_tasks(model, Episode(*(t.unsqueeze(0) for t in episode)), steps, inner_lr, zero_head).item()
