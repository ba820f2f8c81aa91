"""MAML (Finn et al., ICML 2017) and its family, with higher's differentiable SGD, on T tasks at once.

One inner loop, `adapt_steps`, serves meta-training (second or first order), validation and test; an `InnerLoop`
says how it runs. It adapts T tasks together: the model (fsl.models) runs every task's images with that task's fast
weights in one batched forward (grouped convolutions, per-task BatchNorm statistics), and the inner loss is the sum
of the tasks' losses, so the gradient w.r.t. task t's fast weights is task t's alone. T = 1 is the classic one-task
loop. The variants of the config's `maml.*` keys are changes of this loop:
    FOMAML      `first_order`: no back-propagation through the inner gradients
    ANIL        `head_only`: only the head adapts (on features computed once), the body is learned through it
    Meta-SGD    `InnerRates` kind per_element: a learned rate per weight, passed to higher as the step's lr
    MAML++      LSLR (`InnerRates` per_layer_per_step), multi-step loss (`step_weights`), per-step BatchNorm
                weights (`per_step_bn`, fsl.models), derivative-order annealing and cosine meta lr (fsl.schedule)
Episodes are `fsl.episodes.Episode`s with a leading task dimension:
    support_x: (T, ways*shots, C, H, W)   support_y: (T, ways*shots) in 0..ways-1
    query_x:   (T, ways*queries, C, H, W) query_y:   (T, ways*queries)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import higher
import torch
import torch.nn.functional as F
from torch import nn

from fsl import distributed
from fsl.config import Config
from fsl.data import READERS
from fsl.episodes import Episode
from fsl.models import TaskBatchNorm2d, build_model


@dataclass(frozen=True)
class InnerLoop:
    """How one adaptation runs. `lr` is the fixed step size (ignored for parameters with learned rates)."""
    steps: int
    lr: float
    first_order: bool = False
    zero_head: bool = False      # maml.zero_head: the first step moves the (zero) head alone, exactly
    head_only: bool = False      # ANIL: maml.adapt=head
    per_step_bn: bool = False    # MAML++ BNWB: BatchNorm weights of step k at step k (the forward's `step`), not
                                 # adapted
    meta_gradient: bool = True   # a meta-gradient is taken through the loop (training); False: validation and test,
                                 # which build no graph back to the meta-parameters or the learned rates
    adapt_bn: bool = True        # maml.adapt_bn: BatchNorm's parameters adapt too (else meta-learned only)
    loss_scale: float = 1.0      # the support loss is this x the mean cross-entropy (maml.inner_loss=class_sum: ways)

    @classmethod
    def training(cls, cfg: Config, first_order: bool | None = None) -> "InnerLoop":
        """Meta-training's loop; `first_order` overrides maml.first_order (derivative-order annealing)."""
        m = cfg.maml
        return cls(m.inner_steps, m.inner_lr, m.first_order if first_order is None else first_order, m.zero_head,
                   m.adapt == "head", m.per_step_bn, adapt_bn=m.adapt_bn, loss_scale=support_loss_scale(cfg))

    @classmethod
    def testing(cls, cfg: Config) -> "InnerLoop":
        """Validation's and test's loop: maml.test_inner_steps, first order (no meta-gradient is taken)."""
        m = cfg.maml
        return cls(m.test_inner_steps, m.inner_lr, True, m.zero_head, m.adapt == "head", m.per_step_bn,
                   meta_gradient=False, adapt_bn=m.adapt_bn, loss_scale=support_loss_scale(cfg))


def support_loss_scale(cfg: Config) -> float:
    """maml.inner_loss as a factor of the mean cross-entropy: 1 (mean), or the ways (class_sum: cbfinn's utils.xent
    is each image's loss / shots, and tf.gradients sums over the images: ways x the mean)."""
    return float(cfg.test.ways) if cfg.maml.inner_loss == "class_sum" else 1.0


def task_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each task: logits (T, N, ways), labels (T, N) -> (T,)."""
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape).mean(1)


def task_accuracies(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Percentage of correct argmax per task: logits (T, N, ways), labels (T, N) -> (T,)."""
    return (logits.argmax(-1) == labels).float().mean(1) * 100


def is_head(name: str) -> bool:
    """Whether parameter `name` belongs to the linear head (`FewShotClassifier.classifier`)."""
    return name.startswith("classifier.")


def norm_parameter_names(model: nn.Module) -> set[str]:
    return {f"{module_name}.{name}" for module_name, module in model.named_modules()
            if isinstance(module, TaskBatchNorm2d) for name, _ in module.named_parameters(recurse=False)}


def adapted_mask(model: nn.Module, loop: InnerLoop) -> list[bool]:
    """For each parameter of `model` (in order): does the inner loop adapt it? Not BatchNorm's with MAML++'s per-step
    weights or maml.adapt_bn=false; only the head's with ANIL."""
    norms = norm_parameter_names(model) if loop.per_step_bn or not loop.adapt_bn else set()
    return [is_head(name) if loop.head_only else name not in norms for name, _ in model.named_parameters()]


