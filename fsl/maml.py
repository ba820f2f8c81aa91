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
          first_order: bool = False) -> higher.patch._MonkeyPatchBase:
    """Run `steps` SGD steps (lr `inner_lr`) on the whole support set, adapting every parameter.

    Returns higher's functional copy of `model` holding the adapted ("fast") weights. With `first_order=False` the
    fast weights stay differentiable functions of `model`'s parameters (second-order MAML); with `first_order=True`
    each step's gradient is taken without a graph and the fast weights are fresh leaves (see `meta_gradient`).
    `model`'s own parameters are never modified.
    """
    fmodel = higher.monkeypatch(model, copy_initial_weights=False, track_higher_grads=not first_order)
    inner_optimizer = higher.optim.DifferentiableSGD(torch.optim.SGD(model.parameters(), lr=inner_lr),
                                                     model.parameters(), fmodel=fmodel,
                                                     track_higher_grads=not first_order)
    for _ in range(steps):
        inner_optimizer.step(F.cross_entropy(fmodel(support_x), support_y))
    return fmodel


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Percentage of rows of logits (B, ways) whose argmax equals labels (B,); a 0-d tensor."""
    return (logits.argmax(dim=1) == labels).float().mean() * 100


def task_meta_gradient(model: nn.Module, episode: Episode, steps: int, inner_lr: float, first_order: bool,
                       scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Adapt on the support set, then add `scale` x d(query loss)/d(meta-parameters) into each `p.grad`.

    Second order: back-propagates through the inner loop. First order (FOMAML): the gradient of the query loss at
    the adapted weights is used as the meta-gradient (higher's `track_higher_grads=False` alone would leave the
    meta-parameters without any gradient, so it is added by hand). Returns (query loss, query accuracy %), detached.
    """
    fmodel = adapt(model, episode.support_x, episode.support_y, steps, inner_lr, first_order)
    logits = fmodel(episode.query_x)
    loss = F.cross_entropy(logits, episode.query_y)
    if first_order:
        grads = torch.autograd.grad(loss * scale, fmodel.fast_params)
        for p, g in zip(model.parameters(), grads):
            p.grad = g.detach() if p.grad is None else p.grad + g
    else:
        (loss * scale).backward()
    return loss.detach(), accuracy(logits.detach(), episode.query_y)


def check_meta_gradients(model: nn.Module) -> None:
    """Every meta-parameter must have a finite gradient after the outer backward."""
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    if missing:
        raise RuntimeError(f"meta-parameters without a gradient after the outer backward: {missing[:5]} "
                           f"({len(missing)} in all); the inner loop lost the graph to the meta-parameters")


def meta_train_step(model: nn.Module, meta_optimizer: torch.optim.Optimizer, episodes: list[Episode],
                    inner_steps: int, inner_lr: float, first_order: bool = False) -> tuple[float, float]:
    """One outer step over a meta-batch: mean query loss over the tasks, gradients accumulated task by task.

    Under torchrun, `episodes` is this rank's share of the meta-batch (see fsl.distributed): task gradients are
    scaled by 1 / (global meta-batch) and summed across ranks before the step, so every rank takes the step a single
    process would take on the whole meta-batch. Returns (mean query loss, mean query accuracy %) over the whole
    meta-batch. Raises NonFiniteLossError on a NaN/inf loss, on every rank, before the optimizer step, so the
    weights stay at their last finite values.
    """
    meta_batch = len(episodes) * distributed.world_size()
    meta_optimizer.zero_grad(set_to_none=True)
    losses, accuracies = [], []
    for episode in episodes:
        loss, acc = task_meta_gradient(model, episode, inner_steps, inner_lr, first_order, scale=1 / meta_batch)
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


def evaluate_episode(model: nn.Module, episode: Episode, steps: int, inner_lr: float) -> float:
    """Meta-test one episode: `steps` SGD steps from the meta-learned weights (head included), then classify the
    whole query set in one batch (BatchNorm uses its statistics). Returns query accuracy in %.
    `model`'s parameters are left untouched."""
    with torch.enable_grad():
        fmodel = adapt(model, episode.support_x, episode.support_y, steps, inner_lr, first_order=True)
    with torch.no_grad():
        return accuracy(fmodel(episode.query_x), episode.query_y).item()
