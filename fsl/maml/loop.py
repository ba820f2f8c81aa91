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
                weights (`per_step_bn`, fsl.models), derivative-order annealing and cosine meta lr (fsl.maml.schedule)
Episodes are `fsl.data.episodes.Episode`s with a leading task dimension:
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

from fsl import config
from fsl.config import Config, ConfigError
from fsl.data import READERS
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
    adapt: str = "all"           # maml.adapt: which parameters adapt (ADAPT_RULES; head: ANIL's own path)

    @classmethod
    def training(cls, cfg: Config, first_order: bool | None = None) -> "InnerLoop":
        """Meta-training's loop; `first_order` overrides maml.first_order (derivative-order annealing)."""
        m = cfg.maml
        return cls(m.inner_steps, m.inner_lr, m.first_order if first_order is None else first_order, m.zero_head,
                   m.adapt == "head", m.per_step_bn, adapt_bn=m.adapt_bn, loss_scale=support_loss_scale(cfg),
                   adapt=m.adapt)

    @classmethod
    def testing(cls, cfg: Config) -> "InnerLoop":
        """Validation's and test's loop: maml.test_inner_steps, first order (no meta-gradient is taken)."""
        m = cfg.maml
        return cls(m.test_inner_steps, m.inner_lr, True, m.zero_head, m.adapt == "head", m.per_step_bn,
                   meta_gradient=False, adapt_bn=m.adapt_bn, loss_scale=support_loss_scale(cfg), adapt=m.adapt)


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


# maml.adapt -> rule(parameter name): does the inner loop adapt that parameter? (`head`, ANIL, has its own path:
# the body's features are computed once.) register_adapt_rule adds one (docs/examples/boil_variant.py).
ADAPT_RULES: dict[str, Callable[[str], bool]] = {"all": lambda name: True}


def register_adapt_rule(name: str, rule: Callable[[str], bool]) -> None:
    """Make `maml.adapt=name` adapt the parameters for which `rule(parameter name)` is true (BatchNorm's still follow
    maml.adapt_bn and maml.per_step_bn). Call it before the config is loaded."""
    if name == "head" or (name in ADAPT_RULES and ADAPT_RULES[name] is not rule):
        raise ValueError(f"maml.adapt rule {name!r} already exists; pick another name")
    ADAPT_RULES[name] = rule
    if name not in config.ADAPT:
        config.ADAPT.append(name)


def adapted_mask(model: nn.Module, loop: InnerLoop) -> list[bool]:
    """For each parameter of `model` (in order): does the inner loop adapt it? Not BatchNorm's with MAML++'s per-step
    weights or maml.adapt_bn=false; only the head's with ANIL; else those of maml.adapt's rule (ADAPT_RULES)."""
    norms = norm_parameter_names(model) if loop.per_step_bn or not loop.adapt_bn else set()
    if loop.head_only:
        return [is_head(name) for name, _ in model.named_parameters()]
    rule = ADAPT_RULES[loop.adapt]
    mask = [name not in norms and rule(name) for name, _ in model.named_parameters()]
    if loop.zero_head and not any(m for m, (name, _) in zip(mask, model.named_parameters()) if is_head(name)):
        raise ConfigError(f"maml.zero_head=true with maml.adapt={loop.adapt}, which never adapts the head: every "
                          f"class would keep the same logit; fix: maml.zero_head=false")
    return mask


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
