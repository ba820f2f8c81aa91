"""The inner loop and the outer step of MAML and its family (FOMAML, ANIL, Meta-SGD, MAML++).

    loop.py       the inner loop, one for meta-training, validation and test (InnerLoop, adapt_steps, higher's SGD)
    step.py       the outer step: the meta-gradient of a meta-batch and the meta-optimizer's update
    schedule.py   what changes with training progress: meta lr, derivative order, multi-step-loss weights
    batching.py   how many tasks are adapted at once (train.parallel_tasks, test.parallel_episodes)

The loop's and the step's names are importable from here (`from fsl.maml import InnerLoop, meta_train_step`).
"""
from fsl.maml.loop import (
                           Adapted,
                           HeadAdapted,
                           InnerLoop,
                           InnerRates,
                           adapt,
                           adapt_steps,
                           adapted_mask,
                           build_learner,
                           fast_weights,
                           first_order_step,
                           head_step,
                           inner_update,
                           is_head,
                           norm_parameter_names,
                           register_adapt_rule,
                           support_loss_scale,
                           task_accuracies,
                           task_losses,
)
from fsl.maml.step import (
                           STEP_STATS,
                           add_gradients,
                           check_meta_gradients,
                           chunks,
                           evaluate_episode,
                           evaluate_tasks,
                           make_fused,
                           meta_optimizer,
                           meta_parameters,
                           meta_train_step,
                           named_meta_parameters,
                           non_finite,
                           task_meta_gradient,
)

__all__ = ["InnerLoop", "support_loss_scale", "task_losses", "task_accuracies", "is_head", "norm_parameter_names",
           "adapted_mask", "register_adapt_rule", "InnerRates", "build_learner", "Adapted", "HeadAdapted", "fast_weights", "adapt_steps",
           "inner_update", "first_order_step", "adapt", "head_step", "task_meta_gradient", "add_gradients",
           "meta_parameters", "named_meta_parameters", "check_meta_gradients", "non_finite", "meta_optimizer",
           "make_fused", "chunks", "meta_train_step", "evaluate_tasks", "evaluate_episode", "STEP_STATS"]
