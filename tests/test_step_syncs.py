"""The training step a GPU wants (#22): no host sync between the log and validation boundaries, counted on the CPU.

fsl.train.opcount.OpCounter sees every aten call of `fsl train` on a mini-ImageNet-lite conv4 cell with augmentation;
the calls made while reading the step window, validating, checkpointing and logging are the boundaries, and the
host's own work on host data (describing episodes, drawing their augmentation parameters with torch's CPU generator,
gathering pixels and planning the augmentation: on a GPU, in the loader workers and the input thread) is not device
work. Any
`_local_scalar_dense` (.item(), .tolist(), bool(tensor)), `nonzero`, `unique*`, `masked_select`, boolean-mask
indexing or blocking device copy elsewhere fails the test. On a GPU, tests/test_gpu.py runs the same loop under
torch.cuda.set_sync_debug_mode("error").
"""
import pytest
import torch
from conftest import MINI_84, REPO, STORE_CACHE, fixture_root

from fsl.config import load_config
from fsl.data.episodes import EpisodeDataset, EpisodeMaker
from fsl.train import checkpoint
from fsl.train import meta_train as train
from fsl.train.opcount import OpCounter, is_sync
from fsl.train.run_log import RunLog

CONFIG = REPO / "experiments/mini-imagenet-conv4-5shot.yaml"
BOUNDARIES = [(train.StepWindow, "read"), (train.Validation, "__call__"), (checkpoint.Checkpoints, "save"),
              (RunLog, "write"), (train, "FixedEpisodes")]
HOST_WORK = [(EpisodeDataset, "__getitem__"), (EpisodeMaker, "gather")]


def counted_run(cfg, monkeypatch) -> tuple[OpCounter, list[int]]:
    """Train `cfg` under an OpCounter; boundaries counted as phase "boundary", step k's ops as "step k" (the step
    and the building of its episodes, which happens in the step's `next()`)."""
    ops = OpCounter()
    steps = []
    for phase, places in (("boundary", BOUNDARIES), ("host", HOST_WORK)):
        for owner, name in places:
            original = getattr(owner, name)

            def counted(*args, _original=original, _phase=phase, **kwargs):
                with ops.phase(_phase):
                    return _original(*args, **kwargs)
            monkeypatch.setattr(owner, name, counted)
    real_step = train.meta_train_step

    def step(*args, **kwargs):
        steps.append(len(steps) + 1)
        result = real_step(*args, **kwargs)
        ops.current = f"step {len(steps) + 1}"  # what follows (the next episodes) belongs to the next step
        return result
    monkeypatch.setattr(train, "meta_train_step", step)
    with ops:
        ops.current = "step 1"
        train.run(cfg)
    return ops, steps


def test_steady_state_training_steps_make_no_host_sync(tmp_path, monkeypatch):
    cfg = load_config(CONFIG, [f"data.root={fixture_root('mini-imagenet')}", MINI_84, f"data.cache_dir={STORE_CACHE}",
                               "data.image_size=32", "data.workers=0", "device=cpu", "train.meta_batch=2",
                               "train.shots=1", "train.queries=2", "train.tasks=12", "train.log_every=6",
                               "train.val_every=12", "train.val_episodes=2", "train.tensorboard=false",
                               f"work_dir={tmp_path}", f"results_dir={tmp_path / 'results'}"])
    assert cfg.data.train_augment and cfg.train.parallel_tasks == "auto"
    ops, steps = counted_run(cfg, monkeypatch)
    assert len(steps) == 6
    steady = [f"step {k}" for k in range(2, 7)]  # step 1 includes the first-use set-up (the auto probe, Adam state)
    outside = [(phase, op) for phase, op in ops.sync_calls if phase in steady]
    assert all(ops.by_phase[phase] > 100 for phase in steady)  # the counter saw the steps
    assert any(phase == "boundary" for phase, _ in ops.sync_calls)  # and the reads at the boundaries
    assert outside == [], f"host syncs in steady-state steps: {outside}"


def test_the_counter_catches_each_kind_of_sync():
    x = torch.arange(6.0)
    with OpCounter() as ops:
        x.sum().item()
        x.nonzero()
        x.unique()
        x[x > 2]
        torch.masked_select(x, x > 2)
        x.tolist()
        x.numpy()
        x + 1
    assert [op for _, op in ops.sync_calls].count("aten._local_scalar_dense") >= 1
    assert {op for _, op in ops.sync_calls} >= {"aten.nonzero", "aten._unique2", "aten.index", "aten.masked_select",
                                                 "Tensor.tolist", "Tensor.numpy"}
    assert torch.Tensor.tolist is not None and "read" not in torch.Tensor.tolist.__name__  # unwrapped after
    assert ops.by_op["aten.add"] == 1 and not is_sync(torch.ops.aten.add.Tensor, (x, x), {})


@pytest.mark.parametrize("non_blocking,sync", [(False, True), (True, False)])
def test_a_blocking_device_copy_counts_as_a_sync(non_blocking, sync):
    source = torch.empty(3, device="meta")  # a second device without needing one: only the call is inspected
    assert is_sync(torch.ops.aten._to_copy.default, (source,), {"device": torch.device("cpu"),
                                                                 "non_blocking": non_blocking}) == sync


def test_first_order_with_learned_rates_builds_no_double_backward_graph(monkeypatch):
    """MAML++'s first-order phase and Meta-SGD/MAML++ validation and test: every inner gradient is taken without
    create_graph (the learned rates still get their meta-gradient, through fast' = fast - rate * g)."""
    from test_maml import batch_of, make_episode

    from fsl.maml import InnerLoop, InnerRates, evaluate_tasks, task_meta_gradient
    from fsl.models import build_model

    calls, real = [], torch.autograd.grad

    def spy(*args, **kwargs):
        calls.append(bool(kwargs.get("create_graph", False)))
        return real(*args, **kwargs)
    monkeypatch.setattr(torch.autograd, "grad", spy)
    torch.manual_seed(0)
    model = build_model("conv4", ways=3, image_size=16, per_step_bn=2).double()
    rates = InnerRates(model, InnerLoop(2, 0.1, per_step_bn=True), "per_layer_per_step", 0.1).double()
    episodes = batch_of(*(make_episode(ways=3, shots=2, queries=3, seed=s) for s in range(2)))
    task_meta_gradient(model, episodes, InnerLoop(2, 0.1, first_order=True, per_step_bn=True), rates=rates,
                       step_weights=[0.5, 0.5])
    assert calls and not any(calls) and all(r.grad is not None for r in rates.rates)
    assert sum(r.grad.abs().sum() for r in rates.rates) > 0
    calls.clear()
    evaluate_tasks(model, episodes, InnerLoop(2, 0.1, True, per_step_bn=True, meta_gradient=False), rates)
    assert calls and not any(calls)
    calls.clear()
    task_meta_gradient(model, episodes, InnerLoop(2, 0.1, per_step_bn=True), rates=rates)  # second order: it does
    assert all(calls[:2])
