"""The real pipeline on a GPU (issue #47): `fsl train` of protocol cells for a few hundred tasks with `auto` groups, as
a user's first run takes it, and what it says about itself.

    python benchmarks/gpu_pipeline.py --data-root .device/data/mini-imagenet-lite --out $OUT [--tasks 400]

For each cell (conv4 and ResNet-12, mini-ImageNet's 84x84 fixture, every other setting the cell's): tasks/s over the
logged windows after the first (the first holds the probe and cuDNN's first calls), the share of the step's time spent
waiting for its input (the train log's input_s, #48), the group `auto` chose and the probe's MiB per task beside
benchmarks/step_memory.py's count of the same step. Rows are appended to gpu-pipeline-<device>.md as each cell
finishes, so a timeout keeps the cells done. On a CPU (the dry run in CI) it runs the same commands, tiny.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from step_memory import count_step  # noqa: E402

from fsl.device.distributed import describe_device, device_slug, resolve_device  # noqa: E402

CELLS = {"conv4": "experiments/mini-imagenet-conv4-5shot.yaml", "resnet12": "experiments/mini-imagenet-resnet12-5shot.yaml"}
AUTO = re.compile(r"train\.parallel_tasks=(\d+) \((auto: (\d+) MiB per task[^)]*|[^)]*)\)")


def run_cell(arch: str, tasks: int, data_root: str, work: Path, extra: list[str], timeout: int) -> dict:
    """Train one cell for `tasks` tasks in a subprocess; the row of what it printed and logged."""
    cell = REPO / CELLS[arch]
    overrides = [f"data.root={data_root}", "data.mini_imagenet_images=84x84", f"train.tasks={tasks}",
                 f"train.val_every={10**9}", "train.log_every=40", "train.tensorboard=false",
                 f"work_dir={work}", f"results_dir={work / 'results'}", f"data.cache_dir={work / 'cache'}", *extra]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "fsl", "train", str(cell), *overrides], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"gpu_pipeline: fsl train {cell.name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    output = done.stdout + done.stderr
    auto = AUTO.search(output)
    log = pd.read_csv(next(work.glob("*/log.csv")))
    windows = log[log.split == "train"]
    train = windows.iloc[1:] if len(windows) > 1 else windows  # after the first window, where there is one
    step_settings = [o for o in overrides if o.startswith(("train.", "maml.", "data.image_size", "model."))
                     and not o.startswith(("train.tasks", "train.val_every", "train.log_every", "train.tensorboard",
                                           "train.parallel_tasks"))]
    counted = count_step(str(cell), step_settings, 1, False, "fp32")
    trained = train.tasks.iloc[-1] - (windows.tasks.iloc[0] if len(windows) > 1 else 0)
    return {"arch": arch, "tasks": tasks, "tasks_per_s": trained / train.seconds.sum(),
            "input_share": train.input_s.sum() / train.seconds.sum(),
            "group": int(auto.group(1)) if auto else None,
            "probe_mib": float(auto.group(3)) if auto and auto.group(3) else float("nan"),
            "counted_mib": counted["step_gib"] * 1024, "wall_s": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results"))
    parser.add_argument("--archs", nargs="+", default=["conv4", "resnet12"])
    parser.add_argument("--tasks", nargs="+", type=int, default=[400, 96], help="per arch, in order")
    parser.add_argument("--timeout", type=int, default=150, help="seconds per cell")
    parser.add_argument("overrides", nargs="*", help="key=value for every cell (the dry run's tiny settings)")
    args = parser.parse_args()
    device = resolve_device("auto")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu-pipeline-{device_slug(device)}.md"
    path.write_text(f"# `fsl train` on {describe_device(device)}, torch {torch.__version__}\n\n"
                    f"`python benchmarks/gpu_pipeline.py {' '.join(sys.argv[1:])}`: tasks/s after the first log "
                    "window; input: the share of the steps' time spent waiting for their input (train log input_s); "
                    "group: train.parallel_tasks=auto's choice; MiB per task: the probe's on the device, and "
                    "benchmarks/step_memory.py's count of the same step (fp32, second order, one task).\n\n"
                    "| arch | tasks | tasks/s | input wait | auto group | probe MiB/task | counted MiB/task | "
                    "wall s |\n|---|---|---|---|---|---|---|---|\n")
    import tempfile
    for arch, tasks in zip(args.archs, args.tasks):
        with tempfile.TemporaryDirectory(prefix=f"fsl-pipeline-{arch}-") as work:
            row = run_cell(arch, tasks, args.data_root, Path(work), args.overrides, args.timeout)
        line = (f"| {row['arch']} | {row['tasks']} | {row['tasks_per_s']:.1f} | {100 * row['input_share']:.1f} % | "
                f"{row['group']} | {row['probe_mib']:.0f} | {row['counted_mib']:.0f} | {row['wall_s']:.0f} |\n")
        with open(path, "a") as f:
            f.write(line)
        print(line, end="", flush=True)
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