class InnerRates(nn.Module):
    """Learned inner-loop learning rates, one tensor per adapted parameter (model order), meta-learned with it.

    kind per_element (Meta-SGD, Li et al. 2017): the parameter's shape, a rate per weight; per_layer_per_step (MAML++
    LSLR, Antoniou et al. 2019): (steps,), a rate per parameter tensor and inner step. All start at `init`
    (learn2learn's MetaSGD and MAML++'s code do; the Meta-SGD paper draws them from [0.005, 0.1] instead)."""

    def __init__(self, model: nn.Module, loop: InnerLoop, kind: str, init: float):
        super().__init__()
        self.kind = kind
        shapes = [p.shape if kind == "per_element" else (loop.steps,)
                  for p, adapted in zip(model.parameters(), adapted_mask(model, loop)) if adapted]
        self.rates = nn.ParameterList([nn.Parameter(torch.full(shape, init)) for shape in shapes])

    def at(self, step: int) -> list[torch.Tensor]:
        """The rate of every adapted parameter at inner step `step`."""
        return [rate if self.kind == "per_element" else rate[step] for rate in self.rates]


def build_learner(cfg: Config, device: torch.device | str = "cpu") -> tuple[nn.Module, InnerRates | None]:
    """The run's model (fsl.models.build_model with the cell's settings) and its learned inner rates
    (maml.learned_lr), or None, freshly initialised on `device`."""
    model = build_model(cfg.model.arch, cfg.train.ways, cfg.data.image_size, cfg.maml.zero_head,
                        cfg.maml.inner_steps if cfg.maml.per_step_bn else 0, cfg.model,
                        READERS[cfg.data.dataset].channels).to(device)
    if cfg.maml.learned_lr == "none":
        return model, None
    return model, InnerRates(model, InnerLoop.training(cfg), cfg.maml.learned_lr, cfg.maml.inner_lr).to(device)


class Adapted:
    """The model with T tasks' fast weights after inner step `step` (`fmodel`: higher's functional model). Calling it
    maps (T, N, C, H, W) to logits (T, N, ways) with those weights and, where BatchNorm weights are per step
    (MAML++), with step `step`'s: the query loss after step k uses the weights the support forward of step k used."""

    def __init__(self, fmodel: higher.patch._MonkeyPatchBase, step: int):
        self.fmodel, self.step = fmodel, step

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fmodel(x, step=self.step)

    @property
    def fast_params(self) -> list[torch.Tensor]:
        """Aligned with model.parameters(): every fast weight, (T, ...) per task."""
        return list(self.fmodel.fast_params)


class HeadAdapted:
    """ANIL's adapted model: the meta-learned body, the adapted head (`fhead`, higher's functional head)."""

    def __init__(self, model: nn.Module, fhead: higher.patch._MonkeyPatchBase):
        self.model, self.fhead = model, fhead

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fhead(self.model.embed(x))

    @property
    def fast_params(self) -> list[torch.Tensor]:
        """Aligned with model.parameters(): the body's own weights, the head's fast weights."""
        return list(self.model.features.parameters()) + list(self.fhead.fast_params)


def fast_weights(module: nn.Module, tasks: int, track: bool) -> higher.patch._MonkeyPatchBase:
    """higher's functional copy of `module` whose fast weights start as views of its parameters, one per task
    (T, ...); `track`: keep the graph through the updates (higher's track_higher_grads)."""
    fmodel = higher.monkeypatch(module, copy_initial_weights=False, track_higher_grads=track)
    fmodel.update_params([p.expand(tasks, *p.shape) for p in module.parameters()])
    return fmodel


def adapt_steps(model: nn.Module, support_x: torch.Tensor, support_y: torch.Tensor, loop: InnerLoop,
                rates: InnerRates | None = None) -> Iterator[Adapted | HeadAdapted]:
    """Run `loop.steps` SGD steps on each task's whole support set; yield the adapted model after every step.

    support_x: (T, N, C, H, W), support_y: (T, N). The adapted model maps (T, N', C, H, W) to logits (T, N', ways)
    with each task's fast weights (a leading task dimension T on every adapted weight). Second order: the fast
    weights stay differentiable functions of `model`'s parameters (and of the learned rates). First order: each
    step's gradient is a constant (FOMAML); with learned rates the update itself stays differentiable, so that the
    rates still receive their gradient, as in MAML++'s code. `model`'s own parameters are never modified.

    Where the variants differ: ANIL (`head_only`) here, the step rule in `inner_update`, MAML++'s per-step
    BatchNorm weights through the forward's `step` (fsl.models), which parameters adapt in `adapted_mask`.
    """
    tasks = support_x.shape[0]
    track = loop.meta_gradient and (not loop.first_order or rates is not None)  # a graph through the updates
    if loop.head_only:  # ANIL: only the head adapts, on features the body computes once for all steps
        fmodel = fast_weights(model.classifier, tasks, track)
        mask = [True] * len(fmodel.fast_params)
        features = model.embed(support_x)
        support_logits = lambda step: fmodel(features)  # noqa: E731
    else:
        fmodel = fast_weights(model, tasks, track)
        mask = adapted_mask(model, loop)
        support_logits = lambda step: fmodel(support_x, step=step)  # noqa: E731
    update = inner_update(model, fmodel, mask, loop, rates, track)
    for step in range(loop.steps):
        loss = task_losses(support_logits(step), support_y).sum()  # tasks are independent: sum, not mean
        update(loss * loop.loss_scale if loop.loss_scale != 1.0 else loss, step)
        yield HeadAdapted(model, fmodel) if loop.head_only else Adapted(fmodel, step)


