"""MAML (Finn et al., ICML 2017) with higher's differentiable SGD.

One inner loop, `adapt`, serves meta-training (second or first order), validation and test; only its `steps` and
`first_order` arguments differ. Episodes are `fsl.episodes.Episode`s of support/query tensors:
    support_x: (ways*shots, C, H, W)   support_y: (ways*shots,) in 0..ways-1
    query_x:   (ways*queries, C, H, W) query_y:   (ways*queries,)
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
    """The meta-training loss became NaN or infinite."""


def adapt(model: nn.Module, support_x: torch.Tensor, support_y: torch.Tensor, steps: int, inner_lr: float,
          first_order: bool = False, zero_head: bool = False) -> higher.patch._MonkeyPatchBase:
    """Run `steps` SGD steps (lr `inner_lr`) on the whole support set, adapting every parameter.

    Returns higher's functional copy of `model` holding the adapted ("fast") weights. With `first_order=False` the
    fast weights stay differentiable functions of `model`'s parameters (second-order MAML); with `first_order=True`
    each step's gradient is taken without a graph and the fast weights are fresh leaves (see `meta_gradient`).
    `model`'s own parameters are never modified.

    `zero_head=True` says `model.classifier` is zero (`maml.zero_head`). Then the first step's gradient w.r.t. the
    backbone is exactly zero, and so is its derivative w.r.t. the backbone (every term carries the zero head:
    d loss / d features = W^T (softmax - onehot)), so the first step updates the head alone: the same fast weights
    and the same backbone meta-gradient without differentiating through the backbone twice (~1.4x faster meta-
    training at one inner step; tests/test_maml.py checks both). Only the head's own meta-gradient changes, and the
    head is not meta-learned.
    """
    fmodel = higher.monkeypatch(model, copy_initial_weights=False, track_higher_grads=not first_order)
    inner_optimizer = higher.optim.DifferentiableSGD(torch.optim.SGD(model.parameters(), lr=inner_lr),
                                                     model.parameters(), fmodel=fmodel,
                                                     track_higher_grads=not first_order)
    for step in range(steps):
        loss = F.cross_entropy(fmodel(support_x), support_y)
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


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Percentage of rows of logits (B, ways) whose argmax equals labels (B,); a 0-d tensor."""
    return (logits.argmax(dim=1) == labels).float().mean() * 100


def task_meta_gradient(model: nn.Module, episode: Episode, steps: int, inner_lr: float, first_order: bool,
                       scale: float = 1.0, zero_head: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Adapt on the support set, then add `scale` x d(query loss)/d(meta-parameters) into each `p.grad`.

    Second order: back-propagates through the inner loop. First order (FOMAML): the gradient of the query loss at
    the adapted weights is used as the meta-gradient (higher's `track_higher_grads=False` alone would leave the
    meta-parameters without any gradient, so it is added by hand). Returns (query loss, query accuracy %), detached.
    """
    fmodel = adapt(model, episode.support_x, episode.support_y, steps, inner_lr, first_order, zero_head)
    logits = fmodel(episode.query_x)
    loss = F.cross_entropy(logits, episode.query_y)
    if first_order:
        grads = torch.autograd.grad(loss * scale, fmodel.fast_params)
        for p, g in zip(model.parameters(), grads):
            p.grad = g.detach() if p.grad is None else p.grad + g
    else:
        (loss * scale).backward()
    return loss.detach(), accuracy(logits.detach(), episode.query_y)


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


def meta_train_step(model: nn.Module, meta_optimizer: torch.optim.Optimizer, episodes: list[Episode],
                    inner_steps: int, inner_lr: float, first_order: bool = False,
                    zero_head: bool = False) -> tuple[float, float]:
    """One outer step over a meta-batch: mean query loss over the tasks, gradients accumulated task by task.

    Under torchrun, `episodes` is this rank's share of the meta-batch (see fsl.distributed): task gradients are
    scaled by 1 / (global meta-batch) and summed across ranks before the step, so every rank takes the step a single
    process would take on the whole meta-batch. Returns (mean query loss, mean query accuracy %) over the whole
    meta-batch. Raises NonFiniteLossError on a NaN/inf loss, on every rank, before the optimizer step, so the
    weights stay at their last finite values.
    """
    meta_batch = len(episodes) * distributed.world_size()
    model.zero_grad(set_to_none=True)  # also the zero head's gradients, which no optimizer clears
    losses, accuracies = [], []
    for episode in episodes:
        loss, acc = task_meta_gradient(model, episode, inner_steps, inner_lr, first_order, 1 / meta_batch,
                                       zero_head)
        losses.append(loss)
        accuracies.append(acc)
    check_meta_gradients(model)
    distributed.all_reduce_gradients(model)
    mean_loss, mean_accuracy = (distributed.all_reduce_sum(torch.stack([torch.stack(losses).sum(),
                                                                        torch.stack(accuracies).sum()]))
                                / meta_batch).tolist()
    if not math.isfinite(mean_loss):
        raise NonFiniteLossError(f"meta-training query loss is {mean_loss}")
    meta_optimizer.step()
    return mean_loss, mean_accuracy


def evaluate_episode(model: nn.Module, episode: Episode, steps: int, inner_lr: float,
                     zero_head: bool = False) -> float:
    """Meta-test one episode: `steps` SGD steps from the meta-learned weights (head included), then classify the
    whole query set in one batch (BatchNorm uses its statistics). Returns query accuracy in %.
    `model`'s parameters are left untouched."""
    with torch.enable_grad():
        fmodel = adapt(model, episode.support_x, episode.support_y, steps, inner_lr, True, zero_head)
    with torch.no_grad():
        return accuracy(fmodel(episode.query_x), episode.query_y).item()
