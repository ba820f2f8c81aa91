"""The memory one meta-training step takes, counted without running it: fsl's own `task_meta_gradient` on the meta
device (shapes and dtypes, no data), its live tensors counted by fsl.device.memory_count.LiveTensors (issue #47).

    python benchmarks/step_memory.py                                  # the table of docs/speed.md
    python benchmarks/step_memory.py --cell experiments/cub-resnet12-5shot.yaml --tasks 1 3 --orders first \
        --precisions bf16

A row is the peak of the bytes the step itself allocates (activations kept for the backward passes, the inner loop's
fast weights and their gradients, the meta-gradient), for T tasks adapted at once (`train.parallel_tasks`); the model,
its Adam state and the input batch come on top (`resident`). A GPU's caching allocator rounds each block up (to 512
bytes, and 2 MiB segments), so a GPU's `max_memory_allocated` reads a little more; the memory probe of `auto`
(fsl.maml.batching) measures it on the device, and the GPU session (benchmarks/gpu_session.sh) sets the two side by
side.

bf16: the meta device has no autocast, so `MetaAutocast` applies CUDA autocast's rule for the operators a conv4 or
ResNet-12 step uses: convolutions, linear layers and matrix products in bfloat16 (their inputs cast, weights
included), losses and softmax in float32, everything else in its inputs' dtype.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fsl.config import load_config  # noqa: E402
from fsl.data.episodes import Episode  # noqa: E402
from fsl.device.memory_count import LiveTensors  # noqa: E402
from fsl.maml import InnerLoop, build_learner  # noqa: E402
from fsl.maml.loop import READERS  # noqa: E402
from fsl.maml.step import task_meta_gradient  # noqa: E402

GiB = 2**30
LOWER = {F.conv1d, F.conv2d, F.conv3d, F.linear, torch.conv2d, torch.matmul, torch.mm, torch.bmm, torch.addmm,
         torch.baddbmm, torch.Tensor.matmul, torch.Tensor.__matmul__}
FLOAT32 = {F.cross_entropy, F.nll_loss, F.log_softmax, F.softmax, torch.log_softmax, torch.softmax}


class MetaAutocast(TorchFunctionMode):
    """CUDA autocast to `dtype` for the operators of a conv net, on tensors of any device (the meta device has none)."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in LOWER or func in FLOAT32:
            target = self.dtype if func in LOWER else torch.float32
            cast = lambda v: v.to(target) if isinstance(v, torch.Tensor) and v.is_floating_point() else v  # noqa: E731
            args, kwargs = tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def count_step(cell: str, overrides: list[str], tasks: int, first_order: bool, precision: str) -> dict:
    """Peak bytes of one `task_meta_gradient` of `tasks` tasks at once, for the cell's config, on the meta device."""
    cfg = load_config(cell, [*overrides, f"maml.first_order={str(first_order).lower()}", "device=cpu"])
    with torch.device("meta"):
        model, rates = build_learner(cfg, torch.device("meta"))
    channels = READERS[cfg.data.dataset].channels
    size, ways, shots, queries = cfg.data.image_size, cfg.train.ways, cfg.train.shots, cfg.train.queries
    labels = lambda n: torch.arange(ways, device="meta").repeat_interleave(n).repeat(tasks, 1)  # noqa: E731
    episodes = Episode(torch.empty(tasks, ways * shots, channels, size, size, device="meta"), labels(shots),
                       torch.empty(tasks, ways * queries, channels, size, size, device="meta"), labels(queries))
    loop = InnerLoop.training(cfg, first_order=first_order)
    weights = [1.0] * loop.steps if cfg.maml.multi_step_loss else None
    resident = sum(p.numel() * p.element_size() for p in model.parameters()) * 4  # weights, grad, Adam's two moments
    resident += sum(t.numel() * t.element_size() for t in episodes)
    counter = LiveTensors()
    start = time.perf_counter()
    with counter, (MetaAutocast() if precision == "bf16" else contextlib.nullcontext()):
        task_meta_gradient(model, episodes, loop, 1.0, rates, weights)
    return {"cell": Path(cell).stem, "arch": cfg.model.arch, "order": "first" if first_order else "second",
            "precision": precision, "tasks": tasks, "images": ways * (shots + queries), "image_size": size,
            "inner_steps": loop.steps, "step_gib": counter.peak / GiB, "resident_gib": resident / GiB,
            "seconds": time.perf_counter() - start}


def fits(rows: list[dict], memory_gb: float, share: float = 0.8) -> dict:
    """Tasks at once that fit `share` of a card of `memory_gb` GB, from the per-task figure of each arch/order/precision
    (the step's peak grows linearly with the tasks)."""
    out = {}
    for r in rows:
        if r["tasks"] == 1:
            free = share * memory_gb * 1e9 / GiB - r["resident_gib"]
            out[(r["arch"], r["order"], r["precision"])] = int(free // r["step_gib"])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cell", nargs="+", default=[str(REPO / "experiments/mini-imagenet-conv4-5shot.yaml"),
                                                      str(REPO / "experiments/mini-imagenet-resnet12-5shot.yaml")])
    parser.add_argument("--tasks", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--orders", nargs="+", default=["second", "first"], choices=["second", "first"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/step-memory.md"))
    parser.add_argument("overrides", nargs="*", help="key=value for every cell, e.g. train.queries=15")
    args = parser.parse_args()
    start = time.perf_counter()
    rows = [count_step(cell, args.overrides, tasks, order == "first", precision)
            for cell in args.cell for order in args.orders for precision in args.precisions for tasks in args.tasks]
    tasks_columns = " | ".join(f"{t} task{'s' if t > 1 else ''}" for t in args.tasks)
    lines = ["# Memory of one meta-training step, counted on the meta device", "",
             f"`python benchmarks/step_memory.py {' '.join(sys.argv[1:])}`".replace("  ", " ").replace(" `", "`"),
             f"({time.perf_counter() - start:.0f} s on {os.cpu_count()} CPU cores, nothing run on a device). GiB "
             "the step allocates at its peak (fsl's `task_meta_gradient`), by tasks adapted at once; `resident`: "
             "the model, its gradient and Adam's two moments, and the input batch of one task, held besides.", "",
             f"| cell | arch / order / precision | images a task | {tasks_columns} | resident |",
             "|---|---|---|" + "---|" * len(args.tasks) + "---|"]
    for key in dict.fromkeys((r["cell"], r["arch"], r["order"], r["precision"]) for r in rows):
        group = [r for r in rows if (r["cell"], r["arch"], r["order"], r["precision"]) == key]
        lines.append(f"| {key[0]} | {key[1]}, {key[2]} order, {key[3]} | {group[0]['images']} at "
                     f"{group[0]['image_size']}x{group[0]['image_size']}, {group[0]['inner_steps']} inner steps | "
                     + " | ".join(f"{r['step_gib']:.2f}" for r in group) + f" | {group[0]['resident_gib']:.2f} |")
    if 1 in args.tasks:
        cards = (12, 24, 40, 80)
        lines += ["", "Tasks at once that fit 80 % of a card (what `train.parallel_tasks=auto` takes; 0: not even one):",
                  "", "| arch / order / precision | " + " | ".join(f"{c} GB" for c in cards) + " |",
                  "|---|" + "---|" * len(cards)]
        per_card = {c: fits(rows, c) for c in cards}
        for key in per_card[cards[0]]:
            lines.append(f"| {key[0]}, {key[1]} order, {key[2]} | "
                         + " | ".join(str(per_card[c][key]) for c in cards) + " |")
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".tmp").write_text(text)
    os.replace(out.with_suffix(".tmp"), out)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
