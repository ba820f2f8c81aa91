"""GPU speed proxies, counted on any device: the meta-training step as a CUDA run would make it, op by op.

A conv4 step at 84x84 is launch-bound on a GPU: what decides its speed is how many operator calls (kernel launches)
a task costs, how often the host waits for the device, and whether the next meta-batch's input is ready when the
step ends. All three are counted here, on the CPU too:

    python benchmarks/step_proxies.py [--archs conv4 resnet12] [--steps 3] [--out benchmarks/results/step-proxies-cpu.md]

Workload: the mini-ImageNet 5-shot cell of each arch (experiments/), protocol settings (5-way, 5 + 16 images per
class, 84x84, augmented, meta-batch 8, 2 second-order inner steps), on the real-data fixture in ../shared/data
(FSL_SHARED_DATA). The task group is the one `train.parallel_tasks=auto` picks on a CUDA device with room for the
whole meta-batch (8); on this device's own auto value too. After one warm-up step, `--steps` steady-state steps are
counted under fsl.train.opcount.OpCounter, phase by phase: episode building on the device (copy, augment, normalise; the
host's gather and augmentation plan run in the loader thread, outside), the inner loop with the query forward, the
outer backward, the update (finiteness check + Adam). Input wait: the seconds the
training loop waited for the next meta-batch (fsl.data.episodes.EpisodeStream), over a short real run.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fsl.config import load_config  # noqa: E402
from fsl.data.episodes import EpisodeDataset, EpisodeMaker, EpisodeStream, episode_loader  # noqa: E402
from fsl.maml import InnerLoop, batching, build_learner, meta_optimizer, meta_parameters, meta_train_step, schedule  # noqa: E402  # noqa: E402
from fsl.train.cell import cell_split, cell_store  # noqa: E402
from fsl.train.opcount import OpCounter  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FSL_SHARED_DATA", REPO.parent / "shared" / "data"))
TARGETS = {"conv4": 260, "resnet12": 850}  # ops per task, issue #22
# op counts do not depend on the image size (the same operators run on every size), but ResNet-12's second-order
# graphs at 84x84 hold ~7 GB per task: 8 at once do not fit a 24 GB machine, so its counts are taken at 32x32
COUNT_SIZE = {"conv4": 84, "resnet12": 32}
EPISODE_TARGET = 400                        # ops per meta-batch of episode building


def cell(arch: str, cache_dir: str, image_size: int = 84):
    """The mini-ImageNet 5-shot cell of `arch` on the fixture, its train split and store."""
    cfg = load_config(REPO / f"experiments/mini-imagenet-{arch}-5shot.yaml",
                      [f"data.root={SHARED / 'mini-imagenet-lite'}", "data.mini_imagenet_images=84x84", f"data.cache_dir={cache_dir}", "data.workers=0",
                       "device=cpu", f"data.image_size={image_size}"])
    split = cell_split(cfg, "train")
    return cfg, split, cell_store(cfg, split, "train", "train")


@contextmanager
def phase_of(ops: OpCounter, owner, name: str, phase: str):
    """Count the calls of `owner.name` (and what they run) as `phase`."""
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        with ops.phase(phase):
            return original(*args, **kwargs)
    setattr(owner, name, counted)
    try:
        yield
    finally:
        setattr(owner, name, original)


def count(arch: str, cache_dir: str, steps: int, group: int) -> dict:
    """Ops and syncs of `steps` steady-state steps with `group` tasks adapted at once, episode building as on a GPU
    (the whole meta-batch in one augmentation pass)."""
    cfg, split, store = cell(arch, cache_dir, COUNT_SIZE[arch])
    torch.manual_seed(0)
    episodes = EpisodeDataset(split, cfg.train.ways, cfg.train.shots, cfg.train.queries, seed=0,
                              count=cfg.train.meta_batch * (steps + 1), image_sizes=store.sizes)
    make = EpisodeMaker(store, cfg.train.ways, cfg.train.shots, cfg.train.queries, cfg.data.image_size,
                        torch.device("cpu"), chunk=10**9)
    model, rates = build_learner(cfg, "cpu")
    optimizer = meta_optimizer(meta_parameters(model), cfg.train.meta_lr)
    settings = schedule.at(cfg, 0)
    loop = InnerLoop.training(cfg, first_order=settings.first_order)
    ops = OpCounter()
    for i, specs in enumerate(episode_loader(episodes, cfg.train.meta_batch, 0)):
        if i == 0:  # warm-up: first-call allocations and lazy initialisation are not the steady state
            meta_train_step(model, optimizer, make(specs), loop, rates, settings.step_weights, group)
            continue
        gathered = make.gather(specs)  # host work (the loader thread's, in training): pixels, plan, labels
        with ops, phase_of(ops, torch.Tensor, "backward", "outer backward"), \
                phase_of(ops, optimizer, "step", "update (check + Adam)"):
            with ops.phase("episode building"):
                batch = make.build(gathered)
            with ops.phase("inner loop + query forward"):
                meta_train_step(model, optimizer, batch, loop, rates, settings.step_weights, group)
    step_phases = ("inner loop + query forward", "outer backward", "update (check + Adam)")
    tasks = cfg.train.meta_batch * steps
    return {"arch": arch, "group": group, "ops_per_task": sum(ops.by_phase[p] for p in step_phases) / tasks,
            "episode_ops": ops.by_phase["episode building"] / steps, "syncs_per_step": ops.syncs / steps,
            "syncs": sorted({f"{p}: {o}" for p, o in ops.sync_calls}),
            "phases": {p: ops.by_phase[p] / tasks for p in step_phases}}


def input_wait(arch: str, cache_dir: str, steps: int) -> dict:
    """Seconds per step the training loop spent getting its input (fsl.data.episodes.EpisodeStream, as fsl train uses
    it, with this device's defaults: task by task), beside the step's own seconds, at 84x84."""
    cfg, split, store = cell(arch, cache_dir)
    episodes = EpisodeDataset(split, cfg.train.ways, cfg.train.shots, cfg.train.queries, seed=0,
                              count=cfg.train.meta_batch * (steps + 1), image_sizes=store.sizes)
    make = EpisodeMaker(store, cfg.train.ways, cfg.train.shots, cfg.train.queries, cfg.data.image_size,
                        torch.device("cpu"))
    model, rates = build_learner(cfg, "cpu")
    optimizer = meta_optimizer(meta_parameters(model), cfg.train.meta_lr)
    loop = InnerLoop.training(cfg)
    step_seconds, waited = 0.0, 0.0
    with EpisodeStream(episode_loader(episodes, cfg.train.meta_batch, 1), make) as stream:
        for i, batch in enumerate(stream):
            if i == 0:
                meta_train_step(model, optimizer, batch, loop, rates)
                waited = stream.input_seconds
                continue
            start = time.perf_counter()
            meta_train_step(model, optimizer, batch, loop, rates)
            step_seconds += time.perf_counter() - start
        return {"input_s": (stream.input_seconds - waited) / steps, "step_s": step_seconds / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", default=["conv4", "resnet12"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--before", action="store_true", help="also count group 1 (task by task)")
    parser.add_argument("--wait-archs", nargs="*", default=["conv4"], help="archs whose input wait is timed (a "
                        "ResNet-12 step at 84x84 takes minutes on a CPU)")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/step-proxies-cpu.md"))
    args = parser.parse_args()
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    device = torch.device("cpu")
    lines = [f"# Step proxies: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
             f"torch {torch.__version__}", "",
             "`python benchmarks/step_proxies.py` (mini-ImageNet 5-shot cells on the fixture: 5-way, 5 + 16 images "
             "per class, 84x84, augmented, meta-batch 8, 2 second-order inner steps, fused Adam; after one warm-up "
             f"step, {args.steps} steady-state steps counted with fsl.train.opcount).", "",
             f"`train.parallel_tasks=auto` on this device: "
             f"{batching.resolve('auto', 8, device, lambda: None)[0]} ({batching.resolve('auto', 8, device, lambda: None)[1]}); on a "
             "CUDA device with room for the meta-batch: 8. The counts below are for the group a CUDA run uses "
             "(8), and for task by task (1). Op counts do not depend on the image size; conv4's are counted at 84x84, "
             "ResNet-12's at 32x32 (8 of its second-order graphs at 84x84 need ~56 GB).", "",
             "| arch | tasks at once | ops / task | target | episode building ops / meta-batch (target 400) | "
             "syncs / step (target 0) | inner loop + query forward / task | outer backward / task | update / task |",
             "|---|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="fsl-proxies-") as cache:
        waits = []
        for arch in args.archs:
            for group in ((1, 8) if args.before else (8,)):
                row = count(arch, cache, args.steps, group)
                print(row, flush=True)
                phases = row["phases"]
                lines.append(f"| {arch} | {group} | {row['ops_per_task']:.0f} | "
                             f"{'<= ' + str(TARGETS[arch]) if group == 8 else ''} | {row['episode_ops']:.0f} | "
                             f"{row['syncs_per_step']:.0f}{' (' + ', '.join(row['syncs']) + ')' if row['syncs'] else ''} | "
                             + " | ".join(f"{v:.0f}" for v in phases.values()) + " |")
            if arch in args.wait_archs:
                waits.append((arch, input_wait(arch, cache, args.steps)))
                print(waits[-1], flush=True)
    lines += ["", "Input: host seconds per step the training loop spent in `next()` of fsl.data.episodes.EpisodeStream "
              "(1 loader worker). On a CPU the batch is built (augmented) in the training thread, so this is the "
              "building time, not overlapped; on a GPU the background thread builds it on a side stream while the "
              "step runs.", "", "| arch | input s / step | step s |", "|---|---|---|"]
    lines += [f"| {arch} | {w['input_s']:.3f} | {w['step_s']:.2f} |" for arch, w in waits]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