def inner_update(model: nn.Module, fmodel: higher.patch._MonkeyPatchBase, mask: list[bool], loop: InnerLoop,
                 rates: InnerRates | None, track: bool) -> Callable[[torch.Tensor, int], None]:
    """The inner loop's SGD step, `update(summed support loss, step)`, for the loop's variant:
        zero head, step 0             the head alone (`head_step`)
        first order + learned rates   a constant gradient, an update differentiable in the rates (`first_order_step`)
        otherwise                     higher's differentiable SGD on the fast weights where `mask` says they adapt:
                                      second order (MAML), or untracked (FOMAML); learned rates (Meta-SGD, LSLR)
                                      replace loop.lr, one rate (tensor) per parameter tensor. higher is handed
                                      the adapted fast weights only: given the whole model, it differentiates the
                                      support loss w.r.t. every fast weight, and one that never adapts (BatchNorm's
                                      with maml.adapt_bn=false or MAML++'s per-step weights) is the meta-parameter
                                      itself, reached through every earlier step's graph: each step would redo all
                                      the earlier ones, for a gradient it then drops

    `loop.zero_head` says `model.classifier` is zero (`maml.zero_head`). Then the first step's gradient w.r.t. the
    backbone is exactly zero, and so is its derivative w.r.t. the backbone (every term carries the zero head:
    d loss / d features = W^T (softmax - onehot)), so the first step updates the head alone: the same fast weights
    and the same backbone meta-gradient without differentiating through the backbone twice (~1.4x faster meta-
    training at one inner step; tests/test_maml.py checks both). Only the head's own meta-gradient changes, and the
    head is not meta-learned."""
    params = list((model.classifier if loop.head_only else model).parameters())
    adapted = [p for p, adapts in zip(params, mask) if adapts]
    groups = [{"params": [p]} for p in adapted]  # one group each: rates per tensor
    sgd = higher.optim.DifferentiableSGD(torch.optim.SGD(groups, lr=loop.lr), adapted, track_higher_grads=track)

    def update(loss: torch.Tensor, step: int) -> None:
        if step == 0 and loop.zero_head and not loop.head_only:
            head_step(model, fmodel, loss, loop.lr, loop.first_order)
        elif loop.first_order and track:
            first_order_step(fmodel, loss, mask, rates.at(step) if rates is not None else None, loop.lr)
        else:
            fast = list(fmodel.fast_params)
            new = iter(sgd.step(loss, params=[p for p, adapts in zip(fast, mask) if adapts],
                                override={"lr": rates.at(step)} if rates is not None else None))
            fmodel.update_params([next(new) if adapts else p for p, adapts in zip(fast, mask)])
    return update


def first_order_step(fmodel: higher.patch._MonkeyPatchBase, loss: torch.Tensor, mask: list[bool],
                     rates: list[torch.Tensor] | None, lr: float) -> None:
    """One SGD step whose gradient is a constant (first order) but whose update stays differentiable in the fast
    weights and the learned rates: fast' = fast - rate x g, g = d loss / d fast computed without a graph (no
    double-backward graph is built, and the support forward's graph is freed at once). `mask`: which fast weights
    adapt; `rates`: one per adapted weight, or None for `lr`."""
    fast = list(fmodel.fast_params)
    grads = iter(torch.autograd.grad(loss, [p for p, adapts in zip(fast, mask) if adapts], allow_unused=True))
    rates = iter(rates) if rates is not None else None
    updated = []
    for p, adapts in zip(fast, mask):
        g, rate = (next(grads), next(rates) if rates is not None else lr) if adapts else (None, None)
        updated.append(p if g is None else p - rate * g)
    fmodel.update_params(updated)


def adapt(model: nn.Module, support_x: torch.Tensor, support_y: torch.Tensor, loop: InnerLoop,
          rates: InnerRates | None = None):
    """The model adapted by all of `loop`'s steps (see `adapt_steps`)."""
    for adapted in adapt_steps(model, support_x, support_y, loop, rates):
        pass
    return adapted


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
    numbers (fsl.train). With an optimizer that cannot skip on the device, the flag is read here instead (one sync)
    and the step is not taken.

    Under torchrun, `episodes` is this rank's share of the meta-batch (see fsl.distributed): task gradients are
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
