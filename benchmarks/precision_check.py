"""Reduced-scale accuracy of each precision setting (#14): same seed, same tasks, same test episodes; fp32 vs the rest.

For each arch and precision: meta-train a mini-ImageNet cell on --data-root (the mini-ImageNet-lite fixture on the GPU
machine) for --tasks tasks with the protocol's episodes, inner loop and meta-batch, then test the last weights on
--episodes fixed test episodes. Reports tasks/s, peak GPU memory, and mean ± ci95 per setting: a setting whose
accuracy is within the fp32 run's interval at equal tasks is a candidate default for GPU runs.

    python benchmarks/precision_check.py --device cuda --data-root .device/data/mini-imagenet-lite \
        --archs conv4 --tasks 2000 --episodes 500 --parallel-tasks 8

Writes benchmarks/results/precision-<device>.md.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fsl.config import load_config  # noqa: E402
from fsl.data.mini_imagenet import form_of  # noqa: E402
from fsl.device.distributed import device_slug  # noqa: E402
from fsl.device.precision import honoured_precisions  # noqa: E402
from fsl.train import meta_test as evaluate
from fsl.train import meta_train as train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run_setting(arch: str, precision: str, args: argparse.Namespace, out: Path) -> dict:
    overrides = [f"data.root={args.data_root}", f"data.mini_imagenet_images={form_of(args.data_root)}", f"data.cache_dir={out / 'cache'}", f"device={args.device}",
                 f"precision={precision}", f"train.tasks={args.tasks}", f"train.val_every={args.tasks}",
                 f"train.val_episodes={args.val_episodes}", f"test.episodes={args.episodes}",
                 f"train.parallel_tasks={args.parallel_tasks}", f"test.parallel_episodes={args.parallel_episodes}",
                 f"work_dir={out / 'work' / precision}", f"results_dir={out / 'results'}", f"name={precision}",
                 "train.tensorboard=false", f"data.workers={args.workers}"]
    cfg = load_config(REPO / f"experiments/mini-imagenet-{arch}-1shot.yaml", overrides)
    start = time.time()
    train.run(cfg)
    row = evaluate.run(cfg, cfg.run_dir / "latest.pth")
    return {"arch": arch, "precision": precision, "tasks": args.tasks, "tasks_per_s": row["tasks_per_s"],
            "peak_mb": row["peak_memory_mb"], "mean": row["mean_acc"], "ci95": row["ci95"],
            "minutes": (time.time() - start) / 60}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data-root", default=str(REPO.parent / "shared/data/mini-imagenet-lite"))
    parser.add_argument("--archs", nargs="+", default=["conv4"])
    parser.add_argument("--precisions", nargs="+", default=None, help="default: fp32 and what the device honours")
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--episodes", type=int, default=500)
    parser.add_argument("--val-episodes", type=int, default=20)
    parser.add_argument("--parallel-tasks", type=int, default=1)
    parser.add_argument("--parallel-episodes", type=int, default=1)
    parser.add_argument("--workers", type=int, default=-1)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results"))
    args = parser.parse_args()
    device = torch.device(args.device)
    precisions = args.precisions or honoured_precisions(device)
    scratch = Path(tempfile.mkdtemp(prefix="fsl-precision-"))
    rows = [run_setting(arch, precision, args, scratch) for arch in args.archs for precision in precisions]
    name = device_slug(device)
    lines = [f"# Precision settings at reduced scale: {name}", "",
             f"mini-ImageNet-lite ({args.data_root}), 1-shot cells, protocol episodes and inner loop, seed 0, "
             f"{args.tasks} training tasks, last weights tested on {args.episodes} fixed test episodes; "
             f"train.parallel_tasks={args.parallel_tasks}. `python benchmarks/precision_check.py "
             f"{' '.join(sys.argv[1:])}`", "",
             "| arch | precision | tasks/s | peak GPU MB | test accuracy (mean ± ci95) | minutes |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        peak = "" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        lines.append(f"| {r['arch']} | {r['precision']} | {r['tasks_per_s']:.2f} | {peak} | "
                     f"{r['mean']:.2f} ± {r['ci95']:.2f} | {r['minutes']:.1f} |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"precision-{name}.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines) + f"\n\nwritten: {path}")


if __name__ == "__main__":
    main()
