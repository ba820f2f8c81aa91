"""Everything that changes during meta-training, as one pure function of (tasks done, the config).

    meta_lr       train.meta_lr_schedule: constant (the protocol) or cosine, over train.tasks
    first_order   maml.first_order, or MAML++'s derivative-order annealing: first order for the first
                  maml.first_order_fraction of train.tasks
    step_weights  MAML++'s multi-step loss weights (maml.multi_step_loss), annealed over maml.msl_fraction of
                  train.tasks; None: the last step's query loss alone

Training, the benchmarks and the resume check all read it from here. Being a function of tasks done, it gives a
resumed run the very settings an uninterrupted one had; `uses_total_tasks` names what would change if train.tasks
did, so a resume with another train.tasks can be refused.
"""
from __future__ import annotations

import math
from typing import NamedTuple

from fsl.config import Config


class StepSettings(NamedTuple):
    """The settings of the outer step that starts after a given number of tasks."""
    meta_lr: float
    first_order: bool
    step_weights: list[float] | None


def msl_weights(steps: int, progress: float, anneal: float) -> list[float] | None:
    """MAML++'s per-step loss weights (get_per_step_loss_importance_vector) at `progress` (share of the training
    tasks done) when they anneal over the first `anneal` share: every step 1/steps at first, the non-final ones
    falling linearly to 0.03/steps while the last rises; None once annealed (the last step's loss alone). MAML++
    moves them once per epoch; here they move continuously."""
    if progress >= anneal or steps == 1:
        return None
    done = progress / anneal  # MAML++: current_epoch / multi_step_loss_num_epochs
    floor = 0.03 / steps
    weights = [max(1 / steps - done / steps, floor)] * (steps - 1)
    return weights + [min(1 / steps + done * (steps - 1) / steps, 1 - (steps - 1) * floor)]


def meta_lr_at(cfg: Config, tasks_done: int) -> float:
    """Outer learning rate of the step that starts after `tasks_done` tasks. The schedule name is checked with the
    rest of the config (fsl.config.validate)."""
    if cfg.train.meta_lr_schedule == "constant":
        return cfg.train.meta_lr
    return cfg.train.meta_lr * (1 + math.cos(math.pi * tasks_done / cfg.train.tasks)) / 2  # cosine


def at(cfg: Config, tasks_done: int) -> StepSettings:
    """The settings of the outer step that starts after `tasks_done` of cfg.train.tasks tasks."""
    progress = tasks_done / cfg.train.tasks
    m = cfg.maml
    return StepSettings(
        meta_lr=meta_lr_at(cfg, tasks_done),
        first_order=m.first_order or progress < m.first_order_fraction,
        step_weights=msl_weights(m.inner_steps, progress, m.msl_fraction) if m.multi_step_loss else None)


def uses_total_tasks(cfg: Config) -> list[str]:
    """The settings whose schedule is laid out over train.tasks (so that another train.tasks changes the run)."""
    m = cfg.maml
    return [name for name, uses in (
        (f"train.meta_lr_schedule={cfg.train.meta_lr_schedule}", cfg.train.meta_lr_schedule != "constant"),
        (f"maml.first_order_fraction={m.first_order_fraction:g}", m.first_order_fraction > 0 and not m.first_order),
        (f"maml.multi_step_loss (maml.msl_fraction={m.msl_fraction:g})",
         m.multi_step_loss and m.msl_fraction > 0 and m.inner_steps > 1),
    ) if uses]
